//! A Kubernetes API server double: a small real HTTP server speaking the list/watch protocol well
//! enough for kube-rs clients (`watcher`, `metadata_watcher`, `events::Recorder`).
//!
//! Served resources (JSON only, namespaced, listed and watched across all namespaces at the
//! collection path or per namespace under `namespaces/{ns}/`):
//! `v1` services and pods, `discovery.k8s.io/v1` endpointslices, `networking.istio.io`
//! virtualservices and destinationrules (stored once, served as `v1`, `v1beta1` and `v1alpha3`)
//! `gateway.networking.k8s.io/v1` httproutes and grpcroutes (with a `status` subresource that
//! takes merge patches of `status` only) and `events.k8s.io/v1` events (which clients create
//! with POST and update with merge PATCH).
//! Anything else answers 404 with a `Status`. Lists honour `limit`/`continue`; watches replay
//! history from `resourceVersion`, send BOOKMARKs about every second when allowed, end after
//! `timeoutSeconds`, and support streaming lists (`sendInitialEvents=true`). Objects can also be
//! read, created, replaced (PUT), merge-patched and deleted over HTTP; `GET /version` answers.
//! Label and field selectors are ignored.
//!
//! The resourceVersion is one global counter. Every change is kept in a history so that a watch
//! resuming from an old resourceVersion replays what it missed, until [`ApiServer::compact`]
//! forgets the history (such a watch then gets `410 Gone`). The test controls outages:
//! [`ApiServer::drop_connections`], [`ApiServer::stop`] and [`ApiServer::start_again`].
//!
//! The server runs on its own thread with a current-thread tokio runtime, which first enters the
//! given network namespace, so every listening socket (also after a restart) lives there.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng as _;
use serde::Deserialize as _;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Interval of BOOKMARK events on watches that allow them.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Live changes buffered per watch before a slow watch is ended (its client resumes from history).
const BROADCAST_CAPACITY: usize = 4096;
/// History length that triggers dropping the oldest changes (as if compacted).
const MAX_HISTORY: usize = 100_000;

/// A resource type the double serves.
struct Kind {
    group: &'static str,
    versions: &'static [&'static str],
    plural: &'static str,
    kind: &'static str,
    /// Cluster-scoped kinds (Namespace, CRD, ClusterRole...) are stored under namespace "".
    namespaced: bool,
}

const ISTIO_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];

