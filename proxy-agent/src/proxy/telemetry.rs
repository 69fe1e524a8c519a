//! What the proxy reports about every request and opaque connection: the data behind Istio's
//! standard metrics (`istio_requests_total`, `istio_request_duration_milliseconds`, ...), our
//! own counters (retries by reason, budget exhaustion, ejections, pool overflow), the access
//! log and live request events for `proxy-agent monitor`.
//!
//! The request path does little: the client's and the backend's identities are small ids
//! resolved from a per-generation pod index, and each worker adds to its own table of series
//! (an uncontended lock per request). Labels are spelled out only when Prometheus scrapes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::model::{ObjectRef, State};

/// Istio's buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for `istio_request_bytes` / `istio_response_bytes`.
pub const BYTES_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Envoy's response flags that the proxy sets.
pub mod flags {
    /// Upstream connection failure.
    pub const UF: u16 = 1 << 0;
    /// Upstream overflow (connection pool limits, circuit breaking).
    pub const UO: u16 = 1 << 1;
    /// No healthy upstream.
    pub const UH: u16 = 1 << 2;
    /// Upstream retry limit exceeded.
    pub const URX: u16 = 1 << 3;
    /// No route.
    pub const NR: u16 = 1 << 4;
    /// Downstream connection termination.
    pub const DC: u16 = 1 << 5;
    /// Upstream request timeout.
    pub const UT: u16 = 1 << 6;
    /// Upstream connection termination (reset).
    pub const UC: u16 = 1 << 7;
    /// Downstream protocol error (a request the proxy refused to forward).
    pub const DPE: u16 = 1 << 8;
    /// The request was aborted by fault injection.
    pub const FI: u16 = 1 << 9;
    /// The request was delayed by fault injection.
    pub const DI: u16 = 1 << 10;

    const NAMES: [(u16, &str); 11] = [
        (UF, "UF"),
        (UO, "UO"),
        (UH, "UH"),
        (URX, "URX"),
        (NR, "NR"),
        (DC, "DC"),
        (UT, "UT"),
        (UC, "UC"),
        (DPE, "DPE"),
        (FI, "FI"),
        (DI, "DI"),
    ];

    /// Envoy's spelling: `-` for none, else the codes joined by commas.
    pub fn render(f: u16) -> String {
        if f == 0 {
            return "-".into();
        }
        NAMES
            .iter()
            .filter(|(b, _)| f & b != 0)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Who a pod is, in Istio's terms.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Peer {
    /// Pod name (`unknown` when the address is not a known pod).
    pub pod: String,
    /// Namespace.
    pub namespace: String,
    /// Workload: the pod's Deployment (its name without the ReplicaSet and pod suffixes), or
    /// the pod name.
    pub workload: String,
    /// `app` label (or `app.kubernetes.io/name`).
    pub app: String,
    /// `version` label (or `app.kubernetes.io/version`).
    pub version: String,
}

impl Peer {
    /// The identity of addresses that are not known pods.
    pub fn unknown() -> Self {
        let u = || "unknown".to_string();
        Self {
            pod: u(),
            namespace: u(),
            workload: u(),
            app: u(),
            version: u(),
        }
    }

    /// The identity of a pod from its name and labels.
    pub fn of_pod(id: &ObjectRef, labels: &std::collections::BTreeMap<String, String>) -> Self {
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k).cloned())
                .unwrap_or_else(|| "unknown".into())
        };
        let workload = labels
            .get("service.istio.io/canonical-name")
            .cloned()
            .unwrap_or_else(|| workload_of(&id.name, labels.get("pod-template-hash")));
        Self {
            pod: id.name.clone(),
            namespace: id.namespace.clone(),
            workload,
            app: label(&["app", "app.kubernetes.io/name"]),
            version: label(&["version", "app.kubernetes.io/version"]),
        }
    }
}

/// A Deployment's pod `web-7d9f8b6c4-x2x9z` (pod-template-hash `7d9f8b6c4`) belongs to `web`.
fn workload_of(pod: &str, template_hash: Option<&String>) -> String {
    if let Some(h) = template_hash
        && let Some(i) = pod.find(&format!("-{h}-"))
    {
        return pod[..i].to_string();
    }
    pod.to_string()
}

