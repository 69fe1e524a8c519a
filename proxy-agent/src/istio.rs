//! Istio `networking.istio.io` VirtualService and DestinationRule (v1, v1beta1, v1alpha3): the
//! traffic policy users already write, validated into the model.
//!
//! Parsing is strict: a field this proxy does not implement is an error naming the field, so a
//! policy is never silently half-applied (the object is rejected and its last good version
//! keeps serving).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// API versions accepted for both kinds.
pub const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

// ---------------------------------------------------------------- wire types (strict)

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    export_to: Vec<String>,
    #[serde(default)]
    http: Vec<HttpRouteWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRouteWire {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    route: Vec<RouteDestWire>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: Option<RetriesWire>,
    #[serde(default)]
    mirror: Option<DestinationWire>,
    #[serde(default)]
    mirror_percentage: Option<PercentWire>,
    #[serde(default)]
    mirror_percent: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteDestWire {
    destination: DestinationWire,
    #[serde(default)]
    weight: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DestinationWire {
    host: String,
    #[serde(default)]
    subset: Option<String>,
    #[serde(default)]
    port: Option<PortWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct PortWire {
    number: u32,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct PercentWire {
    value: f64,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RetriesWire {
    #[serde(default)]
    attempts: Option<i64>,
    #[serde(default)]
    per_try_timeout: Option<String>,
    #[serde(default)]
    retry_on: Option<String>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DrSpec {
    host: String,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicyWire>,
    #[serde(default)]
    subsets: Vec<SubsetWire>,
    #[serde(default)]
    export_to: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SubsetWire {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicyWire>,
}

#[derive(Deserialize, Debug, Default)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TrafficPolicyWire {
    #[serde(default)]
    load_balancer: Option<LoadBalancerWire>,
    #[serde(default)]
    connection_pool: Option<ConnectionPoolWire>,
    #[serde(default)]
    outlier_detection: Option<OutlierWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoadBalancerWire {
    #[serde(default)]
    simple: Option<String>,
    #[serde(default)]
    consistent_hash: Option<ConsistentHashWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConsistentHashWire {
    #[serde(default)]
    http_header_name: Option<String>,
    #[serde(default)]
    http_cookie: Option<CookieWire>,
    #[serde(default)]
    use_source_ip: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CookieWire {
    name: String,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConnectionPoolWire {
    #[serde(default)]
    tcp: Option<TcpPoolWire>,
    #[serde(default)]
    http: Option<HttpPoolWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TcpPoolWire {
    #[serde(default)]
    max_connections: Option<i64>,
    #[serde(default)]
    connect_timeout: Option<String>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpPoolWire {
    #[serde(default)]
    http1_max_pending_requests: Option<i64>,
    #[serde(default)]
    http2_max_requests: Option<i64>,
    #[serde(default)]
    max_requests_per_connection: Option<i64>,
    #[serde(default)]
    max_retries: Option<i64>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OutlierWire {
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    consecutive_gateway_errors: Option<i64>,
    #[serde(default)]
    consecutive_errors: Option<i64>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<i64>,
    #[serde(default)]
    min_health_percent: Option<i64>,
}

// ---------------------------------------------------------------- CRD manifests

/// CustomResourceDefinitions for the accepted kinds, generated from the wire types above, for
/// clusters where Istio itself is not installed. Served as v1, v1beta1 and v1alpha3 (v1 stored).
#[cfg(feature = "codegen")]
pub fn crd_yaml() -> String {
    use schemars::generate::SchemaSettings;
    fn clean(v: &mut serde_json::Value) {
        if let serde_json::Value::Object(m) = v {
            // Structural schemas forbid some of these and need none of them; unknown fields are
            // rejected by the agent anyway.
            for k in [
                "additionalProperties",
                "$schema",
                "title",
                "format",
                "default",
            ] {
                m.remove(k);
            }
            for (_, child) in m.iter_mut() {
                clean(child);
            }
        } else if let serde_json::Value::Array(a) = v {
            for child in a {
                clean(child);
            }
        }
    }
    let generator = || {
        SchemaSettings::openapi3()
            .with(|s| s.inline_subschemas = true)
            .into_generator()
    };
    let mut out = String::from(
        "# Generated by `cargo xtask codegen` from proxy-agent/src/istio.rs; do not edit.\n",
    );
    for (kind, plural, short, mut spec) in [
        (
            "VirtualService",
            "virtualservices",
            "vs",
            serde_json::to_value(generator().into_root_schema_for::<VsSpec>()).unwrap_or_default(),
        ),
        (
            "DestinationRule",
            "destinationrules",
            "dr",
            serde_json::to_value(generator().into_root_schema_for::<DrSpec>()).unwrap_or_default(),
        ),
    ] {
        clean(&mut spec);
        let versions: Vec<serde_json::Value> = ["v1", "v1beta1", "v1alpha3"]
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v,
                    "served": true,
                    "storage": *v == "v1",
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": spec,
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                        }
                    }}
                })
            })
            .collect();
        let crd = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.networking.istio.io"), "labels": {"app.kubernetes.io/part-of": "proxy-agent"}},
            "spec": {
                "group": "networking.istio.io",
                "names": {"kind": kind, "listKind": format!("{kind}List"), "plural": plural, "singular": kind.to_ascii_lowercase(), "shortNames": [short]},
                "scope": "Namespaced",
                "versions": versions
            }
        });
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).unwrap_or_default());
    }
    out
}

// ---------------------------------------------------------------- validated model

/// A validated VirtualService.
#[derive(Clone, Debug, PartialEq)]
pub struct VirtualService {
    /// Hosts it applies to, as written.
    pub hosts: Vec<String>,
    /// HTTP routes in order; the first one applies (we support no `match`).
    pub http: Vec<HttpRoute>,
}

/// One `http[]` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    /// Weighted destinations.
    pub route: Vec<(Destination, u32)>,
    /// Overall timeout (`None`: disabled, as in Istio).
    pub timeout: Option<Duration>,
    /// Retry policy, if written.
    pub retries: Option<Retries>,
    /// Mirror target and percentage.
    pub mirror: Option<(Destination, f64)>,
}

/// A route destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    /// Host as written (short name or FQDN).
    pub host: String,
    /// Subset name.
    pub subset: Option<String>,
    /// Port number.
    pub port: Option<u16>,
}

