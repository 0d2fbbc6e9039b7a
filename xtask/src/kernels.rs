//! The kernels users run: Debian's own kernel packages, fetched from Debian's archive and booted
//! in small emulated VMs, with the kernel tests run inside each (`cargo xtask test-kernels`, and
//! a step per kernel of `cargo xtask test`).
//!
//! - `x86_64` (bookworm's 6.1, the clsact path; bookworm-backports' 6.12, TCX on an older
//!   verifier): virtme-ng boots the kernel over a read-only view of this machine's root
//!   filesystem, so the test binaries `cargo test --no-run` built here run inside unchanged.
//! - arm64 with 16 KiB pages (bookworm-backports' 6.12 `arm64-16k`, the Raspberry Pi 5's
//!   configuration): qemu-system-aarch64 boots it with an initramfs built here from
//!   busybox-static:arm64, the kernel package's own veth, `sch_ingress` and `cls_bpf` modules and
//!   the static arm64 binary the image ships.
//!
//! On every kernel the daemon runs `auditor run --cluster` on a snapshot and audits real TCP flows
//! between two pod namespaces (busybox `httpd` and `nc`): on `x86_64` the `auditor` binary the test
//! build made (the same eBPF object, embedded), on arm64 the shipped one. That yields the attach
//! mode, the verifier's processed-instruction count of each program (the loader logs
//! `verified_insns`) and exact counts by verdict and outcome. Everything is bounded: each test has
//! a time limit inside the guest and each VM one outside it.
//!
//! Downloads use an apt configuration of their own under `target/kernels/apt` (a sources file
//! used for nothing else, its own lists and cache); the system's apt sources are never touched.
//! Packages are cached in `target/kernels/debs` and unpacked once in `target/kernels/unpacked`.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use crate::{AARCH64_TARGET, display, run};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Arch {
    X86_64,
    Arm64,
}

/// One kernel to boot: a Debian binary package whose name is `prefix` + version + `suffix`; the
/// newest version in the package index is taken.
struct Spec {
    /// The row's name in the table, and the step's.
    name: &'static str,
    arch: Arch,
    prefix: &'static str,
    suffix: &'static str,
}

const KERNELS: [Spec; 3] = [
    // Debian 12 nodes: no TCX, so the clsact path.
    Spec {
        name: "6.1 x86_64",
        arch: Arch::X86_64,
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
    },
    // TCX on an older verifier than the one the program is tuned on.
    Spec {
        name: "6.12 x86_64",
        arch: Arch::X86_64,
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
    },
    // The Raspberry Pi 5's kernel configuration: arm64, 16 KiB pages.
    Spec {
        name: "6.12 arm64 16k",
        arch: Arch::Arm64,
        prefix: "linux-image-6.12.",
        suffix: "+deb12-arm64-16k-unsigned",
    },
];

/// The kernel tests run inside the `x86_64` guests (test targets of the `auditor` package), each
/// with its time limit there. Under emulation they take 15 s to 1.5 minutes each.
const X86_TESTS: [(&str, u64); 6] = [
    ("ebpf_testrun", 240),
    ("ebpf_robustness", 240),
    ("netns_flows", 240),
    ("attach_churn", 240),
    ("capabilities", 240),
    ("daemon", 240),
];
/// The most one `x86_64` guest may take, whatever its tests' own limits add up to: a guest
/// takes about 4 minutes, and three kernels that all hang must still leave the whole suite
/// inside CI's 90 minutes.
const X86_VM_LIMIT: u64 = 900;
/// The daemon on real flows, in every guest.
const FLOWS: &str = "daemon flows";
/// Time limit of the flow scenario inside a guest (an emulated start takes tens of seconds).
const FLOWS_LIMIT: u64 = 180;
/// Booting (and, for virtme-ng, starting) a guest, beyond the limits of what runs in it.
const BOOT_ALLOWANCE: u64 = 180;

/// Modules the program needs that Debian builds as modules, in load order.
const MODULES: [&str; 3] = ["veth", "sch_ingress", "cls_bpf"];

/// The lines a guest reports on start with this, so the host finds them among kernel messages.
const MARK: &str = "@@fa ";

/// The package index of Debian's archive, kept under `target/kernels/apt`.
const SOURCES: &str = "\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-backports
Components: main
Architectures: amd64 arm64
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// Pass, fail, or never run (and why).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Pass(u64),
    Fail(u64),
    NotRun,
}

impl Outcome {
    fn cell(&self) -> String {
        match self {
            Self::Pass(secs) => format!("pass {}", minutes(*secs)),
            Self::Fail(secs) => format!("FAIL {}", minutes(*secs)),
            Self::NotRun => "-".to_owned(),
        }
    }
}

/// One kernel's row of the table.
#[derive(Debug)]
struct Row {
    kernel: &'static str,
    /// `uname -r` in the guest, and the package's version.
    release: String,
    page_size: Option<String>,
    mode: Option<String>,
    tests: BTreeMap<&'static str, Outcome>,
    /// The verifier's processed-instruction count: ingress, egress.
    verified: [Option<u32>; 2],
    /// The guest's time, from starting the VM until it powered off.
    secs: u64,
    problems: Vec<String>,
}

impl Row {
    fn new(kernel: &'static str) -> Self {
        Self {
            kernel,
            release: String::new(),
            page_size: None,
            mode: None,
            tests: BTreeMap::new(),
            verified: [None, None],
            secs: 0,
            problems: Vec::new(),
        }
    }

    fn passed(&self) -> bool {
        self.problems.is_empty()
            && !self.tests.is_empty()
            && self
                .tests
                .values()
                .all(|o| matches!(o, Outcome::Pass(_) | Outcome::NotRun))
            && self
                .tests
                .get(FLOWS)
                .is_some_and(|o| matches!(o, Outcome::Pass(_)))
    }
}

