//! The proxy's HTTP/1.1 client for pooled upstream connections, driven inside the request's own
//! task: the head is written from the request's [`Head`] without copying its headers, the
//! request body is pumped while the response is read (full duplex), and the response body is
//! decoded straight from the socket as the downstream side asks for it. No connection task, no
//! channel between tasks per request (hyper's client has both); HTTP/2 upstreams and upgrades
//! still use hyper.
//!
//! Framing follows RFC 9112 6.3: no body for HEAD, 1xx, 204 and 304; `chunked` when it is the
//! final transfer coding (trailers kept); else `content-length`; else until the server closes.
//! A connection goes back to the pool only after a complete exchange that left nothing unread.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::{BoxError, ProxyBody};
use super::handler::Head;

/// Largest response head accepted from a backend.
const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line (size, extensions) or trailer section accepted.
const MAX_LINE: usize = 16 * 1024;
/// Read size while streaming a body.
const READ_CHUNK: usize = 64 * 1024;

/// An idle or busy upstream HTTP/1.1 connection.
pub struct H1Conn {
    io: TcpStream,
    rbuf: BytesMut,
    /// Requests sent on it.
    pub used: u32,
    /// When it last went idle.
    pub idle_since: Instant,
    /// Counts it among its backend's open connections while it lives.
    _open: Option<OpenConn>,
}

/// One open upstream connection of a backend: counted until dropped.
pub struct OpenConn(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl OpenConn {
    /// Counts one more connection in `n`.
    pub fn new(n: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(n.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What went wrong, and whether the request can have reached the backend.
#[derive(Debug)]
pub enum SendError {
    /// Nothing of the request was accepted by the connection.
    NotSent(io::Error),
    /// The request was (maybe partly) sent; no complete response head came back.
    Reset(io::Error),
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl H1Conn {
    /// A fresh connection, counted by `open` while it lives.
    pub fn new(io: TcpStream, open: Option<OpenConn>) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
            used: 0,
            idle_since: Instant::now(),
            _open: open,
        }
    }

    /// Whether an idle connection can take a request: still open, nothing unsolicited to read.
    ///
    /// Without a syscall when nothing happened: [`H1Conn::settle`] cleared the socket's
    /// readiness when the last exchange ended, so readiness now means the server sent something
    /// or closed while the connection was idle; only then is the socket read to find out.
    pub fn is_reusable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.io.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        let mut b = [0u8; 1];
        matches!(self.io.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Forgets the readiness left by the exchange's last read (all of it was consumed).
    fn settle(&self) {
        let _ = self.io.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
        });
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let spare = self.rbuf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity.
        unsafe { self.rbuf.set_len(self.rbuf.len() + n) };
        Poll::Ready(Ok(n))
    }
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    None,
    Length,
    Chunked,
}

/// Why the request body stopped.
enum PumpError {
    /// The downstream body failed (malformed chunking, the client went away): abandon.
    Body(BoxError),
    /// The backend stopped taking the body: its answer may still come.
    Write(io::Error),
}

/// Writes the request body (and, first, whatever is pending) to the connection.
struct Pump {
    body: Option<ProxyBody>,
    framing: Out,
    pending: Bytes,
    /// Written completely, the final chunk included.
    done: bool,
}

impl Pump {
    fn poll(&mut self, cx: &mut Context<'_>, io: &mut TcpStream) -> Poll<Result<(), PumpError>> {
        loop {
            while !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.pending))
                    .map_err(PumpError::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())));
                }
                self.pending.advance(n);
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            let Some(body) = self.body.as_mut() else {
                self.done = true;
                continue;
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                None => {
                    self.body = None;
                    self.done = true;
                    if self.framing == Out::Chunked {
                        self.pending = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(PumpError::Body(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) if d.is_empty() => {}
                    Ok(d) => {
                        self.pending = if self.framing == Out::Chunked {
                            let mut b = BytesMut::with_capacity(d.len() + 16);
                            b.extend_from_slice(format!("{:x}\r\n", d.len()).as_bytes());
                            b.extend_from_slice(&d);
                            b.extend_from_slice(b"\r\n");
                            b.freeze()
                        } else {
                            d
                        };
                    }
                    Err(frame) => {
                        // Trailers end a chunked body; without chunking they cannot be sent.
                        self.body = None;
                        self.done = true;
                        if self.framing == Out::Chunked {
                            let mut b = BytesMut::from(&b"0\r\n"[..]);
                            if let Some(t) = frame.trailers_ref() {
                                write_fields(&mut b, t);
                            }
                            b.extend_from_slice(b"\r\n");
                            self.pending = b.freeze();
                        }
                    }
                },
            }
        }
    }
}

