//! The daemon under load: the release `auditor run` in a node namespace with a synthetic
//! inventory of 10,000 pods and 2,000 `NetworkPolicies`, and a pod namespace sending real UDP
//! packets, each to a new destination (pod address and port), through an attached `cali*` veth.
//! The node routes them to a blackhole, so every flow stays unanswered and is decided at the
//! answer timeout; meanwhile the 64k-entry flow table stays full. Needs root.
//!
//! Two phases, each flow to a destination never used before (sent with `sendmmsg`, 64 per call):
//! 64,000 new flows, counted, then the daemon's resident set (`VmRSS`) with those 64,000 flows
//! tracked; then `FA_BENCH_FLOWS` more (450,000) at `FA_BENCH_RATE` per second (150,000).
//!
//! Figures: `flows_per_s` is the second phase's flows counted (read from `/metrics`) over the
//! time from its first packet to its last flow counted, less the answer timeout every flow has
//! to wait; `lost` is what the datapath reports lost in both phases (ring buffer full, table
//! inserts failed), read from `/metrics` too, and counted flows plus lost must cover every
//! packet sent; `rss_mib` is the resident set with 64,000 tracked flows, read 11 s after they
//! were counted (the resident set right when they were counted is printed too). The second phase's
//! peak resident set is printed on its own line. Ends with the one summary line.
#![expect(
    clippy::cast_precision_loss,
    reason = "figures printed for people: a float rounded in its 16th digit, or a count far below 2^52, does not change them"
)]

#[path = "../tests/common/bpffs.rs"]
mod bpffs;
#[path = "../tests/common/netns.rs"]
mod netns;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use netns::Netns;

const PODS: usize = 10_000;
const NAMESPACES: usize = 100;
const POLICIES_PER_NAMESPACE: usize = 20;
const NODES: usize = 20;
const METRICS: &str = "127.0.0.1:19925";
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
const GATEWAY: &str = "169.254.1.1";
/// How long after the tracked flows are counted their memory is read: longer than the daemon's
/// period for handing freed memory back.
const STEADY_AFTER: Duration = Duration::from_secs(11);
/// Flows sent; overridable with `FA_BENCH_FLOWS`.
const FLOWS: u32 = 450_000;
/// Sending rate, flows per second; overridable with `FA_BENCH_RATE`.
const RATE: u32 = 150_000;

/// Pod `i`'s address: 10.244.0.0/16, 250 pods per /24, two /24s per node.
fn pod_ip(i: usize) -> Ipv4Addr {
    let octet = u8::try_from(i / 250).unwrap_or(u8::MAX);
    let host = u8::try_from(i % 250 + 2).unwrap_or(u8::MAX);
    Ipv4Addr::new(10, 244, octet, host)
}