/// What the kernel steps share: the package index (updated once), the binaries (built once) and
/// the rows of the table.
pub struct Kernels<'a> {
    root: &'a Path,
    dir: PathBuf,
    index: RefCell<Option<std::result::Result<(), String>>>,
    x86_tests: RefCell<Option<std::result::Result<TestBuild, String>>>,
    shipped: RefCell<BTreeMap<&'static str, std::result::Result<PathBuf, String>>>,
    rows: RefCell<Vec<Row>>,
}

impl<'a> Kernels<'a> {
    pub fn new(root: &'a Path) -> Self {
        Self {
            root,
            dir: root.join("target/kernels"),
            index: RefCell::new(None),
            x86_tests: RefCell::new(None),
            shipped: RefCell::new(BTreeMap::new()),
            rows: RefCell::new(Vec::new()),
        }
    }

    /// One step per kernel (those whose name contains `only`, if given); the last also prints
    /// the table of every kernel's results.
    pub fn steps<'s>(&'s self, only: Option<&str>) -> Vec<(&'static str, crate::Step<'s>)> {
        let chosen: Vec<&Spec> = KERNELS
            .iter()
            .filter(|spec| only.is_none_or(|only| spec.name.contains(only)))
            .collect();
        let last = chosen.len().saturating_sub(1);
        chosen
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let step: crate::Step<'s> = Box::new(move || {
                    let result = self.kernel(spec);
                    if i == last {
                        println!("{}", table(&self.rows.borrow()));
                    }
                    result
                });
                (spec.name, step)
            })
            .collect()
    }

    /// Boots one kernel, runs what runs there, records its row; fails unless all of it passed.
    fn kernel(&self, spec: &Spec) -> Result<()> {
        let started = Instant::now();
        let mut row = Row::new(spec.name);
        let result = self.try_kernel(spec, &mut row);
        let total = started.elapsed().as_secs();
        if let Err(e) = &result {
            row.problems.push(format!("{e:#}"));
        }
        let passed = row.passed();
        let took = format!(
            "{} in the VM, {} with downloads and builds",
            minutes(row.secs),
            minutes(total)
        );
        let summary = if passed {
            format!("kernel {}: passed, {took}", spec.name)
        } else {
            format!("kernel {}: FAILED, {took}: {}", spec.name, failures(&row))
        };
        eprintln!("{summary}");
        self.rows.borrow_mut().push(row);
        ensure!(passed, "{summary}");
        Ok(())
    }

    fn try_kernel(&self, spec: &Spec, row: &mut Row) -> Result<()> {
        ensure!(
            std::env::consts::ARCH == "x86_64",
            "the kernel VMs run the x86_64 test binaries of this machine: an x86_64 host is needed"
        );
        ensure!(
            crate::is_root(),
            "the kernel VMs are run as root (apt-get, modules, bpffs)"
        );
        self.update_index()?;
        let (package, version) = self.newest(spec)?;
        let unpacked = self.fetch(&package, spec.arch)?;
        let release = kernel_release(&unpacked)?;
        row.release = format!("{release} ({version})");
        eprintln!("kernel {}: {package} {version}", spec.name);
        let run_dir = self.dir.join("runs").join(slug(spec.name));
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("removing {}", run_dir.display()))?;
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        std::fs::write(run_dir.join("cluster.yaml"), SNAPSHOT)?;
        std::fs::write(run_dir.join("flows.sh"), FLOWS_SCRIPT)?;
        let console = match spec.arch {
            Arch::X86_64 => self.run_x86(&unpacked, &release, &run_dir, row)?,
            Arch::Arm64 => self.run_arm64(&unpacked, &release, &run_dir, row)?,
        };
        read_report(&console, &run_dir, spec.arch, row);
        Ok(())
    }

    /// `apt-get` or `apt-cache` with the download-only configuration under `target/kernels/apt`.
    fn apt(&self, program: &str) -> Command {
        let apt = self.dir.join("apt");
        let mut cmd = Command::new(program);
        cmd.arg("-q");
        for (key, value) in [
            (
                "Dir::Etc::sourcelist",
                apt.join("kernels.sources").display().to_string(),
            ),
            ("Dir::Etc::sourceparts", "/dev/null".to_owned()),
            ("Dir::State::Lists", apt.join("lists").display().to_string()),
            ("Dir::Cache", apt.join("cache").display().to_string()),
            // Both architectures' indexes, without adding arm64 to dpkg's architectures.
            ("APT::Architectures::", "amd64".to_owned()),
            ("APT::Architectures::", "arm64".to_owned()),
            // Only the package lists: no translations, no AppStream metadata.
            ("Acquire::Languages", "none".to_owned()),
            (
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
                "false".to_owned(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled",
                "false".to_owned(),
            ),
            // The cache lives in root's checkout, which apt's sandbox user cannot write.
            ("APT::Sandbox::User", "root".to_owned()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd
    }

    /// `apt-get update` of the extra sources, once per run.
    fn update_index(&self) -> Result<()> {
        let mut index = self.index.borrow_mut();
        if index.is_none() {
            let result = (|| {
                let apt = self.dir.join("apt");
                for dir in ["lists/partial", "cache/archives/partial"] {
                    std::fs::create_dir_all(apt.join(dir))?;
                }
                std::fs::write(apt.join("kernels.sources"), SOURCES)?;
                run(self.apt("apt-get").arg("update"))
            })();
            *index = Some(result.map_err(|e| format!("{e:#}")));
        }
        index
            .clone()
            .unwrap_or_else(|| Err("no index".into()))
            .map_err(|e| anyhow!("updating the package index of Debian's archive: {e}"))
    }

    /// The newest package of `spec` in the index, and its version.
    fn newest(&self, spec: &Spec) -> Result<(String, String)> {
        let out = output(self.apt("apt-cache").args(["pkgnames", spec.prefix]))?;
        let package = newest_package(out.lines(), spec.prefix, spec.suffix).ok_or_else(|| {
            anyhow!(
                "no package {}VERSION{} in the index of bookworm and bookworm-backports",
                spec.prefix,
                spec.suffix
            )
        })?;
        let qualified = qualified(&package, spec.arch);
        let policy = output(
            self.apt("apt-cache")
                .args(["show", "--no-all-versions", &qualified]),
        )?;
        let version = policy
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .ok_or_else(|| anyhow!("apt-cache show {qualified} names no version"))?
            .to_owned();
        Ok((package, version))
    }

    /// Downloads `package` for `arch` into the cache (unless it is there) and unpacks it once;
    /// returns the directory it was unpacked into.
    fn fetch(&self, package: &str, arch: Arch) -> Result<PathBuf> {
        let debs = self.dir.join("debs");
        std::fs::create_dir_all(&debs)?;
        let cached = |debs: &Path| -> Result<Option<PathBuf>> {
            let prefix = format!("{package}_");
            let suffix = format!("_{}.deb", debian_arch(arch));
            Ok(std::fs::read_dir(debs)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(&suffix))
                }))
        };
        let deb = if let Some(deb) = cached(&debs)? {
            deb
        } else {
            run(self
                .apt("apt-get")
                .current_dir(&debs)
                .args(["download", &qualified(package, arch)]))?;
            cached(&debs)?.ok_or_else(|| anyhow!("apt-get download {package} left no .deb"))?
        };
        let unpacked = self.dir.join("unpacked").join(
            deb.file_stem()
                .ok_or_else(|| anyhow!("{} has no name", deb.display()))?,
        );
        let done = unpacked.join(".unpacked");
        if !done.exists() {
            if unpacked.exists() {
                std::fs::remove_dir_all(&unpacked)?;
            }
            std::fs::create_dir_all(&unpacked)?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
            std::fs::write(&done, b"")?;
        }
        Ok(unpacked)
    }

    /// The test binaries of [`X86_TESTS`] and the `auditor` binary, as `cargo test --no-run`
    /// builds them here (already built by the `cargo test` step of `cargo xtask test`).
    fn x86_tests(&self) -> Result<TestBuild> {
        let mut cache = self.x86_tests.borrow_mut();
        if cache.is_none() {
            *cache = Some(test_binaries(self.root).map_err(|e| format!("{e:#}")));
        }
        cache
            .clone()
            .unwrap_or_else(|| Err("no test binaries".into()))
            .map_err(|e| anyhow!("building the kernel tests: {e}"))
    }

    /// The stripped static binary the image ships for `target`, built once per run.
    fn shipped(&self, target: &'static str) -> Result<PathBuf> {
        let mut cache = self.shipped.borrow_mut();
        cache
            .entry(target)
            .or_insert_with(|| {
                crate::image::shipped_binary(self.root, target).map_err(|e| format!("{e:#}"))
            })
            .clone()
            .map_err(|e| anyhow!("building the static {target} binary: {e}"))
    }

    /// Boots an `x86_64` kernel with virtme-ng and runs the kernel tests, then the flows; returns
    /// the guest's report.
    fn run_x86(
        &self,
        unpacked: &Path,
        release: &str,
        run_dir: &Path,
        row: &mut Row,
    ) -> Result<String> {
        let TestBuild {
            tests,
            auditor: binary,
        } = self.x86_tests()?;
        let mut script = format!("flows_limit={FLOWS_LIMIT}\n");
        script.push_str(GUEST_PREAMBLE);
        writeln!(
            script,
            "mods() {{ for m in {}; do modprobe $m || report error modprobe-$m; done; }}",
            MODULES.join(" ")
        )?;
        script.push_str("mods\n");
        writeln!(script, "cd {}", shell_quote(&self.root.join("auditor")))?;
        for (name, binary) in &tests {
            let limit = X86_TESTS
                .iter()
                .find(|(n, _)| n == name)
                .map_or(240, |(_, l)| *l);
            writeln!(
                script,
                "run_test {name} {limit} {} --include-ignored --test-threads=1 --show-output",
                shell_quote(binary)
            )?;
            row.tests.insert(name, Outcome::NotRun);
        }
        writeln!(
            script,
            "run_flows {} {}",
            shell_quote(&binary),
            shell_quote(run_dir)
        )?;
        script.push_str("report done\n");
        let script_path = run_dir.join("guest.sh");
        std::fs::write(&script_path, script)?;
        let console = run_dir.join("console.log");
        let limit = tests
            .iter()
            .filter_map(|(name, _)| X86_TESTS.iter().find(|(n, _)| n == name))
            .map(|(_, l)| l)
            .sum::<u64>()
            + FLOWS_LIMIT
            + BOOT_ALLOWANCE;
        let limit = limit.min(X86_VM_LIMIT);
        let kernel = unpacked.join("boot").join(format!("vmlinuz-{release}"));
        let mut vng = Command::new(vng()?);
        vng.arg("--run")
            .arg(&kernel)
            .args(["--disable-kvm", "--memory", "3G", "--cpus", "1"])
            .arg(format!("--rwdir={}", run_dir.display()))
            .arg("--exec")
            .arg(format!(
                "sh {} {} > {} 2>&1",
                shell_quote(&script_path),
                shell_quote(run_dir),
                shell_quote(&console)
            ));
        let vm_log = run_dir.join("vm.log");
        let booted = Instant::now();
        let status = bounded(&mut vng, Duration::from_secs(limit), &vm_log);
        row.secs = booted.elapsed().as_secs();
        let status = status?;
        let report = std::fs::read_to_string(&console).unwrap_or_default();
        if !report.contains(&format!("{MARK}done")) {
            bail!(
                "the guest did not finish ({status}); its report so far:\n{}\nvirtme-ng:\n{}",
                tail(&report, 40),
                tail(&std::fs::read_to_string(&vm_log).unwrap_or_default(), 20)
            );
        }
        Ok(report)
    }

    /// Boots the arm64 kernel with qemu-system-aarch64 and an initramfs of our own, runs the
    /// flows there; returns the console's output.
    fn run_arm64(
        &self,
        unpacked: &Path,
        release: &str,
        run_dir: &Path,
        row: &mut Row,
    ) -> Result<String> {
        let binary = self.shipped(AARCH64_TARGET)?;
        let busybox = self
            .fetch("busybox-static", Arch::Arm64)?
            .join("bin/busybox");
        ensure!(busybox.is_file(), "busybox-static:arm64 has no bin/busybox");
        let modules = unpacked.join("lib/modules").join(release);
        let mut files: Vec<(String, u32, Vec<u8>)> = vec![
            ("bin/busybox".into(), 0o755, read(&busybox)?),
            ("auditor".into(), 0o755, read(&binary)?),
            ("cluster.yaml".into(), 0o644, SNAPSHOT.as_bytes().to_vec()),
            ("flows.sh".into(), 0o644, FLOWS_SCRIPT.as_bytes().to_vec()),
        ];
        for module in MODULES {
            let path = find_module(&modules, module)?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("{} has no name", path.display()))?;
            files.push((format!("modules/{name}"), 0o644, read(&path)?));
        }
        let mut init = String::from(ARM64_INIT);
        writeln!(init, "flows_limit={FLOWS_LIMIT}")?;
        init.push_str(GUEST_PREAMBLE);
        init.push_str(
            "mods() { for m in /modules/*; do case $m in *.xz) unxz $m; m=${m%.xz};; esac; \
             insmod $m || report error insmod-${m##*/}; done; }\nmods\n",
        );
        init.push_str("run_flows /auditor /tmp/run\nreport done\npoweroff -f\n");
        files.push(("init".into(), 0o755, init.into_bytes()));
        let initrd = run_dir.join("initrd.cpio");
        std::fs::write(&initrd, cpio(&files)?)
            .with_context(|| format!("writing {}", initrd.display()))?;
        let console = run_dir.join("console.log");
        let mut qemu = Command::new("qemu-system-aarch64");
        qemu.args([
            "-M",
            "virt",
            "-cpu",
            "cortex-a76",
            "-smp",
            "1",
            "-m",
            "2G",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
        ])
        .arg(unpacked.join("boot").join(format!("vmlinuz-{release}")))
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyAMA0 rdinit=/init panic=-1 quiet loglevel=3",
        ]);
        let booted = Instant::now();
        let status = bounded(
            &mut qemu,
            Duration::from_secs(FLOWS_LIMIT + BOOT_ALLOWANCE),
            &console,
        );
        row.secs = booted.elapsed().as_secs();
        let status = status?;
        let report = std::fs::read_to_string(&console).unwrap_or_default();
        if !report.contains(&format!("{MARK}done")) {
            bail!(
                "the guest did not finish ({status}); its console:\n{}",
                tail(&report, 40)
            );
        }
        Ok(report)
    }
}

