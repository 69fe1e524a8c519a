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

// ------------------------------------------------------------------ Gateway API (GAMMA)

const MESH_NS: &str = "gateway-conformance-mesh";

fn conformance(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/gateway-api")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The Gateway API mesh conformance setup on one node: Services `echo` (both versions),
/// `echo-v1` and `echo-v2` in gateway-conformance-mesh with the ports of the conformance
/// manifests (http 80 → 8080, http-alt 8080, grpc 7070), and pods `echo-v1`/`echo-v2` running
/// the conformance-style echo server (8080) and a gRPC server (7070).
struct Mesh {
    node: SimNode,
    api: ApiServer,
    client: Pod,
    v2: Pod,
    /// Paths of the requests echo-v2 received, one per line.
    v2_record: PathBuf,
    _servers: Vec<Proc>,
    _agent: Proc,
}

/// ClusterIPs of echo, echo-v1, echo-v2.
const ECHO: &str = "198.19.2.10";
const ECHO_V1: &str = "198.19.2.11";
const ECHO_V2: &str = "198.19.2.12";

fn mesh_service(name: &str, ip: &str, pods: &[(Ipv4Addr, &str)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {MESH_NS}}}\nspec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, appProtocol: http}}\n  - {{name: http-alt, port: 8080, appProtocol: http}}\n  - {{name: grpc, port: 7070, appProtocol: grpc}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {MESH_NS}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: http-alt, port: 8080, protocol: TCP}}\n- {{name: grpc, port: 7070, protocol: TCP}}\nendpoints:\n"
    );
    for (ip, pod) in pods {
        y.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}, namespace: {MESH_NS}}}\n"
        ));
    }
    y
}

fn mesh() -> Mesh {
    let mut node = SimNode::new();
    let api = ApiServer::start(Some(&node.netns_path()));
    let kubeconfig = node.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    let v2_record = node.dir.join("echo-v2.paths");
    for v in ["v1", "v2"] {
        let name = format!("echo-{v}");
        let pod = node.add_pod(&name);
        let record = node.dir.join(format!("{name}.paths"));
        servers.push(pod.fixture_server(
            "echo",
            &[
                "--listen",
                "0.0.0.0:8080",
                "--namespace",
                MESH_NS,
                "--record",
                record.to_str().unwrap(),
            ],
        ));
        servers.push(pod.fixture_server("grpc", &["--listen", "0.0.0.0:7070"]));
        api.apply_yaml(
            &k8s::pod(&name, pod.ip, &[("app", "echo"), ("version", v)])
                .replace("namespace: default", &format!("namespace: {MESH_NS}")),
        );
        pods.push((pod, name));
    }
    let refs: Vec<(Ipv4Addr, &str)> = pods.iter().map(|(p, n)| (p.ip, n.as_str())).collect();
    api.apply_yaml(&mesh_service("echo", ECHO, &refs));
    api.apply_yaml(&mesh_service("echo-v1", ECHO_V1, &refs[..1]));
    api.apply_yaml(&mesh_service("echo-v2", ECHO_V2, &refs[1..]));
    let client = node.add_pod("client");
    let agent = node.start_agent_kube(&kubeconfig, &["--node-ip", "198.18.0.1"]);
    node.wait_l7_routes(9, T);
    let v2 = pods.pop().unwrap().0;
    Mesh {
        node,
        api,
        client,
        v2,
        v2_record,
        _servers: servers,
        _agent: agent,
    }
}

/// The route objects (`HTTPRoute ns/name`) of a manifest.
fn route_names(yaml: &str) -> Vec<String> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| {
            let v = <Value as serde::Deserialize>::deserialize(d).ok()?;
            Some(format!(
                "{} {}/{}",
                v["kind"].as_str()?,
                v["metadata"]["namespace"].as_str().unwrap_or("default"),
                v["metadata"]["name"].as_str()?
            ))
        })
        .collect()
}

/// One answer: status, response headers, and the echo server's JSON (`Null` if none).
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    echo: Value,
}

