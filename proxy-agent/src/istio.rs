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
    #[serde(default)]
    tcp: Vec<TcpRouteWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TcpRouteWire {
    #[serde(default, rename = "match")]
    match_: Vec<TcpMatchWire>,
    #[serde(default)]
    route: Vec<RouteDestWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TcpMatchWire {
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    source_namespace: Option<String>,
    #[serde(default)]
    gateways: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRouteWire {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "match")]
    match_: Vec<MatchWire>,
    #[serde(default)]
    route: Vec<RouteDestWire>,
    #[serde(default)]
    fault: Option<FaultWire>,
    #[serde(default)]
    rewrite: Option<RewriteWire>,
    #[serde(default)]
    redirect: Option<RedirectWire>,
    #[serde(default)]
    direct_response: Option<DirectResponseWire>,
    #[serde(default)]
    headers: Option<HeadersWire>,
    #[serde(default)]
    cors_policy: Option<CorsWire>,
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
    #[serde(default)]
    headers: Option<HeadersWire>,
}

/// Istio's `StringMatch`: one of `exact`, `prefix`, `regex` (none: the value is present).
#[derive(Deserialize, Debug, Default)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct StringMatchWire {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MatchWire {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uri: Option<StringMatchWire>,
    #[serde(default)]
    scheme: Option<StringMatchWire>,
    #[serde(default)]
    method: Option<StringMatchWire>,
    #[serde(default)]
    authority: Option<StringMatchWire>,
    #[serde(default)]
    headers: BTreeMap<String, StringMatchWire>,
    #[serde(default)]
    query_params: BTreeMap<String, StringMatchWire>,
    #[serde(default)]
    without_headers: BTreeMap<String, StringMatchWire>,
    #[serde(default)]
    ignore_uri_case: bool,
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    source_namespace: Option<String>,
    #[serde(default)]
    gateways: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FaultWire {
    #[serde(default)]
    delay: Option<DelayWire>,
    #[serde(default)]
    abort: Option<AbortWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DelayWire {
    #[serde(default)]
    fixed_delay: Option<String>,
    #[serde(default)]
    percentage: Option<PercentWire>,
    #[serde(default)]
    percent: Option<i64>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AbortWire {
    #[serde(default)]
    http_status: Option<i64>,
    #[serde(default)]
    grpc_status: Option<String>,
    #[serde(default)]
    percentage: Option<PercentWire>,
    #[serde(default)]
    percent: Option<i64>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RewriteWire {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    uri_regex_rewrite: Option<RegexRewriteWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RegexRewriteWire {
    #[serde(rename = "match")]
    match_: String,
    rewrite: String,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RedirectWire {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    redirect_code: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct DirectResponseWire {
    status: u32,
    #[serde(default)]
    body: Option<BodyWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct BodyWire {
    #[serde(default)]
    string: Option<String>,
    #[serde(default)]
    bytes: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct HeadersWire {
    #[serde(default)]
    request: Option<HeaderOpsWire>,
    #[serde(default)]
    response: Option<HeaderOpsWire>,
}

#[derive(Deserialize, Debug, Default)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct HeaderOpsWire {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CorsWire {
    #[serde(default)]
    allow_origins: Vec<StringMatchWire>,
    #[serde(default)]
    allow_origin: Vec<String>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default)]
    max_age: Option<String>,
    #[serde(default)]
    allow_credentials: Option<bool>,
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
    #[serde(default)]
    port_level_settings: Vec<PortPolicyWire>,
}

#[derive(Deserialize, Debug)]
#[cfg_attr(feature = "codegen", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortPolicyWire {
    port: PortWire,
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
    /// HTTP routes in order; the first whose `match` accepts a request serves it.
    pub http: Vec<HttpRoute>,
    /// TCP routes for opaque connections, in order.
    pub tcp: Vec<TcpRoute>,
    /// `exportTo`: namespaces whose clients it applies to (`None`: every namespace).
    pub export_to: Option<Vec<String>>,
}

/// One `tcp[]` match block.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TcpMatch {
    /// The Service port.
    pub port: Option<u16>,
    /// Labels of the client pod.
    pub source_labels: BTreeMap<String, String>,
    /// Namespace of the client pod.
    pub source_namespace: Option<String>,
}

/// One `tcp[]` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpRoute {
    /// Match blocks (empty: every connection).
    pub matches: Vec<TcpMatch>,
    /// Weighted destinations.
    pub route: Vec<(Destination, u32)>,
}

/// A compiled regular expression (RE2 syntax, the `regex` crate), matching whole values.
#[derive(Clone, Debug)]
pub struct Regex(pub regex::Regex);

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Regex {
    /// Compiles `pattern` to match a whole value (Envoy's `safe_regex` semantics).
    pub(crate) fn whole(field: &str, pattern: &str) -> Result<Self, Fe> {
        regex::Regex::new(&format!("^(?:{pattern})$"))
            .map(Regex)
            .map_err(|e| {
                (
                    field.to_string(),
                    format!("{pattern:?} is not a valid RE2 regex: {e}"),
                )
            })
    }
}

/// Istio's `StringMatch`.
#[derive(Clone, Debug, PartialEq)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// The whole value matches.
    Regex(Regex),
    /// Any value (`{}`: the header or parameter is present).
    Present,
    /// Gateway API `PathPrefix`: the path's leading `/`-separated segments are these (`/v2`
    /// matches `/v2` and `/v2/x`, not `/v2x`; a trailing `/` in the value is ignored).
    PathPrefix(String),
}

impl StringMatch {
    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => v == e,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.0.is_match(v),
            StringMatch::Present => true,
            StringMatch::PathPrefix(p) => path_prefix_len(p, v).is_some(),
        }
    }

    /// The length of the path prefix this matched in `path`, for prefix rewrites (`None`: not
    /// a prefix match, or no match).
    pub fn matched_prefix_len(&self, path: &str, ignore_case: bool) -> Option<usize> {
        match self {
            StringMatch::Prefix(p) if ignore_case || path.starts_with(p.as_str()) => {
                (path.len() >= p.len()).then_some(p.len())
            }
            StringMatch::PathPrefix(p) => path_prefix_len(p, path),
            _ => None,
        }
    }

    /// Whether `v` matches, ASCII case ignored for `exact` and `prefix` (`ignoreUriCase`).
    pub fn matches_ignore_case(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => v.eq_ignore_ascii_case(e),
            StringMatch::Prefix(p) => {
                v.len() >= p.len() && v.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            other => other.matches(v),
        }
    }
}

