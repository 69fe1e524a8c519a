//! The manifests source: Kubernetes YAML in a directory, re-read when a file changes.
//!
//! Reads v1 `Service` and `discovery.k8s.io/v1` `EndpointSlice` objects from every `*.yaml`,
//! `*.yml` and `*.json` file (multi-document files included) and produces the desired [`State`].
//! A broken file or object is reported with the file, the object and the field, and the last good
//! content of that file keeps serving. Other kinds are ignored (logged at debug level).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::Deserialize;
use tracing::{debug, error, info};

use crate::istio;
use crate::model::{
    DETECT_TIMEOUT_ANNOTATION, Endpoint, EndpointPort, EndpointSlice, EndpointState,
    MODE_ANNOTATION, Mode, ObjectRef, PROTOCOL_ANNOTATION, PodInfo, Protocol, ProtocolHint,
    Service, ServicePort, State,
};

/// Default sessionAffinity ClientIP timeout (Kubernetes' default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// A problem with one manifest, precise enough for an operator to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {object}: field `{field}`: {message}")]
pub struct ManifestError {
    /// The file.
    pub file: String,
    /// `Kind namespace/name`, or `document N` when the object could not be identified.
    pub object: String,
    /// Path of the offending field (`spec.ports[0].port`), or `-` for the whole document.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

/// One object read from a file.
#[derive(Debug, Clone, PartialEq)]
enum Object {
    Service(Service),
    Slice(EndpointSlice),
    Pod(ObjectRef, PodInfo),
    VirtualService(ObjectRef, istio::VirtualService),
    DestinationRule(ObjectRef, istio::DestinationRule),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
}

#[derive(Debug)]
struct FileEntry {
    fingerprint: Fingerprint,
    /// The objects of the last version of this file that parsed without error.
    objects: Vec<Object>,
}

/// Reads a manifests directory, remembering the last good content of each file.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
}

/// Result of a rescan.
#[derive(Debug, Default)]
pub struct Scan {
    /// Whether any file was added, changed or removed.
    pub changed: bool,
    /// Problems found in changed files (their previous content keeps serving).
    pub errors: Vec<ManifestError>,
}

