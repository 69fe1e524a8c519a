//! The Kubernetes source: follows the API server and produces the same desired [`State`] as the
//! manifests directory.
//!
//! One kube-runtime watcher per kind (Services, EndpointSlices, Pods metadata-only, Istio
//! VirtualServices and DestinationRules) feeds a single aggregator. A (re)list replaces a kind's
//! objects wholesale at `InitDone`, so removals come from the full state, never from delete events
//! alone. The first state is published only after every kind has listed once (Services and
//! EndpointSlices are waited for indefinitely; optional kinds for a bounded time). Watch errors,
//! 410 Gone and dropped connections lead to a re-list with backoff while the datapath keeps its
//! last state. An invalid object is reported in the log and as a Kubernetes Event on the object,
//! and its last good version keeps serving.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice as K8sSlice;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter as EventReporter};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt as _};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::convert::{self, FieldError};
use super::report::{Problem, Reporter};
use crate::gateway;
use crate::istio;
use crate::model::{ObjectRef, PodInfo, State};

/// Kinds followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Service,
    Slice,
    Pod,
    VirtualService,
    DestinationRule,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Service,
        Kind::Slice,
        Kind::Pod,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::HttpRoute,
        Kind::GrpcRoute,
    ];

    /// The Gateway API route kind, if it is one.
    fn route_kind(self) -> Option<gateway::RouteKind> {
        match self {
            Kind::HttpRoute => Some(gateway::RouteKind::Http),
            Kind::GrpcRoute => Some(gateway::RouteKind::Grpc),
            _ => None,
        }
    }

    /// Without these the datapath would be emptied: wait for them however long it takes.
    fn required(self) -> bool {
        matches!(self, Kind::Service | Kind::Slice)
    }

    /// The Kubernetes kind name.
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Slice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }

    /// The reporter scope of one object's problems.
    fn scope(self, id: &ObjectRef) -> String {
        format!("object:{}/{id}", self.name())
    }
}

/// A validated object.
#[derive(Clone, Debug)]
enum Obj {
    Service(std::sync::Arc<crate::model::Service>),
    Slice(std::sync::Arc<crate::model::EndpointSlice>),
    Pod(BTreeMap<String, String>),
    VirtualService(istio::VirtualService),
    DestinationRule(istio::DestinationRule),
    MeshRoute(gateway::MeshRoute, gateway::SeenStatus),
    /// A route version that failed validation: reported like an invalid object, and kept
    /// apart (for its status) while the last good version serves.
    RejectedRoute(gateway::RouteKind, gateway::Rejected),
    /// A valid object this proxy does not serve (a headless Service): removed if it was there.
    NotOurs,
}

/// What a watcher reports to the aggregator.
enum Msg {
    Init(Kind),
    Apply {
        kind: Kind,
        id: ObjectRef,
        reference: Box<ObjectReference>,
        parsed: Box<Result<Obj, FieldError>>,
        initial: bool,
    },
    Delete(Kind, ObjectRef),
    InitDone(Kind),
    /// The kind is not served by this API server (e.g. Istio CRDs not installed).
    Unavailable(Kind),
}

/// Settings of the Kubernetes source.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node's name: the Events' reporting instance.
    pub node_name: Option<String>,
    /// How long optional kinds (Pods, Istio) may take to list before the first state is published.
    pub optional_wait: Duration,
    /// Coalescing delay between a change and the publication of the new state.
    pub debounce: Duration,
}

fn object_ref<K: Resource<DynamicType = ()>>(o: &K) -> ObjectRef {
    ObjectRef::new(
        o.namespace().unwrap_or_else(|| "default".into()),
        o.name_any(),
    )
}

fn reference_of(kind: &str, api_version: &str, meta: &kube::api::ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version.to_string()),
        kind: Some(kind.to_string()),
        name: meta.name.clone(),
        namespace: Some(meta.namespace.clone().unwrap_or_else(|| "default".into())),
        uid: meta.uid.clone(),
        // No resourceVersion: the recorder keys its Event series on the reference, so the same
        // problem on a later version of the object is counted on one Event (`x3 over 5m` in
        // `kubectl describe`) instead of a new Event per edit.
        resource_version: None,
        field_path: None,
    }
}

