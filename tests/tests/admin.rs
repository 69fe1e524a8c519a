//! Seeing inside a node, against live agents on simulated nodes: every CLI command and admin
//! endpoint (tables and JSON), `explain` for L4, an L7 route with a subset, an ejected
//! backend, a terminating backend and a proxy that is down, the monitor (and its switch: no
//! ring buffer events without a reader), the access log, and a real Prometheus scraping
//! `/metrics` whose PromQL answers match the traffic sent and whose dashboard queries all return
//! data. Needs root.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use tests::k8s::{self, Cond};
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(60);
const NODE: &str = "198.18.0.1";

fn http(client: &Pod, url: &str, count: usize, extra: &[&str]) -> Value {
    let n = count.to_string();
    let mut args = vec!["--url", url, "--count", &n];
    args.extend_from_slice(extra);
    client.probe("http-probe", &args, T)
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// A node with an L4 Service `tcp` (2 ready + 1 terminating endpoints) and an L7 Service `web`
/// (pods v1a, v1b, v2) with a VirtualService routing to subset v1.
fn observed_node(agent_args: &[&str]) -> (SimNode, Pod, Vec<Pod>, Vec<Proc>, Proc) {
    let mut node = SimNode::new();
    let webs: Vec<Pod> = ["v1a", "v1b", "v2"]
        .iter()
        .map(|n| node.add_pod(n))
        .collect();
    let tcps: Vec<Pod> = (1..=3).map(|i| node.add_pod(&format!("tcp{i}"))).collect();
    let client = node.add_pod("client");
    let mut servers: Vec<Proc> = webs
        .iter()
        .map(|p| p.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]))
        .collect();
    servers.extend(
        tcps.iter()
            .map(|p| p.fixture_server("tcp-id", &["--listen", "0.0.0.0:9000"])),
    );
    let ips: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    node.write_manifest(
        "web.yaml",
        &k8s::http_service("web", "198.19.0.10", 80, 8080, &ips),
    );
    let mut pods = String::new();
    for (p, v) in webs.iter().zip(["v1", "v1", "v2"]) {
        pods.push_str(&k8s::pod(&p.name, p.ip, &[("app", "web"), ("version", v)]));
        pods.push_str("---\n");
    }
    pods.push_str(&k8s::pod("client", client.ip, &[("app", "client")]));
    node.write_manifest("pods.yaml", &pods);
    node.write_manifest(
        "policy.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web}\nspec:\n  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web, subset: v1}}]\n",
    );
    node.write_manifest(
        "tcp.yaml",
        &format!(
            "{}---\n{}",
            k8s::service("tcp", "198.19.0.20", 9000, "TCP", ""),
            k8s::slice(
                "tcp-1",
                "tcp",
                9000,
                "TCP",
                &[
                    (tcps[0].ip, Cond::Ready),
                    (tcps[1].ip, Cond::Ready),
                    (tcps[2].ip, Cond::Terminating)
                ]
            )
        ),
    );
    let agent = node.start_agent(agent_args);
    node.wait_l7_routes(1, T);
    let mut all = webs;
    all.extend(tcps);
    (node, client, all, servers, agent)
}

