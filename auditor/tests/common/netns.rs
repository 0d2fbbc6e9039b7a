//! Network namespaces and veth pairs for kernel tests, each removed by an RAII guard even when the
//! test panics. Names carry the pid and a counter, so parallel tests and parallel runs never
//! collide, and nothing here touches the machine's own namespace: every command targets a
//! namespace these guards created.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace of our own, deleted (with every interface in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `fa-<tag>-<pid>-<n>`, with `lo` up.
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "fa-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <this namespace> args...`, panicking with the command's stderr on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// Sets a sysctl of this namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-q",
                "-w",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Output of a command run inside the namespace (`ip netns exec`).
    pub fn output(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        output("ip", &full)
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .unwrap_or_else(|_| panic!("thread in netns {} panicked", self.name))
        })
    }

    /// Spawns a thread that joins this namespace, then runs `f`.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter_path(&path);
            f()
        })
    }

    /// Moves the calling thread into this namespace (for good: use it on a dedicated thread).
    pub fn enter(&self) {
        enter_path(&self.path());
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its interfaces (and each veth's peer elsewhere).
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete netns {}: {status:?}", self.name);
        }
    }
}

fn enter_path(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: a valid namespace fd; setns affects only the calling thread for CLONE_NEWNET.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(
        rc == 0,
        "setns({path}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Creates a veth pair: `a` in `ns_a`, `b` in `ns_b`, both up.
pub fn veth(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str) {
    ns_a.ip(&[
        "link",
        "add",
        a,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        ns_b.name(),
    ]);
    ns_a.ip(&["link", "set", a, "up"]);
    ns_b.ip(&["link", "set", b, "up"]);
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) {
    output(program, args);
}

/// Runs a command and returns its stdout, panicking with its stderr when it fails.
pub fn output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Open file descriptors of this process, with what each refers to (for failure messages).
pub fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap_or_else(|e| panic!("read /proc/self/fd: {e}"))
        .filter_map(Result::ok)
        .map(|entry| {
            let target = std::fs::read_link(entry.path())
                .map_or_else(|_| "?".into(), |t| t.display().to_string());
            format!("{} -> {target}", entry.file_name().display())
        })
        .collect();
    fds.sort();
    fds
}

/// Whether we may run kernel tests (root); they are `#[ignore]`d and `cargo xtask test` runs them
/// as root, so not being root here is a setup error, reported as a failure.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (run it with `cargo xtask test`)"
    );
}

/// The Calico pod gateway: every pod's default route points at this link-local address, which the
/// host side answers for.
pub const CALICO_GATEWAY: &str = "169.254.1.1";
/// The IPv6 pod gateway, link-local too.
pub const CALICO_GATEWAY_V6: &str = "fe80::1";

/// Wires `pod` to `node` the way Calico does: a veth `cali` (host side) / `eth0` (pod side) with
/// fixed MACs derived from `tag`, a host route (/32 or /128) to `addr` on the host side, a default
/// route in the pod via [`CALICO_GATEWAY`] or [`CALICO_GATEWAY_V6`], and permanent neighbours both
/// ways (no ARP or neighbour discovery needed). The family is `addr`'s: IPv4 or IPv6.
#[allow(
    dead_code,
    reason = "not every test binary that includes this module wires pods"
)]
pub fn calico_pod(node: &Netns, pod: &Netns, cali: &str, addr: &str, tag: u8) {
    let ip: std::net::IpAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("pod address {addr}: {e}"));
    // `ip` wants the family spelled out for neighbours and routes of IPv6.
    let (family, prefix, gateway) = if ip.is_ipv4() {
        ("-4", 32, CALICO_GATEWAY)
    } else {
        ("-6", 128, CALICO_GATEWAY_V6)
    };
    let host_mac = format!("02:00:00:00:{tag:02x}:01");
    let pod_mac = format!("02:00:00:00:{tag:02x}:02");
    let host_route = format!("{addr}/{prefix}");
    node.ip(&[
        "link",
        "add",
        cali,
        "address",
        &host_mac,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "address",
        &pod_mac,
        "netns",
        pod.name(),
    ]);
    node.ip(&["link", "set", cali, "up"]);
    node.ip(&[family, "route", "add", &host_route, "dev", cali]);
    node.ip(&[
        family,
        "neigh",
        "add",
        addr,
        "lladdr",
        &pod_mac,
        "dev",
        cali,
        "nud",
        "permanent",
    ]);
    pod.ip(&["link", "set", "eth0", "up"]);
    // nodad: an IPv6 address is usable at once instead of after duplicate address detection.
    let mut add = vec!["addr", "add", host_route.as_str(), "dev", "eth0"];
    if ip.is_ipv6() {
        add.push("nodad");
    }
    pod.ip(&add);
    if ip.is_ipv4() {
        // IPv6 link-local gateways are on-link by definition; IPv4 needs the link route.
        pod.ip(&["route", "add", gateway, "dev", "eth0", "scope", "link"]);
    }
    pod.ip(&[
        family, "route", "add", "default", "via", gateway, "dev", "eth0",
    ]);
    pod.ip(&[
        family,
        "neigh",
        "add",
        gateway,
        "lladdr",
        &host_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
}

impl Netns {
    /// `GET path` from inside this namespace against `addr` (a daemon's metrics address):
    /// (status, body), `None` when nothing answers.
    pub fn http_get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        self.run(|| {
            let addr: SocketAddr = addr.parse().ok()?;
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: auditor\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let status = response.split(' ').nth(1)?.parse().ok()?;
            let body = response.split_once("\r\n\r\n")?.1.to_owned();
            Some((status, body))
        })
    }
}

/// The value of the sample whose name and labels are exactly `series` in a metrics text, 0 when
/// absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| {
            v.split(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad value of {series}: {v}"))
        })
}

/// Sum of every `flow_auditor_flows_total` sample in a metrics text.
pub fn flows_total(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("flow_auditor_flows_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
