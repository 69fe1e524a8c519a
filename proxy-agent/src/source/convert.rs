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
    MODE_ANNOTATION, Mode, ObjectRef, PROTOCOL_ANNOTATION, PodInfo, Protocol, ProtocolHint,
    Service, ServicePort,
};

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
                ip: Ipv4Addr::UNSPECIFIED,
                labels,
            },
        ));
    };
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| FieldError::new("status.podIP", format!("{ip:?} is not an IPv4 address")))?;
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
    let cluster_ip: Ipv4Addr = match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4,
        Ok(IpAddr::V6(_)) => {
            return Err(FieldError::new(
                "spec.clusterIP",
                format!("{ip}: IPv6 ClusterIPs are not supported yet"),
            ));
        }
        Err(e) => {
            return Err(FieldError::new(
                "spec.clusterIP",
                format!("{ip:?} is not an IP address: {e}"),
            ));
        }
    };
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
        ports.push(ServicePort {
            name,
            port,
            protocol: proto,
            app_protocol: p.app_protocol.clone(),
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
    Ok(Ok(Service {
        id,
        cluster_ip,
        ports,
        affinity_timeout_s,
        mode,
        detection: ProtocolHint {
            opaque,
            detect_timeout,
        },
        internal_local,
    }))
}

/// Validates a discovery.k8s.io/v1 EndpointSlice into the model.
pub fn slice(s: &discovery::EndpointSlice) -> FieldResult<EndpointSlice> {
    let id = meta_ref(&s.metadata, NameRule::Dns1123Subdomain)?;
    if s.address_type != "IPv4" {
        return Err(FieldError::new(
            "addressType",
            format!("{:?} is not supported (IPv4)", s.address_type),
        ));
    }
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
        let addr: Ipv4Addr = a.parse().map_err(|_| {
            FieldError::new(
                format!("endpoints[{i}].addresses[0]"),
                format!("{a:?} is not an IPv4 address"),
            )
        })?;
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone());
        endpoints.push(Endpoint {
            addr,
            state,
            node_name: ep.node_name.clone(),
            pod,
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
