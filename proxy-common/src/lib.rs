//! Types shared by the kernel datapath (`proxy-ebpf`) and userspace (`proxy-agent`).
//!
//! Everything here is `#![no_std]`, `#[repr(C)]` with explicit padding, and the byte order of
//! every address or port field is in its name (`_be` = network byte order). Each map key and
//! value has a compile-time size assertion, so a layout change is a build error rather than a
//! silent kernel/userspace mismatch. Map names carry a schema version (`_V1`) so a later agent
//! can tell old pinned maps apart during an upgrade.
//!
//! The design follows Cilium's lb4 maps: a service map keyed by (VIP, port, protocol, slot) whose
//! slot 0 is the master entry and whose slots 1..=n hold backend ids, a backend map shared by all
//! services, a reverse map keyed by socket cookie and an LRU affinity map.
#![no_std]

use core::mem::size_of;

/// IANA protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Name of the service map (see [`ServiceKey`]).
pub const MAP_SERVICES: &str = "PXA_SVC_V1";
/// Name of the backend map (see [`BackendValue`]).
pub const MAP_BACKENDS: &str = "PXA_BACKEND_V1";
/// Name of the reverse-translation map keyed by socket cookie (see [`RevKey`]).
pub const MAP_REVERSE: &str = "PXA_REVNAT_V1";
/// Name of the session-affinity map (see [`AffinityKey`]).
pub const MAP_AFFINITY: &str = "PXA_AFFIN_V1";
/// Name of the affinity membership map (see [`AffinityMatchKey`]).
pub const MAP_AFFINITY_MATCH: &str = "PXA_AFFMATCH_V1";

/// Name of the IPv6 service map (see [`ServiceKey6`]; values are [`ServiceValue`]s whose backend
/// ids are keys of [`MAP_BACKENDS6`]).
pub const MAP_SERVICES6: &str = "PXA_SVC6_V1";
/// Name of the IPv6 backend map (see [`BackendValue6`]). Backend ids are one id space over both
/// backend maps: an id lives in exactly one of them.
pub const MAP_BACKENDS6: &str = "PXA_BACKEND6_V1";
/// Name of the IPv6 reverse-translation map keyed by socket cookie (see [`RevKey6`]).
pub const MAP_REVERSE6: &str = "PXA_REVNAT6_V1";

/// Name of the L7 redirect configuration array (one [`L7Config`] at index 0).
pub const MAP_L7_CONFIG: &str = "PXA_L7CFG_V1";
/// Name of the sockmap holding the node proxy's listening socket at index 0. The kernel drops the
/// socket from the map when the proxy process dies, so the datapath sees at once that it is gone.
pub const MAP_PROXY_SOCK: &str = "PXA_PROXY_V1";
/// Name of the original-destination map the proxy reads after accept (see [`OrigKey`]).
pub const MAP_ORIG_DST: &str = "PXA_ORIGDST_V1";
/// Capacity of the original-destination LRU map.
pub const ORIG_DST_MAX_ENTRIES: u32 = 65_536;

/// Capacity of the service map (entries, i.e. slots over all services).
pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
/// Capacity of the backend map.
pub const BACKENDS_MAX_ENTRIES: u32 = 262_144;
/// Capacity of the reverse-translation LRU map.
pub const REVERSE_MAX_ENTRIES: u32 = 262_144;
/// Capacity of the session-affinity LRU map.
pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;
/// Capacity of the affinity membership map.
pub const AFFINITY_MATCH_MAX_ENTRIES: u32 = 65_536;

/// Service flag: sessionAffinity ClientIP is on; see [`ServiceValue::affinity_timeout_s`].
pub const SVC_F_AFFINITY: u16 = 1 << 0;
/// Service flag: an HTTP/gRPC port; TCP connects go to the node proxy while it runs.
pub const SVC_F_L7: u16 = 1 << 1;
/// Service flag: a north-south frontend (NodePort, LoadBalancer ingress IP or externalIP) that
/// the tc programs on the node's devices serve for traffic arriving from outside. A NodePort
/// entry is keyed by address 0 (any node address, see [`MAP_NODE_ADDRS`]).
pub const SVC_F_EXTERNAL: u16 = 1 << 2;
/// Service flag: `externalTrafficPolicy: Local`; the entry holds this node's endpoints only and
/// the client's address is kept (no SNAT).
pub const SVC_F_EXT_LOCAL: u16 = 1 << 3;
/// Service flag: `loadBalancerSourceRanges` apply; a client outside [`MAP_SRC_RANGES`] for the
/// service id is dropped.
pub const SVC_F_SRC_RANGES: u16 = 1 << 4;

