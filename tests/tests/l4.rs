//! In-kernel ClusterIP load balancing (TCP and UDP) on a simulated node. Needs root.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::k8s::{self, Cond};
use tests::scenarios::tally;
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(60);
const VIP: &str = "198.19.0.10";

/// A node with `n` `tcp-id` backends (pods web1..n on :8080), a client pod and a Service
/// 198.19.0.10:80 over all of them; the agent is not started.
fn web_node(n: usize) -> (SimNode, Vec<Pod>, Pod, Vec<Proc>) {
    let mut node = SimNode::new();
    let webs: Vec<Pod> = (1..=n).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let servers = webs
        .iter()
        .map(|p| p.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let ips: Vec<Ipv4Addr> = webs.iter().map(|p| p.ip).collect();
    node.write_manifest(
        "web.yaml",
        &k8s::service_with_endpoints("web", VIP, 80, "TCP", 8080, &ips),
    );
    (node, webs, client, servers)
}

fn tcp(client: &Pod, to: &str, count: usize) -> Value {
    client.probe(
        "tcp-probe",
        &[
            "--to",
            to,
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
fn tcp_connects_spread_evenly_over_three_backends() {
    let (node, _webs, client, _servers) = web_node(3);
    let _agent = node.start_agent(&[]);
    let out = tcp(&client, "198.19.0.10:80", 1000);
    assert_eq!(out["ok"], 1000, "{out}");
    let reads = tally(&out, "reads");
    assert_eq!(reads.len(), 3, "{out}");
    for (pod, n) in &reads {
        assert!(
            (267..=400).contains(n),
            "{pod} got {n} of 1000 (want 333 +-20%): {reads:?}"
        );
    }
    assert_eq!(
        tally(&out, "peers").keys().collect::<Vec<_>>(),
        ["198.19.0.10:80"],
        "getpeername must report the VIP"
    );
}

#[test]
fn ipv4_mapped_ipv6_sockets_are_translated_both_ways() {
    let (node, _webs, client, _servers) = web_node(2);
    let _agent = node.start_agent(&[]);
    let out = tcp(&client, "[::ffff:198.19.0.10]:80", 100);
    assert_eq!(out["ok"], 100, "{out}");
    assert_eq!(tally(&out, "reads").len(), 2, "{out}");
    assert_eq!(
        tally(&out, "peers").keys().collect::<Vec<_>>(),
        ["[::ffff:198.19.0.10]:80"],
        "{out}"
    );
}

#[test]
fn udp_replies_appear_to_come_from_the_clusterip() {
    let mut node = SimNode::new();
    let dns: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("dns{i}"))).collect();
    let client = node.add_pod("client");
    let _servers: Vec<_> = dns
        .iter()
        .map(|p| p.fixture_server("udp-echo", &["--listen", "0.0.0.0:5353"]))
        .collect();
    let ips: Vec<_> = dns.iter().map(|p| p.ip).collect();
    node.write_manifest(
        "dns.yaml",
        &k8s::service_with_endpoints("dns", "198.19.0.53", 53, "UDP", 5353, &ips),
    );
    let _agent = node.start_agent(&[]);
    for mode in [&[][..], &["--connected"][..]] {
        let mut args = vec!["--to", "198.19.0.53:53", "--count", "50"];
        args.extend_from_slice(mode);
        let out = client.probe("udp-probe", &args, T);
        assert_eq!(out["ok"], 50, "{mode:?}: {out}");
        assert_eq!(
            tally(&out, "sources").keys().collect::<Vec<_>>(),
            ["198.19.0.53:53"],
            "recvfrom must report the VIP ({mode:?}): {out}"
        );
        // One socket keeps one backend: a resolver's request and retries land together.
        assert_eq!(tally(&out, "ids").len(), 1, "{mode:?}: {out}");
    }
    // Different sockets spread over the backends.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let out = client.probe("udp-probe", &["--to", "198.19.0.53:53", "--count", "1"], T);
        seen.extend(tally(&out, "ids").into_keys());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "40 sockets all reached one backend: {seen:?}"
    );
}

#[test]
fn a_removed_endpoint_gets_no_new_connections_and_an_empty_service_refuses_fast() {
    let (node, webs, client, _servers) = web_node(3);
    let _agent = node.start_agent(&[]);
    let ips: Vec<_> = webs.iter().map(|p| p.ip).collect();
    node.write_manifest(
        "web.yaml",
        &k8s::service_with_endpoints("web", VIP, 80, "TCP", 8080, &ips[..2]),
    );
    node.wait_synced(2, T);
    let out = tcp(&client, "198.19.0.10:80", 300);
    assert_eq!(out["ok"], 300, "{out}");
    assert!(
        !tally(&out, "reads").contains_key("web3"),
        "removed endpoint still reached: {out}"
    );

    node.write_manifest(
        "web.yaml",
        &k8s::service_with_endpoints("web", VIP, 80, "TCP", 8080, &[]),
    );
    node.wait_synced(3, T);
    let out = client.probe(
        "tcp-probe",
        &[
            "--to",
            "198.19.0.10:80",
            "--count",
            "20",
            "--timeout-ms",
            "2000",
        ],
        T,
    );
    assert_eq!(
        tally(&out, "errors"),
        BTreeMap::from([("ConnectionRefused(111)".to_string(), 20)]),
        "{out}"
    );
    let slowest = out["failed_connect_us_max"]
        .as_u64()
        .expect("failed connect latency");
    assert!(
        slowest < 10_000,
        "a refused connect took {slowest} us (want < 10 ms)"
    );
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let (node, webs, client, _servers) = web_node(2);
    let write = |conds: [Cond; 2]| {
        let eps = [(webs[0].ip, conds[0]), (webs[1].ip, conds[1])];
        let yaml = format!(
            "{}---\n{}",
            k8s::service("web", VIP, 80, "TCP", ""),
            k8s::slice("web-1", "web", 8080, "TCP", &eps)
        );
        node.write_manifest("web.yaml", &yaml);
    };
    write([Cond::Ready, Cond::Terminating]);
    let _agent = node.start_agent(&[]);
    assert_eq!(
        tally(&tcp(&client, "198.19.0.10:80", 100), "reads"),
        BTreeMap::from([("web1".into(), 100)])
    );
    write([Cond::NotReady, Cond::Terminating]);
    node.wait_synced(2, T);
    assert_eq!(
        tally(&tcp(&client, "198.19.0.10:80", 100), "reads"),
        BTreeMap::from([("web2".into(), 100)])
    );
}

#[test]
fn session_affinity_client_ip_pins_each_client_to_one_backend() {
    let (node, webs, client, _servers) = web_node(3);
    let ips: Vec<_> = webs.iter().map(|p| p.ip).collect();
    let svc = k8s::service(
        "web",
        VIP,
        80,
        "TCP",
        "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
    );
    let eps: Vec<_> = ips.iter().map(|a| (*a, Cond::Ready)).collect();
    node.write_manifest(
        "web.yaml",
        &format!(
            "{svc}---\n{}",
            k8s::slice("web-1", "web", 8080, "TCP", &eps)
        ),
    );
    let _agent = node.start_agent(&[]);
    let out = tcp(&client, "198.19.0.10:80", 100);
    let reads = tally(&out, "reads");
    assert_eq!(reads.values().sum::<u64>(), 100, "{out}");
    assert_eq!(
        reads.len(),
        1,
        "100 connects from one pod reached several backends: {reads:?}"
    );
    // When that backend leaves the Service, the client moves to another one and sticks there.
    let pinned = reads.keys().next().unwrap().clone();
    let rest: Vec<_> = webs
        .iter()
        .filter(|p| p.name != pinned)
        .map(|p| (p.ip, Cond::Ready))
        .collect();
    node.write_manifest(
        "web.yaml",
        &format!(
            "{svc}---\n{}",
            k8s::slice("web-1", "web", 8080, "TCP", &rest)
        ),
    );
    node.wait_synced(2, T);
    let reads = tally(&tcp(&client, "198.19.0.10:80", 50), "reads");
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert!(!reads.contains_key(&pinned), "{reads:?}");
}

#[test]
fn a_killed_agent_loses_no_connect_and_a_restarted_one_adopts_the_pinned_state() {
    let (mut node, mut webs, client, mut servers) = web_node(3);
    let mut agent = node.start_agent(&[]);
    let before = node.dump();
    let served = |servers: &[Proc]| {
        servers
            .iter()
            .map(|s| s.log_text().matches("id sent").count())
            .sum::<usize>()
    };
    let probe = client.spawn_probe(
        "tcp-probe",
        &["--to", "198.19.0.10:80", "--count", "3000", "--read"],
    );
    // Kill the agent mid-stream: once the backends have served a few hundred connects.
    tests::sys::poll("the connect stream to be under way", T, || {
        (served(&servers) >= 300).then_some(())
    });
    agent.signal(nix::sys::signal::Signal::SIGKILL);
    agent.wait_exit(T);
    let out = Pod::finish_probe(probe, T);
    assert_eq!(
        out["ok"], 3000,
        "connects failed while the agent was dead: {out}"
    );
    assert_eq!(
        served(&servers),
        3000,
        "every connect must have reached a backend"
    );
    assert_eq!(
        node.dump(),
        before,
        "the pinned maps changed while the agent was dead"
    );

    // A change made while the agent is down is applied within 2 s of the restart.
    let web4 = node.add_pod("web4");
    servers.push(web4.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]));
    webs.push(web4);
    let ips: Vec<_> = webs.iter().map(|p| p.ip).collect();
    node.write_manifest(
        "web.yaml",
        &k8s::service_with_endpoints("web", VIP, 80, "TCP", 8080, &ips),
    );
    let started = Instant::now();
    let agent2 = node.start_agent(&[]);
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "the change took {elapsed:?} to apply after the restart"
    );
    let _agent2 = agent2;
    let st = node.status();
    assert_eq!(
        st["datapath"]["adopted"], true,
        "links were re-attached instead of adopted: {st}"
    );
    let after = node.dump();
    // Same ids for the old backends (no flush), one new slot and backend for web4.
    for line in before.lines().filter(|l| l.contains("-> backend")) {
        assert!(
            after.contains(line),
            "lost `{line}` across the restart:\n{after}"
        );
    }
    assert!(
        after.contains(&format!("slot 4 -> backend 4 {}:8080", webs[3].ip)),
        "{after}"
    );
    assert_eq!(
        st["last_apply"]["writes"], 3,
        "expected exactly backend+slot+master writes: {st}"
    );
    let reads = tally(&tcp(&client, "198.19.0.10:80", 400), "reads");
    assert_eq!(reads.len(), 4, "{reads:?}");
}