#[test]
fn every_cli_command_and_admin_endpoint_answers_a_live_agent() {
    let (node, client, pods, _servers, _agent) = observed_node(&["--node-ip", NODE]);
    let out = http(&client, "http://198.19.0.10/", 20, &[]);
    assert_eq!(out["ok"], 20, "{out}");

    // status: table and JSON.
    let table = node.cli(&["status"]);
    assert!(table.contains("READY       yes"), "{table}");
    assert!(table.contains("PXA_SVC_V1"), "{table}");
    assert!(
        table.contains(&format!("listening on {NODE}:15001")),
        "{table}"
    );
    let st = json(&node.cli(&["status", "-o", "json"]));
    assert_eq!(
        (st["ready"].as_bool(), st["services"].as_u64()),
        (Some(true), Some(2)),
        "{st}"
    );
    assert_eq!(st["source"], "manifests");
    let svc_map = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "PXA_SVC_V1")
        .unwrap();
    // web: master + 3 slots, tcp: master + 3 slots.
    assert_eq!(svc_map["entries"], 8, "{st}");
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&node.cli(&["status", "-o", "yaml"])).unwrap();
    assert_eq!(yaml["ready"], serde_yaml::Value::Bool(true));

    // services.
    let table = node.cli(&["services"]);
    assert!(table.starts_with("NAMESPACE   NAME   ADDRESS"), "{table}");
    assert!(
        table.contains("198.19.0.20   9000   TCP     ClusterIP   L4     2/1"),
        "{table}"
    );
    assert!(
        table.contains("198.19.0.10   80     TCP     ClusterIP   L7     3/0"),
        "{table}"
    );
    let rows = json(&node.cli(&["services", "-o", "json"]));
    let web = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "web")
        .unwrap();
    assert!(
        web["mode_reason"]
            .as_str()
            .unwrap()
            .contains("port name \"http\""),
        "{web}"
    );

    // service: kernel slots as read from the maps, route, backends with health.
    let table = node.cli(&["service", "default/web"]);
    assert!(table.contains("SLOT   BACKEND-ID   ADDRESS"), "{table}");
    assert!(table.contains("VirtualService default/web"), "{table}");
    assert!(table.contains("default/web:80/v1"), "{table}");
    assert!(table.contains("healthy"), "{table}");
    let svc = json(&node.cli(&["service", "default/web", "-o", "json"]));
    let port = &svc["ports"][0];
    assert_eq!(port["kernel"]["count"], 3, "{svc}");
    assert_eq!(port["kernel"]["l7_flag"], true, "{svc}");
    let backends = port["clusters"][0]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2, "subset v1 has two pods: {svc}");
    let served: u64 = backends
        .iter()
        .map(|b| b["requests_total"].as_u64().unwrap())
        .sum();
    assert_eq!(served, 20, "{svc}");
    let missing = node
        .host_place()
        .command(tests::sys::bin("proxy-agent"), &["service", "default/nope"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no Service default/nope"));

    // routes and clusters.
    let routes = json(&node.cli(&["routes", "-o", "json"]));
    assert_eq!(routes[0]["vip"], "198.19.0.10:80", "{routes}");
    assert_eq!(routes[0]["virtual_service"], "default/web", "{routes}");
    assert!(node.cli(&["routes"]).contains("default/web:80/v1 (100)"));
    let clusters = json(&node.cli(&["clusters", "-o", "json"]));
    assert_eq!(clusters[0]["name"], "default/web:80/v1", "{clusters}");
    assert!(node.cli(&["clusters"]).contains("BACKEND"));

    // problems: none, then a broken manifest with its file, object and field.
    assert_eq!(node.cli(&["problems"]), "no problems\n");
    node.write_manifest(
        "bad.yaml",
        &k8s::service("bad", "198.19.0.30", 80, "TCP", "").replace("port: 80", "port: 99999"),
    );
    let problems = tests::sys::poll("the broken manifest in /problems", T, || {
        let p = json(&node.cli(&["problems", "-o", "json"]));
        (p.as_array().is_some_and(|a| !a.is_empty())).then_some(p)
    });
    assert_eq!(problems[0]["kind"], "Service", "{problems}");
    assert_eq!(problems[0]["object"], "default/bad", "{problems}");
    assert_eq!(problems[0]["field"], "spec.ports[0].port", "{problems}");
    assert!(
        problems[0]["file"].as_str().unwrap().ends_with("bad.yaml"),
        "{problems}"
    );
    assert!(node.cli(&["problems"]).contains("spec.ports[0].port"));
    assert_eq!(node.status()["problems"], 1);
    node.remove_manifest("bad.yaml");
    node.wait_status("no problems", T, |s| s["problems"] == 0);

    // log-level, through the admin API.
    assert_eq!(
        node.cli(&["log-level", "debug"]),
        "log filter is now debug\n"
    );
    assert_eq!(node.admin_json("/logging")["level"], "debug");
    node.cli(&["log-level", "info"]);
    let bad = node
        .host_place()
        .command(
            tests::sys::bin("proxy-agent"),
            &["log-level", "no=such=filter"],
        )
        .output()
        .unwrap();
    assert!(!bad.status.success(), "an invalid filter must be refused");

    // config_dump, dump -o json with the Services named.
    let dump = node.admin_json("/config_dump");
    for key in [
        "status", "objects", "services", "routes", "clusters", "problems",
    ] {
        assert!(dump.get(key).is_some(), "config_dump lacks {key}");
    }
    let d = json(&node.cli(&[
        "dump",
        "--bpffs",
        node.bpffs.to_str().unwrap(),
        "-o",
        "json",
    ]));
    let names: Vec<&str> = d["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["service"].as_str())
        .collect();
    assert_eq!(names, ["default/web", "default/tcp"], "{d}");

    // Health and metrics on the metrics address.
    let ns = node.netns_path();
    for path in ["/ready", "/healthz"] {
        let (code, _) = tests::admin::request(&ns, tests::admin::METRICS, "GET", path).unwrap();
        assert_eq!(code, 200, "{path}");
    }
    let (code, metrics) =
        tests::admin::request(&ns, tests::admin::METRICS, "GET", "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("istio_requests_total{reporter=\"source\""),
        "{metrics}"
    );
    assert!(metrics.contains("source_workload=\"client\""), "{metrics}");
    assert!(metrics.contains("destination_version=\"v1\""), "{metrics}");

    // The admin API stays on loopback unless told otherwise.
    let out = node
        .host_place()
        .command(
            tests::sys::bin("proxy-agent"),
            &[
                "run",
                "--manifests",
                "/nonexistent",
                "--admin-addr",
                "0.0.0.0:15999",
            ],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--admin-addr-unsafe"),
        "{out:?}"
    );
    drop(pods);
}

fn step<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name}: {v}"))
}