/// Backend state: ready, takes new connections.
pub const BACKEND_ACTIVE: u8 = 0;
/// Backend state: terminating but still serving (KEP-1669); used only when no backend is active.
pub const BACKEND_TERMINATING: u8 = 1;

/// Key of the service map.
///
/// Slot 0 is the master entry of a service: its value carries the backend counts, flags and the
/// service id. Slots `1..=count + terminating_count` carry backend ids: first the active
/// backends, then the terminating-but-serving ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The ClusterIP, network byte order.
    pub addr_be: u32,
    /// The Service port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`SCOPE_ALL`], or [`SCOPE_EXTERNAL_LOCAL`] for the tc programs' own entry of an
    /// `externalTrafficPolicy: Local` frontend.
    pub scope: u8,
    /// 0 for the master entry, 1..=n for backend slots.
    pub slot: u16,
    /// Explicit padding; always 0.
    pub _pad1: u16,
}
const _: () = assert!(size_of::<ServiceKey>() == 12);

impl ServiceKey {
    /// Builds a key from host-order values.
    pub const fn new(addr: u32, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr_be: addr.to_be(),
            port_be: port.to_be(),
            proto,
            scope: SCOPE_ALL,
            slot,
            _pad1: 0,
        }
    }
}

/// [`ServiceKey::scope`]: the entry both the socket hooks and (flagged [`SVC_F_EXTERNAL`]) the
/// tc programs use.
pub const SCOPE_ALL: u8 = 0;
/// [`ServiceKey::scope`]: an `externalTrafficPolicy: Local` frontend as the tc programs serve
/// traffic from outside (this node's endpoints, no SNAT). Its scope-0 twin holds every endpoint
/// for clients inside the cluster (pods, host processes), as kube-proxy treats them.
pub const SCOPE_EXTERNAL_LOCAL: u8 = 1;

impl ServiceKey {
    /// The same key in another scope.
    pub const fn in_scope(self, scope: u8) -> Self {
        Self { scope, ..self }
    }
}

/// Key of the IPv6 service map: [`ServiceKey`] with a 128-bit address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    /// The ClusterIP, network byte order (the 16 bytes of the address in order).
    pub addr_be: [u32; 4],
    /// The Service port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// As [`ServiceKey::scope`].
    pub scope: u8,
    /// 0 for the master entry, 1..=n for backend slots.
    pub slot: u16,
    /// Explicit padding; always 0.
    pub _pad1: u16,
}
const _: () = assert!(size_of::<ServiceKey6>() == 24);

/// Value of the IPv6 backend map, keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendValue6 {
    /// Pod address, network byte order.
    pub addr_be: [u32; 4],
    /// Target port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`BACKEND_ACTIVE`] or [`BACKEND_TERMINATING`].
    pub state: u8,
}
const _: () = assert!(size_of::<BackendValue6>() == 20);

/// Key of the IPv6 reverse-translation map (see [`RevKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevKey6 {
    /// Socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Backend address the socket was sent to, network byte order.
    pub addr_be: [u32; 4],
    /// Backend port, network byte order.
    pub port_be: u16,
    /// Explicit padding; always 0.
    pub _pad: [u16; 3],
}
const _: () = assert!(size_of::<RevKey6>() == 32);

/// Value of the IPv6 reverse-translation map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevValue6 {
    /// The ClusterIP the application asked for, network byte order.
    pub addr_be: [u32; 4],
    /// The Service port, network byte order.
    pub port_be: u16,
    /// Explicit padding; always 0.
    pub _pad: u16,
    /// The service id at translation time.
    pub service_id: u32,
}
const _: () = assert!(size_of::<RevValue6>() == 24);

