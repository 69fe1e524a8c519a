//! The request path: check the request, pick a destination and a backend, stream the request,
//! and retry what may be retried.
//!
//! A retry needs all of: a matching `retryOn` condition, attempts left, time left, a body whose
//! part sent so far is still in the 64 KiB replay buffer, an idempotent method or a request the
//! backend never saw, and a slot in the retry budget (20% of active requests, at least 3).
//! Retries go to a backend not tried yet when one exists (else to the one tried longest ago),
//! after a jittered exponential backoff
//! (25 ms base, 250 ms cap). Timeouts count from the end of the request body, as Envoy's do.
//! Upgrades and CONNECT go to [`super::upgrade`].

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use tokio::time::Instant;

use super::body::{Holding, ProxyBody, Replay, empty, text, with_trailers};
use super::cluster::{Backend, Cluster, Outcome, Overflow, hash_key};
use super::config::{Mirror, RequestView, Route, Rule};
use super::io::ConnState;
use super::limits::ProxyConfig;
use super::pool::UpstreamError;
use super::record::{Noted, Pending};
use super::telemetry::{RetryReason, Telemetry, flags};
use crate::istio::{
    Abort, Cors, DirectResponse, LoadBalancer, Redirect, RetryOn, Rewrite, StringMatch,
};

/// Response header naming why the proxy itself answered.
pub const ERROR_HEADER: &str = "x-proxy-error";
/// Response header counting attempts made.
pub const ATTEMPTS_HEADER: &str = "x-proxy-attempts";

/// Where a request came from.
pub struct Downstream {
    /// The client pod's address.
    pub client: SocketAddr,
    /// The client's IP as an `x-forwarded-for` value.
    pub client_ip: HeaderValue,
    /// The ClusterIP:port it connected to.
    pub orig: SocketAddrV4,
    /// Its connection.
    pub conn: Arc<ConnState>,
    /// Node-wide proxy settings.
    pub cfg: Arc<ProxyConfig>,
    /// The client pod's peer id (metrics labels).
    pub source: u32,
    /// Where finished requests are recorded.
    pub telemetry: Arc<Telemetry>,
}

/// Hop-by-hop headers (RFC 9110 7.6.1), besides those named in `Connection`. `TE` is handled
/// apart: `te: trailers` is end-to-end in practice (gRPC needs it).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
    // The proxy answers `Expect: 100-continue` itself when it starts reading the body.
    "expect",
];

