//! `cargo xtask setup`: installs what building and testing need, idempotently, saying what it
//! installs. Run as root on Debian (apt-get).

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

#[path = "../../proxy-agent/ebpf_toolchain.rs"]
#[allow(dead_code)]
mod ebpf_toolchain;

/// Debian packages the tests and demo use (the real clients and tools, not stand-ins).
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "apache2-utils",
    "wrk",
    "nghttp2-client",
    "curl",
    // A real scraper for the metrics tests.
    "prometheus",
    // Builds and runs the image (`cargo xtask image`, the image test).
    "buildah",
];
/// Debian packages of the eBPF toolchain (when no rustup nightly with rust-src exists).
const TOOLCHAIN_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "llvm-22-dev"];

fn missing_packages(pkgs: &[&str]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .map(|p| p.to_string())
        .collect()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("setup: running {cmd:?}");
    let st = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn apt_install(pkgs: &[String]) -> Result<()> {
    if pkgs.is_empty() {
        return Ok(());
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "missing Debian packages {pkgs:?} and not root: run `apt-get install -y {}` as root",
            pkgs.join(" ")
        );
    }
    eprintln!("setup: installing Debian packages: {}", pkgs.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Installs Debian packages a benchmark needs (e.g. the peers it compares against).
pub fn ensure_packages(pkgs: &[&str]) -> Result<()> {
    apt_install(&missing_packages(pkgs))
}

/// Installs everything; prints one line per thing it checked.
pub fn setup() -> Result<()> {
    apt_install(&missing_packages(TEST_PACKAGES))?;
    eprintln!("setup: test tools present ({})", TEST_PACKAGES.join(", "));

    let toolchain = match ebpf_toolchain::detect() {
        Ok(t) => t,
        Err(why) => {
            eprintln!("setup: {why}");
            apt_install(&missing_packages(TOOLCHAIN_PACKAGES))?;
            run(Command::new("rustup").args([
                "toolchain",
                "link",
                ebpf_toolchain::DEBIAN_TOOLCHAIN,
                "/usr",
            ]))?;
            ebpf_toolchain::detect().map_err(anyhow::Error::msg)?
        }
    };
    eprintln!("setup: eBPF toolchain: {}", toolchain.describe());

    if !ebpf_toolchain::has_bpf_linker() {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", "bpf-linker", "--locked", "--version", "0.13.0"]);
        if toolchain == ebpf_toolchain::EbpfToolchain::Debian
            || Path::new("/usr/lib/llvm-22").exists()
        {
            apt_install(&missing_packages(&["llvm-22-dev"]))?;
            cmd.args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22");
        }
        eprintln!("setup: installing bpf-linker 0.13 (about a minute)");
        run(&mut cmd)?;
    }
    eprintln!("setup: bpf-linker present");

    if nix::unistd::Uid::effective().is_root() {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if !mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
        {
            eprintln!("setup: mounting bpffs at /sys/fs/bpf");
            run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        }
    }
    Ok(())
}