/// Value of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// Slot > 0: the backend id in the backend map. Slot 0: unused (0).
    pub backend_id: u32,
    /// Stable id of the service (slot 0 and all slots carry it); keys the affinity map and is
    /// recorded in the reverse map so a stale reverse entry can be detected.
    pub service_id: u32,
    /// Slot 0 with [`SVC_F_AFFINITY`]: ClientIP affinity timeout in seconds.
    pub affinity_timeout_s: u32,
    /// Slot 0: number of active backends (slots `1..=count`).
    pub count: u16,
    /// Slot 0: number of terminating-but-serving backends after the active ones.
    pub terminating_count: u16,
    /// Slot 0: `SVC_F_*` flags.
    pub flags: u16,
    /// Explicit padding; always 0.
    pub _pad: u16,
}
const _: () = assert!(size_of::<ServiceValue>() == 20);

/// Value of the backend map, keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendValue {
    /// Pod address, network byte order.
    pub addr_be: u32,
    /// Target port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`BACKEND_ACTIVE`] or [`BACKEND_TERMINATING`].
    pub state: u8,
}
const _: () = assert!(size_of::<BackendValue>() == 8);

/// Key of the reverse-translation map: which VIP a translated socket believes it talks to.
///
/// The backend address and port are part of the key so an entry left over from a reused socket
/// cookie or a reconnected UDP socket cannot match a different peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevKey {
    /// Socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Backend address the socket was sent to, network byte order.
    pub addr_be: u32,
    /// Backend port, network byte order.
    pub port_be: u16,
    /// Explicit padding; always 0.
    pub _pad: u16,
}
const _: () = assert!(size_of::<RevKey>() == 16);

/// Value of the reverse-translation map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevValue {
    /// The ClusterIP the application asked for, network byte order.
    pub addr_be: u32,
    /// The Service port, network byte order.
    pub port_be: u16,
    /// Explicit padding; always 0.
    pub _pad: u16,
    /// The service id at translation time.
    pub service_id: u32,
}
const _: () = assert!(size_of::<RevValue>() == 12);

/// Key of the session-affinity LRU map.
///
/// A pod is a network namespace, so the netns cookie identifies the client: the socket-level
/// equivalent of kube-proxy's ClientIP affinity (the source address is not bound yet at connect).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// `bpf_get_netns_cookie` of the client socket.
    pub netns_cookie: u64,
    /// [`ServiceValue::service_id`].
    pub service_id: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

/// Value of the session-affinity LRU map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    /// Backend chosen for this client.
    pub backend_id: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last use.
    pub last_used_ns: u64,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

/// Key of the affinity membership map: present while `backend_id` is a backend of the service.
///
/// The affinity map may remember a backend that has since left the service (or moved to another
/// service sharing the same backend id); the datapath only honours an affinity entry whose pair is
/// present here. Written for services with affinity only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    /// [`ServiceValue::service_id`].
    pub service_id: u32,
    /// Backend id.
    pub backend_id: u32,
}
const _: () = assert!(size_of::<AffinityMatchKey>() == 8);

/// Where L7 connections are redirected: the node proxy's listen address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct L7Config {
    /// Proxy address (the node IP), network byte order; 0 disables redirection.
    pub proxy_addr_be: u32,
    /// Proxy port, network byte order.
    pub proxy_port_be: u16,
    /// Explicit padding; always 0.
    pub _pad: u16,
}
const _: () = assert!(size_of::<L7Config>() == 8);

/// Key of the original-destination map: the client's address as the proxy sees it at accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigKey {
    /// Client address, network byte order.
    pub addr_be: u32,
    /// Client port, network byte order.
    pub port_be: u16,
    /// Explicit padding; always 0.
    pub _pad: u16,
}
const _: () = assert!(size_of::<OrigKey>() == 8);

