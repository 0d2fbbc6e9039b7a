//! The Cilium-style lab (`cargo xtask demo --cni cilium`, and a step of `cargo xtask test`): the
//! homelab of `shared/seeds/000_*` in miniature, on two node namespaces.
//!
//! - Namespaces arr, auth, monitoring, kyverno, backups, openclaw and kube-system, one network
//!   namespace per pod behind an `lxc*` veth of its node; the seed's `CiliumNetworkPolicies`
//!   (`auditor/tests/fixtures/cilium-homelab/policies/`) are the intended model, and nothing
//!   enforces them (so forbidden flows get through: `unexpected`).
//! - Two nodes on a LAN (a bridge in a router namespace, which also routes to two hosts of the
//!   world and routes each node's pod CIDR to it), joined either by native routing (each node
//!   routes the other's pod CIDR over the LAN) or by a real VXLAN device, `cilium_vxlan`, in
//!   each node namespace.
//! - Cilium's BPF host routing, played by the lab's own fixture `lab-redirect`: at the TC
//!   ingress of `eth0` (and of `cilium_vxlan`) it hands each packet for a local pod to the pod
//!   with `bpf_redirect_peer`, so the packet never crosses the TC egress of the pod's `lxc*`
//!   interface. A probe of the fixture on every `lxc*` egress counts what does cross it.
//! - One agent per node with the Cilium overlay's settings (`lxc*`, the Cilium uplinks, Cilium's
//!   ipBlock reading), counting by the cross-node rule, scraped by one real Prometheus.
//!
//! Nothing here touches the machine's own namespace; every namespace is removed at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::cluster::Proto;
use super::daemon::{Daemon, Proc, Prometheus};
use super::net::{self, Netns, in_netns, veth};
use super::traffic::{self, Seen};

/// How the two nodes reach each other's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// Each node routes the other's pod CIDR to it over the LAN (Cilium's native routing).
    Native,
    /// Through `cilium_vxlan`, a VXLAN device (UDP 8472, Cilium's port) in each node namespace.
    Vxlan,
}

impl Routing {
    pub const ALL: [Self; 2] = [Self::Native, Self::Vxlan];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Native => "native routing",
            Self::Vxlan => "VXLAN",
        }
    }
}

/// One of the lab's two nodes.
#[derive(Clone, Copy, Debug)]
pub struct Node {
    pub name: &'static str,
    pub ip: Ipv4Addr,
    /// The first three octets of its /24 pod CIDR.
    pub pods: [u8; 3],
    /// Its address on the VXLAN overlay.
    pub overlay: Ipv4Addr,
}

impl Node {
    fn cidr(&self) -> String {
        let [a, b, c] = self.pods;
        format!("{a}.{b}.{c}.0/24")
    }

    fn metrics(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 19925))
    }
}

pub const NODES: [Node; 2] = [
    Node {
        name: "lab-a",
        ip: Ipv4Addr::new(10, 0, 0, 11),
        pods: [10, 244, 1],
        overlay: Ipv4Addr::new(10, 99, 0, 11),
    },
    Node {
        name: "lab-b",
        ip: Ipv4Addr::new(10, 0, 0, 12),
        pods: [10, 244, 2],
        overlay: Ipv4Addr::new(10, 99, 0, 12),
    },
];

/// The LAN router: the nodes' default gateway, and the way to and from the world.
const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Where Prometheus listens, in the router namespace.
const PROMETHEUS_ADDR: &str = "10.0.0.1:19090";
/// Pods' next hop, answered by proxy ARP on the `lxc*` side (Cilium answers ARP from its
/// program instead; the effect for the pod is the same).
const POD_GATEWAY: &str = "169.254.1.1";

/// A pod of the lab.
#[derive(Clone, Copy, Debug)]
pub struct Pod {
    pub key: &'static str,
    pub namespace: &'static str,
    /// `app.kubernetes.io/name`, or `k8s-app` for `CoreDNS`.
    pub app: &'static str,
    pub node: usize,
    pub host: u8,
    /// (name, number, protocol) of each container port, all served.
    pub ports: &'static [(&'static str, u16, Proto)],
}

impl Pod {
    pub const fn ip(&self) -> Ipv4Addr {
        let [a, b, c] = NODES[self.node].pods;
        Ipv4Addr::new(a, b, c, self.host)
    }

    /// The host side of its veth: `lxc` and its key, as Cilium's `lxc` + a hash.
    pub fn lxc(&self) -> String {
        format!("lxc{}", self.key)
    }
}

const TCP: Proto = Proto::Tcp;
const UDP: Proto = Proto::Udp;

pub const PODS: &[Pod] = &[
    Pod {
        key: "prometheus",
        namespace: "monitoring",
        app: "prometheus",
        node: 0,
        host: 20,
        ports: &[("web", 9090, TCP)],
    },
    Pod {
        key: "sonarr",
        namespace: "arr",
        app: "sonarr",
        node: 0,
        host: 10,
        ports: &[("http", 8989, TCP)],
    },
    Pod {
        key: "authentik",
        namespace: "auth",
        app: "authentik-server",
        node: 0,
        host: 40,
        ports: &[("http", 9000, TCP)],
    },
    Pod {
        key: "openclaw",
        namespace: "openclaw",
        app: "openclaw",
        node: 0,
        host: 30,
        ports: &[("gateway", 18789, TCP)],
    },
    Pod {
        key: "radarr",
        namespace: "arr",
        app: "radarr",
        node: 1,
        host: 10,
        ports: &[("http", 7878, TCP)],
    },
    Pod {
        key: "minio",
        namespace: "backups",
        app: "minio",
        node: 1,
        host: 20,
        ports: &[("api", 9000, TCP)],
    },
    Pod {
        key: "kyverno",
        namespace: "kyverno",
        app: "kyverno",
        node: 1,
        host: 30,
        ports: &[("https", 9443, TCP)],
    },
    Pod {
        key: "coredns",
        namespace: "kube-system",
        app: "kube-dns",
        node: 1,
        host: 53,
        ports: &[("dns", 53, UDP)],
    },
];