/// `retries`.
#[derive(Clone, Debug, PartialEq)]
pub struct Retries {
    /// Retries after the first try (Istio's `attempts`).
    pub attempts: u32,
    /// Per-try timeout.
    pub per_try_timeout: Option<Duration>,
    /// Conditions.
    pub retry_on: RetryOn,
}

/// Parsed `retryOn`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, resets, connect failures, timeouts.
    pub five_xx: bool,
    /// `gateway-error`: 502, 503, 504 (and timeouts).
    pub gateway_error: bool,
    /// `reset`: the connection broke before a response.
    pub reset: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `refused-stream`: HTTP/2 REFUSED_STREAM.
    pub refused_stream: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// `retriable-status-codes` plus numeric codes.
    pub status_codes: Vec<u16>,
}

/// A validated DestinationRule.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRule {
    /// Host as written.
    pub host: String,
    /// Top-level policy.
    pub policy: TrafficPolicy,
    /// Subsets with their (merged) policies.
    pub subsets: Vec<Subset>,
}

/// A subset.
#[derive(Clone, Debug, PartialEq)]
pub struct Subset {
    /// Name.
    pub name: String,
    /// Pod labels that select it.
    pub labels: BTreeMap<String, String>,
    /// Policy (top-level fields overridden by the subset's own).
    pub policy: TrafficPolicy,
}

/// Load balancing.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum LoadBalancer {
    /// Round robin.
    RoundRobin,
    /// Uniform random.
    Random,
    /// Power of two choices on active requests (Istio's and Envoy's default).
    #[default]
    LeastRequest,
    /// Fewest active connections (requests, for HTTP).
    LeastConn,
    /// Ring hash on a header.
    HashHeader(String),
    /// Ring hash on a cookie.
    HashCookie(String),
    /// Ring hash on the client address.
    HashSourceIp,
}

