//! `lab-redirect`: the Cilium-style lab's stand-in for Cilium's BPF host routing, run inside one
//! node namespace of the lab (`cargo xtask demo --cni cilium`, `cargo xtask test`). Not part of
//! the agent.
//!
//! ```text
//! lab-redirect --stats FILE [--redirect IFACE]... [--probe IFACE]... [--endpoint IPV4=IFACE]...
//!              [--max-seconds N]
//! ```
//!
//! Attaches `lab_redirect` to the TC ingress of each `--redirect` interface (last in the TCX
//! chain, so an auditor attached first still sees the packet) and `lab_egress_probe` to the TC
//! egress of each `--probe` interface, fills the endpoint map from the `--endpoint` pairs, and
//! writes its counters to FILE (`name value` lines, replaced atomically) every 100 ms until
//! SIGTERM or SIGINT, or `--max-seconds` (default 3600). Its TCX links die with it.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, PerCpuArray},
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttach},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lab-redirect-ebpf"));

/// The counters' names, in the program's slot order.
const SLOTS: [&str; 4] = [
    "redirected",
    "probe_remote",
    "probe_local",
    "redirect_failed",
];

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Args {
    stats: PathBuf,
    redirect: Vec<String>,
    probe: Vec<String>,
    endpoints: Vec<(Ipv4Addr, String)>,
    max: Duration,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args> {
    let mut args = Args {
        stats: PathBuf::new(),
        redirect: Vec::new(),
        probe: Vec::new(),
        endpoints: Vec::new(),
        max: Duration::from_secs(3600),
    };
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--stats" => args.stats = PathBuf::from(value()?),
            "--redirect" => args.redirect.push(value()?),
            "--probe" => args.probe.push(value()?),
            "--endpoint" => {
                let v = value()?;
                let (ip, iface) = v
                    .split_once('=')
                    .with_context(|| format!("--endpoint {v:?}: want IPV4=IFACE"))?;
                let ip = ip
                    .parse()
                    .with_context(|| format!("--endpoint {v:?}: {ip:?} is not an IPv4 address"))?;
                args.endpoints.push((ip, iface.to_owned()));
            }
            "--max-seconds" => {
                let v = value()?;
                args.max = Duration::from_secs(
                    v.parse()
                        .with_context(|| format!("--max-seconds {v:?} is not a number"))?,
                );
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if args.stats.as_os_str().is_empty() {
        bail!("--stats FILE is required");
    }
    Ok(args)
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        bail!("no interface {name:?} in this namespace");
    }
    Ok(index)
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .with_context(|| format!("the object has no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not a TC classifier"))?;
    program
        .load()
        .with_context(|| format!("verifying and loading {name}"))?;
    Ok(program)
}

fn write_stats(ebpf: &Ebpf, path: &Path) -> Result<()> {
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map("STATS").context("the object has no map STATS")?)?;
    let mut text = String::new();
    for (slot, name) in (0u32..).zip(SLOTS) {
        let total: u64 = stats.get(&slot, 0)?.iter().sum();
        let _ = writeln!(text, "{name} {total}");
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

fn run(args: &Args) -> Result<()> {
    let mut ebpf = Ebpf::load(OBJECT).context("loading the fixture's object")?;
    {
        let mut endpoints: HashMap<_, u32, u32> = HashMap::try_from(
            ebpf.map_mut("ENDPOINTS")
                .context("the object has no map ENDPOINTS")?,
        )?;
        for (ip, iface) in &args.endpoints {
            // The program reads the address as loaded from the packet: network byte order.
            let key = u32::from_ne_bytes(ip.octets());
            endpoints.insert(&key, &ifindex(iface)?, 0)?;
        }
    }
    let mut links = Vec::new();
    for (program, ifaces, attach_type) in [
        ("lab_redirect", &args.redirect, TcAttachType::Ingress),
        ("lab_egress_probe", &args.probe, TcAttachType::Egress),
    ] {
        if ifaces.is_empty() {
            continue;
        }
        let classifier = classifier(&mut ebpf, program)?;
        for iface in ifaces {
            let id = classifier
                .attach(
                    ifindex(iface)?,
                    TcAttach::Tcx {
                        attach_type,
                        // Last: an auditor attached first sees the packet before it is redirected.
                        order: LinkOrder::last(),
                    },
                )
                .with_context(|| format!("attaching {program} to {iface}"))?;
            links.push(classifier.take_link(id)?);
        }
    }
    let started = Instant::now();
    while !STOP.load(Ordering::SeqCst) && started.elapsed() < args.max {
        write_stats(&ebpf, &args.stats)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    write_stats(&ebpf, &args.stats)?;
    drop(links);
    Ok(())
}

fn main() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("lab-redirect: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("lab-redirect: {e:#}");
        std::process::exit(1);
    }
}