#[test]
fn explain_follows_a_connection_through_the_kernel_and_the_proxy() {
    let (node, client, pods, _servers, _agent) = observed_node(&["--node-ip", NODE]);
    let from = client.ip.to_string();
    let explain = |to: &str, extra: &[&str]| {
        let mut args = vec!["explain", "--from", &from, "--to", to, "-o", "json"];
        args.extend_from_slice(extra);
        json(&node.cli(&args))
    };
    // L4, with a terminating endpoint left out while ready ones exist.
    let l4 = explain("198.19.0.20:9000", &[]);
    assert_eq!(l4["service"], "default/tcp", "{l4}");
    assert_eq!(step(&l4, "mode")["verdict"], "L4", "{l4}");
    let kernel = step(&l4, "kernel");
    assert_eq!(kernel["eligible"].as_array().unwrap().len(), 2, "{l4}");
    let excluded = kernel["excluded"].as_array().unwrap();
    assert_eq!(excluded.len(), 1, "{l4}");
    assert_eq!(excluded[0]["address"], format!("{}:9000", pods[5].ip));
    assert!(
        excluded[0]["reason"]
            .as_str()
            .unwrap()
            .contains("terminating"),
        "{l4}"
    );
    let table = node.cli(&["explain", "--from", &from, "--to", "198.19.0.20:9000"]);
    assert!(table.contains("=> L4 in the kernel"), "{table}");

    // L7 with a subset: the v2 pod is outside it.
    let l7 = explain("198.19.0.10:80", &["--path", "/x"]);
    assert_eq!(step(&l7, "mode")["verdict"], "L7", "{l7}");
    assert_eq!(
        step(&l7, "route")["verdict"],
        "VirtualService default/web http[0]",
        "{l7}"
    );
    let d = &step(&l7, "destinations")["destinations"][0];
    assert_eq!(d["subset"], "v1", "{l7}");
    assert_eq!(d["eligible"].as_array().unwrap().len(), 2, "{l7}");
    let out = &d["excluded"][0];
    assert_eq!(out["address"], format!("{}:8080", pods[2].ip), "{l7}");
    assert!(
        out["reason"]
            .as_str()
            .unwrap()
            .contains("outside subset v1 (labels version=v1)"),
        "{l7}"
    );
    assert!(
        step(&l7, "fallback")["detail"]
            .as_str()
            .unwrap()
            .contains("a random one of 3 ready backends"),
        "{l7}"
    );
    assert!(
        step(&l7, "retries")["detail"]
            .as_str()
            .unwrap()
            .contains("reset,connect-failure,503"),
        "{l7}"
    );

    // An ejected backend: v1a answers 500s, consecutive 5xx ejects it.
    node.write_manifest(
        "policy.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web}\nspec:\n  host: web\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 5m, maxEjectionPercent: 50}\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web, subset: v1}}]\n",
    );
    node.wait_status("the new policy", T, |s| {
        s["generation"].as_u64().unwrap_or(0) >= 2
    });
    client.run(
        "curl",
        &["-s", &format!("http://{}:8080/err", pods[0].ip)],
        T,
    );
    tests::sys::poll("v1a to be ejected", T, || {
        http(&client, "http://198.19.0.10/", 5, &[]);
        let c = node.admin_json("/clusters");
        let ejected = c[0]["backends"]
            .as_array()?
            .iter()
            .any(|b| b["health"] == "ejected");
        ejected.then_some(())
    });
    let l7 = explain("198.19.0.10:80", &[]);
    let d = &step(&l7, "destinations")["destinations"][0];
    let reasons: Vec<&str> = d["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("ejected by outlier detection for")),
        "{l7}"
    );
    assert_eq!(d["eligible"].as_array().unwrap().len(), 1, "{l7}");
    let table = node.cli(&["service", "default/web"]);
    assert!(table.contains("ejected"), "{table}");
    let table = node.cli(&["explain", "--from", &from, "--to", "198.19.0.10:80"]);
    assert!(table.contains("not eligible:"), "{table}");
    eprintln!("$ proxy-agent explain --from {from} --to 198.19.0.10:80\n{table}");

    // A proxy that is down: the same question to an agent without the proxy.
    drop((node, client, pods));
    let (node, client, _pods, _servers, _agent) = observed_node(&[]);
    let from = client.ip.to_string();
    let down = json(&node.cli(&[
        "explain",
        "--from",
        &from,
        "--to",
        "198.19.0.10:80",
        "-o",
        "json",
    ]));
    assert_eq!(step(&down, "mode")["verdict"], "L4 (fallback)", "{down}");
    assert!(
        step(&down, "mode")["detail"]
            .as_str()
            .unwrap()
            .contains("the node proxy is off"),
        "{down}"
    );
    assert_eq!(
        step(&down, "kernel")["eligible"].as_array().unwrap().len(),
        3,
        "{down}"
    );
    // Not a Service at all.
    let none = json(&node.cli(&[
        "explain",
        "--from",
        &from,
        "--to",
        "198.19.9.9:80",
        "-o",
        "json",
    ]));
    assert_eq!(none["summary"], "not a Service address", "{none}");
}