/// Name of the per-CPU counter array of the programs (indices `STAT_*`, [`STATS_COUNT`] slots).
pub const MAP_STATS: &str = "PXA_STATS_V2";
/// Name of the monitor switch (one `u32` at index 0): events are written to [`MAP_EVENTS`] only
/// while it is non-zero, i.e. while a `proxy-agent monitor` reader is attached.
pub const MAP_MONITOR: &str = "PXA_MONITOR_V1";
/// Name of the ring buffer of [`TraceEvent`]s.
pub const MAP_EVENTS: &str = "PXA_EVENTS_V1";
/// Size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Counter: connect4 translated a ClusterIP to a backend in the kernel.
pub const STAT_CONNECT4: u32 = 0;
/// Counter: connect6 translated (an IPv6 ClusterIP, or an IPv4-mapped one).
pub const STAT_CONNECT6: u32 = 1;
/// Counter: sendmsg4 translated.
pub const STAT_SENDMSG4: u32 = 2;
/// Counter: sendmsg6 translated.
pub const STAT_SENDMSG6: u32 = 3;
/// Counter: recvmsg4 reversed a backend address to the ClusterIP.
pub const STAT_RECVMSG4: u32 = 4;
/// Counter: recvmsg6 reversed.
pub const STAT_RECVMSG6: u32 = 5;
/// Counter: getpeername4 reversed.
pub const STAT_GETPEERNAME4: u32 = 6;
/// Counter: getpeername6 reversed.
pub const STAT_GETPEERNAME6: u32 = 7;
/// Counter: a Service without a usable backend refused a connect or send (ECONNREFUSED).
pub const STAT_REFUSED: u32 = 8;
/// Counter: an HTTP/gRPC connect was redirected to the node proxy.
pub const STAT_L7_REDIRECT: u32 = 9;
/// Counter: an HTTP/gRPC connect was balanced in the kernel because the proxy was down.
pub const STAT_L7_FALLBACK: u32 = 10;
/// Counter: a direct connect to the proxy port was refused.
pub const STAT_PROXY_PORT_REFUSED: u32 = 11;
/// Counter: monitor events written to the ring buffer.
pub const STAT_EVENTS: u32 = 12;
/// Counter: monitor events lost (ring buffer full).
pub const STAT_EVENTS_LOST: u32 = 13;
/// Counter: original destinations published by sock_ops for the proxy.
pub const STAT_ORIG_DST: u32 = 14;
/// Counter: a packet from outside to a north-south frontend was sent to a backend on this node
/// (destination translated only).
pub const STAT_NS_LOCAL: u32 = 15;
/// Counter: a packet from outside was sent to a backend on another node (destination translated
/// and source NATed to the node's address).
pub const STAT_NS_REMOTE: u32 = 16;
/// Counter: a reply packet was translated back to the north-south frontend.
pub const STAT_NS_REPLY: u32 = 17;
/// Counter: dropped, the north-south frontend had no usable backend (on this node, for
/// `externalTrafficPolicy: Local`).
pub const STAT_NS_NO_BACKEND: u32 = 18;
/// Counter: dropped, the client is outside `loadBalancerSourceRanges`.
pub const STAT_NS_SRC_RANGE: u32 = 19;
/// Counter: dropped, no free SNAT port for the backend.
pub const STAT_NS_NO_PORT: u32 = 20;
/// Counter: dropped, no route (FIB lookup failed) for a translated packet.
pub const STAT_NS_NO_ROUTE: u32 = 21;
/// Counter: new connection-tracking entries (one per north-south connection).
pub const STAT_CT_NEW: u32 = 22;
// Translation counters are indexed by hook: `STAT_CONNECT4 + HOOK_*`.
const _: () = assert!(STAT_GETPEERNAME6 == STAT_CONNECT4 + HOOK_GETPEERNAME6 as u32);
const _: () = assert!(STAT_SENDMSG6 == STAT_CONNECT4 + HOOK_SENDMSG6 as u32);
/// Number of counters in [`MAP_STATS`].
pub const STATS_COUNT: u32 = 32;

/// Hook of a [`TraceEvent`]: connect4.
pub const HOOK_CONNECT4: u8 = 0;
/// Hook: connect6.
pub const HOOK_CONNECT6: u8 = 1;
/// Hook: sendmsg4.
pub const HOOK_SENDMSG4: u8 = 2;
/// Hook: sendmsg6.
pub const HOOK_SENDMSG6: u8 = 3;
/// Hook: recvmsg4.
pub const HOOK_RECVMSG4: u8 = 4;
/// Hook: recvmsg6.
pub const HOOK_RECVMSG6: u8 = 5;
/// Hook: getpeername4.
pub const HOOK_GETPEERNAME4: u8 = 6;
/// Hook: getpeername6.
pub const HOOK_GETPEERNAME6: u8 = 7;
/// Hook: the tc program on a north-south device's ingress.
pub const HOOK_NS_INGRESS: u8 = 8;
/// Hook: the tc program on a north-south device's egress.
pub const HOOK_NS_EGRESS: u8 = 9;

