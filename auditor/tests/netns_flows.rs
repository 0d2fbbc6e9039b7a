//! Flow records from real traffic: two pod namespaces wired to a node namespace the way Calico
//! does it (a /32 per pod routed to its `cali*` veth, a link-local gateway the pod reaches through
//! static neighbours), the loader attached inside the node namespace, and real TCP and UDP
//! sockets in the pods. Asserts each flow's record, outcome included, and that a flow crossing two
//! attached interfaces is reported once.

#[path = "common/netns.rs"]
mod netns;

use std::{
    collections::HashMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use auditor::{
    datapath::{
        attach::AttachConfig,
        load::{Datapath, DatapathConfig},
        manager::{DatapathHealth, DatapathManager},
    },
    flows::{FlowRecord, FlowStream, FlowsConfig, Outcome},
    vocab::Protocol,
};
use auditor_ebpf::flow::Hook;
use netns::{Netns, require_root};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// The addresses of one IP family (documentation ranges only).
struct Family {
    name: &'static str,
    pod_a: &'static str,
    pod_b: &'static str,
    /// Routed to a blackhole on the node: nobody answers, and nobody sends an ICMP error either.
    nobody: &'static str,
    nobody_net: &'static str,
}

const V4: Family = Family {
    name: "IPv4",
    pod_a: "192.0.2.10",
    pod_b: "192.0.2.20",
    nobody: "203.0.113.99",
    nobody_net: "203.0.113.0/24",
};

const V6: Family = Family {
    name: "IPv6",
    pod_a: "2001:db8::10",
    pod_b: "2001:db8::20",
    nobody: "2001:db8:ffff::99",
    nobody_net: "2001:db8:ffff::/48",
};

/// A node namespace with two pods, each behind a `cali*` veth.
struct Cluster {
    family: &'static Family,
    node: Netns,
    pod_a: Netns,
    pod_b: Netns,
}

impl Cluster {
    fn new(family: &'static Family) -> Self {
        let node = Netns::new("node");
        let pod_a = Netns::new("poda");
        let pod_b = Netns::new("podb");
        node.sysctl("net.ipv4.ip_forward", "1");
        node.sysctl("net.ipv6.conf.all.forwarding", "1");
        netns::calico_pod(&node, &pod_a, "caliA", family.pod_a, 1);
        netns::calico_pod(&node, &pod_b, "caliB", family.pod_b, 2);
        node.ip(&["route", "add", "blackhole", family.nobody_net]);
        Self {
            family,
            node,
            pod_a,
            pod_b,
        }
    }
}

enum Cmd {
    Health(mpsc::Sender<DatapathHealth>),
}

/// The flow stream running on a thread inside the node namespace.
struct Stream {
    records: mpsc::Receiver<FlowRecord>,
    commands: tokio::sync::mpsc::UnboundedSender<Cmd>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(node: &Netns) -> Self {
        let (records_tx, records) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (commands, mut commands_rx) = tokio::sync::mpsc::unbounded_channel::<Cmd>();
        let thread = node.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
            runtime.block_on(async move {
                let datapath = Datapath::load(&DatapathConfig::default())
                    .unwrap_or_else(|e| panic!("loading the datapath: {e:?}"));
                let manager = DatapathManager::start(datapath, AttachConfig::default())
                    .unwrap_or_else(|e| panic!("starting the datapath: {e:?}"));
                let config = FlowsConfig {
                    answer_timeout: ANSWER_TIMEOUT,
                    walk_interval: Duration::from_millis(500),
                    ..FlowsConfig::default()
                };
                let mut stream = FlowStream::new(manager, config);
                ready_tx
                    .send(stream.manager().attached())
                    .unwrap_or_else(|e| panic!("test gone: {e}"));
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        Some(Cmd::Health(reply)) = commands_rx.recv() => {
                            let _ = reply.send(stream.health().unwrap_or_else(|e| panic!("health: {e}")));
                        }
                        record = stream.next() => {
                            let record = record.unwrap_or_else(|e| panic!("flow stream failed: {e}"));
                            if records_tx.send(record).is_err() {
                                break;
                            }
                        }
                    }
                }
                stream.shutdown().unwrap_or_else(|e| panic!("shutdown: {e}"));
            });
        });
        let attached = ready_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("the flow stream did not start: {e}"));
        let mut names: Vec<_> = attached.iter().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["caliA", "caliB"], "attached to {attached:?}");
        Self {
            records,
            commands,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn health(&self) -> DatapathHealth {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Cmd::Health(tx))
            .unwrap_or_else(|_| panic!("stream thread gone"));
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no health answer: {e}"))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
            && !std::thread::panicking()
        {
            panic!("the flow stream thread panicked");
        }
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), port)
}

