//! The request path: pick a destination and a backend, send, and retry what may be retried.
//!
//! A retry needs all of: a matching `retryOn` condition, attempts left, time left, a replayable
//! body (at most 64 KiB), an idempotent method or a request the backend never saw, and a slot in
//! the retry budget (20% of active requests, at least 3). Retries go to a backend not tried yet
//! when one exists, after a jittered exponential backoff (25 ms base, 250 ms cap).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{Holding, ProxyBody, RequestBody, text};
use super::cluster::{Backend, Cluster, Outcome, Overflow, hash_key};
use super::config::{Mirror, Route};
use super::pool::UpstreamError;
use crate::istio::{LoadBalancer, RetryOn};

/// Response header naming why the proxy itself answered.
pub const ERROR_HEADER: &str = "x-proxy-error";
/// Response header counting attempts made.
pub const ATTEMPTS_HEADER: &str = "x-proxy-attempts";

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too; allocate only when there are any.
    let listed: Vec<http::HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP {
        h.remove(name);
    }
    for name in listed {
        h.remove(name);
    }
    h.remove(header::TRANSFER_ENCODING);
}

fn local_reply(status: StatusCode, reason: &str, attempts: u32) -> Response<ProxyBody> {
    let mut r = Response::new(text(format!("{reason}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        ERROR_HEADER,
        HeaderValue::from_str(reason).unwrap_or(HeaderValue::from_static("error")),
    );
    r.headers_mut()
        .insert(ATTEMPTS_HEADER, HeaderValue::from(attempts));
    r
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn retry_status(on: &RetryOn, s: u16) -> bool {
    (on.five_xx && s >= 500)
        || (on.gateway_error && matches!(s, 502..=504))
        || on.status_codes.contains(&s)
        || (on.retriable_4xx && s == 409)
}

fn retry_error(on: &RetryOn, e: &UpstreamError) -> bool {
    match e {
        // The request never left: always worth another connection.
        UpstreamError::NotSent(_) => true,
        UpstreamError::Connect(_) | UpstreamError::ConnectTimeout => {
            on.connect_failure
                || on.five_xx
                || on.gateway_error
                || on.reset
                || on.status_codes.contains(&503)
        }
        UpstreamError::Reset(_) => on.reset || on.five_xx || on.gateway_error,
    }
}

/// The consistent-hash key of a request under the cluster's policy.
fn hash_of(lb: &LoadBalancer, headers: &HeaderMap, client: SocketAddr) -> Option<u64> {
    match lb {
        LoadBalancer::HashHeader(name) => {
            headers.get(name.as_str()).map(|v| hash_key(v.as_bytes()))
        }
        LoadBalancer::HashCookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash_key(v.as_bytes())),
        LoadBalancer::HashSourceIp => Some(hash_key(client.ip().to_string().as_bytes())),
        _ => None,
    }
}

struct Head {
    method: Method,
    path: String,
    authority: String,
    headers: HeaderMap,
}

impl Head {
    fn request(&self, h2: bool, body: ProxyBody) -> Request<ProxyBody> {
        let uri: Uri = if h2 {
            format!("http://{}{}", self.authority, self.path)
                .parse()
                .unwrap_or_else(|_| Uri::from_static("/"))
        } else {
            self.path.parse().unwrap_or_else(|_| Uri::from_static("/"))
        };
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = uri;
        *r.version_mut() = if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *r.headers_mut() = self.headers.clone();
        if h2 {
            r.headers_mut().remove(header::HOST);
        } else if !r.headers().contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(&self.authority)
        {
            r.headers_mut().insert(header::HOST, v);
        }
        r
    }
}

/// Counts a request in flight for the cluster and the backend.
struct InFlight(Arc<Cluster>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Relaxed);
    }
}

struct BackendActive(Arc<Backend>);

impl Drop for BackendActive {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

fn pick_destination(route: &Route) -> Option<Arc<Cluster>> {
    let total: u32 = route.destinations.iter().map(|(_, w)| *w).sum();
    if total == 0 {
        return route.destinations.first().map(|(c, _)| c.clone());
    }
    let mut r = rand::random_range(0..total);
    for (c, w) in &route.destinations {
        if r < *w {
            return Some(c.clone());
        }
        r -= w;
    }
    None
}

fn mirror(m: &Mirror, head: &Head, body: bytes::Bytes, client: SocketAddr) {
    if m.percent < 100.0 && rand::random::<f64>() * 100.0 >= m.percent {
        return;
    }
    let policy = m.cluster.policy();
    let Some(backend) = m
        .cluster
        .pick(hash_of(&policy.lb, &head.headers, client), &[])
    else {
        return;
    };
    let host = head
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(&head.authority)
        .to_string();
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if p.chars().all(|c| c.is_ascii_digit()) => (n.to_string(), format!(":{p}")),
        _ => (host.clone(), String::new()),
    };
    let shadow = Head {
        method: head.method.clone(),
        path: head.path.clone(),
        authority: format!("{name}-shadow{port}"),
        headers: {
            let mut h = head.headers.clone();
            if let Ok(v) = HeaderValue::from_str(&format!("{name}-shadow{port}")) {
                h.insert(header::HOST, v);
            }
            h
        },
    };
    let req = shadow.request(policy.h2, super::body::full(body));
    let opts = m.cluster.conn_opts();
    // Fire and forget: the primary response never waits for the copy.
    tokio::spawn(async move {
        if let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_secs(30), backend.conns.send(req, &opts)).await
        {
            let _ = resp.into_body().collect().await;
        }
    });
}

