//! The seed experiment of mission.md: `ab -c 50 -n 20000` against a two-pod `webapp` Service,
//! one pod switched into error mode a third of the way, through our node proxy and through
//! kube-proxy-shaped iptables DNAT (the failing endpoint removed 1.5 s after the switch, as a
//! readiness probe every second and the propagation after it would).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use tests::k8s;
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(300);
const REQUESTS: usize = 20_000;
const POLICY: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: webapp}\nspec:\n  hosts: [webapp]\n  http:\n  - route: [{destination: {host: webapp}}]\n    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: webapp}\nspec:\n  host: webapp\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}\n";

/// What `ab` reported.
#[derive(Debug, Clone, Default)]
pub struct AbResult {
    /// Completed requests.
    pub complete: u64,
    /// Failed requests (connect, receive, length, exceptions).
    pub failed: u64,
    /// Non-2xx responses.
    pub non_2xx: u64,
    /// Requests per second.
    pub rps: f64,
    /// 99th percentile time, ms.
    pub p99_ms: f64,
}

fn parse_ab(out: &str) -> Result<AbResult> {
    let num = |prefix: &str| -> Option<f64> {
        out.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| {
                l[l.find(prefix)? + prefix.len()..]
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
    };
    Ok(AbResult {
        complete: num("Complete requests:").context("ab printed no `Complete requests`")? as u64,
        failed: num("Failed requests:").unwrap_or(0.0) as u64,
        non_2xx: num("Non-2xx responses:").unwrap_or(0.0) as u64,
        rps: num("Requests per second:").unwrap_or(0.0),
        p99_ms: num("99%").unwrap_or(0.0),
    })
}

struct Setup {
    servers: Vec<Proc>,
    pods: Vec<Pod>,
    client: Pod,
    admin: Pod,
    node: SimNode,
}

fn setup() -> Setup {
    let mut node = SimNode::new();
    let pods: Vec<Pod> = (1..=2)
        .map(|i| node.add_pod(&format!("webapp{i}")))
        .collect();
    let client = node.add_pod("client");
    let admin = node.add_pod("admin");
    let servers = pods
        .iter()
        .map(|p| p.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]))
        .collect();
    Setup {
        servers,
        pods,
        client,
        admin,
        node,
    }
}

/// Runs ab; `at_third` runs once a third of the requests were served.
fn run_ab(s: &Setup, mut at_third: impl FnMut()) -> Result<AbResult> {
    let n = REQUESTS.to_string();
    let cmd = s
        .client
        .place
        .command("ab", &["-c", "50", "-n", &n, "http://198.19.0.10/"]);
    let mut ab = Proc::spawn("ab", cmd, s.client.place.logs.join("ab.log"));
    let served = || {
        s.servers
            .iter()
            .map(|p| p.log_text().matches(" GET / ").count())
            .sum::<usize>()
    };
    tests::sys::poll("ab to be a third of the way", T, || {
        (served() >= REQUESTS / 3).then_some(())
    });
    let url = format!("http://{}:8080/err", s.pods[0].ip);
    let out = s
        .admin
        .probe("http-probe", &["--url", &url, "--count", "1"], T);
    ensure!(
        out["ok"] == 1,
        "switching {} into error mode failed: {out}",
        s.pods[0].name
    );
    at_third();
    ensure!(ab.wait_exit(T).success(), "ab failed: {}", ab.log_text());
    parse_ab(&ab.stdout_lines().join("\n"))
}

/// Through the node proxy with the Istio policy an operator would write.
pub fn ours() -> Result<AbResult> {
    let s = setup();
    let ips: Vec<Ipv4Addr> = s.pods.iter().map(|p| p.ip).collect();
    s.node.write_manifest(
        "webapp.yaml",
        &k8s::http_service("webapp", "198.19.0.10", 80, 8080, &ips),
    );
    s.node.write_manifest("policy.yaml", POLICY);
    let mut agent = s.node.start_agent(&["--node-ip", "198.18.0.1"]);
    agent.wait_log_count("l7_routes=1", 1, T);
    run_ab(&s, || {})
}