/// `connectionPool`; `None` fields mean unlimited.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`.
    pub max_connections: Option<u32>,
    /// `tcp.connectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// `http.http1MaxPendingRequests`.
    pub http1_max_pending: Option<u32>,
    /// `http.http2MaxRequests`.
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`.
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries` (concurrent retries).
    pub max_retries: Option<u32>,
}

/// `outlierDetection`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Consecutive 5xx (incl. local failures) before ejection; `None` disables.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive gateway errors (502/503/504, local failures) before ejection.
    pub consecutive_gateway: Option<u32>,
    /// Sweep interval.
    pub interval: Duration,
    /// Base ejection time (multiplied by the number of ejections).
    pub base_ejection: Duration,
    /// Upper bound of ejected backends, percent.
    pub max_ejection_percent: u32,
    /// Below this healthy percentage, balance over all (panic mode).
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    /// The safe default for HTTP Services without a policy: 5 consecutive gateway errors,
    /// 10 s interval, 30 s base ejection, at most half of the backends ejected (so a two-pod
    /// Service can lose its broken pod; Istio's 10% would never eject one of 2 or 3 pods).
    fn default() -> Self {
        Self {
            consecutive_5xx: None,
            consecutive_gateway: Some(5),
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
            min_health_percent: 0,
        }
    }
}

/// `trafficPolicy` after defaults.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TrafficPolicy {
    /// Balancing.
    pub load_balancer: Option<LoadBalancer>,
    /// Pool limits.
    pub connection_pool: Option<ConnectionPool>,
    /// Outlier detection.
    pub outlier: Option<OutlierDetection>,
}

// ---------------------------------------------------------------- parsing

pub use crate::source::convert::FieldError;

/// A validation failure inside this module: (field, message).
type Fe = (String, String);

fn strict<T: serde::de::DeserializeOwned>(spec: serde_yaml::Value) -> Result<T, Fe> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        let msg = e.into_inner().to_string();
        let msg = if msg.starts_with("unknown field") {
            format!("{msg}; this field is not supported by proxy-agent, remove it")
        } else {
            msg
        };
        (field, msg)
    })
}

/// Parses an Istio duration (`1.5s`, `100ms`, `1m`, `2h`).
fn duration_fe(field: &str, s: &str) -> Result<Duration, Fe> {
    let err = || {
        (
            field.to_string(),
            format!("{s:?} is not a duration like 10s, 500ms or 1m"),
        )
    };
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .ok_or_else(err)?;
    let n: f64 = num.parse().map_err(|_| err())?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err((field.to_string(), format!("{s:?} must not be negative")));
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(err()),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn count(field: &str, v: i64) -> Result<u32, Fe> {
    u32::try_from(v).map_err(|_| {
        (
            field.to_string(),
            format!("{v} must be between 0 and {}", u32::MAX),
        )
    })
}

fn percent(field: &str, v: i64) -> Result<u32, Fe> {
    if (0..=100).contains(&v) {
        Ok(v as u32)
    } else {
        Err((
            field.to_string(),
            format!("{v} is not a percentage (0-100)"),
        ))
    }
}

/// Parses a `retryOn` string.
fn retry_on_fe(field: &str, s: &str) -> Result<RetryOn, Fe> {
    let mut r = RetryOn::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "5xx" => r.five_xx = true,
            "gateway-error" => r.gateway_error = true,
            "reset" => r.reset = true,
            "connect-failure" => r.connect_failure = true,
            "refused-stream" => r.refused_stream = true,
            "retriable-4xx" => r.retriable_4xx = true,
            "retriable-status-codes" => {}
            n if n.chars().all(|c| c.is_ascii_digit()) => {
                let code: u16 = n
                    .parse()
                    .map_err(|_| (field.to_string(), format!("bad status code {n}")))?;
                if !(100..=599).contains(&code) {
                    return Err((
                        field.to_string(),
                        format!("{code} is not an HTTP status code"),
                    ));
                }
                r.status_codes.push(code);
            }
            other => {
                return Err((
                    field.to_string(),
                    format!(
                        "retry condition {other:?} is not supported (5xx, gateway-error, reset, connect-failure, \
                         refused-stream, retriable-4xx, retriable-status-codes, or a status code)"
                    ),
                ));
            }
        }
    }
    Ok(r)
}

