//! Connections the agent did not see open (issue 12, part 2), with the real binary in a node
//! namespace, pods behind `cali*` veths, real sockets and `/metrics` scraped:
//! - long-lived TCP connections (one allowed, one forbidden by the intended model but not
//!   enforced) and a UDP conversation, counted, then the agent stopped (SIGTERM, and SIGKILL),
//!   data exchanged both ways while it is down, the agent started again on the same pinned flow
//!   tables, and the servers speaking first: every connection counted exactly once over the
//!   run, with its true initiator, and no false `unexpected`;
//! - a connection and a conversation idle past a short idle timeout, then resumed by the server:
//!   not counted again;
//! - a connection opened before the agent started, first seen mid-stream and reset: closed, not
//!   refused, and oriented by the port the server declares;
//! - a UDP conversation going on when an agent starts without adopting tables (`--pin-dir
//!   none`), the server speaking first: oriented by the port the server declares, not by who
//!   spoke first;
//! - connections opened before the agent started, between ports that give no evidence, oriented
//!   by the node's conntrack, a DNAT'd one (to a virtual address) included.
//! - an entry recreated under a counted flow's key (another first packet) while no agent ran:
//!   counted by the next agent, which does not count the unchanged flows again.
//!
//! Each test pins the flow tables in a bpffs directory of its own, removed at the end.
#![expect(
    clippy::float_cmp,
    reason = "metric samples compared here are whole counts, which an f64 holds exactly"
)]

#[path = "common/bpffs.rs"]
mod bpffs;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/tempdir.rs"]
mod tempdir;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use auditor_ebpf::{
    FLOWS4_MAP, REPORTED_MAP,
    flow::{FlowKey, FlowKey4, FlowState},
};
use aya::maps::{Map, MapData};
use bpffs::PinDir;
use netns::{Netns, flows_total, require_root, sample};
use tempdir::TempDir;

const CLIENT: &str = "192.0.2.10";
const WEB: &str = "192.0.2.20";
const ROGUE: &str = "192.0.2.30";
const METRICS: &str = "127.0.0.1:19925";
/// A virtual address the node DNATs to web (as kube-proxy does a Service's `ClusterIP`).
const VIP: &str = "203.0.113.100";

const CLUSTER_YAML: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: front, labels: {kubernetes.io/metadata.name: front}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {kubernetes.io/metadata.name: other}}
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
metadata: {name: client, namespace: front, labels: {app: client}}
spec:
  nodeName: node-1
  containers: [{name: app, image: x}]
status: {podIP: 192.0.2.10, podIPs: [{ip: 192.0.2.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-1
  containers:
  - name: web
    image: x
    ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]
status: {podIP: 192.0.2.20, podIPs: [{ip: 192.0.2.20}]}
---
apiVersion: v1
kind: Pod
metadata: {name: rogue, namespace: other, labels: {app: rogue}}
spec:
  nodeName: node-1
  containers: [{name: app, image: x}]
status: {podIP: 192.0.2.30, podIPs: [{ip: 192.0.2.30}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: front}}}]
    ports: [{port: 8080}, {port: 5353, protocol: UDP}]
";

