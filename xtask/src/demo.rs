//! `cargo xtask demo`: a simulated node whose pods reach Services through the agent's eBPF
//! datapath, fed from a manifests directory; shows balancing, UDP, an endpoint removal and the
//! datapath surviving a killed agent, and what the agent's CLI shows of all of it.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use tests::SimNode;
use tests::k8s;

fn counts(v: &Value, key: &str) -> String {
    let mut items: Vec<(String, u64)> = v[key]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    items.sort();
    items
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join("  ")
}

/// Runs the demo; the node is removed when it returns (even on error).
pub fn run() -> Result<()> {
    let mut node = SimNode::new();
    println!(
        "== simulated node {} (netns {}, cgroup {})",
        node.name,
        node.netns,
        node.cgroup.display()
    );
    let webs: Vec<_> = (1..=3).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let dns = node.add_pod("dns");
    let client = node.add_pod("client");
    let _servers: Vec<_> = webs
        .iter()
        .map(|p| p.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let _dns = dns.fixture_server("udp-echo", &["--listen", "0.0.0.0:5353"]);
    let ips: Vec<_> = webs.iter().map(|p| p.ip).collect();
    node.write_manifest(
        "web.yaml",
        &k8s::service_with_endpoints("web", "198.19.0.10", 80, "TCP", 8080, &ips),
    );
    node.write_manifest(
        "dns.yaml",
        &k8s::service_with_endpoints("dns", "198.19.0.53", 53, "UDP", 5353, &[dns.ip]),
    );
    for p in webs.iter().chain([&dns, &client]) {
        println!("   pod {:<7} {}", p.name, p.ip);
    }

    let agent = node.start_agent(&[]);
    println!("\n== agent running; maps:\n{}", node.dump());

    let probe = |n: &str| {
        client.probe(
            "tcp-probe",
            &["--to", "198.19.0.10:80", "--count", n, "--read"],
            Duration::from_secs(60),
        )
    };
    let out = probe("600");
    println!(
        "600 TCP connects from pod client to 198.19.0.10:80 (ok={}):",
        out["ok"]
    );
    println!("   backends: {}", counts(&out, "reads"));
    println!("   getpeername() saw: {}", counts(&out, "peers"));
    println!("   connect latency us: {}", out["connect_us"]);
    ensure!(out["ok"] == 600, "connects failed: {out}");

    let udp = client.probe(
        "udp-probe",
        &["--to", "198.19.0.53:53", "--count", "20"],
        Duration::from_secs(30),
    );
    println!(
        "\n20 UDP requests to 198.19.0.53:53 (ok={}): replies from {}",
        udp["ok"],
        counts(&udp, "sources")
    );

    println!("\n== seeing inside the node: the agent's CLI (its admin API on the node's loopback)");
    for args in [
        vec!["status"],
        vec!["services"],
        vec!["service", "default/web"],
        vec![
            "explain",
            "--from",
            &client.ip.to_string(),
            "--to",
            "198.19.0.10:80",
        ],
    ] {
        println!("$ proxy-agent {}", args.join(" "));
        print!("{}", node.cli(&args));
    }
    println!("$ proxy-agent monitor -t trace --count 2   (while pod client connects)");
    let mut mon = tests::Proc::spawn(
        "monitor",
        node.host_place().command(
            tests::sys::bin("proxy-agent"),
            &["monitor", "-t", "trace", "--count", "2"],
        ),
        node.dir.join("logs/monitor.log"),
    );
    tests::sys::poll(
        "the monitor to show two events",
        Duration::from_secs(30),
        || {
            probe("1");
            (!mon.running()).then_some(())
        },
    );
    for l in mon.stdout_lines() {
        println!("{l}");
    }

    println!("\n== removing web3 from the EndpointSlice");
    node.write_manifest(
        "web.yaml",
        &k8s::service_with_endpoints("web", "198.19.0.10", 80, "TCP", 8080, &ips[..2]),
    );
    node.wait_synced(2, Duration::from_secs(10));
    let out = probe("300");
    println!("300 connects after the change: {}", counts(&out, "reads"));
    ensure!(
        out["reads"].get("web3").is_none(),
        "web3 still reached: {out}"
    );

    println!("\n== SIGKILL the agent: the pinned datapath keeps serving");
    agent.signal(nix::sys::signal::Signal::SIGKILL);
    let out = probe("300");
    println!(
        "300 connects with no agent running: ok={} {}",
        out["ok"],
        counts(&out, "reads")
    );
    ensure!(out["ok"] == 300, "connects failed without the agent: {out}");
    let agent2 = node.start_agent(&[]);
    let adopted = node.status()["datapath"]["adopted"] == true;
    println!("restarted agent adopted the pinned links and maps: {adopted}");
    ensure!(
        adopted,
        "the restarted agent did not adopt the pinned state"
    );
    drop(agent2);
    drop(node);

    println!("\n== the seed experiment (mission.md): one pod starts failing under load");
    crate::seed::compare()?;
    println!("\n== done");
    Ok(())
}