fn destination(field: &str, d: DestinationWire) -> Result<Destination, Fe> {
    let port = match d.port {
        None => None,
        Some(p) => Some(u16::try_from(p.number).ok().filter(|p| *p != 0).ok_or((
            format!("{field}.port.number"),
            format!("{} is out of range 1-65535", p.number),
        ))?),
    };
    if d.host.is_empty() {
        return Err((format!("{field}.host"), "must not be empty".into()));
    }
    Ok(Destination {
        host: d.host,
        subset: d.subset,
        port,
    })
}

/// Validates a VirtualService `spec`.
fn virtual_service_fe(spec: serde_yaml::Value) -> Result<VirtualService, Fe> {
    let w: VsSpec = strict(spec)?;
    if w.hosts.is_empty() {
        return Err(("spec.hosts".into(), "at least one host is required".into()));
    }
    if w.gateways.iter().any(|g| g != "mesh") {
        return Err((
            "spec.gateways".into(),
            "only the implicit `mesh` gateway is supported".into(),
        ));
    }
    let _ = w.export_to;
    let mut http = Vec::new();
    for (i, r) in w.http.into_iter().enumerate() {
        let f = format!("spec.http[{i}]");
        let _ = r.name;
        if r.route.is_empty() {
            return Err((
                format!("{f}.route"),
                "at least one destination is required".into(),
            ));
        }
        let mut route = Vec::new();
        for (j, d) in r.route.into_iter().enumerate() {
            let weight = d.weight.unwrap_or(0);
            route.push((
                destination(&format!("{f}.route[{j}].destination"), d.destination)?,
                weight,
            ));
        }
        let total: u32 = route.iter().map(|(_, w)| *w).sum();
        if route.len() > 1 && total == 0 {
            let n = route.len() as u32;
            for (k, (_, w)) in route.iter_mut().enumerate() {
                *w = 100 / n + u32::from((k as u32) < 100 % n);
            }
        } else if route.len() == 1 && total == 0 {
            route[0].1 = 100;
        } else if total != 100 {
            return Err((
                format!("{f}.route"),
                format!("weights add up to {total}, not 100"),
            ));
        }
        let timeout = r
            .timeout
            .map(|t| duration_fe(&format!("{f}.timeout"), &t))
            .transpose()?;
        let timeout = timeout.filter(|t| !t.is_zero());
        let retries = match r.retries {
            None => None,
            Some(rt) => {
                let attempts = count(&format!("{f}.retries.attempts"), rt.attempts.unwrap_or(2))?;
                let per_try_timeout = rt
                    .per_try_timeout
                    .map(|t| duration_fe(&format!("{f}.retries.perTryTimeout"), &t))
                    .transpose()?
                    .filter(|t| !t.is_zero());
                let retry_on = retry_on_fe(
                    &format!("{f}.retries.retryOn"),
                    rt.retry_on
                        .as_deref()
                        .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,503"),
                )
                .or_else(|e| {
                    // Istio's default includes gRPC conditions; without a retryOn we use ours.
                    if rt.retry_on.is_none() {
                        retry_on_fe(&e.0, "connect-failure,refused-stream,503")
                    } else {
                        Err(e)
                    }
                })?;
                Some(Retries {
                    attempts,
                    per_try_timeout,
                    retry_on,
                })
            }
        };
        let pct = match (r.mirror_percentage, r.mirror_percent) {
            (Some(p), _) if !(0.0..=100.0).contains(&p.value) => {
                return Err((
                    format!("{f}.mirrorPercentage.value"),
                    format!("{} is not a percentage", p.value),
                ));
            }
            (Some(p), _) => p.value,
            (None, Some(p)) => f64::from(p.min(100)),
            (None, None) => 100.0,
        };
        let mirror = r
            .mirror
            .map(|m| destination(&format!("{f}.mirror"), m))
            .transpose()?
            .map(|d| (d, pct));
        http.push(HttpRoute {
            route,
            timeout,
            retries,
            mirror,
        });
    }
    Ok(VirtualService {
        hosts: w.hosts,
        http,
    })
}

