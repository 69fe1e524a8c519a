//! The manifests source: Kubernetes YAML in a directory, re-read when a file changes.
//!
//! Reads v1 `Service`, `Pod`, `discovery.k8s.io/v1` `EndpointSlice` and Istio
//! `VirtualService`/`DestinationRule` objects from every `*.yaml`, `*.yml` and `*.json` file
//! (multi-document files included) and produces the desired [`State`]. A broken file or object
//! is reported with the file, the object and the field, and the last good content of that file
//! keeps serving. A file is read again only when its size or modification time changes, and a
//! file over the size limit is refused without being read. Where an API server would refuse an
//! object, this source does too: names follow Kubernetes' rules, and a ClusterIP port claimed by
//! a second Service stays with its first owner. Other kinds are ignored (logged at debug level).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::Deserialize;
use tracing::{debug, error, info};

use super::convert::{self, FieldError, NameRule};
use super::report::{Problem, Reporter};
use crate::gateway;
use crate::istio;
use crate::model::{EndpointSlice, ObjectRef, PodInfo, Protocol, Service, State};

/// Largest manifest file read by default (`--max-manifest-bytes`); larger files are refused.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

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

impl ManifestError {
    /// The problem as the reporter lists it.
    pub fn problem(&self, effect: &str) -> Problem {
        let (kind, object) = match self.object.split_once(' ') {
            Some((k, o)) if k != "document" => (k.to_string(), o.to_string()),
            _ => ("File".to_string(), self.object.clone()),
        };
        Problem {
            kind,
            object,
            file: Some(self.file.clone()),
            field: self.field.clone(),
            message: self.message.clone(),
            effect: effect.to_string(),
            reference: None,
        }
    }
}

/// One object read from a file.
#[derive(Debug, Clone, PartialEq)]
enum Object {
    Service(Service),
    Slice(EndpointSlice),
    Pod(ObjectRef, PodInfo),
    VirtualService(ObjectRef, istio::VirtualService),
    DestinationRule(ObjectRef, istio::DestinationRule),
    MeshRoute(ObjectRef, gateway::MeshRoute),
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
    /// Problems of the current version (empty when it parsed).
    errors: Vec<ManifestError>,
}