/// Interned identities: peers and Services get small ids once, for the request path.
#[derive(Default)]
struct Interner {
    peers: Vec<Arc<Peer>>,
    peer_ids: HashMap<Arc<Peer>, u32>,
    services: Vec<ObjectRef>,
    service_ids: HashMap<ObjectRef, u32>,
}

fn interner() -> &'static Mutex<Interner> {
    static I: OnceLock<Mutex<Interner>> = OnceLock::new();
    I.get_or_init(|| {
        let mut i = Interner::default();
        let unknown = Arc::new(Peer::unknown());
        i.peers.push(unknown.clone());
        i.peer_ids.insert(unknown, 0);
        Mutex::new(i)
    })
}

fn lock_interner() -> std::sync::MutexGuard<'static, Interner> {
    interner().lock().unwrap_or_else(|p| p.into_inner())
}

/// The id of an unknown peer.
pub const UNKNOWN_PEER: u32 = 0;

/// The id of a Service in series keys.
pub fn service_id(svc: &ObjectRef) -> u32 {
    let mut i = lock_interner();
    if let Some(id) = i.service_ids.get(svc) {
        return *id;
    }
    let id = i.services.len() as u32;
    i.services.push(svc.clone());
    i.service_ids.insert(svc.clone(), id);
    id
}

/// The Service of an id from [`service_id`].
pub fn service_of(id: u32) -> Option<ObjectRef> {
    lock_interner().services.get(id as usize).cloned()
}

/// The peer of an id in a series key.
pub fn peer_of(id: u32) -> Arc<Peer> {
    let i = lock_interner();
    i.peers
        .get(id as usize)
        .cloned()
        .unwrap_or_else(|| i.peers[0].clone())
}

fn peer_id(p: Peer) -> u32 {
    let mut i = lock_interner();
    if let Some(id) = i.peer_ids.get(&p) {
        return *id;
    }
    let id = i.peers.len() as u32;
    let p = Arc::new(p);
    i.peers.push(p.clone());
    i.peer_ids.insert(p, id);
    id
}

/// Pod addresses to peer ids, rebuilt when the Pods change.
#[derive(Default)]
pub struct Peers {
    by_ip: HashMap<IpAddr, u32>,
}

impl Peers {
    /// The index of every Pod with an address in `state`.
    pub fn of(state: &State) -> Self {
        let by_ip = state
            .pods
            .iter()
            .filter(|(_, p)| !p.ip.is_unspecified())
            .map(|(id, p)| (p.ip, peer_id(Peer::of_pod(id, &p.labels))))
            .collect();
        Self { by_ip }
    }

    /// The peer id of an address.
    pub fn id(&self, ip: IpAddr) -> u32 {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.by_ip.get(&ip).copied().unwrap_or(UNKNOWN_PEER)
    }
}

/// A histogram with fixed buckets, summed by a worker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hist {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    pub counts: Vec<u64>,
    /// Sum of observations.
    pub sum: f64,
}

impl Hist {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len() + 1];
        }
        let i = bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    fn merge(&mut self, o: &Hist) {
        if self.counts.is_empty() {
            self.counts = vec![0; o.counts.len()];
        }
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.sum += o.sum;
    }

    /// Total observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(upper bound, cumulative count)` pairs as Prometheus wants them, +Inf last.
    pub fn cumulative(&self, bounds: &[f64]) -> Vec<(f64, u64)> {
        let mut acc = 0;
        bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .enumerate()
            .map(|(i, b)| {
                acc += self.counts.get(i).copied().unwrap_or(0);
                (b, acc)
            })
            .collect()
    }
}

/// Request protocol label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestProtocol {
    /// HTTP/1.1 or HTTP/2 that is not gRPC.
    Http,
    /// gRPC (`content-type: application/grpc`).
    Grpc,
}

impl RequestProtocol {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
        }
    }
}

