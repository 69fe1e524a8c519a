//! Hitless agent restarts on a simulated node: the proxy drains on SIGTERM (requests in
//! flight finish, keep-alive connections get `Connection: close`, new connects meanwhile go to
//! the in-kernel fallback) and the next agent takes over. Real `ab` clients. Needs root.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tests::k8s;
use tests::scenarios::{self, tally};
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(120);
const VIP: &str = "198.19.0.10";
const REQUESTS: usize = 30_000;

/// A node with two `webapp` pods behind an HTTP Service, and a client pod.
fn node() -> (SimNode, Pod, Vec<Proc>) {
    let mut node = SimNode::new();
    let pods: Vec<Pod> = (1..=2)
        .map(|i| node.add_pod(&format!("webapp{i}")))
        .collect();
    let client = node.add_pod("client");
    let servers = pods
        .iter()
        .map(|p| p.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    node.write_manifest("svc.yaml", &k8s::http_service("svc", VIP, 80, 8080, &ips));
    (node, client, servers)
}

fn served(servers: &[Proc]) -> usize {
    servers
        .iter()
        .map(|s| s.log_text().matches(" GET / ").count())
        .sum()
}

fn agent_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--node-ip", "198.18.0.1"];
    if !extra.contains(&"--drain-timeout") {
        a.extend(["--drain-timeout", "20s"]);
    }
    a.extend_from_slice(extra);
    a
}

/// `ab -c 20 -n 30000` through the ClusterIP; once 5,000 requests were served the agent gets
/// SIGTERM (it drains and exits) and a new one starts with `new_flags`, as a DaemonSet rolling
/// update without surge does. Every request must succeed with a 2xx, and the new agent's
/// proxy must carry the Service afterwards.
fn restart_under_ab(keep_alive: bool, new_flags: &[&str]) {
    let (node, client, servers) = node();
    let mut old = node.start_agent(&agent_args(&[]));
    node.wait_l7_routes(1, T);
    let n = REQUESTS.to_string();
    let url = format!("http://{VIP}/");
    let mut ab_args = vec!["-c", "20", "-n", &n];
    if keep_alive {
        ab_args.push("-k");
    }
    ab_args.push(&url);
    let mut ab = Proc::spawn(
        "ab",
        client.place.command("ab", &ab_args),
        client.place.logs.join("ab.log"),
    );
    tests::sys::poll("ab to be under way", T, || {
        (served(&servers) >= 5_000).then_some(())
    });
    let at_restart = served(&servers);
    let t0 = Instant::now();
    assert!(old.terminate(T).success(), "{}", old.log_text());
    let drained_in = t0.elapsed();
    let log = old.log_text();
    assert!(
        log.contains("the L7 proxy drained"),
        "the old agent did not drain its proxy:\n{log}"
    );
    for l in log.lines().filter(|l| l.contains("drain")) {
        eprintln!("old agent: {l}");
    }
    let _new = node.start_agent(&agent_args(new_flags));
    node.wait_l7_routes(1, T);
    let restarted = served(&servers);
    assert!(
        restarted < REQUESTS,
        "ab finished before the restart was over ({restarted} served): nothing was tested"
    );
    assert!(ab.wait_exit(T).success(), "ab failed: {}", ab.log_text());
    let out = ab.all_stdout(T).join("\n");
    let r = scenarios::parse_ab(&out).unwrap_or_else(|| panic!("ab printed no report: {out}"));
    eprintln!(
        "restart under ab (keep-alive {keep_alive}): {r:?}; drained and exited in {drained_in:?}; {at_restart} served before, {} until the new proxy was ready",
        restarted - at_restart
    );
    assert_eq!(
        (r.complete, r.failed, r.non_2xx),
        (REQUESTS as u64, 0, 0),
        "requests failed across the agent restart:\n{out}"
    );
    // The new agent's proxy balances per request (one keep-alive connection reaches both pods).
    let again = client.probe("http-probe", &["--url", &url, "--count", "40"], T);
    assert_eq!(
        tally(&again, "server_ids").len(),
        2,
        "the new agent's proxy does not carry the Service: {again}"
    );
}