impl Answer {
    /// The pod that answered ("" when the proxy did).
    fn backend(&self) -> &str {
        self.echo["pod"].as_str().unwrap_or_default()
    }

    /// A request header as the backend got it (values joined with ",").
    fn got(&self, name: &str) -> Option<String> {
        let v = self.echo["headers"][name.to_ascii_lowercase()].as_array()?;
        Some(
            v.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
        )
    }
}

impl Mesh {
    /// Applies a manifest through the API double; waits until every route in it serves.
    fn apply(&self, yaml: &str) {
        self.api.apply_yaml(yaml);
        let want = route_names(yaml);
        let deadline = std::time::Instant::now() + T;
        loop {
            let routes = self.node.admin_json("/routes").to_string();
            if want.iter().all(|w| routes.contains(&format!("\"{w}\""))) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{want:?} never served; problems: {}",
                self.node.admin_json("/problems")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            self.node.status()["problems"],
            0,
            "applies unchanged: {}",
            self.node.admin_json("/problems")
        );
    }

    /// `curl` to `vip` with `Host: host` (as a mesh client resolving the Service name would).
    fn get(&self, vip: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let url = format!("http://{vip}{path}");
        let h: Vec<String> = std::iter::once(format!("Host: {host}"))
            .chain(headers.iter().map(|(k, v)| format!("{k}: {v}")))
            .collect();
        let mut args: Vec<&str> = Vec::new();
        for x in &h {
            args.extend_from_slice(&["-H", x]);
        }
        args.push(&url);
        let (status, headers, body) = curl(&self.client, &args);
        Answer {
            status,
            headers,
            echo: serde_json::from_str(body.trim()).unwrap_or(Value::Null),
        }
    }

    /// `count` requests to `vip`; answers by pod.
    fn spread(&self, vip: &str, count: usize) -> BTreeMap<String, u64> {
        let url = format!("http://{vip}/");
        let n = count.to_string();
        let out = self.client.probe(
            "http-probe",
            &["--url", &url, "--count", &n, "--concurrency", "4"],
            T,
        );
        assert_eq!(out["ok"], count as u64, "{out}");
        tally(&out, "server_ids")
    }
}

/// A redirect's Location as (scheme, host, port, path).
fn location(a: &Answer) -> (String, String, Option<String>, String) {
    let loc = a.headers.get("location").cloned().unwrap_or_default();
    let (scheme, rest) = loc.split_once("://").unwrap_or(("", &loc));
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match auth.split_once(':') {
        Some((h, p)) => (h.to_string(), Some(p.to_string())),
        None => (auth.to_string(), None),
    };
    (scheme.into(), host, port, path)
}

#[test]
fn mesh_basic() {
    let m = mesh();
    let a = m.get(ECHO, "echo", "/", &[]);
    assert_eq!(a.status, 200);
}