/// The traffic, each flow from pod A; returns what each flow's record must say.
fn generate_traffic(cluster: &Cluster) -> Vec<(Protocol, SocketAddr, SocketAddr, Outcome)> {
    let Cluster {
        family,
        pod_a,
        pod_b,
        ..
    } = cluster;
    let Family {
        pod_a: a_ip,
        pod_b: b_ip,
        nobody,
        ..
    } = **family;
    let mut expected = Vec::new();

    // TCP, answered and closed cleanly.
    let listener =
        pod_b.run(|| TcpListener::bind(addr(b_ip, 8080)).unwrap_or_else(|e| panic!("bind: {e}")));
    let mut client = pod_a.run(|| {
        TcpStream::connect_timeout(&addr(b_ip, 8080), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("TCP connect A -> B:8080: {e}"))
    });
    let (mut server, _) = listener.accept().unwrap_or_else(|e| panic!("accept: {e}"));
    client
        .write_all(b"ping")
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut buf = [0u8; 4];
    server
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("server read: {e}"));
    server
        .write_all(b"pong")
        .unwrap_or_else(|e| panic!("server write: {e}"));
    client
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("client read: {e}"));
    assert_eq!(&buf, b"pong");
    let tcp_client = client.local_addr().unwrap_or_else(|e| panic!("{e}"));
    drop((client, server, listener));
    expected.push((
        Protocol::Tcp,
        tcp_client,
        addr(b_ip, 8080),
        Outcome::Established,
    ));

    // UDP request and reply.
    let udp_server =
        pod_b.run(|| UdpSocket::bind(addr(b_ip, 5353)).unwrap_or_else(|e| panic!("bind: {e}")));
    let udp_client =
        pod_a.run(|| UdpSocket::bind(addr(a_ip, 0)).unwrap_or_else(|e| panic!("bind: {e}")));
    udp_client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    udp_client
        .send_to(b"query", addr(b_ip, 5353))
        .unwrap_or_else(|e| panic!("send: {e}"));
    let mut buf = [0u8; 16];
    udp_server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    let (n, from) = udp_server
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("server recv: {e}"));
    udp_server
        .send_to(&buf[..n], from)
        .unwrap_or_else(|e| panic!("reply: {e}"));
    udp_client
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("client recv: {e}"));
    let udp_local = udp_client.local_addr().unwrap_or_else(|e| panic!("{e}"));
    expected.push((
        Protocol::Udp,
        udp_local,
        addr(b_ip, 5353),
        Outcome::Established,
    ));

    // TCP to a closed port: RST.
    pod_a.run(
        || match TcpStream::connect_timeout(&addr(b_ip, 9), Duration::from_secs(5)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            other => panic!("TCP to a closed port should be refused, got {other:?}"),
        },
    );
    // The kernel picked the client port and a failed connect does not tell it: match any port.
    expected.push((
        Protocol::Tcp,
        addr(a_ip, 0),
        addr(b_ip, 9),
        Outcome::Refused,
    ));

    // UDP to a closed port: ICMP port unreachable. A connected socket reports it as an error.
    let udp_closed =
        pod_a.run(|| UdpSocket::bind(addr(a_ip, 0)).unwrap_or_else(|e| panic!("bind: {e}")));
    udp_closed
        .connect(addr(b_ip, 9))
        .unwrap_or_else(|e| panic!("connect: {e}"));
    udp_closed
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    udp_closed
        .send(b"anyone?")
        .unwrap_or_else(|e| panic!("send: {e}"));
    match udp_closed.recv(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("UDP to a closed port should see ICMP port unreachable, got {other:?}"),
    }
    let local = udp_closed.local_addr().unwrap_or_else(|e| panic!("{e}"));
    expected.push((Protocol::Udp, local, addr(b_ip, 9), Outcome::Refused));

    // Nobody answers: TCP and UDP.
    pod_a.run(
        || match TcpStream::connect_timeout(&addr(nobody, 80), Duration::from_millis(300)) {
            Err(e) if e.kind() == ErrorKind::TimedOut => {}
            other => panic!("TCP to {nobody} should time out, got {other:?}"),
        },
    );
    expected.push((
        Protocol::Tcp,
        addr(a_ip, 0),
        addr(nobody, 80),
        Outcome::Unanswered,
    ));
    let silent =
        pod_a.run(|| UdpSocket::bind(addr(a_ip, 0)).unwrap_or_else(|e| panic!("bind: {e}")));
    silent
        .send_to(b"hello?", addr(nobody, 53))
        .unwrap_or_else(|e| panic!("send: {e}"));
    let local = silent.local_addr().unwrap_or_else(|e| panic!("{e}"));
    expected.push((Protocol::Udp, local, addr(nobody, 53), Outcome::Unanswered));
    expected
}

