//! Access to the datapath maps behind a trait, so the reconciler is tested without a kernel.
//!
//! [`AyaMaps`] talks to the pinned kernel maps; [`MemMaps`] is an in-memory double that can also
//! inject failures. [`dump`] renders any implementation as stable golden text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use proxy_common::{AffinityMatchKey, BackendValue, ServiceKey, ServiceValue, SourceRangeKey};

/// One `loadBalancerSourceRanges` prefix of a service: (service id, network address, length).
pub type SourceRange = (u32, Ipv4Addr, u8);

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} on BPF map {map} failed: {detail}")]
pub struct MapError {
    /// Operation (`insert`, `remove`, `iterate`).
    pub op: &'static str,
    /// Map name.
    pub map: &'static str,
    /// What the kernel (or the double) said.
    pub detail: String,
}

/// The operations the reconciler needs on the datapath maps.
pub trait LbMaps {
    /// All backends.
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapError>;
    /// All service entries (master and slots).
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError>;
    /// All affinity membership entries.
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError>;
    /// Inserts or replaces a backend.
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError>;
    /// Removes a backend (absent is fine).
    fn del_backend(&mut self, id: u32) -> Result<(), MapError>;
    /// Inserts or replaces a service entry.
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError>;
    /// Removes a service entry (absent is fine).
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    /// Inserts an affinity membership entry.
    fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), MapError>;
    /// Removes an affinity membership entry (absent is fine).
    fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), MapError>;
    /// All source-range prefixes.
    fn source_ranges(&self) -> Result<Vec<SourceRange>, MapError>;
    /// Inserts a source-range prefix.
    fn put_source_range(&mut self, range: SourceRange) -> Result<(), MapError>;
    /// Removes a source-range prefix (absent is fine).
    fn del_source_range(&mut self, range: SourceRange) -> Result<(), MapError>;
}

/// In-memory maps for unit tests; `fail_after` makes the n-th next write fail.
#[derive(Debug, Default, Clone)]
pub struct MemMaps {
    /// Backend map.
    pub backends: BTreeMap<u32, BackendValue>,
    /// Service map.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Affinity membership map.
    pub affinity_match: BTreeMap<AffinityMatchKey, ()>,
    /// Source-range trie.
    pub source_ranges: std::collections::BTreeSet<SourceRange>,
    /// Number of writes that succeed before every further write fails (`None`: never fail).
    pub fail_after: Option<usize>,
    /// Every write in order, for tests of the write order.
    pub journal: Vec<String>,
}

impl MemMaps {
    fn write(&mut self, what: String, map: &'static str) -> Result<(), MapError> {
        if let Some(n) = self.fail_after.as_mut() {
            if *n == 0 {
                return Err(MapError {
                    op: "insert",
                    map,
                    detail: "injected failure".into(),
                });
            }
            *n -= 1;
        }
        self.journal.push(what);
        Ok(())
    }
}

impl LbMaps for MemMaps {
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError> {
        Ok(self.affinity_match.keys().copied().collect())
    }
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        self.write(format!("put backend {id}"), "backends")?;
        self.backends.insert(id, *value);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.write(format!("del backend {id}"), "backends")?;
        self.backends.remove(&id);
        Ok(())
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        self.write(
            format!("put {} slot {}", frontend_text(key), key.slot),
            "services",
        )?;
        self.services.insert(*key, *value);
        Ok(())
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.write(
            format!("del {} slot {}", frontend_text(key), key.slot),
            "services",
        )?;
        self.services.remove(key);
        Ok(())
    }
    fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), MapError> {
        self.write(
            format!("put affinity {}:{}", key.service_id, key.backend_id),
            "affinity",
        )?;
        self.affinity_match.insert(*key, ());
        Ok(())
    }
    fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), MapError> {
        self.write(
            format!("del affinity {}:{}", key.service_id, key.backend_id),
            "affinity",
        )?;
        self.affinity_match.remove(key);
        Ok(())
    }
    fn source_ranges(&self) -> Result<Vec<SourceRange>, MapError> {
        Ok(self.source_ranges.iter().copied().collect())
    }
    fn put_source_range(&mut self, r: SourceRange) -> Result<(), MapError> {
        self.write(format!("put range {} {}/{}", r.0, r.1, r.2), "ranges")?;
        self.source_ranges.insert(r);
        Ok(())
    }
    fn del_source_range(&mut self, r: SourceRange) -> Result<(), MapError> {
        self.write(format!("del range {} {}/{}", r.0, r.1, r.2), "ranges")?;
        self.source_ranges.remove(&r);
        Ok(())
    }
}

