//! Builds `proxy-ebpf` for the BPF target with aya-build and leaves the object in OUT_DIR,
//! where `datapath::loader` embeds it.

#[path = "ebpf_toolchain.rs"]
#[allow(dead_code)]
mod ebpf_toolchain;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=ebpf_toolchain.rs");
    println!("cargo:rerun-if-changed=../proxy-common/src");
    let toolchain = ebpf_toolchain::detect().map_err(anyhow::Error::msg)?;
    if !ebpf_toolchain::has_bpf_linker() {
        anyhow::bail!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (it installs bpf-linker 0.13 against LLVM 22)"
        );
    }
    println!("cargo:warning=eBPF toolchain: {}", toolchain.describe());
    if toolchain.needs_bootstrap() {
        // SAFETY: build scripts are single-threaded; aya-build reads this to add -Z build-std.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf");
    // aya-build builds in a cargo target directory under OUT_DIR, which differs for every
    // profile (dev, test, release, clippy's check): the eBPF crate and `core` would be compiled
    // from scratch for each. Point it at one directory under the workspace's target directory
    // instead, so every later build is cargo's no-op, and copy the object to the real OUT_DIR.
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let shared = out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").exists())
        .map(|t| t.join("ebpf-shared"));
    if let Some(shared) = &shared {
        std::fs::create_dir_all(shared)?;
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("OUT_DIR", shared) };
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain.rustup_name()),
    )?;
    if let Some(shared) = &shared {
        // The object as the inner cargo left it (written under its lock), not aya-build's copy.
        let built =
            shared.join("aya-build/target/proxy-ebpf/bpfel-unknown-none/release/proxy-ebpf");
        let from = if built.exists() {
            built
        } else {
            shared.join("proxy-ebpf")
        };
        std::fs::copy(&from, out_dir.join("proxy-ebpf"))?;
    }
    Ok(())
}
