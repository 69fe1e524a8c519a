//! The node proxy under abuse and misuse: connection limits, accept failures, slow and idle
//! clients, pooled upstream connections, oversized headers and request smuggling. Needs root.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::k8s;
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(180);
const VIP: &str = "198.19.0.10";

/// A node with `n` pods running `fixture KIND ARGS` on :8080, two client pods, an HTTP
/// Service on VIP:80, and the agent started with `agent_args`.
fn setup(
    kind: &str,
    args: &[&str],
    n: usize,
    agent_args: &[&str],
) -> (SimNode, Vec<Pod>, Pod, Pod, Vec<Proc>, Proc) {
    let mut node = SimNode::new();
    let pods: Vec<Pod> = (1..=n)
        .map(|i| node.add_pod(&format!("{kind}{i}")))
        .collect();
    let client = node.add_pod("client");
    let other = node.add_pod("other");
    let mut all = vec!["--listen", "0.0.0.0:8080"];
    all.extend_from_slice(args);
    let servers = pods.iter().map(|p| p.fixture_server(kind, &all)).collect();
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    node.write_manifest("svc.yaml", &k8s::http_service("svc", VIP, 80, 8080, &ips));
    let mut a = vec!["--node-ip", "198.18.0.1"];
    a.extend_from_slice(agent_args);
    let agent = node.start_agent(&a);
    node.wait_l7_routes(1, T);
    (node, pods, client, other, servers, agent)
}

fn get(client: &Pod, count: usize) -> Value {
    client.probe(
        "http-probe",
        &[
            "--url",
            &format!("http://{VIP}/"),
            "--count",
            &count.to_string(),
        ],
        T,
    )
}