#[test]
fn ten_thousand_services_with_ten_endpoints_each_load() {
    let (node, _webs, client, _servers) = web_node(1);
    let mut yaml = String::with_capacity(12 << 20);
    for i in 1..10_000u32 {
        let vip = format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250);
        let eps: Vec<_> = (1..=10u8)
            .map(|j| (Ipv4Addr::new(198, 18, 200, j), Cond::Ready))
            .collect();
        // A distinct target port per Service makes 10 distinct backends each.
        let _ = write!(
            yaml,
            "{}---\n{}---\n",
            k8s::service(&format!("s{i}"), &vip, 80, "TCP", ""),
            k8s::slice(
                &format!("s{i}-1"),
                &format!("s{i}"),
                10_000 + i as u16,
                "TCP",
                &eps
            )
        );
    }
    node.write_manifest("many.yaml", &yaml);
    let started = Instant::now();
    // 13 MB in one file: above the default limit of 4 MiB.
    let _agent = node.start_agent(&["--max-manifest-bytes", "67108864"]);
    node.wait_status("10000 frontends", Duration::from_secs(300), |s| {
        s["frontends"] == 10000
    });
    eprintln!("10,000 Services loaded in {:?}", started.elapsed());
    let dump = node.dump();
    assert_eq!(
        dump.lines().filter(|l| l.starts_with("SVC ")).count(),
        10_000
    );
    assert!(
        dump.contains("BACKENDS 99991\n"),
        "{}",
        &dump[dump.len().saturating_sub(200)..]
    );
    // The real Service among them still works.
    assert_eq!(tcp(&client, "198.19.0.10:80", 20)["ok"], 20);
}