/// `cargo xtask test-kernels [--only NAME]`: only the kernel steps, with their table and a
/// summary line.
pub fn run_alone(root: &Path, only: Option<&str>) -> Result<()> {
    let kernels = Kernels::new(root);
    let steps = kernels.steps(only);
    ensure!(
        !steps.is_empty(),
        "no kernel's name contains {only:?}: the kernels are {}",
        KERNELS.map(|k| k.name).join(", ")
    );
    crate::run_steps(steps)
}

/// virtme-ng's `vng`: on the PATH, or where pip put it for this Python.
fn vng() -> Result<PathBuf> {
    if Command::new("vng")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(PathBuf::from("vng"));
    }
    let scripts = output(Command::new("python3").args([
        "-c",
        "import sysconfig; print(sysconfig.get_path('scripts'))",
    ]))?;
    let vng = Path::new(scripts.trim()).join("vng");
    ensure!(
        vng.is_file(),
        "virtme-ng's vng is not installed (run `cargo xtask setup` as root)"
    );
    Ok(vng)
}

/// Runs `cmd` in a process group of its own with stdin closed and its output in `log`, killing
/// the whole group (the VM included) after `limit`. Returns how it ended.
fn bounded(cmd: &mut Command, limit: Duration, log: &Path) -> Result<String> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = file.try_clone()?;
    eprintln!("+ {} (at most {}s)", display(cmd), limit.as_secs());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("could not start {}", display(cmd)))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.to_string());
        }
        if Instant::now() > deadline {
            let pgid = i32::try_from(child.id()).context("pid out of range")?;
            // SAFETY: signals the process group we created for this child, nothing else.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.wait();
            return Ok(format!("killed after {}s", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The stdout of a command that must succeed.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {}", display(cmd)))?;
    ensure!(
        out.status.success(),
        "{} failed: {}\n{}",
        display(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

const fn debian_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "amd64",
        Arch::Arm64 => "arm64",
    }
}

/// `package:arm64` for a foreign package, `package` for the host's.
fn qualified(package: &str, arch: Arch) -> String {
    match arch {
        Arch::X86_64 => package.to_owned(),
        Arch::Arm64 => format!("{package}:arm64"),
    }
}

/// Of `names`, the `prefix` + version + `suffix` one with the highest version (compared as
/// numbers, dot by dot: `6.1.0-50` over `6.1.0-47`, `6.12.95` over `6.12.9`).
fn newest_package<'n>(
    names: impl Iterator<Item = &'n str>,
    prefix: &str,
    suffix: &str,
) -> Option<String> {
    names
        .filter_map(|name| {
            let version = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
            let numbers: Option<Vec<u64>> = version.split('.').map(|n| n.parse().ok()).collect();
            Some((numbers?, name))
        })
        .max()
        .map(|(_, name)| name.to_owned())
}

/// The kernel release an unpacked kernel package holds (its `lib/modules` directory's name).
fn kernel_release(unpacked: &Path) -> Result<String> {
    let modules = unpacked.join("lib/modules");
    let mut releases: Vec<String> = std::fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    releases.sort();
    ensure!(
        releases.len() == 1,
        "{} holds {releases:?}, not one kernel release",
        modules.display()
    );
    let release = releases.remove(0);
    let kernel = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    ensure!(kernel.is_file(), "{} is missing", kernel.display());
    Ok(release)
}

/// The module file (`.ko` or `.ko.xz`) of `name` under `modules`.
fn find_module(modules: &Path, name: &str) -> Result<PathBuf> {
    let mut stack = vec![modules.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == format!("{name}.ko") || n == format!("{name}.ko.xz"))
            {
                return Ok(path);
            }
        }
    }
    bail!("no module {name} under {}", modules.display())
}

