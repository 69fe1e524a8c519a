//! Kubernetes objects to the model: the validation both sources share (the manifests
//! directory and the API server), with one error type naming the offending field.
//!
//! The API server validates objects before we see them; a manifests directory does not, so the
//! rules that matter to the datapath are checked here for both: object names (Kubernetes'
//! DNS-1035 / DNS-1123 rules), ClusterIPs, ports, protocols, session affinity and our
//! annotations.

use std::net::{IpAddr, Ipv4Addr};
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    DETECT_TIMEOUT_ANNOTATION, Endpoint, EndpointPort, EndpointSlice, EndpointState,
    MODE_ANNOTATION, Mode, NorthSouth, ObjectRef, PROTOCOL_ANNOTATION, PodInfo, Protocol,
    ProtocolHint, Service, ServicePort,
};

/// The NodePort range this node serves (the API server's `--service-node-port-range`); set
/// once from `--node-port-range` at start, Kubernetes' default otherwise.
pub static NODE_PORT_RANGE: std::sync::OnceLock<(u16, u16)> = std::sync::OnceLock::new();

/// Kubernetes' default NodePort range.
pub const DEFAULT_NODE_PORT_RANGE: (u16, u16) = (30_000, 32_767);

/// The legacy annotation for `spec.loadBalancerSourceRanges` (comma-separated CIDRs), honoured
/// when the field is empty, as kube-proxy does.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// The annotation of topology-aware hints before `trafficDistribution` (`Auto`).
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";

/// Parses `a.b.c.d/n` (IPv4; `None` for an IPv6 prefix) into its network address and length.
pub fn ipv4_cidr(field: &str, cidr: &str) -> FieldResult<Option<(Ipv4Addr, u8)>> {
    let cidr = cidr.trim();
    let bad = |why: &str| FieldError::new(field, format!("{cidr:?} is not a CIDR: {why}"));
    let (addr, len) = cidr
        .split_once('/')
        .ok_or_else(|| bad("no /prefix-length"))?;
    let addr: IpAddr = addr.parse().map_err(|_| bad("bad address"))?;
    let IpAddr::V4(addr) = addr else {
        return Ok(None);
    };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| bad("prefix length out of 0-32"))?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok(Some((Ipv4Addr::from(u32::from(addr) & mask), len)))
}

/// Default sessionAffinity ClientIP timeout (Kubernetes' default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// EndpointSlice annotation set by the EndpointSlice controller: when the change that produced
/// this version of the slice happened (the start of kube-proxy's network programming latency).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Label handing a Service to another proxy (KEP-2447): kube-proxy and we leave it alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Why a valid Service is not programmed by this node's proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotOurs {
    /// `clusterIP: None`: DNS serves its endpoints, nothing to translate.
    Headless,
    /// `type: ExternalName`: a DNS alias.
    ExternalName,
    /// `service.kubernetes.io/service-proxy-name` names another proxy.
    OtherProxy,
}

/// A validation failure: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct FieldError {
    /// Path of the field (`spec.ports[0].port`), `-` for the whole object.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl FieldError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<(String, String)> for FieldError {
    fn from((field, message): (String, String)) -> Self {
        Self { field, message }
    }
}

/// A result whose error names the field and what is wrong with it.
pub type FieldResult<T> = Result<T, FieldError>;

/// Deserializes a typed object, naming the field that does not fit.
pub fn typed<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> FieldResult<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        FieldError::new(
            if path == "." { "-".into() } else { path },
            e.into_inner().to_string(),
        )
    })
}

/// Which Kubernetes naming rule an object's name follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// DNS-1035 label (Services): at most 63 characters, lowercase letters, digits and `-`,
    /// starting with a letter and ending with a letter or digit.
    Dns1035Label,
    /// DNS-1123 label (namespaces): like [`NameRule::Dns1035Label`], but may start with a digit.
    Dns1123Label,
    /// DNS-1123 subdomain (most other objects): at most 253 characters, lowercase letters,
    /// digits, `-` and `.`, starting and ending with a letter or digit.
    Dns1123Subdomain,
}

