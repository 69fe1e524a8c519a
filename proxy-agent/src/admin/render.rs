//! How the CLI prints admin API documents: kubectl-like tables by default, or the JSON/YAML
//! document itself (`-o json|yaml`).

use std::fmt::Write as _;

use serde_json::Value;

/// Output format of a CLI command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// The admin API's JSON.
    Json,
    /// The same document as YAML.
    Yaml,
}

/// Prints `v` as JSON or YAML; `None` for tables (the caller renders those).
pub fn document(v: &Value, o: Output) -> Option<String> {
    match o {
        Output::Json => Some(serde_json::to_string_pretty(v).unwrap_or_default() + "\n"),
        Output::Yaml => Some(serde_yaml::to_string(v).unwrap_or_default()),
        Output::Table => None,
    }
}

/// Text of a JSON scalar (`-` for null).
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        other => other.to_string(),
    }
}

/// A table with a header row, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<width$}   ", width = w[i]);
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// `proxy-agent status`.
pub fn status(v: &Value) -> String {
    let mut out = String::new();
    let row = |k: &str, val: String, out: &mut String| {
        let _ = writeln!(out, "{k:<12}{val}");
    };
    row("NODE", text(&v["node"]), &mut out);
    row(
        "SOURCE",
        format!("{} ({})", text(&v["source"]), text(&v["source_location"])),
        &mut out,
    );
    let synced = if v["synced"].as_bool() == Some(true) {
        format!("synced {} s ago", text(&v["synced_age_s"]))
    } else {
        "not synced yet".into()
    };
    row(
        "GENERATION",
        format!("{} ({synced})", text(&v["generation"])),
        &mut out,
    );
    row(
        "READY",
        if v["ready"].as_bool() == Some(true) {
            "yes".into()
        } else {
            format!("no: {}", text(&v["not_ready_reason"]))
        },
        &mut out,
    );
    let p = &v["proxy"];
    row(
        "PROXY",
        match (p["enabled"].as_bool(), p["listening"].as_bool()) {
            (Some(true), Some(true)) => format!("listening on {}", text(&p["address"])),
            (Some(true), _) => format!("not listening yet ({})", text(&p["address"])),
            _ => "off (no --node-ip): HTTP Services are balanced in the kernel".into(),
        },
        &mut out,
    );
    row(
        "SERVICES",
        format!(
            "{} ({} ports, {} backends, {} HTTP routes)",
            text(&v["services"]),
            text(&v["frontends"]),
            text(&v["backends"]),
            text(&v["l7_routes"])
        ),
        &mut out,
    );
    let apply = &v["last_apply"];
    row(
        "LAST APPLY",
        if apply["ok"].as_bool() == Some(true) {
            format!(
                "ok, {} writes, {:.1} ms (model {:.1}, routes {:.1}, maps {:.1})",
                text(&apply["writes"]),
                apply["model_ms"].as_f64().unwrap_or(0.0)
                    + apply["routes_ms"].as_f64().unwrap_or(0.0)
                    + apply["maps_ms"].as_f64().unwrap_or(0.0),
                apply["model_ms"].as_f64().unwrap_or(0.0),
                apply["routes_ms"].as_f64().unwrap_or(0.0),
                apply["maps_ms"].as_f64().unwrap_or(0.0)
            )
        } else {
            format!("FAILED: {}", text(&apply["error"]))
        },
        &mut out,
    );
    row("PROBLEMS", text(&v["problems"]), &mut out);
    if let Some(maps) = v["maps"].as_array() {
        out.push('\n');
        let rows: Vec<Vec<String>> = maps
            .iter()
            .map(|m| {
                let (e, c) = (
                    m["entries"].as_f64().unwrap_or(0.0),
                    m["capacity"].as_f64().unwrap_or(1.0),
                );
                vec![
                    text(&m["name"]),
                    text(&m["entries"]),
                    text(&m["capacity"]),
                    format!("{:.1}%", 100.0 * e / c.max(1.0)),
                ]
            })
            .collect();
        out.push_str(&table(&["MAP", "ENTRIES", "CAPACITY", "USED"], &rows));
    }
    out
}

