//! Turns desired [`Frontend`]s into map writes, in an order that keeps every intermediate state
//! valid for the datapath.
//!
//! Order (Cilium's lesson): backends first, then the slots of a service, then its master entry
//! (slot 0) that makes the new count visible; shrinking and removal go the other way (master
//! first, then slots, then backends nobody references). The in-memory view is updated only after
//! each write succeeded, so a failed apply is simply retried by the next one.
//!
//! On start the reconciler is rebuilt from the pinned maps ([`Reconciler::restore`]): backend and
//! service ids are kept, so applying an unchanged state after an agent restart writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use proxy_common::{
    AffinityMatchKey, BACKEND_ACTIVE, BACKEND_TERMINATING, SVC_F_AFFINITY, SVC_F_EXT_LOCAL,
    SVC_F_EXTERNAL, SVC_F_L7, SVC_F_SRC_RANGES, ServiceValue,
};
use tracing::warn;

use super::maps::{BackendEntry, LbMaps, MapError, SourceRange, SvcKey};
use crate::model::Frontend;

/// (address, port, protocol number, scope) — see `ServiceKey::scope`.
type FrontendKey = (IpAddr, u16, u8, u8);

/// The map key of a frontend.
fn key_of(f: &Frontend) -> FrontendKey {
    (f.vip, f.port, f.protocol.number(), f.map_scope())
}
/// (pod address, port, protocol number).
type BackendAddr = (IpAddr, u16, u8);

#[derive(Debug, Clone, Default)]
struct Applied {
    master: Option<ServiceValue>,
    /// Backend id per slot (index 0 = slot 1), as written to the map.
    slots: Vec<u32>,
    /// Slots present in the map beyond `slots` (left by an interrupted write), to delete.
    extra_slots: BTreeSet<u16>,
    /// Affinity membership entries written.
    members: BTreeSet<u32>,
    /// Source-range prefixes written.
    ranges: BTreeSet<(Ipv4Addr, u8)>,
    /// The frontend as last applied completely; an equal one is skipped.
    last: Option<Frontend>,
}

/// What one [`Reconciler::apply`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    /// Frontends now programmed.
    pub frontends: usize,
    /// Backends now programmed.
    pub backends: usize,
    /// Map writes (inserts and removals) performed.
    pub writes: usize,
}

/// Keeps the datapath maps equal to the desired frontends.
pub struct Reconciler<M: LbMaps> {
    maps: M,
    backends: HashMap<BackendAddr, (u32, BackendEntry)>,
    next_backend_id: u32,
    frontends: BTreeMap<FrontendKey, Applied>,
    service_ids: HashMap<FrontendKey, u32>,
    next_service_id: u32,
    /// Entries found at restore that belong to no frontend (interrupted create or delete).
    orphan_slots: Vec<SvcKey>,
    orphan_members: Vec<AffinityMatchKey>,
    orphan_ranges: Vec<SourceRange>,
    writes: usize,
    /// How many slots reference each backend id.
    refs: HashMap<u32, u32>,
    /// Backend ids whose reference count dropped to zero (or that were created), to collect.
    freed: Vec<u32>,
    /// Address of each backend id.
    addr_of: HashMap<u32, BackendAddr>,
    /// Backend addresses deleted from the map since the last [`Reconciler::take_removed`].
    removed: Vec<BackendAddr>,
    /// Whether the kernel backend map still has to be scanned for entries of no address we
    /// know (duplicates left by an interrupted write before a restart). Done once.
    scan_orphan_backends: bool,
}

fn flag(on: bool, f: u16) -> u16 {
    if on { f } else { 0 }
}

fn inc(refs: &mut HashMap<u32, u32>, id: u32) {
    if id != 0 {
        *refs.entry(id).or_default() += 1;
    }
}

fn dec(refs: &mut HashMap<u32, u32>, freed: &mut Vec<u32>, id: u32) {
    if let Some(n) = refs.get_mut(&id) {
        *n -= 1;
        if *n == 0 {
            refs.remove(&id);
            freed.push(id);
        }
    }
}

fn fkey(k: &SvcKey) -> FrontendKey {
    (k.addr, k.port, k.proto, k.scope)
}

fn skey(k: FrontendKey, slot: u16) -> SvcKey {
    SvcKey::new(k.0, k.1, k.2, k.3, slot)
}

