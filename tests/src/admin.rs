//! The harness's client of an agent's admin API: HTTP on the node's loopback, from a thread
//! that entered the node's network namespace (the machine's own namespace never dials it), and
//! waits on `/ready` and `/status` instead of log lines.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// The agent's default admin address (`--admin-addr`).
pub const ADMIN: &str = "127.0.0.1:15000";
/// The agent's default metrics address, as reached on the node's loopback.
pub const METRICS: &str = "127.0.0.1:15020";

/// A connection made inside `netns`: the socket belongs to that namespace for its life.
pub fn connect_in(netns: &Path, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let netns: PathBuf = netns.to_path_buf();
    std::thread::spawn(move || {
        let f = File::open(&netns)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })
    .join()
    .map_err(|_| std::io::Error::other("the connecting thread panicked"))?
}

/// `method path` against `addr` in `netns`: (status, body). Errors are connection failures.
pub fn request(
    netns: &Path,
    addr: &str,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let mut s = connect_in(netns, addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP head in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GETs a JSON document from the admin API, panicking with the answer if it is not 200 JSON.
pub fn get_json(netns: &Path, path: &str) -> Value {
    let (status, body) = request(netns, ADMIN, "GET", path)
        .unwrap_or_else(|e| panic!("GET {path} from the admin API: {e}"));
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// The agent's `/status`, or `None` while it does not answer.
pub fn status(netns: &Path) -> Option<Value> {
    let (code, body) = request(netns, ADMIN, "GET", "/status").ok()?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Whether `/ready` answers 200.
pub fn ready(netns: &Path) -> bool {
    request(netns, ADMIN, "GET", "/ready").is_ok_and(|(c, _)| c == 200)
}

/// The sum of every sample of `/metrics` whose series starts with `series` (a metric name,
/// optionally with its first labels: `proxy_agent_proxy_connections_total{event="accepted"`).
pub fn metric(netns: &Path, series: &str) -> f64 {
    let (code, body) =
        request(netns, METRICS, "GET", "/metrics").unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    assert_eq!(code, 200, "GET /metrics: {body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', ',', '{', '}']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