#[test]
fn a_broken_manifest_is_reported_and_the_last_good_state_keeps_serving() {
    let (node, webs, client, _servers) = web_node(2);
    let _agent = node.start_agent(&[]);
    let ips: Vec<_> = webs.iter().map(|p| p.ip).collect();
    let bad = k8s::service_with_endpoints("web", VIP, 80, "TCP", 8080, &ips)
        .replace("port: 80\n", "port: eighty\n");
    node.write_manifest("web.yaml", &bad);
    let problems = tests::sys::poll("the broken manifest in /problems", T, || {
        let p = node.admin_json("/problems");
        p.as_array().and_then(|a| {
            a.iter()
                .find(|p| p["field"] == "spec.ports[0].port")
                .cloned()
        })
    });
    assert!(
        problems["file"].as_str().unwrap().ends_with("web.yaml")
            && problems["kind"] == "Service"
            && problems["object"] == "default/web",
        "{problems}"
    );
    let out = tcp(&client, "198.19.0.10:80", 50);
    assert_eq!(
        out["ok"], 50,
        "the last good state must keep serving: {out}"
    );
}

#[test]
fn sigterm_exits_cleanly_and_cleanup_detaches_everything() {
    let (node, _webs, client, _servers) = web_node(2);
    let mut agent = node.start_agent(&[]);
    assert!(agent.terminate(T).success(), "{}", agent.log_text());
    assert_eq!(
        tcp(&client, "198.19.0.10:80", 20)["ok"],
        20,
        "the datapath must keep serving after SIGTERM"
    );
    let bpffs = node.bpffs.to_str().unwrap().to_string();
    node.host_place().run(
        tests::sys::bin("proxy-agent"),
        &["cleanup", "--bpffs", &bpffs],
        T,
    );
    assert!(!node.bpffs.exists(), "pins left after cleanup");
    let out = client.probe(
        "tcp-probe",
        &[
            "--to",
            "198.19.0.10:80",
            "--count",
            "1",
            "--timeout-ms",
            "300",
        ],
        T,
    );
    assert_eq!(
        out["ok"], 0,
        "the ClusterIP is still translated after cleanup: {out}"
    );
}

