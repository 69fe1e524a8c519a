//! What kube-proxy carried, the node proxy must carry too: WebSockets, server-first and plain
//! TCP protocols on ports named `http*`, full-duplex and gRPC streaming, large uploads and
//! downloads at constant memory, server-sent events, trailers, CONNECT. Each case is run
//! through the ClusterIP (redirected to the proxy) and directly to the pod, and must behave the
//! same. Needs root.

use std::time::Duration;

use serde_json::Value;
use tests::k8s;
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(180);
const VIP: &str = "198.19.0.10";

/// A node with one pod running `fixture KIND --listen 0.0.0.0:8080`, a client pod, and a
/// Service `svc` on VIP:80 whose port is named `port_name`, with `annotations`.
fn node_with(
    kind: &str,
    port_name: &str,
    annotations: &[(&str, &str)],
) -> (SimNode, Pod, Pod, Proc) {
    let mut node = SimNode::new();
    let pod = node.add_pod(&format!("{kind}1"));
    let client = node.add_pod("client");
    let server = pod.fixture_server(kind, &["--listen", "0.0.0.0:8080"]);
    let mut yaml = k8s::service_with_endpoints("svc", VIP, 80, "TCP", 8080, &[pod.ip])
        .replace("- name: p\n", &format!("- name: {port_name}\n"));
    if !annotations.is_empty() {
        let mut a = String::from("  annotations:\n");
        for (k, v) in annotations {
            a.push_str(&format!("    {k}: \"{v}\"\n"));
        }
        yaml = yaml.replacen(
            "  namespace: default\nspec:",
            &format!("  namespace: default\n{a}spec:"),
            1,
        );
    }
    node.write_manifest("svc.yaml", &yaml);
    (node, pod, client, server)
}

fn start_agent(node: &SimNode) -> Proc {
    let agent = node.start_agent(&["--node-ip", "198.18.0.1"]);
    node.wait_l7_routes(1, T);
    agent
}

/// Runs a probe through the ClusterIP and directly to the pod (`{}` in `args` is the address,
/// `VIP:80` or `POD:8080`); returns both reports.
fn both(
    client: &Pod,
    pod: &Pod,
    kind: &str,
    args: &[&str],
    fmt: impl Fn(&str) -> String,
) -> (Value, Value) {
    let run = |addr: &str| {
        let target = fmt(addr);
        let a: Vec<&str> = args
            .iter()
            .map(|s| if *s == "{}" { target.as_str() } else { s })
            .collect();
        client.probe(kind, &a, T)
    };
    let vip = run(&format!("{VIP}:80"));
    let direct = run(&format!("{}:8080", pod.ip));
    eprintln!("{kind} {args:?}\n  through the ClusterIP: {vip}\n  direct: {direct}");
    (vip, direct)
}

#[test]
fn a_websocket_upgrades_and_echoes_through_the_clusterip() {
    let (node, pod, client, _server) = node_with("stream", "http-ws", &[]);
    let _agent = start_agent(&node);
    let (vip, direct) = both(
        &client,
        &pod,
        "ws-probe",
        &["--url", "{}", "--messages", "20"],
        |a| format!("ws://{a}/ws"),
    );
    assert_eq!(direct["ok"], true, "direct: {direct}");
    assert_eq!(vip["ok"], true, "through the ClusterIP: {vip}");
    assert_eq!(
        (vip["status"].as_u64(), vip["echoed"].as_u64()),
        (Some(101), Some(20)),
        "{vip}"
    );
}

#[test]
fn a_server_first_protocol_gets_its_banner_within_the_detection_timeout() {
    let (node, pod, client, _server) = node_with("banner", "http", &[]);
    let mut agent = start_agent(&node);
    let (vip, direct) = both(
        &client,
        &pod,
        "banner-probe",
        &["--to", "{}"],
        str::to_string,
    );
    assert_eq!(direct["ok"], true, "direct: {direct}");
    assert_eq!(vip["ok"], true, "through the ClusterIP: {vip}");
    // The same server's banner; it names the client it saw: the node (through the proxy) or
    // the pod (directly).
    let server = |r: &Value| {
        r["banner"]
            .as_str()
            .and_then(|b| b.split(" from ").next())
            .map(str::to_string)
    };
    assert_eq!(server(&vip), server(&direct), "{vip} {direct}");
    assert!(server(&vip).is_some(), "{vip}");
    assert_eq!(vip["echo_ok"], true, "{vip}");
    let ms = vip["banner_ms"].as_f64().unwrap();
    assert!(
        (900.0..1500.0).contains(&ms),
        "the banner came after {ms} ms: it must wait for the 1 s detection timeout, then flow"
    );
    agent.wait_log_count("reason=\"detect-timeout\"", 1, T);
}

