//! `cargo xtask bench l7`: requests/s and latency at 16 connections (wrk) and at a fixed
//! 1,000 requests/s (hey), directly to a pod, through our node proxy, through HAProxy and through
//! nginx (both configured with retries and upstream keep-alive), in the same run; plus CPU per
//! 1,000 requests and RSS of each proxy. Our proxy runs as shipped, without request metrics and
//! with an access log, so the cost of each shows against the same baseline.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use tests::k8s;
use tests::node::NODE_IP;
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(120);

#[derive(Default, Clone, Copy)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: f64,
}

/// Parses `215.00us`, `1.23ms`, `2.5s` into milliseconds.
fn ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn parse_wrk(out: &str) -> Result<Run> {
    let pct = |p: &str| {
        out.lines()
            .map(str::trim)
            .find(|l| l.starts_with(p))
            .and_then(|l| ms(l.split_whitespace().nth(1)?))
    };
    let rps = out
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok());
    let non2xx = out
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses"))
        .is_some();
    ensure!(!non2xx, "wrk saw error responses:\n{out}");
    Ok(Run {
        rps: rps.context("wrk printed no Requests/sec")?,
        p50_ms: pct("50%").context("wrk printed no 50%")?,
        p99_ms: pct("99%").context("wrk printed no 99%")?,
        requests: requests.context("wrk printed no request count")?,
    })
}

fn parse_hey(out: &str) -> Result<Run> {
    let pct = |p: &str| {
        out.lines()
            .map(str::trim)
            .find(|l| l.starts_with(&format!("{p} in ")))
            .and_then(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
            .map(|s| s * 1000.0)
    };
    let rps = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    let ok = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("[200]"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok());
    let total: f64 = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum();
    ensure!(
        ok.is_some() && ok == Some(total),
        "hey saw non-200 responses:\n{out}"
    );
    Ok(Run {
        rps: rps.context("hey printed no Requests/sec")?,
        p50_ms: pct("50%").context("hey printed no 50%")?,
        p99_ms: pct("99%").context("hey printed no 99%")?,
        requests: total,
    })
}

/// (utime + stime in clock ticks, RSS in KiB) summed over a process and its descendants.
fn tree_usage(root: u32) -> (u64, u64) {
    let mut pids = vec![root];
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        if let Ok(d) = std::fs::read_dir("/proc") {
            for e in d.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
                if after
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<u32>().ok())
                    == Some(parent)
                    && !pids.contains(&pid)
                {
                    pids.push(pid);
                }
            }
        }
        i += 1;
    }
    let (mut cpu, mut rss) = (0, 0);
    for pid in pids {
        cpu += tests::sys::cpu_ticks(pid);
        rss += tests::sys::rss_kib(pid);
    }
    (cpu, rss)
}

fn haproxy_cfg(backends: &[Ipv4Addr]) -> String {
    let mut c = format!(
        "global\n  maxconn 4000\n  nbthread 2\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  retries 2\n  option redispatch 1\n  retry-on conn-failure empty-response response-timeout 503\n  http-reuse always\nfrontend fe\n  bind {NODE_IP}:8081\n  default_backend be\nbackend be\n  balance leastconn\n"
    );
    for (i, b) in backends.iter().enumerate() {
        let _ = writeln!(c, "  server w{i} {b}:8080");
    }
    c
}

fn nginx_cfg(dir: &str, backends: &[Ipv4Addr]) -> String {
    let mut up = String::new();
    for b in backends {
        let _ = writeln!(up, "    server {b}:8080 max_fails=0;");
    }
    format!(
        "daemon off;\nworker_processes 2;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  upstream be {{\n    least_conn;\n{up}    keepalive 64;\n  }}\n  server {{\n    listen {NODE_IP}:8082;\n    location / {{\n      proxy_pass http://be;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_next_upstream error timeout http_503;\n      proxy_next_upstream_tries 3;\n    }}\n  }}\n}}\n"
    )
}

struct Target {
    name: &'static str,
    url: String,
    /// The process whose CPU and RSS are measured (`None`: direct).
    pid: Option<u32>,
    /// For our proxy: the agent flags of this variant (the agent is restarted with them).
    agent: Option<&'static [&'static str]>,
}

/// Agent variants: as shipped, without request metrics (their cost), with an access log.
const DEFAULT: &[&str] = &[];
const NO_METRICS: &[&str] = &["--request-metrics", "false"];
const ACCESS_LOG: &[&str] = &["--access-log", "ACCESS_LOG"];