fn policy(field: &str, w: TrafficPolicyWire) -> Result<TrafficPolicy, Fe> {
    let load_balancer = match w.load_balancer {
        None => None,
        Some(lb) => Some(match (lb.simple.as_deref(), lb.consistent_hash) {
            (Some(_), Some(_)) => {
                return Err((
                    format!("{field}.loadBalancer"),
                    "set either simple or consistentHash, not both".into(),
                ));
            }
            (Some("ROUND_ROBIN"), None) => LoadBalancer::RoundRobin,
            (Some("RANDOM"), None) => LoadBalancer::Random,
            (Some("LEAST_REQUEST"), None) | (Some("UNSPECIFIED"), None) => {
                LoadBalancer::LeastRequest
            }
            (Some("LEAST_CONN"), None) => LoadBalancer::LeastConn,
            (Some(other), None) => {
                return Err((
                    format!("{field}.loadBalancer.simple"),
                    format!(
                        "{other:?} is not supported (ROUND_ROBIN, RANDOM, LEAST_REQUEST, LEAST_CONN)"
                    ),
                ));
            }
            (None, Some(h)) => match (h.http_header_name, h.http_cookie, h.use_source_ip) {
                (Some(name), None, None | Some(false)) => {
                    LoadBalancer::HashHeader(name.to_ascii_lowercase())
                }
                (None, Some(c), None | Some(false)) => {
                    if c.ttl.is_some() {
                        return Err((
                            format!("{field}.loadBalancer.consistentHash.httpCookie.ttl"),
                            "generated cookies are not supported; hash on an existing cookie (no ttl)".into(),
                        ));
                    }
                    let _ = c.path;
                    LoadBalancer::HashCookie(c.name)
                }
                (None, None, Some(true)) => LoadBalancer::HashSourceIp,
                _ => {
                    return Err((
                        format!("{field}.loadBalancer.consistentHash"),
                        "set exactly one of httpHeaderName, httpCookie, useSourceIp".into(),
                    ));
                }
            },
            (None, None) => LoadBalancer::default(),
        }),
    };
    let connection_pool = match w.connection_pool {
        None => None,
        Some(cp) => {
            let mut p = ConnectionPool::default();
            if let Some(t) = cp.tcp {
                p.max_connections = t
                    .max_connections
                    .map(|v| count(&format!("{field}.connectionPool.tcp.maxConnections"), v))
                    .transpose()?;
                p.connect_timeout = t
                    .connect_timeout
                    .map(|v| duration_fe(&format!("{field}.connectionPool.tcp.connectTimeout"), &v))
                    .transpose()?;
            }
            if let Some(h) = cp.http {
                let f = format!("{field}.connectionPool.http");
                p.http1_max_pending = h
                    .http1_max_pending_requests
                    .map(|v| count(&format!("{f}.http1MaxPendingRequests"), v))
                    .transpose()?;
                p.http2_max_requests = h
                    .http2_max_requests
                    .map(|v| count(&format!("{f}.http2MaxRequests"), v))
                    .transpose()?;
                p.max_requests_per_connection = h
                    .max_requests_per_connection
                    .map(|v| count(&format!("{f}.maxRequestsPerConnection"), v))
                    .transpose()?;
                p.max_retries = h
                    .max_retries
                    .map(|v| count(&format!("{f}.maxRetries"), v))
                    .transpose()?;
            }
            // Istio: 0 means "use the default" (unlimited) for these fields.
            for v in [
                &mut p.max_connections,
                &mut p.http1_max_pending,
                &mut p.http2_max_requests,
                &mut p.max_requests_per_connection,
            ] {
                if *v == Some(0) {
                    *v = None;
                }
            }
            Some(p)
        }
    };
    let outlier = match w.outlier_detection {
        None => None,
        Some(o) => {
            let f = format!("{field}.outlierDetection");
            let d = OutlierDetection::default();
            let gw = o.consecutive_gateway_errors.or(o.consecutive_errors);
            let field_gw = if o.consecutive_gateway_errors.is_some() {
                "consecutiveGatewayErrors"
            } else {
                "consecutiveErrors"
            };
            let mut od = OutlierDetection {
                consecutive_5xx: o
                    .consecutive_5xx_errors
                    .map(|v| count(&format!("{f}.consecutive5xxErrors"), v))
                    .transpose()?,
                consecutive_gateway: gw
                    .map(|v| count(&format!("{f}.{field_gw}"), v))
                    .transpose()?,
                interval: o
                    .interval
                    .map(|v| duration_fe(&format!("{f}.interval"), &v))
                    .transpose()?
                    .unwrap_or(d.interval),
                base_ejection: o
                    .base_ejection_time
                    .map(|v| duration_fe(&format!("{f}.baseEjectionTime"), &v))
                    .transpose()?
                    .unwrap_or(d.base_ejection),
                max_ejection_percent: o
                    .max_ejection_percent
                    .map(|v| percent(&format!("{f}.maxEjectionPercent"), v))
                    .transpose()?
                    .unwrap_or(10),
                min_health_percent: o
                    .min_health_percent
                    .map(|v| percent(&format!("{f}.minHealthPercent"), v))
                    .transpose()?
                    .unwrap_or(0),
            };
            if od.consecutive_5xx.is_none() && od.consecutive_gateway.is_none() {
                // Istio's default: 5 consecutive 5xx.
                od.consecutive_5xx = Some(5);
            }
            for v in [&mut od.consecutive_5xx, &mut od.consecutive_gateway] {
                if *v == Some(0) {
                    *v = None; // 0 disables that kind of ejection
                }
            }
            if od.interval.is_zero() {
                return Err((format!("{f}.interval"), "must be positive".into()));
            }
            Some(od)
        }
    };
    Ok(TrafficPolicy {
        load_balancer,
        connection_pool,
        outlier,
    })
}