/// Two nodes on an underlay, each with its agent: a ClusterIP reaches pods on both nodes from
/// either node; with `internalTrafficPolicy: Local` each node's clients reach only its own
/// pods; the external client reaches node IPs (a host-network server) and no pod IP.
#[test]
fn clusterip_crosses_nodes_over_the_underlay_and_internal_local_stays_on_the_node() {
    let mut c = tests::SimCluster::new(2);
    let a = c.node_mut(1).add_pod("a");
    let b = c.node_mut(2).add_pod("b");
    let client1 = c.node_mut(1).add_pod("client");
    let client2 = c.node_mut(2).add_pod("client");
    let _servers = [
        a.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]),
        b.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]),
    ];
    let web = |policy: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  internalTrafficPolicy: {policy}\n  ports: [{{name: p, port: 80, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: node1}}\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: node2}}\n",
            a.ip, b.ip
        )
    };
    c.write_manifest("web.yaml", &web("Cluster"));
    let _agents: Vec<_> = (1..=2u8)
        .map(|k| {
            let n = c.node(k);
            n.start_agent(&[
                "--node-ip",
                &n.node_ip.to_string(),
                "--node-name",
                &format!("node{k}"),
            ])
        })
        .collect();
    for client in [&client1, &client2] {
        let out = tcp(client, "198.19.0.10:80", 60);
        assert_eq!(out["ok"], 60, "{out}");
        let reads = tally(&out, "reads");
        assert_eq!(
            reads.keys().cloned().collect::<Vec<_>>(),
            ["a", "b"],
            "{}: both nodes' pods answer: {out}",
            client.name
        );
    }
    let generation = |k: u8| {
        c.node(k).status()["last_apply"]["generation"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = [generation(1), generation(2)];
    c.write_manifest("web.yaml", &web("Local"));
    for (k, client, own) in [(1u8, &client1, "a"), (2, &client2, "b")] {
        let node = c.node(k);
        let gen_ = before[k as usize - 1];
        tests::sys::poll(&format!("node{k} to apply the Local policy"), T, || {
            let st = node.status();
            (st["last_apply"]["generation"].as_u64().unwrap_or(0) > gen_).then_some(())
        });
        let out = tcp(client, "198.19.0.10:80", 30);
        assert_eq!(out["ok"], 30, "{out}");
        assert_eq!(
            tally(&out, "reads").keys().cloned().collect::<Vec<_>>(),
            [own],
            "node{k}: {out}"
        );
    }
    // Outside the cluster: node IPs are reachable, pod IPs are not routed.
    let node2 = c.node(2);
    let mut host_server = tests::Proc::spawn(
        "tcp-id@node2",
        node2.host_place().command(
            tests::sys::bin("fixture"),
            &["tcp-id", "--listen", "0.0.0.0:9000", "--id", "node2-host"],
        ),
        node2.dir.join("logs/node2-host.log"),
    );
    host_server.wait_stdout("listening", T);
    let ul2 = tests::cluster::underlay_ip(2);
    let out = tcp(&c.external, &format!("{ul2}:9000"), 5);
    assert_eq!(out["ok"], 5, "{out}");
    assert_eq!(
        tally(&out, "reads").keys().cloned().collect::<Vec<_>>(),
        ["node2-host"]
    );
    let out = tcp(&c.external, &format!("{}:8080", a.ip), 1);
    assert_eq!(out["ok"], 0, "pod IPs are not routed from outside: {out}");
}

/// One run of the stale-UDP scenario: a resolver keeping one connected socket to the DNS
/// ClusterIP, pinned to dns1; dns1 is deleted (server gone, interface gone) and the
/// EndpointSlice moves to dns2. Returns the resolver's events after the change and its socket
/// count, with the change time, and whether any query (also one sent just before the change)
/// saw its socket destroyed (`ECONNABORTED`).
fn stale_udp_run(terminate: bool, v6: bool) -> (Vec<(u64, String)>, u64, bool) {
    let mut node = SimNode::new();
    let dns1 = node.add_pod("dns1");
    let dns2 = node.add_pod("dns2");
    let client = node.add_pod("client");
    let server1 = dns1.fixture_server("udp-echo", &["--listen", "[::]:5353"]);
    let _server2 = dns2.fixture_server("udp-echo", &["--listen", "[::]:5353"]);
    let svc = |pod: &Pod| {
        if v6 {
            format!(
                "{}---\n{}",
                k8s::service("dns", "2001:2:0:ff::53", 53, "UDP", ""),
                k8s::slice6("dns-1", "dns", 5353, "UDP", &[(pod.ip6, Cond::Ready)])
            )
        } else {
            k8s::service_with_endpoints("dns", "198.19.0.53", 53, "UDP", 5353, &[pod.ip])
        }
    };
    node.write_manifest("dns.yaml", &svc(&dns1));
    let flag = terminate.to_string();
    let _agent = node.start_agent(&["--terminate-stale-udp", &flag]);
    let to = if v6 {
        "[2001:2:0:ff::53]:53"
    } else {
        "198.19.0.53:53"
    };
    let mut resolver = client.spawn_probe("udp-resolver", &["--to", to, "--duration-ms", "4000"]);
    // The resolver's socket is connected and pinned to dns1 once dns1 answered it.
    resolver.wait_log_count("outcome now dns1", 1, T);
    // The pod is deleted: its server and its interface go, and its endpoint with it.
    drop(server1);
    let ns = dns1
        .place
        .netns
        .file_name()
        .and_then(|n| n.to_str())
        .expect("netns name")
        .to_string();
    let st = std::process::Command::new("ip")
        .args(["-n", &ns, "link", "del", "eth0"])
        .status()
        .expect("ip link del");
    assert!(st.success());
    let changed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    node.write_manifest("dns.yaml", &svc(&dns2));
    let out = Pod::finish_probe(resolver, T);
    let before: Vec<&Value> = out["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["at_unix_ms"].as_u64().unwrap_or(0) < changed)
        .collect();
    assert!(
        before.iter().any(|e| e["outcome"] == "dns1"),
        "dns1 answered before the change: {out}"
    );
    let after = out["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| {
            let t = e["at_unix_ms"].as_u64()?;
            (t >= changed).then(|| (t - changed, e["outcome"].as_str().unwrap_or("").to_string()))
        })
        .collect();
    let aborted = out["events"].as_array().expect("events").iter().any(|e| {
        e["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("ConnectionAborted") || o.contains("103"))
    });
    (after, out["sockets"].as_u64().unwrap_or(0), aborted)
}

/// Cilium's most reported socket-LB problem (cilium/cilium#12859, #27300, #35773): a DNS
/// client that keeps one connected UDP socket stays pinned to a deleted CoreDNS pod. With
/// `--terminate-stale-udp false` we reproduce it (no answer for seconds after the change); with
/// it on (the default) the agent destroys the socket, the resolver reconnects and reaches the
/// new pod within 1 s of the EndpointSlice change.
#[test]
fn a_resolver_pinned_to_a_deleted_dns_pod_reconnects_to_the_new_one_within_a_second() {
    let (after, sockets, _) = stale_udp_run(false, false);
    let first_dns2 = after.iter().find(|(_, o)| o == "dns2").map(|(t, _)| *t);
    eprintln!("termination off: first dns2 answer after {first_dns2:?} ms, {sockets} sockets");
    assert!(
        first_dns2.is_none_or(|t| t >= 2000),
        "without termination the socket stays on the deleted pod (the failure reproduced): first dns2 answer at {first_dns2:?} ms, {sockets} sockets: {after:?}"
    );
    let (after, sockets, aborted) = stale_udp_run(true, false);
    assert_repinned("IPv4", &after, sockets);
    // The query in flight when the socket went may have been sent just before the change.
    assert!(
        aborted,
        "the destroyed socket reported ECONNABORTED: {after:?}"
    );
}

/// A hostNetwork client (a process in the node's network namespace, in a cgroup under the
/// attached subtree, as kubelet puts hostNetwork pods) is served like a pod: ClusterIP
/// translated, the peer shown as the ClusterIP, a NodePort on localhost translated as well.
#[test]
fn a_host_network_client_is_served_like_a_pod() {
    let (node, webs, _client, _servers) = web_node(2);
    let node_port = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 198.19.0.11\n  ports: [{{name: p, port: 80, protocol: TCP, nodePort: 30080}}]\n---\n{}",
        k8s::slice("np-1", "np", 8080, "TCP", &[(webs[0].ip, Cond::Ready)])
    );
    node.write_manifest("np.yaml", &node_port);
    let _agent = node.start_agent(&[]);
    node.wait_status("3 frontends", T, |s| s["frontends"] == 3);
    let host = Pod {
        name: "host".into(),
        ip: node.node_ip,
        ip6: node.node_ip6(),
        place: node.host_place(),
    };
    let out = tcp(&host, "198.19.0.10:80", 40);
    assert_eq!(out["ok"], 40, "{out}");
    assert_eq!(tally(&out, "reads").len(), 2, "both backends: {out}");
    assert_eq!(
        tally(&out, "peers").keys().collect::<Vec<_>>(),
        ["198.19.0.10:80"],
        "{out}"
    );
    let out = tcp(&host, "127.0.0.1:30080", 10);
    assert_eq!(out["ok"], 10, "NodePort on localhost: {out}");
    assert_eq!(
        tally(&out, "peers").keys().collect::<Vec<_>>(),
        ["127.0.0.1:30080"],
        "{out}"
    );
}

/// `--socket-lb-hostns-only` (for pods with sidecar proxies): the socket hooks leave pods alone
/// (their connect to the ClusterIP is not translated) and still serve host-network processes.
#[test]
fn socket_lb_hostns_only_serves_the_host_and_leaves_pods_alone() {
    let (node, _webs, client, _servers) = web_node(2);
    let _agent = node.start_agent(&["--socket-lb-hostns-only"]);
    let host = Pod {
        name: "host".into(),
        ip: node.node_ip,
        ip6: node.node_ip6(),
        place: node.host_place(),
    };
    let out = tcp(&host, "198.19.0.10:80", 20);
    assert_eq!(out["ok"], 20, "host-network processes are served: {out}");
    let out = client.probe(
        "tcp-probe",
        &[
            "--to",
            "198.19.0.10:80",
            "--count",
            "3",
            "--read",
            "--timeout-ms",
            "500",
        ],
        T,
    );
    assert_eq!(
        out["ok"], 0,
        "a pod's connect is left to its own proxy: {out}"
    );
}

/// `trafficDistribution: PreferClose`: with zone hints on every endpoint, each node's clients
/// use the endpoints hinted for its zone (`--zone`); the hints are ignored without it.
#[test]
fn prefer_close_keeps_clients_in_their_zone() {
    let mut c = tests::SimCluster::new(2);
    let a = c.node_mut(1).add_pod("a");
    let b = c.node_mut(2).add_pod("b");
    let client1 = c.node_mut(1).add_pod("client");
    let client2 = c.node_mut(2).add_pod("client");
    let _servers = [
        a.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]),
        b.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]),
    ];
    let web = |distribution: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n{distribution}  ports: [{{name: p, port: 80, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: node1, zone: z1, hints: {{forZones: [{{name: z1}}]}}}}\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: node2, zone: z2, hints: {{forZones: [{{name: z2}}]}}}}\n",
            a.ip, b.ip
        )
    };
    c.write_manifest("web.yaml", &web("  trafficDistribution: PreferClose\n"));
    let _agents: Vec<_> = (1..=2u8)
        .map(|k| {
            c.node(k).start_agent(&[
                "--node-name",
                &format!("node{k}"),
                "--zone",
                &format!("z{k}"),
            ])
        })
        .collect();
    for (client, own) in [(&client1, "a"), (&client2, "b")] {
        let out = tcp(client, "198.19.0.10:80", 30);
        assert_eq!(out["ok"], 30, "{out}");
        assert_eq!(
            tally(&out, "reads").keys().cloned().collect::<Vec<_>>(),
            [own],
            "{}: its zone's endpoint only: {out}",
            client.name
        );
    }
    let before = c.node(1).status()["last_apply"]["generation"]
        .as_u64()
        .unwrap_or(0);
    c.write_manifest("web.yaml", &web(""));
    tests::sys::poll("node1 to apply the change", T, || {
        let g = c.node(1).status()["last_apply"]["generation"]
            .as_u64()
            .unwrap_or(0);
        (g > before).then_some(())
    });
    let out = tcp(&client1, "198.19.0.10:80", 40);
    assert_eq!(
        tally(&out, "reads").keys().cloned().collect::<Vec<_>>(),
        ["a", "b"],
        "without PreferClose both zones: {out}"
    );
}