/// wrk at 16 connections, hey at 1,000 req/s, and (CPU ms per 1,000 requests, RSS KiB).
type Measured = (Run, Run, Option<(f64, u64)>);

fn measure(client: &Pod, t: &Target) -> Result<Measured> {
    // Warm up connections and caches.
    client.run("wrk", &["-t1", "-c4", "-d1s", &t.url], T);
    let before = t.pid.map(tree_usage);
    let wrk = parse_wrk(&client.run("wrk", &["-t2", "-c16", "-d10s", "--latency", &t.url], T))?;
    let after = t.pid.map(tree_usage);
    let hey = parse_hey(&client.run("hey", &["-z", "10s", "-c", "10", "-q", "100", &t.url], T))?;
    let ticks = 100.0; // USER_HZ
    let usage = match (before, after) {
        (Some(b), Some(a)) => Some((
            (a.0 - b.0) as f64 / ticks * 1000.0 / wrk.requests * 1000.0,
            a.1,
        )),
        _ => None,
    };
    Ok((wrk, hey, usage))
}

/// Rounds of the whole comparison.
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of each metric over the rounds.
fn median_of(runs: &[Measured]) -> Measured {
    let run = |f: &dyn Fn(&Measured) -> Run| Run {
        rps: median(runs.iter().map(|m| f(m).rps).collect()),
        p50_ms: median(runs.iter().map(|m| f(m).p50_ms).collect()),
        p99_ms: median(runs.iter().map(|m| f(m).p99_ms).collect()),
        requests: median(runs.iter().map(|m| f(m).requests).collect()),
    };
    let usage = runs.iter().all(|m| m.2.is_some()).then(|| {
        (
            median(runs.iter().filter_map(|m| m.2.map(|u| u.0)).collect()),
            runs.iter()
                .filter_map(|m| m.2.map(|u| u.1))
                .max()
                .unwrap_or(0),
        )
    });
    (run(&|m| m.0), run(&|m| m.1), usage)
}

/// A VirtualService for `host` with 49 rules matching a header and a path prefix the benchmark
/// never sends, then the catch-all.
fn fifty_rules(host: &str) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}}}\nspec:\n  hosts: [{host}]\n  http:\n"
    );
    for i in 0..49 {
        let _ = write!(
            y,
            "  - match: [{{headers: {{x-tenant: {{exact: tenant-{i}}}}}, uri: {{prefix: /tenant-{i}/}}}}]\n    route: [{{destination: {{host: {host}}}}}]\n"
        );
    }
    let _ = writeln!(y, "  - route: [{{destination: {{host: {host}}}}}]");
    y
}

