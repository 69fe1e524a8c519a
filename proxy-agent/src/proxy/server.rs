//! The proxy's listener: accepts redirected connections (within the connection limit, backing
//! off when accepts fail), finds each one's original ClusterIP destination, detects its
//! protocol and serves it: HTTP/1.1 and HTTP/2 with the configured limits, opaque TCP as bytes.
//! Each HTTP connection has a driver that closes it on the header-read and idle timeouts, when
//! its client holds too many idle connections, and on HTTP/2 abuse (GOAWAY, then close).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::body::{Holding, ProxyBody, text};
use super::config::RouteTable;
use super::detect::{Protocol, Why, detect};
use super::handler::{self, Downstream};
use super::io::{ConnKind, ConnState, LiveCount, Rewind, Watched};
use super::limits::{self, ProxyConfig, RateLimitedLog};
use super::telemetry::Telemetry;

/// Where redirected connections were headed (the datapath's original-destination map).
pub trait OrigDst: Send + Sync + 'static {
    /// Returns and forgets the original destination of the connection from `client`.
    fn take(&self, client: SocketAddrV4) -> Option<SocketAddrV4>;
}

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}

/// Connection counters (logged every minute while they change).
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Closed at accept: `--max-connections` reached.
    pub rejected_limit: AtomicU64,
    /// Failed accepts (EMFILE and the like).
    pub accept_errors: AtomicU64,
    /// Detected or configured as HTTP/1.x.
    pub http1: AtomicU64,
    /// Detected as HTTP/2.
    pub http2: AtomicU64,
    /// Carried as opaque TCP.
    pub opaque: AtomicU64,
    /// Idle HTTP connections closed because their client held too many.
    pub shed_idle: AtomicU64,
    /// Closed at accept: the client floods idle connections.
    pub rejected_client: AtomicU64,
    /// Closed for a header-read timeout (slowloris).
    pub header_timeouts: AtomicU64,
    /// Closed for idleness.
    pub idle_closed: AtomicU64,
    /// Closed for HTTP/2 abuse (rapid reset, ping/settings floods).
    pub abusive: AtomicU64,
    /// Idle HTTP/1 connections closed while the proxy drained.
    pub drained: AtomicU64,
}

