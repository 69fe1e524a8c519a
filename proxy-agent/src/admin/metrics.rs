//! `/metrics`: Prometheus text from the `prometheus-client` crate.
//!
//! Request and TCP metrics carry Istio's standard names and labels, so Istio's Grafana
//! dashboards and Kiali queries work unchanged. The node proxy sits on the client's side of
//! every connection, so it reports as Istio's client-side proxies do: `reporter="source"`.
//! Ours are prefixed `proxy_agent_`: the resilience machinery (retries by reason, budget
//! exhaustion, ejections, pool overflow), protocol detection, proxy connections, the
//! datapath's decision counters and map occupancy, and kube-proxy-style sync metrics.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::Hub;
use crate::datapath::telemetry::COUNTER_NAMES;
use crate::proxy::telemetry::{
    BYTES_BUCKETS, DURATION_BUCKETS_MS, Hist, Peer, RetryReason, flags, peer_of, service_of,
};

/// The value of Istio's `reporter` label for our series.
pub const REPORTER: &str = "source";
/// The cluster DNS domain in `destination_service`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Builds the registry of `hub`'s metrics.
pub fn registry(hub: &Arc<Hub>) -> Registry {
    let mut r = Registry::default();
    r.register(
        "proxy_agent_sync_duration_seconds",
        "Seconds per sync of the desired state into maps and routes (kube-proxy's sync_proxy_rules_duration)",
        hub.sync.duration.clone(),
    );
    r.register(
        "proxy_agent_network_programming_duration_seconds",
        "Seconds from an EndpointSlice's last-change-trigger-time to maps and routes applied (kube-proxy's network_programming_duration)",
        hub.sync.network_programming.clone(),
    );
    r.register(
        "proxy_agent_sync_failures",
        "Applies that failed (the maps keep their last consistent state and the apply is retried)",
        hub.sync.failures.clone(),
    );
    r.register_collector(Box::new(HubCollector(Arc::downgrade(hub))));
    r
}

/// Encodes the registry as Prometheus text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[derive(Debug)]
struct HubCollector(Weak<Hub>);

type Labels = Vec<(&'static str, String)>;

fn peer_labels(side: &'static str, p: &Peer, l: &mut Labels) {
    let key = |k: &'static str| -> &'static str {
        match (side, k) {
            ("source", "workload") => "source_workload",
            ("source", "canonical_service") => "source_canonical_service",
            ("source", "canonical_revision") => "source_canonical_revision",
            ("source", "workload_namespace") => "source_workload_namespace",
            ("source", "principal") => "source_principal",
            ("source", "app") => "source_app",
            ("source", "version") => "source_version",
            ("source", "cluster") => "source_cluster",
            (_, "workload") => "destination_workload",
            (_, "canonical_service") => "destination_canonical_service",
            (_, "canonical_revision") => "destination_canonical_revision",
            (_, "workload_namespace") => "destination_workload_namespace",
            (_, "principal") => "destination_principal",
            (_, "app") => "destination_app",
            (_, "version") => "destination_version",
            _ => "destination_cluster",
        }
    };
    let canonical = if p.app != "unknown" {
        p.app.clone()
    } else {
        p.workload.clone()
    };
    let revision = if p.version != "unknown" {
        p.version.clone()
    } else {
        "latest".into()
    };
    l.push((key("workload"), p.workload.clone()));
    l.push((key("canonical_service"), canonical));
    l.push((key("canonical_revision"), revision));
    l.push((key("workload_namespace"), p.namespace.clone()));
    l.push((key("principal"), "unknown".into()));
    l.push((key("app"), p.app.clone()));
    l.push((key("version"), p.version.clone()));
    l.push((key("cluster"), "Kubernetes".into()));
}

fn istio_labels(source: u32, destination: u32, service: u32) -> Labels {
    let mut l: Labels = vec![("reporter", REPORTER.into())];
    peer_labels("source", &peer_of(source), &mut l);
    let svc = service_of(service);
    let (name, ns) = svc
        .as_ref()
        .map_or(("unknown".into(), "unknown".into()), |s| {
            (s.name.clone(), s.namespace.clone())
        });
    l.push((
        "destination_service",
        if svc.is_some() {
            format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}")
        } else {
            "unknown".into()
        },
    ));
    l.push(("destination_service_name", name));
    l.push(("destination_service_namespace", ns));
    peer_labels("destination", &peer_of(destination), &mut l);
    l
}

fn hist(
    enc: &mut prometheus_client::encoding::MetricEncoder<'_>,
    h: &Hist,
    bounds: &[f64],
) -> std::fmt::Result {
    let buckets: Vec<(f64, u64)> = bounds
        .iter()
        .copied()
        .chain([f64::INFINITY])
        .enumerate()
        .map(|(i, b)| (b, h.counts.get(i).copied().unwrap_or(0)))
        .collect();
    enc.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        h.sum,
        h.count(),
        &buckets,
        None,
    )
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let m = ConstCounter::new(v);
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let m = ConstGauge::new(v);
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

fn labelled_counters(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut d = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in rows {
        ConstCounter::new(*v).encode(d.encode_family(l)?)?;
    }
    Ok(())
}