/// `proxy-agent services`.
pub fn services(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                text(&s["namespace"]),
                text(&s["name"]),
                match s["type"].as_str() {
                    Some("NodePort") => "*".to_string(),
                    _ => text(&s["cluster_ip"]),
                },
                text(&s["port"]),
                text(&s["protocol"]),
                s["type"].as_str().unwrap_or("ClusterIP").to_string(),
                text(&s["mode"]),
                format!("{}/{}", text(&s["ready"]), text(&s["terminating"])),
                text(&s["affinity"]),
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "NAME",
            "ADDRESS",
            "PORT",
            "PROTO",
            "TYPE",
            "MODE",
            "READY/TERMINATING",
            "AFFINITY",
        ],
        &rows,
    )
}

fn backends_table(c: &Value) -> String {
    let rows: Vec<Vec<String>> = c["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            vec![
                text(&b["address"]),
                text(&b["pod"]),
                text(&b["health"]),
                text(&b["ejected_for_s"]),
                text(&b["active_requests"]),
                text(&b["requests_total"]),
                text(&b["errors_total"]),
                text(&b["connections"]),
                text(&b["idle_pooled"]),
            ]
        })
        .collect();
    table(
        &[
            "BACKEND",
            "POD",
            "HEALTH",
            "EJECTED-FOR-S",
            "ACTIVE",
            "REQUESTS",
            "ERRORS",
            "CONNS",
            "IDLE",
        ],
        &rows,
    )
}

fn indent(s: &str, by: &str) -> String {
    s.lines().map(|l| format!("{by}{l}\n")).collect()
}

/// `proxy-agent service NS/NAME`.
pub fn service(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Service {}/{}   ClusterIP {}   internalTrafficPolicy {}   affinity {}",
        text(&v["namespace"]),
        text(&v["name"]),
        text(&v["cluster_ip"]),
        text(&v["internal_traffic_policy"]),
        v["affinity_timeout_s"]
            .as_u64()
            .map_or("None".to_string(), |t| format!("ClientIP {t}s"))
    );
    for p in v["ports"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\nPort {}/{} ({}): {} ({})",
            text(&p["port"]),
            text(&p["protocol"]),
            text(&p["port_name"]),
            text(&p["mode"]),
            text(&p["mode_reason"])
        );
        let k = &p["kernel"];
        if k["present"].as_bool() == Some(true) {
            let _ = writeln!(
                out,
                "  kernel: service id {}, {} active + {} terminating slots{}",
                text(&k["service_id"]),
                text(&k["count"]),
                text(&k["terminating_count"]),
                if k["l7_flag"].as_bool() == Some(true) {
                    ", L7 flag (redirected while the proxy runs)"
                } else {
                    ""
                }
            );
            let rows: Vec<Vec<String>> = k["slots"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    vec![
                        text(&s["slot"]),
                        text(&s["backend_id"]),
                        text(&s["address"]),
                        text(&s["state"]),
                    ]
                })
                .collect();
            out.push_str(&indent(
                &table(&["SLOT", "BACKEND-ID", "ADDRESS", "STATE"], &rows),
                "    ",
            ));
        } else {
            let _ = writeln!(out, "  kernel: no entry ({})", text(&k["error"]));
        }
        let route = &p["route"];
        if !route.is_null() {
            for r in route["rules"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  route: {} match {}: {}timeout {} ms, retries {} on {}{}",
                    route["virtual_service"].as_str().map_or(
                        "default route".to_string(),
                        |v| format!("VirtualService {v} {}", rule_label(r))
                    ),
                    match_label(r),
                    action_label(r),
                    text(&r["timeout_ms"]),
                    text(&r["retries"]["attempts"]),
                    text(&r["retries"]["retry_on"]),
                    r["mirror"]["cluster"]
                        .as_str()
                        .map_or(String::new(), |m| format!(", mirror to {m}"))
                );
            }
            for c in p["clusters"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  destination {} (weight {}): {}, outlier detection {}",
                    text(&c["name"]),
                    text(&c["weight"]),
                    text(&c["load_balancer"]),
                    if c["outlier_detection"].is_null() {
                        "off"
                    } else {
                        "on"
                    }
                );
                out.push_str(&indent(&backends_table(c), "    "));
            }
        }
    }
    let rows: Vec<Vec<String>> = v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                text(&e["address"]),
                text(&e["state"]),
                text(&e["node"]),
                text(&e["pod"]),
                text(&e["slice"]),
            ]
        })
        .collect();
    out.push_str("\nEndpoints:\n");
    out.push_str(&indent(
        &table(&["ADDRESS", "STATE", "NODE", "POD", "SLICE"], &rows),
        "  ",
    ));
    out
}

