//! The proxy's routing table, built from the desired state: which clusters serve a ClusterIP
//! port, with which retries, timeouts and mirror. Clusters live in a registry across rebuilds so
//! backend health and pooled connections survive configuration changes.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashSet;
use std::net::IpAddr;

use super::cluster::{Cluster, ClusterPolicy, PoolSettings};
use crate::gateway::{MeshRoute, RouteKind, ServiceParent};
use crate::istio::{
    Cors, Destination, DestinationRule, DirectResponse, Fault, Headers, HttpMatch, LoadBalancer,
    Redirect, RetryOn, Rewrite, VirtualService,
};
use crate::model::{Frontend, ObjectRef, ProtocolHint, State};

/// Retries of a route.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
    /// Conditions.
    pub on: RetryOn,
    /// Whether the default retry budget applies (retries at most 20% of active requests, at
    /// least 3). True for the safe default; an explicit VirtualService policy is limited by the
    /// DestinationRule's `maxRetries` instead, as in Istio.
    pub budgeted: bool,
    /// Least time between tries (Gateway API `retry.backoff`; `None`: 25 ms doubling, capped
    /// at 250 ms).
    pub backoff: Option<Duration>,
}

impl RetryPolicy {
    /// The default for HTTP Services without a VirtualService: retry twice on connect-failure,
    /// reset and 503 (always within the replay and idempotency rules).
    pub fn safe_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn {
                connect_failure: true,
                reset: true,
                status_codes: vec![503],
                ..Default::default()
            },
            budgeted: true,
            backoff: None,
        }
    }
}

/// A mirror target.
pub struct Mirror {
    /// Where copies go.
    pub cluster: Arc<Cluster>,
    /// Share of requests copied, percent.
    pub percent: f64,
}

/// One `match[]` block of a rule, with the client addresses its source conditions allow.
pub struct CompiledMatch {
    /// The block as validated.
    pub m: HttpMatch,
    /// Pod IPs allowed by `sourceLabels` / `sourceNamespace` (`None`: any client).
    pub sources: Option<HashSet<IpAddr>>,
}

/// What a request is matched on.
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a http::Method,
    /// Path, without the query.
    pub path: &'a str,
    /// Query string.
    pub query: Option<&'a str>,
    /// `Host` or `:authority`.
    pub authority: &'a str,
    /// Headers.
    pub headers: &'a http::HeaderMap,
    /// The client's address.
    pub client: IpAddr,
}

/// The value of header `name` (several values joined with `,`), if present and visible ASCII.
fn header_value<'a>(h: &'a http::HeaderMap, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let mut all = h.get_all(name).iter();
    let first = all.next()?.to_str().ok()?;
    let rest: Vec<&str> = all.filter_map(|v| v.to_str().ok()).collect();
    if rest.is_empty() {
        Some(std::borrow::Cow::Borrowed(first))
    } else {
        let mut v = first.to_string();
        for r in rest {
            v.push(',');
            v.push_str(r);
        }
        Some(std::borrow::Cow::Owned(v))
    }
}

/// Percent-decodes a query component (`+` is a space).
fn decode_query(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = || {
            b.get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if hex().is_some() => {
                out.extend(hex());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The first value of query parameter `key`.
fn query_value<'a>(query: Option<&'a str>, key: &str) -> Option<std::borrow::Cow<'a, str>> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (decode_query(k) == key).then(|| decode_query(v))
    })
}

impl CompiledMatch {
    /// Whether every condition of the block holds for `r`.
    pub fn accepts(&self, r: &RequestView<'_>) -> bool {
        let m = &self.m;
        if let Some(s) = &self.sources
            && !s.contains(&r.client)
        {
            return false;
        }
        if let Some(u) = &m.uri {
            let ok = if m.ignore_uri_case {
                u.matches_ignore_case(r.path)
            } else {
                u.matches(r.path)
            };
            if !ok {
                return false;
            }
        }
        // Traffic inside the mesh reaches the node proxy in plain text.
        if m.scheme.as_ref().is_some_and(|x| !x.matches("http"))
            || m.method
                .as_ref()
                .is_some_and(|x| !x.matches(r.method.as_str()))
            || m.authority
                .as_ref()
                .is_some_and(|x| !x.matches(r.authority))
        {
            return false;
        }
        for (n, x) in &m.headers {
            match header_value(r.headers, n) {
                Some(v) if x.matches(&v) => {}
                _ => return false,
            }
        }
        for (n, x) in &m.without_headers {
            if header_value(r.headers, n).is_some_and(|v| x.matches(&v)) {
                return false;
            }
        }
        for (k, x) in &m.query_params {
            match query_value(r.query, k) {
                Some(v) if x.matches(&v) => {}
                _ => return false,
            }
        }
        true
    }
}

/// One rule of a route: a VirtualService `http[]` entry (or the Service's own default).
pub struct Rule {
    /// Index in the VirtualService's `http[]` (0 for the default).
    pub index: usize,
    /// The rule's `name`.
    pub name: Option<String>,
    /// Match blocks for this port (empty: every request).
    pub matches: Vec<CompiledMatch>,
    /// Weighted destinations (empty when the proxy answers: redirect, direct response).
    pub destinations: Vec<(Arc<Cluster>, u32)>,
    /// Header edits of each destination, by index.
    pub destination_headers: Vec<Headers>,
    /// Overall timeout.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryPolicy,
    /// Mirror.
    pub mirror: Option<Mirror>,
    /// Fault injection.
    pub fault: Option<Fault>,
    /// Path and authority rewrite.
    pub rewrite: Option<Rewrite>,
    /// Answer with a redirect.
    pub redirect: Option<Redirect>,
    /// Answer directly.
    pub direct_response: Option<DirectResponse>,
    /// Header edits.
    pub headers: Headers,
    /// CORS.
    pub cors: Option<Cors>,
    /// Gateway API: the weight of backends that do not resolve, answered 500 (all weights 0,
    /// or no backends: every request). `None` for Istio rules.
    pub unresolved: Option<u32>,
    /// The Gateway API route the rule comes from (`None`: the route's VirtualService).
    pub origin: Option<Arc<RuleOrigin>>,
}

/// The HTTPRoute or GRPCRoute a rule comes from.
#[derive(Debug, PartialEq, Eq)]
pub struct RuleOrigin {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    /// The route object.
    pub object: ObjectRef,
}

impl Rule {
    /// A rule sending every request to `cluster` with the safe defaults.
    fn default_to(cluster: Arc<Cluster>) -> Self {
        Self {
            index: 0,
            name: None,
            matches: Vec::new(),
            destinations: vec![(cluster, 100)],
            destination_headers: Vec::new(),
            timeout: None,
            retry: RetryPolicy::safe_default(),
            mirror: None,
            fault: None,
            rewrite: None,
            redirect: None,
            direct_response: None,
            headers: Headers::default(),
            cors: None,
            unresolved: None,
            origin: None,
        }
    }

