//! Socket-level Service translation on a cgroup v2 subtree.
//!
//! `connect4/6` and `sendmsg4/6` rewrite a ClusterIP:port destination to a backend chosen from the
//! service map before the kernel routes anything, so there is no per-packet NAT and no conntrack
//! entry. `recvmsg4/6` and `getpeername4/6` translate the backend back to the ClusterIP so
//! applications (DNS resolvers in particular) see the address they asked for. IPv6 sockets are
//! served from the IPv6 maps (`PXA_SVC6_V1`, `PXA_BACKEND6_V1`, `PXA_REVNAT6_V1`), and
//! IPv4-mapped destinations (`::ffff:a.b.c.d`) from the IPv4 ones; one generic path
//! ([`Family`]) serves both.
//!
//! Every decision is counted in a per-CPU array (`PXA_STATS_V2`), and while a monitor reader is
//! attached (the `PXA_MONITOR_V1` switch) each one is also written to a ring buffer as a
//! [`TraceEvent`]; with the switch off nothing is written. Debug logs (aya-log) are compiled
//! in but off unless the agent loads the programs with a log level (`--bpf-log`).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_ktime_get_ns,
        generated::{bpf_map_lookup_elem, bpf_set_retval, bpf_sk_release},
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockMap},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::{debug, trace};
use proxy_common::{
    AFFINITY_MATCH_MAX_ENTRIES, AFFINITY_MAX_ENTRIES, AffinityKey, AffinityMatchKey, AffinityValue,
    BACKEND_TERMINATING, BACKENDS_MAX_ENTRIES, BackendValue, BackendValue6, EVENTS_RING_BYTES,
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_GETPEERNAME4, HOOK_GETPEERNAME6, HOOK_RECVMSG4,
    HOOK_RECVMSG6, HOOK_SENDMSG4, HOOK_SENDMSG6, L7Config, NODE_ADDRS_MAX_ENTRIES,
    ORIG_DST_MAX_ENTRIES, OrigKey, PROTO_TCP, PROTO_UDP, REVERSE_MAX_ENTRIES, RevKey, RevKey6,
    RevValue, RevValue6, SCOPE_ALL, SERVICES_MAX_ENTRIES, SOCK_F_HOSTNS_ONLY, STAT_CONNECT4,
    STAT_EVENTS, STAT_EVENTS_LOST, STAT_L7_FALLBACK, STAT_L7_REDIRECT, STAT_ORIG_DST,
    STAT_PROXY_PORT_REFUSED, STAT_REFUSED, STATS_COUNT, SVC_F_AFFINITY, SVC_F_L7, ServiceKey,
    ServiceKey6, ServiceValue, SockConfig, TraceEvent, VERDICT_L7_FALLBACK, VERDICT_L7_REDIRECT,
    VERDICT_PROXY_PORT, VERDICT_REFUSED, VERDICT_REVERSED, VERDICT_TRANSLATED, mix64, pick_slot,
    usable_slots,
};

/// Allow the syscall.
const SYS_PROCEED: i32 = 1;
/// Fail the syscall (with the errno set by `bpf_set_retval`).
const SYS_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

mod nodeport;

#[map(name = "PXA_SVC_V1")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICES_MAX_ENTRIES, 0);

#[map(name = "PXA_BACKEND_V1")]
static BACKENDS: HashMap<u32, BackendValue> = HashMap::pinned(BACKENDS_MAX_ENTRIES, 0);

#[map(name = "PXA_SVC6_V1")]
static SERVICES6: HashMap<ServiceKey6, ServiceValue> = HashMap::pinned(SERVICES_MAX_ENTRIES, 0);

#[map(name = "PXA_BACKEND6_V1")]
static BACKENDS6: HashMap<u32, BackendValue6> = HashMap::pinned(BACKENDS_MAX_ENTRIES, 0);

#[map(name = "PXA_REVNAT6_V1")]
static REVERSE6: LruHashMap<RevKey6, RevValue6> = LruHashMap::pinned(REVERSE_MAX_ENTRIES, 0);

#[map(name = "PXA_REVNAT_V1")]
static REVERSE: LruHashMap<RevKey, RevValue> = LruHashMap::pinned(REVERSE_MAX_ENTRIES, 0);

#[map(name = "PXA_AFFIN_V1")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY_MAX_ENTRIES, 0);

#[map(name = "PXA_AFFMATCH_V1")]
static AFFINITY_MATCH: HashMap<AffinityMatchKey, u32> =
    HashMap::pinned(AFFINITY_MATCH_MAX_ENTRIES, 0);

#[map(name = "PXA_L7CFG_V1")]
static L7_CONFIG: Array<L7Config> = Array::pinned(1, 0);

/// The proxy's listening socket. Pinned so adopted programs and a restarted proxy share it; the
/// kernel removes the socket when the proxy process dies, whatever holds the map.
#[map(name = "PXA_PROXY_V1")]
static PROXY_SOCK: SockMap = SockMap::pinned(1, 0);

#[map(name = "PXA_ORIGDST_V1")]
static ORIG_DST: LruHashMap<OrigKey, RevValue> = LruHashMap::pinned(ORIG_DST_MAX_ENTRIES, 0);

