//! The maps of the L7 redirect: where HTTP Services are sent (the proxy's address), the proxy's
//! listening socket (its liveness, as the kernel sees it) and the original destinations the
//! proxy reads after accept.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::Context as _;
use aya::maps::{Array, HashMap as AyaHashMap, MapData, SockMap};
use proxy_common::{L7Config, OrigKey, RevValue};

use crate::proxy::OrigDst;

/// Maps of the L7 redirect path.
pub struct L7Maps {
    /// Redirect target (index 0).
    pub config: Array<MapData, L7Config>,
    /// The proxy's listening socket (index 0).
    pub proxy_sock: SockMap<MapData>,
    /// Original destinations by client address.
    pub orig_dst: AyaHashMap<MapData, OrigKey, RevValue>,
}

impl L7Maps {
    /// Redirects HTTP Services to `addr` and publishes `listener` as the proxy's socket
    /// (replacing an earlier agent's: a hand-over). From here on the kernel sends L7 connects
    /// to the proxy; it removes the socket from the map when the process dies (closing every
    /// listener of its group), and connects fall back to in-kernel balancing at once. Returns
    /// the original-destination lookup for the proxy and the handle that withdraws it.
    pub fn publish(
        mut self,
        addr: SocketAddrV4,
        listeners: &[std::net::TcpListener],
    ) -> anyhow::Result<(MapOrigDst, Publication)> {
        let listener = listeners.first().context("no proxy listener")?;
        let redirect = L7Config {
            proxy_addr_be: u32::from(*addr.ip()).to_be(),
            proxy_port_be: addr.port().to_be(),
            _pad: 0,
        };
        self.config
            .set(0, redirect, 0)
            .context("writing the L7 redirect configuration")?;
        self.proxy_sock
            .set(0, listener, 0)
            .context("publishing the proxy listener to the datapath")?;
        let own = listeners
            .iter()
            .map(|l| socket_inode(l.as_raw_fd()))
            .collect::<std::io::Result<_>>()
            .context("reading the proxy listeners' inodes")?;
        Ok((
            MapOrigDst(self.orig_dst),
            Publication {
                sock: self.proxy_sock,
                addr,
                own,
            },
        ))
    }

    /// Turns the redirect off: every Service is balanced in the kernel.
    pub fn disable(mut self) -> anyhow::Result<()> {
        self.config
            .set(0, L7Config::default(), 0)
            .context("clearing the L7 redirect configuration")
    }
}

/// The proxy's entry in the redirect sockmap, to withdraw when the proxy drains.
pub struct Publication {
    sock: SockMap<MapData>,
    addr: SocketAddrV4,
    /// Socket inodes of this process's listeners.
    own: Vec<u64>,
}

impl Publication {
    /// Stops new connects from being redirected to this proxy, unless another agent's proxy
    /// listens on the same address (a hand-over: the entry is, or will be, the new one's, and
    /// the kernel migrates what our listeners still queue when they close). Returns whether
    /// the entry was withdrawn (connects now go to in-kernel balancing).
    pub fn withdraw(&mut self) -> anyhow::Result<bool> {
        let listening = super::sockets::tcp_listeners(self.addr)
            .context("listing the TCP listeners (sock_diag)")?;
        if listening.iter().any(|i| !self.own.contains(i)) {
            return Ok(false);
        }
        match self.sock.clear_index(&0) {
            Ok(()) => Ok(true),
            // Gone already (the socket closed).
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(true)
            }
            Err(e) => Err(e).context("removing the proxy listener from the redirect map"),
        }
    }
}

/// The inode of the socket behind `fd` (as sock_diag reports it).
fn socket_inode(fd: std::os::fd::RawFd) -> std::io::Result<u64> {
    // SAFETY: fstat on an open descriptor into a zeroed local struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.st_ino)
}

/// The original-destination map of the datapath, read once after each accept: one
/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` per connection, no lock (every proxy worker calls it).
pub struct MapOrigDst(AyaHashMap<MapData, OrigKey, RevValue>);

impl OrigDst for MapOrigDst {
    fn take(&self, client: SocketAddrV4) -> Option<SocketAddrV4> {
        #[repr(C)]
        struct Attr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
        let key = OrigKey {
            addr_be: u32::from(*client.ip()).to_be(),
            port_be: client.port().to_be(),
            _pad: 0,
        };
        let mut v = RevValue::default();
        let map: &MapData = aya::maps::IterableMap::map(&self.0);
        let attr = Attr {
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const OrigKey as u64,
            value: &mut v as *mut RevValue as u64,
            flags: 0,
        };
        // SAFETY: the attribute points at a key and a value of the map's sizes, both alive
        // for the call; the kernel writes only the value.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                &attr as *const Attr,
                std::mem::size_of::<Attr>(),
            )
        };
        (r == 0).then(|| {
            SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v.addr_be)),
                u16::from_be(v.port_be),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_diag_finds_the_listeners_on_an_address() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match a.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let found = super::super::sockets::tcp_listeners(addr).unwrap();
        assert_eq!(found, vec![socket_inode(a.as_raw_fd()).unwrap()]);
        assert!(!found.contains(&socket_inode(other.as_raw_fd()).unwrap()));
    }
}
