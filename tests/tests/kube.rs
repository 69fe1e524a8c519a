//! The agent following an API server (a double speaking the real list/watch protocol, reached
//! through a kubeconfig from the node's network namespace). Needs root.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use tests::apiserver::ApiServer;
use tests::k8s;
use tests::scenarios::{self, tally};
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(120);

/// A node, an API server double on its loopback, and a kubeconfig file for the agent.
fn cluster() -> (SimNode, ApiServer, std::path::PathBuf) {
    let node = SimNode::new();
    let api = ApiServer::start(Some(&node.netns_path()));
    let kubeconfig = node.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
    (node, api, kubeconfig)
}

fn servers(pods: &[Pod], kind: &str) -> Vec<Proc> {
    pods.iter()
        .map(|p| p.fixture_server(kind, &["--listen", "0.0.0.0:8080"]))
        .collect()
}

fn tcp(client: &Pod, count: usize) -> Value {
    client.probe(
        "tcp-probe",
        &[
            "--to",
            "198.19.0.10:80",
            "--count",
            &count.to_string(),
            "--read",
            "--timeout-ms",
            "2000",
        ],
        T,
    )
}

#[test]
fn services_and_endpoints_come_from_the_api_server() {
    let (mut node, api, kubeconfig) = cluster();
    let webs: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let _s = servers(&webs, "tcp-id");
    let ips: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    api.apply_yaml(&k8s::service_with_endpoints(
        "web",
        "198.19.0.10",
        80,
        "TCP",
        8080,
        &ips,
    ));
    let _agent = node.start_agent_kube(&kubeconfig, &[]);
    let st = node.status();
    assert_eq!(
        (st["source"].as_str(), st["ready"].as_bool()),
        (Some("kubernetes"), Some(true)),
        "{st}"
    );
    let out = tcp(&client, 100);
    assert_eq!(out["ok"], 100, "{out}");
    assert_eq!(tally(&out, "reads").len(), 2, "{out}");
    // An EndpointSlice change reaches the datapath.
    api.apply_yaml(&k8s::slice(
        "web-1",
        "web",
        8080,
        "TCP",
        &[(ips[1], k8s::Cond::Ready)],
    ));
    node.wait_synced(2, T);
    let out = tcp(&client, 50);
    assert_eq!(
        tally(&out, "reads").keys().collect::<Vec<_>>(),
        ["web2"],
        "{out}"
    );
}

#[test]
fn an_api_server_restart_loses_no_entry_and_changes_made_while_away_are_applied() {
    let (mut node, api, kubeconfig) = cluster();
    let webs: Vec<Pod> = (1..=3).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let _s = servers(&webs, "tcp-id");
    let ips: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    api.apply_yaml(&k8s::service_with_endpoints(
        "web",
        "198.19.0.10",
        80,
        "TCP",
        8080,
        &ips[..2],
    ));
    api.apply_yaml(&k8s::service_with_endpoints(
        "old",
        "198.19.0.20",
        80,
        "TCP",
        8080,
        &ips[..1],
    ));
    let mut agent = node.start_agent_kube(&kubeconfig, &[]);
    let before = node.dump();

    // The API server goes away: the datapath keeps every entry.
    api.stop();
    let out = tcp(&client, 100);
    assert_eq!(out["ok"], 100, "{out}");
    agent.wait_log_count("watch failed", 1, T);
    assert_eq!(
        node.dump(),
        before,
        "map entries changed while the API server was away"
    );

    // Changes while it is away: web3 joins, `old` is deleted (a delete event the agent never sees).
    api.apply_yaml(&k8s::service_with_endpoints(
        "web",
        "198.19.0.10",
        80,
        "TCP",
        8080,
        &ips,
    ));
    assert!(api.delete("v1", "Service", "default", "old"));
    assert!(api.delete("discovery.k8s.io/v1", "EndpointSlice", "default", "old-1"));
    // Make the agent's resume point too old: it must re-list (410 Gone) and derive the removal.
    api.compact();
    api.start_again();
    let dump = tests::sys::poll("the changes made while away to reach the maps", T, || {
        let d = node.dump();
        (d.contains(&format!("{}:8080", ips[2])) && !d.contains("198.19.0.20")).then_some(d)
    });
    assert!(
        dump.contains("SVC 198.19.0.10:80/TCP id=1 count=3"),
        "{dump}"
    );
    assert_eq!(tally(&tcp(&client, 300), "reads").len(), 3);
    // The watchers really re-listed after 410 Gone.
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services") && !r.contains("watch="))
        .count();
    assert!(
        lists >= 2,
        "expected a re-list of Services: {:?}",
        api.requests()
    );
}