/// How much of `path` the segment prefix `prefix` covers, if it is one.
fn path_prefix_len(prefix: &str, path: &str) -> Option<usize> {
    let p = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(p)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(p.len())
}

/// Replaces the `len` bytes of `path` a prefix match covered with `with`: Gateway API's
/// `ReplacePrefixMatch` (segment-aware: no doubled or missing `/`, never an empty path).
pub fn replace_prefix(path: &str, len: usize, with: &str, segments: bool) -> String {
    let rest = &path[len.min(path.len())..];
    if !segments {
        return format!("{with}{rest}");
    }
    let with = with.trim_end_matches('/');
    let out = format!("{with}{rest}");
    if out.is_empty() {
        "/".into()
    } else if !out.starts_with('/') {
        format!("/{out}")
    } else {
        out
    }
}

/// One `match[]` block: every condition must hold.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HttpMatch {
    /// `name` (shown by explain and the access log).
    pub name: Option<String>,
    /// The path (without the query).
    pub uri: Option<StringMatch>,
    /// `http` or `https`.
    pub scheme: Option<StringMatch>,
    /// The method.
    pub method: Option<StringMatch>,
    /// `Host` / `:authority`.
    pub authority: Option<StringMatch>,
    /// Request headers (lower-case names).
    pub headers: Vec<(String, StringMatch)>,
    /// Query parameters.
    pub query_params: Vec<(String, StringMatch)>,
    /// Headers that must not match.
    pub without_headers: Vec<(String, StringMatch)>,
    /// Case-insensitive `uri` exact and prefix matches.
    pub ignore_uri_case: bool,
    /// The Service port the request was sent to.
    pub port: Option<u16>,
    /// Labels of the client pod.
    pub source_labels: BTreeMap<String, String>,
    /// Namespace of the client pod.
    pub source_namespace: Option<String>,
}

/// What `fault.abort` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Abort {
    /// An HTTP status.
    Http(u16),
    /// A gRPC status code (answered as HTTP 200 with `grpc-status`).
    Grpc(u32),
}

/// `fault`: delays and aborts, each on a share of requests (percent).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Fault {
    /// Fixed delay and the share delayed.
    pub delay: Option<(Duration, f64)>,
    /// Abort and the share aborted.
    pub abort: Option<(Abort, f64)>,
}

/// `rewrite`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Rewrite {
    /// New path (or, after a prefix match, the replacement of the matched prefix).
    pub uri: Option<String>,
    /// New `Host`.
    pub authority: Option<String>,
    /// Regex rewrite of the path: pattern and replacement (`$1` groups).
    pub uri_regex: Option<(Regex, String)>,
    /// `uri` replaces the whole path even after a prefix match (Gateway API
    /// `ReplaceFullPath`); Istio's `uri` replaces the matched prefix.
    pub full: bool,
}

/// `redirect`: answered by the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// New path.
    pub uri: Option<String>,
    /// New authority.
    pub authority: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New scheme.
    pub scheme: Option<String>,
    /// Status (301 unless set).
    pub code: u16,
    /// `uri` replaces only the matched path prefix (Gateway API `ReplacePrefixMatch`).
    pub prefix: bool,
}

/// `directResponse`: answered by the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectResponse {
    /// Status.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

/// Header edits of one direction.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HeaderOps {
    /// Replace (or add) these.
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Append these.
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Remove these.
    pub remove: Vec<http::HeaderName>,
}

impl HeaderOps {
    /// Whether nothing is edited.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the edits: remove, then set, then add (Envoy's order).
    pub fn apply(&self, h: &mut http::HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }
}

/// `headers`: request and response edits.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Headers {
    /// Sent upstream.
    pub request: HeaderOps,
    /// Returned to the client.
    pub response: HeaderOps,
}