fn merge(base: &TrafficPolicy, over: TrafficPolicy) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer: over.load_balancer.or_else(|| base.load_balancer.clone()),
        connection_pool: over
            .connection_pool
            .or_else(|| base.connection_pool.clone()),
        outlier: over.outlier.or_else(|| base.outlier.clone()),
    }
}

/// Validates a DestinationRule `spec`.
fn destination_rule_fe(spec: serde_yaml::Value) -> Result<DestinationRule, Fe> {
    let w: DrSpec = strict(spec)?;
    if w.host.is_empty() {
        return Err(("spec.host".into(), "must not be empty".into()));
    }
    let _ = w.export_to;
    let top = policy("spec.trafficPolicy", w.traffic_policy.unwrap_or_default())?;
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in w.subsets.into_iter().enumerate() {
        if subsets.iter().any(|x| x.name == s.name) {
            return Err((
                format!("spec.subsets[{i}].name"),
                format!("duplicate subset {:?}", s.name),
            ));
        }
        let own = policy(
            &format!("spec.subsets[{i}].trafficPolicy"),
            s.traffic_policy.unwrap_or_default(),
        )?;
        subsets.push(Subset {
            name: s.name,
            labels: s.labels,
            policy: merge(&top, own),
        });
    }
    Ok(DestinationRule {
        host: w.host,
        policy: top,
        subsets,
    })
}

/// Validates a VirtualService `spec`.
pub fn virtual_service(spec: serde_yaml::Value) -> Result<VirtualService, FieldError> {
    virtual_service_fe(spec).map_err(FieldError::from)
}

/// Validates a DestinationRule `spec`.
pub fn destination_rule(spec: serde_yaml::Value) -> Result<DestinationRule, FieldError> {
    destination_rule_fe(spec).map_err(FieldError::from)
}

/// Parses an Istio duration (`1.5s`, `100ms`, `1m`, `2h`).
pub fn duration(field: &str, s: &str) -> Result<Duration, FieldError> {
    duration_fe(field, s).map_err(FieldError::from)
}

