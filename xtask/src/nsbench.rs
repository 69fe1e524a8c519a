//! The north-south rows of `cargo xtask bench l4`: short connections from a client outside the
//! cluster to a NodePort on the node's underlay address, through our tc programs and through
//! kube-proxy's iptables rules for the same Services (PREROUTING → KUBE-SERVICES, then
//! KUBE-NODEPORTS → KUBE-EXT → KUBE-SVC → KUBE-SEP DNAT, with masquerade), against a direct
//! baseline to pod IPs routed through the same node, with 10 and 10,000 Services.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use tests::cluster::underlay_ip;
use tests::k8s::{self, Cond};
use tests::{Pod, Proc, SimCluster};

use crate::bench::{CONNECTS, iptables_restore_in, measure, median, vip};

const SIZES: [u32; 2] = [10, 10_000];

/// The sizes to run: [`SIZES`], or `PXT_NS_SIZES=10,1000` for a quicker look.
fn sizes() -> Vec<u32> {
    std::env::var("PXT_NS_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<u32>| !v.is_empty())
        .unwrap_or_else(|| SIZES.to_vec())
}

/// nf_conntrack's per-CPU statistics in a network namespace, summed (insert_failed, drop,
/// early_drop, search_restart...), from /proc/net/stat/nf_conntrack.
fn conntrack_stats(netns: &Path) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["cat", "/proc/net/stat/nf_conntrack"])
        .output();
    let Ok(out) = out else { return "-".into() };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return "-".into();
    };
    let names: Vec<&str> = header.split_whitespace().collect();
    let mut sums = vec![0u64; names.len()];
    for l in lines {
        for (i, v) in l.split_whitespace().enumerate() {
            if let (Some(s), Ok(v)) = (sums.get_mut(i), u64::from_str_radix(v, 16)) {
                *s += v;
            }
        }
    }
    names
        .iter()
        .zip(&sums)
        .filter(|(n, v)| {
            **v > 0
                && !matches!(
                    **n,
                    "entries" | "searched" | "found" | "new" | "delete" | "ignore" | "invalid"
                )
        })
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

const ROUNDS: usize = 5;
const T: Duration = Duration::from_secs(300);
/// NodePorts available in Kubernetes' default range.
const MAX_NODE_PORTS: u32 = 2_700;

/// Services with NodePorts: the first `min(n, 2700)` of the `n`.
fn node_ports(n: u32) -> u32 {
    n.min(MAX_NODE_PORTS)
}

/// The measured Service: the middle NodePort one (kube-proxy's chains are linear).
fn target(n: u32) -> u32 {
    node_ports(n) / 2
}

fn manifests(n: u32, real: &[Ipv4Addr]) -> String {
    let mut y = String::new();
    for i in 0..n {
        let name = format!("s{i}");
        let (eps, port): (Vec<_>, u16) = if i == target(n) {
            (real.iter().map(|a| (*a, Cond::Ready)).collect(), 8080)
        } else {
            (
                (1..=10u8)
                    .map(|j| (Ipv4Addr::new(198, 18, 200, j), Cond::Ready))
                    .collect(),
                10_000 + (i % 50_000) as u16,
            )
        };
        let (ty, np) = if i < node_ports(n) {
            ("NodePort", format!(", nodePort: {}", 30_000 + i))
        } else {
            ("ClusterIP", String::new())
        };
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: {ty}\n  clusterIP: {}\n  ports: [{{name: p, port: 80, protocol: TCP{np}}}]\n---\n{}---\n",
            vip(i),
            k8s::slice(&format!("{name}-1"), &name, port, "TCP", &eps)
        );
    }
    y
}

/// kube-proxy's iptables mode (v1.32) for the same Services, in the node's nat table.
fn iptables_rules(n: u32, real: &[Ipv4Addr]) -> String {
    let mut chains = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    for i in 0..n {
        let eps: Vec<(Ipv4Addr, u16)> = if i == target(n) {
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
        if i < node_ports(n) {
            let _ = writeln!(chains, ":KUBE-EXT-{i} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -p tcp -m tcp --dport {} -j KUBE-EXT-{i}",
                30_000 + i
            );
            let _ = writeln!(rules, "-A KUBE-EXT-{i} -j KUBE-MARK-MASQ");
            let _ = writeln!(rules, "-A KUBE-EXT-{i} -j KUBE-SVC-{i}");
        }
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
            let _ = writeln!(rules, "-A KUBE-SEP-{i}-{k} -s {addr}/32 -j KUBE-MARK-MASQ");
            let _ = writeln!(
                rules,
                "-A KUBE-SEP-{i}-{k} -p tcp -m tcp -j DNAT --to-destination {addr}:{port}"
            );
        }
    }
    // kube-proxy's last KUBE-SERVICES rule: NodePorts on local addresses.
    rules.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    chains.push_str(&rules);
    chains.push_str("COMMIT\n");
    chains
}

/// One node on the underlay with 3 backends and 3 direct pods, the external client routed to
/// the pod subnet through the node (for the direct baseline), `n` Services in the manifests.
struct Bench {
    c: SimCluster,
    _procs: Vec<Proc>,
    real: Vec<Ipv4Addr>,
    direct_to: Vec<String>,
    node_port_to: Vec<String>,
}

