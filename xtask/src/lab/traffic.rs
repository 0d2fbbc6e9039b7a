//! The lab's traffic: a server on every port a pod or external host declares, and the cluster's
//! conversations played from the pods' namespaces, each one a new connection (or, for UDP, a new
//! socket) so each is exactly one flow for the auditor.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::cluster::{self, Proto};
use super::net::{Topology, in_netns, served};

/// How long a client waits for a connection or an answer before calling it silent.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often an idle server looks at the stop flag.
pub const SERVER_POLL: Duration = Duration::from_millis(20);

/// One conversation of the script: `from` (a pod key) talks to `to` (a pod or external key).
#[derive(Clone, Copy, Debug)]
pub struct Conversation {
    pub from: &'static str,
    pub to: &'static str,
    pub port: u16,
    pub proto: Proto,
}

const fn tcp(from: &'static str, to: &'static str, port: u16) -> Conversation {
    Conversation {
        from,
        to,
        port,
        proto: Proto::Tcp,
    }
}

const fn udp(from: &'static str, to: &'static str, port: u16) -> Conversation {
    Conversation {
        from,
        to,
        port,
        proto: Proto::Udp,
    }
}

/// The traffic script: the homelab's real conversations, then some its policies forbid. The
/// verdict each one should get is worked out by hand in `e2e.rs`, not derived from this list.
pub const SCRIPT: &[Conversation] = &[
    // Prometheus (default) scrapes every metrics port.
    tcp("prometheus", "grafana", 3000),
    tcp("prometheus", "alertmanager", 9093),
    tcp("prometheus", "coredns", 9153),
    tcp("prometheus", "velero", 8085),
    tcp("prometheus", "localstack", 4566),
    tcp("prometheus", "loki", 3100),
    tcp("prometheus", "promtail", 3101),
    tcp("prometheus", "unipoller", 9130),
    tcp("prometheus", "trivy", 8080),
    tcp("prometheus", "ingress-nginx", 10254),
    // Grafana reads Loki and (any pod of `default` may) LocalStack.
    tcp("grafana", "loki", 3100),
    tcp("grafana", "localstack", 4566),
    // DNS to CoreDNS over UDP and TCP from every policed namespace.
    udp("velero", "coredns", 53),
    tcp("velero", "coredns", 53),
    udp("localstack", "coredns", 53),
    tcp("localstack", "coredns", 53),
    udp("loki", "coredns", 53),
    tcp("loki", "coredns", 53),
    udp("promtail", "coredns", 53),
    tcp("promtail", "coredns", 53),
    udp("unipoller", "coredns", 53),
    tcp("unipoller", "coredns", 53),
    udp("trivy", "coredns", 53),
    tcp("trivy", "coredns", 53),
    // Backups: Velero to LocalStack's S3 and to Backblaze B2.
    tcp("velero", "localstack", 4566),
    tcp("velero", "localstack", 4566),
    tcp("velero", "backblaze", 443),
    // Logs: Promtail pushes to Loki, Loki alerts Alertmanager.
    tcp("promtail", "loki", 3100),
    tcp("promtail", "loki", 3100),
    tcp("loki", "alertmanager", 9093),
    // The poller reads its controller, Trivy pulls from the registry.
    tcp("unipoller", "unifi", 443),
    tcp("unipoller", "unifi", 8443),
    tcp("trivy", "registry", 443),
    // The ingress controller serves LocalStack's UI.
    tcp("ingress-nginx", "localstack", 4566),
    // Forbidden, and the CNI enforces it (velero and localstack are tightened).
    tcp("debug", "velero", 8085),
    tcp("debug", "localstack", 4566),
    tcp("localstack", "backblaze", 443),
    tcp("velero", "loki", 3100),
    // Forbidden, but loki, unipoller and trivy-system are not tightened yet.
    tcp("promtail", "loki", 9095),
    tcp("unipoller", "website", 80),
    tcp("debug", "loki", 3100),
    tcp("trivy", "website", 80),
];

/// What the client saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Answered,
    Refused,
    Silent,
}