/// A host of the world, behind the LAN router.
#[derive(Clone, Copy, Debug)]
pub struct World {
    pub key: &'static str,
    pub what: &'static str,
    pub ip: Ipv4Addr,
    pub ports: &'static [u16],
}

pub const WORLD: &[World] = &[
    World {
        key: "github",
        what: "api.github.com stand-in (HTTPS)",
        ip: Ipv4Addr::new(203, 0, 113, 10),
        ports: &[443],
    },
    World {
        key: "visitor",
        what: "a visitor from the internet",
        ip: Ipv4Addr::new(198, 51, 100, 7),
        ports: &[],
    },
];

const NAMESPACES: &[&str] = &[
    "arr",
    "auth",
    "monitoring",
    "kyverno",
    "backups",
    "openclaw",
    "kube-system",
];

/// One conversation: `from` (a pod or world key) to `to` on `port`.
#[derive(Clone, Copy, Debug)]
pub struct Conversation {
    pub from: &'static str,
    pub to: &'static str,
    pub port: u16,
    pub proto: Proto,
    /// What the client must see.
    pub seen: Seen,
}

const fn tcp(from: &'static str, to: &'static str, port: u16) -> Conversation {
    Conversation {
        from,
        to,
        port,
        proto: TCP,
        seen: Seen::Answered,
    }
}

/// The script: each conversation one flow. Its verdicts are worked out by hand in
/// [`EXPECTED`], not derived from it.
pub const SCRIPT: &[Conversation] = &[
    // Same node (lab-a), allowed and forbidden.
    tcp("prometheus", "sonarr", 8989),
    tcp("authentik", "sonarr", 8989),
    // Same node (lab-b).
    Conversation {
        proto: UDP,
        ..tcp("radarr", "coredns", 53)
    },
    tcp("radarr", "kyverno", 9443),
    // Across nodes, both ways.
    tcp("prometheus", "minio", 9000),
    tcp("openclaw", "radarr", 7878),
    Conversation {
        proto: UDP,
        ..tcp("sonarr", "coredns", 53)
    },
    tcp("sonarr", "minio", 9000),
    tcp("radarr", "sonarr", 8989),
    tcp("minio", "openclaw", 18789),
    // Across nodes, to a port nobody listens on: the RST comes back through the redirect.
    Conversation {
        seen: Seen::Refused,
        ..tcp("prometheus", "minio", 9001)
    },
    // The world.
    tcp("prometheus", "github", 443),
    tcp("openclaw", "github", 443),
    tcp("visitor", "sonarr", 8989),
];

/// One expected `sum by (verdict, outcome, src_namespace, dst_namespace)` series of one round:
/// (verdict, outcome, source namespace, destination namespace, flows, why). An empty namespace
/// is the world.
type Expected = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    u64,
    &'static str,
);

/// Worked out by hand from the seed's policies: every application namespace denies ingress
/// from the world and admits only what its allow rules name; kube-system has no policy; only
/// openclaw has egress rules (the API server, some FQDNs, monitoring, arr's `http`, DNS).
pub const EXPECTED: &[Expected] = &[
    (
        "allowed",
        "established",
        "monitoring",
        "arr",
        1,
        "arr's allow-monitoring (same node)",
    ),
    (
        "unexpected",
        "established",
        "auth",
        "arr",
        1,
        "arr admits no auth pod (same node)",
    ),
    (
        "allowed",
        "established",
        "arr",
        "kube-system",
        2,
        "kube-system has no policy (same node over UDP, and across nodes)",
    ),
    (
        "unexpected",
        "established",
        "arr",
        "kyverno",
        1,
        "kyverno admits pods on 8000 only (same node)",
    ),
    (
        "allowed",
        "established",
        "monitoring",
        "backups",
        1,
        "backups' allow-monitoring",
    ),
    (
        "allowed",
        "refused",
        "monitoring",
        "backups",
        1,
        "allowed on any port; nothing listens on 9001",
    ),
    (
        "allowed",
        "established",
        "openclaw",
        "arr",
        1,
        "openclaw's egress to arr's http, and arr's allow-openclaw",
    ),
    (
        "unexpected",
        "established",
        "arr",
        "backups",
        1,
        "backups admits its own pods and monitoring only",
    ),
    (
        "allowed",
        "established",
        "arr",
        "arr",
        1,
        "arr's allow-internal, across nodes",
    ),
    (
        "unexpected",
        "established",
        "backups",
        "openclaw",
        1,
        "openclaw admits the gateway only",
    ),
    (
        "allowed",
        "established",
        "monitoring",
        "",
        1,
        "monitoring has no egress policy",
    ),
    (
        "unexpected",
        "established",
        "openclaw",
        "",
        1,
        "openclaw's toFQDNs: no DNS answer named this address",
    ),
    (
        "unexpected",
        "established",
        "",
        "arr",
        1,
        "arr's default-deny-world",
    ),
];

pub fn pod(key: &str) -> Option<&'static Pod> {
    PODS.iter().find(|p| p.key == key)
}

fn world(key: &str) -> Option<&'static World> {
    WORLD.iter().find(|w| w.key == key)
}

fn address(key: &str) -> Option<Ipv4Addr> {
    pod(key).map(Pod::ip).or_else(|| world(key).map(|w| w.ip))
}

/// The cluster snapshot both agents read (`auditor run --cluster`).
pub fn snapshot_yaml() -> String {
    let mut y = String::from(
        "# Generated by the Cilium-style lab of `cargo xtask`: seed 000's cluster in miniature.\n\
         apiVersion: v1\nkind: List\nitems:\n",
    );
    for node in NODES {
        let cidr = node.cidr();
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Node\n  metadata:\n    name: {name}\n  spec:\n    \
             podCIDR: {cidr}\n    podCIDRs: [{cidr}]\n  status:\n    addresses:\n    \
             - {{type: InternalIP, address: {ip}}}\n    - {{type: Hostname, address: {name}}}\n",
            name = node.name,
            ip = node.ip
        );
    }
    for ns in NAMESPACES {
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Namespace\n  metadata:\n    name: {ns}\n    labels: \
             {{kubernetes.io/metadata.name: {ns}}}\n"
        );
    }
    for pod in PODS {
        let label = if pod.app == "kube-dns" {
            "k8s-app"
        } else {
            "app.kubernetes.io/name"
        };
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: {key}-0\n    namespace: {ns}\n    \
             labels: {{{label}: {app}}}\n  spec:\n    nodeName: {node}\n    containers:\n    \
             - name: main\n      image: lab/{key}\n      ports:\n",
            key = pod.key,
            ns = pod.namespace,
            app = pod.app,
            node = NODES[pod.node].name
        );
        for (name, number, proto) in pod.ports {
            let _ = writeln!(
                y,
                "      - {{name: {name}, containerPort: {number}, protocol: {}}}",
                proto.as_str()
            );
        }
        let _ = write!(
            y,
            "  status:\n    phase: Running\n    hostIP: {host}\n    podIP: {ip}\n    podIPs: \
             [{{ip: {ip}}}]\n",
            host = NODES[pod.node].ip,
            ip = pod.ip()
        );
    }
    y
}