/// The IPv6 ClusterIPs of the tests (a service range in the benchmarking prefix 2001:2::/48).
const VIP6: &str = "2001:2:0:ff::10";

/// A node whose pods `web1..n` serve `tcp-id` and `udp-echo` on both families (`[::]` sockets),
/// a client pod, and no Service yet.
fn dual_stack_node(n: usize) -> (SimNode, Vec<Pod>, Pod, Vec<Proc>) {
    let mut node = SimNode::new();
    let webs: Vec<Pod> = (1..=n).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let mut servers = Vec::new();
    for p in &webs {
        servers.push(p.fixture_server("tcp-id", &["--listen", "[::]:8080"]));
        servers.push(p.fixture_server("udp-echo", &["--listen", "[::]:5353"]));
    }
    (node, webs, client, servers)
}

/// A Service `name` with a TCP port 80 → 8080 and a UDP port 53 → 5353, on `cluster_ips` (the
/// primary first), and one EndpointSlice per family of them over `webs`.
fn dual_stack_service(name: &str, cluster_ips: &[&str], webs: &[Pod]) -> String {
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  ipFamilyPolicy: {}\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: 8080}}\n  - {{name: udp, port: 53, protocol: UDP, targetPort: 5353}}\n",
        cluster_ips[0],
        cluster_ips.join(", "),
        families.join(", "),
        if cluster_ips.len() == 2 {
            "RequireDualStack"
        } else {
            "SingleStack"
        },
    );
    for family in &families {
        let addrs: Vec<String> = webs
            .iter()
            .map(|p| {
                if *family == "IPv6" {
                    format!("\"{}\"", p.ip6)
                } else {
                    format!("\"{}\"", p.ip)
                }
            })
            .collect();
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports:\n- {{name: tcp, port: 8080, protocol: TCP}}\n- {{name: udp, port: 5353, protocol: UDP}}\nendpoints:\n",
            family.to_ascii_lowercase()
        );
        for a in addrs {
            let _ = writeln!(y, "- addresses: [{a}]\n  conditions: {{ready: true}}");
        }
    }
    y
}