#[test]
fn dropped_watch_connections_are_resumed() {
    let (mut node, api, kubeconfig) = cluster();
    let webs: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let _s = servers(&webs, "tcp-id");
    let ips: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    api.apply_yaml(&k8s::service_with_endpoints(
        "web",
        "198.19.0.10",
        80,
        "TCP",
        8080,
        &ips[..1],
    ));
    let _agent = node.start_agent_kube(&kubeconfig, &[]);
    api.drop_connections();
    api.apply_yaml(&k8s::service_with_endpoints(
        "web",
        "198.19.0.10",
        80,
        "TCP",
        8080,
        &ips,
    ));
    tests::sys::poll("the change after the dropped connections", T, || {
        node.dump()
            .contains(&format!("{}:8080", ips[1]))
            .then_some(())
    });
    assert_eq!(tally(&tcp(&client, 200), "reads").len(), 2);
}

#[test]
fn invalid_objects_become_events_and_the_last_good_configuration_keeps_serving() {
    let (mut node, api, kubeconfig) = cluster();
    let webs: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let _s = servers(&webs, "webapp");
    let ips: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    api.apply_yaml(&k8s::http_service("web", "198.19.0.10", 80, 8080, &ips));
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: default}\nspec:\n  host: web\n  subsets: [{name: v1, labels: {app: web}}]\n  trafficPolicy: {outlierDetection: {interval: 5s}}\n";
    api.apply_yaml(dr);
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: default}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n";
    api.apply_yaml(vs);
    let _agent = node.start_agent_kube(&kubeconfig, &["--node-ip", "198.18.0.1"]);
    node.wait_l7_routes(1, T);
    let ok = |n: usize| {
        client.probe(
            "http-probe",
            &["--url", "http://198.19.0.10/", "--count", &n.to_string()],
            T,
        )
    };
    assert_eq!(ok(20)["ok"], 20);

    // A DestinationRule with a negative interval: logged, an Event on it, the old one serves.
    api.apply_yaml(&dr.replace("interval: 5s", "interval: -5s"));
    let problem = |field: &str| {
        tests::sys::poll(&format!("a problem on {field} in /problems"), T, || {
            node.admin_json("/problems")
                .as_array()?
                .iter()
                .find(|p| p["field"] == field)
                .cloned()
        })
    };
    let p = problem("spec.trafficPolicy.outlierDetection.interval");
    assert_eq!(
        (p["kind"].as_str(), p["object"].as_str()),
        (Some("DestinationRule"), Some("default/web")),
        "{p}"
    );
    // A VirtualService naming an unknown subset: logged, an Event, the last good route serves.
    api.apply_yaml(&vs.replace("{host: web}", "{host: web, subset: v9}"));
    let p = problem("spec.http[0].route[0].destination.subset");
    assert!(
        p["message"]
            .as_str()
            .unwrap()
            .contains("unknown subset \"v9\""),
        "{p}"
    );
    let events = tests::sys::poll("both Events to be posted", T, || {
        let ev = api.events();
        let on = |kind: &str| {
            ev.iter().any(|e| {
                e["regarding"]["kind"] == kind
                    && e["regarding"]["name"] == "web"
                    && e["reason"] == "InvalidConfiguration"
            })
        };
        (on("DestinationRule") && on("VirtualService")).then_some(ev)
    });
    assert!(
        events
            .iter()
            .any(|e| e["note"].as_str().is_some_and(|n| n.contains("interval"))),
        "{events:?}"
    );
    // Both Events name the object's uid, the route problem's too (found after the object was
    // read, from the route builder).
    for e in events.iter().filter(|e| e["regarding"]["name"] == "web") {
        assert!(
            e["regarding"]["uid"]
                .as_str()
                .is_some_and(|u| !u.is_empty()),
            "an Event without the object's uid: {e}"
        );
    }
    let out = ok(40);
    assert_eq!(
        out["ok"], 40,
        "the last good configuration must keep serving: {out}"
    );
    assert_eq!(tally(&out, "server_ids").len(), 2, "{out}");
}