fn write_fields(b: &mut BytesMut, h: &HeaderMap) {
    for (k, v) in h {
        b.extend_from_slice(k.as_str().as_bytes());
        b.extend_from_slice(b": ");
        b.extend_from_slice(v.as_bytes());
        b.extend_from_slice(b"\r\n");
    }
}

/// Serializes the request head; returns it with the body framing.
fn encode_head(head: &Head, body: &ProxyBody, close: bool) -> (BytesMut, Out) {
    let mut b = BytesMut::with_capacity(256 + head.headers.len() * 32);
    b.extend_from_slice(head.method.as_str().as_bytes());
    b.extend_from_slice(b" ");
    b.extend_from_slice(
        head.target
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    b.extend_from_slice(b" HTTP/1.1\r\n");
    write_fields(&mut b, &head.headers);
    if !head.headers.contains_key(header::HOST) {
        b.extend_from_slice(b"host: ");
        b.extend_from_slice(head.authority().as_bytes());
        b.extend_from_slice(b"\r\n");
    }
    let has_length = head.headers.contains_key(header::CONTENT_LENGTH);
    let framing = if body.is_end_stream() {
        if !has_length && matches!(head.method, Method::POST | Method::PUT | Method::PATCH) {
            b.extend_from_slice(b"content-length: 0\r\n");
        }
        Out::None
    } else if has_length {
        Out::Length
    } else if let Some(n) = body.size_hint().exact() {
        b.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        Out::Length
    } else {
        b.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Out::Chunked
    };
    if close {
        b.extend_from_slice(b"connection: close\r\n");
    }
    b.extend_from_slice(b"\r\n");
    (b, framing)
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum In {
    Empty,
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Parses a response head at the start of `buf`; `None`: incomplete.
fn parse_head(buf: &mut BytesMut) -> io::Result<Option<(StatusCode, Version, HeaderMap)>> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut r = httparse::Response::new(&mut headers);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(invalid("response head too large"));
            }
            return Ok(None);
        }
        Err(e) => return Err(invalid(format!("bad response head: {e}"))),
    };
    let status = StatusCode::from_u16(r.code.unwrap_or(0)).map_err(|_| invalid("bad status"))?;
    let version = if r.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Values are sliced out of the head bytes, not copied.
    let base = buf.as_ptr() as usize;
    let spans: Vec<(HeaderName, usize, usize)> = r
        .headers
        .iter()
        .map(|h| {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| invalid("bad header name"))?;
            let start = h.value.as_ptr() as usize - base;
            Ok((name, start, start + h.value.len()))
        })
        .collect::<io::Result<_>>()?;
    let head = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(spans.len());
    for (name, a, b) in spans {
        let v = HeaderValue::from_maybe_shared(head.slice(a..b))
            .map_err(|_| invalid("bad header value"))?;
        map.append(name, v);
    }
    Ok(Some((status, version, map)))
}

fn framing(method: &Method, status: StatusCode, h: &HeaderMap) -> io::Result<In> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(In::Empty);
    }
    if let Some(te) = h.get_all(header::TRANSFER_ENCODING).iter().next_back() {
        let last = te
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return Ok(if last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")) {
            In::Chunked(Chunk::Size)
        } else {
            In::Close
        });
    }
    let mut length = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        let n: u64 = v
            .to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("bad content-length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(invalid("conflicting content-length"));
        }
        length = Some(n);
    }
    Ok(match length {
        Some(0) => In::Empty,
        Some(n) => In::Length(n),
        None => In::Close,
    })
}

