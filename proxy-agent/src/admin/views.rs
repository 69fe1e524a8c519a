//! The admin API's JSON documents, computed from the current [`Snapshot`] (and live backend
//! health): `/status`, `/services`, `/services/{ns}/{name}`, `/routes`, `/clusters`,
//! `/problems`, `/config_dump`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Value, json};

use super::{Hub, Snapshot};
use crate::datapath::telemetry::COUNTER_NAMES;
use crate::istio::{LoadBalancer, OutlierDetection, RetryOn};
use crate::model::{EndpointState, Frontend, ObjectRef, Service};
use crate::proxy::cluster::{Backend, Cluster};
use crate::proxy::config::{Route, Rule};
use crate::proxy::telemetry::unix_secs;

fn age_s(t: SystemTime) -> f64 {
    SystemTime::now()
        .duration_since(t)
        .map_or(0.0, |d| (d.as_secs_f64() * 10.0).round() / 10.0)
}

fn ms(d: Option<std::time::Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_millis() as u64))
}

/// `/status`: generation, sync age, source, proxy, maps, problems.
pub fn status(hub: &Hub) -> Value {
    let s = hub.snapshot();
    let maps = hub
        .occupancy()
        .map(|m| json!(m))
        .unwrap_or_else(|e| json!({"error": e.to_string()}));
    let ready = hub.ready();
    let l7_routes = s.routes.routes.len();
    json!({
        "version": hub.info.version,
        "node": hub.info.node_name,
        "source": hub.info.source,
        "source_location": hub.info.source_location,
        "source_reads": hub.progress.reads(),
        "generation": s.generation,
        "synced": s.synced_at.is_some(),
        "synced_at_unix": s.synced_at.map(unix_secs),
        "synced_age_s": s.synced_at.map(age_s),
        "ready": ready.is_ok(),
        "not_ready_reason": ready.err(),
        "uptime_s": age_s(hub.started),
        "services": s.state.services.len(),
        "frontends": s.frontends.len(),
        "backends": s.apply.backends,
        "l7_routes": l7_routes,
        "proxy": {
            "enabled": hub.info.proxy_addr.is_some(),
            "listening": hub.proxy().is_some(),
            "address": hub.info.proxy_addr.map(|a| a.to_string()),
        },
        "last_apply": s.apply,
        "datapath": hub.datapath().map(|(object, adopted)| json!({"object": object, "adopted": adopted})),
        "problems": hub.reporter.count(),
        "maps": maps,
        "datapath_counters": counters(hub),
    })
}

fn counters(hub: &Hub) -> Value {
    match hub.counters() {
        Some(c) => {
            let m: BTreeMap<&str, u64> =
                COUNTER_NAMES.iter().zip(c).map(|(n, v)| (*n, v)).collect();
            json!(m)
        }
        None => Value::Null,
    }
}

/// The Service that owns a ClusterIP:port, for monitor lines.
pub fn service_of_vip(s: &Snapshot, vip: &str) -> Option<String> {
    let addr: std::net::SocketAddr = vip.parse().ok()?;
    let at = |ip: IpAddr| {
        s.frontends
            .iter()
            .find(|f| f.vip == ip && f.port == addr.port())
    };
    // A NodePort is keyed by 0.0.0.0: any node address.
    at(addr.ip())
        .or_else(|| at(Ipv4Addr::UNSPECIFIED.into()))
        .map(|f| f.service.to_string())
}

/// One row per Service port: `/services`.
pub fn services(hub: &Hub) -> Value {
    let s = hub.snapshot();
    let mut rows = Vec::new();
    for f in s.frontends.iter() {
        let svc = s.state.services.get(&f.service);
        let ready = f.backends.iter().filter(|b| !b.terminating).count();
        let terminating = f.backends.len() - ready;
        rows.push(json!({
            "namespace": f.service.namespace,
            "name": f.service.name,
            "cluster_ip": f.vip.to_string(),
            "type": f.scope.as_str(),
            "port": f.port,
            "port_name": f.port_name,
            "protocol": f.protocol.to_string(),
            "mode": if f.l7 { "L7" } else { "L4" },
            "mode_reason": svc.map(|svc| mode_reason(svc, f)),
            "ready": ready,
            "terminating": terminating,
            "affinity": f.affinity_timeout_s.map_or("None".to_string(), |t| format!("ClientIP {t}s")),
        }));
    }
    Value::Array(rows)
}

