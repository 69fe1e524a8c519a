//! The `run` loop: desired state in, datapath writes and proxy routes out, until SIGTERM/SIGINT.
//! Each generation is published to the introspection [`Hub`] for the admin API and metrics.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{ApplyReport, Hub, Snapshot};
use crate::datapath::{AyaMaps, Datapath, L7Maps, Opened, Publication, Reconciler};
use crate::model::{FrontendCache, State};
use crate::proxy::config::ConfigProblem;
use crate::proxy::telemetry::Peers;
use crate::proxy::{self, OrigDst, Proxy, ProxyConfig, Registry, RouteTable};
use crate::source::{Problem, dir, kube};

/// Settings of `proxy-agent run`.
#[derive(Clone)]
pub struct RunConfig {
    /// Where the desired state comes from.
    pub source: Source,
    /// This node's name (`internalTrafficPolicy: Local`, Event reporting instance).
    pub node_name: Option<String>,
    /// cgroup v2 directory the programs attach to.
    pub cgroup: PathBuf,
    /// bpffs directory for pins.
    pub bpffs: PathBuf,
    /// How often the manifests directory is checked for changes.
    pub poll: Duration,
    /// Largest manifest file read.
    pub max_manifest_bytes: u64,
    /// The node's IP: the L7 proxy listens there (`None`: no L7 proxy, all Services in L4).
    pub node_ip: Option<Ipv4Addr>,
    /// The L7 proxy's port.
    pub proxy_port: u16,
    /// `--devices`: the north-south interfaces (empty: the one holding `node_ip`).
    pub devices: Vec<String>,
    /// The socket hooks serve host-network processes only (`--socket-lb-hostns-only`).
    pub socket_lb_hostns_only: bool,
    /// This node's zone (`--zone`), for PreferClose.
    pub zone: Option<String>,
    /// Destroy connected UDP sockets pinned to a removed backend (`--terminate-stale-udp`).
    pub terminate_stale_udp: bool,
    /// The L7 proxy's limits and timeouts.
    pub proxy: ProxyConfig,
    /// The proxy's worker runtimes, apart from the agent's own (configuration parsing and map
    /// writes never run on a proxy worker).
    pub proxy_workers: Vec<tokio::runtime::Handle>,
    /// The introspection core the admin API reads.
    pub hub: Arc<Hub>,
    /// Level of the eBPF programs' debug logs.
    pub bpf_log: crate::datapath::loader::BpfLog,
}

/// Where the desired state comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory of Kubernetes YAML.
    Manifests(PathBuf),
    /// The API server: a kubeconfig file, or the in-cluster configuration when `None`.
    Kubernetes(Option<PathBuf>),
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<::kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = ::kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            ::kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => ::kube::Config::infer()
            .await
            .context("no in-cluster configuration and no kubeconfig: pass --manifests DIR or --kubeconfig FILE")?,
    };
    ::kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// Binds the proxy listeners, publishes them to the datapath (redirect target and liveness)
/// and starts the workers. Called once the first state's routes are in the table: a proxy
/// that listens joins the `SO_REUSEPORT` group, and an earlier agent's redirected connections
/// may reach it at once (a hand-over), so it must never answer "no route" for a lack of
/// configuration.
fn start_proxy(
    cfg: &RunConfig,
    node_ip: Ipv4Addr,
    l7: L7Maps,
    table: Arc<ArcSwap<RouteTable>>,
) -> anyhow::Result<(Arc<Proxy>, Publication)> {
    let addr = SocketAddrV4::new(node_ip, cfg.proxy_port);
    // A listener that closes while another agent's listens on the same address hands its
    // queued connections over instead of resetting them (Linux >= 5.14).
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
        warn!(error = %e, "could not set net.ipv4.tcp_migrate_req=1: connections queued at the proxy during an agent hand-over may be reset");
    }
    let listeners = proxy::workers::listeners(addr, cfg.proxy_workers.len())?;
    let (orig, publication) = l7.publish(addr, &listeners)?;
    let orig: Arc<dyn OrigDst> = Arc::new(orig);
    let proxy = Proxy::new(table, orig, cfg.proxy.clone(), cfg.hub.telemetry.clone());
    for (i, (l, rt)) in listeners.into_iter().zip(&cfg.proxy_workers).enumerate() {
        let listener = {
            let _rt = rt.enter();
            tokio::net::TcpListener::from_std(l).context("registering the proxy listener")?
        };
        rt.spawn(proxy::serve(listener, proxy.clone(), i == 0));
    }
    cfg.hub.set_proxy(proxy.clone());
    info!(%addr, workers = cfg.proxy_workers.len(), "L7 proxy listening");
    Ok((proxy, publication))
}

