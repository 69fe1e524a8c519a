//! The `run` loop: desired state in, datapath writes out, until SIGTERM/SIGINT.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use proxy_common::{L7Config, OrigKey, RevValue};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::datapath::{Datapath, L7Maps, Reconciler};
use crate::kube_source::{self, KubeConfig};
use crate::proxy::{self, OrigDst, Proxy, ProxyConfig, Registry, RouteTable};

use crate::manifests;
use crate::model::State;

/// Settings of `proxy-agent run`.
#[derive(Debug, Clone)]
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
    /// The node's IP: the L7 proxy listens there (`None`: no L7 proxy, all Services in L4).
    pub node_ip: Option<Ipv4Addr>,
    /// The L7 proxy's port.
    pub proxy_port: u16,
    /// The L7 proxy's limits and timeouts.
    pub proxy: ProxyConfig,
    /// The proxy's worker runtimes, apart from the agent's own (configuration parsing and map
    /// writes never run on a proxy worker).
    pub proxy_workers: Vec<tokio::runtime::Handle>,
}

/// Where the desired state comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory of Kubernetes YAML.
    Manifests(PathBuf),
    /// The API server: a kubeconfig file, or the in-cluster configuration when `None`.
    Kubernetes(Option<PathBuf>),
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration and no kubeconfig: pass --manifests DIR or --kubeconfig FILE")?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// The original-destination map of the datapath, read after each accept.
struct MapOrigDst(Mutex<aya::maps::HashMap<aya::maps::MapData, OrigKey, RevValue>>);

impl OrigDst for MapOrigDst {
    fn take(&self, client: SocketAddrV4) -> Option<SocketAddrV4> {
        let key = OrigKey {
            addr_be: u32::from(*client.ip()).to_be(),
            port_be: client.port().to_be(),
            _pad: 0,
        };
        let mut map = self.0.lock().ok()?;
        let v = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(v.addr_be)),
            u16::from_be(v.port_be),
        ))
    }
}

/// Binds the proxy listener, publishes it to the datapath (redirect target and liveness).
fn start_proxy(
    cfg: &RunConfig,
    node_ip: Ipv4Addr,
    mut l7: L7Maps,
    table: Arc<ArcSwap<RouteTable>>,
) -> anyhow::Result<()> {
    let addr = SocketAddrV4::new(node_ip, cfg.proxy_port);
    let listeners = proxy::workers::listeners(addr, cfg.proxy_workers.len())?;
    let redirect = L7Config {
        proxy_addr_be: u32::from(node_ip).to_be(),
        proxy_port_be: cfg.proxy_port.to_be(),
        _pad: 0,
    };
    l7.config
        .set(0, redirect, 0)
        .context("writing the L7 redirect configuration")?;
    // From here on the datapath redirects HTTP Services to us; the kernel removes the socket from
    // the map when this process dies (closing every listener of the group), and connects fall
    // back to in-kernel balancing at once.
    l7.proxy_sock
        .set(0, &listeners[0], 0)
        .context("publishing the proxy listener to the datapath")?;
    let orig: Arc<dyn OrigDst> = Arc::new(MapOrigDst(Mutex::new(l7.orig_dst)));
    let proxy = Proxy::new(table, orig, cfg.proxy.clone());
    for (i, (l, rt)) in listeners.into_iter().zip(&cfg.proxy_workers).enumerate() {
        let listener = {
            let _rt = rt.enter();
            tokio::net::TcpListener::from_std(l).context("registering the proxy listener")?
        };
        rt.spawn(proxy::serve(listener, proxy.clone(), i == 0));
    }
    info!(%addr, workers = cfg.proxy_workers.len(), "L7 proxy listening");
    Ok(())
}

/// Runs the agent until SIGTERM or SIGINT; the datapath stays pinned and serving afterwards.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (_datapath, maps, mut l7) = Datapath::open(&cfg.cgroup, &cfg.bpffs)
        .with_context(|| format!("setting up the datapath on cgroup {}", cfg.cgroup.display()))?;
    let mut reconciler = Reconciler::restore(maps).context("reading the pinned maps back")?;
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let mut registry = Registry::new(proxy::cluster::PoolSettings {
        idle_timeout: cfg.proxy.pool_idle_timeout,
        max_idle: cfg.proxy.pool_max_idle,
    });
    let mut frontend_cache = crate::model::FrontendCache::default();
    match cfg.node_ip {
        Some(ip) => start_proxy(&cfg, ip, l7, table.clone())?,
        None => {
            l7.config
                .set(0, L7Config::default(), 0)
                .context("clearing the L7 redirect configuration")?;
            warn!(
                "no --node-ip (or NODE_IP): the L7 proxy is off and HTTP Services are balanced in the kernel"
            );
        }
    }
    info!(
        frontends = reconciler.frontend_count(),
        "restored datapath state from pinned maps"
    );

    // `None` until the directory was read once: an empty map must never be applied before the
    // source has spoken, or a restarted agent would flush the pinned state it just adopted.
    let (tx, mut rx) = watch::channel(None::<Arc<State>>);
    let problems = match &cfg.source {
        Source::Manifests(dir) => {
            tokio::spawn(manifests::watch(dir.clone(), cfg.poll, tx));
            None
        }
        Source::Kubernetes(kubeconfig) => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let kc = KubeConfig {
                node_name: cfg.node_name.clone(),
                optional_wait: Duration::from_secs(10),
                debounce: Duration::from_millis(2),
            };
            Some(kube_source::start(client, kc, tx).await)
        }
    };

    let mut generation = 0u64;
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        let retry_at =
            retry.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the manifests watcher stopped");
                }
            }
            _ = tokio::time::sleep_until(retry_at), if retry.is_some() => {}
            _ = term.recv() => { info!("SIGTERM: exiting, the datapath stays pinned and serving"); return Ok(()); }
            _ = int.recv() => { info!("SIGINT: exiting, the datapath stays pinned and serving"); return Ok(()); }
        }
        let t0 = std::time::Instant::now();
        let Some(state) = rx.borrow_and_update().clone() else {
            continue;
        };
        let frontends = frontend_cache.frontends(&state, cfg.node_name.as_deref());
        let t_model = t0.elapsed();
        generation += 1;
        let (routes, found) = registry.build(&state, &frontends, &table.load());
        let t_routes = t0.elapsed() - t_model;
        for p in &found {
            error!(
                generation,
                "{p}; the affected Service keeps its last good route"
            );
            if let Some(tx) = &problems {
                let _ = tx.send(kube_source::Problem {
                    reference: k8s_openapi::api::core::v1::ObjectReference {
                        api_version: Some("networking.istio.io/v1".into()),
                        kind: Some(p.kind.into()),
                        name: Some(p.object.name.clone()),
                        namespace: Some(p.object.namespace.clone()),
                        ..Default::default()
                    },
                    message: p.to_string(),
                });
            }
        }
        let l7_routes = routes.routes.len();
        table.store(Arc::new(routes));

        let t_maps_start = t0.elapsed();
        match reconciler.apply(&frontends) {
            Ok(stats) => {
                retry = None;
                let t_maps = t0.elapsed() - t_maps_start;
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
            }
            Err(e) => {
                error!(generation, error = %e, "datapath update failed; retrying in 1s (the maps keep their last consistent state)");
                retry = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
        }
    }
}