/// Runs one kind's watcher, forwarding parsed objects to the aggregator until it goes away.
async fn pump<K, S>(
    kind: Kind,
    stream: S,
    parse: impl Fn(&K) -> (ObjectRef, ObjectReference, Result<Obj, FieldError>),
    tx: mpsc::Sender<Msg>,
) where
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        let msg = match ev {
            Ok(Event::Init) => Msg::Init(kind),
            Ok(Event::InitApply(o)) => {
                let (id, reference, parsed) = parse(&o);
                Msg::Apply {
                    kind,
                    id,
                    reference: Box::new(reference),
                    parsed: Box::new(parsed),
                    initial: true,
                }
            }
            Ok(Event::InitDone) => Msg::InitDone(kind),
            Ok(Event::Apply(o)) => {
                let (id, reference, parsed) = parse(&o);
                Msg::Apply {
                    kind,
                    id,
                    reference: Box::new(reference),
                    parsed: Box::new(parsed),
                    initial: false,
                }
            }
            Ok(Event::Delete(o)) => Msg::Delete(kind, parse(&o).0),
            Err(e) => {
                // The watcher re-lists with backoff (410 Gone, dropped connections, API server
                // restarts); the datapath keeps its last state meanwhile.
                warn!(?kind, error = %e, "watch failed; re-listing with backoff, the datapath keeps its last state");
                continue;
            }
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

/// Finds which networking.istio.io version this API server serves.
async fn istio_resource(client: &Client, kind: &str, plural: &str) -> Option<ApiResource> {
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let ar = ApiResource {
            group: "networking.istio.io".into(),
            version: version.into(),
            api_version: format!("networking.istio.io/{version}"),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Some(ar),
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => {
                warn!(kind, error = %e, "cannot list Istio {kind}s; assuming they are not served");
                return None;
            }
        }
    }
    None
}

/// The Gateway API route resource of `kind`, if the API server serves it (v1).
async fn gateway_resource(client: &Client, kind: gateway::RouteKind) -> Option<ApiResource> {
    let ar = ApiResource {
        group: gateway::GROUP.into(),
        version: "v1".into(),
        api_version: format!("{}/v1", gateway::GROUP),
        kind: kind.name().into(),
        plural: kind.plural().into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Some(ar),
        Err(kube::Error::Api(e)) if e.code == 404 => None,
        Err(e) => {
            warn!(kind = kind.name(), error = %e, "cannot list Gateway API routes; assuming they are not served");
            None
        }
    }
}

fn dynamic_spec(o: &DynamicObject) -> Result<serde_yaml::Value, FieldError> {
    let spec = o
        .data
        .get("spec")
        .ok_or(FieldError::new("spec", "missing"))?;
    serde_yaml::to_value(spec).map_err(|e| FieldError::new("spec", e.to_string()))
}

/// This node's `topology.kubernetes.io/zone` label (for PreferClose), if the Node can be read
/// within 10 s; failures are logged and leave topology-aware routing off.
pub async fn node_zone(client: &Client, node: &str) -> Option<String> {
    let api = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    match tokio::time::timeout(std::time::Duration::from_secs(10), api.get(node)).await {
        Ok(Ok(n)) => {
            let zone = n
                .metadata
                .labels
                .and_then(|l| l.get("topology.kubernetes.io/zone").cloned());
            tracing::info!(node, zone = ?zone, "this node's zone (PreferClose)");
            zone
        }
        Ok(Err(e)) => {
            tracing::warn!(node, error = %e, "cannot read this Node (RBAC: get nodes); trafficDistribution: PreferClose stays off, pass --zone to set the zone");
            None
        }
        Err(_) => {
            tracing::warn!(
                node,
                "reading this Node timed out; trafficDistribution: PreferClose stays off"
            );
            None
        }
    }
}

