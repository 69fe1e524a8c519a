//! North-south Service translation on the node's devices (tc/tcx): NodePort, LoadBalancer
//! ingress IPs and externalIPs for traffic arriving from outside the node.
//!
//! Ingress (`pxa_ns_ingress`), for a packet from outside:
//! 1. a reply of a backend on another node to one of our SNAT ports (`CT_DIR_REPLY_IN`): the
//!    client becomes the destination again and the frontend the source; sent out at once;
//! 2. a packet to a frontend flagged `SVC_F_EXTERNAL` (by address, or by port on any node
//!    address for a NodePort): the connection's entry (`CT_DIR_ORIG`) or a new choice of
//!    backend gives the destination. A backend reached through a north-south device is on
//!    another node: the source becomes this node's address and a SNAT port, so its reply comes
//!    back here, and the packet is sent out at once. A local backend gets the packet with the
//!    client's address (the reply leaves through egress, below).
//!
//! Egress (`pxa_ns_egress`): a local backend's reply to a north-south client
//! (`CT_DIR_REPLY_OUT`) gets the frontend as its source.
//!
//! The connection-tracking map is ours (LRU, `PXA_CT4_V1`); there is no iptables and no
//! nf_conntrack on the path. Packets are read and rewritten with `bpf_skb_load_bytes` /
//! `bpf_skb_store_bytes` and the checksum helpers; IP fragments and IP options other than the
//! header length are passed untouched.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup, bpf_redir_neigh},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns,
        generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    },
    macros::{classifier, map},
    maps::{HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::TcContext,
};
use proxy_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, BACKEND_TERMINATING, BackendValue, CT_DIR_ORIG,
    CT_DIR_REPLY_IN, CT_DIR_REPLY_OUT, CT_LIFETIME_CLOSE_S, CT_LIFETIME_SYN_S, CT_LIFETIME_TCP_S,
    CT_LIFETIME_UDP_S, CT_MAX_ENTRIES, CtKey, CtValue, DEVICES_MAX_ENTRIES, DeviceValue, PROTO_TCP,
    PROTO_UDP, SNAT_PORT_COUNT, SNAT_PORT_MIN, SRC_RANGES_MAX_ENTRIES, STAT_CT_NEW, STAT_NS_LOCAL,
    STAT_NS_NO_BACKEND, STAT_NS_NO_PORT, STAT_NS_NO_ROUTE, STAT_NS_REMOTE, STAT_NS_REPLY,
    STAT_NS_SRC_RANGE, SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_SRC_RANGES, ServiceKey, ServiceValue,
    SourceRangeKey, external_affinity_id, pick_slot, usable_slots,
};
use proxy_common::{
    HOOK_NS_INGRESS, SCOPE_ALL, SCOPE_EXTERNAL_LOCAL, STAT_EVENTS, STAT_EVENTS_LOST, TraceEvent,
    VERDICT_NS_LOCAL, VERDICT_NS_NO_BACKEND, VERDICT_NS_SNAT, VERDICT_NS_SRC_RANGE,
};

use crate::{AFFINITY, AFFINITY_MATCH, BACKENDS, EVENTS, SERVICES, count, master_in, monitoring};

#[map(name = "PXA_CT4_V1")]
static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CT_MAX_ENTRIES, 0);

#[map(name = "PXA_NSDEV_V1")]
static DEVICES: HashMap<u32, DeviceValue> = HashMap::pinned(DEVICES_MAX_ENTRIES, 0);