/// Every served resource type; an index into this table identifies a type.
const KINDS: &[Kind] = &[
    Kind {
        group: "",
        versions: &["v1"],
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    Kind {
        group: "",
        versions: &["v1"],
        plural: "pods",
        kind: "Pod",
        namespaced: true,
    },
    Kind {
        group: "discovery.k8s.io",
        versions: &["v1"],
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Kind {
        group: "networking.istio.io",
        versions: ISTIO_VERSIONS,
        plural: "virtualservices",
        kind: "VirtualService",
        namespaced: true,
    },
    Kind {
        group: "networking.istio.io",
        versions: ISTIO_VERSIONS,
        plural: "destinationrules",
        kind: "DestinationRule",
        namespaced: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        versions: &["v1"],
        plural: "httproutes",
        kind: "HTTPRoute",
        namespaced: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        versions: &["v1"],
        plural: "grpcroutes",
        kind: "GRPCRoute",
        namespaced: true,
    },
    Kind {
        group: "events.k8s.io",
        versions: &["v1"],
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
    Kind {
        group: "",
        versions: &["v1"],
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    Kind {
        group: "",
        versions: &["v1"],
        plural: "nodes",
        kind: "Node",
        namespaced: false,
    },
    Kind {
        group: "",
        versions: &["v1"],
        plural: "serviceaccounts",
        kind: "ServiceAccount",
        namespaced: true,
    },
    Kind {
        group: "",
        versions: &["v1"],
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
    },
    Kind {
        group: "apps",
        versions: &["v1"],
        plural: "daemonsets",
        kind: "DaemonSet",
        namespaced: true,
    },
    Kind {
        group: "rbac.authorization.k8s.io",
        versions: &["v1"],
        plural: "clusterroles",
        kind: "ClusterRole",
        namespaced: false,
    },
    Kind {
        group: "rbac.authorization.k8s.io",
        versions: &["v1"],
        plural: "clusterrolebindings",
        kind: "ClusterRoleBinding",
        namespaced: false,
    },
    Kind {
        group: "apiextensions.k8s.io",
        versions: &["v1"],
        plural: "customresourcedefinitions",
        kind: "CustomResourceDefinition",
        namespaced: false,
    },
];

/// Index of `events.k8s.io/v1` Event in [`KINDS`].
/// (Kinds after it are what `kubectl apply -k deploy/` installs.)
const EVENTS: usize = 7;

/// `apiVersion` of type `kind` in `version`.
fn api_version(kind: usize, version: &str) -> String {
    match KINDS[kind].group {
        "" => version.to_string(),
        group => format!("{group}/{version}"),
    }
}

/// The type of an object from its `apiVersion` (any served version of the group) and `kind`.
fn kind_of(api_version: &str, kind: &str) -> Option<usize> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    KINDS
        .iter()
        .position(|k| k.group == group && k.kind == kind)
}

/// Store key: type, namespace, name (so iteration is sorted by namespace/name per type).
type Key = (usize, String, String);

/// The store namespace of a request: "" for cluster-scoped kinds, else the path's namespace
/// (or `default`).
fn ns_of(kind: usize, namespace: Option<&str>) -> String {
    if KINDS[kind].namespaced {
        namespace.unwrap_or("default").to_string()
    } else {
        String::new()
    }
}

fn kind_range(kind: usize) -> Range<Key> {
    (kind, String::new(), String::new())..(kind + 1, String::new(), String::new())
}

/// One change of one object, as watch events report it.
struct Change {
    rv: u64,
    kind: usize,
    namespace: String,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    event: &'static str,
    /// The object after the change (for DELETED, its last state with the deletion's rv).
    object: Value,
}

#[derive(Default)]
struct Store {
    /// The global resourceVersion: that of the latest change.
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    /// Changes with rv > `compacted`, oldest first.
    history: Vec<Arc<Change>>,
}

/// An API error answered as a `Status`.
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn status(&self) -> Value {
        status_json(self.code.as_u16(), self.reason, &self.message)
    }
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// How a write treats an existing object.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Fails with 409 if it exists.
    Create,
    /// Fails with 404 if it does not exist.
    Replace,
    /// Creates or replaces.
    Upsert,
}

/// State shared by the server thread and the controlling [`ApiServer`].
struct Shared {
    store: Mutex<Store>,
    /// Every change, as it is committed (under the store lock), to the open watches.
    changes: broadcast::Sender<Arc<Change>>,
    requests: Mutex<Vec<String>>,
    open_watches: Arc<AtomicUsize>,
    security: Security,
    /// Every resource request with its authorization verdict.
    accesses: Mutex<Vec<Access>>,
}

/// How the double authenticates and authorizes, to stand in for a real cluster's API server
/// as an in-cluster agent sees it.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// Serve HTTPS with a certificate for 127.0.0.1 signed by [`ApiServer::ca_pem`]'s CA.
    pub tls: bool,
    /// Accept only this bearer token (401 otherwise).
    pub token: Option<String>,
    /// Allow only what these ClusterRole rules allow (403 otherwise).
    pub rules: Option<Vec<Rule>>,
}

/// One ClusterRole rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `apiGroups` ("" is core; "*" any).
    pub api_groups: Vec<String>,
    /// `resources` ("*" any).
    pub resources: Vec<String>,
    /// `verbs` ("*" any).
    pub verbs: Vec<String>,
}

impl Rule {
    /// Whether this rule allows `verb` on `group`/`resource`.
    pub fn allows(&self, verb: &str, group: &str, resource: &str) -> bool {
        let any = |v: &[String], x: &str| v.iter().any(|e| e == "*" || e == x);
        any(&self.api_groups, group) && any(&self.resources, resource) && any(&self.verbs, verb)
    }
}

/// One authorization decision of a resource request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// API group ("" for core).
    pub group: String,
    /// Resource (plural).
    pub resource: String,
    /// Namespace of the request (`None`: all namespaces or cluster-scoped).
    pub namespace: Option<String>,
    /// Whether the rules allowed it.
    pub allowed: bool,
}