fn keep_alive(version: Version, h: &HeaderMap) -> bool {
    let tokens = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let mut close = version == Version::HTTP_10;
    for t in tokens {
        if t.eq_ignore_ascii_case("close") {
            return false;
        }
        if t.eq_ignore_ascii_case("keep-alive") {
            close = false;
        }
    }
    !close
}

/// Sends `head` with `body` on `conn` and returns the response once its head arrived; the body
/// streams from the connection. `done(conn)` gets the connection back when the exchange
/// completed cleanly and it may be reused.
pub async fn send(
    mut conn: H1Conn,
    head: &Head,
    body: ProxyBody,
    close: bool,
    done: impl FnOnce(H1Conn) + Send + Sync + 'static,
) -> Result<Response<ProxyBody>, SendError> {
    conn.used += 1;
    let (bytes, out) = encode_head(head, &body, close);
    let mut pump = Pump {
        body: (out != Out::None).then_some(body),
        framing: out,
        pending: bytes.freeze(),
        done: false,
    };
    // Until the whole head is written, the backend cannot have acted on the request.
    let written = std::future::poll_fn(|cx| {
        while !pump.pending.is_empty() {
            let n = ready!(Pin::new(&mut conn.io).poll_write(cx, &pump.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero)));
            }
            pump.pending.advance(n);
        }
        Poll::Ready(Ok(()))
    })
    .await;
    written.map_err(SendError::NotSent)?;
    let method = head.method.clone();
    let mut pump_failed = false;
    let (status, version, headers) = std::future::poll_fn(|cx| {
        loop {
            if !pump.done && !pump_failed {
                match pump.poll(cx, &mut conn.io) {
                    Poll::Ready(Err(PumpError::Write(e))) => {
                        tracing::debug!(error = %e, "the backend stopped reading the request body");
                        pump_failed = true;
                    }
                    Poll::Ready(Err(PumpError::Body(e))) => {
                        return Poll::Ready(Err(io::Error::other(format!(
                            "the request body failed: {e}"
                        ))));
                    }
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            if let Some((s, v, h)) = parse_head(&mut conn.rbuf)? {
                if s.is_informational() && s != StatusCode::SWITCHING_PROTOCOLS {
                    continue; // 100 Continue and friends: the final response follows
                }
                return Poll::Ready(Ok((s, v, h)));
            }
            let n = ready!(conn.poll_fill(cx))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the backend closed the connection before answering",
                )));
            }
        }
    })
    .await
    .map_err(SendError::Reset)?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(SendError::Reset(invalid(
            "unexpected 101 to a request that did not upgrade",
        )));
    }
    let framing = framing(&method, status, &headers).map_err(SendError::Reset)?;
    let reusable = keep_alive(version, &headers) && !close && framing != In::Close;
    let hint = match framing {
        In::Empty => SizeHint::with_exact(0),
        In::Length(n) => SizeHint::with_exact(n),
        _ => SizeHint::default(),
    };
    let mut resp = Response::new(http_body_util::BodyExt::boxed(H1Body {
        conn: Some(conn),
        state: if framing == In::Empty {
            In::Done
        } else {
            framing
        },
        pump: (!pump.done && !pump_failed).then_some(pump),
        reusable: reusable && !pump_failed,
        hint,
        done: Some(Box::new(done)),
    }));
    *resp.status_mut() = status;
    *resp.version_mut() = Version::HTTP_11;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// A response body read from the upstream connection as it is polled (while the rest of the
/// request body, if any, is still pumped the other way).
struct H1Body {
    conn: Option<H1Conn>,
    state: In,
    pump: Option<Pump>,
    reusable: bool,
    hint: SizeHint,
    done: Option<Box<dyn FnOnce(H1Conn) + Send + Sync>>,
}

