//! The proxy's listener: accepts redirected connections, finds each one's original ClusterIP
//! destination, and serves HTTP/1.1 and HTTP/2 (prior knowledge) on it.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::config::RouteTable;
use super::handler;

/// Where redirected connections were headed (the datapath's original-destination map).
pub trait OrigDst: Send + Sync + 'static {
    /// Returns and forgets the original destination of the connection from `client`.
    fn take(&self, client: SocketAddrV4) -> Option<SocketAddrV4>;
}

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}

/// Accepts connections until the listener fails.
pub async fn serve(listener: TcpListener, orig: Arc<dyn OrigDst>, table: Arc<ArcSwap<RouteTable>>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let Some(dst) = v4(peer).and_then(|p| orig.take(p)) else {
            // Not redirected by our datapath: the proxy is no open relay.
            debug!(%peer, "refusing a connection that was not redirected to the proxy");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let table = table.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let route = table.load().routes.get(&dst).cloned();
                async move {
                    Ok::<_, std::convert::Infallible>(match route {
                        Some(route) => handler::handle(req, peer, dst, route).await,
                        None => {
                            let mut r = hyper::Response::new(super::body::text(format!(
                                "no HTTP route for {dst}\n"
                            )));
                            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            r.headers_mut().insert(
                                handler::ERROR_HEADER,
                                hyper::header::HeaderValue::from_static("no-route"),
                            );
                            r
                        }
                    })
                }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "downstream connection ended with an error");
            }
        });
    }
}