/// The RBAC verb of a request on a route.
fn verb_of(method: &Method, named: bool, watch: bool) -> &'static str {
    match (method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => "unknown",
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Creates or replaces an object of type `kind` in `namespace`, stamping its type fields,
    /// namespace, name (from `generateName` if needed), uid, creationTimestamp and
    /// resourceVersion. Returns the stored object.
    fn write(
        &self,
        kind: usize,
        namespace: &str,
        mut obj: Value,
        mode: Mode,
    ) -> Result<Value, ApiError> {
        let new_spec = obj.get("spec").cloned();
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request("the object is not a JSON object"));
        };
        let given = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let version = KINDS[kind]
            .versions
            .iter()
            .find(|v| given.rsplit('/').next() == Some(**v))
            .unwrap_or(&KINDS[kind].versions[0]);
        map.insert("apiVersion".into(), api_version(kind, version).into());
        map.insert("kind".into(), KINDS[kind].kind.into());
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::bad_request("metadata is not a JSON object"));
        };
        if KINDS[kind].namespaced {
            meta.insert("namespace".into(), namespace.into());
        } else {
            meta.remove("namespace");
        }
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", random_suffix()),
                _ => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name or metadata.generateName is required",
                    ));
                }
            },
        };
        meta.insert("name".into(), name.clone().into());

        let mut st = self.store();
        let key = (kind, namespace.to_string(), name);
        let old = st.objects.get(&key);
        match (mode, old) {
            (Mode::Create, Some(_)) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{} \"{}\" already exists", KINDS[kind].plural, key.2),
                ));
            }
            (Mode::Replace, None) => {
                return Err(ApiError::not_found(format!(
                    "{} \"{}\" not found",
                    KINDS[kind].plural, key.2
                )));
            }
            _ => {}
        }
        // metadata.generation: 1, then +1 whenever the spec changes (status writes keep it).
        let generation = match old {
            Some(old) => {
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                if old.get("spec") == new_spec.as_ref() {
                    g
                } else {
                    g + 1
                }
            }
            None => 1,
        };
        let (uid, created, event) = match old {
            Some(old) => (
                old["metadata"]["uid"].clone(),
                old["metadata"]["creationTimestamp"].clone(),
                "MODIFIED",
            ),
            None => (
                uuid::Uuid::new_v4().to_string().into(),
                now_rfc3339().into(),
                "ADDED",
            ),
        };
        meta.insert("uid".into(), uid);
        meta.insert("creationTimestamp".into(), created);
        meta.insert("generation".into(), generation.into());
        Ok(self.commit(&mut st, key, event, obj))
    }

    /// Deletes an object; returns its last state (with the deletion's resourceVersion).
    fn remove(&self, key: Key) -> Option<Value> {
        let mut st = self.store();
        let obj = st.objects.get(&key)?.clone();
        Some(self.commit(&mut st, key, "DELETED", obj))
    }

    /// Applies one change: next resourceVersion, store, history, watchers.
    fn commit(&self, st: &mut Store, key: Key, event: &'static str, mut obj: Value) -> Value {
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = st.rv.to_string().into();
        if event == "DELETED" {
            st.objects.remove(&key);
        } else {
            st.objects.insert(key.clone(), obj.clone());
        }
        let change = Arc::new(Change {
            rv: st.rv,
            kind: key.0,
            namespace: key.1,
            event,
            object: obj.clone(),
        });
        st.history.push(change.clone());
        if st.history.len() > MAX_HISTORY {
            let dropped: Vec<_> = st.history.drain(..MAX_HISTORY / 10).collect();
            st.compacted = dropped.last().map_or(st.compacted, |c| c.rv);
        }
        // An error only means that no watch is open.
        let _ = self.changes.send(change);
        obj
    }
}

/// Five characters as Kubernetes appends to a `generateName`.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// The current time as an RFC 3339 UTC timestamp with second precision.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Commands from the controlling thread to the server thread.
enum Control {
    DropConnections,
    Stop,
    Listen,
    Shutdown,
}

type Ack = std::sync::mpsc::Sender<Result<(), String>>;

/// A Kubernetes API server double on 127.0.0.1 (see the module documentation).
///
/// Control methods may be called from any thread, also from inside a tokio runtime; those that
/// affect connections return once the server thread has carried them out.
pub struct ApiServer {
    shared: Arc<Shared>,
    port: u16,
    control: mpsc::UnboundedSender<(Control, Ack)>,
    thread: Option<JoinHandle<()>>,
    ca_pem: Option<String>,
}

impl ApiServer {
    /// Starts listening on 127.0.0.1:<ephemeral port>. If `netns` is Some(path to
    /// /run/netns/NAME), the server thread first enters that network namespace with setns(2)
    /// (CLONE_NEWNET, only that thread) so the listening socket lives there.
    ///
    /// Panics if the namespace cannot be entered or the socket not bound.
    pub fn start(netns: Option<&Path>) -> ApiServer {
        Self::start_secure(netns, Security::default())
    }