/// Removes hop-by-hop headers (and those named in `Connection`); keeps `te: trailers`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names first: most messages carry none, and that is cheaper than a
    // lookup per hop-by-hop name.
    let any = h.keys().any(|n| {
        n == header::CONNECTION
            || n == header::TE
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == header::EXPECT
            || n == "keep-alive"
            || n == "proxy-connection"
            || n == "http2-settings"
    });
    if !any {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        // Headers named in `Connection` are hop-by-hop too.
        let listed: Vec<http::HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            h.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
    if let Some(te) = h.remove(header::TE) {
        let trailers = te.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// A response from the proxy itself.
pub fn local_reply(status: StatusCode, reason: &str, attempts: u32) -> Response<ProxyBody> {
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

/// A 400 for a request whose framing cannot be trusted; the connection closes after it.
fn reject(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let mut r = local_reply(status, reason, 0);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Checks what the HTTP/1 parser lets through but a proxy must not forward (RFC 9112):
/// several `Host` headers, and transfer codings other than one final `chunked`.
fn check(req: &Request<Incoming>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err("duplicate-host-header");
    }
    let mut codings = 0;
    let mut only_chunked = true;
    for v in req.headers().get_all(header::TRANSFER_ENCODING) {
        let Ok(v) = v.to_str() else {
            only_chunked = false;
            break;
        };
        for c in v.split(',').map(str::trim) {
            codings += 1;
            only_chunked &= c.eq_ignore_ascii_case("chunked");
        }
    }
    if codings > 0 && !(codings == 1 && only_chunked) {
        return Err("transfer-encoding-not-chunked");
    }
    Ok(())
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
pub fn hash_of(lb: &LoadBalancer, headers: &HeaderMap, client: SocketAddr) -> Option<u64> {
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

/// The request as it goes upstream, reusable across attempts.
pub struct Head {
    /// Method.
    pub method: Method,
    /// The target for an HTTP/1.1 backend: origin form (`/path?query`), or the authority for
    /// CONNECT.
    pub target: Uri,
    /// Headers, hop-by-hop ones removed.
    pub headers: HeaderMap,
    /// Where the client connected: the authority of last resort.
    orig: SocketAddrV4,
}

impl Head {
    /// Builds the upstream head from a downstream request: hop-by-hop headers removed, `Host`
    /// set from an absolute-form target (RFC 9112 3.2.2) or HTTP/2 `:authority`,
    /// `x-forwarded-for` appended.
    pub fn new(uri: Uri, method: Method, mut headers: HeaderMap, ds: &Downstream) -> Self {
        strip_hop_by_hop(&mut headers);
        if method != Method::CONNECT
            && let Some(a) = uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            headers.insert(header::HOST, v);
        }
        if ds.cfg.x_forwarded_for {
            match headers.entry("x-forwarded-for") {
                http::header::Entry::Vacant(e) => {
                    e.insert(ds.client_ip.clone());
                }
                http::header::Entry::Occupied(mut e) => {
                    let prev = e.get().to_str().unwrap_or("").trim().to_string();
                    let ip = ds.client_ip.to_str().unwrap_or("");
                    let v = if prev.is_empty() {
                        ip.to_string()
                    } else {
                        format!("{prev}, {ip}")
                    };
                    if let Ok(v) = HeaderValue::from_str(&v) {
                        e.insert(v);
                    }
                }
            }
        }
        let target =
            if method == Method::CONNECT || (uri.scheme().is_none() && uri.authority().is_none()) {
                uri
            } else {
                uri.path_and_query()
                    .map_or(Uri::from_static("/"), |p| Uri::from(p.clone()))
            };
        Self {
            method,
            target,
            headers,
            orig: ds.orig,
        }
    }

    /// The request's authority: `Host`, else the target's, else the ClusterIP:port.
    pub fn authority(&self) -> String {
        self.headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
            .or_else(|| self.target.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| self.orig.to_string())
    }

    /// One upstream request with `body`, for an HTTP/2 (`h2`) or HTTP/1.1 backend.
    pub fn request(&self, h2: bool, body: ProxyBody) -> Request<ProxyBody> {
        let uri: Uri = if h2 && self.method != Method::CONNECT {
            let path = self.target.path_and_query().map_or("/", |p| p.as_str());
            format!("http://{}{path}", self.authority())
                .parse()
                .unwrap_or_else(|_| Uri::from_static("/"))
        } else {
            self.target.clone()
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
            && let Ok(v) = HeaderValue::from_str(&self.authority())
        {
            r.headers_mut().insert(header::HOST, v);
        }
        r
    }
}

struct BackendActive(Arc<Backend>);

impl Drop for BackendActive {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

impl BackendActive {
    fn start(b: &Arc<Backend>) -> Self {
        b.active.fetch_add(1, Relaxed);
        b.requests.fetch_add(1, Relaxed);
        Self(b.clone())
    }
}

/// Picks one of the weighted destinations; returns its index too.
pub fn pick_destination(d: &[(Arc<Cluster>, u32)]) -> Option<(usize, Arc<Cluster>)> {
    let total: u32 = d.iter().map(|(_, w)| *w).sum();
    if total == 0 {
        return d.first().map(|(c, _)| (0, c.clone()));
    }
    let mut r = rand::random_range(0..total);
    for (i, (c, w)) in d.iter().enumerate() {
        if r < *w {
            return Some((i, c.clone()));
        }
        r -= w;
    }
    None
}

/// True on `pct` percent of calls.
fn chance(pct: f64) -> bool {
    pct >= 100.0 || (pct > 0.0 && rand::random::<f64>() * 100.0 < pct)
}

/// The request's authority as rules match it: the target's (HTTP/2 `:authority`, absolute
/// form), else `Host`.
fn request_authority(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        })
        .unwrap_or_default()
}

/// Splits `host:port` (`[v6]:port` too); the port is `None` when absent.
fn split_authority(a: &str) -> (&str, Option<&str>) {
    let colon = if a.starts_with('[') {
        a.find("]:").map(|i| i + 1)
    } else {
        a.rfind(':')
    };
    match colon {
        Some(i) if a[i + 1..].chars().all(|c| c.is_ascii_digit()) && i + 1 < a.len() => {
            (&a[..i], Some(&a[i + 1..]))
        }
        _ => (a, None),
    }
}

/// The `Location` of a redirect: each part replaced where the rule says, the rest from the
/// request (a changed scheme drops the request's port; default ports are left out).
pub fn redirect_location(
    r: &Redirect,
    authority: &str,
    path: &str,
    query: Option<&str>,
    prefix: Option<(usize, bool)>,
) -> String {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let (orig_host, orig_port) = split_authority(authority);
    let (host, auth_port) = match &r.authority {
        Some(a) => split_authority(a),
        None => (orig_host, None),
    };
    let port: Option<String> = r
        .port
        .map(|p| p.to_string())
        .or(auth_port.map(String::from))
        .or_else(|| {
            r.scheme
                .is_none()
                .then(|| orig_port.map(String::from))
                .flatten()
        })
        .filter(|p| !matches!((scheme, p.as_str()), ("http", "80") | ("https", "443")));
    let (new_path, keep_query) = match (&r.uri, prefix) {
        (Some(u), Some((n, segments))) if r.prefix => {
            (crate::istio::replace_prefix(path, n, u, segments), true)
        }
        (Some(u), _) => (u.clone(), !u.contains('?')),
        (None, _) => (path.to_string(), true),
    };
    let mut loc = format!("{scheme}://{host}");
    if let Some(p) = port {
        loc.push(':');
        loc.push_str(&p);
    }
    loc.push_str(&new_path);
    if keep_query && let Some(q) = query {
        loc.push('?');
        loc.push_str(q);
    }
    loc
}

fn redirect_reply(r: &Redirect, location: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::from_u16(r.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn direct_reply(d: &DirectResponse) -> Response<ProxyBody> {
    let mut resp = Response::new(if d.body.is_empty() {
        empty()
    } else {
        super::body::full(bytes::Bytes::from(d.body.clone()))
    });
    *resp.status_mut() = StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK);
    if !d.body.is_empty() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    resp
}

/// Envoy's fault abort: the status with `fault filter abort`, or for gRPC a trailers-only
/// response with the status code.
fn abort_reply(a: &Abort) -> Response<ProxyBody> {
    match a {
        Abort::Http(code) => {
            let mut r = Response::new(text("fault filter abort".to_string()));
            *r.status_mut() =
                StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            r.headers_mut()
                .insert(ERROR_HEADER, HeaderValue::from_static("fault-abort"));
            r
        }
        Abort::Grpc(code) => {
            let mut r = Response::new(empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(*code));
            h.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            h.insert(ERROR_HEADER, HeaderValue::from_static("fault-abort"));
            r
        }
    }
}

/// The `Origin` of a request the rule's CORS policy allows.
fn cors_origin(c: &Cors, headers: &HeaderMap) -> Option<HeaderValue> {
    let o = headers.get(header::ORIGIN)?;
    let s = o.to_str().ok()?;
    c.allow_origins
        .iter()
        .any(|m| m.matches(s))
        .then(|| o.clone())
}

/// The answer to a CORS preflight from an allowed origin (Envoy's CORS filter).
fn preflight_reply(c: &Cors, origin: HeaderValue) -> Response<ProxyBody> {
    let mut r = Response::new(empty());
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    let mut put = |name: header::HeaderName, v: &str| {
        if !v.is_empty()
            && let Ok(v) = HeaderValue::from_str(v)
        {
            h.insert(name, v);
        }
    };
    put(header::ACCESS_CONTROL_ALLOW_METHODS, &c.allow_methods);
    put(header::ACCESS_CONTROL_ALLOW_HEADERS, &c.allow_headers);
    if let Some(m) = c.max_age {
        put(header::ACCESS_CONTROL_MAX_AGE, &m.as_secs().to_string());
    }
    if c.allow_credentials {
        put(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
    }
    r
}

/// The matched path prefix of block `block` of `rule` in `path`: its length and whether it is
/// a Gateway API segment prefix.
pub fn matched_prefix(rule: &Rule, block: Option<usize>, path: &str) -> Option<(usize, bool)> {
    let m = &rule.matches.get(block?)?.m;
    let u = m.uri.as_ref()?;
    u.matched_prefix_len(path, m.ignore_uri_case)
        .map(|n| (n, matches!(u, StringMatch::PathPrefix(_))))
}

/// Applies a rewrite to the upstream head; `prefix` is the matched path prefix, if any.
fn rewrite_head(head: &mut Head, rw: &Rewrite, prefix: Option<(usize, bool)>) {
    let path = head.target.path();
    let new_path = if let Some(u) = &rw.uri {
        match prefix {
            Some((n, segments)) if !rw.full => crate::istio::replace_prefix(path, n, u, segments),
            _ => u.clone(),
        }
    } else if let Some((re, rep)) = &rw.uri_regex {
        re.0.replace_all(path, rep.as_str()).into_owned()
    } else {
        path.to_string()
    };
    if rw.uri.is_some() || rw.uri_regex.is_some() {
        let target = match head.target.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        if let Ok(u) = target.parse() {
            head.target = u;
        }
    }
    if let Some(a) = &rw.authority
        && let Ok(v) = HeaderValue::from_str(a)
    {
        head.headers.insert(header::HOST, v);
    }
}

/// Prepares the upstream head for `rule`: rewrite, then the rule's request header edits.
pub(super) fn prepare(head: &mut Head, rule: &Rule, block: Option<usize>) {
    if let Some(rw) = &rule.rewrite {
        let prefix = matched_prefix(rule, block, head.target.path());
        rewrite_head(head, rw, prefix);
    }
}

/// Header edits for the destination picked (`picked`), then the rule's (the rule wins, as
/// Envoy's default order has it).
pub(super) fn request_edits(head: &mut Head, rule: &Rule, picked: usize) {
    if let Some(h) = rule.destination_headers.get(picked) {
        h.request.apply(&mut head.headers);
    }
    rule.headers.request.apply(&mut head.headers);
}

fn response_edits(
    mut resp: Response<ProxyBody>,
    rule: &Rule,
    picked: Option<usize>,
    cors: Option<(&Cors, HeaderValue)>,
) -> Response<ProxyBody> {
    let h = resp.headers_mut();
    if let Some(d) = picked.and_then(|i| rule.destination_headers.get(i)) {
        d.response.apply(h);
    }
    rule.headers.response.apply(h);
    if let Some((c, origin)) = cors {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if c.allow_credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if !c.expose_headers.is_empty()
            && let Ok(v) = HeaderValue::from_str(&c.expose_headers)
        {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
    resp
}

fn mirror(m: &Mirror, head: &Head, body: ProxyBody, client: SocketAddr) {
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
    let host = head.authority();
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if p.chars().all(|c| c.is_ascii_digit()) => (n.to_string(), format!(":{p}")),
        _ => (host.clone(), String::new()),
    };
    let mut shadow = Head {
        method: head.method.clone(),
        target: head.target.clone(),
        headers: head.headers.clone(),
        orig: head.orig,
    };
    if let Ok(v) = HeaderValue::from_str(&format!("{name}-shadow{port}")) {
        shadow.headers.insert(header::HOST, v);
    }
    let opts = m.cluster.conn_opts();
    // Fire and forget: the primary response never waits for the copy.
    tokio::spawn(async move {
        if let Ok(Ok(resp)) = tokio::time::timeout(
            Duration::from_secs(30),
            backend.conns.send(&shadow, body, &opts),
        )
        .await
        {
            let _ = resp.into_body().collect().await;
        }
    });
}

/// Which timer ended an attempt.
enum Expired {
    PerTry,
    Overall,
}

/// Fires when the attempt's per-try timeout or the route's timeout passes, both counted from
/// the end of the request body (or the attempt's start, if later).
async fn expiry(
    body: Option<&Replay>,
    started: Instant,
    per_try: Option<Duration>,
    overall: Option<Duration>,
) -> Expired {
    if per_try.is_none() && overall.is_none() {
        return std::future::pending().await;
    }
    let body_end = match body {
        Some(r) => r.ended().await,
        None => started,
    };
    let per = per_try.map(|p| Instant::now() + p);
    let all = overall.map(|t| body_end + t);
    match (per, all) {
        (Some(p), Some(a)) if a <= p => {
            tokio::time::sleep_until(a).await;
            Expired::Overall
        }
        (Some(p), _) => {
            tokio::time::sleep_until(p).await;
            Expired::PerTry
        }
        (None, Some(a)) => {
            tokio::time::sleep_until(a).await;
            Expired::Overall
        }
        (None, None) => unreachable!("checked above"),
    }
}

/// Handles one downstream request for `route` and records it when its response ends.
pub async fn handle(
    req: Request<Incoming>,
    ds: &Arc<Downstream>,
    route: Arc<Route>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    if !ds.telemetry.records() {
        return serve(req, ds, &route, started, &mut Noted::default()).await;
    }
    let (parts, body) = req.into_parts();
    let mut pending = Pending::new(started, ds.clone(), route.clone(), &parts);
    let req = Request::from_parts(parts, body);
    let resp = serve(req, ds, &route, started, pending.noted()).await;
    pending.wrap(resp)
}

/// Serves one request, noting in `noted` what happened: picks the rule, applies its CORS,
/// fault, direct answers and header edits around [`forward`].
async fn serve(
    req: Request<Incoming>,
    ds: &Downstream,
    route: &Arc<Route>,
    started: Instant,
    noted: &mut Noted,
) -> Response<ProxyBody> {
    if let Err(why) = check(&req) {
        noted.flags |= flags::DPE;
        return reject(StatusCode::BAD_REQUEST, why);
    }
    let authority = request_authority(&req);
    let view = RequestView {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        authority: &authority,
        headers: req.headers(),
        client: ds.client.ip(),
    };
    let Some((rule, block)) = route.select(&view) else {
        noted.flags |= flags::NR;
        return local_reply(StatusCode::NOT_FOUND, "route-not-found", 0);
    };
    let cors = rule
        .cors
        .as_ref()
        .and_then(|c| cors_origin(c, req.headers()).map(|o| (c, o)));
    if let Some((c, origin)) = &cors
        && req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return preflight_reply(c, origin.clone());
    }
    if let Some(f) = &rule.fault {
        if let Some((d, pct)) = f.delay
            && chance(pct)
        {
            noted.flags |= flags::DI;
            tokio::time::sleep(d).await;
        }
        if let Some((a, pct)) = &f.abort
            && chance(*pct)
        {
            noted.flags |= flags::FI;
            return response_edits(abort_reply(a), rule, None, cors);
        }
    }
    if let Some(d) = &rule.direct_response {
        return response_edits(direct_reply(d), rule, None, cors);
    }
    if let Some(r) = &rule.redirect {
        let prefix = matched_prefix(rule, block, req.uri().path());
        let loc = redirect_location(r, &authority, req.uri().path(), req.uri().query(), prefix);
        return response_edits(redirect_reply(r, &loc), rule, None, cors);
    }
    if let Some(bad) = rule.unresolved {
        // Gateway API: a backend that does not resolve answers 500 for its share, and so do
        // rules whose weights are all 0 or that have no backends.
        let total = rule.destinations.iter().map(|(_, w)| *w).sum::<u32>() + bad;
        if total == 0 || rand::random_range(0..total) < bad {
            noted.flags |= flags::NR;
            return response_edits(
                local_reply(StatusCode::INTERNAL_SERVER_ERROR, "backend-not-resolved", 0),
                rule,
                None,
                cors,
            );
        }
    }
    let mut picked = None;
    let resp = if super::upgrade::wants_upgrade(&req) {
        super::upgrade::handle(req, ds, rule, block, &mut picked, noted).await
    } else {
        forward(req, ds, rule, block, started, &mut picked, noted).await
    };
    response_edits(resp, rule, picked, cors)
}

/// Forwards a request by `rule`: destination, backend, retries, timeouts, mirror.
#[allow(clippy::too_many_arguments)]
async fn forward(
    req: Request<Incoming>,
    ds: &Downstream,
    rule: &Rule,
    block: Option<usize>,
    started: Instant,
    picked: &mut Option<usize>,
    noted: &mut Noted,
) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let mut head = Head::new(parts.uri, parts.method, parts.headers, ds);
    prepare(&mut head, rule, block);
    let body = (!body.is_end_stream()).then(|| Replay::new(body));
    noted.body = body.clone();
    // The end of the request body starts the route's timeout.
    let deadline = || {
        let end = match &body {
            None => Some(started),
            Some(r) => r.ended_at(),
        };
        end.zip(rule.timeout).map(|(e, t)| e + t)
    };
    let Some((index, cluster)) = pick_destination(&rule.destinations) else {
        noted.flags |= flags::NR;
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no-route", 0);
    };
    *picked = Some(index);
    request_edits(&mut head, rule, index);
    let head = head;
    noted.cluster = Some(cluster.clone());
    let mut mirrored = rule.mirror.is_none();
    if !mirrored && body.is_none() {
        mirrored = true;
        if let Some(m) = &rule.mirror {
            mirror(m, &head, empty(), ds.client);
        }
    }
    let in_flight = cluster.begin_request();
    let policy = cluster.policy();
    let key = hash_of(&policy.lb, &head.headers, ds.client);
    let opts = cluster.conn_opts();
    let retry = &rule.retry;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt: u32 = 0;
    let mut _retry_slot = None;
    let mut next_body = match &body {
        None => Some(empty()),
        Some(r) => r.attempt().map(BodyExt::boxed),
    };
    loop {
        attempt += 1;
        noted.attempts = attempt - 1;
        let remaining = deadline().map(|d| d.saturating_duration_since(Instant::now()));
        if remaining.is_some_and(|r| r.is_zero()) {
            noted.flags |= flags::UT;
            return local_reply(StatusCode::GATEWAY_TIMEOUT, "timeout", attempt - 1);
        }
        let Some(backend) = cluster.pick(key, &tried) else {
            noted.flags |= flags::UH;
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
                noted.flags |= flags::UO;
                ds.telemetry
                    .resilience
                    .overflow_pending
                    .fetch_add(1, Relaxed);
                return local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overflow-pending-requests",
                    attempt - 1,
                );
            }
            Err(Overflow::Timeout) => {
                noted.flags |= flags::UO;
                ds.telemetry
                    .resilience
                    .overflow_timeout
                    .fetch_add(1, Relaxed);
                return local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout-waiting-for-connection",
                    attempt - 1,
                );
            }
        };
        let Some(b) = next_body.take() else {
            return local_reply(
                StatusCode::BAD_GATEWAY,
                "request-body-not-replayable",
                attempt - 1,
            );
        };
        tried.push(backend.addr);
        noted.attempts = attempt;
        noted.backend = Some(backend.addr);
        let active = BackendActive::start(&backend);
        let attempt_started = Instant::now();
        let send = backend.conns.send(&head, b, &opts);
        let result = tokio::select! {
            r = send => Ok(r),
            e = expiry(body.as_ref(), attempt_started, retry.per_try_timeout, rule.timeout) => Err(e),
        };
        if let (false, Some(r)) = (mirrored, &body)
            && let Some((bytes, trailers)) = r.complete()
        {
            mirrored = true;
            if let Some(m) = &rule.mirror {
                mirror(m, &head, with_trailers(bytes, trailers), ds.client);
            }
        }
        if let Some(why) = body.as_ref().and_then(Replay::failure)
            && !matches!(result, Ok(Ok(_)))
        {
            // The client's body broke (bad chunk framing, reset): nothing to retry.
            tracing::debug!(client = %ds.client, error = %why, "request body failed");
            noted.flags |= flags::DPE;
            return reject(StatusCode::BAD_REQUEST, "malformed-request-body");
        }
        let replayable = body.as_ref().is_none_or(Replay::replayable);
        let safe = replayable && idempotent(&head.method);
        let (retryable, outcome) = match &result {
            Ok(Ok(resp)) => {
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
            Ok(Err(e)) => (
                retry_error(&retry.on, e)
                    && replayable
                    && (e.never_sent() || idempotent(&head.method)),
                Outcome::LocalFailure,
            ),
            // A try that timed out counts as a 504.
            Err(_) => (
                (retry.on.five_xx
                    || retry.on.gateway_error
                    || retry.on.status_codes.contains(&504))
                    && safe,
                Outcome::LocalFailure,
            ),
        };
        cluster.record(&backend, outcome);
        let can_retry = retryable
            && attempt <= retry.attempts
            && {
                _retry_slot = cluster.begin_retry(retry.budgeted);
                if _retry_slot.is_none() {
                    ds.telemetry
                        .resilience
                        .budget_exhausted
                        .fetch_add(1, Relaxed);
                }
                _retry_slot.is_some()
            }
            && {
                // Taking the next reader makes this attempt's reader stale at once.
                next_body = match &body {
                    None => Some(empty()),
                    Some(r) => r.attempt().map(BodyExt::boxed),
                };
                next_body.is_some()
            };
        if !can_retry {
            if retryable && attempt > 1 {
                // Stopped retrying with the failure still there.
                noted.flags |= flags::URX;
            }
            return match result {
                Ok(Ok(resp)) => {
                    let (mut parts, rbody) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    parts
                        .headers
                        .insert(ATTEMPTS_HEADER, HeaderValue::from(attempt));
                    let held = (permit, active, in_flight);
                    Response::from_parts(parts, Holding::new(rbody, held).boxed())
                }
                Ok(Err(e)) => {
                    tracing::debug!(cluster = %cluster.name, backend = %backend.addr, error = %e, "upstream failed");
                    noted.flags |= match e {
                        UpstreamError::Connect(_) | UpstreamError::ConnectTimeout => flags::UF,
                        _ => flags::UC,
                    };
                    local_reply(StatusCode::SERVICE_UNAVAILABLE, e.reason(), attempt)
                }
                Err(why) => {
                    noted.flags |= flags::UT;
                    local_reply(
                        StatusCode::GATEWAY_TIMEOUT,
                        match why {
                            Expired::Overall => "timeout",
                            Expired::PerTry => "per-try-timeout",
                        },
                        attempt,
                    )
                }
            };
        }
        ds.telemetry.retried(match &result {
            Ok(Ok(_)) => RetryReason::Status,
            Ok(Err(UpstreamError::Connect(_) | UpstreamError::ConnectTimeout)) => {
                RetryReason::ConnectFailure
            }
            Ok(Err(_)) => RetryReason::Reset,
            Err(_) => RetryReason::PerTryTimeout,
        });
        if let Ok(Ok(resp)) = result {
            // Read the failed response to its end so its connection goes back to the pool.
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await;
            });
        }
        drop((permit, active));
        let mut backoff = match rule.retry.backoff {
            // At least the configured backoff, doubling with jitter up to 10 times it.
            Some(b) => {
                let cap = (b * 2u32.saturating_pow(attempt - 1)).min(b * 10);
                let grow = cap.saturating_sub(b).as_micros() as u64;
                b + Duration::from_micros(rand::random_range(0..=grow))
            }
            None => {
                let cap = Duration::from_millis(250)
                    .min(Duration::from_millis(25) * 2u32.saturating_pow(attempt - 1));
                Duration::from_micros(rand::random_range(0..=cap.as_micros() as u64))
            }
        };
        if let Some(d) = deadline() {
            backoff = backoff.min(d.saturating_duration_since(Instant::now()));
        }
        tokio::time::sleep(backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("grpc-status"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "trailer", "x-kept"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn redirect_locations_replace_only_what_the_rule_names() {
        let r = |uri: Option<&str>,
                 authority: Option<&str>,
                 port: Option<u16>,
                 scheme: Option<&str>| Redirect {
            uri: uri.map(String::from),
            authority: authority.map(String::from),
            port,
            scheme: scheme.map(String::from),
            code: 301,
            prefix: false,
        };
        let loc = |rd: &Redirect| redirect_location(rd, "web:8080", "/a/b", Some("x=1"), None);
        assert_eq!(
            loc(&r(Some("/c"), None, None, None)),
            "http://web:8080/c?x=1"
        );
        assert_eq!(
            loc(&r(None, Some("other"), None, None)),
            "http://other:8080/a/b?x=1"
        );
        assert_eq!(
            loc(&r(None, None, Some(9090), None)),
            "http://web:9090/a/b?x=1"
        );
        assert_eq!(
            loc(&r(None, None, None, Some("https"))),
            "https://web/a/b?x=1"
        );
        assert_eq!(
            loc(&r(None, None, Some(443), Some("https"))),
            "https://web/a/b?x=1"
        );
        assert_eq!(
            loc(&r(Some("/c?y=2"), None, None, None)),
            "http://web:8080/c?y=2"
        );
        assert_eq!(
            redirect_location(
                &r(None, None, Some(80), None),
                "[2001:2::1]:8080",
                "/",
                None,
                None
            ),
            "http://[2001:2::1]/"
        );
        // Gateway API ReplacePrefixMatch: only the matched segments are replaced.
        let pre = Redirect {
            prefix: true,
            code: 302,
            ..r(Some("/replacement-prefix"), None, None, None)
        };
        assert_eq!(
            redirect_location(
                &pre,
                "echo",
                "/original-prefix/lemon",
                None,
                Some((16, true))
            ),
            "http://echo/replacement-prefix/lemon"
        );
    }

    #[test]
    fn prefix_replacement_is_segment_aware_for_gateway_routes() {
        use crate::istio::replace_prefix;
        assert_eq!(
            replace_prefix("/strip-prefix/three", 13, "/", true),
            "/three"
        );
        assert_eq!(replace_prefix("/strip-prefix", 13, "/", true), "/");
        assert_eq!(
            replace_prefix("/prefix/one/two", 11, "/one", true),
            "/one/two"
        );
        assert_eq!(replace_prefix("/prefix/one", 11, "/one", true), "/one");
        assert_eq!(replace_prefix("/prefix/one/", 11, "/one/", true), "/one/");
        // Istio's prefix rewrite concatenates.
        assert_eq!(replace_prefix("/api/x", 5, "/v2/", false), "/v2/x");
    }
}
