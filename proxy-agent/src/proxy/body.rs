//! Bodies: the streaming request body that can be replayed for a retry while what was sent so
//! far fits in a 64 KiB buffer (linkerd2-proxy's `ReplayBody` idea), response bodies that hand
//! their upstream connection back to the pool when they end, and a body that holds guards.
//!
//! A request is forwarded as soon as its head is read. Every attempt gets a [`ReplayBody`]
//! reader over one shared state that owns the downstream body: the current reader replays the
//! buffered chunks, then pulls new ones from the client (buffering them), so a full-duplex or
//! gRPC streaming request flows at once. Once more than [`REPLAY_LIMIT`] bytes passed, the
//! buffer is dropped and the request can no longer be retried. A reader of an earlier attempt
//! fails on its next poll, which aborts that upstream request.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt as _;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Errors carried by proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type sent upstream and returned downstream.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Largest request body prefix kept for replay; a request whose body grows past it is not
/// retried.
pub const REPLAY_LIMIT: usize = 64 * 1024;

struct State {
    /// Generation of the reader allowed to read; older readers fail.
    current: u64,
    /// Buffered data chunks (emptied once capped).
    chunks: Vec<Bytes>,
    buffered: usize,
    /// Body bytes received from the client so far.
    received: u64,
    capped: bool,
    /// The downstream body, until it ended.
    inner: Option<Incoming>,
    trailers: Option<HeaderMap>,
    /// The downstream body failed (malformed chunking, client reset).
    failed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    hint: SizeHint,
    /// When the downstream body ended (timeouts count from there, as Envoy's do).
    ended: tokio::sync::watch::Sender<Option<Instant>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The downstream request body of one request, shared by its attempts.
#[derive(Clone)]
pub struct Replay(Arc<Shared>);

impl Replay {
    /// Takes ownership of the downstream body.
    pub fn new(body: Incoming) -> Self {
        let hint = body.size_hint();
        Self(Arc::new(Shared {
            state: Mutex::new(State {
                current: 0,
                chunks: Vec::new(),
                buffered: 0,
                received: 0,
                capped: false,
                inner: Some(body),
                trailers: None,
                failed: None,
            }),
            hint,
            ended: tokio::sync::watch::Sender::new(None),
        }))
    }

    /// Resolves once the client sent the whole body (never, if it fails); returns when.
    pub async fn ended(&self) -> Instant {
        let mut rx = self.0.ended.subscribe();
        let ended = rx.wait_for(Option::is_some).await.map(|t| *t);
        match ended {
            Ok(t) => t.unwrap_or_else(Instant::now),
            Err(_) => std::future::pending().await,
        }
    }

    /// When the client finished sending the body, if it did.
    pub fn ended_at(&self) -> Option<Instant> {
        *self.0.ended.borrow()
    }

    /// A reader for the next attempt, replaying from the start; `None` once the body outgrew
    /// the replay buffer after a first attempt started reading it.
    pub fn attempt(&self) -> Option<ReplayBody> {
        let mut st = self.0.lock();
        if st.capped {
            return None;
        }
        st.current += 1;
        Some(ReplayBody {
            shared: self.0.clone(),
            generation: st.current,
            next: 0,
            trailers_sent: false,
        })
    }

    /// Whether a retry could still replay the body.
    pub fn replayable(&self) -> bool {
        !self.0.lock().capped
    }

    /// The whole body, if it has ended and fits the buffer (for mirroring).
    pub fn complete(&self) -> Option<(Bytes, Option<HeaderMap>)> {
        let st = self.0.lock();
        if st.capped || st.inner.is_some() || st.failed.is_some() {
            return None;
        }
        let mut all = bytes::BytesMut::with_capacity(st.buffered);
        for c in &st.chunks {
            all.extend_from_slice(c);
        }
        Some((all.freeze(), st.trailers.clone()))
    }

    /// Body bytes received from the client so far.
    pub fn received(&self) -> u64 {
        self.0.lock().received
    }

