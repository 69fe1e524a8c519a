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
    let fallbacks = || {
        tests::admin::metric(
            &node.netns_path(),
            "proxy_agent_datapath_l7_fallbacks_total",
        )
    };
    let before = fallbacks();
    let url = format!("http://{VIP}/");
    let ab = spawn_ab(&client, keep_alive);
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
    let (r, out) = finish_ab(ab);
    eprintln!(
        "restart under ab (keep-alive {keep_alive}): {r:?}; drained and exited in {drained_in:?}; {at_restart} served before, {} until the new proxy was ready",
        restarted - at_restart
    );
    assert_eq!(
        (r.complete, r.failed, r.non_2xx),
        (REQUESTS as u64, 0, 0),
        "requests failed across the agent restart:\n{out}"
    );
    // Between the agents, connects were balanced in the kernel (the fallback that keeps them
    // working).
    assert!(
        fallbacks() > before,
        "no connect used the in-kernel fallback while no proxy ran"
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

fn spawn_ab(client: &Pod, keep_alive: bool) -> Proc {
    let n = REQUESTS.to_string();
    let url = format!("http://{VIP}/");
    let mut args = vec!["-c", "20", "-n", &n];
    if keep_alive {
        args.push("-k");
    }
    args.push(&url);
    Proc::spawn(
        "ab",
        client.place.command("ab", &args),
        client.place.logs.join("ab.log"),
    )
}

fn finish_ab(mut ab: Proc) -> (scenarios::AbResult, String) {
    assert!(ab.wait_exit(T).success(), "ab failed: {}", ab.log_text());
    let out = ab.all_stdout(T).join("\n");
    let r = scenarios::parse_ab(&out).unwrap_or_else(|| panic!("ab printed no report: {out}"));
    (r, out)
}

/// A surge rollout: the new agent starts while the old one runs (both proxies listen in one
/// `SO_REUSEPORT` group, the new one takes the redirect map), then the old one gets SIGTERM
/// and drains. Under `ab`, no request fails and no connect falls back to in-kernel balancing:
/// at every instant a proxy takes the new connections.
fn hand_over_under_ab(keep_alive: bool, new_flags: &[&str]) {
    let (node, client, servers) = node();
    let mut old = node.start_agent(&agent_args(&[]));
    node.wait_l7_routes(1, T);
    let fallbacks = || {
        tests::admin::metric(
            &node.netns_path(),
            "proxy_agent_datapath_l7_fallbacks_total",
        )
    };
    let before = fallbacks();
    let ab = spawn_ab(&client, keep_alive);
    tests::sys::poll("ab to be under way", T, || {
        (served(&servers) >= 5_000).then_some(())
    });
    let _new = start_listening(&node, new_flags);
    assert!(old.terminate(T).success(), "{}", old.log_text());
    let log = old.log_text();
    assert!(
        log.contains("another agent's proxy listens on the same address"),
        "the old agent did not see the hand-over:\n{log}"
    );
    assert!(log.contains("the L7 proxy drained"), "{log}");
    let handed_over = served(&servers);
    let (r, out) = finish_ab(ab);
    eprintln!(
        "hand-over under ab (keep-alive {keep_alive}): {r:?}; {handed_over} served when the old agent exited"
    );
    assert!(
        handed_over < REQUESTS,
        "ab finished before the hand-over was over: nothing was tested"
    );
    assert_eq!(
        (r.complete, r.failed, r.non_2xx),
        (REQUESTS as u64, 0, 0),
        "requests failed across the hand-over:\n{out}"
    );
    assert_eq!(
        fallbacks(),
        before,
        "connects were balanced in the kernel during the hand-over: there was a moment without a proxy"
    );
    let again = client.probe(
        "http-probe",
        &["--url", &format!("http://{VIP}/"), "--count", "40"],
        T,
    );
    assert_eq!(
        tally(&again, "server_ids").len(),
        2,
        "the new agent's proxy does not carry the Service: {again}"
    );
}

#[test]
fn a_surge_hand_over_keeps_a_proxy_for_every_new_connection() {
    hand_over_under_ab(false, &[]);
}

#[test]
fn a_surge_hand_over_to_a_new_datapath_object_fails_no_keep_alive_request() {
    hand_over_under_ab(true, &["--bpf-log", "debug"]);
}

/// Long-lived connections through an L4 and an L7 ClusterIP (opaque TCP through the proxy),
/// one echoed message every 10 ms each, held across an upgrade to a new datapath object (surge
/// hand-over), a restart and a SIGKILL of the agent.
/// Starts an agent and waits until its own proxy listens (another agent may still answer the
/// shared admin port during a hand-over).
fn start_listening(node: &SimNode, extra: &[&str]) -> Proc {
    let a = node.start_agent(&agent_args(extra));
    tests::sys::poll("the new agent's proxy to listen", T, || {
        a.log_text().contains("L7 proxy listening").then_some(())
    });
    a
}

struct Disrupt {
    stop: std::path::PathBuf,
    probe: Proc,
}

impl Disrupt {
    fn start(client: &Pod, to: &str, stop: std::path::PathBuf) -> Self {
        let _ = std::fs::remove_file(&stop);
        let probe = client.spawn_probe(
            "conn-disrupt",
            &[
                "--to",
                to,
                "--connections",
                "4",
                "--stop-file",
                stop.to_str().expect("utf-8 path"),
            ],
        );
        tests::sys::poll(&format!("long-lived connections to {to}"), T, || {
            probe
                .log_text()
                .contains("all 4 connections established")
                .then_some(())
        });
        Self { stop, probe }
    }

    fn finish(self) -> serde_json::Value {
        std::fs::write(&self.stop, "").expect("stop file");
        Pod::finish_probe(self.probe, T)
    }
}

#[test]
fn long_lived_l4_and_l7_connections_survive_upgrade_restart_and_sigkill_of_the_agent() {
    let mut node = SimNode::new();
    let pods: Vec<Pod> = (1..=2)
        .map(|i| node.add_pod(&format!("banner{i}")))
        .collect();
    let client = node.add_pod("client");
    let _servers: Vec<Proc> = pods
        .iter()
        .map(|p| p.fixture_server("banner", &["--listen", "0.0.0.0:9000"]))
        .collect();
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    node.write_manifest(
        "l4.yaml",
        &k8s::service_with_endpoints("l4", "198.19.0.20", 9000, "TCP", 9000, &ips),
    );
    node.write_manifest("l7.yaml", &k8s::http_service("l7", VIP, 80, 9000, &ips));
    // The first agent drains for up to 60 s: longer than this test, so the L7 connections its
    // proxy holds outlive every later event.
    let mut first = node.start_agent(&agent_args(&["--drain-timeout", "60s"]));
    node.wait_l7_routes(1, T);
    let l4 = Disrupt::start(&client, "198.19.0.20:9000", node.dir.join("stop-l4"));
    let l7 = Disrupt::start(&client, &format!("{VIP}:80"), node.dir.join("stop-l7"));

    // Upgrade with surge: a new datapath object next to the old links, the new proxy takes the
    // redirect map, then the old agent drains (keeping the opaque connections it carries).
    let mut second = node.start_agent(&agent_args(&["--bpf-log", "debug"]));
    tests::sys::poll("the second agent's proxy to listen", T, || {
        second
            .log_text()
            .contains("L7 proxy listening")
            .then_some(())
    });
    first.signal(nix::sys::signal::Signal::SIGTERM);
    // Restart: SIGTERM, and a new agent at once.
    second.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(second.wait_exit(T).success(), "{}", second.log_text());
    let mut third = start_listening(&node, &[]);
    // SIGKILL.
    third.kill();
    let fourth = start_listening(&node, &[]);

    let (l4, l7) = (l4.finish(), l7.finish());
    eprintln!("conn-disrupt L4: {l4}\nconn-disrupt L7: {l7}");
    for (what, r, from) in [("L4", &l4, client.ip), ("L7", &l7, tests::node::NODE_IP)] {
        assert_eq!(r["connections"], 4, "{what}: {r}");
        // Through the proxy the backend sees the node's address; in the kernel, the pod's.
        let from = format!(" from {from}");
        assert!(
            r["servers"].as_array().is_some_and(|s| s
                .iter()
                .all(|b| b.as_str().is_some_and(|b| b.ends_with(&from)))),
            "{what}: every connection should come{from}: {r}"
        );
        assert_eq!(
            r["broken"].as_array().map(Vec::len),
            Some(0),
            "{what} connections broke across the agent's upgrade, restart and SIGKILL: {r}"
        );
        assert!(
            r["messages"].as_u64().unwrap_or(0) >= 4 * 50,
            "{what}: too few messages went through to prove anything: {r}"
        );
    }

    // Measured and documented: a SIGKILL of the proxy that carries L7 connections breaks them
    // (the process held their sockets); L4 connections never pass through the agent.
    let l7 = Disrupt::start(&client, &format!("{VIP}:80"), node.dir.join("stop-l7b"));
    let l4 = Disrupt::start(&client, "198.19.0.20:9000", node.dir.join("stop-l4b"));
    let mut fourth = fourth;
    fourth.kill();
    first.kill();
    let _fifth = start_listening(&node, &[]);
    let (l4, l7) = (l4.finish(), l7.finish());
    eprintln!("after SIGKILL of the carrying proxy: L4 {l4}\nL7 {l7}");
    assert_eq!(l4["broken"].as_array().map(Vec::len), Some(0), "{l4}");
    assert_eq!(
        l7["broken"].as_array().map(Vec::len),
        Some(4),
        "the L7 connections of a killed proxy should break (and be reported): {l7}"
    );
}
