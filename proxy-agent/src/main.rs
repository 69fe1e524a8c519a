//! The `proxy-agent` binary: `run` the node proxy, `dump` its maps, `cleanup` its pins.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proxy_agent::agent::{self, RunConfig, Source};
use proxy_agent::datapath;
use proxy_agent::proxy::ProxyConfig;

/// Node-level Kubernetes service proxy with an eBPF datapath.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the node's Services until SIGTERM/SIGINT, from the API server (in-cluster or
    /// `--kubeconfig`) or from a manifests directory.
    Run(Box<RunArgs>),
    /// Print CustomResourceDefinitions for the accepted Istio kinds (`cargo xtask codegen`).
    #[cfg(feature = "codegen")]
    #[command(hide = true)]
    Crds,
    /// Print the datapath maps as text.
    Dump {
        /// bpffs directory of the agent.
        #[arg(long, default_value = "/sys/fs/bpf/proxy-agent")]
        bpffs: PathBuf,
    },
    /// Detach the programs and remove everything pinned under the bpffs directory.
    Cleanup {
        /// bpffs directory of the agent.
        #[arg(long, default_value = "/sys/fs/bpf/proxy-agent")]
        bpffs: PathBuf,
    },
}

/// Arguments of `run`.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Directory of Kubernetes YAML (Service, EndpointSlice, Pod, VirtualService,
    /// DestinationRule) instead of an API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// kubeconfig file (default without --manifests: the in-cluster configuration).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (from the downward API in a DaemonSet), for
    /// internalTrafficPolicy: Local and as the reporter of Events.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// cgroup v2 directory to attach to (default: the root of the cgroup2 mount).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/proxy-agent")]
    bpffs: PathBuf,
    /// Interval between checks of the manifests directory, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// This node's IP, where the L7 proxy listens (from the downward API in a DaemonSet).
    /// Without it the proxy is off and HTTP Services are balanced in the kernel.
    #[arg(long, env = "NODE_IP")]
    node_ip: Option<std::net::Ipv4Addr>,
    /// Port of the L7 proxy.
    #[arg(long, default_value_t = 15001)]
    proxy_port: u16,
    /// Worker threads of the L7 proxy's runtime (default: one per core). The agent's
    /// configuration work runs on a runtime of its own.
    #[arg(long)]
    proxy_workers: Option<usize>,
    /// Limits and timeouts of the L7 proxy.
    #[command(flatten)]
    limits: ProxyArgs,
}

/// The L7 proxy's limits and timeouts (see `proxy::limits`).
#[derive(clap::Args, Debug)]
struct ProxyArgs {
    /// Downstream connections the proxy holds at once; beyond, new ones are closed.
    #[arg(long, default_value_t = ProxyConfig::default().max_connections)]
    max_connections: usize,
    /// Idle HTTP connections one client pod may hold before its longest-idle ones close.
    #[arg(long, default_value_t = ProxyConfig::default().max_idle_per_client)]
    max_idle_per_client: usize,
    /// How long to wait for a client's first bytes before treating a connection as opaque
    /// TCP (a Service's `proxy-agent.io/detect-timeout` annotation overrides it).
    #[arg(long, default_value = "1s", value_parser = duration)]
    detect_timeout: Duration,
    /// Time allowed for an HTTP/1 request head after its first byte (slowloris).
    #[arg(long, default_value = "10s", value_parser = duration)]
    header_read_timeout: Duration,
    /// HTTP connections without a request in flight for this long are closed.
    #[arg(long, default_value = "5m", value_parser = duration)]
    http_idle_timeout: Duration,
    /// Opaque TCP and upgraded connections without a byte either way for this long close.
    #[arg(long, default_value = "1h", value_parser = duration)]
    stream_idle_timeout: Duration,
    /// Pooled upstream HTTP/1.1 connections idle for this long are closed.
    #[arg(long, default_value = "90s", value_parser = duration)]
    pool_idle_timeout: Duration,
    /// Idle pooled upstream connections kept per backend.
    #[arg(long, default_value_t = ProxyConfig::default().pool_max_idle)]
    pool_max_idle: usize,
    /// Append the client pod's IP to `x-forwarded-for` (backends see the node IP as the
    /// source through the proxy, not the pod IP as under kube-proxy).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    x_forwarded_for: bool,
}

impl From<ProxyArgs> for ProxyConfig {
    fn from(a: ProxyArgs) -> Self {
        Self {
            max_connections: a.max_connections,
            max_idle_per_client: a.max_idle_per_client,
            detect_timeout: a.detect_timeout,
            header_read_timeout: a.header_read_timeout,
            http_idle_timeout: a.http_idle_timeout,
            stream_idle_timeout: a.stream_idle_timeout,
            pool_idle_timeout: a.pool_idle_timeout,
            pool_max_idle: a.pool_max_idle,
            x_forwarded_for: a.x_forwarded_for,
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    proxy_agent::istio::duration("", s).map_err(|(_, e)| e)
}

/// The cgroup2 mount point, from /proc/mounts.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup2 file system is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let RunArgs {
                manifests,
                kubeconfig,
                node_name,
                cgroup,
                bpffs,
                poll_ms,
                node_ip,
                proxy_port,
                proxy_workers,
                limits,
            } = *args;
            let cgroup = match cgroup {
                Some(c) => c,
                None => cgroup2_root()?,
            };
            match proxy_agent::proxy::limits::raise_fd_limit() {
                Ok(n) => tracing::info!(open_files = n, "open-file limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
            }
            // The agent's own work (sources, parsing, map writes) and the proxy's serving run
            // on separate runtimes, so a large manifest never delays a proxied request.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("agent")
                .enable_all()
                .build()
                .context("starting the agent runtime")?;
            let workers = proxy_workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            let proxy_workers = proxy_agent::proxy::workers::Workers::start(workers)?;
            let source = match manifests {
                Some(dir) => Source::Manifests(dir),
                None => Source::Kubernetes(kubeconfig),
            };
            let result = rt.block_on(agent::run(RunConfig {
                source,
                node_name,
                cgroup,
                bpffs,
                poll: Duration::from_millis(poll_ms),
                node_ip,
                proxy_port,
                proxy: limits.into(),
                proxy_workers: proxy_workers.handles().to_vec(),
            }));
            // Both runtimes end here, outside any async context.
            drop(rt);
            proxy_workers.stop();
            result
        }
        #[cfg(feature = "codegen")]
        Command::Crds => {
            print!("{}", proxy_agent::istio::crd_yaml());
            Ok(())
        }
        Command::Dump { bpffs } => {
            let maps = datapath::loader::open_pinned_maps(&bpffs)
                .with_context(|| format!("opening the maps pinned under {}", bpffs.display()))?;
            print!("{}", datapath::dump(&maps)?);
            Ok(())
        }
        Command::Cleanup { bpffs } => {
            let n = datapath::cleanup(Path::new(&bpffs))
                .with_context(|| format!("removing the pins under {}", bpffs.display()))?;
            eprintln!("removed {n} pins under {}", bpffs.display());
            Ok(())
        }
    }
}
