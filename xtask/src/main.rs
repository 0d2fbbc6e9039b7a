//! `cargo xtask`: the one entry point for everything beyond plain cargo. Every verb first runs
//! `setup`, which installs what is missing on a Debian/Ubuntu machine, so a newcomer never has to.

mod deploy;
mod image;
mod kernels;
mod lab;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "flow-auditor orchestration")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install what is missing: pinned toolchains, targets, bpf-linker, Debian packages.
    Setup,
    /// Build the auditor (release); `--target aarch64` makes a static arm64 binary for the Pi 5.
    Build {
        #[arg(long, value_enum, default_value_t = Target::Host)]
        target: Target,
    },
    /// Run the whole test suite, including the tests that need root and the kernel.
    Test,
    /// Only the kernel step of `test` (root): Debian's 6.1 and 6.12 kernels (`x86_64`) and 6.12
    /// arm64 with 16 KiB pages, from Debian's archive, booted in emulated VMs that run the kernel
    /// tests; prints a table of the results.
    TestKernels {
        /// Only the kernels whose name contains this (`6.1`, `6.12`, `x86_64`, `arm64`).
        #[arg(long)]
        only: Option<String>,
    },
    /// Build everything, then run the Calico (or Cilium) homelab in miniature (network
    /// namespaces on this machine) under the auditor, with a live summary; Ctrl-C removes it all.
    Demo {
        /// Stop after this many seconds (non-interactive, for tests and CI).
        #[arg(long)]
        duration: Option<u64>,
        /// Which homelab: Calico's (seed 004, one node) or Cilium's (seed 000, two nodes).
        #[arg(long, value_enum, default_value_t = lab::Cni::Calico)]
        cni: lab::Cni,
        /// With `--cni cilium`: how the two nodes reach each other's pods.
        #[arg(long, value_enum, default_value_t = lab::cilium::Routing::Native)]
        routing: lab::cilium::Routing,
    },
    /// Check deploy/ alone: every overlay builds, every object is valid for its kind, the alerts
    /// pass their promtool tests (also part of `test`).
    Deploy,
    /// Build the multi-architecture OCI image (linux/arm64 + linux/amd64) into
    /// target/image/flow-auditor (an OCI layout `skopeo copy --all` pushes) and check it.
    Image,
    /// Only the lab's end-to-end test (root), which `test` runs as one of its steps; `--cni
    /// cilium` runs the Cilium-style lab's instead (both routing variants), another step.
    LabTest {
        #[arg(long, value_enum, default_value_t = lab::Cni::Calico)]
        cni: lab::Cni,
    },
    /// Run a benchmark and print its figures.
    Bench {
        #[arg(value_enum)]
        which: Bench,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Target {
    Host,
    Aarch64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// Per-packet cost of the TC program (`BPF_PROG_TEST_RUN`).
    Datapath,
    /// Policy model build, update and verdict throughput.
    Policy,
    /// The daemon under real traffic: new flows per second, lost events, resident memory.
    Daemon,
    /// The metrics endpoint: scrape latency alone and behind 1,000 half-open connections, and
    /// 50 concurrent scrapers.
    Http,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Bench::Datapath => "datapath",
            Bench::Policy => "policy",
            Bench::Daemon => "daemon",
            Bench::Http => "http",
        }
    }

    fn needs_root(self) -> bool {
        matches!(self, Bench::Datapath | Bench::Daemon)
    }
}

/// The static arm64 target for the Raspberry Pi 5.
const AARCH64_TARGET: &str = "aarch64-unknown-linux-musl";
/// The static `x86_64` target, for the amd64 half of the image.
const X86_64_TARGET: &str = "x86_64-unknown-linux-musl";

fn main() -> Result<()> {
    let Cli { command } = Cli::parse();
    let root = workspace_root()?;
    setup::ensure(&root)?;
    match command {
        Verb::Setup => Ok(()),
        Verb::Build { target } => build(&root, target).map(|_| ()),
        Verb::Test => test(&root),
        Verb::Demo {
            duration,
            cni,
            routing,
        } => lab::demo(&root, duration, cni, routing),
        Verb::LabTest { cni } => match cni {
            lab::Cni::Calico => lab::e2e::run(&root, &lab::binary(&root)?),
            lab::Cni::Cilium => lab::cilium::run(&root, &lab::binary(&root)?),
        },
        Verb::TestKernels { only } => kernels::run_alone(&root, only.as_deref()),
        Verb::Bench { which } => bench(&root, which),
        Verb::Deploy => deploy::run(&root),
        Verb::Image => image::run(&root).map(|_| ()),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// `cargo` of the pinned user-space toolchain (rust-toolchain.toml at the root selects it).
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root);
    // xtask runs under `cargo run`, which exports variables meant for the xtask build itself.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR_XTASK",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", display(cmd));
    }
    Ok(())
}

pub(crate) fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

