//! The desired-state model: the one representation of "what the node should serve".
//!
//! Sources (the manifests directory, the API server) produce a [`State`]; the map
//! reconciler and the L7 proxy consume only this model, never source-specific types.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// Namespace and name of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// Namespace (`default` when the manifest has none).
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl ObjectRef {
    /// Builds a reference.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Transport protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::PROTO_TCP,
            Protocol::Udp => proxy_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name; matches the EndpointSlice port of the same name ("" for unnamed).
    pub name: String,
    /// The port on the ClusterIP.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
    /// `appProtocol`, if set.
    pub app_protocol: Option<String>,
    /// `nodePort` (types NodePort and LoadBalancer).
    pub node_port: Option<u16>,
}

/// Annotation forcing a Service's ports to L4 (`l4`) or L7 (`l7`).
pub const MODE_ANNOTATION: &str = "proxy-agent.io/mode";

/// A forced protocol mode from [`MODE_ANNOTATION`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Always balanced in the kernel.
    L4,
    /// HTTP through the node proxy (TCP ports only).
    L7,
}

/// Annotation choosing how the node proxy treats a redirected Service's connections:
/// `detect` (default: HTTP when the client speaks it first, else opaque TCP) or `opaque` (TCP
/// at once, for server-first protocols that must not wait for the detection timeout).
pub const PROTOCOL_ANNOTATION: &str = "proxy-agent.io/protocol";
/// Annotation overriding the proxy's protocol detection timeout for a Service (`500ms`, `2s`).
pub const DETECT_TIMEOUT_ANNOTATION: &str = "proxy-agent.io/detect-timeout";

/// How the node proxy finds out what a redirected connection speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProtocolHint {
    /// [`PROTOCOL_ANNOTATION`] `opaque`: no detection, always TCP.
    pub opaque: bool,
    /// [`DETECT_TIMEOUT_ANNOTATION`]: how long to wait for the client's first bytes.
    pub detect_timeout: Option<std::time::Duration>,
}

impl ServicePort {
    /// Whether this port carries HTTP/gRPC for the node proxy: appProtocol `http`,
    /// `kubernetes.io/h2c` or `grpc`, or a port named `http`, `http-*`, `http2`, `grpc`,
    /// `grpc-*` (Istio's convention); a [`Mode`] annotation overrides both.
    pub fn is_l7(&self, mode: Option<Mode>) -> bool {
        if self.protocol != Protocol::Tcp {
            return false;
        }
        match mode {
            Some(Mode::L4) => false,
            Some(Mode::L7) => true,
            None => {
                let app = self.app_protocol.as_deref().map(str::to_ascii_lowercase);
                matches!(
                    app.as_deref(),
                    Some("http" | "kubernetes.io/h2c" | "grpc" | "http2")
                ) || (app.is_none() && {
                    let n = self.name.to_ascii_lowercase();
                    n == "http"
                        || n == "http2"
                        || n == "grpc"
                        || n.starts_with("http-")
                        || n.starts_with("grpc-")
                })
            }
        }
    }

    /// Why [`ServicePort::is_l7`] says what it says, in the operator's terms.
    pub fn l7_reason(&self, mode: Option<Mode>) -> String {
        if self.protocol != Protocol::Tcp {
            return format!("{}: balanced in the kernel", self.protocol);
        }
        match mode {
            Some(Mode::L4) => return format!("annotation {MODE_ANNOTATION}: l4"),
            Some(Mode::L7) => return format!("annotation {MODE_ANNOTATION}: l7"),
            None => {}
        }
        match &self.app_protocol {
            Some(a) if self.is_l7(None) => format!("appProtocol {a}"),
            Some(a) => format!("appProtocol {a} is not HTTP/gRPC"),
            None if self.is_l7(None) => {
                format!("port name {:?} (Istio's http/grpc naming)", self.name)
            }
            None if self.name.is_empty() => "unnamed port, no appProtocol".into(),
            None => format!(
                "port name {:?} is not http/grpc and no appProtocol",
                self.name
            ),
        }
    }

