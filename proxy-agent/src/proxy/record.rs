//! Recording finished requests: the handler notes what happened (destination, backend,
//! attempts, response flags) and the response body it returns carries a [`Recorded`] wrapper
//! that counts the bytes sent, reads `grpc-status` from trailers and, when the body ends (or the
//! client goes away: `DC`), hands one record to the proxy's [`Telemetry`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::body::{BoxError, ProxyBody, Replay};
use super::cluster::Cluster;
use super::config::Route;
use super::handler::Downstream;
use super::telemetry::{Finished, RequestProtocol, flags};

/// What the handler learned about one request, filled in as it goes.
#[derive(Default)]
pub struct Noted {
    /// The destination chosen.
    pub cluster: Option<Arc<Cluster>>,
    /// The backend of the last attempt.
    pub backend: Option<SocketAddr>,
    /// Attempts made.
    pub attempts: u32,
    /// Envoy response flags.
    pub flags: u16,
    /// The request body, to count what the client sent.
    pub body: Option<Replay>,
}

/// The request line, kept only when someone reads it (access log, monitor).
struct Line {
    method: Method,
    authority: String,
    path: String,
}

/// Everything needed to record a request once its response is over.
pub struct Pending {
    started: Instant,
    ds: Arc<Downstream>,
    route: Arc<Route>,
    noted: Noted,
    status: u16,
    grpc_status: Option<u16>,
    protocol: RequestProtocol,
    line: Option<Line>,
    sent: u64,
    ended: bool,
}

fn grpc_status(h: &HeaderMap) -> Option<u16> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

impl Pending {
    /// Starts recording a request received at `started`.
    pub fn new(
        started: Instant,
        ds: Arc<Downstream>,
        route: Arc<Route>,
        req: &http::request::Parts,
    ) -> Self {
        let grpc = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let line = ds.telemetry.wants_details().then(|| Line {
            method: req.method.clone(),
            authority: req
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
                .or_else(|| req.uri.authority().map(|a| a.to_string()))
                .unwrap_or_default(),
            path: req.uri.path().to_string(),
        });
        Self {
            started,
            ds,
            route,
            noted: Noted::default(),
            status: 0,
            grpc_status: None,
            protocol: if grpc {
                RequestProtocol::Grpc
            } else {
                RequestProtocol::Http
            },
            line,
            sent: 0,
            ended: false,
        }
    }

    /// Where the handler notes what happened.
    pub fn noted(&mut self) -> &mut Noted {
        &mut self.noted
    }

    /// Wraps the response so the request is recorded when its body ends.
    pub fn wrap(mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        self.status = resp.status().as_u16();
        self.grpc_status = grpc_status(resp.headers());
        let (parts, body) = resp.into_parts();
        let ended = body.is_end_stream();
        let mut rec = Recorded {
            inner: body,
            pending: Some(self),
        };
        if ended {
            // Nothing to stream (HEAD, 204, local replies without a body).
            if let Some(p) = rec.pending.as_mut() {
                p.ended = true;
            }
        }
        Response::from_parts(parts, http_body_util::BodyExt::boxed(rec))
    }

    fn finish(self) {
        let mut f = self.noted.flags;
        if !self.ended {
            f |= flags::DC;
        }
        let received = self.noted.body.as_ref().map_or(0, Replay::received);
        let (method, authority, path) = match &self.line {
            Some(l) => (&l.method, l.authority.as_str(), l.path.as_str()),
            None => (&Method::GET, "", ""),
        };
        let subset = self.noted.cluster.as_ref().and_then(|c| c.subset());
        self.ds.telemetry.request(Finished {
            client: self.ds.client,
            source: self.ds.source,
            service: (&self.route.service, self.route.metrics_id),
            vip: self.ds.orig,
            route: self.route.virtual_service.as_ref(),
            subset,
            backend: self.noted.backend,
            attempts: self.noted.attempts,
            status: self.status,
            flags: f,
            grpc_status: self.grpc_status,
            protocol: self.protocol,
            request: (method, authority, path),
            detailed: self.line.is_some(),
            bytes: (received, self.sent),
            duration: self.started.elapsed(),
        });
    }
}

