//! The auditor daemon and Prometheus as child processes of the lab, run inside the node
//! namespace; a small HTTP client that reaches them there; and the parsing of `/metrics` the live
//! summary and the tests need.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::net::in_netns;

/// How many unexpected-flow lines the live summary keeps.
const KEEP_LINES: usize = 8;

/// A child process in the node namespace, stopped with SIGTERM (then SIGKILL) on drop.
#[derive(Debug)]
pub struct Proc {
    what: &'static str,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args` in `ns`, stderr to `log`; stdout piped when `pipe_stdout`.
    pub fn spawn(
        what: &'static str,
        ns: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        pipe_stdout: bool,
    ) -> Result<(Self, Option<std::process::ChildStdout>)> {
        let stderr = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stderr(stderr)
            // Its own process group: the terminal's Ctrl-C reaches only xtask, which then stops
            // the child in order (SIGTERM, so it detaches its programs) before removing the lab.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's state.
        unsafe {
            // If xtask itself is killed (SIGKILL, no guards run), the child goes too instead of
            // auditing a lab whose namespaces the next run removes.
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(Stdio::null());
        }
        eprintln!("lab: starting {what}: {}", crate::display(&cmd));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {}", program.display()))?;
        let stdout = child.stdout.take();
        Ok((
            Self {
                what,
                child: Some(child),
                log,
            },
            stdout,
        ))
    }