/// The graceful shutdown of the proxy: out of the redirect map (new connects are balanced in
/// the kernel, or reach the agent that took over), listeners closed, connections finished
/// for at most `--drain-timeout`.
async fn drain(proxy: &Proxy, publication: &mut Publication) {
    let t0 = tokio::time::Instant::now();
    let withdrawn = publication.withdraw();
    // The accept loops linger from here.
    proxy.drain();
    match withdrawn {
        Ok(true) => info!("draining the L7 proxy: new connections are balanced in the kernel"),
        Ok(false) => info!(
            "draining the L7 proxy: another agent's proxy listens on the same address and takes the new connections"
        ),
        Err(e) => warn!(
            error = format!("{e:#}"),
            "draining the L7 proxy: could not withdraw it from the redirect map; connections arriving during the drain may be reset"
        ),
    }
    let t0_linger = tokio::time::Instant::now();
    let limit = proxy.config().drain_timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let open = proxy.active_connections();
        if open == 0 && t0_linger.elapsed() >= proxy::limits::DRAIN_ACCEPT_LINGER {
            info!(
                ms = t0.elapsed().as_millis() as u64,
                "the L7 proxy drained: no connection left"
            );
            return;
        }
        if t0.elapsed() >= limit {
            warn!(
                open,
                timeout_s = limit.as_secs_f64(),
                "drain timeout: closing the proxy's remaining connections (--drain-timeout)"
            );
            return;
        }
    }
}

/// A route problem as the reporter lists it.
fn route_problem(p: ConfigProblem) -> Problem {
    let (field, message) = match p.message.split_once(": ") {
        Some((f, m)) if !f.contains(' ') => (f.to_string(), m.to_string()),
        _ => ("-".to_string(), p.message.clone()),
    };
    Problem {
        kind: p.kind.to_string(),
        object: p.object.to_string(),
        file: None,
        field,
        message,
        effect: "the affected Service keeps its last good route".into(),
        reference: None,
    }
}

/// Everything a generation's sync needs, moved to a blocking thread and back so map writes
/// and route building never run on an async worker.
struct Syncer {
    reconciler: Reconciler<AyaMaps>,
    /// Where stale connected UDP sockets are looked for (the attached cgroup), if enabled.
    terminate_udp: Option<(PathBuf, PathBuf)>,
    registry: Registry,
    cache: FrontendCache,
    node_name: Option<String>,
    generation: u64,
    synced_at: Option<SystemTime>,
    last: Option<Arc<State>>,
}

