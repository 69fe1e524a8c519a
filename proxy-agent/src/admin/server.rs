//! The admin API (`--admin-addr`, loopback by default) and the metrics and health endpoints
//! (`--metrics-addr`), served by hyper on the admin plane's own runtime.
//!
//! Admin: `/status`, `/services`, `/services/{ns}/{name}`, `/routes`, `/clusters`,
//! `/problems`, `/explain?from=IP&to=VIP:PORT[&protocol=UDP][&path=P][&header=K:V]`,
//! `/config_dump`, `/logging` (GET shows the filter, POST `?level=` sets it), `/monitor`
//! (JSON lines until the client leaves; `?types=trace,drop,l7`), and `/ready`, `/healthz`,
//! `/metrics` as on the metrics address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::Hub;
use super::explain::{Query, explain};
use super::monitor::{MonitorEvent, kernel_event};
use super::views;
use crate::proxy::body::BoxError;

/// The admin plane's response body.
pub(crate) type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// The agent loop counts as stuck (`/healthz` 503) when it has not beaten for this long.
pub const HEALTHZ_STALE: Duration = Duration::from_secs(60);

/// Where the admin plane listens.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// The admin API.
    pub admin_addr: SocketAddr,
    /// `/metrics`, `/ready`, `/healthz`.
    pub metrics_addr: SocketAddr,
    /// Allow a non-loopback admin address.
    pub admin_addr_unsafe: bool,
    /// kube-proxy's health endpoint (`/healthz`, probed by cloud load balancers).
    pub healthz_addr: Option<SocketAddr>,
}

/// kube-proxy's `--healthz-bind-address` semantics: healthy once synced, unless the maps have
/// not taken a state for this long while applies fail.
pub const KUBE_PROXY_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// kube-proxy's verdict: synced at least once, the last apply good or the last good sync
/// recent, and the agent loop alive.
fn kube_proxy_healthy(
    synced_at: Option<std::time::SystemTime>,
    last_apply_ok: bool,
    since_heartbeat: Duration,
    now: std::time::SystemTime,
) -> bool {
    synced_at.is_some_and(|t| {
        last_apply_ok || now.duration_since(t).unwrap_or_default() < KUBE_PROXY_HEALTH_TIMEOUT
    }) && since_heartbeat < HEALTHZ_STALE
}

/// Whether the node's proxy is healthy as `/healthz` says it (for the Service health checks).
pub(crate) fn proxy_healthy(hub: &Hub) -> bool {
    let s = hub.snapshot();
    kube_proxy_healthy(
        s.synced_at,
        s.apply.ok,
        hub.since_heartbeat(),
        std::time::SystemTime::now(),
    )
}

/// `/healthz` as kube-proxy answers it: 200 when the datapath synced and is current (or the
/// last failure is recent), 503 before the first sync or when stale; a JSON body with
/// `lastUpdated` and `currentTime`.
fn kube_proxy_healthz(hub: &Hub) -> Response<Body> {
    let s = hub.snapshot();
    let now = std::time::SystemTime::now();
    let fmt = |t: std::time::SystemTime| {
        jiff::Timestamp::try_from(t).map_or_else(|_| String::new(), |t| t.to_string())
    };
    let fresh = kube_proxy_healthy(s.synced_at, s.apply.ok, hub.since_heartbeat(), now);
    let body = json!({
        "lastUpdated": s.synced_at.map(fmt).unwrap_or_default(),
        "currentTime": fmt(now),
        "nodeEligible": true,
    });
    json_response(
        if fresh {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &body,
    )
}

pub(crate) fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    full(status, "application/json", s)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    json_response(status, &json!({"error": msg.into()}))
}

/// Decodes `%XX` and `+` in a query component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or(""), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query parameters of a request, in order (names may repeat).
pub fn query_params(uri: &http::Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(kv), String::new()),
        })
        .collect()
}

