//! Developer tasks. `cargo xtask demo` runs the main job, `cargo xtask test` runs every test;
//! both install what they need first (`cargo xtask setup`).

mod bench;
mod demo;
mod image;
mod kind;
mod l7bench;
mod seed;
mod setup;
mod syncbench;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// The target triple every build uses (`.cargo/config.toml`): binaries live under
/// `target/<triple>/<profile>/`.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Parser)]
#[command(about = "Developer tasks for the node proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain and tools (idempotent).
    Setup,
    /// Build and run the demo on a simulated node.
    Demo,
    /// Run a benchmark (release build) and print its table: `l4`.
    Bench {
        /// Which benchmark.
        name: String,
    },
    /// Build the container image (buildah, FROM scratch, static binary) and its OCI archive.
    Image {
        /// Package the debug binary `cargo xtask test` builds instead of a release build.
        #[arg(long)]
        debug: bool,
    },
    /// The kind suite (machines with Docker and kind): install deploy/ on a cluster without
    /// kube-proxy and check it from inside.
    Kind,
    /// Regenerate checked-in files from the Rust types (deploy/crds).
    Codegen {
        /// Fail if the checked-in files differ instead of writing them.
        #[arg(long)]
        check: bool,
    },
    /// Run every test: unit tests, then the privileged end-to-end tests, then a leak check.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
}

fn cargo(args: &[&str]) -> Result<std::process::Output> {
    eprintln!("xtask: cargo {}", args.join(" "));
    Command::new(env!("CARGO"))
        .args(args)
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))
}

fn cargo_streamed(args: &[&str]) -> Result<(bool, String)> {
    eprintln!("xtask: cargo {}", args.join(" "));
    // Tee stdout so the summary lines can be counted while the user sees everything.
    let mut child = Command::new(env!("CARGO"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let mut captured = String::new();
    let out = child.stdout.take().context("stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
        let line = line?;
        println!("{line}");
        captured.push_str(&line);
        captured.push('\n');
    }
    Ok((child.wait()?.success(), captured))
}

/// Builds the binaries the harness runs.
pub fn build_bins() -> Result<()> {
    let out = cargo(&["build", "-p", "proxy-agent", "-p", "tests", "--bins"])?;
    if !out.status.success() {
        bail!("build failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

const CRDS: &str = "deploy/crds/istio-networking.yaml";

/// Writes (or with `check`, verifies) the CRD manifests generated from proxy-agent's Istio types.
fn codegen(check: bool) -> Result<()> {
    // The binary the tests use (same package selection, so no feature-unification rebuild).
    build_bins()?;
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(TARGET)
        .join("debug/proxy-agent");
    let out = Command::new(&bin)
        .arg("crds")
        .output()
        .with_context(|| format!("running {} crds", bin.display()))?;
    if !out.status.success() {
        bail!(
            "generating CRDs failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join(CRDS);
    if check {
        let current = std::fs::read(&path).unwrap_or_default();
        if current != out.stdout {
            bail!(
                "{CRDS} is out of date with proxy-agent/src/istio.rs: run `cargo xtask codegen` and commit it"
            );
        }
        eprintln!("xtask: {CRDS} is up to date");
    } else {
        std::fs::create_dir_all(path.parent().context("path")?)?;
        std::fs::write(&path, &out.stdout)?;
        eprintln!("xtask: wrote {CRDS}");
    }
    Ok(())
}

/// `cargo fmt --check` and `cargo clippy -D warnings` over the host crates.
fn lint() -> Result<()> {
    let fmt = cargo(&["fmt", "--all", "--check"])?;
    if !fmt.status.success() {
        bail!(
            "cargo fmt --check found unformatted code:\n{}",
            String::from_utf8_lossy(&fmt.stdout)
        );
    }
    let clippy = cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    if !clippy.status.success() {
        bail!(
            "cargo clippy found problems:\n{}",
            String::from_utf8_lossy(&clippy.stderr)
        );
    }
    eprintln!("xtask: fmt and clippy clean");
    codegen(true)?;
    Ok(())
}

/// (passed, failed) summed over cargo test's "test result:" lines.
fn count(output: &str) -> (u64, u64) {
    let mut t = (0, 0);
    for l in output.lines().filter(|l| l.starts_with("test result:")) {
        let num = |word: &str| {
            l.split(';')
                .find(|p| p.trim_end().ends_with(word))
                .and_then(|p| p.split_whitespace().rev().nth(1)?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        t.0 += num("passed");
        t.1 += num("failed");
    }
    t
}

/// Fails if any `pxt…` netns, cgroup, pin, scratch dir or process is left.
pub fn leak_check() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(()); // nothing privileged could have been created
    }
    // Processes killed a moment ago may still be exiting: poll briefly before judging.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut left = tests::node::present_resources();
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        left = tests::node::present_resources();
    }
    if !left.is_empty() {
        bail!(
            "left behind by the run (must be removed):\n  {}",
            left.join("\n  ")
        );
    }
    eprintln!("xtask: leak check: no netns, cgroup, bpffs pin, scratch dir or process left");
    Ok(())
}

fn test(filter: Option<String>) -> Result<()> {
    setup::setup()?;
    build_bins()?;
    lint()?;
    // The image test runs the agent from this image's root file system.
    image::build(image::Build::Test)?;
    let filter = filter.unwrap_or_default();
    // Unit tests of every crate (no privileges needed).
    let (unit_ok, unit_out) = cargo_streamed(&[
        "test",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--lib",
        "--bins",
        "--",
        &filter,
    ])?;
    // End-to-end tests on simulated nodes (root).
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("xtask: NOT ROOT: the privileged tests below will fail, each naming the reason");
    }
    // Every test binary runs even when an earlier one failed: the summary counts them all.
    let (e2e_ok, e2e_out) = cargo_streamed(&[
        "test",
        "-p",
        "tests",
        "--no-fail-fast",
        "--test",
        "*",
        "--",
        &filter,
    ])?;
    let leaks = leak_check();
    let (up, uf) = count(&unit_out);
    let (ep, ef) = count(&e2e_out);
    println!("unit tests: {up} passed, {uf} failed");
    println!(
        "privileged tests (simulated node{}): {ep} passed, {ef} failed",
        if root { ", as root" } else { ", NOT root" }
    );
    println!("{} passed, {} failed", up + ep, uf + ef);
    leaks?;
    if !unit_ok || !e2e_ok {
        bail!("tests failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Demo => {
            setup::setup()?;
            build_bins()?;
            let r = demo::run();
            let leaks = leak_check();
            r.and(leaks)
        }
        Cmd::Test { filter } => test(filter),
        Cmd::Image { debug } => {
            setup::setup()?;
            if debug {
                build_bins()?;
            }
            let build = if debug {
                image::Build::Test
            } else {
                image::Build::Release
            };
            image::build(build).map(|_| ())
        }
        Cmd::Kind => kind::run_suite(),
        Cmd::Codegen { check } => codegen(check),
        Cmd::Bench { name } => {
            setup::setup()?;
            let out = cargo(&[
                "build",
                "--release",
                "-p",
                "proxy-agent",
                "-p",
                "tests",
                "--bins",
            ])?;
            if !out.status.success() {
                bail!(
                    "release build failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target")
                .join(TARGET)
                .join("release");
            // SAFETY: single-threaded at this point; the harness reads it to find the binaries.
            unsafe { std::env::set_var("PXT_BIN_DIR", dir) };
            let r = bench::run(&name);
            let leaks = leak_check();
            r.and(leaks)
        }
    }
}