impl Syncer {
    /// Applies one state; returns whether the maps took it.
    fn sync(&mut self, state: Arc<State>, table: &ArcSwap<RouteTable>, hub: &Hub) -> bool {
        let t0 = Instant::now();
        let frontends = self.cache.frontends(&state, self.node_name.as_deref());
        let t_model = t0.elapsed();
        self.generation += 1;
        let generation = self.generation;
        let (routes, found) = self.registry.build(&state, &frontends, &table.load());
        let t_routes = t0.elapsed() - t_model;
        hub.reporter
            .replace("routes", found.into_iter().map(route_problem).collect());
        let routes = Arc::new(routes);
        table.store(routes.clone());
        if self.last.as_ref().is_none_or(|l| l.pods != state.pods) {
            hub.telemetry.set_peers(Peers::of(&state));
        }
        let l7_routes = routes.routes.len();
        let t_maps_start = t0.elapsed();
        let result = self.reconciler.apply(&frontends);
        let t_maps = t0.elapsed() - t_maps_start;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut report = ApplyReport {
            generation,
            at_unix: crate::proxy::telemetry::unix_secs(SystemTime::now()),
            ok: result.is_ok(),
            error: None,
            frontends: frontends.len(),
            backends: 0,
            writes: 0,
            l7_routes,
            model_ms: ms(t_model),
            routes_ms: ms(t_routes),
            maps_ms: ms(t_maps),
        };
        let ok = match result {
            Ok(stats) => {
                report.frontends = stats.frontends;
                report.backends = stats.backends;
                report.writes = stats.writes;
                self.terminate_stale_udp();
                hub.sync.duration.observe(t0.elapsed().as_secs_f64());
                self.network_programming(&state, hub);
                self.synced_at = Some(SystemTime::now());
                info!(
                    generation,
                    services = state.services.len(),
                    frontends = stats.frontends,
                    backends = stats.backends,
                    l7_routes,
                    writes = stats.writes,
                    model_ms = t_model.as_millis() as u64,
                    routes_ms = t_routes.as_millis() as u64,
                    maps_ms = t_maps.as_millis() as u64,
                    "datapath synced"
                );
                true
            }
            Err(e) => {
                hub.sync.failures.inc();
                error!(generation, error = %e, "datapath update failed; retrying in 1s (the maps keep their last consistent state)");
                report.error = Some(e.to_string());
                false
            }
        };
        hub.publish(Snapshot {
            generation,
            state: state.clone(),
            frontends: Arc::new(frontends),
            routes,
            apply: report,
            synced_at: self.synced_at,
        });
        if ok {
            self.last = Some(state);
        }
        ok
    }