/// A newc cpio archive (what the kernel unpacks as an initramfs) of `files` (path, mode,
/// contents), with the directories they need and `/dev/console`, which the kernel opens for
/// init before anything is mounted.
fn cpio(files: &[(String, u32, Vec<u8>)]) -> Result<Vec<u8>> {
    const DIR: u32 = 0o040_000;
    const FILE: u32 = 0o100_000;
    const CHAR: u32 = 0o020_000;
    let mut out = Vec::new();
    let mut ino = 0_u32;
    let mut entry = |out: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        ino += 1;
        let size = u32::try_from(data.len()).map_err(|_| anyhow!("{name} is over 4 GiB"))?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| anyhow!("name too long"))?;
        write!(
            out,
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 1, 0, 0, 0, rdev.0, rdev.1, 0
        )?;
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(out);
        out.extend_from_slice(data);
        pad4(out);
        Ok::<_, anyhow::Error>(())
    };
    let mut dirs = std::collections::BTreeSet::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "modules", "run"] {
        dirs.insert(d.to_owned());
    }
    for (path, _, _) in files {
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.display().to_string());
            parent = p.parent();
        }
    }
    for dir in &dirs {
        entry(&mut out, dir, DIR | 0o755, (0, 0), &[])?;
    }
    entry(&mut out, "dev/console", CHAR | 0o600, (5, 1), &[])?;
    for (path, mode, data) in files {
        entry(&mut out, path, FILE | mode, (0, 0), data)?;
    }
    entry(&mut out, "TRAILER!!!", 0, (0, 0), &[])?;
    Ok(out)
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