impl ManifestDir {
    /// A reader for `dir` (nothing is read yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads the files that changed since the last scan.
    pub fn rescan(&mut self) -> std::io::Result<Scan> {
        let mut scan = Scan::default();
        let mut seen = BTreeSet::new();
        let mut paths = Vec::new();
        collect_files(&self.dir, &mut paths)?;
        for path in paths {
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(_) => continue, // removed while listing; handled below
            };
            let fp = Fingerprint {
                modified: meta.modified().ok(),
                len: meta.len(),
            };
            seen.insert(path.clone());
            if self.files.get(&path).is_some_and(|e| e.fingerprint == fp) {
                continue;
            }
            scan.changed = true;
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    scan.errors.push(ManifestError {
                        file: path.display().to_string(),
                        object: "-".into(),
                        field: "-".into(),
                        message: format!("cannot read file: {e}"),
                    });
                    continue;
                }
            };
            let (objects, errors) = parse_file(&path.display().to_string(), &text);
            if errors.is_empty() {
                self.files.insert(
                    path,
                    FileEntry {
                        fingerprint: fp,
                        objects,
                    },
                );
            } else {
                scan.errors.extend(errors);
                // Keep the last good objects, but remember this version so the same broken
                // content is not reported again on every scan.
                let objects = self
                    .files
                    .remove(&path)
                    .map(|e| e.objects)
                    .unwrap_or_default();
                self.files.insert(
                    path,
                    FileEntry {
                        fingerprint: fp,
                        objects,
                    },
                );
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        scan.changed |= self.files.len() != before;
        Ok(scan)
    }

    /// The desired state from the last good content of every file.
    pub fn state(&self) -> (State, Vec<ManifestError>) {
        let mut st = State::default();
        let mut errors = Vec::new();
        for (path, entry) in &self.files {
            for obj in &entry.objects {
                let (kind, id, dup) = match obj {
                    Object::Service(s) => (
                        "Service",
                        &s.id,
                        st.services
                            .insert(s.id.clone(), std::sync::Arc::new(s.clone()))
                            .is_some(),
                    ),
                    Object::Slice(s) => (
                        "EndpointSlice",
                        &s.id,
                        st.slices
                            .insert(s.id.clone(), std::sync::Arc::new(s.clone()))
                            .is_some(),
                    ),
                    Object::Pod(id, p) => {
                        ("Pod", id, st.pods.insert(id.clone(), p.clone()).is_some())
                    }
                    Object::VirtualService(id, v) => (
                        "VirtualService",
                        id,
                        st.virtual_services.insert(id.clone(), v.clone()).is_some(),
                    ),
                    Object::DestinationRule(id, d) => (
                        "DestinationRule",
                        id,
                        st.destination_rules.insert(id.clone(), d.clone()).is_some(),
                    ),
                };
                if dup {
                    errors.push(ManifestError {
                        file: path.display().to_string(),
                        object: format!("{kind} {id}"),
                        field: "metadata.name".into(),
                        message: "defined more than once; the last definition wins".into(),
                    });
                }
            }
        }
        (st, errors)
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue; // editor swap files, ..data symlinks of ConfigMap volumes
        }
        if entry.file_type()?.is_dir() {
            collect_files(&path, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: HeadMeta,
}

#[derive(Deserialize, Default)]
struct HeadMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// Parses one file into objects; any error makes the whole file count as broken.
fn parse_file(file: &str, text: &str) -> (Vec<Object>, Vec<ManifestError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |object: String, field: String, message: String| ManifestError {
            file: file.to_string(),
            object,
            field,
            message,
        };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue, // empty document
            Ok(v) => v,
            Err(e) => {
                errors.push(err(
                    format!("document {}", i + 1),
                    "-".into(),
                    format!("invalid YAML: {e}"),
                ));
                break; // the parser cannot continue past a syntax error
            }
        };
        let head: Head = match serde_yaml::from_value(value.clone()) {
            Ok(h) => h,
            Err(e) => {
                errors.push(err(
                    format!("document {}", i + 1),
                    "-".into(),
                    format!("not a Kubernetes object: {e}"),
                ));
                continue;
            }
        };
        let ns = head
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let object = format!("{} {}/{}", head.kind, ns, head.metadata.name);
        let res = match (head.api_version.as_str(), head.kind.as_str()) {
            ("v1", "Service") => {
                typed::<core::Service>(value).and_then(|s| service(&s).map(Object::Service))
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                typed::<discovery::EndpointSlice>(value).and_then(|s| slice(&s).map(Object::Slice))
            }
            ("v1", "Pod") => typed::<core::Pod>(value).and_then(|p| pod(&p)),
            (v, "VirtualService") if istio::API_VERSIONS.contains(&v) => {
                let id = ObjectRef::new(ns.clone(), head.metadata.name.clone());
                istio_spec(&value)
                    .and_then(istio::virtual_service)
                    .map(|vs| Object::VirtualService(id, vs))
            }
            (v, "DestinationRule") if istio::API_VERSIONS.contains(&v) => {
                let id = ObjectRef::new(ns.clone(), head.metadata.name.clone());
                istio_spec(&value)
                    .and_then(istio::destination_rule)
                    .map(|dr| Object::DestinationRule(id, dr))
            }
            (_, "VirtualService" | "DestinationRule") => Err((
                "apiVersion".to_string(),
                format!(
                    "unsupported apiVersion {:?}: use one of {:?}",
                    head.api_version,
                    istio::API_VERSIONS
                ),
            )),
            (_, "Service" | "EndpointSlice") => Err((
                "apiVersion".to_string(),
                format!(
                    "unsupported apiVersion {:?} for {}: use v1 (Service) or discovery.k8s.io/v1 (EndpointSlice)",
                    head.api_version, head.kind
                ),
            )),
            _ => {
                debug!(
                    file,
                    object, "ignoring object of a kind this source does not read"
                );
                continue;
            }
        };
        match res {
            Ok(o) => objects.push(o),
            Err((field, message)) => errors.push(err(object, field, message)),
        }
    }
    (objects, errors)
}

/// A result whose error names the field and what is wrong with it.
pub type FieldResult<T> = Result<T, (String, String)>;

fn typed<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> FieldResult<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        (
            if path == "." { "-".into() } else { path },
            e.into_inner().to_string(),
        )
    })
}

fn protocol(field: String, p: Option<&str>) -> FieldResult<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err((
            field,
            format!("protocol {other:?} is not supported (TCP or UDP)"),
        )),
    }
}

fn port_number(field: String, p: i32) -> FieldResult<u16> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p != 0)
        .ok_or((field, format!("port {p} is out of range 1-65535")))
}

fn meta_ref(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> FieldResult<ObjectRef> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(("metadata.name".to_string(), "missing".to_string()))?;
    Ok(ObjectRef::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
    ))
}