/// Verdict of a [`TraceEvent`]: translated to a backend in the kernel.
pub const VERDICT_TRANSLATED: u8 = 0;
/// Verdict: redirected to the node proxy.
pub const VERDICT_L7_REDIRECT: u8 = 1;
/// Verdict: an HTTP/gRPC Service balanced in the kernel because the proxy was down.
pub const VERDICT_L7_FALLBACK: u8 = 2;
/// Verdict: refused, no usable backend.
pub const VERDICT_REFUSED: u8 = 3;
/// Verdict: refused, a direct connect to the proxy port.
pub const VERDICT_PROXY_PORT: u8 = 4;
/// Verdict: a backend address reversed to the ClusterIP (recvmsg, getpeername).
pub const VERDICT_REVERSED: u8 = 5;
/// Verdict: a new north-south connection sent to a backend on this node.
pub const VERDICT_NS_LOCAL: u8 = 6;
/// Verdict: a new north-south connection sent to a backend on another node, SNATed.
pub const VERDICT_NS_SNAT: u8 = 7;
/// Verdict: a north-south packet dropped: no usable backend (on this node, for Local).
pub const VERDICT_NS_NO_BACKEND: u8 = 8;
/// Verdict: a north-south packet dropped: the client is outside `loadBalancerSourceRanges`.
pub const VERDICT_NS_SRC_RANGE: u8 = 9;

/// One socket translation, written to [`MAP_EVENTS`] while a monitor is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns`.
    pub ts_ns: u64,
    /// Socket cookie.
    pub cookie: u64,
    /// Network namespace cookie of the socket (one per pod).
    pub netns_cookie: u64,
    /// Process id (tgid) of the caller.
    pub pid: u32,
    /// Service id of the master entry (0 when none).
    pub service_id: u32,
    /// Address the application used, network byte order.
    pub orig_addr_be: u32,
    /// Address after the hook, network byte order.
    pub new_addr_be: u32,
    /// Port the application used, network byte order.
    pub orig_port_be: u16,
    /// Port after the hook, network byte order.
    pub new_port_be: u16,
    /// `HOOK_*`.
    pub hook: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// 4, or 6 for an IPv6 socket event: the addresses are then in `orig_addr6_be` and
    /// `new_addr6_be`.
    pub family: u8,
    /// Backend id chosen (0 when none).
    pub backend_id: u32,
    /// The caller's command name (`bpf_get_current_comm`), NUL-padded (empty for north-south).
    pub comm: [u8; 16],
    /// North-south events: the client's address, network byte order; 0 for socket events.
    pub client_addr_be: u32,
    /// IPv6 events: the address the application used, network byte order.
    pub orig_addr6_be: [u32; 4],
    /// IPv6 events: the address after the hook, network byte order.
    pub new_addr6_be: [u32; 4],
}
const _: () = assert!(size_of::<TraceEvent>() == 104);

/// Name of the socket hooks' configuration array (one [`SockConfig`] at index 0).
pub const MAP_SOCK_CONFIG: &str = "PXA_SOCKCFG_V1";
/// [`SockConfig::flags`]: the socket hooks serve only sockets of the host network namespace
/// (`--socket-lb-hostns-only`), leaving pods to a per-pod proxy such as an Istio sidecar.
pub const SOCK_F_HOSTNS_ONLY: u32 = 1;

/// How the socket hooks behave.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockConfig {
    /// `SO_NETNS_COOKIE` of the node's (the agent's) network namespace.
    pub host_netns_cookie: u64,
    /// `SOCK_F_*`.
    pub flags: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
}
const _: () = assert!(size_of::<SockConfig>() == 16);

