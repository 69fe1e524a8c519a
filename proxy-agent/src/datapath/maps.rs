//! Access to the datapath maps behind a trait, so the reconciler is tested without a kernel.
//!
//! [`AyaMaps`] talks to the pinned kernel maps; [`MemMaps`] is an in-memory double that can also
//! inject failures. [`dump`] renders any implementation as stable golden text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_common::{
    AffinityMatchKey, BackendValue, BackendValue6, ServiceKey, ServiceKey6, ServiceValue,
    SourceRangeKey,
};

/// A service map key in either family: the kernel keeps one service map per family
/// ([`ServiceKey`] in `PXA_SVC_V1`, [`ServiceKey6`] in `PXA_SVC6_V1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    /// The frontend address (0.0.0.0 for a NodePort).
    pub addr: IpAddr,
    /// The frontend port.
    pub port: u16,
    /// Protocol number.
    pub proto: u8,
    /// `ServiceKey::scope`.
    pub scope: u8,
    /// 0 for the master entry, 1..=n for backend slots.
    pub slot: u16,
}

impl SvcKey {
    /// The key of `slot` of the frontend (addr, port, proto, scope).
    pub fn new(addr: IpAddr, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            proto,
            scope,
            slot,
        }
    }

    fn v4(a: Ipv4Addr, k: &Self) -> ServiceKey {
        ServiceKey::new(u32::from(a), k.port, k.proto, k.slot).in_scope(k.scope)
    }

    fn v6(a: Ipv6Addr, k: &Self) -> ServiceKey6 {
        ServiceKey6 {
            addr_be: words(a),
            port_be: k.port.to_be(),
            proto: k.proto,
            scope: k.scope,
            slot: k.slot,
            _pad1: 0,
        }
    }

    fn from_v4(k: &ServiceKey) -> Self {
        Self::new(
            Ipv4Addr::from(u32::from_be(k.addr_be)).into(),
            u16::from_be(k.port_be),
            k.proto,
            k.scope,
            k.slot,
        )
    }

    fn from_v6(k: &ServiceKey6) -> Self {
        Self::new(
            from_words(k.addr_be).into(),
            u16::from_be(k.port_be),
            k.proto,
            k.scope,
            k.slot,
        )
    }
}

/// A backend map entry in either family ([`BackendValue`] or [`BackendValue6`]; one id space).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendEntry {
    /// Pod address.
    pub addr: IpAddr,
    /// Target port.
    pub port: u16,
    /// Protocol number.
    pub proto: u8,
    /// `BACKEND_ACTIVE` or `BACKEND_TERMINATING`.
    pub state: u8,
}

impl BackendEntry {
    fn from_v4(v: &BackendValue) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from_be(v.addr_be)).into(),
            port: u16::from_be(v.port_be),
            proto: v.proto,
            state: v.state,
        }
    }

    fn from_v6(v: &BackendValue6) -> Self {
        Self {
            addr: from_words(v.addr_be).into(),
            port: u16::from_be(v.port_be),
            proto: v.proto,
            state: v.state,
        }
    }

    /// `ip:port` (`[ip]:port` for IPv6).
    pub fn endpoint(&self) -> String {
        std::net::SocketAddr::new(self.addr, self.port).to_string()
    }

    /// `active` or `terminating`.
    pub fn state_text(&self) -> &'static str {
        if self.state == proxy_common::BACKEND_TERMINATING {
            "terminating"
        } else {
            "active"
        }
    }
}

