//! Removal of what the harness creates, and of left-overs of crashed runs.
//!
//! Every resource is named `pxt<owner pid>-…`; a resource whose owner process is gone is a
//! left-over. Processes inside left-over cgroups are killed by PID (read from cgroup.procs).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::sys::{self, PREFIX};

/// The owner PID encoded in a `pxt<pid>-…` name.
fn owner(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes every `pxt…` resource whose owner process no longer exists.
pub fn remove_stale() {
    let stale = |n: &String| owner(n).is_some_and(|pid| !sys::pid_alive(pid));
    let cg = sys::cgroup2_root();
    for n in names_in(&cg).into_iter().filter(stale) {
        eprintln!("removing left-over cgroup {n}");
        let _ = kill_cgroup_tree(&cg.join(&n));
        let _ = remove_cgroup_tree(&cg.join(&n));
    }
    for n in names_in(Path::new("/run/netns")).into_iter().filter(stale) {
        eprintln!("removing left-over netns {n}");
        let _ = remove_netns(&n);
    }
    let bpffs = sys::bpffs_root();
    for n in names_in(&bpffs).into_iter().filter(stale) {
        eprintln!("removing left-over pins {n}");
        let _ = remove_pins(&bpffs.join(&n));
    }
    for n in names_in(&std::env::temp_dir()).into_iter().filter(stale) {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(n));
    }
}

fn cgroup_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_pids(&e.path(), out);
            }
        }
    }
}

/// SIGKILLs every process in a cgroup subtree (by PID) and waits until the subtree is empty.
pub fn kill_cgroup_tree(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids = Vec::new();
        cgroup_pids(dir, &mut pids);
        if pids.is_empty() {
            return Ok(());
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if Instant::now() > deadline {
            return Err(format!(
                "processes {pids:?} in {} did not exit",
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes a cgroup directory and its children (they must be empty of processes).
pub fn remove_cgroup_tree(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    // A cgroup whose last process just exited can be busy for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("rmdir {}: {e}", dir.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Deletes a network namespace (`ip netns del`).
pub fn remove_netns(name: &str) -> Result<(), String> {
    if !Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    let out = std::process::Command::new("ip")
        .args(["netns", "del", name])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip netns del {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes a bpffs pin directory tree (unpinning links detaches their programs).
pub fn remove_pins(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(dir).map_err(|e| format!("remove {}: {e}", dir.display()))
}

/// Every `pxt…` resource present: netns, cgroups, pins, scratch dirs and processes in our cgroups.
pub fn list_all() -> Vec<String> {
    let mut out = Vec::new();
    for n in names_in(Path::new("/run/netns")) {
        out.push(format!("netns {n}"));
    }
    let cg = sys::cgroup2_root();
    for n in names_in(&cg) {
        let mut pids = Vec::new();
        cgroup_pids(&cg.join(&n), &mut pids);
        out.push(format!("cgroup {n} (processes {pids:?})"));
    }
    for n in names_in(&sys::bpffs_root()) {
        out.push(format!("bpffs pins {n}"));
    }
    for n in names_in(&std::env::temp_dir()) {
        out.push(format!(
            "scratch dir {}",
            std::env::temp_dir().join(n).display()
        ));
    }
    // Processes whose cgroup is one of ours, even if the cgroup listing raced.
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<u32>().is_err() {
                continue;
            }
            let zombie = std::fs::read_to_string(e.path().join("status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z'))
            });
            if let Ok(c) = std::fs::read_to_string(e.path().join("cgroup"))
                && let Some(ours) = c
                    .lines()
                    .find(|l| l.starts_with("0::/") && l.contains(&format!("/{PREFIX}")))
                && !zombie
            {
                out.push(format!(
                    "process {name} in cgroup {}",
                    ours.trim_start_matches("0::")
                ));
            }
        }
    }
    out
}
