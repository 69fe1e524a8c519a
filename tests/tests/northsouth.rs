//! North-south Services on the multi-node simulation, from a client outside the cluster:
//! NodePort on every node's IP, LoadBalancer ingress IPs and externalIPs, with the Cluster and
//! Local traffic policies, the health-check node port and loadBalancerSourceRanges. The tc
//! programs on each node's underlay device do the translation; no iptables anywhere.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use tests::cluster::{EXTERNAL_IP, underlay_ip};
use tests::scenarios::tally;
use tests::{Pod, Proc, SimCluster};

const T: Duration = Duration::from_secs(60);
const VIP: &str = "198.19.0.10";
const LB_IP: &str = "198.19.250.10";
const EXT_IP: &str = "198.19.250.20";
const NODE_PORT: u16 = 30080;
const HC_PORT: u16 = 32100;

/// Service `web` (LoadBalancer, NodePort 30080, LB ingress IP, an externalIP) over the pods
/// `eps` (address, node name).
fn web(policy: &str, ranges: &[&str], eps: &[(&Pod, &str)]) -> String {
    let hc = if policy == "Local" {
        format!("  healthCheckNodePort: {HC_PORT}\n")
    } else {
        String::new()
    };
    let ranges = if ranges.is_empty() {
        String::new()
    } else {
        format!("  loadBalancerSourceRanges: [{}]\n", ranges.join(", "))
    };
    let endpoints: String = eps
        .iter()
        .map(|(p, node)| {
            format!(
                "- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: {node}}}\n",
                p.ip
            )
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: {VIP}\n  externalTrafficPolicy: {policy}\n{hc}{ranges}  externalIPs: [\"{EXT_IP}\"]\n  ports: [{{name: p, port: 80, protocol: TCP, nodePort: {NODE_PORT}}}]\nstatus:\n  loadBalancer: {{ingress: [{{ip: \"{LB_IP}\"}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}"
    )
}

fn tcp(client: &Pod, to: &str, count: usize, timeout_ms: u64) -> Value {
    client.probe(
        "tcp-probe",
        &[
            "--to",
            to,
            "--count",
            &count.to_string(),
            "--read",
            "--timeout-ms",
            &timeout_ms.to_string(),
        ],
        T,
    )
}

/// The distinct `<pod> <source seen by the pod>` lines of a probe.
fn answers(out: &Value) -> BTreeSet<String> {
    tally(out, "reads").keys().cloned().collect()
}

/// The distinct peers (`getpeername`) the client saw.
fn peers(out: &Value) -> BTreeSet<String> {
    tally(out, "peers").keys().cloned().collect()
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

/// Two nodes with a `tcp-id --with-peer` pod each and their agents on `--devices ul0`.
fn cluster() -> (SimCluster, Pod, Pod, Vec<Proc>) {
    let mut c = SimCluster::new(2);
    let a = c.node_mut(1).add_pod("a");
    let b = c.node_mut(2).add_pod("b");
    let mut procs = vec![
        a.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080", "--with-peer"]),
        b.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080", "--with-peer"]),
    ];
    c.write_manifest(
        "web.yaml",
        &web("Cluster", &[], &[(&a, "node1"), (&b, "node2")]),
    );
    c.route_external("198.19.250.0/24", 1);
    for k in 1..=2u8 {
        let n = c.node(k);
        procs.push(n.start_agent(&[
            "--node-ip",
            &n.node_ip.to_string(),
            "--node-name",
            &format!("node{k}"),
            "--devices",
            "ul0",
        ]));
    }
    (c, a, b, procs)
}

/// Waits until node `k` applied a generation newer than `after`.
fn applied_after(c: &SimCluster, k: u8, after: u64) {
    tests::sys::poll(&format!("node{k} to apply the change"), T, || {
        let g = c.node(k).status()["last_apply"]["generation"]
            .as_u64()
            .unwrap_or(0);
        (g > after).then_some(())
    });
}

fn generation(c: &SimCluster, k: u8) -> u64 {
    c.node(k).status()["last_apply"]["generation"]
        .as_u64()
        .unwrap_or(0)
}

/// `curl` from the external client: (status code, body).
fn http_get(c: &SimCluster, url: &str) -> (u16, Value) {
    let out = c
        .external
        .place
        .run("curl", &["-s", "-m", "5", "-w", "\n%{http_code}", url], T);
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", &out));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// Cluster policy: the NodePort on each node's IP reaches the pods of both nodes; a pod on the
/// node that took the connection sees the client's address, a pod on the other node sees the
/// node's (SNAT, so its reply returns through that node). The client sees the NodePort as its
/// peer. LoadBalancer ingress IPs and externalIPs work the same; pods and host processes reach
/// the NodePort through the socket hooks.
#[test]
fn nodeport_lb_and_external_ips_reach_pods_on_both_nodes_with_snat_for_remote_ones() {
    let (c, _a, _b, _procs) = cluster();
    let ext = EXTERNAL_IP.to_string();
    for k in 1..=2u8 {
        let node_ip = underlay_ip(k);
        let to = format!("{node_ip}:{NODE_PORT}");
        let out = tcp(&c.external, &to, 60, 2000);
        assert_eq!(out["ok"], 60, "NodePort on node{k}: {out}");
        let (local, remote) = if k == 1 { ("a", "b") } else { ("b", "a") };
        assert_eq!(
            answers(&out),
            set(&[format!("{local} {ext}"), format!("{remote} {node_ip}")]),
            "node{k}: the local pod sees the client, the remote one node{k}'s IP: {out}"
        );
        assert_eq!(
            peers(&out),
            BTreeSet::from([to.clone()]),
            "the client talks to the NodePort: {out}"
        );
    }
    for (what, addr) in [("LoadBalancer ingress IP", LB_IP), ("externalIP", EXT_IP)] {
        let to = format!("{addr}:80");
        let out = tcp(&c.external, &to, 60, 2000);
        assert_eq!(out["ok"], 60, "{what}: {out}");
        assert_eq!(
            answers(&out),
            set(&[format!("a {ext}"), format!("b {}", underlay_ip(1))]),
            "{what} via node1: {out}"
        );
        assert_eq!(peers(&out), BTreeSet::from([to.clone()]));
    }
    // Inside the cluster: a pod on node2 reaches node1's NodePort and the LoadBalancer IP; the
    // socket hooks translate them before any packet exists.
    let mut c = c;
    let client = c.node_mut(2).add_pod("client");
    for to in [
        format!("{}:{NODE_PORT}", underlay_ip(2)),
        format!("{LB_IP}:80"),
    ] {
        let out = tcp(&client, &to, 30, 2000);
        assert_eq!(out["ok"], 30, "{to} from a pod: {out}");
        let pods: BTreeSet<String> = answers(&out)
            .into_iter()
            .map(|l| l.split(' ').next().unwrap_or("").to_string())
            .collect();
        assert_eq!(pods, set(&["a".into(), "b".into()]), "{to}: {out}");
        assert_eq!(
            peers(&out),
            BTreeSet::from([to.clone()]),
            "getpeername shows the frontend: {out}"
        );
    }
    // explain knows NodePorts on the node's addresses.
    let text = c.node(2).cli(&[
        "explain",
        "--from",
        &client.ip.to_string(),
        "--to",
        &format!("{}:{NODE_PORT}", underlay_ip(2)),
    ]);
    assert!(
        text.contains("finds Service default/web NodePort 30080"),
        "{text}"
    );
    let status = c.node(1).status();
    let counters = &status["datapath_counters"];
    assert!(
        counters["nodeport_remote_snat"].as_u64().unwrap_or(0) > 0
            && counters["nodeport_local"].as_u64().unwrap_or(0) > 0,
        "the tc programs counted their work: {counters}"
    );
}

/// Local policy: only the node's own pods answer, and they see the client's address; a node
/// without a local endpoint drops the traffic, and its health-check node port says 503 where
/// the other says 200 with `localEndpoints: 1`.
#[test]
fn local_policy_keeps_the_client_ip_and_the_health_check_port_tells_which_nodes_serve() {
    let (mut c, a, b, _procs) = cluster();
    let pod2 = c.node_mut(2).add_pod("client");
    let ext = EXTERNAL_IP.to_string();
    let before = [generation(&c, 1), generation(&c, 2)];
    c.write_manifest(
        "web.yaml",
        &web("Local", &[], &[(&a, "node1"), (&b, "node2")]),
    );
    applied_after(&c, 1, before[0]);
    applied_after(&c, 2, before[1]);
    for (k, own) in [(1u8, "a"), (2, "b")] {
        let out = tcp(
            &c.external,
            &format!("{}:{NODE_PORT}", underlay_ip(k)),
            40,
            2000,
        );
        assert_eq!(out["ok"], 40, "{out}");
        assert_eq!(
            answers(&out),
            set(&[format!("{own} {ext}")]),
            "node{k} sends to its own pod, source kept: {out}"
        );
    }
    let (code, body) = http_get(&c, &format!("http://{}:{HC_PORT}/", underlay_ip(2)));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["localEndpoints"], 1, "{body}");
    assert_eq!(body["service"]["name"], "web", "{body}");

    // Only node1 keeps an endpoint.
    let before = [generation(&c, 1), generation(&c, 2)];
    c.write_manifest("web.yaml", &web("Local", &[], &[(&a, "node1")]));
    applied_after(&c, 1, before[0]);
    applied_after(&c, 2, before[1]);
    let (code, body) = http_get(&c, &format!("http://{}:{HC_PORT}/", underlay_ip(1)));
    assert_eq!(code, 200, "node1 has a local endpoint: {body}");
    assert_eq!(body["localEndpoints"], 1, "{body}");
    let (code, body) = http_get(&c, &format!("http://{}:{HC_PORT}/", underlay_ip(2)));
    assert_eq!(code, 503, "node2 has none: {body}");
    assert_eq!(body["localEndpoints"], 0, "{body}");
    let out = tcp(
        &c.external,
        &format!("{}:{NODE_PORT}", underlay_ip(2)),
        2,
        1000,
    );
    assert_eq!(
        out["ok"], 0,
        "node2 drops Local traffic without local endpoints: {out}"
    );
    let out = tcp(
        &c.external,
        &format!("{}:{NODE_PORT}", underlay_ip(1)),
        20,
        2000,
    );
    assert_eq!(answers(&out), set(&[format!("a {ext}")]), "{out}");
    // The LoadBalancer IP lands on node1 (the external route), which serves it locally.
    let out = tcp(&c.external, &format!("{LB_IP}:80"), 20, 2000);
    assert_eq!(answers(&out), set(&[format!("a {ext}")]), "{out}");
    // Inside the cluster the policy does not apply (kube-proxy sends in-cluster clients
    // cluster-wide): a pod on node2 reaches node2's NodePort and the LoadBalancer IP.
    for to in [
        format!("{}:{NODE_PORT}", underlay_ip(2)),
        format!("{LB_IP}:80"),
    ] {
        let out = tcp(&pod2, &to, 10, 2000);
        assert_eq!(out["ok"], 10, "{to} from a pod on node2: {out}");
        assert_eq!(
            answers(&out),
            set(&[format!("a {}", pod2.ip)]),
            "{to}: {out}"
        );
    }
}

/// loadBalancerSourceRanges: a client outside the ranges is dropped at the LoadBalancer IP;
/// one inside gets through. The NodePort is not subject to them (as with kube-proxy).
#[test]
fn load_balancer_source_ranges_drop_clients_outside_them() {
    let (c, a, b, _procs) = cluster();
    let eps = [(&a, "node1"), (&b, "node2")];
    let before = generation(&c, 1);
    c.write_manifest("web.yaml", &web("Cluster", &["198.19.201.0/24"], &eps));
    applied_after(&c, 1, before);
    // The monitor shows the drop, with the client.
    let node1 = c.node(1);
    let mut mon = Proc::spawn(
        "monitor",
        node1.host_place().command(
            tests::sys::bin("proxy-agent"),
            &["monitor", "-t", "drop", "-o", "json", "--count", "1"],
        ),
        node1.dir.join("logs/monitor.log"),
    );
    tests::sys::poll("the monitor to show the drop", T, || {
        let _ = tcp(&c.external, &format!("{LB_IP}:80"), 1, 300);
        (!mon.running()).then_some(())
    });
    let line = mon.all_stdout(T).join("\n");
    let ev: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
    assert_eq!(
        (
            ev["hook"].as_str(),
            ev["verdict"].as_str(),
            ev["client"].as_str()
        ),
        (
            Some("tc-ingress"),
            Some("nodeport-refused-source-range"),
            Some("198.19.200.100")
        ),
        "{line}"
    );
    assert_eq!(ev["service"], "default/web", "{ev}");
    let out = tcp(&c.external, &format!("{LB_IP}:80"), 3, 1000);
    assert_eq!(out["ok"], 0, "outside the ranges: dropped: {out}");
    let out = tcp(
        &c.external,
        &format!("{}:{NODE_PORT}", underlay_ip(1)),
        10,
        2000,
    );
    assert_eq!(out["ok"], 10, "the NodePort is not restricted: {out}");
    let status = c.node(1).status();
    assert!(
        status["datapath_counters"]["nodeport_drop_source_range"]
            .as_u64()
            .unwrap_or(0)
            >= 3,
        "{}",
        status["datapath_counters"]
    );

    let before = generation(&c, 1);
    c.write_manifest(
        "web.yaml",
        &web("Cluster", &["198.19.201.0/24", "198.19.200.96/29"], &eps),
    );
    applied_after(&c, 1, before);
    let out = tcp(&c.external, &format!("{LB_IP}:80"), 20, 2000);
    assert_eq!(out["ok"], 20, "inside the ranges: {out}");
}

/// UDP NodePorts work like TCP ones (replies come from the NodePort; one socket's datagrams stay
/// on one pod), and `sessionAffinity: ClientIP` keeps an outside client on one pod.
#[test]
fn udp_node_ports_and_client_ip_affinity_from_outside() {
    let mut c = SimCluster::new(2);
    let a = c.node_mut(1).add_pod("a");
    let b = c.node_mut(2).add_pod("b");
    let mut procs = Vec::new();
    for p in [&a, &b] {
        procs.push(p.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080", "--with-peer"]));
        procs.push(p.fixture_server("udp-echo", &["--listen", "0.0.0.0:5353"]));
    }
    let eps = format!(
        "endpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: node1}}\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: node2}}\n",
        a.ip, b.ip
    );
    c.write_manifest(
        "svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 198.19.0.11\n  sessionAffinity: ClientIP\n  ports: [{{name: p, port: 80, protocol: TCP, nodePort: 30081}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: sticky-1, namespace: default, labels: {{kubernetes.io/service-name: sticky}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\n{eps}---\napiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 198.19.0.53\n  ports: [{{name: dns, port: 53, protocol: UDP, nodePort: 30053}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-1, namespace: default, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nports: [{{name: dns, port: 5353, protocol: UDP}}]\n{eps}"
        ),
    );
    for k in 1..=2u8 {
        let n = c.node(k);
        procs.push(n.start_agent(&["--node-name", &format!("node{k}"), "--devices", "ul0"]));
    }
    let out = tcp(&c.external, &format!("{}:30081", underlay_ip(1)), 40, 2000);
    assert_eq!(out["ok"], 40, "{out}");
    assert_eq!(
        answers(&out).len(),
        1,
        "ClientIP affinity: one pod for the client: {out}"
    );

    let dns = format!("{}:30053", underlay_ip(1));
    let out = c.external.probe(
        "udp-probe",
        &["--to", &dns, "--count", "20", "--connected"],
        T,
    );
    assert_eq!(out["ok"], 20, "{out}");
    assert_eq!(
        tally(&out, "sources")
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([dns.clone()]),
        "replies come from the NodePort: {out}"
    );
    assert_eq!(tally(&out, "ids").len(), 1, "one flow, one pod: {out}");
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let out = c
            .external
            .probe("udp-probe", &["--to", &dns, "--count", "1"], T);
        seen.extend(tally(&out, "ids").into_keys());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "flows spread over both nodes' pods: {seen:?}"
    );
}