/// `BPF_F_NO_PREALLOC`: LPM tries must be created without preallocation.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "PXA_SRCRANGE_V1")]
static SRC_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::pinned(SRC_RANGES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_PROTO_OFF: usize = ETH_HLEN + 9;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Refresh an entry's timestamp at most this often (a map write per packet would cost more
/// than the lookup).
const REFRESH_NS: u64 = 1_000_000_000;
/// How many random SNAT ports are tried before giving up.
const SNAT_TRIES: u32 = 8;

/// A parsed IPv4 TCP/UDP packet.
#[derive(Clone, Copy)]
struct Pkt {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    /// Offset of the L4 header.
    l4: usize,
}

impl Pkt {
    fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }

    fn key(&self, dir: u8) -> CtKey {
        CtKey {
            saddr_be: self.saddr,
            daddr_be: self.daddr,
            sport_be: self.sport,
            dport_be: self.dport,
            proto: self.proto,
            dir,
            _pad: 0,
        }
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Pkt> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = (vihl & 0x0f) as usize * 4;
    if ihl < 20 {
        return None;
    }
    // Fragments (offset or more-fragments set) carry no ports we could match.
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    if frag & 0x3fff != 0 {
        return None;
    }
    let proto: u8 = ctx.load(IP_PROTO_OFF).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4 + 13).ok()?
    } else {
        0
    };
    Some(Pkt {
        saddr: ctx.load(IP_SRC_OFF).ok()?,
        daddr: ctx.load(IP_DST_OFF).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
        proto,
        tcp_flags,
        l4,
    })
}

/// Rewrites the address at `addr_off` and the port at `port_off`, fixing both checksums.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    p: &Pkt,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Option<()> {
    let mangled = if p.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    let csum = p.csum_off();
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR | mangled | 4,
        )
        .ok()?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
            .ok()?;
        ctx.store(addr_off, &new_addr, 0).ok()?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, mangled | 2)
            .ok()?;
        ctx.store(port_off, &new_port, 0).ok()?;
    }
    Some(())
}

#[inline(always)]
fn set_dst(ctx: &TcContext, p: &Pkt, addr: u32, port: u16) -> Option<()> {
    rewrite(ctx, p, IP_DST_OFF, p.daddr, addr, p.l4 + 2, p.dport, port)
}

#[inline(always)]
fn set_src(ctx: &TcContext, p: &Pkt, addr: u32, port: u16) -> Option<()> {
    rewrite(ctx, p, IP_SRC_OFF, p.saddr, addr, p.l4, p.sport, port)
}

/// Writes a north-south decision about a new connection to the monitor ring buffer, while a
/// reader is attached: the frontend the client used, where it went, and the client.
#[inline(always)]
fn trace(p: &Pkt, verdict: u8, service_id: u32, backend_id: u32, to: (u32, u16), now: u64) {
    if !monitoring() {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<TraceEvent>(0) else {
        count(STAT_EVENTS_LOST);
        return;
    };
    entry.write(TraceEvent {
        ts_ns: now,
        cookie: 0,
        netns_cookie: 0,
        pid: 0,
        service_id,
        orig_addr_be: p.daddr,
        new_addr_be: to.0,
        orig_port_be: p.dport,
        new_port_be: to.1,
        hook: HOOK_NS_INGRESS,
        verdict,
        proto: p.proto,
        family: 4,
        backend_id,
        comm: [0; 16],
        client_addr_be: p.saddr,
        orig_addr6_be: [0; 4],
        new_addr6_be: [0; 4],
    });
    entry.submit(0);
    count(STAT_EVENTS);
}

/// Whether an entry is still in force at `now`.
#[inline(always)]
fn live(v: &CtValue, now: u64) -> bool {
    now.wrapping_sub(v.last_seen_ns) <= v.lifetime_s as u64 * 1_000_000_000
}

/// The lifetime a packet with `flags` gives its connection's entries.
#[inline(always)]
fn lifetime(p: &Pkt) -> u32 {
    if p.proto == PROTO_UDP {
        CT_LIFETIME_UDP_S
    } else if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        CT_LIFETIME_CLOSE_S
    } else if p.tcp_flags & TCP_ACK == 0 {
        CT_LIFETIME_SYN_S
    } else {
        CT_LIFETIME_TCP_S
    }
}

/// Refreshes an entry on its packet: the timestamp at most once a second, the lifetime when the
/// TCP state changes (a FIN or RST shortens it for good).
#[inline(always)]
fn refresh(key: &CtKey, v: &mut CtValue, p: &Pkt, now: u64) -> bool {
    let mut life = lifetime(p);
    if v.lifetime_s == CT_LIFETIME_CLOSE_S {
        life = CT_LIFETIME_CLOSE_S;
    }
    if life == v.lifetime_s && now.wrapping_sub(v.last_seen_ns) < REFRESH_NS {
        return false;
    }
    v.lifetime_s = life;
    v.last_seen_ns = now;
    let _ = CT.insert(key, v, 0);
    true
}