    /// Fails when the process has exited, with the tail of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} was already stopped", self.what);
        };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!(
                "{} exited ({status}); the end of its log {}:\n{}",
                self.what,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) on our own child's pid; it has not been reaped, so the pid is ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "lab: {} did not stop within {grace:?} of SIGTERM: killing it",
            self.what
        );
        child.kill()?;
        Ok(Some(child.wait()?))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(5)) {
            eprintln!("lab: warning: stopping {}: {e:#}", self.what);
        }
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A bpffs of one agent's own, mounted on a directory of the lab's (unique per run and per
/// agent), where the agent pins its maps as it does on a node by default: the lab runs what
/// ships. A mount in the lab's mount namespace, so the agent sees it through `ip netns exec`
/// (which remounts `/sys`, so `/sys/fs/bpf` would not be the same there); unmounted, its pins
/// with it, and removed on drop, also when the lab fails.
#[derive(Debug)]
pub struct PinMount(PathBuf);

impl PinMount {
    pub fn mount(path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .context("run mount")?;
        if !status.success() {
            let _ = std::fs::remove_dir(&path);
            bail!("mount -t bpf on {}: {status}", path.display());
        }
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The layout directory the agent pinned its maps in, and their names, sorted.
    fn pinned(&self) -> Vec<(String, Vec<String>)> {
        let names = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        names(&self.0)
            .into_iter()
            .filter(|n| n.starts_with('v'))
            .map(|n| {
                let inner = names(&self.0.join(&n));
                (n, inner)
            })
            .collect()
    }
}

impl Drop for PinMount {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

/// Whether something is mounted on `path` (a line of `/proc/self/mounts` names it).
pub fn is_mounted(path: &Path) -> bool {
    let path = path.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(path.as_str()))
}

/// Unmounts the bpffs on `path` (its pins go with it) and removes the directory.
pub fn unmount(path: &Path) {
    match Command::new("umount").arg(path).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("lab: warning: umount {}: {s}", path.display()),
        Err(e) => eprintln!("lab: warning: umount {}: {e}", path.display()),
    }
    let _ = std::fs::remove_dir(path);
}

/// The auditor daemon, its stdout (the unexpected-flow log) read on a thread.
#[derive(Debug)]
pub struct Daemon {
    pub proc: Proc,
    pub metrics: SocketAddr,
    pub ns: String,
    unexpected: Arc<Mutex<Unexpected>>,
    reader: Option<JoinHandle<()>>,
    /// Where it pins its maps; after `proc`, so it is unmounted once the daemon has stopped.
    pins: PinMount,
}

/// What the daemon logged about unexpected flows.
#[derive(Debug, Default)]
pub struct Unexpected {
    pub lines: u64,
    pub latest: VecDeque<String>,
}

impl Daemon {
    pub fn start(
        binary: &Path,
        ns: &str,
        cluster_dir: &Path,
        metrics: SocketAddr,
        answer_timeout: &str,
        dir: &Path,
    ) -> Result<Self> {
        let args = [
            "run".to_owned(),
            "--cluster".to_owned(),
            cluster_dir.display().to_string(),
            "--interfaces".to_owned(),
            "cali*".to_owned(),
            "--metrics-addr".to_owned(),
            metrics.to_string(),
            "--answer-timeout".to_owned(),
            answer_timeout.to_owned(),
            // Every pod of the snapshot is scheduled on this node, so this agent counts them all.
            "--node".to_owned(),
            super::cluster::NODE_NAME.to_owned(),
        ];
        Self::start_with(binary, ns, &args, metrics, dir, "auditor")
    }

    /// Starts `binary` with `args` (which must serve `/metrics` on `metrics`) in `ns`, its log in
    /// `dir/{tag}.log` and its stdout in `dir/{tag}-unexpected.jsonl` (`unexpected.jsonl` for
    /// the tag `auditor`), its maps pinned in a bpffs of its own on `dir/bpffs-{tag}` (the lab's
    /// directory has the run's pid in its name).
    pub fn start_with(
        binary: &Path,
        ns: &str,
        args: &[String],
        metrics: SocketAddr,
        dir: &Path,
        tag: &str,
    ) -> Result<Self> {
        let pins = PinMount::mount(dir.join(format!("bpffs-{tag}")))?;
        let mut args = args.to_vec();
        args.extend(["--pin-dir".to_owned(), pins.path().display().to_string()]);
        let (proc, stdout) = Proc::spawn(
            "auditor run",
            ns,
            binary,
            &args,
            dir.join(format!("{tag}.log")),
            true,
        )?;
        let stdout = stdout.context("daemon stdout was not piped")?;
        let unexpected = Arc::new(Mutex::new(Unexpected::default()));
        let sink = Arc::clone(&unexpected);
        let copy = if tag == "auditor" {
            dir.join("unexpected.jsonl")
        } else {
            dir.join(format!("{tag}-unexpected.jsonl"))
        };
        let reader = std::thread::spawn(move || read_stdout(stdout, &sink, &copy));
        Ok(Self {
            proc,
            metrics,
            ns: ns.to_owned(),
            unexpected,
            reader: Some(reader),
            pins,
        })
    }

    /// Waits until `/readyz` answers 200 (attached and model loaded), at most `limit`.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.proc.check_alive()?;
            if let Ok((200, _)) = http_get(&self.ns, self.metrics, "/readyz") {
                return self.check_pinned();
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon was not ready within {limit:?}; its log {}:\n{}",
                    self.proc.log.display(),
                    tail(&self.proc.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ready, the agent has pinned its flow tables and its map of counted flows: one layout
    /// directory holding them.
    fn check_pinned(&self) -> Result<()> {
        let pinned = self.pins.pinned();
        let expected = ["FLOWS", "FLOWS4", "FLOWS4_TCP", "REPORTED"];
        match &pinned[..] {
            [(_, names)] if names.iter().map(String::as_str).eq(expected) => Ok(()),
            _ => bail!(
                "the agent did not pin its maps in {} (want one layout directory with {expected:?}, \
                 found {pinned:?}); its log {}:\n{}",
                self.pins.path().display(),
                self.proc.log.display(),
                tail(&self.proc.log, 20)
            ),
        }
    }

    /// The daemon's `/metrics` text.
    pub fn scrape(&self) -> Result<String> {
        match http_get(&self.ns, self.metrics, "/metrics")? {
            (200, body) => Ok(body),
            (status, body) => bail!("/metrics answered {status}: {body}"),
        }
    }

    /// A copy of what the daemon logged about unexpected flows so far.
    pub fn unexpected(&self) -> (u64, Vec<String>) {
        let u = self
            .unexpected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (u.lines, u.latest.iter().cloned().collect())
    }

    /// Stops the daemon with SIGTERM; an unclean end is an error.
    pub fn stop(&mut self) -> Result<()> {
        let status = self.proc.stop(Duration::from_secs(5))?;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        match status {
            Some(s) if !s.success() => bail!(
                "the daemon ended with {s} after SIGTERM; its log {}:\n{}",
                self.proc.log.display(),
                tail(&self.proc.log, 20)
            ),
            _ => Ok(()),
        }
    }
}

fn read_stdout(stdout: std::process::ChildStdout, sink: &Mutex<Unexpected>, copy: &Path) {
    let mut file = File::create(copy).ok();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        let mut u = sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        u.lines += 1;
        u.latest.push_back(line);
        if u.latest.len() > KEEP_LINES {
            u.latest.pop_front();
        }
    }
}

/// Real Prometheus in the node namespace, scraping the daemon every second into a temp dir.
#[derive(Debug)]
pub struct Prometheus {
    pub proc: Proc,
    pub addr: SocketAddr,
    ns: String,
}

impl Prometheus {
    pub fn start(ns: &str, target: SocketAddr, addr: SocketAddr, dir: &Path) -> Result<Self> {
        Self::start_targets(ns, &[target], addr, dir)
    }

    /// [`Prometheus::start`] scraping every one of `targets` (one agent per node).
    pub fn start_targets(
        ns: &str,
        targets: &[SocketAddr],
        addr: SocketAddr,
        dir: &Path,
    ) -> Result<Self> {
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: flow-auditor\n    static_configs:\n      \
                 - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .with_context(|| format!("write {}", config.display()))?;
        let storage = dir.join("prometheus-data");
        let args = vec![
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", storage.display()),
            format!("--web.listen-address={addr}"),
            "--storage.tsdb.retention.time=1h".to_owned(),
        ];
        let program = which("prometheus")
            .context("Debian's `prometheus` is not installed (run `sudo cargo xtask setup`)")?;
        let (proc, _) = Proc::spawn(
            "prometheus",
            ns,
            &program,
            &args,
            dir.join("prometheus.log"),
            false,
        )?;
        Ok(Self {
            proc,
            addr,
            ns: ns.to_owned(),
        })
    }

    /// Waits until Prometheus answers `/-/ready`.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.proc.check_alive()?;
            if let Ok((200, _)) = http_get(&self.ns, self.addr, "/-/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Prometheus was not ready within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant `PromQL` query; the `data.result` array.
    pub fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = http_get(&self.ns, self.addr, &path)?;
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered {status} with non-JSON: {body}"))?;
        if json["status"] != "success" {
            bail!("query {promql:?} failed ({status}): {body}");
        }
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters pass).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `GET path` over HTTP/1.0 to `addr` inside namespace `ns`; the status and the body.
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let stream = in_netns(ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })?
    .with_context(|| format!("connect {addr} in {ns}"))?;
    let mut stream = stream;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status from {addr}{path}: {head}"))?;
    Ok((status, body.to_owned()))
}

/// One `flow_auditor_flows_total` sample: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// The samples of metric `name` in Prometheus or `OpenMetrics` text.
pub fn samples(text: &str, name: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
            let Some((labels, value)) = split_labels(rest) else {
                continue;
            };
            (labels, value)
        } else if rest.starts_with(' ') {
            (BTreeMap::new(), rest)
        } else {
            continue;
        };
        let Some(value) = value.split_whitespace().next().and_then(|v| v.parse().ok()) else {
            continue;
        };
        out.push((labels, value));
    }
    out
}