fn slug(name: &str) -> String {
    name.replace(' ', "-")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn minutes(secs: u64) -> String {
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

/// What `cargo test --no-run` built for the `x86_64` guests.
#[derive(Clone)]
struct TestBuild {
    /// The executables of [`X86_TESTS`], in that order.
    tests: Vec<(&'static str, PathBuf)>,
    /// The `auditor` binary the tests run (`CARGO_BIN_EXE_auditor`).
    auditor: PathBuf,
}

/// `cargo test --no-run` of the kernel tests; their executables by test name.
fn test_binaries(root: &Path) -> Result<TestBuild> {
    let mut cmd = crate::cargo(root);
    // As the `cargo test` step builds them (the whole workspace, so the same features): nothing
    // is rebuilt.
    cmd.env("CARGO_INCREMENTAL", "0").args([
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json",
    ]);
    for (name, _) in X86_TESTS {
        cmd.args(["--test", name]);
    }
    eprintln!("+ {}", display(&cmd));
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start {}", display(&cmd)))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        display(&cmd),
        out.status
    );
    let mut found = Vec::new();
    let mut auditor = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let target = message["target"]["name"].as_str().unwrap_or_default();
        let bin = message["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bin"));
        if bin && target == "auditor" {
            auditor = Some(PathBuf::from(executable));
        }
        if let Some((name, _)) = X86_TESTS.iter().find(|(n, _)| *n == target) {
            found.push((*name, PathBuf::from(executable)));
        }
    }
    for (name, _) in X86_TESTS {
        ensure!(
            found.iter().any(|(n, _)| *n == name),
            "cargo built no test binary {name}"
        );
    }
    found.sort_by_key(|(name, _)| X86_TESTS.iter().position(|(n, _)| n == name));
    Ok(TestBuild {
        tests: found,
        auditor: auditor.ok_or_else(|| anyhow!("cargo built no auditor binary"))?,
    })
}

/// What a guest reported (`@@fa ...` lines of its console), into `row`.
fn read_report(console: &str, run_dir: &Path, arch: Arch, row: &mut Row) {
    let mut metrics = Vec::new();
    let mut flows_secs = None;
    for line in console.lines() {
        let Some(at) = line.find(MARK) else {
            continue;
        };
        let fields: Vec<&str> = line[at + MARK.len()..].split_whitespace().collect();
        match fields.as_slice() {
            ["pagesize", kib] => row.page_size = Some(format!("{kib} KiB")),
            ["test", name, rc, secs] => {
                let secs = secs.parse().unwrap_or(0);
                if let Some((name, _)) = X86_TESTS.iter().find(|(n, _)| n == name) {
                    let outcome = if *rc == "0" {
                        Outcome::Pass(secs)
                    } else {
                        Outcome::Fail(secs)
                    };
                    if *rc != "0" {
                        let log = run_dir.join(format!("{name}.log"));
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        eprintln!(
                            "kernel {}: {name} failed (exit {rc}); the end of {}:\n{}",
                            row.kernel,
                            log.display(),
                            tail(&text, 30)
                        );
                    }
                    row.tests.insert(name, outcome);
                }
            }
            ["metric", rest @ ..] => metrics.push(rest.join(" ")),
            ["log", rest @ ..] => {
                let line = rest.join(" ");
                if let Some((program, count)) = verified_line(&line) {
                    let slot = usize::from(program == PROGRAM_EGRESS);
                    row.verified[slot] = Some(count);
                }
            }
            ["flows", "secs", secs] => flows_secs = secs.parse().ok(),
            ["error", what @ ..] => row.problems.push(format!("guest: {}", what.join(" "))),
            _ => {}
        }
    }
    row.mode = attach_mode(&metrics);
    let check = check_flows(&metrics, console);
    match (check, flows_secs) {
        (Ok(()), Some(secs)) => {
            row.tests.insert(FLOWS, Outcome::Pass(secs));
        }
        (result, secs) => {
            let why = result.err().map_or_else(
                || "the flow scenario did not finish".to_owned(),
                |e| format!("{e:#}"),
            );
            eprintln!("kernel {}: {FLOWS} failed: {why}", row.kernel);
            if let Ok(log) = std::fs::read_to_string(run_dir.join("daemon.log")) {
                eprintln!("the daemon's log:\n{}", tail(&log, 30));
            }
            row.tests.insert(FLOWS, Outcome::Fail(secs.unwrap_or(0)));
        }
    }
    if arch == Arch::Arm64 {
        for (name, _) in X86_TESTS {
            row.tests.entry(name).or_insert(Outcome::NotRun);
        }
    }
    for (name, outcome) in &row.tests {
        if *outcome == Outcome::NotRun && arch == Arch::X86_64 {
            row.problems.push(format!("{name} did not run"));
        }
    }
}

