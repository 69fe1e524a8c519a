//! `cargo xtask bench l4`: short-connection connects/s and connect latency from a pod, directly to a
//! pod IP, through our ClusterIP datapath, and through kube-proxy-shaped iptables DNAT rules, with
//! 10, 1,000 and 10,000 Services present; ratios against direct measured in the same run. The
//! north-south rows (a client outside the cluster to a NodePort) are [`crate::nsbench`].

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use tests::k8s::{self, Cond};
use tests::{Pod, SimNode};

const SIZES: [u32; 3] = [10, 1_000, 10_000];
/// Sequential connects per round.
pub const CONNECTS: &str = "10000";
const ROUNDS: usize = 5;
const T: Duration = Duration::from_secs(300);

/// The ClusterIP of Service number `i` (0 is the measured one).
pub fn vip(i: u32) -> String {
    format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250)
}

/// `n` Services with 10 endpoints each; Service `target` is the measured one, backed by `real`.
fn manifests(n: u32, target: u32, real: &[Ipv4Addr]) -> String {
    let mut y = String::new();
    for i in 0..n {
        let name = format!("s{i}");
        let eps: Vec<_> = if i == target {
            real.iter().map(|a| (*a, Cond::Ready)).collect()
        } else {
            (1..=10u8)
                .map(|j| (Ipv4Addr::new(198, 18, 200, j), Cond::Ready))
                .collect()
        };
        let port = if i == target {
            8080
        } else {
            10_000 + (i % 50_000) as u16
        };
        let _ = write!(
            y,
            "{}---\n{}---\n",
            k8s::service(&name, &vip(i), 80, "TCP", ""),
            k8s::slice(&format!("{name}-1"), &name, port, "TCP", &eps)
        );
    }
    y
}

/// kube-proxy's iptables mode for the same Services: KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*
/// with `-m statistic --mode random`, in the nat OUTPUT path of the client.
fn iptables_rules(n: u32, target: u32, real: &[Ipv4Addr]) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut chains = String::new();
    let mut rules = String::from("-A OUTPUT -j KUBE-SERVICES\n");
    for i in 0..n {
        let eps: Vec<(Ipv4Addr, u16)> = if i == target {
            real.iter().map(|a| (*a, 8080)).collect()
        } else {
            (1..=10u8)
                .map(|j| (Ipv4Addr::new(198, 18, 200, j), 10_000 + (i % 50_000) as u16))
                .collect()
        };
        let _ = writeln!(chains, ":KUBE-SVC-{i} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}",
            vip(i)
        );
        for (k, (addr, port)) in eps.iter().enumerate() {
            let _ = writeln!(chains, ":KUBE-SEP-{i}-{k} - [0:0]");
            let left = eps.len() - k;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A KUBE-SVC-{i} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i}-{k}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(rules, "-A KUBE-SVC-{i} -j KUBE-SEP-{i}-{k}");
            }
            let _ = writeln!(
                rules,
                "-A KUBE-SEP-{i}-{k} -p tcp -m tcp -j DNAT --to-destination {addr}:{port}"
            );
        }
    }
    r.push_str(&chains);
    r.push_str(&rules);
    r.push_str("COMMIT\n");
    r
}

/// Loads iptables rules into a pod's network namespace with iptables-restore.
pub fn iptables_restore(pod: &Pod, rules: &str) -> Result<()> {
    iptables_restore_in(&pod.place.netns, rules)
}

/// Loads iptables rules into the network namespace at `netns` with iptables-restore.
pub fn iptables_restore_in(netns: &std::path::Path, rules: &str) -> Result<()> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running iptables-restore (install iptables)")?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, rules.as_bytes())?;
    drop(child.stdin.take());
    ensure!(child.wait()?.success(), "iptables-restore failed");
    Ok(())
}

/// One round of short connections: rate, connect latency percentiles, failures.
#[derive(Clone, Copy, Default)]
pub struct Sample {
    /// Connects per second.
    pub rate: f64,
    /// Median connect latency, microseconds.
    pub p50: f64,
    /// 99th percentile connect latency, microseconds.
    pub p99: f64,
    /// Connects that failed.
    pub failed: u64,
}

/// `CONNECTS` sequential connects (+ read + close) from `client` to the `--to` arguments.
pub fn measure(client: &Pod, to: &[String]) -> Result<Sample> {
    let mut args: Vec<&str> = to.iter().map(String::as_str).collect();
    args.extend(["--count", CONNECTS, "--read"]);
    let out: Value = client.probe("tcp-probe", &args, T);
    let n: f64 = CONNECTS.parse()?;
    let ok = out["ok"].as_f64().context("ok")?;
    ensure!(ok > 0.0, "no connect succeeded towards {to:?}: {out}");
    let ms = out["elapsed_ms"].as_f64().context("elapsed_ms")?;
    Ok(Sample {
        failed: (n - ok) as u64,
        rate: ok / (ms / 1000.0),
        p50: out["connect_us"]["p50"].as_f64().unwrap_or(0.0),
        p99: out["connect_us"]["p99"].as_f64().unwrap_or(0.0),
    })
}

/// The round with the median rate, with the median latencies and the failures of all rounds.
pub fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let mut s = v[v.len() / 2];
    let mut p50: Vec<f64> = v.iter().map(|s| s.p50).collect();
    let mut p99: Vec<f64> = v.iter().map(|s| s.p99).collect();
    p50.sort_by(f64::total_cmp);
    p99.sort_by(f64::total_cmp);
    s.p50 = p50[p50.len() / 2];
    s.p99 = p99[p99.len() / 2];
    s.failed = v.iter().map(|s| s.failed).sum();
    s
}

