//! kube-proxy's Service health checks: a LoadBalancer Service with
//! `externalTrafficPolicy: Local` has a `healthCheckNodePort` that the cloud load balancer
//! probes on every node, to send traffic only to nodes with endpoints of their own.
//!
//! Each such port gets a listener on all addresses; any path answers kube-proxy's JSON
//! (`service`, `localEndpoints`, `serviceProxyHealthy`) with 200 while the node has a ready
//! endpoint of the Service and the proxy is healthy, else 503. Listeners follow the published
//! generations: a new port is bound, a port no Service has any more is closed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use http::{Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::Hub;
use super::server::{Body, full};
use crate::model::{EndpointState, ObjectRef, State};

/// The health-check ports of `state` with the Service each belongs to.
pub fn ports(state: &State) -> BTreeMap<u16, ObjectRef> {
    state
        .services
        .values()
        .filter(|s| s.north_south.local)
        .filter_map(|s| Some((s.north_south.health_check_node_port?, s.id.clone())))
        .collect()
}

/// Ready endpoints of `svc` on `node` (every node when unknown), counted by address.
pub fn local_endpoints(state: &State, svc: &ObjectRef, node: Option<&str>) -> usize {
    let mut addrs: Vec<_> = state
        .slices
        .values()
        .filter(|sl| sl.service == *svc)
        .flat_map(|sl| sl.endpoints.iter())
        .filter(|e| e.state == EndpointState::Ready)
        .filter(|e| node.is_none() || e.node_name.as_deref() == node)
        .map(|e| e.addr)
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs.len()
}

/// kube-proxy's answer for `svc`.
fn answer(hub: &Hub, svc: &ObjectRef) -> Response<Body> {
    let snap = hub.snapshot();
    let count = local_endpoints(&snap.state, svc, hub.info.node_name.as_deref());
    let healthy = super::server::proxy_healthy(hub);
    let body = serde_json::json!({
        "service": {"namespace": svc.namespace, "name": svc.name},
        "localEndpoints": count,
        "serviceProxyHealthy": healthy,
    });
    let status = if count > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut r = full(status, "application/json", format!("{body}\n"));
    if let Ok(v) = header::HeaderValue::from_str(&count.to_string()) {
        r.headers_mut()
            .insert("x-load-balancing-endpoint-weight", v);
    }
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

/// Serves one health-check port until aborted.
async fn serve_port(hub: Arc<Hub>, listener: TcpListener, port: u16) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(port, error = %e, "health check accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let hub = hub.clone();
                async move {
                    // The Service is looked up per request: the port may have changed hands.
                    let snap = hub.snapshot();
                    let owner = ports(&snap.state).get(&port).cloned();
                    Ok::<_, Infallible>(match owner {
                        Some(svc) => answer(&hub, &svc),
                        None => full(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "application/json",
                            "{\"error\":\"no Service has this healthCheckNodePort\"}\n",
                        ),
                    })
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "health check connection ended");
            }
        });
    }
}

/// Keeps one listener per health-check port of the published state, on the current runtime.
pub async fn serve(hub: Arc<Hub>) {
    let mut generations = hub.subscribe();
    let mut running: BTreeMap<u16, JoinHandle<()>> = BTreeMap::new();
    loop {
        let wanted = ports(&hub.snapshot().state);
        running.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "health check port closed");
            }
            keep
        });
        for (port, svc) in &wanted {
            if running.contains_key(port) {
                continue;
            }
            let bound = crate::proxy::workers::reuseport_listener(
                std::net::SocketAddr::from(([0, 0, 0, 0], *port)),
                1024,
            )
            .and_then(|l| Ok(TcpListener::from_std(l)?));
            match bound {
                Ok(l) => {
                    info!(port, service = %svc, "serving the Service's healthCheckNodePort");
                    running.insert(*port, tokio::spawn(serve_port(hub.clone(), l, *port)));
                }
                // Tried again at the next generation.
                Err(e) => {
                    warn!(port, service = %svc, error = format!("{e:#}"), "cannot listen on the healthCheckNodePort")
                }
            }
        }
        if generations.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, EndpointSlice, NorthSouth, Service};
    use std::net::Ipv4Addr;

    #[test]
    fn local_endpoints_count_ready_addresses_on_the_node() {
        let svc = ObjectRef::new("default", "web");
        let mut st = State::default();
        st.services.insert(
            svc.clone(),
            Arc::new(Service {
                id: svc.clone(),
                cluster_ips: vec![Ipv4Addr::new(198, 19, 0, 1).into()],
                ports: vec![],
                affinity_timeout_s: None,
                mode: None,
                detection: Default::default(),
                internal_local: false,
                prefer_close: false,
                north_south: NorthSouth {
                    local: true,
                    health_check_node_port: Some(32000),
                    ..Default::default()
                },
            }),
        );
        let ep = |last: u8, node: &str, state| Endpoint {
            addr: Ipv4Addr::new(198, 18, 1, last).into(),
            state,
            node_name: Some(node.into()),
            pod: None,
            hint_zones: None,
        };
        st.slices.insert(
            ObjectRef::new("default", "web-a"),
            Arc::new(EndpointSlice {
                id: ObjectRef::new("default", "web-a"),
                service: svc.clone(),
                ports: vec![],
                endpoints: vec![
                    ep(10, "node1", EndpointState::Ready),
                    ep(11, "node1", EndpointState::ServingTerminating),
                    ep(12, "node2", EndpointState::Ready),
                ],
                trigger_time: None,
            }),
        );
        assert_eq!(ports(&st).get(&32000), Some(&svc));
        assert_eq!(local_endpoints(&st, &svc, Some("node1")), 1);
        assert_eq!(local_endpoints(&st, &svc, Some("node3")), 0);
        assert_eq!(local_endpoints(&st, &svc, None), 2);
    }
}
