//! The proxy's routing table, built from the desired state: which clusters serve a ClusterIP
//! port, with which retries, timeouts and mirror. Clusters live in a registry across rebuilds so
//! backend health and pooled connections survive configuration changes.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use super::cluster::{Cluster, ClusterPolicy, PoolSettings};
use crate::istio::{Destination, DestinationRule, LoadBalancer, RetryOn, VirtualService};
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

/// How requests to one ClusterIP port are handled.
pub struct Route {
    /// The Service.
    pub service: ObjectRef,
    /// The Service's id in metrics series.
    pub metrics_id: u32,
    /// The VirtualService that routes it (`None`: the Service's default route).
    pub virtual_service: Option<ObjectRef>,
    /// Weighted destinations.
    pub destinations: Vec<(Arc<Cluster>, u32)>,
    /// Overall timeout.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryPolicy,
    /// Mirror.
    pub mirror: Option<Mirror>,
    /// Protocol detection of the Service port.
    pub detection: ProtocolHint,
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
            for h in &vs.hosts {
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
        let pod_labels = state.pods.values().map(|p| (p.ip, &p.labels)).collect();
        let ctx = Ctx {
            state,
            by_service,
            rules,
            pod_labels,
        };
        // What changed since the last build decides which routes can be reused as they are.
        let policy_same = self.last_policy.as_ref().is_some_and(|p| {
            p.virtual_services == state.virtual_services
                && p.destination_rules == state.destination_rules
                && p.pods == state.pods
        });
        if !policy_same {
            self.last_policy = Some(PolicyInputs {
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
            let key = SocketAddrV4::new(fe.vip, fe.port);
            if policy_same
                && let Some(c) = cache.remove(&key)
                && Arc::ptr_eq(&c.frontend, fe)
                && !c.services.iter().any(|s| changed.contains(s))
            {
                for (k, cl) in &c.clusters {
                    used.map.entry(k.clone()).or_insert_with(|| cl.clone());
                }
                table.routes.insert(key, c.route.clone());
                next_cache.insert(key, c);
                continue;
            }
            used.touched.clear();
            let problems_before = errors.len();
            let own = Destination {
                host: fe.service.name.clone(),
                subset: None,
                port: Some(fe.port),
            };
            let route = match services.get(&fe.service) {
                Some((vs_id, vs)) if !vs.http.is_empty() => {
                    let r = &vs.http[0];
                    let mut destinations = Vec::new();
                    for (j, (d, w)) in r.route.iter().enumerate() {
                        let field = format!("spec.http[0].route[{j}].destination");
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
                            "spec.http[0].mirror",
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
                        },
                    };
                    Route {
                        service: fe.service.clone(),
                        metrics_id: super::telemetry::service_id(&fe.service),
                        virtual_service: Some((*vs_id).clone()),
                        destinations,
                        timeout: r.timeout,
                        retry,
                        mirror,
                        detection: fe.detection,
                    }
                }
                _ => {
                    let c = self.cluster(
                        &ctx,
                        &own,
                        &fe.service.namespace,
                        Some(fe),
                        None,
                        "",
                        &mut errors,
                        &mut used,
                    );
                    Route {
                        service: fe.service.clone(),
                        metrics_id: super::telemetry::service_id(&fe.service),
                        virtual_service: None,
                        destinations: vec![(c, 100)],
                        timeout: None,
                        retry: RetryPolicy::safe_default(),
                        mirror: None,
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
            services.sort();
            services.dedup();
            next_cache.insert(
                key,
                CachedRoute {
                    frontend: fe.clone(),
                    route,
                    services,
                    clusters,
                },
            );
        }
        self.clusters = used.map;
        self.cache = next_cache;
        self.last_frontends = now_by_service;
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
            cluster_ip: std::net::Ipv4Addr::new(198, 19, 0, last),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                app_protocol: None,
            }],
            affinity_timeout_s: None,
            mode: None,
            detection: Default::default(),
            internal_local: false,
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
                addr: std::net::Ipv4Addr::new(198, 18, 1, last),
                state: EndpointState::Ready,
                node_name: None,
                pod: None,
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
        Arc::make_mut(&mut c_slice).endpoints[0].addr = std::net::Ipv4Addr::new(198, 18, 9, 9);
        st.slices.insert(c_slice.id.clone(), c_slice);
        let (t2, _) = reg.build(&st, &cache.frontends(&st, None), &t1);
        assert!(Arc::ptr_eq(&t1.routes[&a], &t2.routes[&a]));
        // B (A's mirror) changes: A's mirror cluster sees B's new backend.
        let (_, mut b_slice) = svc("b", 2);
        Arc::make_mut(&mut b_slice).endpoints[0].addr = std::net::Ipv4Addr::new(198, 18, 7, 7);
        st.slices.insert(b_slice.id.clone(), b_slice);
        let (t3, _) = reg.build(&st, &cache.frontends(&st, None), &t2);
        let mirror = t3.routes[&a].mirror.as_ref().unwrap();
        let addrs: Vec<_> = mirror.cluster.backends().iter().map(|b| b.addr).collect();
        assert_eq!(addrs, [SocketAddr::from(([198, 18, 7, 7], 8080))]);
    }
}
