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
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain.rustup_name()),
    )
}
