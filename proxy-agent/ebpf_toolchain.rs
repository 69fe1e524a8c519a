//! The one place that chooses the toolchain for the eBPF crate.
//!
//! Included by `proxy-agent/build.rs` (which builds `proxy-ebpf`) and by `xtask setup` (which
//! installs what is missing), so both always agree.
//!
//! Preference: a rustup `nightly` that has `rust-src` (a developer laptop), else the Debian pair
//! `rustc-web` + `rust-web-src` linked into rustup as the toolchain `debian-web`, which needs
//! `RUSTC_BOOTSTRAP=1` for `-Z build-std=core`.

use std::path::Path;
use std::process::Command;

/// Name under which the Debian rustc-web toolchain (`/usr/bin/rustc`) is linked into rustup.
pub const DEBIAN_TOOLCHAIN: &str = "debian-web";

/// A usable eBPF toolchain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EbpfToolchain {
    /// rustup's nightly with the rust-src component.
    Nightly,
    /// Debian's rustc-web with rust-web-src, linked into rustup as [`DEBIAN_TOOLCHAIN`].
    Debian,
}

impl EbpfToolchain {
    /// The rustup toolchain name passed to `rustup run`.
    pub fn rustup_name(&self) -> &'static str {
        match self {
            EbpfToolchain::Nightly => "nightly",
            EbpfToolchain::Debian => DEBIAN_TOOLCHAIN,
        }
    }

    /// Whether `RUSTC_BOOTSTRAP=1` is needed for `-Z build-std`.
    pub fn needs_bootstrap(&self) -> bool {
        matches!(self, EbpfToolchain::Debian)
    }

    /// One line for logs.
    pub fn describe(&self) -> String {
        match self {
            EbpfToolchain::Nightly => "rustup nightly with rust-src".to_string(),
            EbpfToolchain::Debian => format!(
                "Debian rustc-web + rust-web-src (rustup toolchain `{DEBIAN_TOOLCHAIN}` -> /usr, RUSTC_BOOTSTRAP=1)"
            ),
        }
    }
}

fn sysroot_of(toolchain: &str) -> Option<String> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn has_core_src(sysroot: &str) -> bool {
    Path::new(sysroot)
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

/// Whether `bpf-linker` is on PATH.
pub fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Detects the eBPF toolchain, or says what is missing.
pub fn detect() -> Result<EbpfToolchain, String> {
    if sysroot_of("nightly").is_some_and(|s| has_core_src(&s)) {
        return Ok(EbpfToolchain::Nightly);
    }
    match sysroot_of(DEBIAN_TOOLCHAIN) {
        Some(s) if has_core_src(&s) => Ok(EbpfToolchain::Debian),
        Some(s) => Err(format!(
            "toolchain `{DEBIAN_TOOLCHAIN}` (sysroot {s}) has no core library source: apt-get install rust-web-src"
        )),
        None => Err(format!(
            "no eBPF toolchain: neither rustup nightly with rust-src nor the rustup toolchain \
             `{DEBIAN_TOOLCHAIN}` exists; run `cargo xtask setup` (apt-get install rustc-web \
             cargo-web rust-web-src llvm-22-dev && rustup toolchain link {DEBIAN_TOOLCHAIN} /usr)"
        )),
    }
}