fn counters(node: &SimNode) -> Value {
    node.status()["datapath_counters"].clone()
}

#[test]
fn monitor_shows_live_translations_and_the_kernel_writes_no_event_without_a_reader() {
    let (node, client, _pods, _servers, _agent) = observed_node(&["--node-ip", NODE]);
    let tcp = |n: usize| {
        client.probe(
            "tcp-probe",
            &[
                "--to",
                "198.19.0.20:9000",
                "--count",
                &n.to_string(),
                "--read",
                "--timeout-ms",
                "2000",
            ],
            T,
        )
    };
    // Without a reader: translations are counted, no event is written.
    let before = counters(&node);
    assert_eq!(tcp(20)["ok"], 20);
    let after = counters(&node);
    assert!(
        after["connect4"].as_u64().unwrap() >= before["connect4"].as_u64().unwrap() + 20,
        "{before} {after}"
    );
    assert_eq!(
        after["monitor_events"], before["monitor_events"],
        "events were written with no reader: {after}"
    );

    // With a reader: the next connect shows up, with the Service and the backend.
    let mut mon = Proc::spawn(
        "monitor",
        node.host_place().command(
            tests::sys::bin("proxy-agent"),
            // Two events: the switch may turn on between one connection's connect4 and its
            // getpeername4, so the first event can be the latter; the next connect4 follows.
            &["monitor", "-t", "trace", "-o", "json", "--count", "2"],
        ),
        node.dir.join("logs/monitor.log"),
    );
    tests::sys::poll("the monitor to show a connect", T, || {
        tcp(1);
        (!mon.running()).then_some(())
    });
    let lines = mon.all_stdout(T);
    let ev = lines
        .iter()
        .map(|l| json(l.trim()))
        .find(|e| e["hook"] == "connect4")
        .unwrap_or_else(|| panic!("no connect4 event: {lines:?}"));
    assert_eq!(
        (ev["type"].as_str(), ev["hook"].as_str()),
        (Some("trace"), Some("connect4")),
        "{ev}"
    );
    assert_eq!(ev["from"], "198.19.0.20:9000", "{ev}");
    assert_eq!(ev["service"], "default/tcp", "{ev}");
    assert!(
        ev["to"].as_str().unwrap().ends_with(":9000") && ev["comm"] == "fixture",
        "{ev}"
    );
    assert!(
        counters(&node)["monitor_events"].as_u64().unwrap()
            > after["monitor_events"].as_u64().unwrap()
    );

    // L7 request events, in the table format.
    let mut mon = Proc::spawn(
        "monitor-l7",
        node.host_place().command(
            tests::sys::bin("proxy-agent"),
            &["monitor", "-t", "l7", "--count", "1"],
        ),
        node.dir.join("logs/monitor-l7.log"),
    );
    tests::sys::poll("the monitor to show a request", T, || {
        http(&client, "http://198.19.0.10/hello", 1, &[]);
        (!mon.running()).then_some(())
    });
    let line = mon.all_stdout(T).join("\n");
    assert!(
        line.contains(" L7 ")
            && line.contains("default/client")
            && line.contains("/hello")
            && line.contains("subset=v1")
            && line.contains("status=200"),
        "{line}"
    );

    // The readers are gone: the switch is off again.
    let idle = tests::sys::poll("the monitor switch to turn off", T, || {
        let a = counters(&node)["monitor_events"].clone();
        tcp(5);
        let b = counters(&node)["monitor_events"].clone();
        (a == b).then_some(b)
    });
    tcp(20);
    assert_eq!(counters(&node)["monitor_events"], idle);
}

