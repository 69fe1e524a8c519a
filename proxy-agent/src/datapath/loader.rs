//! Loads the embedded eBPF object, pins its maps and program links under a bpffs directory and
//! attaches the programs to a cgroup v2 directory.
//!
//! Pin layout under `--bpffs DIR`:
//! - `DIR/maps/<MAP>`: the maps (reused on restart, so the datapath state survives the agent);
//! - `DIR/links/<program>-<object hash>`: one cgroup link per program;
//! - `DIR/links/<program>@<device>-<object hash>`: the tcx links of the north-south programs on
//!   each device.
//!
//! On start, a link pinned by an agent with the same object is adopted as is (no detach, no
//! re-attach: traffic is never unprotected). A link of another object version is replaced
//! hitlessly: the new program is attached next to it first (cgroup links run as a list; the old
//! and new programs compose because a translated address is no longer a ClusterIP), then the old
//! link is unpinned and released.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use aya::maps::{Array, PerCpuArray, RingBuf, SockMap};
use aya::maps::{HashMap as AyaHashMap, Map, MapData};
use aya::programs::{
    CgroupAttachMode, CgroupSock, CgroupSockAddr, SchedClassifier, SockOps, TcAttachType,
    links::FdLink, links::PinnedLink,
};
use aya::{Ebpf, EbpfLoader};
use tracing::{info, warn};

use super::devices::{self, Device};
use super::l7::L7Maps;
use super::maps::AyaMaps;
use super::telemetry::{Counters, Monitor};

/// The eBPF object built by `build.rs` from `proxy-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The programs of the object, all attached to the cgroup.
pub const PROGRAMS: [&str; 10] = [
    "pxa_sockops",
    "pxa_sock_release",
    "pxa_connect4",
    "pxa_connect6",
    "pxa_sendmsg4",
    "pxa_sendmsg6",
    "pxa_recvmsg4",
    "pxa_recvmsg6",
    "pxa_getpeername4",
    "pxa_getpeername6",
];

/// The north-south programs, attached with tcx to each device: (program, direction).
pub const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("pxa_ns_ingress", TcAttachType::Ingress),
    ("pxa_ns_egress", TcAttachType::Egress),
];

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why the datapath could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// `--cgroup` is not a cgroup v2 directory.
    #[error(
        "{0} is not a cgroup v2 directory: pass a directory under the cgroup2 mount (see /proc/mounts); in a pod, mount the node's cgroup2 there as a hostPath (deploy/daemonset.yaml does)"
    )]
    NotCgroup2(PathBuf),
    /// `--bpffs` is not on a bpf filesystem.
    #[error(
        "{0} is not on a bpf filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf`; in a pod, mount the node's /sys/fs/bpf as a hostPath (deploy/daemonset.yaml does)"
    )]
    NotBpffs(PathBuf),
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel refused the object or a program.
    #[error(
        "loading the eBPF object failed (is this a kernel >= 5.19 with BTF, and are we root?): {0}"
    )]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// The error.
        source: aya::programs::ProgramError,
    },
    /// A link could not be pinned or opened.
    #[error("link pin {path}: {detail}")]
    Link {
        /// Pin path.
        path: PathBuf,
        /// The error.
        detail: String,
    },
    /// A map is missing from the object or has an unexpected type.
    #[error("map {0}: {1}")]
    Map(&'static str, String),
    /// `--devices` could not be resolved.
    #[error("north-south devices: {0}")]
    Devices(String),
    /// The process lacks capabilities the datapath needs.
    #[error(
        "missing capabilities {0}: the agent loads eBPF programs and maps (CAP_BPF), attaches them to the cgroup and publishes the proxy's socket (CAP_NET_ADMIN) and its programs use tracing helpers (CAP_PERFMON); CAP_SYS_ADMIN covers the first and the last. Add them to the container's securityContext.capabilities (deploy/daemonset.yaml does) or run as root"
    )]
    MissingCapabilities(String),
}