/// Name of the north-south connection-tracking LRU map (see [`CtKey`]).
pub const MAP_CT: &str = "PXA_CT4_V1";
/// Capacity of the connection-tracking map: two entries per connection (the original direction
/// and one reply direction), so 131k concurrent north-south connections; an LRU map, so the
/// least recently used entries go first when it is full.
pub const CT_MAX_ENTRIES: u32 = 262_144;
/// Name of the node address set (IPv4 address, network order → 1): the addresses a NodePort
/// answers on, for the socket hooks (local clients) and the tc programs.
pub const MAP_NODE_ADDRS: &str = "PXA_NODEADDR_V1";
/// Capacity of the node address set.
pub const NODE_ADDRS_MAX_ENTRIES: u32 = 256;
/// Name of the north-south device map (ifindex → [`DeviceValue`]).
pub const MAP_DEVICES: &str = "PXA_NSDEV_V1";
/// Capacity of the device map.
pub const DEVICES_MAX_ENTRIES: u32 = 64;
/// Name of the `loadBalancerSourceRanges` LPM trie (see [`SourceRangeKey`]).
pub const MAP_SRC_RANGES: &str = "PXA_SRCRANGE_V1";
/// Capacity of the source range trie.
pub const SRC_RANGES_MAX_ENTRIES: u32 = 16_384;
/// First port used to SNAT connections to backends on other nodes (above Linux's default
/// ephemeral range 32768-60999, so the node's own connections never collide).
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Number of SNAT ports (61000-65535), per backend address and port.
pub const SNAT_PORT_COUNT: u16 = 4_536;

/// Connection-tracking direction: the client's packets to a frontend as they arrive on a
/// device; the value says where they go (backend, and the SNAT source if any).
pub const CT_DIR_ORIG: u8 = 0;
/// Connection-tracking direction: a reply of a backend on another node to the SNAT address and
/// port, arriving on a device; the value restores the client as destination and the frontend
/// as source.
pub const CT_DIR_REPLY_IN: u8 = 1;
/// Connection-tracking direction: a reply of a backend on this node to the client, leaving on a
/// device; the value restores the frontend as source.
pub const CT_DIR_REPLY_OUT: u8 = 2;

/// Lifetime of a TCP connection-tracking entry before the handshake completed, in seconds.
pub const CT_LIFETIME_SYN_S: u32 = 60;
/// Lifetime of an established TCP entry without traffic (Cilium's default), in seconds.
pub const CT_LIFETIME_TCP_S: u32 = 21_600;
/// Lifetime of a TCP entry after a FIN or RST, in seconds.
pub const CT_LIFETIME_CLOSE_S: u32 = 10;
/// Lifetime of a UDP entry without traffic, in seconds.
pub const CT_LIFETIME_UDP_S: u32 = 60;

/// Key of the connection-tracking map: a packet's 5-tuple as seen on the device, and the
/// direction it stands for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source address, network byte order.
    pub saddr_be: u32,
    /// Destination address, network byte order.
    pub daddr_be: u32,
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// `CT_DIR_*`.
    pub dir: u8,
    /// Explicit padding; always 0.
    pub _pad: u16,
}
const _: () = assert!(size_of::<CtKey>() == 16);

/// Value of the connection-tracking map: how to rewrite a matching packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` of the last packet that refreshed the entry.
    pub last_seen_ns: u64,
    /// Backend id chosen for the connection.
    pub backend_id: u32,
    /// Service id of the frontend.
    pub service_id: u32,
    /// New destination address (0: unchanged), network byte order.
    pub dst_addr_be: u32,
    /// New source address (0: unchanged), network byte order.
    pub src_addr_be: u32,
    /// New destination port, network byte order (with `dst_addr_be`).
    pub dst_port_be: u16,
    /// New source port, network byte order (with `src_addr_be`).
    pub src_port_be: u16,
    /// Seconds without traffic after which the entry is void (`CT_LIFETIME_*`).
    pub lifetime_s: u32,
}
const _: () = assert!(size_of::<CtValue>() == 32);

/// Value of the device map: a device whose traffic from outside the tc programs serve.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DeviceValue {
    /// The device's IPv4 address, used as the SNAT source, network byte order.
    pub addr_be: u32,
}
const _: () = assert!(size_of::<DeviceValue>() == 4);

