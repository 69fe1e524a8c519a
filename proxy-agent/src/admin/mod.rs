//! Seeing inside a node: the introspection core every reader uses ([`Hub`], with one immutable
//! [`Snapshot`] per generation), the admin API and the metrics/health endpoints ([`server`]),
//! Prometheus metrics ([`metrics`]), `explain` ([`explain`]), the live monitor ([`monitor`]), and
//! the CLI that talks to the admin API ([`client`], [`render`]).
//!
//! The admin plane runs on a runtime of its own: reading it never delays a proxied request.

pub mod client;
pub mod explain;
pub mod healthcheck;
pub mod metrics;
pub mod monitor;
pub mod render;
pub mod server;
pub mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::datapath::telemetry::Counters;
use crate::model::{Frontend, State};
use crate::proxy::telemetry::Telemetry;
use crate::proxy::{Proxy, RouteTable};
use crate::source::Reporter;

/// What one generation's apply did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ApplyReport {
    /// Generation of the state applied.
    pub generation: u64,
    /// When (seconds since the Unix epoch).
    pub at_unix: f64,
    /// Whether the maps now hold the state (else they keep the last consistent one).
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Frontends programmed.
    pub frontends: usize,
    /// Backends programmed.
    pub backends: usize,
    /// Map writes made.
    pub writes: usize,
    /// HTTP routes in the proxy.
    pub l7_routes: usize,
    /// Time spent on the model, routes and maps (ms).
    pub model_ms: f64,
    /// Routes.
    pub routes_ms: f64,
    /// Maps.
    pub maps_ms: f64,
}

/// Everything the agent serves at one generation. Immutable once published; per-backend
/// health and load are live atomics inside the routes' clusters.
#[derive(Default)]
pub struct Snapshot {
    /// Generation (0 before the first state from the source).
    pub generation: u64,
    /// The desired state.
    pub state: Arc<State>,
    /// The frontends programmed.
    pub frontends: Arc<Vec<Arc<Frontend>>>,
    /// The proxy's routes.
    pub routes: Arc<RouteTable>,
    /// The last apply.
    pub apply: ApplyReport,
    /// When the maps last took a state (None: never yet).
    pub synced_at: Option<SystemTime>,
}

/// Where the agent's configuration comes from, for `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct AgentInfo {
    /// `manifests` or `kubernetes`.
    pub source: String,
    /// The directory, kubeconfig or `in-cluster`.
    pub source_location: String,
    /// This node's name.
    pub node_name: Option<String>,
    /// The bpffs directory of the pins.
    pub bpffs: PathBuf,
    /// The cgroup the programs are attached to.
    pub cgroup: PathBuf,
    /// The proxy's address, when L7 is on.
    pub proxy_addr: Option<SocketAddr>,
    /// The agent's version.
    pub version: &'static str,
}

/// Installs a tracing filter, or says why it is invalid.
type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Changes the log filter at run time (`/logging?level=`).
pub struct LogControl {
    set: SetFilter,
    current: Mutex<String>,
}

impl LogControl {
    /// A control calling `set` with a tracing filter (`info`, `debug`, `proxy_agent=trace`).
    pub fn new(
        initial: &str,
        set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            set: Box::new(set),
            current: Mutex::new(initial.to_string()),
        }
    }

    /// Sets the filter.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        (self.set)(filter)?;
        if let Ok(mut c) = self.current.lock() {
            *c = filter.to_string();
        }
        Ok(())
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Histograms of the sync loop, kube-proxy style.
pub struct SyncMetrics {
    /// Seconds per sync (model, routes and maps).
    pub duration: prometheus_client::metrics::histogram::Histogram,
    /// Seconds from an EndpointSlice's `last-change-trigger-time` to maps and routes applied.
    pub network_programming: prometheus_client::metrics::histogram::Histogram,
    /// Failed applies.
    pub failures: prometheus_client::metrics::counter::Counter,
}

impl Default for SyncMetrics {
    fn default() -> Self {
        let buckets = || prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 20);
        Self {
            duration: prometheus_client::metrics::histogram::Histogram::new(buckets()),
            network_programming: prometheus_client::metrics::histogram::Histogram::new(buckets()),
            failures: Default::default(),
        }
    }
}

/// The introspection core: the agent publishes, the admin API, metrics and CLI read.
pub struct Hub {
    /// Where the configuration comes from.
    pub info: AgentInfo,
    /// When the agent started.
    pub started: SystemTime,
    /// Configuration problems.
    pub reporter: Reporter,
    /// How far the source got.
    pub progress: Arc<crate::source::Progress>,
    /// The proxy's request telemetry.
    pub telemetry: Arc<Telemetry>,
    /// Sync histograms.
    pub sync: SyncMetrics,
    /// The live monitor.
    pub monitor: monitor::MonitorHub,
    /// Run-time log filter.
    pub log: Option<LogControl>,
    snapshot: ArcSwap<Snapshot>,
    proxy: OnceLock<Arc<Proxy>>,
    counters: Mutex<Option<Counters>>,
    proxy_listening: AtomicBool,
    /// SIGTERM received: the agent drains and leaves.
    draining: AtomicBool,
    /// The eBPF object's hash and whether its links were adopted from an earlier agent.
    datapath: OnceLock<(String, bool)>,
    /// The addresses a NodePort answers on (the north-south devices' and the node IP).
    node_addrs: OnceLock<Vec<std::net::Ipv4Addr>>,
    /// Milliseconds since `started` of the agent loop's last heartbeat.
    heartbeat_ms: AtomicU64,
    /// Map occupancy, walked at most once per [`OCCUPANCY_TTL`] (a walk of a large map costs
    /// one syscall per entry).
    occupancy: Mutex<Option<Reading>>,
    /// The generation last published, for readers that follow every change.
    generation: tokio::sync::watch::Sender<u64>,
}