/// Sends raw requests (one connection each) through the ClusterIP; returns the per-case reports.
fn raw(
    node: &SimNode,
    client: &Pod,
    tag: &str,
    cases: &[(String, String)],
    idle_ms: u64,
) -> Vec<Value> {
    let list: Vec<Value> = cases
        .iter()
        .map(|(n, r)| json!({"name": n, "request": r}))
        .collect();
    let file = node.dir.join(format!("raw-{tag}.json"));
    std::fs::write(&file, serde_json::to_string(&list).unwrap()).unwrap();
    let out = client.probe(
        "raw-probe",
        &[
            "--to",
            &format!("{VIP}:80"),
            "--cases",
            file.to_str().unwrap(),
            "--idle-ms",
            &idle_ms.to_string(),
        ],
        T,
    );
    let got = out["cases"].as_array().cloned().unwrap_or_default();
    assert_eq!(got.len(), cases.len(), "{out}");
    got
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once_and_counted() {
    let (node, _pods, client, other, _s, _agent) =
        setup("webapp", &[], 1, &["--max-connections", "40"]);
    let hold = client.spawn_probe(
        "h2-abuse",
        &[
            "--to",
            &format!("{VIP}:80"),
            "--attack",
            "idle",
            "--count",
            "60",
            "--hold-ms",
            "4000",
        ],
    );
    tests::sys::poll("connections refused at the limit to be counted", T, || {
        let n = tests::admin::metric(
            &node.netns_path(),
            "proxy_agent_proxy_connections_total{event=\"rejected_limit\"",
        );
        (n > 0.0).then_some(())
    });
    let out = Pod::finish_probe(hold, T);
    assert!(
        out["open_at_end"].as_u64().unwrap() <= 40,
        "more connections than --max-connections stayed open: {out}"
    );
    // With the holder gone, the limit frees up.
    let ok = get(&other, 5);
    assert_eq!(ok["ok"], 5, "{ok}");
}

#[test]
fn a_client_with_too_many_idle_connections_loses_its_longest_idle_ones() {
    let (_node, _pods, client, other, _s, _agent) =
        setup("webapp", &[], 1, &["--max-idle-per-client", "20"]);
    let out = client.probe(
        "h2-abuse",
        &[
            "--to",
            &format!("{VIP}:80"),
            "--attack",
            "idle",
            "--count",
            "60",
            "--hold-ms",
            "3000",
        ],
        T,
    );
    assert_eq!(out["established"], 60, "{out}");
    // The HTTP/2 limits the proxy announces: SETTINGS_MAX_CONCURRENT_STREAMS (3) and
    // SETTINGS_MAX_HEADER_LIST_SIZE (6).
    assert_eq!(out["server_settings"]["3"], 1024, "{out}");
    assert_eq!(out["server_settings"]["6"], 65536, "{out}");
    let open = out["open_at_end"].as_u64().unwrap();
    assert!(
        (15..=21).contains(&open),
        "{open} idle connections of one client stayed open (max 20): {out}"
    );
    let ok = get(&other, 5);
    assert_eq!(ok["ok"], 5, "another pod is unaffected: {ok}");
}

#[test]
fn accept_failures_back_off_instead_of_spinning() {
    // The agent under a low open-file limit (prlimit sets soft and hard): idle opaque
    // connections (two descriptors each) exhaust it.
    let mut node = SimNode::new();
    let pod = node.add_pod("echo1");
    let client = node.add_pod("client");
    let other = node.add_pod("other");
    let _server = pod.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]);
    node.write_manifest(
        "svc.yaml",
        &k8s::http_service("svc", VIP, 80, 8080, &[pod.ip]),
    );
    let agent_bin = tests::sys::bin("proxy-agent");
    let mut agent = node.start_agent_wrapped(
        &["prlimit", "--nofile=300:300", "--"],
        agent_bin.to_str().unwrap(),
        &["--node-ip", "198.18.0.1", "--detect-timeout", "100ms"],
    );
    node.wait_l7_routes(1, T);
    let hold = client.spawn_probe(
        "h2-abuse",
        &[
            "--to",
            &format!("{VIP}:80"),
            "--attack",
            "raw-idle",
            "--count",
            "600",
            "--hold-ms",
            "6000",
        ],
    );
    agent.wait_log_count("accepting a connection failed", 1, T);
    let (cpu0, t0, lines0) = (
        tests::sys::cpu_seconds(agent.pid()),
        Instant::now(),
        agent.log_text().lines().count(),
    );
    std::thread::sleep(Duration::from_secs(3));
    let cpu = (tests::sys::cpu_seconds(agent.pid()) - cpu0) / t0.elapsed().as_secs_f64();
    let lines = agent.log_text().lines().count() - lines0;
    assert!(
        cpu < 0.2,
        "the agent used {cpu:.2} cores while accepts failed: it spins"
    );
    let new: Vec<String> = agent
        .log_text()
        .lines()
        .skip(lines0)
        .map(String::from)
        .collect();
    assert!(
        lines <= 6,
        "{lines} log lines in 3 s while accepts failed (at most one a second):\n{}",
        new.join("\n")
    );
    let out = Pod::finish_probe(hold, T);
    assert!(out["established"].as_u64().unwrap() > 0, "{out}");
    // Once the attacker lets go, the proxy accepts again within its backoff.
    let t = Instant::now();
    let ok = get(&other, 3);
    assert_eq!(ok["ok"], 3, "{ok}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "recovery took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_slow_request_head_is_cut_at_the_header_read_timeout_but_idle_keep_alive_is_not() {
    let (node, _pods, client, _other, servers, _agent) = setup(
        "webapp",
        &[],
        1,
        &["--header-read-timeout", "2s", "--http-idle-timeout", "6s"],
    );
    let t = Instant::now();
    let out = raw(
        &node,
        &client,
        "slow",
        &[
            (
                "slowloris".into(),
                "GET /slow HTTP/1.1\r\nHost: svc\r\nX-Slow: ".into(),
            ),
            (
                "keep-alive".into(),
                "GET /fast HTTP/1.1\r\nHost: svc\r\n\r\n".into(),
            ),
        ],
        4000,
    );
    assert_eq!(
        out[0]["closed"], true,
        "the slow head was not cut: {:?}",
        out[0]
    );
    assert_eq!(out[0]["statuses"], json!([]), "{:?}", out[0]);
    // A served keep-alive connection survives 4 s of quiet (header timeout 2 s, idle 6 s).
    assert_eq!(out[1]["statuses"], json!([200]), "{:?}", out[1]);
    assert_eq!(
        out[1]["closed"], false,
        "an idle keep-alive connection was cut: {:?}",
        out[1]
    );
    assert!(!servers[0].log_text().contains("/slow"));
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn idle_http_and_tunnel_connections_close_after_their_idle_timeouts() {
    let (node, _pods, client, _other, _servers, _agent) = setup(
        "stream",
        &[],
        1,
        &["--http-idle-timeout", "2s", "--stream-idle-timeout", "2s"],
    );
    let out = raw(
        &node,
        &client,
        "idle",
        &[
            ("http".into(), "GET / HTTP/1.1\r\nHost: svc\r\n\r\n".into()),
            (
                "tunnel".into(),
                "CONNECT x:1 HTTP/1.1\r\nHost: x:1\r\n\r\nping".into(),
            ),
        ],
        5000,
    );
    for c in &out {
        assert_eq!(c["statuses"], json!([200]), "{c:?}");
        assert_eq!(c["closed"], true, "not closed after 2 s idle: {c:?}");
    }
    // A request that streams longer than the idle timeout is not idle.
    let sse = client.probe(
        "stream-probe",
        &[
            "--url",
            &format!("http://{VIP}:80"),
            "--mode",
            "sse",
            "--events",
            "4",
            "--interval-ms",
            "1000",
        ],
        T,
    );
    assert_eq!(sse["ok"], true, "{sse}");
}

/// Established TCP connections to :8080 inside `pod`.
fn established_8080(pod: &Pod) -> usize {
    pod.run(
        "ss",
        &["-Htn", "state", "established", "( sport = :8080 )"],
        T,
    )
    .lines()
    .filter(|l| !l.trim().is_empty())
    .count()
}

#[test]
fn pooled_upstream_connections_are_capped_and_close_when_idle() {
    let (_node, pods, client, _other, _s, _agent) = setup(
        "webapp",
        &[],
        1,
        &[
            "--pool-max-idle",
            "3",
            "--pool-idle-timeout",
            "2s",
            "--proxy-workers",
            "2",
        ],
    );
    let out = client.probe(
        "http-probe",
        &[
            "--url",
            &format!("http://{VIP}/"),
            "--count",
            "400",
            "--concurrency",
            "16",
        ],
        T,
    );
    assert_eq!(out["ok"], 400, "{out}");
    // Pools are per worker: at most 3 idle per backend in each of the 2 workers.
    let idle = established_8080(&pods[0]);
    assert!(
        idle <= 6,
        "{idle} pooled connections kept (max 3 per worker)"
    );
    tests::sys::poll(
        "idle pooled connections to close",
        Duration::from_secs(30),
        || (established_8080(&pods[0]) == 0).then_some(()),
    );
}

#[test]
fn concurrent_http2_requests_open_a_single_upstream_connection() {
    let mut node = SimNode::new();
    let pod = node.add_pod("grpc1");
    let client = node.add_pod("client");
    let _server = pod.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]);
    node.write_manifest(
        "svc.yaml",
        &k8s::service_with_endpoints("svc", VIP, 80, "TCP", 8080, &[pod.ip])
            .replace("- name: p\n", "- name: grpc\n"),
    );
    let _agent = node.start_agent(&["--node-ip", "198.18.0.1", "--proxy-workers", "2"]);
    node.wait_l7_routes(1, T);
    // 50 connections at once, each with requests, from a cold start.
    let out = client.run(
        "h2load",
        &[
            "-n",
            "500",
            "-c",
            "50",
            "-m",
            "4",
            &format!("http://{VIP}/"),
        ],
        T,
    );
    assert!(out.contains("500 succeeded"), "{out}");
    // One connection per proxy worker (pools are per worker, as Envoy's are per thread).
    let n = established_8080(&pod);
    assert!(
        (1..=2).contains(&n),
        "{n} upstream connections: HTTP/2 connects are not single-flight"
    );
}