#[test]
fn the_opaque_annotation_makes_a_server_first_protocol_instant() {
    let (node, pod, client, _server) =
        node_with("banner", "http", &[("proxy-agent.io/protocol", "opaque")]);
    let mut agent = start_agent(&node);
    let (vip, direct) = both(
        &client,
        &pod,
        "banner-probe",
        &["--to", "{}"],
        str::to_string,
    );
    assert_eq!(
        (vip["ok"].as_bool(), direct["ok"].as_bool()),
        (Some(true), Some(true)),
        "{vip} {direct}"
    );
    let ms = vip["banner_ms"].as_f64().unwrap();
    assert!(ms < 200.0, "with protocol: opaque the banner took {ms} ms");
    agent.wait_log_count("reason=\"configured\"", 1, T);
}

#[test]
fn a_detect_timeout_annotation_shortens_the_wait() {
    let (node, _pod, client, _server) = node_with(
        "banner",
        "http",
        &[("proxy-agent.io/detect-timeout", "200ms")],
    );
    let _agent = start_agent(&node);
    let vip = client.probe("banner-probe", &["--to", &format!("{VIP}:80")], T);
    let ms = vip["banner_ms"].as_f64().unwrap();
    assert!(
        (150.0..700.0).contains(&ms),
        "banner after {ms} ms with a 200 ms detection timeout: {vip}"
    );
}

#[test]
fn plain_tcp_on_a_port_named_http_is_detected_as_opaque_and_keeps_half_close() {
    let (node, pod, client, _server) = node_with("tcp-echo", "http", &[]);
    let mut agent = start_agent(&node);
    let (vip, direct) = both(
        &client,
        &pod,
        "tcp-echo-probe",
        &["--to", "{}", "--bytes", "100000"],
        str::to_string,
    );
    assert_eq!(direct["ok"], true, "direct: {direct}");
    assert_eq!(vip["ok"], true, "through the ClusterIP: {vip}");
    assert_eq!(vip["reply"], direct["reply"]);
    agent.wait_log_count("reason=\"not-http\"", 1, T);
}

#[test]
fn a_full_duplex_request_is_answered_before_its_body_ends() {
    let (node, pod, client, _server) = node_with("stream", "http-stream", &[]);
    let _agent = start_agent(&node);
    for h2 in [false, true] {
        let mut args = vec!["--url", "{}", "--mode", "duplex", "--chunks", "5"];
        if h2 {
            args.push("--http2");
        }
        let (vip, direct) = both(&client, &pod, "stream-probe", &args, |a| {
            format!("http://{a}")
        });
        assert_eq!(direct["ok"], true, "direct (h2: {h2}): {direct}");
        assert_eq!(vip["ok"], true, "through the ClusterIP (h2: {h2}): {vip}");
        assert_eq!(vip["echoed"], 5, "{vip}");
    }
}

#[test]
fn grpc_client_streaming_and_bidi_streaming_calls_work() {
    let (node, pod, client, _server) = node_with("grpc", "grpc", &[]);
    let _agent = start_agent(&node);
    for mode in ["collect", "chat"] {
        let (vip, direct) = both(
            &client,
            &pod,
            "grpc-probe",
            &["--url", "{}", "--mode", mode, "--messages", "20"],
            |a| format!("http://{a}"),
        );
        assert_eq!(direct["ok"], true, "direct {mode}: {direct}");
        assert_eq!(vip["ok"], true, "through the ClusterIP {mode}: {vip}");
        assert_eq!(
            (vip["count"].clone(), vip["sum"].clone()),
            (direct["count"].clone(), direct["sum"].clone())
        );
    }
}

#[test]
fn a_100_mb_upload_and_download_stream_at_constant_memory() {
    let (node, pod, client, _server) = node_with("stream", "http", &[]);
    let agent = start_agent(&node);
    // Warm up the proxy's pools and allocator before the baseline.
    let warm = client.probe(
        "stream-probe",
        &[
            "--url",
            &format!("http://{VIP}:80"),
            "--mode",
            "upload",
            "--bytes",
            "1048576",
        ],
        T,
    );
    assert_eq!(warm["ok"], true, "{warm}");
    let before = tests::sys::rss_kib(agent.pid());
    let mut peak = before;
    for mode in ["upload", "download"] {
        let (vip, direct) = both(
            &client,
            &pod,
            "stream-probe",
            &["--url", "{}", "--mode", mode, "--bytes", "104857600"],
            |a| format!("http://{a}"),
        );
        peak = peak.max(tests::sys::rss_kib(agent.pid()));
        assert_eq!(direct["ok"], true, "direct {mode}: {direct}");
        assert_eq!(vip["ok"], true, "through the ClusterIP {mode}: {vip}");
        if mode == "download" {
            assert_eq!(
                (vip["bytes"].as_u64(), vip["pattern_ok"].as_bool()),
                (Some(104_857_600), Some(true)),
                "{vip}"
            );
        } else {
            assert_eq!(
                (vip["server_bytes"].as_u64(), vip["fnv64_match"].as_bool()),
                (Some(104_857_600), Some(true)),
                "{vip}"
            );
        }
    }
    let grown = peak.saturating_sub(before);
    eprintln!("proxy RSS before {before} KiB, peak {peak} KiB");
    assert!(
        grown < 20 * 1024,
        "the proxy's RSS grew by {} MiB while streaming 100 MB each way",
        grown / 1024
    );
}