/// Checks `name` against `rule`; the message says what is wrong.
pub fn check_name(name: &str, rule: NameRule) -> Result<(), String> {
    let (max, dots) = match rule {
        NameRule::Dns1035Label | NameRule::Dns1123Label => (63, false),
        NameRule::Dns1123Subdomain => (253, true),
    };
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > max {
        return Err(format!(
            "{} characters: Kubernetes allows at most {max}",
            name.len()
        ));
    }
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    if let Some(c) = name.chars().find(|c| !ok_char(*c)) {
        return Err(format!(
            "{name:?} contains {c:?}: only lowercase letters, digits{} and '-' are allowed",
            if dots { ", '.'" } else { "" }
        ));
    }
    let first = name.chars().next().unwrap_or('-');
    let last = name.chars().last().unwrap_or('-');
    let first_ok = match rule {
        NameRule::Dns1035Label => first.is_ascii_lowercase(),
        NameRule::Dns1123Label | NameRule::Dns1123Subdomain => first.is_ascii_alphanumeric(),
    };
    if !first_ok || !last.is_ascii_alphanumeric() {
        return Err(format!(
            "{name:?} must start with a {} and end with a letter or digit",
            if rule == NameRule::Dns1035Label {
                "letter"
            } else {
                "letter or digit"
            }
        ));
    }
    if dots
        && name
            .split('.')
            .any(|l| l.is_empty() || l.starts_with('-') || l.ends_with('-'))
    {
        return Err(format!(
            "{name:?}: every dot-separated part must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// Namespace and name of an object, both checked (the namespace is a DNS-1123 label).
pub fn meta_ref(meta: &ObjectMeta, rule: NameRule) -> FieldResult<ObjectRef> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(FieldError::new("metadata.name", "missing"))?;
    check_name(&name, rule).map_err(|m| FieldError::new("metadata.name", m))?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    check_name(&namespace, NameRule::Dns1123Label)
        .map_err(|m| FieldError::new("metadata.namespace", m))?;
    Ok(ObjectRef::new(namespace, name))
}

fn protocol(field: String, p: Option<&str>) -> FieldResult<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(FieldError::new(
            field,
            format!("protocol {other:?} is not supported (TCP or UDP)"),
        )),
    }
}

fn port_number(field: String, p: i32) -> FieldResult<u16> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p != 0)
        .ok_or(FieldError::new(
            field,
            format!("port {p} is out of range 1-65535"),
        ))
}

/// The `spec` of an object read as untyped YAML (Istio kinds).
pub fn spec_of(value: &serde_yaml::Value) -> FieldResult<serde_yaml::Value> {
    value
        .get("spec")
        .cloned()
        .ok_or(FieldError::new("spec", "missing"))
}