impl<M: LbMaps> Reconciler<M> {
    /// Rebuilds the reconciler's view from what is already in the maps (pinned state of an
    /// earlier agent), keeping every backend and service id.
    pub fn restore(maps: M) -> Result<Self, MapError> {
        let mut r = Self {
            backends: HashMap::new(),
            next_backend_id: 1,
            frontends: BTreeMap::new(),
            service_ids: HashMap::new(),
            next_service_id: 1,
            orphan_slots: Vec::new(),
            orphan_members: Vec::new(),
            orphan_ranges: Vec::new(),
            writes: 0,
            scan_orphan_backends: true,
            refs: HashMap::new(),
            freed: Vec::new(),
            addr_of: HashMap::new(),
            removed: Vec::new(),
            maps,
        };
        for (id, v) in r.maps.backends()? {
            let addr = (v.addr, v.port, v.proto);
            r.next_backend_id = r.next_backend_id.max(id.wrapping_add(1));
            // A duplicate (same address twice) is left unreferenced and collected by apply.
            r.backends.entry(addr).or_insert((id, v));
        }
        let services = r.maps.services()?;
        let masters: HashMap<FrontendKey, ServiceValue> = services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| (fkey(k), *v))
            .collect();
        let mut slots: BTreeMap<FrontendKey, BTreeMap<u16, u32>> = BTreeMap::new();
        for (k, v) in &services {
            if k.slot == 0 {
                continue;
            }
            if masters.contains_key(&fkey(k)) {
                slots
                    .entry(fkey(k))
                    .or_default()
                    .insert(k.slot, v.backend_id);
            } else {
                r.orphan_slots.push(*k);
            }
        }
        let mut by_service_id = HashMap::new();
        for (key, master) in masters {
            let n = (master.count + master.terminating_count) as usize;
            let present = slots.remove(&key).unwrap_or_default();
            let mut applied = Applied {
                master: Some(master),
                ..Default::default()
            };
            for slot in 1..=n as u16 {
                // A missing slot is recorded as id 0, which no backend has: apply rewrites it.
                applied.slots.push(present.get(&slot).copied().unwrap_or(0));
            }
            applied.extra_slots = present
                .keys()
                .copied()
                .filter(|&s| s as usize > n)
                .collect();
            r.next_service_id = r.next_service_id.max(master.service_id.wrapping_add(1));
            r.service_ids.insert(key, master.service_id);
            by_service_id.insert(master.service_id, key);
            r.frontends.insert(key, applied);
        }
        for a in r.frontends.values() {
            for &id in &a.slots {
                if id != 0 {
                    *r.refs.entry(id).or_default() += 1;
                }
            }
        }
        for (addr, (id, _)) in &r.backends {
            r.addr_of.insert(*id, *addr);
            if !r.refs.contains_key(id) {
                r.freed.push(*id);
            }
        }
        for m in r.maps.affinity_matches()? {
            match by_service_id
                .get(&m.service_id)
                .and_then(|k| r.frontends.get_mut(k))
            {
                Some(a) => {
                    a.members.insert(m.backend_id);
                }
                None => r.orphan_members.push(m),
            }
        }
        for range in r.maps.source_ranges()? {
            match by_service_id
                .get(&range.0)
                .and_then(|k| r.frontends.get_mut(k))
            {
                Some(a) => {
                    a.ranges.insert((range.1, range.2));
                }
                None => r.orphan_ranges.push(range),
            }
        }
        Ok(r)
    }

    /// The maps, for dumps.
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The backends (pod address, port, protocol number) deleted from the maps since the last
    /// call: no service balances to them any more.
    pub fn take_removed(&mut self) -> Vec<(IpAddr, u16, u8)> {
        std::mem::take(&mut self.removed)
    }

    /// Number of frontends programmed.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// Makes the maps equal to `desired`.
    pub fn apply<F: std::borrow::Borrow<Frontend>>(
        &mut self,
        desired: &[F],
    ) -> Result<ApplyStats, MapError> {
        self.writes = 0;
        let wanted: BTreeSet<FrontendKey> = desired.iter().map(|f| key_of(f.borrow())).collect();
        let gone: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            self.remove_frontend(key)?;
        }
        for fe in desired {
            let fe = fe.borrow();
            let key = key_of(fe);
            // Unchanged since the last complete apply: nothing to compare or write.
            if self
                .frontends
                .get(&key)
                .is_some_and(|a| a.last.as_ref() == Some(fe) && a.extra_slots.is_empty())
            {
                continue;
            }
            self.upsert(fe)?;
        }
        while let Some(k) = self.orphan_slots.pop() {
            if let Err(e) = self.maps.del_service(&k) {
                self.orphan_slots.push(k);
                return Err(e);
            }
            self.writes += 1;
        }
        while let Some(m) = self.orphan_members.pop() {
            if let Err(e) = self.maps.del_affinity_match(&m) {
                self.orphan_members.push(m);
                return Err(e);
            }
            self.writes += 1;
        }
        while let Some(m) = self.orphan_ranges.pop() {
            if let Err(e) = self.maps.del_source_range(m) {
                self.orphan_ranges.push(m);
                return Err(e);
            }
            self.writes += 1;
        }
        self.collect_backends()?;
        Ok(ApplyStats {
            frontends: self.frontends.len(),
            backends: self.backends.len(),
            writes: self.writes,
        })
    }

    fn service_id(&mut self, key: FrontendKey) -> u32 {
        if let Some(id) = self.service_ids.get(&key) {
            return *id;
        }
        let id = self.next_service_id;
        self.next_service_id = self.next_service_id.wrapping_add(1).max(1);
        self.service_ids.insert(key, id);
        id
    }

    fn backend_id(&mut self, addr: BackendAddr, terminating: bool) -> Result<u32, MapError> {
        let value = BackendEntry {
            addr: addr.0,
            port: addr.1,
            proto: addr.2,
            state: if terminating {
                BACKEND_TERMINATING
            } else {
                BACKEND_ACTIVE
            },
        };
        let id = match self.backends.get(&addr) {
            Some((id, v)) if *v == value => return Ok(*id),
            Some((id, _)) => *id,
            None => self.next_backend_id,
        };
        self.maps.put_backend(id, &value)?;
        if id == self.next_backend_id {
            self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
            // Collected again if no slot ends up referencing it (e.g. a failed apply).
            self.freed.push(id);
        }
        self.addr_of.insert(id, addr);
        self.writes += 1;
        self.backends.insert(addr, (id, value));
        Ok(id)
    }

    fn upsert(&mut self, fe: &Frontend) -> Result<(), MapError> {
        let proto = fe.protocol.number();
        let key = key_of(fe);
        if fe.backends.len() > u16::MAX as usize - 1 {
            return Err(MapError {
                op: "insert",
                map: proxy_common::MAP_SERVICES,
                detail: format!(
                    "{}:{} has {} backends; at most 65534 are supported",
                    fe.vip,
                    fe.port,
                    fe.backends.len()
                ),
            });
        }
        // 1. Backends.
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            ids.push(self.backend_id((b.addr, b.port, proto), b.terminating)?);
        }
        let service_id = self.service_id(key);
        let active = fe.backends.iter().filter(|b| !b.terminating).count() as u16;
        let master = ServiceValue {
            backend_id: 0,
            service_id,
            affinity_timeout_s: fe.affinity_timeout_s.unwrap_or(0),
            count: active,
            terminating_count: ids.len() as u16 - active,
            flags: flag(fe.affinity_timeout_s.is_some(), SVC_F_AFFINITY)
                | flag(fe.l7, SVC_F_L7)
                | flag(fe.scope.is_external() && !fe.socket_only, SVC_F_EXTERNAL)
                | flag(fe.external_local, SVC_F_EXT_LOCAL)
                | flag(!fe.source_ranges.is_empty(), SVC_F_SRC_RANGES),
            _pad: 0,
        };
        let applied = self.frontends.entry(key).or_default();
        applied.last = None;
        // 2. Slots.
        for (i, &id) in ids.iter().enumerate() {
            if applied.slots.get(i) == Some(&id) {
                continue;
            }
            let v = ServiceValue {
                backend_id: id,
                service_id,
                ..Default::default()
            };
            self.maps.put_service(&skey(key, i as u16 + 1), &v)?;
            self.writes += 1;
            inc(&mut self.refs, id);
            if i < applied.slots.len() {
                let old = std::mem::replace(&mut applied.slots[i], id);
                dec(&mut self.refs, &mut self.freed, old);
            } else {
                applied.slots.push(id);
            }
        }
        // 3. Affinity membership before the master makes the backends selectable.
        if fe.affinity_timeout_s.is_some() {
            for &id in &ids {
                if applied.members.insert(id) {
                    if let Err(e) = self.maps.put_affinity_match(&AffinityMatchKey {
                        service_id,
                        backend_id: id,
                    }) {
                        applied.members.remove(&id);
                        return Err(e);
                    }
                    self.writes += 1;
                }
            }
        }
        // 3b. Source ranges before the master turns their check on.
        for &(addr, len) in &fe.source_ranges {
            if !applied.ranges.contains(&(addr, len)) {
                self.maps.put_source_range((service_id, addr, len))?;
                self.writes += 1;
                applied.ranges.insert((addr, len));
            }
        }
        // 4. The master entry.
        if applied.master != Some(master) {
            self.maps.put_service(&skey(key, 0), &master)?;
            self.writes += 1;
            applied.master = Some(master);
        }
        // 5. Shrink: slots past the new count, then memberships no longer valid.
        while applied.slots.len() > ids.len() {
            let slot = applied.slots.len() as u16;
            self.maps.del_service(&skey(key, slot))?;
            self.writes += 1;
            if let Some(old) = applied.slots.pop() {
                dec(&mut self.refs, &mut self.freed, old);
            }
        }
        while let Some(slot) = applied.extra_slots.pop_last() {
            if let Err(e) = self.maps.del_service(&skey(key, slot)) {
                applied.extra_slots.insert(slot);
                return Err(e);
            }
            self.writes += 1;
        }
        let keep: BTreeSet<u32> = if fe.affinity_timeout_s.is_some() {
            ids.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        let stale: Vec<u32> = applied.members.difference(&keep).copied().collect();
        for id in stale {
            self.maps.del_affinity_match(&AffinityMatchKey {
                service_id,
                backend_id: id,
            })?;
            self.writes += 1;
            applied.members.remove(&id);
        }
        let keep: BTreeSet<(Ipv4Addr, u8)> = fe.source_ranges.iter().copied().collect();
        let stale: Vec<(Ipv4Addr, u8)> = applied.ranges.difference(&keep).copied().collect();
        for (addr, len) in stale {
            self.maps.del_source_range((service_id, addr, len))?;
            self.writes += 1;
            applied.ranges.remove(&(addr, len));
        }
        applied.last = Some(fe.clone());
        Ok(())
    }

    fn remove_frontend(&mut self, key: FrontendKey) -> Result<(), MapError> {
        let Some(applied) = self.frontends.get_mut(&key) else {
            return Ok(());
        };
        let service_id = applied
            .master
            .map(|m| m.service_id)
            .or(self.service_ids.get(&key).copied());
        if applied.master.is_some() {
            self.maps.del_service(&skey(key, 0))?;
            self.writes += 1;
            applied.master = None;
        }
        while let Some(_id) = applied.slots.last() {
            self.maps
                .del_service(&skey(key, applied.slots.len() as u16))?;
            self.writes += 1;
            if let Some(old) = applied.slots.pop() {
                dec(&mut self.refs, &mut self.freed, old);
            }
        }
        while let Some(slot) = applied.extra_slots.pop_last() {
            if let Err(e) = self.maps.del_service(&skey(key, slot)) {
                applied.extra_slots.insert(slot);
                return Err(e);
            }
            self.writes += 1;
        }
        if let Some(service_id) = service_id {
            while let Some(id) = applied.members.pop_last() {
                if let Err(e) = self.maps.del_affinity_match(&AffinityMatchKey {
                    service_id,
                    backend_id: id,
                }) {
                    applied.members.insert(id);
                    return Err(e);
                }
                self.writes += 1;
            }
            while let Some((addr, len)) = applied.ranges.pop_last() {
                if let Err(e) = self.maps.del_source_range((service_id, addr, len)) {
                    applied.ranges.insert((addr, len));
                    return Err(e);
                }
                self.writes += 1;
            }
        }
        self.frontends.remove(&key);
        self.service_ids.remove(&key);
        Ok(())
    }

    /// Removes backends no slot references any more.
    fn collect_backends(&mut self) -> Result<(), MapError> {
        let mut freed = std::mem::take(&mut self.freed);
        freed.sort_unstable();
        freed.dedup();
        while let Some(id) = freed.pop() {
            if self.refs.contains_key(&id) {
                continue; // referenced again
            }
            let Some(addr) = self.addr_of.get(&id).copied() else {
                continue;
            };
            if let Err(e) = self.maps.del_backend(id, addr.0) {
                freed.push(id);
                self.freed.extend(freed);
                return Err(e);
            }
            self.writes += 1;
            self.addr_of.remove(&id);
            self.backends.remove(&addr);
            self.removed.push(addr);
        }
        // Duplicates of an address seen at restore are not in `self.backends`; find them once
        // (a full scan of the kernel map costs two syscalls per entry).
        if !self.scan_orphan_backends {
            return Ok(());
        }
        let known: BTreeSet<u32> = self.backends.values().map(|(id, _)| *id).collect();
        for (id, b) in self.maps.backends()? {
            if !known.contains(&id) {
                warn!(
                    backend_id = id,
                    "removing a backend entry no service references"
                );
                self.maps.del_backend(id, b.addr)?;
                self.writes += 1;
            }
        }
        self.scan_orphan_backends = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::maps::{MemMaps, dump};
    use crate::model::{Backend, ObjectRef, Protocol};

    fn fe(vip: u8, port: u16, backends: &[(u8, bool)]) -> Frontend {
        Frontend {
            service: ObjectRef::new("default", format!("svc{vip}")),
            port_name: String::new(),
            vip: Ipv4Addr::new(198, 19, 0, vip).into(),
            port,
            protocol: Protocol::Tcp,
            affinity_timeout_s: None,
            l7: false,
            h2: false,
            detection: Default::default(),
            backends: backends
                .iter()
                .map(|&(last, terminating)| Backend {
                    addr: Ipv4Addr::new(198, 18, 0, last).into(),
                    port: 8080,
                    terminating,
                })
                .collect(),
            scope: Default::default(),
            external_local: false,
            socket_only: false,
            source_ranges: Vec::new(),
        }
    }

    /// `fe` with IPv6 addresses: VIP `2001:2:0:ff::<vip>`, backends `2001:2::<last>`.
    fn fe6(vip: u8, port: u16, backends: &[(u8, bool)]) -> Frontend {
        let mut f = fe(vip, port, backends);
        f.vip = format!("2001:2:0:ff::{vip:x}").parse().unwrap();
        for b in &mut f.backends {
            let IpAddr::V4(a) = b.addr else { continue };
            b.addr = format!("2001:2::{:x}", a.octets()[3]).parse().unwrap();
        }
        f
    }

    #[test]
    fn ipv6_frontends_share_the_id_spaces_and_survive_a_restore() {
        let desired = [
            fe(10, 80, &[(2, false)]),
            fe6(10, 80, &[(2, false), (3, true)]),
        ];
        let mut r = Reconciler::restore(MemMaps::default()).unwrap();
        r.apply(&desired).unwrap();
        let d = dump(r.maps()).unwrap();
        assert_eq!(
            d,
            "SVC 198.19.0.10:80/TCP id=1 count=1 terminating=0 flags=0x0 affinity=0s\n\
             \x20 slot 1 -> backend 1 198.18.0.2:8080 active\n\
             SVC [2001:2:0:ff::a]:80/TCP id=2 count=1 terminating=1 flags=0x0 affinity=0s\n\
             \x20 slot 1 -> backend 2 [2001:2::2]:8080 active\n\
             \x20 slot 2 -> backend 3 [2001:2::3]:8080 terminating\n\
             BACKENDS 3\n"
        );
        // A restarted agent adopts both families and writes nothing for the same state.
        let mut again = Reconciler::restore(r.maps().clone()).unwrap();
        assert_eq!(again.apply(&desired).unwrap().writes, 0);
        // Removing the IPv6 frontend removes its backends and reports them.
        again.apply(&desired[..1]).unwrap();
        let removed = again.take_removed();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(removed.iter().all(|b| b.0.is_ipv6()), "{removed:?}");
        assert_eq!(again.maps().backends.len(), 1);
    }

    #[test]
    fn source_ranges_are_written_before_the_master_and_follow_it() {
        let mut r = Reconciler::restore(MemMaps::default()).unwrap();
        let mut f = fe(10, 80, &[(2, false)]);
        f.scope = crate::model::Scope::LoadBalancer;
        f.source_ranges = vec![(Ipv4Addr::new(198, 19, 201, 0), 24)];
        r.apply(&[f.clone()]).unwrap();
        let j = &r.maps().journal;
        let range = j.iter().position(|w| w.starts_with("put range")).unwrap();
        let master = j.iter().position(|w| w.ends_with("slot 0")).unwrap();
        assert!(range < master, "{j:?}");
        let m = r.maps().services[&SvcKey::new(Ipv4Addr::new(198, 19, 0, 10).into(), 80, 6, 0, 0)];
        assert_eq!(
            m.flags & (SVC_F_EXTERNAL | SVC_F_SRC_RANGES),
            SVC_F_EXTERNAL | SVC_F_SRC_RANGES
        );
        // A restart reads them back and writes nothing.
        let mut again = Reconciler::restore(r.maps().clone()).unwrap();
        assert_eq!(again.apply(&[f.clone()]).unwrap().writes, 0);
        // Changed ranges: the new one in, the old one out.
        f.source_ranges = vec![(Ipv4Addr::new(198, 19, 202, 0), 24)];
        again.apply(&[f.clone()]).unwrap();
        assert_eq!(again.maps().source_ranges.len(), 1);
        assert!(
            again
                .maps()
                .source_ranges
                .iter()
                .all(|r| r.1 == Ipv4Addr::new(198, 19, 202, 0))
        );
        again.apply::<Frontend>(&[]).unwrap();
        assert!(again.maps().source_ranges.is_empty());
        assert!(again.maps().services.is_empty());
    }

    #[test]
    fn programs_services_in_a_safe_order() {
        let mut r = Reconciler::restore(MemMaps::default()).unwrap();
        let stats = r
            .apply(&[fe(10, 80, &[(2, false), (3, false), (4, true)])])
            .unwrap();
        assert_eq!((stats.frontends, stats.backends), (1, 3));
        assert_eq!(
            dump(r.maps()).unwrap(),
            "SVC 198.19.0.10:80/TCP id=1 count=2 terminating=1 flags=0x0 affinity=0s\n\
             \x20 slot 1 -> backend 1 198.18.0.2:8080 active\n\
             \x20 slot 2 -> backend 2 198.18.0.3:8080 active\n\
             \x20 slot 3 -> backend 3 198.18.0.4:8080 terminating\n\
             BACKENDS 3\n"
        );
        assert_eq!(
            r.maps().journal,
            [
                "put backend 1",
                "put backend 2",
                "put backend 3",
                "put 198.19.0.10:80/TCP slot 1",
                "put 198.19.0.10:80/TCP slot 2",
                "put 198.19.0.10:80/TCP slot 3",
                "put 198.19.0.10:80/TCP slot 0",
            ]
        );
    }

    #[test]
    fn shrinking_writes_the_master_before_deleting_slots_and_backends() {
        let mut r = Reconciler::restore(MemMaps::default()).unwrap();
        r.apply(&[fe(10, 80, &[(2, false), (3, false), (4, false)])])
            .unwrap();
        let mut maps = r.maps().clone();
        maps.journal.clear();
        let mut r = Reconciler::restore(maps).unwrap();
        r.apply(&[fe(10, 80, &[(2, false), (4, false)])]).unwrap();
        assert_eq!(
            r.maps().journal,
            [
                "put 198.19.0.10:80/TCP slot 2",
                "put 198.19.0.10:80/TCP slot 0",
                "del 198.19.0.10:80/TCP slot 3",
                "del backend 2",
            ]
        );
    }

    #[test]
    fn removal_deletes_master_first_and_unused_backends_last() {
        let mut r = Reconciler::restore(MemMaps::default()).unwrap();
        r.apply(&[
            fe(10, 80, &[(2, false)]),
            fe(11, 80, &[(2, false), (3, false)]),
        ])
        .unwrap();
        let n = r.maps().journal.len();
        r.apply(&[fe(11, 80, &[(2, false), (3, false)])]).unwrap();
        assert_eq!(
            r.maps().journal[n..],
            [
                "del 198.19.0.10:80/TCP slot 0",
                "del 198.19.0.10:80/TCP slot 1"
            ]
        );
        // Backend 198.18.0.2 is still used by the other service.
        assert_eq!(r.maps().backends.len(), 2);
        let n = r.maps().journal.len();
        r.apply::<Frontend>(&[]).unwrap();
        let tail = &r.maps().journal[n..];
        assert_eq!(
            tail[..3],
            [
                "del 198.19.0.11:80/TCP slot 0",
                "del 198.19.0.11:80/TCP slot 2",
                "del 198.19.0.11:80/TCP slot 1"
            ]
        );
        let mut rest: Vec<_> = tail[3..].to_vec();
        rest.sort();
        assert_eq!(rest, ["del backend 1", "del backend 2"]);
        assert!(r.maps().services.is_empty() && r.maps().backends.is_empty());
    }

    #[test]
    fn a_change_to_one_service_writes_only_its_entries() {
        let mut all: Vec<Frontend> = (10..60)
            .map(|v| fe(v, 80, &[(2, false), (v, false)]))
            .collect();
        let mut r = Reconciler::restore(MemMaps::default()).unwrap();
        r.apply(&all).unwrap();
        let n = r.maps().journal.len();
        assert_eq!(r.apply(&all).unwrap().writes, 0);
        all[7].backends.pop();
        let stats = r.apply(&all).unwrap();
        assert_eq!(
            r.maps().journal[n..],
            [
                "put 198.19.0.17:80/TCP slot 0",
                "del 198.19.0.17:80/TCP slot 2",
                "del backend 9"
            ]
        );
        assert_eq!(stats.writes, 3);
        // Backend 198.18.0.2 is shared by all services and stays.
        assert!(dump(r.maps()).unwrap().contains("198.18.0.2:8080"));
    }

    #[test]
    fn restore_keeps_ids_and_rewrites_nothing() {
        let desired = [
            fe(10, 80, &[(2, false), (3, false)]),
            fe(12, 53, &[(5, false)]),
        ];
        let mut r = Reconciler::restore(MemMaps::default()).unwrap();
        r.apply(&desired).unwrap();
        let before = dump(r.maps()).unwrap();
        let mut maps = r.maps().clone();
        maps.journal.clear();
        let mut r = Reconciler::restore(maps).unwrap();
        let stats = r.apply(&desired).unwrap();
        assert_eq!(stats.writes, 0, "{:?}", r.maps().journal);
        assert_eq!(dump(r.maps()).unwrap(), before);
        // New ids continue after the restored ones.
        r.apply(&[
            fe(10, 80, &[(2, false), (3, false), (9, false)]),
            fe(12, 53, &[(5, false)]),
            fe(13, 80, &[]),
        ])
        .unwrap();
        let d = dump(r.maps()).unwrap();
        assert!(d.contains("slot 3 -> backend 4 198.18.0.9:8080"), "{d}");
        assert!(d.contains("SVC 198.19.0.13:80/TCP id=3 count=0"), "{d}");
    }

    #[test]
    fn a_failed_apply_is_completed_by_the_next_one() {
        let desired = [fe(10, 80, &[(2, false), (3, false)])];
        // The apply takes 5 writes (2 backends, 2 slots, the master); fail at each of them.
        for fail_after in 0..5 {
            let mut r = Reconciler::restore(MemMaps {
                fail_after: Some(fail_after),
                ..Default::default()
            })
            .unwrap();
            assert!(r.apply(&desired).is_err(), "fail_after={fail_after}");
            // Whatever was written is consistent: a master never counts a missing slot.
            for (k, v) in &r.maps().services {
                if k.slot == 0 {
                    for s in 1..=v.count {
                        assert!(r.maps().services.contains_key(&SvcKey { slot: s, ..*k }));
                    }
                }
            }
            let mut maps = r.maps.clone();
            maps.fail_after = None;
            r.maps = maps;
            r.apply(&desired).unwrap();
            let mut fresh = Reconciler::restore(MemMaps::default()).unwrap();
            fresh.apply(&desired).unwrap();
            assert_eq!(
                dump(r.maps()).unwrap(),
                dump(fresh.maps()).unwrap(),
                "fail_after={fail_after}"
            );
        }
    }

    #[test]
    fn restore_cleans_up_an_interrupted_write() {
        let mut maps = MemMaps::default();
        // A slot without master (interrupted create) and a slot past the count.
        maps.services.insert(
            SvcKey::new(Ipv4Addr::new(198, 19, 0, 99).into(), 80, 6, 0, 1),
            ServiceValue {
                backend_id: 7,
                ..Default::default()
            },
        );
        maps.backends.insert(
            7,
            BackendEntry {
                addr: Ipv4Addr::new(198, 18, 0, 7).into(),
                port: 80,
                proto: 6,
                state: 0,
            },
        );
        let mut r = Reconciler::restore(maps).unwrap();
        r.apply(&[fe(10, 80, &[(2, false)])]).unwrap();
        let d = dump(r.maps()).unwrap();
        assert_eq!(
            d,
            "SVC 198.19.0.10:80/TCP id=1 count=1 terminating=0 flags=0x0 affinity=0s\n\
             \x20 slot 1 -> backend 8 198.18.0.2:8080 active\nBACKENDS 1\n"
        );
    }

    #[test]
    fn affinity_membership_follows_the_backends() {
        let mut a = fe(10, 80, &[(2, false), (3, false)]);
        a.affinity_timeout_s = Some(30);
        let mut r = Reconciler::restore(MemMaps::default()).unwrap();
        r.apply(std::slice::from_ref(&a)).unwrap();
        assert_eq!(r.maps().affinity_match.len(), 2);
        a.backends.pop();
        r.apply(std::slice::from_ref(&a)).unwrap();
        let members: Vec<_> = r
            .maps()
            .affinity_match
            .keys()
            .map(|k| k.backend_id)
            .collect();
        assert_eq!(members, [1]);
        a.affinity_timeout_s = None;
        r.apply(std::slice::from_ref(&a)).unwrap();
        assert!(r.maps().affinity_match.is_empty());
    }

    /// [`MemMaps`] that checks, after every single write, that the maps are valid for the
    /// datapath: a master's `count + terminating_count` slots all exist, carry its service id
    /// and name a backend that exists.
    struct Checked(MemMaps);

    impl Checked {
        fn check(&self, after: &str) {
            for (k, master) in self.0.services.iter().filter(|(k, _)| k.slot == 0) {
                let n = master.count + master.terminating_count;
                for slot in 1..=n {
                    let key = SvcKey { slot, ..*k };
                    let s = self.0.services.get(&key).unwrap_or_else(|| {
                        panic!("after {after}: {k:?} counts {n} slots but slot {slot} is missing")
                    });
                    assert_eq!(
                        s.service_id, master.service_id,
                        "after {after}: slot {slot} of {k:?} belongs to another service"
                    );
                    assert!(
                        self.0.backends.contains_key(&s.backend_id),
                        "after {after}: slot {slot} of {k:?} names missing backend {}",
                        s.backend_id
                    );
                }
            }
        }
    }

    impl LbMaps for Checked {
        fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, MapError> {
            self.0.backends()
        }
        fn services(&self) -> Result<Vec<(SvcKey, ServiceValue)>, MapError> {
            self.0.services()
        }
        fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError> {
            self.0.affinity_matches()
        }
        fn put_backend(&mut self, id: u32, value: &BackendEntry) -> Result<(), MapError> {
            self.0.put_backend(id, value)?;
            self.check(&format!("put backend {id}"));
            Ok(())
        }
        fn del_backend(&mut self, id: u32, addr: IpAddr) -> Result<(), MapError> {
            self.0.del_backend(id, addr)?;
            self.check(&format!("del backend {id}"));
            Ok(())
        }
        fn put_service(&mut self, key: &SvcKey, value: &ServiceValue) -> Result<(), MapError> {
            self.0.put_service(key, value)?;
            self.check(&format!("put {key:?}"));
            Ok(())
        }
        fn del_service(&mut self, key: &SvcKey) -> Result<(), MapError> {
            self.0.del_service(key)?;
            self.check(&format!("del {key:?}"));
            Ok(())
        }
        fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), MapError> {
            self.0.put_affinity_match(key)
        }
        fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), MapError> {
            self.0.del_affinity_match(key)
        }
        fn source_ranges(&self) -> Result<Vec<SourceRange>, MapError> {
            self.0.source_ranges()
        }
        fn put_source_range(&mut self, r: SourceRange) -> Result<(), MapError> {
            self.0.put_source_range(r)
        }
        fn del_source_range(&mut self, r: SourceRange) -> Result<(), MapError> {
            self.0.del_source_range(r)
        }
    }

    /// What the datapath would do with the maps, without ids: per frontend, its active and
    /// terminating backends (address, port).
    fn logical(m: &MemMaps) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
        let name = |k: &SvcKey, slot: u16| {
            let s = &m.services[&SvcKey { slot, ..*k }];
            let b = &m.backends[&s.backend_id];
            format!("{}:{}", b.addr, b.port)
        };
        m.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| {
                let mut active: Vec<String> = (1..=v.count).map(|s| name(k, s)).collect();
                let mut term: Vec<String> = (v.count + 1..=v.count + v.terminating_count)
                    .map(|s| name(k, s))
                    .collect();
                active.sort();
                term.sort();
                (format!("{}:{}/{}", k.addr, k.port, k.proto), (active, term))
            })
            .collect()
    }

    fn state() -> impl proptest::strategy::Strategy<Value = Vec<Frontend>> {
        use proptest::prelude::*;
        proptest::collection::btree_map(
            10u8..16,
            proptest::collection::btree_map(2u8..12, any::<bool>(), 0..6),
            0..6,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(vip, bs)| fe(vip, 80, &bs.into_iter().collect::<Vec<_>>()))
                .collect()
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Any sequence of desired states: every intermediate map state is valid for the
        /// datapath, and after each apply the maps say exactly what was desired.
        #[test]
        fn every_write_leaves_valid_maps_and_the_last_apply_wins(
            states in proptest::collection::vec(state(), 1..8)
        ) {
            let mut r = Reconciler::restore(Checked(MemMaps::default())).unwrap();
            for desired in &states {
                r.apply(desired).unwrap();
                let mut fresh = Reconciler::restore(MemMaps::default()).unwrap();
                fresh.apply(desired).unwrap();
                proptest::prop_assert_eq!(logical(&r.maps.0), logical(&fresh.maps));
            }
        }
    }
}