/// Labels of one request series (ids resolved at scrape time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    /// Client pod.
    pub source: u32,
    /// Backend pod (unknown when no backend answered).
    pub destination: u32,
    /// The Service.
    pub service: u32,
    /// Response code (0: none, the client went away).
    pub code: u16,
    /// Envoy response flags.
    pub flags: u16,
    /// `grpc-status` (`u16::MAX`: none).
    pub grpc_status: u16,
    /// http or grpc.
    pub protocol: RequestProtocol,
}

/// One request series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestSeries {
    /// Requests.
    pub requests: u64,
    /// Duration, milliseconds.
    pub duration_ms: Hist,
    /// Request body bytes.
    pub request_bytes: Hist,
    /// Response body bytes.
    pub response_bytes: Hist,
}

/// Labels of one opaque TCP series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpKey {
    /// Client pod.
    pub source: u32,
    /// Backend pod.
    pub destination: u32,
    /// The Service.
    pub service: u32,
    /// Envoy response flags (UF when no backend accepted).
    pub flags: u16,
}

/// One opaque TCP series.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSeries {
    /// Connections opened.
    pub opened: u64,
    /// Connections closed.
    pub closed: u64,
    /// Bytes sent to the client.
    pub sent: u64,
    /// Bytes received from the client.
    pub received: u64,
}

#[derive(Default)]
struct WorkerTable {
    requests: HashMap<RequestKey, RequestSeries>,
    tcp: HashMap<TcpKey, TcpSeries>,
}

/// Why a retry was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// A retriable status (5xx, gateway-error, retriable-status-codes).
    Status,
    /// A reset or refused stream.
    Reset,
    /// The connect failed.
    ConnectFailure,
    /// The per-try timeout passed.
    PerTryTimeout,
}

impl RetryReason {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Reset => "reset",
            Self::ConnectFailure => "connect-failure",
            Self::PerTryTimeout => "per-try-timeout",
        }
    }

    /// Every reason, in label order.
    pub const ALL: [RetryReason; 4] = [
        Self::Status,
        Self::Reset,
        Self::ConnectFailure,
        Self::PerTryTimeout,
    ];
}

/// Node-wide counters of the proxy's resilience machinery.
#[derive(Debug, Default)]
pub struct Resilience {
    /// Retries by [`RetryReason`].
    pub retries: [AtomicU64; 4],
    /// Retries not made because the retry budget (or `maxRetries`) was used up.
    pub budget_exhausted: AtomicU64,
    /// Requests refused by pool limits (`http1MaxPendingRequests`).
    pub overflow_pending: AtomicU64,
    /// Requests that waited for a connection until their deadline.
    pub overflow_timeout: AtomicU64,
    /// Backends ejected by outlier detection.
    pub ejections: AtomicU64,
}

/// One request, as the monitor and the access log show it.
#[derive(Clone, Debug, Serialize)]
pub struct RequestEvent {
    /// Wall clock, RFC 3339.
    pub time: String,
    /// Client address.
    pub client: String,
    /// Client pod (`namespace/name`, or `unknown`).
    pub client_pod: String,
    /// Service (`namespace/name`).
    pub service: String,
    /// The ClusterIP:port the client connected to.
    pub vip: String,
    /// VirtualService that routed it (`-`: the Service's default route).
    pub route: String,
    /// Subset (`-`: none).
    pub subset: String,
    /// Backend that answered last (`-`: none).
    pub backend: String,
    /// Attempts made.
    pub attempts: u32,
    /// Status sent to the client (0: none, the client went away).
    pub status: u16,
    /// Envoy response flags.
    pub response_flags: String,
    /// Method.
    pub method: String,
    /// Authority.
    pub authority: String,
    /// Path.
    pub path: String,
    /// http or grpc, or tcp for opaque connections.
    pub protocol: &'static str,
    /// Request body bytes received from the client.
    pub bytes_received: u64,
    /// Response body bytes sent to the client.
    pub bytes_sent: u64,
    /// Milliseconds from the request head to the end of the response.
    pub duration_ms: f64,
}

/// Where the access log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// No access log.
    Off,
    /// JSON lines on stderr.
    Stderr,
    /// JSON lines appended to a file.
    File(std::path::PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "off" | "" => Self::Off,
            "stderr" => Self::Stderr,
            p => Self::File(p.into()),
        })
    }
}