    /// Like [`ApiServer::start`], with TLS, a token and RBAC as `security` says.
    pub fn start_secure(netns: Option<&Path>, security: Security) -> ApiServer {
        let tls = security.tls.then(tls::Tls::generate);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes: broadcast::channel(BROADCAST_CAPACITY).0,
            requests: Mutex::new(Vec::new()),
            open_watches: Arc::new(AtomicUsize::new(0)),
            security,
            accesses: Mutex::new(Vec::new()),
        });
        let acceptor = tls.as_ref().map(tls::Tls::acceptor);
        let (control, commands) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u16, String>>();
        let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("apiserver-double".into())
            .spawn(move || {
                if let Err(e) = enter_netns(netns.as_deref()) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("tokio runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match listen(0) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("listen on 127.0.0.1: {e}")));
                            return;
                        }
                    };
                    let port = match listener.local_addr() {
                        Ok(a) => a.port(),
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("local_addr: {e}")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(port));
                    serve(server_shared, port, listener, commands, acceptor).await;
                });
            })
            .expect("spawn the API server double thread");
        let port = match ready_rx.recv() {
            Ok(Ok(port)) => port,
            Ok(Err(e)) => panic!("API server double: {e}"),
            Err(_) => panic!("API server double: the server thread died while starting"),
        };
        ApiServer {
            shared,
            port,
            control,
            thread: Some(thread),
            ca_pem: tls.map(|t| t.ca_pem),
        }
    }

    /// The CA certificate (PEM) that signed the server's certificate, when serving TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Every resource request so far with its authorization verdict.
    pub fn accesses(&self) -> Vec<Access> {
        lock(&self.shared.accesses).clone()
    }

    /// The port on 127.0.0.1 (the same after [`ApiServer::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A kubeconfig (YAML text) pointing at the double (https with its CA when serving TLS),
    /// with its token if it has one, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        let (scheme, ca) = match &self.ca_pem {
            Some(pem) => (
                "https",
                format!(
                    "\n    certificate-authority-data: {}",
                    base64(pem.as_bytes())
                ),
            ),
            None => ("http", String::new()),
        };
        let user = match &self.shared.security.token {
            Some(t) => format!("\n    token: {t}"),
            None => " {}".to_string(),
        };
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: double\n  cluster:\n    server: {scheme}://127.0.0.1:{}{ca}\n\
             users:\n\
             - name: double\n  user:{user}\n\
             contexts:\n\
             - name: double\n  context:\n    cluster: double\n    user: double\n    namespace: default\n\
             current-context: double\n",
            self.port
        )
    }

    /// Creates or replaces an object (a JSON value with `apiVersion`, `kind`, `metadata.name`
    /// and optional `metadata.namespace`, defaulting to `default`). Assigns
    /// `metadata.resourceVersion`, and on creation `uid` and `creationTimestamp` (a replacement
    /// keeps those of the object it replaces); emits ADDED or MODIFIED to watchers. Returns the
    /// new resourceVersion.
    ///
    /// Panics on a type the double does not serve or an object without a name.
    pub fn apply(&self, obj: Value) -> u64 {
        let api_version = obj["apiVersion"].as_str().unwrap_or("");
        let kind_name = obj["kind"].as_str().unwrap_or("");
        let Some(kind) = kind_of(api_version, kind_name) else {
            panic!(
                "API server double: cannot apply {api_version} {kind_name}: it serves only {}",
                served_kinds()
            );
        };
        let namespace = ns_of(
            kind,
            obj["metadata"]["namespace"]
                .as_str()
                .filter(|n| !n.is_empty()),
        );
        match self.shared.write(kind, &namespace, obj, Mode::Upsert) {
            Ok(stored) => rv_of(&stored),
            Err(e) => panic!("API server double: apply: {}", e.message),
        }
    }

    /// Parses multi-document YAML and applies each (non-empty) document.
    pub fn apply_yaml(&self, yaml: &str) {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let obj = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("API server double: bad YAML document: {e}\n{yaml}"));
            if !obj.is_null() {
                self.apply(obj);
            }
        }
    }

    /// Deletes an object; emits DELETED with its last state (with a new resourceVersion).
    /// Returns whether it existed. Panics on a type the double does not serve.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(k) = kind_of(api_version, kind) else {
            panic!(
                "API server double: cannot delete {api_version} {kind}: it serves only {}",
                served_kinds()
            );
        };
        self.shared
            .remove((k, namespace.to_string(), name.to_string()))
            .is_some()
    }

    /// Abruptly closes every open connection (watch streams end without a final event); keeps
    /// listening. Returns once the connections are closed.
    pub fn drop_connections(&self) {
        self.control(Control::DropConnections);
    }

    /// API server down: stops listening and closes all connections (returns once done).
    /// [`ApiServer::apply`] and [`ApiServer::delete`] keep working on the stored state.
    pub fn stop(&self) {
        self.control(Control::Stop);
    }

    /// Listens again on the same port (after [`ApiServer::stop`]; a no-op while listening).
    pub fn start_again(&self) {
        self.control(Control::Listen);
    }

    /// Forgets the event history: a watch resuming from any resourceVersion older than the
    /// current one gets 410 Gone (one ERROR event, then the stream ends).
    pub fn compact(&self) {
        let mut st = self.shared.store();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// The stored object, as last written (with its original `apiVersion`), if it exists.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let k = kind_of(api_version, kind)?;
        let st = self.shared.store();
        st.objects
            .get(&(k, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// events.k8s.io/v1 Event objects clients created or patched (latest state of each), sorted
    /// by namespace and name.
    pub fn events(&self) -> Vec<Value> {
        let st = self.shared.store();
        st.objects
            .range(kind_range(EVENTS))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Log of requests, `"METHOD path?query"`, oldest first.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }

    /// Number of watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    fn control(&self, cmd: Control) {
        let (done, result) = std::sync::mpsc::channel();
        if self.control.send((cmd, done)).is_err() {
            panic!("API server double: the server thread is gone");
        }
        match result.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("API server double: {e}"),
            Err(_) => panic!("API server double: the server thread is gone"),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let (done, result) = std::sync::mpsc::channel();
        if self.control.send((Control::Shutdown, done)).is_ok() {
            let _ = result.recv();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn served_kinds() -> String {
    KINDS
        .iter()
        .map(|k| match k.group {
            "" => k.kind.to_string(),
            g => format!("{g} {}", k.kind),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn enter_netns(netns: Option<&Path>) -> Result<(), String> {
    let Some(path) = netns else {
        return Ok(());
    };
    let file = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns({}, CLONE_NEWNET): {e}", path.display()))
}

/// A listening socket on 127.0.0.1:`port` (0: ephemeral) with SO_REUSEADDR, created on the
/// calling thread (hence in its network namespace).
fn listen(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    socket.listen(1024)
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// The server thread's loop: accepts connections and carries out control commands.
async fn serve(
    shared: Arc<Shared>,
    port: u16,
    listener: TcpListener,
    mut commands: mpsc::UnboundedReceiver<(Control, Ack)>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut listener = Some(listener);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some((cmd, done)) = cmd else { break };
                let result = match cmd {
                    Control::DropConnections => {
                        conns.shutdown().await;
                        Ok(())
                    }
                    Control::Stop => {
                        listener = None;
                        conns.shutdown().await;
                        Ok(())
                    }
                    Control::Listen if listener.is_some() => Ok(()),
                    Control::Listen => match listen(port) {
                        Ok(l) => {
                            listener = Some(l);
                            Ok(())
                        }
                        Err(e) => Err(format!("listen again on 127.0.0.1:{port}: {e}")),
                    },
                    Control::Shutdown => {
                        conns.shutdown().await;
                        let _ = done.send(Ok(()));
                        return;
                    }
                };
                let _ = done.send(result);
            }
            accepted = accept(listener.as_ref()) => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    match acceptor.clone() {
                        None => {
                            conns.spawn(connection(shared, stream));
                        }
                        Some(acceptor) => {
                            conns.spawn(async move {
                                let _ = stream.set_nodelay(true);
                                if let Ok(tls) = acceptor.accept(stream).await {
                                    connection(shared, tls).await;
                                }
                            });
                        }
                    }
                }
                // E.g. out of file descriptors: do not spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// Serves one connection (HTTP/1.1, or HTTP/2 with prior knowledge). Aborting the task closes
/// it.
async fn connection<S>(shared: Arc<Shared>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

type ResponseBody = BoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, body: &Value) -> Response<ResponseBody> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *res.status_mut() = code;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn error_response(e: &ApiError) -> Response<ResponseBody> {
    json_response(e.code, &e.status())
}

/// A parsed resource path.
struct Route {
    kind: usize,
    version: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    /// `status` for the status subresource.
    subresource: Option<&'static str>,
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let mut subresource = None;
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        ["namespaces", ns, plural, name, "status"] if group == "gateway.networking.k8s.io" => {
            subresource = Some("status");
            (Some(*ns), *plural, Some(*name))
        }
        // A cluster-scoped object (`/api/v1/namespaces/NAME` included).
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let kind = KINDS
        .iter()
        .position(|k| k.group == group && k.plural == plural)?;
    let version = KINDS[kind].versions.iter().find(|v| **v == version)?;
    Some(Route {
        kind,
        version,
        namespace: namespace.map(percent_decode),
        name: name.map(percent_decode),
        subresource,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                let hex = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
                out.push(hex(bytes[i + 1]) << 4 | hex(bytes[i + 2]));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// How objects of one request are presented: in the requested version, or reduced to
/// `PartialObjectMetadata`.
struct View {
    kind: usize,
    version: &'static str,
    meta_only: bool,
}

impl View {
    fn object(&self, obj: &Value) -> Value {
        if self.meta_only {
            return json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": obj["metadata"],
            });
        }
        let mut obj = obj.clone();
        obj["apiVersion"] = api_version(self.kind, self.version).into();
        obj["kind"] = KINDS[self.kind].kind.into();
        obj
    }

    /// `apiVersion` and `kind` of lists.
    fn list_type(&self) -> (String, String) {
        if self.meta_only {
            ("meta.k8s.io/v1".into(), "PartialObjectMetadataList".into())
        } else {
            (
                api_version(self.kind, self.version),
                format!("{}List", KINDS[self.kind].kind),
            )
        }
    }

    /// `apiVersion` and `kind` of bookmarks.
    fn object_type(&self) -> (String, String) {
        if self.meta_only {
            ("meta.k8s.io/v1".into(), "PartialObjectMetadata".into())
        } else {
            (
                api_version(self.kind, self.version),
                KINDS[self.kind].kind.into(),
            )
        }
    }
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<ResponseBody> {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |pq| pq.to_string());
    lock(&shared.requests).push(format!("{} {target}", req.method()));

    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = query_params(req.uri().query().unwrap_or(""));
    let meta_only = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));

    if path == "/version" && method == Method::GET {
        return json_response(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-apiserver-double",
                "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
                "platform": "linux/amd64",
            }),
        );
    }
    if let Some(token) = &shared.security.token {
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return error_response(&ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "a valid bearer token is required",
            ));
        }
    }
    if method == Method::GET
        && let Some(doc) = discovery(&path)
    {
        return json_response(StatusCode::OK, &doc);
    }
    let Some(route) = route(&path) else {
        return error_response(&ApiError::not_found(format!(
            "the server could not find the requested resource ({method} {path})"
        )));
    };
    if let Some(rules) = &shared.security.rules {
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        let verb = verb_of(&method, route.name.is_some(), watch);
        let group = KINDS[route.kind].group;
        let resource = match route.subresource {
            Some(sub) => format!("{}/{sub}", KINDS[route.kind].plural),
            None => KINDS[route.kind].plural.to_string(),
        };
        let allowed = rules.iter().any(|r| r.allows(verb, group, &resource));
        lock(&shared.accesses).push(Access {
            verb: verb.to_string(),
            group: group.to_string(),
            resource: resource.clone(),
            namespace: route.namespace.clone(),
            allowed,
        });
        if !allowed {
            return error_response(&ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{verb} {resource}.{group} is not allowed by the ClusterRole (the double enforces it like RBAC)"
                ),
            ));
        }
    }
    let view = View {
        kind: route.kind,
        version: route.version,
        meta_only,
    };
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };

    let result = match (&method, &route.name) {
        (&Method::PATCH, Some(name)) if route.subresource.is_some() => {
            patch_status(shared, &route, name, &content_type, &body, &view)
        }
        (_, Some(_)) if route.subresource.is_some() => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the double takes merge PATCHes of status subresources only".to_string(),
        )),
        (&Method::GET, None) => {
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                return watch(shared, &route, view, &query);
            }
            list(shared, &route, &view, &query)
        }
        (&Method::GET, Some(name)) => get(shared, &route, name, &view),
        (&Method::POST, None) => parse_body(&body).and_then(|obj| {
            let ns = ns_of(
                route.kind,
                route
                    .namespace
                    .as_deref()
                    .or_else(|| obj["metadata"]["namespace"].as_str()),
            );
            let stored = shared.write(route.kind, &ns, obj, Mode::Create)?;
            Ok((StatusCode::CREATED, view.object(&stored)))
        }),
        (&Method::PUT, Some(name)) => parse_body(&body).and_then(|mut obj| {
            obj["metadata"]["name"] = name.as_str().into();
            let ns = ns_of(route.kind, route.namespace.as_deref());
            let stored = shared.write(route.kind, &ns, obj, Mode::Replace)?;
            Ok((StatusCode::OK, view.object(&stored)))
        }),
        (&Method::PATCH, Some(name)) => patch(shared, &route, name, &content_type, &body, &view),
        (&Method::DELETE, Some(name)) => {
            let ns = ns_of(route.kind, route.namespace.as_deref());
            match shared.remove((route.kind, ns, name.clone())) {
                Some(last) => Ok((StatusCode::OK, view.object(&last))),
                None => Err(ApiError::not_found(format!(
                    "{} \"{name}\" not found",
                    KINDS[route.kind].plural
                ))),
            }
        }
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    };
    match result {
        Ok((code, body)) => json_response(code, &body),
        Err(e) => error_response(&e),
    }
}