/// The synthetic cluster: namespaces `ns-N` (labelled with a team), nodes, 10,000 pods (100
/// per namespace, five per app), and 20 `NetworkPolicies` per namespace, each isolating one app
/// for ingress and egress and allowing a port range from a team's namespaces plus DNS out.
fn cluster_yaml() -> String {
    let mut y = String::with_capacity(8 << 20);
    for n in 0..NAMESPACES {
        let _ = writeln!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: \
             {{kubernetes.io/metadata.name: ns-{n}, team: t{}}}}}",
            n % 10
        );
    }
    for node in 0..NODES {
        let _ = writeln!(
            y,
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-{node}}}\n\
             spec: {{podCIDR: 10.244.{}.0/23}}\nstatus: {{addresses: [{{type: InternalIP, \
             address: 198.51.100.{}}}]}}",
            node * 2,
            node + 1
        );
    }
    for i in 0..PODS {
        let ns = i / (PODS / NAMESPACES);
        let app = i % POLICIES_PER_NAMESPACE;
        let ip = pod_ip(i);
        let node = usize::from(ip.octets()[2]) / 2;
        let _ = writeln!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: app{app}-{i}, namespace: ns-{ns}, \
             labels: {{app: app{app}}}, ownerReferences: [{{apiVersion: apps/v1, kind: \
             ReplicaSet, name: app{app}-5d4f8b9c7, uid: u{i}, controller: true}}]}}\n\
             spec: {{nodeName: node-{node}, containers: [{{name: c, image: x, ports: \
             [{{containerPort: 8080, name: http}}]}}]}}\nstatus: {{podIP: {ip}, podIPs: \
             [{{ip: {ip}}}]}}"
        );
    }
    for n in 0..NAMESPACES {
        for app in 0..POLICIES_PER_NAMESPACE {
            let _ = writeln!(
                y,
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: \
                 {{name: app{app}, namespace: ns-{n}}}\nspec:\n  podSelector: {{matchLabels: \
                 {{app: app{app}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: \
                 [{{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: \
                 {{matchLabels: {{app: app{}}}}}}}]\n    ports: [{{port: http}}, {{port: 9000, \
                 endPort: 9010}}]\n  egress:\n  - to: [{{namespaceSelector: {{}}}}]\n    ports: \
                 [{{port: 53, protocol: UDP}}, {{port: 8080}}]",
                (n + app) % 10,
                (app + 1) % POLICIES_PER_NAMESPACE
            );
        }
    }
    y
}

/// Packets per `sendmmsg`: one system call for many new flows, so the sender (which also
/// pays the node's forwarding of each packet) is not what limits the rate.
const BATCH: usize = 64;

/// Flow `i`'s destination: the next pod address and port, never repeating.
fn destination(i: u32) -> SocketAddrV4 {
    let ports = 65_535 - 1024;
    let dst_pod = 1 + (i / ports) as usize;
    let port = u16::try_from(1024 + i % ports).unwrap_or(u16::MAX);
    SocketAddrV4::new(pod_ip(dst_pod), port)
}

/// One `sendmmsg` worth of one-byte datagrams, each to its own destination.
struct Batch {
    addrs: [libc::sockaddr_in; BATCH],
    iov: libc::iovec,
    payload: [u8; 1],
}

impl Default for Batch {
    fn default() -> Self {
        // SAFETY: sockaddr_in is plain old data; all zeroes is a valid value.
        let zero: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        Self {
            addrs: [zero; BATCH],
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            payload: *b"x",
        }
    }
}

impl Batch {
    /// Addresses flows `first..` (at most up to `end`); returns how many.
    fn fill(&mut self, first: u32, end: u32) -> usize {
        let n = usize::try_from(end - first).unwrap_or(BATCH).min(BATCH);
        for (i, addr) in self.addrs.iter_mut().take(n).enumerate() {
            let dst = destination(first + u32::try_from(i).unwrap_or(0));
            #[expect(
                clippy::cast_possible_truncation,
                reason = "AF_INET is 2, and sa_family_t is the C type the kernel declares for it"
            )]
            let family = libc::AF_INET as libc::sa_family_t;
            addr.sin_family = family;
            addr.sin_port = dst.port().to_be();
            addr.sin_addr.s_addr = u32::from(*dst.ip()).to_be();
        }
        n
    }

    /// Sends the first `n` addressed datagrams; returns how many went.
    fn send(&mut self, socket: &UdpSocket, n: usize) -> std::io::Result<u32> {
        use std::os::fd::AsRawFd as _;
        self.iov = libc::iovec {
            iov_base: self.payload.as_mut_ptr().cast(),
            iov_len: self.payload.len(),
        };
        // SAFETY: mmsghdr is plain old data; all zeroes is a valid value.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (msg, addr) in msgs.iter_mut().zip(self.addrs.iter_mut()).take(n) {
            msg.msg_hdr.msg_name = std::ptr::from_mut(addr).cast();
            #[expect(clippy::cast_possible_truncation, reason = "a sockaddr_in is 16 bytes")]
            let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msg.msg_hdr.msg_namelen = len;
            msg.msg_hdr.msg_iov = &raw mut self.iov;
            msg.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs[..n]` point at live addresses and one live iovec, for the call only.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                u32::try_from(n).unwrap_or(0),
                0,
            )
        };
        u32::try_from(sent).map_err(|_| std::io::Error::last_os_error())
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon process, killed on drop if still running.
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET path` against the daemon in the node namespace: (status, body).
fn get(node: &Netns, path: &str) -> Option<(u16, String)> {
    node.http_get(METRICS, path)
}

/// What the bench reads from one scrape.
#[derive(Clone, Copy, Debug, Default)]
struct Scrape {
    flows: f64,
    lost: f64,
    table_entries: f64,
}

fn scrape(node: &Netns) -> Scrape {
    let Some((200, body)) = get(node, "/metrics") else {
        panic!("scraping the daemon failed");
    };
    let mut s = Scrape::default();
    for line in body.lines() {
        let value = || {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if line.starts_with("flow_auditor_flows_total{") {
            s.flows += value();
        } else if line.starts_with("flow_auditor_lost_events_total{source=\"ring_buffer\"}")
            || line.starts_with("flow_auditor_flow_table_insert_failures_total ")
        {
            s.lost += value();
        } else if line.starts_with("flow_auditor_flow_table_entries ") {
            s.table_entries = value();
        }
    }
    s
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("daemon benchmark: needs root; run `sudo cargo xtask bench daemon`");
        std::process::exit(2);
    }
    let flows = env_u32("FA_BENCH_FLOWS", FLOWS);
    let rate = env_u32("FA_BENCH_RATE", RATE).max(1);

    let dir = TempDir(std::env::temp_dir().join(format!("fa-bench-daemon-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let snapshot = dir.0.join("cluster.yaml");
    std::fs::write(&snapshot, cluster_yaml()).unwrap_or_else(|e| panic!("write snapshot: {e}"));

    // The node, and the sending pod (pod 0) behind caliA, wired as Calico does.
    let node = Netns::new("bnode");
    let pod = Netns::new("bpod");
    let client = pod_ip(0);
    node.sysctl("net.ipv4.ip_forward", "1");
    node.ip(&[
        "link",
        "add",
        "caliA",
        "address",
        "02:00:00:00:01:01",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "address",
        "02:00:00:00:01:02",
        "netns",
        pod.name(),
    ]);
    node.ip(&["link", "set", "caliA", "up"]);
    node.ip(&["route", "add", &format!("{client}/32"), "dev", "caliA"]);
    // Every other pod is "elsewhere" and silent: packets to them end here, after TC saw them.
    node.ip(&["route", "add", "blackhole", "10.244.0.0/16"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["addr", "add", &format!("{client}/32"), "dev", "eth0"]);
    pod.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"]);
    pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"]);
    pod.ip(&[
        "neigh",
        "add",
        GATEWAY,
        "lladdr",
        "02:00:00:00:01:01",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);

    let log = dir.0.join("daemon.log");
    // The shipped default, pinned maps, in a bpffs of the run's own (unmounted, pins and all,
    // when it drops, after the daemon).
    let pins = bpffs::PinDir::new("bench-daemon");
    let pin_dir = pins.arg();
    let started = Instant::now();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            node.name(),
            env!("CARGO_BIN_EXE_auditor"),
            "run",
            "--cluster",
            &snapshot.display().to_string(),
            "--interfaces",
            "cali*",
            "--metrics-addr",
            METRICS,
            "--answer-timeout",
            "1s",
            "--pin-dir",
            &pin_dir,
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}")))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the daemon: {e}"));
    let pid = child.id();
    let mut daemon = Daemon(Some(child));
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    loop {
        if let Some(child) = daemon.0.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("the daemon exited ({status}):\n{}", daemon_log());
        }
        if get(&node, "/readyz").is_some_and(|(s, _)| s == 200) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "daemon not ready in 300 s:\n{}",
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready_after = started.elapsed();
    let idle_rss = rss_kib(pid, "VmRSS:");

    // Memory with 64,000 tracked flows: that many new flows, counted, still in the table.
    let start_counts = scrape(&node);
    let sent = send(&pod, client, 0, TRACKED, rate.min(TRACKED));
    let tracked = settle(&node, pid, start_counts, TRACKED);
    let counted_rss = rss_kib(pid, "VmRSS:");
    // The steady state with those flows tracked: after the burst's buffers are released (the
    // daemon hands freed memory back every ten seconds).
    std::thread::sleep(STEADY_AFTER);
    let steady = scrape(&node);
    let tracked_rss = rss_kib(pid, "VmRSS:");

    // The rate: `flows` more new flows at `rate`, each decided unanswered a second later.
    let before = tracked.last;
    let sender = {
        let node_pod = &pod;
        std::thread::scope(|scope| {
            let sending = scope.spawn(|| send(node_pod, client, TRACKED, flows, rate));
            let mut peak = 0;
            while !sending.is_finished() {
                peak = peak.max(rss_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(100));
            }
            let sent = sending
                .join()
                .unwrap_or_else(|_| panic!("the sender panicked"));
            (sent, peak)
        })
    };
    let ((send_start, send_took, send_failed), sending_peak) = sender;
    let settled = settle(&node, pid, before, flows);
    let counted = settled.last.flows - before.flows;
    let lost = settled.last.lost - start_counts.lost;
    let lost_tracked = tracked.last.lost - start_counts.lost;
    let span = settled
        .done_at
        .saturating_duration_since(send_start)
        .saturating_sub(ANSWER_TIMEOUT)
        .max(send_took);
    let flows_per_s = counted / span.as_secs_f64();
    let peak_rss = sending_peak.max(settled.max_rss);
    let hwm = rss_kib(pid, "VmHWM:");

    if let Some(child) = daemon.0.as_mut() {
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        unsafe { libc::kill(i32::try_from(child.id()).unwrap_or(0), libc::SIGTERM) };
        let _ = child.wait();
    }
    daemon.0 = None;

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "inventory: {PODS} pods, {} policies, {NAMESPACES} namespaces, {NODES} nodes; ready after {:.1} s; idle rss {:.1} MiB",
        NAMESPACES * POLICIES_PER_NAMESPACE,
        ready_after.as_secs_f64(),
        mib(idle_rss)
    );
    println!(
        "tracked: {TRACKED} new flows sent in {:.2} s, {} counted, {lost_tracked} lost (reported); rss {:.1} MiB when counted; {} s later flow table {} entries, rss {:.1} MiB",
        sent.1.as_secs_f64(),
        tracked.last.flows - start_counts.flows,
        mib(counted_rss),
        STEADY_AFTER.as_secs(),
        steady.table_entries,
        mib(tracked_rss)
    );
    println!(
        "rate: sent {flows} new flows in {:.2} s ({:.0}/s, target {rate}/s, {send_failed} send retries)",
        send_took.as_secs_f64(),
        f64::from(flows) / send_took.as_secs_f64()
    );
    println!(
        "rate: counted {counted} flows, {} lost (reported), unaccounted {}; flow table peak {} entries; rss peak {:.1} MiB (VmHWM {:.1} MiB)",
        settled.last.lost - before.lost,
        f64::from(flows) - counted - (settled.last.lost - before.lost),
        settled.max_entries,
        mib(peak_rss),
        mib(hwm)
    );
    println!(
        "daemon: flows_per_s={flows_per_s:.0} lost={lost:.0} rss_mib={:.1}",
        mib(tracked_rss)
    );
}

/// Flows tracked for the memory figure: the flow table's default size.
const TRACKED: u32 = 64_000;

/// Sends flows `first..first + count` from the pod at `rate` per second; returns when sending
/// started, how long it took and how many sends were retried.
fn send(
    pod: &Netns,
    client: Ipv4Addr,
    first: u32,
    count: u32,
    rate: u32,
) -> (Instant, Duration, u32) {
    pod.run(|| {
        let socket = UdpSocket::bind(SocketAddrV4::new(client, 40_000))
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let start = Instant::now();
        let mut sent = 0u32;
        let mut failed = 0u32;
        let mut batch = Batch::default();
        while sent < count {
            let n = batch.fill(first + sent, first + count);
            match batch.send(&socket, n) {
                Ok(done) => sent += done,
                // ENOBUFS and the like: count and retry, a flow is only new once sent.
                Err(_) => failed += 1,
            }
            let due = Duration::from_secs_f64(f64::from(sent) / f64::from(rate));
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        (start, start.elapsed(), failed)
    })
}

/// Where counting stood once it stopped moving.
struct Settled {
    last: Scrape,
    /// When the last change was seen.
    done_at: Instant,
    max_rss: u64,
    max_entries: f64,
}

/// Waits until `expected` flows past `before` are counted or reported lost and nothing moved
/// for 2 s, or nothing moved for 5 s.
fn settle(node: &Netns, pid: u32, before: Scrape, expected: u32) -> Settled {
    let mut last = before;
    let mut last_change = Instant::now();
    let mut done_at = last_change;
    let mut max_rss = 0;
    let mut max_entries = 0f64;
    loop {
        let now = scrape(node);
        max_rss = max_rss.max(rss_kib(pid, "VmRSS:"));
        max_entries = max_entries.max(now.table_entries);
        if now.flows > last.flows || now.lost > last.lost {
            last_change = Instant::now();
            done_at = last_change;
        }
        last = now;
        let accounted = last.flows - before.flows + last.lost - before.lost;
        if (accounted >= f64::from(expected) && last_change.elapsed() > Duration::from_secs(2))
            || last_change.elapsed() > Duration::from_secs(5)
        {
            return Settled {
                last,
                done_at,
                max_rss,
                max_entries,
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
