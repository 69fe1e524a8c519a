//! Builders for the Kubernetes YAML the tests write into a node's manifests directory.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An endpoint condition as EndpointSlices carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// ready (and serving, not terminating).
    Ready,
    /// serving and terminating, not ready (KEP-1669).
    Terminating,
    /// not ready, not serving.
    NotReady,
}

/// A v1 Service with one port. `extra_spec` is appended (indented) under `spec:`.
pub fn service(
    name: &str,
    cluster_ip: &str,
    port: u16,
    protocol: &str,
    extra_spec: &str,
) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {cluster_ip}\n  ports:\n  - name: p\n    port: {port}\n    protocol: {protocol}\n"
    );
    for line in extra_spec.lines() {
        let _ = writeln!(s, "  {line}");
    }
    s
}

/// A discovery.k8s.io/v1 EndpointSlice for `service` with one port.
pub fn slice(
    name: &str,
    service: &str,
    port: u16,
    protocol: &str,
    endpoints: &[(Ipv4Addr, Cond)],
) -> String {
    let eps: Vec<(IpAddr, Cond)> = endpoints.iter().map(|(a, c)| ((*a).into(), *c)).collect();
    slice_of("IPv4", name, service, port, protocol, &eps)
}

/// An IPv6 EndpointSlice (`addressType: IPv6`) for `service` with one port.
pub fn slice6(
    name: &str,
    service: &str,
    port: u16,
    protocol: &str,
    endpoints: &[(Ipv6Addr, Cond)],
) -> String {
    let eps: Vec<(IpAddr, Cond)> = endpoints.iter().map(|(a, c)| ((*a).into(), *c)).collect();
    slice_of("IPv6", name, service, port, protocol, &eps)
}

fn slice_of(
    family: &str,
    name: &str,
    service: &str,
    port: u16,
    protocol: &str,
    endpoints: &[(IpAddr, Cond)],
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {family}\nports:\n- name: p\n  port: {port}\n  protocol: {protocol}\nendpoints:\n"
    );
    if endpoints.is_empty() {
        s = s.replace("endpoints:\n", "endpoints: []\n");
    }
    for (addr, cond) in endpoints {
        let (ready, serving, terminating) = match cond {
            Cond::Ready => (true, true, false),
            Cond::Terminating => (false, true, true),
            Cond::NotReady => (false, false, false),
        };
        let _ = writeln!(
            s,
            "- addresses: [\"{addr}\"]\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}"
        );
    }
    s
}

/// Adds `targetRef`s naming each endpoint's Pod (as the EndpointSlice controller writes them)
/// to a slice made by [`slice`]: `pods[i]` is the Pod of the endpoint with address `ips[i]`.
pub fn with_target_refs(slice_yaml: &str, pods: &[(Ipv4Addr, &str)]) -> String {
    let mut s = slice_yaml.to_string();
    for (ip, pod) in pods {
        s = s.replace(
            &format!("- addresses: [\"{ip}\"]\n"),
            &format!(
                "- addresses: [\"{ip}\"]\n  targetRef: {{kind: Pod, name: {pod}, namespace: default}}\n"
            ),
        );
    }
    s
}

/// A Service plus its slice with all endpoints ready, as one multi-document file.
pub fn service_with_endpoints(
    name: &str,
    cluster_ip: &str,
    port: u16,
    protocol: &str,
    target: u16,
    ready: &[Ipv4Addr],
) -> String {
    let eps: Vec<_> = ready.iter().map(|a| (*a, Cond::Ready)).collect();
    format!(
        "{}---\n{}",
        service(name, cluster_ip, port, protocol, ""),
        slice(&format!("{name}-1"), name, target, protocol, &eps)
    )
}

/// A Service with one HTTP port (named `http`, so it goes through the L7 proxy) and its slice.
pub fn http_service(
    name: &str,
    cluster_ip: &str,
    port: u16,
    target: u16,
    ready: &[Ipv4Addr],
) -> String {
    service_with_endpoints(name, cluster_ip, port, "TCP", target, ready)
        .replace("- name: p\n", "- name: http\n")
}

/// A v1 Pod with an address and labels (for DestinationRule subsets).
pub fn pod(name: &str, ip: Ipv4Addr, labels: &[(&str, &str)]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n"
    );
    for (k, v) in labels {
        let _ = writeln!(s, "    {k}: {v}");
    }
    if labels.is_empty() {
        s = s.replace("  labels:\n", "");
    }
    let _ = write!(s, "status:\n  podIP: {ip}\n");
    s
}