/// A response body that records its request when it ends or is dropped.
pub struct Recorded {
    inner: ProxyBody,
    pending: Option<Pending>,
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(p) = self.pending.as_mut() {
            match &r {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        p.sent += d.len() as u64;
                    } else if let Some(t) = frame.trailers_ref()
                        && let Some(s) = grpc_status(t)
                    {
                        p.grpc_status = Some(s);
                    }
                }
                Poll::Ready(None) => p.ended = true,
                Poll::Ready(Some(Err(_))) => p.noted.flags |= flags::UC,
                Poll::Pending => {}
            }
        }
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            if let Some(p) = self.pending.as_mut() {
                p.ended = true;
            }
            if let Some(p) = self.pending.take() {
                p.finish();
            }
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

impl Drop for Recorded {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish();
        }
    }
}

/// What recording costs, for `cargo xtask bench l7`: `n` requests of a 1 KiB response through
/// the whole recording path (note, wrap, stream the body, record the series), with or without
/// request metrics, with or without an access log (to /dev/null). Returns the mean time per
/// request, and the same loop without recording (the baseline to subtract).
pub fn bench(n: u32, metrics: bool, access_log: bool) -> anyhow::Result<(Duration, Duration)> {
    use http_body_util::BodyExt as _;
    use std::time::Duration as D;

    let log = if access_log {
        super::telemetry::AccessLog::start(
            &super::telemetry::AccessLogTarget::File("/dev/null".into()),
            1,
        )?
    } else {
        None
    };
    let telemetry = super::telemetry::Telemetry::new(1, log, metrics);
    let mut st = crate::model::State::default();
    for (i, name) in ["client", "web-7d9f8b6c4-a", "web-7d9f8b6c4-b"]
        .iter()
        .enumerate()
    {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("app".to_string(), "web".to_string());
        labels.insert("pod-template-hash".to_string(), "7d9f8b6c4".to_string());
        st.pods.insert(
            crate::model::ObjectRef::new("default", *name),
            crate::model::PodInfo {
                ip: std::net::Ipv4Addr::new(198, 18, 0, 10 + i as u8).into(),
                labels,
            },
        );
    }
    telemetry.set_peers(super::telemetry::Peers::of(&st));
    let client = SocketAddr::from(([198, 18, 0, 10], 40000));
    let ds = Arc::new(Downstream {
        client,
        client_ip: http::HeaderValue::from_static("198.18.0.10"),
        orig: std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 10), 80),
        conn: super::io::ConnState::new(None),
        cfg: Arc::new(super::ProxyConfig::default()),
        source: telemetry.peer(client.ip()),
        telemetry: telemetry.clone(),
    });
    let svc = crate::model::ObjectRef::new("default", "web");
    let route = Arc::new(Route {
        metrics_id: super::telemetry::service_id(&svc),
        service: svc,
        virtual_service: None,
        rules: Vec::new(),
        tcp: Vec::new(),
        detection: Default::default(),
    });
    let (parts, ()) = http::Request::get("http://web/a")
        .body(())
        .expect("request")
        .into_parts();
    let body = Bytes::from(vec![b'x'; 1024]);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let backends = [
        SocketAddr::from(([198, 18, 0, 11], 8080)),
        SocketAddr::from(([198, 18, 0, 12], 8080)),
    ];
    let run = |record: bool| -> D {
        rt.block_on(async {
            let t0 = std::time::Instant::now();
            for i in 0..n {
                let resp = Response::new(super::body::full(body.clone()));
                let resp = if record {
                    let mut p = Pending::new(Instant::now(), ds.clone(), route.clone(), &parts);
                    p.noted().backend = Some(backends[i as usize % 2]);
                    p.noted().attempts = 1;
                    p.wrap(resp)
                } else {
                    resp
                };
                let _ = resp.into_body().collect().await;
            }
            t0.elapsed() / n
        })
    };
    let _ = run(true); // warm up: series and interned ids exist
    Ok((run(true), run(false)))
}
