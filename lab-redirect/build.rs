//! Compiles the fixture's TC programs (`lab-redirect-ebpf`) for the bpf target with the same
//! pinned nightly and bpf-linker as the agent's program (see `auditor/build.rs`).

use std::path::Path;

/// Must match `EBPF_TOOLCHAIN` in xtask and `auditor/build.rs`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("lab-redirect has no parent directory"))?
        .join("lab-redirect-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    let package = aya_build::Package {
        name: "lab-redirect-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}
