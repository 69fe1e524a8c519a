//! Pieces the end-to-end tests, the demo and the benchmarks share: probe output tallies and the
//! mission's seed experiment (`ab -c 50 -n 20000`, one pod switched into error mode midway).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{Pod, Proc};

/// Requests of the seed experiment.
pub const SEED_REQUESTS: usize = 20_000;

/// A `{"key": count}` object of a probe's JSON output as a map.
pub fn tally(v: &serde_json::Value, key: &str) -> BTreeMap<String, u64> {
    v[key]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// The Istio policy an operator writes for the seed experiment: retries on 5xx and outlier
/// detection, for the Service `host`.
pub fn seed_policy(host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}, namespace: default}}\nspec:\n  hosts: [{host}]\n  http:\n  - route: [{{destination: {{host: {host}}}}}]\n    retries: {{attempts: 3, perTryTimeout: 2s, retryOn: 5xx}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}, namespace: default}}\nspec:\n  host: {host}\n  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}}\n"
    )
}

/// What `ab` reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AbResult {
    /// Completed requests.
    pub complete: u64,
    /// Failed requests (connect, receive, length, exceptions).
    pub failed: u64,
    /// Non-2xx responses.
    pub non_2xx: u64,
    /// Requests per second.
    pub rps: f64,
    /// 99th percentile time, ms.
    pub p99_ms: f64,
}

/// Parses `ab`'s report; `None` without a `Complete requests` line.
pub fn parse_ab(out: &str) -> Option<AbResult> {
    let num = |prefix: &str| -> Option<f64> {
        out.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| {
                l[l.find(prefix)? + prefix.len()..]
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
    };
    Some(AbResult {
        complete: num("Complete requests:")? as u64,
        failed: num("Failed requests:").unwrap_or(0.0) as u64,
        non_2xx: num("Non-2xx responses:").unwrap_or(0.0) as u64,
        rps: num("Requests per second:").unwrap_or(0.0),
        p99_ms: num("99%").unwrap_or(0.0),
    })
}

/// Runs `ab -c 50 -n 20000 http://198.19.0.10/` from `client`; once a third of the requests were
/// served by `servers`, switches `failing` into error mode (`GET /err` from `admin`, directly to the
/// pod) and calls `at_third`. Returns ab's report.
pub fn seed_ab(
    client: &Pod,
    admin: &Pod,
    servers: &[Proc],
    failing: &Pod,
    at_third: impl FnOnce(),
) -> AbResult {
    let timeout = Duration::from_secs(300);
    let n = SEED_REQUESTS.to_string();
    let cmd = client
        .place
        .command("ab", &["-c", "50", "-n", &n, "http://198.19.0.10/"]);
    let mut ab = Proc::spawn("ab", cmd, client.place.logs.join("ab.log"));
    let served = || {
        servers
            .iter()
            .map(|s| s.log_text().matches(" GET / ").count())
            .sum::<usize>()
    };
    crate::sys::poll("ab to be a third of the way", timeout, || {
        (served() >= SEED_REQUESTS / 3).then_some(())
    });
    let url = format!("http://{}:8080/err", failing.ip);
    let switched = admin.probe("http-probe", &["--url", &url, "--count", "1"], timeout);
    assert_eq!(
        switched["ok"], 1,
        "switching {} into error mode failed: {switched}",
        failing.name
    );
    at_third();
    assert!(
        ab.wait_exit(timeout).success(),
        "ab failed: {}",
        ab.log_text()
    );
    let out = ab.all_stdout(timeout).join("\n");
    parse_ab(&out).unwrap_or_else(|| panic!("ab printed no report: {out}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_ab_output() {
        let out = "Complete requests:      20000\nFailed requests:        4\n   (Connect: 0, Receive: 0, Length: 4, Exceptions: 0)\nNon-2xx responses:      4\nRequests per second:    5123.45 [#/sec] (mean)\n  99%     31\n";
        let r = super::parse_ab(out).unwrap();
        assert_eq!((r.complete, r.failed, r.non_2xx), (20000, 4, 4));
        assert!((r.rps - 5123.45).abs() < 1e-6 && r.p99_ms == 31.0);
    }
}