/// Data of the source-range LPM trie key: the service id, then the client prefix. The trie's
/// prefix length counts 32 bits for the service id plus the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// [`ServiceValue::service_id`], network byte order (LPM tries compare bytes in order).
    pub service_id_be: u32,
    /// Client prefix, network byte order.
    pub addr_be: u32,
}
const _: () = assert!(size_of::<SourceRangeKey>() == 8);

/// The [`AffinityKey::netns_cookie`] of a north-south client: its address with the top bit
/// set, apart from the netns cookies of pods (the kernel counts those up from 1).
#[inline(always)]
pub const fn external_affinity_id(addr_be: u32) -> u64 {
    (1u64 << 63) | addr_be as u64
}

/// Picks a backend slot in `1..=count` from a 32-bit random or hash value without a division.
///
/// Returns 0 when `count` is 0 (no backend).
#[inline(always)]
pub const fn pick_slot(random: u32, count: u16) -> u16 {
    if count == 0 {
        return 0;
    }
    (((random as u64) * (count as u64)) >> 32) as u16 + 1
}

/// The slot range to balance over, from a master entry: the active backends if any, else the
/// terminating-but-serving ones (KEP-1669). Returns `(first_slot, len)`; `len == 0` means none.
#[inline(always)]
pub const fn usable_slots(master: &ServiceValue) -> (u16, u16) {
    if master.count > 0 {
        (1, master.count)
    } else {
        (master.count + 1, master.terminating_count)
    }
}

/// A 32-bit mix of a 64-bit value (splitmix64 finaliser), for stable per-socket choices.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u32 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x as u32
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are `repr(C)`, `Copy`, made only of integers with explicit padding, so
    // every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for RevKey {}
    unsafe impl aya::Pod for RevValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for L7Config {}
    unsafe impl aya::Pod for OrigKey {}
    unsafe impl aya::Pod for TraceEvent {}
    unsafe impl aya::Pod for SockConfig {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for DeviceValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for BackendValue6 {}
    unsafe impl aya::Pod for RevKey6 {}
    unsafe impl aya::Pod for RevValue6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_slot_covers_the_range_evenly() {
        for count in [1u16, 2, 3, 7, 10, 1000] {
            let mut hits = [0u32; 1001];
            // A uniform sweep of the 32-bit input space.
            let steps = 100_000u64;
            for i in 0..steps {
                let r = ((i * (u32::MAX as u64 + 1)) / steps) as u32;
                let s = pick_slot(r, count);
                assert!(s >= 1 && s <= count, "slot {s} out of 1..={count}");
                hits[s as usize] += 1;
            }
            let expect = steps as f64 / count as f64;
            for (s, &h) in hits.iter().enumerate().take(count as usize + 1).skip(1) {
                // A uniform sweep may only be off by the rounding of one step.
                let dev = (h as f64 - expect).abs();
                assert!(
                    dev <= 1.0,
                    "count={count} slot={s} hits={h} expect={expect}"
                );
            }
        }
        assert_eq!(pick_slot(u32::MAX, 0), 0);
        assert_eq!(pick_slot(u32::MAX, 3), 3);
        assert_eq!(pick_slot(0, 3), 1);
    }

    #[test]
    fn terminating_backends_are_used_only_without_active_ones() {
        let mut m = ServiceValue {
            count: 2,
            terminating_count: 1,
            ..Default::default()
        };
        assert_eq!(usable_slots(&m), (1, 2));
        m.count = 0;
        assert_eq!(usable_slots(&m), (1, 1));
        m.terminating_count = 0;
        assert_eq!(usable_slots(&m), (1, 0));
    }

    #[test]
    fn key_is_network_order() {
        let k = ServiceKey::new(0xc613_000a, 80, PROTO_TCP, 0);
        assert_eq!(k.addr_be.to_ne_bytes(), [198, 19, 0, 10]);
        assert_eq!(k.port_be.to_ne_bytes(), [0, 80]);
    }

    #[test]
    fn mix_spreads_sequential_cookies() {
        let mut hits = [0u32; 3];
        for c in 0..30_000u64 {
            hits[(pick_slot(mix64(c), 3) - 1) as usize] += 1;
        }
        for h in hits {
            assert!((9_000..11_000).contains(&h), "{hits:?}");
        }
    }
}
