//! Builds the eBPF object (lattice-ebpf) with the nightly toolchain and
//! bpf-linker, for `include_bytes_aligned!` in `src/bpf/mod.rs`.
//! `cargo xtask setup` installs both.
//!
//! The object depends only on the eBPF sources and the target's
//! architecture and byte order, yet this script runs once per profile,
//! target and feature set of the agent (check, debug, test, each image
//! platform): the nested build goes to one directory per architecture in
//! the target directory, where cargo finds it up to date after the first
//! time, and the object is copied from there.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR")?;
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

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let Some(shared) = shared_out_dir(&out_dir)? else {
        return build(ebpf_dir);
    };
    fs::create_dir_all(&shared)?;
    // Another build of the agent (another cargo run, rust-analyzer) may be
    // at the same step: one at a time builds and copies.
    let lock = fs::File::create(shared.join(".lock"))?;
    lock.lock()?;
    // SAFETY: a build script is one thread; aya-build reads OUT_DIR (where
    // it builds and leaves the object) from the environment.
    unsafe { env::set_var("OUT_DIR", &shared) };
    build(ebpf_dir)?;
    fs::copy(shared.join("lattice-ebpf"), out_dir.join("lattice-ebpf"))?;
    Ok(())
}

/// The object, built by aya-build into `$OUT_DIR/lattice-ebpf`.
fn build(ebpf_dir: &str) -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [Package {
            name: "lattice-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}

/// `<target dir>/ebpf-embedded/<arch>-<endian>`: the outermost directory
/// above OUT_DIR that cargo tagged as a target directory (CACHEDIR.TAG;
/// `<target>/<triple>` has one too), or None (build in OUT_DIR).
fn shared_out_dir(out_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let target_dir = out_dir
        .ancestors()
        .filter(|dir| dir.join("CACHEDIR.TAG").is_file())
        .last();
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN")?;
    Ok(target_dir.map(|t| t.join("ebpf-embedded").join(format!("{arch}-{endian}"))))
}