/// The agents' configuration file: the Cilium overlay's, with the lab's (unused) Gateway range.
const AGENT_CONFIG: &str = "ipBlockReading: cilium\nentities:\n  ingress: [192.0.2.0/28]\n";

/// The Cilium overlay's uplinks (`deploy/overlays/cilium/config.yaml`).
const CILIUM_UPLINKS: &str = "cilium_vxlan,cilium_geneve,cilium_wg0,:default-route";

/// The lab's namespaces; dropped in reverse order of creation.
#[derive(Debug)]
pub struct Topology {
    pub router: Netns,
    pub nodes: Vec<Netns>,
    pub pods: Vec<(&'static str, Netns)>,
    pub world: Vec<(&'static str, Netns)>,
}

impl Topology {
    fn ns_of(&self, key: &str) -> Option<&str> {
        self.pods
            .iter()
            .chain(&self.world)
            .find(|(k, _)| *k == key)
            .map(|(_, ns)| ns.name())
    }

    /// Builds everything; on error the guards remove what was built.
    pub fn build(routing: Routing) -> Result<Self> {
        let pid = std::process::id();
        let name = |role: &str| format!("{}{pid}-c-{role}", net::PREFIX);
        let router = Netns::create(name("lan"))?;
        router.ip(&["link", "add", "br0", "type", "bridge"])?;
        router.ip(&["link", "set", "br0", "up"])?;
        router.ip(&["addr", "add", &format!("{ROUTER_IP}/24"), "dev", "br0"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        let mut topo = Self {
            router,
            nodes: Vec::new(),
            pods: Vec::new(),
            world: Vec::new(),
        };
        for (i, node) in NODES.iter().enumerate() {
            let ns = Netns::create(name(node.name))?;
            let port = format!("lan{i}");
            veth(&ns, "eth0", &topo.router, &port)?;
            topo.router.ip(&["link", "set", &port, "master", "br0"])?;
            ns.ip(&["addr", "add", &format!("{}/24", node.ip), "dev", "eth0"])?;
            ns.ip(&["route", "add", "default", "via", &ROUTER_IP.to_string()])?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            topo.router.ip(&[
                "route",
                "add",
                &node.cidr(),
                "via",
                &node.ip.to_string(),
                "dev",
                "br0",
            ])?;
            topo.nodes.push(ns);
        }
        for (i, node) in NODES.iter().enumerate() {
            let other = &NODES[1 - i];
            let ns = &topo.nodes[i];
            match routing {
                Routing::Native => ns.ip(&[
                    "route",
                    "add",
                    &other.cidr(),
                    "via",
                    &other.ip.to_string(),
                    "dev",
                    "eth0",
                ])?,
                Routing::Vxlan => {
                    ns.ip(&[
                        "link",
                        "add",
                        "cilium_vxlan",
                        "type",
                        "vxlan",
                        "id",
                        "2",
                        "local",
                        &node.ip.to_string(),
                        "remote",
                        &other.ip.to_string(),
                        "dstport",
                        "8472",
                        "dev",
                        "eth0",
                    ])?;
                    ns.ip(&[
                        "addr",
                        "add",
                        &format!("{}/24", node.overlay),
                        "dev",
                        "cilium_vxlan",
                    ])?;
                    ns.ip(&["link", "set", "cilium_vxlan", "up"])?;
                    ns.ip(&[
                        "route",
                        "add",
                        &other.cidr(),
                        "via",
                        &other.overlay.to_string(),
                        "dev",
                        "cilium_vxlan",
                    ])?;
                }
            }
        }
        for pod in PODS {
            let ns = Netns::create(name(&format!("pod-{}", pod.key)))?;
            wire_pod(&topo.nodes[pod.node], &ns, pod)?;
            topo.pods.push((pod.key, ns));
        }
        for (i, host) in WORLD.iter().enumerate() {
            let ns = Netns::create(name(&format!("ext-{}", host.key)))?;
            let side = format!("ext{i}");
            veth(&topo.router, &side, &ns, "eth0")?;
            let ip = format!("{}/32", host.ip);
            ns.ip(&["addr", "add", &ip, "dev", "eth0"])?;
            ns.ip(&["route", "add", &ROUTER_IP.to_string(), "dev", "eth0"])?;
            ns.ip(&["route", "add", "default", "via", &ROUTER_IP.to_string()])?;
            topo.router
                .ip(&["route", "add", &ip, "dev", &side, "scope", "link"])?;
            topo.world.push((host.key, ns));
        }
        Ok(topo)
    }
}

/// A pod behind its node's `lxc*` veth: a /32 and a default route via a link-local gateway the
/// `lxc*` side answers by proxy ARP; the node routes the /32 to the `lxc*` interface.
fn wire_pod(node: &Netns, ns: &Netns, pod: &Pod) -> Result<()> {
    let lxc = pod.lxc();
    veth(node, &lxc, ns, "eth0")?;
    node.sysctl(&format!("net.ipv4.conf.{lxc}.proxy_arp"), "1")?;
    node.sysctl(&format!("net.ipv4.neigh.{lxc}.proxy_delay"), "0")?;
    let ip = pod.ip().to_string();
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    ns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"])?;
    ns.ip(&["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"])?;
    node.ip(&[
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        &lxc,
        "scope",
        "link",
    ])
}

/// The servers of every pod and world host; stopped and joined on drop.
#[derive(Debug)]
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(topo: &Topology) -> Result<Self> {
        let mut servers = Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        let mut listen: Vec<(&str, Ipv4Addr, u16, Proto)> = Vec::new();
        for pod in PODS {
            for (_, number, proto) in pod.ports {
                listen.push((pod.key, pod.ip(), *number, *proto));
            }
        }
        for host in WORLD {
            for port in host.ports {
                listen.push((host.key, host.ip, *port, TCP));
            }
        }
        for (key, ip, port, proto) in listen {
            let ns = topo
                .ns_of(key)
                .with_context(|| format!("no namespace for {key}"))?;
            let addr = SocketAddr::from((ip, port));
            let stop = Arc::clone(&servers.stop);
            let thread = match proto {
                Proto::Tcp => {
                    let listener = in_netns(ns, || TcpListener::bind(addr))?
                        .with_context(|| format!("{key}: bind tcp {addr}"))?;
                    listener.set_nonblocking(true)?;
                    std::thread::spawn(move || traffic::serve_tcp(&listener, &stop))
                }
                Proto::Udp => {
                    let socket = in_netns(ns, || UdpSocket::bind(addr))?
                        .with_context(|| format!("{key}: bind udp {addr}"))?;
                    socket.set_read_timeout(Some(traffic::SERVER_POLL))?;
                    std::thread::spawn(move || traffic::serve_udp(&socket, &stop))
                }
            };
            servers.threads.push(thread);
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Plays every conversation of [`SCRIPT`] at once; what each client saw, in script order.
fn play_all(topo: &Topology) -> Vec<Result<Seen>> {
    super::traffic::in_parallel(SCRIPT, |conv| play(topo, conv))
}

fn play(topo: &Topology, conv: &Conversation) -> Result<Seen> {
    let ns = topo
        .ns_of(conv.from)
        .with_context(|| format!("no namespace for {}", conv.from))?;
    let ip = address(conv.to).with_context(|| format!("no address for {}", conv.to))?;
    let addr = SocketAddr::from((ip, conv.port));
    let seen = match conv.proto {
        Proto::Tcp => in_netns(ns, || traffic::tcp_client(addr))?,
        Proto::Udp => in_netns(ns, || traffic::udp_client(addr))?,
    };
    seen.with_context(|| format!("{} -> {addr}/{}", conv.from, conv.proto.as_str()))
}

/// The counters of one node's `lab-redirect`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixtureStats {
    pub redirected: u64,
    pub probe_remote: u64,
    pub probe_local: u64,
    pub redirect_failed: u64,
}

/// One node's `lab-redirect`, stopped on drop (its TCX links go with it).
#[derive(Debug)]
struct Fixture {
    proc: Proc,
    stats: PathBuf,
}

impl Fixture {
    fn start(
        fixture: &Path,
        node: usize,
        ns: &Netns,
        routing: Routing,
        dir: &Path,
    ) -> Result<Self> {
        let stats = dir.join(format!("redirect-{}.stats", NODES[node].name));
        let mut args = vec![
            "--stats".to_owned(),
            stats.display().to_string(),
            "--redirect".to_owned(),
            "eth0".to_owned(),
        ];
        if routing == Routing::Vxlan {
            args.extend(["--redirect".to_owned(), "cilium_vxlan".to_owned()]);
        }
        for pod in PODS.iter().filter(|p| p.node == node) {
            args.extend([
                "--probe".to_owned(),
                pod.lxc(),
                "--endpoint".to_owned(),
                format!("{}={}", pod.ip(), pod.lxc()),
            ]);
        }
        let log = dir.join(format!("redirect-{}.log", NODES[node].name));
        let (proc, _) = Proc::spawn("lab-redirect", ns.name(), fixture, &args, log, false)?;
        let mut this = Self { proc, stats };
        let deadline = Instant::now() + Duration::from_secs(10);
        while this.read().is_err() {
            this.proc.check_alive()?;
            if Instant::now() > deadline {
                bail!("lab-redirect wrote no counters within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(this)
    }

    fn read(&self) -> Result<FixtureStats> {
        let text = std::fs::read_to_string(&self.stats)
            .with_context(|| format!("read {}", self.stats.display()))?;
        parse_stats(&text)
    }
}

fn parse_stats(text: &str) -> Result<FixtureStats> {
    let mut s = FixtureStats::default();
    let mut seen = 0;
    for line in text.lines() {
        let (name, value) = line
            .split_once(' ')
            .with_context(|| format!("bad counter line {line:?}"))?;
        let value: u64 = value
            .parse()
            .with_context(|| format!("bad counter line {line:?}"))?;
        let slot = match name {
            "redirected" => &mut s.redirected,
            "probe_remote" => &mut s.probe_remote,
            "probe_local" => &mut s.probe_local,
            "redirect_failed" => &mut s.redirect_failed,
            other => bail!("unknown counter {other:?}"),
        };
        *slot = value;
        seen += 1;
    }
    if seen != 4 {
        bail!("want 4 counters, got {seen}: {text:?}");
    }
    Ok(s)
}

/// A running Cilium-style lab. Fields drop in order: agents first (SIGTERM: they detach), then
/// the fixtures, the servers, the namespaces, and the directory.
#[derive(Debug)]
pub struct Lab {
    pub daemons: Vec<Daemon>,
    fixtures: Vec<Fixture>,
    servers: Servers,
    pub topo: Topology,
    dir: super::TempDir,
    pub routing: Routing,
}

impl Lab {
    /// Builds the lab for `routing`, starts a fixture and an agent of `binary` on each node (on
    /// the pod interfaces and, with `uplinks`, on the Cilium overlay's uplinks too), and returns
    /// once both agents are ready.
    pub fn up(
        binary: &Path,
        fixture: &Path,
        routing: Routing,
        uplinks: bool,
        answer_timeout: &str,
        tag: &str,
    ) -> Result<Self> {
        net::remove_stale()?;
        let dir = super::TempDir::new(tag)?;
        let cluster = dir.0.join("cluster");
        std::fs::create_dir_all(&cluster)?;
        std::fs::write(cluster.join("cluster.yaml"), snapshot_yaml())?;
        let policies = cilium_policies()?;
        for (name, text) in &policies {
            std::fs::write(cluster.join(name), text)?;
        }
        let config = dir.0.join("config.yaml");
        std::fs::write(&config, AGENT_CONFIG)?;
        eprintln!(
            "lab: building the Cilium-style cluster ({} pods on {} nodes, {}) in network \
             namespaces {}{}-c-*",
            PODS.len(),
            NODES.len(),
            routing.name(),
            net::PREFIX,
            std::process::id()
        );
        for host in WORLD {
            eprintln!("lab:   outside the cluster: {} at {}", host.what, host.ip);
        }
        let topo = Topology::build(routing)?;
        let servers = Servers::start(&topo)?;
        let mut fixtures = Vec::new();
        for (i, ns) in topo.nodes.iter().enumerate() {
            fixtures.push(Fixture::start(fixture, i, ns, routing, &dir.0)?);
        }
        let mut daemons = Vec::new();
        for (i, node) in NODES.iter().enumerate() {
            let mut args: Vec<String> = [
                "run",
                "--cluster",
                &cluster.display().to_string(),
                "--config",
                &config.display().to_string(),
                "--interfaces",
                "lxc*",
                "--metrics-addr",
                &node.metrics().to_string(),
                "--answer-timeout",
                answer_timeout,
                "--node",
                node.name,
            ]
            .map(str::to_owned)
            .to_vec();
            if uplinks {
                args.extend(["--uplink".to_owned(), CILIUM_UPLINKS.to_owned()]);
            }
            daemons.push(Daemon::start_with(
                binary,
                topo.nodes[i].name(),
                &args,
                node.metrics(),
                &dir.0,
                &format!("auditor-{}", node.name),
            )?);
        }
        for d in &mut daemons {
            d.wait_ready(Duration::from_secs(30))?;
        }
        eprintln!("lab: both agents are attached and ready");
        Ok(Self {
            daemons,
            fixtures,
            servers,
            topo,
            dir,
            routing,
        })
    }

    /// Every node's fixture counters now.
    pub fn fixture_stats(&self) -> Result<Vec<FixtureStats>> {
        self.fixtures.iter().map(Fixture::read).collect()
    }

    /// Stops the agents (SIGTERM must end them cleanly) and removes everything; fails if a
    /// namespace is left.
    pub fn down(self) -> Result<()> {
        let Self {
            mut daemons,
            fixtures,
            servers,
            topo,
            dir,
            ..
        } = self;
        let mut stopped = Ok(());
        for d in &mut daemons {
            let r = d.stop();
            if stopped.is_ok() {
                stopped = r;
            }
        }
        drop(daemons);
        drop(fixtures);
        drop(servers);
        drop(topo);
        drop(dir);
        stopped?;
        let prefix = format!("{}{}-c-", net::PREFIX, std::process::id());
        let left: Vec<String> = net::cmd("ip", &["netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix))
            .map(str::to_owned)
            .collect();
        if !left.is_empty() {
            bail!("lab namespaces left after teardown: {left:?}");
        }
        Ok(())
    }
}

/// The seed's `CiliumNetworkPolicies`, from the test fixtures (one file per namespace).
fn cilium_policies() -> Result<Vec<(String, String)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../auditor/tests/fixtures/cilium-homelab/policies");
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    entries.sort();
    for path in entries {
        let name = format!(
            "policies-{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        out.push((name, text));
    }
    if out.is_empty() {
        bail!("no policies in {}", dir.display());
    }
    Ok(out)
}

/// The lab's redirect fixture: `$FLOW_AUDITOR_LAB_FIXTURE` when set, else a fresh build of
/// `lab-redirect` (with the pinned nightly and bpf-linker, like the agent's program).
pub fn fixture(root: &Path) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLOW_AUDITOR_LAB_FIXTURE") {
        return Ok(PathBuf::from(path));
    }
    crate::run(crate::cargo(root).args(["build", "--package", "lab-redirect"]))?;
    Ok(root.join("target/debug/lab-redirect"))
}

/// Sums `sum by (verdict, outcome, src_namespace, dst_namespace)` query results into a map,
/// dropping zero-valued series.
fn by_key(result: &[serde_json::Value]) -> Result<BTreeMap<[String; 4], u64>> {
    let mut out = BTreeMap::new();
    for series in result {
        let label = |k: &str| series["metric"][k].as_str().unwrap_or("").to_owned();
        let value: f64 = series["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no value in {series}"))?;
        if value != 0.0 {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "flow counts are small non-negative integers"
            )]
            out.insert(
                [
                    label("verdict"),
                    label("outcome"),
                    label("src_namespace"),
                    label("dst_namespace"),
                ],
                value.round() as u64,
            );
        }
    }
    Ok(out)
}

/// [`EXPECTED`] times `rounds`, keyed like [`by_key`].
pub fn expected(rounds: u64) -> BTreeMap<[String; 4], u64> {
    expected_of(EXPECTED, rounds)
}

fn expected_of(table: &[Expected], rounds: u64) -> BTreeMap<[String; 4], u64> {
    let mut want = BTreeMap::new();
    for (v, o, s, d, n, _) in table {
        *want
            .entry([v, o, s, d].map(|x| (*x).to_owned()))
            .or_default() += n * rounds;
    }
    want
}

/// Where two count maps differ, one line per key.
fn diff(want: &BTreeMap<[String; 4], u64>, got: &BTreeMap<[String; 4], u64>) -> String {
    let mut lines = Vec::new();
    for key in want.keys().chain(got.keys()) {
        let (w, g) = (
            want.get(key).copied().unwrap_or(0),
            got.get(key).copied().unwrap_or(0),
        );
        let line = format!("{}: want {w}, got {g}", key.join(" "));
        if w != g && !lines.contains(&line) {
            lines.push(line);
        }
    }
    lines.join("; ")
}

/// The query the checks read the counts with: every flow but those to a node, which are the
/// Prometheus scrapes of the agents themselves (host network traffic, seen at the uplinks).
pub const COUNTS_QUERY: &str = "sum by (verdict, outcome, src_namespace, dst_namespace) \
     (flow_auditor_flows_total{dst_workload!=\"node\"})";

/// Plays one round and checks every client saw what it should.
pub fn round(lab: &Lab) -> Result<()> {
    let mut wrong = Vec::new();
    for (conv, seen) in SCRIPT.iter().zip(play_all(&lab.topo)) {
        match seen {
            Ok(seen) if seen == conv.seen => {}
            Ok(seen) => wrong.push(format!(
                "{} -> {}:{} saw {seen:?}, want {:?}",
                conv.from, conv.to, conv.port, conv.seen
            )),
            Err(e) => wrong.push(format!("{e:#}")),
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        bail!("{}", wrong.join("; "))
    }
}

/// What the agents count of one round without the uplinks, on the pod interfaces alone (the
/// agent before uplinks existed): no answer that reaches its pod through the redirect is seen.
/// A TCP connection still comes out right, because its initiator's bare ACK after the SYN shows
/// a SYN-ACK reached it; but a UDP exchange looks unanswered (`allowed/unanswered` for the DNS
/// query across nodes) and so does a refusal, whose RST is never seen. Same-node flows, and the
/// visitor's (whose SYN-ACK, seen leaving the pod, shows it was answered), come out right.
pub const EXPECTED_WITHOUT_UPLINKS: &[Expected] = &[
    (
        "allowed",
        "established",
        "monitoring",
        "arr",
        1,
        "same node",
    ),
    ("unexpected", "established", "auth", "arr", 1, "same node"),
    (
        "allowed",
        "established",
        "arr",
        "kube-system",
        1,
        "same node",
    ),
    (
        "allowed",
        "unanswered",
        "arr",
        "kube-system",
        1,
        "across nodes, UDP: its reply is not seen",
    ),
    (
        "unexpected",
        "established",
        "arr",
        "kyverno",
        1,
        "same node",
    ),
    (
        "allowed",
        "established",
        "monitoring",
        "backups",
        1,
        "across nodes, by the initiator's ACK",
    ),
    (
        "allowed",
        "unanswered",
        "monitoring",
        "backups",
        1,
        "refused across nodes: the RST is not seen",
    ),
    (
        "allowed",
        "established",
        "openclaw",
        "arr",
        1,
        "across nodes, by the initiator's ACK",
    ),
    (
        "unexpected",
        "established",
        "arr",
        "backups",
        1,
        "across nodes, by the initiator's ACK",
    ),
    (
        "allowed",
        "established",
        "arr",
        "arr",
        1,
        "across nodes, by the initiator's ACK",
    ),
    (
        "unexpected",
        "established",
        "backups",
        "openclaw",
        1,
        "across nodes, by the initiator's ACK",
    ),
    (
        "allowed",
        "established",
        "monitoring",
        "",
        1,
        "the world, by the initiator's ACK",
    ),
    (
        "unexpected",
        "established",
        "openclaw",
        "",
        1,
        "the world, by the initiator's ACK",
    ),
    (
        "unexpected",
        "established",
        "",
        "arr",
        1,
        "SYN-ACK seen first",
    ),
];

/// The control: with the agents on the pod interfaces alone, the counts are wrong exactly as the
/// bypass makes them (so the lab's fixture is what the checks with uplinks are up against).
pub fn control_without_uplinks(
    binary: &Path,
    fixture: &Path,
    record: &mut dyn FnMut(String, Result<()>),
) -> Result<()> {
    let lab = Lab::up(
        binary,
        fixture,
        Routing::Native,
        false,
        "1s",
        "lab-cilium-control",
    )?;
    let mut prometheus = Prometheus::start_targets(
        lab.topo.router.name(),
        &NODES.map(|n| n.metrics()),
        PROMETHEUS_ADDR.parse()?,
        &lab.dir.0,
    )?;
    prometheus.wait_ready(Duration::from_secs(30))?;
    let name = "cilium (native routing, pod interfaces only)";
    record(
        format!("{name}: every client sees what it should"),
        round(&lab),
    );
    let want = expected_of(EXPECTED_WITHOUT_UPLINKS, 1);
    let mut got = BTreeMap::new();
    // Only the series of the script's own orientations: without the uplinks the responder's
    // agent also sees some answers first (a UDP reply, an RST) and counts a flow of its own the
    // wrong way round, whose orientation is the business of mid-stream inference, not of this
    // control.
    let settled = super::e2e::wait_for(Duration::from_secs(30), || {
        got = by_key(&prometheus.query(COUNTS_QUERY)?)?;
        got.retain(|k, _| {
            EXPECTED_WITHOUT_UPLINKS
                .iter()
                .any(|e| (e.2, e.3) == (k[2].as_str(), k[3].as_str()))
        });
        if got == want {
            Ok(())
        } else {
            bail!("not equal yet")
        }
    });
    record(
        format!(
            "{name}: the cross-node UDP reply and refusal come out unanswered, as without uplinks"
        ),
        settled.map_err(|_| anyhow::anyhow!("{}", diff(&want, &got))),
    );
    drop(prometheus);
    record(format!("{name}: the lab leaves nothing"), lab.down());
    Ok(())
}

/// The end-to-end checks of one routing variant, recorded in `record` (name, result).
pub fn checks(
    binary: &Path,
    fixture: &Path,
    routing: Routing,
    record: &mut dyn FnMut(String, Result<()>),
) -> Result<()> {
    const ROUNDS: u64 = 2;
    let lab = Lab::up(binary, fixture, routing, true, "1s", "lab-cilium-e2e")?;
    let name = routing.name();
    let mut prometheus = Prometheus::start_targets(
        lab.topo.router.name(),
        &NODES.map(|n| n.metrics()),
        PROMETHEUS_ADDR.parse()?,
        &lab.dir.0,
    )?;
    prometheus.wait_ready(Duration::from_secs(30))?;
    record(
        format!("cilium ({name}): Prometheus scrapes both agents"),
        super::e2e::wait_for(Duration::from_secs(15), || {
            let up = prometheus.query("up{job=\"flow-auditor\"} == 1")?;
            if up.len() == NODES.len() {
                Ok(())
            } else {
                bail!("{} of {} targets up", up.len(), NODES.len())
            }
        }),
    );
    let before = lab.fixture_stats()?;
    for r in 0..ROUNDS {
        if r > 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
        record(
            format!(
                "cilium ({name}): round {}: every client sees what it should",
                r + 1
            ),
            round(&lab),
        );
    }
    let want = expected(ROUNDS);
    let mut got = BTreeMap::new();
    let settled = super::e2e::wait_for(Duration::from_secs(30), || {
        got = by_key(&prometheus.query(COUNTS_QUERY)?)?;
        if got == want {
            Ok(())
        } else {
            bail!("not equal yet")
        }
    });
    record(
        format!(
            "cilium ({name}): exact flows by verdict, outcome and namespace pair, through PromQL"
        ),
        settled.map_err(|_| anyhow::anyhow!("{}", diff(&want, &got))),
    );
    record(
        format!(
            "cilium ({name}): the scrapes of both agents, host network traffic, are seen at the uplinks"
        ),
        scrapes_seen(&prometheus),
    );
    // The fixture really took the packets past the lxc* egress hook: some were redirected,
    // none from another node or the world crossed an lxc* egress, and the probe itself works
    // (same-node packets, which the kernel routes, did cross it).
    let after = lab.fixture_stats()?;
    record(
        format!(
            "cilium ({name}): replies and requests from other nodes and the world bypass the lxc* egress hook"
        ),
        bypass_proof(&before, &after),
    );
    if routing == Routing::Vxlan {
        record(
            format!("cilium ({name}): VXLAN's outer packets are not flows"),
            encapsulation_counted(&prometheus),
        );
    }
    drop(prometheus);
    record(
        format!("cilium ({name}): SIGTERM stops both agents cleanly and the lab leaves nothing"),
        lab.down(),
    );
    Ok(())
}

/// Every conversation that reaches a pod from another node or the world (or whose reply does)
/// delivers at least two packets through the redirect (the SYN or SYN-ACK, and one more).
fn bypass_proof(before: &[FixtureStats], after: &[FixtureStats]) -> Result<()> {
    let crossing = SCRIPT
        .iter()
        .filter(|c| {
            let node = |key: &str| pod(key).map(|p| p.node);
            node(c.from) != node(c.to)
        })
        .count();
    let min = 2 * u64::try_from(crossing)?;
    let sum = |f: fn(&FixtureStats) -> u64, v: &[FixtureStats]| v.iter().map(f).sum::<u64>();
    let redirected = sum(|s| s.redirected, after) - sum(|s| s.redirected, before);
    let remote = sum(|s| s.probe_remote, after) - sum(|s| s.probe_remote, before);
    let local = sum(|s| s.probe_local, after) - sum(|s| s.probe_local, before);
    let failed = sum(|s| s.redirect_failed, after);
    if redirected < min || remote != 0 || local == 0 || failed != 0 {
        bail!(
            "redirected {redirected} (want at least {min}), seen at lxc* egress from other nodes \
             or the world {remote} (want 0), from this node {local} (want > 0), redirects \
             refused {failed} (want 0)"
        );
    }
    Ok(())
}

/// Prometheus, in the router namespace, scrapes each agent on its node's address: each node's
/// agent sees that connection at its uplink and counts it (the responder is its node), allowed
/// (no policy selects a node) and established.
fn scrapes_seen(prometheus: &Prometheus) -> Result<()> {
    let q = "sum by (verdict, outcome, dst_port) \
             (flow_auditor_flows_total{src_workload=\"world\", dst_workload=\"node\"})";
    super::e2e::wait_for(Duration::from_secs(10), || {
        let r = prometheus.query(q)?;
        let ok = r.len() == 1
            && r[0]["metric"]["verdict"] == "allowed"
            && r[0]["metric"]["outcome"] == "established"
            && r[0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|n| n >= 2.0);
        if ok {
            Ok(())
        } else {
            bail!("{q}: want one series, allowed/established, at least 2 flows: {r:?}")
        }
    })
}

/// The VXLAN packets between the nodes were counted as encapsulation by both agents (at the
/// `eth0` uplinks) and none of them became a flow: every UDP flow the agents counted has a pod
/// on one side.
fn encapsulation_counted(prometheus: &Prometheus) -> Result<()> {
    let counted = prometheus.query("flow_auditor_encapsulated_packets_total > 0")?;
    if counted.len() != NODES.len() {
        bail!(
            "encapsulated packets counted by {} of {} agents: {counted:?}",
            counted.len(),
            NODES.len()
        );
    }
    let q =
        "sum(flow_auditor_flows_total{protocol=\"UDP\", dst_namespace=\"\", src_namespace=\"\"})";
    let r = prometheus.query(q)?;
    if r.iter().any(|s| s["value"][1].as_str() != Some("0")) {
        bail!("{q}: {r:?}");
    }
    Ok(())
}

/// `cargo xtask lab-test --cni cilium`, and the `cilium lab e2e` step of `cargo xtask test`:
/// both routing variants end to end with the release `binary`; prints `cilium lab e2e: N
/// passed, M failed` and fails when anything did.
pub fn run(root: &Path, binary: &Path) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the Cilium-style lab creates network namespaces and loads eBPF programs: run it as root"
        );
    }
    super::catch_signals();
    let started = Instant::now();
    let fixture = fixture(root)?;
    let (mut passed, mut failed) = (0_usize, 0_usize);
    let mut record = |name: String, result: Result<()>| match result {
        Ok(()) => {
            passed += 1;
            eprintln!("cilium lab e2e: ok: {name}");
        }
        Err(e) => {
            failed += 1;
            eprintln!("cilium lab e2e: FAILED: {name}: {e:#}");
        }
    };
    for routing in Routing::ALL {
        if super::interrupted() {
            break;
        }
        if let Err(e) = checks(binary, &fixture, routing, &mut record) {
            record(
                format!("cilium ({}): the lab could not run", routing.name()),
                Err(e),
            );
        }
    }
    if !super::interrupted()
        && let Err(e) = control_without_uplinks(binary, &fixture, &mut record)
    {
        record("cilium control: the lab could not run".to_owned(), Err(e));
    }
    eprintln!("cilium lab e2e: took {}s", started.elapsed().as_secs());
    println!("cilium lab e2e: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("cilium lab e2e: {failed} check(s) failed");
    }
    Ok(())
}

/// `cargo xtask demo --cni cilium`: the lab with `routing`, traffic every few seconds and a
/// live summary of both agents' counts, until Ctrl-C or `duration`.
pub fn demo(root: &Path, binary: &Path, duration: Option<u64>, routing: Routing) -> Result<()> {
    let fixture = fixture(root)?;
    let lab = Lab::up(binary, &fixture, routing, true, "5s", "lab-cilium")?;
    let result = demo_loop(&lab, duration);
    let down = lab.down();
    result.and(down)
}

fn demo_loop(lab: &Lab, duration: Option<u64>) -> Result<()> {
    let started = Instant::now();
    let deadline = duration.map(|s| started + Duration::from_secs(s));
    let mut rounds = 0_u64;
    while !super::interrupted() && deadline.is_none_or(|d| Instant::now() < d) {
        rounds += 1;
        if let Err(e) = round(lab) {
            eprintln!("lab: round {rounds}: {e:#}");
        }
        let mut pause = 0;
        while pause < 30 && !super::interrupted() {
            std::thread::sleep(Duration::from_millis(100));
            pause += 1;
        }
        print!("{}", summary(lab, rounds, started.elapsed())?);
    }
    Ok(())
}

fn summary(lab: &Lab, rounds: u64, elapsed: Duration) -> Result<String> {
    let mut totals: BTreeMap<(String, String, String, String), f64> = BTreeMap::new();
    for d in &lab.daemons {
        for (labels, value) in super::daemon::samples(&d.scrape()?, "flow_auditor_flows_total") {
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            *totals
                .entry((
                    get("verdict"),
                    get("outcome"),
                    get("src_namespace"),
                    get("dst_namespace"),
                ))
                .or_default() += value;
        }
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nflow-auditor lab: Cilium homelab in miniature ({}), round {rounds}, {}s; Ctrl-C stops \
         and removes everything",
        lab.routing.name(),
        elapsed.as_secs()
    );
    let _ = writeln!(
        s,
        "  {:<11} {:<11} {:<36} {:>6}",
        "VERDICT", "OUTCOME", "SOURCE -> DESTINATION NAMESPACE", "FLOWS"
    );
    let name = |ns: &str| {
        if ns.is_empty() {
            "(world)".to_owned()
        } else {
            ns.to_owned()
        }
    };
    for ((verdict, outcome, src, dst), n) in totals.iter().filter(|(_, n)| **n > 0.0) {
        let _ = writeln!(
            s,
            "  {verdict:<11} {outcome:<11} {:<36} {n:>6}",
            format!("{} -> {}", name(src), name(dst))
        );
    }
    for (node, stats) in NODES.iter().zip(lab.fixture_stats()?) {
        let _ = writeln!(
            s,
            "  {}: {} packets handed to pods by bpf_redirect_peer, {} from other nodes or the \
             world seen at lxc* egress",
            node.name, stats.redirected, stats.probe_remote
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_addresses_are_unique() {
        let mut ips: Vec<Ipv4Addr> = PODS.iter().map(Pod::ip).collect();
        ips.extend(WORLD.iter().map(|w| w.ip));
        let n = ips.len();
        ips.sort_unstable();
        ips.dedup();
        assert_eq!(ips.len(), n, "addresses must be unique");
        for pod in PODS {
            assert!(pod.lxc().len() <= 15, "{} is too long", pod.lxc());
            assert!(NAMESPACES.contains(&pod.namespace), "{}", pod.namespace);
        }
        for ns in [
            "arr",
            "auth",
            "monitoring",
            "kyverno",
            "backups",
            "openclaw",
            "kube-system",
        ] {
            assert!(
                PODS.iter().any(|p| p.namespace == ns),
                "seed 000's namespace {ns} has a pod"
            );
        }
    }

    #[test]
    fn the_script_covers_every_kind_of_flow_and_the_expectations_add_up() {
        let node = |key: &str| pod(key).map(|p| p.node);
        let same = SCRIPT
            .iter()
            .filter(|c| node(c.from).is_some() && node(c.from) == node(c.to))
            .count();
        let cross = SCRIPT
            .iter()
            .filter(|c| {
                node(c.from).is_some() && node(c.to).is_some() && node(c.from) != node(c.to)
            })
            .count();
        let world = SCRIPT.len() - same - cross;
        assert!(
            same >= 2 && cross >= 4 && world >= 2,
            "{same} {cross} {world}"
        );
        let expected: u64 = EXPECTED.iter().map(|e| e.4).sum();
        assert_eq!(
            expected,
            SCRIPT.len() as u64,
            "one expected flow per conversation"
        );
        for conv in SCRIPT {
            assert!(
                address(conv.to).is_some() && address(conv.from).is_some(),
                "{conv:?}"
            );
        }
    }

    #[test]
    fn fixture_counters_parse_strictly() {
        let s = parse_stats("redirected 5\nprobe_remote 0\nprobe_local 3\nredirect_failed 0\n")
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!((s.redirected, s.probe_local), (5, 3));
        assert!(parse_stats("redirected 5\n").is_err());
        assert!(
            parse_stats("redirected x\nprobe_remote 0\nprobe_local 3\nredirect_failed 0\n")
                .is_err()
        );
    }

    #[test]
    fn the_bypass_proof_fails_on_each_sign_of_a_fixture_that_did_not_bypass() {
        let ok = FixtureStats {
            redirected: 100,
            probe_remote: 0,
            probe_local: 10,
            redirect_failed: 0,
        };
        let zero = [FixtureStats::default(); 2];
        assert!(bypass_proof(&zero, &[ok, ok]).is_ok());
        for bad in [
            FixtureStats {
                redirected: 0,
                ..ok
            },
            FixtureStats {
                probe_remote: 1,
                ..ok
            },
            FixtureStats {
                probe_local: 0,
                ..ok
            },
            FixtureStats {
                redirect_failed: 1,
                ..ok
            },
        ] {
            assert!(
                bypass_proof(
                    &zero,
                    &[
                        bad,
                        FixtureStats {
                            redirected: 0,
                            ..bad
                        }
                    ]
                )
                .is_err(),
                "{bad:?}"
            );
        }
    }
}
