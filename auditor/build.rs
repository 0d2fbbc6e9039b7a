//! Compiles the TC program (`auditor-ebpf`'s binary) for the bpf target with the pinned nightly and
//! bpf-linker, into OUT_DIR, where `datapath` embeds it. `cargo xtask setup` installs both.

/// Must match `EBPF_TOOLCHAIN` in xtask: the nightly whose LLVM matches bpf-linker's.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("auditor has no parent directory"))?
        .join("auditor-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    let package = aya_build::Package {
        name: "auditor-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}