/// Validates a v1 Pod into its reference and what subsets need (address and labels).
pub fn pod(p: &core::Pod) -> FieldResult<(ObjectRef, PodInfo)> {
    let id = meta_ref(&p.metadata, NameRule::Dns1123Subdomain)?;
    let labels = p
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref());
    let Some(ip) = ip else {
        // A pod without an address is not running; nothing to select.
        return Ok((
            id,
            PodInfo {
                ip: Ipv4Addr::UNSPECIFIED.into(),
                labels,
            },
        ));
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| FieldError::new("status.podIP", format!("{ip:?} is not an IP address")))?;
    Ok((id, PodInfo { ip, labels }))
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Validates a v1 Service into the model; `Ok(Err(_))` for a valid Service this proxy does not
/// serve (headless, ExternalName, another proxy's), as kube-proxy leaves those alone.
pub fn service(s: &core::Service) -> FieldResult<Result<Service, NotOurs>> {
    let id = meta_ref(&s.metadata, NameRule::Dns1035Label)?;
    let spec = s.spec.as_ref().ok_or(FieldError::new("spec", "missing"))?;
    if s.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        return Ok(Err(NotOurs::OtherProxy));
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Err(NotOurs::ExternalName));
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        return Ok(Err(NotOurs::Headless));
    }
    let ip = spec.cluster_ip.as_deref().ok_or(FieldError::new(
        "spec.clusterIP",
        "required in manifests mode (no API server allocates one); set an address from the service CIDR",
    ))?;
    let cluster_ips = cluster_ips(ip, spec.cluster_ips.as_deref())?;
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        if ports.iter().any(|q: &ServicePort| q.name == name) {
            return Err(FieldError::new(
                format!("spec.ports[{i}].name"),
                format!("duplicate port name {name:?}"),
            ));
        }
        let port = port_number(format!("spec.ports[{i}].port"), p.port)?;
        let proto = protocol(format!("spec.ports[{i}].protocol"), p.protocol.as_deref())?;
        if ports
            .iter()
            .any(|q: &ServicePort| q.port == port && q.protocol == proto)
        {
            return Err(FieldError::new(
                format!("spec.ports[{i}].port"),
                format!("{port}/{proto} is listed twice"),
            ));
        }
        let node_port = match (p.node_port, spec.type_.as_deref()) {
            (None | Some(0), Some("NodePort")) => {
                return Err(FieldError::new(
                    format!("spec.ports[{i}].nodePort"),
                    "required in manifests mode for type NodePort (no API server allocates one)",
                ));
            }
            (None | Some(0), _) => None,
            (Some(np), Some("NodePort" | "LoadBalancer")) => {
                let (lo, hi) = *NODE_PORT_RANGE.get_or_init(|| DEFAULT_NODE_PORT_RANGE);
                let field = format!("spec.ports[{i}].nodePort");
                let np = port_number(field.clone(), np)?;
                if !(lo..=hi).contains(&np) {
                    return Err(FieldError::new(
                        field,
                        format!("{np} is outside the NodePort range {lo}-{hi} (--node-port-range)"),
                    ));
                }
                if ports
                    .iter()
                    .any(|q: &ServicePort| q.node_port == Some(np) && q.protocol == proto)
                {
                    return Err(FieldError::new(
                        field,
                        format!("{np}/{proto} is listed twice"),
                    ));
                }
                Some(np)
            }
            (Some(_), _) => {
                return Err(FieldError::new(
                    format!("spec.ports[{i}].nodePort"),
                    "only Services of type NodePort or LoadBalancer have node ports",
                ));
            }
        };
        ports.push(ServicePort {
            name,
            port,
            protocol: proto,
            app_protocol: p.app_protocol.clone(),
            node_port,
        });
    }
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t @ 1..=86_400) => Some(t as u32),
                Some(t) => {
                    return Err(FieldError::new(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1-86400"),
                    ));
                }
            }
        }
        Some(other) => {
            return Err(FieldError::new(
                "spec.sessionAffinity",
                format!("{other:?}: expected None or ClientIP"),
            ));
        }
    };
    let mode = match annotation(&s.metadata, MODE_ANNOTATION) {
        None => None,
        Some("l4" | "L4") => Some(Mode::L4),
        Some("l7" | "L7") => Some(Mode::L7),
        Some(other) => {
            return Err(FieldError::new(
                format!("metadata.annotations[{MODE_ANNOTATION}]"),
                format!("{other:?}: expected l4 or l7"),
            ));
        }
    };
    let opaque = match annotation(&s.metadata, PROTOCOL_ANNOTATION) {
        None | Some("detect") => false,
        Some("opaque") => true,
        Some(other) => {
            return Err(FieldError::new(
                format!("metadata.annotations[{PROTOCOL_ANNOTATION}]"),
                format!("{other:?}: expected detect or opaque"),
            ));
        }
    };
    let detect_timeout = match annotation(&s.metadata, DETECT_TIMEOUT_ANNOTATION) {
        None => None,
        Some(v) => {
            let field = format!("metadata.annotations[{DETECT_TIMEOUT_ANNOTATION}]");
            let d = crate::istio::duration(&field, v)?;
            if d.is_zero() || d > std::time::Duration::from_secs(60) {
                return Err(FieldError::new(
                    field,
                    format!("{v:?}: expected a duration from 1ms to 60s"),
                ));
            }
            Some(d)
        }
    };
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let north_south = north_south(s, spec)?;
    let prefer_close = matches!(
        spec.traffic_distribution.as_deref(),
        Some("PreferClose" | "PreferSameZone")
    ) || annotation(&s.metadata, TOPOLOGY_MODE_ANNOTATION)
        .is_some_and(|m| m.eq_ignore_ascii_case("auto"));
    Ok(Ok(Service {
        id,
        cluster_ips,
        ports,
        affinity_timeout_s,
        mode,
        detection: ProtocolHint {
            opaque,
            detect_timeout,
        },
        internal_local,
        prefer_close,
        north_south,
    }))
}