fn mode_reason(svc: &Service, f: &Frontend) -> String {
    svc.ports
        .iter()
        .find(|p| p.port == f.port && p.protocol == f.protocol)
        .map_or_else(String::new, |p| p.l7_reason(svc.mode))
}

/// Pod names by address, from the Pods and the EndpointSlices' targetRefs.
pub fn pod_names(s: &Snapshot) -> HashMap<IpAddr, String> {
    let mut m: HashMap<IpAddr, String> = s
        .state
        .pods
        .iter()
        .filter(|(_, p)| !p.ip.is_unspecified())
        .map(|(id, p)| (p.ip, id.to_string()))
        .collect();
    for sl in s.state.slices.values() {
        for ep in &sl.endpoints {
            if let Some(pod) = &ep.pod {
                m.entry(ep.addr)
                    .or_insert_with(|| format!("{}/{pod}", sl.id.namespace));
            }
        }
    }
    m
}

/// The kernel's view of one frontend, read from the pinned maps.
fn kernel_slots(hub: &Hub, f: &Frontend) -> Value {
    let maps = match crate::datapath::loader::open_pinned_maps(&hub.info.bpffs) {
        Ok(m) => m,
        Err(e) => return json!({"error": e.to_string()}),
    };
    let key = |slot| {
        crate::datapath::maps::SvcKey::new(f.vip, f.port, f.protocol.number(), f.map_scope(), slot)
    };
    let Some(master) = maps.service(&key(0)) else {
        return json!({"present": false});
    };
    let mut slots = Vec::new();
    for slot in 1..=(master.count + master.terminating_count) {
        let entry = maps.service(&key(slot));
        let backend = entry.and_then(|e| maps.backend(e.backend_id, f.vip));
        slots.push(json!({
            "slot": slot,
            "backend_id": entry.map(|e| e.backend_id),
            "address": backend.map(|b| b.endpoint()),
            "state": backend.map(|b| b.state_text()),
        }));
    }
    json!({
        "present": true,
        "service_id": master.service_id,
        "count": master.count,
        "terminating_count": master.terminating_count,
        "l7_flag": master.flags & proxy_common::SVC_F_L7 != 0,
        "affinity_timeout_s": (master.flags & proxy_common::SVC_F_AFFINITY != 0).then_some(master.affinity_timeout_s),
        "slots": slots,
    })
}

/// `/services/{ns}/{name}`: ports with kernel slots, route, endpoints and backend health.
pub fn service(hub: &Hub, id: &ObjectRef) -> Option<Value> {
    let s = hub.snapshot();
    let svc = s.state.services.get(id)?;
    let pods = pod_names(&s);
    let mut ports = Vec::new();
    for f in s.frontends.iter().filter(|f| f.service == *id) {
        let route = s
            .routes
            .routes
            .get(&match f.vip {
                IpAddr::V4(vip) => std::net::SocketAddrV4::new(vip, f.port),
                IpAddr::V6(_) => std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            })
            .filter(|_| f.l7);
        ports.push(json!({
            "port": f.port,
            "port_name": f.port_name,
            "protocol": f.protocol.to_string(),
            "mode": if f.l7 { "L7" } else { "L4" },
            "mode_reason": mode_reason(svc, f),
            "detection": detection(f),
            "backends": f.backends.iter().map(|b| json!({
                "address": std::net::SocketAddr::new(b.addr, b.port).to_string(),
                "pod": pods.get(&b.addr),
                "state": if b.terminating { "serving-terminating" } else { "ready" },
            })).collect::<Vec<_>>(),
            "kernel": kernel_slots(hub, f),
            "route": route.map(|r| route_json(r, &pods)),
            "clusters": route.map(|r| route_clusters(r).iter().map(|(c, w)| {
                let mut j = cluster_json(c, &pods);
                j["weight"] = json!(w);
                j
            }).collect::<Vec<_>>()),
        }));
    }
    let mut endpoints = Vec::new();
    for sl in s.state.slices.values().filter(|sl| sl.service == *id) {
        for ep in &sl.endpoints {
            endpoints.push(json!({
                "slice": sl.id.name,
                "address": ep.addr.to_string(),
                "state": endpoint_state(ep.state),
                "node": ep.node_name,
                "pod": ep.pod,
            }));
        }
    }
    Some(json!({
        "namespace": id.namespace,
        "name": id.name,
        "cluster_ip": svc.cluster_ips.first().map(|ip| ip.to_string()),
        "cluster_ips": svc.cluster_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
        "internal_traffic_policy": if svc.internal_local { "Local" } else { "Cluster" },
        "affinity_timeout_s": svc.affinity_timeout_s,
        "ports": ports,
        "endpoints": endpoints,
    }))
}