#[map(name = "PXA_STATS_V2")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_COUNT, 0);

/// Non-zero while a monitor reader is attached; the agent sets and clears it.
#[map(name = "PXA_MONITOR_V1")]
static MONITOR: Array<u32> = Array::pinned(1, 0);

#[map(name = "PXA_EVENTS_V1")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

/// The master entry the socket hooks use for a destination (scope 0), with its key address.
#[inline(always)]
fn master_of(addr_be: u32, port_be: u16, proto: u8) -> Option<(u32, ServiceValue)> {
    master_in(addr_be, port_be, proto, SCOPE_ALL)
}

/// How the socket hooks behave (`--socket-lb-hostns-only`).
#[map(name = "PXA_SOCKCFG_V1")]
static SOCK_CONFIG: Array<SockConfig> = Array::pinned(1, 0);

/// Whether the socket hooks leave this socket alone: with `SOCK_F_HOSTNS_ONLY`, sockets outside
/// the host network namespace (pods, whose sidecar proxies need the ClusterIP) are not served.
#[inline(always)]
fn skipped(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = SOCK_CONFIG.get(0).copied() else {
        return false;
    };
    if cfg.flags & SOCK_F_HOSTNS_ONLY == 0 {
        return false;
    }
    // SAFETY: helper called with the program's own context.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) != cfg.host_netns_cookie }
}

/// The addresses a NodePort answers on (the agent writes the node's device addresses).
#[map(name = "PXA_NODEADDR_V1")]
static NODE_ADDRS: HashMap<u32, u32> = HashMap::pinned(NODE_ADDRS_MAX_ENTRIES, 0);

/// Whether `addr_be` is one of this node's addresses, or loopback (`127.0.0.0/8`: a NodePort
/// answers on localhost for host processes, as with kube-proxy).
#[inline(always)]
fn is_node_addr(addr_be: u32) -> bool {
    u32::from_be(addr_be) >> 24 == 127 || unsafe { NODE_ADDRS.get(&addr_be) }.is_some()
}

/// The master entry for a destination, with the address its entries are keyed by: the address
/// itself (ClusterIP, LoadBalancer ingress IP, externalIP) or 0 for a NodePort on a node
/// address; in `scope` (see `ServiceKey::scope`).
#[inline(always)]
fn master_in(addr_be: u32, port_be: u16, proto: u8, scope: u8) -> Option<(u32, ServiceValue)> {
    let key = ServiceKey {
        addr_be,
        port_be,
        proto,
        scope,
        slot: 0,
        _pad1: 0,
    };
    // Values are copied with volatile reads inside the non-null branches: LLVM must not merge
    // the branches into one that reads a field of a null result (the verifier rejects that).
    if let Some(p) = SERVICES.get_ptr(&key) {
        // SAFETY: a non-null map value pointer, valid during the program.
        return Some((addr_be, unsafe { core::ptr::read_volatile(p) }));
    }
    if !is_node_addr(addr_be) {
        return None;
    }
    let key = ServiceKey { addr_be: 0, ..key };
    if let Some(p) = SERVICES.get_ptr(&key) {
        // SAFETY: as above. Only NodePorts sit under address 0.
        return Some((0, unsafe { core::ptr::read_volatile(p) }));
    }
    None
}

/// Adds one to counter `i` of this CPU.
#[inline(always)]
fn count(i: u32) {
    if let Some(c) = STATS.get_ptr_mut(i) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU, one at a time.
        unsafe { *c += 1 };
    }
}

/// What a hook decided, for the counters and the monitor.
#[derive(Clone, Copy)]
struct Decision {
    hook: u8,
    verdict: u8,
    proto: u8,
    family: u8,
    orig_addr_be: u32,
    orig_port_be: u16,
    new_addr_be: u32,
    new_port_be: u16,
    orig_addr6_be: [u32; 4],
    new_addr6_be: [u32; 4],
    service_id: u32,
    backend_id: u32,
}

impl Decision {
    /// A decision of `hook` about `orig:orig_port_be`, nothing chosen yet.
    #[inline(always)]
    fn new<F: Family>(hook: u8, verdict: u8, proto: u8, orig: F::Addr, orig_port_be: u16) -> Self {
        let mut d = Decision {
            hook,
            verdict,
            proto,
            family: 4,
            orig_addr_be: 0,
            orig_port_be,
            new_addr_be: 0,
            new_port_be: orig_port_be,
            orig_addr6_be: [0; 4],
            new_addr6_be: [0; 4],
            service_id: 0,
            backend_id: 0,
        };
        F::note(&mut d, orig, orig);
        d
    }
}

/// Whether a monitor reader is attached.
#[inline(always)]
fn monitoring() -> bool {
    MONITOR.get(0).copied().unwrap_or(0) != 0
}