/// Checks that this process holds the capabilities the datapath needs (from
/// `/proc/self/status`), naming the missing ones.
pub fn check_capabilities() -> Result<(), DatapathError> {
    const NET_ADMIN: u32 = 12;
    const SYS_ADMIN: u32 = 21;
    const PERFMON: u32 = 38;
    const BPF: u32 = 39;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return Ok(()); // not Linux-like: let the kernel say
    };
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(BPF) && !has(SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(PERFMON) && !has(SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DatapathError::MissingCapabilities(missing.join(", ")))
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError {
    let path = path.to_path_buf();
    move |source| DatapathError::Io { what, path, source }
}

fn fs_magic(path: &Path) -> Result<i64, DatapathError> {
    let st = nix::sys::statfs::statfs(path)
        .map_err(|e| io("statfs", path)(std::io::Error::from_raw_os_error(e as i32)))?;
    Ok(st.filesystem_type().0 as i64)
}

/// A short, stable hash of the embedded object and the eBPF log level it is loaded with
/// (FNV-1a), naming the link pins: another level is another program, attached next to the old
/// one like a new version.
pub fn object_hash(bpf_log: BpfLog) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let level = [bpf_log as u8];
    let extra: &[u8] = if bpf_log == BpfLog::Off { &[] } else { &level };
    for b in OBJECT.iter().chain(extra) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", h as u32)
}

/// Level of the eBPF programs' debug logs (aya-log), forwarded to the agent's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BpfLog {
    /// No log statement runs (the default: the datapath pays one load per log site).
    #[default]
    Off = 0,
    /// Errors.
    Error = 1,
    /// Warnings.
    Warn = 2,
    /// Information.
    Info = 3,
    /// Refusals and proxy-down fallbacks.
    Debug = 4,
    /// Every translation.
    Trace = 5,
}

/// Forwards the eBPF programs' log records to the agent's log until dropped.
pub struct BpfLogger(aya_log::EbpfLogger<&'static dyn log::Log>);

impl BpfLogger {
    /// Starts forwarding, on the current tokio runtime.
    pub fn spawn(self) {
        // SAFETY: the logger owns its ring buffer fd until dropped, which happens only with
        // the AsyncFd owning it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self.0, tokio::io::Interest::READABLE)
        };
        let mut fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "cannot poll the eBPF log ring buffer");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
}

/// Everything [`Datapath::open`] returns.
pub struct Opened {
    /// The loaded object and its links.
    pub datapath: Datapath,
    /// The balancing maps, for the reconciler.
    pub maps: AyaMaps,
    /// The L7 redirect maps, for the proxy.
    pub l7: L7Maps,
    /// Decision counters.
    pub counters: Counters,
    /// The monitor switch and ring buffer.
    pub monitor: Monitor,
    /// The programs' debug logs, when a level was asked for.
    pub logger: Option<BpfLogger>,
}

/// The loaded datapath: maps open, programs attached and pinned.
pub struct Datapath {
    /// Keeps the object (and its map fds) alive.
    _ebpf: Ebpf,
    /// Where everything is pinned.
    pub bpffs: PathBuf,
    /// Whether the links were adopted from a previous agent rather than attached now.
    pub adopted: bool,
    /// Hash of the object (and log level) naming the links.
    pub object: String,
}

