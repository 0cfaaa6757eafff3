//! Builds the eBPF object (lattice-ebpf) with the nightly toolchain and
//! bpf-linker, for `include_bytes_aligned!` in `src/bpf/mod.rs`.
//! `cargo xtask setup` installs both.

use std::path::Path;

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("lattice-agent has no parent directory"))?;
    let ebpf_dir = workspace.join("lattice-ebpf");
    let common_dir = workspace.join("lattice-common");
    // The map types live in lattice-common: a change there changes the object.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "lattice-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