/// Writes `d` to the ring buffer if a monitor reader is attached.
#[inline(always)]
fn trace(ctx: &SockAddrContext, d: &Decision) {
    let on = MONITOR.get(0).copied().unwrap_or(0);
    if on == 0 {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<TraceEvent>(0) else {
        count(STAT_EVENTS_LOST);
        return;
    };
    let ctx_ptr = ctx.as_ptr();
    // SAFETY: helpers called with the program's own context.
    let (cookie, netns_cookie) = unsafe {
        (
            bpf_get_socket_cookie(ctx_ptr),
            bpf_get_netns_cookie(ctx_ptr),
        )
    };
    let ev = TraceEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie,
        netns_cookie,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        service_id: d.service_id,
        orig_addr_be: d.orig_addr_be,
        new_addr_be: d.new_addr_be,
        orig_port_be: d.orig_port_be,
        new_port_be: d.new_port_be,
        hook: d.hook,
        verdict: d.verdict,
        proto: d.proto,
        family: d.family,
        backend_id: d.backend_id,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        client_addr_be: 0,
        orig_addr6_be: d.orig_addr6_be,
        new_addr6_be: d.new_addr6_be,
    };
    entry.write(ev);
    entry.submit(0);
    count(STAT_EVENTS);
}

/// Whether the node proxy's listening socket is alive (present in the sockmap).
#[inline(always)]
fn proxy_alive() -> bool {
    let key: u32 = 0;
    // SAFETY: a lookup in a sockmap returns a referenced socket or null; a non-null socket is
    // released at once, as the verifier requires.
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::addr_of!(PROXY_SOCK) as *mut core::ffi::c_void,
            core::ptr::addr_of!(key) as *const core::ffi::c_void,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// The L7 redirect target, if redirection is configured.
#[inline(always)]
fn l7_target() -> Option<L7Config> {
    let cfg = L7_CONFIG.get(0).copied()?;
    (cfg.proxy_addr_be != 0).then_some(cfg)
}

/// A backend (or the proxy) as the socket hooks use it, in either family.
#[derive(Clone, Copy)]
struct Target<A: Copy> {
    addr: A,
    port_be: u16,
    state: u8,
}

/// Outcome of a forward lookup.
enum Fwd<A: Copy> {
    /// Not a Service address: leave the socket alone.
    Pass,
    /// Translated to this backend (verdict, service id, backend id).
    To(Target<A>, u8, u32, u32),
    /// A Service with no usable backend: fail fast (service id).
    Refuse(u32),
}

/// What differs between the IPv4 and the IPv6 socket hooks: the address type and the maps.
/// IPv4-mapped IPv6 destinations use [`V4`].
trait Family {
    /// An address, network byte order.
    type Addr: Copy;
    /// The master entry for a destination (scope 0), with the address its entries are keyed by.
    fn master(addr: Self::Addr, port_be: u16, proto: u8) -> Option<(Self::Addr, ServiceValue)>;
    /// The backend id in slot `slot` of the frontend keyed by `addr_key`.
    fn slot(addr_key: Self::Addr, port_be: u16, proto: u8, slot: u16) -> Option<u32>;
    /// A backend by id.
    fn backend(id: u32) -> Option<Target<Self::Addr>>;
    /// Records that the socket `cookie` sent to `to` believes it talks to `vip:port_be`.
    fn remember(cookie: u64, to: &Target<Self::Addr>, vip: Self::Addr, port_be: u16, sid: u32);
    /// The VIP, port and service id a socket talking to `addr:port_be` believes it talks to.
    fn recall(cookie: u64, addr: Self::Addr, port_be: u16) -> Option<(Self::Addr, u16, u32)>;
    /// Puts the addresses of a decision in the monitor fields of this family.
    fn note(d: &mut Decision, orig: Self::Addr, new: Self::Addr);
    /// Debug log (with `--bpf-log`) of a translation; `fallback`: the proxy was down.
    fn log_to(
        ctx: &SockAddrContext,
        hook: u8,
        from: (Self::Addr, u16),
        to: &Target<Self::Addr>,
        fallback: bool,
    );
    /// Debug log of a refusal (no usable backend).
    fn log_refused(ctx: &SockAddrContext, at: (Self::Addr, u16), service_id: u32);
}

/// IPv4 (and IPv4-mapped IPv6) sockets.
struct V4;
/// Native IPv6 sockets.
struct V6;

impl Family for V4 {
    type Addr = u32;
    #[inline(always)]
    fn master(addr: u32, port_be: u16, proto: u8) -> Option<(u32, ServiceValue)> {
        master_of(addr, port_be, proto)
    }
    #[inline(always)]
    fn slot(addr_be: u32, port_be: u16, proto: u8, slot: u16) -> Option<u32> {
        let key = ServiceKey {
            addr_be,
            port_be,
            proto,
            scope: SCOPE_ALL,
            slot,
            _pad1: 0,
        };
        unsafe { SERVICES.get(&key) }.map(|v| v.backend_id)
    }
    #[inline(always)]
    fn backend(id: u32) -> Option<Target<u32>> {
        unsafe { BACKENDS.get(&id) }.map(|b| Target {
            addr: b.addr_be,
            port_be: b.port_be,
            state: b.state,
        })
    }
    #[inline(always)]
    fn remember(cookie: u64, to: &Target<u32>, vip: u32, port_be: u16, sid: u32) {
        let rk = RevKey {
            cookie,
            addr_be: to.addr,
            port_be: to.port_be,
            _pad: 0,
        };
        let rv = RevValue {
            addr_be: vip,
            port_be,
            _pad: 0,
            service_id: sid,
        };
        let _ = REVERSE.insert(&rk, &rv, 0);
    }
    #[inline(always)]
    fn recall(cookie: u64, addr_be: u32, port_be: u16) -> Option<(u32, u16, u32)> {
        let rk = RevKey {
            cookie,
            addr_be,
            port_be,
            _pad: 0,
        };
        unsafe { REVERSE.get(&rk) }.map(|rv| (rv.addr_be, rv.port_be, rv.service_id))
    }
    #[inline(always)]
    fn note(d: &mut Decision, orig: u32, new: u32) {
        d.family = 4;
        d.orig_addr_be = orig;
        d.new_addr_be = new;
    }
    #[inline(always)]
    fn log_to(
        ctx: &SockAddrContext,
        hook: u8,
        (a, p): (u32, u16),
        to: &Target<u32>,
        fallback: bool,
    ) {
        if fallback {
            debug!(
                ctx,
                "proxy down: {:i}:{} balanced in the kernel to {:i}:{}",
                u32::from_be(a),
                u16::from_be(p),
                u32::from_be(to.addr),
                u16::from_be(to.port_be)
            );
        } else {
            trace!(
                ctx,
                "hook {} {:i}:{} -> {:i}:{}",
                hook,
                u32::from_be(a),
                u16::from_be(p),
                u32::from_be(to.addr),
                u16::from_be(to.port_be)
            );
        }
    }
    #[inline(always)]
    fn log_refused(ctx: &SockAddrContext, (a, p): (u32, u16), service_id: u32) {
        debug!(
            ctx,
            "refused {:i}:{}: service {} has no usable backend",
            u32::from_be(a),
            u16::from_be(p),
            service_id
        );
    }
}

/// The 16 bytes of an IPv6 address held as four network-order words, for aya-log's `{:i}`.
#[inline(always)]
fn bytes6(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern valid; the words hold the bytes in address order.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) }
}

