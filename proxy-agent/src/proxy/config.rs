//! The proxy's routing table, built from the desired state: which clusters serve a ClusterIP
//! port, with which retries, timeouts and mirror. Clusters live in a registry across rebuilds so
//! backend health and pooled connections survive configuration changes.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use super::cluster::{Cluster, ClusterPolicy};
use crate::istio::{Destination, DestinationRule, LoadBalancer, RetryOn, VirtualService};
use crate::model::{Frontend, ObjectRef, State};

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
    /// Weighted destinations.
    pub destinations: Vec<(Arc<Cluster>, u32)>,
    /// Overall timeout.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryPolicy,
    /// Mirror.
    pub mirror: Option<Mirror>,
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
    /// Builds the routing table for the L7 frontends of `state`; returns it with the problems
    /// found (each naming the object and field), which leave the affected route without backends.
    pub fn build(
        &mut self,
        state: &State,
        frontends: &[Frontend],
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
        let mut used = HashMap::new();
        let mut table = RouteTable::default();
        for fe in frontends.iter().filter(|f| f.l7) {
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
                        destinations,
                        timeout: r.timeout,
                        retry,
                        mirror,
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
                        destinations: vec![(c, 100)],
                        timeout: None,
                        retry: RetryPolicy::safe_default(),
                        mirror: None,
                    }
                }
            };
            let key = SocketAddrV4::new(fe.vip, fe.port);
            // A route whose policy has a problem keeps its last good version, if it had one.
            let route = match previous.routes.get(&key) {
                Some(old) if errors.len() > problems_before => old.clone(),
                _ => Arc::new(route),
            };
            table.routes.insert(key, route);
        }
        self.clusters = used;
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
        used: &mut HashMap<ClusterKey, Arc<Cluster>>,
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
        let mut addrs: Vec<SocketAddr> = Vec::new();
        let mut h2 = from.is_some_and(|f| f.h2);
        match fe {
            None => {
                if let Some((kind, id)) = origin {
                    errors.push(ConfigProblem::new(
                        kind,
                        id,
                        format!(
                            "{field}.host: no Service port {svc}{} is known",
                            d.port.map(|p| format!(":{p}")).unwrap_or_default()
                        ),
                    ));
                }
            }
            Some(fe) => {
                h2 = fe.h2;
                let ready: Vec<_> = fe.backends.iter().filter(|b| !b.terminating).collect();
                let set = if ready.is_empty() {
                    fe.backends.iter().collect()
                } else {
                    ready
                };
                addrs = set
                    .iter()
                    .map(|b| SocketAddr::from((b.addr, b.port)))
                    .collect();
            }
        }
        let rule = ctx.rules.get(&svc);
        let mut policy = rule.map(|(_, r)| r.policy.clone()).unwrap_or_default();
        if let Some(name) = &d.subset {
            match rule.and_then(|(_, r)| r.subsets.iter().find(|s| &s.name == name)) {
                Some(s) => {
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
                None => {
                    let known = rule.map(|(id, r)| {
                        format!(
                            "DestinationRule {id} defines {:?}",
                            r.subsets.iter().map(|s| &s.name).collect::<Vec<_>>()
                        )
                    });
                    if let Some((kind, id)) = origin {
                        errors.push(ConfigProblem::new(
                            kind,
                            id,
                            format!(
                                "{field}.subset: unknown subset {name:?} ({})",
                                known.unwrap_or_else(|| format!("no DestinationRule for {svc}"))
                            ),
                        ));
                    }
                    addrs.clear();
                }
            }
        }
        let _ = ctx.state;
        let policy = ClusterPolicy {
            lb: policy.load_balancer.unwrap_or(LoadBalancer::LeastRequest),
            pool: policy.connection_pool.unwrap_or_default(),
            outlier: Some(policy.outlier.unwrap_or_default()),

            h2,
        };
        let port = fe.map_or(d.port.unwrap_or(0), |f| f.port);
        let key = ClusterKey {
            service: svc.clone(),
            port,
            subset: d.subset.clone(),
        };
        if let Some(c) = used.get(&key) {
            return c.clone();
        }
        let c = match self.clusters.get(&key) {
            Some(c) => {
                c.update(&addrs, policy);
                c.clone()
            }
            None => {
                let name = format!(
                    "{svc}:{port}{}",
                    d.subset
                        .as_ref()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default()
                );
                Arc::new(Cluster::new(name, &addrs, policy))
            }
        };
        used.insert(key, c.clone());
        c
    }
}