    /// Whether upstream connections speak HTTP/2 (h2c/gRPC ports).
    pub fn is_h2(&self) -> bool {
        let app = self.app_protocol.as_deref().map(str::to_ascii_lowercase);
        matches!(app.as_deref(), Some("kubernetes.io/h2c" | "grpc" | "http2"))
            || (app.is_none() && {
                let n = self.name.to_ascii_lowercase();
                n == "http2" || n == "grpc" || n.starts_with("grpc-")
            })
    }
}

/// A pod's address and labels (for DestinationRule subsets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// `status.podIP`.
    pub ip: IpAddr,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

/// A Service as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Namespace/name.
    pub id: ObjectRef,
    /// `spec.clusterIPs` (or `spec.clusterIP`): one address per family, the primary first.
    pub cluster_ips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// sessionAffinity ClientIP timeout in seconds, if affinity is on.
    pub affinity_timeout_s: Option<u32>,
    /// [`MODE_ANNOTATION`], if set.
    pub mode: Option<Mode>,
    /// [`PROTOCOL_ANNOTATION`] and [`DETECT_TIMEOUT_ANNOTATION`].
    pub detection: ProtocolHint,
    /// `internalTrafficPolicy: Local`: only endpoints on this node are used.
    pub internal_local: bool,
    /// `trafficDistribution: PreferClose` (or `PreferSameZone`, or the `topology-mode: Auto`
    /// annotation): endpoints hinted for this node's zone are preferred.
    pub prefer_close: bool,
    /// How it is reached from outside the cluster.
    pub north_south: NorthSouth,
}

/// How a Service is reached from outside the cluster: its NodePorts (on [`ServicePort`]), its
/// LoadBalancer ingress IPs and externalIPs, and the policies that apply there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NorthSouth {
    /// `status.loadBalancer.ingress[].ip`.
    pub lb_ips: Vec<Ipv4Addr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local`: only this node's endpoints, the client's address kept.
    pub local: bool,
    /// `spec.healthCheckNodePort` (LoadBalancer with the Local policy).
    pub health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges`, for the LoadBalancer ingress IPs.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

/// Where a frontend answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The ClusterIP, inside the cluster.
    #[default]
    ClusterIp,
    /// The NodePort on every node address (the frontend's `vip` is 0.0.0.0).
    NodePort,
    /// A LoadBalancer ingress IP.
    LoadBalancer,
    /// An externalIP.
    ExternalIp,
}

impl Scope {
    /// Whether traffic from outside the node reaches it (the tc programs serve it).
    pub fn is_external(self) -> bool {
        self != Scope::ClusterIp
    }

    /// The Kubernetes word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ClusterIp => "ClusterIP",
            Scope::NodePort => "NodePort",
            Scope::LoadBalancer => "LoadBalancer",
            Scope::ExternalIp => "ExternalIP",
        }
    }
}

/// Readiness of an endpoint (EndpointSlice conditions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointState {
    /// Ready: takes new connections.
    Ready,
    /// Terminating but still serving: used only when no endpoint is ready (KEP-1669).
    ServingTerminating,
    /// Neither: never used.
    NotServing,
}