impl Family for V6 {
    type Addr = [u32; 4];
    #[inline(always)]
    fn master(addr_be: [u32; 4], port_be: u16, proto: u8) -> Option<([u32; 4], ServiceValue)> {
        let key = ServiceKey6 {
            addr_be,
            port_be,
            proto,
            scope: SCOPE_ALL,
            slot: 0,
            _pad1: 0,
        };
        // As in `master_in`: a volatile copy inside the non-null branch.
        let p = SERVICES6.get_ptr(&key)?;
        // SAFETY: a non-null map value pointer, valid during the program.
        Some((addr_be, unsafe { core::ptr::read_volatile(p) }))
    }
    #[inline(always)]
    fn slot(addr_be: [u32; 4], port_be: u16, proto: u8, slot: u16) -> Option<u32> {
        let key = ServiceKey6 {
            addr_be,
            port_be,
            proto,
            scope: SCOPE_ALL,
            slot,
            _pad1: 0,
        };
        unsafe { SERVICES6.get(&key) }.map(|v| v.backend_id)
    }
    #[inline(always)]
    fn backend(id: u32) -> Option<Target<[u32; 4]>> {
        unsafe { BACKENDS6.get(&id) }.map(|b| Target {
            addr: b.addr_be,
            port_be: b.port_be,
            state: b.state,
        })
    }
    #[inline(always)]
    fn remember(cookie: u64, to: &Target<[u32; 4]>, vip: [u32; 4], port_be: u16, sid: u32) {
        let rk = RevKey6 {
            cookie,
            addr_be: to.addr,
            port_be: to.port_be,
            _pad: [0; 3],
        };
        let rv = RevValue6 {
            addr_be: vip,
            port_be,
            _pad: 0,
            service_id: sid,
        };
        let _ = REVERSE6.insert(&rk, &rv, 0);
    }
    #[inline(always)]
    fn recall(cookie: u64, addr_be: [u32; 4], port_be: u16) -> Option<([u32; 4], u16, u32)> {
        let rk = RevKey6 {
            cookie,
            addr_be,
            port_be,
            _pad: [0; 3],
        };
        unsafe { REVERSE6.get(&rk) }.map(|rv| (rv.addr_be, rv.port_be, rv.service_id))
    }
    #[inline(always)]
    fn note(d: &mut Decision, orig: [u32; 4], new: [u32; 4]) {
        d.family = 6;
        d.orig_addr6_be = orig;
        d.new_addr6_be = new;
    }
    #[inline(always)]
    fn log_to(
        ctx: &SockAddrContext,
        hook: u8,
        (a, p): ([u32; 4], u16),
        to: &Target<[u32; 4]>,
        _fallback: bool,
    ) {
        trace!(
            ctx,
            "hook {} [{:i}]:{} -> [{:i}]:{}",
            hook,
            bytes6(a),
            u16::from_be(p),
            bytes6(to.addr),
            u16::from_be(to.port_be)
        );
    }
    #[inline(always)]
    fn log_refused(ctx: &SockAddrContext, (a, p): ([u32; 4], u16), service_id: u32) {
        debug!(
            ctx,
            "refused [{:i}]:{}: service {} has no usable backend",
            bytes6(a),
            u16::from_be(p),
            service_id
        );
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), network order.
#[inline(always)]
fn mapped_v4(ip6: &[u32; 4]) -> Option<u32> {
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0x0000_ffffu32.to_be() {
        Some(ip6[3])
    } else {
        None
    }
}

#[inline(always)]
fn proto_of(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: `sock_addr` is the context pointer the kernel passed to the program.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    (proto == PROTO_TCP || proto == PROTO_UDP).then_some(proto)
}

/// Chooses the backend for a connection to the IPv4 `addr_be:port_be` (HTTP/gRPC Services to
/// the node proxy) and records the reverse entry.
#[inline(always)]
fn forward(ctx: &SockAddrContext, addr_be: u32, port_be: u16, proto: u8) -> Fwd<u32> {
    let Some((addr_key, master)) = master_of(addr_be, port_be, proto) else {
        return Fwd::Pass;
    };
    // SAFETY: helper called with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // HTTP/gRPC Services go to the node proxy while it runs; otherwise they are balanced here
    // like any other Service (the fallback that keeps a node working without its proxy).
    let mut verdict = VERDICT_TRANSLATED;
    if master.flags & SVC_F_L7 != 0 && proto == PROTO_TCP {
        if let Some(cfg) = l7_target() {
            verdict = VERDICT_L7_FALLBACK;
            if proxy_alive() {
                let to = Target {
                    addr: cfg.proxy_addr_be,
                    port_be: cfg.proxy_port_be,
                    state: 0,
                };
                V4::remember(cookie, &to, addr_be, port_be, master.service_id);
                return Fwd::To(to, VERDICT_L7_REDIRECT, master.service_id, 0);
            }
        }
    }
    balance::<V4>(
        ctx,
        cookie,
        (addr_be, addr_key),
        port_be,
        proto,
        &master,
        verdict,
    )
}

/// Chooses the backend for a connection to the native IPv6 `addr_be:port_be`. IPv6 frontends
/// are balanced in the kernel (the node proxy listens on IPv4).
#[inline(always)]
fn forward6(ctx: &SockAddrContext, addr_be: [u32; 4], port_be: u16, proto: u8) -> Fwd<[u32; 4]> {
    let Some((addr_key, master)) = V6::master(addr_be, port_be, proto) else {
        return Fwd::Pass;
    };
    // SAFETY: helper called with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    balance::<V6>(
        ctx,
        cookie,
        (addr_be, addr_key),
        port_be,
        proto,
        &master,
        VERDICT_TRANSLATED,
    )
}