/// A node with 3 backends (web1..3), a `direct` pod (the baseline target, no backend of the
/// Service), a client and `n` Services in its manifests.
struct BenchNode {
    _procs: Vec<tests::Proc>,
    node: SimNode,
    client: Pod,
    real: Vec<Ipv4Addr>,
    /// `--to` arguments of the direct baseline: three pods that are no backend of the Service.
    direct_to: Vec<String>,
    vip_to: Vec<String>,
}

fn bench_node(n: u32) -> BenchNode {
    let mut node = SimNode::new();
    let webs: Vec<Pod> = (1..=3).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let direct: Vec<Pod> = (1..=3)
        .map(|i| node.add_pod(&format!("direct{i}")))
        .collect();
    let client = node.add_pod("client");
    let procs: Vec<_> = webs
        .iter()
        .chain(&direct)
        .map(|p| p.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let real: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    // The measured Service sits in the middle of the list (kube-proxy's chain is linear).
    node.write_manifest("svc.yaml", &manifests(n, n / 2, &real));
    BenchNode {
        _procs: procs,
        node,
        client,
        real,
        direct_to: direct
            .iter()
            .flat_map(|p| ["--to".to_string(), format!("{}:8080", p.ip)])
            .collect(),
        vip_to: vec!["--to".to_string(), format!("{}:80", vip(n / 2))],
    }
}

struct Row {
    n: u32,
    direct_a: Sample,
    ebpf: Sample,
    direct_b: Sample,
    iptables: Sample,
    load: Duration,
    rss_kib: u64,
    iptables_load: Duration,
}

/// Runs the L4 benchmark and prints its table.
///
/// Each mode gets a fresh node: TIME_WAIT sockets left on the backends by one mode would make
/// the other mode's SYNs fail the PAWS check (NAT changes the TCP timestamp offset, socket-level
/// translation does not), which would measure history rather than the datapath. The direct
/// baseline goes to a pod that is no backend of the Service, for the same reason.
pub fn l4() -> Result<()> {
    let mut rows = Vec::new();
    for n in SIZES {
        eprintln!("bench l4: {n} Services, eBPF datapath");
        let b = bench_node(n);
        let started = Instant::now();
        let agent = b.node.start_agent(&["--max-manifest-bytes", "268435456"]);
        b.node
            .wait_status(&format!("{n} frontends"), T, |s| s["frontends"] == n);
        let load = started.elapsed();
        let rss_kib = tests::sys::rss_kib(agent.pid());
        let (mut d, mut c) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            d.push(measure(&b.client, &b.direct_to)?);
            c.push(measure(&b.client, &b.vip_to)?);
        }
        drop(agent);
        drop(b);

        eprintln!("bench l4: {n} Services, kube-proxy-shaped iptables");
        let b = bench_node(n);
        let t = Instant::now();
        iptables_restore(&b.client, &iptables_rules(n, n / 2, &b.real))?;
        let iptables_load = t.elapsed();
        let (mut d2, mut ipt) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            d2.push(measure(&b.client, &b.direct_to)?);
            ipt.push(measure(&b.client, &b.vip_to)?);
        }
        drop(b);
        rows.push(Row {
            n,
            direct_a: median(d),
            ebpf: median(c),
            direct_b: median(d2),
            iptables: median(ipt),
            load,
            rss_kib,
            iptables_load,
        });
    }

    println!(
        "\nL4 short connections from a pod (connect + read + close), {CONNECTS} sequential connects x {ROUNDS} rounds, medians;\n\
         direct = a random one of 3 pod IPs per connect (3 pods that are no backend of the Service)"
    );
    println!(
        "{:>8}  {:<22} {:>11} {:>8} {:>8} {:>9} {:>7}",
        "services", "path", "connects/s", "p50 us", "p99 us", "vs direct", "failed"
    );
    println!(
        "(vs direct = against the direct run on the node without iptables rules; the last row shows"
    );
    println!(
        " that kube-proxy's rules slow every new connection of the pod, not only those to Services)"
    );
    for r in &rows {
        let d = &r.direct_a;
        for (name, s) in [
            ("direct to pod IP", &r.direct_a),
            ("ClusterIP, our eBPF", &r.ebpf),
            ("ClusterIP, iptables", &r.iptables),
            ("direct, iptables rules", &r.direct_b),
        ] {
            println!(
                "{:>8}  {:<22} {:>11.0} {:>8.0} {:>8.0} {:>8.2}x {:>7}",
                r.n,
                name,
                s.rate,
                s.p50,
                s.p99,
                s.rate / d.rate,
                s.failed
            );
        }
    }
    println!(
        "\n{:>8}  {:>18} {:>14} {:>22}",
        "services", "agent load time", "agent RSS", "iptables-restore time"
    );
    for r in &rows {
        println!(
            "{:>8}  {:>17.2}s {:>10} MiB {:>21.2}s",
            r.n,
            r.load.as_secs_f64(),
            r.rss_kib / 1024,
            r.iptables_load.as_secs_f64()
        );
    }
    crate::nsbench::run()
}

/// Dispatches `cargo xtask bench NAME`.
pub fn run(name: &str) -> Result<()> {
    match name {
        "l4" => l4(),
        "l4-ns" => crate::nsbench::run(),
        "seed" => crate::seed::compare(),
        "l7" => crate::l7bench::run(),
        "sync" => crate::syncbench::run(),
        other => bail!(
            "unknown benchmark {other:?}; available: l4 (l4-ns: only its north-south rows), l7, seed, sync"
        ),
    }
}