    /// Why the downstream body failed, if it did (the request is malformed or was abandoned).
    pub fn failure(&self) -> Option<String> {
        self.0.lock().failed.clone()
    }
}

/// One attempt's view of a [`Replay`].
pub struct ReplayBody {
    shared: Arc<Shared>,
    generation: u64,
    /// Next buffered chunk to send.
    next: usize,
    trailers_sent: bool,
}

/// A reader of an earlier attempt was polled after a retry started.
#[derive(Debug, thiserror::Error)]
#[error("the request body moved to a retry")]
pub struct Superseded;

/// The downstream request body failed.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body from the client failed: {0}")]
pub struct DownstreamBodyError(pub String);

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut st = this.shared.lock();
        if st.current != this.generation {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if this.next < st.chunks.len() {
            let c = st.chunks[this.next].clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if let Some(why) = &st.failed {
            return Poll::Ready(Some(Err(Box::new(DownstreamBodyError(why.clone())))));
        }
        let Some(inner) = st.inner.as_mut() else {
            if !this.trailers_sent
                && let Some(t) = &st.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                st.inner = None;
                this.shared.ended.send_replace(Some(Instant::now()));
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                st.failed = Some(e.to_string());
                st.inner = None;
                Poll::Ready(Some(Err(Box::new(DownstreamBodyError(e.to_string())))))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    st.received += data.len() as u64;
                    if st.inner.as_ref().is_some_and(Body::is_end_stream) {
                        // The last bytes of a sized body: it ended with this frame.
                        st.inner = None;
                        this.shared.ended.send_replace(Some(Instant::now()));
                    }
                    if !st.capped {
                        if st.buffered + data.len() > REPLAY_LIMIT {
                            st.capped = true;
                            st.chunks = Vec::new();
                            this.next = 0;
                        } else {
                            st.buffered += data.len();
                            st.chunks.push(data.clone());
                            this.next += 1;
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    if let Some(t) = frame.trailers_ref() {
                        // Trailers end the body: a replaying reader sends them from here.
                        st.trailers = Some(t.clone());
                        st.inner = None;
                        this.trailers_sent = true;
                        this.shared.ended.send_replace(Some(Instant::now()));
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let st = self.shared.lock();
        st.current == self.generation
            && self.next >= st.chunks.len()
            && st.inner.is_none()
            && st.failed.is_none()
            && (st.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        // Every attempt sends the whole body: the client's declared length still holds.
        self.shared.hint
    }
}

/// A body of bytes.
pub fn full(b: Bytes) -> ProxyBody {
    http_body_util::Full::new(b)
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A short text body (for the proxy's own responses).
pub fn text(s: impl Into<String>) -> ProxyBody {
    full(Bytes::from(s.into()))
}

/// Bytes followed by trailers (a mirrored request).
pub fn with_trailers(b: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    match trailers {
        None => full(b),
        Some(t) => {
            let frames = [Ok::<_, BoxError>(Frame::data(b)), Ok(Frame::trailers(t))];
            http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
        }
    }
}

/// An upstream response body that reports how it ended: `true` when read to the end (the
/// connection can be reused), `false` when it failed or was dropped early.
pub struct Tracked {
    inner: Incoming,
    done: Option<Box<dyn FnOnce(bool) + Send + Sync>>,
}

impl Tracked {
    /// Wraps `inner`; `done` runs exactly once.
    pub fn new(inner: Incoming, done: impl FnOnce(bool) + Send + Sync + 'static) -> Self {
        let mut t = Self {
            inner,
            done: Some(Box::new(done)),
        };
        if t.inner.is_end_stream() {
            t.finish(true);
        }
        t
    }

    /// Wraps `inner` with nothing to report.
    pub fn plain(inner: Incoming) -> Self {
        Self { inner, done: None }
    }

    fn finish(&mut self, ok: bool) {
        if let Some(d) = self.done.take() {
            d(ok);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(true),
            _ => {}
        }
        r.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// A body that keeps something alive (a pool permit, in-flight counters) until it is dropped.
pub struct Holding<B = ProxyBody, H = Box<dyn Send + Sync>> {
    inner: B,
    _held: H,
}

impl<B, H> Holding<B, H> {
    /// Wraps `inner`, holding `held` until the body is dropped.
    pub fn new(inner: B, held: H) -> Self {
        Self { inner, _held: held }
    }
}

impl<B: Body + Unpin, H: Unpin> Body for Holding<B, H> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