#[test]
fn scenario_6_seed_experiment_with_objects_from_the_api_server() {
    let (mut node, api, kubeconfig) = cluster();
    let pods: Vec<Pod> = (1..=2)
        .map(|i| node.add_pod(&format!("webapp{i}")))
        .collect();
    let client = node.add_pod("client");
    let servers = servers(&pods, "webapp");
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    api.apply_yaml(&k8s::http_service("svc", "198.19.0.10", 80, 8080, &ips));
    api.apply_yaml(&scenarios::seed_policy("svc"));
    let _agent = node.start_agent_kube(&kubeconfig, &["--node-ip", "198.18.0.1"]);
    node.wait_l7_routes(1, T);
    let r = scenarios::seed_ab(&client, &client, &servers, &pods[0], || {});
    assert_eq!((r.complete, r.failed, r.non_2xx), (20000, 0, 0), "{r:?}");
}

#[test]
fn scenario_1_retries_with_objects_from_the_api_server() {
    let (mut node, api, kubeconfig) = cluster();
    let pods: Vec<Pod> = (1..=3)
        .map(|i| node.add_pod(&format!("retry{i}")))
        .collect();
    let client = node.add_pod("client");
    let _s = servers(&pods, "retry-backend");
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    api.apply_yaml(&k8s::http_service("svc", "198.19.0.10", 80, 8080, &ips));
    api.apply_yaml("apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: retry, namespace: default}\nspec:\n  hosts: [svc]\n  http:\n  - route: [{destination: {host: svc}}]\n    timeout: 15s\n    retries: {attempts: 15, perTryTimeout: 1s, retryOn: 'gateway-error,reset,5xx'}\n");
    let _agent = node.start_agent_kube(&kubeconfig, &["--node-ip", "198.18.0.1"]);
    node.wait_l7_routes(1, T);
    let out = client.probe(
        "http-probe",
        &[
            "--url",
            "http://198.19.0.10/?failRate=50&mode=busy",
            "--count",
            "50",
        ],
        T,
    );
    assert_eq!(out["ok"], 50, "{out}");
}

