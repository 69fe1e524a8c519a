//! Gateway API mesh routes (GAMMA): `gateway.networking.k8s.io/v1` HTTPRoute and GRPCRoute
//! attached to a Service (`parentRefs` of kind Service), validated into the model.
//!
//! Parsing is strict, as for the Istio kinds: a field this proxy does not implement is an error
//! naming the field, and the object's last good version keeps serving. Routes whose parents are
//! all Gateways belong to a gateway controller and are ignored here.
//!
//! Semantics follow the Gateway API specification: every match of every rule of every route
//! attached to a Service port is ordered by precedence (exact path, longest prefix, method,
//! most header matches, most query matches; then the oldest route, then `namespace/name`, then
//! rule and match order); the first that matches serves the request.

use std::time::Duration;

use serde::Deserialize;

use crate::istio::{
    Cors, Fe, HeaderOps, Headers, HttpMatch, Redirect, Regex, RetryOn, Rewrite, StringMatch,
    header_name, header_value, strict,
};
use crate::source::convert::FieldError;

/// The API group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// API versions read (`v1`; `v1beta1` HTTPRoute is the same schema).
pub const API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];
/// The controller name written in route status.
pub const CONTROLLER: &str = "proxy-agent.io/mesh";

// ---------------------------------------------------------------- wire (strict)

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRouteSpecWire {
    #[serde(default)]
    parent_refs: Vec<ParentRefWire>,
    #[serde(default)]
    hostnames: Vec<String>,
    rules: Option<Vec<HttpRuleWire>>,
    use_default_gateways: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcRouteSpecWire {
    #[serde(default)]
    parent_refs: Vec<ParentRefWire>,
    #[serde(default)]
    hostnames: Vec<String>,
    rules: Option<Vec<GrpcRuleWire>>,
    use_default_gateways: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ParentRefWire {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
    section_name: Option<String>,
    port: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRuleWire {
    name: Option<String>,
    matches: Option<Vec<HttpMatchWire>>,
    #[serde(default)]
    filters: Vec<FilterWire>,
    #[serde(default)]
    backend_refs: Vec<BackendRefWire>,
    timeouts: Option<TimeoutsWire>,
    retry: Option<RetryWire>,
    session_persistence: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcRuleWire {
    name: Option<String>,
    matches: Option<Vec<GrpcMatchWire>>,
    #[serde(default)]
    filters: Vec<FilterWire>,
    #[serde(default)]
    backend_refs: Vec<BackendRefWire>,
    session_persistence: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathMatchWire {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NameMatchWire {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpMatchWire {
    path: Option<PathMatchWire>,
    #[serde(default)]
    headers: Vec<NameMatchWire>,
    #[serde(default)]
    query_params: Vec<NameMatchWire>,
    method: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcMethodWire {
    #[serde(rename = "type")]
    kind: Option<String>,
    service: Option<String>,
    method: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcMatchWire {
    method: Option<GrpcMethodWire>,
    #[serde(default)]
    headers: Vec<NameMatchWire>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HeaderValueWire {
    name: String,
    value: String,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HeaderFilterWire {
    #[serde(default)]
    set: Vec<HeaderValueWire>,
    #[serde(default)]
    add: Vec<HeaderValueWire>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathModifierWire {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RedirectWire {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModifierWire>,
    port: Option<u32>,
    status_code: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RewriteWire {
    hostname: Option<String>,
    path: Option<PathModifierWire>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FractionWire {
    numerator: i64,
    denominator: Option<i64>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MirrorWire {
    backend_ref: ObjectRefWire,
    percent: Option<i64>,
    fraction: Option<FractionWire>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CorsWire {
    #[serde(default)]
    allow_origins: Vec<String>,
    allow_credentials: Option<bool>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    max_age: Option<u64>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilterWire {
    #[serde(rename = "type")]
    kind: String,
    request_header_modifier: Option<HeaderFilterWire>,
    response_header_modifier: Option<HeaderFilterWire>,
    request_redirect: Option<RedirectWire>,
    url_rewrite: Option<RewriteWire>,
    request_mirror: Option<MirrorWire>,
    cors: Option<CorsWire>,
    extension_ref: Option<serde_yaml::Value>,
    external_auth: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ObjectRefWire {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BackendRefWire {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u32>,
    weight: Option<i64>,
    #[serde(default)]
    filters: Vec<FilterWire>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TimeoutsWire {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetryWire {
    #[serde(default)]
    codes: Vec<i64>,
    attempts: Option<i64>,
    backoff: Option<String>,
}

// ---------------------------------------------------------------- validated model

/// Which kind a route is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// `HTTPRoute`.
    Http,
    /// `GRPCRoute`.
    Grpc,
}

impl RouteKind {
    /// The Kubernetes kind.
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }

    /// The resource (plural) name.
    pub fn plural(self) -> &'static str {
        match self {
            RouteKind::Http => "httproutes",
            RouteKind::Grpc => "grpcroutes",
        }
    }
}

/// A `parentRefs[]` entry of kind Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceParent {
    /// Index in `parentRefs` (status entries are per parent).
    pub index: usize,
    /// Service name.
    pub name: String,
    /// Service namespace (`None`: the route's).
    pub namespace: Option<String>,
    /// Only this Service port.
    pub port: Option<u16>,
    /// Only the Service port of this name.
    pub section: Option<String>,
}

/// A reference to a Service port (a backend or a mirror target).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    /// Service name.
    pub name: String,
    /// Namespace (`None`: the route's).
    pub namespace: Option<String>,
    /// Service port.
    pub port: Option<u16>,
    /// Why this reference cannot resolve whatever the cluster holds (a kind other than
    /// Service): the `ResolvedRefs` reason and message. Its share of requests answers 500.
    pub invalid: Option<(&'static str, String)>,
}

/// A weighted backend of a rule.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedBackend {
    /// The Service port.
    pub to: BackendRef,
    /// Relative weight (default 1).
    pub weight: u32,
    /// Header edits of this backend's filters.
    pub headers: Headers,
}

/// One match of a rule, with its precedence rank (larger ranks first).
#[derive(Clone, Debug, PartialEq)]
pub struct RankedMatch {
    /// The conditions.
    pub m: HttpMatch,
    /// Precedence: HTTP (path kind, path length, method, headers, query params); gRPC
    /// (service length, method length, headers, 0, 0).
    pub rank: [u32; 5],
}

/// `retry` (experimental channel).
#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    /// Retries after the first try.
    pub attempts: u32,
    /// Status codes retried (connection failures and resets always are).
    pub codes: Vec<u16>,
    /// Least time between tries.
    pub backoff: Option<Duration>,
}

/// One rule.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshRule {
    /// `name`.
    pub name: Option<String>,
    /// Matches; a rule without any matches every request (`PathPrefix /`).
    pub matches: Vec<RankedMatch>,
    /// Weighted backends (empty with a redirect, or: 500).
    pub backends: Vec<WeightedBackend>,
    /// RequestHeaderModifier and ResponseHeaderModifier.
    pub headers: Headers,
    /// RequestRedirect.
    pub redirect: Option<Redirect>,
    /// URLRewrite.
    pub rewrite: Option<Rewrite>,
    /// RequestMirror targets and the percentage copied.
    pub mirrors: Vec<(BackendRef, f64)>,
    /// CORS.
    pub cors: Option<Cors>,
    /// `timeouts.request` (`None`: no timeout).
    pub timeout: Option<Duration>,
    /// `timeouts.backendRequest` (`None`: no per-try timeout).
    pub backend_timeout: Option<Duration>,
    /// `retry`.
    pub retry: Option<Retry>,
}

/// A condition as the object has it: (type, status, reason, observedGeneration).
pub type SeenCondition = (String, String, String, i64);

/// A validated HTTPRoute or GRPCRoute.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshRoute {
    /// HTTPRoute or GRPCRoute.
    pub kind: RouteKind,
    /// `metadata.creationTimestamp`, for precedence ties.
    pub created: Option<jiff::Timestamp>,
    /// `metadata.generation`, for status.
    pub generation: Option<i64>,
    /// The Service parents (Gateway parents are another controller's).
    pub parents: Vec<ServiceParent>,
    /// Rules in order.
    pub rules: Vec<MeshRule>,
}

/// A route's `status.parents[]` as the API server has it (kept apart from the route, so that
/// status writes do not rebuild routing).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SeenStatus {
    /// Our entries' conditions by parent index: (type, status, reason, observedGeneration).
    pub ours: Vec<(usize, Vec<SeenCondition>)>,
    /// Other controllers' entries, kept as they are when ours are written.
    pub foreign: Vec<serde_json::Value>,
}

// ---------------------------------------------------------------- parsing

fn unsupported(field: &str, what: &str) -> Fe {
    (
        field.to_string(),
        format!("{what} is not supported by proxy-agent; remove it"),
    )
}

/// Parses a Gateway API duration (GEP-2257: `1h`, `10s`, `500ms`, `1m30s`; `0s` disables).
fn gw_duration(field: &str, s: &str) -> Result<Duration, Fe> {
    let err = || {
        (
            field.to_string(),
            format!("{s:?} is not a Gateway API duration like 10s, 500ms or 1m30s"),
        )
    };
    if s.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        if digits == 0 || digits > 5 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(err());
        };
        total += unit * n as u32;
        rest = &rest[len..];
        parts += 1;
    }
    if parts > 4 {
        return Err(err());
    }
    Ok(total)
}

/// A timeout where `0s` means none.
fn timeout(field: &str, s: Option<&String>) -> Result<Option<Duration>, Fe> {
    Ok(s.map(|s| gw_duration(field, s))
        .transpose()?
        .filter(|d| !d.is_zero()))
}

fn port(field: &str, p: Option<u32>) -> Result<Option<u16>, Fe> {
    p.map(|p| crate::istio::port_number(field, p)).transpose()
}

fn core_service(group: Option<&str>, kind: Option<&str>) -> bool {
    group.is_none_or(str::is_empty) && kind.is_none_or(|k| k == "Service")
}

fn parents(refs: Vec<ParentRefWire>) -> Result<Vec<ServiceParent>, Fe> {
    let mut out = Vec::new();
    for (i, p) in refs.into_iter().enumerate() {
        let f = format!("spec.parentRefs[{i}]");
        // group defaults to gateway.networking.k8s.io and kind to Gateway: a Service parent
        // names both.
        let group = p.group.as_deref().unwrap_or(GROUP);
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if !(group.is_empty() && kind == "Service") {
            continue;
        }
        out.push(ServiceParent {
            index: i,
            name: p.name,
            namespace: p.namespace,
            port: port(&format!("{f}.port"), p.port)?,
            section: p.section_name,
        });
    }
    Ok(out)
}

fn object_ref(f: &str, r: ObjectRefWire) -> Result<BackendRef, Fe> {
    backend_ref(f, r.group, r.kind, r.name, r.namespace, r.port)
}

fn backend_ref(
    f: &str,
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    p: Option<u32>,
) -> Result<BackendRef, Fe> {
    let invalid = if !core_service(group.as_deref(), kind.as_deref()) {
        Some((
            "InvalidKind",
            format!(
                "{f}: {}/{} is not a Service; only Services are supported backends",
                group.as_deref().unwrap_or(""),
                kind.as_deref().unwrap_or("Service")
            ),
        ))
    } else {
        None
    };
    let port = port(&format!("{f}.port"), p)?;
    if invalid.is_none() && port.is_none() {
        return Err((format!("{f}.port"), "required for a Service backend".into()));
    }
    Ok(BackendRef {
        name,
        namespace,
        port,
        invalid,
    })
}

fn header_filter(f: &str, w: HeaderFilterWire) -> Result<HeaderOps, Fe> {
    let mut ops = HeaderOps::default();
    let mut seen = std::collections::HashSet::new();
    for (list, key) in [(&w.set, "set"), (&w.add, "add")] {
        for (i, h) in list.iter().enumerate() {
            let field = format!("{f}.{key}[{i}]");
            let n = header_name(&format!("{field}.name"), &h.name)?;
            if !seen.insert(n.clone()) {
                return Err((
                    format!("{field}.name"),
                    format!("header {:?} is named twice in this filter", h.name),
                ));
            }
            let v = header_value(&format!("{field}.value"), &h.value)?;
            if key == "set" {
                ops.set.push((n, v));
            } else {
                ops.add.push((n, v));
            }
        }
    }
    for (i, r) in w.remove.iter().enumerate() {
        ops.remove
            .push(header_name(&format!("{f}.remove[{i}]"), r)?);
    }
    Ok(ops)
}

fn path_modifier(f: &str, w: PathModifierWire) -> Result<(String, bool), Fe> {
    match (w.kind.as_str(), w.replace_full_path, w.replace_prefix_match) {
        ("ReplaceFullPath", Some(p), None) => Ok((p, false)),
        ("ReplacePrefixMatch", None, Some(p)) => Ok((p, true)),
        ("ReplaceFullPath", _, _) => Err((
            format!("{f}.replaceFullPath"),
            "type ReplaceFullPath needs replaceFullPath (and no replacePrefixMatch)".into(),
        )),
        ("ReplacePrefixMatch", _, _) => Err((
            format!("{f}.replacePrefixMatch"),
            "type ReplacePrefixMatch needs replacePrefixMatch (and no replaceFullPath)".into(),
        )),
        (other, _, _) => Err((
            format!("{f}.type"),
            format!("{other:?}: expected ReplaceFullPath or ReplacePrefixMatch"),
        )),
    }
}

fn cors(f: &str, w: CorsWire) -> Result<Cors, Fe> {
    let mut allow_origins = Vec::new();
    for (i, o) in w.allow_origins.iter().enumerate() {
        allow_origins.push(if o == "*" {
            StringMatch::Present
        } else if o.contains('*') {
            let pattern = regex::escape(o).replace(r"\*", "[^/]*");
            Regex::whole(&format!("{f}.allowOrigins[{i}]"), &pattern).map(StringMatch::Regex)?
        } else {
            StringMatch::Exact(o.clone())
        });
    }
    Ok(Cors {
        allow_origins,
        allow_methods: w.allow_methods.join(","),
        allow_headers: w.allow_headers.join(","),
        expose_headers: w.expose_headers.join(","),
        max_age: Some(Duration::from_secs(w.max_age.unwrap_or(5))),
        allow_credentials: w.allow_credentials.unwrap_or(false),
    })
}

/// The filters of a rule (or, with `backend`, of a backendRef), applied to `rule`.
fn filters(
    f: &str,
    list: Vec<FilterWire>,
    rule: &mut MeshRule,
    backend: bool,
    grpc: bool,
) -> Result<(), Fe> {
    let mut seen = std::collections::HashSet::new();
    for (i, w) in list.into_iter().enumerate() {
        let f = format!("{f}.filters[{i}]");
        let kind = w.kind.clone();
        if kind != "RequestMirror" && !seen.insert(kind.clone()) {
            return Err((
                format!("{f}.type"),
                format!("{kind} appears twice in one filters list"),
            ));
        }
        let key = match kind.as_str() {
            "RequestHeaderModifier" => "requestHeaderModifier",
            "ResponseHeaderModifier" => "responseHeaderModifier",
            "RequestRedirect" if !grpc => "requestRedirect",
            "URLRewrite" if !grpc => "urlRewrite",
            "RequestMirror" => "requestMirror",
            "CORS" if !grpc => "cors",
            "ExtensionRef" => {
                return Err(unsupported(&format!("{f}.extensionRef"), "ExtensionRef"));
            }
            "ExternalAuth" => {
                return Err(unsupported(&format!("{f}.externalAuth"), "ExternalAuth"));
            }
            other => {
                return Err((
                    format!("{f}.type"),
                    format!("{other:?} is not a filter type of this route kind"),
                ));
            }
        };
        let present = [
            ("requestHeaderModifier", w.request_header_modifier.is_some()),
            (
                "responseHeaderModifier",
                w.response_header_modifier.is_some(),
            ),
            ("requestRedirect", w.request_redirect.is_some()),
            ("urlRewrite", w.url_rewrite.is_some()),
            ("requestMirror", w.request_mirror.is_some()),
            ("cors", w.cors.is_some()),
            ("extensionRef", w.extension_ref.is_some()),
            ("externalAuth", w.external_auth.is_some()),
        ];
        for (name, set) in present {
            if set != (name == key) {
                return Err((
                    format!("{f}.{name}"),
                    if set {
                        format!("set, but the filter's type is {kind}")
                    } else {
                        format!("required by type {kind}")
                    },
                ));
            }
        }
        if backend && !matches!(key, "requestHeaderModifier" | "responseHeaderModifier") {
            return Err(unsupported(
                &format!("{f}.type"),
                &format!("{kind} on a backendRef"),
            ));
        }
        if let Some(h) = w.request_header_modifier {
            rule.headers.request = header_filter(&format!("{f}.{key}"), h)?;
        }
        if let Some(h) = w.response_header_modifier {
            rule.headers.response = header_filter(&format!("{f}.{key}"), h)?;
        }
        if let Some(r) = w.request_redirect {
            let ff = format!("{f}.{key}");
            let code = r.status_code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&code) {
                return Err((
                    format!("{ff}.statusCode"),
                    format!("{code}: expected 301, 302, 303, 307 or 308"),
                ));
            }
            if let Some(s) = &r.scheme
                && s != "http"
                && s != "https"
            {
                return Err((
                    format!("{ff}.scheme"),
                    format!("{s:?}: expected http or https"),
                ));
            }
            let (uri, prefix) = match r.path {
                Some(p) => {
                    let (u, pre) = path_modifier(&format!("{ff}.path"), p)?;
                    (Some(u), pre)
                }
                None => (None, false),
            };
            rule.redirect = Some(Redirect {
                uri,
                authority: r.hostname,
                port: port(&format!("{ff}.port"), r.port)?,
                scheme: r.scheme,
                code: code as u16,
                prefix,
            });
        }
        if let Some(r) = w.url_rewrite {
            let ff = format!("{f}.{key}");
            let (uri, prefix) = match r.path {
                Some(p) => {
                    let (u, pre) = path_modifier(&format!("{ff}.path"), p)?;
                    (Some(u), pre)
                }
                None => (None, false),
            };
            rule.rewrite = Some(Rewrite {
                full: uri.is_some() && !prefix,
                uri,
                authority: r.hostname,
                uri_regex: None,
            });
        }
        if let Some(m) = w.request_mirror {
            let ff = format!("{f}.{key}");
            let pct = match (m.percent, m.fraction) {
                (Some(_), Some(_)) => {
                    return Err((
                        format!("{ff}.fraction"),
                        "set only one of percent and fraction".into(),
                    ));
                }
                (Some(p), None) if (0..=100).contains(&p) => p as f64,
                (Some(p), None) => {
                    return Err((
                        format!("{ff}.percent"),
                        format!("{p} is not a percentage (0-100)"),
                    ));
                }
                (None, Some(fr)) => {
                    let d = fr.denominator.unwrap_or(100);
                    if d < 1 || fr.numerator < 0 || fr.numerator > d {
                        return Err((
                            format!("{ff}.fraction"),
                            format!(
                                "{}/{d}: need 0 <= numerator <= denominator and denominator >= 1",
                                fr.numerator
                            ),
                        ));
                    }
                    fr.numerator as f64 * 100.0 / d as f64
                }
                (None, None) => 100.0,
            };
            if !rule.mirrors.is_empty() {
                return Err(unsupported(&ff, "more than one RequestMirror per rule"));
            }
            rule.mirrors
                .push((object_ref(&format!("{ff}.backendRef"), m.backend_ref)?, pct));
        }
        if let Some(c) = w.cors {
            rule.cors = Some(cors(&format!("{f}.{key}"), c)?);
        }
    }
    if rule.redirect.is_some() && rule.rewrite.is_some() {
        return Err((
            format!("{f}.filters"),
            "RequestRedirect and URLRewrite cannot be combined".into(),
        ));
    }
    Ok(())
}

fn name_matches(
    f: &str,
    list: Vec<NameMatchWire>,
    lower: bool,
) -> Result<Vec<(String, StringMatch)>, Fe> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, h) in list.into_iter().enumerate() {
        let ff = format!("{f}[{i}]");
        let name = if lower {
            h.name.to_ascii_lowercase()
        } else {
            h.name.clone()
        };
        // Only the first of equal names counts, as the specification says.
        if !seen.insert(name.clone()) {
            continue;
        }
        let m = match h.kind.as_deref().unwrap_or("Exact") {
            "Exact" => StringMatch::Exact(h.value),
            "RegularExpression" => {
                StringMatch::Regex(Regex::whole(&format!("{ff}.value"), &h.value)?)
            }
            other => {
                return Err((
                    format!("{ff}.type"),
                    format!("{other:?}: expected Exact or RegularExpression"),
                ));
            }
        };
        out.push((name, m));
    }
    Ok(out)
}

fn http_match(f: &str, w: HttpMatchWire) -> Result<RankedMatch, Fe> {
    let (kind, value) = match w.path {
        Some(p) => (
            p.kind.unwrap_or_else(|| "PathPrefix".into()),
            p.value.unwrap_or_else(|| "/".into()),
        ),
        None => ("PathPrefix".into(), "/".into()),
    };
    let pf = format!("{f}.path.value");
    let (uri, rank0, rank1) = match kind.as_str() {
        "Exact" | "PathPrefix" if !value.starts_with('/') => {
            return Err((pf, format!("{value:?} must start with /")));
        }
        "Exact" => (StringMatch::Exact(value.clone()), 3, value.len()),
        "PathPrefix" => (
            StringMatch::PathPrefix(value.clone()),
            2,
            value.trim_end_matches('/').len().max(1),
        ),
        "RegularExpression" => (
            StringMatch::Regex(Regex::whole(&pf, &value)?),
            1,
            value.len(),
        ),
        other => {
            return Err((
                format!("{f}.path.type"),
                format!("{other:?}: expected Exact, PathPrefix or RegularExpression"),
            ));
        }
    };
    let headers = name_matches(&format!("{f}.headers"), w.headers, true)?;
    let query_params = name_matches(&format!("{f}.queryParams"), w.query_params, false)?;
    let rank = [
        rank0,
        rank1 as u32,
        w.method.is_some() as u32,
        headers.len() as u32,
        query_params.len() as u32,
    ];
    Ok(RankedMatch {
        m: HttpMatch {
            uri: Some(uri),
            method: w.method.map(StringMatch::Exact),
            headers,
            query_params,
            ..Default::default()
        },
        rank,
    })
}

fn grpc_match(f: &str, w: GrpcMatchWire) -> Result<RankedMatch, Fe> {
    let headers = name_matches(&format!("{f}.headers"), w.headers, true)?;
    let (uri, svc_len, method_len) = match w.method {
        None => (None, 0, 0),
        Some(m) => {
            let mf = format!("{f}.method");
            let (svc, method) = (m.service, m.method);
            if svc.is_none() && method.is_none() {
                return Err((mf, "set service, method or both".into()));
            }
            let lens = (
                svc.as_ref().map_or(0, String::len),
                method.as_ref().map_or(0, String::len),
            );
            let uri = match m.kind.as_deref().unwrap_or("Exact") {
                "Exact" => {
                    for (n, v) in [("service", &svc), ("method", &method)] {
                        if let Some(v) = v
                            && (v.is_empty() || v.contains('/'))
                        {
                            return Err((
                                format!("{mf}.{n}"),
                                format!("{v:?} is not a gRPC {n} name"),
                            ));
                        }
                    }
                    match (&svc, &method) {
                        (Some(s), Some(m)) => StringMatch::Exact(format!("/{s}/{m}")),
                        (Some(s), None) => StringMatch::Prefix(format!("/{s}/")),
                        (None, Some(m)) => StringMatch::Regex(Regex::whole(
                            &mf,
                            &format!("/[^/]+/{}", regex::escape(m)),
                        )?),
                        (None, None) => unreachable!("checked above"),
                    }
                }
                "RegularExpression" => {
                    let s = svc.as_deref().unwrap_or("[^/]+");
                    let m = method.as_deref().unwrap_or("[^/]+");
                    StringMatch::Regex(Regex::whole(&mf, &format!("/(?:{s})/(?:{m})"))?)
                }
                other => {
                    return Err((
                        format!("{mf}.type"),
                        format!("{other:?}: expected Exact or RegularExpression"),
                    ));
                }
            };
            (Some(uri), lens.0, lens.1)
        }
    };
    let rank = [
        svc_len as u32,
        method_len as u32,
        headers.len() as u32,
        0,
        0,
    ];
    Ok(RankedMatch {
        m: HttpMatch {
            uri,
            headers,
            ..Default::default()
        },
        rank,
    })
}

fn backends(f: &str, list: Vec<BackendRefWire>, grpc: bool) -> Result<Vec<WeightedBackend>, Fe> {
    let mut out = Vec::new();
    for (i, b) in list.into_iter().enumerate() {
        let ff = format!("{f}.backendRefs[{i}]");
        let weight = match b.weight {
            None => 1,
            Some(w) if (0..=1_000_000).contains(&w) => w as u32,
            Some(w) => {
                return Err((
                    format!("{ff}.weight"),
                    format!("{w}: expected 0 to 1000000"),
                ));
            }
        };
        let to = backend_ref(&ff, b.group, b.kind, b.name, b.namespace, b.port)?;
        let mut holder = MeshRule::empty();
        filters(&ff, b.filters, &mut holder, true, grpc)?;
        out.push(WeightedBackend {
            to,
            weight,
            headers: holder.headers,
        });
    }
    Ok(out)
}

impl MeshRule {
    fn empty() -> Self {
        Self {
            name: None,
            matches: Vec::new(),
            backends: Vec::new(),
            headers: Headers::default(),
            redirect: None,
            rewrite: None,
            mirrors: Vec::new(),
            cors: None,
            timeout: None,
            backend_timeout: None,
            retry: None,
        }
    }
}

fn http_rule(f: &str, w: HttpRuleWire) -> Result<MeshRule, Fe> {
    if w.session_persistence.is_some() {
        return Err(unsupported(
            &format!("{f}.sessionPersistence"),
            "sessionPersistence",
        ));
    }
    let mut rule = MeshRule::empty();
    rule.name = w.name;
    let matches = w.matches.unwrap_or_else(|| {
        vec![HttpMatchWire {
            path: None,
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        }]
    });
    if matches.is_empty() {
        rule.matches.push(http_match(
            &format!("{f}.matches"),
            HttpMatchWire {
                path: None,
                headers: Vec::new(),
                query_params: Vec::new(),
                method: None,
            },
        )?);
    }
    for (i, m) in matches.into_iter().enumerate() {
        rule.matches
            .push(http_match(&format!("{f}.matches[{i}]"), m)?);
    }
    filters(f, w.filters, &mut rule, false, false)?;
    // ReplacePrefixMatch needs a prefix to replace.
    let prefix_edit = rule.redirect.as_ref().is_some_and(|r| r.prefix)
        || rule
            .rewrite
            .as_ref()
            .is_some_and(|r| r.uri.is_some() && !r.full);
    if prefix_edit
        && let Some(i) = rule
            .matches
            .iter()
            .position(|m| !matches!(m.m.uri, Some(StringMatch::PathPrefix(_))))
    {
        return Err((
            format!("{f}.matches[{i}].path.type"),
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix".into(),
        ));
    }
    rule.backends = backends(f, w.backend_refs, false)?;
    if let Some(t) = w.timeouts {
        rule.timeout = timeout(&format!("{f}.timeouts.request"), t.request.as_ref())?;
        rule.backend_timeout = timeout(
            &format!("{f}.timeouts.backendRequest"),
            t.backend_request.as_ref(),
        )?;
        if let (Some(r), Some(b)) = (rule.timeout, rule.backend_timeout)
            && b > r
        {
            return Err((
                format!("{f}.timeouts.backendRequest"),
                format!("{b:?} is longer than timeouts.request ({r:?})"),
            ));
        }
    }
    if let Some(r) = w.retry {
        let mut codes = Vec::new();
        for (i, c) in r.codes.iter().enumerate() {
            if !(400..=599).contains(c) {
                return Err((
                    format!("{f}.retry.codes[{i}]"),
                    format!("{c}: expected an HTTP status 400-599"),
                ));
            }
            codes.push(*c as u16);
        }
        let attempts = match r.attempts {
            None => 2,
            Some(a) if (0..=100).contains(&a) => a as u32,
            Some(a) => {
                return Err((
                    format!("{f}.retry.attempts"),
                    format!("{a}: expected 0 to 100"),
                ));
            }
        };
        rule.retry = Some(Retry {
            attempts,
            codes,
            backoff: r
                .backoff
                .as_ref()
                .map(|b| gw_duration(&format!("{f}.retry.backoff"), b))
                .transpose()?,
        });
    }
    Ok(rule)
}

fn grpc_rule(f: &str, w: GrpcRuleWire) -> Result<MeshRule, Fe> {
    if w.session_persistence.is_some() {
        return Err(unsupported(
            &format!("{f}.sessionPersistence"),
            "sessionPersistence",
        ));
    }
    let mut rule = MeshRule::empty();
    rule.name = w.name;
    let matches = w.matches.unwrap_or_default();
    if matches.is_empty() {
        rule.matches.push(RankedMatch {
            m: HttpMatch::default(),
            rank: [0; 5],
        });
    }
    for (i, m) in matches.into_iter().enumerate() {
        rule.matches
            .push(grpc_match(&format!("{f}.matches[{i}]"), m)?);
    }
    filters(f, w.filters, &mut rule, false, true)?;
    rule.backends = backends(f, w.backend_refs, true)?;
    Ok(rule)
}

/// `metadata` fields a route's validation uses.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    /// `creationTimestamp`.
    pub created: Option<String>,
    /// `generation`.
    pub generation: Option<i64>,
    /// `status.parents[]`.
    pub status: SeenStatus,
}

impl Meta {
    /// Reads creation time, generation and our status entries from a route object.
    pub fn of(obj: &serde_yaml::Value) -> Self {
        let md = &obj["metadata"];
        let parent_refs: Vec<&serde_yaml::Value> = obj["spec"]["parentRefs"]
            .as_sequence()
            .map(|s| s.iter().collect())
            .unwrap_or_default();
        let mut status = Vec::new();
        let mut foreign_status = Vec::new();
        for p in obj["status"]["parents"].as_sequence().into_iter().flatten() {
            if p["controllerName"].as_str() != Some(CONTROLLER) {
                foreign_status.extend(serde_json::to_value(p).ok());
                continue;
            }
            let Some(index) = parent_refs.iter().position(|r| {
                r["name"] == p["parentRef"]["name"]
                    && r["port"] == p["parentRef"]["port"]
                    && r["namespace"] == p["parentRef"]["namespace"]
                    && r["sectionName"] == p["parentRef"]["sectionName"]
            }) else {
                continue;
            };
            let conds = p["conditions"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|c| {
                    (
                        c["type"].as_str().unwrap_or_default().to_string(),
                        c["status"].as_str().unwrap_or_default().to_string(),
                        c["reason"].as_str().unwrap_or_default().to_string(),
                        c["observedGeneration"].as_i64().unwrap_or(0),
                    )
                })
                .collect();
            status.push((index, conds));
        }
        Self {
            created: md["creationTimestamp"].as_str().map(String::from),
            generation: md["generation"].as_i64(),
            status: SeenStatus {
                ours: status,
                foreign: foreign_status,
            },
        }
    }
}

fn created(meta: &Meta) -> Result<Option<jiff::Timestamp>, Fe> {
    meta.created
        .as_deref()
        .map(|c| {
            c.parse::<jiff::Timestamp>().map_err(|e| {
                (
                    "metadata.creationTimestamp".to_string(),
                    format!("{c:?} is not an RFC 3339 time: {e}"),
                )
            })
        })
        .transpose()
}

fn check_hostnames(hostnames: &[String], ugw: Option<&String>) -> Result<(), Fe> {
    for (i, h) in hostnames.iter().enumerate() {
        if h.is_empty() || h.contains(['/', ':']) {
            return Err((
                format!("spec.hostnames[{i}]"),
                format!("{h:?} is not a hostname"),
            ));
        }
    }
    if let Some(u) = ugw
        && u != "All"
        && u != "None"
    {
        return Err((
            "spec.useDefaultGateways".into(),
            format!("{u:?}: expected All or None"),
        ));
    }
    Ok(())
}

fn http_route_fe(spec: serde_yaml::Value, meta: &Meta) -> Result<MeshRoute, Fe> {
    let w: HttpRouteSpecWire = strict(spec)?;
    check_hostnames(&w.hostnames, w.use_default_gateways.as_ref())?;
    let rules = w.rules.unwrap_or_else(|| {
        vec![HttpRuleWire {
            name: None,
            matches: None,
            filters: Vec::new(),
            backend_refs: Vec::new(),
            timeouts: None,
            retry: None,
            session_persistence: None,
        }]
    });
    let mut out = Vec::new();
    for (i, r) in rules.into_iter().enumerate() {
        out.push(http_rule(&format!("spec.rules[{i}]"), r)?);
    }
    Ok(MeshRoute {
        kind: RouteKind::Http,
        created: created(meta)?,
        generation: meta.generation,
        parents: parents(w.parent_refs)?,
        rules: out,
    })
}

fn grpc_route_fe(spec: serde_yaml::Value, meta: &Meta) -> Result<MeshRoute, Fe> {
    let w: GrpcRouteSpecWire = strict(spec)?;
    check_hostnames(&w.hostnames, w.use_default_gateways.as_ref())?;
    let rules = w.rules.unwrap_or_else(|| {
        vec![GrpcRuleWire {
            name: None,
            matches: None,
            filters: Vec::new(),
            backend_refs: Vec::new(),
            session_persistence: None,
        }]
    });
    let mut out = Vec::new();
    for (i, r) in rules.into_iter().enumerate() {
        out.push(grpc_rule(&format!("spec.rules[{i}]"), r)?);
    }
    Ok(MeshRoute {
        kind: RouteKind::Grpc,
        created: created(meta)?,
        generation: meta.generation,
        parents: parents(w.parent_refs)?,
        rules: out,
    })
}

/// Validates an HTTPRoute (`kind` Http) or GRPCRoute `spec`.
pub fn route(
    kind: RouteKind,
    spec: serde_yaml::Value,
    meta: &Meta,
) -> Result<MeshRoute, FieldError> {
    match kind {
        RouteKind::Http => http_route_fe(spec, meta),
        RouteKind::Grpc => grpc_route_fe(spec, meta),
    }
    .map_err(FieldError::from)
}

/// The route kind of a manifest's `kind`, if it is one.
pub fn kind_of(kind: &str) -> Option<RouteKind> {
    match kind {
        "HTTPRoute" => Some(RouteKind::Http),
        "GRPCRoute" => Some(RouteKind::Grpc),
        _ => None,
    }
}

// ---------------------------------------------------------------- status

/// One condition of a route's parent status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// `Accepted` or `ResolvedRefs`.
    pub kind: &'static str,
    /// True or False.
    pub ok: bool,
    /// The reason (CamelCase, from the specification).
    pub reason: &'static str,
    /// For the operator.
    pub message: String,
}

/// Our status for one Service parent of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentStatus {
    /// The parent as written.
    pub parent: ServiceParent,
    /// Accepted, ResolvedRefs.
    pub conditions: Vec<Condition>,
}

/// The status of every Service parent of route `id`: computed from the Services alone, which
/// every node sees alike, so every agent arrives at the same conditions (the one-writer
/// scheme: identical content, written only when it differs from what the object has).
pub fn parent_statuses(
    state: &crate::model::State,
    id: &crate::model::ObjectRef,
    r: &MeshRoute,
) -> Vec<ParentStatus> {
    use crate::model::ObjectRef;
    let port_of = |svc: &ObjectRef, port: Option<u16>, section: Option<&String>| {
        state.services.get(svc).is_some_and(|s| {
            s.ports
                .iter()
                .any(|p| port.is_none_or(|x| x == p.port) && section.is_none_or(|n| n == &p.name))
        })
    };
    // ResolvedRefs is per route: every backend and mirror of every rule.
    let mut unresolved: Option<(&'static str, String)> = None;
    for (i, rule) in r.rules.iter().enumerate() {
        let refs = rule
            .backends
            .iter()
            .map(|b| &b.to)
            .chain(rule.mirrors.iter().map(|(m, _)| m));
        for b in refs {
            let ns = b.namespace.as_deref().unwrap_or(&id.namespace);
            let svc = ObjectRef::new(ns, b.name.clone());
            let problem = if let Some((reason, msg)) = &b.invalid {
                Some((*reason, msg.clone()))
            } else if ns != id.namespace {
                Some((
                    "RefNotPermitted",
                    format!(
                        "spec.rules[{i}]: {svc} is in another namespace; cross-namespace references (ReferenceGrant) are not supported"
                    ),
                ))
            } else if !port_of(&svc, b.port, None) {
                Some((
                    "BackendNotFound",
                    format!(
                        "spec.rules[{i}]: no Service port {svc}:{}",
                        b.port.unwrap_or(0)
                    ),
                ))
            } else {
                None
            };
            if unresolved.is_none() {
                unresolved = problem;
            }
        }
    }
    let resolved = match &unresolved {
        None => Condition {
            kind: "ResolvedRefs",
            ok: true,
            reason: "ResolvedRefs",
            message: "every backendRef resolves".into(),
        },
        Some((reason, msg)) => Condition {
            kind: "ResolvedRefs",
            ok: false,
            reason,
            message: format!("{msg} (its share of requests answers 500)"),
        },
    };
    r.parents
        .iter()
        .map(|p| {
            let svc = ObjectRef::new(
                p.namespace.as_deref().unwrap_or(&id.namespace),
                p.name.clone(),
            );
            let http_port = state.services.get(&svc).is_some_and(|s| {
                s.ports.iter().any(|sp| {
                    p.port.is_none_or(|x| x == sp.port)
                        && p.section.as_ref().is_none_or(|n| n == &sp.name)
                        && sp.is_l7(s.mode)
                })
            });
            let accepted = if !port_of(&svc, p.port, p.section.as_ref()) {
                Condition {
                    kind: "Accepted",
                    ok: false,
                    reason: "NoMatchingParent",
                    message: format!(
                        "no Service {svc}{} is served by proxy-agent",
                        p.port.map(|x| format!(" with port {x}")).unwrap_or_default()
                    ),
                }
            } else if !http_port {
                Condition {
                    kind: "Accepted",
                    ok: false,
                    reason: "UnsupportedValue",
                    message: format!(
                        "the Service {svc} port{} is balanced in the kernel, not HTTP: name it http (or http-*, grpc) or set appProtocol: http",
                        p.port.map(|x| format!(" {x}")).unwrap_or_else(|| "s are".into())
                    ),
                }
            } else if port_of(&svc, p.port, p.section.as_ref()) {
                Condition {
                    kind: "Accepted",
                    ok: true,
                    reason: "Accepted",
                    message: "routes requests to the Service on every node".into(),
                }
            } else {
                Condition {
                    kind: "Accepted",
                    ok: false,
                    reason: "NoMatchingParent",
                    message: format!(
                        "no Service {svc}{} is served by proxy-agent",
                        p.port.map(|x| format!(" with port {x}")).unwrap_or_default()
                    ),
                }
            };
            ParentStatus {
                parent: p.clone(),
                conditions: vec![accepted, resolved.clone()],
            }
        })
        .collect()
}

/// A version of a route that failed validation (its last good version, if any, keeps serving).
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    /// The rejected version's `metadata.generation`.
    pub generation: Option<i64>,
    /// Its Service parents (read leniently: entries that do not parse are left out).
    pub parents: Vec<ServiceParent>,
    /// Its `status.parents[]`.
    pub status: SeenStatus,
    /// What is wrong.
    pub error: FieldError,
}

/// Reads what the status of a route that failed validation needs.
pub fn rejected(obj: &serde_yaml::Value, error: FieldError) -> Rejected {
    let meta = Meta::of(obj);
    let refs: Vec<ParentRefWire> = obj["spec"]["parentRefs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|p| {
            serde_yaml::from_value(p.clone()).unwrap_or(ParentRefWire {
                group: Some("-".into()),
                kind: None,
                namespace: None,
                name: String::new(),
                section_name: None,
                port: None,
            })
        })
        .collect();
    Rejected {
        generation: meta.generation,
        parents: parents(refs).unwrap_or_default(),
        status: meta.status,
        error,
    }
}

/// The status of a route whose current version failed validation: not Accepted
/// (`UnsupportedValue`, naming the field), for every Service parent.
pub fn rejected_statuses(r: &Rejected) -> Vec<ParentStatus> {
    r.parents
        .iter()
        .map(|p| ParentStatus {
            parent: p.clone(),
            conditions: vec![
                Condition {
                    kind: "Accepted",
                    ok: false,
                    reason: "UnsupportedValue",
                    message: format!(
                        "{}; this version is not applied (the last good version, if any, keeps serving)",
                        r.error
                    ),
                },
                Condition {
                    kind: "ResolvedRefs",
                    ok: true,
                    reason: "ResolvedRefs",
                    message: "not evaluated: the route is not accepted".into(),
                },
            ],
        })
        .collect()
}

/// Whether the object's status differs from `want` (type, status, reason or generation).
pub fn status_differs(generation: Option<i64>, seen: &SeenStatus, want: &[ParentStatus]) -> bool {
    let gen_ = generation.unwrap_or(0);
    want.len() != seen.ours.len()
        || want.iter().any(|p| {
            let have = seen.ours.iter().find(|(i, _)| *i == p.parent.index);
            let Some((_, have)) = have else { return true };
            have.len() != p.conditions.len()
                || p.conditions.iter().any(|c| {
                    !have.iter().any(|(t, s, reason, g)| {
                        t == c.kind
                            && s == if c.ok { "True" } else { "False" }
                            && reason == c.reason
                            && *g == gen_
                    })
                })
        })
}

/// The merge patch writing `want` as our `status.parents[]` entries, other controllers'
/// entries kept.
pub fn status_patch(
    generation: Option<i64>,
    seen: &SeenStatus,
    want: &[ParentStatus],
    now: &str,
) -> serde_json::Value {
    let mut parents = seen.foreign.clone();
    for p in want {
        let mut parent_ref = serde_json::json!({
            "group": "",
            "kind": "Service",
            "name": p.parent.name,
        });
        if let Some(ns) = &p.parent.namespace {
            parent_ref["namespace"] = ns.clone().into();
        }
        if let Some(port) = p.parent.port {
            parent_ref["port"] = port.into();
        }
        if let Some(s) = &p.parent.section {
            parent_ref["sectionName"] = s.clone().into();
        }
        parents.push(serde_json::json!({
            "parentRef": parent_ref,
            "controllerName": CONTROLLER,
            "conditions": p.conditions.iter().map(|c| serde_json::json!({
                "type": c.kind,
                "status": if c.ok { "True" } else { "False" },
                "reason": c.reason,
                "message": c.message,
                "observedGeneration": generation.unwrap_or(0),
                "lastTransitionTime": now,
            })).collect::<Vec<_>>(),
        }));
    }
    serde_json::json!({"status": {"parents": parents}})
}

/// The retry conditions of a Gateway API `retry`: its codes, connection failures and resets.
pub fn retry_on(r: &Retry) -> RetryOn {
    RetryOn {
        connect_failure: true,
        reset: true,
        status_codes: r.codes.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(yaml: &str) -> Result<MeshRoute, FieldError> {
        route(
            RouteKind::Http,
            serde_yaml::from_str(yaml).unwrap(),
            &Meta::default(),
        )
    }

    fn grpc(yaml: &str) -> Result<MeshRoute, FieldError> {
        route(
            RouteKind::Grpc,
            serde_yaml::from_str(yaml).unwrap(),
            &Meta::default(),
        )
    }

    #[test]
    fn durations_follow_gep_2257() {
        assert_eq!(gw_duration("f", "10s").unwrap(), Duration::from_secs(10));
        assert_eq!(
            gw_duration("f", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            gw_duration("f", "1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(gw_duration("f", "0s").unwrap(), Duration::ZERO);
        for bad in ["", "1.5s", "10", "s", "123456s", "1d", "1s1s1s1s1s", "-1s"] {
            assert!(gw_duration("f", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_service_parented_http_route_validates_every_supported_field() {
        let r = http(
            r#"
parentRefs:
- {group: "", kind: Service, name: echo, port: 80}
- {name: some-gateway}
hostnames: [echo.example]
rules:
- name: split
  matches:
  - path: {type: PathPrefix, value: /v2}
    headers: [{name: Version, value: two}, {name: x-re, type: RegularExpression, value: "a+"}]
    queryParams: [{name: q, value: "1"}]
    method: GET
  filters:
  - type: RequestHeaderModifier
    requestHeaderModifier: {set: [{name: x-a, value: "1"}], add: [{name: x-b, value: "2"}], remove: [x-c]}
  - type: ResponseHeaderModifier
    responseHeaderModifier: {set: [{name: x-r, value: "1"}]}
  - type: URLRewrite
    urlRewrite: {hostname: web.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
  - type: RequestMirror
    requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 25, denominator: 50}}
  backendRefs:
  - {name: echo-v1, port: 8080, weight: 70}
  - name: echo-v2
    port: 8080
    weight: 30
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-v, value: "2"}]}}]
  - {group: example.com, kind: Bucket, name: b}
  timeouts: {request: 10s, backendRequest: 500ms}
  retry: {codes: [500, 503], attempts: 3, backoff: 100ms}
- matches: [{path: {type: Exact, value: /exact}}]
  filters:
  - type: RequestRedirect
    requestRedirect: {scheme: https, hostname: example.org, port: 8443, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /x}}
"#,
        )
        .unwrap();
        assert_eq!(
            r.parents.len(),
            1,
            "the Gateway parent is another controller's"
        );
        assert_eq!(r.parents[0].port, Some(80));
        let a = &r.rules[0];
        assert_eq!(a.matches[0].rank, [2, 3, 1, 2, 1]);
        assert_eq!(a.matches[0].m.headers[0].0, "version");
        assert_eq!(a.backends.len(), 3);
        assert_eq!(a.backends[1].headers.request.set.len(), 1);
        assert_eq!(a.backends[2].to.invalid.as_ref().unwrap().0, "InvalidKind");
        assert_eq!(a.mirrors[0].1, 50.0);
        assert!(a.rewrite.as_ref().is_some_and(|w| !w.full));
        assert_eq!(a.timeout, Some(Duration::from_secs(10)));
        assert_eq!(a.backend_timeout, Some(Duration::from_millis(500)));
        assert_eq!(a.retry.as_ref().unwrap().codes, vec![500, 503]);
        let b = &r.rules[1];
        assert_eq!(b.matches[0].rank[0], 3);
        let rd = b.redirect.as_ref().unwrap();
        assert_eq!((rd.code, rd.prefix, rd.port), (301, false, Some(8443)));
        // No rules: one rule matching everything (PathPrefix /), without backends.
        let r = http("parentRefs: [{group: \"\", kind: Service, name: echo}]").unwrap();
        assert_eq!(r.rules.len(), 1);
        assert_eq!(r.rules[0].matches[0].rank, [2, 1, 0, 0, 0]);
        assert_eq!(r.rules[0].redirect, None);
    }

    #[test]
    fn unsupported_or_invalid_fields_are_rejected_by_name() {
        let base = "parentRefs: [{group: \"\", kind: Service, name: echo}]\n";
        for (body, field, word) in [
            (
                "rules: [{filters: [{type: ExtensionRef, extensionRef: {group: g, kind: K, name: n}}]}]",
                "spec.rules[0].filters[0].extensionRef",
                "ExtensionRef",
            ),
            (
                "rules: [{sessionPersistence: {sessionName: s}}]",
                "spec.rules[0].sessionPersistence",
                "sessionPersistence",
            ),
            (
                "rules: [{backendRefs: [{name: a}]}]",
                "spec.rules[0].backendRefs[0].port",
                "required",
            ),
            (
                "rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]",
                "spec.rules[0].matches[0].path.type",
                "PathPrefix",
            ),
            (
                "rules: [{filters: [{type: RequestHeaderModifier}]}]",
                "spec.rules[0].filters[0].requestHeaderModifier",
                "required",
            ),
            (
                "rules: [{timeouts: {request: 1s, backendRequest: 2s}}]",
                "spec.rules[0].timeouts.backendRequest",
                "longer",
            ),
            (
                "rules: [{matches: [{path: {type: RegularExpression, value: \"(\"}}]}]",
                "spec.rules[0].matches[0].path.value",
                "regex",
            ),
            ("rules: [{bogus: 1}]", "spec.rules[0].bogus", "bogus"),
        ] {
            let e = http(&format!("{base}{body}")).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
            assert!(e.message.contains(word), "{body}: {e}");
        }
        let e = grpc(&format!(
            "{base}rules: [{{filters: [{{type: URLRewrite, urlRewrite: {{hostname: x}}}}]}}]"
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.rules[0].filters[0].type", "{e}");
    }

    #[test]
    fn grpc_methods_become_path_matches() {
        let r = grpc(
            r#"
parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
rules:
- matches:
  - method: {service: pkg.Echo, method: Say}
  - method: {service: pkg.Echo}
  - method: {method: Say}
  - method: {type: RegularExpression, service: "pkg\\..*"}
  backendRefs: [{name: echo-v1, port: 7070}]
"#,
        )
        .unwrap();
        let m: Vec<&StringMatch> = r.rules[0]
            .matches
            .iter()
            .map(|m| m.m.uri.as_ref().unwrap())
            .collect();
        assert!(m[0].matches("/pkg.Echo/Say") && !m[0].matches("/pkg.Echo/Other"));
        assert!(m[1].matches("/pkg.Echo/Other") && !m[1].matches("/pkg.Other/Say"));
        assert!(m[2].matches("/x.Y/Say") && !m[2].matches("/x.Y/Sayx"));
        assert!(m[3].matches("/pkg.A/B") && !m[3].matches("/other.A/B"));
        assert_eq!(r.rules[0].matches[0].rank, [8, 3, 0, 0, 0]);
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        let p = StringMatch::PathPrefix("/v2".into());
        assert!(p.matches("/v2") && p.matches("/v2/") && p.matches("/v2/x"));
        assert!(!p.matches("/v2x") && !p.matches("/v"));
        let slash = StringMatch::PathPrefix("/v2/".into());
        assert!(slash.matches("/v2") && slash.matches("/v2/x"));
        assert!(StringMatch::PathPrefix("/".into()).matches("/anything"));
    }
}
