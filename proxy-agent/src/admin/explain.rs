//! `explain`: what happens to one connection (and, for HTTP, one request) from a pod to a
//! ClusterIP:port, step by step and why: the hook and the Service it matches, L4 or L7 and the
//! reason, the route, destination and subset, which backends are eligible and why each other
//! endpoint is not, the retry policy with the budget left, and what the kernel would do if the
//! proxy were down.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::Hub;
use super::views::{endpoint_state, pod_names, retry_on_text};
use crate::istio::LoadBalancer;
use crate::model::{EndpointState, Frontend, Protocol, Scope};
use crate::proxy::cluster::{Cluster, hash_key};

/// The question.
#[derive(Clone, Debug, Deserialize)]
pub struct Query {
    /// The client pod's IP.
    pub from: Ipv4Addr,
    /// `VIP:PORT`.
    pub to: SocketAddrV4,
    /// `TCP` (default) or `UDP`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// The request path (HTTP).
    #[serde(default)]
    pub path: Option<String>,
    /// Request headers, `Name: value` (HTTP).
    #[serde(default)]
    pub headers: Vec<String>,
}

fn step(name: &str, verdict: impl Into<String>, detail: impl Into<String>) -> Value {
    json!({"step": name, "verdict": verdict.into(), "detail": detail.into()})
}