/// Sends a rewritten packet out of the device the FIB names for its new destination.
#[inline(always)]
fn redirect(ctx: &TcContext, src: u32, dst: u32, p: &Pkt) -> i32 {
    // SAFETY: a zeroed bpf_fib_lookup is a valid argument; the helper fills the output fields.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = p.proto;
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: the context and a stack struct of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        if ctx.store(0, &fib.dmac, 0).is_err() || ctx.store(6, &fib.smac, 0).is_err() {
            count(STAT_NS_NO_ROUTE);
            return TC_ACT_SHOT as i32;
        }
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = AF_INET as u32;
        // On return the FIB put the next hop (gateway or the destination itself) here.
        nh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
        // SAFETY: a stack struct of the size passed.
        return unsafe {
            bpf_redirect_neigh(
                fib.ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        } as i32;
    }
    count(STAT_NS_NO_ROUTE);
    TC_ACT_SHOT as i32
}

/// The ifindex the FIB would send `dst` out of, and whether that is a north-south device (the
/// backend is on another node) — `None` when the destination is this node or has no route.
#[inline(always)]
fn egress_device(ctx: &TcContext, src: u32, dst: u32, p: &Pkt) -> Option<(u32, Option<u32>)> {
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = p.proto;
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        // NOT_FWDED: a local address (a hostNetwork backend on this node).
        return if rc == BPF_FIB_LKUP_RET_NOT_FWDED {
            Some((0, None))
        } else {
            None
        };
    }
    let snat = unsafe { DEVICES.get(&fib.ifindex) }.map(|d| d.addr_be);
    Some((fib.ifindex, snat))
}

/// The north-south frontend a packet from outside is addressed to, with the address and scope
/// its entries are keyed by (address 0 for a NodePort; the Local policy's own scope first).
#[inline(always)]
fn frontend(p: &Pkt) -> Option<(u32, u8, ServiceValue)> {
    if let Some((addr_key, m)) = master_in(p.daddr, p.dport, p.proto, SCOPE_EXTERNAL_LOCAL) {
        return Some((addr_key, SCOPE_EXTERNAL_LOCAL, m));
    }
    let (addr_key, m) = master_in(p.daddr, p.dport, p.proto, SCOPE_ALL)?;
    (m.flags & SVC_F_EXTERNAL != 0).then_some((addr_key, SCOPE_ALL, m))
}

/// Chooses a backend for a new north-south connection.
#[inline(always)]
fn choose(
    p: &Pkt,
    addr_be: u32,
    scope: u8,
    master: &ServiceValue,
    now: u64,
) -> Option<(u32, BackendValue)> {
    let (first, len) = usable_slots(master);
    if len == 0 {
        return None;
    }
    let affinity = master.flags & SVC_F_AFFINITY != 0;
    let aff_key = AffinityKey {
        netns_cookie: external_affinity_id(p.saddr),
        service_id: master.service_id,
        _pad: 0,
    };
    if affinity {
        if let Some(prev) = unsafe { AFFINITY.get(&aff_key) }.copied() {
            let fresh = now.wrapping_sub(prev.last_used_ns)
                <= master.affinity_timeout_s as u64 * 1_000_000_000;
            let member = AffinityMatchKey {
                service_id: master.service_id,
                backend_id: prev.backend_id,
            };
            if fresh && unsafe { AFFINITY_MATCH.get(&member) }.is_some() {
                if let Some(b) = unsafe { BACKENDS.get(&prev.backend_id) }.copied() {
                    if !(b.state == BACKEND_TERMINATING && master.count > 0) {
                        let v = AffinityValue {
                            backend_id: prev.backend_id,
                            _pad: 0,
                            last_used_ns: now,
                        };
                        let _ = AFFINITY.insert(&aff_key, &v, 0);
                        return Some((prev.backend_id, b));
                    }
                }
            }
        }
    }
    let r = unsafe { bpf_get_prandom_u32() };
    let key = ServiceKey {
        addr_be,
        port_be: p.dport,
        proto: p.proto,
        scope,
        slot: first + pick_slot(r, len) - 1,
        _pad1: 0,
    };
    let slot = unsafe { SERVICES.get(&key) }.copied()?;
    let b = unsafe { BACKENDS.get(&slot.backend_id) }.copied()?;
    if affinity {
        let v = AffinityValue {
            backend_id: slot.backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(&aff_key, &v, 0);
    }
    Some((slot.backend_id, b))
}

/// Whether the client may use the frontend under its `loadBalancerSourceRanges`.
#[inline(always)]
fn source_allowed(master: &ServiceValue, saddr: u32) -> bool {
    if master.flags & SVC_F_SRC_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        64,
        SourceRangeKey {
            service_id_be: master.service_id.to_be(),
            addr_be: saddr,
        },
    );
    SRC_RANGES.get(&key).is_some()
}