fn istio_spec(value: &serde_yaml::Value) -> FieldResult<serde_yaml::Value> {
    value
        .get("spec")
        .cloned()
        .ok_or(("spec".to_string(), "missing".to_string()))
}

fn pod(p: &core::Pod) -> FieldResult<Object> {
    let id = meta_ref(&p.metadata)?;
    let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref());
    let Some(ip) = ip else {
        // A pod without an address is not running; nothing to select.
        return Ok(Object::Pod(
            id,
            PodInfo {
                ip: Ipv4Addr::UNSPECIFIED,
                labels: Default::default(),
            },
        ));
    };
    let ip: Ipv4Addr = ip.parse().map_err(|_| {
        (
            "status.podIP".to_string(),
            format!("{ip:?} is not an IPv4 address"),
        )
    })?;
    let labels = p
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok(Object::Pod(id, PodInfo { ip, labels }))
}

/// Validates a v1 Service into the model.
pub fn service(s: &core::Service) -> FieldResult<Service> {
    let id = meta_ref(&s.metadata)?;
    let spec = s
        .spec
        .as_ref()
        .ok_or(("spec".to_string(), "missing".to_string()))?;
    let ip = spec.cluster_ip.as_deref().ok_or((
        "spec.clusterIP".to_string(),
        "required in manifests mode (no API server allocates one); set an address from the service CIDR".to_string(),
    ))?;
    let cluster_ip: Ipv4Addr = match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4,
        Ok(IpAddr::V6(_)) => {
            return Err((
                "spec.clusterIP".into(),
                format!("{ip}: IPv6 ClusterIPs are not supported yet"),
            ));
        }
        Err(_) if ip == "None" => {
            return Err(("spec.clusterIP".into(), "headless Services (None) have no ClusterIP to serve; remove the object or set an address".into()));
        }
        Err(e) => {
            return Err((
                "spec.clusterIP".into(),
                format!("{ip:?} is not an IP address: {e}"),
            ));
        }
    };
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        if ports.iter().any(|q: &ServicePort| q.name == name) {
            return Err((
                format!("spec.ports[{i}].name"),
                format!("duplicate port name {name:?}"),
            ));
        }
        ports.push(ServicePort {
            name,
            port: port_number(format!("spec.ports[{i}].port"), p.port)?,
            protocol: protocol(format!("spec.ports[{i}].protocol"), p.protocol.as_deref())?,
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
                    return Err((
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!("{t} is out of range 1-86400"),
                    ));
                }
            }
        }
        Some(other) => {
            return Err((
                "spec.sessionAffinity".into(),
                format!("{other:?}: expected None or ClientIP"),
            ));
        }
    };
    let annotation = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MODE_ANNOTATION));
    let mode = match annotation.map(String::as_str) {
        None => None,
        Some("l4" | "L4") => Some(Mode::L4),
        Some("l7" | "L7") => Some(Mode::L7),
        Some(other) => {
            return Err((
                format!("metadata.annotations[{MODE_ANNOTATION}]"),
                format!("{other:?}: expected l4 or l7"),
            ));
        }
    };
    let annotation = |key: &str| {
        s.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    let opaque = match annotation(PROTOCOL_ANNOTATION) {
        None | Some("detect") => false,
        Some("opaque") => true,
        Some(other) => {
            return Err((
                format!("metadata.annotations[{PROTOCOL_ANNOTATION}]"),
                format!("{other:?}: expected detect or opaque"),
            ));
        }
    };
    let detect_timeout = match annotation(DETECT_TIMEOUT_ANNOTATION) {
        None => None,
        Some(v) => {
            let field = format!("metadata.annotations[{DETECT_TIMEOUT_ANNOTATION}]");
            let d = crate::istio::duration(&field, v)?;
            if d.is_zero() || d > std::time::Duration::from_secs(60) {
                return Err((field, format!("{v:?}: expected a duration from 1ms to 60s")));
            }
            Some(d)
        }
    };
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    Ok(Service {
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
    })
}

/// Validates a discovery.k8s.io/v1 EndpointSlice into the model.
pub fn slice(s: &discovery::EndpointSlice) -> FieldResult<EndpointSlice> {
    let id = meta_ref(&s.metadata)?;
    if s.address_type != "IPv4" {
        return Err((
            "addressType".into(),
            format!("{:?} is not supported (IPv4)", s.address_type),
        ));
    }
    let svc_name = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .ok_or((
            "metadata.labels".to_string(),
            "label kubernetes.io/service-name is required: it names the Service this slice belongs to".to_string(),
        ))?;
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
            return Err((
                format!("endpoints[{i}].addresses"),
                "at least one address is required".into(),
            ));
        }
        // Kubernetes consumers use the first address (the others are fungible duplicates).
        let a = &ep.addresses[0];
        let addr: Ipv4Addr = a.parse().map_err(|_| {
            (
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
    })
}