/// Legacy discovery documents (`/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`), as
/// kubectl and client-go read them.
fn discovery(path: &str) -> Option<Value> {
    let verbs = json!([
        "create", "delete", "get", "list", "patch", "update", "watch"
    ]);
    let resources = |group: &str, version: &str| -> Value {
        let list: Vec<Value> = KINDS
            .iter()
            .filter(|k| k.group == group && k.versions.contains(&version))
            .map(|k| {
                json!({
                    "name": k.plural,
                    "singularName": k.kind.to_ascii_lowercase(),
                    "namespaced": k.namespaced,
                    "kind": k.kind,
                    "verbs": verbs,
                })
            })
            .collect();
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": if group.is_empty() { version.to_string() } else { format!("{group}/{version}") },
            "resources": list,
        })
    };
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api"] => Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        ["api", "v1"] => Some(resources("", "v1")),
        ["apis"] => {
            let mut groups: Vec<&str> = KINDS
                .iter()
                .map(|k| k.group)
                .filter(|g| !g.is_empty())
                .collect();
            groups.dedup();
            let groups: Vec<Value> = groups
                .iter()
                .map(|g| {
                    let versions: Vec<Value> = KINDS
                        .iter()
                        .find(|k| k.group == *g)
                        .map(|k| k.versions)
                        .unwrap_or(&[])
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", group, version]
            if KINDS
                .iter()
                .any(|k| k.group == *group && k.versions.contains(version)) =>
        {
            Some(resources(group, version))
        }
        _ => None,
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

fn list(
    shared: &Shared,
    route: &Route,
    view: &View,
    query: &BTreeMap<String, String>,
) -> Result<(StatusCode, Value), ApiError> {
    let limit: usize = match query.get("limit") {
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        None => 0,
    };
    // The continue token is "<resourceVersion of the first page>/<namespace>/<name>" of the last
    // item returned: the next page starts after that key, whatever changed in between.
    let (after, token_rv) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '/');
            match (
                parts.next().and_then(|rv| rv.parse::<u64>().ok()),
                parts.next(),
                parts.next(),
            ) {
                (Some(rv), Some(ns), Some(name)) => {
                    (Some((ns.to_string(), name.to_string())), Some(rv))
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "invalid continue token {token:?}"
                    )));
                }
            }
        }
        None => (None, None),
    };
    let st = shared.store();
    let rv = token_rv.unwrap_or(st.rv);
    let mut matching = st
        .objects
        .range(kind_range(route.kind))
        .filter(|((_, ns, name), _)| {
            route.namespace.as_deref().is_none_or(|n| n == ns)
                && after
                    .as_ref()
                    .is_none_or(|(a_ns, a_name)| (ns, name) > (a_ns, a_name))
        })
        .map(|((_, ns, name), o)| (ns, name, o))
        .peekable();
    let mut items = Vec::new();
    let mut last = None;
    while limit == 0 || items.len() < limit {
        let Some((ns, name, obj)) = matching.next() else {
            break;
        };
        items.push(view.object(obj));
        last = Some((ns, name));
    }
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), rv.to_string().into());
    if let (Some(_), Some((ns, name))) = (matching.peek(), last) {
        metadata.insert("continue".into(), format!("{rv}/{ns}/{name}").into());
    }
    let (api_version, kind) = view.list_type();
    Ok((
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items}),
    ))
}

