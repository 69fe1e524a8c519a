//! Downstream connection plumbing: replaying the bytes protocol detection read, per-connection
//! activity (requests in flight, idle and header timers, abuse verdicts), an HTTP/2 frame meter
//! for control-frame floods, and the byte splice of opaque and upgraded connections.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::limits::{
    DRAIN_IDLE_GRACE, H2_CONTROL_FRAME_BUDGET, H2_CONTROL_WINDOW, H2_PREMATURE_RESET_MIN_STREAMS,
    ProxyConfig,
};

/// Bytes already read from a stream, returned again before the stream's own.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// `prefix` is read first, then `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new(); // release the buffer
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// `AsyncWrite` for a wrapper that only watches reads: every write goes to `self.inner`.
macro_rules! write_through {
    ($t:ident) => {
        impl<T: AsyncWrite + Unpin> AsyncWrite for $t<T> {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

write_through!(Rewind);

/// What a downstream connection turned out to carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnKind {
    /// Protocol detection still running.
    Detecting = 0,
    /// HTTP/1.x.
    Http1 = 1,
    /// HTTP/2.
    Http2 = 2,
    /// Upgraded (WebSocket, CONNECT) or opaque TCP: never shed, never timed out as HTTP.
    Stream = 3,
}

/// Shared state of one downstream connection: read by its driver (timeouts, GOAWAY), written by
/// its IO wrapper and its requests.
pub struct ConnState {
    born: Instant,
    kind: AtomicU8,
    /// Requests in flight.
    in_flight: AtomicU32,
    /// Requests (HTTP/2: streams) started.
    streams: AtomicU64,
    /// Requests the client abandoned before the proxy answered (HTTP/2 resets).
    premature: AtomicU64,
    /// ms since `born` + 1 when the first byte of an HTTP/1 head arrived (0: none pending).
    head_since: AtomicU64,
    /// ms since `born` when the last request ended (or the connection started).
    idle_since: AtomicU64,
    /// Why the connection must close now (abuse, shed, header timeout).
    close: OnceLock<&'static str>,
    /// Reads are paused: an abusive client gets nothing more read from its socket.
    paused: AtomicBool,
    /// The proxy is shutting down: finish what is in flight, then close (HTTP/1: `Connection:
    /// close` on the next response; HTTP/2: GOAWAY).
    draining: AtomicBool,
    wake: Notify,
    /// The connection's slot under `max_connections`, released when the last user is gone.
    _permit: Option<OwnedSemaphorePermit>,
    /// Counts the connection among its client's until the last user is gone.
    client: OnceLock<LiveCount>,
}

/// One connection counted in its client's live connections.
pub struct LiveCount(Arc<AtomicU64>);

impl LiveCount {
    /// Counts one more connection in `n`.
    pub fn new(n: &Arc<AtomicU64>) -> Self {
        n.fetch_add(1, Relaxed);
        Self(n.clone())
    }
}

impl Drop for LiveCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl ConnState {
    /// A new connection holding `permit`.
    pub fn new(permit: Option<OwnedSemaphorePermit>) -> Arc<Self> {
        Arc::new(Self {
            born: Instant::now(),
            kind: AtomicU8::new(ConnKind::Detecting as u8),
            in_flight: AtomicU32::new(0),
            streams: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            close: OnceLock::new(),
            paused: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            wake: Notify::new(),
            _permit: permit,
            client: OnceLock::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Counts the connection among its client's until it is gone.
    pub fn count_in(&self, live: LiveCount) {
        let _ = self.client.set(live);
    }

    /// What the connection carries.
    pub fn kind(&self) -> ConnKind {
        match self.kind.load(Relaxed) {
            1 => ConnKind::Http1,
            2 => ConnKind::Http2,
            3 => ConnKind::Stream,
            _ => ConnKind::Detecting,
        }
    }

    /// Records what the connection carries.
    pub fn set_kind(&self, k: ConnKind) {
        self.kind.store(k as u8, Relaxed);
    }

    /// An HTTP connection with nothing in flight: how long it has been idle.
    pub fn idle_for(&self) -> Option<Duration> {
        let http = matches!(self.kind(), ConnKind::Http1 | ConnKind::Http2);
        (http && self.in_flight.load(Relaxed) == 0 && self.close.get().is_none()).then(|| {
            Duration::from_millis(self.now_ms().saturating_sub(self.idle_since.load(Relaxed)))
        })
    }

    /// Asks the connection's driver to close it (GOAWAY for HTTP/2) for `why`.
    pub fn close(&self, why: &'static str, pause_reads: bool) {
        if self.close.set(why).is_ok() {
            if pause_reads {
                self.paused.store(true, Relaxed);
            }
            self.wake.notify_one();
        }
    }

    /// Asks the connection to finish gracefully: the proxy is shutting down.
    pub fn drain(&self) {
        if !self.draining.swap(true, Relaxed) {
            self.wake.notify_one();
        }
    }

    /// Whether the connection is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Why the connection is being closed, if it is.
    pub fn closing(&self) -> Option<&'static str> {
        self.close.get().copied()
    }

    /// A request started; the guard ends it.
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Relaxed);
        self.streams.fetch_add(1, Relaxed);
        self.head_since.store(0, Relaxed);
        RequestGuard {
            conn: self.clone(),
            answered: false,
        }
    }

    fn on_read(&self) {
        if self.in_flight.load(Relaxed) == 0
            && self.head_since.load(Relaxed) == 0
            && self.kind() == ConnKind::Http1
        {
            self.head_since.store(self.now_ms() + 1, Relaxed);
        }
    }

    /// When the driver must look again, and what expires then if nothing changed: the
    /// header-read or the idle timeout (`None`: only a check). Requests do not wake the driver
    /// (that would cost a timer per request): it wakes at least every header-read timeout and
    /// finds the precise deadline then.
    pub fn next_deadline(&self, cfg: &ProxyConfig) -> (Instant, Option<&'static str>) {
        let now = Instant::now();
        let mut every = cfg.header_read_timeout.min(cfg.http_idle_timeout);
        if self.draining() {
            every = every.min(DRAIN_IDLE_GRACE);
        }
        let recheck = now + every;
        if self.in_flight.load(Relaxed) > 0 {
            return (recheck, None);
        }
        let head = self.head_since.load(Relaxed);
        let (since_ms, after, why) = if head > 0 {
            (head - 1, cfg.header_read_timeout, "header-read-timeout")
        } else if self.draining() && self.kind() == ConnKind::Http1 {
            // Draining: an idle HTTP/1 connection closes after a short grace (a request the
            // client is sending right now still gets its answer, with `Connection: close`).
            (
                self.idle_since.load(Relaxed),
                DRAIN_IDLE_GRACE.min(cfg.http_idle_timeout),
                "drain",
            )
        } else {
            (
                self.idle_since.load(Relaxed),
                cfg.http_idle_timeout,
                "idle-timeout",
            )
        };
        let due = self.born + Duration::from_millis(since_ms) + after;
        if due <= recheck {
            (due, Some(why))
        } else {
            (recheck, None)
        }
    }

    /// Wakes when something the driver watches changed.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }
}

/// One request in flight on a connection. Dropped before [`RequestGuard::answered`], the client
/// abandoned it (an HTTP/2 reset), which counts toward the rapid-reset verdict.
pub struct RequestGuard {
    conn: Arc<ConnState>,
    answered: bool,
}

impl RequestGuard {
    /// The proxy produced a response head.
    pub fn answered(&mut self) {
        self.answered = true;
    }

    /// The connection this request came on.
    pub fn conn(&self) -> &Arc<ConnState> {
        &self.conn
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let c = &self.conn;
        if !self.answered {
            let premature = c.premature.fetch_add(1, Relaxed) + 1;
            let streams = c.streams.load(Relaxed);
            if streams >= H2_PREMATURE_RESET_MIN_STREAMS && premature * 2 > streams {
                c.close("rapid-reset", true);
            }
        }
        if c.in_flight.fetch_sub(1, Relaxed) == 1 {
            c.idle_since.store(c.now_ms(), Relaxed);
        }
    }
}

/// Counts HTTP/2 control frames in the client's byte stream without parsing anything else:
/// frame headers are 9 bytes (length, type, flags, stream), payloads are skipped.
#[derive(Debug)]
pub struct FrameMeter {
    preface_left: usize,
    head: [u8; 9],
    head_len: usize,
    skip: usize,
    count: u32,
    window_start: Instant,
}

impl Default for FrameMeter {
    fn default() -> Self {
        Self {
            preface_left: 24,
            head: [0; 9],
            head_len: 0,
            skip: 0,
            count: 0,
            window_start: Instant::now(),
        }
    }
}

impl FrameMeter {
    /// Feeds bytes read from the client; `Err` names the flood once the budget is exceeded.
    pub fn feed(&mut self, mut b: &[u8]) -> Result<(), &'static str> {
        while !b.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(b.len());
                self.preface_left -= n;
                b = &b[n..];
            } else if self.skip > 0 {
                let n = self.skip.min(b.len());
                self.skip -= n;
                b = &b[n..];
            } else {
                let n = (9 - self.head_len).min(b.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&b[..n]);
                self.head_len += n;
                b = &b[n..];
                if self.head_len == 9 {
                    self.head_len = 0;
                    let h = self.head;
                    self.skip =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let (kind, ack) = (h[3], h[4] & 1 == 1);
                    // PING (6) and SETTINGS (4) that demand an answer.
                    if (kind == 6 || kind == 4) && !ack {
                        let now = Instant::now();
                        if now.duration_since(self.window_start) > H2_CONTROL_WINDOW {
                            self.window_start = now;
                            self.count = 0;
                        }
                        self.count += 1;
                        if self.count > H2_CONTROL_FRAME_BUDGET {
                            return Err(if kind == 6 {
                                "ping-flood"
                            } else {
                                "settings-flood"
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A downstream stream reporting reads to its [`ConnState`] (and, for HTTP/2, to a
/// [`FrameMeter`]); paused connections read nothing more.
pub struct Watched<T> {
    inner: T,
    conn: Arc<ConnState>,
    meter: Option<FrameMeter>,
}

impl<T> Watched<T> {
    /// Wraps `inner`; `h2` meters HTTP/2 control frames.
    pub fn new(inner: T, conn: Arc<ConnState>, h2: bool) -> Self {
        Self {
            inner,
            conn,
            meter: h2.then(FrameMeter::default),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.conn.paused.load(Relaxed) {
            // The driver closes the connection shortly; nothing more is read until then.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            this.conn.on_read();
            if let Some(m) = &mut this.meter
                && let Err(why) = m.feed(new)
            {
                this.conn.close(why, true);
            }
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(Watched);

/// Size of a splice buffer; it exists only while bytes are moving.
const SPLICE_BUF: usize = 16 * 1024;

#[derive(Default)]
struct Direction {
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    eof: bool,
    shut: bool,
    bytes: u64,
}

impl Direction {
    /// Moves bytes from `r` to `w` until `r` ends (then shuts `w`'s write side down).
    fn poll<R: AsyncRead + Unpin + ?Sized, W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.pos < self.end {
                let buf = self.buf.as_ref().expect("buffer holds pending bytes");
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.bytes += n as u64;
                *moved = true;
                continue;
            }
            if self.eof {
                if !self.shut {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    self.shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            let buf = self
                .buf
                .get_or_insert_with(|| vec![0u8; SPLICE_BUF].into_boxed_slice());
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    // Idle: hold no buffer (10k idle tunnels must cost next to nothing).
                    self.buf = None;
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.eof = true;
                        self.buf = None;
                    } else {
                        self.pos = 0;
                        self.end = n;
                        *moved = true;
                    }
                }
            }
        }
    }
}

/// How a splice ended.
#[derive(Debug)]
pub struct Spliced {
    /// Bytes from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes from `b` to `a`.
    pub b_to_a: u64,
    /// Closed for idleness.
    pub idle_timeout: bool,
}

/// Copies bytes both ways until both directions ended, keeping half-closes (EOF from one side
/// shuts down the other's write side); closes both after `idle` without a byte either way.
pub async fn splice<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Direction::default();
    let mut ba = Direction::default();
    let mut last = tokio::time::Instant::now();
    let timer = tokio::time::sleep_until(last + idle);
    tokio::pin!(timer);
    std::future::poll_fn(|cx| {
        let mut moved = false;
        let r1 = if ab.shut {
            Poll::Ready(Ok(()))
        } else {
            ab.poll(cx, a, b, &mut moved)
        };
        if let Poll::Ready(Err(e)) = r1 {
            return Poll::Ready(Err(e));
        }
        let r2 = if ba.shut {
            Poll::Ready(Ok(()))
        } else {
            ba.poll(cx, b, a, &mut moved)
        };
        if let Poll::Ready(Err(e)) = r2 {
            return Poll::Ready(Err(e));
        }
        if r1.is_ready() && r2.is_ready() {
            return Poll::Ready(Ok(false));
        }
        if moved {
            last = tokio::time::Instant::now();
        }
        if timer.as_mut().poll(cx).is_ready() {
            if last + idle <= tokio::time::Instant::now() {
                return Poll::Ready(Ok(true));
            }
            timer.as_mut().reset(last + idle);
            let _ = timer.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await
    .map(|idle_timeout| Spliced {
        a_to_b: ab.bytes,
        b_to_a: ba.bytes,
        idle_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn frame_meter_counts_pings_across_split_reads_and_skips_payloads() {
        let mut m = FrameMeter::default();
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS ack (not counted), DATA with a payload that looks like PING headers.
        bytes.extend_from_slice(&[0, 0, 0, 4, 1, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 9, 0, 0, 0, 0, 0, 1]);
        bytes.extend_from_slice(&[0, 0, 8, 6, 0, 0, 0, 0, 0]);
        let ping = [0u8, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        for _ in 0..H2_CONTROL_FRAME_BUDGET {
            bytes.extend_from_slice(&ping);
        }
        for chunk in bytes.chunks(5) {
            m.feed(chunk).expect("within budget");
        }
        assert_eq!(m.count, H2_CONTROL_FRAME_BUDGET);
        assert_eq!(m.feed(&ping), Err("ping-flood"));
    }

    #[tokio::test]
    async fn splice_keeps_half_close_and_counts_bytes() {
        let (mut client, mut proxy_a) = tokio::io::duplex(64);
        let (mut proxy_b, mut server) = tokio::io::duplex(64);
        let t = tokio::spawn(async move {
            splice(&mut proxy_a, &mut proxy_b, Duration::from_secs(5)).await
        });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "EOF reached the server");
        // The other direction still flows after the client's half-close.
        server.write_all(b"reply after EOF").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply after EOF");
        let s = t.await.unwrap().unwrap();
        assert_eq!((s.a_to_b, s.b_to_a, s.idle_timeout), (5, 15, false));
    }

    #[tokio::test(start_paused = true)]
    async fn splice_closes_after_idle() {
        let (_client, mut proxy_a) = tokio::io::duplex(64);
        let (mut proxy_b, _server) = tokio::io::duplex(64);
        let s = splice(&mut proxy_a, &mut proxy_b, Duration::from_secs(3600))
            .await
            .unwrap();
        assert!(s.idle_timeout);
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_first() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