/// The name of an endpoint condition.
pub fn endpoint_state(s: EndpointState) -> &'static str {
    match s {
        EndpointState::Ready => "ready",
        EndpointState::ServingTerminating => "serving-terminating",
        EndpointState::NotServing => "not-serving",
    }
}

fn detection(f: &Frontend) -> Value {
    json!({
        "opaque": f.detection.opaque,
        "detect_timeout_ms": ms(f.detection.detect_timeout),
    })
}

/// `retryOn` as Istio spells it.
pub fn retry_on_text(on: &RetryOn) -> String {
    let mut v: Vec<String> = Vec::new();
    for (set, name) in [
        (on.five_xx, "5xx"),
        (on.gateway_error, "gateway-error"),
        (on.reset, "reset"),
        (on.connect_failure, "connect-failure"),
        (on.refused_stream, "refused-stream"),
        (on.retriable_4xx, "retriable-4xx"),
    ] {
        if set {
            v.push(name.into());
        }
    }
    v.extend(on.status_codes.iter().map(|c| c.to_string()));
    v.join(",")
}

fn lb_text(lb: &LoadBalancer) -> String {
    match lb {
        LoadBalancer::RoundRobin => "ROUND_ROBIN".into(),
        LoadBalancer::Random => "RANDOM".into(),
        LoadBalancer::LeastRequest => "LEAST_REQUEST".into(),
        LoadBalancer::LeastConn => "LEAST_CONN".into(),
        LoadBalancer::HashHeader(h) => format!("consistentHash httpHeaderName={h}"),
        LoadBalancer::HashCookie(c) => format!("consistentHash httpCookie={c}"),
        LoadBalancer::HashSourceIp => "consistentHash useSourceIp".into(),
    }
}

fn outlier_json(od: &OutlierDetection) -> Value {
    json!({
        "consecutive_5xx_errors": od.consecutive_5xx,
        "consecutive_gateway_errors": od.consecutive_gateway,
        "interval_ms": od.interval.as_millis() as u64,
        "base_ejection_time_ms": od.base_ejection.as_millis() as u64,
        "max_ejection_percent": od.max_ejection_percent,
        "min_health_percent": od.min_health_percent,
    })
}

fn string_match_text(m: &crate::istio::StringMatch) -> String {
    use crate::istio::StringMatch;
    match m {
        StringMatch::Exact(e) => format!("={e}"),
        StringMatch::Prefix(p) => format!("^={p}"),
        StringMatch::Regex(r) => {
            let s = r.0.as_str();
            format!(
                "~={}",
                s.strip_prefix("^(?:")
                    .and_then(|s| s.strip_suffix(")$"))
                    .unwrap_or(s)
            )
        }
        StringMatch::Present => " present".into(),
        StringMatch::PathPrefix(p) => format!("^/={p}"),
    }
}

