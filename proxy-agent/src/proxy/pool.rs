//! Upstream connections to one backend: pooled HTTP/1.1 keep-alive connections (at most
//! `max_idle` idle ones, each closed after `idle_timeout`, spoken by [`super::h1`]), or one
//! shared HTTP/2 connection
//! multiplexing all requests, opened once however many requests wait for it (single flight).
//! Pools are per proxy worker (as Envoy's are per worker thread), so a request and its upstream
//! connection always run on the same thread.
//! Upgrades (WebSocket, CONNECT) get a dedicated HTTP/1.1 connection of their own.
//!
//! Errors say whether the request reached the backend: a request that was never written (connect
//! failure, a pooled connection that closed under us, an HTTP/2 stream the server refused) can be
//! retried whatever its method.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use http_body_util::BodyExt as _;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::body::{BoxError, ProxyBody, Tracked};
use super::h1::{self, H1Conn, SendError};
use super::handler::Head;

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed (refused, unreachable).
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    /// TCP connect took longer than the connect timeout.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The request was not written: the connection closed before it could be sent.
    #[error("connection closed before the request was sent: {0}")]
    NotSent(BoxError),
    /// The connection broke after the request was (maybe partly) sent, before a response.
    #[error("connection reset before a response: {0}")]
    Reset(BoxError),
}

impl UpstreamError {
    /// Whether the backend cannot have seen the request.
    pub fn never_sent(&self) -> bool {
        !matches!(self, Self::Reset(_))
    }

    /// Whether this is a connect failure (for `retryOn: connect-failure`).
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout)
    }

    /// A short reason for logs and response headers.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect-failure",
            Self::ConnectTimeout => "connect-timeout",
            Self::NotSent(_) => "not-sent",
            Self::Reset(_) => "reset",
        }
    }
}

