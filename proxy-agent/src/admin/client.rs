//! The CLI's side of the admin API: plain HTTP/1.1 GETs and POSTs to `--admin-addr`, with
//! errors that say which address was tried and how to reach a node's agent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Default admin address of the agent (`--admin-addr`).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";

/// A client of one agent's admin API.
#[derive(Clone, Debug)]
pub struct Client {
    addr: SocketAddr,
}

fn hint(addr: SocketAddr) -> String {
    format!(
        "is `proxy-agent run` running on this node with --admin-addr {addr}? In a cluster, run the CLI inside the node's agent pod: `kubectl exec -n proxy-agent <agent-pod-on-that-node> -- proxy-agent status` (or pass --admin-addr)"
    )
}

/// A response: status and body.
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
}

impl Client {
    /// A client of the admin API at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    fn connect(&self) -> anyhow::Result<TcpStream> {
        let s =
            TcpStream::connect_timeout(&self.addr, Duration::from_secs(3)).with_context(|| {
                format!(
                    "cannot reach the admin API at {}: {}",
                    self.addr,
                    hint(self.addr)
                )
            })?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    }

    fn send(&self, method: &str, path: &str) -> anyhow::Result<BufReader<TcpStream>> {
        let mut s = self.connect()?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            self.addr
        )
        .with_context(|| format!("sending {method} {path} to {}", self.addr))?;
        Ok(BufReader::new(s))
    }

    /// Sends a request and reads the whole response.
    pub fn request(&self, method: &str, path: &str) -> anyhow::Result<Reply> {
        let mut r = self.send(method, path)?;
        let (status, chunked) = read_head(&mut r, self.addr)?;
        let mut body = String::new();
        if chunked {
            while let Some(chunk) = read_chunk(&mut r)? {
                body.push_str(&String::from_utf8_lossy(&chunk));
            }
        } else {
            r.read_to_string(&mut body)
                .with_context(|| format!("reading the answer of {} to {path}", self.addr))?;
        }
        Ok(Reply { status, body })
    }

    /// GETs a JSON document; a non-2xx answer is an error carrying the agent's message.
    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        self.json("GET", path)
    }

    /// Sends `method` and parses the JSON answer; a non-2xx answer is an error.
    pub fn json(&self, method: &str, path: &str) -> anyhow::Result<Value> {
        let reply = self.request(method, path)?;
        let v: Value = serde_json::from_str(&reply.body).with_context(|| {
            format!(
                "the admin API at {} answered {path} with no JSON: {}",
                self.addr,
                reply.body.trim()
            )
        })?;
        if !(200..300).contains(&reply.status) {
            bail!(
                "{}",
                v["error"].as_str().map_or_else(
                    || format!("{} answered {}", self.addr, reply.status),
                    String::from
                )
            );
        }
        Ok(v)
    }

    /// GETs a stream of JSON lines, calling `line` for each until it returns false or the
    /// agent closes the stream.
    pub fn stream_lines(
        &self,
        path: &str,
        mut line: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<()> {
        let mut r = self.send("GET", path)?;
        r.get_ref().set_read_timeout(None)?;
        let (status, chunked) = read_head(&mut r, self.addr)?;
        if status != 200 {
            let mut body = String::new();
            let _ = r.read_to_string(&mut body);
            bail!("{} answered {status} to {path}: {}", self.addr, body.trim());
        }
        if !chunked {
            bail!("{} did not stream {path}", self.addr);
        }
        let mut pending = String::new();
        while let Some(chunk) = read_chunk(&mut r)? {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = pending.find('\n') {
                let l: String = pending.drain(..=i).collect();
                let l = l.trim();
                if !l.is_empty() && !line(l) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

fn read_head(r: &mut BufReader<TcpStream>, addr: SocketAddr) -> anyhow::Result<(u16, bool)> {
    let mut status_line = String::new();
    r.read_line(&mut status_line)
        .with_context(|| format!("reading the answer of the admin API at {addr}"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "{addr} is not an admin API (answered {status_line:?}): {}",
                hint(addr)
            )
        })?;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("transfer-encoding")
            && v.trim().eq_ignore_ascii_case("chunked")
        {
            chunked = true;
        }
    }
    Ok((status, chunked))
}

fn read_chunk(r: &mut BufReader<TcpStream>) -> anyhow::Result<Option<Vec<u8>>> {
    let mut size = String::new();
    if r.read_line(&mut size)? == 0 {
        return Ok(None);
    }
    let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
        .context("bad chunk size from the admin API")?;
    if n == 0 {
        return Ok(None);
    }
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf)?;
    buf.truncate(n);
    Ok(Some(buf))
}