#[test]
fn request_heads_over_64_kib_get_431() {
    let (node, _pods, client, _other, _s, _agent) = setup("webapp", &[], 1, &[]);
    let big = |n: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: svc\r\nX-Big: {}\r\n\r\n",
            "a".repeat(n)
        )
    };
    let out = raw(
        &node,
        &client,
        "431",
        &[
            ("60k".into(), big(60 * 1024)),
            ("70k".into(), big(70 * 1024)),
        ],
        1500,
    );
    assert_eq!(out[0]["statuses"], json!([200]), "{:?}", out[0]);
    assert_eq!(out[1]["statuses"], json!([431]), "{:?}", out[1]);
}

/// A node whose Service's one pod records every request it gets (a JSON line each, in the
/// returned file); the agent runs with `agent_args`.
fn sniffer_node(agent_args: &[&str]) -> (SimNode, Pod, std::path::PathBuf, Proc, Proc) {
    let mut node = SimNode::new();
    let pod = node.add_pod("sniffer1");
    let client = node.add_pod("client");
    let record = node.dir.join("requests.jsonl");
    let server = pod.fixture_server(
        "sniffer",
        &[
            "--listen",
            "0.0.0.0:8080",
            "--record",
            record.to_str().unwrap(),
        ],
    );
    node.write_manifest(
        "svc.yaml",
        &k8s::http_service("svc", VIP, 80, 8080, &[pod.ip]),
    );
    let mut args = vec!["--node-ip", "198.18.0.1"];
    args.extend_from_slice(agent_args);
    let agent = node.start_agent(&args);
    node.wait_l7_routes(1, T);
    (node, client, record, server, agent)
}

