//! The `proxy-agent` binary: `run` the node proxy, `dump` its maps, `cleanup` its pins.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proxy_agent::agent::{self, RunConfig, Source};
use proxy_agent::datapath;

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
    Run {
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
    },
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
        Command::Run {
            manifests,
            kubeconfig,
            node_name,
            cgroup,
            bpffs,
            poll_ms,
            node_ip,
            proxy_port,
        } => {
            let cgroup = match cgroup {
                Some(c) => c,
                None => cgroup2_root()?,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let source = match manifests {
                Some(dir) => Source::Manifests(dir),
                None => Source::Kubernetes(kubeconfig),
            };
            rt.block_on(agent::run(RunConfig {
                source,
                node_name,
                cgroup,
                bpffs,
                poll: Duration::from_millis(poll_ms),
                node_ip,
                proxy_port,
            }))
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