fn health(hub: &Hub, path: &str) -> Option<Response<Body>> {
    match path {
        "/ready" => Some(match hub.ready() {
            Ok(()) => full(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => full(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        }),
        "/healthz" => Some({
            let since = hub.since_heartbeat();
            if since > HEALTHZ_STALE {
                full(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("the agent loop has not run for {} s\n", since.as_secs()),
                )
            } else {
                full(StatusCode::OK, "text/plain", "ok\n")
            }
        }),
        _ => None,
    }
}

fn metrics(registry: &prometheus_client::registry::Registry) -> Response<Body> {
    full(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        super::metrics::encode(registry),
    )
}

async fn admin(
    req: Request<Incoming>,
    hub: Arc<Hub>,
    registry: Arc<prometheus_client::registry::Registry>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if let Some(r) = health(&hub, &path) {
        return r;
    }
    let params = query_params(req.uri());
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => metrics(&registry),
        (&Method::GET, "/status") => json_response(StatusCode::OK, &views::status(&hub)),
        (&Method::GET, "/services") => json_response(StatusCode::OK, &views::services(&hub)),
        (&Method::GET, p) if p.starts_with("/services/") => {
            let rest = &p["/services/".len()..];
            let Some((ns, name)) = rest.split_once('/') else {
                return error(StatusCode::BAD_REQUEST, "use /services/NAMESPACE/NAME");
            };
            let id = crate::model::ObjectRef::new(decode(ns), decode(name));
            match views::service(&hub, &id) {
                Some(v) => json_response(StatusCode::OK, &v),
                None => error(
                    StatusCode::NOT_FOUND,
                    format!("no Service {id} on this node"),
                ),
            }
        }
        (&Method::GET, "/routes") => json_response(StatusCode::OK, &views::routes(&hub)),
        (&Method::GET, "/clusters") => json_response(StatusCode::OK, &views::clusters(&hub)),
        (&Method::GET, "/problems") => json_response(StatusCode::OK, &views::problems(&hub)),
        (&Method::GET, "/config_dump") => json_response(StatusCode::OK, &views::config_dump(&hub)),
        (&Method::GET, "/explain") => {
            let (Some(from), Some(to)) = (param("from"), param("to")) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "explain needs from=POD_IP and to=VIP:PORT",
                );
            };
            let q = Query {
                from: match from.parse() {
                    Ok(a) => a,
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("from={from:?} is not an IPv4 address"),
                        );
                    }
                },
                to: match to.parse() {
                    Ok(a) => a,
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("to={to:?} is not VIP:PORT"),
                        );
                    }
                },
                protocol: param("protocol"),
                path: param("path"),
                headers: params
                    .iter()
                    .filter(|(k, _)| k == "header")
                    .map(|(_, v)| v.clone())
                    .collect(),
            };
            json_response(StatusCode::OK, &explain(&hub, &q))
        }
        (&Method::GET, "/logging") => json_response(
            StatusCode::OK,
            &json!({"level": hub.log.as_ref().map(|l| l.current())}),
        ),
        (&Method::POST | &Method::PUT, "/logging") => {
            let Some(level) = param("level") else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "use POST /logging?level=debug (any tracing filter: info, proxy_agent=debug, ...)",
                );
            };
            let Some(log) = &hub.log else {
                return error(
                    StatusCode::NOT_IMPLEMENTED,
                    "the log level cannot be changed in this process",
                );
            };
            match log.set(&level) {
                Ok(()) => {
                    info!(level, "log filter changed through the admin API");
                    json_response(StatusCode::OK, &json!({"level": level}))
                }
                Err(e) => error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid filter {level:?}: {e}"),
                ),
            }
        }
        (&Method::GET, "/monitor") => monitor(&hub, param("types")),
        (_, p) => error(
            StatusCode::NOT_FOUND,
            format!(
                "no endpoint {p}: try /status, /services, /routes, /clusters, /problems, /explain, /config_dump, /logging, /monitor, /metrics, /ready, /healthz"
            ),
        ),
    }
}

fn monitor(hub: &Arc<Hub>, types: Option<String>) -> Response<Body> {
    let wanted: Vec<String> = types
        .unwrap_or_else(|| "trace,drop,l7".into())
        .split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(bad) = wanted
        .iter()
        .find(|t| !matches!(t.as_str(), "trace" | "drop" | "l7"))
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown monitor type {bad:?}: use trace, drop or l7"),
        );
    }
    let mut reader = hub.monitor.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(256);
    let hub = hub.clone();
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"")))).await;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            let ev = tokio::select! {
                k = reader.kernel.recv() => match k {
                    Ok(k) => {
                        let s = hub.snapshot();
                        Some(MonitorEvent::Trace(kernel_event(&k, |vip| views::service_of_vip(&s, vip))))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        debug!(n, "monitor reader lagged");
                        None
                    }
                    Err(_) => return,
                },
                l = reader.l7.rx.recv() => match l {
                    Ok(e) => Some(MonitorEvent::L7((*e).clone())),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(_) => return,
                },
                _ = tick.tick() => {
                    if tx.is_closed() {
                        return;
                    }
                    None
                }
            };
            let Some(ev) = ev else { continue };
            if !wanted.iter().any(|w| w == ev.category()) {
                continue;
            }
            let mut line = serde_json::to_string(&ev).unwrap_or_default();
            line.push('\n');
            if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                return;
            }
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

async fn metrics_only(
    req: Request<Incoming>,
    hub: Arc<Hub>,
    registry: Arc<prometheus_client::registry::Registry>,
) -> Response<Body> {
    let path = req.uri().path();
    if let Some(r) = health(&hub, path) {
        return r;
    }
    match path {
        "/metrics" | "/stats/prometheus" => metrics(&registry),
        p => error(
            StatusCode::NOT_FOUND,
            format!("no endpoint {p}: /metrics, /ready or /healthz"),
        ),
    }
}

fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<std::net::TcpListener> {
    // SO_REUSEPORT: during a hand-over the next agent listens next to this one.
    crate::proxy::workers::reuseport_listener(addr, 1024).with_context(|| {
        format!("binding the {what} to {addr} (a process other than an agent holds it? choose another address with the flag)")
    })
}

/// Checks the admin address: loopback unless `unsafe_ok`.
pub fn check_admin_addr(addr: SocketAddr, unsafe_ok: bool) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() && !unsafe_ok {
        anyhow::bail!(
            "--admin-addr {addr} is not a loopback address: the admin API can change the log level and shows the whole configuration; keep it on 127.0.0.1 (reach it with `kubectl exec`) or pass --admin-addr-unsafe"
        );
    }
    Ok(())
}

/// Binds both listeners (errors are reported before anything runs) and serves them on `rt`.
pub fn start(hub: &Arc<Hub>, cfg: &AdminConfig, rt: &tokio::runtime::Handle) -> anyhow::Result<()> {
    check_admin_addr(cfg.admin_addr, cfg.admin_addr_unsafe)?;
    let admin_l = bind(cfg.admin_addr, "admin API (--admin-addr)")?;
    let metrics_l = bind(cfg.metrics_addr, "metrics endpoint (--metrics-addr)")?;
    let healthz_l = cfg
        .healthz_addr
        .map(|a| bind(a, "kube-proxy health endpoint (--healthz-addr)"))
        .transpose()?;
    let registry = Arc::new(super::metrics::registry(hub));
    let mut listeners = vec![(admin_l, Plane::Admin), (metrics_l, Plane::Metrics)];
    listeners.extend(healthz_l.map(|l| (l, Plane::Healthz)));
    for (l, plane) in listeners {
        let hub = hub.clone();
        let registry = registry.clone();
        let _g = rt.enter();
        let listener = TcpListener::from_std(l)?;
        rt.spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let hub = hub.clone();
                let registry = registry.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let hub = hub.clone();
                        let registry = registry.clone();
                        async move {
                            Ok::<_, Infallible>(match plane {
                                Plane::Admin => admin(req, hub, registry).await,
                                Plane::Metrics => metrics_only(req, hub, registry).await,
                                Plane::Healthz => match req.uri().path() {
                                    "/healthz" | "/livez" => kube_proxy_healthz(&hub),
                                    p => error(
                                        StatusCode::NOT_FOUND,
                                        format!("no endpoint {p}: /healthz"),
                                    ),
                                },
                            })
                        }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        debug!(%peer, error = %e, "admin connection ended");
                    }
                });
            }
        });
    }
    rt.spawn(super::healthcheck::serve(hub.clone()));
    info!(admin = %cfg.admin_addr, metrics = %cfg.metrics_addr, healthz = ?cfg.healthz_addr, "admin API and metrics listening");
    Ok(())
}

/// Which endpoint set a listener serves.
#[derive(Clone, Copy)]
enum Plane {
    Admin,
    Metrics,
    Healthz,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let uri: http::Uri =
            "/explain?from=198.18.0.2&to=198.19.0.10%3A80&header=User%3A+tomas&header=X:1"
                .parse()
                .unwrap();
        let p = query_params(&uri);
        assert_eq!(p[1], ("to".into(), "198.19.0.10:80".into()));
        assert_eq!(p[2], ("header".into(), "User: tomas".into()));
        assert_eq!(p[3], ("header".into(), "X:1".into()));
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("a%2"), "a%2");
    }

    #[test]
    fn kube_proxy_healthz_is_healthy_only_when_synced_and_current() {
        let now = std::time::SystemTime::now();
        let beat = Duration::from_secs(1);
        assert!(!kube_proxy_healthy(None, false, beat, now), "never synced");
        assert!(kube_proxy_healthy(Some(now), true, beat, now));
        // Applies failing since a recent sync: still serving the last good state.
        let recent = now - Duration::from_secs(10);
        assert!(kube_proxy_healthy(Some(recent), false, beat, now));
        let old = now - KUBE_PROXY_HEALTH_TIMEOUT - Duration::from_secs(1);
        assert!(!kube_proxy_healthy(Some(old), false, beat, now), "stale");
        // An old sync with every apply since good (nothing changed): healthy.
        assert!(kube_proxy_healthy(Some(old), true, beat, now));
        let stuck = HEALTHZ_STALE + Duration::from_secs(1);
        assert!(
            !kube_proxy_healthy(Some(now), true, stuck, now),
            "loop stuck"
        );
    }

    #[test]
    fn the_admin_address_must_be_loopback_unless_told() {
        assert!(check_admin_addr("127.0.0.1:15000".parse().unwrap(), false).is_ok());
        let e = check_admin_addr("0.0.0.0:15000".parse().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("--admin-addr-unsafe"), "{e}");
        assert!(check_admin_addr("0.0.0.0:15000".parse().unwrap(), true).is_ok());
    }
}
