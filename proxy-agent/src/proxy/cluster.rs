//! A cluster is one destination (Service port, optionally a subset) with its backends.
//!
//! A cluster is immutable: a configuration change makes a new version ([`Cluster::updated`])
//! that shares the backends that stay (their health, load and pooled connections) and the
//! cluster's runtime counters, so a route that keeps its last good version keeps exactly the
//! backends it had. The request path only reads; per-backend health and load are atomics.
//! Outlier detection is fed with classified results: N consecutive 5xx (`consecutive5xxErrors`)
//! or gateway errors (`consecutiveGatewayErrors`) eject a backend at once, never past
//! `maxEjectionPercent`; a sweep every `interval` un-ejects backends whose time
//! (`baseEjectionTime` x ejections, at most 300 s) is over and decays the multiplier of healthy
//! ones, as Envoy does. Below `minHealthPercent` healthy the cluster balances over all backends
//! (panic mode).

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::pool::{ConnOpts, Conns};
use crate::istio::{ConnectionPool, LoadBalancer, OutlierDetection};

/// Default TCP connect timeout (Istio's).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest ejection, whatever the multiplier (Envoy's default `max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Node-wide settings of upstream connection pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Idle pooled connections older than this are closed.
    pub idle_timeout: Duration,
    /// Idle pooled connections kept per backend.
    pub max_idle: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(90),
            max_idle: 64,
        }
    }
}

/// Everything a cluster needs from the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterPolicy {
    /// Balancing.
    pub lb: LoadBalancer,
    /// Pool limits.
    pub pool: ConnectionPool,
    /// Outlier detection (`None`: off).
    pub outlier: Option<OutlierDetection>,
    /// Upstream HTTP/2.
    pub h2: bool,
    /// Idle pooled connections.
    pub idle: PoolSettings,
}

/// One backend (pod address and port).
pub struct Backend {
    /// Address.
    pub addr: SocketAddr,
    /// Its connections.
    pub conns: Arc<Conns>,
    /// Requests (and opaque connections) in flight.
    pub active: AtomicU32,
    /// Requests sent (attempts).
    pub requests: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since the process epoch + 1 when it was ejected (0: not ejected).
    ejected_at_ms: AtomicU64,
    /// The ejection multiplier.
    ejections: AtomicU32,
    /// Times it was ejected, ever.
    ejections_total: AtomicU64,
    /// Attempts that failed (5xx or no response).
    pub errors: AtomicU64,
}

/// Ejections by outlier detection since the start, over all clusters.
pub static EJECTIONS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since a process-wide epoch (backends are shared by cluster versions).
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Backend {
    fn new(addr: SocketAddr, h2: bool) -> Self {
        Self {
            addr,
            conns: Arc::new(Conns::new(addr, h2)),
            active: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejected_at_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// Whether outlier detection has ejected it.
    pub fn ejected(&self) -> bool {
        self.ejected_at_ms.load(Relaxed) != 0
    }

    /// The ejection multiplier (ejections not yet decayed).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Relaxed)
    }

    /// Times outlier detection ejected it since the agent started.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Relaxed)
    }

    /// When its ejection ends under `od` (`None`: not ejected), as a duration from now.
    pub fn ejected_for(&self, od: Option<&OutlierDetection>) -> Option<Duration> {
        let at = self.ejected_at_ms.load(Relaxed);
        let od = od?;
        if at == 0 {
            return None;
        }
        let until = at - 1 + ejection_time(od, self.ejections()).as_millis() as u64;
        Some(Duration::from_millis(until.saturating_sub(now_ms())))
    }
}

/// The result of one attempt, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A 5xx response with this status.
    Status(u16),
    /// No response: connect failure, reset or timeout (counts as a gateway error).
    LocalFailure,
}

/// Why a request was not admitted by the connection pool limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// `http1MaxPendingRequests` reached.
    Pending,
    /// Waited for a connection until the request's deadline.
    Timeout,
}

/// Counters shared by every version of a cluster.
struct Runtime {
    rr: AtomicUsize,
    active_requests: AtomicU32,
    active_retries: AtomicU32,
    pending: AtomicU32,
    last_sweep_ms: AtomicU64,
}

