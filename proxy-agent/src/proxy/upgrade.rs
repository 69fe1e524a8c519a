//! Connection upgrades through the proxy: HTTP/1.1 `Upgrade` (WebSocket, anything but h2c),
//! `CONNECT` (HTTP/1.1 and HTTP/2), and HTTP/2 extended CONNECT (RFC 8441), which is translated
//! into an HTTP/1.1 upgrade to the backend. The request goes to one backend over a dedicated
//! connection; once the backend agrees (101, or 2xx to CONNECT) both connections are spliced
//! until either side closes or the stream idle timeout passes. Only a connect failure is tried
//! again on another backend; an upgrade the backend saw is never retried.
//!
//! `Upgrade: h2c` is refused politely, as RFC 9113 allows: the header is dropped and the request
//! is served over HTTP/1.1.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;

use super::body::{ProxyBody, empty};
use super::config::Rule;
use super::handler::{Downstream, Head, hash_of, local_reply, pick_destination, strip_hop_by_hop};
use super::io::{ConnKind, splice};
use super::limits::OPAQUE_CONNECT_ATTEMPTS;

/// Whether the request asks to turn the connection into a tunnel.
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == Method::CONNECT {
        return true;
    }
    if req.version() != Version::HTTP_11 {
        return false;
    }
    let listed = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocols = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // h2c is the one upgrade we decline: the request continues as HTTP/1.1.
    listed
        && protocols
            .split(',')
            .any(|p| !p.trim().is_empty() && !p.trim().eq_ignore_ascii_case("h2c"))
}

