//! HTTP/2 abuse against the node proxy: rapid reset (CVE-2023-44487), a CONTINUATION flood,
//! PING and SETTINGS floods, 10k idle connections from one pod. For each: the abusive
//! connection gets GOAWAY (or is closed), the proxy stays under one core and +50 MB, and a
//! second pod's requests keep a p99 under 50 ms. Needs root.
//!
//! The cases measure CPU and latency, so they run one at a time.

use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::k8s;
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(180);
const VIP: &str = "198.19.0.10";
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Usage {
    cpu_s: f64,
    rss_kib: u64,
    at: Instant,
}

fn usage(pid: u32) -> Usage {
    Usage {
        cpu_s: tests::sys::cpu_seconds(pid),
        rss_kib: tests::sys::rss_kib(pid),
        at: Instant::now(),
    }
}

/// Runs `attack` from one pod while another pod sends requests; checks the verdicts.
fn under_attack(attack: &[&str], check: impl FnOnce(&Value)) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut node = SimNode::new();
    let pods: Vec<Pod> = (1..=2)
        .map(|i| node.add_pod(&format!("webapp{i}")))
        .collect();
    let attacker = node.add_pod("attacker");
    let victim = node.add_pod("victim");
    let _servers: Vec<Proc> = pods
        .iter()
        .map(|p| p.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    node.write_manifest("svc.yaml", &k8s::http_service("svc", VIP, 80, 8080, &ips));
    let agent = node.start_agent(&["--node-ip", "198.18.0.1"]);
    node.wait_l7_routes(1, T);
    let url = format!("http://{VIP}/");
    let warm = victim.probe("http-probe", &["--url", &url, "--count", "200"], T);
    assert_eq!(warm["ok"], 200, "{warm}");
    let before = usage(agent.pid());
    let mut args = vec!["--to", "198.19.0.10:80"];
    args.extend_from_slice(attack);
    let probe = attacker.spawn_probe("h2-abuse", &args);
    // The proxy's peak RSS while the attack runs, sampled every 50 ms.
    let pid = agent.pid();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(usage(pid).rss_kib);
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    // The victim's requests run while the attack does (new connections, like a fresh client).
    let seen = victim.probe(
        "http-probe",
        &[
            "--url",
            &url,
            "--count",
            "1500",
            "--concurrency",
            "2",
            "--new-connection",
            "--timeout-ms",
            "2000",
        ],
        T,
    );
    let report = Pod::finish_probe(probe, T);
    let after = usage(agent.pid());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler").max(after.rss_kib);
    let cores = (after.cpu_s - before.cpu_s) / after.at.duration_since(before.at).as_secs_f64();
    let grown_mb = peak.saturating_sub(before.rss_kib) as f64 / 1024.0;
    eprintln!("attack {attack:?}: {report}\nvictim: {seen}\ncores {cores:.2}, +{grown_mb:.1} MB");
    assert_eq!(
        seen["ok"], 1500,
        "the other pod's requests failed during the attack: {seen}"
    );
    let p99 = seen["latency_ms"]["p99"].as_f64().unwrap();
    assert!(
        p99 < 50.0,
        "the other pod's p99 was {p99} ms during the attack"
    );
    assert!(
        cores < 1.0,
        "the proxy used {cores:.2} cores during the attack"
    );
    assert!(
        grown_mb < 50.0,
        "the proxy grew by {grown_mb:.1} MB during the attack"
    );
    check(&report);
}

fn goaway_or_closed(r: &Value) {
    assert!(
        r["goaway"] == true || r["closed"] == true,
        "the abusive connection was neither sent GOAWAY nor closed: {r}"
    );
}

#[test]
fn rapid_reset_of_10k_streams() {
    under_attack(&["--attack", "rapid-reset", "--count", "10000"], |r| {
        assert_eq!(r["goaway"], true, "no GOAWAY for rapid reset: {r}");
    });
}

#[test]
fn continuation_flood() {
    under_attack(
        &["--attack", "continuation", "--count", "10000"],
        goaway_or_closed,
    );
}

#[test]
fn ping_flood() {
    under_attack(&["--attack", "ping-flood", "--count", "100000"], |r| {
        assert_eq!(r["goaway"], true, "no GOAWAY for a PING flood: {r}");
    });
}

#[test]
fn settings_flood() {
    under_attack(&["--attack", "settings-flood", "--count", "100000"], |r| {
        assert_eq!(r["goaway"], true, "no GOAWAY for a SETTINGS flood: {r}");
    });
}

#[test]
fn ten_thousand_idle_connections_from_one_pod() {
    under_attack(
        &["--attack", "idle", "--count", "10000", "--hold-ms", "8000"],
        |r| {
            assert!(r["established"].as_u64().unwrap() > 1000, "{r}");
            // Beyond --max-idle-per-client (512) the longest-idle ones were closed.
            assert!(r["open_at_end"].as_u64().unwrap() <= 600, "{r}");
        },
    );
}