/// Parses `k="v",k2="v2"} rest` into the labels and `rest`.
fn split_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = &after[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_labels_with_escapes_and_skip_other_metrics() {
        let text = "# TYPE flow_auditor_flows counter\n\
            flow_auditor_flows_total{verdict=\"allowed\",src_namespace=\"a\\\"b\",dst_namespace=\"\"} 3\n\
            flow_auditor_flows_created{verdict=\"allowed\"} 1.7e9\n\
            flow_auditor_flows_total_other 9\n";
        let got = samples(text, "flow_auditor_flows_total");
        assert!(got.len() == 1, "expected one sample, got {got:?}");
        let (labels, value) = &got[0];
        if labels.get("src_namespace").map(String::as_str) != Some("a\"b")
            || labels.get("dst_namespace").map(String::as_str) != Some("")
            || (*value - 3.0).abs() > f64::EPSILON
        {
            panic!("wrong parse: {got:?}");
        }
    }

    #[test]
    fn percent_encoding_keeps_unreserved_and_escapes_the_rest() {
        let got = percent_encode("sum by (verdict) (x{a=\"b\"})");
        assert!(
            got == "sum%20by%20%28verdict%29%20%28x%7Ba%3D%22b%22%7D%29",
            "got {got}"
        );
    }
}