fn dnat_rules(endpoints: &[Ipv4Addr]) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-WEBAPP - [0:0]\n");
    for i in 0..endpoints.len() {
        let _ = writeln!(r, ":KUBE-SEP-{i} - [0:0]");
    }
    r.push_str("-A OUTPUT -j KUBE-SERVICES\n-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-WEBAPP\n");
    for (i, ip) in endpoints.iter().enumerate() {
        let left = endpoints.len() - i;
        if left > 1 {
            let _ = writeln!(
                r,
                "-A KUBE-SVC-WEBAPP -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i}",
                1.0 / left as f64
            );
        } else {
            let _ = writeln!(r, "-A KUBE-SVC-WEBAPP -j KUBE-SEP-{i}");
        }
        let _ = writeln!(
            r,
            "-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {ip}:8080"
        );
    }
    r.push_str("COMMIT\n");
    r
}

fn restore(pod: &Pod, rules: &str) -> Result<()> {
    let mut child = std::process::Command::new("nsenter")
        .arg(format!("--net={}", pod.place.netns.display()))
        .arg("iptables-restore")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, rules.as_bytes())?;
    drop(child.stdin.take());
    ensure!(child.wait()?.success(), "iptables-restore failed");
    Ok(())
}

/// Through kube-proxy-shaped iptables DNAT in the client's network namespace.
pub fn iptables() -> Result<AbResult> {
    let s = setup();
    let ips: Vec<Ipv4Addr> = s.pods.iter().map(|p| p.ip).collect();
    restore(&s.client, &dnat_rules(&ips))?;
    let mut removal: Result<()> = Ok(());
    let r = run_ab(&s, || {
        // The readiness probe notices after up to a second; kube-proxy then rewrites the rules.
        let switched = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        removal = restore(&s.client, &dnat_rules(&ips[1..]));
        eprintln!(
            "seed: failing endpoint removed {:?} after the switch",
            switched.elapsed()
        );
    })?;
    removal?;
    Ok(r)
}

/// Runs both and prints them side by side.
pub fn compare() -> Result<()> {
    eprintln!("seed: through our node proxy");
    let a = ours()?;
    eprintln!("seed: through kube-proxy-shaped iptables DNAT");
    let b = iptables()?;
    println!(
        "\nSeed experiment: ab -c 50 -n {REQUESTS} against webapp (2 pods), one pod answers 500 from a third of the way"
    );
    println!(
        "{:<40} {:>9} {:>7} {:>8} {:>9} {:>8}",
        "path", "complete", "failed", "non-2xx", "req/s", "p99 ms"
    );
    for (name, r) in [
        ("node proxy (retries 5xx, outlier det.)", &a),
        ("iptables DNAT, endpoint removed +1.5 s", &b),
    ] {
        println!(
            "{:<40} {:>9} {:>7} {:>8} {:>9.0} {:>8.0}",
            name, r.complete, r.failed, r.non_2xx, r.rps, r.p99_ms
        );
    }
    println!("(mission.md: kube-proxy gave 3719 failed of 20000 in the original experiment)");
    Ok(())
}

#[cfg(test)]
mod ab_parsing {
    #[test]
    fn parses_ab_output() {
        let out = "Complete requests:      20000\nFailed requests:        4\n   (Connect: 0, Receive: 0, Length: 4, Exceptions: 0)\nNon-2xx responses:      4\nRequests per second:    5123.45 [#/sec] (mean)\n  99%     31\n";
        let r = super::parse_ab(out).unwrap();
        assert_eq!((r.complete, r.failed, r.non_2xx), (20000, 4, 4));
        assert!((r.rps - 5123.45).abs() < 1e-6 && r.p99_ms == 31.0);
    }
}
