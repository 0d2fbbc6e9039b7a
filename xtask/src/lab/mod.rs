//! `cargo xtask demo`: the Calico homelab of `shared/seeds/004_*` in miniature on this machine, every part of
//! it (the node included) in network namespaces of its own, with the auditor daemon watching the
//! node's `cali*` interfaces and a live summary of its verdicts. Ctrl-C removes it all.

pub mod cilium;
mod cluster;
mod daemon;
pub mod e2e;
mod net;
mod traffic;

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use daemon::Daemon;
use net::{Enforcement, Topology};
use traffic::{SCRIPT, Servers};

/// The daemon's `--metrics-addr` inside the node namespace (the default port, on loopback: the
/// lab's node is not reachable from the machine anyway).
const METRICS_ADDR: &str = "127.0.0.1:19925";
/// The daemon's answer timeout in the demo: the product's default.
const DEMO_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two rounds of the traffic script in the demo.
const ROUND_PAUSE: Duration = Duration::from_secs(3);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (and SIGTERM/SIGHUP) only set a flag: the lab is torn down by its guards on the way
/// out of the main loop, never from a signal handler.
fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A directory of our own under the temp dir, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("flow-auditor-{tag}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("clear {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("FLOW_AUDITOR_LAB_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A running lab. Fields drop in declaration order: the daemon stops first (SIGTERM: it detaches
/// its TC programs), then the traffic servers, the nftables table, the namespaces (their
/// interfaces with them), and last the snapshot directory.
#[derive(Debug)]
pub struct Lab {
    daemon: Daemon,
    servers: Servers,
    enforcement: Enforcement,
    topo: Topology,
    dir: TempDir,
}

impl Lab {
    /// Builds the lab and starts the daemon of `binary` in it; returns once the daemon is ready.
    fn up(binary: &Path, answer_timeout: &str, tag: &str) -> Result<Self> {
        net::remove_stale()?;
        let dir = TempDir::new(tag)?;
        let cluster_dir = dir.0.join("cluster");
        std::fs::create_dir_all(&cluster_dir)?;
        std::fs::write(cluster_dir.join("cluster.yaml"), cluster::snapshot_yaml())?;
        std::fs::write(cluster_dir.join("policies.yaml"), cluster::SEED_POLICIES)?;
        eprintln!(
            "lab: building the cluster ({} pods, {} external hosts) in network namespaces {}{}-*",
            cluster::PODS.len(),
            cluster::EXTERNALS.len(),
            net::PREFIX,
            std::process::id()
        );
        for ext in cluster::EXTERNALS {
            eprintln!("lab:   outside the cluster: {} at {}", ext.what, ext.ip);
        }
        let topo = Topology::build()?;
        let enforcement = Enforcement::load(&topo.node)?;
        let servers = Servers::start(&topo)?;
        let metrics: SocketAddr = METRICS_ADDR.parse()?;
        let mut daemon = Daemon::start(
            binary,
            topo.node.name(),
            &cluster_dir,
            metrics,
            answer_timeout,
            &dir.0,
        )?;
        daemon.wait_ready(Duration::from_secs(30))?;
        eprintln!("lab: the daemon is attached and ready");
        Ok(Self {
            daemon,
            servers,
            enforcement,
            topo,
            dir,
        })
    }

    /// Stops the daemon (SIGTERM must end it cleanly) and tears everything down; fails if any of
    /// the lab's namespaces is left.
    fn down(self) -> Result<()> {
        let Self {
            mut daemon,
            servers,
            enforcement,
            topo,
            dir,
        } = self;
        let stopped = daemon.stop();
        drop(daemon);
        drop(servers);
        drop(enforcement);
        let node = topo.node.name().to_owned();
        drop(topo);
        drop(dir);
        stopped?;
        let prefix = format!("{}{}-", net::PREFIX, std::process::id());
        let left: Vec<String> = net::cmd("ip", &["netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix))
            .map(str::to_owned)
            .collect();
        if !left.is_empty() {
            bail!("lab namespaces left after teardown: {left:?}");
        }
        eprintln!(
            "lab: removed every namespace (node {node}), veth, the nftables table and the TC programs"
        );
        Ok(())
    }
}

/// The auditor binary the lab runs: `$FLOW_AUDITOR_LAB_BINARY` when set (a build of your own),
/// else a fresh release build.
pub fn binary(root: &Path) -> Result<PathBuf> {
    match std::env::var_os("FLOW_AUDITOR_LAB_BINARY") {
        Some(path) => Ok(PathBuf::from(path)),
        None => crate::build(root, crate::Target::Host),
    }
}

/// Which CNI a lab plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cni {
    /// The Calico homelab of seed 004: one node, `cali*` veths, host routing, nftables.
    Calico,
    /// The Cilium homelab of seed 000: two nodes, `lxc*` veths, `bpf_redirect_peer` delivery.
    Cilium,
}

/// `cargo xtask demo [--cni calico|cilium] [--routing native|vxlan] [--duration SECS]`.
pub fn demo(root: &Path, duration: Option<u64>, cni: Cni, routing: cilium::Routing) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the lab creates network namespaces and loads eBPF programs: run `sudo cargo xtask demo`"
        );
    }
    let binary = binary(root)?;
    catch_signals();
    if cni == Cni::Cilium {
        return cilium::demo(root, &binary, duration, routing);
    }
    let answer_timeout = format!("{}s", DEMO_ANSWER_TIMEOUT.as_secs());
    let mut lab = Lab::up(&binary, &answer_timeout, "lab")?;
    let result = demo_loop(&mut lab, duration);
    let down = lab.down();
    result.and(down)
}

fn demo_loop(lab: &mut Lab, duration: Option<u64>) -> Result<()> {
    let started = Instant::now();
    let deadline = duration.map(|s| started + Duration::from_secs(s));
    let interactive = std::io::stdout().is_terminal() && duration.is_none();
    let mut round = 0_u64;
    while !interrupted() && deadline.is_none_or(|d| Instant::now() < d) {
        round += 1;
        for r in traffic::play_all(&lab.topo, SCRIPT) {
            // A conversation that cannot even start (a bug of the lab) is worth stopping for.
            r?;
        }
        let text = lab
            .daemon
            .scrape()
            .context("reading the daemon's /metrics")?;
        let summary = summary(lab, &text, round, started.elapsed());
        if interactive {
            print!("\x1b[2J\x1b[H{summary}");
        } else if round % 5 == 1 {
            print!("{summary}");
        }
        std::io::stdout().flush()?;
        let pause_end = Instant::now() + ROUND_PAUSE;
        while Instant::now() < pause_end && !interrupted() {
            std::thread::sleep(Duration::from_millis(100));
        }
        lab.daemon.proc.check_alive()?;
    }
    if !interrupted() {
        // The final picture once the last round's unanswered flows have timed out (the
        // daemon's answer timeout, then its one-second release tick).
        std::thread::sleep(DEMO_ANSWER_TIMEOUT + Duration::from_secs(2));
    }
    let text = lab.daemon.scrape()?;
    print!("{}", summary(lab, &text, round, started.elapsed()));
    if interrupted() {
        eprintln!("lab: interrupted, cleaning up");
    }
    Ok(())
}

/// The live summary: flows by verdict and namespace pair, and the latest unexpected flows.
fn summary(lab: &Lab, metrics: &str, round: u64, elapsed: Duration) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;

    let mut by_pair: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for (labels, value) in daemon::samples(metrics, "flow_auditor_flows_total") {
        if value <= 0.0 {
            continue;
        }
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        *by_pair
            .entry((get("verdict"), get("src_namespace"), get("dst_namespace")))
            .or_default() += value;
    }
    let node = lab.topo.node.name();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "flow-auditor lab: Calico homelab in miniature, node namespace {node}\n\
         /metrics: sudo ip netns exec {node} curl -s http://{METRICS_ADDR}/metrics\n\
         round {round}, {}s; Ctrl-C stops and removes everything\n",
        elapsed.as_secs()
    );
    let _ = writeln!(
        s,
        "  {:<11} {:<40} {:>7}",
        "VERDICT", "SOURCE -> DESTINATION NAMESPACE", "FLOWS"
    );
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for ((verdict, src, dst), n) in &by_pair {
        let name = |ns: &str| {
            if ns.is_empty() {
                "(outside)".to_owned()
            } else {
                ns.to_owned()
            }
        };
        let _ = writeln!(
            s,
            "  {verdict:<11} {:<40} {n:>7}",
            format!("{} -> {}", name(src), name(dst))
        );
        *totals.entry(verdict.as_str()).or_default() += n;
    }
    let totals: Vec<String> = totals.iter().map(|(v, n)| format!("{v} {n}")).collect();
    let _ = writeln!(s, "  total: {}\n", totals.join(", "));
    let (lines, latest) = lab.daemon.unexpected();
    let _ = writeln!(
        s,
        "latest unexpected flows (the daemon's JSON log, {lines} lines so far):"
    );
    for line in latest.iter().rev() {
        let _ = writeln!(s, "  {}", describe_unexpected(line));
    }
    s.push('\n');
    s
}