/// The reply-direction key and value for a connection's original entry.
#[inline(always)]
fn reply_entry(p: &Pkt, v: &CtValue, now: u64) -> (CtKey, CtValue) {
    let reply = CtValue {
        last_seen_ns: now,
        backend_id: v.backend_id,
        service_id: v.service_id,
        // REPLY_IN: back to the client; REPLY_OUT keeps the client as destination.
        dst_addr_be: if v.src_addr_be != 0 { p.saddr } else { 0 },
        dst_port_be: if v.src_addr_be != 0 { p.sport } else { 0 },
        src_addr_be: p.daddr,
        src_port_be: p.dport,
        lifetime_s: v.lifetime_s,
    };
    let key = if v.src_addr_be != 0 {
        CtKey {
            saddr_be: v.dst_addr_be,
            daddr_be: v.src_addr_be,
            sport_be: v.dst_port_be,
            dport_be: v.src_port_be,
            proto: p.proto,
            dir: CT_DIR_REPLY_IN,
            _pad: 0,
        }
    } else {
        CtKey {
            saddr_be: v.dst_addr_be,
            daddr_be: p.saddr,
            sport_be: v.dst_port_be,
            dport_be: p.sport,
            proto: p.proto,
            dir: CT_DIR_REPLY_OUT,
            _pad: 0,
        }
    };
    (key, reply)
}