/// `corsPolicy`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Cors {
    /// Origins allowed.
    pub allow_origins: Vec<StringMatch>,
    /// `Access-Control-Allow-Methods`.
    pub allow_methods: String,
    /// `Access-Control-Allow-Headers`.
    pub allow_headers: String,
    /// `Access-Control-Expose-Headers`.
    pub expose_headers: String,
    /// `Access-Control-Max-Age`.
    pub max_age: Option<Duration>,
    /// `Access-Control-Allow-Credentials: true`.
    pub allow_credentials: bool,
}

/// One `http[]` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    /// `name`.
    pub name: Option<String>,
    /// `match[]`: any block may match (empty: every request).
    pub matches: Vec<HttpMatch>,
    /// Weighted destinations (empty with a redirect or direct response).
    pub route: Vec<(Destination, u32)>,
    /// Per-destination header edits, by the index in `route`.
    pub route_headers: Vec<Headers>,
    /// Fault injection.
    pub fault: Option<Fault>,
    /// Path and authority rewrite.
    pub rewrite: Option<Rewrite>,
    /// Answered with a redirect.
    pub redirect: Option<Redirect>,
    /// Answered directly.
    pub direct_response: Option<DirectResponse>,
    /// Header edits.
    pub headers: Headers,
    /// CORS.
    pub cors: Option<Cors>,
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
    /// `portLevelSettings`: overrides for one Service port.
    pub port_level: Vec<(u16, TrafficPolicy)>,
}

impl TrafficPolicy {
    /// The policy for Service port `port`: its `portLevelSettings` entry over the rest.
    pub fn for_port(&self, port: u16) -> TrafficPolicy {
        match self.port_level.iter().find(|(p, _)| *p == port) {
            Some((_, over)) => merge(self, over.clone()),
            None => self.clone(),
        }
    }
}

// ---------------------------------------------------------------- parsing

pub use crate::source::convert::FieldError;

/// A validation failure inside this module: (field, message).
pub(crate) type Fe = (String, String);

pub(crate) fn strict<T: serde::de::DeserializeOwned>(spec: serde_yaml::Value) -> Result<T, Fe> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        let msg = e.into_inner().to_string();
        let msg = if msg.starts_with("unknown field `tls`") {
            format!("{msg}; proxy-agent has no mTLS yet: remove it (traffic stays plain text)")
        } else if msg.starts_with("unknown field") {
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

fn string_match(field: &str, w: StringMatchWire) -> Result<StringMatch, Fe> {
    match (w.exact, w.prefix, w.regex) {
        (None, None, None) => Ok(StringMatch::Present),
        (Some(e), None, None) => Ok(StringMatch::Exact(e)),
        (None, Some(p), None) => Ok(StringMatch::Prefix(p)),
        (None, None, Some(r)) => Ok(StringMatch::Regex(Regex::whole(
            &format!("{field}.regex"),
            &r,
        )?)),
        _ => Err((
            field.to_string(),
            "set one of exact, prefix and regex".into(),
        )),
    }
}

pub(crate) fn header_name(field: &str, n: &str) -> Result<http::HeaderName, Fe> {
    http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).map_err(|_| {
        (
            field.to_string(),
            format!("{n:?} is not a valid header name"),
        )
    })
}

pub(crate) fn header_value(field: &str, v: &str) -> Result<http::HeaderValue, Fe> {
    http::HeaderValue::from_str(v).map_err(|_| {
        (
            field.to_string(),
            format!("{v:?} is not a valid header value"),
        )
    })
}

pub(crate) fn port_number(field: &str, p: u32) -> Result<u16, Fe> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or((field.to_string(), format!("{p} is out of range 1-65535")))
}

fn header_matches(
    field: &str,
    m: BTreeMap<String, StringMatchWire>,
) -> Result<Vec<(String, StringMatch)>, Fe> {
    let mut out = Vec::new();
    for (k, v) in m {
        let f = format!("{field}.{k}");
        let n = header_name(&f, &k)?;
        out.push((n.as_str().to_string(), string_match(&f, v)?));
    }
    Ok(out)
}

fn http_match(f: &str, m: MatchWire) -> Result<HttpMatch, Fe> {
    if m.gateways.iter().any(|g| g != "mesh") {
        return Err((
            format!("{f}.gateways"),
            "only the implicit `mesh` gateway is supported".into(),
        ));
    }
    let sm = |name: &str, w: Option<StringMatchWire>| {
        w.map(|w| string_match(&format!("{f}.{name}"), w))
            .transpose()
    };
    let mut query_params = Vec::new();
    for (k, v) in m.query_params {
        let field = format!("{f}.queryParams.{k}");
        if v.prefix.is_some() {
            return Err((
                format!("{field}.prefix"),
                "prefix is not supported for query parameters (as in Istio): use exact or regex"
                    .into(),
            ));
        }
        query_params.push((k, string_match(&field, v)?));
    }
    Ok(HttpMatch {
        name: m.name,
        uri: sm("uri", m.uri)?,
        scheme: sm("scheme", m.scheme)?,
        method: sm("method", m.method)?,
        authority: sm("authority", m.authority)?,
        headers: header_matches(&format!("{f}.headers"), m.headers)?,
        query_params,
        without_headers: header_matches(&format!("{f}.withoutHeaders"), m.without_headers)?,
        ignore_uri_case: m.ignore_uri_case,
        port: m
            .port
            .map(|p| port_number(&format!("{f}.port"), p))
            .transpose()?,
        source_labels: m.source_labels,
        source_namespace: m.source_namespace,
    })
}