/// Per-connection settings from the DestinationRule.
#[derive(Clone, Copy, Debug)]
pub struct ConnOpts {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Requests per HTTP/1.1 connection before it is closed (`None`: unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// Idle HTTP/1.1 connections kept.
    pub max_idle: usize,
    /// Idle HTTP/1.1 connections older than this are closed.
    pub idle_timeout: Duration,
}

/// One worker's connections to a backend.
#[derive(Default)]
struct Slot {
    idle: Mutex<Vec<H1Conn>>,
    shared: ArcSwapOption<http2::SendRequest<ProxyBody>>,
    /// Held while an HTTP/2 connection is being opened: one connect, however many wait.
    connecting: tokio::sync::Mutex<()>,
}

/// The connections to one backend.
pub struct Conns {
    addr: SocketAddr,
    h2: bool,
    slots: Box<[Slot]>,
    /// Upstream connections open now (pooled, busy, HTTP/2, upgraded).
    open: Arc<std::sync::atomic::AtomicUsize>,
}

async fn connect(addr: SocketAddr, opts: &ConnOpts) -> Result<TokioIo<TcpStream>, UpstreamError> {
    let stream = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
        .map_err(UpstreamError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

impl Conns {
    /// No connection yet; they are made on demand.
    pub fn new(addr: SocketAddr, h2: bool) -> Self {
        Self {
            addr,
            h2,
            slots: (0..super::workers::count())
                .map(|_| Slot::default())
                .collect(),
            open: Arc::default(),
        }
    }

    /// Upstream connections open now, over all workers.
    pub fn open_count(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This worker's connections.
    fn slot(&self) -> &Slot {
        &self.slots[super::workers::current() % self.slots.len()]
    }

    /// Idle HTTP/1.1 connections now, over all workers (for logs and the admin view).
    pub fn idle_count(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.idle.lock().map(|v| v.len()).unwrap_or(0))
            .sum()
    }

    /// Closes idle connections older than `timeout` or beyond `max` (per worker), and forgets
    /// closed HTTP/2 connections.
    pub fn reap(&self, timeout: Duration, max: usize) {
        for slot in self.slots.iter() {
            if let Ok(mut idle) = slot.idle.lock() {
                idle.retain(|c| c.idle_since.elapsed() < timeout && c.is_reusable());
                let extra = idle.len().saturating_sub(max);
                idle.drain(..extra);
            }
            if slot.shared.load().as_ref().is_some_and(|s| s.is_closed()) {
                slot.shared.store(None);
            }
        }
    }

    fn put_idle(&self, worker: usize, conn: H1Conn, opts: &ConnOpts) {
        if let Ok(mut idle) = self.slots[worker].idle.lock()
            && idle.len() < opts.max_idle
        {
            idle.push(conn);
        }
    }

    /// Opens a dedicated HTTP/1.1 connection for a request that upgrades the connection
    /// (WebSocket, CONNECT); the response's upgrade carries the tunnel.
    pub async fn send_upgrade(
        &self,
        req: Request<ProxyBody>,
        opts: &ConnOpts,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        let io = connect(self.addr, opts).await?;
        let open = super::h1::OpenConn::new(&self.open);
        let (mut sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
            drop(open);
        });
        sender.try_send_request(req).await.map_err(|mut e| {
            if e.take_message().is_some() {
                UpstreamError::NotSent(e.into_error().into())
            } else {
                UpstreamError::Reset(e.into_error().into())
            }
        })
    }

    /// Sends one request (`head` with `body`) and returns the response with a streaming body.
    pub async fn send(
        self: &Arc<Self>,
        head: &Head,
        body: ProxyBody,
        opts: &ConnOpts,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        if self.h2 {
            self.send_h2(head.request(true, body), opts).await
        } else {
            self.send_h1(head, body, opts).await
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        head: &Head,
        body: ProxyBody,
        opts: &ConnOpts,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let worker = super::workers::current() % self.slots.len();
        let pooled = loop {
            let c = self.slots[worker]
                .idle
                .lock()
                .ok()
                .and_then(|mut v| v.pop());
            match c {
                Some(c) if c.idle_since.elapsed() < opts.idle_timeout && c.is_reusable() => {
                    break Some(c);
                }
                Some(_) => continue, // closed by the server, or idle too long
                None => break None,
            }
        };
        let conn = match pooled {
            Some(c) => c,
            None => H1Conn::new(
                connect(self.addr, opts).await?.into_inner(),
                Some(super::h1::OpenConn::new(&self.open)),
            ),
        };
        let close = opts
            .max_requests_per_connection
            .is_some_and(|m| conn.used + 1 >= m);
        let this = Arc::clone(self);
        let opts = *opts;
        h1::send(conn, head, body, close, move |c| {
            this.put_idle(worker, c, &opts)
        })
        .await
        .map_err(|e| match e {
            SendError::NotSent(e) => UpstreamError::NotSent(e.into()),
            SendError::Reset(e) => UpstreamError::Reset(e.into()),
        })
    }

    fn ready_h2(&self) -> Option<http2::SendRequest<ProxyBody>> {
        self.slot()
            .shared
            .load()
            .as_ref()
            .filter(|s| !s.is_closed())
            .map(|s| (**s).clone())
    }

    async fn send_h2(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        opts: &ConnOpts,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let mut sender = match self.ready_h2() {
            Some(s) => s,
            None => {
                let _one = self.slot().connecting.lock().await;
                // Whoever held the lock before may have connected for everybody.
                match self.ready_h2() {
                    Some(s) => s,
                    None => {
                        let io = connect(self.addr, opts).await?;
                        let open = super::h1::OpenConn::new(&self.open);
                        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                            .await
                            .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
                        tokio::spawn(async move {
                            let _ = conn.await;
                            drop(open);
                        });
                        self.slot().shared.store(Some(Arc::new(sender.clone())));
                        sender
                    }
                }
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| UpstreamError::NotSent(e.into()))?;
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                Ok(Response::from_parts(parts, Tracked::plain(body).boxed()))
            }
            Err(mut e) => {
                if e.take_message().is_some() {
                    Err(UpstreamError::NotSent(e.into_error().into()))
                } else {
                    Err(UpstreamError::Reset(e.into_error().into()))
                }
            }
        }
    }
}
