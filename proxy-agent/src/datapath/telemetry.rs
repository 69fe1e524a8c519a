//! What the kernel datapath tells about itself: per-CPU decision counters, how full each map
//! is, and the monitor ring buffer (socket translations, written only while a reader is
//! attached).

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use proxy_common::{STATS_COUNT, TraceEvent};
use serde::Serialize;

use super::maps::MapError;

/// Names of the decision counters, by index (`proxy_common::STAT_*`).
pub const COUNTER_NAMES: [&str; 23] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "refused_no_backend",
    "l7_redirect",
    "l7_fallback_proxy_down",
    "proxy_port_refused",
    "monitor_events",
    "monitor_events_lost",
    "orig_dst_published",
    "nodeport_local",
    "nodeport_remote_snat",
    "nodeport_reply",
    "nodeport_drop_no_backend",
    "nodeport_drop_source_range",
    "nodeport_drop_no_snat_port",
    "nodeport_drop_no_route",
    "conntrack_new",
];

/// The maps whose occupancy is reported, with what they hold.
pub const SIZED_MAPS: [(&str, &str); 11] = [
    (
        proxy_common::MAP_SERVICES,
        "service entries (masters and slots)",
    ),
    (proxy_common::MAP_BACKENDS, "backends"),
    (proxy_common::MAP_REVERSE, "reverse translations (LRU)"),
    (
        proxy_common::MAP_SERVICES6,
        "IPv6 service entries (masters and slots)",
    ),
    (proxy_common::MAP_BACKENDS6, "IPv6 backends"),
    (
        proxy_common::MAP_REVERSE6,
        "IPv6 reverse translations (LRU)",
    ),
    (
        proxy_common::MAP_AFFINITY,
        "ClientIP affinity entries (LRU)",
    ),
    (proxy_common::MAP_AFFINITY_MATCH, "affinity memberships"),
    (
        proxy_common::MAP_ORIG_DST,
        "original destinations for the proxy (LRU)",
    ),
    (
        proxy_common::MAP_CT,
        "north-south connection tracking (LRU)",
    ),
    (
        proxy_common::MAP_SRC_RANGES,
        "loadBalancerSourceRanges prefixes",
    ),
];

/// Entries of one map against its capacity.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MapUsage {
    /// Map name.
    pub name: String,
    /// Entries now.
    pub entries: u64,
    /// `max_entries`.
    pub capacity: u32,
}

/// How full each map pinned under `bpffs` is (one key walk per map).
pub fn occupancy(bpffs: &Path) -> Result<Vec<MapUsage>, MapError> {
    let dir = bpffs.join("maps");
    SIZED_MAPS
        .iter()
        .map(|(name, _)| {
            let err = |detail: String| MapError {
                op: "count",
                map: name,
                detail,
            };
            let data = MapData::from_pin(dir.join(name)).map_err(|e| err(e.to_string()))?;
            let info = data.info().map_err(|e| err(e.to_string()))?;
            let entries = count_keys(&data, info.key_size()).map_err(|e| err(e.to_string()))?;
            Ok(MapUsage {
                name: name.to_string(),
                entries,
                capacity: info.max_entries(),
            })
        })
        .collect()
}

/// Counts the keys of a map with `BPF_MAP_GET_NEXT_KEY`.
fn count_keys(map: &MapData, key_size: u32) -> std::io::Result<u64> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let fd = map.fd().as_fd().as_raw_fd();
    let mut cur = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0u64;
    let mut first = true;
    loop {
        let attr = Attr {
            map_fd: fd as u32,
            _pad: 0,
            key: if first { 0 } else { cur.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the attribute points at two buffers of the map's key size that outlive the
        // call; the kernel writes at most key_size bytes into `next`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const Attr,
                std::mem::size_of::<Attr>(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(n),
                _ => Err(e),
            };
        }
        n += 1;
        first = false;
        std::mem::swap(&mut cur, &mut next);
    }
}

/// The per-CPU decision counters.
pub struct Counters(PerCpuArray<MapData, u64>);

impl Counters {
    /// Wraps the loaded map.
    pub fn new(map: PerCpuArray<MapData, u64>) -> Self {
        Self(map)
    }

    /// Opens the counters pinned under `bpffs`.
    pub fn open(bpffs: &Path) -> Result<Self, MapError> {
        let name = proxy_common::MAP_STATS;
        let err = |detail: String| MapError {
            op: "open",
            map: name,
            detail,
        };
        let data =
            MapData::from_pin(bpffs.join("maps").join(name)).map_err(|e| err(e.to_string()))?;
        let map = aya::maps::Map::from_map_data(data).map_err(|e| err(e.to_string()))?;
        Ok(Self(
            PerCpuArray::try_from(map).map_err(|e| err(e.to_string()))?,
        ))
    }

    /// Every counter summed over CPUs, by index.
    pub fn read(&self) -> Result<[u64; STATS_COUNT as usize], MapError> {
        let mut out = [0u64; STATS_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = self.0.get(&(i as u32), 0).map_err(|e| MapError {
                op: "lookup",
                map: proxy_common::MAP_STATS,
                detail: e.to_string(),
            })?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }
}

/// The monitor: its switch and its ring buffer.
pub struct Monitor {
    switch: Array<MapData, u32>,
    ring: Option<RingBuf<MapData>>,
}

impl Monitor {
    /// Wraps the loaded maps; the switch starts off (a monitor of an earlier agent may have
    /// left it on).
    pub fn new(mut switch: Array<MapData, u32>, ring: RingBuf<MapData>) -> Result<Self, MapError> {
        switch.set(0, 0, 0).map_err(|e| MapError {
            op: "insert",
            map: proxy_common::MAP_MONITOR,
            detail: e.to_string(),
        })?;
        Ok(Self {
            switch,
            ring: Some(ring),
        })
    }

    /// Turns event writing in the kernel on or off.
    pub fn set_enabled(&mut self, on: bool) -> Result<(), MapError> {
        self.switch.set(0, u32::from(on), 0).map_err(|e| MapError {
            op: "insert",
            map: proxy_common::MAP_MONITOR,
            detail: e.to_string(),
        })
    }

    /// Takes the ring buffer (for the reader task).
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Option<TraceEvent> {
    if bytes.len() < std::mem::size_of::<TraceEvent>() {
        return None;
    }
    // SAFETY: TraceEvent is plain integers (every bit pattern is valid); the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TraceEvent>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_a_name() {
        assert!(COUNTER_NAMES.len() <= STATS_COUNT as usize);
        assert_eq!(
            COUNTER_NAMES[proxy_common::STAT_ORIG_DST as usize],
            "orig_dst_published"
        );
        assert_eq!(
            COUNTER_NAMES[proxy_common::STAT_L7_FALLBACK as usize],
            "l7_fallback_proxy_down"
        );
    }

    #[test]
    fn short_records_are_not_decoded() {
        assert!(decode(&[0u8; 10]).is_none());
        let ev = TraceEvent {
            pid: 42,
            ..Default::default()
        };
        // SAFETY: viewing a plain struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const TraceEvent).cast::<u8>(),
                std::mem::size_of::<TraceEvent>(),
            )
        };
        assert_eq!(decode(bytes).unwrap().pid, 42);
    }
}