/// Picks a backend of `master` (affinity first, then a random or per-socket choice) for the
/// destination `vip` (with the address its entries are keyed by) and records the reverse entry.
#[inline(always)]
fn balance<F: Family>(
    ctx: &SockAddrContext,
    cookie: u64,
    (vip, addr_key): (F::Addr, F::Addr),
    port_be: u16,
    proto: u8,
    master: &ServiceValue,
    verdict: u8,
) -> Fwd<F::Addr> {
    let (first, len) = usable_slots(master);
    if len == 0 {
        return Fwd::Refuse(master.service_id);
    }
    let mut chosen: Option<(u32, Target<F::Addr>)> = None;
    let affinity = master.flags & SVC_F_AFFINITY != 0;
    let now = if affinity {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let aff_key = AffinityKey {
        netns_cookie: if affinity {
            unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
        } else {
            0
        },
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
                if let Some(b) = F::backend(prev.backend_id) {
                    // A terminating backend keeps no affinity while ready ones exist.
                    if !(b.state == BACKEND_TERMINATING && master.count > 0) {
                        chosen = Some((prev.backend_id, b));
                    }
                }
            }
        }
    }
    let (backend_id, backend) = match chosen {
        Some(c) => c,
        None => {
            // TCP: a fresh random choice per connection. UDP: a stable choice per socket, so
            // unconnected sendmsg() calls of one socket keep talking to one backend.
            let r = if proto == PROTO_UDP {
                mix64(cookie)
            } else {
                unsafe { bpf_get_prandom_u32() }
            };
            let slot = first + pick_slot(r, len) - 1;
            // The agent writes slots before counts, so a missing slot or backend is only a
            // transient inconsistency while it is between writes.
            let Some(id) = F::slot(addr_key, port_be, proto, slot) else {
                return Fwd::Refuse(master.service_id);
            };
            let Some(b) = F::backend(id) else {
                return Fwd::Refuse(master.service_id);
            };
            (id, b)
        }
    };
    if affinity {
        let v = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(&aff_key, &v, 0);
    }
    F::remember(cookie, &backend, vip, port_be, master.service_id);
    Fwd::To(backend, verdict, master.service_id, backend_id)
}

/// The VIP, port and service id a translated socket believes its peer `addr:port_be` is, if
/// the entry is current.
#[inline(always)]
fn reverse<F: Family>(
    ctx: &SockAddrContext,
    addr: F::Addr,
    port_be: u16,
    proto: u8,
) -> Option<(F::Addr, u16, u32)> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (vip, vport, sid) = F::recall(cookie, addr, port_be)?;
    // Stale if the service was removed or re-created since the translation.
    let (_, master) = F::master(vip, vport, proto)?;
    (master.service_id == sid).then_some((vip, vport, sid))
}

