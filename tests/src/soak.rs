//! The soak: steady L4 and L7 load from several pods while EndpointSlices churn every 100 ms
//! (endpoints added, removed, made terminating), the VirtualService and DestinationRule change,
//! and backends fail and recover; it samples the agent's memory, descriptors, threads and map
//! occupancy and checks them against thresholds. `cargo xtask soak --minutes N` runs it at
//! length; the test suite runs one minute of it.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::k8s::{self, Cond};
use crate::node::NODE_IP;
use crate::{Pod, SimNode};

const L7_VIP: &str = "198.19.0.10";
const L4_VIP: &str = "198.19.0.20";
const T: Duration = Duration::from_secs(120);

/// One checked quantity of the soak.
#[derive(Debug, Clone)]
pub struct Row {
    /// What is measured.
    pub what: String,
    /// After the warm-up.
    pub baseline: f64,
    /// At the end.
    pub end: f64,
    /// The limit, as text.
    pub threshold: String,
    /// Whether the limit held.
    pub ok: bool,
}

/// The soak's outcome.
#[derive(Debug, Clone)]
pub struct Report {
    /// Requests answered with a 2xx.
    pub ok: u64,
    /// Requests that failed or got another status.
    pub failed: u64,
    /// Every check.
    pub rows: Vec<Row>,
    /// Changes made: slice rewrites, routing changes, backend failures.
    pub changes: (u64, u64, u64),
}

impl Report {
    /// Whether every threshold held.
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.ok)
    }

    /// The results as a table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let (slices, routing, failures) = self.changes;
        let _ = writeln!(
            s,
            "soak: {slices} EndpointSlice rewrites, {routing} VirtualService/DestinationRule changes, {failures} backend failures; {} requests",
            self.ok + self.failed
        );
        let _ = writeln!(
            s,
            "{:<34} {:>14} {:>14} {:>22} {:>5}",
            "check", "after warm-up", "at end", "threshold", "ok"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<34} {:>14.2} {:>14.2} {:>22} {:>5}",
                r.what,
                r.baseline,
                r.end,
                r.threshold,
                if r.ok { "yes" } else { "NO" }
            );
        }
        s
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rss_kib: f64,
    fds: f64,
    threads: f64,
    revnat: f64,
    affinity: f64,
    services: f64,
    backends: f64,
}

fn count_fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()) as f64
}

fn threads(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn sample(netns: &Path, pid: u32) -> Sample {
    let map = |name: &str| {
        crate::admin::metric(
            netns,
            &format!("proxy_agent_bpf_map_entries{{map=\"{name}\""),
        )
    };
    Sample {
        rss_kib: crate::sys::rss_kib(pid) as f64,
        fds: count_fds(pid),
        threads: threads(pid),
        revnat: map("PXA_REVNAT_V1"),
        affinity: map("PXA_AFFIN_V1"),
        services: map("PXA_SVC_V1"),
        backends: map("PXA_BACKEND_V1"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A tiny deterministic generator (xorshift) for the churn.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Endpoints of `pods`: each ready, terminating or absent, with at least `min_ready` ready.
fn churned(rng: &mut Rng, pods: &[Ipv4Addr], min_ready: usize) -> Vec<(Ipv4Addr, Cond)> {
    let mut eps: Vec<(Ipv4Addr, Option<Cond>)> = pods
        .iter()
        .map(|ip| {
            let c = match rng.below(20) {
                0..=13 => Some(Cond::Ready),
                14..=16 => Some(Cond::Terminating),
                _ => None,
            };
            (*ip, c)
        })
        .collect();
    let mut i = rng.below(pods.len() as u64) as usize;
    while eps.iter().filter(|e| e.1 == Some(Cond::Ready)).count() < min_ready {
        eps[i].1 = Some(Cond::Ready);
        i = (i + 1) % eps.len();
    }
    eps.into_iter()
        .filter_map(|(ip, c)| Some((ip, c?)))
        .collect()
}

fn vs(variant: u64) -> String {
    let attempts = if variant.is_multiple_of(2) { 5 } else { 4 };
    let canary = if variant.is_multiple_of(2) {
        ""
    } else {
        "  - match: [{headers: {x-canary: {exact: 'yes'}}}]\n    route: [{destination: {host: web}}]\n"
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web}}\nspec:\n  hosts: [web]\n  http:\n{canary}  - route: [{{destination: {{host: web}}}}]\n    retries: {{attempts: {attempts}, perTryTimeout: 2s, retryOn: '5xx,reset,connect-failure'}}\n"
    )
}

fn dr(variant: u64) -> String {
    let lb = if variant.is_multiple_of(2) {
        "LEAST_REQUEST"
    } else {
        "ROUND_ROBIN"
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web}}\nspec:\n  host: web\n  trafficPolicy:\n    loadBalancer: {{simple: {lb}}}\n    outlierDetection: {{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 50}}\n"
    )
}

