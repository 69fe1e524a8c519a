//! `cargo xtask bench sync`: the agent following an API server double with 1,000 and 10,000
//! HTTP Services of 10 endpoints each: initial sync time, latency from an EndpointSlice change on
//! the double to the datapath maps and the proxy routes having it (the agent logs "datapath
//! synced" after both), and the agent's RSS.

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use serde_json::json;
use tests::SimNode;
use tests::apiserver::ApiServer;

const SIZES: [u32; 2] = [1_000, 10_000];
const CHANGES: usize = 60;
const T: Duration = Duration::from_secs(120);

fn vip(i: u32) -> String {
    format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250)
}

fn service(i: u32) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("s{i}"), "namespace": "default"},
           "spec": {"clusterIP": vip(i), "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn slice(i: u32, ready_mask: u16) -> serde_json::Value {
    let eps: Vec<_> = (0..10u8)
        .map(|j| {
            let ready = ready_mask & (1 << j) != 0;
            json!({"addresses": [Ipv4Addr::new(198, 18, 200 + (i / 6000) as u8, j + 1).to_string()],
                   "conditions": {"ready": ready, "serving": ready, "terminating": false}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("s{i}-1"), "namespace": "default", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 10_000 + (i % 50_000), "protocol": "TCP"}], "endpoints": eps})
}

/// Seconds since the Unix epoch of an agent log line's RFC 3339 UTC timestamp.
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    // Days since the epoch (civil calendar, Howard Hinnant's algorithm).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = time.split(':');
    let (h, mi, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + s)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Runs the sync benchmark and prints its table.
pub fn run() -> Result<()> {
    let mut rows = Vec::new();
    for n in SIZES {
        eprintln!("bench sync: {n} Services");
        let node = SimNode::new();
        let api = ApiServer::start(Some(&node.netns_path()));
        for i in 0..n {
            api.apply(service(i));
            api.apply(slice(i, 0x3ff));
        }
        let kubeconfig = node.dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig())?;
        let started = now();
        let mut agent = node.start_agent_kube(&kubeconfig, &["--node-ip", "198.18.0.1"]);
        let log = agent.wait_log_count(&format!("frontends={n} "), 1, T);
        let line = log
            .lines()
            .find(|l| l.contains(&format!("frontends={n} ")))
            .context("sync line")?;
        let initial = log_time(line).context("timestamp")? - started;
        let mut synced = log.matches("datapath synced").count();
        let mut lat = Vec::new();
        for k in 0..CHANGES {
            // Each pair of changes flips one endpoint of one Service and back.
            let i = ((k / 2) as u32 * 7919) % n;

            // Flip one endpoint of one Service to not ready (and back on the next round).
            let mask = if k % 2 == 0 { 0x3fe } else { 0x3ff };
            let t0 = now();
            api.apply(slice(i, mask));
            synced += 1;
            let log = agent.wait_log_count("datapath synced", synced, T);
            let line = log
                .lines()
                .filter(|l| l.contains("datapath synced"))
                .nth(synced - 1)
                .context("sync line")?;
            lat.push((log_time(line).context("timestamp")? - t0) * 1000.0);
        }
        let text = agent.log_text();
        if let Some(l) = text.lines().rev().find(|l| l.contains("datapath synced")) {
            eprintln!(
                "bench sync: last sync: {}",
                l.split_once("generation").map_or(l, |x| x.1)
            );
        }
        if let Some(l) = text.lines().rev().find(|l| l.contains("state rebuilt")) {
            eprintln!(
                "bench sync: {}",
                l.split_once("source::kube: ").map_or(l, |x| x.1)
            );
        }
        lat.sort_by(f64::total_cmp);
        rows.push((
            n,
            initial,
            pct(&lat, 50.0),
            pct(&lat, 99.0),
            tests::sys::rss_kib(agent.pid()) / 1024,
        ));
    }
    println!(
        "\nSync from the API server double (HTTP Services, 10 endpoints each; {CHANGES} EndpointSlice changes)"
    );
    println!(
        "{:>9} {:>16} {:>14} {:>14} {:>12}",
        "services", "initial sync s", "change p50 ms", "change p99 ms", "agent RSS MiB"
    );
    for (n, initial, p50, p99, rss) in rows {
        println!("{n:>9} {initial:>16.2} {p50:>14.1} {p99:>14.1} {rss:>12}");
    }
    println!(
        "(targets: change p99 < 100 ms and RSS < 150 MiB at 10,000 Services; kube-proxy syncs at most once a second)"
    );
    Ok(())
}