/// Writes the destination (or source) address of a sock_addr context.
///
/// The context pointer is re-loaded with a volatile read so LLVM cannot keep a precomputed
/// `ctx + offset` pointer in a register across helper calls: the verifier only accepts context
/// accesses of the form `*(ctx + const)`.
#[inline(always)]
fn set_addr4(ctx: &SockAddrContext, addr_be: u32, port_be: u16) {
    // SAFETY: the context pointer is valid for the whole program; these are 4-byte writes of
    // fields the verifier allows for sock_addr hooks.
    unsafe {
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_ip4, addr_be);
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_port, port_be as u32);
    }
}

/// Like [`set_addr4`] for the last word of an IPv4-mapped IPv6 address.
#[inline(always)]
fn set_addr6_mapped(ctx: &SockAddrContext, addr_be: u32, port_be: u16) {
    // SAFETY: as in `set_addr4`.
    unsafe {
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], addr_be);
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_port, port_be as u32);
    }
}

/// Like [`set_addr4`] for a native IPv6 address (four 4-byte writes).
#[inline(always)]
fn set_addr6(ctx: &SockAddrContext, addr_be: [u32; 4], port_be: u16) {
    // SAFETY: as in `set_addr4`.
    unsafe {
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], addr_be[0]);
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], addr_be[1]);
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], addr_be[2]);
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], addr_be[3]);
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_port, port_be as u32);
    }
}

/// Reads the four words of the IPv6 address of a sock_addr context.
#[inline(always)]
fn addr6_of(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: 4-byte reads of context fields the verifier allows for these hooks.
    unsafe {
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        let a0 = core::ptr::read_volatile(&raw const (*sa).user_ip6[0]);
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        let a1 = core::ptr::read_volatile(&raw const (*sa).user_ip6[1]);
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        let a2 = core::ptr::read_volatile(&raw const (*sa).user_ip6[2]);
        let sa = core::ptr::read_volatile(&ctx.sock_addr);
        let a3 = core::ptr::read_volatile(&raw const (*sa).user_ip6[3]);
        [a0, a1, a2, a3]
    }
}

/// Counts and traces a forward decision, and returns the hook's answer.
#[inline(always)]
fn decide<F: Family>(
    ctx: &SockAddrContext,
    hook: u8,
    proto: u8,
    addr: F::Addr,
    port_be: u16,
    fwd: Fwd<F::Addr>,
) -> (i32, Option<Target<F::Addr>>) {
    let mut d = Decision::new::<F>(hook, VERDICT_TRANSLATED, proto, addr, port_be);
    let answer = match fwd {
        Fwd::Pass => return (SYS_PROCEED, None),
        Fwd::To(b, verdict, service_id, backend_id) => {
            d.verdict = verdict;
            F::note(&mut d, addr, b.addr);
            d.new_port_be = b.port_be;
            d.service_id = service_id;
            d.backend_id = backend_id;
            count(match verdict {
                VERDICT_L7_REDIRECT => STAT_L7_REDIRECT,
                VERDICT_L7_FALLBACK => STAT_L7_FALLBACK,
                _ => STAT_CONNECT4 + hook as u32,
            });
            if verdict == VERDICT_L7_FALLBACK {
                count(STAT_CONNECT4 + hook as u32);
            }
            F::log_to(
                ctx,
                hook,
                (addr, port_be),
                &b,
                verdict == VERDICT_L7_FALLBACK,
            );
            (SYS_PROCEED, Some(b))
        }
        Fwd::Refuse(service_id) => {
            d.verdict = VERDICT_REFUSED;
            d.service_id = service_id;
            count(STAT_REFUSED);
            F::log_refused(ctx, (addr, port_be), service_id);
            (refuse(), None)
        }
    };
    trace(ctx, &d);
    answer
}

#[inline(always)]
fn proxy_port_refused(
    ctx: &SockAddrContext,
    hook: u8,
    proto: u8,
    addr_be: u32,
    port_be: u16,
) -> i32 {
    count(STAT_PROXY_PORT_REFUSED);
    trace(
        ctx,
        &Decision::new::<V4>(hook, VERDICT_PROXY_PORT, proto, addr_be, port_be),
    );
    refuse()
}