#[test]
fn mesh_http_route_simple_same_namespace_and_route_status() {
    let m = mesh();
    let yaml = conformance("httproute-simple-same-namespace.yaml");
    m.apply(&yaml);
    for _ in 0..10 {
        let a = m.get(ECHO, "echo", "/", &[]);
        assert_eq!((a.status, a.backend()), (200, "echo-v1"));
    }
    // Status: Accepted and ResolvedRefs on the Service parent, written by the agent.
    let deadline = std::time::Instant::now() + T;
    loop {
        let r = m
            .api
            .get(
                "gateway.networking.k8s.io/v1",
                "HTTPRoute",
                MESH_NS,
                "gateway-conformance-mesh-test",
            )
            .unwrap();
        let parents = r["status"]["parents"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(p) = parents.first() {
            assert_eq!(p["controllerName"], "proxy-agent.io/mesh", "{r}");
            assert_eq!(p["parentRef"]["name"], "echo", "{r}");
            assert_eq!(p["parentRef"]["port"], 80, "{r}");
            let c: BTreeMap<String, (String, String)> = p["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["type"].as_str().unwrap().to_string(),
                        (
                            c["status"].as_str().unwrap().to_string(),
                            c["reason"].as_str().unwrap().to_string(),
                        ),
                    )
                })
                .collect();
            assert_eq!(c["Accepted"], ("True".into(), "Accepted".into()), "{r}");
            assert_eq!(
                c["ResolvedRefs"],
                ("True".into(), "ResolvedRefs".into()),
                "{r}"
            );
            assert_eq!(p["conditions"][0]["observedGeneration"], 1, "{r}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no status written: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A version with an unsupported filter: not Accepted (UnsupportedValue, naming the field)
    // for generation 2, while the last good version keeps serving.
    m.api.apply_yaml(&yaml.replace(
        "  - backendRefs:",
        "  - filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: F, name: f}}]\n    backendRefs:",
    ));
    let deadline = std::time::Instant::now() + T;
    loop {
        let r = m
            .api
            .get(
                "gateway.networking.k8s.io/v1",
                "HTTPRoute",
                MESH_NS,
                "gateway-conformance-mesh-test",
            )
            .unwrap();
        let accepted = &r["status"]["parents"][0]["conditions"][0];
        if accepted["observedGeneration"] == 2 {
            assert_eq!(accepted["status"], "False", "{r}");
            assert_eq!(accepted["reason"], "UnsupportedValue", "{r}");
            assert!(
                accepted["message"]
                    .as_str()
                    .unwrap()
                    .contains("spec.rules[0].filters[0].extensionRef"),
                "{r}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no status for generation 2: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = m.get(ECHO, "echo", "/", &[]);
    assert_eq!(
        (a.status, a.backend()),
        (200, "echo-v1"),
        "the last good version serves"
    );
    // A backend that does not exist: its requests answer 500, ResolvedRefs turns False
    // (BackendNotFound) with the new generation, and the route is Accepted again.
    m.api
        .apply_yaml(&yaml.replace("name: echo-v1", "name: echo-v9"));
    let deadline = std::time::Instant::now() + T;
    loop {
        let a = m.get(ECHO, "echo", "/", &[]);
        let r = m
            .api
            .get(
                "gateway.networking.k8s.io/v1",
                "HTTPRoute",
                MESH_NS,
                "gateway-conformance-mesh-test",
            )
            .unwrap();
        let conds = &r["status"]["parents"][0]["conditions"];
        if a.status == 500 && conds[1]["reason"] == "BackendNotFound" {
            assert_eq!(conds[1]["status"], "False", "{r}");
            assert_eq!(conds[1]["observedGeneration"], 3, "{r}");
            assert_eq!(conds[0]["reason"], "Accepted", "{r}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{} {r}", a.status);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mesh_frontend() {
    let m = mesh();
    m.apply(&conformance("mesh-frontend.yaml"));
    let a = m.get(ECHO_V2, "echo-v2", "/", &[]);
    assert_eq!((a.status, a.backend()), (200, "echo-v2"));
    assert_eq!(
        a.headers.get("x-header-set").map(String::as_str),
        Some("set")
    );
    // To the pod IP: no Service, no route.
    let pod = format!("{}:8080", m.v2.ip);
    let a = m.get(&pod, &pod, "/", &[]);
    assert_eq!((a.status, a.backend()), (200, "echo-v2"));
    assert!(!a.headers.contains_key("x-header-set"), "{:?}", a.headers);
}

#[test]
fn mesh_ports() {
    let m = mesh();
    m.apply(&conformance("mesh-ports.yaml"));
    let a = m.get(ECHO_V1, "echo-v1", "/", &[]);
    assert_eq!(
        a.headers.get("x-header-set").map(String::as_str),
        Some("v1")
    );
    let a = m.get(&format!("{ECHO_V1}:8080"), "echo-v1:8080", "/", &[]);
    assert_eq!((a.status, a.backend()), (200, "echo-v1"));
    assert!(
        !a.headers.contains_key("x-header-set"),
        "port 8080 is not the route's"
    );
    for port in ["", ":8080"] {
        let a = m.get(&format!("{ECHO_V2}{port}"), "echo-v2", "/", &[]);
        assert_eq!((a.status, a.backend()), (200, "echo-v2"));
        assert_eq!(
            a.headers.get("x-header-set").map(String::as_str),
            Some("v2")
        );
    }
}

#[test]
fn mesh_traffic_split() {
    let m = mesh();
    m.apply(&conformance("mesh-split.yaml"));
    for (path, backend) in [("/v1", "echo-v1"), ("/v2", "echo-v2")] {
        for _ in 0..5 {
            let a = m.get(ECHO, "echo", path, &[]);
            assert_eq!((a.status, a.backend()), (200, backend), "{path}");
        }
    }
}

#[test]
fn mesh_http_route_matching() {
    let m = mesh();
    m.apply(&conformance("httproute-matching.yaml"));
    for (path, header, backend) in [
        ("/", None, "echo-v1"),
        ("/example", None, "echo-v1"),
        ("/", Some("one"), "echo-v1"),
        ("/v2", None, "echo-v2"),
        ("/v2/example", None, "echo-v2"),
        ("/", Some("two"), "echo-v2"),
        ("/v2/", None, "echo-v2"),
        ("/v2example", None, "echo-v1"),
        ("/foo/v2/example", None, "echo-v1"),
    ] {
        let h: Vec<(&str, &str)> = header.map(|v| ("Version", v)).into_iter().collect();
        let a = m.get(ECHO, "echo", path, &h);
        assert_eq!((a.status, a.backend()), (200, backend), "{path} {header:?}");
    }
}

#[test]
fn mesh_http_route_query_param_matching() {
    let m = mesh();
    m.apply(&conformance("httproute-query-param-matching.yaml"));
    for (path, version, want) in [
        ("/?animal=whale", None, Some("echo-v1")),
        ("/?animal=dolphin", None, Some("echo-v2")),
        (
            "/?animal=whale&otherparam=irrelevant",
            None,
            Some("echo-v1"),
        ),
        ("/?animal=dolphin&color=yellow", None, Some("echo-v2")),
        ("/?color=blue", None, None),
        ("/?animal=dog", None, None),
        ("/?animal=whaledolphin", None, None),
        ("/", None, None),
        ("/path1?animal=whale", None, Some("echo-v1")),
        ("/?animal=whale", Some("one"), Some("echo-v2")),
        ("/path3?animal=shark", None, Some("echo-v1")),
        ("/path4?animal=kraken", Some("three"), Some("echo-v1")),
        ("/?animal=shark", None, None),
        ("/path4?animal=kraken", None, None),
        ("/path5?animal=hydra", None, Some("echo-v1")),
    ] {
        let h: Vec<(&str, &str)> = version.map(|v| ("version", v)).into_iter().collect();
        let a = m.get(ECHO, "echo", path, &h);
        match want {
            Some(b) => assert_eq!((a.status, a.backend()), (200, b), "{path} {version:?}"),
            None => assert_eq!(a.status, 404, "{path} {version:?}"),
        }
    }
}

#[test]
fn mesh_http_route_weight() {
    let m = mesh();
    m.apply(&conformance("httproute-weight.yaml"));
    let n = 500;
    let got = m.spread(ECHO, n);
    let v1 = got.get("echo-v1").copied().unwrap_or(0);
    let v2 = got.get("echo-v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, n as u64, "{got:?}");
    // 70/30: a binomial with sd ≈ 2% of n; 8% is four sd.
    assert!(near(v1, n as u64, 0.7, 0.08), "{got:?}");
}

#[test]
fn mesh_grpc_route_weight() {
    let m = mesh();
    m.apply(&conformance("grpcroute-weight.yaml"));
    let url = format!("http://{ECHO}:7070");
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let n = 100;
    for _ in 0..n {
        let out = m.client.probe(
            "grpc-probe",
            &["--url", &url, "--mode", "collect", "--messages", "1"],
            T,
        );
        assert_eq!(out["ok"], true, "{out}");
        *got.entry(out["server_ids"][0].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let v1 = got.get("echo-v1").copied().unwrap_or(0);
    assert_eq!(v1 + got.get("echo-v2").copied().unwrap_or(0), n, "{got:?}");
    // 70/30/0 (echo-v3 does not exist and has weight 0: never a 500): sd ≈ 4.6%.
    assert!(near(v1, n, 0.7, 0.18), "{got:?}");
}

type Loc = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
);

/// Applies a redirect conformance manifest; each path answers `status` with a Location of
/// (scheme, host, port, path).
fn redirects(file: &str, cases: &[(&str, u16, Loc)]) {
    let m = mesh();
    m.apply(&conformance(file));
    for (path, status, (scheme, host, port, to)) in cases {
        let a = m.get(ECHO, "echo", path, &[]);
        assert_eq!(a.status, *status, "{path}: {:?}", a.headers);
        assert_eq!(
            location(&a),
            (
                scheme.to_string(),
                host.to_string(),
                port.map(String::from),
                to.to_string()
            ),
            "{path}"
        );
    }
}

#[test]
fn mesh_http_route_redirect_path() {
    redirects(
        "httproute-redirect-path.yaml",
        &[
            (
                "/original-prefix/lemon",
                302,
                ("http", "echo", None, "/replacement-prefix/lemon"),
            ),
            (
                "/full/path/original",
                302,
                ("http", "echo", None, "/full-path-replacement"),
            ),
            (
                "/path-and-host",
                302,
                ("http", "example.org", None, "/replacement-prefix"),
            ),
            (
                "/path-and-status",
                301,
                ("http", "echo", None, "/replacement-prefix"),
            ),
            (
                "/full-path-and-host",
                302,
                ("http", "example.org", None, "/replacement-full"),
            ),
            (
                "/full-path-and-status",
                301,
                ("http", "echo", None, "/replacement-full"),
            ),
        ],
    );
}

#[test]
fn mesh_http_route_redirect_port() {
    redirects(
        "httproute-redirect-port.yaml",
        &[
            ("/port", 302, ("http", "echo", Some("8083"), "/port")),
            (
                "/port-and-host",
                302,
                ("http", "example.org", Some("8083"), "/port-and-host"),
            ),
            (
                "/port-and-status",
                301,
                ("http", "echo", Some("8083"), "/port-and-status"),
            ),
            (
                "/port-and-host-and-status",
                302,
                (
                    "http",
                    "example.org",
                    Some("8083"),
                    "/port-and-host-and-status",
                ),
            ),
        ],
    );
}

#[test]
fn mesh_http_route_redirect_scheme() {
    redirects(
        "httproute-redirect-scheme.yaml",
        &[
            ("/scheme", 302, ("https", "echo", None, "/scheme")),
            (
                "/scheme-and-host",
                302,
                ("https", "example.org", None, "/scheme-and-host"),
            ),
            (
                "/scheme-and-status",
                301,
                ("https", "echo", None, "/scheme-and-status"),
            ),
            (
                "/scheme-and-host-and-status",
                302,
                ("https", "example.org", None, "/scheme-and-host-and-status"),
            ),
        ],
    );
}

#[test]
fn mesh_http_route_redirect_host_and_status() {
    redirects(
        "httproute-redirect-host-and-status.yaml",
        &[
            (
                "/hostname-redirect",
                302,
                ("http", "example.org", None, "/hostname-redirect"),
            ),
            (
                "/host-and-status",
                301,
                ("http", "example.org", None, "/host-and-status"),
            ),
        ],
    );
}

#[test]
fn mesh_http_route_rewrite_path() {
    let m = mesh();
    m.apply(&conformance("httproute-rewrite-path.yaml"));
    for (path, upstream) in [
        ("/prefix/one/two", "/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
        ("/full/rewrite-path-and-modify-headers/test", "/test"),
        ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
    ] {
        let a = m.get(
            ECHO,
            "echo",
            path,
            &[("X-Header-Remove", "gone"), ("X-Header-Add-Append", "a")],
        );
        assert_eq!((a.status, a.backend()), (200, "echo-v1"), "{path}");
        assert_eq!(a.echo["path"], upstream, "{path}");
        if path.contains("modify-headers") {
            assert_eq!(
                a.got("x-header-set").as_deref(),
                Some("set-overwrites-values")
            );
            assert_eq!(a.got("x-header-add").as_deref(), Some("header-val-1"));
            assert_eq!(
                a.got("x-header-add-append").as_deref(),
                Some("a,header-val-2")
            );
            assert_eq!(a.got("x-header-remove"), None);
        }
    }
}

#[test]
fn mesh_http_route_request_header_modifier() {
    let m = mesh();
    m.apply(&conformance("httproute-request-header-modifier.yaml"));
    let a = m.get(ECHO, "echo", "/set", &[("Some-Other-Header", "val")]);
    assert_eq!(
        a.got("x-header-set").as_deref(),
        Some("set-overwrites-values")
    );
    assert_eq!(a.got("some-other-header").as_deref(), Some("val"));
    let a = m.get(
        ECHO,
        "echo",
        "/set",
        &[("X-Header-Set", "some-other-value")],
    );
    assert_eq!(
        a.got("x-header-set").as_deref(),
        Some("set-overwrites-values")
    );
    let a = m.get(ECHO, "echo", "/add", &[]);
    assert_eq!(a.got("x-header-add").as_deref(), Some("add-appends-values"));
    let a = m.get(
        ECHO,
        "echo",
        "/add",
        &[("X-Header-Add", "some-other-value")],
    );
    assert_eq!(
        a.got("x-header-add").as_deref(),
        Some("some-other-value,add-appends-values")
    );
    let a = m.get(ECHO, "echo", "/remove", &[("X-Header-Remove", "val")]);
    assert_eq!((a.status, a.got("x-header-remove")), (200, None));
    let a = m.get(
        ECHO,
        "echo",
        "/multiple",
        &[
            ("X-Header-Set-2", "set-val-2"),
            ("X-Header-Add-2", "add-val-2"),
            ("X-Header-Remove-2", "remove-val-2"),
            ("Another-Header", "another-header-val"),
        ],
    );
    assert_eq!(a.got("x-header-set-1").as_deref(), Some("header-set-1"));
    assert_eq!(a.got("x-header-set-2").as_deref(), Some("header-set-2"));
    assert_eq!(a.got("x-header-add-1").as_deref(), Some("header-add-1"));
    assert_eq!(
        a.got("x-header-add-2").as_deref(),
        Some("add-val-2,header-add-2")
    );
    assert_eq!(a.got("x-header-add-3").as_deref(), Some("header-add-3"));
    assert_eq!(a.got("x-header-remove-2"), None);
    assert_eq!(
        a.got("another-header").as_deref(),
        Some("another-header-val")
    );
    let a = m.get(
        ECHO,
        "echo",
        "/case-insensitivity",
        &[("x-header-set", "original"), ("X-HEADER-REMOVE", "x")],
    );
    assert_eq!(a.got("x-header-set").as_deref(), Some("header-set"));
    assert_eq!(a.got("x-header-add").as_deref(), Some("header-add"));
    assert_eq!(a.got("x-header-remove"), None);
}

/// A route on `echo` port 80 with the given rules (those of the gateway conformance test of
/// the same name, on a Service parent instead of a Gateway).
fn semantics(name: &str, rules: &str) -> Mesh {
    let m = mesh();
    m.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {MESH_NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\n  rules:\n{rules}"
    ));
    m
}

#[test]
fn http_route_retry() {
    let m = semantics(
        "retries",
        r#"  - matches: [{path: {type: PathPrefix, value: /retry/code-500-attempts-3}}]
    retry: {codes: [500], attempts: 3}
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /retry/code-all-attempts-2}}]
    retry: {codes: [500, 502, 503, 504], attempts: 2, backoff: 10ms}
    backendRefs: [{name: echo-v1, port: 8080}]
"#,
    );
    let mut id = 0;
    let mut retry = |path: &str, code: u16, after: u32| {
        id += 1;
        m.get(
            ECHO,
            "echo",
            &format!("{path}?responseCode={code}&succeedAfter={after}&id={id}"),
            &[],
        )
        .status
    };
    // attempts is the number of retries after the first try.
    assert_eq!(retry("/retry/code-500-attempts-3", 500, 2), 200);
    assert_eq!(retry("/retry/code-500-attempts-3", 500, 3), 200);
    assert_eq!(retry("/retry/code-500-attempts-3", 500, 4), 500);
    assert_eq!(
        retry("/retry/code-500-attempts-3", 503, 2),
        503,
        "503 is not in codes"
    );
    for code in [500, 502, 503, 504] {
        assert_eq!(retry("/retry/code-all-attempts-2", code, 1), 200, "{code}");
        assert_eq!(retry("/retry/code-all-attempts-2", code, 3), code, "{code}");
    }
}

#[test]
fn http_route_timeout_request() {
    let m = semantics(
        "request-timeout",
        r#"  - matches: [{path: {type: PathPrefix, value: /request-timeout}}]
    timeouts: {request: 500ms}
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /disable-request-timeout}}]
    timeouts: {request: "0s"}
    backendRefs: [{name: echo-v1, port: 8080}]
"#,
    );
    assert_eq!(m.get(ECHO, "echo", "/request-timeout", &[]).status, 200);
    assert_eq!(
        m.get(ECHO, "echo", "/request-timeout?delay=1s", &[]).status,
        504
    );
    assert_eq!(
        m.get(ECHO, "echo", "/disable-request-timeout?delay=1s", &[])
            .status,
        200
    );
}

#[test]
fn http_route_timeout_backend_request() {
    let m = semantics(
        "backend-request-timeout",
        r#"  - matches: [{path: {type: PathPrefix, value: /backend-timeout}}]
    timeouts: {backendRequest: 500ms}
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /disable-backend-timeout}}]
    timeouts: {backendRequest: "0s"}
    backendRefs: [{name: echo-v1, port: 8080}]
"#,
    );
    assert_eq!(m.get(ECHO, "echo", "/backend-timeout", &[]).status, 200);
    // Each try times out after 500 ms; the default retries (connect failures, resets, 503)
    // do not retry a timeout, so the answer is 504.
    assert_eq!(
        m.get(ECHO, "echo", "/backend-timeout?delay=1s", &[]).status,
        504
    );
    assert_eq!(
        m.get(ECHO, "echo", "/disable-backend-timeout?delay=1s", &[])
            .status,
        200
    );
}

#[test]
fn http_route_request_percentage_mirror() {
    let m = semantics(
        "request-percentage-mirror",
        r#"  - matches: [{path: {type: PathPrefix, value: /percent-mirror}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo-v2, port: 8080}, percent: 20}
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /percent-mirror-fraction}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo-v2, port: 8080}, fraction: {numerator: 25, denominator: 50}}
    backendRefs: [{name: echo-v1, port: 8080}]