    /// The rule in an operator's words: `VirtualService ns/x http[2] (name)`,
    /// `HTTPRoute ns/r rules[0] (name)` or `default`.
    pub fn describe(&self, route: &Route) -> String {
        let name = self
            .name
            .as_ref()
            .map_or(String::new(), |n| format!(" ({n})"));
        match (&self.origin, &route.virtual_service) {
            (Some(o), _) => format!("{} {} rules[{}]{name}", o.kind, o.object, self.index),
            (None, Some(v)) => format!("VirtualService {v} http[{}]{name}", self.index),
            (None, None) => "default".into(),
        }
    }

    /// Every cluster the rule can send to.
    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.destinations
            .iter()
            .map(|(c, _)| c)
            .chain(self.mirror.as_ref().map(|m| &m.cluster))
    }
}

/// How requests to one ClusterIP port are handled.
pub struct Route {
    /// The Service.
    pub service: ObjectRef,
    /// The Service's id in metrics series.
    pub metrics_id: u32,
    /// The VirtualService that routes it (`None`: the Service's default route).
    pub virtual_service: Option<ObjectRef>,
    /// HTTP rules in order: the first that matches serves the request (none: 404).
    pub rules: Vec<Rule>,
    /// Rules for opaque (non-HTTP) connections, in order: the VirtualService's `tcp[]` (HTTP
    /// rules do not apply to TCP, as in Istio), then the Service's own backends.
    pub tcp: Vec<TcpRule>,
    /// Protocol detection of the Service port.
    pub detection: ProtocolHint,
}

/// One rule for opaque connections.
pub struct TcpRule {
    /// The clients each match block allows (`None`: any); no blocks: every connection.
    pub matches: Vec<Option<HashSet<IpAddr>>>,
    /// Weighted destinations.
    pub destinations: Vec<(Arc<Cluster>, u32)>,
}

impl TcpRule {
    fn accepts(&self, client: IpAddr) -> bool {
        self.matches.is_empty()
            || self
                .matches
                .iter()
                .any(|m| m.as_ref().is_none_or(|s| s.contains(&client)))
    }
}

impl Route {
    /// Where an opaque connection from `client` goes.
    pub fn tcp_destinations(&self, client: IpAddr) -> &[(Arc<Cluster>, u32)] {
        self.tcp
            .iter()
            .find(|r| r.accepts(client))
            .map_or(&[], |r| r.destinations.as_slice())
    }

    /// The first rule accepting `r`, with the index of the block that matched (`None`: the
    /// rule has no match blocks).
    pub fn select(&self, r: &RequestView<'_>) -> Option<(&Rule, Option<usize>)> {
        self.rules.iter().find_map(|rule| {
            if rule.matches.is_empty() {
                return Some((rule, None));
            }
            rule.matches
                .iter()
                .position(|m| m.accepts(r))
                .map(|k| (rule, Some(k)))
        })
    }

    /// Every cluster the route can send to.
    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.rules.iter().flat_map(Rule::clusters).chain(
            self.tcp
                .iter()
                .flat_map(|t| t.destinations.iter().map(|(c, _)| c)),
        )
    }
}

/// Routes by original destination.
#[derive(Default)]
pub struct RouteTable {
    /// ClusterIP:port → route.
    pub routes: HashMap<SocketAddrV4, Arc<Route>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ClusterKey {
    service: ObjectRef,
    port: u16,
    subset: Option<String>,
}

/// A problem in the traffic policy, on the object that has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// `VirtualService` or `DestinationRule`.
    pub kind: &'static str,
    /// The object.
    pub object: ObjectRef,
    /// Field and what is wrong.
    pub message: String,
}

impl ConfigProblem {
    fn new(kind: &'static str, object: &ObjectRef, message: String) -> Self {
        Self {
            kind,
            object: object.clone(),
            message,
        }
    }
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.message)
    }
}

/// Clusters by destination, kept across rebuilds.
#[derive(Default)]
pub struct Registry {
    clusters: HashMap<ClusterKey, Arc<Cluster>>,
    /// Routes of the last build, reused when nothing they depend on changed.
    cache: HashMap<SocketAddrV4, CachedRoute>,
    /// Frontends of the last build by Service, to tell which Services changed.
    last_frontends: HashMap<ObjectRef, Vec<Arc<Frontend>>>,
    /// The policy inputs of the last build (VirtualServices, DestinationRules, Pods).
    last_policy: Option<PolicyInputs>,
    /// Node-wide upstream pool settings.
    pool: PoolSettings,
}

#[derive(PartialEq)]
struct PolicyInputs {
    mesh_routes: BTreeMap<(RouteKind, ObjectRef), MeshRoute>,
    virtual_services: BTreeMap<ObjectRef, VirtualService>,
    destination_rules: BTreeMap<ObjectRef, DestinationRule>,
    pods: BTreeMap<ObjectRef, crate::model::PodInfo>,
}

/// Clusters in use in a build, and the ones the current route touched.
#[derive(Default)]
struct Used {
    map: HashMap<ClusterKey, Arc<Cluster>>,
    touched: Vec<ClusterKey>,
}

struct CachedRoute {
    frontend: Arc<Frontend>,
    route: Arc<Route>,
    /// Services whose backends the route's clusters hold.
    services: Vec<ObjectRef>,
    clusters: Vec<(ClusterKey, Arc<Cluster>)>,
    /// Problems found building it (restated while it is reused), and notes.
    problems: Vec<ConfigProblem>,
    notes: Vec<ConfigProblem>,
}

/// The namespace a wildcard host covers: `*.ns.svc.cluster.local` or `*.ns` → `ns`; `*` and
/// `*.svc.cluster.local`, `*.cluster.local` → every namespace (`None`).
fn wildcard_namespace(host: &str) -> Option<&str> {
    let rest = host.strip_prefix("*.")?;
    let ns = rest.split('.').next().unwrap_or_default();
    (!ns.is_empty() && ns != "svc" && ns != "cluster").then_some(ns)
}

/// Resolves an Istio host (`name`, `name.ns`, `name.ns.svc.cluster.local`) in `namespace`.
pub fn resolve_host(host: &str, namespace: &str) -> ObjectRef {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or_default();
    match parts.next() {
        Some(ns) if !ns.is_empty() => ObjectRef::new(ns, name),
        _ => ObjectRef::new(namespace, name),
    }
}

/// The pod IPs a block's `sourceLabels` and `sourceNamespace` allow (`None`: no such
/// condition, any client).
fn sources(
    state: &State,
    labels: &BTreeMap<String, String>,
    namespace: Option<&String>,
    exported: Option<&Vec<String>>,
) -> Option<HashSet<IpAddr>> {
    if labels.is_empty() && namespace.is_none() && exported.is_none() {
        return None;
    }
    Some(
        state
            .pods
            .iter()
            .filter(|(id, _)| namespace.is_none_or(|ns| &id.namespace == ns))
            .filter(|(id, _)| exported.is_none_or(|e| e.iter().any(|ns| ns == &id.namespace)))
            .filter(|(_, p)| labels.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .map(|(_, p)| p.ip)
            .collect(),
    )
}

/// `exportTo` as namespaces: `.` is the VirtualService's own.
fn exported_to(vs: &VirtualService, namespace: &str) -> Option<Vec<String>> {
    vs.export_to.as_ref().map(|e| {
        e.iter()
            .map(|n| {
                if n == "." {
                    namespace.to_string()
                } else {
                    n.clone()
                }
            })
            .collect()
    })
}

/// A Gateway API route attached to a Service: its key, the route and the parent entry.
type Attached<'a> = (&'a (RouteKind, ObjectRef), &'a MeshRoute, &'a ServiceParent);

