//! The `proxy-agent` binary: `run` the node proxy, `dump` its maps, `cleanup` its pins.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proxy_agent::admin::{self, render::Output};
use proxy_agent::agent::{self, RunConfig, Source};
use proxy_agent::datapath;
use proxy_agent::datapath::loader::BpfLog;
use proxy_agent::proxy::ProxyConfig;
use proxy_agent::proxy::telemetry::AccessLogTarget;

/// Node-level Kubernetes service proxy with an eBPF datapath.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How a CLI command reaches the agent, and how it prints.
#[derive(clap::Args, Debug, Clone)]
struct ClientArgs {
    /// The agent's admin API (`proxy-agent run --admin-addr`).
    #[arg(long, env = "PROXY_AGENT_ADMIN_ADDR", default_value = admin::client::DEFAULT_ADMIN_ADDR)]
    admin_addr: std::net::SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the node's Services until SIGTERM/SIGINT, from the API server (in-cluster or
    /// `--kubeconfig`) or from a manifests directory.
    Run(Box<RunArgs>),
    /// Synced generation and age, source, proxy, map occupancy, problem count.
    Status(ClientArgs),
    /// Every Service port: ClusterIP, mode (L4/L7), ready/terminating backends, affinity.
    Services(ClientArgs),
    /// One Service: kernel slots read from the maps, route and policies, backends with health.
    Service {
        /// `NAMESPACE/NAME` (or `NAME` in `default`).
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The proxy's HTTP routes.
    Routes(ClientArgs),
    /// The proxy's destinations with live backend health and load.
    Clusters(ClientArgs),
    /// Explain one connection from a pod to a ClusterIP:port, through the kernel and the proxy.
    Explain {
        /// The client pod's IP.
        #[arg(long)]
        from: std::net::Ipv4Addr,
        /// `VIP:PORT`.
        #[arg(long)]
        to: std::net::SocketAddrV4,
        /// UDP instead of TCP.
        #[arg(long)]
        udp: bool,
        /// The request path (HTTP).
        #[arg(long)]
        path: Option<String>,
        /// A request header `Name: value` (HTTP), repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Live socket translations from the eBPF programs and requests through the proxy.
    Monitor {
        /// Which events: trace (translations), drop (refusals), l7 (requests); repeatable.
        #[arg(short = 't', long = "type", value_parser = ["trace", "drop", "l7"])]
        types: Vec<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Configuration problems (objects that do not apply, and what serves instead).
    Problems(ClientArgs),
    /// Change the agent's log filter (`info`, `debug`, `proxy_agent=trace`...).
    LogLevel {
        /// A tracing filter.
        level: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print CustomResourceDefinitions for the accepted Istio kinds (`cargo xtask codegen`).
    #[cfg(feature = "codegen")]
    #[command(hide = true)]
    Crds,
    /// Print the datapath maps (read from the pins; Services named through the admin API).
    Dump {
        /// bpffs directory of the agent.
        #[arg(long, default_value = "/sys/fs/bpf/proxy-agent")]
        bpffs: PathBuf,
        /// The agent's admin API, to name the Services.
        #[arg(long, env = "PROXY_AGENT_ADMIN_ADDR", default_value = admin::client::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        /// Output format (table: the maps as text).
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Time the request recording path (`cargo xtask bench l7`): JSON, nanoseconds per request.
    #[command(hide = true)]
    BenchRecord {
        /// Requests per measurement.
        #[arg(long, default_value_t = 200_000)]
        requests: u32,
    },
    /// Time HTTP rule selection (`cargo xtask bench l7`): JSON, nanoseconds per request.
    #[command(hide = true)]
    BenchSelect {
        /// Requests per measurement.
        #[arg(long, default_value_t = 2_000_000)]
        requests: u32,
        /// Rules of the large VirtualService.
        #[arg(long, default_value_t = 50)]
        rules: usize,
    },
    /// Detach the programs and remove everything pinned under the bpffs directory.
    Cleanup {
        /// bpffs directory of the agent.
        #[arg(long, default_value = "/sys/fs/bpf/proxy-agent")]
        bpffs: PathBuf,
        /// Keep running afterwards (for a cleanup DaemonSet, whose pods must not exit).
        #[arg(long)]
        hold: bool,
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
    /// The node's external interfaces, comma-separated: traffic from outside arriving there
    /// for a NodePort, a LoadBalancer ingress IP or an externalIP is translated by the tc
    /// programs (default: the interface holding --node-ip; neither: no north-south datapath).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Translate Service addresses at the socket level only for host-network processes, not in
    /// pods (Cilium's socketLB.hostNamespaceOnly): for clusters whose pods carry their own proxy
    /// (Istio sidecars: the sidecar must see the ClusterIP) or are VMs (KubeVirt, Kata). Pods
    /// then reach Services only through that proxy.
    #[arg(long)]
    socket_lb_hostns_only: bool,
    /// This node's zone (its `topology.kubernetes.io/zone` label), for Services with
    /// `trafficDistribution: PreferClose`: endpoints hinted for the zone are preferred.
    #[arg(long, env = "NODE_ZONE")]
    zone: Option<String>,
    /// Destroy connected UDP sockets (in the pods and host processes under --cgroup) that our
    /// translation pinned to a backend once it is removed, so DNS clients that keep one socket
    /// reconnect to a live backend (sock_diag SOCK_DESTROY).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    terminate_stale_udp: bool,
    /// The NodePort range (the API server's --service-node-port-range).
    #[arg(long, default_value = "30000-32767", value_parser = port_range)]
    node_port_range: (u16, u16),
    /// Worker threads of the L7 proxy's runtime (default: one per core). The agent's
    /// configuration work runs on a runtime of its own.
    #[arg(long)]
    proxy_workers: Option<usize>,
    /// Limits and timeouts of the L7 proxy.
    #[command(flatten)]
    limits: ProxyArgs,
    /// The admin API (JSON; `proxy-agent status` and the other CLI commands use it). A
    /// non-loopback address needs --admin-addr-unsafe.
    #[arg(long, default_value = admin::client::DEFAULT_ADMIN_ADDR)]
    admin_addr: std::net::SocketAddr,
    /// Allow a non-loopback --admin-addr (the admin API shows the whole configuration and
    /// changes the log level).
    #[arg(long)]
    admin_addr_unsafe: bool,
    /// Prometheus `/metrics`, `/ready` and `/healthz`.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: std::net::SocketAddr,
    /// kube-proxy's health endpoint (`/healthz`: 200 when synced and current, 503 when stale or
    /// not synced yet; cloud load balancers probe it). `off` disables it.
    // Fully qualified: clap's derive would otherwise treat the flag as optional and expect a
    // plain address from the parser.
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = optional_addr)]
    healthz_addr: ::std::option::Option<std::net::SocketAddr>,
    /// Access log of the proxy: `off`, `stderr` or a file path (JSON lines).
    #[arg(long, default_value = "off")]
    access_log: AccessLogTarget,
    /// Largest manifest file read (bytes); larger files are refused.
    #[arg(long, default_value_t = proxy_agent::source::dir::DEFAULT_MAX_FILE_BYTES)]
    max_manifest_bytes: u64,
    /// Debug logs of the eBPF programs (aya-log), forwarded to the agent's log under target
    /// `proxy_ebpf`. A new level re-attaches the programs (hitlessly, like an upgrade).
    #[arg(long, value_enum, default_value_t = BpfLog::Off)]
    bpf_log: BpfLog,
    /// Record request and TCP metrics (turn off only to measure their cost).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    request_metrics: bool,
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
    /// On SIGTERM: how long requests in flight and busy keep-alive connections may finish
    /// before the agent exits (keep below terminationGracePeriodSeconds).
    #[arg(long, default_value = "30s", value_parser = duration)]
    drain_timeout: Duration,
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
            drain_timeout: a.drain_timeout,
        }
    }
}

fn optional_addr(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    match s {
        "off" | "" => Ok(None),
        a => a
            .parse()
            .map(Some)
            .map_err(|e| format!("{a:?}: {e} (or `off`)")),
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    proxy_agent::istio::duration("", s).map_err(|e| e.message)
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

/// Sets up logging with a filter the admin API can change; `bpf_log` lets the eBPF programs'
/// records through.
fn init_tracing(bpf_log: BpfLog) -> admin::LogControl {
    use tracing_subscriber::prelude::*;
    let mut initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    if bpf_log != BpfLog::Off {
        let level = format!("{bpf_log:?}").to_ascii_lowercase();
        initial.push_str(&format!(",proxy_ebpf={level}"));
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&initial)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    admin::LogControl::new(&initial, move |f| {
        let filter = tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

fn run(args: RunArgs, log: admin::LogControl) -> anyhow::Result<()> {
    let RunArgs {
        manifests,
        kubeconfig,
        node_name,
        cgroup,
        bpffs,
        poll_ms,
        node_ip,
        proxy_port,
        devices,
        socket_lb_hostns_only,
        zone,
        terminate_stale_udp,
        node_port_range,
        proxy_workers,
        limits,
        admin_addr,
        admin_addr_unsafe,
        metrics_addr,
        healthz_addr,
        access_log,
        max_manifest_bytes,
        bpf_log,
        request_metrics,
    } = args;
    admin::server::check_admin_addr(admin_addr, admin_addr_unsafe)?;
    let _ = proxy_agent::source::convert::NODE_PORT_RANGE.set(node_port_range);
    let cgroup = match cgroup {
        Some(c) => c,
        None => cgroup2_root()?,
    };
    match proxy_agent::proxy::limits::raise_fd_limit() {
        Ok(n) => tracing::info!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let workers = proxy_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let telemetry = proxy_agent::proxy::telemetry::Telemetry::new(
        workers,
        proxy_agent::proxy::telemetry::AccessLog::start(&access_log, workers)?,
        request_metrics,
    );
    let (source, source_kind, location) = match manifests {
        Some(dir) => {
            let l = dir.display().to_string();
            (Source::Manifests(dir), "manifests", l)
        }
        None => {
            let l = kubeconfig
                .as_ref()
                .map_or("in-cluster".to_string(), |k| k.display().to_string());
            (Source::Kubernetes(kubeconfig), "kubernetes", l)
        }
    };
    let hub = admin::Hub::new(
        admin::AgentInfo {
            source: source_kind.into(),
            source_location: location,
            node_name: node_name.clone(),
            bpffs: bpffs.clone(),
            cgroup: cgroup.clone(),
            proxy_addr: node_ip.map(|ip| std::net::SocketAddr::from((ip, proxy_port))),
            version: env!("CARGO_PKG_VERSION"),
        },
        proxy_agent::source::Reporter::new(),
        telemetry,
        Some(log),
    );
    // Three planes on their own threads: the admin API and metrics, the agent's work (sources,
    // parsing, map writes), and the proxy's serving; none can delay another.
    let admin_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin runtime")?;
    admin::server::start(
        &hub,
        &admin::server::AdminConfig {
            admin_addr,
            metrics_addr,
            admin_addr_unsafe,
            healthz_addr,
        },
        admin_rt.handle(),
    )?;
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_thread = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            admin_rt.block_on(async {
                let _ = admin_stopped.await;
            });
            admin_rt.shutdown_background();
        })
        .context("starting the admin thread")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("agent")
        .enable_all()
        .build()
        .context("starting the agent runtime")?;
    let proxy_workers = proxy_agent::proxy::workers::Workers::start(workers)?;
    let result = rt.block_on(agent::run(RunConfig {
        source,
        node_name,
        cgroup,
        bpffs,
        poll: Duration::from_millis(poll_ms),
        max_manifest_bytes,
        node_ip,
        proxy_port,
        devices,
        socket_lb_hostns_only,
        zone,
        terminate_stale_udp,
        proxy: limits.into(),
        proxy_workers: proxy_workers.handles().to_vec(),
        hub,
        bpf_log,
    }));
    // The runtimes end here, outside any async context.
    drop(rt);
    proxy_workers.stop();
    let _ = admin_stop.send(());
    let _ = admin_thread.join();
    result
}

/// Parses `LOW-HIGH` (a port range).
fn port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected LOW-HIGH, e.g. 30000-32767"))?;
    let lo: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let hi: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: expected 1 <= LOW <= HIGH"));
    }
    Ok((lo, hi))
}

fn print(v: &serde_json::Value, o: Output, table: fn(&serde_json::Value) -> String) {
    print!(
        "{}",
        admin::render::document(v, o).unwrap_or_else(|| table(v))
    );
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log = match &cli.command {
        Command::Run(args) => Some(init_tracing(args.bpf_log)),
        _ => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .init();
            None
        }
    };
    let client = |c: &ClientArgs| admin::client::Client::new(c.admin_addr);
    match cli.command {
        Command::Run(args) => run(*args, log.context("logging")?),
        Command::Status(c) => {
            print(
                &client(&c).get_json("/status")?,
                c.output,
                admin::render::status,
            );
            Ok(())
        }
        Command::Services(c) => {
            print(
                &client(&c).get_json("/services")?,
                c.output,
                admin::render::services,
            );
            Ok(())
        }
        Command::Service { name, client: c } => {
            let (ns, n) = name.split_once('/').unwrap_or(("default", name.as_str()));
            let v = client(&c).get_json(&format!("/services/{}/{}", encode(ns), encode(n)))?;
            print(&v, c.output, admin::render::service);
            Ok(())
        }
        Command::Routes(c) => {
            print(
                &client(&c).get_json("/routes")?,
                c.output,
                admin::render::routes,
            );
            Ok(())
        }
        Command::Clusters(c) => {
            print(
                &client(&c).get_json("/clusters")?,
                c.output,
                admin::render::clusters,
            );
            Ok(())
        }
        Command::Explain {
            from,
            to,
            udp,
            path,
            headers,
            client: c,
        } => {
            let mut q = format!("/explain?from={from}&to={}", encode(&to.to_string()));
            if udp {
                q.push_str("&protocol=UDP");
            }
            if let Some(p) = path {
                q.push_str(&format!("&path={}", encode(&p)));
            }
            for h in headers {
                q.push_str(&format!("&header={}", encode(&h)));
            }
            print(&client(&c).get_json(&q)?, c.output, admin::render::explain);
            Ok(())
        }
        Command::Monitor {
            types,
            count,
            client: c,
        } => {
            let types = if types.is_empty() {
                "trace,drop,l7".to_string()
            } else {
                types.join(",")
            };
            let mut seen = 0usize;
            let out = std::io::stdout();
            client(&c).stream_lines(&format!("/monitor?types={types}"), |line| {
                use std::io::Write as _;
                let text = match c.output {
                    Output::Json => line.to_string(),
                    _ => serde_json::from_str(line)
                        .map(|v| admin::render::monitor_line(&v))
                        .unwrap_or_else(|_| line.to_string()),
                };
                let mut o = out.lock();
                let _ = writeln!(o, "{text}");
                let _ = o.flush();
                seen += 1;
                count.is_none_or(|n| seen < n)
            })
        }
        Command::Problems(c) => {
            print(
                &client(&c).get_json("/problems")?,
                c.output,
                admin::render::problems,
            );
            Ok(())
        }
        Command::LogLevel { level, client: c } => {
            let v = client(&c).json("POST", &format!("/logging?level={}", encode(&level)))?;
            match admin::render::document(&v, c.output) {
                Some(d) => print!("{d}"),
                None => println!("log filter is now {}", admin::render::text(&v["level"])),
            }
            Ok(())
        }
        #[cfg(feature = "codegen")]
        Command::Crds => {
            print!("{}", proxy_agent::istio::crd_yaml());
            Ok(())
        }
        Command::Dump {
            bpffs,
            admin_addr,
            output,
        } => {
            let maps = datapath::loader::open_pinned_maps(&bpffs)
                .with_context(|| format!("opening the maps pinned under {}", bpffs.display()))?;
            if output == Output::Table {
                print!("{}", datapath::dump(&maps)?);
                return Ok(());
            }
            let names = admin::client::Client::new(admin_addr).get_json("/services");
            if let Err(e) = &names {
                eprintln!("warning: Services are not named: {e}");
            }
            let v = datapath::maps::dump_json(&maps, names.ok().as_ref())?;
            print!(
                "{}",
                admin::render::document(&v, output).unwrap_or_default()
            );
            Ok(())
        }
        Command::BenchSelect { requests, rules } => {
            let (one, many) = proxy_agent::proxy::config::bench_select(requests, rules);
            println!(
                "{}",
                serde_json::json!({"one_rule_ns": one, "many_rules_ns": many, "rules": rules})
            );
            Ok(())
        }
        Command::BenchRecord { requests } => {
            use proxy_agent::proxy::record::bench;
            let (metrics, base) = bench(requests, true, false)?;
            let (off, base_off) = bench(requests, false, false)?;
            let (logged, base_log) = bench(requests, true, true)?;
            let ns = |d: Duration| d.as_nanos() as u64;
            println!(
                "{}",
                serde_json::json!({
                    "metrics_ns": ns(metrics).saturating_sub(ns(base)),
                    "metrics_off_ns": ns(off).saturating_sub(ns(base_off)),
                    "metrics_and_access_log_ns": ns(logged).saturating_sub(ns(base_log)),
                })
            );
            Ok(())
        }
        Command::Cleanup { bpffs, hold } => {
            let n = datapath::cleanup(Path::new(&bpffs))
                .with_context(|| format!("removing the pins under {}", bpffs.display()))?;
            eprintln!("removed {n} pins under {}", bpffs.display());
            if hold {
                // A DaemonSet pod must keep running once its work is done.
                loop {
                    std::thread::park();
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag's default goes through its parser and reads back as the field's type.
    #[test]
    fn run_flags_parse_with_their_defaults() {
        <Cli as clap::CommandFactory>::command().debug_assert();
        let cli = Cli::try_parse_from(["proxy-agent", "run", "--manifests", "/tmp/m"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.healthz_addr, Some("0.0.0.0:10256".parse().unwrap()));
        let cli = Cli::try_parse_from(["proxy-agent", "run", "--healthz-addr", "off"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.healthz_addr, None);
    }
}