/// Answers a [`Query`] from the current snapshot.
pub fn explain(hub: &Hub, q: &Query) -> Value {
    let s = hub.snapshot();
    let pods = pod_names(&s);
    let proto = match q
        .protocol
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        Some("UDP") => Protocol::Udp,
        _ => Protocol::Tcp,
    };
    let hook = if proto == Protocol::Udp {
        "connect4 / sendmsg4"
    } else {
        "connect4"
    };
    let from = json!({"ip": q.from.to_string(), "pod": pods.get(&IpAddr::V4(q.from))});
    let mut steps = Vec::new();
    // What the socket hooks use: scope-0 entries (not the tc programs' Local entries), by
    // address, or a NodePort on one of this node's addresses.
    let for_clients =
        |f: &&Arc<Frontend>| !f.external_local && f.port == q.to.port() && f.protocol == proto;
    let found = s
        .frontends
        .iter()
        .filter(for_clients)
        .find(|f| f.vip == *q.to.ip())
        .or_else(|| {
            s.frontends
                .iter()
                .filter(for_clients)
                .find(|f| f.scope == Scope::NodePort && hub.is_node_addr(q.to.ip()))
        });
    let Some(fe) = found else {
        let other = s.frontends.iter().any(|f| f.vip == *q.to.ip());
        steps.push(step(
            "hook",
            "pass",
            if other {
                format!("{hook}: {} is a ClusterIP, but no Service port {}/{proto} is on it: the connect is not translated (and goes nowhere)", q.to.ip(), q.to.port())
            } else {
                format!("{hook}: {} is not a ClusterIP this node serves: the kernel leaves the connect untouched", q.to)
            },
        ));
        return json!({"from": from, "to": q.to.to_string(), "protocol": proto.to_string(), "service": null, "steps": steps, "summary": "not a Service address"});
    };
    let svc = s.state.services.get(&fe.service);
    let ready: Vec<_> = fe.backends.iter().filter(|b| !b.terminating).collect();
    let terminating = fe.backends.len() - ready.len();
    steps.push(step(
        "hook",
        "service",
        format!(
            "{hook} finds Service {} {} {}/{proto} ({} ready, {terminating} serving-terminating backends in the kernel)",
            fe.service,
            match fe.scope {
                Scope::ClusterIp => "port",
                Scope::NodePort => "NodePort",
                Scope::LoadBalancer => "LoadBalancer IP port",
                Scope::ExternalIp => "externalIP port",
            },
            fe.port,
            ready.len()
        ),
    ));
    let reason = svc
        .and_then(|svc| {
            svc.ports
                .iter()
                .find(|p| p.port == fe.port && p.protocol == fe.protocol)
                .map(|p| p.l7_reason(svc.mode))
        })
        .unwrap_or_default();
    let proxy_up = hub.proxy().is_some();
    let route = s.routes.routes.get(&q.to).filter(|_| fe.l7);
    let kernel = kernel_choice(fe, &pods, svc.is_some_and(|s| s.internal_local));
    let summary = match (fe.l7, proxy_up, route) {
        (true, true, Some(route)) => {
            steps.push(step(
                "mode",
                "L7",
                format!(
                    "{reason}: connect4 redirects the connection to the node proxy at {}",
                    hub.info
                        .proxy_addr
                        .map_or("-".to_string(), |a| a.to_string())
                ),
            ));
            steps.push(step(
                "detection",
                if fe.detection.opaque { "opaque" } else { "detect" },
                if fe.detection.opaque {
                    "annotation proxy-agent.io/protocol: opaque: carried as TCP at once, no HTTP routing".to_string()
                } else {
                    format!(
                        "HTTP/1.x or HTTP/2 from the client's first bytes is routed as HTTP; anything else, or silence for {} ms, is carried as opaque TCP",
                        fe.detection
                            .detect_timeout
                            .or(hub.proxy().map(|p| p.config().detect_timeout))
                            .map_or(1000, |d| d.as_millis() as u64)
                    )
                },
            ));
            let headers: HashMap<String, String> = q
                .headers
                .iter()
                .filter_map(|h| h.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let mut header_map = http::HeaderMap::new();
            for (k, v) in &headers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(v),
                ) {
                    header_map.append(n, v);
                }
            }
            let target = q.path.clone().unwrap_or_else(|| "/".into());
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_string(), Some(q.to_string())),
                None => (target.clone(), None),
            };
            let authority = headers
                .get("host")
                .cloned()
                .unwrap_or_else(|| format!("{}:{}", fe.service.name, fe.port));
            let method = http::Method::GET;
            let view = crate::proxy::config::RequestView {
                method: &method,
                path: &path,
                query: query.as_deref(),
                authority: &authority,
                headers: &header_map,
                client: std::net::IpAddr::V4(q.from),
            };
            let Some((rule, block)) = route.select(&view) else {
                steps.push(step(
                    "route",
                    "no rule matches",
                    format!(
                        "no rule of {} matches {method} {target}: the proxy answers 404 (route-not-found)",
                        route.virtual_service.as_ref().map_or_else(
                            || {
                                let mut o: Vec<String> = route
                                    .rules
                                    .iter()
                                    .filter_map(|r| r.origin.as_ref())
                                    .map(|o| format!("{} {}", o.kind, o.object))
                                    .collect();
                                o.dedup();
                                o.join(", ")
                            },
                            |v| format!("VirtualService {v}")
                        )
                    ),
                ));
                return json!({"from": from, "to": q.to.to_string(), "protocol": proto.to_string(), "service": fe.service.to_string(), "steps": steps, "summary": "L7 through the node proxy: no route matches (404)"});
            };
            let described = rule.describe(route);
            steps.push(step(
                "route",
                described.clone(),
                match (&route.virtual_service, &rule.origin) {
                    (Some(_), _) | (_, Some(_)) => format!(
                        "{described} matches {method} {target}{}",
                        match block {
                            None => " (a rule without match: every request)".to_string(),
                            Some(k) => format!(
                                " by its match[{k}]{}",
                                rule.matches[k]
                                    .m
                                    .name
                                    .as_ref()
                                    .map_or(String::new(), |n| format!(" ({n})"))
                            ),
                        }
                    ),
                    (None, None) => format!(
                        "no VirtualService for {}: the Service's default route",
                        fe.service
                    ),
                },
            ));
            if let Some(f) = &rule.fault {
                let mut parts = Vec::new();
                if let Some((d, pct)) = f.delay {
                    parts.push(format!("{pct}% delayed {} ms", d.as_millis()));
                }
                if let Some((a, pct)) = &f.abort {
                    parts.push(format!("{pct}% aborted with {a:?}"));
                }
                steps.push(step(
                    "fault",
                    parts.join(", "),
                    "fault injection before the request is forwarded",
                ));
            }
            if let Some(r) = &rule.redirect {
                steps.push(step(
                    "redirect",
                    r.code.to_string(),
                    format!(
                        "answered by the proxy: {} {}",
                        r.code,
                        crate::proxy::handler::redirect_location(
                            r,
                            &authority,
                            &path,
                            query.as_deref(),
                            crate::proxy::handler::matched_prefix(rule, block, &path),
                        )
                    ),
                ));
            }
            if let Some(d) = &rule.direct_response {
                steps.push(step(
                    "direct response",
                    d.status.to_string(),
                    format!(
                        "answered by the proxy with {} ({} bytes)",
                        d.status,
                        d.body.len()
                    ),
                ));
            }
            let total: u32 = rule.destinations.iter().map(|(_, w)| *w).sum();
            let mut dests = Vec::new();
            for (c, w) in &rule.destinations {
                dests.push(destination(c, *w, total, fe, &s, &pods, &headers, q));
            }
            steps.push(json!({
                "step": "destinations",
                "verdict": rule.destinations.iter().map(|(c, _)| c.name.clone()).collect::<Vec<_>>().join(", "),
                "detail": "each request picks a destination by weight, then a backend of it",
                "destinations": dests,
            }));
            let primary = rule.destinations.first().map(|(c, _)| c);
            let (in_use, limit) = primary.map_or((0, 0), |c| c.retry_budget(rule.retry.budgeted));
            steps.push(step(
                "retries",
                format!("{} retries", rule.retry.attempts),
                format!(
                    "up to {} retries on {}{}; {} now ({in_use} in flight of {})",
                    rule.retry.attempts,
                    retry_on_text(&rule.retry.on),
                    rule.retry
                        .per_try_timeout
                        .map_or(String::new(), |t| format!(", {} ms per try", t.as_millis())),
                    if rule.retry.budgeted {
                        "budget: 20% of active requests, at least 3"
                    } else {
                        "limit: the DestinationRule's maxRetries"
                    },
                    if limit == u32::MAX {
                        "unlimited".to_string()
                    } else {
                        limit.to_string()
                    }
                ),
            ));
            if let Some(m) = &rule.mirror {
                steps.push(step(
                    "mirror",
                    m.cluster.name.clone(),
                    format!(
                        "{}% of requests are copied to {} (responses ignored)",
                        m.percent, m.cluster.name
                    ),
                ));
            }
            steps.push(step(
                "fallback",
                "kernel",
                format!("if the proxy were down, connect4 would balance in the kernel: {kernel}"),
            ));
            format!(
                "L7 through the node proxy, route {}, destination {}",
                described,
                primary.map_or("-".to_string(), |c| c.name.clone())
            )
        }
        (true, _, _) => {
            let why = if hub.info.proxy_addr.is_none() {
                "the node proxy is off (no --node-ip)".to_string()
            } else {
                "the node proxy is down".to_string()
            };
            steps.push(step(
                "mode",
                "L4 (fallback)",
                format!(
                    "{reason}, but {why}: connect4 balances the connection in the kernel instead"
                ),
            ));
            steps.push(kernel_step(
                fe,
                &pods,
                svc.is_some_and(|s| s.internal_local),
                &s,
            ));
            format!("L4 in the kernel because {why}: {kernel}")
        }
        (false, _, _) => {
            steps.push(step(
                "mode",
                "L4",
                format!("{reason}: balanced in the kernel"),
            ));
            steps.push(kernel_step(
                fe,
                &pods,
                svc.is_some_and(|s| s.internal_local),
                &s,
            ));
            format!("L4 in the kernel: {kernel}")
        }
    };
    json!({
        "from": from,
        "to": q.to.to_string(),
        "protocol": proto.to_string(),
        "service": fe.service.to_string(),
        "steps": steps,
        "summary": summary,
    })
}