#[test]
fn the_access_log_has_one_json_line_per_request_and_opaque_connection() {
    let mut node = SimNode::new();
    let webs: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let _s: Vec<Proc> = webs
        .iter()
        .map(|p| p.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let ips: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    node.write_manifest(
        "web.yaml",
        &k8s::http_service("web", "198.19.0.10", 80, 8080, &ips),
    );
    let log = node.dir.join("access.log");
    let _agent = node.start_agent(&["--node-ip", NODE, "--access-log", log.to_str().unwrap()]);
    node.wait_l7_routes(1, T);
    assert_eq!(
        http(
            &client,
            "http://198.19.0.10/a?b=1",
            7,
            &["--header", "Host: web.default"]
        )["ok"],
        7
    );
    let lines = tests::sys::poll("7 access log lines", T, || {
        let text = std::fs::read_to_string(&log).ok()?;
        let l: Vec<Value> = text.lines().map(json).collect();
        (l.len() >= 7).then_some(l)
    });
    assert_eq!(lines.len(), 7);
    for l in &lines {
        assert_eq!(
            (
                l["status"].as_u64(),
                l["service"].as_str(),
                l["path"].as_str()
            ),
            (Some(200), Some("default/web"), Some("/a")),
            "{l}"
        );
        assert_eq!(
            (
                l["authority"].as_str(),
                l["route"].as_str(),
                l["attempts"].as_u64()
            ),
            (Some("web.default"), Some("-"), Some(1)),
            "{l}"
        );
        assert!(
            ips.iter().any(|ip| l["backend"] == format!("{ip}:8080")),
            "{l}"
        );
        assert_eq!(l["response_flags"], "-", "{l}");
        assert!(
            l["bytes_sent"].as_u64().unwrap() > 0 && l["duration_ms"].as_f64().unwrap() > 0.0,
            "{l}"
        );
    }
}

/// Runs a PromQL instant query against the Prometheus in the node.
fn promql(node: &SimNode, q: &str) -> Vec<Value> {
    promql_try(node, q).unwrap_or_else(|e| panic!("querying Prometheus: {e}"))
}

/// Like [`promql`], `Err` while Prometheus does not answer.
fn promql_try(node: &SimNode, q: &str) -> std::io::Result<Vec<Value>> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, body) = tests::admin::request(
        &node.netns_path(),
        "127.0.0.1:9090",
        "GET",
        &format!("/api/v1/query?query={enc}"),
    )?;
    if code != 200 {
        // 503 while Prometheus opens its storage.
        return Err(std::io::Error::other(format!("{q}: {code} {body}")));
    }
    let v = json(&body);
    assert_eq!(v["status"], "success", "{q}: {v}");
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn scalar(r: &[Value]) -> Option<f64> {
    r.first()?["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_exact_request_counts_and_every_dashboard_query_returns_data() {
    let mut node = SimNode::new();
    let webs: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let _servers: Vec<Proc> = webs
        .iter()
        .map(|p| p.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let ips: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    let trigger = "  annotations: {endpoints.kubernetes.io/last-change-trigger-time: 'TIME'}\n";
    let web = |t: &str| {
        k8s::http_service("web", "198.19.0.10", 80, 8080, &ips).replace(
            "  labels:\n    kubernetes.io/service-name",
            &format!(
                "{}  labels:\n    kubernetes.io/service-name",
                trigger.replace("TIME", t)
            ),
        )
    };
    node.write_manifest("web.yaml", &web("2026-01-01T00:00:00Z"));
    node.write_manifest(
        "policy.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    retries: {attempts: 1, retryOn: 5xx}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web}\nspec:\n  host: web\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 0}\n",
    );
    let mut pods = String::new();
    for (i, p) in webs.iter().enumerate() {
        pods.push_str(&k8s::pod(
            &format!("web-7d9f8b6c4-{i}x"),
            p.ip,
            &[
                ("app", "web"),
                ("version", "v1"),
                ("pod-template-hash", "7d9f8b6c4"),
            ],
        ));
        pods.push_str("---\n");
    }
    pods.push_str(&k8s::pod("client", client.ip, &[("app", "client")]));
    node.write_manifest("pods.yaml", &pods);
    let _agent = node.start_agent(&["--node-ip", NODE]);
    node.wait_l7_routes(1, T);
    let cfg = node.dir.join("prometheus.yml");
    std::fs::write(&cfg, "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n- job_name: proxy-agent\n  static_configs: [{targets: ['127.0.0.1:15020']}]\n").unwrap();
    let data = node.dir.join("prometheus-data");
    let mut prom = Proc::spawn(
        "prometheus",
        node.host_place().command(
            "prometheus",
            &[
                &format!("--config.file={}", cfg.display()),
                &format!("--storage.tsdb.path={}", data.display()),
                "--web.listen-address=127.0.0.1:9090",
            ],
        ),
        node.dir.join("logs/prometheus.log"),
    );
    tests::sys::poll("Prometheus to scrape the agent", T, || {
        scalar(&promql_try(&node, "up{job=\"proxy-agent\"}").ok()?).filter(|v| *v == 1.0)
    });

    // Known traffic: web1 answers 500 to everything. N GETs all succeed (a GET that hits web1
    // first is retried on web2: `x-proxy-attempts: 2`); POSTs are not retried (not
    // idempotent), so the ones web1 gets answer 500.
    client.run(
        "curl",
        &["-s", &format!("http://{}:8080/err", webs[0].ip)],
        T,
    );
    const N: u64 = 40;
    let mut retried = 0u64;
    for _ in 0..N {
        let out = client.run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %header{x-proxy-attempts}",
                "http://198.19.0.10/",
            ],
            T,
        );
        match out.trim() {
            "200 1" => {}
            "200 2" => retried += 1,
            other => panic!("a GET answered {other:?}"),
        }
    }
    let (mut ok_posts, mut failed_posts) = (0u64, 0u64);
    while failed_posts < 3 {
        let code = client.run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "http://198.19.0.10/",
            ],
            T,
        );
        match code.trim() {
            "500" => failed_posts += 1,
            "200" => ok_posts += 1,
            other => panic!("a POST answered {other:?}"),
        }
    }
    assert!(retried > 0, "no GET went to web1 first in {N}");
    // An opaque connection (not HTTP) on the same port: Istio's TCP metrics.
    let cases = node.dir.join("opaque.json");
    std::fs::write(
        &cases,
        r#"[{"name": "ssh", "request": "SSH-2.0-probe\r\n"}]"#,
    )
    .unwrap();
    client.probe(
        "raw-probe",
        &[
            "--to",
            "198.19.0.10:80",
            "--cases",
            cases.to_str().unwrap(),
            "--idle-ms",
            "300",
        ],
        T,
    );
    // The slice changes with a trigger time: one network programming observation.
    node.write_manifest("web.yaml", &web(&rfc3339_now()));

    let q = |query: &str, want: f64| {
        tests::sys::poll(&format!("{query} == {want}"), T, || {
            scalar(&promql(&node, query)).filter(|v| (*v - want).abs() < 1e-9)
        })
    };
    let svc = "destination_service=\"web.default.svc.cluster.local\",reporter=\"source\"";
    let total = N + ok_posts + failed_posts;
    q(
        &format!("sum(istio_requests_total{{{svc},response_code=\"200\"}})"),
        (N + ok_posts) as f64,
    );
    q(
        &format!("sum(istio_requests_total{{{svc},response_code=\"500\",response_flags=\"-\"}})"),
        failed_posts as f64,
    );
    q(
        "sum(proxy_agent_retries_total{reason=\"status\"})",
        retried as f64,
    );
    q(
        &format!(
            "sum(istio_requests_total{{{svc},source_workload=\"client\",destination_workload=\"web\",destination_version=\"v1\"}})"
        ),
        total as f64,
    );
    q(
        &format!("sum(istio_request_duration_milliseconds_count{{{svc}}})"),
        total as f64,
    );
    q(
        &format!("sum(istio_tcp_connections_opened_total{{{svc},request_protocol=\"tcp\"}})"),
        1.0,
    );

    // Every query of the Grafana dashboard returns data.
    let dash: Value = json(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/proxy-agent-dashboard.json"
        ))
        .unwrap(),
    );
    tests::sys::poll("a network programming observation", T, || {
        scalar(&promql(
            &node,
            "sum(proxy_agent_network_programming_duration_seconds_count)",
        ))
        .filter(|v| *v >= 1.0)
    });
    let mut n = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", ".*")
                .replace("$service", ".*")
                .replace("$instance", ".*");
            let r = tests::sys::poll(&format!("dashboard query {expr} to return data"), T, || {
                let r = promql(&node, &expr);
                (!r.is_empty()).then_some(r)
            });
            assert!(!r.is_empty());
            n += 1;
        }
    }
    assert!(n >= 15, "the dashboard has {n} queries");
    prom.terminate(T);
}

