use which::which;

/// Rebuild the eBPF object when bpf-linker changes: cargo does not track the
/// linker, and a stale object built by another linker is confusing to debug.
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup`, which builds it against the nightly toolchain's LLVM",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