/// `http[2] (name)` of a rule.
fn rule_label(r: &Value) -> String {
    format!(
        "http[{}]{}",
        text(&r["index"]),
        r["name"]
            .as_str()
            .map_or(String::new(), |n| format!(" ({n})"))
    )
}

/// The rule's match blocks, `any` without any, `|` between blocks.
fn match_label(r: &Value) -> String {
    let blocks: Vec<String> = r["match"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    if blocks.is_empty() {
        "any".into()
    } else {
        blocks.join(" | ")
    }
}

/// What the proxy itself does before or instead of forwarding: `fault ..., `, `redirect 301 `.
fn action_label(r: &Value) -> String {
    let mut s = String::new();
    if let Some(d) = r["redirect"].as_object() {
        let _ = write!(s, "redirect {} ", text(&d["code"]));
    }
    if let Some(d) = r["direct_response"].as_object() {
        let _ = write!(s, "direct response {} ", text(&d["status"]));
    }
    if let Some(f) = r["fault"].as_object() {
        if !f["delay_ms"].is_null() {
            let _ = write!(
                s,
                "delay {} ms ({}%), ",
                text(&f["delay_ms"]),
                text(&f["delay_percent"])
            );
        }
        if !f["abort"].is_null() {
            let _ = write!(
                s,
                "abort {} ({}%), ",
                text(&f["abort"]),
                text(&f["abort_percent"])
            );
        }
    }
    s
}

/// `proxy-agent routes`.
pub fn routes(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|route| {
            route["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |r| {
                    let dests: Vec<String> = r["destinations"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|d| format!("{} ({})", text(&d["cluster"]), text(&d["weight"])))
                        .collect();
                    vec![
                        text(&route["vip"]),
                        text(&route["service"]),
                        text(&route["virtual_service"]),
                        rule_label(r),
                        match_label(r),
                        format!("{}{}", action_label(r), dests.join(", ")),
                        format!(
                            "{} on {}",
                            text(&r["retries"]["attempts"]),
                            text(&r["retries"]["retry_on"])
                        ),
                        text(&r["timeout_ms"]),
                    ]
                })
        })
        .collect();
    table(
        &[
            "VIP",
            "SERVICE",
            "VIRTUALSERVICE",
            "RULE",
            "MATCH",
            "DESTINATIONS",
            "RETRIES",
            "TIMEOUT-MS",
        ],
        &rows,
    )
}

/// `proxy-agent clusters`.
pub fn clusters(v: &Value) -> String {
    let mut out = String::new();
    for c in v.as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{}   {}   active requests {}",
            text(&c["name"]),
            text(&c["load_balancer"]),
            text(&c["active_requests"])
        );
        out.push_str(&indent(&backends_table(c), "  "));
    }
    out
}