pub(crate) fn is_root() -> bool {
    // The effective uid from procfs, so xtask needs no libc binding.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Builds the release binary; returns its path.
fn build(root: &Path, target: Target) -> Result<PathBuf> {
    let mut cmd = cargo(root);
    let binary = match target {
        Target::Host => {
            cmd.arg("build");
            root.join("target/release/auditor")
        }
        Target::Aarch64 => {
            // zig links the C parts (ring, under kube's TLS) statically against musl for arm64.
            cmd.args(["zigbuild", "--target", AARCH64_TARGET]);
            root.join("target")
                .join(AARCH64_TARGET)
                .join("release/auditor")
        }
    };
    cmd.args(["--release", "--package", "auditor", "--bin", "auditor"]);
    run(&mut cmd)?;
    if target == Target::Aarch64 {
        check_static_aarch64(&binary)?;
    }
    eprintln!("built {}", binary.display());
    Ok(binary)
}

/// The Pi image carries nothing but the binary: it must be a static arm64 ELF that runs.
fn check_static_aarch64(binary: &Path) -> Result<()> {
    let elf = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let elf =
        Elf::parse(&elf).with_context(|| format!("{} is not an ELF file", binary.display()))?;
    if elf.machine != EM_AARCH64 {
        bail!(
            "{} is not arm64 (e_machine {})",
            binary.display(),
            elf.machine
        );
    }
    if elf.has_interp {
        bail!("{} is dynamically linked (has PT_INTERP)", binary.display());
    }
    let mut qemu = Command::new("qemu-aarch64-static");
    qemu.arg(binary).arg("--version");
    eprintln!("+ {}", display(&qemu));
    let out = qemu
        .output()
        .context("could not start qemu-aarch64-static")?;
    if !out.status.success() {
        bail!(
            "{} --version under qemu failed: {}\n{}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "static arm64 binary ok under qemu-aarch64-static: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

const EM_AARCH64: u16 = 183;
const PT_INTERP: u32 = 3;

/// Just enough of a 64-bit little-endian ELF header to tell the machine and whether it is static.
struct Elf {
    machine: u16,
    has_interp: bool,
}

impl Elf {
    fn parse(b: &[u8]) -> Option<Self> {
        let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
        let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
        // Magic, 64-bit class, little-endian.
        if b.get(0..4)? != b"\x7fELF" || *b.get(4)? != 2 || *b.get(5)? != 1 {
            return None;
        }
        let machine = u16_at(18)?;
        let phoff = usize::try_from(u64_at(32)?).ok()?;
        let phentsize = usize::from(u16_at(54)?);
        let phnum = usize::from(u16_at(56)?);
        let mut has_interp = false;
        for i in 0..phnum {
            if u32_at(phoff + i * phentsize)? == PT_INTERP {
                has_interp = true;
            }
        }
        Some(Self {
            machine,
            has_interp,
        })
    }
}

/// One step of `cargo xtask test`.
type Step<'a> = Box<dyn FnOnce() -> Result<()> + 'a>;

fn test(root: &Path) -> Result<()> {
    let root_user = is_root();
    if !root_user {
        loud_notice(
            "NOT ROOT: the kernel tests (BPF_PROG_TEST_RUN, network namespaces, attach churn, \
             the lab) are SKIPPED. Run `sudo cargo xtask test` to run them.",
        );
    }
    warn_if_disk_short(root);
    // The image step's static amd64 binary, for the lab step after it.
    let image_amd64 = std::cell::RefCell::new(None);
    let kernels = kernels::Kernels::new(root);
    // Every step runs even when an earlier one failed, so one run shows every failure.
    let mut steps: Vec<(&str, Step<'_>)> = vec![
        (
            "cargo test",
            Box::new(|| {
                let mut cmd = cargo(root);
                // Incremental state would add over a gigabyte to a one-off whole-suite build.
                cmd.env("CARGO_INCREMENTAL", "0");
                cmd.args(["test", "--workspace", "--no-fail-fast", "--"]);
                if root_user {
                    // Tests that need root and the kernel are #[ignore]d so plain `cargo test`
                    // as a user passes; here we are root, so they run.
                    cmd.arg("--include-ignored");
                }
                run(&mut cmd)
            }),
        ),
        // The workspace lints (clippy's pedantic group included), every target, warnings as
        // errors: a step of its own, so a lint failure never hides a test result.
        (
            "cargo clippy",
            Box::new(|| {
                run(cargo(root).env("CARGO_INCREMENTAL", "0").args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))
            }),
        ),
        // The manifests in deploy/ build, are valid for their kinds, fit together; alerts pass
        // promtool.
        ("deploy", Box::new(|| deploy::run(root))),
    ];
    // The Pi build is part of the suite: a static arm64 binary that runs under qemu, in the
    // multi-architecture image skopeo can push.
    steps.push((
        "image",
        Box::new(|| {
            *image_amd64.borrow_mut() = Some(image::run(root)?);
            Ok(())
        }),
    ));
    // The labs' daemon: the image step's static amd64 binary unless a build of one's own is
    // named.
    let lab_binary = || -> Result<PathBuf> {
        let prebuilt = image_amd64
            .borrow()
            .clone()
            .filter(|_| std::env::var_os("FLOW_AUDITOR_LAB_BINARY").is_none());
        match prebuilt {
            Some(binary) => Ok(binary),
            None => lab::binary(root),
        }
    };
    if root_user {
        // The lab end to end: the release daemon, real traffic, a real Prometheus. It runs the
        // image's static amd64 binary, the one users deploy, which also saves a release build.
        steps.push(("lab e2e", Box::new(|| lab::e2e::run(root, &lab_binary()?))));
        // The Cilium-style lab: two nodes, delivery past the lxc* egress hook, both routings.
        steps.push((
            "cilium lab e2e",
            Box::new(|| lab::cilium::run(root, &lab_binary()?)),
        ));
        // Debian's kernels in emulated VMs, one step each, then their table.
        steps.extend(kernels.steps(None));
    }
    steps.push((
        "cargo fmt --check",
        Box::new(|| run(cargo(root).args(["fmt", "--all", "--", "--check"]))),
    ));
    let result = run_steps(steps);
    if !root_user {
        loud_notice("Kernel tests were SKIPPED (not root): this run is incomplete.");
    }
    result
}

/// Runs every step, even after one failed, so one run shows every failure; closes with
/// `steps: N passed, M failed`.
fn run_steps(steps: Vec<(&str, Step<'_>)>) -> Result<()> {
    let total = steps.len();
    let mut failed = Vec::new();
    for (name, step) in steps {
        eprintln!("\n=== xtask test: {name}");
        if let Err(e) = step() {
            eprintln!("=== xtask test: {name} FAILED: {e:#}");
            failed.push(name);
        }
    }
    println!(
        "steps: {} passed, {} failed",
        total - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!("failed steps: {}", failed.join(", "));
    }
    Ok(())
}

/// What a whole `cargo xtask test` from a clean checkout writes under `target/` (debug tests, two
/// static musl release builds, the image): 3.25 GB at its end, measured in a fresh clone.
const SUITE_TARGET_BYTES: u64 = 3_300_000_000;

/// Says loudly, before hours of building, when the disk under `target/` cannot hold the suite's
/// build; a build that runs out of space fails with errors that hide the cause among many.
#[expect(
    clippy::cast_precision_loss,
    reason = "gigabytes printed to one decimal place"
)]
fn warn_if_disk_short(root: &Path) {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    // The nearest existing directory: a clean checkout has no target/ yet.
    let dir = target.ancestors().find(|d| d.is_dir()).unwrap_or(root);
    let Some(free) = free_bytes(dir) else {
        eprintln!(
            "xtask test: could not read the free space under {}",
            dir.display()
        );
        return;
    };
    eprintln!(
        "xtask test: {:.1} GB free under {}; a run from a clean checkout writes about {:.1} GB there",
        free as f64 / 1e9,
        dir.display(),
        SUITE_TARGET_BYTES as f64 / 1e9
    );
    if free < SUITE_TARGET_BYTES {
        loud_notice(&format!(
            "LOW DISK: {:.1} GB free under {}, and a build from scratch needs about {:.1} GB: \
             steps may fail with `No space left on device`.",
            free as f64 / 1e9,
            dir.display(),
            SUITE_TARGET_BYTES as f64 / 1e9
        ));
    }
}

/// Bytes an unprivileged writer can still use on the filesystem of `dir`, from `df -Pk`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["-Pk", "--"])
        .arg(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // POSIX format: a header line, then `filesystem total used available capacity mount`.
    let kib = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse::<u64>()
        .ok()?;
    Some(kib.saturating_mul(1024))
}

fn loud_notice(msg: &str) {
    let bar = "!".repeat(78);
    eprintln!("\n{bar}\n!! {msg}\n{bar}\n");
}

fn bench(root: &Path, which: Bench) -> Result<()> {
    if which.needs_root() && !is_root() {
        bail!(
            "`cargo xtask bench {}` loads eBPF programs: run it as root",
            which.name()
        );
    }
    run(cargo(root).args(["bench", "--package", "auditor", "--bench", which.name()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `df`'s figure against `stat -f`'s block counts for the same filesystem (another reader of
    /// statfs), within what other writers on the machine can change between the two calls.
    #[test]
    fn free_bytes_matches_statfs() {
        let dir = std::env::temp_dir();
        let free = free_bytes(&dir).expect("df reads the temp directory");
        let out = Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(&dir)
            .output()
            .expect("stat runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut fields = text
            .split_whitespace()
            .map(|f| f.parse::<u64>().expect("a number"));
        let (blocks, size) = (fields.next().expect("blocks"), fields.next().expect("size"));
        let statfs = blocks * size;
        assert!(
            free.abs_diff(statfs) < 256 << 20,
            "df says {free} bytes free, statfs {statfs}"
        );
        assert!(free_bytes(Path::new("/nonexistent/flow-auditor")).is_none());
    }
}