/// Parses a `retryOn` string.
pub fn retry_on(field: &str, s: &str) -> Result<RetryOn, FieldError> {
    retry_on_fe(field, s).map_err(FieldError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn y(s: &str) -> serde_yaml::Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn mission_retry_policy_parses() {
        let vs = virtual_service_fe(y(
            "hosts: [retry-service]\nhttp:\n- route: [{destination: {host: retry-service}}]\n  timeout: 15s\n  retries: {attempts: 15, perTryTimeout: 1s, retryOn: 'gateway-error,reset,5xx'}\n",
        ))
        .unwrap();
        let r = &vs.http[0];
        assert_eq!(r.timeout, Some(Duration::from_secs(15)));
        let rt = r.retries.as_ref().unwrap();
        assert_eq!(
            (rt.attempts, rt.per_try_timeout),
            (15, Some(Duration::from_secs(1)))
        );
        assert!(rt.retry_on.five_xx && rt.retry_on.gateway_error && rt.retry_on.reset);
        assert_eq!(r.route[0].1, 100);
    }

    #[test]
    fn mission_circuit_breaker_parses() {
        let dr = destination_rule_fe(y(
            "host: retry-service\ntrafficPolicy:\n  connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}\n  outlierDetection: {consecutiveErrors: 2, interval: 10s, baseEjectionTime: 1m, maxEjectionPercent: 100}\n",
        ))
        .unwrap();
        let cp = dr.policy.connection_pool.unwrap();
        assert_eq!(
            (
                cp.max_connections,
                cp.http1_max_pending,
                cp.max_requests_per_connection
            ),
            (Some(1), Some(1), Some(1))
        );
        let od = dr.policy.outlier.unwrap();
        assert_eq!(od.consecutive_gateway, Some(2));
        assert_eq!(od.base_ejection, Duration::from_secs(60));
        assert_eq!(od.max_ejection_percent, 100);
    }

    #[test]
    fn subsets_inherit_and_override_policy() {
        let dr = destination_rule_fe(y(
            "host: myweb\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}\nsubsets:\n- {name: v1, labels: {version: v1}}\n- name: v2\n  labels: {version: v2}\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: User}}}\n",
        ))
        .unwrap();
        assert_eq!(
            dr.subsets[0].policy.load_balancer,
            Some(LoadBalancer::Random)
        );
        assert_eq!(
            dr.subsets[1].policy.load_balancer,
            Some(LoadBalancer::HashHeader("user".into()))
        );
    }

    #[test]
    fn unsupported_fields_and_bad_values_name_the_field() {
        let e = virtual_service_fe(y("hosts: [a]\nhttp:\n- match: [{uri: {prefix: /}}]\n  route: [{destination: {host: a}}]\n")).unwrap_err();
        assert_eq!(e.0, "spec.http[0].match");
        assert!(
            e.1.contains("unknown field `match`") && e.1.contains("not supported"),
            "{e:?}"
        );
        let e = destination_rule_fe(y(
            "host: a\ntrafficPolicy: {outlierDetection: {interval: -1s}}\n",
        ))
        .unwrap_err();
        assert_eq!(e.0, "spec.trafficPolicy.outlierDetection.interval");
        let e = virtual_service_fe(y("hosts: [a]\nhttp:\n- route: [{destination: {host: a}}]\n  retries: {attempts: 3, retryOn: sometimes}\n")).unwrap_err();
        assert_eq!(e.0, "spec.http[0].retries.retryOn");
        let e = virtual_service_fe(y("hosts: [a]\nhttp:\n- route: [{destination: {host: a}, weight: 30}, {destination: {host: b}, weight: 30}]\n")).unwrap_err();
        assert!(e.1.contains("60"), "{e:?}");
        // Local-origin errors are not split from upstream ones (Envoy's default): rejected
        // by name rather than ignored.
        let e = destination_rule_fe(y(
            "host: a\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: 3, splitExternalLocalOriginErrors: true}}\n",
        ))
        .unwrap_err();
        assert_eq!(
            e.0,
            "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors"
        );
        assert!(e.1.contains("not supported"), "{e:?}");
    }

    #[test]
    fn outlier_counts_5xx_and_gateway_errors_apart_and_keeps_the_interval() {
        let dr = destination_rule_fe(y(
            "host: a\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: 7, consecutiveGatewayErrors: 3, interval: 2s, baseEjectionTime: 45s}}\n",
        ))
        .unwrap();
        let od = dr.policy.outlier.unwrap();
        assert_eq!(
            (od.consecutive_5xx, od.consecutive_gateway),
            (Some(7), Some(3))
        );
        assert_eq!(od.interval, Duration::from_secs(2));
        assert_eq!(od.base_ejection, Duration::from_secs(45));
    }
}