impl Datapath {
    /// Loads the object with its maps pinned under `bpffs/maps`, and attaches (or adopts) one
    /// link per program on `cgroup`. Returns the datapath and its maps.
    pub fn open(
        cgroup: &Path,
        bpffs: &Path,
        bpf_log: BpfLog,
        devices: &[Device],
        node_ip: Option<std::net::Ipv4Addr>,
        hostns_only: bool,
    ) -> Result<Opened, DatapathError> {
        check_capabilities()?;
        if !cgroup.exists() {
            return Err(DatapathError::NotCgroup2(cgroup.to_path_buf()));
        }
        if fs_magic(cgroup)? != CGROUP2_SUPER_MAGIC {
            return Err(DatapathError::NotCgroup2(cgroup.to_path_buf()));
        }
        fs::create_dir_all(bpffs).map_err(io("create", bpffs))?;
        if fs_magic(bpffs)? != BPF_FS_MAGIC {
            return Err(DatapathError::NotBpffs(bpffs.to_path_buf()));
        }
        let maps_dir = bpffs.join("maps");
        let links_dir = bpffs.join("links");
        fs::create_dir_all(&maps_dir).map_err(io("create", &maps_dir))?;
        fs::create_dir_all(&links_dir).map_err(io("create", &links_dir))?;

        let level = bpf_log as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global(aya_log::LEVEL, &level, true)
            .load(OBJECT)?;
        let hash = object_hash(bpf_log);
        let cgroup_fd = File::open(cgroup).map_err(io("open", cgroup))?;
        let mut adopted_all = true;
        for name in PROGRAMS {
            adopted_all &= ensure_link(&links_dir, name, &hash, || {
                attach(&mut ebpf, name, &cgroup_fd)
            })?;
        }
        for (name, dir) in TC_PROGRAMS {
            let mut loaded = false;
            for dev in devices {
                let pin_name = format!("{name}@{}", dev.name);
                adopted_all &= ensure_link(&links_dir, &pin_name, &hash, || {
                    attach_tc(&mut ebpf, name, dir, dev, &mut loaded)
                })?;
            }
            // Devices no longer named: their links go.
            for entry in fs::read_dir(&links_dir).map_err(io("list", &links_dir))? {
                let path = entry.map_err(io("list", &links_dir))?.path();
                let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Some(rest) = file.strip_prefix(&format!("{name}@")) else {
                    continue;
                };
                let dev = rest.rsplit_once('-').map_or(rest, |(d, _)| d);
                if !devices.iter().any(|d| d.name == dev) {
                    fs::remove_file(&path).map_err(io("remove", &path))?;
                    info!(pin = %path.display(), "detached from a device no longer in --devices");
                }
            }
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DatapathError::Map(name, "missing from the object".into()))
        };
        let l7 = L7Maps {
            config: Array::try_from(take(&mut ebpf, proxy_common::MAP_L7_CONFIG)?)
                .map_err(|e| DatapathError::Map(proxy_common::MAP_L7_CONFIG, e.to_string()))?,
            proxy_sock: SockMap::try_from(take(&mut ebpf, proxy_common::MAP_PROXY_SOCK)?)
                .map_err(|e| DatapathError::Map(proxy_common::MAP_PROXY_SOCK, e.to_string()))?,
            orig_dst: take_hash(&mut ebpf, proxy_common::MAP_ORIG_DST)?,
        };
        let maps = AyaMaps {
            services: take_hash(&mut ebpf, proxy_common::MAP_SERVICES)?,
            backends: take_hash(&mut ebpf, proxy_common::MAP_BACKENDS)?,
            services6: take_hash(&mut ebpf, proxy_common::MAP_SERVICES6)?,
            backends6: take_hash(&mut ebpf, proxy_common::MAP_BACKENDS6)?,
            affinity_match: take_hash(&mut ebpf, proxy_common::MAP_AFFINITY_MATCH)?,
            source_ranges: aya::maps::lpm_trie::LpmTrie::try_from(take(
                &mut ebpf,
                proxy_common::MAP_SRC_RANGES,
            )?)
            .map_err(|e| DatapathError::Map(proxy_common::MAP_SRC_RANGES, e.to_string()))?,
        };
        let mut sock_cfg: Array<MapData, proxy_common::SockConfig> =
            Array::try_from(take(&mut ebpf, proxy_common::MAP_SOCK_CONFIG)?)
                .map_err(|e| DatapathError::Map(proxy_common::MAP_SOCK_CONFIG, e.to_string()))?;
        let cfg = proxy_common::SockConfig {
            host_netns_cookie: own_netns_cookie().map_err(|e| {
                DatapathError::Map(
                    proxy_common::MAP_SOCK_CONFIG,
                    format!("SO_NETNS_COOKIE: {e}"),
                )
            })?,
            flags: if hostns_only {
                proxy_common::SOCK_F_HOSTNS_ONLY
            } else {
                0
            },
            _pad: 0,
        };
        sock_cfg
            .set(0, cfg, 0)
            .map_err(|e| DatapathError::Map(proxy_common::MAP_SOCK_CONFIG, e.to_string()))?;
        devices::program(
            devices,
            node_ip,
            &mut take_hash(&mut ebpf, proxy_common::MAP_DEVICES)?,
            &mut take_hash(&mut ebpf, proxy_common::MAP_NODE_ADDRS)?,
        )?;
        let map_err = |name: &'static str| {
            move |e: aya::maps::MapError| DatapathError::Map(name, e.to_string())
        };
        let counters = Counters::new(
            PerCpuArray::try_from(take(&mut ebpf, proxy_common::MAP_STATS)?)
                .map_err(map_err(proxy_common::MAP_STATS))?,
        );
        let monitor = Monitor::new(
            Array::try_from(take(&mut ebpf, proxy_common::MAP_MONITOR)?)
                .map_err(map_err(proxy_common::MAP_MONITOR))?,
            RingBuf::try_from(take(&mut ebpf, proxy_common::MAP_EVENTS)?)
                .map_err(map_err(proxy_common::MAP_EVENTS))?,
        )
        .map_err(|e| DatapathError::Map(proxy_common::MAP_MONITOR, e.to_string()))?;
        info!(
            cgroup = %cgroup.display(),
            bpffs = %bpffs.display(),
            object = %hash,
            adopted = adopted_all,
            "datapath attached"
        );
        // The links in force may be an earlier agent's: read the logs of the program they run.
        let logger = if bpf_log == BpfLog::Off {
            None
        } else {
            let pin = links_dir.join(format!("pxa_connect4-{hash}"));
            let prog = PinnedLink::from_pin(&pin)
                .map(FdLink::from)
                .map_err(|e| e.to_string())
                .and_then(|l| l.info().map_err(|e| e.to_string()))
                .map(|i| i.program_id());
            match prog
                .and_then(|id| aya_log::EbpfLogger::init_from_id(id).map_err(|e| e.to_string()))
            {
                Ok(l) => Some(BpfLogger(l)),
                Err(e) => {
                    warn!(error = %e, "cannot read the eBPF programs' logs");
                    None
                }
            }
        };
        Ok(Opened {
            logger,
            datapath: Self {
                _ebpf: ebpf,
                bpffs: bpffs.to_path_buf(),
                adopted: adopted_all,
                object: hash.clone(),
            },
            maps,
            l7,
            counters,
            monitor,
        })
    }
}