/// The egress program's name (`auditor_ebpf::PROGRAM_EGRESS`), as the loader logs it.
const PROGRAM_EGRESS: &str = "flow_auditor_egress";

/// `(program, count)` of the loader's `program verified and loaded` log line.
fn verified_line(line: &str) -> Option<(String, u32)> {
    if !line.contains("program verified and loaded") {
        return None;
    }
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_owned())
    };
    Some((
        field("program")?,
        field("verified_instructions")?.parse().ok()?,
    ))
}

/// The attach mode the daemon reported (`flow_auditor_attached_interfaces{mode=...}` above 0).
fn attach_mode(metrics: &[String]) -> Option<String> {
    metrics.iter().find_map(|line| {
        let rest = line.strip_prefix("flow_auditor_attached_interfaces{mode=\"")?;
        let (mode, value) = rest.split_once("\"} ")?;
        (value.trim().parse::<f64>().ok()? > 0.0).then(|| mode.to_owned())
    })
}

/// The flows the scenario makes, by (verdict, outcome, `dst_port`): exactly one each.
const EXPECTED_FLOWS: [(&str, &str, &str); 3] = [
    // web -> db:8080, which the policy allows.
    ("allowed", "established", "8080"),
    // web -> db:7070: the policy does not allow it, nothing enforces it, it got through.
    ("unexpected", "established", "7070"),
    // web -> db:9, nothing listening: the RST back; denied, as the model says.
    ("denied", "refused", "other"),
];

/// The daemon's flow counts against [`EXPECTED_FLOWS`]: each exactly once, nothing else, both
/// pods named, two interfaces attached.
fn check_flows(metrics: &[String], console: &str) -> Result<()> {
    ensure!(
        !metrics.is_empty(),
        "no scrape of /metrics came back from the guest"
    );
    let mut counted: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for line in metrics {
        let Some(rest) = line.strip_prefix("flow_auditor_flows_total{") else {
            continue;
        };
        let (labels, value) = rest
            .rsplit_once("} ")
            .ok_or_else(|| anyhow!("unreadable sample {line}"))?;
        let value: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("unreadable value in {line}"))?;
        if value <= 0.0 {
            continue;
        }
        let label = |key: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        ensure!(
            label("src_namespace") == "web"
                && label("src_workload") == "frontend"
                && label("dst_namespace") == "db"
                && label("dst_workload") == "store"
                && label("protocol") == "tcp",
            "a flow between other peers than web/frontend -> db/store over TCP: {line}"
        );
        *counted
            .entry((label("verdict"), label("outcome"), label("dst_port")))
            .or_default() += value;
    }
    let expected: BTreeMap<(String, String, String), f64> = EXPECTED_FLOWS
        .iter()
        .map(|(v, o, p)| (((*v).to_owned(), (*o).to_owned(), (*p).to_owned()), 1.0))
        .collect();
    ensure!(
        counted == expected,
        "flows counted {counted:?}, expected exactly {expected:?}"
    );
    // A gauge of whole interfaces: read as an integer.
    let attached: u64 = metrics
        .iter()
        .filter_map(|l| l.strip_prefix("flow_auditor_attached_interfaces{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<u64>().ok())
        .sum();
    ensure!(attached == 2, "{attached} interfaces attached, expected 2");
    ensure!(
        console.contains(&format!("{MARK}daemon-exit 0")),
        "the daemon did not exit 0 on SIGTERM"
    );
    Ok(())
}

fn failures(row: &Row) -> String {
    let mut what: Vec<String> = row
        .tests
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Fail(_)))
        .map(|(name, _)| (*name).to_owned())
        .collect();
    what.extend(row.problems.iter().cloned());
    what.join("; ")
}

/// The table of every kernel's row: tests, attach mode, verified instructions, time.
fn table(rows: &[Row]) -> String {
    let mut header: Vec<String> = ["kernel", "release", "page", "attach"]
        .map(String::from)
        .to_vec();
    header.extend(X86_TESTS.iter().map(|(name, _)| (*name).to_owned()));
    header.extend([FLOWS, "verified insns in/eg", "VM time", "result"].map(String::from));
    let mut lines = vec![header];
    for row in rows {
        let mut cells = vec![
            row.kernel.to_owned(),
            row.release.clone(),
            row.page_size.clone().unwrap_or_else(|| "?".into()),
            row.mode.clone().unwrap_or_else(|| "?".into()),
        ];
        for (name, _) in X86_TESTS {
            cells.push(
                row.tests
                    .get(name)
                    .map_or_else(|| "-".into(), Outcome::cell),
            );
        }
        cells.push(
            row.tests
                .get(FLOWS)
                .map_or_else(|| "-".into(), Outcome::cell),
        );
        let count = |c: Option<u32>| c.map_or_else(|| "?".to_owned(), |c| c.to_string());
        cells.push(format!(
            "{} / {}",
            count(row.verified[0]),
            count(row.verified[1])
        ));
        cells.push(minutes(row.secs));
        cells.push(if row.passed() { "pass" } else { "FAIL" }.to_owned());
        lines.push(cells);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::from("\nkernels (Debian's packages, emulated):\n");
    for (n, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
        }
    }
    for row in rows.iter().filter(|r| !r.problems.is_empty()) {
        let _ = writeln!(out, "{}: {}", row.kernel, row.problems.join("; "));
    }
    out
}