/// Runs the L7 benchmark and prints its table.
pub fn run() -> Result<()> {
    crate::setup::ensure_packages(&["wrk", "hey", "haproxy", "nginx-light"])?;
    let mut node = SimNode::new();
    let pods: Vec<Pod> = (1..=2)
        .map(|i| node.add_pod(&format!("webapp{i}")))
        .collect();
    let client = node.add_pod("client");
    let _servers: Vec<Proc> = pods
        .iter()
        .map(|p| p.fixture_server("webapp", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    node.write_manifest(
        "webapp.yaml",
        &k8s::http_service("webapp", "198.19.0.10", 80, 8080, &ips),
    );
    // The same pods behind a VirtualService of 50 rules whose first 49 (a header and a path
    // each) never match the benchmark's requests: every request evaluates all of them.
    node.write_manifest(
        "webapp50.yaml",
        &format!(
            "{}---\n{}",
            k8s::http_service("webapp50", "198.19.0.11", 80, 8080, &ips),
            fifty_rules("webapp50")
        ),
    );
    let access_log = node.dir.join("access.log");
    let access_log = access_log.to_str().context("utf-8")?.to_string();
    let node_ip = NODE_IP.to_string();
    let start = |flags: &[&str]| {
        let mut args = vec!["--node-ip", node_ip.as_str()];
        args.extend(flags.iter().map(|f| {
            if *f == "ACCESS_LOG" {
                access_log.as_str()
            } else {
                f
            }
        }));
        let a = node.start_agent(&args);
        node.wait_l7_routes(2, T);
        a
    };
    let mut agent = start(DEFAULT);
    let mut running: &[&str] = DEFAULT;

    let dir = node.dir.to_str().context("utf-8")?.to_string();
    std::fs::write(node.dir.join("haproxy.cfg"), haproxy_cfg(&ips))?;
    for sub in ["body", "proxy"] {
        std::fs::create_dir_all(node.dir.join(sub))?;
    }
    std::fs::write(node.dir.join("nginx.conf"), nginx_cfg(&dir, &ips))?;
    let host = node.host_place();
    let hap = Proc::spawn(
        "haproxy",
        host.command("haproxy", &["-db", "-f", &format!("{dir}/haproxy.cfg")]),
        node.dir.join("logs/haproxy.log"),
    );
    let ngx = Proc::spawn(
        "nginx",
        host.command("nginx", &["-p", &dir, "-c", &format!("{dir}/nginx.conf")]),
        node.dir.join("logs/nginx.log"),
    );
    for port in ["8081", "8082"] {
        let url = format!("http://{NODE_IP}:{port}/");
        tests::sys::poll(&format!("{url} to answer"), T, || {
            let out = client.probe(
                "http-probe",
                &["--url", &url, "--count", "1", "--timeout-ms", "500"],
                T,
            );
            (out["ok"] == 1).then_some(())
        });
    }
    let targets = [
        Target {
            name: "direct to a pod",
            url: format!("http://{}:8080/", ips[0]),
            pid: None,
            agent: None,
        },
        Target {
            name: "our node proxy",
            url: "http://198.19.0.10/".into(),
            pid: None,
            agent: Some(DEFAULT),
        },
        Target {
            name: "ours, no metrics",
            url: "http://198.19.0.10/".into(),
            pid: None,
            agent: Some(NO_METRICS),
        },
        Target {
            name: "ours, access log",
            url: "http://198.19.0.10/".into(),
            pid: None,
            agent: Some(ACCESS_LOG),
        },
        Target {
            name: "ours, 50-rule VS",
            url: "http://198.19.0.11/".into(),
            pid: None,
            agent: Some(DEFAULT),
        },
        Target {
            name: "HAProxy 2.6",
            url: format!("http://{NODE_IP}:8081/"),
            pid: Some(hap.pid()),
            agent: None,
        },
        Target {
            name: "nginx 1.22",
            url: format!("http://{NODE_IP}:8082/"),
            pid: Some(ngx.pid()),
            agent: None,
        },
    ];
    // Three interleaved rounds (every target once per round); each cell is the median of three,
    // so one noisy 10 s window on this 2-core VM does not decide a comparison.
    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); targets.len()];
    for round in 1..=ROUNDS {
        for (i, t) in targets.iter().enumerate() {
            eprintln!("bench l7: round {round}/{ROUNDS}: {}", t.name);
            let mut t = Target {
                name: t.name,
                url: t.url.clone(),
                pid: t.pid,
                agent: t.agent,
            };
            if let Some(flags) = t.agent {
                if flags != running {
                    // The pinned datapath keeps serving while the agent restarts.
                    agent.terminate(T);
                    agent = start(flags);
                    running = flags;
                }
                t.pid = Some(agent.pid());
            }
            runs[i].push(measure(&client, &t)?);
        }
    }
    let rows: Vec<(&str, Measured)> = targets
        .iter()
        .zip(&runs)
        .map(|(t, r)| (t.name, median_of(r)))
        .collect();
    let direct = rows[0].1;
    println!(
        "\nL7: webapp with 2 pods; wrk -t2 -c16 -d10s, and hey -c10 -q100 (1,000 req/s) for 10 s, from a pod; medians of {ROUNDS} interleaved rounds (RSS: the largest)"
    );
    println!(
        "{:<18} {:>10} {:>9} {:>9} {:>12} | {:>9} {:>9} {:>13} | {:>13} {:>8}",
        "path",
        "16c req/s",
        "p50 ms",
        "p99 ms",
        "+p99 ms",
        "1k p50",
        "1k p99",
        "+p99 @1k ms",
        "CPU ms/1k req",
        "RSS MiB"
    );
    for (name, (wrk, hey, usage)) in &rows {
        let (cpu, rss) = usage.map_or(("-".to_string(), "-".to_string()), |(c, r)| {
            (format!("{c:.1}"), format!("{}", r / 1024))
        });
        println!(
            "{:<18} {:>10.0} {:>9.3} {:>9.3} {:>12.3} | {:>9.3} {:>9.3} {:>13.3} | {:>13} {:>8}",
            name,
            wrk.rps,
            wrk.p50_ms,
            wrk.p99_ms,
            wrk.p99_ms - direct.0.p99_ms,
            hey.p50_ms,
            hey.p99_ms,
            hey.p99_ms - direct.1.p99_ms,
            cpu,
            rss
        );
    }
    let cpu = |i: usize| rows[i].1.2.map(|u| u.0);
    // The recording path alone, timed in a loop (stable where whole-proxy CPU is noisy).
    let bin = tests::sys::bin("proxy-agent");
    let out = std::process::Command::new(&bin)
        .arg("bench-record")
        .output()?;
    ensure!(
        out.status.success(),
        "proxy-agent bench-record failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if let Some(on) = cpu(1) {
        let per_request_ns = on * 1000.0; // ms per 1k requests = µs per request; in ns
        let m = rec["metrics_ns"].as_f64().unwrap_or(0.0);
        let l = rec["metrics_and_access_log_ns"].as_f64().unwrap_or(0.0);
        println!(
            "recording one request (timed alone): request metrics {m:.0} ns = {:.2}% of our proxy's {:.1} us of CPU per request; with the access log {l:.0} ns = {:.2}%",
            100.0 * m / per_request_ns,
            on,
            100.0 * l / per_request_ns
        );
    }
    if let (Some(on), Some(off)) = (cpu(1), cpu(2)) {
        println!(
            "request metrics: {:+.1}% CPU per request ({on:.1} vs {off:.1} ms per 1k requests without them)",
            (on / off - 1.0) * 100.0
        );
    }
    if let (Some(log), Some(on)) = (cpu(3), cpu(1)) {
        println!(
            "access log (JSON lines to a file): {:+.1}% CPU per request ({log:.1} vs {on:.1} ms per 1k requests), p99 at 1k rps {:+.3} ms",
            (log / on - 1.0) * 100.0,
            rows[3].1.1.p99_ms - rows[1].1.1.p99_ms
        );
    }
    // Rule selection alone, timed in a loop (whole-proxy CPU varies by more than the cost).
    let out = std::process::Command::new(&bin)
        .arg("bench-select")
        .output()?;
    ensure!(
        out.status.success(),
        "proxy-agent bench-select failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sel: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if let (Some(on), Some(many), Some(one)) = (
        cpu(1),
        sel["many_rules_ns"].as_f64(),
        sel["one_rule_ns"].as_f64(),
    ) {
        let per_request_ns = on * 1000.0;
        println!(
            "route selection (timed alone): {} rules {many:.0} ns, 1 rule {one:.0} ns per request: +{:.2}% of our proxy's {on:.1} us of CPU per request",
            sel["rules"],
            100.0 * (many - one) / per_request_ns
        );
    }
    if let (Some(many), Some(one)) = (cpu(4), cpu(1)) {
        println!(
            "route evaluation: a 50-rule VirtualService (49 header+path rules missed per request) costs {:+.1}% CPU per request ({many:.1} vs {one:.1} ms per 1k requests), p99 at 1k rps {:+.3} ms",
            (many / one - 1.0) * 100.0,
            rows[4].1.1.p99_ms - rows[1].1.1.p99_ms
        );
    }
    // nginx's master ends its workers on SIGTERM; a SIGKILL would orphan them.
    let (mut hap, mut ngx) = (hap, ngx);
    ngx.terminate(T);
    hap.terminate(T);
    agent.terminate(T);
    Ok(())
}

#[cfg(test)]
mod output_parsing {
    use super::*;

    #[test]
    fn parses_wrk_and_hey() {
        let wrk = "  Latency Distribution\n     50%  215.00us\n     75%  300.00us\n     90%  1.00ms\n     99%    1.23ms\n  123456 requests in 10.00s, 10.00MB read\nRequests/sec:  12345.67\n";
        let r = parse_wrk(wrk).unwrap();
        assert_eq!((r.p50_ms, r.p99_ms, r.requests), (0.215, 1.23, 123456.0));
        let hey = "Summary:\n  Requests/sec:\t999.7\n\nLatency distribution:\n  50% in 0.0004 secs\n  99% in 0.0012 secs\n\nStatus code distribution:\n  [200]\t10000 responses\n";
        let r = parse_hey(hey).unwrap();
        assert!((r.p99_ms - 1.2).abs() < 1e-9 && r.rps == 999.7);
        assert!(
            parse_hey(&hey.replace(
                "\n  [200]\t10000 responses\n",
                "\n  [200]\t9000 responses\n  [503]\t1000 responses\n"
            ))
            .is_err()
        );
    }
}