/// A node namespace with the three pods behind `cali*` veths, and the snapshot naming them.
struct Lab {
    node: Netns,
    client: Netns,
    web: Netns,
    rogue: Netns,
    dir: TempDir,
    pins: PinDir,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let node = Netns::new("rnode");
        let client = Netns::new("rcli");
        let web = Netns::new("rweb");
        let rogue = Netns::new("rrog");
        node.sysctl("net.ipv4.ip_forward", "1");
        netns::calico_pod(&node, &client, "caliC", CLIENT, 1);
        netns::calico_pod(&node, &web, "caliW", WEB, 2);
        netns::calico_pod(&node, &rogue, "caliR", ROGUE, 3);
        let dir = TempDir::new(tag);
        dir.write("cluster/cluster.yaml", CLUSTER_YAML);
        Self {
            node,
            client,
            web,
            rogue,
            dir,
            pins: PinDir::new(tag),
        }
    }

    fn start(&self, run: &str, extra: &[&str]) -> Daemon {
        self.start_pinned(run, &self.pins.arg(), extra)
    }

    /// [`Lab::start`] with `--pin-dir pins` (`none`: no pinned tables).
    fn start_pinned(&self, run: &str, pins: &str, extra: &[&str]) -> Daemon {
        let cluster = self.dir.path().join("cluster").display().to_string();
        let mut args = vec!["--cluster", cluster.as_str(), "--pin-dir", pins];
        args.extend_from_slice(extra);
        let mut daemon = Daemon::start(&self.node, self.dir.path(), &args, run);
        daemon.wait_ready(&self.node);
        daemon
    }

    fn scrape(&self) -> String {
        match self.node.http_get(METRICS, "/metrics") {
            Some((200, body)) => body,
            other => panic!("scrape failed: {other:?}"),
        }
    }

    /// Scrapes until `done` holds, at most 15 s; returns the last scrape.
    fn wait_metrics(&self, daemon: &Daemon, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let metrics = self.scrape();
            if done(&metrics) {
                return metrics;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; flows:\n{}\ndaemon log:\n{}",
                flow_lines(&metrics),
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The auditor daemon inside the node namespace; killed on drop if still running.
struct Daemon {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    fn start(node: &Netns, dir: &Path, extra: &[&str], tag: &str) -> Self {
        let stdout = dir.join(format!("{tag}.stdout"));
        let stderr = dir.join(format!("{tag}.stderr"));
        let file =
            |p: &Path| std::fs::File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut args = vec![
            "netns",
            "exec",
            node.name(),
            env!("CARGO_BIN_EXE_auditor"),
            "run",
            "--interfaces",
            "cali*",
            "--metrics-addr",
            METRICS,
            "--answer-timeout",
            "1s",
            "--node",
            "node-1",
        ];
        args.extend_from_slice(extra);
        // `ip netns exec` execs the binary in place: the child's pid is the daemon's.
        let child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(file(&stdout))
            .stderr(file(&stderr))
            .env("RUST_LOG", "info")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the daemon: {e}"));
        Self {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The unexpected-flow lines the daemon wrote.
    fn unexpected_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"unexpected flow\""))
            .map(str::to_owned)
            .collect()
    }

    fn wait_ready(&mut self, node: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the daemon exited ({status}) before ready:\n{}", self.log());
            }
            if node
                .http_get(METRICS, "/readyz")
                .is_some_and(|(status, _)| status == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon was not ready within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` and waits (at most 10 s) for the exit.
    fn stop(&mut self, signal: i32) {
        let mut child = self.child.take().unwrap_or_else(|| panic!("daemon gone"));
        let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        let rc = unsafe { libc::kill(pid, signal) };
        assert!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
                if signal == libc::SIGTERM {
                    assert!(status.success(), "SIGTERM exit: {status}\n{}", self.log());
                }
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the daemon did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), port)
}

fn flow_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.starts_with("flow_auditor_flows_total{") && !l.ends_with(" 0"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn series(
    verdict: &str,
    outcome: &str,
    src: (&str, &str),
    dst: (&str, &str),
    protocol: &str,
    port: &str,
) -> String {
    format!(
        "flow_auditor_flows_total{{verdict=\"{verdict}\",outcome=\"{outcome}\",\
         src_namespace=\"{}\",src_workload=\"{}\",dst_namespace=\"{}\",\
         dst_workload=\"{}\",protocol=\"{protocol}\",dst_port=\"{port}\"}}",
        src.0, src.1, dst.0, dst.1
    )
}

fn allowed_tcp() -> String {
    series(
        "allowed",
        "established",
        ("front", "client"),
        ("shop", "web"),
        "tcp",
        "8080",
    )
}

fn unexpected_tcp() -> String {
    series(
        "unexpected",
        "established",
        ("other", "rogue"),
        ("shop", "web"),
        "tcp",
        "8080",
    )
}

fn allowed_udp() -> String {
    series(
        "allowed",
        "established",
        ("front", "client"),
        ("shop", "web"),
        "udp",
        "5353",
    )
}

/// A TCP connection from `from` to web:8080, both ends: (initiator's socket, web's socket).
fn connect(from: &Netns, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = from.run(|| {
        TcpStream::connect_timeout(&addr(WEB, 8080), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect -> web:8080: {e}"))
    });
    let (server, _) = listener.accept().unwrap_or_else(|e| panic!("accept: {e}"));
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    (client, server)
}

/// `first` sends, `second` reads and answers, `first` reads the answer.
fn exchange(first: &mut TcpStream, second: &mut TcpStream) {
    let mut buf = [0u8; 4];
    first
        .write_all(b"ping")
        .unwrap_or_else(|e| panic!("write: {e}"));
    second
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("read: {e}"));
    second
        .write_all(b"pong")
        .unwrap_or_else(|e| panic!("write: {e}"));
    first
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("read: {e}"));
}

/// `first` sends a datagram to `second`, which answers.
fn datagrams(first: &UdpSocket, second: &UdpSocket) {
    let to = second.local_addr().unwrap_or_else(|e| panic!("{e}"));
    first
        .send_to(b"q", to)
        .unwrap_or_else(|e| panic!("send: {e}"));
    let mut buf = [0u8; 8];
    let (n, from) = second
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("recv: {e}"));
    second
        .send_to(&buf[..n], from)
        .unwrap_or_else(|e| panic!("reply: {e}"));
    first
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("recv reply: {e}"));
}

fn udp(ns: &Netns, ip: &str, port: u16) -> UdpSocket {
    let socket = ns.run(|| UdpSocket::bind(addr(ip, port)).unwrap_or_else(|e| panic!("bind: {e}")));
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    socket
}

/// Two TCP connections and a UDP conversation counted, the agent stopped with `signal`, data
/// both ways while it is down, the agent started again on the same pins, and the servers
/// speaking first: nothing counted again, nothing unexpected but the one real violation, and
/// a new connection after the restart is counted (the agent works).
fn restart_counts_each_connection_once(signal: i32, tag: &str) {
    require_root();
    let lab = Lab::new(tag);
    // A directory of another layout's pins: the agent removes it.
    std::fs::create_dir(lab.pins.path().join("v00000000")).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let listener = lab
        .web
        .run(|| TcpListener::bind(addr(WEB, 8080)).unwrap_or_else(|e| panic!("bind: {e}")));
    let web_udp = udp(&lab.web, WEB, 5353);
    let mut first = lab.start("first", &[]);
    // (A fresh bpffs also holds the kernel's `maps.debug` and `progs.debug`.)
    let layout: Vec<String> = lab
        .pins
        .list("")
        .into_iter()
        .filter(|n| n.starts_with('v'))
        .collect();
    assert_eq!(layout.len(), 1, "one layout directory: {layout:?}");
    assert!(
        layout[0] != "v00000000",
        "the old layout's pins stay: {layout:?}"
    );
    assert_eq!(
        lab.pins.list(&layout[0]),
        ["FLOWS", "FLOWS4", "FLOWS4_TCP", "REPORTED"],
        "the flow tables and the map of counted flows are pinned"
    );

    let (mut client, mut web_client) = connect(&lab.client, &listener);
    let (mut rogue, mut web_rogue) = connect(&lab.rogue, &listener);
    exchange(&mut client, &mut web_client);
    exchange(&mut rogue, &mut web_rogue);
    let client_udp = udp(&lab.client, CLIENT, 0);
    datagrams(&client_udp, &web_udp);

    let counted = lab.wait_metrics(&first, "the three flows", |m| {
        sample(m, &allowed_tcp()) == 1.0
            && sample(m, &unexpected_tcp()) == 1.0
            && sample(m, &allowed_udp()) == 1.0
    });
    // A walk later (2 s), still three: nothing counted twice.
    std::thread::sleep(Duration::from_millis(2500));
    let counted_later = lab.scrape();
    assert_eq!(
        flows_total(&counted_later),
        3.0,
        "first run, exactly three flows:\n{}",
        flow_lines(&counted_later)
    );
    assert_eq!(flows_total(&counted), 3.0);
    assert_eq!(
        first.unexpected_lines().len(),
        1,
        "one real violation: {:?}",
        first.unexpected_lines()
    );
    first.stop(signal);

    // The agent is down: the connections go on, both ways.
    exchange(&mut client, &mut web_client);
    exchange(&mut web_rogue, &mut rogue);
    datagrams(&client_udp, &web_udp);

    let second = lab.start("second", &[]);
    assert!(
        second
            .log()
            .contains("adopting the flows of the previous agent"),
        "the pinned tables were not adopted:\n{}",
        second.log()
    );
    // The servers speak first.
    exchange(&mut web_client, &mut client);
    exchange(&mut web_rogue, &mut rogue);
    datagrams(&web_udp, &client_udp);
    // Answer timeout (1 s) and a walk (2 s) later, with margin.
    std::thread::sleep(Duration::from_secs(4));
    let after = lab.scrape();
    assert_eq!(
        flows_total(&after),
        0.0,
        "counted again after the restart:\n{}\ndaemon log:\n{}",
        flow_lines(&after),
        second.log()
    );
    assert!(
        second.unexpected_lines().is_empty(),
        "false unexpected after the restart: {:?}",
        second.unexpected_lines()
    );
    for decided in ["true", "false"] {
        assert_eq!(
            sample(
                &after,
                &format!("flow_auditor_flow_table_evictions_total{{decided=\"{decided}\"}}")
            ),
            0.0
        );
    }
    // The restarted agent counts what is new.
    let (mut new_client, mut new_web) = connect(&lab.client, &listener);
    exchange(&mut new_client, &mut new_web);
    let new = lab.wait_metrics(&second, "the new connection", |m| {
        sample(m, &allowed_tcp()) == 1.0
    });
    assert_eq!(flows_total(&new), 1.0, "{}", flow_lines(&new));
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn restart_after_sigterm_counts_each_connection_once() {
    restart_counts_each_connection_once(libc::SIGTERM, "rterm");
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn restart_after_sigkill_counts_each_connection_once() {
    restart_counts_each_connection_once(libc::SIGKILL, "rkill");
}

/// The layout directory of the pins (the one `v...` directory).
fn layout_dir(pins: &PinDir) -> PathBuf {
    let layouts: Vec<String> = pins
        .list("")
        .into_iter()
        .filter(|n| n.starts_with('v'))
        .collect();
    assert_eq!(layouts.len(), 1, "one layout directory: {layouts:?}");
    pins.path().join(&layouts[0])
}

/// The pinned map of counted flows: key -> the `first_seen_ns` each was counted with.
fn pinned_marks(dir: &Path) -> std::collections::HashMap<FlowKey, u64> {
    let data = MapData::from_pin(dir.join(REPORTED_MAP))
        .unwrap_or_else(|e| panic!("open the pinned {REPORTED_MAP}: {e}"));
    let map: aya::maps::HashMap<_, FlowKey, u64> = aya::maps::HashMap::try_from(Map::HashMap(data))
        .unwrap_or_else(|e| panic!("{REPORTED_MAP} as a hash map: {e}"));
    map.iter()
        .map(|entry| entry.unwrap_or_else(|e| panic!("read {REPORTED_MAP}: {e}")))
        .collect()
}

/// The pinned table of IPv4 flows other than TCP.
fn pinned_flows4(dir: &Path) -> aya::maps::HashMap<MapData, FlowKey4, FlowState> {
    let data = MapData::from_pin(dir.join(FLOWS4_MAP))
        .unwrap_or_else(|e| panic!("open the pinned {FLOWS4_MAP}: {e}"));
    aya::maps::HashMap::try_from(Map::LruHashMap(data))
        .unwrap_or_else(|e| panic!("{FLOWS4_MAP} as a hash map: {e}"))
}

/// What the first agent counted is marked with each entry's own first packet, and the next
/// agent counts none of it again, except a flow whose entry was recreated under the same key
/// after it was counted (here the UDP conversation's, rewritten while no agent ran, as an
/// eviction and the conversation's next datagram would recreate it): another first packet, so
/// another flow, counted once by the next agent, which marks the new entry.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn an_entry_recreated_under_a_counted_key_is_counted_by_the_next_agent() {
    require_root();
    let lab = Lab::new("rnew");
    let listener = lab
        .web
        .run(|| TcpListener::bind(addr(WEB, 8080)).unwrap_or_else(|e| panic!("bind: {e}")));
    let web_udp = udp(&lab.web, WEB, 5353);
    let mut first = lab.start("first", &[]);
    let (mut client, mut web_client) = connect(&lab.client, &listener);
    exchange(&mut client, &mut web_client);
    let client_udp = udp(&lab.client, CLIENT, 0);
    datagrams(&client_udp, &web_udp);
    lab.wait_metrics(&first, "both flows", |m| {
        sample(m, &allowed_tcp()) == 1.0 && sample(m, &allowed_udp()) == 1.0
    });
    first.stop(libc::SIGTERM);

    let dir = layout_dir(&lab.pins);
    let local = |s: &UdpSocket| s.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (udp_key, _) = FlowKey::from_addrs(
        auditor_ebpf::flow::proto::UDP,
        (local(&client_udp).ip(), local(&client_udp).port()),
        (local(&web_udp).ip(), local(&web_udp).port()),
    );
    let udp_key4 = udp_key
        .narrow()
        .unwrap_or_else(|| panic!("an IPv4 flow has a narrow key"));
    let mut flows4 = pinned_flows4(&dir);
    let entry = flows4
        .get(&udp_key4, 0)
        .unwrap_or_else(|e| panic!("the UDP conversation's entry: {e}"));
    let marks = pinned_marks(&dir);
    assert_eq!(
        marks.len(),
        2,
        "one mark per counted flow, nothing else: {marks:?}"
    );
    assert_eq!(
        marks.get(&udp_key),
        Some(&entry.first_seen_ns),
        "the conversation is marked with its entry's first packet"
    );
    // Recreated under the same key: a later first packet, the rest as a new conversation
    // answered once.
    let recreated = FlowState {
        first_seen_ns: entry.last_seen_ns + 1,
        last_seen_ns: entry.last_seen_ns + 1,
        packets: [1, 1],
        bytes: [100, 100],
        ..entry
    };
    flows4
        .insert(&udp_key4, &recreated, 0)
        .unwrap_or_else(|e| panic!("rewrite the entry: {e}"));
    drop(flows4);

    let second = lab.start("second", &[]);
    let counted = lab.wait_metrics(&second, "the recreated conversation", |m| {
        sample(m, &allowed_udp()) == 1.0
    });
    // A walk later (2 s), the connection still not counted again, the conversation once.
    std::thread::sleep(Duration::from_millis(2500));
    let later = lab.scrape();
    for metrics in [&counted, &later] {
        assert_eq!(
            flows_total(metrics),
            1.0,
            "only the recreated conversation:\n{}\ndaemon log:\n{}",
            flow_lines(metrics),
            second.log()
        );
    }
    let marks = pinned_marks(&dir);
    assert_eq!(
        marks.get(&udp_key),
        Some(&recreated.first_seen_ns),
        "the recreated entry is marked with its own first packet: {marks:?}"
    );
    assert_eq!(marks.len(), 2, "{marks:?}");
    assert_eq!(
        sample(&later, "flow_auditor_reported_mark_failures_total"),
        0.0
    );
}

/// A connection and a conversation idle past the idle timeout (2 s here) leave the table; the
/// server resuming them is no new flow.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn a_connection_resumed_after_idle_expiry_is_counted_once() {
    require_root();
    let lab = Lab::new("ridle");
    let listener = lab
        .web
        .run(|| TcpListener::bind(addr(WEB, 8080)).unwrap_or_else(|e| panic!("bind: {e}")));
    let web_udp = udp(&lab.web, WEB, 5353);
    let daemon = lab.start("idle", &["--idle-timeout", "2s"]);
    let (mut client, mut web) = connect(&lab.client, &listener);
    exchange(&mut client, &mut web);
    let client_udp = udp(&lab.client, CLIENT, 0);
    datagrams(&client_udp, &web_udp);
    lab.wait_metrics(&daemon, "both flows", |m| {
        sample(m, &allowed_tcp()) == 1.0 && sample(m, &allowed_udp()) == 1.0
    });
    // Idle: the walk deletes both entries.
    lab.wait_metrics(&daemon, "the idle entries to leave the table", |m| {
        sample(m, "flow_auditor_flow_table_entries") == 0.0
    });
    exchange(&mut web, &mut client);
    datagrams(&web_udp, &client_udp);
    lab.wait_metrics(&daemon, "the resumed flows back in the table", |m| {
        sample(m, "flow_auditor_flow_table_entries") > 0.0
    });
    std::thread::sleep(Duration::from_secs(3));
    let after = lab.scrape();
    assert_eq!(
        flows_total(&after),
        2.0,
        "a resumed connection counted again:\n{}\ndaemon log:\n{}",
        flow_lines(&after),
        daemon.log()
    );
    assert!(daemon.unexpected_lines().is_empty());
}

/// A connection opened before the agent started: its first packet seen is the server's data
/// (mid-stream), then the client resets it. Closed, not refused; counted once from the client
/// (the server declares port 8080), allowed.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn a_reset_of_a_flow_first_seen_mid_stream_is_no_refusal() {
    require_root();
    let lab = Lab::new("rrst");
    let listener = lab
        .web
        .run(|| TcpListener::bind(addr(WEB, 8080)).unwrap_or_else(|e| panic!("bind: {e}")));
    let (mut client, mut web) = connect(&lab.client, &listener);
    exchange(&mut client, &mut web);
    let daemon = lab.start("rst", &[]);
    web.write_all(b"keepalive")
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut buf = [0u8; 9];
    client
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("read: {e}"));
    // SO_LINGER 0: closing sends a RST.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    #[expect(clippy::cast_possible_truncation, reason = "a linger is 8 bytes")]
    let len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    // SAFETY: a valid linger of the given size on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&client),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            len,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(client);
    let counted = lab.wait_metrics(&daemon, "the reset connection", |m| flows_total(m) >= 1.0);
    std::thread::sleep(Duration::from_millis(2500));
    let after = lab.scrape();
    assert_eq!(flows_total(&after), 1.0, "{}", flow_lines(&after));
    assert_eq!(
        sample(&after, &allowed_tcp()),
        1.0,
        "not the client's allowed, established connection:\n{}\n(first: {})\n{}",
        flow_lines(&after),
        flow_lines(&counted),
        daemon.log()
    );
    assert!(daemon.unexpected_lines().is_empty());
}

/// Conntrack first: in a node namespace whose nftables uses connection tracking (as Calico's
/// dataplane and kube-proxy do), a connection opened before the agent started, between ports
/// that give no evidence (neither declared, both in the ephemeral range), is oriented by the
/// conntrack entry's ORIGINAL tuple: the forbidden connection from `other/rogue` is a true
/// `unexpected`. (Judged both ways it would pass as allowed, web -> rogue.)
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn a_mid_stream_flow_is_oriented_by_the_node_s_conntrack() {
    require_root();
    let lab = Lab::new("rct");
    lab.node.output(&[
        "nft",
        "add table inet fa; add chain inet fa tracked { type filter hook forward priority 0; policy accept; }; add rule inet fa tracked ct state established,related accept",
    ]);
    // 40000: in the ephemeral range, declared by no pod and named by no policy.
    let listener = lab
        .web
        .run(|| TcpListener::bind(addr(WEB, 40_000)).unwrap_or_else(|e| panic!("bind: {e}")));
    let mut rogue = lab.rogue.run(|| {
        TcpStream::connect_timeout(&addr(WEB, 40_000), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect -> web:40000: {e}"))
    });
    let (mut web, _) = listener.accept().unwrap_or_else(|e| panic!("accept: {e}"));
    for s in [&rogue, &web] {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    exchange(&mut rogue, &mut web);
    let conntrack = lab.node.output(&["cat", "/proc/net/nf_conntrack"]);
    let daemon = lab.start("ct", &[]);
    // The server speaks first.
    exchange(&mut web, &mut rogue);
    let unexpected = series(
        "unexpected",
        "established",
        ("other", "rogue"),
        ("shop", "web"),
        "tcp",
        "other",
    );
    let after = lab.wait_metrics(&daemon, "the rogue connection", |m| {
        sample(m, &unexpected) == 1.0
    });
    assert_eq!(flows_total(&after), 1.0, "{}", flow_lines(&after));
    let lines = daemon.unexpected_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line: serde_json::Value =
        serde_json::from_str(&lines[0]).unwrap_or_else(|e| panic!("{e}: {}", lines[0]));
    assert_eq!(
        (&line["orientation"], &line["seen_from_opening"]),
        (&serde_json::json!("conntrack"), &serde_json::json!(false)),
        "{line}\nconntrack:\n{conntrack}"
    );
}

/// Isolates the client pod's ingress: web -> client, the UDP conversation seen the wrong way
/// round, is denied.
const CLIENT_INGRESS_YAML: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-no-ingress, namespace: front}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress]
";

/// The join window: a UDP conversation counted, the agent stopped and started again without
/// pinned tables (`--pin-dir none`: nothing to adopt), and the server (web, which declares UDP
/// port 5353) speaks first. The restarted agent counts the conversation once, from the client,
/// allowed: taken the way it was seen (web -> client, denied by the client's ingress policy) it
/// would be a false `unexpected`. A forbidden conversation the rogue pod starts in the window is
/// still `unexpected`, and its log line says it was not seen from its opening.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn a_udp_conversation_joined_without_adopted_tables_keeps_its_initiator() {
    require_root();
    let lab = Lab::new("orient-join");
    lab.dir
        .write("cluster/client-ingress.yaml", CLIENT_INGRESS_YAML);
    let web_udp = udp(&lab.web, WEB, 5353);
    let client_udp = udp(&lab.client, CLIENT, 0);
    let mut first = lab.start("first", &[]);
    datagrams(&client_udp, &web_udp);
    lab.wait_metrics(&first, "the UDP conversation", |m| {
        sample(m, &allowed_udp()) == 1.0
    });
    assert!(
        first.unexpected_lines().is_empty(),
        "{:?}",
        first.unexpected_lines()
    );
    first.stop(libc::SIGTERM);
    datagrams(&client_udp, &web_udp);

    let second = lab.start_pinned("second", "none", &[]);
    assert!(
        second.log().contains("no flow tables adopted"),
        "no join window opened:\n{}",
        second.log()
    );
    // The server speaks first.
    datagrams(&web_udp, &client_udp);
    let rogue_udp = udp(&lab.rogue, ROGUE, 0);
    datagrams(&rogue_udp, &web_udp);
    let unexpected_udp = series(
        "unexpected",
        "established",
        ("other", "rogue"),
        ("shop", "web"),
        "udp",
        "5353",
    );
    lab.wait_metrics(&second, "both conversations", |m| {
        sample(m, &allowed_udp()) == 1.0 && sample(m, &unexpected_udp) == 1.0
    });
    // A walk (2 s) later, still exactly those two.
    std::thread::sleep(Duration::from_millis(2500));
    let after = lab.scrape();
    assert_eq!(
        flows_total(&after),
        2.0,
        "{}\ndaemon log:\n{}",
        flow_lines(&after),
        second.log()
    );
    let lines = second.unexpected_lines();
    assert_eq!(lines.len(), 1, "only the rogue conversation: {lines:?}");
    let line: serde_json::Value =
        serde_json::from_str(&lines[0]).unwrap_or_else(|e| panic!("{e}: {}", lines[0]));
    assert_eq!(
        (
            &line["orientation"],
            &line["seen_from_opening"],
            &line["src"]["address"]
        ),
        (
            &serde_json::json!("declared_port"),
            &serde_json::json!(false),
            &serde_json::json!(ROGUE)
        ),
        "{line}"
    );
}

/// Conntrack for a translated connection: the node DNATs a virtual address (a Service's
/// `ClusterIP`, as kube-proxy and Calico do) to web, between ports that give no evidence. Opened
/// before the agent started; afterwards the client (rogue) speaks first. At web's interface the
/// agent sees rogue -> web, the inverse of the entry's REPLY tuple, and conntrack still names
/// rogue: a true `unexpected`. (Without that evidence it would be judged both ways and pass as
/// allowed, web -> rogue.)
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn a_mid_stream_dnat_flow_is_oriented_by_the_node_s_conntrack() {
    require_root();
    let lab = Lab::new("orient-dnat");
    lab.node.output(&[
        "nft",
        &format!(
            "add table ip orient; \
             add chain ip orient pre {{ type nat hook prerouting priority -100; policy accept; }}; \
             add rule ip orient pre ip daddr {VIP} tcp dport 40000 dnat to {WEB}:40000"
        ),
    ]);
    // 40000: in the ephemeral range, declared by no pod and named by no policy.
    let listener = lab
        .web
        .run(|| TcpListener::bind(addr(WEB, 40_000)).unwrap_or_else(|e| panic!("bind: {e}")));
    let mut rogue = lab.rogue.run(|| {
        TcpStream::connect_timeout(&addr(VIP, 40_000), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect -> {VIP}:40000: {e}"))
    });
    let (mut web, seen_from) = listener.accept().unwrap_or_else(|e| panic!("accept: {e}"));
    assert_eq!(
        seen_from,
        rogue.local_addr().unwrap_or_else(|e| panic!("{e}")),
        "web sees rogue itself (DNAT only)"
    );
    for s in [&rogue, &web] {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    exchange(&mut rogue, &mut web);
    let daemon = lab.start("dnat", &[]);
    // The client speaks first: the first packet seen at web's interface is rogue -> web.
    exchange(&mut rogue, &mut web);
    let unexpected = series(
        "unexpected",
        "established",
        ("other", "rogue"),
        ("shop", "web"),
        "tcp",
        "other",
    );
    lab.wait_metrics(&daemon, "the rogue connection", |m| {
        sample(m, &unexpected) == 1.0
    });
    let lines = daemon.unexpected_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line: serde_json::Value =
        serde_json::from_str(&lines[0]).unwrap_or_else(|e| panic!("{e}: {}", lines[0]));
    assert_eq!(
        (
            &line["orientation"],
            &line["seen_from_opening"],
            &line["dst"]["address"]
        ),
        (
            &serde_json::json!("conntrack"),
            &serde_json::json!(false),
            &serde_json::json!(WEB)
        ),
        "{line}"
    );
}