/// One line per record, for failure messages.
fn brief(r: &FlowRecord) -> String {
    format!(
        "{} {} -> {} {} on {}/{:?}, packets {}/{} bytes {}/{}{}",
        r.protocol,
        r.initiator,
        r.responder,
        r.outcome,
        r.interface,
        r.hook,
        r.packets.to_responder,
        r.packets.to_initiator,
        r.bytes.to_responder,
        r.bytes.to_initiator,
        if r.mid_stream { " mid-stream" } else { "" }
    )
}

/// Whether `record` is the flow `expected` describes (client port 0: any).
fn is_flow(
    record: &FlowRecord,
    (protocol, initiator, responder, _): &(Protocol, SocketAddr, SocketAddr, Outcome),
) -> bool {
    record.protocol == *protocol
        && record.initiator.ip() == initiator.ip()
        && (initiator.port() == 0 || record.initiator.port() == initiator.port())
        && record.responder == *responder
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn ipv4_pod_traffic_yields_one_record_per_flow_with_its_outcome() {
    pod_traffic_yields_one_record_per_flow_with_its_outcome(&V4);
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn ipv6_pod_traffic_yields_one_record_per_flow_with_its_outcome() {
    pod_traffic_yields_one_record_per_flow_with_its_outcome(&V6);
}

fn pod_traffic_yields_one_record_per_flow_with_its_outcome(family: &'static Family) {
    require_root();
    let cluster = Cluster::new(family);
    let stream = Stream::start(&cluster.node);
    let started = Instant::now();
    let expected = generate_traffic(&cluster);

    // Everything is decided by the answer timeout plus a walk; then wait as long again to catch
    // any duplicate.
    let mut records = Vec::new();
    let deadline = Instant::now() + ANSWER_TIMEOUT * 10;
    while Instant::now() < deadline {
        let all_seen = expected
            .iter()
            .all(|e| records.iter().any(|r| is_flow(r, e)));
        if all_seen {
            break;
        }
        if let Ok(r) = stream.records.recv_timeout(Duration::from_millis(100)) {
            records.push(r);
        }
    }
    let settle = Instant::now() + ANSWER_TIMEOUT * 2;
    while Instant::now() < settle {
        if let Ok(r) = stream.records.recv_timeout(Duration::from_millis(100)) {
            records.push(r);
        }
    }
    let elapsed = started.elapsed();

    let all: Vec<String> = records.iter().map(brief).collect();
    for e in &expected {
        let matching: Vec<&FlowRecord> = records.iter().filter(|r| is_flow(r, e)).collect();
        assert_eq!(
            matching.len(),
            1,
            "flow {e:?}: expected exactly one record; all records: {all:#?}"
        );
        let r = matching[0];
        let b = brief(r);
        assert_eq!(r.outcome, e.3, "outcome of {e:?}: {b}");
        // Every flow starts in pod A, whose packets reach the node through caliA's ingress hook.
        assert_eq!(
            (r.interface.as_str(), r.hook),
            ("caliA", Hook::Ingress),
            "{b}"
        );
        assert!(!r.mid_stream, "{b} was seen from its first packet");
        assert!(
            r.packets.to_responder >= 1,
            "{b}: no packet from the initiator counted"
        );
        match r.outcome {
            Outcome::Established => {
                assert!(
                    r.packets.to_initiator >= 1,
                    "{b}: the answer was not counted"
                );
            }
            Outcome::Unanswered => {
                assert_eq!(
                    r.packets.to_initiator, 0,
                    "{b}: an unanswered flow got packets back"
                );
            }
            // A RST is a packet of the flow; an ICMP error is about it, and counted apart.
            Outcome::Refused => {}
        }
        assert!(r.first_seen <= r.last_seen, "{b}");
    }
    // No flow reported twice, whatever it is.
    let mut seen: HashMap<(Protocol, SocketAddr, SocketAddr), usize> = HashMap::new();
    for r in &records {
        *seen
            .entry((r.protocol, r.initiator, r.responder))
            .or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "flows reported more than once: {dups:?}");

    let health = stream.health();
    assert_eq!(health.attached.len(), 2, "{health:?}");
    assert_eq!(health.events_lost, 0, "{health:?}");
    assert!(
        health.flow_table_entries >= 1,
        "the walk found no entry: {health:?}"
    );
    println!(
        "netns_flows {}: {} records ({} expected flows) in {elapsed:?}; health: table {}/{}, events lost {}, parse errors {}",
        family.name,
        records.len(),
        expected.len(),
        health.flow_table_entries,
        health.flow_table_capacity,
        health.events_lost,
        health.parse_errors
    );
    drop(stream);
}