/// A free SNAT port towards `backend` on `snat_addr`, reserved by inserting the reply entry.
#[inline(always)]
fn reserve_snat_port(p: &Pkt, v: &mut CtValue, now: u64) -> Option<()> {
    let mut i = 0;
    while i < SNAT_TRIES {
        let r = unsafe { bpf_get_prandom_u32() };
        let port = SNAT_PORT_MIN + ((r as u64 * SNAT_PORT_COUNT as u64) >> 32) as u16;
        v.src_port_be = port.to_be();
        let (rk, rv) = reply_entry(p, v, now);
        // BPF_NOEXIST: a port in use by a live connection is not taken over.
        let taken = match unsafe { CT.get(&rk) } {
            Some(old) => live(old, now),
            None => false,
        };
        if !taken && CT.insert(&rk, &rv, 0).is_ok() {
            return Some(());
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> i32 {
    let Some(p) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    let now = unsafe { bpf_ktime_get_ns() };

    // 1. A reply from a backend on another node to one of our SNAT ports.
    let rk = p.key(CT_DIR_REPLY_IN);
    if let Some(v) = unsafe { CT.get(&rk) }.copied() {
        if live(&v, now) {
            let mut v = v;
            refresh(&rk, &mut v, &p, now);
            if set_src(ctx, &p, v.src_addr_be, v.src_port_be).is_none() {
                return TC_ACT_SHOT as i32;
            }
            let q = Pkt {
                saddr: v.src_addr_be,
                sport: v.src_port_be,
                ..p
            };
            if set_dst(ctx, &q, v.dst_addr_be, v.dst_port_be).is_none() {
                return TC_ACT_SHOT as i32;
            }
            count(STAT_NS_REPLY);
            return redirect(ctx, v.src_addr_be, v.dst_addr_be, &p);
        }
    }

    // 2. A packet from outside to a north-south frontend.
    let Some((addr_key, scope, master)) = frontend(&p) else {
        return TC_ACT_UNSPEC;
    };
    if !source_allowed(&master, p.saddr) {
        count(STAT_NS_SRC_RANGE);
        trace(&p, VERDICT_NS_SRC_RANGE, master.service_id, 0, (0, 0), now);
        return TC_ACT_SHOT as i32;
    }
    let key = p.key(CT_DIR_ORIG);
    let known = match unsafe { CT.get(&key) } {
        Some(v) if live(v, now) && v.service_id == master.service_id => {
            // The backend must still exist at the address the entry names; a SYN may not reuse
            // an entry whose connection was closed.
            let closed = p.tcp_flags & TCP_SYN != 0
                && p.tcp_flags & TCP_ACK == 0
                && v.lifetime_s == CT_LIFETIME_CLOSE_S;
            match unsafe { BACKENDS.get(&v.backend_id) } {
                Some(b) if !closed && b.addr_be == v.dst_addr_be && b.port_be == v.dst_port_be => {
                    Some(*v)
                }
                _ => None,
            }
        }
        _ => None,
    };
    let v = match known {
        Some(mut v) => {
            if refresh(&key, &mut v, &p, now) {
                // Once a second, the reply entry is written again, in case the LRU dropped it.
                let (rk, rv) = reply_entry(&p, &v, now);
                let _ = CT.insert(&rk, &rv, 0);
            }
            v
        }
        None => {
            let Some((backend_id, b)) = choose(&p, addr_key, scope, &master, now) else {
                count(STAT_NS_NO_BACKEND);
                trace(&p, VERDICT_NS_NO_BACKEND, master.service_id, 0, (0, 0), now);
                return TC_ACT_SHOT as i32;
            };
            let mut v = CtValue {
                last_seen_ns: now,
                backend_id,
                service_id: master.service_id,
                dst_addr_be: b.addr_be,
                dst_port_be: b.port_be,
                src_addr_be: 0,
                src_port_be: 0,
                lifetime_s: lifetime(&p),
            };
            match egress_device(ctx, p.saddr, b.addr_be, &p) {
                Some((_, Some(snat))) => {
                    v.src_addr_be = snat;
                    if reserve_snat_port(&p, &mut v, now).is_none() {
                        count(STAT_NS_NO_PORT);
                        return TC_ACT_SHOT as i32;
                    }
                }
                Some((_, None)) => {
                    let (rk, rv) = reply_entry(&p, &v, now);
                    let _ = CT.insert(&rk, &rv, 0);
                }
                None => {
                    count(STAT_NS_NO_ROUTE);
                    return TC_ACT_SHOT as i32;
                }
            }
            let _ = CT.insert(&key, &v, 0);
            count(STAT_CT_NEW);
            trace(
                &p,
                if v.src_addr_be == 0 {
                    VERDICT_NS_LOCAL
                } else {
                    VERDICT_NS_SNAT
                },
                master.service_id,
                backend_id,
                (v.dst_addr_be, v.dst_port_be),
                now,
            );
            v
        }
    };
    if set_dst(ctx, &p, v.dst_addr_be, v.dst_port_be).is_none() {
        return TC_ACT_SHOT as i32;
    }
    if v.src_addr_be == 0 {
        count(STAT_NS_LOCAL);
        return TC_ACT_OK as i32;
    }
    let q = Pkt {
        daddr: v.dst_addr_be,
        dport: v.dst_port_be,
        ..p
    };
    if set_src(ctx, &q, v.src_addr_be, v.src_port_be).is_none() {
        return TC_ACT_SHOT as i32;
    }
    count(STAT_NS_REMOTE);
    redirect(ctx, v.src_addr_be, v.dst_addr_be, &p)
}

#[inline(always)]
fn egress(ctx: &TcContext) -> i32 {
    let Some(p) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    let key = p.key(CT_DIR_REPLY_OUT);
    let Some(mut v) = (unsafe { CT.get(&key) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if !live(&v, now) {
        return TC_ACT_UNSPEC;
    }
    refresh(&key, &mut v, &p, now);
    if set_src(ctx, &p, v.src_addr_be, v.src_port_be).is_none() {
        return TC_ACT_SHOT as i32;
    }
    count(STAT_NS_REPLY);
    TC_ACT_OK as i32
}

/// Traffic arriving on a north-south device.
#[classifier]
pub fn pxa_ns_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx)
}

/// Traffic leaving through a north-south device.
#[classifier]
pub fn pxa_ns_egress(ctx: TcContext) -> i32 {
    egress(&ctx)
}
