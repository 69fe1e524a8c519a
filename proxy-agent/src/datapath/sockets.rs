//! Terminating connected UDP sockets whose backend went away.
//!
//! Socket-level balancing pins a connected UDP socket to one backend at `connect()`: when that
//! backend is deleted, the socket keeps sending to an address nobody answers (Cilium's most
//! reported socket-LB problem: cilium/cilium#12859, #27300, #35773, DNS clients stuck on a
//! deleted CoreDNS pod). After the maps dropped a UDP backend, the agent finds the sockets in
//! every network namespace under its cgroup subtree that are connected to it *through a
//! translation of ours* (their cookie and peer are in `PXA_REVNAT_V1`) and destroys them with
//! sock_diag's `SOCK_DESTROY` (CONFIG_INET_DIAG_DESTROY). The application's next call fails
//! with `ECONNABORTED`; a resolver that then reconnects is balanced to a live backend.
//!
//! BPF socket iterators with `bpf_sock_destroy` would do this from the kernel, but need the
//! `tracing` program type, which not every kernel offers; netlink works everywhere, one network
//! namespace at a time (a short-lived thread enters each).

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use tracing::{debug, info, warn};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `TCP_ESTABLISHED`: the state of a connected UDP socket in sock_diag.
const UDP_CONNECTED: u32 = 1;

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct SockId {
    sport_be: u16,
    dport_be: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_msg` (the part we read).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// A connected UDP socket found in a namespace.
#[derive(Clone, Copy, Debug)]
pub struct Found {
    /// Socket cookie.
    pub cookie: u64,
    /// Peer (the backend after translation); IPv4 for an IPv4-mapped peer of an IPv6 socket.
    pub peer: (IpAddr, u16),
    family: u8,
    id: SockId,
}

fn request(ty: u16, flags: u16, req: &DiagReq) -> Vec<u8> {
    let len = std::mem::size_of::<NlHdr>() + std::mem::size_of::<DiagReq>();
    let hdr = NlHdr {
        len: len as u32,
        ty,
        flags,
        seq: 1,
        pid: 0,
    };
    let mut buf = Vec::with_capacity(len);
    // SAFETY: both are repr(C) plain integers without padding holes that matter to the kernel
    // (explicit `pad` fields are zeroed).
    unsafe {
        buf.extend_from_slice(std::slice::from_raw_parts(
            (&hdr as *const NlHdr).cast::<u8>(),
            std::mem::size_of::<NlHdr>(),
        ));
        buf.extend_from_slice(std::slice::from_raw_parts(
            (req as *const DiagReq).cast::<u8>(),
            std::mem::size_of::<DiagReq>(),
        ));
    }
    buf
}

fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sending an initialised buffer on our socket (to the kernel: the default peer).
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads netlink messages until DONE (dumps) or the first ACK/error; calls `each` with every
/// payload of type `SOCK_DIAG_BY_FAMILY`.
fn receive(fd: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + std::mem::size_of::<NlHdr>() <= n {
            // SAFETY: bounds checked above; read_unaligned copes with any alignment.
            let h: NlHdr = unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
            let len = h.len as usize;
            if len < std::mem::size_of::<NlHdr>() || off + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink message",
                ));
            }
            let payload = &buf[off + std::mem::size_of::<NlHdr>()..off + len];
            match h.ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = if payload.len() >= 4 {
                        i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]])
                    } else {
                        0
                    };
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                SOCK_DIAG_BY_FAMILY => each(payload),
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// Connected UDP sockets of `family` (`AF_INET`, `AF_INET6`) in the current network namespace.
fn connected_udp(fd: &OwnedFd, family: u8) -> io::Result<Vec<Found>> {
    let req = DiagReq {
        family,
        protocol: libc::IPPROTO_UDP as u8,
        states: 1 << UDP_CONNECTED,
        ..Default::default()
    };
    send(
        fd,
        &request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req),
    )?;
    let mut out = Vec::new();
    receive(fd, |p| {
        if p.len() < std::mem::size_of::<DiagMsg>() {
            return;
        }
        // SAFETY: length checked.
        let m: DiagMsg = unsafe { std::ptr::read_unaligned(p.as_ptr().cast()) };
        let addr: IpAddr = if family == libc::AF_INET as u8 {
            Ipv4Addr::from(u32::from_be(m.id.dst[0])).into()
        } else {
            let a = crate::datapath::maps::from_words(m.id.dst);
            a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)
        };
        out.push(Found {
            cookie: m.id.cookie[0] as u64 | (m.id.cookie[1] as u64) << 32,
            peer: (addr, u16::from_be(m.id.dport_be)),
            family,
            id: m.id,
        });
    })?;
    Ok(out)
}

/// `TCP_LISTEN` in sock_diag's state numbering.
const TCP_LISTEN: u32 = 10;

/// Socket inodes of the TCP listeners on `addr` in the current network namespace (the
/// kernel filters by state: no walk over established or TIME_WAIT sockets, unlike
/// `/proc/net/tcp`).
pub fn tcp_listeners(addr: std::net::SocketAddrV4) -> io::Result<Vec<u64>> {
    let fd = diag_socket()?;
    let req = DiagReq {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_TCP as u8,
        states: 1 << TCP_LISTEN,
        ..Default::default()
    };
    send(
        &fd,
        &request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req),
    )?;
    let mut out = Vec::new();
    receive(&fd, |p| {
        if p.len() < std::mem::size_of::<DiagMsg>() {
            return;
        }
        // SAFETY: length checked.
        let m: DiagMsg = unsafe { std::ptr::read_unaligned(p.as_ptr().cast()) };
        let local = std::net::SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(m.id.src[0])),
            u16::from_be(m.id.sport_be),
        );
        if local == addr {
            out.push(u64::from(m.inode));
        }
    })?;
    Ok(out)
}

fn destroy(fd: &OwnedFd, s: &Found) -> io::Result<()> {
    let req = DiagReq {
        family: s.family,
        protocol: libc::IPPROTO_UDP as u8,
        states: u32::MAX,
        id: s.id,
        ..Default::default()
    };
    send(fd, &request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req))?;
    receive(fd, |_| {})
}

/// The distinct network namespaces of the processes in `cgroup` and below, as open
/// `/proc/PID/ns/net` files.
fn namespaces(cgroup: &Path) -> Vec<File> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut stack = vec![cgroup.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let path = format!("/proc/{pid}/ns/net");
                let Ok(f) = File::open(&path) else { continue };
                let Ok(meta) = f.metadata() else { continue };
                if seen.insert((meta.dev(), meta.ino())) {
                    out.push(f);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

/// Destroys the connected UDP sockets under `cgroup` whose peer is one of `gone` and that
/// `translated` (a REVNAT lookup by cookie and peer) says we pinned there. Returns how many.
pub fn terminate_udp(
    cgroup: &Path,
    gone: &BTreeSet<(IpAddr, u16)>,
    translated: &(dyn Fn(u64, IpAddr, u16) -> bool + Sync),
) -> usize {
    if gone.is_empty() {
        return 0;
    }
    let mut total = 0;
    for ns in namespaces(cgroup) {
        // A thread of its own enters the namespace: setns changes only the calling thread,
        // and this one ends afterwards.
        let result = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<usize> {
                // SAFETY: setns on this thread with an open namespace file.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                let fd = diag_socket()?;
                let mut n = 0;
                let mut found = connected_udp(&fd, libc::AF_INET as u8)?;
                found.extend(connected_udp(&fd, libc::AF_INET6 as u8)?);
                for s in found {
                    if !gone.contains(&s.peer) || !translated(s.cookie, s.peer.0, s.peer.1) {
                        continue;
                    }
                    match destroy(&fd, &s) {
                        Ok(()) => {
                            debug!(cookie = s.cookie, peer = %std::net::SocketAddr::new(s.peer.0, s.peer.1), "destroyed a UDP socket pinned to a removed backend");
                            n += 1;
                        }
                        Err(e) => warn!(error = %e, "SOCK_DESTROY failed (is CONFIG_INET_DIAG_DESTROY set?)"),
                    }
                }
                Ok(n)
            })
            .join()
        });
        match result {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => warn!(error = %e, "cannot list the UDP sockets of a network namespace"),
            Err(_) => warn!("the socket termination thread panicked"),
        }
    }
    if total > 0 {
        info!(
            sockets = total,
            backends = gone.len(),
            "terminated connected UDP sockets of removed backends"
        );
    }
    total
}