/// What connect4 does in the kernel for `fe`, in a sentence.
fn kernel_choice(fe: &Frontend, pods: &HashMap<IpAddr, String>, _local: bool) -> String {
    let ready: Vec<_> = fe.backends.iter().filter(|b| !b.terminating).collect();
    let name = |b: &crate::model::Backend| {
        let pod = pods
            .get(&b.addr)
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        format!("{}:{}{pod}", b.addr, b.port)
    };
    if fe.backends.is_empty() {
        return "no usable backend: the connect fails at once with ECONNREFUSED".into();
    }
    let (set, what): (Vec<_>, &str) = if ready.is_empty() {
        (
            fe.backends.iter().collect(),
            "serving-terminating (no endpoint is ready)",
        )
    } else {
        (ready, "ready")
    };
    let affinity = fe.affinity_timeout_s.map_or(String::new(), |t| {
        format!("; sessionAffinity ClientIP keeps a client on its backend for {t}s")
    });
    format!(
        "a random one of {} {what} backends: {}{affinity}",
        set.len(),
        set.iter().map(|b| name(b)).collect::<Vec<_>>().join(", ")
    )
}

fn kernel_step(
    fe: &Frontend,
    pods: &HashMap<IpAddr, String>,
    local: bool,
    s: &super::Snapshot,
) -> Value {
    let eligible: Vec<Value> = fe
        .backends
        .iter()
        .filter(|b| !b.terminating || fe.backends.iter().all(|x| x.terminating))
        .map(|b| json!({"address": std::net::SocketAddr::new(b.addr, b.port).to_string(), "pod": pods.get(&b.addr)}))
        .collect();
    let excluded = excluded_endpoints(fe, s, local, |_| None);
    json!({
        "step": "kernel",
        "verdict": format!("{} eligible", eligible.len()),
        "detail": kernel_choice(fe, pods, local),
        "eligible": eligible,
        "excluded": excluded,
    })
}

