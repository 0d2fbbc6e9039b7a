//! Installs what the build and the tests need when it is missing, and says what it could not do.
//! Machines set `RUSTUP_AUTO_INSTALL=0`, so toolchains are installed here explicitly.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{display, is_root, run};

/// User space, pinned in rust-toolchain.toml too.
const USER_TOOLCHAIN: &str = "1.98.0";
/// The eBPF crate's nightly (LLVM 22.1), pinned in auditor/build.rs too: bpf-linker must be built
/// against the same LLVM major, and Debian here has LLVM 22, not 23.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";
const AARCH64_TARGET: &str = crate::AARCH64_TARGET;
const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages and why each is needed.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker is built against LLVM 22"),
    (
        "libpolly-22-dev",
        "bpf-linker links LLVM 22 statically and needs Polly",
    ),
    ("libzstd-dev", "bpf-linker's LLVM link"),
    ("zlib1g-dev", "bpf-linker's LLVM link"),
    ("iproute2", "network-namespace and veth tests"),
    (
        "nftables",
        "the lab (`cargo xtask demo`) enforces some namespaces' policies with nft, as a CNI would",
    ),
    (
        "qemu-user-static",
        "running the arm64 binary on this machine",
    ),
    (
        "skopeo",
        "`cargo xtask image` inspects and copies the OCI image it writes (no Docker engine)",
    ),
    (
        "prometheus",
        "promtool validates the /metrics exposition in export_http; the lab scrapes the daemon",
    ),
    (
        "qemu-system-x86",
        "`cargo xtask test-kernels` boots Debian's x86_64 kernels in emulated VMs (virtme-ng)",
    ),
    (
        "qemu-system-arm",
        "`cargo xtask test-kernels` boots Debian's arm64 16 KiB-page kernel in an emulated VM",
    ),
    (
        "kmod",
        "virtme-ng indexes the kernel packages' modules (depmod), the guests load them (modprobe)",
    ),
    (
        "busybox-static",
        "virtme-ng's guests need busybox; the flow scenario in every guest uses its applets",
    ),
];

pub fn ensure(root: &Path) -> Result<()> {
    let mut missing = Vec::new();
    if let Err(e) = debian_packages() {
        missing.push(format!("{e:#}"));
    }
    toolchains()?;
    bpf_linker(root)?;
    if let Err(e) = zigbuild(root) {
        missing.push(format!("{e:#}"));
    }
    if let Err(e) = virtme_ng() {
        missing.push(format!("{e:#}"));
    }
    if !missing.is_empty() {
        eprintln!("setup could not do everything:");
        for m in &missing {
            eprintln!("  - {m}");
        }
    }
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .map(|(pkg, _)| *pkg)
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (pkg, why) in DEBIAN_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("setup: Debian package {pkg} is missing ({why})");
    }
    if !is_root() {
        bail!(
            "not root, so these Debian packages were not installed: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "no apt-get on this machine: install {} by hand",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
}

fn rustup(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("rustup");
    cmd.args(args);
    let out = cmd
        .output()
        .with_context(|| format!("could not run {} (is rustup installed?)", display(&cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            display(&cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn toolchains() -> Result<()> {
    let installed = rustup(&["toolchain", "list"])?;
    let has = |tc: &str| installed.lines().any(|l| l.starts_with(&format!("{tc}-")));
    if !has(USER_TOOLCHAIN) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            USER_TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
    }
    if !has(EBPF_TOOLCHAIN) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
    }
    ensure_components(USER_TOOLCHAIN, &["clippy", "rustfmt"])?;
    ensure_components(EBPF_TOOLCHAIN, &["rust-src"])?;
    let targets = rustup(&[
        "target",
        "list",
        "--installed",
        "--toolchain",
        USER_TOOLCHAIN,
    ])?;
    // The static musl targets: arm64 for the Pi 5, x86_64 for the amd64 half of the image.
    for target in [AARCH64_TARGET, crate::X86_64_TARGET] {
        if !targets.lines().any(|t| t.trim() == target) {
            run(Command::new("rustup").args([
                "target",
                "add",
                target,
                "--toolchain",
                USER_TOOLCHAIN,
            ]))?;
        }
    }
    Ok(())
}

fn ensure_components(toolchain: &str, wanted: &[&str]) -> Result<()> {
    let installed = rustup(&["component", "list", "--installed", "--toolchain", toolchain])?;
    for component in wanted {
        // Installed components are listed with their host triple (`rust-src` has none).
        let present = installed
            .lines()
            .any(|l| l == *component || l.starts_with(&format!("{component}-")));
        if !present {
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain,
            ]))?;
        }
    }
    Ok(())
}

fn bpf_linker(root: &Path) -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = &current {
        let version = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && version.contains(&format!(" {BPF_LINKER_VERSION}.")) {
            return Ok(());
        }
        eprintln!(
            "setup: replacing {} (want bpf-linker {BPF_LINKER_VERSION})",
            version.trim()
        );
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!(
            "bpf-linker needs LLVM 22 at {LLVM_PREFIX} (Debian package llvm-22-dev), which is missing; \
             run `sudo cargo xtask setup`"
        );
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 7 minutes, once)"
    );
    run(Command::new("cargo")
        .current_dir(root)
        .args([
            &format!("+{USER_TOOLCHAIN}"),
            "install",
            "bpf-linker",
            "--version",
            &format!("~{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
            "--force",
        ])
        // bpf-linker's build script reads LLVM_PREFIX, llvm-sys reads LLVM_SYS_221_PREFIX.
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
}

/// virtme-ng (`vng`, from `PyPI`) boots the `x86_64` kernels of `cargo xtask test-kernels` over a
/// read-only view of this machine's root filesystem.
const VIRTME_NG_VERSION: &str = "1.42";

fn virtme_ng() -> Result<()> {
    let installed = Command::new("python3")
        .args(["-m", "pip", "show", "virtme-ng"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l == format!("Version: {VIRTME_NG_VERSION}"))
        });
    if installed {
        return Ok(());
    }
    run(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
    ]))
    .context("installing virtme-ng (PyPI) for the kernel VMs")
}

/// `ring` (kube's TLS) has C code, so the static arm64 build links with zig through
/// cargo-zigbuild; zig itself comes from `PyPI` (`ziglang`).
const ZIGLANG_VERSION: &str = "0.17.0";
const ZIGBUILD_VERSION: &str = "0.24";

fn zigbuild(root: &Path) -> Result<()> {
    let zig_ok = Command::new("python3")
        .args(["-m", "ziglang", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !zig_ok {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("ziglang=={ZIGLANG_VERSION}"),
        ]))
        .context("installing zig (PyPI ziglang) for the arm64 build")?;
    }
    let zigbuild_ok = Command::new("cargo-zigbuild")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(&format!(" {ZIGBUILD_VERSION}."))
        });
    if !zigbuild_ok {
        run(Command::new("cargo").current_dir(root).args([
            &format!("+{USER_TOOLCHAIN}"),
            "install",
            "cargo-zigbuild",
            "--version",
            &format!("~{ZIGBUILD_VERSION}"),
            "--locked",
        ]))
        .context("installing cargo-zigbuild for the arm64 build")?;
    }
    Ok(())
}