/// Now as RFC 3339, for trigger-time annotations.
fn rfc3339_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", d.as_secs()),
            "+%Y-%m-%dT%H:%M:%SZ",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn ebpf_debug_logs_are_off_unless_asked_and_reach_the_agent_log() {
    let mut node = SimNode::new();
    let client = node.add_pod("client");
    // A Service without endpoints: connects are refused in the kernel.
    node.write_manifest(
        "empty.yaml",
        &format!(
            "{}---\n{}",
            k8s::service("empty", "198.19.0.40", 80, "TCP", ""),
            k8s::slice("empty-1", "empty", 8080, "TCP", &[])
        ),
    );
    let refuse = || {
        let out = client.probe(
            "tcp-probe",
            &[
                "--to",
                "198.19.0.40:80",
                "--count",
                "3",
                "--timeout-ms",
                "2000",
            ],
            T,
        );
        assert_eq!(out["ok"], 0, "{out}");
    };
    let mut quiet = node.start_agent(&[]);
    refuse();
    assert_eq!(counters(&node)["refused_no_backend"], 3);
    assert!(
        !quiet.log_text().contains("proxy_ebpf"),
        "eBPF logs without --bpf-log: {}",
        quiet.log_text()
    );
    quiet.terminate(T);
    // With a level, the programs are re-attached (another link next to the old one) and log.
    let agent = node.start_agent(&["--bpf-log", "debug"]);
    assert_eq!(node.status()["datapath"]["adopted"], false);
    tests::sys::poll("an eBPF refusal log line in the agent log", T, || {
        refuse();
        let log = agent.log_text();
        log.lines()
            .find(|l| l.contains("proxy_ebpf") && l.contains("refused 198.19.0.40:80"))
            .map(String::from)
    });
}