/// A map occupancy reading and when it was taken.
type Reading = (
    std::time::Instant,
    Vec<crate::datapath::telemetry::MapUsage>,
);

/// How long a map occupancy reading is reused.
pub const OCCUPANCY_TTL: Duration = Duration::from_secs(2);

impl Hub {
    /// A hub with nothing published yet.
    pub fn new(
        info: AgentInfo,
        reporter: Reporter,
        telemetry: Arc<Telemetry>,
        log: Option<LogControl>,
    ) -> Arc<Self> {
        Arc::new(Self {
            info,
            started: SystemTime::now(),
            reporter,
            progress: Arc::default(),
            monitor: monitor::MonitorHub::new(telemetry.tap.clone()),
            telemetry,
            sync: SyncMetrics::default(),
            log,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            proxy: OnceLock::new(),
            counters: Mutex::new(None),
            proxy_listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            datapath: OnceLock::new(),
            node_addrs: OnceLock::new(),
            heartbeat_ms: AtomicU64::new(0),
            occupancy: Mutex::new(None),
            generation: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Publishes a generation.
    pub fn publish(&self, s: Snapshot) {
        let generation = s.generation;
        self.snapshot.store(Arc::new(s));
        self.generation.send_replace(generation);
    }

    /// Follows the published generations.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Registers the running proxy (its listener is published to the datapath).
    pub fn set_proxy(&self, p: Arc<Proxy>) {
        let _ = self.proxy.set(p);
        self.proxy_listening.store(true, Relaxed);
    }

    /// The agent drains (SIGTERM): `/ready` fails from now on, so that a probe of the agent
    /// replacing it (the admin listeners are shared during a hand-over) never counts this one.
    pub fn set_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Notes the datapath's object hash and whether it was adopted.
    pub fn set_datapath(&self, object: String, adopted: bool) {
        let _ = self.datapath.set((object, adopted));
    }

    /// Notes the addresses a NodePort answers on.
    pub fn set_node_addrs(&self, addrs: Vec<std::net::Ipv4Addr>) {
        let _ = self.node_addrs.set(addrs);
    }

    /// Whether `ip` is one this node's NodePorts answer on (loopback included).
    pub fn is_node_addr(&self, ip: &std::net::Ipv4Addr) -> bool {
        ip.is_loopback() || self.node_addrs.get().is_some_and(|a| a.contains(ip))
    }

    /// The datapath's object hash and whether it was adopted.
    pub fn datapath(&self) -> Option<&(String, bool)> {
        self.datapath.get()
    }

    /// The proxy, when L7 is on.
    pub fn proxy(&self) -> Option<&Arc<Proxy>> {
        self.proxy.get()
    }

    /// Hands over the datapath's counters.
    pub fn set_counters(&self, c: Counters) {
        if let Ok(mut g) = self.counters.lock() {
            *g = Some(c);
        }
    }

    /// The datapath's decision counters now, by index.
    pub fn counters(&self) -> Option<[u64; proxy_common::STATS_COUNT as usize]> {
        self.counters.lock().ok()?.as_ref()?.read().ok()
    }

    /// Ready: the maps took a first state, and the proxy listens when L7 is on.
    pub fn ready(&self) -> Result<(), String> {
        let s = self.snapshot.load();
        if s.synced_at.is_none() {
            return Err(if s.generation == 0 {
                "waiting for the first state from the source".into()
            } else {
                format!(
                    "the first datapath sync failed: {}",
                    s.apply.error.clone().unwrap_or_default()
                )
            });
        }
        if self.draining.load(Relaxed) {
            return Err("draining: SIGTERM received, this agent is leaving".into());
        }
        if self.info.proxy_addr.is_some() && !self.proxy_listening.load(Relaxed) {
            return Err("the L7 proxy is not listening yet".into());
        }
        Ok(())
    }

    /// How full each BPF map is (a reading at most [`OCCUPANCY_TTL`] old).
    pub fn occupancy(
        &self,
    ) -> Result<Vec<crate::datapath::telemetry::MapUsage>, crate::datapath::MapError> {
        let mut cached = self.occupancy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = cached.as_ref()
            && at.elapsed() < OCCUPANCY_TTL
        {
            return Ok(v.clone());
        }
        let v = crate::datapath::telemetry::occupancy(&self.info.bpffs)?;
        *cached = Some((std::time::Instant::now(), v.clone()));
        Ok(v)
    }

    /// Notes that the agent loop is alive.
    pub fn beat(&self) {
        let ms = self.started.elapsed().map_or(0, |d| d.as_millis() as u64);
        self.heartbeat_ms.store(ms, Relaxed);
    }

    /// How long ago the agent loop last beat.
    pub fn since_heartbeat(&self) -> Duration {
        let now = self.started.elapsed().map_or(0, |d| d.as_millis() as u64);
        Duration::from_millis(now.saturating_sub(self.heartbeat_ms.load(Relaxed)))
    }
}