/// One line of the daemon's unexpected-flow log, shortened for the terminal.
fn describe_unexpected(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_owned();
    };
    if v.get("suppressed").is_some() {
        return format!("({} lines suppressed by the rate limit)", v["suppressed"]);
    }
    let end = |e: &serde_json::Value| {
        let ns = e["namespace"].as_str().unwrap_or("");
        match e["pod"].as_str() {
            Some(pod) => format!("{ns}/{pod}"),
            None => format!(
                "{} {}",
                e["workload"].as_str().unwrap_or("?"),
                e["address"].as_str().unwrap_or("?")
            ),
        }
    };
    // The rule that denies it, short; the full explanation is in the JSON line.
    let denied: Vec<String> = v["denied_by"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let p = &d["policy"];
            format!(
                "{} {}/{} {} {}",
                p["kind"].as_str().unwrap_or("?"),
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("?"),
                d["direction"].as_str().unwrap_or("?"),
                d["rule"].as_str().unwrap_or("?")
            )
        })
        .collect();
    format!(
        "{} -> {} {}/{} {}, denied by {}",
        end(&v["src"]),
        end(&v["dst"]),
        v["protocol"].as_str().unwrap_or("?"),
        v["dst"]["port"],
        v["outcome"].as_str().unwrap_or("?"),
        if denied.is_empty() {
            v["reason"].as_str().unwrap_or("?").to_owned()
        } else {
            denied.join(", ")
        }
    )
}