fn labelled_gauges(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> std::fmt::Result {
    let mut d = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in rows {
        ConstGauge::new(*v).encode(d.encode_family(l)?)?;
    }
    Ok(())
}

impl Collector for HubCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(hub) = self.0.upgrade() else {
            return Ok(());
        };
        let t = &hub.telemetry;
        // Istio's request metrics.
        let series = t.request_series();
        let rows: Vec<(Labels, &crate::proxy::telemetry::RequestSeries)> = series
            .iter()
            .map(|(k, s)| {
                let mut l = istio_labels(k.source, k.destination, k.service);
                l.push(("request_protocol", k.protocol.as_str().into()));
                l.push(("response_code", k.code.to_string()));
                l.push((
                    "grpc_response_status",
                    if k.grpc_status == u16::MAX {
                        String::new()
                    } else {
                        k.grpc_status.to_string()
                    },
                ));
                l.push(("response_flags", flags::render(k.flags)));
                l.push(("connection_security_policy", "none".into()));
                (l, s)
            })
            .collect();
        {
            let mut d = enc.encode_descriptor(
                "istio_requests",
                "Requests through the node proxy",
                None,
                MetricType::Counter,
            )?;
            for (l, s) in &rows {
                ConstCounter::new(s.requests).encode(d.encode_family(l)?)?;
            }
        }
        for (name, help, pick, bounds) in [
            (
                "istio_request_duration_milliseconds",
                "Request duration, from the request head to the end of the response",
                0,
                &DURATION_BUCKETS_MS[..],
            ),
            (
                "istio_request_bytes",
                "Request body sizes",
                1,
                &BYTES_BUCKETS[..],
            ),
            (
                "istio_response_bytes",
                "Response body sizes",
                2,
                &BYTES_BUCKETS[..],
            ),
        ] {
            let mut d = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (l, s) in &rows {
                let h = match pick {
                    0 => &s.duration_ms,
                    1 => &s.request_bytes,
                    _ => &s.response_bytes,
                };
                hist(&mut d.encode_family(l)?, h, bounds)?;
            }
        }
        // Istio's TCP metrics, for opaque connections.
        let tcp = t.tcp_series();
        let tcp_rows: Vec<(Labels, crate::proxy::telemetry::TcpSeries)> = tcp
            .iter()
            .map(|(k, s)| {
                let mut l = istio_labels(k.source, k.destination, k.service);
                l.push(("request_protocol", "tcp".into()));
                l.push(("response_flags", flags::render(k.flags)));
                l.push(("connection_security_policy", "none".into()));
                (l, *s)
            })
            .collect();
        for (name, help, pick) in [
            (
                "istio_tcp_connections_opened",
                "Opaque TCP connections opened",
                0,
            ),
            (
                "istio_tcp_connections_closed",
                "Opaque TCP connections closed",
                1,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent to clients on opaque TCP connections",
                2,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from clients on opaque TCP connections",
                3,
            ),
        ] {
            let v: Vec<(Labels, u64)> = tcp_rows
                .iter()
                .map(|(l, s)| {
                    (
                        l.clone(),
                        match pick {
                            0 => s.opened,
                            1 => s.closed,
                            2 => s.sent,
                            _ => s.received,
                        },
                    )
                })
                .collect();
            labelled_counters(&mut enc, name, help, &v)?;
        }
        // Ours: resilience.
        let r = &t.resilience;
        let retries: Vec<(Labels, u64)> = RetryReason::ALL
            .iter()
            .map(|why| {
                (
                    vec![("reason", why.as_str().to_string())],
                    r.retries[*why as usize].load(Relaxed),
                )
            })
            .collect();
        labelled_counters(
            &mut enc,
            "proxy_agent_retries",
            "Retries made, by what failed",
            &retries,
        )?;
        counter(
            &mut enc,
            "proxy_agent_retry_budget_exhausted",
            "Retries not made because the retry budget or maxRetries was used up",
            r.budget_exhausted.load(Relaxed),
        )?;
        labelled_counters(
            &mut enc,
            "proxy_agent_pool_overflow",
            "Requests refused by connection pool limits (503 UO)",
            &[
                (
                    vec![("reason", "pending".into())],
                    r.overflow_pending.load(Relaxed),
                ),
                (
                    vec![("reason", "timeout".into())],
                    r.overflow_timeout.load(Relaxed),
                ),
            ],
        )?;
        counter(
            &mut enc,
            "proxy_agent_outlier_ejections",
            "Backends ejected by outlier detection",
            crate::proxy::cluster::EJECTIONS.load(Relaxed),
        )?;
        let s = hub.snapshot();
        let mut ejected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for c in super::views::all_clusters(&s) {
            let e = ejected.entry(c.name.clone()).or_default();
            e.0 += c.backends().iter().filter(|b| b.ejected()).count() as i64;
            e.1 += c.backends().len() as i64;
        }
        let rows: Vec<(Labels, i64)> = ejected
            .iter()
            .map(|(c, (e, _))| (vec![("cluster", c.clone())], *e))
            .collect();
        labelled_gauges(
            &mut enc,
            "proxy_agent_ejected_backends",
            "Backends ejected now, by destination",
            &rows,
        )?;
        let rows: Vec<(Labels, i64)> = ejected
            .iter()
            .map(|(c, (_, n))| (vec![("cluster", c.clone())], *n))
            .collect();
        labelled_gauges(
            &mut enc,
            "proxy_agent_cluster_backends",
            "Backends of each destination",
            &rows,
        )?;
        // Ours: proxy connections and detection.
        if let Some(p) = hub.proxy() {
            let st = p.stats.summary();
            let detect: Vec<(Labels, u64)> = st
                .iter()
                .filter(|(k, _)| matches!(*k, "http1" | "http2" | "opaque"))
                .map(|(k, v)| (vec![("protocol", k.to_string())], *v))
                .collect();
            labelled_counters(
                &mut enc,
                "proxy_agent_detections",
                "Protocol detection verdicts on redirected connections",
                &detect,
            )?;
            let events: Vec<(Labels, u64)> = st
                .iter()
                .filter(|(k, _)| !matches!(*k, "http1" | "http2" | "opaque"))
                .map(|(k, v)| (vec![("event", k.to_string())], *v))
                .collect();
            labelled_counters(
                &mut enc,
                "proxy_agent_proxy_connections",
                "Downstream connections of the proxy, by what happened to them",
                &events,
            )?;
            gauge(
                &mut enc,
                "proxy_agent_proxy_active_connections",
                "Downstream connections open now",
                p.active_connections() as i64,
            )?;
        }
        counter(
            &mut enc,
            "proxy_agent_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            t.access_log_dropped(),
        )?;
        // Ours: the datapath.
        if let Some(c) = hub.counters() {
            let hooks: Vec<(Labels, u64)> = (0..8)
                .map(|i| (vec![("hook", COUNTER_NAMES[i].to_string())], c[i]))
                .collect();
            labelled_counters(
                &mut enc,
                "proxy_agent_datapath_translations",
                "Socket translations by the eBPF programs, by hook (forward in connect/sendmsg, reverse in recvmsg/getpeername)",
                &hooks,
            )?;
            labelled_counters(
                &mut enc,
                "proxy_agent_datapath_refused",
                "Connects and sends refused by the datapath",
                &[
                    (
                        vec![("reason", "no_backend".into())],
                        c[proxy_common::STAT_REFUSED as usize],
                    ),
                    (
                        vec![("reason", "proxy_port".into())],
                        c[proxy_common::STAT_PROXY_PORT_REFUSED as usize],
                    ),
                ],
            )?;
            counter(
                &mut enc,
                "proxy_agent_datapath_l7_redirects",
                "HTTP/gRPC connects redirected to the node proxy",
                c[proxy_common::STAT_L7_REDIRECT as usize],
            )?;
            counter(
                &mut enc,
                "proxy_agent_datapath_l7_fallbacks",
                "HTTP/gRPC connects balanced in the kernel because the proxy was down",
                c[proxy_common::STAT_L7_FALLBACK as usize],
            )?;
            counter(
                &mut enc,
                "proxy_agent_monitor_events",
                "Events written to the monitor ring buffer (only while a monitor is attached)",
                c[proxy_common::STAT_EVENTS as usize],
            )?;
            counter(
                &mut enc,
                "proxy_agent_monitor_events_lost",
                "Monitor events lost because the ring buffer was full",
                c[proxy_common::STAT_EVENTS_LOST as usize],
            )?;
        }
        if let Ok(maps) = hub.occupancy() {
            let entries: Vec<(Labels, i64)> = maps
                .iter()
                .map(|m| (vec![("map", m.name.clone())], m.entries as i64))
                .collect();
            labelled_gauges(
                &mut enc,
                "proxy_agent_bpf_map_entries",
                "Entries in each BPF map",
                &entries,
            )?;
            let cap: Vec<(Labels, i64)> = maps
                .iter()
                .map(|m| (vec![("map", m.name.clone())], i64::from(m.capacity)))
                .collect();
            labelled_gauges(
                &mut enc,
                "proxy_agent_bpf_map_capacity",
                "Capacity (max_entries) of each BPF map",
                &cap,
            )?;
        }
        // Ours: sync state.
        gauge(
            &mut enc,
            "proxy_agent_sync_generation",
            "Generation of the state last applied",
            s.generation as i64,
        )?;
        let ts = s.synced_at.map_or(0.0, crate::proxy::telemetry::unix_secs);
        let m = ConstGauge::new(ts);
        m.encode(enc.encode_descriptor(
            "proxy_agent_last_sync_timestamp_seconds",
            "When the maps last took a state (Unix seconds)",
            None,
            m.metric_type(),
        )?)?;
        gauge(
            &mut enc,
            "proxy_agent_config_problems",
            "Configuration problems now (see /problems)",
            hub.reporter.count() as i64,
        )?;
        gauge(
            &mut enc,
            "proxy_agent_ready",
            "1 once the first sync is done (and the proxy listens, when L7 is on)",
            i64::from(hub.ready().is_ok()),
        )?;
        Ok(())
    }
}