/// Checks TCP (spread, getpeername) and UDP (unconnected and connected: recvfrom) through
/// `vip` (an `ip` or `[ip]` literal without port).
fn check_both_protocols(client: &Pod, vip: &str, webs: usize) {
    let out = tcp(client, &format!("{vip}:80"), 60);
    assert_eq!(out["ok"], 60, "TCP through {vip}: {out}");
    assert_eq!(
        tally(&out, "reads").len(),
        webs,
        "TCP spread over {vip}: {out}"
    );
    assert_eq!(
        tally(&out, "peers").keys().cloned().collect::<Vec<_>>(),
        [format!("{vip}:80")],
        "getpeername must report the VIP: {out}"
    );
    for mode in [&[][..], &["--connected"][..]] {
        let to = format!("{vip}:53");
        let mut args = vec!["--to", &to, "--count", "20"];
        args.extend_from_slice(mode);
        let out = client.probe("udp-probe", &args, T);
        assert_eq!(out["ok"], 20, "UDP through {vip} {mode:?}: {out}");
        assert_eq!(
            tally(&out, "sources").keys().cloned().collect::<Vec<_>>(),
            [format!("{vip}:53")],
            "recvfrom must report the VIP ({mode:?}): {out}"
        );
    }
}

/// An IPv6-only Service: connect6/sendmsg6 translate a native IPv6 ClusterIP to IPv6 pod
/// addresses, recvmsg6/getpeername6 show the IPv6 VIP, and the maps and CLI show it.
#[test]
fn an_ipv6_only_service_is_balanced_over_ipv6_endpoints() {
    let (node, webs, client, _servers) = dual_stack_node(2);
    node.write_manifest("web6.yaml", &dual_stack_service("web6", &[VIP6], &webs));
    let _agent = node.start_agent(&[]);
    node.wait_status("2 frontends", T, |s| s["frontends"] == 2);
    check_both_protocols(&client, &format!("[{VIP6}]"), 2);
    let st = node.status();
    assert!(
        st["datapath_counters"]["connect6"].as_u64().unwrap_or(0) >= 60,
        "connect6 counted the IPv6 translations: {}",
        st["datapath_counters"]
    );
    let dump = node.dump();
    assert!(
        dump.contains(&format!("SVC [{VIP6}]:80/TCP"))
            && dump.contains(&format!("[{}]:8080 active", webs[0].ip6)),
        "the IPv6 frontend and backends are in the maps:\n{dump}"
    );
    // An IPv6 EndpointSlice change is applied like an IPv4 one: web2 removed.
    node.write_manifest(
        "web6.yaml",
        &dual_stack_service("web6", &[VIP6], &webs[..1]),
    );
    node.wait_status("web2 removed", T, |_| {
        !node.dump().contains(&format!("[{}]:8080", webs[1].ip6))
    });
    let out = tcp(&client, &format!("[{VIP6}]:80"), 20);
    assert_eq!(out["ok"], 20, "{out}");
    assert_eq!(
        tally(&out, "reads").keys().cloned().collect::<Vec<_>>(),
        ["web1"],
        "{out}"
    );
}

