//! Developer tasks. `cargo xtask demo` runs the main job, `cargo xtask test` runs every test;
//! both install what they need first (`cargo xtask setup`).

mod bench;
mod demo;
mod image;
mod kind;
mod l7bench;
mod nsbench;
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
    /// Soak the release build on a simulated node: churn, routing changes, failing backends
    /// under steady L4 and L7 load; prints the thresholds table (the suite runs 1 minute).
    Soak {
        /// How long, warm-up included.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
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

/// Builds the release binaries and points the harness at them (benchmarks and the soak run
/// what ships).
fn release_bins() -> Result<()> {
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
    Ok(())
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
const GATEWAY_CRDS: &str = "deploy/crds/gateway-api.yaml";
const GATEWAY_VENDOR: &str = "xtask/vendor/gateway-api/v1.6.1";

/// The Gateway API CRDs proxy-agent serves: the pinned standard-channel HTTPRoute and
/// GRPCRoute, with the experimental fields it implements (`HTTPRoute spec.rules[].retry`)
/// taken from the pinned experimental HTTPRoute.
fn gateway_crds(root: &std::path::Path) -> Result<String> {
    use serde_yaml::Value;
    let read = |rel: &str| -> Result<Value> {
        let p = root.join(GATEWAY_VENDOR).join(rel);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let mut http = read("standard/gateway.networking.k8s.io_httproutes.yaml")?;
    let grpc = read("standard/gateway.networking.k8s.io_grpcroutes.yaml")?;
    let exp = read("experimental/gateway.networking.k8s.io_httproutes.yaml")?;
    let rule_props = |crd: &Value, version: &str| -> Option<Value> {
        crd["spec"]["versions"]
            .as_sequence()?
            .iter()
            .find(|v| v["name"].as_str() == Some(version))
            .map(|v| {
                v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rules"]["items"]
                    ["properties"]
                    .clone()
            })
    };
    let versions = http["spec"]["versions"]
        .as_sequence_mut()
        .context("HTTPRoute CRD has no spec.versions")?;
    for v in versions.iter_mut() {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let retry = rule_props(&exp, &name)
            .and_then(|p| p.get("retry").cloned())
            .with_context(|| format!("experimental HTTPRoute {name} has no rules[].retry"))?;
        let props = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rules"]
            ["items"]["properties"]
            .as_mapping_mut()
            .with_context(|| format!("standard HTTPRoute {name} has no rules[].properties"))?;
        props.insert(Value::from("retry"), retry);
    }
    let annotations = http["metadata"]["annotations"]
        .as_mapping_mut()
        .context("HTTPRoute CRD has no annotations")?;
    annotations.insert(
        Value::from("proxy-agent.io/experimental-fields"),
        Value::from("spec.rules[].retry"),
    );
    let mut out = String::from(
        "# Gateway API v1.6.1 HTTPRoute and GRPCRoute CRDs (standard channel) plus the experimental\n\
         # HTTPRoute field proxy-agent implements (spec.rules[].retry). Generated by\n\
         # `cargo xtask codegen` from xtask/vendor/gateway-api; do not edit. Leave it out of\n\
         # deploy/kustomization.yaml if your cluster already has the Gateway API CRDs.\n",
    );
    for crd in [&http, &grpc] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(crd)?);
    }
    Ok(out)
}

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
    let gw = gateway_crds(&root)?;
    let gw_path = root.join(GATEWAY_CRDS);
    if check {
        if std::fs::read_to_string(&gw_path).unwrap_or_default() != gw {
            bail!(
                "{GATEWAY_CRDS} is out of date with {GATEWAY_VENDOR}: run `cargo xtask codegen` and commit it"
            );
        }
        eprintln!("xtask: {GATEWAY_CRDS} is up to date");
    } else {
        std::fs::write(&gw_path, &gw)?;
        eprintln!("xtask: wrote {GATEWAY_CRDS}");
    }
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
    // The same package selection as the unit tests: features unify alike, so the dependencies
    // built for them are reused instead of rebuilt with another feature set.
    let (e2e_ok, e2e_out) = cargo_streamed(&[
        "test",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
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
            release_bins()?;
            let r = bench::run(&name);
            let leaks = leak_check();
            r.and(leaks)
        }
        Cmd::Soak { minutes } => {
            release_bins()?;
            let report = tests::soak::run(std::time::Duration::from_secs(minutes * 60));
            println!(
                "\n{minutes}-minute soak (release build):\n{}",
                report.table()
            );
            let leaks = leak_check();
            if !report.passed() {
                bail!("the soak missed a threshold (the NO rows above)");
            }
            leaks
        }
    }
}
