//! Request bodies that can be replayed for retries (capped), and response bodies that hand their
//! upstream connection back to the pool when they end.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The body type sent upstream and returned downstream.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Largest request body kept for replay; larger bodies are streamed once and never retried.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// A downstream request body after buffering.
pub enum RequestBody {
    /// Fully read and small enough to send again.
    Replayable(Bytes),
    /// Too large: the buffered prefix and the rest, to be sent exactly once (`None` once taken).
    Streaming(Option<(Bytes, Incoming)>),
}

impl RequestBody {
    /// Reads `body` until it ends or exceeds [`REPLAY_LIMIT`].
    pub async fn buffer(mut body: Incoming) -> Result<Self, hyper::Error> {
        if body.is_end_stream() {
            return Ok(Self::Replayable(Bytes::new()));
        }
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                buf.extend_from_slice(&data);
                if buf.len() > REPLAY_LIMIT {
                    return Ok(Self::Streaming(Some((buf.freeze(), body))));
                }
            }
        }
        Ok(Self::Replayable(buf.freeze()))
    }

    /// The replayable bytes, if any.
    pub fn replayable(&self) -> Option<&Bytes> {
        match self {
            Self::Replayable(b) => Some(b),
            Self::Streaming(_) => None,
        }
    }

    /// A body for one attempt: a copy of the buffer, or the stream itself (only once).
    pub fn take_for_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            Self::Replayable(b) => Some(full(b.clone())),
            Self::Streaming(s) => s.take().map(|(prefix, rest)| {
                Prefixed {
                    prefix: Some(prefix),
                    rest,
                }
                .boxed()
            }),
        }
    }
}

/// A body of bytes.
pub fn full(b: Bytes) -> ProxyBody {
    http_body_util::Full::new(b)
        .map_err(|never| match never {})
        .boxed()
}

/// A short text body (for the proxy's own responses).
pub fn text(s: impl Into<String>) -> ProxyBody {
    full(Bytes::from(s.into()))
}

struct Prefixed {
    prefix: Option<Bytes>,
    rest: Incoming,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}

/// A response body that reports how it ended: `true` when read to the end (the connection can
/// be reused), `false` when it failed or was dropped early.
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

    fn finish(&mut self, ok: bool) {
        if let Some(d) = self.done.take() {
            d(ok);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(true),
            _ => {}
        }
        r
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
pub struct Holding {
    inner: ProxyBody,
    _held: Box<dyn Send + Sync>,
}

impl Holding {
    /// Wraps `inner`, holding `held` until the body is dropped.
    pub fn new(inner: ProxyBody, held: impl Send + Sync + 'static) -> Self {
        Self {
            inner,
            _held: Box::new(held),
        }
    }
}

impl Body for Holding {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
