//! Opaque TCP through the proxy: connections that are not HTTP (detected, or configured
//! `proxy-agent.io/protocol: opaque`) go to a backend picked with the cluster's balancing and
//! outlier state, and bytes are spliced both ways with half-closes kept. A backend that refuses
//! the connect counts as a local failure for outlier detection and the next one is tried; the
//! client's bytes were not sent anywhere yet, so that is always safe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use super::cluster::{Outcome, hash_key};
use super::config::Route;
use super::handler::pick_destination;
use super::io::splice;
use super::limits::OPAQUE_CONNECT_ATTEMPTS;
use super::telemetry::Telemetry;
use crate::istio::LoadBalancer;

/// Carries `client` to a backend of `route` until both sides closed or `idle` passed.
pub async fn forward<C>(
    mut client: C,
    peer: SocketAddr,
    route: &Route,
    idle: std::time::Duration,
    telemetry: &Telemetry,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let source = telemetry.peer(peer.ip());
    let Some((_, cluster)) = pick_destination(route.tcp_destinations(peer.ip())) else {
        debug!(%peer, "opaque connection without a destination; closing");
        return;
    };
    let key = matches!(cluster.policy().lb, LoadBalancer::HashSourceIp)
        .then(|| hash_key(peer.ip().to_string().as_bytes()));
    let opts = cluster.conn_opts();
    let mut tried = Vec::new();
    for _ in 0..OPAQUE_CONNECT_ATTEMPTS {
        let Some(backend) = cluster.pick(key, &tried) else {
            break;
        };
        tried.push(backend.addr);
        let connected =
            tokio::time::timeout(opts.connect_timeout, TcpStream::connect(backend.addr)).await;
        let mut upstream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(%peer, backend = %backend.addr, error = %e, "opaque connect failed");
                cluster.record(&backend, Outcome::LocalFailure);
                continue;
            }
            Err(_) => {
                debug!(%peer, backend = %backend.addr, "opaque connect timed out");
                cluster.record(&backend, Outcome::LocalFailure);
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        backend.active.fetch_add(1, Relaxed);
        let held = Arc::clone(&backend);
        let series = telemetry.tcp_opened(source, route.metrics_id, Some(backend.addr));
        let r = splice(&mut client, &mut upstream, idle).await;
        held.active.fetch_sub(1, Relaxed);
        match r {
            Ok(s) => {
                telemetry.tcp_closed(series, s.b_to_a, s.a_to_b);
                debug!(%peer, backend = %backend.addr, sent = s.a_to_b, received = s.b_to_a, idle_timeout = s.idle_timeout, "opaque connection closed")
            }
            Err(e) => {
                telemetry.tcp_closed(series, 0, 0);
                debug!(%peer, backend = %backend.addr, error = %e, "opaque connection failed")
            }
        }
        return;
    }
    let series = telemetry.tcp_opened(source, route.metrics_id, None);
    telemetry.tcp_closed(series, 0, 0);
    debug!(%peer, cluster = %cluster.name, tried = tried.len(), "no backend accepted the opaque connection; closing");
}