fn get(
    shared: &Shared,
    route: &Route,
    name: &str,
    view: &View,
) -> Result<(StatusCode, Value), ApiError> {
    let ns = ns_of(route.kind, route.namespace.as_deref());
    let st = shared.store();
    match st.objects.get(&(route.kind, ns, name.to_string())) {
        Some(obj) => Ok((StatusCode::OK, view.object(obj))),
        None => Err(ApiError::not_found(format!(
            "{} \"{name}\" not found",
            KINDS[route.kind].plural
        ))),
    }
}

fn patch(
    shared: &Shared,
    route: &Route,
    name: &str,
    content_type: &str,
    body: &[u8],
    view: &View,
) -> Result<(StatusCode, Value), ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    let apply = media == "application/apply-patch+yaml";
    if !apply
        && !matches!(
            media,
            "application/merge-patch+json" | "application/strategic-merge-patch+json"
        )
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the double supports merge patches and server-side apply only, not {content_type:?}"
            ),
        ));
    }
    let patch = if apply {
        // Server-side apply: the whole object, as YAML (JSON is YAML too).
        serde_yaml::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("invalid apply patch: {e}")))?
    } else {
        parse_body(body)?
    };
    let ns = ns_of(route.kind, route.namespace.as_deref());
    let current = shared
        .store()
        .objects
        .get(&(route.kind, ns.clone(), name.to_string()))
        .cloned();
    if apply && current.is_none() {
        let mut obj = patch;
        obj["metadata"]["name"] = name.into();
        let stored = shared.write(route.kind, &ns, obj, Mode::Create)?;
        return Ok((StatusCode::CREATED, view.object(&stored)));
    }
    let Some(mut obj) = current else {
        return Err(ApiError::not_found(format!(
            "{} \"{name}\" not found",
            KINDS[route.kind].plural
        )));
    };
    merge_patch(&mut obj, &patch);
    obj["metadata"]["name"] = name.into();
    let stored = shared.write(route.kind, &ns, obj, Mode::Replace)?;
    Ok((StatusCode::OK, view.object(&stored)))
}