/// One endpoint address with the ports of its slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod address.
    pub addr: IpAddr,
    /// Condition.
    pub state: EndpointState,
    /// Name of the node hosting it, if known.
    pub node_name: Option<String>,
    /// The Pod behind it (`targetRef` of kind Pod), if known.
    pub pod: Option<String>,
    /// `hints.forZones[].name`: the zones whose clients should use it (topology-aware routing).
    pub hint_zones: Option<Vec<String>>,
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    /// Port name, matched against [`ServicePort::name`].
    pub name: String,
    /// Target port number on the pod.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// An EndpointSlice belonging to a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Namespace/name of the slice.
    pub id: ObjectRef,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: ObjectRef,
    /// Ports.
    pub ports: Vec<EndpointPort>,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`: when the change behind this version
    /// happened (network programming latency is measured from it).
    pub trigger_time: Option<std::time::SystemTime>,
}

/// Everything the node should serve.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// Services by namespace/name.
    pub services: BTreeMap<ObjectRef, Arc<Service>>,
    /// EndpointSlices by namespace/name.
    pub slices: BTreeMap<ObjectRef, Arc<EndpointSlice>>,
    /// Pods by namespace/name (labels for subsets).
    pub pods: BTreeMap<ObjectRef, PodInfo>,
    /// Istio VirtualServices by namespace/name.
    pub virtual_services: BTreeMap<ObjectRef, crate::istio::VirtualService>,
    /// Istio DestinationRules by namespace/name.
    pub destination_rules: BTreeMap<ObjectRef, crate::istio::DestinationRule>,
    /// Gateway API HTTPRoutes and GRPCRoutes (those with a Service parent).
    pub mesh_routes: BTreeMap<(crate::gateway::RouteKind, ObjectRef), crate::gateway::MeshRoute>,
    /// Their `status.parents[]` as the API server has them (for the status writer).
    pub mesh_status: BTreeMap<(crate::gateway::RouteKind, ObjectRef), crate::gateway::SeenStatus>,
    /// Routes whose current version failed validation (for the status writer).
    pub rejected_routes: BTreeMap<(crate::gateway::RouteKind, ObjectRef), crate::gateway::Rejected>,
    /// This node's name (for `internalTrafficPolicy: Local`).
    pub node_name: Option<String>,
}

/// A backend of one frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Pod address (of the frontend's family).
    pub addr: IpAddr,
    /// Target port.
    pub port: u16,
    /// Whether it only serves while terminating.
    pub terminating: bool,
}

/// One (ClusterIP, port, protocol) with its backends: the unit the datapath balances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// The Service it comes from.
    pub service: ObjectRef,
    /// Service port name.
    pub port_name: String,
    /// ClusterIP (IPv4 or IPv6), LoadBalancer ingress IP or externalIP; 0.0.0.0 for a NodePort.
    pub vip: IpAddr,
    /// Service port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// HTTP/gRPC: connections go to the node proxy while it runs.
    pub l7: bool,
    /// Upstream HTTP/2 (h2c, gRPC).
    pub h2: bool,
    /// How the node proxy detects the protocol of redirected connections.
    pub detection: ProtocolHint,
    /// Backends, sorted and deduplicated: ready ones, or if none is ready the serving+terminating
    /// ones are kept with `terminating = true`.
    pub backends: Vec<Backend>,
    /// Where it answers.
    pub scope: Scope,
    /// `externalTrafficPolicy: Local` (north-south scopes): `backends` are this node's only;
    /// the tc programs' entry (`SCOPE_EXTERNAL_LOCAL`).
    pub external_local: bool,
    /// The in-cluster twin of an `externalTrafficPolicy: Local` frontend: every endpoint, for
    /// pods and host processes reaching the NodePort or external address through the socket
    /// hooks (kube-proxy sends in-cluster traffic cluster-wide); the tc programs skip it.
    pub socket_only: bool,
    /// `loadBalancerSourceRanges` (LoadBalancer scope); empty: every client.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

impl Frontend {
    /// The `ServiceKey::scope` its entries are written under.
    pub fn map_scope(&self) -> u8 {
        if self.external_local {
            proxy_common::SCOPE_EXTERNAL_LOCAL
        } else {
            proxy_common::SCOPE_ALL
        }
    }
}

impl State {
    /// Flattens the state into frontends, sorted by (vip, port, protocol).
    pub fn frontends(&self) -> Vec<Frontend> {
        FrontendCache::default()
            .frontends(self, None)
            .into_iter()
            .map(|f| (*f).clone())
            .collect()
    }
}

/// Publishes `state` to the agent unless it equals the state already published.
pub fn publish(tx: &tokio::sync::watch::Sender<Option<Arc<State>>>, state: State) {
    tx.send_if_modified(|cur| {
        if cur.as_deref() == Some(&state) {
            false
        } else {
            *cur = Some(Arc::new(state));
            true
        }
    });
}

/// The frontends of one Service from its slices.
pub fn service_frontends(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: Option<&str>,
) -> Vec<Frontend> {
    service_frontends_in(svc, slices, node, None)
}

/// Whether topology-aware routing applies (kube-proxy's rule): the Service asks for it, the
/// zone is known, every ready endpoint carries zone hints and one of them is for this zone.
fn use_zone_hints(svc: &Service, slices: &[&EndpointSlice], zone: Option<&str>) -> bool {
    let Some(zone) = zone else { return false };
    if !svc.prefer_close {
        return false;
    }
    let ready = || {
        slices
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.state == EndpointState::Ready)
    };
    ready().all(|e| e.hint_zones.is_some())
        && ready().any(|e| {
            e.hint_zones
                .as_ref()
                .is_some_and(|z| z.iter().any(|z| z == zone))
        })
}

/// The frontends of one Service from its slices, on `node` in `zone`.
pub fn service_frontends_in(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: Option<&str>,
    zone: Option<&str>,
) -> Vec<Frontend> {
    let hinted = use_zone_hints(svc, slices, zone);
    let mut out = Vec::new();
    for sp in &svc.ports {
        // `only_local`: keep this node's endpoints (when the node is known); `v6`: the
        // family of the frontend (an EndpointSlice holds one family).
        let backends = |only_local: bool, v6: bool| {
            let mut ready = Vec::new();
            let mut terminating = Vec::new();
            for slice in slices {
                let Some(ep_port) = slice
                    .ports
                    .iter()
                    .find(|p| p.name == sp.name && p.protocol == sp.protocol)
                else {
                    continue;
                };
                for ep in &slice.endpoints {
                    if ep.addr.is_ipv6() != v6 {
                        continue;
                    }
                    if only_local && node.is_some() && ep.node_name.as_deref() != node {
                        continue;
                    }
                    // PreferClose: a cluster-wide set keeps the endpoints hinted for our zone.
                    if !only_local
                        && hinted
                        && !ep
                            .hint_zones
                            .as_ref()
                            .is_some_and(|z| z.iter().any(|z| Some(z.as_str()) == zone))
                    {
                        continue;
                    }
                    let b = Backend {
                        addr: ep.addr,
                        port: ep_port.port,
                        terminating: false,
                    };
                    match ep.state {
                        EndpointState::Ready => ready.push(b),
                        EndpointState::ServingTerminating => terminating.push(Backend {
                            terminating: true,
                            ..b
                        }),
                        EndpointState::NotServing => {}
                    }
                }
            }
            ready.sort();
            ready.dedup();
            terminating.sort();
            terminating.dedup();
            terminating.retain(|t| !ready.iter().any(|r| r.addr == t.addr && r.port == t.port));
            ready.into_iter().chain(terminating).collect::<Vec<_>>()
        };
        // One ClusterIP frontend per family. The node proxy listens on IPv4, so IPv6
        // frontends are balanced in the kernel.
        let clusters: Vec<Frontend> = svc
            .cluster_ips
            .iter()
            .map(|&vip| Frontend {
                service: svc.id.clone(),
                port_name: sp.name.clone(),
                vip,
                port: sp.port,
                protocol: sp.protocol,
                affinity_timeout_s: svc.affinity_timeout_s,
                l7: sp.is_l7(svc.mode) && vip.is_ipv4(),
                h2: sp.is_h2(),
                detection: svc.detection,
                backends: backends(svc.internal_local, vip.is_ipv6()),
                scope: Scope::ClusterIp,
                external_local: false,
                socket_only: false,
                source_ranges: Vec::new(),
            })
            .collect();
        // North-south frontends are IPv4 (the tc programs serve IPv4) with IPv4 endpoints.
        let Some(cluster) = clusters
            .iter()
            .find(|f| f.vip.is_ipv4())
            .cloned()
            .or_else(|| {
                clusters.first().map(|f| Frontend {
                    vip: Ipv4Addr::UNSPECIFIED.into(),
                    ..f.clone()
                })
            })
        else {
            continue;
        };
        let ns = &svc.north_south;
        let mut external = Vec::new();
        if let Some(np) = sp.node_port {
            external.push((Scope::NodePort, IpAddr::from(Ipv4Addr::UNSPECIFIED), np));
        }
        external.extend(
            ns.lb_ips
                .iter()
                .map(|ip| (Scope::LoadBalancer, IpAddr::from(*ip), sp.port)),
        );
        external.extend(
            ns.external_ips
                .iter()
                .map(|ip| (Scope::ExternalIp, IpAddr::from(*ip), sp.port)),
        );
        if !external.is_empty() {
            let all = backends(false, false);
            let ext_backends = if ns.local {
                backends(true, false)
            } else {
                all.clone()
            };
            for (scope, vip, port) in external {
                if ns.local {
                    out.push(Frontend {
                        vip,
                        port,
                        l7: false,
                        h2: false,
                        backends: all.clone(),
                        scope,
                        external_local: false,
                        socket_only: true,
                        source_ranges: Vec::new(),
                        ..cluster.clone()
                    });
                }
                out.push(Frontend {
                    vip,
                    port,
                    // North-south traffic is balanced in the kernel (no L7 redirect at tc).
                    l7: false,
                    h2: false,
                    backends: ext_backends.clone(),
                    scope,
                    external_local: ns.local,
                    socket_only: false,
                    source_ranges: if scope == Scope::LoadBalancer {
                        ns.source_ranges.clone()
                    } else {
                        Vec::new()
                    },
                    ..cluster.clone()
                });
            }
        }
        out.extend(clusters);
    }
    out
}

struct CacheEntry {
    svc: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    node: Option<String>,
    out: Vec<Arc<Frontend>>,
}

/// Computes frontends incrementally: a Service whose object and slices are the same `Arc`s as
/// last time reuses its frontends (the same `Arc`s, so later stages can skip them too).
#[derive(Default)]
pub struct FrontendCache {
    entries: HashMap<ObjectRef, CacheEntry>,
    /// This node's zone (`topology.kubernetes.io/zone`), for PreferClose.
    zone: Option<String>,
}

impl FrontendCache {
    /// A cache for a node in `zone` (PreferClose prefers endpoints hinted for it).
    pub fn in_zone(zone: Option<String>) -> Self {
        Self {
            entries: HashMap::new(),
            zone,
        }
    }

    /// All frontends of `state` on node `node` (or `state.node_name`), sorted by
    /// (vip, port, protocol).
    pub fn frontends(&mut self, state: &State, node: Option<&str>) -> Vec<Arc<Frontend>> {
        let mut by_service: HashMap<&ObjectRef, Vec<&Arc<EndpointSlice>>> = HashMap::new();
        for slice in state.slices.values() {
            by_service.entry(&slice.service).or_default().push(slice);
        }
        let node = node.or(state.node_name.as_deref());
        let mut out = Vec::with_capacity(state.services.len());
        let mut next = HashMap::with_capacity(state.services.len());
        for (id, svc) in &state.services {
            let slices: &[&Arc<EndpointSlice>] =
                by_service.get(id).map(Vec::as_slice).unwrap_or(&[]);
            let reuse = self.entries.remove(id).filter(|e| {
                Arc::ptr_eq(&e.svc, svc)
                    && e.node.as_deref() == node
                    && e.slices.len() == slices.len()
                    && e.slices.iter().zip(slices).all(|(a, b)| Arc::ptr_eq(a, b))
            });
            let entry = match reuse {
                Some(e) => e,
                None => {
                    let plain: Vec<&EndpointSlice> = slices.iter().map(|s| s.as_ref()).collect();
                    CacheEntry {
                        svc: svc.clone(),
                        slices: slices.iter().map(|s| Arc::clone(s)).collect(),
                        node: node.map(String::from),
                        out: service_frontends_in(svc, &plain, node, self.zone.as_deref())
                            .into_iter()
                            .map(Arc::new)
                            .collect(),
                    }
                }
            };
            out.extend(entry.out.iter().cloned());
            next.insert(id.clone(), entry);
        }
        self.entries = next;
        out.sort_by_key(|f| (f.vip, f.port, f.protocol, f.map_scope()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_octet(a: IpAddr) -> u8 {
        match a {
            IpAddr::V4(a) => a.octets()[3],
            IpAddr::V6(a) => a.octets()[15],
        }
    }

    fn svc() -> Service {
        Service {
            id: ObjectRef::new("default", "web"),
            cluster_ips: vec![Ipv4Addr::new(198, 19, 0, 10).into()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                app_protocol: None,
                node_port: None,
            }],
            affinity_timeout_s: None,
            mode: None,
            detection: Default::default(),
            internal_local: false,
            prefer_close: false,
            north_south: Default::default(),
        }
    }

    fn slice(name: &str, eps: &[(u8, EndpointState)]) -> EndpointSlice {
        EndpointSlice {
            id: ObjectRef::new("default", name),
            service: ObjectRef::new("default", "web"),
            ports: vec![EndpointPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            endpoints: eps
                .iter()
                .map(|&(last, state)| Endpoint {
                    addr: Ipv4Addr::new(198, 18, 0, last).into(),
                    state,
                    node_name: None,
                    pod: None,
                    hint_zones: None,
                })
                .collect(),
            trigger_time: None,
        }
    }

    #[test]
    fn a_dual_stack_service_has_one_frontend_per_family_with_its_own_endpoints() {
        let mut s = svc();
        s.cluster_ips.push("2001:2:0:ff::10".parse().unwrap());
        let mut v6 = slice("web-v6", &[(2, EndpointState::Ready)]);
        v6.endpoints[0].addr = "2001:2::2".parse().unwrap();
        let v4 = slice("web-v4", &[(3, EndpointState::Ready)]);
        let fes = service_frontends(&s, &[&v4, &v6], None);
        assert_eq!(fes.len(), 2, "{fes:?}");
        let (a, b) = (&fes[0], &fes[1]);
        assert!(a.vip.is_ipv4() && b.vip.is_ipv6(), "{fes:?}");
        assert!(a.backends.iter().all(|x| x.addr.is_ipv4()) && a.backends.len() == 1);
        assert!(b.backends.iter().all(|x| x.addr.is_ipv6()) && b.backends.len() == 1);
        // The node proxy listens on IPv4: an HTTP port is L7 on IPv4 only.
        assert!(a.l7 && !b.l7, "{fes:?}");
    }

    #[test]
    fn prefer_close_keeps_the_endpoints_hinted_for_this_zone() {
        let mut svc = svc();
        svc.prefer_close = true;
        let mut sl = slice(
            "web-a",
            &[
                (2, EndpointState::Ready),
                (3, EndpointState::Ready),
                (4, EndpointState::Ready),
            ],
        );
        for (ep, z) in sl.endpoints.iter_mut().zip(["a", "b", "b"]) {
            ep.hint_zones = Some(vec![z.to_string()]);
        }
        let addrs = |fes: Vec<Frontend>| -> Vec<u8> {
            fes[0].backends.iter().map(|b| last_octet(b.addr)).collect()
        };
        assert_eq!(
            addrs(service_frontends_in(&svc, &[&sl], None, Some("b"))),
            [3, 4]
        );
        assert_eq!(
            addrs(service_frontends_in(&svc, &[&sl], None, Some("a"))),
            [2]
        );
        // No endpoint for the zone, or no zone known: every endpoint.
        assert_eq!(
            addrs(service_frontends_in(&svc, &[&sl], None, Some("c"))).len(),
            3
        );
        assert_eq!(
            addrs(service_frontends_in(&svc, &[&sl], None, None)).len(),
            3
        );
        // One ready endpoint without hints: hints are not trusted (kube-proxy's rule).
        sl.endpoints[2].hint_zones = None;
        assert_eq!(
            addrs(service_frontends_in(&svc, &[&sl], None, Some("b"))).len(),
            3
        );
        // Without PreferClose the hints are ignored.
        sl.endpoints[2].hint_zones = Some(vec!["b".into()]);
        svc.prefer_close = false;
        assert_eq!(
            addrs(service_frontends_in(&svc, &[&sl], None, Some("b"))).len(),
            3
        );
    }

    #[test]
    fn north_south_frontends_follow_the_external_policy() {
        let mut svc = svc();
        svc.ports[0].node_port = Some(30080);
        svc.north_south = NorthSouth {
            lb_ips: vec![Ipv4Addr::new(198, 19, 250, 10)],
            external_ips: vec![Ipv4Addr::new(198, 19, 250, 20)],
            local: true,
            health_check_node_port: Some(32100),
            source_ranges: vec![(Ipv4Addr::new(198, 19, 201, 0), 24)],
        };
        let mut sl = slice(
            "web-a",
            &[(2, EndpointState::Ready), (3, EndpointState::Ready)],
        );
        sl.endpoints[0].node_name = Some("node1".into());
        sl.endpoints[1].node_name = Some("node2".into());
        let fes = service_frontends(&svc, &[&sl], Some("node1"));
        let by_scope = |scope| {
            fes.iter()
                .find(|f| f.scope == scope && !f.socket_only)
                .unwrap()
        };
        // The ClusterIP, and per external address the tc entry and its in-cluster twin.
        assert_eq!(fes.len(), 7);
        let twin = fes
            .iter()
            .find(|f| f.scope == Scope::NodePort && f.socket_only)
            .unwrap();
        assert_eq!(
            twin.backends.len(),
            2,
            "in-cluster clients use every endpoint"
        );
        assert!(!twin.external_local && twin.map_scope() == proxy_common::SCOPE_ALL);
        let cluster = by_scope(Scope::ClusterIp);
        assert_eq!(
            cluster.backends.len(),
            2,
            "the ClusterIP keeps every endpoint"
        );
        let np = by_scope(Scope::NodePort);
        assert_eq!((np.vip, np.port), (Ipv4Addr::UNSPECIFIED.into(), 30080));
        assert_eq!(np.backends.len(), 1, "Local: this node's endpoint only");
        assert_eq!(np.backends[0].addr, Ipv4Addr::new(198, 18, 0, 2));
        assert!(np.external_local && !np.l7);
        assert_eq!(np.map_scope(), proxy_common::SCOPE_EXTERNAL_LOCAL);
        assert!(
            np.source_ranges.is_empty(),
            "ranges are for LoadBalancer IPs"
        );
        let lb = by_scope(Scope::LoadBalancer);
        assert_eq!(
            (lb.vip, lb.port),
            (Ipv4Addr::new(198, 19, 250, 10).into(), 80)
        );
        assert_eq!(lb.source_ranges.len(), 1);
        let ext = by_scope(Scope::ExternalIp);
        assert_eq!(ext.vip, Ipv4Addr::new(198, 19, 250, 20));
        svc.north_south.local = false;
        let fes = service_frontends(&svc, &[&sl], Some("node1"));
        assert_eq!(fes.len(), 4, "Cluster: one entry per address");
        assert!(
            fes.iter().all(|f| f.backends.len() == 2),
            "Cluster: every endpoint"
        );
    }

    #[test]
    fn ready_endpoints_of_all_slices_are_merged() {
        let mut st = State::default();
        st.services.insert(svc().id.clone(), Arc::new(svc()));
        let a = slice(
            "web-a",
            &[(2, EndpointState::Ready), (3, EndpointState::NotServing)],
        );
        let b = slice(
            "web-b",
            &[(4, EndpointState::Ready), (2, EndpointState::Ready)],
        );
        st.slices.insert(a.id.clone(), Arc::new(a));
        st.slices.insert(b.id.clone(), Arc::new(b));
        let fe = st.frontends();
        assert_eq!(fe.len(), 1);
        let addrs: Vec<_> = fe[0]
            .backends
            .iter()
            .map(|b| (last_octet(b.addr), b.terminating))
            .collect();
        assert_eq!(addrs, vec![(2, false), (4, false)]);
    }

    #[test]
    fn terminating_endpoints_follow_ready_ones() {
        let mut st = State::default();
        st.services.insert(svc().id.clone(), Arc::new(svc()));
        let a = slice(
            "web-a",
            &[
                (5, EndpointState::ServingTerminating),
                (2, EndpointState::Ready),
            ],
        );
        st.slices.insert(a.id.clone(), Arc::new(a));
        let fe = st.frontends();
        let addrs: Vec<_> = fe[0]
            .backends
            .iter()
            .map(|b| (last_octet(b.addr), b.terminating))
            .collect();
        assert_eq!(addrs, vec![(2, false), (5, true)]);
    }

    #[test]
    fn http_ports_are_recognised_like_istio_does() {
        let port = |name: &str, app: Option<&str>| ServicePort {
            name: name.into(),
            port: 80,
            protocol: Protocol::Tcp,
            app_protocol: app.map(String::from),
            node_port: None,
        };
        assert!(port("http", None).is_l7(None));
        assert!(port("http-web", None).is_l7(None));
        assert!(port("grpc-api", None).is_l7(None) && port("grpc-api", None).is_h2());
        assert!(port("web", Some("http")).is_l7(None));
        assert!(port("x", Some("kubernetes.io/h2c")).is_h2());
        assert!(!port("web", None).is_l7(None));
        assert!(!port("httpx", None).is_l7(None));
        assert!(!port("http", None).is_l7(Some(Mode::L4)));
        assert!(port("db", None).is_l7(Some(Mode::L7)));
    }

    #[test]
    fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints() {
        let mut st = State::default();
        let mut s = svc();
        s.internal_local = true;
        st.services.insert(s.id.clone(), Arc::new(s));
        let mut a = slice(
            "web-a",
            &[(2, EndpointState::Ready), (3, EndpointState::Ready)],
        );
        a.endpoints[0].node_name = Some("node1".into());
        a.endpoints[1].node_name = Some("node2".into());
        st.slices.insert(a.id.clone(), Arc::new(a));
        let on = |node: Option<&str>| {
            FrontendCache::default().frontends(&st, node)[0]
                .backends
                .iter()
                .map(|b| last_octet(b.addr))
                .collect::<Vec<_>>()
        };
        assert_eq!(on(Some("node1")), [2]);
        assert_eq!(on(Some("node2")), [3]);
        // Without a node name (not configured) every endpoint is used.
        assert_eq!(on(None), [2, 3]);
    }

    #[test]
    fn unmatched_port_names_give_no_backends() {
        let mut st = State::default();
        st.services.insert(svc().id.clone(), Arc::new(svc()));
        let mut a = slice("web-a", &[(2, EndpointState::Ready)]);
        a.ports[0].name = "metrics".into();
        st.slices.insert(a.id.clone(), Arc::new(a));
        assert!(st.frontends()[0].backends.is_empty());
    }
}
