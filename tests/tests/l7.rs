//! The node-local L7 proxy on a simulated node: redirect path, Istio policies, fallback. Needs root.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use tests::k8s;
use tests::node::NODE_IP;
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(120);
const VIP: &str = "198.19.0.10";

fn agent_args() -> [&'static str; 2] {
    ["--node-ip", "198.18.0.1"]
}

fn tally(v: &Value, key: &str) -> BTreeMap<String, u64> {
    v[key].as_object().map(|o| o.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect()).unwrap_or_default()
}

/// A node with `n` pods running `fixture KIND ARGS` on :8080, a client pod, and an HTTP Service.
fn http_node(kind: &str, args: &[&str], n: usize) -> (SimNode, Vec<Pod>, Pod, Vec<Proc>) {
    let mut node = SimNode::new();
    let pods: Vec<Pod> = (1..=n).map(|i| node.add_pod(&format!("{kind}{i}"))).collect();
    let client = node.add_pod("client");
    let mut all = vec!["--listen", "0.0.0.0:8080"];
    all.extend_from_slice(args);
    let servers = pods.iter().map(|p| p.fixture_server(kind, &all)).collect();
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    node.write_manifest("svc.yaml", &k8s::http_service("svc", VIP, 80, 8080, &ips));
    (node, pods, client, servers)
}

fn http(client: &Pod, url: &str, count: usize, extra: &[&str]) -> Value {
    let n = count.to_string();
    let mut args = vec!["--url", url, "--count", &n];
    args.extend_from_slice(extra);
    client.probe("http-probe", &args, T)
}

#[test]
fn one_keep_alive_connection_is_balanced_per_request_by_the_proxy() {
    let (node, _pods, client, _servers) = http_node("webapp", &[], 3);
    let _agent = node.start_agent(&agent_args());
    let out = http(&client, "http://198.19.0.10/", 60, &[]);
    assert_eq!(out["ok"], 60, "{out}");
    // In-kernel balancing would pin the single connection to one backend.
    assert_eq!(tally(&out, "server_ids").len(), 3, "one connection did not spread over all backends: {out}");
}

#[test]
fn connections_to_the_proxy_port_that_were_not_redirected_are_refused() {
    let (node, _pods, client, _servers) = http_node("webapp", &[], 1);
    let _agent = node.start_agent(&agent_args());
    let to = format!("{NODE_IP}:15001");
    let out = client.probe("tcp-probe", &["--to", &to, "--count", "5", "--timeout-ms", "1000"], T);
    assert_eq!(out["ok"], 0, "the proxy port accepted a direct connection: {out}");
    assert_eq!(tally(&out, "errors").get("ConnectionRefused(111)"), Some(&5), "{out}");
}

#[test]
fn seed_experiment_ab_50_concurrent_20000_requests_with_one_pod_failing_midway() {
    let (node, pods, client, servers) = http_node("webapp", &[], 2);
    // The mission's fix, written as an Istio user would: retries on 5xx plus outlier detection.
    node.write_manifest(
        "policy.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: webapp}\nspec:\n  hosts: [svc]\n  http:\n  - route: [{destination: {host: svc}}]\n    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: webapp}\nspec:\n  host: svc\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}\n",
    );
    let mut agent = node.start_agent(&agent_args());
    agent.wait_log_count("l7_routes=1", 1, T);
    let cmd = client.place.command("ab", &["-c", "50", "-n", "20000", "http://198.19.0.10/"]);
    let mut ab = Proc::spawn("ab", cmd, client.place.logs.join("ab.log"));
    // A third of the way, switch one pod into error mode (directly, not through the Service).
    let served = || servers.iter().map(|s| s.log_text().matches(" GET / ").count()).sum::<usize>();
    tests::sys::poll("ab to be a third of the way", T, || (served() >= 6667).then_some(()));
    let url = format!("http://{}:8080/err", pods[0].ip);
    let switched = http(&client, &url, 1, &[]);
    assert_eq!(switched["ok"], 1, "{switched}");
    assert!(ab.wait_exit(T).success(), "ab failed: {}", ab.log_text());
    let out = ab.stdout_lines().join("\n");
    let field = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth_back(0)?.parse::<u64>().ok())
    };
    assert_eq!(field("Complete requests:"), Some(20000), "{out}");
    assert_eq!(field("Failed requests:"), Some(0), "{out}");
    assert_eq!(field("Non-2xx responses:").unwrap_or(0), 0, "{out}");
    let errors_served = servers[0].log_text().matches(" 500").count();
    assert!(errors_served > 0, "the failing pod never answered an error: the experiment did not happen");
    let log = agent.log_text();
    assert!(log.contains("outlier detection ejected a backend"), "the failing pod was never ejected");
}

#[test]
fn a_dead_proxy_falls_back_to_kernel_balancing_and_a_restarted_one_takes_over_again() {
    let (node, _pods, client, _servers) = http_node("webapp", &[], 2);
    let mut agent = node.start_agent(&agent_args());
    let through_proxy = http(&client, "http://198.19.0.10/", 40, &[]);
    assert_eq!(tally(&through_proxy, "server_ids").len(), 2, "{through_proxy}");
    // Under load: a probe with fresh connections runs while the agent (and its proxy) is killed.
    let probe = client.spawn_probe("http-probe", &["--url", "http://198.19.0.10/", "--count", "3000", "--new-connection", "--concurrency", "4"]);
    let served = || _servers.iter().map(|s| s.log_text().matches(" GET / ").count()).sum::<usize>();
    tests::sys::poll("load to be under way", T, || (served() >= 40 + 300).then_some(()));
    agent.signal(nix::sys::signal::Signal::SIGKILL);
    agent.wait_exit(T);
    let out = Pod::finish_probe(probe, T);
    let failed = 3000 - out["ok"].as_u64().unwrap_or(0);
    // Only requests in flight may fail: one per worker at the kill, plus at most one per worker
    // whose connection the dying process still accepted (the kernel closes the listener, and so
    // drops it from the sockmap, only at the end of the process teardown).
    assert!(failed <= 2 * 4, "{failed} requests failed after the proxy died: {out}");

    // With the proxy gone, keep-alive connections are pinned by the kernel: one backend each.
    let fallback = http(&client, "http://198.19.0.10/", 20, &[]);
    assert_eq!(fallback["ok"], 20, "{fallback}");
    assert_eq!(tally(&fallback, "server_ids").len(), 1, "expected in-kernel balancing: {fallback}");
    let _agent = node.start_agent(&agent_args());
    let again = http(&client, "http://198.19.0.10/", 40, &[]);
    assert_eq!(tally(&again, "server_ids").len(), 2, "the restarted proxy does not carry L7 traffic: {again}");
}