#[inline(always)]
fn fwd4(ctx: &SockAddrContext, hook: u8) -> i32 {
    if skipped(ctx) {
        return SYS_PROCEED;
    }
    let Some(proto) = proto_of(ctx) else {
        return SYS_PROCEED;
    };
    let sa = ctx.sock_addr;
    // SAFETY: reads and 4-byte writes of context fields the verifier allows for these hooks.
    let (addr_be, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    if is_proxy_port(addr_be, port_be) {
        return proxy_port_refused(ctx, hook, proto, addr_be, port_be);
    }
    let fwd = forward(ctx, addr_be, port_be, proto);
    let (answer, to) = decide::<V4>(ctx, hook, proto, addr_be, port_be, fwd);
    if let Some(b) = to {
        set_addr4(ctx, b.addr, b.port_be);
    }
    answer
}

#[inline(always)]
fn fwd6(ctx: &SockAddrContext, hook: u8) -> i32 {
    if skipped(ctx) {
        return SYS_PROCEED;
    }
    let Some(proto) = proto_of(ctx) else {
        return SYS_PROCEED;
    };
    let ip6 = addr6_of(ctx);
    let port_be = unsafe { (*ctx.sock_addr).user_port } as u16;
    let Some(addr_be) = mapped_v4(&ip6) else {
        let fwd = forward6(ctx, ip6, port_be, proto);
        let (answer, to) = decide::<V6>(ctx, hook, proto, ip6, port_be, fwd);
        if let Some(b) = to {
            set_addr6(ctx, b.addr, b.port_be);
        }
        return answer;
    };
    if is_proxy_port(addr_be, port_be) {
        return proxy_port_refused(ctx, hook, proto, addr_be, port_be);
    }
    let fwd = forward(ctx, addr_be, port_be, proto);
    let (answer, to) = decide::<V4>(ctx, hook, proto, addr_be, port_be, fwd);
    if let Some(b) = to {
        set_addr6_mapped(ctx, b.addr, b.port_be);
    }
    answer
}

/// Pods may reach the proxy only through a redirect: the proxy is no open relay.
#[inline(always)]
fn is_proxy_port(addr_be: u32, port_be: u16) -> bool {
    l7_target().is_some_and(|c| c.proxy_addr_be == addr_be && c.proxy_port_be == port_be)
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: plain helper call; makes the syscall fail with ECONNREFUSED instead of EPERM.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    SYS_REJECT
}

/// Counts and traces a backend address reversed to `vip:vport` of service `sid`.
#[inline(always)]
fn reversed<F: Family>(
    ctx: &SockAddrContext,
    hook: u8,
    proto: u8,
    (addr, port_be): (F::Addr, u16),
    (vip, vport, sid): (F::Addr, u16, u32),
) {
    count(STAT_CONNECT4 + hook as u32);
    let mut d = Decision::new::<F>(hook, VERDICT_REVERSED, proto, addr, port_be);
    F::note(&mut d, addr, vip);
    d.new_port_be = vport;
    d.service_id = sid;
    trace(ctx, &d);
}

#[inline(always)]
fn rev4(ctx: &SockAddrContext, hook: u8) -> i32 {
    if skipped(ctx) {
        return SYS_PROCEED;
    }
    let Some(proto) = proto_of(ctx) else {
        return SYS_PROCEED;
    };
    let sa = ctx.sock_addr;
    let (addr_be, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    if let Some(rv) = reverse::<V4>(ctx, addr_be, port_be, proto) {
        set_addr4(ctx, rv.0, rv.1);
        reversed::<V4>(ctx, hook, proto, (addr_be, port_be), rv);
    }
    SYS_PROCEED
}

#[inline(always)]
fn rev6(ctx: &SockAddrContext, hook: u8) -> i32 {
    if skipped(ctx) {
        return SYS_PROCEED;
    }
    let Some(proto) = proto_of(ctx) else {
        return SYS_PROCEED;
    };
    let ip6 = addr6_of(ctx);
    let port_be = unsafe { (*ctx.sock_addr).user_port } as u16;
    let Some(addr_be) = mapped_v4(&ip6) else {
        if let Some(rv) = reverse::<V6>(ctx, ip6, port_be, proto) {
            set_addr6(ctx, rv.0, rv.1);
            reversed::<V6>(ctx, hook, proto, (ip6, port_be), rv);
        }
        return SYS_PROCEED;
    };
    if let Some(rv) = reverse::<V4>(ctx, addr_be, port_be, proto) {
        set_addr6_mapped(ctx, rv.0, rv.1);
        reversed::<V4>(ctx, hook, proto, (addr_be, port_be), rv);
    }
    SYS_PROCEED
}

/// TCP and connected UDP sockets, IPv4.
#[cgroup_sock_addr(connect4)]
pub fn pxa_connect4(ctx: SockAddrContext) -> i32 {
    fwd4(&ctx, HOOK_CONNECT4)
}

/// TCP and connected UDP sockets, IPv6 (native, and IPv4-mapped destinations).
#[cgroup_sock_addr(connect6)]
pub fn pxa_connect6(ctx: SockAddrContext) -> i32 {
    fwd6(&ctx, HOOK_CONNECT6)
}

/// Unconnected UDP sends, IPv4.
#[cgroup_sock_addr(sendmsg4)]
pub fn pxa_sendmsg4(ctx: SockAddrContext) -> i32 {
    fwd4(&ctx, HOOK_SENDMSG4)
}

/// Unconnected UDP sends, IPv6 (native, and IPv4-mapped destinations).
#[cgroup_sock_addr(sendmsg6)]
pub fn pxa_sendmsg6(ctx: SockAddrContext) -> i32 {
    fwd6(&ctx, HOOK_SENDMSG6)
}

/// UDP receives: replies from a backend appear to come from the ClusterIP.
#[cgroup_sock_addr(recvmsg4)]
pub fn pxa_recvmsg4(ctx: SockAddrContext) -> i32 {
    rev4(&ctx, HOOK_RECVMSG4)
}

/// UDP receives on IPv6 sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn pxa_recvmsg6(ctx: SockAddrContext) -> i32 {
    rev6(&ctx, HOOK_RECVMSG6)
}

/// getpeername(): the application sees the ClusterIP as its peer.
#[cgroup_sock_addr(getpeername4)]
pub fn pxa_getpeername4(ctx: SockAddrContext) -> i32 {
    rev4(&ctx, HOOK_GETPEERNAME4)
}

/// getpeername() on IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn pxa_getpeername6(ctx: SockAddrContext) -> i32 {
    rev6(&ctx, HOOK_GETPEERNAME6)
}

