//! Walking skeleton: a connection to a ClusterIP from a simulated pod reaches backend pods through
//! the eBPF program, with no iptables anywhere. Needs root.

use std::time::Duration;

use tests::SimNode;
use tests::k8s;

#[test]
fn clusterip_connects_reach_both_backends_through_ebpf() {
    let mut node = SimNode::new();
    let web1 = node.add_pod("web1");
    let web2 = node.add_pod("web2");
    let client = node.add_pod("client");
    let _s1 = web1.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]);
    let _s2 = web2.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]);
    node.write_manifest(
        "web.yaml",
        &k8s::service_with_endpoints("web", "198.19.0.10", 80, "TCP", 8080, &[web1.ip, web2.ip]),
    );

    // Before the agent runs, the ClusterIP leads nowhere: the pods have no route to it but the
    // node, which has none either.
    let before = client.probe(
        "tcp-probe",
        &[
            "--to",
            "198.19.0.10:80",
            "--count",
            "1",
            "--timeout-ms",
            "500",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(
        before["ok"], 0,
        "the ClusterIP answered without the agent: {before}"
    );

    let _agent = node.start_agent(&[]);
    let out = client.probe(
        "tcp-probe",
        &["--to", "198.19.0.10:80", "--count", "200", "--read"],
        Duration::from_secs(60),
    );
    assert_eq!(out["ok"], 200, "{out}");
    let reads = out["reads"].as_object().expect("reads");
    for pod in ["web1", "web2"] {
        let n = reads.get(pod).and_then(|v| v.as_u64()).unwrap_or(0);
        assert!(n > 50, "backend {pod} got {n} of 200 connections: {out}");
    }
    // Applications see the ClusterIP as their peer (getpeername translated back).
    assert_eq!(
        out["peers"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["198.19.0.10:80"],
        "{out}"
    );

    // No iptables rule exists in the client pod or on the node: the translation is the socket hook.
    for ns in [&client.place.netns, &node.host_place().netns] {
        let rules = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["iptables-save"])
            .output()
            .expect("iptables-save (install iptables)");
        let text = String::from_utf8_lossy(&rules.stdout);
        assert!(
            !text.lines().any(|l| l.starts_with("-A")),
            "unexpected iptables rules in {}: {text}",
            ns.display()
        );
    }
    let dump = node.dump();
    assert!(
        dump.contains("SVC 198.19.0.10:80/TCP id=1 count=2"),
        "{dump}"
    );
}