/// Endpoints of the Service port that are not eligible, with why; `extra` adds a reason for
/// endpoints that would otherwise be eligible (outside a subset, ejected).
fn excluded_endpoints(
    fe: &Frontend,
    s: &super::Snapshot,
    local: bool,
    extra: impl Fn(SocketAddr) -> Option<String>,
) -> Vec<Value> {
    let pods = pod_names(s);
    let node = s.state.node_name.as_deref();
    let any_ready = fe.backends.iter().any(|b| !b.terminating);
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for sl in s
        .state
        .slices
        .values()
        .filter(|sl| sl.service == fe.service)
    {
        let Some(port) = sl
            .ports
            .iter()
            .find(|p| p.name == fe.port_name && p.protocol == fe.protocol)
        else {
            continue;
        };
        for ep in &sl.endpoints {
            let addr = SocketAddr::from((ep.addr, port.port));
            if !seen.insert(addr) {
                continue;
            }
            let why = if ep.state == EndpointState::NotServing {
                Some("not ready and not serving".to_string())
            } else if local && node.is_some() && ep.node_name.as_deref() != node {
                Some(format!(
                    "on node {} (internalTrafficPolicy: Local keeps this node's endpoints only)",
                    ep.node_name.as_deref().unwrap_or("unknown")
                ))
            } else if ep.state == EndpointState::ServingTerminating && any_ready {
                Some("terminating: used only when no endpoint is ready".to_string())
            } else {
                extra(addr)
            };
            if let Some(why) = why {
                out.push(json!({
                    "address": addr.to_string(),
                    "pod": pods.get(&ep.addr).cloned().or(ep.pod.clone()),
                    "state": endpoint_state(ep.state),
                    "reason": why,
                }));
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn destination(
    c: &Cluster,
    weight: u32,
    total: u32,
    fe: &Frontend,
    s: &super::Snapshot,
    pods: &HashMap<IpAddr, String>,
    headers: &HashMap<String, String>,
    _q: &Query,
) -> Value {
    let od = c.policy().outlier.as_ref();
    let in_cluster: HashMap<SocketAddr, &std::sync::Arc<crate::proxy::cluster::Backend>> =
        c.backends().iter().map(|b| (b.addr, b)).collect();
    let same_service = c.name.starts_with(&format!("{}:", fe.service));
    let subset_labels = c.subset().and_then(|name| {
        let rule = s.state.destination_rules.iter().find(|(id, dr)| {
            crate::proxy::config::resolve_host(&dr.host, &id.namespace) == fe.service
        })?;
        rule.1.subsets.iter().find(|x| x.name == name).map(|x| {
            x.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
    });
    let mut eligible = Vec::new();
    for b in c.backends() {
        if b.ejected() {
            continue;
        }
        let pod = match b.addr.ip() {
            IpAddr::V4(ip) => pods.get(&IpAddr::V4(ip)).cloned(),
            IpAddr::V6(_) => None,
        };
        eligible.push(json!({
            "address": b.addr.to_string(),
            "pod": pod,
            "active_requests": b.active.load(std::sync::atomic::Ordering::Relaxed),
        }));
    }
    let excluded = if same_service {
        excluded_endpoints(fe, s, false, |addr| match in_cluster.get(&addr) {
            None => Some(match (c.subset(), &subset_labels) {
                (Some(sub), Some(l)) => format!("outside subset {sub} (labels {l})"),
                (Some(sub), None) => format!("outside subset {sub}"),
                (None, _) => "not in this destination".to_string(),
            }),
            Some(b) if b.ejected() => Some(format!(
                "ejected by outlier detection for {:.0} s more (ejection multiplier {})",
                b.ejected_for(od).map_or(0.0, |d| d.as_secs_f64()),
                b.ejections()
            )),
            Some(_) => None,
        })
    } else {
        c.backends()
            .iter()
            .filter(|b| b.ejected())
            .map(|b| {
                json!({
                    "address": b.addr.to_string(),
                    "reason": format!("ejected by outlier detection for {:.0} s more", b.ejected_for(od).map_or(0.0, |d| d.as_secs_f64())),
                })
            })
            .collect()
    };
    let lb = &c.policy().lb;
    let hashed = match lb {
        LoadBalancer::HashHeader(h) => Some(match headers.get(&h.to_ascii_lowercase()) {
            Some(v) => {
                let pick = c.pick(Some(hash_key(v.as_bytes())), &[]);
                format!(
                    "consistentHash on header {h}: {v:?} goes to {}",
                    pick.map_or("no backend".to_string(), |b| b.addr.to_string())
                )
            }
            None => format!("consistentHash on header {h}: without it, a random backend"),
        }),
        _ => None,
    };
    json!({
        "cluster": c.name,
        "subset": c.subset(),
        "weight": weight,
        "share_percent": if total == 0 { 100.0 } else { f64::from(weight) * 100.0 / f64::from(total) },
        "load_balancer": format!("{lb:?}"),
        "hash": hashed,
        "eligible": eligible,
        "excluded": excluded,
        "panic": eligible_is_empty_panic(c),
    })
}

fn eligible_is_empty_panic(c: &Cluster) -> Option<String> {
    let n = c.backends().len();
    if n == 0 {
        return Some("no backend: requests get 503 no-healthy-upstream".into());
    }
    let healthy = c.backends().iter().filter(|b| !b.ejected()).count();
    let min = c
        .policy()
        .outlier
        .as_ref()
        .map_or(0, |o| o.min_health_percent);
    if healthy * 100 < min as usize * n {
        Some(format!(
            "panic mode: {healthy} of {n} healthy is below minHealthPercent {min}: requests go to every backend"
        ))
    } else if healthy == 0 {
        Some("every backend is ejected: requests get 503 no-healthy-upstream".into())
    } else {
        None
    }
}
