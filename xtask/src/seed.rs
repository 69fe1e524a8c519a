//! The seed experiment of mission.md: `ab -c 50 -n 20000` against a two-pod `webapp` Service,
//! one pod switched into error mode a third of the way, through our node proxy and through
//! kube-proxy-shaped iptables DNAT (the failing endpoint removed 1.5 s after the switch, as a
//! readiness probe every second and the propagation after it would).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use tests::k8s;
use tests::scenarios::{self, AbResult, SEED_REQUESTS};
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(300);

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

fn run_ab(s: &Setup, at_third: impl FnOnce()) -> Result<AbResult> {
    Ok(scenarios::seed_ab(
        &s.client, &s.admin, &s.servers, &s.pods[0], at_third,
    ))
}

/// Through the node proxy with the Istio policy an operator would write.
pub fn ours() -> Result<AbResult> {
    let s = setup();
    let ips: Vec<Ipv4Addr> = s.pods.iter().map(|p| p.ip).collect();
    s.node.write_manifest(
        "webapp.yaml",
        &k8s::http_service("webapp", "198.19.0.10", 80, 8080, &ips),
    );
    s.node
        .write_manifest("policy.yaml", &scenarios::seed_policy("webapp"));
    let _agent = s.node.start_agent(&["--node-ip", "198.18.0.1"]);
    s.node.wait_l7_routes(1, T);
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

/// Through kube-proxy-shaped iptables DNAT in the client's network namespace.
pub fn iptables() -> Result<AbResult> {
    let s = setup();
    let ips: Vec<Ipv4Addr> = s.pods.iter().map(|p| p.ip).collect();
    crate::bench::iptables_restore(&s.client, &dnat_rules(&ips))?;
    let mut removal: Result<()> = Ok(());
    let r = run_ab(&s, || {
        // The readiness probe notices after up to a second; kube-proxy then rewrites the rules.
        let switched = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        removal = crate::bench::iptables_restore(&s.client, &dnat_rules(&ips[1..]));
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
        "\nSeed experiment: ab -c 50 -n {SEED_REQUESTS} against webapp (2 pods), one pod answers 500 from a third of the way"
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