/// The start of the arm64 initramfs's init: the file systems a kernel test needs, and busybox's
/// applets on the PATH.
const ARM64_INIT: &str = r"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /tmp/run
cp /cluster.yaml /flows.sh /tmp/run/
";

/// Shell functions both guests use: reporting, running one test with a time limit, running the
/// flow scenario. `$1` of the guest script is its output directory (`x86_64`).
const GUEST_PREAMBLE: &str = r#"
report() { echo "@@fa $*"; }
report release "$(uname -r)"
report pagesize "$(grep -m1 KernelPageSize /proc/self/smaps | tr -s ' ' | cut -d' ' -f2)"
mount -t bpf bpf /sys/fs/bpf || report error bpffs
out=${1:-/tmp/run}
run_test() {
  name=$1; limit=$2; shift 2
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  report test "$name" "$rc" "$(( $(date +%s) - start ))"
}
run_flows() {
  start=$(date +%s)
  timeout -k 10 "$flows_limit" sh "$2/flows.sh" "$1" "$2" 2>&1 || report error flows-exit-$?
  report flows secs "$(( $(date +%s) - start ))"
}
"#;

/// The flow scenario, busybox only (the arm64 initramfs has nothing else): the guest's own
/// network namespace is the node, two pods are namespaces held by a sleeping process each,
/// wired as Calico does (a veth `caliX` on the node, a host route, proxy ARP). The binary
/// runs `auditor run --cluster` on [`SNAPSHOT`]; pod A opens three TCP connections to pod B
/// (allowed; forbidden but unenforced; to a closed port), then the metrics are scraped and the
/// daemon gets SIGTERM. `$1` the binary, `$2` a writable directory with `cluster.yaml`.
const FLOWS_SCRIPT: &str = r#"
bin=$1; dir=$2
bb=busybox
report() { echo "@@fa $*"; }
# HTTP by hand over nc: a static glibc busybox's wget crashes where /etc has an NSS setup. The
# request side stays open a while: nc half-closes at the end of its input, and the server drops a
# half-closed connection before a slow (emulated) response is written.
get() {
  { printf 'GET %s HTTP/1.1\r\nHost: auditor\r\nConnection: close\r\n\r\n' "$1"; $bb sleep 3; } |
    $bb nc -w 10 127.0.0.1 19925 2>/dev/null | $bb tr -d '\r'
}
echo 1 > /proc/sys/net/ipv4/ip_forward
$bb ip link set lo up
pod() {
  # name address: a namespace held by a sleeping process, its eth0 the peer of caliNAME.
  $bb unshare -n $bb sleep 600 &
  pid=$!
  i=0; while [ ! -e /proc/$pid/ns/net ] && [ $i -lt 50 ]; do $bb sleep 0.1; i=$((i+1)); done
  $bb ip link add cali$1 type veth
  peer=$($bb ip -o link show | $bb sed -n "s/^[0-9]*: \([^@:]*\)@cali$1:.*/\1/p")
  $bb ip link set "$peer" netns $pid
  $bb nsenter -t $pid -n $bb ip link set "$peer" name eth0
  $bb nsenter -t $pid -n $bb ip link set lo up
  $bb nsenter -t $pid -n $bb ip link set eth0 up
  $bb nsenter -t $pid -n $bb ip addr add $2/32 dev eth0
  $bb nsenter -t $pid -n $bb ip route add default dev eth0
  $bb ip link set cali$1 up
  $bb ip route add $2/32 dev cali$1
  echo 1 > /proc/sys/net/ipv4/conf/cali$1/proxy_arp
  eval "pid_$1=$pid"
}
pod A 192.0.2.10
pod B 192.0.2.20
mkdir -p $dir/www && echo hello > $dir/www/index.html
$bb nsenter -t $pid_B -n $bb httpd -f -p 192.0.2.20:8080 -h $dir/www &
web1=$!
$bb nsenter -t $pid_B -n $bb httpd -f -p 192.0.2.20:7070 -h $dir/www &
web2=$!
RUST_LOG=info $bin run --cluster $dir/cluster.yaml --interfaces 'cali*' \
  --metrics-addr 127.0.0.1:19925 --answer-timeout 1s --node node-1 \
  > $dir/daemon.out 2> $dir/daemon.log &
daemon=$!
i=0
until get /readyz | $bb head -n 1 | $bb grep -q ' 200 '; do
  i=$((i+1))
  if [ $i -gt 60 ] || ! kill -0 $daemon 2>/dev/null; then report error daemon-not-ready; break; fi
  $bb sleep 1
done
$bb grep "program verified" $dir/daemon.log | while read -r l; do report log "$l"; done
for port in 8080 7070 9; do
  printf 'GET / HTTP/1.0\r\n\r\n' |
    $bb nsenter -t $pid_A -n $bb nc -w 10 192.0.2.20 $port > /dev/null 2>&1
  report connect $port $?
done
# Until the three flows are counted (the answer timeout is 1 s), at most 30 scrapes (3 s each).
i=0
while [ $i -lt 30 ]; do
  get /metrics > $dir/metrics
  n=$($bb grep '^flow_auditor_flows_total{' $dir/metrics 2>/dev/null | $bb grep -vc ' 0$')
  [ "${n:-0}" -ge 3 ] && break
  i=$((i+1)); $bb sleep 1
done
$bb sleep 2
i=0
until get /metrics > $dir/metrics && $bb grep -q '^flow_auditor_flows_total' $dir/metrics || [ $i -ge 10 ]; do
  i=$((i+1))