/// Keeps link `name` pinned for object `hash`: adopts the pin of an earlier agent with the same
/// object, or attaches with `attach` and pins it, then releases the pins of other object
/// versions. Returns whether the link was adopted.
fn ensure_link(
    links_dir: &Path,
    name: &str,
    hash: &str,
    attach: impl FnOnce() -> Result<FdLink, DatapathError>,
) -> Result<bool, DatapathError> {
    let pin = links_dir.join(format!("{name}-{hash}"));
    let stale: Vec<PathBuf> = fs::read_dir(links_dir)
        .map_err(io("list", links_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.rsplit_once('-')
                    .is_some_and(|(prog, h)| prog == name && h != hash)
            })
        })
        .collect();
    let adopted = pin.exists();
    if adopted {
        // Same object already attached by an earlier agent: keep it.
        PinnedLink::from_pin(&pin).map_err(|e| DatapathError::Link {
            path: pin.clone(),
            detail: e.to_string(),
        })?;
    } else {
        let fd_link = attach()?;
        fd_link.pin(&pin).map_err(|e| DatapathError::Link {
            path: pin.clone(),
            detail: e.to_string(),
        })?;
    }
    for old in stale {
        // The new link is in place; releasing the old pin detaches the old program.
        match PinnedLink::from_pin(&old).map(PinnedLink::unpin) {
            Ok(Ok(_fd_link)) => {
                info!(pin = %old.display(), "replaced a link of another agent version")
            }
            Ok(Err(e)) => warn!(pin = %old.display(), error = %e, "cannot unpin an old link"),
            Err(e) => warn!(pin = %old.display(), error = %e, "cannot open an old link"),
        }
    }
    Ok(adopted)
}