impl ProxyStats {
    /// Every counter with its name.
    pub fn summary(&self) -> [(&'static str, u64); 12] {
        [
            ("accepted", self.accepted.load(Relaxed)),
            ("rejected_limit", self.rejected_limit.load(Relaxed)),
            ("accept_errors", self.accept_errors.load(Relaxed)),
            ("http1", self.http1.load(Relaxed)),
            ("http2", self.http2.load(Relaxed)),
            ("opaque", self.opaque.load(Relaxed)),
            ("shed_idle", self.shed_idle.load(Relaxed)),
            ("rejected_client", self.rejected_client.load(Relaxed)),
            ("header_timeouts", self.header_timeouts.load(Relaxed)),
            ("idle_closed", self.idle_closed.load(Relaxed)),
            ("abusive", self.abusive.load(Relaxed)),
            ("drained", self.drained.load(Relaxed)),
        ]
    }
}

/// The node proxy: routes, settings and shared HTTP machinery.
pub struct Proxy {
    table: Arc<ArcSwap<RouteTable>>,
    orig: Arc<dyn OrigDst>,
    cfg: Arc<ProxyConfig>,
    /// Connection counters.
    pub stats: ProxyStats,
    /// Request metrics, access log and tap.
    pub telemetry: Arc<Telemetry>,
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// (destination, reason) pairs already logged as opaque at info level.
    opaque_seen: Mutex<HashSet<(SocketAddrV4, &'static str)>>,
    /// `max_connections` slots, shared by the workers.
    limit: Arc<Semaphore>,
    clients: Mutex<Clients>,
    /// Warnings of failed accepts and rejected connections, at most once a second over all
    /// workers.
    accept_log: Mutex<RateLimitedLog>,
    limit_log: Mutex<RateLimitedLog>,
    /// `true` once the proxy drains (SIGTERM): the accept loops stop, connections finish.
    drain: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// A proxy serving `table`, finding original destinations with `orig`.
    pub fn new(
        table: Arc<ArcSwap<RouteTable>>,
        orig: Arc<dyn OrigDst>,
        cfg: ProxyConfig,
        telemetry: Arc<Telemetry>,
    ) -> Arc<Self> {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            // The driver enforces the header-read timeout so that it does not also cut idle
            // keep-alive connections (hyper's runs while waiting for the next request too).
            .header_read_timeout(None)
            .max_header_size(limits::MAX_HEADER_BYTES)
            .keep_alive(true);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(limits::H2_MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(limits::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(limits::H2_MAX_LOCAL_ERROR_RESET_STREAMS)
            .max_header_list_size(limits::H2_MAX_HEADER_LIST_SIZE)
            .keep_alive_interval(limits::H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(limits::H2_KEEPALIVE_TIMEOUT)
            .enable_connect_protocol();
        Arc::new(Self {
            table,
            orig,
            stats: ProxyStats::default(),
            telemetry,
            h1,
            h2,
            opaque_seen: Mutex::new(HashSet::new()),
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            clients: Mutex::new(Clients::default()),
            accept_log: Mutex::new(RateLimitedLog::every(limits::WARN_EVERY)),
            limit_log: Mutex::new(RateLimitedLog::every(limits::WARN_EVERY)),
            drain: tokio::sync::watch::Sender::new(false),
            cfg: Arc::new(cfg),
        })
    }
}

impl Proxy {
    /// The node-wide settings.
    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Downstream connections open now.
    pub fn active_connections(&self) -> usize {
        self.cfg
            .max_connections
            .saturating_sub(self.limit.available_permits())
    }

    /// Starts the graceful shutdown: the accept loops stop after
    /// [`limits::DRAIN_ACCEPT_LINGER`] and every connection finishes what it has in flight
    /// (HTTP/1: `Connection: close` on its next response, closed after
    /// [`limits::DRAIN_IDLE_GRACE`] idle; HTTP/2: GOAWAY). Opaque and upgraded connections go
    /// on until they end or the process exits.
    pub fn drain(&self) {
        self.drain.send_replace(true);
        let Ok(clients) = self.clients.lock() else {
            return;
        };
        for c in clients.by_ip.values() {
            for conn in c.conns.iter().filter_map(Weak::upgrade) {
                conn.drain();
            }
        }
    }

    /// Whether the proxy drains.
    pub fn draining(&self) -> bool {
        *self.drain.borrow()
    }
}

/// Connections by client pod, to shed the idle HTTP connections of a client that holds too
/// many. Only the accept loops and protocol detection touch it; the work per connection is
/// amortized (a client's list is pruned when it doubled, scanned once per 32 new connections).
#[derive(Default)]
struct Clients {
    by_ip: HashMap<IpAddr, ClientConns>,
    accepts: u64,
}

#[derive(Default)]
struct ClientConns {
    conns: Vec<Weak<ConnState>>,
    pruned_len: usize,
    /// Connections admitted since the last scan for idle ones.
    since_scan: usize,
    /// Live connections of the client.
    live: Arc<AtomicU64>,
    /// Idle HTTP connections the last scan found.
    idle_seen: usize,
}

impl ClientConns {
    fn prune(&mut self) {
        self.conns.retain(|c| c.strong_count() > 0);
        self.pruned_len = self.conns.len();
    }
}

/// A client over its idle allowance is scanned once per this many new connections.
const SHED_SCAN_BATCH: usize = 32;

impl Clients {
    /// Remembers a new connection of `ip`; `false`: refuse it, the client floods idle
    /// connections faster than they are shed (it holds twice its idle allowance, and the last
    /// scan found it over the allowance).
    fn admit(&mut self, ip: IpAddr, conn: &Arc<ConnState>, max_idle: usize) -> bool {
        self.accepts += 1;
        if self.accepts.is_multiple_of(4096) {
            self.by_ip.retain(|_, c| {
                c.prune();
                !c.conns.is_empty()
            });
        }
        let c = self.by_ip.entry(ip).or_default();
        if c.idle_seen >= max_idle && c.live.load(Relaxed) >= 2 * max_idle as u64 {
            return false;
        }
        conn.count_in(LiveCount::new(&c.live));
        c.conns.push(Arc::downgrade(conn));
        c.since_scan += 1;
        if c.conns.len() > 2 * c.pruned_len.max(64) {
            c.prune();
        }
        true
    }

    /// Once a second: sheds what the per-connection scans left (a client that stopped opening
    /// connections right after passing its allowance); returns how many were closed.
    fn sweep(&mut self, max_idle: usize) -> usize {
        let over: Vec<IpAddr> = self
            .by_ip
            .iter()
            .filter(|(_, c)| c.conns.len() > max_idle)
            .map(|(ip, _)| *ip)
            .collect();
        over.into_iter().map(|ip| self.shed_now(ip, max_idle)).sum()
    }

    /// Closes the longest-idle HTTP connections of `ip` beyond `max_idle`, scanning once per
    /// [`SHED_SCAN_BATCH`] new connections; returns how many.
    fn shed(&mut self, ip: IpAddr, max_idle: usize) -> usize {
        match self.by_ip.get(&ip) {
            Some(c) if c.conns.len() > max_idle && c.since_scan >= SHED_SCAN_BATCH => {
                self.shed_now(ip, max_idle)
            }
            _ => 0,
        }
    }

    fn shed_now(&mut self, ip: IpAddr, max_idle: usize) -> usize {
        let Some(c) = self.by_ip.get_mut(&ip) else {
            return 0;
        };
        c.since_scan = 0;
        c.prune();
        let mut idle: Vec<(Duration, Arc<ConnState>)> = c
            .conns
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|c| c.idle_for().map(|d| (d, c)))
            .collect();
        c.idle_seen = idle.len();
        if idle.len() <= max_idle {
            return 0;
        }
        let extra = idle.len() - max_idle;
        // The `extra` longest idle first.
        idle.select_nth_unstable_by(extra - 1, |a, b| b.0.cmp(&a.0));
        for (_, c) in &idle[..extra] {
            c.close("idle-shed", false);
        }
        extra
    }
}

/// Accepts connections until the listener fails; accept errors (EMFILE) back off from 1 ms
/// to 1 s and are logged at most once a second. One worker (`sweeper`) also runs the periodic
/// outlier sweep.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, sweeper: bool) {
    if sweeper {
        tokio::spawn(sweep(Arc::downgrade(&proxy)));
    }
    let stop = {
        let mut rx = proxy.drain.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
            tokio::time::sleep(limits::DRAIN_ACCEPT_LINGER).await;
        }
    };
    tokio::pin!(stop);
    let mut backoff = limits::ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => {
                debug!("draining: the listener stops accepting");
                return;
            }
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(c) => {
                backoff = limits::ACCEPT_BACKOFF_MIN;
                c
            }
            Err(e) => {
                let n = proxy.stats.accept_errors.fetch_add(1, Relaxed) + 1;
                if let Some(suppressed) = gate(&proxy.accept_log) {
                    warn!(error = %e, failures = n, suppressed, backoff_ms = backoff.as_millis() as u64,
                        "accepting a connection failed; backing off (raise the agent's open-file limit, or lower --max-connections)");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(limits::ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        proxy.stats.accepted.fetch_add(1, Relaxed);
        let Ok(permit) = proxy.limit.clone().try_acquire_owned() else {
            let n = proxy.stats.rejected_limit.fetch_add(1, Relaxed) + 1;
            if let Some(suppressed) = gate(&proxy.limit_log) {
                warn!(%peer, rejected = n, suppressed, max = proxy.cfg.max_connections,
                    "connection limit reached: closing new connections (--max-connections)");
            }
            drop(stream);
            continue;
        };
        let Some(dst) = v4(peer).and_then(|p| proxy.orig.take(p)) else {
            // Not redirected by our datapath: the proxy is no open relay.
            debug!(%peer, "refusing a connection that was not redirected to the proxy");
            continue;
        };
        let conn = ConnState::new(Some(permit));
        let admitted = proxy
            .clients
            .lock()
            .map(|mut c| c.admit(peer.ip(), &conn, proxy.cfg.max_idle_per_client))
            .unwrap_or(true);
        if !admitted {
            let n = proxy.stats.rejected_client.fetch_add(1, Relaxed) + 1;
            if let Some(suppressed) = gate(&proxy.limit_log) {
                warn!(%peer, rejected = n, suppressed, max_idle = proxy.cfg.max_idle_per_client,
                    "a client opens idle connections faster than they are shed: closing its new ones (--max-idle-per-client)");
            }
            continue;
        }
        if proxy.draining() {
            conn.drain();
        }
        tokio::spawn(serve_conn(stream, peer, dst, conn, proxy.clone()));
    }
}

fn gate(log: &Mutex<RateLimitedLog>) -> Option<u64> {
    log.lock().ok()?.ready()
}

/// Every second: outlier sweeps (each cluster at its own interval) and idle shedding of
/// clients over their allowance; every 10 s: idle pooled connections closed; every minute: the
/// connection counters logged if they changed.
async fn sweep(proxy: Weak<Proxy>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut last = None;
    loop {
        tick.tick().await;
        let Some(p) = proxy.upgrade() else { return };
        n += 1;
        let shed = p
            .clients
            .lock()
            .map(|mut c| c.sweep(p.cfg.max_idle_per_client))
            .unwrap_or(0);
        p.stats.shed_idle.fetch_add(shed as u64, Relaxed);
        let table = p.table.load();
        for route in table.routes.values() {
            for c in route.clusters() {
                c.sweep();
                if n.is_multiple_of(10) {
                    c.reap_idle();
                }
            }
        }
        if n.is_multiple_of(60) {
            let now = p.stats.summary();
            if last.as_ref() != Some(&now) {
                let s: Vec<String> = now.iter().map(|(k, v)| format!("{k}={v}")).collect();
                info!("proxy connections: {}", s.join(" "));
                last = Some(now);
            }
        }
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddrV4,
    conn: Arc<ConnState>,
    p: Arc<Proxy>,
) {
    let _ = stream.set_nodelay(true);
    let route = p.table.load().routes.get(&dst).cloned();
    let (proto, prefix) = match &route {
        Some(r) if r.detection.opaque => (Protocol::Opaque(Why::Configured), Bytes::new()),
        _ => {
            let timeout = route
                .as_ref()
                .and_then(|r| r.detection.detect_timeout)
                .unwrap_or(p.cfg.detect_timeout);
            match detect(&stream, timeout).await {
                Ok(d) => d,
                Err(e) => {
                    debug!(%peer, error = %e, "connection failed during protocol detection");
                    return;
                }
            }
        }
    };
    match proto {
        Protocol::Opaque(why) => {
            p.stats.opaque.fetch_add(1, Relaxed);
            conn.set_kind(ConnKind::Stream);
            let first = p
                .opaque_seen
                .lock()
                .map(|mut s| s.insert((dst, why.as_str())))
                .unwrap_or(false);
            if first {
                info!(%dst, reason = why.as_str(), "carrying connections to this Service port as opaque TCP (not HTTP)");
            }
            debug!(%peer, %dst, protocol = "opaque", reason = why.as_str(), "protocol detected");
            let Some(route) = route else {
                debug!(%peer, %dst, "no route for an opaque connection; closing");
                return;
            };
            super::tcp::forward(
                Rewind::new(prefix, stream),
                peer,
                &route,
                p.cfg.stream_idle_timeout,
                &p.telemetry,
            )
            .await;
        }
        Protocol::Http1 | Protocol::Http2 => {
            let h2 = proto == Protocol::Http2;
            let counter = if h2 { &p.stats.http2 } else { &p.stats.http1 };
            counter.fetch_add(1, Relaxed);
            conn.set_kind(if h2 { ConnKind::Http2 } else { ConnKind::Http1 });
            // One more HTTP connection of this client: past its idle allowance, its
            // longest-idle ones go.
            let shed = p
                .clients
                .lock()
                .map(|mut c| c.shed(peer.ip(), p.cfg.max_idle_per_client))
                .unwrap_or(0);
            p.stats.shed_idle.fetch_add(shed as u64, Relaxed);
            debug!(%peer, %dst, protocol = if h2 { "http2" } else { "http1" }, "protocol detected");
            let io = TokioIo::new(Watched::new(Rewind::new(prefix, stream), conn.clone(), h2));
            let ds = Arc::new(Downstream {
                client: peer,
                client_ip: hyper::header::HeaderValue::from_str(&peer.ip().to_string())
                    .expect("an IP address is a valid header value"),
                orig: dst,
                conn: conn.clone(),
                cfg: p.cfg.clone(),
                source: p.telemetry.peer(peer.ip()),
                telemetry: p.telemetry.clone(),
            });
            let table = p.table.clone();
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let ds = ds.clone();
                let route = table.load().routes.get(&ds.orig).cloned();
                let mut guard = ds.conn.request();
                let version = req.version();
                async move {
                    let mut resp = match route {
                        Some(route) => handler::handle(req, &ds, route).await,
                        None => no_route(ds.orig),
                    };
                    if !h2
                        && ds.conn.draining()
                        && resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS
                    {
                        // hyper closes the connection once this response is written. To an
                        // HTTP/1.0 client it must be a 1.0 response, or hyper would add
                        // `keep-alive` to this header.
                        resp.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                        if version == hyper::Version::HTTP_10 {
                            *resp.version_mut() = hyper::Version::HTTP_10;
                        }
                    }
                    guard.answered();
                    Ok::<_, Infallible>(resp.map(|b| Holding::new(b, guard)))
                }
            });
            let why = if h2 {
                drive(p.h2.serve_connection(io, svc), &conn, &p.cfg).await
            } else {
                drive(
                    p.h1.serve_connection(io, svc).with_upgrades(),
                    &conn,
                    &p.cfg,
                )
                .await
            };
            if let Some(why) = why {
                let counter = match why {
                    "header-read-timeout" => &p.stats.header_timeouts,
                    "idle-timeout" => &p.stats.idle_closed,
                    "idle-shed" => return,
                    "drain" => &p.stats.drained,
                    _ => {
                        warn!(%peer, %dst, reason = why, "closed an abusive HTTP/2 connection with GOAWAY");
                        &p.stats.abusive
                    }
                };
                counter.fetch_add(1, Relaxed);
                debug!(%peer, %dst, reason = why, "closed the connection");
            }
        }
    }
}

fn no_route(dst: SocketAddrV4) -> Response<ProxyBody> {
    let mut r = Response::new(text(format!("no HTTP route for {dst}\n")));
    *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(
        handler::ERROR_HEADER,
        hyper::header::HeaderValue::from_static("no-route"),
    );
    r
}

/// A hyper server connection that can be asked to finish (HTTP/2: GOAWAY).
trait Graceful: Future<Output = hyper::Result<()>> {
    fn shutdown(self: Pin<&mut Self>);
}

impl<I, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs a connection until it ends or its [`ConnState`] asks for a close; returns why it was
/// closed, if the proxy closed it.
async fn drive<C: Graceful>(
    c: C,
    conn: &Arc<ConnState>,
    cfg: &ProxyConfig,
) -> Option<&'static str> {
    tokio::pin!(c);
    let timer = tokio::time::sleep_until(conn.next_deadline(cfg).0.into());
    tokio::pin!(timer);
    let mut drain_seen = false;
    loop {
        if conn.draining() && !drain_seen {
            drain_seen = true;
            if conn.kind() == ConnKind::Http2 {
                // GOAWAY: streams in flight finish, then hyper ends the connection.
                c.as_mut().shutdown();
            } else {
                timer.as_mut().reset(conn.next_deadline(cfg).0.into());
            }
        }
        tokio::select! {
            r = c.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "downstream connection ended with an error");
                }
                return None;
            }
            _ = timer.as_mut() => {
                let (at, why) = conn.next_deadline(cfg);
                match why {
                    Some(why) if at <= std::time::Instant::now() => conn.close(why, false),
                    _ => timer.as_mut().reset(at.into()),
                }
            }
            _ = conn.changed() => {}
        }
        let Some(why) = conn.closing() else { continue };
        if why == "header-read-timeout" || conn.kind() == ConnKind::Http1 {
            // An HTTP/1 connection with nothing in flight (or a head that never finished): drop.
            return Some(why);
        }
        // HTTP/2: GOAWAY, let streams in flight finish briefly, then drop. An idle connection
        // has nothing in flight: it only needs the GOAWAY written.
        c.as_mut().shutdown();
        let grace = if matches!(why, "idle-shed" | "idle-timeout") {
            limits::GOAWAY_IDLE_GRACE
        } else {
            limits::GOAWAY_GRACE
        };
        let _ = tokio::time::timeout(grace, c.as_mut()).await;
        return Some(why);
    }
}