/// A match block in one line: `uri^=/api method=GET headers end-user=jason`.
pub fn match_text(m: &crate::proxy::config::CompiledMatch) -> String {
    let m = &m.m;
    let mut parts = Vec::new();
    for (name, v) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(v) = v {
            parts.push(format!("{name}{}", string_match_text(v)));
        }
    }
    for (n, v) in &m.headers {
        parts.push(format!("header {n}{}", string_match_text(v)));
    }
    for (n, v) in &m.without_headers {
        parts.push(format!("without header {n}{}", string_match_text(v)));
    }
    for (n, v) in &m.query_params {
        parts.push(format!("query {n}{}", string_match_text(v)));
    }
    if let Some(p) = m.port {
        parts.push(format!("port={p}"));
    }
    if !m.source_labels.is_empty() {
        let l: Vec<String> = m
            .source_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.push(format!("source labels {}", l.join(",")));
    }
    if let Some(ns) = &m.source_namespace {
        parts.push(format!("source namespace {ns}"));
    }
    if m.ignore_uri_case {
        parts.push("(uri case ignored)".into());
    }
    if parts.is_empty() {
        "any".into()
    } else {
        parts.join(" ")
    }
}

/// One rule of a route.
pub fn rule_json(r: &Rule) -> Value {
    json!({
        "index": r.index,
        "name": r.name,
        "route": r.origin.as_ref().map(|o| format!("{} {}", o.kind, o.object)),
        "unresolved_weight": r.unresolved,
        "match": r.matches.iter().map(match_text).collect::<Vec<_>>(),
        "destinations": r.destinations.iter().map(|(c, w)| json!({
            "cluster": c.name,
            "subset": c.subset(),
            "weight": w,
        })).collect::<Vec<_>>(),
        "timeout_ms": ms(r.timeout),
        "retries": {
            "attempts": r.retry.attempts,
            "per_try_timeout_ms": ms(r.retry.per_try_timeout),
            "retry_on": retry_on_text(&r.retry.on),
            "budgeted": r.retry.budgeted,
        },
        "mirror": r.mirror.as_ref().map(|m| json!({"cluster": m.cluster.name, "percent": m.percent})),
        "fault": r.fault.as_ref().map(|f| json!({
            "delay_ms": f.delay.map(|(d, _)| d.as_millis() as u64),
            "delay_percent": f.delay.map(|(_, p)| p),
            "abort": f.abort.as_ref().map(|(a, _)| format!("{a:?}")),
            "abort_percent": f.abort.as_ref().map(|(_, p)| *p),
        })),
        "rewrite": r.rewrite.as_ref().map(|w| json!({
            "uri": w.uri,
            "authority": w.authority,
            "uri_regex": w.uri_regex.as_ref().map(|(re, rep)| json!({"match": re.0.as_str(), "rewrite": rep})),
        })),
        "redirect": r.redirect.as_ref().map(|d| json!({
            "uri": d.uri, "authority": d.authority, "port": d.port, "scheme": d.scheme, "code": d.code,
        })),
        "direct_response": r.direct_response.as_ref().map(|d| json!({"status": d.status, "body_bytes": d.body.len()})),
        "cors": r.cors.is_some(),
    })
}

