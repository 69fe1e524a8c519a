//! Host facts and small helpers: root check, cgroup2/bpffs mounts, `ip`, binary lookup, polling.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Prefix of every resource the harness creates.
pub const PREFIX: &str = "pxt";

/// Panics with the reason unless running as root: privileged tests must never pass silently.
pub fn require_root() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!(
            "this test needs root: it creates network namespaces, cgroups and bpffs pins and loads \
             eBPF programs (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF). Run it as root, e.g. \
             `sudo -E cargo xtask test`"
        );
    }
}

/// The cgroup2 mount point from /proc/mounts.
pub fn cgroup2_root() -> PathBuf {
    mount_of("cgroup2").expect("no cgroup2 file system mounted (see /proc/mounts); mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`")
}

/// The bpffs mount point, mounting /sys/fs/bpf if no bpffs is mounted.
pub fn bpffs_root() -> PathBuf {
    if let Some(p) = mount_of("bpf") {
        return p;
    }
    let p = PathBuf::from("/sys/fs/bpf");
    let st = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&p)
        .status();
    assert!(
        st.is_ok_and(|s| s.success()),
        "no bpffs mounted and `mount -t bpf bpf /sys/fs/bpf` failed"
    );
    p
}

fn mount_of(fstype: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == fstype).then(|| PathBuf::from(f[1]))
    })
}

/// Runs `ip ARGS`, panicking with the command and its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` (install iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Directory holding the workspace binaries (`proxy-agent`, `fixture`).
///
/// `PXT_BIN_DIR` wins; else the directory of the running executable (or its parent when it is
/// a test binary under `deps/`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("PXT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, with a clear message if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build -p proxy-agent -p tests --bins`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

/// Polls `f` until it returns `Some`, panicking with `what` after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Whether a process with this PID exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Resident set size of a process in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of a process so far, in clock ticks (USER_HZ, 100 per second).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|x| x.1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // After the command name: state(0) ppid(1) ... utime(11) stime(12).
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    t(11) + t(12)
}

/// CPU seconds (user + system) of a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_ticks(pid) as f64 / 100.0
}