/// Loads tc program `name` (once) and attaches it with tcx to `dev` in direction `dir`.
fn attach_tc(
    ebpf: &mut Ebpf,
    name: &'static str,
    dir: TcAttachType,
    dev: &Device,
    loaded: &mut bool,
) -> Result<FdLink, DatapathError> {
    let prog_err = |source| DatapathError::Program { name, source };
    let program = ebpf.program_mut(name).ok_or(DatapathError::Map(
        name,
        "program missing from the object".into(),
    ))?;
    let prog: &mut SchedClassifier = program.try_into().map_err(prog_err)?;
    if !*loaded {
        prog.load().map_err(prog_err)?;
        *loaded = true;
    }
    // tcx (kernel >= 6.6): links compose with other programs on the device and can be pinned.
    let id = prog.attach(&dev.name, dir).map_err(prog_err)?;
    prog.take_link(id).map_err(prog_err)?.try_into().map_err(
        |e: aya::programs::links::LinkError| DatapathError::Link {
            path: PathBuf::from(format!("{name}@{}", dev.name)),
            detail: e.to_string(),
        },
    )
}

/// Loads program `name` and attaches it to the cgroup, returning its link.
fn attach(ebpf: &mut Ebpf, name: &'static str, cgroup_fd: &File) -> Result<FdLink, DatapathError> {
    let prog_err = |source| DatapathError::Program { name, source };
    let link_err = |e: aya::programs::links::LinkError| DatapathError::Link {
        path: PathBuf::from(name),
        detail: e.to_string(),
    };
    let program = ebpf.program_mut(name).ok_or(DatapathError::Map(
        name,
        "program missing from the object".into(),
    ))?;
    // With bpf_link (kernel >= 5.7) cgroup attachments always compose like BPF_F_ALLOW_MULTI and
    // the kernel rejects any flag, so the mode must be `Single` (flags 0) even though the link
    // sits next to others.
    tracing::debug!(name, kind = ?program.prog_type(), "attaching");
    if name == "pxa_sock_release" {
        let prog: &mut CgroupSock = program.try_into().map_err(prog_err)?;
        prog.load().map_err(prog_err)?;
        let id = prog
            .attach(cgroup_fd, CgroupAttachMode::Single)
            .map_err(prog_err)?;
        prog.take_link(id)
            .map_err(prog_err)?
            .try_into()
            .map_err(link_err)
    } else if name == "pxa_sockops" {
        let prog: &mut SockOps = program.try_into().map_err(prog_err)?;
        prog.load().map_err(prog_err)?;
        let id = prog
            .attach(cgroup_fd, CgroupAttachMode::Single)
            .map_err(prog_err)?;
        prog.take_link(id)
            .map_err(prog_err)?
            .try_into()
            .map_err(link_err)
    } else {
        let prog: &mut CgroupSockAddr = program.try_into().map_err(prog_err)?;
        prog.load().map_err(prog_err)?;
        let id = prog
            .attach(cgroup_fd, CgroupAttachMode::Single)
            .map_err(prog_err)?;
        prog.take_link(id)
            .map_err(prog_err)?
            .try_into()
            .map_err(link_err)
    }
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<AyaHashMap<MapData, K, V>, DatapathError> {
    let map: Map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Map(name, "missing from the object".into()))?;
    AyaHashMap::try_from(map).map_err(|e| DatapathError::Map(name, e.to_string()))
}