/// Reads a manifests directory, remembering the last good content of each file.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    max_file_bytes: u64,
    /// Which Service owns each ClusterIP port, so a second claimant never takes it over.
    owners: HashMap<(IpAddr, u16, Protocol), ObjectRef>,
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
    /// A reader for `dir` (nothing is read yet), refusing files over the default size limit.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_limit(dir, DEFAULT_MAX_FILE_BYTES)
    }

    /// A reader for `dir` refusing files larger than `max_file_bytes`.
    pub fn with_limit(dir: impl Into<PathBuf>, max_file_bytes: u64) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            max_file_bytes,
            owners: HashMap::new(),
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
            let file = path.display().to_string();
            let whole = |message: String| ManifestError {
                file: file.clone(),
                object: "-".into(),
                field: "-".into(),
                message,
            };
            let parsed = if fp.len > self.max_file_bytes {
                Err(vec![whole(format!(
                    "{} bytes is over the limit of {} bytes: split it into smaller files or raise --max-manifest-bytes",
                    fp.len, self.max_file_bytes
                ))])
            } else {
                match fs::read(&path).map(String::from_utf8) {
                    Ok(Ok(text)) => match parse_file(&file, &text) {
                        (objects, errors) if errors.is_empty() => Ok(objects),
                        (_, errors) => Err(errors),
                    },
                    Ok(Err(e)) => Err(vec![whole(format!("not UTF-8 text: {e}"))]),
                    Err(e) => Err(vec![whole(format!("cannot read file: {e}"))]),
                }
            };
            // The fingerprint is remembered either way: the same broken version is neither
            // re-read nor reported again until the file changes.
            let entry = match parsed {
                Ok(objects) => FileEntry {
                    fingerprint: fp,
                    objects,
                    errors: Vec::new(),
                },
                Err(errors) => {
                    scan.errors.extend(errors.iter().cloned());
                    FileEntry {
                        fingerprint: fp,
                        objects: self
                            .files
                            .remove(&path)
                            .map(|e| e.objects)
                            .unwrap_or_default(),
                        errors,
                    }
                }
            };
            self.files.insert(path, entry);
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        scan.changed |= self.files.len() != before;
        Ok(scan)
    }

    /// The problems of each file's current version, by file.
    pub fn file_errors(&self) -> impl Iterator<Item = (&Path, &[ManifestError])> {
        self.files
            .iter()
            .map(|(p, e)| (p.as_path(), e.errors.as_slice()))
    }

    /// The desired state from the last good content of every file, with the objects an API
    /// server would have refused left out (and reported).
    pub fn state(&mut self) -> (State, Vec<ManifestError>) {
        let mut st = State::default();
        let mut errors = Vec::new();
        for (path, entry) in &self.files {
            for obj in &entry.objects {
                let (kind, id, dup) = match obj {
                    Object::Service(s) => (
                        "Service",
                        &s.id,
                        st.services
                            .insert(s.id.clone(), Arc::new(s.clone()))
                            .is_some(),
                    ),
                    Object::Slice(s) => (
                        "EndpointSlice",
                        &s.id,
                        st.slices
                            .insert(s.id.clone(), Arc::new(s.clone()))
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
                    Object::MeshRoute(id, r) => (
                        r.kind.name(),
                        id,
                        st.mesh_routes
                            .insert((r.kind, id.clone()), r.clone())
                            .is_some(),
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
        errors.extend(self.claim_cluster_ips(&mut st));
        (st, errors)
    }

    /// Gives each ClusterIP port to one Service: the one that had it before, else the first in
    /// name order. Every other claimant is left out of the state (an API server would have
    /// refused to create it) and reported.
    fn claim_cluster_ips(&mut self, st: &mut State) -> Vec<ManifestError> {
        let file_of = |id: &ObjectRef| {
            self.files
                .iter()
                .find(|(_, e)| {
                    e.objects
                        .iter()
                        .any(|o| matches!(o, Object::Service(s) if s.id == *id))
                })
                .map_or("-".to_string(), |(p, _)| p.display().to_string())
        };
        let mut owners: HashMap<(IpAddr, u16, Protocol), ObjectRef> = HashMap::new();
        let mut refused: BTreeMap<ObjectRef, (&'static str, String)> = BTreeMap::new();
        // Previous owners claim first, then the others in name order.
        let mut order: Vec<&Arc<Service>> = st.services.values().collect();
        order.sort_by_key(|s| {
            let had = claims(s)
                .iter()
                .any(|c| self.owners.get(&c.0) == Some(&s.id));
            (!had, s.id.clone())
        });
        for svc in order {
            let mine = claims(svc);
            let clash = mine
                .iter()
                .find_map(|c| owners.get(&c.0).map(|o| (c, o.clone())));
            match clash {
                Some(((k, what), owner)) => {
                    let at = if k.0.is_unspecified() {
                        format!("NodePort {}/{}", k.1, k.2)
                    } else {
                        format!("{}:{}/{}", k.0, k.1, k.2)
                    };
                    refused.insert(
                        svc.id.clone(),
                        (
                            what,
                            format!(
                                "{at} already belongs to Service {owner}; this Service is not served until it has an address of its own"
                            ),
                        ),
                    );
                }
                None => {
                    for (k, _) in mine {
                        owners.insert(k, svc.id.clone());
                    }
                }
            }
        }
        let errors = refused
            .iter()
            .map(|(id, (field, message))| ManifestError {
                file: file_of(id),
                object: format!("Service {id}"),
                field: field.to_string(),
                message: message.clone(),
            })
            .collect();
        for id in refused.keys() {
            st.services.remove(id);
        }
        self.owners = owners;
        errors
    }
}

/// Every (address, port, protocol) a Service answers on, with the field that claims it: its
/// ClusterIP ports, NodePorts (address 0.0.0.0), LoadBalancer ingress IPs and externalIPs.
fn claims(s: &Service) -> Vec<((IpAddr, u16, Protocol), &'static str)> {
    let mut out = Vec::new();
    for p in &s.ports {
        for ip in &s.cluster_ips {
            out.push(((*ip, p.port, p.protocol), "spec.clusterIP"));
        }
        if let Some(np) = p.node_port {
            out.push((
                (Ipv4Addr::UNSPECIFIED.into(), np, p.protocol),
                "spec.ports[].nodePort",
            ));
        }
        for ip in &s.north_south.lb_ips {
            out.push((
                ((*ip).into(), p.port, p.protocol),
                "status.loadBalancer.ingress",
            ));
        }
        for ip in &s.north_south.external_ips {
            out.push((((*ip).into(), p.port, p.protocol), "spec.externalIPs"));
        }
    }
    out
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
        let istio_id = || -> Result<ObjectRef, FieldError> {
            let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(head.metadata.name.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            };
            convert::meta_ref(&meta, NameRule::Dns1123Subdomain)
        };
        let res = match (head.api_version.as_str(), head.kind.as_str()) {
            ("v1", "Service") => {
                match convert::typed::<core::Service>(value).and_then(|s| convert::service(&s)) {
                    Ok(Ok(s)) => Ok(Object::Service(s)),
                    Ok(Err(why)) => {
                        debug!(
                            file,
                            object,
                            ?why,
                            "not programmed: kube-proxy leaves such Services alone"
                        );
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                convert::typed::<discovery::EndpointSlice>(value)
                    .and_then(|s| convert::slice(&s).map(Object::Slice))
            }
            ("v1", "Pod") => convert::typed::<core::Pod>(value)
                .and_then(|p| convert::pod(&p).map(|(id, p)| Object::Pod(id, p))),
            (v, "VirtualService") if istio::API_VERSIONS.contains(&v) => {
                istio_id().and_then(|id| {
                    convert::spec_of(&value)
                        .and_then(istio::virtual_service)
                        .map(|vs| Object::VirtualService(id, vs))
                })
            }
            (v, "DestinationRule") if istio::API_VERSIONS.contains(&v) => {
                istio_id().and_then(|id| {
                    convert::spec_of(&value)
                        .and_then(istio::destination_rule)
                        .map(|dr| Object::DestinationRule(id, dr))
                })
            }
            (v, k) if gateway::API_VERSIONS.contains(&v) && gateway::kind_of(k).is_some() => {
                let kind = gateway::kind_of(k).expect("checked");
                let meta = gateway::Meta::of(&value);
                istio_id().and_then(|id| {
                    convert::spec_of(&value)
                        .and_then(|spec| gateway::route(kind, spec, &meta))
                        .map(|r| Object::MeshRoute(id, r))
                })
            }
            (_, "HTTPRoute" | "GRPCRoute") => Err(FieldError::new(
                "apiVersion",
                format!(
                    "unsupported apiVersion {:?}: use {}",
                    head.api_version,
                    gateway::API_VERSIONS[0]
                ),
            )),
            (_, "VirtualService" | "DestinationRule") => Err(FieldError::new(
                "apiVersion",
                format!(
                    "unsupported apiVersion {:?}: use one of {:?}",
                    head.api_version,
                    istio::API_VERSIONS
                ),
            )),
            (_, "Service" | "EndpointSlice") => Err(FieldError::new(
                "apiVersion",
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
            Err(e) => errors.push(err(object, e.field, e.message)),
        }
    }
    (objects, errors)
}

/// Settings of the manifests source.
#[derive(Clone, Debug)]
pub struct DirConfig {
    /// The directory.
    pub dir: PathBuf,
    /// How often file fingerprints are checked.
    pub interval: Duration,
    /// Largest file read.
    pub max_file_bytes: u64,
}

/// Watches the directory and sends the desired state whenever it changes, until the receiver
/// is gone. Problems go to `reporter` (scope `file:PATH` per file, `manifests` for conflicts
/// between files).
///
/// Polls file fingerprints every `interval`; a state identical to the last one sent is not sent.
pub async fn watch(
    cfg: DirConfig,
    tx: tokio::sync::watch::Sender<Option<Arc<State>>>,
    reporter: Reporter,
    progress: Arc<super::Progress>,
) {
    let dir = cfg.dir.clone();
    let mut reader = ManifestDir::with_limit(&dir, cfg.max_file_bytes);
    let mut dir_errors = crate::ratelog::RateLimitedLog::every(Duration::from_secs(10));
    let mut first = true;
    let mut tick = tokio::time::interval(cfg.interval);
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
        if !scan.changed && !first {
            continue;
        }
        let files: Vec<(String, Vec<Problem>)> = reader
            .file_errors()
            .map(|(p, errs)| {
                (
                    format!("file:{}", p.display()),
                    errs.iter()
                        .map(|e| e.problem("the last good version of this file keeps serving"))
                        .collect(),
                )
            })
            .collect();
        reporter.retain_scopes("file:", |s| files.iter().any(|(f, _)| f == s));
        for (scope, problems) in files {
            reporter.replace(&scope, problems);
        }
        let (state, errors) = reader.state();
        if first && !scan.errors.is_empty() && state == State::default() {
            // Nothing good was ever read: do not program an empty state over the pinned one.
            error!(dir = %dir.display(), "no valid manifest yet; keeping the datapath as it is until one is readable");
            continue;
        }
        first = false;
        reporter.replace(
            "manifests",
            errors
                .iter()
                .map(|e| e.problem("the rest of the directory serves"))
                .collect(),
        );
        info!(
            services = state.services.len(),
            slices = state.slices.len(),
            "manifests read"
        );
        crate::model::publish(&tx, state);
        progress.read_done();
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EndpointState;
    use convert::DEFAULT_AFFINITY_TIMEOUT_S;

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

    fn tmpdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pxa-manifests-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_over_the_limit_are_refused_and_broken_files_are_read_once() {
        let dir = tmpdir("limit");
        let f = dir.join("web.yaml");
        fs::write(&f, GOOD).unwrap();
        let mut m = ManifestDir::with_limit(&dir, 4096);
        assert!(m.rescan().unwrap().errors.is_empty());
        let good = m.state().0;
        let big = format!("{GOOD}\n#{}\n", "x".repeat(5000));
        fs::write(&f, &big).unwrap();
        let scan = m.rescan().unwrap();
        assert_eq!(scan.errors.len(), 1);
        assert!(
            scan.errors[0]
                .message
                .contains("over the limit of 4096 bytes"),
            "{:?}",
            scan.errors
        );
        assert_eq!(m.state().0, good, "the last good content keeps serving");
        // Not UTF-8: reported once, not re-read while unchanged.
        fs::write(&f, b"\xff\xfe\x00garbage").unwrap();
        let scan = m.rescan().unwrap();
        assert!(
            scan.errors[0].message.contains("UTF-8"),
            "{:?}",
            scan.errors
        );
        let again = m.rescan().unwrap();
        assert!(!again.changed && again.errors.is_empty(), "{again:?}");
        assert_eq!(m.file_errors().map(|(_, e)| e.len()).sum::<usize>(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cluster_ip_port_stays_with_its_first_owner() {
        let dir = tmpdir("owner");
        let svc = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{{port: 80}}]\n"
            )
        };
        fs::write(dir.join("b.yaml"), svc("zeta")).unwrap();
        let mut m = ManifestDir::new(&dir);
        m.rescan().unwrap();
        assert!(
            m.state()
                .0
                .services
                .contains_key(&ObjectRef::new("default", "zeta"))
        );
        // "alpha" sorts first but arrives second: zeta keeps the address.
        fs::write(dir.join("a.yaml"), svc("alpha")).unwrap();
        m.rescan().unwrap();
        let (st, errors) = m.state();
        assert_eq!(
            st.services
                .keys()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>(),
            ["zeta"]
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].object.as_str(), errors[0].field.as_str()),
            ("Service default/alpha", "spec.clusterIP")
        );
        assert!(
            errors[0]
                .message
                .contains("already belongs to Service default/zeta"),
            "{errors:?}"
        );
        assert!(errors[0].file.ends_with("a.yaml"), "{errors:?}");
        // Once zeta goes, alpha gets it.
        fs::remove_file(dir.join("b.yaml")).unwrap();
        m.rescan().unwrap();
        let (st, errors) = m.state();
        assert!(
            errors.is_empty()
                && st
                    .services
                    .contains_key(&ObjectRef::new("default", "alpha"))
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_an_api_server_would_refuse_are_refused() {
        let long = GOOD.replacen("name: web,", &format!("name: {},", "w".repeat(300)), 1);
        let (_, errs) = parse_file("a.yaml", &long);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "metadata.name");
        assert!(errs[0].message.contains("at most 63"), "{errs:?}");
        let (_, errs) = parse_file("a.yaml", &GOOD.replacen("name: web,", "name: Web_1,", 1));
        assert_eq!(errs[0].field, "metadata.name", "{errs:?}");
    }
}