/// A share of requests: `percentage.value` (float), else the deprecated `percent` (integer),
/// else all of them (Istio: "if left unspecified, all requests").
fn share(field: &str, percentage: Option<PercentWire>, pct: Option<i64>) -> Result<f64, Fe> {
    match (percentage, pct) {
        (Some(p), _) if !(0.0..=100.0).contains(&p.value) => Err((
            format!("{field}.percentage.value"),
            format!("{} is not a percentage", p.value),
        )),
        (Some(p), _) => Ok(p.value),
        (None, Some(p)) => percent(&format!("{field}.percent"), p).map(f64::from),
        (None, None) => Ok(100.0),
    }
}

/// gRPC status codes by name (or number).
fn grpc_code(field: &str, s: &str) -> Result<u32, Fe> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    if let Some(i) = NAMES.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(i as u32);
    }
    s.parse::<u32>().ok().filter(|c| *c <= 16).ok_or((
        field.to_string(),
        format!("{s:?} is not a gRPC status (UNAVAILABLE, INTERNAL, ... or 0-16)"),
    ))
}

fn fault(f: &str, w: FaultWire) -> Result<Fault, Fe> {
    if w.delay.is_none() && w.abort.is_none() {
        return Err((f.to_string(), "set delay, abort or both".into()));
    }
    let delay = match w.delay {
        None => None,
        Some(d) => {
            let field = format!("{f}.delay");
            let fixed = d.fixed_delay.ok_or((
                format!("{field}.fixedDelay"),
                "is required (exponentialDelay is not supported)".to_string(),
            ))?;
            let t = duration_fe(&format!("{field}.fixedDelay"), &fixed)?;
            Some((t, share(&field, d.percentage, d.percent)?))
        }
    };
    let abort = match w.abort {
        None => None,
        Some(a) => {
            let field = format!("{f}.abort");
            let what = match (a.http_status, a.grpc_status) {
                (Some(code), None) => Abort::Http(
                    u16::try_from(code)
                        .ok()
                        .filter(|c| (200..=599).contains(c))
                        .ok_or((
                            format!("{field}.httpStatus"),
                            format!("{code} is not an HTTP status (200-599)"),
                        ))?,
                ),
                (None, Some(g)) => Abort::Grpc(grpc_code(&format!("{field}.grpcStatus"), &g)?),
                _ => {
                    return Err((
                        field,
                        "set one of httpStatus and grpcStatus (http2Error is not supported)".into(),
                    ));
                }
            };
            Some((what, share(&field, a.percentage, a.percent)?))
        }
    };
    Ok(Fault { delay, abort })
}

fn header_ops(f: &str, w: Option<HeaderOpsWire>) -> Result<HeaderOps, Fe> {
    let w = w.unwrap_or_default();
    let mut ops = HeaderOps::default();
    for (k, v) in w.set {
        let field = format!("{f}.set.{k}");
        ops.set
            .push((header_name(&field, &k)?, header_value(&field, &v)?));
    }
    for (k, v) in w.add {
        let field = format!("{f}.add.{k}");
        ops.add
            .push((header_name(&field, &k)?, header_value(&field, &v)?));
    }
    for (i, k) in w.remove.iter().enumerate() {
        ops.remove
            .push(header_name(&format!("{f}.remove[{i}]"), k)?);
    }
    Ok(ops)
}

fn headers(f: &str, w: Option<HeadersWire>) -> Result<Headers, Fe> {
    let w = w.unwrap_or_default();
    Ok(Headers {
        request: header_ops(&format!("{f}.request"), w.request)?,
        response: header_ops(&format!("{f}.response"), w.response)?,
    })
}

fn rewrite(f: &str, w: RewriteWire) -> Result<Rewrite, Fe> {
    if w.uri.is_some() && w.uri_regex_rewrite.is_some() {
        return Err((f.to_string(), "set uri or uriRegexRewrite, not both".into()));
    }
    if let Some(a) = &w.authority {
        header_value(&format!("{f}.authority"), a)?;
    }
    let uri_regex = match w.uri_regex_rewrite {
        None => None,
        Some(r) => {
            let field = format!("{f}.uriRegexRewrite.match");
            let re = regex::Regex::new(&r.match_).map_err(|e| {
                (
                    field.clone(),
                    format!("{:?} is not a valid RE2 regex: {e}", r.match_),
                )
            })?;
            // RE2 / Envoy write groups as \1; the regex crate as ${1}.
            let mut rewrite = String::new();
            let mut chars = r.rewrite.chars().peekable();
            while let Some(c) = chars.next() {
                match (c, chars.peek()) {
                    ('\\', Some(d)) if d.is_ascii_digit() => {
                        rewrite.push_str(&format!("${{{d}}}"));
                        chars.next();
                    }
                    ('$', _) => rewrite.push_str("$$"),
                    _ => rewrite.push(c),
                }
            }
            Some((Regex(re), rewrite))
        }
    };
    Ok(Rewrite {
        uri: w.uri,
        authority: w.authority,
        uri_regex,
        full: false,
    })
}