/// A random `Sec-WebSocket-Key` (16 random bytes, base64).
fn websocket_key() -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: [u8; 16] = rand::random();
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Handles an upgrade or CONNECT request by `rule` (`block`: its match block that matched;
/// `picked`: set to the destination chosen).
pub async fn handle(
    mut req: Request<Incoming>,
    ds: &Downstream,
    rule: &Rule,
    block: Option<usize>,
    picked: &mut Option<usize>,
    noted: &mut super::record::Noted,
) -> Response<ProxyBody> {
    use super::telemetry::flags;
    let h2_down = req.version() == Version::HTTP_2;
    let protocol = req
        .extensions()
        .get::<hyper::ext::Protocol>()
        .map(|p| p.as_str().to_string());
    let on_client = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    let connect = parts.method == Method::CONNECT;
    let path = parts
        .uri
        .path_and_query()
        .map_or(Uri::from_static("/"), |p| Uri::from(p.clone()));
    let mut head = Head::new(parts.uri, parts.method, parts.headers, ds);
    let translated = match (connect, &protocol) {
        // RFC 8441: `:protocol websocket` over HTTP/2 becomes an HTTP/1.1 upgrade.
        (true, Some(p)) => {
            head.method = Method::GET;
            head.target = path;
            let Ok(v) = HeaderValue::from_str(p) else {
                return local_reply(StatusCode::BAD_REQUEST, "bad-protocol", 0);
            };
            head.headers.insert(header::UPGRADE, v);
            head.headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if p.eq_ignore_ascii_case("websocket")
                && !head.headers.contains_key(header::SEC_WEBSOCKET_KEY)
                && let Ok(k) = HeaderValue::from_str(&websocket_key())
            {
                head.headers.insert(header::SEC_WEBSOCKET_KEY, k);
            }
            true
        }
        (true, None) => false,
        (false, _) => {
            if let Some(u) = upgrade {
                head.headers.insert(header::UPGRADE, u);
            }
            head.headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            false
        }
    };
    if !connect || translated {
        super::handler::prepare(&mut head, rule, block);
    }
    let Some((index, cluster)) = pick_destination(&rule.destinations) else {
        noted.flags |= flags::NR;
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no-route", 0);
    };
    *picked = Some(index);
    super::handler::request_edits(&mut head, rule, index);
    noted.cluster = Some(cluster.clone());
    let key = hash_of(&cluster.policy().lb, &head.headers, ds.client);
    let opts = cluster.conn_opts();
    let mut body = Some(if body.is_end_stream() {
        empty()
    } else {
        body.map_err(Into::into).boxed()
    });
    let mut tried = Vec::new();
    let (backend, mut resp) = loop {
        let Some(backend) = cluster.pick(key, &tried) else {
            noted.flags |= flags::UH;
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-healthy-upstream",
                tried.len() as u32,
            );
        };
        tried.push(backend.addr);
        noted.attempts = tried.len() as u32;
        noted.backend = Some(backend.addr);
        let Some(b) = body.take() else {
            return local_reply(
                StatusCode::BAD_GATEWAY,
                "connect-failure",
                tried.len() as u32,
            );
        };
        let empty_body = b.is_end_stream();
        match backend
            .conns
            .send_upgrade(head.request(false, b), &opts)
            .await
        {
            Ok(resp) => break (backend, resp),
            Err(e) => {
                cluster.record(&backend, super::cluster::Outcome::LocalFailure);
                if e.never_sent() && empty_body && (tried.len() as u32) < OPAQUE_CONNECT_ATTEMPTS {
                    body = Some(empty());
                    continue;
                }
                tracing::debug!(cluster = %cluster.name, backend = %backend.addr, error = %e, "upgrade failed");
                noted.flags |= flags::UF;
                return local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.reason(),
                    tried.len() as u32,
                );
            }
        }
    };
    let agreed = if connect && !translated {
        resp.status().is_success()
    } else {
        resp.status() == StatusCode::SWITCHING_PROTOCOLS
    };
    let status = resp.status();
    cluster.record(
        &backend,
        if status.is_server_error() {
            super::cluster::Outcome::Status(status.as_u16())
        } else {
            super::cluster::Outcome::Success
        },
    );
    if !agreed {
        // The backend answered instead of upgrading: an ordinary response.
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        return Response::from_parts(parts, body.map_err(Into::into).boxed());
    }
    let on_server = hyper::upgrade::on(&mut resp);
    ds.conn.set_kind(ConnKind::Stream);
    let idle = ds.cfg.stream_idle_timeout;
    let client = ds.client;
    backend.active.fetch_add(1, Relaxed);
    let held = Arc::clone(&backend);
    tokio::spawn(async move {
        match (on_client.await, on_server.await) {
            (Ok(c), Ok(s)) => {
                let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                match splice(&mut c, &mut s, idle).await {
                    Ok(done) => {
                        tracing::debug!(%client, backend = %held.addr, sent = done.a_to_b, received = done.b_to_a, idle_timeout = done.idle_timeout, "tunnel closed")
                    }
                    Err(e) => {
                        tracing::debug!(%client, backend = %held.addr, error = %e, "tunnel failed")
                    }
                }
            }
            (c, s) => {
                tracing::debug!(%client, client_ok = c.is_ok(), backend_ok = s.is_ok(), "upgrade did not complete")
            }
        }
        held.active.fetch_sub(1, Relaxed);
    });
    let (mut parts, _) = resp.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if h2_down {
        // HTTP/2 has no 101: the stream itself is the tunnel.
        parts.status = StatusCode::OK;
        parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    } else if !connect && let Some(u) = upgrade {
        parts.headers.insert(header::UPGRADE, u);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    Response::from_parts(parts, empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().method(method).uri("/ws");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn websocket_and_connect_upgrade_h2c_does_not() {
        assert!(wants_upgrade(&req(
            Method::GET,
            &[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "websocket")
            ]
        )));
        assert!(!wants_upgrade(&req(
            Method::GET,
            &[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c")
            ]
        )));
        assert!(!wants_upgrade(&req(
            Method::GET,
            &[("upgrade", "websocket")]
        )));
        assert!(wants_upgrade(&req(Method::CONNECT, &[])));
    }

    #[test]
    fn websocket_keys_are_24_base64_chars() {
        let k = websocket_key();
        assert_eq!(k.len(), 24);
        assert!(k.ends_with("=="));
        assert_ne!(k, websocket_key());
    }
}
