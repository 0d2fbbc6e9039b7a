//! Compiles the TC program (`auditor-ebpf`'s binary) for the bpf target with the pinned nightly and
//! bpf-linker, into `OUT_DIR`, where `datapath` embeds it. `cargo xtask setup` installs both.

use std::{env, path::Path};

/// Must match `EBPF_TOOLCHAIN` in xtask: the nightly whose LLVM matches bpf-linker's.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("auditor has no parent directory"))?
        .join("auditor-ebpf");
    // Rerun triggers: aya-build watches everything under auditor-ebpf (the binary's sources) and
    // AYA_BUILD_SKIP; the build-dependency on auditor-ebpf covers its library. Not PATH: it differs
    // between shells and tools and would rebuild the object for nothing.
    let skip =
        env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if !skip && !on_path("bpf-linker") {
        anyhow::bail!(
            "bpf-linker is not on PATH, so the TC program cannot be linked: run `cargo xtask setup` \
             (it builds bpf-linker against the LLVM of {EBPF_TOOLCHAIN})"
        );
    }
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

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