#[test]
fn server_sent_events_are_flushed_one_by_one() {
    let (node, pod, client, _server) = node_with("stream", "http", &[]);
    let _agent = start_agent(&node);
    for h2 in [false, true] {
        let mut args = vec![
            "--url",
            "{}",
            "--mode",
            "sse",
            "--events",
            "5",
            "--interval-ms",
            "300",
        ];
        if h2 {
            args.push("--http2");
        }
        let (vip, direct) = both(&client, &pod, "stream-probe", &args, |a| {
            format!("http://{a}")
        });
        assert_eq!(direct["ok"], true, "direct: {direct}");
        assert_eq!(vip["ok"], true, "through the ClusterIP: {vip}");
        assert_eq!(vip["content_type"], direct["content_type"]);
        let gap = vip["min_gap_ms"].as_f64().unwrap();
        assert!(
            gap > 150.0,
            "events arrived {gap} ms apart: buffered, not flushed one by one ({vip})"
        );
    }
}

#[test]
fn request_and_response_trailers_pass_both_ways() {
    let (node, pod, client, _server) = node_with("stream", "http", &[]);
    let _agent = start_agent(&node);
    for h2 in [false, true] {
        let mut args = vec![
            "--url",
            "{}",
            "--mode",
            "trailers",
            "--trailer",
            "x-extra=e1",
        ];
        if h2 {
            args.push("--http2");
        }
        let (vip, direct) = both(&client, &pod, "stream-probe", &args, |a| {
            format!("http://{a}")
        });
        assert_eq!(direct["ok"], true, "direct (h2: {h2}): {direct}");
        assert_eq!(vip["ok"], true, "through the ClusterIP (h2: {h2}): {vip}");
        assert_eq!(
            vip["trailers"], direct["trailers"],
            "trailers differ (h2: {h2})"
        );
        assert_eq!(vip["body"], direct["body"]);
    }
    // Trailers of a large (not replayable) streamed upload arrive too.
    let vip = client.probe(
        "stream-probe",
        &[
            "--url",
            &format!("http://{VIP}:80"),
            "--mode",
            "upload",
            "--bytes",
            "1000000",
            "--trailer",
            "x-sum=42",
        ],
        T,
    );
    assert_eq!(vip["ok"], true, "{vip}");
    assert_eq!(vip["server_trailers"]["x-sum"], "42", "{vip}");
}

/// Raw HTTP/1.1 exchanges through the ClusterIP: (name, request) → the raw-probe report.
fn raw(node: &SimNode, client: &Pod, cases: &[(&str, &str)]) -> Vec<Value> {
    let list: Vec<Value> = cases
        .iter()
        .map(|(n, r)| serde_json::json!({"name": n, "request": r}))
        .collect();
    let file = node.dir.join(format!("cases-{}.json", cases[0].0));
    std::fs::write(&file, serde_json::to_string(&list).unwrap()).unwrap();
    let out = client.probe(
        "raw-probe",
        &[
            "--to",
            &format!("{VIP}:80"),
            "--cases",
            file.to_str().unwrap(),
            "--idle-ms",
            "1500",
        ],
        T,
    );
    out["cases"].as_array().cloned().unwrap_or_default()
}

#[test]
fn connect_tunnels_and_h2c_upgrades_are_declined_politely() {
    let (node, _pod, client, server) = node_with("stream", "http", &[]);
    let _agent = start_agent(&node);
    let out = raw(
        &node,
        &client,
        &[
            (
                "connect",
                "CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\nhello through the tunnel",
            ),
            (
                "h2c-upgrade",
                "GET /plain HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            ),
        ],
    );
    assert_eq!(out[0]["statuses"], serde_json::json!([200]), "{:?}", out[0]);
    assert!(
        out[0]["response_head"]
            .as_str()
            .unwrap_or("")
            .contains("hello through the tunnel"),
        "the tunnel did not echo: {:?}",
        out[0]
    );
    assert_eq!(
        out[1]["statuses"],
        serde_json::json!([200]),
        "h2c must be declined, not 101: {:?}",
        out[1]
    );
    let log = server.log_text();
    assert!(log.contains("CONNECT db.example:5432"), "{log}");
    assert!(
        log.contains("HTTP/1.1 GET /plain 200") || log.contains("GET /plain 200"),
        "{log}"
    );
}

#[test]
fn http2_extended_connect_and_connect_tunnel_through_the_proxy() {
    let (node, _pod, client, server) = node_with("stream", "http", &[]);
    let _agent = start_agent(&node);
    for mode in ["websocket", "connect"] {
        let out = client.probe(
            "h2-tunnel-probe",
            &["--to", &format!("{VIP}:80"), "--mode", mode],
            T,
        );
        assert_eq!(out["ok"], true, "{mode}: {out}");
    }
    // RFC 8441 became an HTTP/1.1 upgrade to the backend; CONNECT stayed CONNECT.
    let log = server.log_text();
    assert!(log.contains("GET /ws 101"), "{log}");
    assert!(log.contains("CONNECT db.example:5432 200"), "{log}");
}
