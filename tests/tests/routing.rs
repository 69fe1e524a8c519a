//! Routing what users really write: Istio's Bookinfo traffic-management samples, applied
//! unchanged (`tests/fixtures/bookinfo`, copied from istio/istio) through the API server double,
//! behave as the Istio task pages say (request routing, fault injection, traffic shifting); and
//! the VirtualService `http[]` features around them (matches, rewrites, redirects, direct
//! responses, header edits, CORS) with real clients. Needs root.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tests::apiserver::ApiServer;
use tests::k8s;
use tests::scenarios::tally;
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(120);

fn sample(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/bookinfo")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Bookinfo on one node: its four Services (port 9080, named `http`) and pods labelled as
/// Bookinfo's are (`app`, `version`), each answering with its pod name in `x-server-id`.
struct Bookinfo {
    node: SimNode,
    api: ApiServer,
    client: Pod,
    _servers: Vec<Proc>,
    _agent: Proc,
}

const SERVICES: [(&str, &str, &[&str]); 4] = [
    ("productpage", "198.19.0.11", &["v1"]),
    ("reviews", "198.19.0.12", &["v1", "v2", "v3"]),
    ("ratings", "198.19.0.13", &["v1"]),
    ("details", "198.19.0.14", &["v1"]),
];

fn bookinfo() -> Bookinfo {
    let mut node = SimNode::new();
    let api = ApiServer::start(Some(&node.netns_path()));
    let kubeconfig = node.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let mut servers = Vec::new();
    for (app, vip, versions) in SERVICES {
        let mut ips: Vec<Ipv4Addr> = Vec::new();
        let mut refs = Vec::new();
        for v in versions {
            let name = format!("{app}-{v}");
            let pod = node.add_pod(&name);
            servers.push(pod.fixture_server("web", &["--listen", "0.0.0.0:9080", "--version", v]));
            api.apply_yaml(&k8s::pod(&name, pod.ip, &[("app", app), ("version", v)]));
            ips.push(pod.ip);
            refs.push((pod.ip, name));
        }
        let refs: Vec<(Ipv4Addr, &str)> = refs.iter().map(|(ip, n)| (*ip, n.as_str())).collect();
        api.apply_yaml(&k8s::with_target_refs(
            &k8s::http_service(app, vip, 9080, 9080, &ips),
            &refs,
        ));
    }
    let client = node.add_pod("client");
    let agent = node.start_agent_kube(&kubeconfig, &["--node-ip", "198.18.0.1"]);
    node.wait_l7_routes(4, T);
    Bookinfo {
        node,
        api,
        client,
        _servers: servers,
        _agent: agent,
    }
}

/// A rule in one line: `header end-user=jason -> v2:100`, with its fault if it has one.
fn rule_line(r: &Value) -> String {
    let matches: Vec<String> = r["match"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m.as_str().unwrap_or_default().to_string())
        .collect();
    let dests: Vec<String> = r["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| format!("{}:{}", d["subset"].as_str().unwrap_or("-"), d["weight"]))
        .collect();
    let mut line = format!(
        "{} -> {}",
        if matches.is_empty() {
            "any".to_string()
        } else {
            matches.join(" | ")
        },
        dests.join(",")
    );
    if let Some(f) = r["fault"].as_object() {
        if let Some(d) = f["delay_ms"].as_u64() {
            line.push_str(&format!(" delay {d}ms"));
        }
        if let Some(a) = f["abort"].as_str() {
            line.push_str(&format!(" abort {a}"));
        }
    }
    line
}

impl Bookinfo {
    /// `kubectl apply` of a sample, then waits until the proxy routes `vip` by exactly `rules`.
    fn apply(&self, file: &str, vip: &str, rules: &[&str]) {
        self.api.apply_yaml(&sample(file));
        let key = format!("{vip}:9080");
        let mut last = Vec::new();
        let deadline = std::time::Instant::now() + T;
        loop {
            let routes = self.node.admin_json("/routes");
            if let Some(r) = routes
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["vip"] == key.as_str())
            {
                last = r["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(rule_line)
                    .collect::<Vec<_>>();
                if last == rules {
                    break;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{file}: {vip} is routed by {last:?}, expected {rules:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = self.node.status();
        assert_eq!(
            st["problems"],
            0,
            "{file} applies unchanged: {}",
            self.node.admin_json("/problems")
        );
    }

    /// `count` requests to `vip` (optionally as `end-user: jason`); the report.
    fn get(&self, vip: &str, count: usize, jason: bool) -> Value {
        let url = format!("http://{vip}:9080/");
        let n = count.to_string();
        // Long enough for the 7 s delay fault.
        let mut args = vec![
            "--url",
            url.as_str(),
            "--count",
            &n,
            "--concurrency",
            "4",
            "--timeout-ms",
            "15000",
        ];
        if jason {
            args.extend_from_slice(&["--header", "end-user: jason"]);
        }
        self.client.probe("http-probe", &args, T)
    }

    /// Pods that answered, by name.
    fn versions(&self, vip: &str, count: usize, jason: bool) -> BTreeMap<String, u64> {
        let out = self.get(vip, count, jason);
        assert_eq!(out["ok"], count as u64, "{out}");
        tally(&out, "server_ids")
    }
}

fn only(pod: &str, n: u64) -> BTreeMap<String, u64> {
    [(pod.to_string(), n)].into()
}

/// Within `bound` (absolute share) of `share` of `n`.
fn near(got: u64, n: u64, share: f64, bound: f64) -> bool {
    ((got as f64 / n as f64) - share).abs() <= bound
}

#[test]
fn bookinfo_request_routing_fault_injection_and_traffic_shifting_behave_as_istio_documents() {
    let b = bookinfo();
    const REVIEWS: &str = "198.19.0.12";
    const RATINGS: &str = "198.19.0.13";
    b.api.apply_yaml(&sample("destination-rule-all.yaml"));
    // Request routing: every Service to v1.
    b.apply("virtual-service-all-v1.yaml", REVIEWS, &["any -> v1:100"]);
    assert_eq!(b.versions(REVIEWS, 60, false), only("reviews-v1", 60));
    assert_eq!(b.versions(REVIEWS, 20, true), only("reviews-v1", 20));
    for (app, vip, _) in SERVICES {
        assert_eq!(b.versions(vip, 5, false), only(&format!("{app}-v1"), 5));
    }
    // Routing by user identity: jason sees v2, everyone else v1.
    b.apply(
        "virtual-service-reviews-test-v2.yaml",
        REVIEWS,
        &["header end-user=jason -> v2:100", "any -> v1:100"],
    );
    assert_eq!(b.versions(REVIEWS, 40, true), only("reviews-v2", 40));
    assert_eq!(b.versions(REVIEWS, 40, false), only("reviews-v1", 40));

    // Fault injection, delay: jason's ratings calls take 7 s, nobody else's.
    b.apply(
        "virtual-service-ratings-test-delay.yaml",
        RATINGS,
        &[
            "header end-user=jason -> v1:100 delay 7000ms",
            "any -> v1:100",
        ],
    );
    let slow = b.get(RATINGS, 1, true);
    assert_eq!(slow["ok"], 1, "{slow}");
    let ms = slow["latency_ms"]["p50"].as_f64().unwrap();
    assert!(
        (7000.0..9000.0).contains(&ms),
        "jason's request took {ms} ms: {slow}"
    );
    let fast = b.get(RATINGS, 20, false);
    assert_eq!(fast["ok"], 20, "{fast}");
    assert!(
        fast["latency_ms"]["p99"].as_f64().unwrap() < 1000.0,
        "{fast}"
    );
    // Fault injection, abort: jason gets HTTP 500 from ratings, everyone else 200.
    b.apply(
        "virtual-service-ratings-test-abort.yaml",
        RATINGS,
        &[
            "header end-user=jason -> v1:100 abort Http(500)",
            "any -> v1:100",
        ],
    );
    let aborted = b.get(RATINGS, 30, true);
    assert_eq!(
        tally(&aborted, "status"),
        [("500".to_string(), 30)].into(),
        "{aborted}"
    );
    assert_eq!(b.versions(RATINGS, 30, false), only("ratings-v1", 30));

    // Routing by identity to v2, everyone else to v3.
    b.apply(
        "virtual-service-reviews-jason-v2-v3.yaml",
        REVIEWS,
        &["header end-user=jason -> v2:100", "any -> v3:100"],
    );
    assert_eq!(b.versions(REVIEWS, 30, true), only("reviews-v2", 30));
    assert_eq!(b.versions(REVIEWS, 30, false), only("reviews-v3", 30));

    // Traffic shifting. 1000 requests: a share is within 6 points of its weight (more than 4
    // standard deviations of a binomial with n = 1000).
    let n = 1000;
    b.apply(
        "virtual-service-reviews-50-v3.yaml",
        REVIEWS,
        &["any -> v1:50,v3:50"],
    );
    let v = b.versions(REVIEWS, n, false);
    assert_eq!(
        v.keys().collect::<Vec<_>>(),
        ["reviews-v1", "reviews-v3"],
        "{v:?}"
    );
    assert!(near(v["reviews-v3"], n as u64, 0.5, 0.06), "{v:?}");
    b.apply(
        "virtual-service-reviews-80-20.yaml",
        REVIEWS,
        &["any -> v1:80,v2:20"],
    );
    let v = b.versions(REVIEWS, n, false);
    assert_eq!(
        v.keys().collect::<Vec<_>>(),
        ["reviews-v1", "reviews-v2"],
        "{v:?}"
    );
    assert!(near(v["reviews-v2"], n as u64, 0.2, 0.06), "{v:?}");
    b.apply(
        "virtual-service-reviews-v2-v3.yaml",
        REVIEWS,
        &["any -> v2:50,v3:50"],
    );
    let v = b.versions(REVIEWS, n, true);
    assert_eq!(
        v.keys().collect::<Vec<_>>(),
        ["reviews-v2", "reviews-v3"],
        "{v:?}"
    );
    assert!(near(v["reviews-v2"], n as u64, 0.5, 0.06), "{v:?}");

    // explain names the rule that matched.
    let e = b.node.cli(&[
        "explain",
        "--from",
        &b.client.ip.to_string(),
        "--to",
        &format!("{RATINGS}:9080"),
        "--header",
        "end-user: jason",
    ]);
    assert!(
        e.contains("VirtualService default/ratings http[0] matches GET / by its match[0]"),
        "{e}"
    );
    assert!(e.contains("aborted with Http(500)"), "{e}");
}

/// The sniffer's records (one JSON object per request it received).
fn sniffed(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `curl -si` from the client: status, headers (lower-case names) and body.
fn curl(client: &Pod, args: &[&str]) -> (u16, BTreeMap<String, String>, String) {
    let mut all = vec!["-sS", "-i", "--max-time", "10"];
    all.extend_from_slice(args);
    let out = client.run("curl", &all, T);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {out}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

#[test]
fn rewrites_redirects_direct_responses_header_edits_and_cors_work_for_curl() {
    let mut node = SimNode::new();
    let web = node.add_pod("web1");
    let client = node.add_pod("client");
    let record = node.dir.join("sniffed.jsonl");
    let _sniffer = web.fixture_server(
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
        &k8s::http_service("web", "198.19.0.10", 80, 8080, &[web.ip]),
    );
    node.write_manifest(
        "vs.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web.default.svc.cluster.local]
  http:
  - name: moved
    match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - name: gone
    match: [{uri: {exact: /gone}}]
    directResponse: {status: 410, body: {string: "gone for good"}}
  - name: api
    match: [{uri: {prefix: /api/}, ignoreUriCase: true}]
    rewrite: {uri: /v2/, authority: web.internal}
    headers:
      request: {set: {x-route: api}, remove: [x-secret]}
      response: {set: {x-served-by: proxy-agent}}
    corsPolicy:
      allowOrigins: [{exact: "https://app.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      maxAge: 1h
    route: [{destination: {host: web}}]
  - name: items
    match: [{uri: {regex: "/items/[0-9]+"}, method: {exact: GET}}]
    rewrite: {uriRegexRewrite: {match: "^/items/([0-9]+)$", rewrite: '/item/\1/detail'}}
    route: [{destination: {host: web}}]
"#,
    );
    let _agent = node.start_agent(&["--node-ip", "198.18.0.1"]);
    node.wait_l7_routes(1, T);
    assert_eq!(
        node.status()["problems"],
        0,
        "{}",
        node.admin_json("/problems")
    );
    let url = |p: &str| format!("http://198.19.0.10{p}");

    // redirect: the path replaced, the query kept, the proxy answers.
    let (s, h, _) = curl(&client, &[&url("/old/x?q=1")]);
    assert_eq!(s, 302);
    assert_eq!(h["location"], "http://198.19.0.10/new?q=1");
    // directResponse.
    let (s, _, body) = curl(&client, &[&url("/gone")]);
    assert_eq!((s, body.as_str()), (410, "gone for good"));
    // No rule matches: 404 from the proxy, naming why.
    let (s, h, _) = curl(&client, &[&url("/elsewhere")]);
    assert_eq!((s, h["x-proxy-error"].as_str()), (404, "route-not-found"));
    let (s, _, _) = curl(&client, &["-X", "POST", &url("/items/7")]);
    assert_eq!(s, 404, "the items rule is for GET only");
    assert!(sniffed(&record).is_empty(), "nothing reached the pod yet");

    // rewrite + header edits, case-insensitive prefix.
    let (s, h, _) = curl(
        &client,
        &[
            "-H",
            "x-secret: s3",
            "-H",
            "x-route: client",
            &url("/API/users?id=1"),
        ],
    );
    assert_eq!(s, 200);
    assert_eq!(h["x-served-by"], "proxy-agent");
    let (s, _, _) = curl(&client, &[&url("/items/42")]);
    assert_eq!(s, 200);
    let rec = sniffed(&record);
    assert_eq!(rec.len(), 2, "{rec:?}");
    assert_eq!(rec[0]["path"], "/v2/users?id=1", "{rec:?}");
    assert_eq!(rec[0]["headers"]["host"], "web.internal", "{rec:?}");
    assert_eq!(rec[0]["headers"]["x-route"], "api", "{rec:?}");
    assert!(rec[0]["headers"].get("x-secret").is_none(), "{rec:?}");
    assert_eq!(rec[1]["path"], "/item/42/detail", "{rec:?}");

    // CORS: a preflight from an allowed origin is answered by the proxy; a request from it gets
    // Access-Control-Allow-Origin; another origin gets nothing.
    let (s, h, _) = curl(
        &client,
        &[
            "-X",
            "OPTIONS",
            "-H",
            "Origin: https://app.example",
            "-H",
            "Access-Control-Request-Method: POST",
            &url("/api/x"),
        ],
    );
    assert_eq!(s, 200);
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-methods"], "GET,POST");
    assert_eq!(h["access-control-allow-headers"], "x-custom");
    assert_eq!(h["access-control-max-age"], "3600");
    assert_eq!(
        sniffed(&record).len(),
        2,
        "the preflight never reached the pod"
    );
    let (_, h, _) = curl(
        &client,
        &["-H", "Origin: https://app.example", &url("/api/x")],
    );
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    let (_, h, _) = curl(
        &client,
        &["-H", "Origin: https://evil.example", &url("/api/x")],
    );
    assert!(!h.contains_key("access-control-allow-origin"), "{h:?}");
}
