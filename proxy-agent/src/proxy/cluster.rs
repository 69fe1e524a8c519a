//! A cluster is one destination (Service port, optionally a subset) with its backends.
//!
//! The request path only reads: the backend list sits behind an `ArcSwap`, per-backend health and
//! load are atomics. Outlier detection is fed with classified results; it ejects a backend after
//! N consecutive errors for `baseEjectionTime x ejections`, never past `maxEjectionPercent`, and
//! below `minHealthPercent` healthy the cluster balances over all backends (panic mode).

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::pool::{ConnOpts, Conns};
use crate::istio::{ConnectionPool, LoadBalancer, OutlierDetection};

/// Default TCP connect timeout (Istio's).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// One backend (pod address and port).
pub struct Backend {
    /// Address.
    pub addr: SocketAddr,
    /// Its connections.
    pub conns: Arc<Conns>,
    /// Requests in flight.
    pub active: AtomicU32,
    /// Requests sent (attempts).
    pub requests: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since the cluster epoch until which it is ejected (0: never ejected).
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
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
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now_ms
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

struct Limits {
    key: (Option<u32>, bool),
    permits: Option<Arc<Semaphore>>,
}

struct State {
    backends: Vec<Arc<Backend>>,
    /// Ring hash: (point, backend index), sorted by point.
    ring: Vec<(u64, usize)>,
    policy: ClusterPolicy,
    conn_opts: ConnOpts,
}

/// A destination with its backends and runtime state.
pub struct Cluster {
    /// Name for logs: `namespace/service:port[/subset]`.
    pub name: String,
    state: ArcSwap<State>,
    limits: ArcSwap<Limits>,
    rr: AtomicUsize,
    epoch: Instant,
    /// Requests in flight through this cluster.
    pub active_requests: AtomicU32,
    /// Retries in flight.
    pub active_retries: AtomicU32,
    pending: AtomicU32,
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

impl Cluster {
    /// A cluster with the given backends and policy.
    pub fn new(name: String, addrs: &[SocketAddr], policy: ClusterPolicy) -> Self {
        let c = Self {
            name,
            state: ArcSwap::from_pointee(State {
                backends: Vec::new(),
                ring: Vec::new(),
                conn_opts: conn_opts(&policy.pool),
                policy: policy.clone(),
            }),
            limits: ArcSwap::from_pointee(Limits {
                key: (None, false),
                permits: None,
            }),
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
            active_requests: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            pending: AtomicU32::new(0),
        };
        c.update(addrs, policy);
        c
    }