/// Reads a field of the `bpf_sock` context with a volatile read of the reloaded context
/// pointer (see `ops_field!`).
macro_rules! sock_field {
    ($ctx:expr, $($field:tt)+) => {{
        // SAFETY: the context pointer is valid for the whole program; the field is readable.
        unsafe {
            let sk = core::ptr::read_volatile(&$ctx.sock);
            core::ptr::read_volatile(&raw const (*sk).$($field)+)
        }
    }};
}

/// A socket is released: its reverse entry (cookie, the backend or proxy it was connected to)
/// goes with it, so the reverse LRU holds live sockets only instead of filling up with one
/// entry per connection ever made (and evicting the entries of long-lived ones). Entries of
/// unconnected UDP sends (no destination here) are left to the LRU.
#[cgroup_sock(sock_release)]
pub fn pxa_sock_release(ctx: SockContext) -> i32 {
    let port_be = sock_field!(ctx, dst_port);
    if port_be == 0 {
        return 1;
    }
    // SAFETY: the helper takes the program's socket context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock as *mut core::ffi::c_void) };
    match sock_field!(ctx, family) {
        AF_INET => {
            let key = RevKey {
                cookie,
                addr_be: sock_field!(ctx, dst_ip4),
                port_be,
                _pad: 0,
            };
            let _ = REVERSE.remove(&key);
        }
        AF_INET6 => {
            let ip6 = [
                sock_field!(ctx, dst_ip6[0]),
                sock_field!(ctx, dst_ip6[1]),
                sock_field!(ctx, dst_ip6[2]),
                sock_field!(ctx, dst_ip6[3]),
            ];
            if let Some(v4) = mapped_v4(&ip6) {
                let key = RevKey {
                    cookie,
                    addr_be: v4,
                    port_be,
                    _pad: 0,
                };
                let _ = REVERSE.remove(&key);
            } else {
                let key = RevKey6 {
                    cookie,
                    addr_be: ip6,
                    port_be,
                    _pad: [0; 3],
                };
                let _ = REVERSE6.remove(&key);
            }
        }
        _ => {}
    }
    1
}

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// At SYN time the client's address and port are known: publish the original destination of a
/// redirected connection under them, for the proxy to read right after accept.
/// Reads a sock_ops context field as `*(ctx + const)`: the context pointer is reloaded with a
/// volatile read right before, so LLVM cannot keep a derived `ctx + offset` pointer around (the
/// verifier rejects accesses through a modified context pointer).
macro_rules! ops_field {
    ($ctx:expr, $($field:tt)+) => {{
        // SAFETY: the context pointer is valid for the whole program; the field is readable.
        unsafe {
            let ops = core::ptr::read_volatile(&$ctx.ops);
            core::ptr::read_volatile(&raw const (*ops).$($field)+)
        }
    }};
}

/// At SYN time the client's address and port are known: publish the original destination of a
/// redirected connection under them, for the proxy to read right after accept.
#[sock_ops]
pub fn pxa_sockops(ctx: SockOpsContext) -> u32 {
    if ops_field!(ctx, op) != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    let Some(cfg) = l7_target() else { return 1 };
    let (remote, local) = match ops_field!(ctx, family) {
        AF_INET => (ops_field!(ctx, remote_ip4), ops_field!(ctx, local_ip4)),
        AF_INET6 => {
            let r = [
                ops_field!(ctx, remote_ip6[0]),
                ops_field!(ctx, remote_ip6[1]),
                ops_field!(ctx, remote_ip6[2]),
                ops_field!(ctx, remote_ip6[3]),
            ];
            let l = [
                ops_field!(ctx, local_ip6[0]),
                ops_field!(ctx, local_ip6[1]),
                ops_field!(ctx, local_ip6[2]),
                ops_field!(ctx, local_ip6[3]),
            ];
            let (Some(r), Some(l)) = (mapped_v4(&r), mapped_v4(&l)) else {
                return 1;
            };
            (r, l)
        }
        _ => return 1,
    };
    // remote_port holds the network-order port in its upper 16 bits on little-endian hosts (the
    // kernel loads skc_dport and shifts it left by 16); local_port is in host order.
    let remote_port = ops_field!(ctx, remote_port);
    let remote_port_be = if cfg!(target_endian = "little") {
        (remote_port >> 16) as u16
    } else {
        remote_port as u16
    };

    if remote != cfg.proxy_addr_be || remote_port_be != cfg.proxy_port_be {
        return 1;
    }
    let local_port = ops_field!(ctx, local_port) as u16;
    // SAFETY: the sock_ops context may be passed to bpf_get_socket_cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rk = RevKey {
        cookie,
        addr_be: remote,
        port_be: remote_port_be,
        _pad: 0,
    };
    if let Some(rv) = unsafe { REVERSE.get(&rk) }.copied() {
        let ok = OrigKey {
            addr_be: local,
            port_be: local_port.to_be(),
            _pad: 0,
        };
        let _ = ORIG_DST.insert(&ok, &rv, 0);
        count(STAT_ORIG_DST);
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