/// Watches `dir` and sends the desired state whenever it changes, until the receiver is gone.
///
/// Polls file fingerprints every `interval`; a state identical to the last one sent is not sent.
pub async fn watch(
    dir: PathBuf,
    interval: Duration,
    tx: tokio::sync::watch::Sender<Option<std::sync::Arc<State>>>,
) {
    let mut reader = ManifestDir::new(&dir);
    let mut dir_errors = crate::ratelog::RateLimitedLog::every(Duration::from_secs(10));
    let mut first = true;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Parsing a large file takes a while: let the runtime's other tasks move elsewhere.
        let scan = match tokio::task::block_in_place(|| reader.rescan()) {
            Ok(s) => s,
            Err(e) => {
                if let Some(suppressed) = dir_errors.ready() {
                    error!(dir = %dir.display(), error = %e, suppressed, "cannot read the manifests directory; keeping the last good state");
                }
                continue;
            }
        };
        for e in &scan.errors {
            error!(file = %e.file, object = %e.object, field = %e.field, "{}; the last good version of this file keeps serving", e.message);
        }
        if !scan.changed && !first {
            continue;
        }
        if first && !scan.errors.is_empty() && reader.state().0 == State::default() {
            // Nothing good was ever read: do not program an empty state over the pinned one.
            error!(dir = %dir.display(), "no valid manifest yet; keeping the datapath as it is until one is readable");
            continue;
        }
        first = false;
        let (state, errors) = reader.state();
        for e in &errors {
            error!(file = %e.file, object = %e.object, field = %e.field, "{}", e.message);
        }
        info!(
            services = state.services.len(),
            slices = state.slices.len(),
            "manifests read"
        );
        crate::model::publish(&tx, state);
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [198.18.0.2]
- addresses: [198.18.0.3]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
"#;

    #[test]
    fn parses_services_and_slices() {
        let (objs, errs) = parse_file("a.yaml", GOOD);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(objs.len(), 2);
        let Object::Service(s) = &objs[0] else {
            panic!("{objs:?}")
        };
        assert_eq!(s.id.to_string(), "shop/web");
        assert_eq!(s.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
        let Object::Slice(sl) = &objs[1] else {
            panic!("{objs:?}")
        };
        assert_eq!(sl.service.to_string(), "shop/web");
        assert_eq!(sl.endpoints[1].state, EndpointState::ServingTerminating);
    }

    #[test]
    fn errors_name_file_object_and_field() {
        let bad = GOOD.replace("port: 80,", "port: eighty,");
        let (_, errs) = parse_file("a.yaml", &bad);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].object, "Service shop/web");
        assert_eq!(errs[0].field, "spec.ports[0].port");
        assert_eq!(errs[0].file, "a.yaml");

        let no_ip = GOOD.replace("  clusterIP: 198.19.0.10\n", "");
        let (_, errs) = parse_file("a.yaml", &no_ip);
        assert_eq!(errs[0].field, "spec.clusterIP");

        let no_label = GOOD.replace("  labels: {kubernetes.io/service-name: web}\n", "");
        let (_, errs) = parse_file("a.yaml", &no_label);
        assert_eq!(
            (errs[0].object.as_str(), errs[0].field.as_str()),
            ("EndpointSlice shop/web-abc", "metadata.labels")
        );

        let (_, errs) = parse_file("a.yaml", "kind: [oops");
        assert_eq!(errs[0].object, "document 1");
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = std::env::temp_dir().join(format!("pxa-manifests-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("web.yaml");
        fs::write(&f, GOOD).unwrap();
        let mut m = ManifestDir::new(&dir);
        let scan = m.rescan().unwrap();
        assert!(scan.changed && scan.errors.is_empty());
        let good = m.state().0;
        assert_eq!(good.services.len(), 1);

        fs::write(&f, GOOD.replace("198.19.0.10", "not-an-ip")).unwrap();
        let scan = m.rescan().unwrap();
        assert_eq!(scan.errors.len(), 1);
        assert_eq!(scan.errors[0].field, "spec.clusterIP");
        assert_eq!(m.state().0, good, "the last good content must keep serving");

        fs::remove_file(&f).unwrap();
        let scan = m.rescan().unwrap();
        assert!(scan.changed);
        assert!(m.state().0.services.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