"#,
    );
    // Copies are sent in the background: count them once they stop arriving.
    let copies = |path: &str| {
        let count = || {
            std::fs::read_to_string(&m.v2_record)
                .unwrap_or_default()
                .lines()
                .filter(|l| *l == path)
                .count() as u64
        };
        let mut seen = count();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = count();
            if now == seen {
                return seen;
            }
            seen = now;
        }
    };
    let n = 300u64;
    for (path, share) in [("/percent-mirror", 0.2), ("/percent-mirror-fraction", 0.5)] {
        let url = format!("http://{ECHO}{path}");
        let out = m.client.probe(
            "http-probe",
            &[
                "--url",
                &url,
                "--count",
                &n.to_string(),
                "--concurrency",
                "4",
            ],
            T,
        );
        assert_eq!(out["ok"], n, "{out}");
        assert_eq!(
            tally(&out, "server_ids"),
            only("echo-v1", n),
            "answers come from echo-v1"
        );
        let mirrored = copies(path);
        // A binomial: sd is 2.3% (20%) and 2.9% (50%) of n; 11% is over 3.7 sd.
        assert!(
            near(mirrored, n, share, 0.11),
            "{path}: {mirrored} of {n} mirrored"
        );
    }
}

/// HTTPRoutes read from the manifests directory: they take precedence over a VirtualService
/// for the same Service (which is reported), an unsupported field is rejected by name while
/// the last good version keeps serving, and deleting the route hands the Service back to the
/// VirtualService.
#[test]
fn http_routes_from_the_manifests_directory_win_over_a_virtual_service_and_keep_the_last_good_version()
 {
    let mut node = SimNode::new();
    let client = node.add_pod("client");
    let mut servers = Vec::new();
    let mut ips = Vec::new();
    for v in ["v1", "v2"] {
        let pod = node.add_pod(&format!("web-{v}"));
        servers.push(pod.fixture_server("web", &["--listen", "0.0.0.0:8080", "--version", v]));
        ips.push(pod.ip);
    }
    node.write_manifest(
        "svc.yaml",
        &format!(
            "{}---\n{}---\n{}",
            k8s::http_service("web", "198.19.3.10", 80, 8080, &ips),
            k8s::http_service("web-v1", "198.19.3.11", 80, 8080, &ips[..1]),
            k8s::http_service("web-v2", "198.19.3.12", 80, 8080, &ips[1..]),
        ),
    );
    node.write_manifest(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http: [{route: [{destination: {host: web-v2}}]}]\n",
    );
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: web-v2, port: 80}]
  - backendRefs: [{name: web-v1, port: 80}]