/// A destination with its backends: one immutable version.
pub struct Cluster {
    /// Name for logs: `namespace/service:port[/subset]`.
    pub name: String,
    subset: Option<String>,
    backends: Vec<Arc<Backend>>,
    /// Ring hash: (point, backend index), sorted by point.
    ring: Vec<(u64, usize)>,
    policy: ClusterPolicy,
    conn_opts: ConnOpts,
    /// `maxConnections` (or `http2MaxRequests`) and the semaphore enforcing it.
    limit_key: LimitKey,
    permits: Option<Arc<Semaphore>>,
    rt: Arc<Runtime>,
}

fn point(addr: &SocketAddr, i: u32) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    addr.hash(&mut h);
    i.hash(&mut h);
    h.finish()
}

/// Hashes a consistent-hash key (header value, cookie, client address).
pub fn hash_key(data: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

const RING_POINTS: u32 = 160;

/// What sizes the connection semaphore: the limit, and whether it counts HTTP/2 requests.
type LimitKey = (Option<u32>, bool);

fn limit_key(policy: &ClusterPolicy) -> LimitKey {
    (
        policy.pool.max_connections.or(if policy.h2 {
            policy.pool.http2_max_requests
        } else {
            None
        }),
        policy.h2,
    )
}

impl Cluster {
    /// A cluster with the given backends and policy.
    pub fn new(name: String, addrs: &[SocketAddr], policy: ClusterPolicy) -> Self {
        Self::of_subset(name, None, addrs, policy)
    }

    /// A cluster of a DestinationRule subset (`None`: the whole Service).
    pub fn of_subset(
        name: String,
        subset: Option<String>,
        addrs: &[SocketAddr],
        policy: ClusterPolicy,
    ) -> Self {
        let rt = Arc::new(Runtime {
            rr: AtomicUsize::new(0),
            active_requests: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            last_sweep_ms: AtomicU64::new(now_ms()),
        });
        Self::build((name, subset), addrs, policy, HashMap::new(), None, rt)
    }

    fn build(
        (name, subset): (String, Option<String>),
        addrs: &[SocketAddr],
        policy: ClusterPolicy,
        mut keep: HashMap<SocketAddr, Arc<Backend>>,
        old_limits: Option<(LimitKey, Option<Arc<Semaphore>>)>,
        rt: Arc<Runtime>,
    ) -> Self {
        let backends: Vec<Arc<Backend>> = addrs
            .iter()
            .map(|a| {
                keep.remove(a)
                    .unwrap_or_else(|| Arc::new(Backend::new(*a, policy.h2)))
            })
            .collect();
        // The ring exists only for hashing policies: 160 points per backend add up at 10k Services.
        let hashing = matches!(
            policy.lb,
            LoadBalancer::HashHeader(_) | LoadBalancer::HashCookie(_) | LoadBalancer::HashSourceIp
        );
        let mut ring: Vec<(u64, usize)> = if hashing {
            backends
                .iter()
                .enumerate()
                .flat_map(|(i, b)| (0..RING_POINTS).map(move |k| (point(&b.addr, k), i)))
                .collect()
        } else {
            Vec::new()
        };
        ring.sort_unstable();
        let key = limit_key(&policy);
        let permits = match old_limits {
            // In-flight requests hold permits of this semaphore: keep it while the limit stays.
            Some((k, p)) if k == key => p,
            _ => key.0.map(|n| Arc::new(Semaphore::new(n as usize))),
        };
        Self {
            name,
            subset,
            backends,
            ring,
            conn_opts: conn_opts(&policy),
            policy,
            limit_key: key,
            permits,
            rt,
        }
    }

    /// This cluster with new backends and policy: `self` when nothing changed, else a new
    /// version sharing the backends that stay and the runtime counters. `self` is never changed,
    /// so routes holding it keep what they had.
    pub fn updated(self: &Arc<Self>, addrs: &[SocketAddr], policy: ClusterPolicy) -> Arc<Self> {
        if self.policy == policy
            && self.backends.len() == addrs.len()
            && self.backends.iter().zip(addrs).all(|(b, a)| b.addr == *a)
        {
            return self.clone();
        }
        let keep = if self.policy.h2 == policy.h2 {
            self.backends.iter().map(|b| (b.addr, b.clone())).collect()
        } else {
            HashMap::new()
        };
        Arc::new(Self::build(
            (self.name.clone(), self.subset.clone()),
            addrs,
            policy,
            keep,
            Some((self.limit_key, self.permits.clone())),
            self.rt.clone(),
        ))
    }

    /// The DestinationRule subset it serves, if any.
    pub fn subset(&self) -> Option<&str> {
        self.subset.as_deref()
    }

    /// The policy.
    pub fn policy(&self) -> &ClusterPolicy {
        &self.policy
    }

    /// Connection settings.
    pub fn conn_opts(&self) -> ConnOpts {
        self.conn_opts
    }

    /// All backends.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Requests in flight through this cluster (all versions).
    pub fn active_requests(&self) -> u32 {
        self.rt.active_requests.load(Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.rt.active_requests.fetch_add(1, Relaxed);
        InFlight(self.rt.clone())
    }

    /// Picks a backend for one attempt, preferring ones not in `tried` (else the one tried
    /// longest ago). `key` is the consistent
    /// hash of the request when the policy hashes. `None`: no healthy backend.
    pub fn pick(&self, key: Option<u64>, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        // The common case (first try, nobody ejected) chooses among all without allocating.
        if tried.is_empty() && !self.backends.iter().any(|b| b.ejected()) {
            let i = self.choose(key, n, |j| j);
            return Some(self.backends[i].clone());
        }
        let min_health = self
            .policy
            .outlier
            .as_ref()
            .map_or(0, |o| o.min_health_percent);
        let healthy: Vec<usize> = (0..n).filter(|&i| !self.backends[i].ejected()).collect();
        let mut candidates: Vec<usize> = if healthy.len() * 100 < min_health as usize * n {
            (0..n).collect()
        } else {
            healthy
        };
        if candidates.is_empty() {
            return None;
        }
        // Not tried yet; once every backend was, the one tried longest ago (the last n-1
        // tries are avoided), so a retry never goes straight back to a backend that just
        // failed, hung or is dying.
        let recent = &tried[tried.len().saturating_sub(n - 1)..];
        let untried: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| !recent.contains(&self.backends[i].addr))
            .collect();
        if !untried.is_empty() {
            candidates = untried;
        }
        let i = self.choose(key, candidates.len(), |j| candidates[j]);
        Some(self.backends[i].clone())
    }

    /// Feeds one attempt's result to outlier detection.
    pub fn record(&self, b: &Backend, outcome: Outcome) {
        if outcome != Outcome::Success {
            b.errors.fetch_add(1, Relaxed);
        }
        let Some(od) = self.policy.outlier.as_ref() else {
            return;
        };
        let (five, gw) = match outcome {
            Outcome::Success => {
                b.consecutive_5xx.store(0, Relaxed);
                b.consecutive_gateway.store(0, Relaxed);
                return;
            }
            Outcome::Status(s) => {
                let five = b.consecutive_5xx.fetch_add(1, Relaxed) + 1;
                let gw = if matches!(s, 502..=504) {
                    b.consecutive_gateway.fetch_add(1, Relaxed) + 1
                } else {
                    b.consecutive_gateway.store(0, Relaxed);
                    0
                };
                (five, gw)
            }
            // Envoy without split_external_local_origin_errors: a local failure is a 503.
            Outcome::LocalFailure => (
                b.consecutive_5xx.fetch_add(1, Relaxed) + 1,
                b.consecutive_gateway.fetch_add(1, Relaxed) + 1,
            ),
        };
        let tripped = od.consecutive_5xx.is_some_and(|t| five >= t)
            || od.consecutive_gateway.is_some_and(|t| gw >= t);
        if !tripped || b.ejected() {
            return;
        }
        let n = self.backends.len();
        let ejected = self.backends.iter().filter(|x| x.ejected()).count();
        if (ejected + 1) * 100 > od.max_ejection_percent as usize * n {
            tracing::debug!(cluster = %self.name, backend = %b.addr, "not ejecting: maxEjectionPercent reached");
            return;
        }
        if b.ejected_at_ms
            .compare_exchange(0, now_ms() + 1, Relaxed, Relaxed)
            .is_err()
        {
            return; // a concurrent request ejected it
        }
        let times = b.ejections.fetch_add(1, Relaxed) + 1;
        b.ejections_total.fetch_add(1, Relaxed);
        EJECTIONS.fetch_add(1, Relaxed);
        b.consecutive_5xx.store(0, Relaxed);
        b.consecutive_gateway.store(0, Relaxed);
        tracing::info!(
            cluster = %self.name,
            backend = %b.addr,
            ejections = times,
            for_s = ejection_time(od, times).as_secs(),
            "outlier detection ejected a backend"
        );
    }

    /// The periodic outlier sweep, run at most once per `interval` (callers may call it more
    /// often): un-ejects backends whose ejection time is over and decays the multiplier of
    /// backends that stayed healthy for an interval.
    pub fn sweep(&self) {
        self.sweep_at(now_ms());
    }

    /// Closes pooled connections idle for longer than the pool's idle timeout.
    pub fn reap_idle(&self) {
        for b in &self.backends {
            b.conns
                .reap(self.policy.idle.idle_timeout, self.policy.idle.max_idle);
        }
    }

    fn sweep_at(&self, now: u64) {
        let Some(od) = self.policy.outlier.as_ref() else {
            return;
        };
        let last = self.rt.last_sweep_ms.load(Relaxed);
        if now < last + od.interval.as_millis() as u64
            || self
                .rt
                .last_sweep_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        for b in &self.backends {
            let at = b.ejected_at_ms.load(Relaxed);
            let times = b.ejections.load(Relaxed);
            if at != 0 {
                let until = at - 1 + ejection_time(od, times).as_millis() as u64;
                if now >= until {
                    b.ejected_at_ms.store(0, Relaxed);
                    tracing::info!(cluster = %self.name, backend = %b.addr, ejections = times, "outlier detection returned a backend");
                }
            } else if times > 0 {
                b.ejections.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Admits a request under `maxConnections` / `http1MaxPendingRequests`, waiting at most
    /// `wait` for a connection. The permit is held until the response is complete.
    pub async fn admit(&self, wait: Duration) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        let Some(sem) = self.permits.clone() else {
            return Ok(None);
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        let max_pending = self.policy.pool.http1_max_pending;
        let pending = self.rt.pending.fetch_add(1, Relaxed);
        if max_pending.is_some_and(|m| pending >= m) {
            self.rt.pending.fetch_sub(1, Relaxed);
            return Err(Overflow::Pending);
        }
        let r = tokio::time::timeout(wait, sem.acquire_owned()).await;
        self.rt.pending.fetch_sub(1, Relaxed);
        match r {
            Ok(Ok(p)) => Ok(Some(p)),
            _ => Err(Overflow::Timeout),
        }
    }

    /// Reserves a retry slot: never more than `maxRetries` at once, and with `budgeted` at most
    /// 20% of the active requests (at least 3).
    pub fn begin_retry(&self, budgeted: bool) -> Option<RetryGuard> {
        let max = self.policy.pool.max_retries.unwrap_or(u32::MAX);
        let budget = if budgeted {
            (self.rt.active_requests.load(Relaxed) / 5).max(3).min(max)
        } else {
            max
        };
        let cur = self.rt.active_retries.fetch_add(1, Relaxed);
        if cur >= budget {
            self.rt.active_retries.fetch_sub(1, Relaxed);
            return None;
        }
        Some(RetryGuard(self.rt.clone()))
    }

    /// Retries in flight now and the most allowed at once (the budget, or `maxRetries`).
    pub fn retry_budget(&self, budgeted: bool) -> (u32, u32) {
        let max = self.policy.pool.max_retries.unwrap_or(u32::MAX);
        let limit = if budgeted {
            (self.rt.active_requests.load(Relaxed) / 5).max(3).min(max)
        } else {
            max
        };
        (self.rt.active_retries.load(Relaxed), limit)
    }

    /// Chooses one of `len` candidates (`at(j)` is the backend index of candidate `j`) under
    /// the cluster's balancing policy.
    fn choose(&self, key: Option<u64>, len: usize, at: impl Fn(usize) -> usize) -> usize {
        match (&self.policy.lb, key) {
            (
                LoadBalancer::HashHeader(_)
                | LoadBalancer::HashCookie(_)
                | LoadBalancer::HashSourceIp,
                Some(k),
            ) if !self.ring.is_empty() => {
                let ring = &self.ring;
                let start = ring.partition_point(|(p, _)| *p < k);
                (0..ring.len())
                    .map(|j| ring[(start + j) % ring.len()].1)
                    .find(|i| (0..len).any(|j| at(j) == *i))
                    .unwrap_or_else(|| at(0))
            }
            (LoadBalancer::RoundRobin, _) => at(self.rt.rr.fetch_add(1, Relaxed) % len),
            (LoadBalancer::LeastRequest | LoadBalancer::LeastConn, _) if len > 1 => {
                // Power of two choices on requests in flight.
                let a = rand::random_range(0..len);
                let mut b = rand::random_range(0..len - 1);
                if b == a {
                    b = len - 1;
                }
                let (a, b) = (at(a), at(b));
                if self.backends[b].active.load(Relaxed) < self.backends[a].active.load(Relaxed) {
                    b
                } else {
                    a
                }
            }
            // RANDOM, and hashing policies without a key (Envoy falls back to random).
            _ => at(rand::random_range(0..len)),
        }
    }
}

fn ejection_time(od: &OutlierDetection, times: u32) -> Duration {
    (od.base_ejection * times.max(1)).min(MAX_EJECTION.max(od.base_ejection))
}

/// A request in flight through a cluster.
pub struct InFlight(Arc<Runtime>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Relaxed);
    }
}

/// Holds one slot of the retry budget.
pub struct RetryGuard(Arc<Runtime>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Relaxed);
    }
}