/// The access log: each worker appends JSON lines to a buffer of its own; a thread of its own
/// writes the buffers out every [`ACCESS_LOG_FLUSH`] (Envoy flushes its access logs on an
/// interval too), so a request costs one formatted line and no syscall.
pub struct AccessLog {
    bufs: Vec<Mutex<String>>,
    dropped: AtomicU64,
}

/// How often the access log is written out.
pub const ACCESS_LOG_FLUSH: Duration = Duration::from_millis(100);
/// A worker's buffer beyond this (the disk is slower than the requests) drops lines, counted.
const ACCESS_LOG_MAX_BUFFER: usize = 8 << 20;

impl AccessLog {
    /// Starts the writer thread for `target` (`None` for [`AccessLogTarget::Off`]), for
    /// `workers` proxy workers.
    pub fn start(target: &AccessLogTarget, workers: usize) -> anyhow::Result<Option<Arc<Self>>> {
        use anyhow::Context as _;
        let mut out: Box<dyn std::io::Write + Send> = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stderr => Box::new(std::io::stderr()),
            AccessLogTarget::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening the access log {}", p.display()))?,
            ),
        };
        let log = Arc::new(Self {
            bufs: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
            dropped: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&log);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut spare = String::new();
                loop {
                    std::thread::sleep(ACCESS_LOG_FLUSH);
                    let Some(log) = weak.upgrade() else { return };
                    for b in &log.bufs {
                        {
                            let mut g = b.lock().unwrap_or_else(|p| p.into_inner());
                            std::mem::swap(&mut *g, &mut spare);
                        }
                        if !spare.is_empty() {
                            let _ = out.write_all(spare.as_bytes());
                            spare.clear();
                        }
                    }
                    let _ = out.flush();
                }
            })
            .context("starting the access log thread")?;
        Ok(Some(log))
    }

    fn write(&self, f: &Finished<'_>, source: &Peer, ms: f64) {
        use std::fmt::Write as _;
        let i = super::workers::current() % self.bufs.len();
        let mut b = self.bufs[i].lock().unwrap_or_else(|p| p.into_inner());
        if b.len() > ACCESS_LOG_MAX_BUFFER {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        let _ = write!(
            b,
            "{{\"time\":\"{}\",\"client\":\"{}\",\"client_pod\":",
            jiff::Timestamp::now(),
            f.client.ip()
        );
        if f.source == UNKNOWN_PEER {
            b.push_str("\"unknown\"");
        } else {
            json_str(&mut b, &format_args!("{}/{}", source.namespace, source.pod));
        }
        let _ = write!(
            b,
            ",\"service\":\"{}\",\"vip\":\"{}\",\"route\":",
            f.service.0, f.vip
        );
        match f.route {
            Some(r) => {
                let _ = write!(b, "\"{r}\"");
            }
            None => b.push_str("\"-\""),
        }
        b.push_str(",\"subset\":");
        json_str(&mut b, &f.subset.unwrap_or("-"));
        b.push_str(",\"backend\":");
        match f.backend {
            Some(a) => {
                let _ = write!(b, "\"{a}\"");
            }
            None => b.push_str("\"-\""),
        }
        let _ = write!(
            b,
            ",\"attempts\":{},\"status\":{},\"response_flags\":\"{}\",\"method\":",
            f.attempts,
            f.status,
            flags::render(f.flags)
        );
        json_str(&mut b, &f.request.0);
        b.push_str(",\"authority\":");
        json_str(&mut b, &f.request.1);
        b.push_str(",\"path\":");
        json_str(&mut b, &f.request.2);
        let _ = writeln!(
            b,
            ",\"protocol\":\"{}\",\"bytes_received\":{},\"bytes_sent\":{},\"duration_ms\":{:.3}}}",
            f.protocol.as_str(),
            f.bytes.0,
            f.bytes.1,
            ms
        );
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// Appends `v` as a JSON string (quoted, escaped).
fn json_str(b: &mut String, v: &dyn std::fmt::Display) {
    use std::fmt::Write as _;
    struct Escape<'a>(&'a mut String);
    impl std::fmt::Write for Escape<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            for c in s.chars() {
                match c {
                    '"' => self.0.push_str("\\\""),
                    '\\' => self.0.push_str("\\\\"),
                    c if (c as u32) < 0x20 => {
                        let _ = write!(self.0, "\\u{:04x}", c as u32);
                    }
                    c => self.0.push(c),
                }
            }
            Ok(())
        }
    }
    b.push('"');
    let _ = write!(Escape(b), "{v}");
    b.push('"');
}