/// Starts the watchers; publishes the desired state on `tx`. Every problem `reporter` receives
/// from now on (from this source or from the route builder) becomes an Event on its object.
pub async fn start(
    client: Client,
    cfg: KubeConfig,
    tx: watch::Sender<Option<std::sync::Arc<State>>>,
    reporter: Reporter,
    progress: std::sync::Arc<super::Progress>,
) {
    let (msg_tx, msg_rx) = mpsc::channel::<Msg>(1024);
    let wcfg = || watcher::Config::default();

    let t = msg_tx.clone();
    let s = watcher::watcher(Api::<K8sService>::all(client.clone()), wcfg()).default_backoff();
    tokio::spawn(pump(
        Kind::Service,
        s,
        |o: &K8sService| {
            let r = reference_of("Service", "v1", &o.metadata);
            (
                object_ref(o),
                r,
                convert::service(o).map(|s| match s {
                    Ok(s) => Obj::Service(std::sync::Arc::new(s)),
                    // Headless, ExternalName, another proxy's: as if it did not exist.
                    Err(_) => Obj::NotOurs,
                }),
            )
        },
        t,
    ));

    let t = msg_tx.clone();
    let s = watcher::watcher(Api::<K8sSlice>::all(client.clone()), wcfg()).default_backoff();
    tokio::spawn(pump(
        Kind::Slice,
        s,
        |o: &K8sSlice| {
            let r = reference_of("EndpointSlice", "discovery.k8s.io/v1", &o.metadata);
            (
                object_ref(o),
                r,
                convert::slice(o).map(|s| Obj::Slice(std::sync::Arc::new(s))),
            )
        },
        t,
    ));

    let t = msg_tx.clone();
    // Metadata only: labels are all the proxy needs from Pods (addresses come from the slices).
    let s = watcher::watcher(Api::<PartialObjectMeta<Pod>>::all(client.clone()), wcfg())
        .default_backoff();
    tokio::spawn(pump(
        Kind::Pod,
        s,
        |o: &PartialObjectMeta<Pod>| {
            let id = ObjectRef::new(
                o.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                o.metadata.name.clone().unwrap_or_default(),
            );
            let r = reference_of("Pod", "v1", &o.metadata);
            (
                id,
                r,
                Ok(Obj::Pod(o.metadata.labels.clone().unwrap_or_default())),
            )
        },
        t,
    ));

    for (kind, k, plural) in [
        (Kind::VirtualService, "VirtualService", "virtualservices"),
        (Kind::DestinationRule, "DestinationRule", "destinationrules"),
    ] {
        let t = msg_tx.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let Some(ar) = istio_resource(&client, k, plural).await else {
                info!(
                    kind = k,
                    "networking.istio.io {k} is not served: Istio policies are off (install the CRDs from deploy/crds)"
                );
                let _ = t.send(Msg::Unavailable(kind)).await;
                return;
            };
            let api_version = ar.api_version.clone();
            let s = watcher::watcher(Api::<DynamicObject>::all_with(client, &ar), wcfg())
                .default_backoff();
            pump(
                kind,
                s,
                move |o: &DynamicObject| {
                    let id = ObjectRef::new(
                        o.namespace().unwrap_or_else(|| "default".into()),
                        o.name_any(),
                    );
                    let r = reference_of(k, &api_version, &o.metadata);
                    let parsed = dynamic_spec(o).and_then(|spec| match kind {
                        Kind::VirtualService => {
                            istio::virtual_service(spec).map(Obj::VirtualService)
                        }
                        _ => istio::destination_rule(spec).map(Obj::DestinationRule),
                    });
                    (id, r, parsed)
                },
                t,
            )
            .await;
        });
    }

    for kind in [Kind::HttpRoute, Kind::GrpcRoute] {
        let t = msg_tx.clone();
        let client = client.clone();
        let rk = kind.route_kind().expect("a route kind");
        tokio::spawn(async move {
            let Some(ar) = gateway_resource(&client, rk).await else {
                info!(
                    kind = rk.name(),
                    "gateway.networking.k8s.io/v1 {} is not served: Gateway API mesh routes are off (install the CRDs from deploy/crds)",
                    rk.name()
                );
                let _ = t.send(Msg::Unavailable(kind)).await;
                return;
            };
            let api_version = ar.api_version.clone();
            let s = watcher::watcher(Api::<DynamicObject>::all_with(client, &ar), wcfg())
                .default_backoff();
            pump(
                kind,
                s,
                move |o: &DynamicObject| {
                    let id = ObjectRef::new(
                        o.namespace().unwrap_or_else(|| "default".into()),
                        o.name_any(),
                    );
                    let r = reference_of(rk.name(), &api_version, &o.metadata);
                    let parsed = serde_yaml::to_value(o)
                        .map_err(|e| FieldError::new("-", e.to_string()))
                        .map(|v| {
                            let meta = gateway::Meta::of(&v);
                            match dynamic_spec(o).and_then(|spec| gateway::route(rk, spec, &meta)) {
                                Ok(r) => Obj::MeshRoute(r, meta.status),
                                Err(e) => Obj::RejectedRoute(rk, gateway::rejected(&v, e)),
                            }
                        });
                    (id, r, parsed)
                },
                t,
            )
            .await;
        });
    }

    let (problem_tx, problem_rx) = mpsc::unbounded_channel::<Problem>();
    let recorder = Recorder::new(
        client.clone(),
        EventReporter {
            controller: "proxy-agent".into(),
            instance: cfg.node_name.clone(),
        },
    );
    reporter.send_events_to(problem_tx);
    tokio::spawn(publish_events(recorder, problem_rx));
    tokio::spawn(write_route_status(
        client.clone(),
        tx.subscribe(),
        cfg.node_name.clone().unwrap_or_default(),
    ));
    tokio::spawn(aggregate(cfg, msg_rx, tx, reporter, progress));
}