    /// Replaces backends and policy, keeping the state (health, pools) of backends that stay.
    pub fn update(&self, addrs: &[SocketAddr], policy: ClusterPolicy) {
        let old = self.state.load();
        // Configuration rebuilds touch every cluster; an unchanged one costs a comparison only.
        if old.policy == policy
            && old.backends.len() == addrs.len()
            && old.backends.iter().zip(addrs).all(|(b, a)| b.addr == *a)
        {
            return;
        }
        let mut by_addr: HashMap<SocketAddr, Arc<Backend>> = if old.policy.h2 == policy.h2 {
            old.backends.iter().map(|b| (b.addr, b.clone())).collect()
        } else {
            HashMap::new()
        };
        let backends: Vec<Arc<Backend>> = addrs
            .iter()
            .map(|a| {
                by_addr
                    .remove(a)
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
        let key = (
            policy.pool.max_connections.or(if policy.h2 {
                policy.pool.http2_max_requests
            } else {
                None
            }),
            policy.h2,
        );
        if self.limits.load().key != key {
            let permits = key.0.map(|n| Arc::new(Semaphore::new(n as usize)));
            self.limits.store(Arc::new(Limits { key, permits }));
        }
        self.state.store(Arc::new(State {
            backends,
            ring,
            conn_opts: conn_opts(&policy.pool),
            policy,
        }));
    }

    /// The current policy.
    pub fn policy(&self) -> ClusterPolicy {
        self.state.load().policy.clone()
    }

    /// Connection settings.
    pub fn conn_opts(&self) -> ConnOpts {
        self.state.load().conn_opts
    }

    /// All backends.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.state.load().backends.clone()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a backend is ejected now.
    pub fn is_ejected(&self, b: &Backend) -> bool {
        b.ejected(self.now_ms())
    }

    /// Picks a backend for one attempt, preferring ones not in `tried`. `key` is the consistent
    /// hash of the request when the policy hashes. `None`: no healthy backend.
    pub fn pick(&self, key: Option<u64>, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let st = self.state.load();
        let n = st.backends.len();
        if n == 0 {
            return None;
        }
        let now = self.now_ms();
        // The common case (first try, nobody ejected) chooses among all without allocating.
        if tried.is_empty() && !st.backends.iter().any(|b| b.ejected(now)) {
            let i = choose(&st, &self.rr, key, n, |j| j);
            return Some(st.backends[i].clone());
        }
        let min_health = st
            .policy
            .outlier
            .as_ref()
            .map_or(0, |o| o.min_health_percent);
        let healthy: Vec<usize> = (0..n).filter(|&i| !st.backends[i].ejected(now)).collect();
        let mut candidates: Vec<usize> = if healthy.len() * 100 < min_health as usize * n {
            (0..n).collect()
        } else {
            healthy
        };
        if candidates.is_empty() {
            return None;
        }
        let untried: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| !tried.contains(&st.backends[i].addr))
            .collect();
        if !untried.is_empty() {
            candidates = untried;
        }
        let i = choose(&st, &self.rr, key, candidates.len(), |j| candidates[j]);
        Some(st.backends[i].clone())
    }

    /// Feeds one attempt's result to outlier detection.
    pub fn record(&self, b: &Backend, outcome: Outcome) {
        let st = self.state.load();
        let Some(od) = st.policy.outlier.as_ref() else {
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
            Outcome::LocalFailure => (
                b.consecutive_5xx.fetch_add(1, Relaxed) + 1,
                b.consecutive_gateway.fetch_add(1, Relaxed) + 1,
            ),
        };
        let tripped = od.consecutive_5xx.is_some_and(|t| five >= t)
            || od.consecutive_gateway.is_some_and(|t| gw >= t);
        if !tripped {
            return;
        }
        let now = self.now_ms();
        if b.ejected(now) {
            return;
        }
        let n = st.backends.len();
        let ejected = st.backends.iter().filter(|x| x.ejected(now)).count();
        if (ejected + 1) * 100 > od.max_ejection_percent as usize * n {
            tracing::debug!(cluster = %self.name, backend = %b.addr, "not ejecting: maxEjectionPercent reached");
            return;
        }
        let times = b.ejections.fetch_add(1, Relaxed) + 1;
        let until = now + od.base_ejection.as_millis() as u64 * u64::from(times);
        b.ejected_until_ms.store(until, Relaxed);
        b.consecutive_5xx.store(0, Relaxed);
        b.consecutive_gateway.store(0, Relaxed);
        tracing::info!(
            cluster = %self.name,
            backend = %b.addr,
            ejections = times,
            for_s = (until - now) / 1000,
            "outlier detection ejected a backend"
        );
    }

    /// Admits a request under `maxConnections` / `http1MaxPendingRequests`, waiting at most
    /// `wait` for a connection. The permit is held until the response is complete.
    pub async fn admit(&self, wait: Duration) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        let limits = self.limits.load_full();
        let Some(sem) = limits.permits.clone() else {
            return Ok(None);
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        let max_pending = self.state.load().policy.pool.http1_max_pending;
        let pending = self.pending.fetch_add(1, Relaxed);
        if max_pending.is_some_and(|m| pending >= m) {
            self.pending.fetch_sub(1, Relaxed);
            return Err(Overflow::Pending);
        }
        let r = tokio::time::timeout(wait, sem.acquire_owned()).await;
        self.pending.fetch_sub(1, Relaxed);
        match r {
            Ok(Ok(p)) => Ok(Some(p)),
            _ => Err(Overflow::Timeout),
        }
    }

    /// Reserves a retry slot: never more than `maxRetries` at once, and with `budgeted` at most
    /// 20% of the active requests (at least 3).
    pub fn begin_retry(self: &Arc<Self>, budgeted: bool) -> Option<RetryGuard> {
        let max = self
            .state
            .load()
            .policy
            .pool
            .max_retries
            .unwrap_or(u32::MAX);
        let budget = if budgeted {
            (self.active_requests.load(Relaxed) / 5).max(3).min(max)
        } else {
            max
        };
        let cur = self.active_retries.fetch_add(1, Relaxed);
        if cur >= budget {
            self.active_retries.fetch_sub(1, Relaxed);
            return None;
        }
        Some(RetryGuard(self.clone()))
    }
}

/// Holds one slot of the retry budget.
pub struct RetryGuard(Arc<Cluster>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Relaxed);
    }
}

/// Chooses one of `len` candidates (`at(j)` is the backend index of candidate `j`) under the
/// cluster's balancing policy.
fn choose(
    st: &State,
    rr: &AtomicUsize,
    key: Option<u64>,
    len: usize,
    at: impl Fn(usize) -> usize,
) -> usize {
    match (&st.policy.lb, key) {
        (
            LoadBalancer::HashHeader(_) | LoadBalancer::HashCookie(_) | LoadBalancer::HashSourceIp,
            Some(k),
        ) if !st.ring.is_empty() => {
            let start = st.ring.partition_point(|(p, _)| *p < k);
            (0..st.ring.len())
                .map(|j| st.ring[(start + j) % st.ring.len()].1)
                .find(|i| (0..len).any(|j| at(j) == *i))
                .unwrap_or_else(|| at(0))
        }
        (LoadBalancer::RoundRobin, _) => at(rr.fetch_add(1, Relaxed) % len),
        (LoadBalancer::LeastRequest | LoadBalancer::LeastConn, _) if len > 1 => {
            // Power of two choices on requests in flight.
            let a = rand::random_range(0..len);
            let mut b = rand::random_range(0..len - 1);
            if b == a {
                b = len - 1;
            }
            let (a, b) = (at(a), at(b));
            if st.backends[b].active.load(Relaxed) < st.backends[a].active.load(Relaxed) {
                b
            } else {
                a
            }
        }
        // RANDOM, and hashing policies without a key (Envoy falls back to random).
        _ => at(rand::random_range(0..len)),
    }
}

fn conn_opts(pool: &ConnectionPool) -> ConnOpts {
    ConnOpts {
        connect_timeout: pool.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        max_requests_per_connection: pool.max_requests_per_connection,
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
        // All tried: any backend again.
        assert!(c.pick(None, &addrs(3)).is_some());
    }

    #[test]
    fn consistent_hash_is_stable_and_spreads() {
        let c = Cluster::new(
            "t".into(),
            &addrs(4),
            policy(LoadBalancer::HashHeader("user".into()), None),
        );
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
        c.update(&other, c.policy());
        assert_eq!(c.pick(Some(hash_key(b"tomas")), &[]).unwrap().addr, a);
    }

    #[test]
    fn ejection_respects_max_percent_and_multiplies_time() {
        let od = OutlierDetection {
            consecutive_5xx: None,
            consecutive_gateway: Some(2),
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(60),
            max_ejection_percent: 50,
            min_health_percent: 0,
        };
        let c = Cluster::new(
            "t".into(),
            &addrs(2),
            policy(LoadBalancer::RoundRobin, Some(od)),
        );
        let [a, b] = [c.backends()[0].clone(), c.backends()[1].clone()];
        c.record(&a, Outcome::Status(503));
        assert!(!c.is_ejected(&a));
        c.record(&a, Outcome::Status(503));
        assert!(c.is_ejected(&a));
        // A 500 is not a gateway error; a success resets the count.
        c.record(&b, Outcome::Status(500));
        c.record(&b, Outcome::Status(500));
        assert!(!c.is_ejected(&b));
        c.record(&b, Outcome::LocalFailure);
        c.record(&b, Outcome::Success);
        c.record(&b, Outcome::LocalFailure);
        assert!(!c.is_ejected(&b));
        // 50% of 2 = 1 ejected at most.
        c.record(&b, Outcome::LocalFailure);
        assert!(!c.is_ejected(&b));
        for _ in 0..20 {
            assert_eq!(c.pick(None, &[]).unwrap().addr, b.addr);
        }
        let until = a.ejected_until_ms.load(Relaxed);
        assert!((59_000..=61_000).contains(&until), "{until}");
    }

    #[test]
    fn all_ejected_means_no_backend_unless_panic_mode() {
        let mut od = OutlierDetection {
            consecutive_5xx: None,
            consecutive_gateway: Some(1),
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        };
        let c = Cluster::new(
            "t".into(),
            &addrs(2),
            policy(LoadBalancer::RoundRobin, Some(od.clone())),
        );
        for b in c.backends() {
            c.record(&b, Outcome::LocalFailure);
        }
        assert!(c.pick(None, &[]).is_none());
        od.min_health_percent = 50;
        c.update(&addrs(2), policy(LoadBalancer::RoundRobin, Some(od)));
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
        while c.pending.load(Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            c.admit(Duration::from_secs(5)).await.err(),
            Some(Overflow::Pending)
        );
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(true));
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn the_default_budget_allows_20_percent_of_active_requests_and_at_least_3() {
        let p = ClusterPolicy {
            lb: LoadBalancer::Random,
            pool: ConnectionPool::default(),
            outlier: None,
            h2: false,
        };
        let c = Arc::new(Cluster::new("t".into(), &[], p.clone()));
        let hold: Vec<_> = (0..3)
            .map(|_| c.begin_retry(true).expect("3 at least"))
            .collect();
        assert!(c.begin_retry(true).is_none());
        c.active_requests.store(50, Relaxed);
        let more: Vec<_> = (0..7)
            .map(|_| c.begin_retry(true).expect("20% of 50"))
            .collect();
        assert!(c.begin_retry(true).is_none());
        // An explicit policy is bounded only by maxRetries.
        assert!(c.begin_retry(false).is_some());
        let mut limited = p;
        limited.pool.max_retries = Some(10);
        c.update(&[], limited);
        assert!(c.begin_retry(false).is_none(), "10 in flight already");
        drop((hold, more));
        assert!(c.begin_retry(false).is_some());
    }
}