/// An IPv6 address as the kernel maps hold it: four words in network byte order.
pub fn words(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The inverse of [`words`].
pub fn from_words(w: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, x) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&x.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

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
    fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, MapError>;
    /// All service entries (master and slots).
    fn services(&self) -> Result<Vec<(SvcKey, ServiceValue)>, MapError>;
    /// All affinity membership entries.
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError>;
    /// Inserts or replaces a backend.
    fn put_backend(&mut self, id: u32, value: &BackendEntry) -> Result<(), MapError>;
    /// Removes a backend of the address family of `addr` (absent is fine).
    fn del_backend(&mut self, id: u32, addr: IpAddr) -> Result<(), MapError>;
    /// Inserts or replaces a service entry.
    fn put_service(&mut self, key: &SvcKey, value: &ServiceValue) -> Result<(), MapError>;
    /// Removes a service entry (absent is fine).
    fn del_service(&mut self, key: &SvcKey) -> Result<(), MapError>;
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
    pub backends: BTreeMap<u32, BackendEntry>,
    /// Service map.
    pub services: BTreeMap<SvcKey, ServiceValue>,
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
    fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, MapError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn services(&self) -> Result<Vec<(SvcKey, ServiceValue)>, MapError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError> {
        Ok(self.affinity_match.keys().copied().collect())
    }
    fn put_backend(&mut self, id: u32, value: &BackendEntry) -> Result<(), MapError> {
        self.write(format!("put backend {id}"), "backends")?;
        self.backends.insert(id, *value);
        Ok(())
    }
    fn del_backend(&mut self, id: u32, _addr: IpAddr) -> Result<(), MapError> {
        self.write(format!("del backend {id}"), "backends")?;
        self.backends.remove(&id);
        Ok(())
    }
    fn put_service(&mut self, key: &SvcKey, value: &ServiceValue) -> Result<(), MapError> {
        self.write(
            format!("put {} slot {}", frontend_text(key), key.slot),
            "services",
        )?;
        self.services.insert(*key, *value);
        Ok(())
    }
    fn del_service(&mut self, key: &SvcKey) -> Result<(), MapError> {
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
    /// Backend map (IPv4).
    pub backends: aya::maps::HashMap<aya::maps::MapData, u32, BackendValue>,
    /// Service map (IPv4).
    pub services: aya::maps::HashMap<aya::maps::MapData, ServiceKey, ServiceValue>,
    /// Backend map (IPv6).
    pub backends6: aya::maps::HashMap<aya::maps::MapData, u32, BackendValue6>,
    /// Service map (IPv6).
    pub services6: aya::maps::HashMap<aya::maps::MapData, ServiceKey6, ServiceValue>,
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

impl AyaMaps {
    /// One service map entry.
    pub fn service(&self, key: &SvcKey) -> Option<ServiceValue> {
        match key.addr {
            IpAddr::V4(a) => self.services.get(&SvcKey::v4(a, key), 0).ok(),
            IpAddr::V6(a) => self.services6.get(&SvcKey::v6(a, key), 0).ok(),
        }
    }

    /// One backend of the family of `family_of`.
    pub fn backend(&self, id: u32, family_of: IpAddr) -> Option<BackendEntry> {
        match family_of {
            IpAddr::V4(_) => self
                .backends
                .get(&id, 0)
                .ok()
                .map(|v| BackendEntry::from_v4(&v)),
            IpAddr::V6(_) => self
                .backends6
                .get(&id, 0)
                .ok()
                .map(|v| BackendEntry::from_v6(&v)),
        }
    }
}

impl LbMaps for AyaMaps {
    fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, MapError> {
        let mut out: Vec<(u32, BackendEntry)> = Vec::new();
        for e in self.backends.iter() {
            let (id, v) = e.map_err(|e| kerr("iterate", proxy_common::MAP_BACKENDS, e))?;
            out.push((id, BackendEntry::from_v4(&v)));
        }
        for e in self.backends6.iter() {
            let (id, v) = e.map_err(|e| kerr("iterate", proxy_common::MAP_BACKENDS6, e))?;
            out.push((id, BackendEntry::from_v6(&v)));
        }
        Ok(out)
    }
    fn services(&self) -> Result<Vec<(SvcKey, ServiceValue)>, MapError> {
        let mut out: Vec<(SvcKey, ServiceValue)> = Vec::new();
        for e in self.services.iter() {
            let (k, v) = e.map_err(|e| kerr("iterate", proxy_common::MAP_SERVICES, e))?;
            out.push((SvcKey::from_v4(&k), v));
        }
        for e in self.services6.iter() {
            let (k, v) = e.map_err(|e| kerr("iterate", proxy_common::MAP_SERVICES6, e))?;
            out.push((SvcKey::from_v6(&k), v));
        }
        Ok(out)
    }
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError> {
        self.affinity_match
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| kerr("iterate", proxy_common::MAP_AFFINITY_MATCH, e))
    }
    fn put_backend(&mut self, id: u32, b: &BackendEntry) -> Result<(), MapError> {
        match b.addr {
            IpAddr::V4(a) => {
                let v = BackendValue {
                    addr_be: u32::from(a).to_be(),
                    port_be: b.port.to_be(),
                    proto: b.proto,
                    state: b.state,
                };
                self.backends
                    .insert(id, v, 0)
                    .map_err(|e| kerr("insert", proxy_common::MAP_BACKENDS, e))
            }
            IpAddr::V6(a) => {
                let v = BackendValue6 {
                    addr_be: words(a),
                    port_be: b.port.to_be(),
                    proto: b.proto,
                    state: b.state,
                };
                self.backends6
                    .insert(id, v, 0)
                    .map_err(|e| kerr("insert", proxy_common::MAP_BACKENDS6, e))
            }
        }
    }
    fn del_backend(&mut self, id: u32, addr: IpAddr) -> Result<(), MapError> {
        match addr {
            IpAddr::V4(_) => ignore_missing(self.backends.remove(&id))
                .map_err(|e| kerr("remove", proxy_common::MAP_BACKENDS, e)),
            IpAddr::V6(_) => ignore_missing(self.backends6.remove(&id))
                .map_err(|e| kerr("remove", proxy_common::MAP_BACKENDS6, e)),
        }
    }
    fn put_service(&mut self, key: &SvcKey, value: &ServiceValue) -> Result<(), MapError> {
        match key.addr {
            IpAddr::V4(a) => self
                .services
                .insert(SvcKey::v4(a, key), value, 0)
                .map_err(|e| kerr("insert", proxy_common::MAP_SERVICES, e)),
            IpAddr::V6(a) => self
                .services6
                .insert(SvcKey::v6(a, key), value, 0)
                .map_err(|e| kerr("insert", proxy_common::MAP_SERVICES6, e)),
        }
    }
    fn del_service(&mut self, key: &SvcKey) -> Result<(), MapError> {
        match key.addr {
            IpAddr::V4(a) => ignore_missing(self.services.remove(&SvcKey::v4(a, key)))
                .map_err(|e| kerr("remove", proxy_common::MAP_SERVICES, e)),
            IpAddr::V6(a) => ignore_missing(self.services6.remove(&SvcKey::v6(a, key)))
                .map_err(|e| kerr("remove", proxy_common::MAP_SERVICES6, e)),
        }
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

fn frontend_text(k: &SvcKey) -> String {
    format!(
        "{}/{}{}",
        std::net::SocketAddr::new(k.addr, k.port),
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
    let backends: BTreeMap<u32, BackendEntry> = maps.backends()?.into_iter().collect();
    let mut services = maps.services()?;
    services.sort_by_key(|(k, _)| *k);
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
                format!("{} {}", b.endpoint(), b.state_text())
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
    let backends: BTreeMap<u32, BackendEntry> = maps.backends()?.into_iter().collect();
    let mut entries = maps.services()?;
    entries.sort_by_key(|(k, _)| *k);
    let name_of = |k: &SvcKey| -> Option<String> {
        let ip = k.addr.to_string();
        let port = k.port;
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
                    "backend": b.map(|b| b.endpoint()),
                    "state": b.map(|b| b.state_text()),
                }));
            }
        }
    }
    Ok(json!({"frontends": out, "backends": backends.len()}))
}