/// Writes `status.parents[]` of the HTTPRoutes and GRPCRoutes with Service parents.
///
/// Every agent computes the same conditions (from Services, which every node sees alike) and
/// writes only when the object's differ, after a delay that differs per node: the first
/// agent's write reaches the others through their watch and they find nothing to do. So
/// agents never fight; at worst two write the same content at once.
async fn write_route_status(
    client: Client,
    mut rx: watch::Receiver<Option<std::sync::Arc<State>>>,
    node: String,
) {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut h);
    let delay = Duration::from_millis(h.finish() % 1000);
    // What this agent wrote last, per route: (generation, statuses).
    let mut written: HashMap<
        (gateway::RouteKind, ObjectRef),
        (Option<i64>, Vec<gateway::ParentStatus>),
    > = HashMap::new();
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
        let Some(state) = rx.borrow_and_update().clone() else {
            continue;
        };
        written.retain(|k, _| {
            state.mesh_routes.contains_key(k) || state.rejected_routes.contains_key(k)
        });
        // Each route's wanted status: a rejected current version's, else the valid one's.
        let mut wanted = Vec::new();
        for (key, r) in &state.rejected_routes {
            wanted.push((
                key,
                r.generation,
                r.status.clone(),
                gateway::rejected_statuses(r),
            ));
        }
        for (key, r) in &state.mesh_routes {
            if state.rejected_routes.contains_key(key) {
                continue;
            }
            let seen = state.mesh_status.get(key).cloned().unwrap_or_default();
            wanted.push((
                key,
                r.generation,
                seen,
                gateway::parent_statuses(&state, &key.1, r),
            ));
        }
        for (key, generation, seen, want) in wanted {
            let (kind, id) = key;
            if want.is_empty() || !gateway::status_differs(generation, &seen, &want) {
                continue;
            }
            if written
                .get(key)
                .is_some_and(|(g, w)| *g == generation && *w == want)
            {
                continue; // written; the watch has not brought it back yet
            }
            let ar = ApiResource {
                group: gateway::GROUP.into(),
                version: "v1".into(),
                api_version: format!("{}/v1", gateway::GROUP),
                kind: kind.name().into(),
                plural: kind.plural().into(),
            };
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &id.namespace, &ar);
            let now = jiff::Timestamp::now()
                .round(jiff::Unit::Second)
                .unwrap_or(jiff::Timestamp::now());
            let patch = gateway::status_patch(generation, &seen, &want, &now.to_string());
            match api
                .patch_status(
                    &id.name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    info!(kind = kind.name(), route = %id, "wrote route status");
                    written.insert(key.clone(), (generation, want));
                }
                Err(e) => warn!(
                    kind = kind.name(),
                    route = %id,
                    error = %e,
                    "cannot write route status (the ClusterRole must allow patch on {}/status)",
                    kind.plural()
                ),
            }
        }
    }
}

async fn publish_events(recorder: Recorder, mut rx: mpsc::UnboundedReceiver<Problem>) {
    while let Some(p) = rx.recv().await {
        let Some(reference) = p.reference.clone() else {
            continue;
        };
        let note = format!("field `{}`: {}; {}", p.field, p.message, p.effect);
        let ev = KubeEvent {
            type_: EventType::Warning,
            reason: "InvalidConfiguration".into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &reference).await {
            warn!(error = %e, object = ?reference.name, "cannot publish a Kubernetes Event");
        }
    }
}