/// A merge patch of the status subresource: only `status` of the patch applies.
fn patch_status(
    shared: &Shared,
    route: &Route,
    name: &str,
    content_type: &str,
    body: &[u8],
    view: &View,
) -> Result<(StatusCode, Value), ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media != "application/merge-patch+json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the double takes merge patches of status only, not {content_type:?}"),
        ));
    }
    let patch = parse_body(body)?;
    let ns = ns_of(route.kind, route.namespace.as_deref());
    let current = shared
        .store()
        .objects
        .get(&(route.kind, ns.clone(), name.to_string()))
        .cloned();
    let Some(mut obj) = current else {
        return Err(ApiError::not_found(format!(
            "{} \"{name}\" not found",
            KINDS[route.kind].plural
        )));
    };
    if let Some(st) = patch.get("status") {
        merge_patch(&mut obj["status"], st);
    }
    let stored = shared.write(route.kind, &ns, obj, Mode::Replace)?;
    Ok((StatusCode::OK, view.object(&stored)))
}

/// JSON merge patch (RFC 7386).
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (k, v) in patch {
            if v.is_null() {
                target.remove(k);
            } else {
                merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// What one watch stream sends.
struct WatchSpec {
    view: View,
    namespace: Option<String>,
    bookmarks: bool,
}

impl WatchSpec {
    fn matches(&self, c: &Change) -> bool {
        c.kind == self.view.kind && self.namespace.as_deref().is_none_or(|n| n == c.namespace)
    }

    fn event(&self, c: &Change) -> Bytes {
        event_line(c.event, self.view.object(&c.object))
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let (api_version, kind) = self.view.object_type();
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        event_line(
            "BOOKMARK",
            json!({"apiVersion": api_version, "kind": kind, "metadata": metadata}),
        )
    }
}

fn event_line(event: &str, object: Value) -> Bytes {
    let mut line = json!({"type": event, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// Starts a watch stream: history (or, with `sendInitialEvents`, the current objects) first,
/// then live changes, bookmarks and the end after `timeoutSeconds`.
fn watch(
    shared: &Shared,
    route: &Route,
    view: View,
    query: &BTreeMap<String, String>,
) -> Response<ResponseBody> {
    let param = |k: &str| query.get(k).map(String::as_str);
    let timeout = match param("timeoutSeconds").map(str::parse::<u64>) {
        None => None,
        Some(Ok(secs)) => Some(Duration::from_secs(secs)),
        Some(Err(_)) => {
            return error_response(&ApiError::bad_request("invalid timeoutSeconds"));
        }
    };
    let initial_events = param("sendInitialEvents") == Some("true");
    let since = match param("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        rv => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resourceVersion {rv:?}"
                )));
            }
        },
    };
    let spec = WatchSpec {
        view,
        namespace: route.namespace.clone(),
        bookmarks: param("allowWatchBookmarks") == Some("true"),
    };

    let mut backlog = Vec::new();
    let live = {
        let st = shared.store();
        match since {
            Some(since) if since < st.compacted && !initial_events => {
                let message = format!("too old resource version: {since} ({})", st.rv);
                backlog.push(event_line("ERROR", status_json(410, "Expired", &message)));
                None
            }
            _ => {
                if initial_events {
                    backlog.extend(
                        st.objects
                            .range(kind_range(spec.view.kind))
                            .filter(|((_, ns, _), _)| {
                                spec.namespace.as_deref().is_none_or(|n| n == ns)
                            })
                            .map(|(_, o)| event_line("ADDED", spec.view.object(o))),
                    );
                    backlog.push(spec.bookmark(st.rv, true));
                } else if let Some(since) = since {
                    backlog.extend(
                        st.history
                            .iter()
                            .filter(|c| c.rv > since && spec.matches(c))
                            .map(|c| spec.event(c)),
                    );
                }
                // Subscribed under the store lock: no change is missed or seen twice.
                Some((shared.changes.subscribe(), st.rv))
            }
        }
    };

    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(pump(spec, tx, backlog, live, timeout));
    let body = WatchBody {
        rx,
        _open: OpenWatch::new(&shared.open_watches),
    };
    let mut res = Response::new(body.boxed());
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// Feeds one watch stream until its client goes away, it times out, or it falls behind.
async fn pump(
    spec: WatchSpec,
    tx: mpsc::Sender<Bytes>,
    backlog: Vec<Bytes>,
    live: Option<(broadcast::Receiver<Arc<Change>>, u64)>,
    timeout: Option<Duration>,
) {
    let deadline = timeout.map(|t| Instant::now() + t);
    for line in backlog {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    let Some((mut changes, mut seen)) = live else {
        return;
    };
    let mut bookmarks =
        tokio::time::interval_at(Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
    bookmarks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let line = tokio::select! {
            biased;
            () = tx.closed() => return,
            () = until(deadline) => return,
            change = changes.recv() => match change {
                Ok(change) => {
                    // A bookmark must never claim a resourceVersion whose changes this stream
                    // has not delivered yet: it tracks the changes received, not the store.
                    seen = change.rv;
                    if !spec.matches(&change) {
                        continue;
                    }
                    spec.event(&change)
                }
                // Lagged: end the stream; the client resumes from its last resourceVersion.
                Err(_) => return,
            },
            _ = bookmarks.tick(), if spec.bookmarks => spec.bookmark(seen, false),
        };
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Counts an open watch stream while it lives.
struct OpenWatch(Arc<AtomicUsize>);

impl OpenWatch {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A watch response body: the lines [`pump`] sends, each written (and flushed) as it comes.
struct WatchBody {
    rx: mpsc::Receiver<Bytes>,
    _open: OpenWatch,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .rx
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// Standard base64 (for kubeconfig data fields).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The double's TLS: a throwaway CA and a server certificate for 127.0.0.1 it signed.
mod tls {
    use std::sync::Arc;

    /// Keys and certificates of one double.
    pub struct Tls {
        /// The CA certificate, PEM (what a client trusts: the service account's `ca.crt`).
        pub ca_pem: String,
        cert_der: rustls::pki_types::CertificateDer<'static>,
        key_der: Vec<u8>,
    }

    impl Tls {
        /// Generates a CA and a server certificate for 127.0.0.1 and localhost.
        pub fn generate() -> Tls {
            let ca_key = rcgen::KeyPair::generate().expect("CA key");
            let mut ca_params =
                rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "apiserver-double-ca");
            let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let key = rcgen::KeyPair::generate().expect("server key");
            let params = rcgen::CertificateParams::new(vec![
                "127.0.0.1".to_string(),
                "localhost".to_string(),
            ])
            .expect("server params");
            let cert = params.signed_by(&key, &issuer).expect("server certificate");
            Tls {
                ca_pem: ca_cert.pem(),
                cert_der: cert.der().clone(),
                key_der: key.serialize_der(),
            }
        }

        /// The server side.
        pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
            let cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(vec![self.cert_der.clone()], key)
                .expect("TLS certificate");
            let mut cfg = cfg;
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        }
    }
}