done
$bb grep -E '^flow_auditor_(flows_total|attached_interfaces)' $dir/metrics | while read -r l; do report metric "$l"; done
kill -TERM $daemon
i=0; while kill -0 $daemon 2>/dev/null && [ $i -lt 100 ]; do $bb sleep 0.1; i=$((i+1)); done
if kill -0 $daemon 2>/dev/null; then report error daemon-ignored-sigterm; kill -KILL $daemon; fi
wait $daemon
report daemon-exit $?
$bb tail -n 15 $dir/daemon.log 2>/dev/null | while read -r l; do echo "daemon: $l"; done
kill $web1 $web2 $pid_A $pid_B 2>/dev/null
"#;

/// The snapshot `auditor run --cluster` audits in the guests: pod A `web/frontend`, pod B
/// `db/store` declaring 8080 and 7070, and a policy that admits only 8080 from `web` into `db`.
const SNAPSHOT: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {kubernetes.io/metadata.name: web}}
---
apiVersion: v1
kind: Namespace
metadata: {name: db, labels: {kubernetes.io/metadata.name: db}}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
spec: {podCIDR: 192.0.2.0/24}
status:
  addresses: [{type: InternalIP, address: 198.51.100.1}]
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: web, labels: {app: frontend}}
spec:
  nodeName: node-1
  containers: [{name: app, image: x}]
status: {podIP: 192.0.2.10, podIPs: [{ip: 192.0.2.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: store, namespace: db, labels: {app: store}}
spec:
  nodeName: node-1
  containers:
    - name: store
      image: x
      ports: [{containerPort: 8080, protocol: TCP}, {containerPort: 7070, protocol: TCP}]
status: {podIP: 192.0.2.20, podIPs: [{ip: 192.0.2.20}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: store-from-web, namespace: db}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
    - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: web}}}]
      ports: [{port: 8080, protocol: TCP}]
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_package_is_picked_by_number() {
        let names = [
            "linux-image-6.1.0-47-amd64-unsigned",
            "linux-image-6.1.0-50-amd64-unsigned",
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-50-cloud-amd64-unsigned",
            "linux-image-6.1.0-50-rt-amd64-unsigned",
        ];
        assert_eq!(
            newest_package(names.into_iter(), "linux-image-6.1.0-", "-amd64-unsigned").as_deref(),
            Some("linux-image-6.1.0-50-amd64-unsigned")
        );
        let names = [
            "linux-image-6.12.9+deb12-arm64-16k-unsigned",
            "linux-image-6.12.95+deb12-arm64-16k-unsigned",
            "linux-image-6.12.95+deb12-arm64-unsigned",
        ];
        assert_eq!(
            newest_package(
                names.into_iter(),
                "linux-image-6.12.",
                "+deb12-arm64-16k-unsigned"
            )
            .as_deref(),
            Some("linux-image-6.12.95+deb12-arm64-16k-unsigned")
        );
        assert_eq!(
            newest_package(std::iter::empty(), "linux-image-6.1.0-", "-amd64-unsigned"),
            None
        );
    }

    #[test]
    fn the_cpio_archive_is_what_the_kernel_reads() {
        let files = vec![("bin/busybox".to_owned(), 0o755, b"abc".to_vec())];
        let archive = cpio(&files).unwrap();
        // Every header starts on a 4-byte boundary with the newc magic, the trailer last.
        let text = String::from_utf8_lossy(&archive);
        assert!(archive.starts_with(b"070701"));
        assert!(text.contains("bin/busybox\0"));
        assert!(text.contains("dev/console\0"));
        let trailer = text.find("TRAILER!!!").unwrap();
        assert_eq!((trailer - 110) % 4, 0, "the trailer's header is aligned");
        assert_eq!(archive.len() % 4, 0);
        // busybox's header: mode 0100755, size 3.
        let at = text.find("bin/busybox\0").unwrap() - 110;
        assert_eq!(&text[at + 14..at + 22], "000081ed");
        assert_eq!(&text[at + 54..at + 62], "00000003");
        let data = at + 110 + "bin/busybox\0".len();
        let data = data + (4 - data % 4) % 4;
        assert_eq!(&archive[data..data + 3], b"abc");
    }

    #[test]
    fn the_guest_report_is_read() {
        let line = "2026-01-01T00:00:00Z  INFO auditor::datapath::load: program verified and \
                    loaded program=\"flow_auditor_egress\" id=12 verified_instructions=4242";
        assert_eq!(
            verified_line(line),
            Some(("flow_auditor_egress".into(), 4242))
        );
        assert_eq!(verified_line("something else"), None);
        let metrics: Vec<String> = [
            "flow_auditor_attached_interfaces{mode=\"tcx\"} 2",
            "flow_auditor_attached_interfaces{mode=\"clsact\"} 0",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(attach_mode(&metrics).as_deref(), Some("tcx"));
    }

    #[test]
    fn flow_counts_must_be_exact() {
        let sample = |verdict: &str, outcome: &str, port: &str, n: u32| {
            format!(
                "flow_auditor_flows_total{{verdict=\"{verdict}\",outcome=\"{outcome}\",\
                 src_namespace=\"web\",src_workload=\"frontend\",dst_namespace=\"db\",\
                 dst_workload=\"store\",protocol=\"tcp\",dst_port=\"{port}\"}} {n}"
            )
        };
        let mut metrics = vec![
            sample("allowed", "established", "8080", 1),
            sample("unexpected", "established", "7070", 1),
            sample("denied", "refused", "other", 1),
            sample("denied", "unanswered", "other", 0),
            "flow_auditor_attached_interfaces{mode=\"clsact\"} 2".to_owned(),
        ];
        let console = "@@fa daemon-exit 0\n";
        check_flows(&metrics, console).unwrap();
        assert!(check_flows(&metrics, "@@fa daemon-exit 1\n").is_err());
        metrics[0] = sample("allowed", "established", "8080", 2);
        assert!(
            check_flows(&metrics, console).is_err(),
            "a flow counted twice"
        );
        metrics[0] = sample("allowed", "established", "8080", 1);
        metrics.push(sample("unexpected", "established", "other", 1));
        assert!(check_flows(&metrics, console).is_err(), "an extra flow");
        assert!(check_flows(&[], console).is_err());
    }
}