#[derive(Default)]
struct Stores {
    objects: BTreeMap<(Kind, ObjectRef), Obj>,
    /// Routes whose current version failed validation.
    rejected: BTreeMap<(Kind, ObjectRef), (gateway::RouteKind, gateway::Rejected)>,
    /// Objects of a kind being re-listed (between Init and InitDone).
    relist: HashMap<Kind, BTreeMap<ObjectRef, Obj>>,
    /// Every object of a re-list, valid or not (their problems stay listed).
    relisted: HashMap<Kind, std::collections::BTreeSet<ObjectRef>>,
    listed: BTreeMap<Kind, bool>,
}

impl Stores {
    fn state(&self) -> State {
        let mut st = State::default();
        let mut labels: HashMap<&ObjectRef, &BTreeMap<String, String>> = HashMap::new();
        for ((kind, id), obj) in &self.objects {
            match (kind, obj) {
                (_, Obj::Service(s)) => {
                    st.services.insert(id.clone(), s.clone());
                }
                (_, Obj::Slice(s)) => {
                    st.slices.insert(id.clone(), s.clone());
                }
                (_, Obj::Pod(l)) => {
                    labels.insert(id, l);
                }
                (_, Obj::VirtualService(v)) => {
                    st.virtual_services.insert(id.clone(), v.clone());
                }
                (_, Obj::DestinationRule(d)) => {
                    st.destination_rules.insert(id.clone(), d.clone());
                }
                (_, Obj::MeshRoute(r, seen)) => {
                    st.mesh_routes.insert((r.kind, id.clone()), r.clone());
                    st.mesh_status.insert((r.kind, id.clone()), seen.clone());
                }
                (_, Obj::NotOurs | Obj::RejectedRoute(..)) => {}
            }
        }
        for ((_, id), (rk, r)) in &self.rejected {
            st.rejected_routes.insert((*rk, id.clone()), r.clone());
        }
        // Metadata-only Pods carry no address: join them with the endpoints that point at them.
        for slice in st.slices.values() {
            for ep in &slice.endpoints {
                if let Some(pod) = &ep.pod {
                    let id = ObjectRef::new(slice.id.namespace.clone(), pod.clone());
                    if let Some(l) = labels.get(&id) {
                        st.pods.insert(
                            id,
                            PodInfo {
                                ip: ep.addr,
                                labels: (*l).clone(),
                            },
                        );
                    }
                }
            }
        }
        st
    }
}