/// `spec.clusterIP` with `spec.clusterIPs` (dual-stack: one address per family, the primary
/// first, equal to `clusterIP`).
fn cluster_ips(primary: &str, all: Option<&[String]>) -> FieldResult<Vec<IpAddr>> {
    let parse = |field: &str, ip: &str| {
        ip.parse::<IpAddr>()
            .map_err(|e| FieldError::new(field, format!("{ip:?} is not an IP address: {e}")))
    };
    let first = parse("spec.clusterIP", primary)?;
    let mut out = vec![first];
    let all = all.unwrap_or_default();
    if let Some(p) = all.first()
        && parse("spec.clusterIPs[0]", p)? != first
    {
        return Err(FieldError::new(
            "spec.clusterIPs[0]",
            format!("{p} must equal spec.clusterIP ({primary})"),
        ));
    }
    if all.len() > 2 {
        return Err(FieldError::new(
            "spec.clusterIPs",
            format!("{} addresses: at most one per family (2)", all.len()),
        ));
    }
    if let Some(second) = all.get(1) {
        let second = parse("spec.clusterIPs[1]", second)?;
        if second.is_ipv6() == first.is_ipv6() {
            return Err(FieldError::new(
                "spec.clusterIPs[1]",
                format!(
                    "{second} is of the same family as {first}: dual-stack needs one IPv4 and one IPv6 address"
                ),
            ));
        }
        out.push(second);
    }
    for ip in &out {
        if ip.is_unspecified() || ip.is_loopback() {
            return Err(FieldError::new(
                "spec.clusterIP",
                format!("{ip} is not a usable ClusterIP"),
            ));
        }
    }
    Ok(out)
}