#[test]
fn a_restarted_agent_fails_no_request_with_new_connections() {
    restart_under_ab(false, &[]);
}

#[test]
fn a_restarted_agent_fails_no_request_on_keep_alive_connections() {
    restart_under_ab(true, &[]);
}

/// The new agent loads a different datapath object (the eBPF log level is part of its hash):
/// its programs are attached next to the old links while connections flow.
#[test]
fn an_agent_upgrade_to_a_new_datapath_object_fails_no_request() {
    restart_under_ab(true, &["--bpf-log", "debug"]);
}

/// A node with one `echo` pod (recording every request path as it arrives) behind an HTTP
/// Service, and a client pod; returns the record file too.
fn echo_node() -> (SimNode, Pod, Proc, std::path::PathBuf) {
    let mut node = SimNode::new();
    let pod = node.add_pod("echo1");
    let client = node.add_pod("client");
    let record = node.dir.join("requests.txt");
    let server = pod.fixture_server(
        "echo",
        &[
            "--listen",
            "0.0.0.0:8080",
            "--record",
            record.to_str().expect("utf-8 path"),
        ],
    );
    node.write_manifest(
        "svc.yaml",
        &k8s::http_service("svc", VIP, 80, 8080, &[pod.ip]),
    );
    (node, client, server, record)
}

fn wait_recorded(record: &std::path::Path, paths: &[&str]) {
    tests::sys::poll("the slow requests to reach the backend", T, || {
        let seen = std::fs::read_to_string(record).unwrap_or_default();
        paths
            .iter()
            .all(|p| seen.lines().any(|l| l == *p))
            .then_some(())
    });
}

#[test]
fn sigterm_lets_requests_in_flight_finish_over_http1_and_http2_up_to_the_drain_timeout() {
    let (node, client, _server, record) = echo_node();
    let mut agent = node.start_agent(&agent_args(&[]));
    node.wait_l7_routes(1, T);
    // Requests in flight at SIGTERM (2 s each), over HTTP/1.1 and HTTP/2.
    let h1 = client.spawn_probe(
        "http-probe",
        &[
            "--url",
            &format!("http://{VIP}/h1?delay=2s"),
            "--count",
            "1",
        ],
    );
    let h2 = client.spawn_probe(
        "http-probe",
        &[
            "--url",
            &format!("http://{VIP}/h2?delay=2s"),
            "--count",
            "1",
            "--http2",
        ],
    );
    wait_recorded(&record, &["/h1", "/h2"]);
    let t0 = Instant::now();
    assert!(agent.terminate(T).success(), "{}", agent.log_text());
    let took = t0.elapsed();
    let h1 = Pod::finish_probe(h1, T);
    let h2 = Pod::finish_probe(h2, T);
    assert_eq!(h1["ok"], 1, "the HTTP/1.1 request in flight failed: {h1}");
    assert_eq!(h2["ok"], 1, "the HTTP/2 request in flight failed: {h2}");
    let log = agent.log_text();
    assert!(log.contains("the L7 proxy drained"), "{log}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(20),
        "the agent exited {took:?} after SIGTERM: it should wait for its requests (2 s), not for the 20 s drain timeout"
    );

    // A request longer than --drain-timeout is cut when it expires.
    let mut agent = node.start_agent(&agent_args(&["--drain-timeout", "1s"]));
    node.wait_l7_routes(1, T);
    let slow = client.spawn_probe(
        "http-probe",
        &[
            "--url",
            &format!("http://{VIP}/slow?delay=8s"),
            "--count",
            "1",
            "--timeout-ms",
            "20000",
        ],
    );
    wait_recorded(&record, &["/slow"]);
    let t0 = Instant::now();
    assert!(agent.terminate(T).success(), "{}", agent.log_text());
    let took = t0.elapsed();
    let log = agent.log_text();
    assert!(
        log.contains("drain timeout: closing the proxy's remaining connections"),
        "{log}"
    );
    assert!(
        took < Duration::from_secs(5),
        "the agent took {took:?} to exit with --drain-timeout 1s"
    );
    let slow = Pod::finish_probe(slow, T);
    assert_eq!(
        slow["ok"], 0,
        "the request outlived the drain timeout: {slow}"
    );
}