struct Ctx<'a> {
    state: &'a State,
    by_service: BTreeMap<&'a ObjectRef, Vec<&'a Frontend>>,
    rules: HashMap<ObjectRef, (&'a ObjectRef, &'a DestinationRule)>,
    pod_labels: HashMap<Ipv4Addr, &'a BTreeMap<String, String>>,
}

impl Registry {
    /// An empty registry whose clusters pool upstream connections with `pool`.
    pub fn new(pool: PoolSettings) -> Self {
        Self {
            pool,
            ..Self::default()
        }
    }

    /// Builds the routing table for the L7 frontends of `state`; returns it with the problems
    /// found (each naming the object and field), which leave the affected route without backends.
    pub fn build(
        &mut self,
        state: &State,
        frontends: &[Arc<Frontend>],
        previous: &RouteTable,
    ) -> (RouteTable, Vec<ConfigProblem>) {
        let mut errors: Vec<ConfigProblem> = Vec::new();
        let mut by_service: BTreeMap<&ObjectRef, Vec<&Frontend>> = BTreeMap::new();
        for f in frontends {
            by_service.entry(&f.service).or_default().push(f);
        }
        let mut rules = HashMap::new();
        for (id, dr) in &state.destination_rules {
            let svc = resolve_host(&dr.host, &id.namespace);
            if let Some((other, _)) = rules.insert(svc.clone(), (id, dr)) {
                errors.push(ConfigProblem::new(
                    "DestinationRule",
                    id,
                    format!("spec.host: {svc} already has DestinationRule {other}; using {id}"),
                ));
            }
        }
        let mut services: HashMap<ObjectRef, (&ObjectRef, &VirtualService)> = HashMap::new();
        for (id, vs) in &state.virtual_services {
            for h in vs.hosts.iter().filter(|h| !h.starts_with('*')) {
                let svc = resolve_host(h, &id.namespace);
                if let Some((other, _)) = services.get(&svc) {
                    errors.push(ConfigProblem::new(
                        "VirtualService",
                        id,
                        format!(
                            "spec.hosts: {svc} is already routed by VirtualService {other}; ignored"
                        ),
                    ));
                    continue;
                }
                services.insert(svc, (id, vs));
            }
        }
        // Wildcards (`*.ns.svc.cluster.local`, `*`) route the Services no exact host names:
        // Istio prefers the more specific host.
        for (id, vs) in &state.virtual_services {
            for h in vs.hosts.iter().filter(|h| h.starts_with('*')) {
                let ns = wildcard_namespace(h);
                for svc in state.services.keys() {
                    if ns.is_none_or(|ns| svc.namespace == ns) {
                        services.entry(svc.clone()).or_insert((id, vs));
                    }
                }
            }
        }
        // Gateway API routes by the Service they attach to.
        let mut attached: HashMap<ObjectRef, Vec<Attached<'_>>> = HashMap::new();
        for (key, r) in &state.mesh_routes {
            for p in &r.parents {
                let svc = ObjectRef::new(
                    p.namespace
                        .clone()
                        .unwrap_or_else(|| key.1.namespace.clone()),
                    p.name.clone(),
                );
                attached.entry(svc).or_default().push((key, r, p));
            }
        }
        // Problems that do not make a route fall back to its last good version.
        let mut notes: Vec<ConfigProblem> = Vec::new();
        let pod_labels = state
            .pods
            .values()
            .filter_map(|p| match p.ip {
                IpAddr::V4(ip) => Some((ip, &p.labels)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let ctx = Ctx {
            state,
            by_service,
            rules,
            pod_labels,
        };
        // What changed since the last build decides which routes can be reused as they are.
        let policy_same = self.last_policy.as_ref().is_some_and(|p| {
            p.virtual_services == state.virtual_services
                && p.mesh_routes == state.mesh_routes
                && p.destination_rules == state.destination_rules
                && p.pods == state.pods
        });
        if !policy_same {
            self.last_policy = Some(PolicyInputs {
                mesh_routes: state.mesh_routes.clone(),
                virtual_services: state.virtual_services.clone(),
                destination_rules: state.destination_rules.clone(),
                pods: state.pods.clone(),
            });
        }
        let mut now_by_service: HashMap<ObjectRef, Vec<Arc<Frontend>>> = HashMap::new();
        for f in frontends {
            now_by_service
                .entry(f.service.clone())
                .or_default()
                .push(f.clone());
        }
        let same_frontends = |a: &[Arc<Frontend>], b: &[Arc<Frontend>]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
        };
        let mut changed: std::collections::HashSet<&ObjectRef> = now_by_service
            .iter()
            .filter(|(svc, fes)| {
                !self
                    .last_frontends
                    .get(*svc)
                    .is_some_and(|old| same_frontends(old, fes))
            })
            .map(|(svc, _)| svc)
            .collect();
        changed.extend(
            self.last_frontends
                .keys()
                .filter(|s| !now_by_service.contains_key(*s)),
        );
        let changed: std::collections::HashSet<ObjectRef> = changed.into_iter().cloned().collect();
        let mut cache = std::mem::take(&mut self.cache);
        let mut next_cache = HashMap::new();
        let mut used = Used::default();
        let mut table = RouteTable::default();
        for fe in frontends.iter().filter(|f| f.l7) {
            // The node proxy serves IPv4 frontends (IPv6 ones are balanced in the kernel).
            let IpAddr::V4(vip) = fe.vip else { continue };
            let key = SocketAddrV4::new(vip, fe.port);
            if policy_same
                && let Some(c) = cache.remove(&key)
                && Arc::ptr_eq(&c.frontend, fe)
                && !c.services.iter().any(|s| changed.contains(s))
            {
                for (k, cl) in &c.clusters {
                    used.map.entry(k.clone()).or_insert_with(|| cl.clone());
                }
                errors.extend(c.problems.iter().cloned());
                notes.extend(c.notes.iter().cloned());
                table.routes.insert(key, c.route.clone());
                next_cache.insert(key, c);
                continue;
            }
            used.touched.clear();
            let problems_before = errors.len();
            let notes_before = notes.len();
            let own = Destination {
                host: fe.service.name.clone(),
                subset: None,
                port: Some(fe.port),
            };
            let own_cluster = |reg: &Self, errors: &mut Vec<ConfigProblem>, used: &mut Used| {
                reg.cluster(
                    &ctx,
                    &own,
                    &fe.service.namespace,
                    Some(fe),
                    None,
                    "",
                    errors,
                    used,
                )
            };
            let gw: Vec<Attached<'_>> = attached
                .get(&fe.service)
                .into_iter()
                .flatten()
                .filter(|(_, _, p)| {
                    p.port.is_none_or(|x| x == fe.port)
                        && p.section.as_ref().is_none_or(|s| s == &fe.port_name)
                })
                .copied()
                .collect();
            let mut referenced: Vec<ObjectRef> = Vec::new();
            let route = match services.get(&fe.service) {
                _ if !gw.is_empty() => {
                    if let Some((vs_id, _)) = services.get(&fe.service) {
                        let (k, id) = gw[0].0;
                        notes.push(ConfigProblem::new(
                            "VirtualService",
                            vs_id,
                            format!(
                                "spec.hosts: {}:{} is routed by {} {id}: a Gateway API route attached to a Service takes precedence over a VirtualService for it",
                                fe.service,
                                fe.port,
                                k.name()
                            ),
                        ));
                    }
                    self.mesh_route(&ctx, fe, &gw, &mut errors, &mut used, &mut referenced)
                }
                Some((vs_id, vs)) => {
                    let exported = exported_to(vs, &vs_id.namespace);
                    let mut rules = Vec::new();
                    for (i, r) in vs.http.iter().enumerate() {
                        let f = format!("spec.http[{i}]");
                        // Blocks for another port of the Service never match here.
                        let blocks: Vec<&HttpMatch> = r
                            .matches
                            .iter()
                            .filter(|m| m.port.is_none_or(|p| p == fe.port))
                            .collect();
                        if !r.matches.is_empty() && blocks.is_empty() {
                            continue;
                        }
                        let mut matches: Vec<CompiledMatch> = blocks
                            .into_iter()
                            .map(|m| CompiledMatch {
                                sources: sources(
                                    state,
                                    &m.source_labels,
                                    m.source_namespace.as_ref(),
                                    exported.as_ref(),
                                ),
                                m: m.clone(),
                            })
                            .collect();
                        if matches.is_empty() && exported.is_some() {
                            // Clients outside exportTo never match: an implicit block.
                            matches.push(CompiledMatch {
                                sources: sources(state, &BTreeMap::new(), None, exported.as_ref()),
                                m: HttpMatch::default(),
                            });
                        }
                        let mut destinations = Vec::new();
                        for (j, (d, w)) in r.route.iter().enumerate() {
                            let field = format!("{f}.route[{j}].destination");
                            destinations.push((
                                self.cluster(
                                    &ctx,
                                    d,
                                    &vs_id.namespace,
                                    Some(fe),
                                    Some(("VirtualService", vs_id)),
                                    &field,
                                    &mut errors,
                                    &mut used,
                                ),
                                *w,
                            ));
                        }
                        let mirror = r.mirror.as_ref().map(|(d, pct)| Mirror {
                            cluster: self.cluster(
                                &ctx,
                                d,
                                &vs_id.namespace,
                                None,
                                Some(("VirtualService", vs_id)),
                                &format!("{f}.mirror"),
                                &mut errors,
                                &mut used,
                            ),
                            percent: *pct,
                        });
                        let retry = match &r.retries {
                            None => RetryPolicy::safe_default(),
                            Some(rt) => RetryPolicy {
                                attempts: rt.attempts,
                                per_try_timeout: rt.per_try_timeout,
                                on: rt.retry_on.clone(),
                                budgeted: false,
                                backoff: None,
                            },
                        };
                        rules.push(Rule {
                            index: i,
                            name: r.name.clone(),
                            matches,
                            destinations,
                            destination_headers: r.route_headers.clone(),
                            timeout: r.timeout,
                            retry,
                            mirror,
                            fault: r.fault.clone(),
                            rewrite: r.rewrite.clone(),
                            redirect: r.redirect.clone(),
                            direct_response: r.direct_response.clone(),
                            headers: r.headers.clone(),
                            cors: r.cors.clone(),
                            unresolved: None,
                            origin: None,
                        });
                    }
                    let own = own_cluster(self, &mut errors, &mut used);
                    if vs.http.is_empty() || exported.is_some() {
                        // A TCP-only VirtualService leaves HTTP to the Service; clients it is
                        // not exported to get the Service's own route.
                        rules.push(Rule::default_to(own.clone()));
                    }
                    let mut tcp = Vec::new();
                    for (i, t) in vs.tcp.iter().enumerate() {
                        let blocks: Vec<_> = t
                            .matches
                            .iter()
                            .filter(|m| m.port.is_none_or(|p| p == fe.port))
                            .collect();
                        if !t.matches.is_empty() && blocks.is_empty() {
                            continue;
                        }
                        let mut matches: Vec<Option<HashSet<IpAddr>>> = blocks
                            .iter()
                            .map(|m| {
                                sources(
                                    state,
                                    &m.source_labels,
                                    m.source_namespace.as_ref(),
                                    exported.as_ref(),
                                )
                            })
                            .collect();
                        if matches.is_empty() && exported.is_some() {
                            matches.push(sources(state, &BTreeMap::new(), None, exported.as_ref()));
                        }
                        let mut destinations = Vec::new();
                        for (j, (d, w)) in t.route.iter().enumerate() {
                            destinations.push((
                                self.cluster(
                                    &ctx,
                                    d,
                                    &vs_id.namespace,
                                    Some(fe),
                                    Some(("VirtualService", vs_id)),
                                    &format!("spec.tcp[{i}].route[{j}].destination"),
                                    &mut errors,
                                    &mut used,
                                ),
                                *w,
                            ));
                        }
                        tcp.push(TcpRule {
                            matches,
                            destinations,
                        });
                    }
                    tcp.push(TcpRule {
                        matches: Vec::new(),
                        destinations: vec![(own, 100)],
                    });
                    Route {
                        service: fe.service.clone(),
                        metrics_id: super::telemetry::service_id(&fe.service),
                        virtual_service: Some((*vs_id).clone()),
                        rules,
                        tcp,
                        detection: fe.detection,
                    }
                }
                _ => {
                    let c = own_cluster(self, &mut errors, &mut used);
                    Route {
                        service: fe.service.clone(),
                        metrics_id: super::telemetry::service_id(&fe.service),
                        virtual_service: None,
                        rules: vec![Rule::default_to(c.clone())],
                        tcp: vec![TcpRule {
                            matches: Vec::new(),
                            destinations: vec![(c, 100)],
                        }],
                        detection: fe.detection,
                    }
                }
            };
            // A route whose policy has a problem keeps its last good version, if it had one.
            let route = match previous.routes.get(&key) {
                Some(old) if errors.len() > problems_before => old.clone(),
                _ => Arc::new(route),
            };
            table.routes.insert(key, route.clone());
            // Remember what it depends on: every cluster it touched.
            let clusters: Vec<(ClusterKey, Arc<Cluster>)> = std::mem::take(&mut used.touched)
                .into_iter()
                .filter_map(|k| used.map.get(&k).map(|c| (k, c.clone())))
                .collect();
            let mut services: Vec<ObjectRef> =
                clusters.iter().map(|(k, _)| k.service.clone()).collect();
            services.push(fe.service.clone());
            services.extend(referenced);
            services.sort();
            services.dedup();
            next_cache.insert(
                key,
                CachedRoute {
                    frontend: fe.clone(),
                    route,
                    services,
                    clusters,
                    problems: errors[problems_before..].to_vec(),
                    notes: notes[notes_before..].to_vec(),
                },
            );
        }
        self.clusters = used.map;
        self.cache = next_cache;
        self.last_frontends = now_by_service;
        errors.extend(notes);
        (table, errors)
    }

    #[allow(clippy::too_many_arguments)]
    fn cluster(
        &self,
        ctx: &Ctx<'_>,
        d: &Destination,
        namespace: &str,
        from: Option<&Frontend>,
        origin: Option<(&'static str, &ObjectRef)>,
        field: &str,
        errors: &mut Vec<ConfigProblem>,
        used: &mut Used,
    ) -> Arc<Cluster> {
        let svc = resolve_host(&d.host, namespace);
        let fes = ctx.by_service.get(&svc).map(Vec::as_slice).unwrap_or(&[]);
        let fe = match d.port {
            Some(p) => fes.iter().find(|f| f.port == p),
            None if fes.len() == 1 => fes.first(),
            None => from
                .filter(|f| f.service == svc)
                .and_then(|f| fes.iter().find(|x| x.port == f.port))
                .or(fes.first()),
        };
        let port = fe.map_or(d.port.unwrap_or(0), |f| f.port);
        let key = ClusterKey {
            service: svc.clone(),
            port,
            subset: d.subset.clone(),
        };
        used.touched.push(key.clone());
        if let Some(c) = used.map.get(&key) {
            return c.clone();
        }
        let name = || {
            format!(
                "{svc}:{port}{}",
                d.subset
                    .as_ref()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default()
            )
        };
        let spec = self.cluster_spec(ctx, d, &svc, fe);
        let c = match (spec, self.clusters.get(&key)) {
            (Ok((addrs, policy)), Some(old)) => old.updated(&addrs, policy),
            (Ok((addrs, policy)), None) => {
                Arc::new(Cluster::of_subset(name(), d.subset.clone(), &addrs, policy))
            }
            (Err(problem), old) => {
                if let Some((kind, id)) = origin {
                    errors.push(ConfigProblem::new(kind, id, format!("{field}.{problem}")));
                }
                // The route that named it keeps its last good version, and that version's
                // cluster must stay as it was: an invalid destination never replaces it.
                return old.cloned().unwrap_or_else(|| {
                    Arc::new(Cluster::of_subset(
                        name(),
                        d.subset.clone(),
                        &[],
                        self.default_policy(from),
                    ))
                });
            }
        };
        used.map.insert(key, c.clone());
        c
    }

    /// The route of a Service port that Gateway API routes attach to: every match of every
    /// rule, ordered by the specification's precedence. `referenced` gets the Services the
    /// rules name (so the route is rebuilt when one appears).
    fn mesh_route(
        &self,
        ctx: &Ctx<'_>,
        fe: &Frontend,
        gw: &[Attached<'_>],
        errors: &mut Vec<ConfigProblem>,
        used: &mut Used,
        referenced: &mut Vec<ObjectRef>,
    ) -> Route {
        struct Entry<'a> {
            rank: [u32; 5],
            created: Option<jiff::Timestamp>,
            id: &'a ObjectRef,
            kind: RouteKind,
            rule: usize,
            block: usize,
            route: &'a MeshRoute,
        }
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        for ((kind, id), r, _) in gw {
            if !seen.insert((*kind, id)) {
                continue; // two parent entries naming this port
            }
            for (i, rule) in r.rules.iter().enumerate() {
                for (j, m) in rule.matches.iter().enumerate() {
                    entries.push(Entry {
                        rank: m.rank,
                        created: r.created,
                        id,
                        kind: *kind,
                        rule: i,
                        block: j,
                        route: r,
                    });
                }
            }
        }
        // Higher rank first; then the oldest route (unknown times last), then namespace/name,
        // then rule and match order.
        entries.sort_by(|a, b| {
            b.rank
                .cmp(&a.rank)
                .then_with(|| match (a.created, b.created) {
                    (Some(x), Some(y)) => x.cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                })
                .then_with(|| a.id.cmp(b.id))
                .then_with(|| a.kind.cmp(&b.kind))
                .then_with(|| (a.rule, a.block).cmp(&(b.rule, b.block)))
        });
        let mut origins: HashMap<(RouteKind, &ObjectRef), Arc<RuleOrigin>> = HashMap::new();
        // Resolves a backend reference: the cluster, or None (the 500 share).
        let mut resolve = |reg: &Self,
                           b: &crate::gateway::BackendRef,
                           ns: &str,
                           errors: &mut Vec<ConfigProblem>,
                           used: &mut Used|
         -> Option<Arc<Cluster>> {
            if b.invalid.is_some() {
                return None;
            }
            let bns = b.namespace.as_deref().unwrap_or(ns);
            let svc = ObjectRef::new(bns, b.name.clone());
            referenced.push(svc.clone());
            // Cross-namespace references need a ReferenceGrant, which is not read yet.
            if bns != ns {
                return None;
            }
            let known = ctx
                .by_service
                .get(&svc)
                .is_some_and(|fes| fes.iter().any(|f| Some(f.port) == b.port));
            known.then(|| {
                reg.cluster(
                    ctx,
                    &Destination {
                        host: format!("{}.{}", b.name, bns),
                        subset: None,
                        port: b.port,
                    },
                    bns,
                    Some(fe),
                    None,
                    "",
                    errors,
                    used,
                )
            })
        };
        let mut rules = Vec::new();
        for e in entries {
            let rule = &e.route.rules[e.rule];
            let ns = e.id.namespace.as_str();
            let origin = origins
                .entry((e.kind, e.id))
                .or_insert_with(|| {
                    Arc::new(RuleOrigin {
                        kind: e.kind.name(),
                        object: e.id.clone(),
                    })
                })
                .clone();
            let mut destinations = Vec::new();
            let mut destination_headers = Vec::new();
            let mut unresolved = 0u32;
            if rule.redirect.is_none() {
                for b in &rule.backends {
                    match resolve(self, &b.to, ns, errors, used) {
                        Some(c) => {
                            destinations.push((c, b.weight));
                            destination_headers.push(b.headers.clone());
                        }
                        None => unresolved += b.weight,
                    }
                }
            }
            let mirror = rule.mirrors.first().and_then(|(b, pct)| {
                resolve(self, b, ns, errors, used).map(|cluster| Mirror {
                    cluster,
                    percent: *pct,
                })
            });
            let retry = match &rule.retry {
                Some(r) => RetryPolicy {
                    attempts: r.attempts,
                    per_try_timeout: rule.backend_timeout,
                    on: crate::gateway::retry_on(r),
                    budgeted: false,
                    backoff: r.backoff,
                },
                None => RetryPolicy {
                    per_try_timeout: rule.backend_timeout,
                    ..RetryPolicy::safe_default()
                },
            };
            // Consumer routes (in another namespace than the Service) apply to their
            // namespace's clients only.
            let sources = (ns != fe.service.namespace).then(|| {
                ctx.state
                    .pods
                    .iter()
                    .filter(|(id, _)| id.namespace == ns)
                    .map(|(_, p)| p.ip)
                    .collect()
            });
            rules.push(Rule {
                index: e.rule,
                name: rule.name.clone(),
                matches: vec![CompiledMatch {
                    m: crate::istio::HttpMatch {
                        name: Some(format!("matches[{}]", e.block)),
                        ..rule.matches[e.block].m.clone()
                    },
                    sources,
                }],
                destinations,
                destination_headers,
                timeout: rule.timeout,
                retry,
                mirror,
                fault: None,
                rewrite: rule.rewrite.clone(),
                redirect: rule.redirect.clone(),
                direct_response: None,
                headers: rule.headers.clone(),
                cors: rule.cors.clone(),
                unresolved: Some(unresolved),
                origin: Some(origin),
            });
        }
        // Opaque connections to the port keep going to the Service's own backends.
        let own = self.cluster(
            ctx,
            &Destination {
                host: fe.service.name.clone(),
                subset: None,
                port: Some(fe.port),
            },
            &fe.service.namespace,
            Some(fe),
            None,
            "",
            errors,
            used,
        );
        Route {
            service: fe.service.clone(),
            metrics_id: super::telemetry::service_id(&fe.service),
            virtual_service: None,
            rules,
            tcp: vec![TcpRule {
                matches: Vec::new(),
                destinations: vec![(own, 100)],
            }],
            detection: fe.detection,
        }
    }

    fn default_policy(&self, from: Option<&Frontend>) -> ClusterPolicy {
        ClusterPolicy {
            lb: LoadBalancer::LeastRequest,
            pool: Default::default(),
            outlier: Some(Default::default()),
            h2: from.is_some_and(|f| f.h2),
            idle: self.pool,
        }
    }

    /// The backends and policy of a destination, or what is wrong with it (a field path
    /// relative to the destination, and the problem).
    fn cluster_spec(
        &self,
        ctx: &Ctx<'_>,
        d: &Destination,
        svc: &ObjectRef,
        fe: Option<&&Frontend>,
    ) -> Result<(Vec<SocketAddr>, ClusterPolicy), String> {
        let Some(fe) = fe else {
            return Err(format!(
                "host: no Service port {svc}{} is known",
                d.port.map(|p| format!(":{p}")).unwrap_or_default()
            ));
        };
        let ready: Vec<_> = fe.backends.iter().filter(|b| !b.terminating).collect();
        let set = if ready.is_empty() {
            fe.backends.iter().collect()
        } else {
            ready
        };
        let mut addrs: Vec<SocketAddr> = set
            .iter()
            .map(|b| SocketAddr::from((b.addr, b.port)))
            .collect();
        let rule = ctx.rules.get(svc);
        let mut policy = rule.map(|(_, r)| r.policy.clone()).unwrap_or_default();
        if let Some(name) = &d.subset {
            let Some(s) = rule.and_then(|(_, r)| r.subsets.iter().find(|s| &s.name == name)) else {
                let known = rule.map(|(id, r)| {
                    format!(
                        "DestinationRule {id} defines {:?}",
                        r.subsets.iter().map(|s| &s.name).collect::<Vec<_>>()
                    )
                });
                return Err(format!(
                    "subset: unknown subset {name:?} ({})",
                    known.unwrap_or_else(|| format!("no DestinationRule for {svc}"))
                ));
            };
            policy = s.policy.clone();
            addrs.retain(|a| {
                let std::net::IpAddr::V4(ip) = a.ip() else {
                    return false;
                };
                ctx.pod_labels
                    .get(&ip)
                    .is_some_and(|l| s.labels.iter().all(|(k, v)| l.get(k) == Some(v)))
            });
        }
        let _ = ctx.state;
        // portLevelSettings of the destination's port.
        let policy = policy.for_port(fe.port);
        Ok((
            addrs,
            ClusterPolicy {
                lb: policy.load_balancer.unwrap_or(LoadBalancer::LeastRequest),
                pool: policy.connection_pool.unwrap_or_default(),
                outlier: Some(policy.outlier.unwrap_or_default()),
                h2: fe.h2,
                idle: self.pool,
            },
        ))
    }
}

/// Times [`Route::select`] (`cargo xtask bench l7`): nanoseconds per request for a route of
/// one rule, and for a VirtualService of `rules` rules whose first `rules - 1` (a header and a
/// path prefix each) miss the request, so each request evaluates all of them.
pub fn bench_select(requests: u32, rules: usize) -> (f64, f64) {
    use crate::model::{
        Endpoint, EndpointPort, EndpointSlice, EndpointState, FrontendCache, Protocol, Service,
        ServicePort,
    };
    let id = ObjectRef::new("default", "web");
    let mut st = State::default();
    st.services.insert(
        id.clone(),
        Arc::new(Service {
            id: id.clone(),
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
        }),
    );
    let slice = ObjectRef::new("default", "web-1");
    st.slices.insert(
        slice.clone(),
        Arc::new(EndpointSlice {
            id: slice,
            service: id.clone(),
            ports: vec![EndpointPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            endpoints: vec![Endpoint {
                addr: Ipv4Addr::new(198, 18, 1, 1).into(),
                state: EndpointState::Ready,
                node_name: None,
                pod: None,
                hint_zones: None,
            }],
            trigger_time: None,
        }),
    );
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::HOST, http::HeaderValue::from_static("web"));
    headers.insert("user-agent", http::HeaderValue::from_static("wrk"));
    let time = |st: &State| {
        let mut reg = Registry::default();
        let fes = FrontendCache::default().frontends(st, None);
        let (t, _) = reg.build(st, &fes, &RouteTable::default());
        let route = t.routes.values().next().cloned().expect("a route");
        let method = http::Method::GET;
        let view = RequestView {
            method: &method,
            path: "/",
            query: None,
            authority: "web",
            headers: &headers,
            client: IpAddr::from([198, 18, 0, 2]),
        };
        let started = std::time::Instant::now();
        let mut hit = 0usize;
        for _ in 0..requests {
            hit += std::hint::black_box(route.select(std::hint::black_box(&view)))
                .map_or(0, |(r, _)| r.index);
        }
        std::hint::black_box(hit);
        started.elapsed().as_nanos() as f64 / f64::from(requests.max(1))
    };
    let one = time(&st);
    let mut y = String::from("hosts: [web]\nhttp:\n");
    for i in 0..rules.saturating_sub(1) {
        y.push_str(&format!(
            "- match: [{{headers: {{x-tenant: {{exact: tenant-{i}}}}}, uri: {{prefix: /tenant-{i}/}}}}]\n  route: [{{destination: {{host: web}}}}]\n"
        ));
    }
    y.push_str("- route: [{destination: {host: web}}]\n");
    let vs = serde_yaml::from_str(&y)
        .ok()
        .and_then(|v| crate::istio::virtual_service(v).ok())
        .expect("the benchmark's VirtualService is valid");
    st.virtual_services.insert(id, vs);
    (one, time(&st))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        Endpoint, EndpointPort, EndpointSlice, EndpointState, FrontendCache, Protocol, Service,
        ServicePort,
    };

    fn svc(name: &str, last: u8) -> (Arc<Service>, Arc<EndpointSlice>) {
        let id = ObjectRef::new("default", name);
        let s = Service {
            id: id.clone(),
            cluster_ips: vec![std::net::Ipv4Addr::new(198, 19, 0, last).into()],
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
        };
        let sl = EndpointSlice {
            id: ObjectRef::new("default", format!("{name}-1")),
            service: id,
            ports: vec![EndpointPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            endpoints: vec![Endpoint {
                addr: std::net::Ipv4Addr::new(198, 18, 1, last).into(),
                state: EndpointState::Ready,
                node_name: None,
                pod: None,
                hint_zones: None,
            }],
            trigger_time: None,
        };
        (Arc::new(s), Arc::new(sl))
    }

    fn state(names: &[(&str, u8)]) -> State {
        let mut st = State::default();
        for (n, last) in names {
            let (s, sl) = svc(n, *last);
            st.services.insert(s.id.clone(), s);
            st.slices.insert(sl.id.clone(), sl);
        }
        let vs = crate::istio::virtual_service(
            serde_yaml::from_str(
                "hosts: [a]\nhttp:\n- route: [{destination: {host: a}}]\n  mirror: {host: b}\n",
            )
            .unwrap(),
        )
        .unwrap();
        st.virtual_services
            .insert(ObjectRef::new("default", "a"), vs);
        st
    }

    #[test]
    fn unchanged_routes_are_reused_and_referenced_services_update_them() {
        let mut reg = Registry::default();
        let mut cache = FrontendCache::default();
        let mut st = state(&[("a", 1), ("b", 2), ("c", 3)]);
        let (t1, p) = reg.build(&st, &cache.frontends(&st, None), &RouteTable::default());
        assert!(p.is_empty(), "{p:?}");
        let a = SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 1), 80);
        // An unrelated Service changes: A's route is the very same object.
        let (_, mut c_slice) = svc("c", 3);
        Arc::make_mut(&mut c_slice).endpoints[0].addr =
            std::net::Ipv4Addr::new(198, 18, 9, 9).into();
        st.slices.insert(c_slice.id.clone(), c_slice);
        let (t2, _) = reg.build(&st, &cache.frontends(&st, None), &t1);
        assert!(Arc::ptr_eq(&t1.routes[&a], &t2.routes[&a]));
        // B (A's mirror) changes: A's mirror cluster sees B's new backend.
        let (_, mut b_slice) = svc("b", 2);
        Arc::make_mut(&mut b_slice).endpoints[0].addr =
            std::net::Ipv4Addr::new(198, 18, 7, 7).into();
        st.slices.insert(b_slice.id.clone(), b_slice);
        let (t3, _) = reg.build(&st, &cache.frontends(&st, None), &t2);
        let mirror = t3.routes[&a].rules[0].mirror.as_ref().unwrap();
        let addrs: Vec<_> = mirror.cluster.backends().iter().map(|b| b.addr).collect();
        assert_eq!(addrs, [SocketAddr::from(([198, 18, 7, 7], 8080))]);
    }

    fn view<'a>(
        method: &'a http::Method,
        target: &'a str,
        headers: &'a http::HeaderMap,
        client: [u8; 4],
    ) -> RequestView<'a> {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        RequestView {
            method,
            path,
            query,
            authority: "a",
            headers,
            client: IpAddr::from(client),
        }
    }

    #[test]
    fn the_first_matching_rule_serves_and_blocks_for_other_ports_or_clients_never_match() {
        let mut st = state(&[("a", 1)]);
        let vs = crate::istio::virtual_service(
            serde_yaml::from_str(
                r#"
hosts: [a]
http:
- name: other-port
  match: [{port: 8443}]
  route: [{destination: {host: a}}]
- name: jason
  match:
  - headers: {end-user: {exact: jason}}
  - queryParams: {user: {exact: jason smith}}
  route: [{destination: {host: a}}]
- name: from-frontend
  match: [{sourceLabels: {app: frontend}, uri: {prefix: /api}, withoutHeaders: {x-debug: {}}}]
  route: [{destination: {host: a}}]
- name: gets
  match: [{method: {exact: GET}, uri: {regex: "/items/[0-9]+"}}]
  route: [{destination: {host: a}}]
"#,
            )
            .unwrap(),
        )
        .unwrap();
        st.virtual_services
            .insert(ObjectRef::new("default", "a"), vs);
        st.pods.insert(
            ObjectRef::new("default", "frontend-1"),
            crate::model::PodInfo {
                ip: std::net::Ipv4Addr::new(198, 18, 5, 5).into(),
                labels: [("app".to_string(), "frontend".to_string())].into(),
            },
        );
        let mut reg = Registry::default();
        let mut cache = FrontendCache::default();
        let (t, p) = reg.build(&st, &cache.frontends(&st, None), &RouteTable::default());
        assert!(p.is_empty(), "{p:?}");
        let route = &t.routes[&SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 1), 80)];
        assert_eq!(route.rules.len(), 3, "the port-8443 rule is not on port 80");
        let name = |method: &http::Method, target: &str, h: &[(&str, &str)], client: [u8; 4]| {
            let mut map = http::HeaderMap::new();
            for (k, v) in h {
                map.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                );
            }
            route
                .select(&view(method, target, &map, client))
                .map(|(r, b)| (r.name.clone().unwrap(), b))
        };
        let get = http::Method::GET;
        let other = [198, 18, 9, 9];
        assert_eq!(
            name(&get, "/", &[("end-user", "jason")], other),
            Some(("jason".into(), Some(0)))
        );
        assert_eq!(
            name(&get, "/?a=1&user=jason+smith", &[], other),
            Some(("jason".into(), Some(1)))
        );
        assert_eq!(
            name(&get, "/?user=jason%20smith", &[], other).unwrap().0,
            "jason"
        );
        assert_eq!(
            name(&get, "/", &[("end-user", "jasonx")], other),
            None,
            "no rule: 404"
        );
        let frontend = [198, 18, 5, 5];
        assert_eq!(
            name(&get, "/api/x", &[], frontend).unwrap().0,
            "from-frontend"
        );
        assert_eq!(name(&get, "/api/x", &[], other), None, "sourceLabels");
        assert_eq!(
            name(&get, "/api/x", &[("x-debug", "")], frontend),
            None,
            "withoutHeaders"
        );
        assert_eq!(name(&get, "/items/12", &[], other).unwrap().0, "gets");
        assert_eq!(
            name(&get, "/items/12x", &[], other),
            None,
            "regexes match whole paths"
        );
        assert_eq!(name(&http::Method::POST, "/items/12", &[], other), None);
    }

    fn vs(yaml: &str) -> VirtualService {
        crate::istio::virtual_service(serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn tcp_routes_export_to_and_wildcard_hosts() {
        let mut st = state(&[("a", 1), ("b", 2), ("c", 3)]);
        st.virtual_services.clear();
        // A wildcard for the namespace, an exact host for b (it wins), TCP routes for a.
        st.virtual_services.insert(
            ObjectRef::new("default", "all"),
            vs("hosts: ['*.default.svc.cluster.local']\nexportTo: ['.']\nhttp:\n- name: all\n  route: [{destination: {host: c}}]\ntcp:\n- match: [{port: 80}]\n  route: [{destination: {host: c}}]\n"),
        );
        st.virtual_services.insert(
            ObjectRef::new("default", "b"),
            vs("hosts: [b.default.svc.cluster.local]\ntcp:\n- route: [{destination: {host: c}}]\n"),
        );
        for (ns, name, last) in [("default", "inside", 5), ("other", "outside", 6)] {
            st.pods.insert(
                ObjectRef::new(ns, name),
                crate::model::PodInfo {
                    ip: std::net::Ipv4Addr::new(198, 18, 5, last).into(),
                    labels: Default::default(),
                },
            );
        }
        let mut reg = Registry::default();
        let mut cache = FrontendCache::default();
        let (t, p) = reg.build(&st, &cache.frontends(&st, None), &RouteTable::default());
        assert!(p.is_empty(), "{p:?}");
        let at =
            |last| &t.routes[&SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, last), 80)];
        let (a, b) = (at(1), at(2));
        assert_eq!(a.virtual_service, Some(ObjectRef::new("default", "all")));
        assert_eq!(b.virtual_service, Some(ObjectRef::new("default", "b")));
        let (inside, outside) = (IpAddr::from([198, 18, 5, 5]), IpAddr::from([198, 18, 5, 6]));
        let name_of = |r: &Route, client| {
            let h = http::HeaderMap::new();
            let get = http::Method::GET;
            let rule = r
                .select(&view(
                    &get,
                    "/",
                    &h,
                    match client {
                        IpAddr::V4(v) => v.octets(),
                        IpAddr::V6(_) => unreachable!(),
                    },
                ))
                .unwrap()
                .0;
            rule.destinations[0].0.name.clone()
        };
        // exportTo ["."]: only clients in the VirtualService's namespace are routed by it.
        assert_eq!(name_of(a, inside), "default/c:80");
        assert_eq!(name_of(a, outside), "default/a:80");
        let tcp_of = |r: &Route, client| r.tcp_destinations(client)[0].0.name.clone();
        assert_eq!(tcp_of(a, inside), "default/c:80");
        assert_eq!(tcp_of(a, outside), "default/a:80");
        // A TCP-only VirtualService: HTTP goes to the Service itself, TCP to c.
        assert_eq!(name_of(b, outside), "default/b:80");
        assert_eq!(tcp_of(b, outside), "default/c:80");
    }

    fn mesh(st: &mut State, kind: RouteKind, name: &str, created: &str, yaml: &str) {
        let meta = crate::gateway::Meta {
            created: Some(created.into()),
            ..Default::default()
        };
        let r = crate::gateway::route(kind, serde_yaml::from_str(yaml).unwrap(), &meta).unwrap();
        st.mesh_routes
            .insert((kind, ObjectRef::new("default", name)), r);
    }

    #[test]
    fn gateway_routes_are_ordered_by_precedence_across_routes_and_win_over_a_virtual_service() {
        let mut st = state(&[("echo", 1), ("echo-v1", 2), ("echo-v2", 3)]);
        let vs = crate::istio::virtual_service(
            serde_yaml::from_str(
                "hosts: [echo]\nhttp:\n- route: [{destination: {host: echo-v2}}]\n",
            )
            .unwrap(),
        )
        .unwrap();
        st.virtual_services
            .insert(ObjectRef::new("default", "echo-vs"), vs);
        mesh(
            &mut st,
            RouteKind::Http,
            "older",
            "2026-01-01T00:00:00Z",
            r#"
parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
rules:
- matches: [{path: {type: PathPrefix, value: /v2}}]
  backendRefs: [{name: echo-v2, port: 80}]
- backendRefs: [{name: echo-v1, port: 80, weight: 3}, {name: missing, port: 80, weight: 1}]
"#,
        );
        mesh(
            &mut st,
            RouteKind::Http,
            "newer",
            "2026-06-01T00:00:00Z",
            r#"
parentRefs: [{group: "", kind: Service, name: echo}]
rules:
- matches: [{path: {type: PathPrefix, value: /v2}}]
  backendRefs: [{name: echo-v1, port: 80}]
- matches: [{path: {type: Exact, value: /v2/exact}}, {path: {type: PathPrefix, value: /v2}, headers: [{name: x, value: "1"}]}]
  backendRefs: [{name: echo-v1, port: 80}]
- matches: [{path: {type: PathPrefix, value: /zero}}]
  backendRefs: [{name: echo-v1, port: 80, weight: 0}]
"#,
        );
        // A route for another port of echo does not apply to port 80.
        mesh(
            &mut st,
            RouteKind::Http,
            "other-port",
            "2025-01-01T00:00:00Z",
            r#"
parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
rules: [{matches: [{path: {type: Exact, value: /v2/x}}], backendRefs: [{name: echo-v2, port: 80}]}]
"#,
        );
        let mut reg = Registry::default();
        let mut cache = FrontendCache::default();
        let (t, problems) = reg.build(&st, &cache.frontends(&st, None), &RouteTable::default());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object.name, "echo-vs");
        assert!(problems[0].message.contains("HTTPRoute"), "{problems:?}");
        let echo = &t.routes[&SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 1), 80)];
        let get = http::Method::GET;
        let mut h = http::HeaderMap::new();
        let pick = |target: &str, h: &http::HeaderMap| -> (String, Vec<String>, Option<u32>) {
            let (rule, _) = echo
                .select(&view(&get, target, h, [198, 18, 0, 9]))
                .unwrap();
            (
                rule.describe(echo),
                rule.destinations
                    .iter()
                    .map(|(c, w)| format!("{}*{w}", c.name))
                    .collect(),
                rule.unresolved,
            )
        };
        // Exact beats every prefix.
        assert_eq!(pick("/v2/exact", &h).0, "HTTPRoute default/newer rules[1]");
        // More header matches beat an equal prefix.
        h.insert("x", http::HeaderValue::from_static("1"));
        assert_eq!(pick("/v2/y", &h).0, "HTTPRoute default/newer rules[1]");
        h.clear();
        // Equal prefixes: the older route wins.
        assert_eq!(
            pick("/v2/y", &h),
            (
                "HTTPRoute default/older rules[0]".into(),
                vec!["default/echo-v2:80*1".into()],
                Some(0)
            )
        );
        // Segment prefix: /v2x is not under /v2; a missing backend is a 500 share.
        assert_eq!(
            pick("/v2x", &h),
            (
                "HTTPRoute default/older rules[1]".into(),
                vec!["default/echo-v1:80*3".into()],
                Some(1)
            )
        );
        let (_, d, u) = pick("/zero/a", &h);
        assert_eq!((d, u), (vec!["default/echo-v1:80*0".to_string()], Some(0)));
        // The missing Service appears: the route is rebuilt and the share resolves.
        let (m, m_slice) = svc("missing", 4);
        st.services.insert(m.id.clone(), m);
        st.slices.insert(m_slice.id.clone(), m_slice);
        let (t2, _) = reg.build(&st, &cache.frontends(&st, None), &t);
        let echo = &t2.routes[&SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 1), 80)];
        let (rule, _) = echo
            .select(&view(&get, "/v2x", &h, [198, 18, 0, 9]))
            .unwrap();
        assert_eq!((rule.destinations.len(), rule.unresolved), (2, Some(0)));
    }
}