/// `proxy-agent problems`.
pub fn problems(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                text(&p["kind"]),
                text(&p["object"]),
                text(&p["field"]),
                format!("{}; {}", text(&p["message"]), text(&p["effect"])),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no problems\n".into();
    }
    table(&["KIND", "OBJECT", "FIELD", "PROBLEM"], &rows)
}

fn list(v: &Value, by: &str) -> String {
    let mut out = String::new();
    for b in v.as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{by}{}{}{}",
            text(&b["address"]),
            b["pod"]
                .as_str()
                .map_or(String::new(), |p| format!(" ({p})")),
            b["reason"]
                .as_str()
                .map_or(String::new(), |r| format!(": {r}"))
        );
    }
    out
}

/// `proxy-agent explain`.
pub fn explain(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} -> {}/{}",
        text(&v["from"]["ip"]),
        v["from"]["pod"]
            .as_str()
            .map_or(String::new(), |p| format!("({p})")),
        text(&v["to"]),
        text(&v["protocol"])
    );
    for (i, s) in v["steps"].as_array().into_iter().flatten().enumerate() {
        let _ = writeln!(
            out,
            "{}. {}: {}",
            i + 1,
            text(&s["step"]),
            text(&s["verdict"])
        );
        let _ = writeln!(out, "   {}", text(&s["detail"]));
        if s.get("eligible").is_some() {
            out.push_str("   eligible:\n");
            out.push_str(&list(&s["eligible"], "     "));
        }
        if s["excluded"].as_array().is_some_and(|e| !e.is_empty()) {
            out.push_str("   not eligible:\n");
            out.push_str(&list(&s["excluded"], "     "));
        }
        for d in s["destinations"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "   destination {} ({:.0}%), {}",
                text(&d["cluster"]),
                d["share_percent"].as_f64().unwrap_or(0.0),
                text(&d["load_balancer"])
            );
            if let Some(h) = d["hash"].as_str() {
                let _ = writeln!(out, "     {h}");
            }
            if let Some(p) = d["panic"].as_str() {
                let _ = writeln!(out, "     {p}");
            }
            out.push_str("     eligible:\n");
            out.push_str(&list(&d["eligible"], "       "));
            if d["excluded"].as_array().is_some_and(|e| !e.is_empty()) {
                out.push_str("     not eligible:\n");
                out.push_str(&list(&d["excluded"], "       "));
            }
        }
    }
    let _ = writeln!(out, "=> {}", text(&v["summary"]));
    out
}

/// One `proxy-agent monitor` line.
pub fn monitor_line(v: &Value) -> String {
    match v["type"].as_str() {
        Some("trace") => format!(
            "{} {:<5} {:<12} {:<18} {} -> {} {} {}[{}]",
            text(&v["time"]),
            if text(&v["verdict"]).contains("refused") {
                "DROP"
            } else {
                "TRACE"
            },
            text(&v["hook"]),
            text(&v["verdict"]),
            text(&v["from"]),
            text(&v["to"]),
            text(&v["service"]),
            if v["client"].is_string() {
                format!("client={}", text(&v["client"]))
            } else {
                text(&v["comm"])
            },
            if v["client"].is_string() {
                "-".to_string()
            } else {
                text(&v["pid"])
            },
        ),
        Some("l7") => format!(
            "{} L7    {} {} -> {} {} {}{} route={} subset={} backend={} status={} flags={} attempts={} {:.1}ms",
            text(&v["time"]),
            text(&v["client_pod"]),
            text(&v["client"]),
            text(&v["service"]),
            text(&v["method"]),
            text(&v["authority"]),
            text(&v["path"]),
            text(&v["route"]),
            text(&v["subset"]),
            text(&v["backend"]),
            text(&v["status"]),
            text(&v["response_flags"]),
            text(&v["attempts"]),
            v["duration_ms"].as_f64().unwrap_or(0.0),
        ),
        _ => v.to_string(),
    }
}