/// Runs the soak for `duration` (warm-up included: a fifth of it, at least 10 s) on a new
/// simulated node with the agent from `crate::sys::bin_dir()`.
pub fn run(duration: Duration) -> Report {
    let mut node = SimNode::new();
    let web: Vec<Pod> = (1..=6).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let tcp: Vec<Pod> = (1..=4).map(|i| node.add_pod(&format!("tcp{i}"))).collect();
    let admin = node.add_pod("admin");
    let clients: Vec<Pod> = (1..=3)
        .map(|i| node.add_pod(&format!("client{i}")))
        .collect();
    let _servers: Vec<_> = web
        .iter()
        .chain(&tcp)
        .map(|p| p.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let web_ips: Vec<Ipv4Addr> = web.iter().map(|p| p.ip).collect();
    let tcp_ips: Vec<Ipv4Addr> = tcp.iter().map(|p| p.ip).collect();
    let all = |ips: &[Ipv4Addr]| ips.iter().map(|ip| (*ip, Cond::Ready)).collect::<Vec<_>>();
    let l7_slice = |eps: &[(Ipv4Addr, Cond)]| {
        k8s::slice("web-1", "web", 8080, "TCP", eps).replace("- name: p\n", "- name: http\n")
    };
    let l4_slice = |eps: &[(Ipv4Addr, Cond)]| k8s::slice("tcp-1", "tcp", 8080, "TCP", eps);
    node.write_manifest(
        "web.yaml",
        &k8s::service("web", L7_VIP, 80, "TCP", "").replace("- name: p\n", "- name: http\n"),
    );
    node.write_manifest("web-slice.yaml", &l7_slice(&all(&web_ips)));
    // ClientIP affinity on the L4 Service: the affinity LRU is exercised too.
    node.write_manifest(
        "tcp.yaml",
        &k8s::service(
            "tcp",
            L4_VIP,
            8080,
            "TCP",
            "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}",
        ),
    );
    node.write_manifest("tcp-slice.yaml", &l4_slice(&all(&tcp_ips)));
    node.write_manifest("vs.yaml", &vs(0));
    node.write_manifest("dr.yaml", &dr(0));
    let node_ip = NODE_IP.to_string();
    let agent = node.start_agent(&["--node-ip", &node_ip]);
    node.wait_l7_routes(1, T);

    let stop = node.dir.join("soak-stop");
    let stop_s = stop.to_str().expect("utf-8 path").to_string();
    let l7_url = format!("http://{L7_VIP}/");
    let l4_url = format!("http://{L4_VIP}:8080/");
    let probes: Vec<_> = [
        (&clients[0], &l7_url, false),
        (&clients[1], &l7_url, false),
        (&clients[2], &l4_url, true),
    ]
    .into_iter()
    .map(|(c, url, fresh)| {
        let mut args = vec![
            "--url",
            url.as_str(),
            "--count",
            "1000000000",
            "--concurrency",
            "3",
            "--timeout-ms",
            "10000",
            "--stop-file",
            &stop_s,
        ];
        if fresh {
            args.push("--new-connection");
        }
        c.spawn_probe("http-probe", &args)
    })
    .collect();

    // Churn on its own thread: slices every 100 ms, routing every 2 s, a failure every 3 s.
    let done = Arc::new(AtomicBool::new(false));
    let churn = {
        let done = done.clone();
        let manifests = node.manifests();
        let admin_ns = admin.place.clone();
        let web_ips = web_ips.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let (mut slices, mut routing, mut failures) = (0u64, 0u64, 0u64);
            let mut failing: Option<(Ipv4Addr, Instant)> = None;
            let t0 = Instant::now();
            let mut tick = 0u64;
            // Switches a webapp pod's error mode, directly to the pod.
            let mode = |ip: Ipv4Addr, m: &str| {
                let url = format!("http://{ip}:8080/{m}");
                admin_ns.run(
                    crate::sys::bin("fixture"),
                    &["http-probe", "--url", &url, "--count", "1"],
                    T,
                );
            };
            let write = |name: &str, body: &str| {
                let tmp = manifests.join(format!(".{name}.tmp"));
                std::fs::write(&tmp, body).expect("write manifest");
                std::fs::rename(&tmp, manifests.join(name)).expect("rename manifest");
            };
            while !done.load(Ordering::Relaxed) {
                tick += 1;
                write("web-slice.yaml", &l7_slice(&churned(&mut rng, &web_ips, 3)));
                write("tcp-slice.yaml", &l4_slice(&churned(&mut rng, &tcp_ips, 2)));
                slices += 2;
                if tick.is_multiple_of(20) {
                    routing += 1;
                    write("vs.yaml", &vs(routing));
                    write("dr.yaml", &dr(routing));
                }
                match failing {
                    Some((ip, since)) if since.elapsed() >= Duration::from_secs(1) => {
                        mode(ip, "ok");
                        failing = None;
                    }
                    None if tick.is_multiple_of(30) => {
                        let ip = web_ips[rng.below(web_ips.len() as u64) as usize];
                        mode(ip, "err");
                        failing = Some((ip, Instant::now()));
                        failures += 1;
                    }
                    _ => {}
                }
                let next = t0 + Duration::from_millis(100 * tick);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            if let Some((ip, _)) = failing {
                mode(ip, "ok");
            }
            (slices, routing, failures)
        })
    };

    let netns = node.netns_path();
    let warm_up = (duration / 5).max(Duration::from_secs(10));
    let t0 = Instant::now();
    let mut samples: Vec<(Duration, Sample)> = Vec::new();
    while t0.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(1));
        samples.push((t0.elapsed(), sample(&netns, agent.pid())));
    }
    done.store(true, Ordering::Relaxed);
    let changes = churn.join().expect("the churn thread panicked");
    std::fs::write(&stop, "").expect("stop file");
    let (mut ok, mut failed) = (0u64, 0u64);
    for p in probes {
        let r = Pod::finish_probe(p, T);
        let good = r["ok"].as_u64().unwrap_or(0);
        let total: u64 = r["status"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0)
            + r["errors"]
                .as_object()
                .map(|m| m.values().filter_map(|v| v.as_u64()).sum::<u64>())
                .unwrap_or(0);
        ok += good;
        failed += total.saturating_sub(good);
    }

    // Baseline: the samples of the window right after the warm-up (a tenth of the run, at
    // least 5); end: the last 5.
    let window = (samples.len() / 10).max(5);
    let after: Vec<Sample> = samples
        .iter()
        .filter(|(t, _)| *t >= warm_up)
        .map(|(_, s)| *s)
        .collect();
    let base = |f: fn(&Sample) -> f64| median(after.iter().take(window).map(f).collect());
    let end = |f: fn(&Sample) -> f64| median(after.iter().rev().take(5).map(f).collect());
    let max_end =
        |f: fn(&Sample) -> f64| after.iter().rev().take(window).map(f).fold(0.0, f64::max);
    let success = ok as f64 / (ok + failed).max(1) as f64 * 100.0;
    let mut rows = vec![Row {
        what: "success % (retries on)".into(),
        baseline: success,
        end: success,
        threshold: ">= 99.99".into(),
        ok: success >= 99.99 && ok > 0,
    }];
    let growth = |what: &str, f: fn(&Sample) -> f64, limit_pct: f64, slack: f64| {
        let (b, e) = (base(f), end(f));
        Row {
            what: what.into(),
            baseline: b,
            end: e,
            threshold: format!(
                "<= +{limit_pct}%{}",
                if slack > 0.0 {
                    format!(" (+{slack})")
                } else {
                    String::new()
                }
            ),
            ok: e <= b * (1.0 + limit_pct / 100.0) + slack,
        }
    };
    rows.push(growth("agent RSS (KiB)", |s| s.rss_kib, 5.0, 0.0));
    rows.push(growth("agent open descriptors", |s| s.fds, 10.0, 16.0));
    rows.push(growth("agent threads", |s| s.threads, 0.0, 2.0));
    rows.push(growth("PXA_SVC_V1 entries", |s| s.services, 0.0, 12.0));
    rows.push(growth("PXA_BACKEND_V1 entries", |s| s.backends, 0.0, 10.0));
    let capacity = |name: &str| {
        crate::admin::metric(
            &netns,
            &format!("proxy_agent_bpf_map_capacity{{map=\"{name}\""),
        )
    };
    for (what, f, map) in [
        (
            "PXA_REVNAT_V1 entries (LRU)",
            (|s: &Sample| s.revnat) as fn(&Sample) -> f64,
            "PXA_REVNAT_V1",
        ),
        (
            "PXA_AFFIN_V1 entries (LRU)",
            |s: &Sample| s.affinity,
            "PXA_AFFIN_V1",
        ),
    ] {
        let cap = capacity(map);
        let (b, e) = (base(f), max_end(f));
        rows.push(Row {
            what: what.into(),
            baseline: b,
            end: e,
            threshold: format!("<= +20% (+64), < {cap}"),
            ok: e <= b * 1.2 + 64.0 && e < cap,
        });
    }
    drop(agent);
    Report {
        ok,
        failed,
        rows,
        changes,
    }
}