fn redirect(f: &str, w: RedirectWire) -> Result<Redirect, Fe> {
    let code = match w.redirect_code {
        None => 301,
        Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
        Some(c) => {
            return Err((
                format!("{f}.redirectCode"),
                format!("{c} is not a redirect status (301, 302, 303, 307, 308)"),
            ));
        }
    };
    if let Some(s) = &w.scheme
        && s != "http"
        && s != "https"
    {
        return Err((
            format!("{f}.scheme"),
            format!("{s:?}: expected http or https"),
        ));
    }
    Ok(Redirect {
        uri: w.uri,
        authority: w.authority,
        port: w
            .port
            .map(|p| port_number(&format!("{f}.port"), p))
            .transpose()?,
        scheme: w.scheme,
        code,
        prefix: false,
    })
}

fn direct_response(f: &str, w: DirectResponseWire) -> Result<DirectResponse, Fe> {
    let status = u16::try_from(w.status)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .ok_or((
            format!("{f}.status"),
            format!("{} is not an HTTP status (200-599)", w.status),
        ))?;
    let body = match w.body {
        None => Vec::new(),
        Some(BodyWire {
            string: Some(s),
            bytes: None,
        }) => s.into_bytes(),
        Some(BodyWire {
            string: None,
            bytes: Some(b),
        }) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| (format!("{f}.body.bytes"), format!("not base64: {e}")))?
        }
        Some(_) => {
            return Err((format!("{f}.body"), "set one of string and bytes".into()));
        }
    };
    Ok(DirectResponse { status, body })
}

fn cors(f: &str, w: CorsWire) -> Result<Cors, Fe> {
    let mut allow_origins = Vec::new();
    for (i, o) in w.allow_origins.into_iter().enumerate() {
        allow_origins.push(string_match(&format!("{f}.allowOrigins[{i}]"), o)?);
    }
    for o in w.allow_origin {
        allow_origins.push(if o == "*" {
            StringMatch::Present
        } else {
            StringMatch::Exact(o)
        });
    }
    let list = |field: &str, v: Vec<String>| -> Result<String, Fe> {
        let s = v.join(",");
        header_value(&format!("{f}.{field}"), &s)?;
        Ok(s)
    };
    Ok(Cors {
        allow_origins,
        allow_methods: list("allowMethods", w.allow_methods)?,
        allow_headers: list("allowHeaders", w.allow_headers)?,
        expose_headers: list("exposeHeaders", w.expose_headers)?,
        max_age: w
            .max_age
            .map(|m| duration_fe(&format!("{f}.maxAge"), &m))
            .transpose()?,
        allow_credentials: w.allow_credentials.unwrap_or(false),
    })
}