fn conn_opts(policy: &ClusterPolicy) -> ConnOpts {
    ConnOpts {
        connect_timeout: policy
            .pool
            .connect_timeout
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        max_requests_per_connection: policy.pool.max_requests_per_connection,
        max_idle: policy.idle.max_idle,
        idle_timeout: policy.idle.idle_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(lb: LoadBalancer, outlier: Option<OutlierDetection>) -> ClusterPolicy {
        ClusterPolicy {
            lb,
            pool: ConnectionPool::default(),
            outlier,
            h2: false,
            idle: PoolSettings::default(),
        }
    }

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([198, 18, 0, i], 8080)))
            .collect()
    }

    #[test]
    fn retries_prefer_untried_backends() {
        let c = Cluster::new("t".into(), &addrs(3), policy(LoadBalancer::Random, None));
        for _ in 0..100 {
            let tried = [addrs(3)[0], addrs(3)[1]];
            assert_eq!(c.pick(None, &tried).unwrap().addr, addrs(3)[2]);
        }
        // All tried: the one tried longest ago, never the one that just failed.
        for _ in 0..100 {
            let a = addrs(3);
            assert_eq!(c.pick(None, &a).unwrap().addr, a[0]);
            assert_eq!(c.pick(None, &[a[0], a[1], a[2], a[0]]).unwrap().addr, a[1]);
        }
        let one = Cluster::new("t".into(), &addrs(1), policy(LoadBalancer::Random, None));
        assert_eq!(one.pick(None, &addrs(1)).unwrap().addr, addrs(1)[0]);
    }

    #[test]
    fn consistent_hash_is_stable_and_spreads() {
        let c = Arc::new(Cluster::new(
            "t".into(),
            &addrs(4),
            policy(LoadBalancer::HashHeader("user".into()), None),
        ));
        let a = c.pick(Some(hash_key(b"tomas")), &[]).unwrap().addr;
        for _ in 0..50 {
            assert_eq!(c.pick(Some(hash_key(b"tomas")), &[]).unwrap().addr, a);
        }
        let mut seen = std::collections::HashSet::new();
        for u in 0..200 {
            seen.insert(
                c.pick(Some(hash_key(format!("user{u}").as_bytes())), &[])
                    .unwrap()
                    .addr,
            );
        }
        assert_eq!(seen.len(), 4);
        // Removing another backend does not move this key.
        let other: Vec<_> = addrs(4)
            .into_iter()
            .filter(|x| *x != a)
            .take(2)
            .chain([a])
            .collect();
        let c2 = c.updated(&other, c.policy().clone());
        assert_eq!(c2.pick(Some(hash_key(b"tomas")), &[]).unwrap().addr, a);
    }

    #[test]
    fn an_update_is_a_new_version_and_the_old_one_keeps_its_backends() {
        let c = Arc::new(Cluster::new(
            "t".into(),
            &addrs(2),
            policy(LoadBalancer::RoundRobin, None),
        ));
        assert!(Arc::ptr_eq(&c, &c.updated(&addrs(2), c.policy().clone())));
        let c2 = c.updated(&addrs(1), c.policy().clone());
        assert_eq!(c.backends().len(), 2, "the old version is unchanged");
        assert_eq!(c2.backends().len(), 1);
        assert!(
            Arc::ptr_eq(&c.backends()[0], &c2.backends()[0]),
            "a backend that stays is shared (health, pool)"
        );
        let _req = c.begin_request();
        assert_eq!(c2.active_requests(), 1, "runtime counters are shared");
    }

    fn od(gw: u32, max_pct: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: None,
            consecutive_gateway: Some(gw),
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(60),
            max_ejection_percent: max_pct,
            min_health_percent: 0,
        }
    }

    #[test]
    fn ejection_respects_max_percent() {
        let c = Cluster::new(
            "t".into(),
            &addrs(2),
            policy(LoadBalancer::RoundRobin, Some(od(2, 50))),
        );
        let [a, b] = [c.backends()[0].clone(), c.backends()[1].clone()];
        c.record(&a, Outcome::Status(503));
        assert!(!a.ejected());
        c.record(&a, Outcome::Status(503));
        assert!(a.ejected());
        // A 500 is not a gateway error; a success resets the count.
        c.record(&b, Outcome::Status(500));
        c.record(&b, Outcome::Status(500));
        assert!(!b.ejected());
        c.record(&b, Outcome::LocalFailure);
        c.record(&b, Outcome::Success);
        c.record(&b, Outcome::LocalFailure);
        assert!(!b.ejected());
        // 50% of 2 = 1 ejected at most.
        c.record(&b, Outcome::LocalFailure);
        assert!(!b.ejected());
        for _ in 0..20 {
            assert_eq!(c.pick(None, &[]).unwrap().addr, b.addr);
        }
    }

    #[test]
    fn consecutive_5xx_and_gateway_errors_are_counted_separately() {
        let mut o = od(3, 100);
        o.consecutive_5xx = Some(2);
        let c = Cluster::new(
            "t".into(),
            &addrs(2),
            policy(LoadBalancer::RoundRobin, Some(o)),
        );
        let [a, b] = [c.backends()[0].clone(), c.backends()[1].clone()];
        // Two 500s: 5xx threshold (2) reached, gateway count never started.
        c.record(&a, Outcome::Status(500));
        c.record(&a, Outcome::Status(500));
        assert!(a.ejected());
        // 503 503: both counters at 2; the 5xx threshold (2) ejects first.
        c.record(&b, Outcome::Status(503));
        assert!(!b.ejected());
        c.record(&b, Outcome::Status(503));
        assert!(b.ejected());
    }

    #[test]
    fn the_sweep_un_ejects_after_base_times_multiplier_and_decays_the_multiplier() {
        let c = Cluster::new(
            "t".into(),
            &addrs(2),
            policy(LoadBalancer::RoundRobin, Some(od(1, 50))),
        );
        let a = c.backends()[0].clone();
        let t0 = now_ms();
        c.rt.last_sweep_ms.store(t0, Relaxed);
        c.record(&a, Outcome::LocalFailure);
        assert!(a.ejected());
        assert_eq!(a.ejections(), 1);
        // Sweeps come every interval (10 s); the ejection lasts 60 s.
        c.sweep_at(t0 + 5_000);
        assert_eq!(
            c.rt.last_sweep_ms.load(Relaxed),
            t0,
            "before the interval: no sweep"
        );
        c.sweep_at(t0 + 50_000);
        assert!(a.ejected(), "50 s < 60 s");
        c.sweep_at(t0 + 60_001);
        assert!(!a.ejected(), "returned after 60 s");
        assert_eq!(a.ejections(), 1, "no decay in the sweep that returned it");
        // Ejected again at once: the multiplier makes it 120 s.
        c.record(&a, Outcome::LocalFailure);
        assert_eq!(a.ejections(), 2);
        let at = a.ejected_at_ms.load(Relaxed) - 1;
        c.sweep_at(at + 110_000);
        assert!(a.ejected(), "2 x 60 s");
        c.sweep_at(at + 120_000);
        assert!(!a.ejected());
        // Two healthy intervals decay the multiplier to zero.
        c.sweep_at(at + 130_000);
        assert_eq!(a.ejections(), 1);
        c.sweep_at(at + 140_000);
        assert_eq!(a.ejections(), 0);
        c.sweep_at(at + 150_000);
        assert_eq!(a.ejections(), 0);
    }

    #[test]
    fn all_ejected_means_no_backend_unless_panic_mode() {
        let mut od = OutlierDetection {
            consecutive_5xx: None,
            consecutive_gateway: Some(1),
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        };
        let c = Arc::new(Cluster::new(
            "t".into(),
            &addrs(2),
            policy(LoadBalancer::RoundRobin, Some(od.clone())),
        ));
        for b in c.backends() {
            c.record(b, Outcome::LocalFailure);
        }
        assert!(c.pick(None, &[]).is_none());
        od.min_health_percent = 50;
        let c = c.updated(&addrs(2), policy(LoadBalancer::RoundRobin, Some(od)));
        assert!(c.pick(None, &[]).is_some(), "panic mode balances over all");
    }

    #[tokio::test]
    async fn pool_limits_overflow_at_once() {
        let mut p = policy(LoadBalancer::RoundRobin, None);
        p.pool.max_connections = Some(1);
        p.pool.http1_max_pending = Some(1);
        let c = Arc::new(Cluster::new("t".into(), &addrs(1), p));
        let first = c.admit(Duration::from_secs(5)).await.unwrap();
        let c2 = c.clone();
        let waiter =
            tokio::spawn(
                async move { c2.admit(Duration::from_secs(5)).await.map(|p| p.is_some()) },
            );
        // The second request waits (pending = 1); poll until it is queued.
        while c.rt.pending.load(Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        // A new version with the same limit shares the semaphore and the pending count.
        let c3 = c.updated(&addrs(2), c.policy().clone());
        assert_eq!(
            c3.admit(Duration::from_secs(5)).await.err(),
            Some(Overflow::Pending)
        );
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(true));
    }

    #[test]
    fn the_default_budget_allows_20_percent_of_active_requests_and_at_least_3() {
        let p = policy(LoadBalancer::Random, None);
        let c = Arc::new(Cluster::new("t".into(), &[], p.clone()));
        let hold: Vec<_> = (0..3)
            .map(|_| c.begin_retry(true).expect("3 at least"))
            .collect();
        assert!(c.begin_retry(true).is_none());
        c.rt.active_requests.store(50, Relaxed);
        let more: Vec<_> = (0..7)
            .map(|_| c.begin_retry(true).expect("20% of 50"))
            .collect();
        assert!(c.begin_retry(true).is_none());
        // An explicit policy is bounded only by maxRetries.
        assert!(c.begin_retry(false).is_some());
        let mut limited = p;
        limited.pool.max_retries = Some(10);
        let c = c.updated(&[], limited);
        assert!(c.begin_retry(false).is_none(), "10 in flight already");
        drop((hold, more));
        assert!(c.begin_retry(false).is_some());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Consistent hashing: adding a backend to `n` moves keys only to the new backend,
        /// and no more than its fair share (1/(n+1)) plus 0.1 (with 160 ring points per backend a share
        /// is up to about 0.06 above fair).
        #[test]
        fn adding_a_backend_moves_only_its_share_of_keys(n in 1u8..40, seed in 0u64..1_000_000) {
            let lb = policy(LoadBalancer::HashHeader("user".into()), None);
            let before = Arc::new(Cluster::new("t".into(), &addrs(n), lb.clone()));
            let after = before.updated(&addrs(n + 1), lb);
            let new = addrs(n + 1)[n as usize];
            let keys = 2000;
            let mut moved = 0;
            for i in 0..keys {
                let k = hash_key(format!("user-{seed}-{i}").as_bytes());
                let (a, b) = (before.pick(Some(k), &[]).unwrap().addr, after.pick(Some(k), &[]).unwrap().addr);
                if a != b {
                    proptest::prop_assert_eq!(b, new, "a key moved between two old backends");
                    moved += 1;
                }
            }
            let share = moved as f64 / keys as f64;
            let fair = 1.0 / (f64::from(n) + 1.0);
            proptest::prop_assert!(share <= fair + 0.1, "{share} of the keys moved, fair share {fair}");
        }
    }
}