impl H1Body {
    fn finish(&mut self) {
        self.state = In::Done;
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Reuse only after a clean exchange: the whole request sent, nothing extra read.
        if self.reusable && self.pump.as_ref().is_none_or(|p| p.done) && conn.rbuf.is_empty() {
            conn.settle();
            conn.idle_since = Instant::now();
            if let Some(d) = self.done.take() {
                d(conn);
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(p) = self.pump.as_mut()
                && !p.done
                && let Poll::Ready(Err(e)) = p.poll(cx, &mut conn.io)
            {
                self.pump = None;
                self.reusable = false;
                match e {
                    PumpError::Body(e) => {
                        // The client's request broke: this exchange is over.
                        self.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                    // The backend stopped reading the request: its response may still complete.
                    PumpError::Write(e) => {
                        tracing::debug!(error = %e, "the backend stopped reading the request body");
                    }
                }
            }
            match self.state {
                In::Done | In::Empty => {
                    self.finish();
                    return Poll::Ready(None);
                }
                In::Length(left) => {
                    if !conn.rbuf.is_empty() {
                        let n = (conn.rbuf.len() as u64).min(left) as usize;
                        let data = conn.rbuf.split_to(n).freeze();
                        self.state = if left == n as u64 {
                            In::Done
                        } else {
                            In::Length(left - n as u64)
                        };
                        if self.state == In::Done {
                            self.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                In::Close => {
                    if !conn.rbuf.is_empty() {
                        let data = conn.rbuf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                In::Chunked(c) => match decode_chunk(&mut conn.rbuf, c) {
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    Ok(Step::More) => {}
                    Ok(Step::State(s)) => {
                        self.state = In::Chunked(s);
                        continue;
                    }
                    Ok(Step::Data(d, s)) => {
                        self.state = In::Chunked(s);
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    }
                    Ok(Step::End(trailers)) => {
                        self.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                },
            }
            let n = match ready!(conn.poll_fill(cx)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            };
            if n == 0 {
                if self.state == In::Close {
                    self.reusable = false;
                    self.finish();
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the backend closed the connection in the middle of the response body",
                )
                .into())));
            }
        }
    }
}

enum Step {
    /// Need more bytes.
    More,
    /// Moved to another state without output.
    State(Chunk),
    /// Body bytes.
    Data(Bytes, Chunk),
    /// The body ended, with trailers if any.
    End(Option<HeaderMap>),
}

fn decode_chunk(buf: &mut BytesMut, c: Chunk) -> io::Result<Step> {
    match c {
        Chunk::Size => {
            let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                if buf.len() > MAX_LINE {
                    return Err(invalid("chunk size line too long"));
                }
                return Ok(Step::More);
            };
            let line = &buf[..end];
            let hex_len = line.iter().take_while(|c| c.is_ascii_hexdigit()).count();
            if hex_len == 0 || hex_len > 16 {
                return Err(invalid("bad chunk size"));
            }
            let rest = &line[hex_len..];
            if !rest.is_empty() && !matches!(rest[0], b';' | b' ' | b'\t') {
                return Err(invalid("bad chunk size"));
            }
            let size =
                u64::from_str_radix(std::str::from_utf8(&line[..hex_len]).unwrap_or("x"), 16)
                    .map_err(|_| invalid("bad chunk size"))?;
            buf.advance(end + 2);
            Ok(Step::State(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            let n = (buf.len() as u64).min(left) as usize;
            let d = buf.split_to(n).freeze();
            let next = if left == n as u64 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left - n as u64)
            };
            Ok(Step::Data(d, next))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::More);
            }
            if &buf[..2] != b"\r\n" {
                return Err(invalid("chunk not followed by CRLF"));
            }
            buf.advance(2);
            Ok(Step::State(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if buf.len() > MAX_LINE {
                    return Err(invalid("trailer section too long"));
                }
                return Ok(Step::More);
            };
            let section = buf.split_to(end + 4);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let parsed = httparse::parse_headers(&section, &mut headers)
                .map_err(|e| invalid(format!("bad trailers: {e}")))?;
            let httparse::Status::Complete((_, fields)) = parsed else {
                return Err(invalid("bad trailers"));
            };
            let mut map = HeaderMap::new();
            for f in fields {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(f.name.as_bytes()),
                    HeaderValue::from_bytes(f.value),
                ) {
                    map.append(k, v);
                }
            }
            Ok(Step::End(Some(map)))
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.state == In::Done
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_across_any_split_with_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\n";
        for split in 1..wire.len() {
            let mut buf = BytesMut::new();
            let mut state = Chunk::Size;
            let mut out = Vec::new();
            let mut fed = 0;
            let trailers = 'outer: loop {
                loop {
                    match decode_chunk(&mut buf, state).unwrap() {
                        Step::More => break,
                        Step::State(s) => state = s,
                        Step::Data(d, s) => {
                            out.extend_from_slice(&d);
                            state = s;
                        }
                        Step::End(t) => break 'outer t,
                    }
                }
                let next = (fed + split).min(wire.len());
                assert!(fed < wire.len(), "ran out of input at split {split}");
                buf.extend_from_slice(&wire[fed..next]);
                fed = next;
            };
            assert_eq!(out, b"hello world", "split {split}");
            let t = trailers.unwrap();
            assert_eq!(t["grpc-status"], "0");
            assert!(buf.is_empty());
        }
        let mut bad = BytesMut::from(&b"zz\r\n"[..]);
        assert!(decode_chunk(&mut bad, Chunk::Size).is_err());
        let mut huge = BytesMut::from(&b"fffffffffffffffff\r\n"[..]);
        assert!(decode_chunk(&mut huge, Chunk::Size).is_err());
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        let ok = StatusCode::OK;
        assert_eq!(
            framing(&Method::HEAD, ok, &h(&[("content-length", "5")])).unwrap(),
            In::Empty
        );
        assert_eq!(
            framing(&Method::GET, StatusCode::NO_CONTENT, &h(&[])).unwrap(),
            In::Empty
        );
        assert_eq!(
            framing(
                &Method::GET,
                ok,
                &h(&[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ])
            )
            .unwrap(),
            In::Chunked(Chunk::Size)
        );
        assert_eq!(
            framing(&Method::GET, ok, &h(&[("transfer-encoding", "gzip")])).unwrap(),
            In::Close
        );
        assert_eq!(
            framing(&Method::GET, ok, &h(&[("content-length", "7")])).unwrap(),
            In::Length(7)
        );
        assert!(
            framing(
                &Method::GET,
                ok,
                &h(&[("content-length", "7"), ("content-length", "8")])
            )
            .is_err()
        );
        assert!(framing(&Method::GET, ok, &h(&[("content-length", "+7")])).is_err());
        assert_eq!(framing(&Method::GET, ok, &h(&[])).unwrap(), In::Close);
        assert!(!keep_alive(
            Version::HTTP_11,
            &h(&[("connection", "Close")])
        ));
        assert!(!keep_alive(Version::HTTP_10, &h(&[])));
        assert!(keep_alive(
            Version::HTTP_10,
            &h(&[("connection", "keep-alive")])
        ));
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let conn = H1Conn::new(client.unwrap(), None);
        let (server, _) = accepted.unwrap();
        conn.settle();
        assert!(conn.is_reusable(), "nothing happened while idle");
        assert!(conn.is_reusable(), "checking twice changes nothing");
        drop(server);
        // The FIN arrives asynchronously: wait for the socket to turn readable.
        tokio::time::timeout(std::time::Duration::from_secs(5), conn.io.readable())
            .await
            .unwrap()
            .unwrap();
        assert!(!conn.is_reusable(), "the server closed it");
    }

    #[test]
    fn response_heads_parse_and_keep_the_rest() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi"[..]);
        let (s, v, h) = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!((s, v), (StatusCode::OK, Version::HTTP_11));
        assert_eq!(h["x-a"], "b");
        assert_eq!(&buf[..], b"hi");
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-"[..]);
        assert!(parse_head(&mut partial).unwrap().is_none());
    }
}