/// Istio's weight rules: unset weights share 100 evenly; set ones must add up to 100.
fn weights(f: &str, route: &mut [(Destination, u32)]) -> Result<(), Fe> {
    let total: u32 = route.iter().map(|(_, w)| *w).sum();
    if route.len() > 1 && total == 0 {
        let n = route.len() as u32;
        for (k, (_, w)) in route.iter_mut().enumerate() {
            *w = 100 / n + u32::from((k as u32) < 100 % n);
        }
    } else if route.len() == 1 && total == 0 {
        route[0].1 = 100;
    } else if !route.is_empty() && total != 100 {
        return Err((
            format!("{f}.route"),
            format!("weights add up to {total}, not 100"),
        ));
    }
    Ok(())
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
    let export_to = if w.export_to.is_empty() || w.export_to.iter().any(|e| e == "*") {
        None
    } else {
        Some(w.export_to.clone())
    };
    let mut tcp = Vec::new();
    for (i, t) in w.tcp.into_iter().enumerate() {
        let f = format!("spec.tcp[{i}]");
        let mut matches = Vec::new();
        for (k, m) in t.match_.into_iter().enumerate() {
            let mf = format!("{f}.match[{k}]");
            if m.gateways.iter().any(|g| g != "mesh") {
                return Err((
                    format!("{mf}.gateways"),
                    "only the implicit `mesh` gateway is supported".into(),
                ));
            }
            matches.push(TcpMatch {
                port: m
                    .port
                    .map(|p| port_number(&format!("{mf}.port"), p))
                    .transpose()?,
                source_labels: m.source_labels,
                source_namespace: m.source_namespace,
            });
        }
        if t.route.is_empty() {
            return Err((
                format!("{f}.route"),
                "at least one destination is required".into(),
            ));
        }
        let mut route = Vec::new();
        for (j, d) in t.route.into_iter().enumerate() {
            if d.headers.is_some() {
                return Err((
                    format!("{f}.route[{j}].headers"),
                    "TCP routes cannot edit headers".into(),
                ));
            }
            route.push((
                destination(&format!("{f}.route[{j}].destination"), d.destination)?,
                d.weight.unwrap_or(0),
            ));
        }
        weights(&f, &mut route)?;
        tcp.push(TcpRoute { matches, route });
    }
    let mut http = Vec::new();
    for (i, r) in w.http.into_iter().enumerate() {
        let f = format!("spec.http[{i}]");
        let redirect = r
            .redirect
            .map(|w| redirect(&format!("{f}.redirect"), w))
            .transpose()?;
        let direct_response = r
            .direct_response
            .map(|w| direct_response(&format!("{f}.directResponse"), w))
            .transpose()?;
        let answered_here = redirect.is_some() || direct_response.is_some();
        if redirect.is_some() && direct_response.is_some() {
            return Err((
                format!("{f}.directResponse"),
                "set one of route, redirect and directResponse".into(),
            ));
        }
        if answered_here && !r.route.is_empty() {
            return Err((
                format!("{f}.route"),
                "set one of route, redirect and directResponse".into(),
            ));
        }
        if !answered_here && r.route.is_empty() {
            return Err((
                format!("{f}.route"),
                "at least one destination is required (or a redirect or directResponse)".into(),
            ));
        }
        let mut matches = Vec::new();
        for (k, m) in r.match_.into_iter().enumerate() {
            matches.push(http_match(&format!("{f}.match[{k}]"), m)?);
        }
        let mut route = Vec::new();
        let mut route_headers = Vec::new();
        for (j, d) in r.route.into_iter().enumerate() {
            let weight = d.weight.unwrap_or(0);
            route.push((
                destination(&format!("{f}.route[{j}].destination"), d.destination)?,
                weight,
            ));
            route_headers.push(headers(&format!("{f}.route[{j}].headers"), d.headers)?);
        }
        weights(&f, &mut route)?;
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
            name: r.name,
            matches,
            route,
            route_headers,
            fault: r
                .fault
                .map(|w| fault(&format!("{f}.fault"), w))
                .transpose()?,
            rewrite: r
                .rewrite
                .map(|w| rewrite(&format!("{f}.rewrite"), w))
                .transpose()?,
            redirect,
            direct_response,
            headers: headers(&format!("{f}.headers"), r.headers)?,
            cors: r
                .cors_policy
                .map(|w| cors(&format!("{f}.corsPolicy"), w))
                .transpose()?,
            timeout,
            retries,
            mirror,
        });
    }
    Ok(VirtualService {
        hosts: w.hosts,
        http,
        tcp,
        export_to,
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
    let mut port_level = Vec::new();
    for (i, pw) in w.port_level_settings.into_iter().enumerate() {
        let f = format!("{field}.portLevelSettings[{i}]");
        let port = port_number(&format!("{f}.port.number"), pw.port.number)?;
        if port_level.iter().any(|(p, _)| *p == port) {
            return Err((
                format!("{f}.port.number"),
                format!("port {port} already has settings"),
            ));
        }
        let p = policy(
            &f,
            TrafficPolicyWire {
                load_balancer: pw.load_balancer,
                connection_pool: pw.connection_pool,
                outlier_detection: pw.outlier_detection,
                port_level_settings: Vec::new(),
            },
        )?;
        port_level.push((port, p));
    }
    Ok(TrafficPolicy {
        load_balancer,
        connection_pool,
        outlier,
        port_level,
    })
}

fn merge(base: &TrafficPolicy, over: TrafficPolicy) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer: over.load_balancer.or_else(|| base.load_balancer.clone()),
        connection_pool: over
            .connection_pool
            .or_else(|| base.connection_pool.clone()),
        outlier: over.outlier.or_else(|| base.outlier.clone()),
        port_level: if over.port_level.is_empty() {
            base.port_level.clone()
        } else {
            over.port_level
        },
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
        let e = virtual_service_fe(y("hosts: [a]\nhttp:\n- route: [{destination: {host: a}}]\n  retries: {attempts: 2, retryRemoteLocalities: true}\n")).unwrap_err();
        assert_eq!(e.0, "spec.http[0].retries.retryRemoteLocalities");
        assert!(
            e.1.contains("unknown field `retryRemoteLocalities`") && e.1.contains("not supported"),
            "{e:?}"
        );
        let e = virtual_service_fe(y("hosts: [a]\nhttp:\n- delegate: {name: b}\n")).unwrap_err();
        assert_eq!(e.0, "spec.http[0].delegate");
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

    #[test]
    fn matches_parse_with_every_condition() {
        let vs = virtual_service_fe(y(r#"
hosts: [reviews]
http:
- name: canary
  match:
  - name: jason
    uri: {prefix: /api}
    ignoreUriCase: true
    method: {exact: GET}
    authority: {regex: "reviews(:80)?"}
    scheme: {exact: http}
    headers:
      End-User: {exact: jason}
      x-trace: {}
    withoutHeaders:
      x-debug: {exact: "1"}
    queryParams:
      v: {regex: "[0-9]+"}
    port: 9080
    sourceLabels: {app: productpage}
    sourceNamespace: default
  - uri: {exact: /health}
  route: [{destination: {host: reviews, subset: v2}}]
- route: [{destination: {host: reviews, subset: v1}}]
"#))
        .unwrap();
        let r = &vs.http[0];
        assert_eq!(r.name.as_deref(), Some("canary"));
        assert_eq!(r.matches.len(), 2);
        let m = &r.matches[0];
        assert_eq!(m.name.as_deref(), Some("jason"));
        assert_eq!(m.uri, Some(StringMatch::Prefix("/api".into())));
        assert!(m.ignore_uri_case);
        assert!(m.uri.as_ref().unwrap().matches_ignore_case("/API/v1"));
        assert_eq!(m.headers[0].0, "end-user", "header names are lower-cased");
        assert_eq!(m.headers[1], ("x-trace".into(), StringMatch::Present));
        let StringMatch::Regex(re) = &m.query_params[0].1 else {
            panic!("regex")
        };
        assert!(
            re.0.is_match("42") && !re.0.is_match("4a2"),
            "whole-value match"
        );
        assert!(m.authority.as_ref().unwrap().matches("reviews:80"));
        assert!(!m.authority.as_ref().unwrap().matches("xreviews"));
        assert_eq!(m.port, Some(9080));
        assert_eq!(m.source_labels["app"], "productpage");
        assert_eq!(m.source_namespace.as_deref(), Some("default"));
        assert!(vs.http[1].matches.is_empty());
    }

    #[test]
    fn bad_matches_name_the_field() {
        let bad = |m: &str| {
            virtual_service_fe(y(&format!(
                "hosts: [a]\nhttp:\n- match: [{m}]\n  route: [{{destination: {{host: a}}}}]\n"
            )))
            .unwrap_err()
        };
        let e = bad("{uri: {regex: '(unclosed'}}");
        assert_eq!(e.0, "spec.http[0].match[0].uri.regex");
        assert!(e.1.contains("RE2"), "{e:?}");
        let e = bad("{uri: {exact: /a, prefix: /b}}");
        assert_eq!(e.0, "spec.http[0].match[0].uri");
        let e = bad("{queryParams: {a: {prefix: x}}}");
        assert_eq!(e.0, "spec.http[0].match[0].queryParams.a.prefix");
        let e = bad("{port: 70000}");
        assert_eq!(e.0, "spec.http[0].match[0].port");
        let e = bad("{gateways: [my-gateway]}");
        assert_eq!(e.0, "spec.http[0].match[0].gateways");
        let e = bad("{headers: {'bad header': {exact: x}}}");
        assert_eq!(e.0, "spec.http[0].match[0].headers.bad header");
        let e = bad("{uri: {suffix: x}}");
        assert_eq!(e.0, "spec.http[0].match[0].uri.suffix");
    }

    #[test]
    fn faults_parse_both_percentage_spellings_and_default_to_all_requests() {
        let vs = virtual_service_fe(y(r#"
hosts: [ratings]
http:
- fault:
    delay: {percentage: {value: 50.5}, fixedDelay: 7s}
    abort: {percent: 10, httpStatus: 500}
  route: [{destination: {host: ratings}}]
- fault:
    abort: {grpcStatus: UNAVAILABLE}
  route: [{destination: {host: ratings}}]
"#))
        .unwrap();
        let f = vs.http[0].fault.as_ref().unwrap();
        assert_eq!(f.delay, Some((Duration::from_secs(7), 50.5)));
        assert_eq!(f.abort, Some((Abort::Http(500), 10.0)));
        let f = vs.http[1].fault.as_ref().unwrap();
        assert_eq!(f.abort, Some((Abort::Grpc(14), 100.0)));
        let bad = |fault: &str| {
            virtual_service_fe(y(&format!(
                "hosts: [a]\nhttp:\n- fault: {fault}\n  route: [{{destination: {{host: a}}}}]\n"
            )))
            .unwrap_err()
        };
        assert_eq!(
            bad("{abort: {httpStatus: 99}}").0,
            "spec.http[0].fault.abort.httpStatus"
        );
        assert_eq!(
            bad("{abort: {grpcStatus: NOPE}}").0,
            "spec.http[0].fault.abort.grpcStatus"
        );
        assert_eq!(
            bad("{abort: {http2Error: x}}").0,
            "spec.http[0].fault.abort.http2Error"
        );
        assert_eq!(
            bad("{delay: {fixedDelay: 1s, percentage: {value: 101}}}").0,
            "spec.http[0].fault.delay.percentage.value"
        );
        assert_eq!(
            bad("{delay: {exponentialDelay: 1s}}").0,
            "spec.http[0].fault.delay.exponentialDelay"
        );
        assert_eq!(bad("{}").0, "spec.http[0].fault");
    }

    #[test]
    fn rewrites_redirects_direct_responses_headers_and_cors_parse() {
        let vs = virtual_service_fe(y(r#"
hosts: [web]
http:
- match: [{uri: {prefix: /old}}]
  redirect: {uri: /new, authority: other, port: 8080, scheme: https, redirectCode: 302}
- match: [{uri: {prefix: /gone}}]
  directResponse: {status: 410, body: {string: gone}}
- match: [{uri: {prefix: /bin}}]
  directResponse: {status: 200, body: {bytes: aGVsbG8=}}
- rewrite: {uriRegexRewrite: {match: "^/v1/(.*)$", rewrite: '/v2/\1'}, authority: web.internal}
  headers:
    request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
    response: {set: {x-served-by: proxy}}
  corsPolicy:
    allowOrigins: [{exact: "https://example.com"}, {regex: "https://.*\\.example\\.org"}]
    allowMethods: [GET, POST]
    allowHeaders: [x-a]
    exposeHeaders: [x-served-by]
    maxAge: 24h
    allowCredentials: true
  route:
  - destination: {host: web}
    headers: {response: {add: {x-destination: web}}}
"#))
        .unwrap();
        let r = vs.http[0].redirect.as_ref().unwrap();
        assert_eq!(
            (r.code, r.port, r.scheme.as_deref()),
            (302, Some(8080), Some("https"))
        );
        assert!(vs.http[0].route.is_empty());
        assert_eq!(vs.http[1].direct_response.as_ref().unwrap().body, b"gone");
        assert_eq!(vs.http[2].direct_response.as_ref().unwrap().body, b"hello");
        let rw = vs.http[3].rewrite.as_ref().unwrap();
        let (re, rep) = rw.uri_regex.as_ref().unwrap();
        assert_eq!(re.0.replace_all("/v1/a/b", rep.as_str()), "/v2/a/b");
        assert_eq!(rw.authority.as_deref(), Some("web.internal"));
        let h = &vs.http[3].headers;
        assert_eq!(h.request.set[0].0, "x-a");
        assert_eq!(h.request.remove[0], "x-c");
        let mut map = http::HeaderMap::new();
        map.insert("x-c", http::HeaderValue::from_static("drop"));
        map.insert("x-a", http::HeaderValue::from_static("old"));
        h.request.apply(&mut map);
        assert_eq!(
            (map["x-a"].to_str().unwrap(), map["x-b"].to_str().unwrap()),
            ("1", "2")
        );
        assert!(!map.contains_key("x-c"));
        assert_eq!(
            vs.http[3].route_headers[0].response.add[0].0,
            "x-destination"
        );
        let c = vs.http[3].cors.as_ref().unwrap();
        assert!(c.allow_origins[1].matches("https://a.example.org"));
        assert_eq!(c.allow_methods, "GET,POST");
        assert_eq!(c.max_age, Some(Duration::from_secs(86400)));
        let bad = |rule: &str| {
            virtual_service_fe(y(&format!("hosts: [a]\nhttp:\n- {rule}\n"))).unwrap_err()
        };
        assert_eq!(
            bad("{redirect: {uri: /x}, route: [{destination: {host: a}}]}").0,
            "spec.http[0].route"
        );
        assert_eq!(
            bad("{redirect: {redirectCode: 200}}").0,
            "spec.http[0].redirect.redirectCode"
        );
        assert_eq!(
            bad("{redirect: {derivePort: FROM_REQUEST_PORT}}").0,
            "spec.http[0].redirect.derivePort"
        );
        assert_eq!(
            bad("{directResponse: {status: 99}}").0,
            "spec.http[0].directResponse.status"
        );
        assert_eq!(
            bad("{rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}, route: [{destination: {host: a}}]}").0,
            "spec.http[0].rewrite"
        );
        assert_eq!(
            bad("{headers: {request: {set: {'a b': x}}}, route: [{destination: {host: a}}]}").0,
            "spec.http[0].headers.request.set.a b"
        );
        assert_eq!(bad("{}").0, "spec.http[0].route");
    }

    #[test]
    fn port_level_settings_override_per_port_and_tls_is_refused_by_name() {
        let dr = destination_rule_fe(y(
            "host: a\ntrafficPolicy:\n  loadBalancer: {simple: RANDOM}\n  portLevelSettings:\n  - port: {number: 8080}\n    loadBalancer: {simple: ROUND_ROBIN}\n    connectionPool: {tcp: {maxConnections: 7}}\nsubsets:\n- {name: v1, labels: {version: v1}}\n",
        ))
        .unwrap();
        assert_eq!(
            dr.policy.for_port(80).load_balancer,
            Some(LoadBalancer::Random)
        );
        let p = dr.policy.for_port(8080);
        assert_eq!(p.load_balancer, Some(LoadBalancer::RoundRobin));
        assert_eq!(p.connection_pool.unwrap().max_connections, Some(7));
        assert_eq!(
            dr.subsets[0].policy.for_port(8080).load_balancer,
            Some(LoadBalancer::RoundRobin),
            "subsets inherit the port settings"
        );
        let e = destination_rule_fe(y("host: a\ntrafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n"))
            .unwrap_err();
        assert_eq!(e.0, "spec.trafficPolicy.tls");
        assert!(e.1.contains("no mTLS"), "{e:?}");
        let e = destination_rule_fe(y(
            "host: a\ntrafficPolicy: {loadBalancer: {simple: RANDOM, warmupDurationSecs: 10s}}\n",
        ))
        .unwrap_err();
        assert_eq!(e.0, "spec.trafficPolicy.loadBalancer.warmupDurationSecs");
        let e = destination_rule_fe(y(
            "host: a\ntrafficPolicy: {loadBalancer: {localityLbSetting: {enabled: true}}}\n",
        ))
        .unwrap_err();
        assert_eq!(e.0, "spec.trafficPolicy.loadBalancer.localityLbSetting");
        let e = virtual_service_fe(y("hosts: [a]\ntcp:\n- match: [{destinationSubnets: [10.0.0.0/8]}]\n  route: [{destination: {host: a}}]\n")).unwrap_err();
        assert_eq!(e.0, "spec.tcp[0].match[0].destinationSubnets");
    }
}