fn bench_cluster(n: u32) -> Bench {
    let mut c = SimCluster::new(1);
    let webs: Vec<Pod> = (1..=3)
        .map(|i| c.node_mut(1).add_pod(&format!("web{i}")))
        .collect();
    let direct: Vec<Pod> = (1..=3)
        .map(|i| c.node_mut(1).add_pod(&format!("direct{i}")))
        .collect();
    let procs = webs
        .iter()
        .chain(&direct)
        .map(|p| p.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]))
        .collect();
    c.route_external("198.18.1.0/24", 1);
    let real: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    c.write_manifest("svc.yaml", &manifests(n, &real));
    Bench {
        direct_to: direct
            .iter()
            .flat_map(|p| ["--to".to_string(), format!("{}:8080", p.ip)])
            .collect(),
        node_port_to: vec![
            "--to".into(),
            format!("{}:{}", underlay_ip(1), 30_000 + target(n)),
        ],
        c,
        _procs: procs,
        real,
    }
}

struct Row {
    n: u32,
    direct_a: crate::bench::Sample,
    ebpf: crate::bench::Sample,
    direct_b: crate::bench::Sample,
    iptables: crate::bench::Sample,
    ct_entries: u64,
    ct_capacity: u64,
    /// nf_conntrack's counters in the iptables run.
    ct_stats: String,
}

/// Measures and prints the north-south table.
pub fn run() -> Result<()> {
    let mut rows = Vec::new();
    for n in sizes() {
        eprintln!("bench l4 north-south: {n} Services, eBPF tc datapath");
        let b = bench_cluster(n);
        let node = b.c.node(1);
        let agent = node.start_agent(&[
            "--max-manifest-bytes",
            "268435456",
            "--node-name",
            "node1",
            "--devices",
            "ul0",
        ]);
        let frontends = n + node_ports(n);
        node.wait_status(&format!("{frontends} frontends"), T, |s| {
            s["frontends"] == frontends
        });
        let (mut d, mut e) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            d.push(measure(&b.c.external, &b.direct_to)?);
            e.push(measure(&b.c.external, &b.node_port_to)?);
        }
        let ct = node.status()["maps"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "PXA_CT4_V1").cloned())
            .unwrap_or(Value::Null);
        drop(agent);
        drop(b);

        eprintln!("bench l4 north-south: {n} Services, kube-proxy iptables NodePort rules");
        let b = bench_cluster(n);
        iptables_restore_in(&b.c.node(1).netns_path(), &iptables_rules(n, &b.real))?;
        let (mut d2, mut ipt) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            d2.push(measure(&b.c.external, &b.direct_to)?);
            ipt.push(measure(&b.c.external, &b.node_port_to)?);
        }
        let ct_stats = conntrack_stats(&b.c.node(1).netns_path());
        drop(b);
        rows.push(Row {
            n,
            direct_a: median(d),
            ebpf: median(e),
            direct_b: median(d2),
            iptables: median(ipt),
            ct_stats,
            ct_entries: ct["entries"].as_u64().unwrap_or(0),
            ct_capacity: ct["capacity"].as_u64().unwrap_or(0),
        });
    }
    println!(
        "\nL4 north-south: short connections from a client outside the cluster to a NodePort on the node's IP\n\
         (connect + read + close), {CONNECTS} sequential connects x {ROUNDS} rounds, medians; backends on the node;\n\
         direct = a random one of 3 pod IPs per connect, routed through the same node; NodePorts: up to {MAX_NODE_PORTS} of the Services"
    );
    println!(
        "{:>8}  {:<26} {:>11} {:>8} {:>8} {:>9} {:>10} {:>7}",
        "services", "path", "connects/s", "p50 us", "p99 us", "vs direct", "vs iptables", "failed"
    );
    for r in &rows {
        for (name, s) in [
            ("direct to pod IP", &r.direct_a),
            ("NodePort, our eBPF (tc)", &r.ebpf),
            ("direct, iptables rules", &r.direct_b),
            ("NodePort, iptables", &r.iptables),
        ] {
            let base = if std::ptr::eq(s, &r.direct_b) || std::ptr::eq(s, &r.iptables) {
                &r.direct_b
            } else {
                &r.direct_a
            };
            println!(
                "{:>8}  {:<26} {:>11.0} {:>8.0} {:>8.0} {:>8.2}x {:>9.2}x {:>7}",
                r.n,
                name,
                s.rate,
                s.p50,
                s.p99,
                s.rate / base.rate,
                s.rate / r.iptables.rate,
                s.failed
            );
        }
    }
    for r in &rows {
        println!(
            "nf_conntrack in the iptables run, {} Services: {}",
            r.n,
            if r.ct_stats.is_empty() {
                "no failures"
            } else {
                &r.ct_stats
            }
        );
    }
    println!(
        "\nconnection tracking (PXA_CT4_V1, LRU) after the eBPF runs: {}",
        rows.iter()
            .map(|r| format!(
                "{} Services: {} of {} entries ({} B each: 16 key + 32 value)",
                r.n, r.ct_entries, r.ct_capacity, 48
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}