/// The live request events tap: sends only while someone listens.
pub struct Tap {
    tx: broadcast::Sender<Arc<RequestEvent>>,
    readers: AtomicUsize,
}

impl Tap {
    fn new() -> Self {
        Self {
            tx: broadcast::channel(4096).0,
            readers: AtomicUsize::new(0),
        }
    }

    /// Whether a reader is attached (events are built only then).
    pub fn active(&self) -> bool {
        self.readers.load(Relaxed) > 0
    }

    /// Attaches a reader until the returned guard is dropped.
    pub fn subscribe(self: &Arc<Self>) -> TapReader {
        self.readers.fetch_add(1, Relaxed);
        TapReader {
            rx: self.tx.subscribe(),
            tap: self.clone(),
        }
    }
}

/// A reader of the [`Tap`].
pub struct TapReader {
    /// The events.
    pub rx: broadcast::Receiver<Arc<RequestEvent>>,
    tap: Arc<Tap>,
}

impl Drop for TapReader {
    fn drop(&mut self) {
        self.tap.readers.fetch_sub(1, Relaxed);
    }
}

/// Everything the proxy reports; one per agent, shared by the workers and the admin API.
pub struct Telemetry {
    peers: ArcSwap<Peers>,
    workers: Vec<Mutex<WorkerTable>>,
    /// Resilience counters.
    pub resilience: Resilience,
    access_log: Option<Arc<AccessLog>>,
    /// Live request events.
    pub tap: Arc<Tap>,
    /// Whether request and TCP series are kept.
    metrics: bool,
}