/// The pinned kernel maps, opened by the loader.
pub struct AyaMaps {
    /// Backend map.
    pub backends: aya::maps::HashMap<aya::maps::MapData, u32, BackendValue>,
    /// Service map.
    pub services: aya::maps::HashMap<aya::maps::MapData, ServiceKey, ServiceValue>,
    /// Affinity membership map.
    pub affinity_match: aya::maps::HashMap<aya::maps::MapData, AffinityMatchKey, u32>,
    /// `loadBalancerSourceRanges` trie.
    pub source_ranges: aya::maps::lpm_trie::LpmTrie<aya::maps::MapData, SourceRangeKey, u32>,
}

fn range_key(r: SourceRange) -> aya::maps::lpm_trie::Key<SourceRangeKey> {
    aya::maps::lpm_trie::Key::new(
        32 + r.2 as u32,
        SourceRangeKey {
            service_id_be: r.0.to_be(),
            addr_be: u32::from(r.1).to_be(),
        },
    )
}

fn kerr(op: &'static str, map: &'static str, e: aya::maps::MapError) -> MapError {
    MapError {
        op,
        map,
        detail: e.to_string(),
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

impl LbMaps for AyaMaps {
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapError> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| kerr("iterate", proxy_common::MAP_BACKENDS, e))
    }
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| kerr("iterate", proxy_common::MAP_SERVICES, e))
    }
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError> {
        self.affinity_match
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| kerr("iterate", proxy_common::MAP_AFFINITY_MATCH, e))
    }
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        self.backends
            .insert(id, value, 0)
            .map_err(|e| kerr("insert", proxy_common::MAP_BACKENDS, e))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        ignore_missing(self.backends.remove(&id))
            .map_err(|e| kerr("remove", proxy_common::MAP_BACKENDS, e))
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| kerr("insert", proxy_common::MAP_SERVICES, e))
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        ignore_missing(self.services.remove(key))
            .map_err(|e| kerr("remove", proxy_common::MAP_SERVICES, e))
    }
    fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), MapError> {
        self.affinity_match
            .insert(key, 1, 0)
            .map_err(|e| kerr("insert", proxy_common::MAP_AFFINITY_MATCH, e))
    }
    fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), MapError> {
        ignore_missing(self.affinity_match.remove(key))
            .map_err(|e| kerr("remove", proxy_common::MAP_AFFINITY_MATCH, e))
    }
    fn source_ranges(&self) -> Result<Vec<SourceRange>, MapError> {
        self.source_ranges
            .keys()
            .map(|k| {
                k.map(|k| {
                    let d = k.data();
                    (
                        u32::from_be(d.service_id_be),
                        Ipv4Addr::from(u32::from_be(d.addr_be)),
                        k.prefix_len().saturating_sub(32) as u8,
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| kerr("iterate", proxy_common::MAP_SRC_RANGES, e))
    }
    fn put_source_range(&mut self, r: SourceRange) -> Result<(), MapError> {
        self.source_ranges
            .insert(&range_key(r), 1, 0)
            .map_err(|e| kerr("insert", proxy_common::MAP_SRC_RANGES, e))
    }
    fn del_source_range(&mut self, r: SourceRange) -> Result<(), MapError> {
        ignore_missing(self.source_ranges.remove(&range_key(r)))
            .map_err(|e| kerr("remove", proxy_common::MAP_SRC_RANGES, e))
    }
}

fn proto_text(p: u8) -> String {
    match p {
        proxy_common::PROTO_TCP => "TCP".into(),
        proxy_common::PROTO_UDP => "UDP".into(),
        n => format!("proto{n}"),
    }
}

fn frontend_text(k: &ServiceKey) -> String {
    format!(
        "{}:{}/{}{}",
        Ipv4Addr::from(u32::from_be(k.addr_be)),
        u16::from_be(k.port_be),
        proto_text(k.proto),
        if k.scope == proxy_common::SCOPE_EXTERNAL_LOCAL {
            " (external, Local)"
        } else {
            ""
        }
    )
}

/// Renders the maps as sorted, stable text (one line per entry) for tests and `proxy-agent dump`.
pub fn dump(maps: &impl LbMaps) -> Result<String, MapError> {
    let mut out = String::new();
    let backends: BTreeMap<u32, BackendValue> = maps.backends()?.into_iter().collect();
    let mut services = maps.services()?;
    services.sort_by_key(|(k, _)| {
        (
            u32::from_be(k.addr_be),
            u16::from_be(k.port_be),
            k.proto,
            k.slot,
        )
    });
    for (k, v) in &services {
        if k.slot == 0 {
            let _ = writeln!(
                out,
                "SVC {} id={} count={} terminating={} flags={:#x} affinity={}s",
                frontend_text(k),
                v.service_id,
                v.count,
                v.terminating_count,
                v.flags,
                v.affinity_timeout_s
            );
        } else {
            let b = backends.get(&v.backend_id);
            let target = b.map_or("MISSING".to_string(), |b| {
                format!(
                    "{}:{} {}",
                    Ipv4Addr::from(u32::from_be(b.addr_be)),
                    u16::from_be(b.port_be),
                    if b.state == proxy_common::BACKEND_TERMINATING {
                        "terminating"
                    } else {
                        "active"
                    }
                )
            });
            let _ = writeln!(
                out,
                "  slot {} -> backend {} {}",
                k.slot, v.backend_id, target
            );
        }
    }
    let mut matches = maps.affinity_matches()?;
    matches.sort();
    for m in matches {
        let _ = writeln!(
            out,
            "AFFINITY service={} backend={}",
            m.service_id, m.backend_id
        );
    }
    let _ = writeln!(out, "BACKENDS {}", backends.len());
    Ok(out)
}

/// The maps as JSON for `proxy-agent dump -o json`: one object per frontend with its slots and
/// backends, named after its Service when `services` (the admin API's `/services`) is given.
pub fn dump_json(
    maps: &impl LbMaps,
    services: Option<&serde_json::Value>,
) -> Result<serde_json::Value, MapError> {
    use serde_json::json;
    let backends: BTreeMap<u32, BackendValue> = maps.backends()?.into_iter().collect();
    let mut entries = maps.services()?;
    entries.sort_by_key(|(k, _)| {
        (
            u32::from_be(k.addr_be),
            u16::from_be(k.port_be),
            k.proto,
            k.slot,
        )
    });
    let name_of = |k: &ServiceKey| -> Option<String> {
        let ip = Ipv4Addr::from(u32::from_be(k.addr_be)).to_string();
        let port = u16::from_be(k.port_be);
        services?.as_array()?.iter().find_map(|s| {
            if s["cluster_ip"] == ip.as_str()
                && s["port"] == port
                && s["protocol"] == proto_text(k.proto).as_str()
            {
                Some(format!(
                    "{}/{}",
                    s["namespace"].as_str()?,
                    s["name"].as_str()?
                ))
            } else {
                None
            }
        })
    };
    let mut out: Vec<serde_json::Value> = Vec::new();
    for (k, v) in &entries {
        if k.slot == 0 {
            out.push(json!({
                "frontend": frontend_text(k),
                "service": name_of(k),
                "service_id": v.service_id,
                "count": v.count,
                "terminating_count": v.terminating_count,
                "flags": v.flags,
                "affinity_timeout_s": v.affinity_timeout_s,
                "slots": [],
            }));
        } else if let Some(last) = out.last_mut()
            && last["frontend"] == frontend_text(k).as_str()
        {
            let b = backends.get(&v.backend_id);
            if let Some(slots) = last["slots"].as_array_mut() {
                slots.push(json!({
                    "slot": k.slot,
                    "backend_id": v.backend_id,
                    "backend": b.map(|b| format!("{}:{}", Ipv4Addr::from(u32::from_be(b.addr_be)), u16::from_be(b.port_be))),
                    "state": b.map(|b| if b.state == proxy_common::BACKEND_TERMINATING { "terminating" } else { "active" }),
                }));
            }
        }
    }
    Ok(json!({"frontends": out, "backends": backends.len()}))
}
