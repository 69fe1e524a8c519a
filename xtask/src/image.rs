//! `cargo xtask image`: the agent's container image, built with buildah `FROM scratch` (no
//! Docker engine or registry is needed): the fully static `proxy-agent` binary
//! (`.cargo/config.toml` links it with `+crt-static`) alone, entrypoint `/proxy-agent`. Also
//! saved as an OCI archive for `kind load image-archive`. `deploy/Dockerfile` builds the same
//! image where Docker exists.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

/// The image's name (the DaemonSet's `image:`).
pub const IMAGE: &str = "localhost/proxy-agent:dev";

/// Which build goes into the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// The release binary (what users install).
    Release,
    /// The binary the test suite already built (the image test checks the packaging, not the
    /// optimizer).
    Test,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where cargo puts a binary of `build`.
pub fn binary(build: Build) -> PathBuf {
    let profile = match build {
        Build::Release => "release",
        Build::Test => "debug",
    };
    root()
        .join("target")
        .join(crate::TARGET)
        .join(profile)
        .join("proxy-agent")
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Fails unless `bin` is statically linked (a `scratch` image has no loader and no libc).
fn check_static(bin: &Path) -> Result<()> {
    let bytes = std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    ensure!(
        bytes.len() > 64 && &bytes[..4] == b"\x7fELF" && bytes[4] == 2,
        "{} is not a 64-bit ELF binary",
        bin.display()
    );
    // Program headers: a PT_INTERP (type 3) entry names a dynamic loader.
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        ensure!(o + 4 <= bytes.len(), "truncated ELF program headers");
        let kind = u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        ensure!(
            kind != 3,
            "{} is dynamically linked (it has an ELF interpreter): build it with .cargo/config.toml's +crt-static target flags",
            bin.display()
        );
    }
    Ok(())
}

/// Builds the image from `build`'s binary (building the release binary first), saves it as
/// an OCI archive and returns the archive's path.
pub fn build(build: Build) -> Result<PathBuf> {
    crate::setup::ensure_packages(&["buildah"])?;
    if build == Build::Release {
        let out = crate::cargo(&[
            "build",
            "--release",
            "-p",
            "proxy-agent",
            "--bin",
            "proxy-agent",
        ])?;
        ensure!(
            out.status.success(),
            "release build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bin = binary(build);
    ensure!(bin.exists(), "{} was not built", bin.display());
    check_static(&bin)?;
    // Replace an earlier image of the same name.
    let _ = run(Command::new("buildah").args(["rmi", "--force", IMAGE]));
    let ctr = run(Command::new("buildah").args(["from", "scratch"]))?;
    let result = (|| -> Result<()> {
        run(Command::new("buildah")
            .args(["copy", "--chmod", "0755", &ctr])
            .arg(&bin)
            .arg("/proxy-agent"))?;
        run(Command::new("buildah").args([
            "config",
            "--entrypoint",
            r#"["/proxy-agent"]"#,
            "--cmd",
            "run",
            "--label",
            "org.opencontainers.image.title=proxy-agent",
            "--label",
            "org.opencontainers.image.description=eBPF node-level Kubernetes service proxy",
            &ctr,
        ]))?;
        run(Command::new("buildah").args(["commit", "--quiet", &ctr, IMAGE]))?;
        Ok(())
    })();
    let _ = run(Command::new("buildah").args(["rm", &ctr]));
    result?;
    let archive = root().join("target").join("proxy-agent-image.tar");
    let _ = std::fs::remove_file(&archive);
    run(Command::new("buildah")
        .args(["push", "--quiet", IMAGE])
        .arg(format!("oci-archive:{}:{IMAGE}", archive.display())))?;
    let size = std::fs::metadata(&bin)?.len() / (1 << 20);
    eprintln!(
        "image: {IMAGE} (FROM scratch, /proxy-agent {size} MiB, static) saved to {}",
        archive.display()
    );
    Ok(archive)
}

/// The fixture image for the kind suite (the static `fixture` binary alone, as `/fixture`).
pub const FIXTURE_IMAGE: &str = "localhost/proxy-agent-fixture:dev";

/// Builds the fixture image from the release `fixture` binary; returns its OCI archive.
pub fn build_fixture() -> Result<PathBuf> {
    let out = crate::cargo(&["build", "--release", "-p", "tests", "--bin", "fixture"])?;
    ensure!(
        out.status.success(),
        "release build of the fixtures failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = root()
        .join("target")
        .join(crate::TARGET)
        .join("release/fixture");
    check_static(&bin)?;
    let _ = run(Command::new("buildah").args(["rmi", "--force", FIXTURE_IMAGE]));
    let ctr = run(Command::new("buildah").args(["from", "scratch"]))?;
    let result = (|| -> Result<()> {
        run(Command::new("buildah")
            .args(["copy", "--chmod", "0755", &ctr])
            .arg(&bin)
            .arg("/fixture"))?;
        run(Command::new("buildah").args(["config", "--entrypoint", r#"["/fixture"]"#, &ctr]))?;
        run(Command::new("buildah").args(["commit", "--quiet", &ctr, FIXTURE_IMAGE]))?;
        Ok(())
    })();
    let _ = run(Command::new("buildah").args(["rm", &ctr]));
    result?;
    let archive = root().join("target").join("proxy-agent-fixture-image.tar");
    let _ = std::fs::remove_file(&archive);
    run(Command::new("buildah")
        .args(["push", "--quiet", FIXTURE_IMAGE])
        .arg(format!("oci-archive:{}:{FIXTURE_IMAGE}", archive.display())))?;
    Ok(archive)
}