/// Handles one downstream request for `route`.
pub async fn handle(
    req: Request<Incoming>,
    client: SocketAddr,
    orig: std::net::SocketAddrV4,
    route: Arc<Route>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let deadline = route.timeout.map(|t| started + t);
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        })
        .unwrap_or_else(|| orig.to_string());
    let head = Head {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string()),
        authority,
        headers,
    };
    let mut body = match RequestBody::buffer(body).await {
        Ok(b) => b,
        Err(e) => {
            return local_reply(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body failed: {e}"),
                0,
            );
        }
    };
    let Some(cluster) = pick_destination(&route) else {
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no-route", 0);
    };
    if let (Some(m), Some(b)) = (&route.mirror, body.replayable()) {
        mirror(m, &head, b.clone(), client);
    }
    cluster.active_requests.fetch_add(1, Relaxed);
    let in_flight = InFlight(cluster.clone());
    let policy = cluster.policy();
    let key = hash_of(&policy.lb, &head.headers, client);
    let opts = cluster.conn_opts();
    let retry = &route.retry;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt: u32 = 0;
    let mut _retry_slot = None;
    loop {
        attempt += 1;
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining.is_some_and(|r| r.is_zero()) {
            return local_reply(StatusCode::GATEWAY_TIMEOUT, "timeout", attempt - 1);
        }
        let Some(backend) = cluster.pick(key, &tried) else {
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-healthy-upstream",
                attempt - 1,
            );
        };
        let permit = match cluster
            .admit(remaining.unwrap_or(Duration::from_secs(3600)))
            .await
        {
            Ok(p) => p,
            Err(Overflow::Pending) => {
                return local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overflow-pending-requests",
                    attempt - 1,
                );
            }
            Err(Overflow::Timeout) => {
                return local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout-waiting-for-connection",
                    attempt - 1,
                );
            }
        };
        let Some(b) = body.take_for_attempt() else {
            return local_reply(
                StatusCode::BAD_GATEWAY,
                "request-body-not-replayable",
                attempt - 1,
            );
        };
        tried.push(backend.addr);
        backend.active.fetch_add(1, Relaxed);
        backend.requests.fetch_add(1, Relaxed);
        let active = BackendActive(backend.clone());
        let try_timeout = match (retry.per_try_timeout, remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let send = backend.conns.send(head.request(policy.h2, b), &opts);
        let result = match try_timeout {
            // `None`: the per-try or overall timeout fired.
            Some(t) => tokio::time::timeout(t, send).await.ok(),
            None => Some(send.await),
        };
        let safe = body.replayable().is_some() && idempotent(&head.method);
        let more = attempt <= retry.attempts;
        let (retryable, outcome) = match &result {
            Some(Ok(resp)) => {
                let s = resp.status().as_u16();
                (
                    retry_status(&retry.on, s) && safe,
                    if s >= 500 {
                        Outcome::Status(s)
                    } else {
                        Outcome::Success
                    },
                )
            }
            Some(Err(e)) => (
                retry_error(&retry.on, e)
                    && body.replayable().is_some()
                    && (e.never_sent() || idempotent(&head.method)),
                Outcome::LocalFailure,
            ),
            None => (
                (retry.on.five_xx || retry.on.gateway_error) && safe,
                Outcome::LocalFailure,
            ),
        };
        cluster.record(&backend, outcome);
        let can_retry = retryable && more && {
            _retry_slot = cluster.begin_retry(retry.budgeted);

            _retry_slot.is_some()
        };
        if !can_retry {
            return match result {
                Some(Ok(resp)) => {
                    let (mut parts, rbody) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    parts
                        .headers
                        .insert(ATTEMPTS_HEADER, HeaderValue::from(attempt));
                    let held = (permit, active, in_flight);
                    Response::from_parts(parts, Holding::new(rbody, held).boxed())
                }
                Some(Err(e)) => {
                    tracing::debug!(cluster = %cluster.name, backend = %backend.addr, error = %e, "upstream failed");
                    local_reply(StatusCode::SERVICE_UNAVAILABLE, e.reason(), attempt)
                }
                None => {
                    let overall = deadline.is_some_and(|d| Instant::now() >= d);
                    local_reply(
                        StatusCode::GATEWAY_TIMEOUT,
                        if overall {
                            "timeout"
                        } else {
                            "per-try-timeout"
                        },
                        attempt,
                    )
                }
            };
        }
        if let Some(Ok(resp)) = result {
            // Read the failed response to its end so its connection goes back to the pool.
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await;
            });
        }
        drop((permit, active));
        let cap = Duration::from_millis(250)
            .min(Duration::from_millis(25) * 2u32.saturating_pow(attempt - 1));
        let mut backoff = Duration::from_micros(rand::random_range(0..=cap.as_micros() as u64));
        if let Some(d) = deadline {
            backoff = backoff.min(d.saturating_duration_since(Instant::now()));
        }
        tokio::time::sleep(backoff).await;
    }
}