/// What is known about a finished request.
pub struct Finished<'a> {
    /// Client address.
    pub client: SocketAddr,
    /// Client peer id (from [`Telemetry::peer`], once per connection).
    pub source: u32,
    /// The route's Service and its series id.
    pub service: (&'a ObjectRef, u32),
    /// The ClusterIP:port.
    pub vip: std::net::SocketAddrV4,
    /// The VirtualService, if one routed it.
    pub route: Option<&'a ObjectRef>,
    /// The subset, if any.
    pub subset: Option<&'a str>,
    /// The backend that answered last.
    pub backend: Option<SocketAddr>,
    /// Attempts made.
    pub attempts: u32,
    /// Status (0: none).
    pub status: u16,
    /// Response flags.
    pub flags: u16,
    /// `grpc-status`, if seen.
    pub grpc_status: Option<u16>,
    /// http or grpc.
    pub protocol: RequestProtocol,
    /// Method, authority, path (for the access log and the monitor).
    pub request: (&'a http::Method, &'a str, &'a str),
    /// Whether `request` was captured (not for requests that began before a monitor attached:
    /// those are not shown).
    pub detailed: bool,
    /// Body bytes in and out.
    pub bytes: (u64, u64),
    /// From the request head to the end of the response.
    pub duration: Duration,
}

impl Telemetry {
    /// Telemetry for `workers` proxy workers, with an optional access log; `metrics` false
    /// keeps no request series (to measure what they cost).
    pub fn new(workers: usize, access_log: Option<Arc<AccessLog>>, metrics: bool) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            peers: ArcSwap::from_pointee(Peers::default()),
            workers: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
            resilience: Resilience::default(),
            access_log,
            tap: Arc::new(Tap::new()),
        })
    }

    /// Replaces the pod index (each generation whose Pods changed).
    pub fn set_peers(&self, peers: Peers) {
        self.peers.store(Arc::new(peers));
    }

    /// Whether finished requests are recorded at all (metrics, access log or monitor).
    pub fn records(&self) -> bool {
        self.metrics || self.wants_details()
    }

    /// Whether request details (method, authority, path) are wanted: an access log is
    /// written or a monitor is attached.
    pub fn wants_details(&self) -> bool {
        self.access_log.is_some() || self.tap.active()
    }

    /// The peer id of a client or backend address.
    pub fn peer(&self, ip: IpAddr) -> u32 {
        self.peers.load().id(ip)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, WorkerTable> {
        let i = super::workers::current() % self.workers.len();
        self.workers[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a finished request: series, access log, monitor.
    pub fn request(&self, f: Finished<'_>) {
        let destination = f.backend.map_or(UNKNOWN_PEER, |b| self.peer(b.ip()));
        let key = RequestKey {
            source: f.source,
            destination,
            service: f.service.1,
            code: f.status,
            flags: f.flags,
            grpc_status: f.grpc_status.unwrap_or(u16::MAX),
            protocol: f.protocol,
        };
        let ms = f.duration.as_secs_f64() * 1000.0;
        if self.metrics {
            let mut t = self.table();
            let s = t.requests.entry(key).or_default();
            s.requests += 1;
            s.duration_ms.observe(&DURATION_BUCKETS_MS, ms);
            s.request_bytes.observe(&BYTES_BUCKETS, f.bytes.0 as f64);
            s.response_bytes.observe(&BYTES_BUCKETS, f.bytes.1 as f64);
        }
        let tap = self.tap.active();
        if self.access_log.is_none() && !tap {
            return;
        }
        let source = peer_of(f.source);
        if let Some(log) = &self.access_log {
            log.write(&f, &source, ms);
        }
        if !tap || !f.detailed {
            return;
        }
        let ev = RequestEvent {
            time: jiff::Timestamp::now().to_string(),
            client: f.client.ip().to_string(),
            client_pod: if f.source == UNKNOWN_PEER {
                "unknown".into()
            } else {
                format!("{}/{}", source.namespace, source.pod)
            },
            service: f.service.0.to_string(),
            vip: f.vip.to_string(),
            route: f.route.map_or("-".into(), |r| r.to_string()),
            subset: f.subset.unwrap_or("-").to_string(),
            backend: f.backend.map_or("-".into(), |b| b.to_string()),
            attempts: f.attempts,
            status: f.status,
            response_flags: flags::render(f.flags),
            method: f.request.0.to_string(),
            authority: f.request.1.to_string(),
            path: f.request.2.to_string(),
            protocol: f.protocol.as_str(),
            bytes_received: f.bytes.0,
            bytes_sent: f.bytes.1,
            duration_ms: (ms * 1000.0).round() / 1000.0,
        };
        let _ = self.tap.tx.send(Arc::new(ev));
    }

    /// Records an opaque connection that opened (`backend` accepted it) or failed (`None`).
    pub fn tcp_opened(&self, source: u32, service: u32, backend: Option<SocketAddr>) -> TcpKey {
        let key = TcpKey {
            source,
            destination: backend.map_or(UNKNOWN_PEER, |b| self.peer(b.ip())),
            service,
            flags: if backend.is_none() { flags::UF } else { 0 },
        };
        if self.metrics {
            self.table().tcp.entry(key).or_default().opened += 1;
        }
        key
    }

    /// Records the end of an opaque connection with its byte counts.
    pub fn tcp_closed(&self, key: TcpKey, sent: u64, received: u64) {
        if !self.metrics {
            return;
        }
        let mut t = self.table();
        let s = t.tcp.entry(key).or_default();
        s.closed += 1;
        s.sent += sent;
        s.received += received;
    }

    /// Every request series, summed over workers.
    pub fn request_series(&self) -> Vec<(RequestKey, RequestSeries)> {
        let mut all: HashMap<RequestKey, RequestSeries> = HashMap::new();
        for w in &self.workers {
            let t = w.lock().unwrap_or_else(|p| p.into_inner());
            for (k, s) in &t.requests {
                let a = all.entry(*k).or_default();
                a.requests += s.requests;
                a.duration_ms.merge(&s.duration_ms);
                a.request_bytes.merge(&s.request_bytes);
                a.response_bytes.merge(&s.response_bytes);
            }
        }
        let mut v: Vec<_> = all.into_iter().collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Every opaque TCP series, summed over workers.
    pub fn tcp_series(&self) -> Vec<(TcpKey, TcpSeries)> {
        let mut all: HashMap<TcpKey, TcpSeries> = HashMap::new();
        for w in &self.workers {
            let t = w.lock().unwrap_or_else(|p| p.into_inner());
            for (k, s) in &t.tcp {
                let a = all.entry(*k).or_default();
                a.opened += s.opened;
                a.closed += s.closed;
                a.sent += s.sent;
                a.received += s.received;
            }
        }
        let mut v: Vec<_> = all.into_iter().collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Access log lines dropped because the writer fell behind.
    pub fn access_log_dropped(&self) -> u64 {
        self.access_log.as_ref().map_or(0, |l| l.dropped())
    }

    /// Counts a retry.
    pub fn retried(&self, why: RetryReason) {
        self.resilience.retries[why as usize].fetch_add(1, Relaxed);
    }
}

/// Seconds since the Unix epoch (for snapshots and metrics).
pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_pods_belong_to_their_workload() {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("pod-template-hash".into(), "7d9f8b6c4".into());
        labels.insert("app".into(), "web".into());
        labels.insert("version".into(), "v2".into());
        let p = Peer::of_pod(&ObjectRef::new("shop", "web-v2-7d9f8b6c4-x2x9z"), &labels);
        assert_eq!(
            (p.workload.as_str(), p.app.as_str(), p.version.as_str()),
            ("web-v2", "web", "v2")
        );
        let bare = Peer::of_pod(&ObjectRef::new("shop", "client"), &Default::default());
        assert_eq!(
            (bare.workload.as_str(), bare.app.as_str()),
            ("client", "unknown")
        );
    }

    #[test]
    fn histograms_are_cumulative_with_inf_last() {
        let mut h = Hist::default();
        for v in [0.2, 0.7, 3.0, 4000000.0] {
            h.observe(&DURATION_BUCKETS_MS, v);
        }
        let c = h.cumulative(&DURATION_BUCKETS_MS);
        assert_eq!(c[0], (0.5, 1));
        assert_eq!(c[1], (1.0, 2));
        assert_eq!(c[2], (5.0, 3));
        assert_eq!(c.last().unwrap(), &(f64::INFINITY, 4));
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn access_log_lines_are_json_with_escaped_request_fields() {
        let log = AccessLog {
            bufs: vec![Mutex::default()],
            dropped: AtomicU64::new(0),
        };
        let svc = ObjectRef::new("shop", "web");
        let method = http::Method::POST;
        let f = Finished {
            client: SocketAddr::from(([198, 18, 0, 2], 4000)),
            source: UNKNOWN_PEER,
            service: (&svc, 0),
            vip: "198.19.0.10:80".parse().unwrap(),
            route: Some(&svc),
            subset: Some("v1"),
            backend: Some(SocketAddr::from(([198, 18, 0, 3], 8080))),
            attempts: 2,
            status: 503,
            flags: flags::UF | flags::URX,
            grpc_status: None,
            protocol: RequestProtocol::Http,
            request: (&method, "web\"x", "/a\\b\u{1}"),
            detailed: true,
            bytes: (3, 4),
            duration: Duration::from_micros(1500),
        };
        log.write(&f, &Peer::unknown(), 1.5);
        let line = log.bufs[0].lock().unwrap().clone();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["authority"], "web\"x");
        assert_eq!(v["path"], "/a\\b\u{1}");
        assert_eq!(
            (v["status"].as_u64(), v["response_flags"].as_str()),
            (Some(503), Some("UF,URX"))
        );
        assert_eq!(
            (
                v["route"].as_str(),
                v["subset"].as_str(),
                v["client_pod"].as_str()
            ),
            (Some("shop/web"), Some("v1"), Some("unknown"))
        );
        assert_eq!(v["duration_ms"], 1.5);
    }

    #[test]
    fn flags_render_like_envoy() {
        assert_eq!(flags::render(0), "-");
        assert_eq!(flags::render(flags::UF | flags::URX), "UF,URX");
    }
}