/// One smuggling probe: the request bytes, and whether the proxy must reject it (400) or may
/// normalise it (one request reaches the backend).
struct Case {
    name: &'static str,
    request: String,
    reject: bool,
}

fn corpus() -> Vec<Case> {
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n";
    let c = |name: &'static str, request: String, reject: bool| Case {
        name,
        request,
        reject,
    };
    vec![
        c("cl-te", format!("POST /cl-te HTTP/1.1\r\nHost: svc\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"), false),
        c("te-cl", format!("POST /te-cl HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{smuggled}"), false),
        c("cl-cl-differ", format!("POST /cl-cl HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()), true),
        c("cl-cl-same", "POST /cl-cl-same HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".into(), false),
        c("te-http10", format!("POST /te10 HTTP/1.0\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"), true),
        c("obs-fold", "GET /fold HTTP/1.1\r\nHost: svc\r\nX-Folded: a\r\n b\r\n\r\n".into(), true),
        c("obs-fold-te", format!("POST /fold-te HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{smuggled}"), true),
        c("bare-lf", "GET /bare-lf HTTP/1.1\nHost: svc\n\n".into(), false),
        c("bare-cr", "GET /bare-cr HTTP/1.1\r\nHost: svc\r\nX-A: a\rX-B: b\r\n\r\n".into(), true),
        c("header-nul", "GET /nul HTTP/1.1\r\nHost: svc\r\nX-A: a\u{0}b\r\n\r\n".into(), true),
        c("space-before-colon", format!("POST /sbc HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{smuggled}"), true),
        c("chunk-size-invalid", format!("POST /chunk-bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n{smuggled}"), true),
        c("chunk-size-overflow", format!("POST /chunk-big HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n{smuggled}"), true),
        c("chunk-ext-oversized", format!("POST /chunk-ext HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(40_000)), true),
        c("cl-negative", format!("POST /cl-neg HTTP/1.1\r\nHost: svc\r\nContent-Length: -1\r\n\r\n{smuggled}"), true),
        c("cl-plus", format!("POST /cl-plus HTTP/1.1\r\nHost: svc\r\nContent-Length: +5\r\n\r\nhello{smuggled}"), true),
        c("cl-spaces", format!("POST /cl-sp HTTP/1.1\r\nHost: svc\r\nContent-Length: 1 0\r\n\r\nhello{smuggled}"), true),
        c("te-gzip-chunked", format!("POST /te-gzip HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"), true),
        c("te-chunked-chunked", format!("POST /te-cc HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n{smuggled}"), true),
        c("te-two-headers", format!("POST /te-2 HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"), true),
        c("te-identity", format!("POST /te-id HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello{smuggled}"), true),
        c("te-xchunked", format!("POST /te-x HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"), true),
        c("duplicate-host", "GET /dup-host HTTP/1.1\r\nHost: svc\r\nHost: evil.example\r\n\r\n".into(), true),
        c("absolute-form", "GET http://other.example/absolute HTTP/1.1\r\nHost: svc\r\n\r\n".into(), false),
        c("leading-crlf", "\r\nGET /leading-crlf HTTP/1.1\r\nHost: svc\r\n\r\n".into(), false),
        c("http09", "GET /http09\r\n\r\n".into(), true),
    ]
}

#[test]
fn the_smuggling_corpus_never_reaches_a_backend_as_two_requests() {
    let (node, client, record, _server, _agent) = sniffer_node(&[]);
    let cases = corpus();
    assert!(cases.len() >= 20);
    let list: Vec<(String, String)> = cases
        .iter()
        .map(|c| (c.name.to_string(), c.request.clone()))
        .collect();
    let out = raw(&node, &client, "smuggle", &list, 1500);
    let seen: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let paths: Vec<String> = seen
        .iter()
        .map(|r| r["path"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        !paths.iter().any(|p| p.contains("smuggled")),
        "a smuggled request reached the backend: {paths:?}"
    );
    let mut problems = Vec::new();
    for (case, got) in cases.iter().zip(&out) {
        let statuses: Vec<u64> = got["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let path = case
            .request
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .trim_start_matches("http://other.example");
        let reached = paths.iter().filter(|p| p.as_str() == path).count();
        let ok = if case.reject {
            statuses == [400] && reached == 0
        } else {
            statuses == [200] && reached == 1
        };
        if !ok {
            problems.push(format!(
                "{}: statuses {statuses:?}, reached the backend {reached}x",
                case.name
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Normalised: the absolute-form target's authority became the Host; x-forwarded-for says
    // who the client was; no hop-by-hop header passed.
    let abs = seen.iter().find(|r| r["path"] == "/absolute").unwrap();
    assert_eq!(abs["headers"]["host"], "other.example", "{abs}");
    assert_eq!(
        abs["headers"]["x-forwarded-for"],
        client.ip.to_string(),
        "{abs}"
    );
    for r in &seen {
        let h = r["headers"].as_object().unwrap();
        assert!(
            !h.contains_key("transfer-encoding") || h["transfer-encoding"] == "chunked",
            "{r}"
        );
        assert!(
            !h.contains_key("keep-alive") && !h.contains_key("proxy-connection"),
            "{r}"
        );
    }
}

#[test]
fn hop_by_hop_headers_are_stripped_and_x_forwarded_for_can_be_turned_off() {
    let (node, client, record, _server, _agent) = sniffer_node(&["--x-forwarded-for", "false"]);
    let out = raw(
        &node,
        &client,
        "hop",
        &[(
            "hop".into(),
            "GET /hop HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers, deflate\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n".into(),
        )],
        1000,
    );
    assert_eq!(out[0]["statuses"], json!([200]), "{:?}", out[0]);
    let seen = std::fs::read_to_string(&record).unwrap();
    let r: Value = serde_json::from_str(seen.lines().next().unwrap()).unwrap();
    let h = r["headers"].as_object().unwrap();
    for name in ["connection", "x-private", "keep-alive", "proxy-connection"] {
        assert!(!h.contains_key(name), "{name} passed the proxy: {r}");
    }
    assert_eq!(h["te"], "trailers", "{r}");
    assert_eq!(
        h["x-forwarded-for"], "203.0.113.9",
        "with --x-forwarded-for false the header is untouched: {r}"
    );
}

#[test]
fn parsing_a_50_mb_manifest_does_not_delay_proxied_requests() {
    let (node, _pods, client, _other, _s, _agent) =
        setup("webapp", &[], 2, &["--max-manifest-bytes", "104857600"]);
    let url = format!("http://{VIP}/");
    let stop = node.dir.join("parsed");
    let run = |count: &str| {
        client.spawn_probe(
            "http-probe",
            &[
                "--url",
                &url,
                "--count",
                count,
                "--stop-file",
                stop.to_str().unwrap(),
            ],
        )
    };
    let baseline = Pod::finish_probe(run("3000"), T);
    assert_eq!(baseline["ok"], 3000, "{baseline}");
    // 50 MB of objects the agent must parse (and then ignore): 200k small ConfigMaps.
    let mut big = String::with_capacity(52 << 20);
    let mut i = 0;
    while big.len() < 50 << 20 {
        big.push_str(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}, namespace: default, labels: {{app: filler, shard: s{}}}}}\ndata: {{key: value-{i}, other: \"{}\"}}\n---\n",
            i % 97,
            "x".repeat(120)
        ));
        i += 1;
    }
    // Requests run from before the file is written until the agent has read it.
    let during = run("1000000");
    let t0 = Instant::now();
    let reads = node.status()["source_reads"].as_u64().unwrap();
    node.write_manifest("big.yaml", &big);
    node.wait_status("the big file read", T, |s| {
        s["source_reads"].as_u64().unwrap_or(0) > reads
    });
    let parse = t0.elapsed();
    std::fs::write(&stop, "").unwrap();
    let out = Pod::finish_probe(during, T);
    let ok = out["ok"].as_u64().unwrap();
    assert!(ok > 1000 && ok < 1_000_000, "{out}");
    assert!(out["errors"].as_object().unwrap().is_empty(), "{out}");
    let (b, d) = (
        baseline["latency_ms"]["p99"].as_f64().unwrap(),
        out["latency_ms"]["p99"].as_f64().unwrap(),
    );
    eprintln!("parse took {parse:?}; p99 before {b} ms, while parsing {d} ms");
    assert!(
        d - b < 10.0,
        "parsing a 50 MB manifest added {:.1} ms to the proxied p99 ({b} -> {d})",
        d - b
    );
}