/// One route.
pub fn route_json(r: &Route, _pods: &HashMap<IpAddr, String>) -> Value {
    json!({
        "service": r.service.to_string(),
        "virtual_service": r.virtual_service.as_ref().map(|v| v.to_string()),
        "rules": r.rules.iter().map(rule_json).collect::<Vec<_>>(),
        "tcp": r.tcp.iter().map(|t| json!({
            "match_blocks": t.matches.len(),
            "destinations": t.destinations.iter().map(|(c, w)| json!({"cluster": c.name, "weight": w})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "detection": {
            "opaque": r.detection.opaque,
            "detect_timeout_ms": ms(r.detection.detect_timeout),
        },
    })
}

/// The clusters of a route, once each, with the weight of their first appearance.
fn route_clusters(r: &Route) -> Vec<(Arc<Cluster>, u32)> {
    let mut seen = HashSet::new();
    r.rules
        .iter()
        .flat_map(|rule| rule.destinations.iter())
        .chain(r.tcp.iter().flat_map(|t| t.destinations.iter()))
        .filter(|(c, _)| seen.insert(Arc::as_ptr(c)))
        .cloned()
        .collect()
}

/// `/routes`.
pub fn routes(hub: &Hub) -> Value {
    let s = hub.snapshot();
    let pods = pod_names(&s);
    let mut v: Vec<(&std::net::SocketAddrV4, &Arc<Route>)> = s.routes.routes.iter().collect();
    v.sort_by_key(|(k, _)| **k);
    Value::Array(
        v.into_iter()
            .map(|(vip, r)| {
                let mut j = route_json(r, &pods);
                j["vip"] = json!(vip.to_string());
                j
            })
            .collect(),
    )
}

/// The live view of one backend.
pub fn backend_json(b: &Backend, c: &Cluster, pods: &HashMap<IpAddr, String>) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let od = c.policy().outlier.as_ref();
    let ejected_for = b.ejected_for(od);
    let pod = match b.addr.ip() {
        IpAddr::V4(ip) => pods.get(&IpAddr::V4(ip)).cloned(),
        IpAddr::V6(_) => None,
    };
    json!({
        "address": b.addr.to_string(),
        "pod": pod,
        "health": if b.ejected() { "ejected" } else { "healthy" },
        "ejected_for_s": ejected_for.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
        "ejected_until_unix": ejected_for.map(|d| unix_secs(SystemTime::now() + d).round()),
        "ejection_multiplier": b.ejections(),
        "ejections_total": b.ejections_total(),
        "active_requests": b.active.load(Relaxed),
        "requests_total": b.requests.load(Relaxed),
        "errors_total": b.errors.load(Relaxed),
        "connections": b.conns.open_count(),
        "idle_pooled": b.conns.idle_count(),
    })
}

/// Every cluster the routes use, once.
pub fn all_clusters(s: &Snapshot) -> Vec<Arc<Cluster>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut routes: Vec<_> = s.routes.routes.iter().collect();
    routes.sort_by_key(|(k, _)| **k);
    for (_, r) in routes {
        for c in r.clusters() {
            if seen.insert(Arc::as_ptr(c)) {
                out.push(c.clone());
            }
        }
    }
    out
}

/// One cluster with its policy and live backends.
pub fn cluster_json(c: &Cluster, pods: &HashMap<IpAddr, String>) -> Value {
    let p = c.policy();
    json!({
        "name": c.name,
        "subset": c.subset(),
        "load_balancer": lb_text(&p.lb),
        "http2": p.h2,
        "connection_pool": {
            "max_connections": p.pool.max_connections,
            "connect_timeout_ms": ms(p.pool.connect_timeout),
            "http1_max_pending_requests": p.pool.http1_max_pending,
            "http2_max_requests": p.pool.http2_max_requests,
            "max_requests_per_connection": p.pool.max_requests_per_connection,
            "max_retries": p.pool.max_retries,
        },
        "outlier_detection": p.outlier.as_ref().map(outlier_json),
        "active_requests": c.active_requests(),
        "backends": c.backends().iter().map(|b| backend_json(b, c, pods)).collect::<Vec<_>>(),
    })
}

/// `/clusters`.
pub fn clusters(hub: &Hub) -> Value {
    let s = hub.snapshot();
    let pods = pod_names(&s);
    Value::Array(
        all_clusters(&s)
            .iter()
            .map(|c| cluster_json(c, &pods))
            .collect(),
    )
}

/// `/problems`.
pub fn problems(hub: &Hub) -> Value {
    json!(hub.reporter.list())
}

/// `/config_dump`: everything the agent serves, in one document.
pub fn config_dump(hub: &Hub) -> Value {
    let s = hub.snapshot();
    let st = &s.state;
    let objects = json!({
        "services": st.services.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
        "endpoint_slices": st.slices.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
        "pods": st.pods.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
        "virtual_services": st.virtual_services.iter().map(|(k, v)| (k.to_string(), format!("{v:?}"))).collect::<BTreeMap<_, _>>(),
        "destination_rules": st.destination_rules.iter().map(|(k, v)| (k.to_string(), format!("{v:?}"))).collect::<BTreeMap<_, _>>(),
    });
    json!({
        "status": status(hub),
        "objects": objects,
        "services": services(hub),
        "routes": routes(hub),
        "clusters": clusters(hub),
        "problems": problems(hub),
        "proxy_settings": hub.proxy().map(|p| format!("{:?}", p.config())),
        "log_level": hub.log.as_ref().map(|l| l.current()),
    })
}