"#;
    node.write_manifest("route.yaml", route);
    let _agent = node.start_agent(&["--node-ip", "198.18.0.1"]);
    node.wait_l7_routes(3, T);
    let served_by = |path: &str| {
        let (s, h, _) = curl(&client, &[&format!("http://198.19.3.10{path}")]);
        assert_eq!(s, 200, "{path}");
        h["x-server-id"].clone()
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + T;
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}; problems: {}",
                node.admin_json("/problems")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("the HTTPRoute serves", &|| {
        served_by("/v2/x") == "web-v2" && served_by("/") == "web-v1"
    });
    let problems = node.admin_json("/problems").to_string();
    assert!(
        problems.contains("VirtualService") && problems.contains("HTTPRoute default/web"),
        "the VirtualService is told why it does not apply: {problems}"
    );
    // explain names the HTTPRoute rule and match that serve a request.
    let from = client.ip.to_string();
    let out = node.cli(&[
        "explain",
        "--from",
        &from,
        "--to",
        "198.19.3.10:80",
        "--path",
        "/v2/a",
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let step = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "route")
        .cloned()
        .unwrap_or_else(|| panic!("no route step: {v}"));
    assert_eq!(step["verdict"], "HTTPRoute default/web rules[0]", "{v}");
    assert!(
        step["detail"].as_str().unwrap().contains("(matches[0])"),
        "{v}"
    );
    // An unsupported filter: rejected by name, the last good version keeps serving.
    node.write_manifest(
        "route.yaml",
        &route.replace(
            "  - backendRefs: [{name: web-v1, port: 80}]",
            "  - backendRefs: [{name: web-v1, port: 80}]\n    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Filter, name: f}}]",
        ),
    );
    wait("the broken HTTPRoute is reported", &|| {
        node.admin_json("/problems")
            .to_string()
            .contains("spec.rules[1].filters[0].extensionRef")
    });
    for _ in 0..5 {
        assert_eq!(served_by("/"), "web-v1");
        assert_eq!(served_by("/v2"), "web-v2");
    }
    // Without the HTTPRoute, the VirtualService routes web again.
    node.remove_manifest("route.yaml");
    wait("the VirtualService takes over", &|| {
        served_by("/") == "web-v2"
    });
    wait("no problems left", &|| node.status()["problems"] == 0);
}