/// Entries of the datapath's Service map (master + one per backend slot, per frontend).
fn svc_map_entries(st: &Value) -> u64 {
    st["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "PXA_SVC_V1"))
        .and_then(|m| m["entries"].as_u64())
        .unwrap_or(u64::MAX)
}

/// What a real cluster has and a manifests directory rarely shows: headless and ExternalName
/// Services (never programmed), Services another proxy owns (label
/// `service.kubernetes.io/service-proxy-name`, left alone and removed when the label appears),
/// and a Service deleted and recreated with a new ClusterIP (the old IP leaves the maps).
#[test]
fn headless_external_name_and_other_proxies_services_are_not_programmed_and_recreates_leave_nothing_stale()
 {
    let (mut node, api, kubeconfig) = cluster();
    let webs: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let _s = servers(&webs, "tcp-id");
    let ips: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    api.apply_yaml(&k8s::service_with_endpoints(
        "web",
        "198.19.0.10",
        80,
        "TCP",
        8080,
        &ips,
    ));
    // Headless (with endpoints, as StatefulSets have), ExternalName, another proxy's.
    api.apply_yaml(
        &k8s::service_with_endpoints("db", "None", 80, "TCP", 8080, &ips)
            .replace("clusterIP: None", "clusterIP: None\n  type: ClusterIP"),
    );
    api.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: alias, namespace: default}\nspec:\n  type: ExternalName\n  externalName: example.org\n",
    );
    let other = k8s::service_with_endpoints("other", "198.19.0.20", 80, "TCP", 8080, &ips)
        .replacen(
            "  namespace: default\n",
            "  namespace: default\n  labels:\n    service.kubernetes.io/service-proxy-name: someone-else\n",
            1,
        );
    api.apply_yaml(&other);
    let _agent = node.start_agent_kube(&kubeconfig, &[]);
    let st = node.wait_status("web alone programmed", T, |s| {
        s["services"] == 1 && s["frontends"] == 1 && svc_map_entries(s) == 3
    });
    assert_eq!(st["problems"], 0, "none of them is a problem: {st}");
    assert_eq!(tcp(&client, 20)["ok"], 20);
    let refused = client.probe(
        "tcp-probe",
        &[
            "--to",
            "198.19.0.20:80",
            "--count",
            "3",
            "--timeout-ms",
            "500",
        ],
        T,
    );
    assert_eq!(refused["ok"], 0, "another proxy's Service: {refused}");

    // The label appears on a Service we serve: it is removed from the datapath; and back.
    let labelled = k8s::service("web", "198.19.0.10", 80, "TCP", "").replacen(
        "  namespace: default\n",
        "  namespace: default\n  labels:\n    service.kubernetes.io/service-proxy-name: someone-else\n",
        1,
    );
    api.apply_yaml(&labelled);
    node.wait_status("web handed to the other proxy", T, |s| {
        s["frontends"] == 0 && svc_map_entries(s) == 0
    });
    api.apply_yaml(&k8s::service("web", "198.19.0.10", 80, "TCP", ""));
    node.wait_status("web back", T, |s| s["frontends"] == 1);
    assert_eq!(tcp(&client, 20)["ok"], 20);

    // Deleted and recreated with a new ClusterIP (its slice stays): nothing stale.
    assert!(api.delete("v1", "Service", "default", "web"));
    api.apply_yaml(&k8s::service("web", "198.19.0.11", 80, "TCP", ""));
    node.wait_status("the new ClusterIP only", T, |s| {
        s["frontends"] == 1 && svc_map_entries(s) == 3
    });
    let new = client.probe(
        "tcp-probe",
        &["--to", "198.19.0.11:80", "--count", "20", "--read"],
        T,
    );
    assert_eq!(new["ok"], 20, "{new}");
    let old = client.probe(
        "tcp-probe",
        &[
            "--to",
            "198.19.0.10:80",
            "--count",
            "3",
            "--timeout-ms",
            "500",
        ],
        T,
    );
    assert_eq!(old["ok"], 0, "the old ClusterIP must be gone: {old}");
    let services = node.admin_json("/services");
    assert!(
        !services.to_string().contains("198.19.0.10"),
        "stale frontend: {services}"
    );
}

/// With the API server as the source, the agent reads its Node's `topology.kubernetes.io/zone`
/// (RBAC `get nodes`) and keeps a PreferClose Service's clients on the endpoints hinted for it.
#[test]
fn prefer_close_uses_the_zone_label_of_this_node() {
    let (mut node, api, kubeconfig) = cluster();
    let webs: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let _s = servers(&webs, "tcp-id");
    api.apply_yaml(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels: {topology.kubernetes.io/zone: z2}\n",
    );
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 198.19.0.10\n  trafficDistribution: PreferClose\n  ports: [{{name: p, port: 80, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, zone: z1, hints: {{forZones: [{{name: z1}}]}}}}\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, zone: z2, hints: {{forZones: [{{name: z2}}]}}}}\n",
        webs[0].ip, webs[1].ip
    ));
    let _agent = node.start_agent_kube(&kubeconfig, &[]);
    let out = tcp(&client, 30);
    assert_eq!(out["ok"], 30, "{out}");
    assert_eq!(
        tally(&out, "reads").keys().cloned().collect::<Vec<_>>(),
        ["web2"],
        "the endpoint hinted for zone z2 only: {out}"
    );
}