async fn aggregate(
    cfg: KubeConfig,
    mut rx: mpsc::Receiver<Msg>,
    tx: watch::Sender<Option<std::sync::Arc<State>>>,
    reporter: Reporter,
    progress: std::sync::Arc<super::Progress>,
) {
    let mut stores = Stores::default();
    let started = tokio::time::Instant::now();
    let mut published = false;
    let mut last_wait_log = started;
    loop {
        // Take everything queued, then publish once (coalescing bursts such as a re-list).
        let first = match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(m)) => Some(m),
            Ok(None) => return,
            Err(_) => None,
        };
        let mut batch: Vec<Msg> = first.into_iter().collect();
        if !batch.is_empty() {
            tokio::time::sleep(cfg.debounce).await;
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
            }
        }
        let mut changed = false;
        for m in batch {
            changed |= apply(&mut stores, m, &reporter);
        }
        let waited = started.elapsed();
        let ready = Kind::ALL.iter().all(|k| {
            stores.listed.get(k).copied().unwrap_or(false)
                || (!k.required() && waited >= cfg.optional_wait)
        });
        if !ready {
            if last_wait_log.elapsed() >= Duration::from_secs(10) {
                let missing: Vec<_> = Kind::ALL
                    .iter()
                    .filter(|k| !stores.listed.get(k).copied().unwrap_or(false))
                    .collect();
                info!(
                    ?missing,
                    "waiting for the first list of every kind before the first datapath write"
                );
                last_wait_log = tokio::time::Instant::now();
            }
            continue;
        }
        if !published {
            let missing: Vec<_> = Kind::ALL
                .iter()
                .filter(|k| !stores.listed.get(k).copied().unwrap_or(false))
                .collect();
            if !missing.is_empty() {
                warn!(
                    ?missing,
                    "these kinds did not list within the wait; starting without them"
                );
            }
            info!(
                after_ms = waited.as_millis() as u64,
                "every watched kind listed; publishing the first state"
            );
        }
        if changed || !published {
            published = true;
            let t = std::time::Instant::now();
            let state = stores.state();
            tracing::debug!(
                ms = t.elapsed().as_millis() as u64,
                "state rebuilt from the watched objects"
            );
            crate::model::publish(&tx, state);
            progress.read_done();
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Applies one message; returns whether the visible state may have changed.
fn apply(stores: &mut Stores, m: Msg, reporter: &Reporter) -> bool {
    match m {
        Msg::Init(kind) => {
            stores.relist.insert(kind, BTreeMap::new());
            stores.relisted.insert(kind, Default::default());
            false
        }
        Msg::Apply {
            kind,
            id,
            reference,
            parsed,
            initial,
        } => {
            let scope = kind.scope(&id);
            let mut changed_rejection = false;
            // A rejected route version is an invalid object that also gets a status.
            let parsed = match *parsed {
                Ok(Obj::RejectedRoute(rk, r)) => {
                    let e = r.error.clone();
                    let key = (kind, id.clone());
                    changed_rejection = stores.rejected.get(&key).is_none_or(|(_, o)| *o != r);
                    stores.rejected.insert(key, (rk, r));
                    Err(e)
                }
                Ok(o) => {
                    if stores.rejected.remove(&(kind, id.clone())).is_some() {
                        changed_rejection = true;
                    }
                    Ok(o)
                }
                Err(e) => Err(e),
            };
            let obj = match parsed {
                Ok(o) => {
                    reporter.replace(&scope, Vec::new());
                    if matches!(
                        kind,
                        Kind::VirtualService
                            | Kind::DestinationRule
                            | Kind::HttpRoute
                            | Kind::GrpcRoute
                    ) {
                        // Route problems found later name these objects: Events need the uid.
                        reporter.remember(kind.name(), &id, (*reference).clone());
                    }
                    Some(o)
                }
                Err(e) => {
                    reporter.replace(
                        &scope,
                        vec![Problem {
                            kind: kind.name().to_string(),
                            object: id.to_string(),
                            file: None,
                            field: e.field,
                            message: e.message,
                            effect: "the last good version of this object keeps serving".into(),
                            reference: Some(*reference),
                        }],
                    );
                    None
                }
            };
            // An invalid object keeps its last good version (if any).
            let obj = obj.or_else(|| stores.objects.get(&(kind, id.clone())).cloned());
            let changed = match (initial, stores.relist.get_mut(&kind)) {
                (true, Some(buf)) => {
                    stores.relisted.entry(kind).or_default().insert(id.clone());
                    if let Some(o) = obj {
                        buf.insert(id, o);
                    }
                    false
                }
                _ => match obj {
                    Some(o) => {
                        stores.objects.insert((kind, id), o);
                        true
                    }
                    None => false,
                },
            };
            changed || changed_rejection
        }
        Msg::Delete(kind, id) => {
            reporter.replace(&kind.scope(&id), Vec::new());
            reporter.forget(kind.name(), &id);
            let rejected = stores.rejected.remove(&(kind, id.clone())).is_some();
            stores.objects.remove(&(kind, id)).is_some() || rejected
        }
        Msg::InitDone(kind) => {
            // Replace the kind's objects with the full listed set: removals come from here.
            let buf = stores.relist.remove(&kind).unwrap_or_default();
            let listed = stores.relisted.remove(&kind).unwrap_or_default();
            let prefix = format!("object:{}/", kind.name());
            reporter.retain_scopes(&prefix, |s| {
                s.strip_prefix(&prefix)
                    .and_then(|r| r.split_once('/'))
                    .is_some_and(|(ns, name)| listed.contains(&ObjectRef::new(ns, name)))
            });
            stores.objects.retain(|(k, _), _| *k != kind);
            stores
                .rejected
                .retain(|(k, id), _| *k != kind || listed.contains(id));
            for (id, o) in buf {
                stores.objects.insert((kind, id), o);
            }
            stores.listed.insert(kind, true);
            true
        }
        Msg::Unavailable(kind) => {
            stores.listed.insert(kind, true);
            true
        }
    }
}