/// The north-south part of a Service: LoadBalancer ingress IPs, externalIPs and their policies.
fn north_south(s: &core::Service, spec: &core::ServiceSpec) -> FieldResult<NorthSouth> {
    let lb = spec.type_.as_deref() == Some("LoadBalancer");
    let mut ns = NorthSouth::default();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) if !v4.is_unspecified() && !v4.is_loopback() => {
                ns.external_ips.push(v4)
            }
            Ok(IpAddr::V6(_)) => {} // an IPv4 datapath serves the IPv4 addresses
            _ => {
                return Err(FieldError::new(
                    format!("spec.externalIPs[{i}]"),
                    format!("{ip:?} is not a usable IPv4 address"),
                ));
            }
        }
    }
    if lb {
        let ingress = s
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // ipMode Proxy (KEP-1860): the load balancer proxies, nodes must not take the
            // address over.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(ip) = ing.ip.as_deref() else {
                continue;
            };
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) if !v4.is_unspecified() => ns.lb_ips.push(v4),
                Ok(_) => {}
                Err(_) => {
                    return Err(FieldError::new(
                        format!("status.loadBalancer.ingress[{i}].ip"),
                        format!("{ip:?} is not an IP address"),
                    ));
                }
            }
        }
        ns.lb_ips.sort();
        ns.lb_ips.dedup();
        let ranges: Vec<(String, String)> = match &spec.load_balancer_source_ranges {
            Some(r) if !r.is_empty() => r
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.loadBalancerSourceRanges[{i}]"), c.clone()))
                .collect(),
            _ => annotation(&s.metadata, SOURCE_RANGES_ANNOTATION)
                .map(|a| {
                    a.split(',')
                        .filter(|c| !c.trim().is_empty())
                        .map(|c| {
                            (
                                format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"),
                                c.to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        for (field, c) in &ranges {
            if let Some(r) = ipv4_cidr(field, c)? {
                ns.source_ranges.push(r);
            }
        }
        ns.source_ranges.sort();
        ns.source_ranges.dedup();
    }
    ns.external_ips.sort();
    ns.external_ips.dedup();
    ns.local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(FieldError::new(
                "spec.externalTrafficPolicy",
                format!("{other:?}: expected Cluster or Local"),
            ));
        }
    };
    if let Some(hc) = spec.health_check_node_port.filter(|p| *p != 0) {
        if !(lb && ns.local) {
            return Err(FieldError::new(
                "spec.healthCheckNodePort",
                "only a LoadBalancer Service with externalTrafficPolicy: Local has one",
            ));
        }
        ns.health_check_node_port = Some(port_number("spec.healthCheckNodePort".into(), hc)?);
    }
    Ok(ns)
}

/// Validates a discovery.k8s.io/v1 EndpointSlice into the model.
pub fn slice(s: &discovery::EndpointSlice) -> FieldResult<EndpointSlice> {
    let id = meta_ref(&s.metadata, NameRule::Dns1123Subdomain)?;
    let v6 = match s.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        other => {
            return Err(FieldError::new(
                "addressType",
                format!("{other:?} is not supported (IPv4 or IPv6)"),
            ));
        }
    };
    let svc_name = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .ok_or(FieldError::new(
            "metadata.labels",
            format!(
                "label {SERVICE_NAME_LABEL} is required: it names the Service this slice belongs to"
            ),
        ))?;
    let trigger_time = match annotation(&s.metadata, TRIGGER_TIME_ANNOTATION) {
        None => None,
        Some(t) => Some(
            t.parse::<jiff::Timestamp>()
                .map(SystemTime::from)
                .map_err(|e| {
                    FieldError::new(
                        format!("metadata.annotations[{TRIGGER_TIME_ANNOTATION}]"),
                        format!("{t:?} is not an RFC 3339 time: {e}"),
                    )
                })?,
        ),
    };
    let mut ports = Vec::new();
    for (i, p) in s.ports.iter().flatten().enumerate() {
        let Some(port) = p.port else { continue };
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            port: port_number(format!("ports[{i}].port"), port)?,
            protocol: protocol(format!("ports[{i}].protocol"), p.protocol.as_deref())?,
        });
    }
    let mut endpoints = Vec::new();
    for (i, ep) in s.endpoints.iter().flatten().enumerate() {
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        let state = if ready && !terminating {
            EndpointState::Ready
        } else if serving && terminating {
            EndpointState::ServingTerminating
        } else {
            EndpointState::NotServing
        };
        if ep.addresses.is_empty() {
            return Err(FieldError::new(
                format!("endpoints[{i}].addresses"),
                "at least one address is required",
            ));
        }
        // Kubernetes consumers use the first address (the others are fungible duplicates).
        let a = &ep.addresses[0];
        let addr: IpAddr = a
            .parse()
            .ok()
            .filter(|ip: &IpAddr| ip.is_ipv6() == v6)
            .ok_or_else(|| {
                FieldError::new(
                    format!("endpoints[{i}].addresses[0]"),
                    format!("{a:?} is not an {} address", s.address_type),
                )
            })?;
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone());
        let hint_zones = ep
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| z.iter().map(|z| z.name.clone()).collect());
        endpoints.push(Endpoint {
            addr,
            state,
            node_name: ep.node_name.clone(),
            pod,
            hint_zones,
        });
    }
    Ok(EndpointSlice {
        service: ObjectRef::new(id.namespace.clone(), svc_name.clone()),
        id,
        ports,
        endpoints,
        trigger_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kubernetes_rules() {
        use NameRule::*;
        assert!(check_name("web", Dns1035Label).is_ok());
        assert!(check_name("web-2", Dns1035Label).is_ok());
        assert!(check_name(&"a".repeat(63), Dns1035Label).is_ok());
        let long = check_name(&"a".repeat(300), Dns1035Label).unwrap_err();
        assert!(long.contains("300 characters"), "{long}");
        assert!(check_name("2web", Dns1035Label).is_err());
        assert!(check_name("2web", Dns1123Subdomain).is_ok());
        assert!(check_name("Web", Dns1035Label).is_err());
        assert!(check_name("web-", Dns1123Subdomain).is_err());
        assert!(check_name("web.v1", Dns1035Label).is_err());
        assert!(check_name("web.v1", Dns1123Subdomain).is_ok());
        assert!(check_name("web..v1", Dns1123Subdomain).is_err());
        assert!(check_name("web_1", Dns1123Subdomain).is_err());
    }

    fn lb(spec: &str, status: &str) -> FieldResult<Service> {
        let s: core::Service = serde_yaml::from_str(&format!(
            "metadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 198.19.0.10\n{spec}{status}"
        ))
        .unwrap();
        service(&s).map(|r| r.unwrap())
    }

    fn with_ips(ips: &str) -> FieldResult<Service> {
        let s: core::Service = serde_yaml::from_str(&format!(
            "metadata: {{name: web, namespace: default}}\nspec:\n{ips}  ports: [{{port: 80}}]\n"
        ))
        .unwrap();
        service(&s).map(|r| r.unwrap())
    }

    #[test]
    fn cluster_ips_of_both_families_are_read_and_checked() {
        let v6 = with_ips("  clusterIP: \"2001:2:0:ff::10\"\n").unwrap();
        assert_eq!(
            v6.cluster_ips,
            ["2001:2:0:ff::10".parse::<IpAddr>().unwrap()]
        );
        let dual = with_ips(
            "  clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, \"2001:2:0:ff::10\"]\n",
        )
        .unwrap();
        assert_eq!(dual.cluster_ips.len(), 2);
        assert!(dual.cluster_ips[0].is_ipv4() && dual.cluster_ips[1].is_ipv6());
        let e = with_ips("  clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, 198.19.0.11]\n")
            .unwrap_err();
        assert_eq!(e.field, "spec.clusterIPs[1]", "{e:?}");
        let e = with_ips(
            "  clusterIP: 198.19.0.10\n  clusterIPs: [\"2001:2:0:ff::10\", 198.19.0.10]\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.clusterIPs[0]", "{e:?}");
        let e = with_ips("  clusterIP: \"::1\"\n").unwrap_err();
        assert_eq!(e.field, "spec.clusterIP", "{e:?}");
    }

    #[test]
    fn ipv6_slices_hold_ipv6_addresses_only() {
        let parse = |family: &str, addr: &str| {
            let s: discovery::EndpointSlice = serde_yaml::from_str(&format!(
                "metadata:\n  name: web-a\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\nendpoints: [{{addresses: [\"{addr}\"]}}]\n"
            ))
            .unwrap();
            slice(&s)
        };
        let ok = parse("IPv6", "2001:2::a").unwrap();
        assert_eq!(ok.endpoints[0].addr, "2001:2::a".parse::<IpAddr>().unwrap());
        let e = parse("IPv6", "198.18.0.10").unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses[0]", "{e:?}");
        assert!(e.message.contains("IPv6"), "{e:?}");
        let e = parse("IPv4", "2001:2::a").unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses[0]", "{e:?}");
        let e = parse("FQDN", "example.com").unwrap_err();
        assert_eq!(e.field, "addressType", "{e:?}");
    }

    #[test]
    fn load_balancer_services_carry_their_north_south_fields() {
        let s = lb(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n  externalIPs: [198.19.250.20, \"2001:2::1\"]\n  loadBalancerSourceRanges: [198.19.201.7/24, \"2001:2::/64\"]\n  ports: [{port: 80, nodePort: 30080}]\n",
            "status:\n  loadBalancer: {ingress: [{ip: 198.19.250.10}, {ip: 198.19.250.11, ipMode: Proxy}, {hostname: lb.example}]}\n",
        )
        .unwrap();
        assert_eq!(s.ports[0].node_port, Some(30080));
        let ns = &s.north_south;
        assert_eq!(
            ns.lb_ips,
            [Ipv4Addr::new(198, 19, 250, 10)],
            "ipMode Proxy is the LB's"
        );
        assert_eq!(ns.external_ips, [Ipv4Addr::new(198, 19, 250, 20)]);
        assert!(ns.local);
        assert_eq!(ns.health_check_node_port, Some(32100));
        assert_eq!(
            ns.source_ranges,
            [(Ipv4Addr::new(198, 19, 201, 0), 24)],
            "masked"
        );
        // The legacy annotation, when the field is empty.
        let s: core::Service = serde_yaml::from_str("metadata:\n  name: web\n  annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: \"10.0.0.0/8, 198.18.0.0/15\"}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n").unwrap();
        let s = service(&s).unwrap().unwrap();
        assert_eq!(s.north_south.source_ranges.len(), 2);
    }

    #[test]
    fn node_port_mistakes_name_the_field() {
        let err = |spec: &str| lb(spec, "").unwrap_err();
        let e = err("  type: NodePort\n  ports: [{port: 80}]\n");
        assert_eq!(e.field, "spec.ports[0].nodePort");
        assert!(e.message.contains("required"), "{e}");
        let e = err("  type: NodePort\n  ports: [{port: 80, nodePort: 22}]\n");
        assert!(e.message.contains("30000-32767"), "{e}");
        let e = err("  ports: [{port: 80, nodePort: 30080}]\n");
        assert!(e.message.contains("NodePort or LoadBalancer"), "{e}");
        let e = err(
            "  type: NodePort\n  externalTrafficPolicy: Locale\n  ports: [{port: 80, nodePort: 30080}]\n",
        );
        assert_eq!(e.field, "spec.externalTrafficPolicy");
        let e = err("  type: LoadBalancer\n  healthCheckNodePort: 32100\n  ports: [{port: 80}]\n");
        assert_eq!(e.field, "spec.healthCheckNodePort");
        let e = err(
            "  type: LoadBalancer\n  loadBalancerSourceRanges: [198.19.0.0]\n  ports: [{port: 80}]\n",
        );
        assert_eq!(e.field, "spec.loadBalancerSourceRanges[0]");
        let e = err(
            "  type: NodePort\n  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]\n",
        );
        assert_eq!(e.field, "spec.ports[1].nodePort");
    }

    #[test]
    fn headless_external_name_and_other_proxies_services_are_left_alone() {
        let svc = |extra: &str| -> core::Service {
            serde_yaml::from_str(&format!("metadata:\n  name: web\n{extra}spec:\n  clusterIP: 198.19.0.10\n  ports: [{{port: 80}}]\n")).unwrap()
        };
        assert!(service(&svc("")).unwrap().is_ok());
        let mut headless = svc("");
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        assert_eq!(service(&headless).unwrap().unwrap_err(), NotOurs::Headless);
        let mut alias = svc("");
        alias.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        alias.spec.as_mut().unwrap().cluster_ip = None;
        assert_eq!(service(&alias).unwrap().unwrap_err(), NotOurs::ExternalName);
        let other = svc("  labels: {service.kubernetes.io/service-proxy-name: foo}\n");
        assert_eq!(service(&other).unwrap().unwrap_err(), NotOurs::OtherProxy);
    }

    #[test]
    fn slices_carry_their_trigger_time() {
        let s: discovery::EndpointSlice = serde_yaml::from_str(
            "metadata:\n  name: web-a\n  labels: {kubernetes.io/service-name: web}\n  annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2026-12-01T10:00:00Z'}\naddressType: IPv4\nendpoints: []\n",
        )
        .unwrap();
        let m = slice(&s).unwrap();
        let t: jiff::Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        assert_eq!(m.trigger_time, Some(SystemTime::from(t)));
        let mut bad = s.clone();
        bad.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(TRIGGER_TIME_ANNOTATION.into(), "yesterday".into());
        assert_eq!(
            slice(&bad).unwrap_err().field,
            format!("metadata.annotations[{TRIGGER_TIME_ANNOTATION}]")
        );
    }
}