/// The servers of every pod and external host; stopped and joined on drop.
#[derive(Debug)]
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(topo: &Topology) -> Result<Self> {
        let mut servers = Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        let keys = cluster::PODS
            .iter()
            .map(|p| p.key)
            .chain(cluster::EXTERNALS.iter().map(|e| e.key));
        for key in keys {
            let ns = topo
                .ns_of(key)
                .with_context(|| format!("no namespace for {key}"))?;
            for (ip, port, proto) in served(key) {
                let addr = SocketAddr::from((ip, port));
                let stop = Arc::clone(&servers.stop);
                let thread = match proto {
                    Proto::Tcp => {
                        let listener = in_netns(ns, || TcpListener::bind(addr))?
                            .with_context(|| format!("{key}: bind tcp {addr}"))?;
                        listener.set_nonblocking(true)?;
                        std::thread::spawn(move || serve_tcp(&listener, &stop))
                    }
                    Proto::Udp => {
                        let socket = in_netns(ns, || UdpSocket::bind(addr))?
                            .with_context(|| format!("{key}: bind udp {addr}"))?;
                        socket.set_read_timeout(Some(SERVER_POLL))?;
                        std::thread::spawn(move || serve_udp(&socket, &stop))
                    }
                };
                servers.threads.push(thread);
            }
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

pub fn serve_tcp(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                // Best effort: the handshake already made the flow `established`.
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
                let mut buf = [0_u8; 512];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(SERVER_POLL),
            Err(_) => std::thread::sleep(SERVER_POLL),
        }
    }
}

pub fn serve_udp(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0_u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    }
}

/// The address a conversation goes to.
pub fn target(conv: &Conversation) -> Option<Ipv4Addr> {
    cluster::pod(conv.to)
        .map(cluster::Pod::ip)
        .or_else(|| cluster::external(conv.to).map(|e| e.ip))
}

/// Plays one conversation from its source pod's namespace.
pub fn play(topo: &Topology, conv: &Conversation) -> Result<Seen> {
    let ns = topo
        .ns_of(conv.from)
        .with_context(|| format!("no namespace for {}", conv.from))?;
    let ip = target(conv).with_context(|| format!("no address for {}", conv.to))?;
    let addr = SocketAddr::from((ip, conv.port));
    let seen = match conv.proto {
        Proto::Tcp => in_netns(ns, || tcp_client(addr))?,
        Proto::Udp => in_netns(ns, || udp_client(addr))?,
    };
    seen.with_context(|| format!("{} -> {addr}/{}", conv.from, conv.proto.as_str()))
}

/// Plays every conversation at once (each on its own thread) and returns what each saw.
pub fn play_all(topo: &Topology, script: &[Conversation]) -> Vec<Result<Seen>> {
    in_parallel(script, |conv| play(topo, conv))
}

/// Runs `play` on every conversation at once, each on its own thread; the results in order.
pub fn in_parallel<C: Sync, T: Send>(
    script: &[C],
    play: impl Fn(&C) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    let play = &play;
    std::thread::scope(|s| {
        let handles: Vec<_> = script
            .iter()
            .map(|conv| s.spawn(move || play(conv)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("traffic thread panicked")))
            })
            .collect()
    })
}

pub fn tcp_client(addr: SocketAddr) -> std::io::Result<Seen> {
    let mut stream = match TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return refusal(&e),
    };
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut buf = [0_u8; 512];
    // The answer's content does not matter, only that the conversation completes.
    let _ = stream.read(&mut buf);
    Ok(Seen::Answered)
}

pub fn udp_client(addr: SocketAddr) -> std::io::Result<Seen> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    // A minimal DNS query for `kubernetes.default.svc.cluster.local.`-shaped traffic; the lab's
    // CoreDNS stand-in echoes it.
    socket.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03lab\x00\x00\x01\x00\x01")?;
    let mut buf = [0_u8; 512];
    match socket.recv(&mut buf) {
        Ok(_) => Ok(Seen::Answered),
        Err(e) => refusal(&e),
    }
}

fn refusal(e: &std::io::Error) -> std::io::Result<Seen> {
    match e.kind() {
        ErrorKind::ConnectionRefused
        | ErrorKind::ConnectionReset
        | ErrorKind::HostUnreachable
        | ErrorKind::NetworkUnreachable => Ok(Seen::Refused),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Ok(Seen::Silent),
        _ => Err(std::io::Error::new(e.kind(), e.to_string())),
    }
}
