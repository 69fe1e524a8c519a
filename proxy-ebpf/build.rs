//! Rebuild when bpf-linker changes (it is the linker of this crate, so cargo does not track it).
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
