//! Protocol detection on redirected connections (Linkerd's model): the client's first bytes
//! decide. An HTTP/2 preface or an HTTP/1 request line start (a method token and a space) is
//! HTTP; anything else, an EOF, or nothing within the detection timeout is opaque TCP, so
//! server-first protocols (the server speaks first) and non-HTTP clients on `http`-named ports
//! keep working. The bytes read are replayed to whichever handler takes the connection.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token accepted.
const MAX_METHOD: usize = 24;

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// Anything else.
    Opaque(Why),
}

/// Why a connection is opaque.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// The Service says so (`proxy-agent.io/protocol: opaque`).
    Configured,
    /// The first bytes are not HTTP.
    NotHttp,
    /// The client sent nothing (or too little to tell) within the timeout: server-first.
    Timeout,
    /// The client closed its side first.
    Eof,
}

impl Why {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Configured => "configured",
            Why::NotHttp => "not-http",
            Why::Timeout => "detect-timeout",
            Why::Eof => "client-eof",
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How far `line` (without its end) matches `method SP target SP HTTP/1.x`: `Some(true)` a
/// whole request line, `Some(false)` a consistent prefix, `None` not HTTP/1.
fn request_line(line: &[u8]) -> Option<bool> {
    let method = line.iter().take_while(|&&c| is_tchar(c)).count();
    if method == line.len() {
        return (method <= MAX_METHOD).then_some(false);
    }
    if method == 0 || method > MAX_METHOD || line[method] != b' ' {
        return None;
    }
    let rest = &line[method + 1..];
    let target = rest.iter().take_while(|&&c| c > b' ' && c != 0x7f).count();
    if target == rest.len() {
        return Some(false);
    }
    if target == 0 || rest[target] != b' ' {
        return None;
    }
    let version = &rest[target + 1..];
    const V: &[u8] = b"HTTP/1.";
    let n = version.len().min(V.len());
    if version[..n] != V[..n] {
        return None;
    }
    match version.len() {
        l if l < V.len() + 1 => Some(false),
        l if l == V.len() + 1 && version[V.len()].is_ascii_digit() => Some(true),
        _ => None,
    }
}

/// Classifies the bytes read so far; `None`: need more (a consistent prefix of HTTP).
pub fn classify(b: &[u8]) -> Option<Protocol> {
    if b.is_empty() {
        return None;
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return (b.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // RFC 9112 2.2: empty lines before a request line are ignored.
    let b = &b[b.iter().take_while(|&&c| c == b'\r' || c == b'\n').count()..];
    if b.is_empty() {
        return None;
    }
    let (line, ended) = match b.iter().position(|&c| c == b'\n') {
        Some(i) => (b[..i].strip_suffix(b"\r").unwrap_or(&b[..i]), true),
        None => (b.strip_suffix(b"\r").unwrap_or(b), false),
    };
    match request_line(line) {
        None => Some(Protocol::Opaque(Why::NotHttp)),
        Some(true) if ended => Some(Protocol::Http1),
        Some(_) if ended => Some(Protocol::Opaque(Why::NotHttp)),
        // A request line longer than this is HTTP's problem (hyper answers 414/431).
        Some(_) if b.len() >= MAX_LINE => Some(Protocol::Http1),
        Some(_) => None,
    }
}

/// A request line this long without its end is handed to HTTP as it is.
const MAX_LINE: usize = 8192;

/// Reads from `stream` until its protocol is known or `timeout` passes; returns it with the
/// bytes read (to be replayed, in a buffer of their size). No buffer exists until the client
/// sends something.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<(Protocol, Bytes)> {
    let (p, buf) = read_until_known(stream, timeout).await?;
    // The read buffer has room for more; the connection keeps only what it replays.
    Ok((p, Bytes::copy_from_slice(&buf)))
}

async fn read_until_known(
    stream: &TcpStream,
    timeout: Duration,
) -> std::io::Result<(Protocol, BytesMut)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_) => {
                // A request line still arriving is HTTP (a slow client meets the header-read
                // timeout); silence is a server-first protocol.
                let p = if buf.is_empty() {
                    Protocol::Opaque(Why::Timeout)
                } else {
                    Protocol::Http1
                };
                return Ok((p, buf));
            }
            Ok(r) => r?,
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Ok((Protocol::Opaque(Why::Eof), buf)),
            Ok(_) => {
                if let Some(p) = classify(&buf) {
                    return Ok((p, buf));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http_h2_and_everything_else() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.0\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"M-SEARCH * HTTP/1.1\r\nHost"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"\r\n\r\nGET / HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"GET /x HTT"), None);
        // A Redis inline command and other lines that are not request lines.
        assert_eq!(
            classify(b"SET key value\r\n"),
            Some(Protocol::Opaque(Why::NotHttp))
        );
        assert_eq!(
            classify(b"GET / HTTP/2.0\r\n"),
            Some(Protocol::Opaque(Why::NotHttp))
        );
        assert_eq!(classify(b"GET / FTP"), Some(Protocol::Opaque(Why::NotHttp)));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        // TLS ClientHello, a Redis inline command with CRLF first, binary, a leading space.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02]),
            Some(Protocol::Opaque(Why::NotHttp))
        );
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Opaque(Why::NotHttp)));
        assert_eq!(classify(b" GET"), Some(Protocol::Opaque(Why::NotHttp)));
        assert_eq!(classify(&[b'a'; 30]), Some(Protocol::Opaque(Why::NotHttp)));
        assert_eq!(classify(&[b'a'; 20]), None);
        let mut long = b"GET /".to_vec();
        long.resize(MAX_LINE, b'a');
        assert_eq!(classify(&long), Some(Protocol::Http1));
    }
}