    /// Destroys connected UDP sockets pinned (by our translation) to backends just removed.
    fn terminate_stale_udp(&mut self) {
        let removed = self.reconciler.take_removed();
        let Some((cgroup, bpffs)) = &self.terminate_udp else {
            return;
        };
        let gone: std::collections::BTreeSet<(std::net::IpAddr, u16)> = removed
            .into_iter()
            .filter(|b| b.2 == proxy_common::PROTO_UDP)
            .map(|b| (b.0, b.1))
            .collect();
        if gone.is_empty() {
            return;
        }
        let maps = crate::datapath::loader::open_reverse_map(bpffs)
            .and_then(|v4| Ok((v4, crate::datapath::loader::open_reverse_map6(bpffs)?)));
        let (reverse, reverse6) = match maps {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot read the reverse maps; stale UDP sockets stay");
                return;
            }
        };
        let translated = |cookie: u64, addr: std::net::IpAddr, port: u16| match addr {
            std::net::IpAddr::V4(a) => {
                let key = proxy_common::RevKey {
                    cookie,
                    addr_be: u32::from(a).to_be(),
                    port_be: port.to_be(),
                    _pad: 0,
                };
                reverse.get(&key, 0).is_ok()
            }
            std::net::IpAddr::V6(a) => {
                let key = proxy_common::RevKey6 {
                    cookie,
                    addr_be: crate::datapath::maps::words(a),
                    port_be: port.to_be(),
                    _pad: [0; 3],
                };
                reverse6.get(&key, 0).is_ok()
            }
        };
        crate::datapath::sockets::terminate_udp(cgroup, &gone, &translated);
    }

    /// Observes, for every EndpointSlice that changed since the last applied state, the time
    /// from its `last-change-trigger-time` to now (kube-proxy's network programming latency).
    /// The first state is the initial list, not a change.
    fn network_programming(&self, state: &State, hub: &Hub) {
        let Some(last) = &self.last else { return };
        let now = SystemTime::now();
        for (id, slice) in &state.slices {
            let changed = last
                .slices
                .get(id)
                .is_none_or(|old| !Arc::ptr_eq(old, slice));
            if let (true, Some(t)) = (changed, slice.trigger_time)
                && let Ok(d) = now.duration_since(t)
            {
                hub.sync.network_programming.observe(d.as_secs_f64());
            }
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT; the datapath stays pinned and serving afterwards.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let hub = cfg.hub.clone();
    let Opened {
        datapath,
        maps,
        l7,
        counters,
        monitor,
        logger,
    } = {
        let devices = crate::datapath::devices::resolve(&cfg.devices, cfg.node_ip)?;
        hub.set_node_addrs(
            devices
                .iter()
                .flat_map(|d| d.addrs.iter().copied())
                .chain(cfg.node_ip)
                .collect(),
        );
        if devices.is_empty() {
            warn!(
                "no --devices and no --node-ip: NodePort, LoadBalancer and externalIP traffic from outside the node is not served"
            );
        }
        Datapath::open(
            &cfg.cgroup,
            &cfg.bpffs,
            cfg.bpf_log,
            &devices,
            cfg.node_ip,
            cfg.socket_lb_hostns_only,
        )
        .with_context(|| format!("setting up the datapath on cgroup {}", cfg.cgroup.display()))?
    };
    if let Some(l) = logger {
        l.spawn();
    }
    hub.set_datapath(datapath.object.clone(), datapath.adopted);
    hub.set_counters(counters);
    hub.monitor.attach_kernel(monitor);
    let reconciler = Reconciler::restore(maps).context("reading the pinned maps back")?;
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let registry = Registry::new(proxy::cluster::PoolSettings {
        idle_timeout: cfg.proxy.pool_idle_timeout,
        max_idle: cfg.proxy.pool_max_idle,
    });
    // The proxy starts after the first sync (its routes are in the table by then).
    let mut l7 = match cfg.node_ip {
        Some(ip) => Some((ip, l7)),
        None => {
            l7.disable()?;
            warn!(
                "no --node-ip (or NODE_IP): the L7 proxy is off and HTTP Services are balanced in the kernel"
            );
            None
        }
    };
    let mut proxy: Option<(Arc<Proxy>, Publication)> = None;
    info!(
        frontends = reconciler.frontend_count(),
        "restored datapath state from pinned maps"
    );

    // `None` until the source has spoken: an empty map must never be applied before it has,
    // or a restarted agent would flush the pinned state it just adopted.
    let (tx, mut rx) = watch::channel(None::<Arc<State>>);
    // `--zone`, else (with the API server) this node's topology.kubernetes.io/zone label.
    let mut zone = cfg.zone.clone();
    match &cfg.source {
        Source::Manifests(path) => {
            let dcfg = dir::DirConfig {
                dir: path.clone(),
                interval: cfg.poll,
                max_file_bytes: cfg.max_manifest_bytes,
            };
            tokio::spawn(dir::watch(
                dcfg,
                tx,
                hub.reporter.clone(),
                hub.progress.clone(),
            ));
        }
        Source::Kubernetes(kubeconfig) => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            if zone.is_none()
                && let Some(name) = &cfg.node_name
            {
                zone = kube::node_zone(&client, name).await;
            }
            let kc = kube::KubeConfig {
                node_name: cfg.node_name.clone(),
                optional_wait: Duration::from_secs(10),
                debounce: Duration::from_millis(2),
            };
            kube::start(client, kc, tx, hub.reporter.clone(), hub.progress.clone()).await;
        }
    }
    let beat = hub.clone();
    tokio::spawn(async move {
        loop {
            beat.beat();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });

    let mut syncer = Some(Syncer {
        reconciler,
        terminate_udp: cfg
            .terminate_stale_udp
            .then(|| (cfg.cgroup.clone(), cfg.bpffs.clone())),
        registry,
        cache: FrontendCache::in_zone(zone),
        node_name: cfg.node_name.clone(),
        generation: 0,
        synced_at: None,
        last: None,
    });
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        let retry_at =
            retry.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the configuration source stopped");
                }
            }
            _ = tokio::time::sleep_until(retry_at), if retry.is_some() => {}
            sig = async { tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" } } => {
                info!("{sig}: exiting, the datapath stays pinned and serving");
                hub.set_draining();
                if let Some((p, publication)) = &mut proxy {
                    drain(p, publication).await;
                }
                return Ok(());
            }
        }
        let Some(state) = rx.borrow_and_update().clone() else {
            continue;
        };
        let mut s = syncer.take().context("the syncer is gone")?;
        let (routes, hub) = (table.clone(), hub.clone());
        let (s, ok) = tokio::task::spawn_blocking(move || {
            let ok = s.sync(state, &routes, &hub);
            (s, ok)
        })
        .await
        .context("the sync task panicked")?;
        syncer = Some(s);
        retry = (!ok).then(|| tokio::time::Instant::now() + Duration::from_secs(1));
        if let Some((ip, maps)) = l7.take() {
            proxy = Some(start_proxy(&cfg, ip, maps, table.clone())?);
        }
    }
}