/// Opens the pinned maps of a running (or stopped) agent read-write, without loading programs.
pub fn open_pinned_maps(bpffs: &Path) -> Result<AyaMaps, DatapathError> {
    fn open<K: aya::Pod, V: aya::Pod>(
        dir: &Path,
        name: &'static str,
    ) -> Result<AyaHashMap<MapData, K, V>, DatapathError> {
        let path = dir.join(name);
        let data = MapData::from_pin(&path)
            .map_err(|e| DatapathError::Map(name, format!("{}: {e}", path.display())))?;
        AyaHashMap::try_from(Map::HashMap(data))
            .map_err(|e| DatapathError::Map(name, e.to_string()))
    }
    let dir = bpffs.join("maps");
    let ranges = dir.join(proxy_common::MAP_SRC_RANGES);
    let source_ranges = MapData::from_pin(&ranges)
        .map_err(|e| {
            DatapathError::Map(
                proxy_common::MAP_SRC_RANGES,
                format!("{}: {e}", ranges.display()),
            )
        })
        .and_then(|d| {
            aya::maps::lpm_trie::LpmTrie::try_from(Map::LpmTrie(d))
                .map_err(|e| DatapathError::Map(proxy_common::MAP_SRC_RANGES, e.to_string()))
        })?;
    Ok(AyaMaps {
        services: open(&dir, proxy_common::MAP_SERVICES)?,
        backends: open(&dir, proxy_common::MAP_BACKENDS)?,
        services6: open(&dir, proxy_common::MAP_SERVICES6)?,
        backends6: open(&dir, proxy_common::MAP_BACKENDS6)?,
        affinity_match: open(&dir, proxy_common::MAP_AFFINITY_MATCH)?,
        source_ranges,
    })
}

/// `SO_NETNS_COOKIE` of this process's network namespace (Linux >= 5.14).
fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the length passed, on a socket we own.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A pinned LRU map under `bpffs` by name.
fn open_lru<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &'static str,
) -> Result<AyaHashMap<MapData, K, V>, DatapathError> {
    let path = bpffs.join("maps").join(name);
    let data = MapData::from_pin(&path)
        .map_err(|e| DatapathError::Map(name, format!("{}: {e}", path.display())))?;
    AyaHashMap::try_from(Map::LruHashMap(data)).map_err(|e| DatapathError::Map(name, e.to_string()))
}

/// The pinned reverse-translation map, read-only use (which sockets we translated).
pub fn open_reverse_map(
    bpffs: &Path,
) -> Result<AyaHashMap<MapData, proxy_common::RevKey, proxy_common::RevValue>, DatapathError> {
    open_lru(bpffs, proxy_common::MAP_REVERSE)
}

/// The pinned IPv6 reverse-translation map (see [`open_reverse_map`]).
pub fn open_reverse_map6(
    bpffs: &Path,
) -> Result<AyaHashMap<MapData, proxy_common::RevKey6, proxy_common::RevValue6>, DatapathError> {
    open_lru(bpffs, proxy_common::MAP_REVERSE6)
}

/// Detaches and removes everything pinned under `bpffs` (links first, then maps).
///
/// Returns the number of pins removed. Safe to run when nothing is pinned.
pub fn cleanup(bpffs: &Path) -> Result<usize, DatapathError> {
    let mut removed = 0;
    if !bpffs.exists() {
        return Ok(0);
    }
    for sub in ["links", "maps"] {
        let dir = bpffs.join(sub);
        if !dir.exists() {
            continue;
        }
        for entry in fs::read_dir(&dir).map_err(io("list", &dir))? {
            let path = entry.map_err(io("list", &dir))?.path();
            // Removing the last reference to a link detaches its program; for maps it frees them.
            fs::remove_file(&path).map_err(io("remove", &path))?;
            removed += 1;
        }
        fs::remove_dir(&dir).map_err(io("remove", &dir))?;
    }
    fs::remove_dir(bpffs).map_err(io("remove", bpffs))?;
    Ok(removed)
}