/// A dual-stack Service (`clusterIPs` of both families, one EndpointSlice per family): each
/// family's ClusterIP balances over that family's endpoints, TCP and UDP, and each shows its
/// own VIP back; an IPv4-mapped IPv6 socket still reaches the IPv4 ClusterIP.
#[test]
fn a_dual_stack_service_serves_both_families_with_their_own_endpoints() {
    let (node, webs, client, _servers) = dual_stack_node(2);
    node.write_manifest(
        "web.yaml",
        &dual_stack_service("web", &["198.19.0.20", "2001:2:0:ff::20"], &webs),
    );
    let _agent = node.start_agent(&[]);
    node.wait_status("4 frontends", T, |s| s["frontends"] == 4);
    check_both_protocols(&client, "198.19.0.20", 2);
    check_both_protocols(&client, "[2001:2:0:ff::20]", 2);
    let out = tcp(&client, "[::ffff:198.19.0.20]:80", 20);
    assert_eq!(out["ok"], 20, "{out}");
    // The CLI lists both ClusterIPs of the Service.
    let services = node.cli(&["services"]);
    assert!(
        services.contains("198.19.0.20") && services.contains("2001:2:0:ff::20"),
        "{services}"
    );
}

/// The same re-pinning for an IPv6 resolver on an IPv6 ClusterIP: the connected IPv6 UDP
/// socket is found (sock_diag, AF_INET6), matched in the IPv6 reverse map and destroyed.
#[test]
fn an_ipv6_resolver_pinned_to_a_deleted_dns_pod_reconnects_too() {
    let (after, sockets, _) = stale_udp_run(true, true);
    assert_repinned("IPv6", &after, sockets);
}

/// With termination on: the resolver reached dns2 within 1 s of the change, on a new socket.
fn assert_repinned(family: &str, after: &[(u64, String)], sockets: u64) {
    let first_dns2 = after.iter().find(|(_, o)| o == "dns2").map(|(t, _)| *t);
    eprintln!(
        "{family}, termination on: first dns2 answer after {first_dns2:?} ms, {sockets} sockets"
    );
    assert!(
        first_dns2.is_some_and(|t| t < 1000),
        "the {family} resolver reaches dns2 within 1 s: first answer at {first_dns2:?} ms: {after:?}"
    );
    assert!(
        sockets >= 2,
        "it reconnected after its socket was destroyed: {after:?}"
    );
}
