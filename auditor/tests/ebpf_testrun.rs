//! The TC program against the real kernel through `BPF_PROG_TEST_RUN`: crafted packets, and the
//! exact flow-table entry, events and counters each must produce. Every run must return
//! `TC_ACT_UNSPEC` (-1): the program observes and never decides.
//!
//! How `TestRun` builds the skb matters for crafting: it always treats the data as an Ethernet
//! frame (`eth_type_trans` on loopback, then pushes the 14 bytes back), so `skb->protocol` comes
//! from bytes 12-13 and `skb->ifindex` is loopback's (1).
//!
//! The program's own log records (kernel logging, off by default) are read here too, through the
//! datapath's reader and its bridge into `tracing`.

#[path = "common/bpffs.rs"]
mod bpffs;
#[path = "common/packets.rs"]
mod packets;
#[path = "common/testrun.rs"]
mod testrun;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use auditor::datapath::load::{CounterTotals, Datapath, DatapathConfig, LoadError, PINNED};
use auditor_ebpf::{
    PROGRAM_EGRESS, PROGRAM_INGRESS, REPORTED_MAP,
    flow::{Counter, EventKind, FlowEvent, FlowKey, FlowState, FlowStatus, Hook, Side},
};
use aya::maps::{MapError, MapInfo, MapType};
use packets::*;
use testrun::{Harness, coarse_now_ns};

const LOOPBACK_IFINDEX: u32 = 1;

const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const SERVER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);

/// The key of a flow from `src` to `dst`, and which side the source is.
fn key(proto: u8, src: (IpAddr, u16), dst: (IpAddr, u16)) -> (FlowKey, Side) {
    FlowKey::from_addrs(proto, src, dst)
}

fn len(frame: &[u8]) -> u64 {
    u64::try_from(frame.len()).unwrap_or(u64::MAX)
}

/// [`FlowState::owners`] of a flow whose initiator's packets are counted at `initiator` and
/// whose responder's at `responder`.
fn owners(initiator: Option<Hook>, responder: Option<Hook>) -> u8 {
    initiator.map_or(0, Hook::owner) | responder.map_or(0, Hook::owner) << 4
}

/// Checks the timestamps of `got` lie in `[t0, t1]` and in order, then returns the expected
/// state with those timestamps so the whole entry can be compared exactly.
fn with_times(expected: FlowState, got: &FlowState, t0: u64, t1: u64) -> FlowState {
    assert!(
        t0 <= got.first_seen_ns && got.first_seen_ns <= got.last_seen_ns && got.last_seen_ns <= t1,
        "timestamps out of range: first {} last {} window [{t0}, {t1}]",
        got.first_seen_ns,
        got.last_seen_ns
    );
    FlowState {
        first_seen_ns: got.first_seen_ns,
        last_seen_ns: got.last_seen_ns,
        // The program's clock bookkeeping (jiffies), no time of the flow.
        tick: got.tick,
        ..expected
    }
}

/// Compares events field by field after checking their timestamps lie in `[t0, t1]`.
fn assert_events(got: &[FlowEvent], expected: &[FlowEvent], t0: u64, t1: u64) {
    assert_eq!(
        got.len(),
        expected.len(),
        "event count: got {got:?}, expected {expected:?}"
    );
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            t0 <= g.ts_ns && g.ts_ns <= t1,
            "event {i} timestamp {} outside [{t0}, {t1}]",
            g.ts_ns
        );
        let e = FlowEvent {
            ts_ns: g.ts_ns,
            ..*e
        };
        assert_eq!(*g, e, "event {i}");
    }
}

fn event(kind: EventKind, key: FlowKey, initiator: Side, hook: Hook, mid: u8) -> FlowEvent {
    FlowEvent {
        key,
        ts_ns: 0,
        ifindex: LOOPBACK_IFINDEX,
        kind: kind as u8,
        initiator: initiator as u8,
        hook: hook as u8,
        mid_stream: mid,
    }
}

/// Asserts the counters grew by exactly `expected` (others by zero) since `before`. Packets seen
/// are the sum of the outcome counters, so an expected `PacketsSeen` of the packets sent checks
/// that each landed in exactly one.
fn assert_counters(h: &Harness, before: &CounterTotals, expected: &[(Counter, u64)]) {
    let delta = h.counters().since(before);
    for c in Counter::ALL {
        let want = expected
            .iter()
            .find(|(e, _)| *e == c)
            .map_or(0, |(_, n)| *n);
        assert_eq!(
            delta.get(c),
            want,
            "counter {} grew by {}, expected {want}",
            c.name(),
            delta.get(c)
        );
    }
}

fn tcp_handshake_and_teardown(client: IpAddr, server: IpAddr) {
    let mut h = Harness::new();
    let before = h.counters();
    let (k, client_side) = key(TCP, (client, 40_000), (server, 80));
    let frame = |from_client: bool, flags: u8, payload: &[u8]| {
        let (s, d, sp, dp) = if from_client {
            (client, server, 40_000, 80)
        } else {
            (server, client, 80, 40_000)
        };
        eth_ip(&ip(s, d, TCP, &tcp(sp, dp, flags, payload)))
    };
    let syn = frame(true, SYN, b"");
    let synack = frame(false, SYN | ACK, b"");
    let ack = frame(true, ACK, b"");
    let request = frame(true, PSH | ACK, b"GET / HTTP/1.0\r\n\r\n");
    let response = frame(false, PSH | ACK, b"HTTP/1.0 200 OK\r\n\r\n");
    let fin_client = frame(true, FIN | ACK, b"");
    let fin_server = frame(false, FIN | ACK, b"");
    let last_ack = frame(true, ACK, b"");

    let t0 = coarse_now_ns();
    h.pass(Hook::Egress, &syn);
    let t1 = coarse_now_ns();
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry after the SYN"));
    let expected = FlowState {
        first_seen_ns: 0,
        last_seen_ns: 0,
        packets: [1, 0],
        bytes: [len(&syn), 0],
        ifindex: LOOPBACK_IFINDEX,
        tcp_flags: [SYN, 0],
        initiator: client_side as u8,
        status: FlowStatus::New as u8,
        hook: Hook::Egress as u8,
        mid_stream: 0,
        answered: 0,
        owners: owners(Some(Hook::Egress), None),
        tick: 0,
        nat: 0,
        _reserved: [0; 7],
    };
    assert_eq!(
        got,
        with_times(expected, &got, t0, t1),
        "entry after the SYN"
    );
    assert_events(
        &h.events(),
        &[event(EventKind::New, k, client_side, Hook::Egress, 0)],
        t0,
        t1,
    );

    h.pass(Hook::Ingress, &synack);
    let t2 = coarse_now_ns();
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry after the SYN-ACK"));
    assert_eq!(
        got.status(),
        Some(FlowStatus::Answered),
        "SYN-ACK answers: {got:?}"
    );
    assert_events(
        &h.events(),
        &[event(EventKind::Answered, k, client_side, Hook::Ingress, 0)],
        t0,
        t2,
    );

    for (from_client, f) in [
        (true, &ack),
        (true, &request),
        (false, &response),
        (true, &fin_client),
    ] {
        let dir = if from_client {
            Hook::Egress
        } else {
            Hook::Ingress
        };
        h.pass(dir, f);
    }
    assert!(
        h.events().is_empty(),
        "data and a one-sided FIN change no status"
    );
    h.pass(Hook::Ingress, &fin_server);
    h.pass(Hook::Egress, &last_ack);
    let t3 = coarse_now_ns();

    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry after the teardown"));
    let expected = FlowState {
        packets: [5, 3],
        bytes: [
            len(&syn) + len(&ack) + len(&request) + len(&fin_client) + len(&last_ack),
            len(&synack) + len(&response) + len(&fin_server),
        ],
        tcp_flags: [SYN | ACK | PSH | FIN, SYN | ACK | PSH | FIN],
        status: FlowStatus::Closed as u8,
        answered: 1,
        owners: owners(Some(Hook::Egress), Some(Hook::Ingress)),
        ..expected
    };
    assert_eq!(
        got,
        with_times(expected, &got, t0, t3),
        "entry after the teardown"
    );
    assert_events(
        &h.events(),
        &[event(EventKind::Closed, k, client_side, Hook::Ingress, 0)],
        t0,
        t3,
    );
    assert_eq!(h.flow_count(), 1, "one connection, one entry");
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 8),
            (Counter::FlowCreated, 1),
            (Counter::FlowUpdated, 7),
            (Counter::EventsSent, 3),
        ],
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn ipv4_tcp_handshake_and_teardown() {
    tcp_handshake_and_teardown(CLIENT4.into(), SERVER4.into());
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn ipv6_tcp_handshake_and_teardown() {
    tcp_handshake_and_teardown(CLIENT6.into(), SERVER6.into());
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn udp_request_and_reply() {
    let mut h = Harness::new();
    let before = h.counters();
    let (k, client_side) = key(UDP, (CLIENT4.into(), 5353), (SERVER4.into(), 53));
    let request = eth_ip(&ipv4(CLIENT4, SERVER4, UDP, &udp(5353, 53, b"query")));
    let reply = eth_ip(&ipv4(SERVER4, CLIENT4, UDP, &udp(53, 5353, b"answer!")));
    let t0 = coarse_now_ns();
    h.pass(Hook::Ingress, &request);
    h.pass(Hook::Egress, &reply);
    let t1 = coarse_now_ns();
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry for the UDP exchange"));
    let expected = FlowState {
        first_seen_ns: 0,
        last_seen_ns: 0,
        packets: [1, 1],
        bytes: [len(&request), len(&reply)],
        ifindex: LOOPBACK_IFINDEX,
        tcp_flags: [0, 0],
        initiator: client_side as u8,
        status: FlowStatus::Answered as u8,
        hook: Hook::Ingress as u8,
        mid_stream: 0,
        answered: 1,
        owners: owners(Some(Hook::Ingress), Some(Hook::Egress)),
        tick: 0,
        nat: 0,
        _reserved: [0; 7],
    };
    assert_eq!(got, with_times(expected, &got, t0, t1));
    assert_events(
        &h.events(),
        &[
            event(EventKind::New, k, client_side, Hook::Ingress, 0),
            event(EventKind::Answered, k, client_side, Hook::Egress, 0),
        ],
        t0,
        t1,
    );
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 2),
            (Counter::FlowCreated, 1),
            (Counter::FlowUpdated, 1),
            (Counter::EventsSent, 2),
        ],
    );
}

/// Where the reply path passes no hook of ours (Cilium hands replies to the pod past its
/// interface's egress), the SYN-ACK is never seen: the initiator's first bare ACK after its SYN,
/// which it sends only once a SYN-ACK reached it, answers the flow. A retransmitted SYN does not.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn the_initiators_bare_ack_answers_a_flow_whose_syn_ack_was_not_seen() {
    let mut h = Harness::new();
    let before = h.counters();
    let (k, client_side) = key(TCP, (CLIENT4.into(), 41_003), (SERVER4.into(), 83));
    let syn = eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(41_003, 83, SYN, b"")));
    let ack = eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(41_003, 83, ACK, b"")));
    let t0 = coarse_now_ns();
    h.pass(Hook::Ingress, &syn);
    // The SYN again (a retransmission): still no evidence of an answer.
    h.pass(Hook::Ingress, &syn);
    let retransmitted = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry for the connection"));
    assert_eq!(
        retransmitted.status,
        FlowStatus::New as u8,
        "a retransmitted SYN answered the flow"
    );
    h.pass(Hook::Ingress, &ack);
    let t1 = coarse_now_ns();
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry for the connection"));
    let expected = FlowState {
        first_seen_ns: 0,
        last_seen_ns: 0,
        packets: [3, 0],
        bytes: [2 * len(&syn) + len(&ack), 0],
        ifindex: LOOPBACK_IFINDEX,
        tcp_flags: [SYN | ACK, 0],
        initiator: client_side as u8,
        status: FlowStatus::Answered as u8,
        hook: Hook::Ingress as u8,
        mid_stream: 0,
        answered: 1,
        owners: owners(Some(Hook::Ingress), None),
        tick: 0,
        nat: 0,
        _reserved: [0; 7],
    };
    assert_eq!(got, with_times(expected, &got, t0, t1));
    assert_events(
        &h.events(),
        &[
            event(EventKind::New, k, client_side, Hook::Ingress, 0),
            event(EventKind::Answered, k, client_side, Hook::Ingress, 0),
        ],
        t0,
        t1,
    );
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 3),
            (Counter::FlowCreated, 1),
            (Counter::FlowUpdated, 2),
            (Counter::EventsSent, 2),
        ],
    );
}

/// The program keeps each CPU's last coarse clock reading until jiffies moves: a flow's packets
/// sent ticks apart must still carry their own times (IPv4 and IPv6 tables alike), and the first
/// packet's time must stay.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn timestamps_follow_the_clock_across_ticks() {
    let mut h = Harness::new();
    let pairs: [(IpAddr, IpAddr); 2] = [
        (CLIENT4.into(), SERVER4.into()),
        (CLIENT6.into(), SERVER6.into()),
    ];
    for (client, server) in pairs {
        let (k, _) = key(UDP, (client, 5353), (server, 53));
        let request = eth_ip(&ip(client, server, UDP, &udp(5353, 53, b"query")));
        let flow = |h: &Harness| {
            h.flow(&k)
                .unwrap_or_else(|| panic!("no flow entry for {client} -> {server}"))
        };
        let t0 = coarse_now_ns();
        h.pass(Hook::Ingress, &request);
        h.pass(Hook::Ingress, &request);
        let first = flow(&h);
        assert!(
            t0 <= first.first_seen_ns && first.first_seen_ns <= first.last_seen_ns,
            "{client}: first packets at {} and {}, test started at {t0}",
            first.first_seen_ns,
            first.last_seen_ns
        );
        // Several ticks at any HZ (a tick is at most 10 ms).
        std::thread::sleep(std::time::Duration::from_millis(40));
        let t1 = coarse_now_ns();
        assert!(
            t1 > first.last_seen_ns,
            "the coarse clock did not move in 40 ms"
        );
        h.pass(Hook::Ingress, &request);
        let t2 = coarse_now_ns();
        let later = flow(&h);
        assert_eq!(
            later.first_seen_ns, first.first_seen_ns,
            "{client}: first_seen must stay"
        );
        assert!(
            t1 <= later.last_seen_ns && later.last_seen_ns <= t2,
            "{client}: a packet sent in [{t1}, {t2}] got last_seen {}",
            later.last_seen_ns
        );
        assert_eq!(later.packets, [3, 0], "{client}: three requests");
    }
}

/// A flow first seen mid-stream (the agent restarted, the entry expired): its first packet is
/// the server's data, so the server is taken for the initiator; the client's RST then ends an
/// established connection. Before, a RST from the side not taken for the initiator made it
/// `refused`, hiding a real connection as a refusal.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn tcp_rst_on_a_mid_stream_flow_closes_it() {
    let mut h = Harness::new();
    let (k, server_side) = key(TCP, (SERVER4.into(), 82), (CLIENT4.into(), 41_002));
    let data = eth_ip(&ipv4(
        SERVER4,
        CLIENT4,
        TCP,
        &tcp(82, 41_002, PSH | ACK, b"keepalive"),
    ));
    let rst = eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(41_002, 82, RST, b"")));
    let t0 = coarse_now_ns();
    h.pass(Hook::Ingress, &data);
    h.pass(Hook::Egress, &rst);
    let t1 = coarse_now_ns();
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry for the mid-stream connection"));
    let expected = FlowState {
        first_seen_ns: 0,
        last_seen_ns: 0,
        packets: [1, 1],
        bytes: [len(&data), len(&rst)],
        ifindex: LOOPBACK_IFINDEX,
        tcp_flags: [PSH | ACK, RST],
        initiator: server_side as u8,
        status: FlowStatus::Closed as u8,
        hook: Hook::Ingress as u8,
        mid_stream: 1,
        answered: 0,
        owners: owners(Some(Hook::Ingress), Some(Hook::Egress)),
        tick: 0,
        nat: 0,
        _reserved: [0; 7],
    };
    assert_eq!(got, with_times(expected, &got, t0, t1));
    assert_events(
        &h.events(),
        &[
            event(EventKind::New, k, server_side, Hook::Ingress, 1),
            event(EventKind::Closed, k, server_side, Hook::Egress, 1),
        ],
        t0,
        t1,
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn tcp_refused_by_rst() {
    let mut h = Harness::new();
    let before = h.counters();
    let (k, client_side) = key(TCP, (CLIENT4.into(), 41_000), (SERVER4.into(), 81));
    let syn = eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(41_000, 81, SYN, b"")));
    let rst = eth_ip(&ipv4(
        SERVER4,
        CLIENT4,
        TCP,
        &tcp(81, 41_000, RST | ACK, b""),
    ));
    let t0 = coarse_now_ns();
    h.pass(Hook::Egress, &syn);
    h.pass(Hook::Ingress, &rst);
    let t1 = coarse_now_ns();
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry for the refused connection"));
    let expected = FlowState {
        first_seen_ns: 0,
        last_seen_ns: 0,
        packets: [1, 1],
        bytes: [len(&syn), len(&rst)],
        ifindex: LOOPBACK_IFINDEX,
        tcp_flags: [SYN, RST | ACK],
        initiator: client_side as u8,
        status: FlowStatus::Refused as u8,
        hook: Hook::Egress as u8,
        mid_stream: 0,
        answered: 0,
        owners: owners(Some(Hook::Egress), Some(Hook::Ingress)),
        tick: 0,
        nat: 0,
        _reserved: [0; 7],
    };
    assert_eq!(got, with_times(expected, &got, t0, t1));
    assert_events(
        &h.events(),
        &[
            event(EventKind::New, k, client_side, Hook::Egress, 0),
            event(EventKind::Refused, k, client_side, Hook::Ingress, 0),
        ],
        t0,
        t1,
    );
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 2),
            (Counter::FlowCreated, 1),
            (Counter::FlowUpdated, 1),
            (Counter::EventsSent, 2),
        ],
    );

    // The client tries again from the same port: a new connection on the same key.
    let t2 = coarse_now_ns();
    h.pass(Hook::Egress, &syn);
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry for the retry"));
    assert_eq!(
        got.status(),
        Some(FlowStatus::New),
        "a new SYN restarts a refused flow"
    );
    assert_eq!(got.packets, [1, 0], "the restarted flow counts afresh");
    assert_events(
        &h.events(),
        &[event(EventKind::New, k, client_side, Hook::Egress, 0)],
        t2,
        coarse_now_ns(),
    );
}

fn refused_by_icmp(client: IpAddr, server: IpAddr) {
    let mut h = Harness::new();
    let before = h.counters();
    let (k, client_side) = key(UDP, (client, 33_434), (server, 9));
    let request_ip = ip(client, server, UDP, &udp(33_434, 9, b"hello?"));
    let request = eth_ip(&request_ip);
    let unreachable = match (server, client) {
        (IpAddr::V4(s), IpAddr::V4(c)) => ipv4(s, c, ICMP, &icmp_unreachable(3, &request_ip)),
        (IpAddr::V6(s), IpAddr::V6(c)) => ipv6(s, c, ICMPV6, &icmpv6_unreachable(4, &request_ip)),
        _ => panic!("mixed families"),
    };
    let t0 = coarse_now_ns();
    h.pass(Hook::Egress, &request);
    h.pass(Hook::Ingress, &eth_ip(&unreachable));
    let t1 = coarse_now_ns();
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry for the refused request"));
    let expected = FlowState {
        first_seen_ns: 0,
        last_seen_ns: 0,
        packets: [1, 0],
        bytes: [len(&request), 0],
        ifindex: LOOPBACK_IFINDEX,
        tcp_flags: [0, 0],
        initiator: client_side as u8,
        status: FlowStatus::Refused as u8,
        hook: Hook::Egress as u8,
        mid_stream: 0,
        answered: 0,
        owners: owners(Some(Hook::Egress), None),
        tick: 0,
        nat: 0,
        _reserved: [0; 7],
    };
    assert_eq!(got, with_times(expected, &got, t0, t1));
    assert_events(
        &h.events(),
        &[
            event(EventKind::New, k, client_side, Hook::Egress, 0),
            event(EventKind::Refused, k, client_side, Hook::Ingress, 0),
        ],
        t0,
        t1,
    );
    assert_eq!(h.flow_count(), 1, "the ICMP error itself is no flow");
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 2),
            (Counter::FlowCreated, 1),
            (Counter::IcmpErrorMatched, 1),
            (Counter::EventsSent, 2),
        ],
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn ipv4_refused_by_icmp_port_unreachable() {
    refused_by_icmp(CLIENT4.into(), SERVER4.into());
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn ipv6_refused_by_icmpv6_port_unreachable() {
    refused_by_icmp(CLIENT6.into(), SERVER6.into());
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn icmp_error_about_unknown_flow_is_counted_only() {
    let mut h = Harness::new();
    let before = h.counters();
    let original = ipv4(CLIENT4, SERVER4, UDP, &udp(1234, 9, b"x"));
    let unreachable = ipv4(SERVER4, CLIENT4, ICMP, &icmp_unreachable(3, &original));
    h.pass(Hook::Ingress, &eth_ip(&unreachable));
    assert!(h.events().is_empty(), "no event without a flow");
    assert_eq!(h.flow_count(), 0, "no flow from an ICMP error");
    assert_counters(
        &h,
        &before,
        &[(Counter::PacketsSeen, 1), (Counter::IcmpErrorUnmatched, 1)],
    );
}

/// An L3 device (tunl0, `WireGuard`) hands TC the IP header at offset 0. `TestRun` derives
/// `skb->protocol` from bytes 12-13 as if they were an `EtherType`; for a bare IPv4 packet those
/// are the first two bytes of the source address, so a source in 8.0.0.0/16 makes the kernel say
/// `ETH_P_IP`, as a real L3 device's skb would. (For IPv6, bytes 12-13 are source bytes 4-5:
/// `2001:db8:86dd::/48` gives `ETH_P_IPV6`.)
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn l3_device_packets_without_ethernet_header() {
    let mut h = Harness::new();
    let before = h.counters();
    let src4 = Ipv4Addr::new(8, 0, 0, 1);
    let dst4 = SERVER4;
    let pkt4 = ipv4(src4, dst4, TCP, &tcp(50_000, 443, SYN, b""));
    assert_eq!(
        pkt4[12..14],
        ETH_P_IP.to_be_bytes(),
        "crafting: source must start 8.0"
    );
    let src6 = Ipv6Addr::new(0x2001, 0xdb8, 0x86dd, 0, 0, 0, 0, 1);
    // TestRun wants the 40 bytes after the would-be Ethernet header to hold an IPv6 header.
    let pkt6 = ipv6(src6, SERVER6, UDP, &udp(50_001, 53, b"query-data"));
    assert_eq!(
        pkt6[12..14],
        ETH_P_IPV6.to_be_bytes(),
        "crafting: source bytes 4-5 must be 86dd"
    );

    let t0 = coarse_now_ns();
    h.pass(Hook::Ingress, &pkt4);
    h.pass(Hook::Ingress, &pkt6);
    let t1 = coarse_now_ns();

    let (k4, side4) = key(TCP, (src4.into(), 50_000), (dst4.into(), 443));
    let got = h
        .flow(&k4)
        .unwrap_or_else(|| panic!("no flow for the bare IPv4 packet"));
    let expected = FlowState {
        first_seen_ns: 0,
        last_seen_ns: 0,
        packets: [1, 0],
        bytes: [len(&pkt4), 0],
        ifindex: LOOPBACK_IFINDEX,
        tcp_flags: [SYN, 0],
        initiator: side4 as u8,
        status: FlowStatus::New as u8,
        hook: Hook::Ingress as u8,
        mid_stream: 0,
        answered: 0,
        owners: owners(Some(Hook::Ingress), None),
        tick: 0,
        nat: 0,
        _reserved: [0; 7],
    };
    assert_eq!(got, with_times(expected, &got, t0, t1));

    let (k6, side6) = key(UDP, (src6.into(), 50_001), (SERVER6.into(), 53));
    let got = h
        .flow(&k6)
        .unwrap_or_else(|| panic!("no flow for the bare IPv6 packet"));
    let expected = FlowState {
        bytes: [len(&pkt6), 0],
        tcp_flags: [0, 0],
        initiator: side6 as u8,
        ..expected
    };
    assert_eq!(got, with_times(expected, &got, t0, t1));
    assert_events(
        &h.events(),
        &[
            event(EventKind::New, k4, side4, Hook::Ingress, 0),
            event(EventKind::New, k6, side6, Hook::Ingress, 0),
        ],
        t0,
        t1,
    );
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 2),
            (Counter::FlowCreated, 2),
            (Counter::EventsSent, 2),
        ],
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn truncated_packets_are_counted_and_passed() {
    let mut h = Harness::new();
    let before = h.counters();
    // TestRun itself refuses (EINVAL) a frame whose EtherType says IPv4 or IPv6 but that is
    // shorter than the fixed IP header, so truncation is exercised behind the IP header.
    let full = eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(40_000, 80, SYN, b"")));
    let inside_tcp = &full[..14 + 20 + 10];
    let mut long_ihl = eth_ip(&ipv4(CLIENT4, SERVER4, UDP, &udp(1, 2, b"")));
    long_ihl[14] = 0x4f; // header claims 60 bytes, the packet has 28
    let udp6 = eth_ip(&ipv6(CLIENT6, SERVER6, UDP, &udp(1, 2, b"")));
    let inside_udp6 = &udp6[..14 + 40 + 4];
    let hop = eth_ip(&ipv6_ext(
        CLIENT6,
        SERVER6,
        &[(0, vec![1, 4, 0, 0, 0, 0])],
        UDP,
        &udp(1, 2, b""),
    ));
    let inside_ext = &hop[..=(14 + 40)];
    for frame in [inside_tcp, &long_ihl[..], inside_udp6, inside_ext] {
        h.pass(Hook::Egress, frame);
    }
    assert!(h.events().is_empty(), "a truncated packet starts no flow");
    assert_eq!(h.flow_count(), 0, "a truncated packet starts no flow");
    assert_counters(
        &h,
        &before,
        &[(Counter::PacketsSeen, 4), (Counter::Truncated, 4)],
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn non_ip_frame_is_counted_and_passed() {
    let mut h = Harness::new();
    let before = h.counters();
    let arp = eth(
        ETH_P_ARP,
        &[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 192, 0, 2, 10],
    );
    h.pass(Hook::Ingress, &arp);
    h.pass(Hook::Egress, &arp);
    assert!(h.events().is_empty(), "ARP starts no flow");
    assert_eq!(h.flow_count(), 0, "ARP starts no flow");
    assert_counters(
        &h,
        &before,
        &[(Counter::PacketsSeen, 2), (Counter::NonIp, 2)],
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn icmp_echo_is_keyed_by_identifier() {
    let mut h = Harness::new();
    let before = h.counters();
    let request = eth_ip(&ipv4(CLIENT4, SERVER4, ICMP, &icmp_echo(false, 0x4242, 1)));
    let reply = eth_ip(&ipv4(SERVER4, CLIENT4, ICMP, &icmp_echo(true, 0x4242, 1)));
    let other_id = eth_ip(&ipv4(CLIENT4, SERVER4, ICMP, &icmp_echo(false, 0x4343, 1)));
    let request6 = eth_ip(&ipv6(CLIENT6, SERVER6, ICMPV6, &icmpv6_echo(false, 7, 1)));
    let reply6 = eth_ip(&ipv6(SERVER6, CLIENT6, ICMPV6, &icmpv6_echo(true, 7, 1)));
    for (dir, f) in [
        (Hook::Egress, &request),
        (Hook::Ingress, &reply),
        (Hook::Egress, &other_id),
        (Hook::Egress, &request6),
        (Hook::Ingress, &reply6),
    ] {
        h.pass(dir, f);
    }
    let (k, side) = key(ICMP, (CLIENT4.into(), 0x4242), (SERVER4.into(), 0x4242));
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow for echo id 0x4242"));
    assert_eq!(
        (got.status(), got.initiator(), got.packets),
        (Some(FlowStatus::Answered), Some(side), [1, 1])
    );
    let (k2, _) = key(ICMP, (CLIENT4.into(), 0x4343), (SERVER4.into(), 0x4343));
    let got = h
        .flow(&k2)
        .unwrap_or_else(|| panic!("no flow for echo id 0x4343"));
    assert_eq!((got.status(), got.packets), (Some(FlowStatus::New), [1, 0]));
    let (k6, side6) = key(ICMPV6, (CLIENT6.into(), 7), (SERVER6.into(), 7));
    let got = h
        .flow(&k6)
        .unwrap_or_else(|| panic!("no flow for the ICMPv6 echo"));
    assert_eq!(
        (got.status(), got.initiator(), got.packets),
        (Some(FlowStatus::Answered), Some(side6), [1, 1])
    );
    assert_eq!(h.flow_count(), 3, "one flow per echo identifier");
    assert_eq!(h.events().len(), 5, "three New and two Answered events");
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 5),
            (Counter::FlowCreated, 3),
            (Counter::FlowUpdated, 2),
            (Counter::EventsSent, 5),
        ],
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn ipv6_extension_headers_are_skipped_and_fragments_counted() {
    let mut h = Harness::new();
    let before = h.counters();
    let hop_by_hop = (0u8, vec![1, 4, 0, 0, 0, 0]); // PadN to 8 bytes
    let dest_opts = (60u8, vec![1, 4, 0, 0, 0, 0]);
    let first_fragment = (44u8, vec![0, 1, 0, 0, 0, 42]); // offset 0, M=1
    let later_fragment = (44u8, vec![0, 0x08, 0, 0, 0, 42]); // offset 1 (8 bytes)
    let pkt = ipv6_ext(
        CLIENT6,
        SERVER6,
        &[hop_by_hop.clone(), dest_opts, first_fragment],
        SCTP,
        &sctp(5000, 6000, &[1, 0, 0, 4]),
    );
    h.pass(Hook::Egress, &eth_ip(&pkt));
    let (k, side) = key(SCTP, (CLIENT6.into(), 5000), (SERVER6.into(), 6000));
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no SCTP flow behind three extension headers"));
    assert_eq!(
        (got.initiator(), got.status()),
        (Some(side), Some(FlowStatus::New))
    );

    let frag = ipv6_ext(
        CLIENT6,
        SERVER6,
        &[hop_by_hop.clone(), later_fragment],
        UDP,
        &[0; 16],
    );
    h.pass(Hook::Egress, &eth_ip(&frag));
    let frag4 = ipv4_frag(CLIENT4, SERVER4, UDP, 0x0010, &[0; 16]);
    h.pass(Hook::Egress, &eth_ip(&frag4));
    // More extension headers than the program walks.
    let deep: Vec<(u8, Vec<u8>)> = (0..7).map(|_| (60u8, vec![1, 4, 0, 0, 0, 0])).collect();
    let too_deep = ipv6_ext(CLIENT6, SERVER6, &deep, UDP, &udp(1, 2, b""));
    h.pass(Hook::Egress, &eth_ip(&too_deep));
    let gre = ipv4(CLIENT4, SERVER4, 47, &[0; 8]);
    h.pass(Hook::Egress, &eth_ip(&gre));
    assert_eq!(h.flow_count(), 1, "only the SCTP packet is a flow");
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 5),
            (Counter::FlowCreated, 1),
            (Counter::Fragment, 2),
            (Counter::Malformed, 1),
            (Counter::OtherProtocol, 1),
            (Counter::EventsSent, 1),
        ],
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn mid_stream_flows_are_marked() {
    let mut h = Harness::new();
    // First seen: a data segment from the server. The sender is taken as initiator, marked mid-stream.
    let data = eth_ip(&ipv4(
        SERVER4,
        CLIENT4,
        TCP,
        &tcp(80, 40_001, PSH | ACK, b"data"),
    ));
    h.pass(Hook::Ingress, &data);
    let (k, server_side) = key(TCP, (SERVER4.into(), 80), (CLIENT4.into(), 40_001));
    let got = h.flow(&k).unwrap_or_else(|| panic!("no mid-stream flow"));
    assert_eq!(
        (got.initiator(), got.mid_stream, got.status()),
        (Some(server_side), 1, Some(FlowStatus::New))
    );
    // Any non-RST packet back answers a mid-stream flow.
    let back = eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(40_001, 80, ACK, b"")));
    h.pass(Hook::Egress, &back);
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("mid-stream flow vanished"));
    assert_eq!(
        (got.status(), got.answered),
        (Some(FlowStatus::Answered), 1)
    );

    // First seen: a SYN-ACK. Its receiver sent the SYN, so it is the initiator, known (2).
    let synack = eth_ip(&ipv4(
        SERVER4,
        CLIENT4,
        TCP,
        &tcp(443, 40_002, SYN | ACK, b""),
    ));
    h.pass(Hook::Ingress, &synack);
    let (k2, client_side) = key(TCP, (CLIENT4.into(), 40_002), (SERVER4.into(), 443));
    let got = h
        .flow(&k2)
        .unwrap_or_else(|| panic!("no flow from a SYN-ACK"));
    assert_eq!(
        (got.initiator(), got.mid_stream, got.status(), got.packets),
        (Some(client_side), 2, Some(FlowStatus::Answered), [0, 1])
    );
    let kinds: Vec<_> = h.events().iter().map(FlowEvent::kind).collect();
    assert_eq!(
        kinds,
        [
            Some(EventKind::New),
            Some(EventKind::Answered),
            Some(EventKind::New),
            Some(EventKind::Answered)
        ]
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn sampling_skips_established_packets_but_never_state_changes() {
    let mut h = Harness::with_config(&DatapathConfig {
        flow_table_entries: 1024,
        events_bytes: 64 * 1024,
        sample_every: 4,
        kernel_log: false,
        ..DatapathConfig::default()
    });
    let before = h.counters();
    let (k, _) = key(UDP, (CLIENT4.into(), 7000), (SERVER4.into(), 7001));
    let request = eth_ip(&ipv4(CLIENT4, SERVER4, UDP, &udp(7000, 7001, b"a")));
    let reply = eth_ip(&ipv4(SERVER4, CLIENT4, UDP, &udp(7001, 7000, b"b")));
    h.pass(Hook::Egress, &request);
    h.pass(Hook::Ingress, &reply);
    let n = 4000u64;
    for _ in 0..n {
        h.pass(Hook::Egress, &request);
    }
    let got = h.flow(&k).unwrap_or_else(|| panic!("no sampled flow"));
    let delta = h.counters().since(&before);
    let kept = got.packets[0] - 1;
    assert_eq!(
        kept + delta.get(Counter::SampledOut),
        n,
        "every established packet is either kept or counted as sampled out"
    );
    // One in four kept on average: 1000 expected; 5 sigma of a binomial(4000, 1/4) is ~137.
    assert!(
        (800..=1200).contains(&kept),
        "kept {kept} of {n} with sample_every 4"
    );
    assert_eq!(
        got.status(),
        Some(FlowStatus::Answered),
        "the answer was never sampled out"
    );
    assert_eq!(h.events().len(), 2, "New and Answered");
}

/// The table walk reads entries in batches (`BPF_MAP_LOOKUP_BATCH`): it must see exactly the
/// entries a one-by-one iteration sees, in all three tables, with the same values, including tables
/// larger than one batch and buckets holding several entries.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn batched_walk_reads_every_entry_once() {
    let mut h = Harness::with_config(&DatapathConfig {
        flow_table_entries: 16_384,
        ..DatapathConfig::default()
    });
    let (v4, tcp4, v6) = (9_000u16, 5_000u16, 300u16);
    for i in 0..v4 {
        h.pass(
            Hook::Egress,
            &eth_ip(&ipv4(CLIENT4, SERVER4, UDP, &udp(10_000 + i, 53, b"q"))),
        );
    }
    for i in 0..tcp4 {
        h.pass(
            Hook::Egress,
            &eth_ip(&ipv4(
                CLIENT4,
                SERVER4,
                TCP,
                &tcp(30_000 + i, 443, SYN, b""),
            )),
        );
    }
    for i in 0..v6 {
        h.pass(
            Hook::Egress,
            &eth_ip(&ipv6(CLIENT6, SERVER6, UDP, &udp(20_000 + i, 53, b"q"))),
        );
    }
    let mut batched = std::collections::HashMap::new();
    let read = h
        .datapath
        .for_each_flow(|key, state| {
            assert!(
                batched.insert(key, *state).is_none(),
                "entry {key:?} read twice"
            );
        })
        .unwrap_or_else(|e| panic!("batched walk: {e}"));
    let one_by_one: std::collections::HashMap<FlowKey, FlowState> = h
        .datapath
        .flows()
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|entry| entry.unwrap_or_else(|e| panic!("walk: {e}")))
        .collect();
    assert_eq!(read.into_iter().sum::<usize>(), usize::from(v4 + tcp4 + v6));
    assert_eq!(batched.len(), usize::from(v4 + tcp4 + v6));
    assert!(
        batched == one_by_one,
        "the batched walk and the one-by-one walk differ"
    );
    let (probe, _) = key(
        UDP,
        (IpAddr::V6(CLIENT6), 20_000 + v6 - 1),
        (IpAddr::V6(SERVER6), 53),
    );
    assert_eq!(
        batched.get(&probe).map(|s| s.packets),
        Some([1, 0]),
        "an IPv6 flow's entry, widened key and value"
    );
    let (probe, _) = key(
        TCP,
        (IpAddr::V4(CLIENT4), 30_000 + tcp4 - 1),
        (IpAddr::V4(SERVER4), 443),
    );
    assert_eq!(
        batched.get(&probe).map(|s| (s.packets, s.tcp_flags)),
        Some(([1, 0], [SYN, 0])),
        "an IPv4 TCP flow's entry (TCP table), widened key and value"
    );
}

/// One `tracing` event: what the kernel-log bridge emitted for one of the program's records.
#[derive(Debug, Clone)]
struct Traced {
    target: String,
    level: tracing::Level,
    fields: Vec<(String, String)>,
}

impl Traced {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A `tracing` layer keeping every event it sees.
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<Traced>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields<'a>(&'a mut Vec<(String, String)>);
        impl tracing::field::Visit for Fields<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push((field.name().to_owned(), format!("{value:?}")));
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.push((field.name().to_owned(), value.to_owned()));
            }
        }
        let mut traced = Traced {
            target: event.metadata().target().to_owned(),
            level: *event.metadata().level(),
            fields: Vec::new(),
        };
        event.record(&mut Fields(&mut traced.fields));
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(traced);
    }
}

/// The program's log records waiting now, read through the datapath's reader and the bridge to
/// `tracing`, as the events a subscriber on this thread receives.
fn kernel_log_events(h: &mut Harness) -> Vec<Traced> {
    use tracing_subscriber::layer::SubscriberExt as _;
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Capture(std::sync::Arc::clone(&events)));
    tracing::subscriber::with_default(subscriber, || h.datapath.flush_kernel_log());
    events
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn with_kernel_log(kernel_log: bool) -> Harness {
    Harness::with_config(&DatapathConfig {
        flow_table_entries: 1024,
        events_bytes: 64 * 1024,
        sample_every: 1,
        kernel_log,
        ..DatapathConfig::default()
    })
}

/// Frames down the two rare paths of the parser, with the record each must produce when kernel
/// logging is on: IPv4 whose TCP header is cut short (truncated), sent at egress, and IPv4 with
/// an IHL of 4 (malformed), received at ingress. `TestRun` data is all linear, on loopback.
fn unreadable_frames() -> [(Hook, Vec<u8>, String); 2] {
    let full = eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(40_000, 80, SYN, b"")));
    let cut = full[..14 + 20 + 10].to_vec();
    let mut short_ihl = eth_ip(&ipv4(CLIENT4, SERVER4, UDP, &udp(1, 2, b"")));
    short_ihl[14] = 0x44;
    let (cut_len, short_len) = (cut.len(), short_ihl.len());
    [
        (
            Hook::Egress,
            cut,
            format!(
                "headers cut short (counted as truncated): egress, ifindex {LOOPBACK_IFINDEX}, \
                 EtherType 0x800, {cut_len} bytes, {cut_len} linear"
            ),
        ),
        (
            Hook::Ingress,
            short_ihl,
            format!(
                "invalid headers (counted as malformed): ingress, ifindex {LOOPBACK_IFINDEX}, \
                 EtherType 0x800, {short_len} bytes, {short_len} linear"
            ),
        ),
    ]
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn kernel_log_on_records_unreadable_headers_through_the_bridge() {
    let mut h = with_kernel_log(true);
    let before = h.counters();
    // A flow's packets and a non-IP frame take no rare path: no record.
    let request = eth_ip(&ipv4(CLIENT4, SERVER4, UDP, &udp(7000, 53, b"q")));
    let reply = eth_ip(&ipv4(SERVER4, CLIENT4, UDP, &udp(53, 7000, b"a")));
    let arp = eth(
        ETH_P_ARP,
        &[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 192, 0, 2, 10],
    );
    h.pass(Hook::Egress, &request);
    h.pass(Hook::Ingress, &reply);
    h.pass(Hook::Ingress, &arp);
    assert!(
        kernel_log_events(&mut h).is_empty(),
        "a flow's packets and a non-IP frame are no rare path"
    );
    let frames = unreadable_frames();
    for (hook, frame, _) in &frames {
        h.pass(*hook, frame);
    }
    let events = kernel_log_events(&mut h);
    assert_eq!(
        events.len(),
        frames.len(),
        "one record per unreadable packet: {events:#?}"
    );
    for (event, (_, _, message)) in events.iter().zip(&frames) {
        assert_eq!(event.target, auditor_ebpf::KERNEL_LOG_TARGET, "{event:?}");
        assert_eq!(event.level, tracing::Level::WARN, "{event:?}");
        assert_eq!(event.field("message"), Some(message.as_str()), "{event:?}");
        assert_eq!(
            event.field("module"),
            Some("auditor_ebpf::diag"),
            "{event:?}"
        );
        assert!(
            event.field("file").is_some_and(|f| f.ends_with("diag.rs")),
            "{event:?}"
        );
        assert!(event.field("line").is_some_and(|l| l != "0"), "{event:?}");
        assert_eq!(
            event.field("kernel_target"),
            None,
            "the record's own target is the event's: {event:?}"
        );
    }
    assert!(
        kernel_log_events(&mut h).is_empty(),
        "records are read once"
    );
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 5),
            (Counter::FlowCreated, 1),
            (Counter::FlowUpdated, 1),
            (Counter::EventsSent, 2),
            (Counter::NonIp, 1),
            (Counter::Truncated, 1),
            (Counter::Malformed, 1),
        ],
    );
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn kernel_log_off_writes_no_record() {
    let mut h = with_kernel_log(false);
    let before = h.counters();
    for (hook, frame, _) in &unreadable_frames() {
        h.pass(*hook, frame);
    }
    let events = kernel_log_events(&mut h);
    assert!(
        events.is_empty(),
        "logging off, the program writes no record: {events:#?}"
    );
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 2),
            (Counter::Truncated, 1),
            (Counter::Malformed, 1),
        ],
    );
}

/// Off, the verifier proves every record dead (aya-log's level global is a constant to it) and
/// does not walk them: it processes fewer instructions than with the records on.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn kernel_log_off_is_pruned_by_the_verifier() {
    let mut on = with_kernel_log(true);
    let mut off = with_kernel_log(false);
    for name in [PROGRAM_INGRESS, PROGRAM_EGRESS] {
        let count = |h: &mut Harness| {
            let program = h
                .datapath
                .program(name)
                .unwrap_or_else(|e| panic!("program {name}: {e}"));
            program
                .info()
                .unwrap_or_else(|e| panic!("program {name} info: {e}"))
                .verified_instruction_count()
        };
        // The count is reported from Linux 5.16 on.
        let (Some(on), Some(off)) = (count(&mut on), count(&mut off)) else {
            eprintln!("{name}: the kernel does not report verified instructions");
            continue;
        };
        eprintln!("{name}: verified instructions: kernel log off {off}, on {on}");
        assert!(
            off < on,
            "{name}: with the records off the verifier must walk less ({off}) than on ({on})"
        );
    }
}

/// A packet that crosses two hooks on one node adds to its flow once: a same-node pod-to-pod
/// connection leaves pod A through its interface's ingress and enters pod B through B's egress
/// (and the replies the other way round); a reply from another node arrives at the uplink's
/// ingress, then crosses the pod interface's egress (Calico's routing). Each direction is
/// counted by the first hook that saw it; the other hook's copy is `duplicate` and changes
/// nothing, state changes included.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn a_packet_seen_at_two_hooks_is_counted_once() {
    let mut h = Harness::new();
    let before = h.counters();
    let (k, client_side) = key(TCP, (CLIENT4.into(), 40_100), (SERVER4.into(), 80));
    let from_client = |flags| eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(40_100, 80, flags, b"")));
    let from_server = |flags| eth_ip(&ipv4(SERVER4, CLIENT4, TCP, &tcp(80, 40_100, flags, b"")));
    let (syn, synack, ack) = (from_client(SYN), from_server(SYN | ACK), from_client(ACK));
    let data = from_server(PSH | ACK);
    let t0 = coarse_now_ns();
    // Same node: client pod's interface ingress, then the server pod's interface egress.
    for (first, second, frame) in [
        (Hook::Ingress, Hook::Egress, &syn),
        (Hook::Ingress, Hook::Egress, &synack),
        (Hook::Ingress, Hook::Egress, &ack),
        (Hook::Ingress, Hook::Egress, &data),
    ] {
        h.pass(first, frame);
        h.pass(second, frame);
    }
    let t1 = coarse_now_ns();
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry for the same-node connection"));
    let expected = FlowState {
        first_seen_ns: 0,
        last_seen_ns: 0,
        packets: [2, 2],
        bytes: [len(&syn) + len(&ack), len(&synack) + len(&data)],
        ifindex: LOOPBACK_IFINDEX,
        tcp_flags: [SYN | ACK, SYN | ACK | PSH],
        initiator: client_side as u8,
        status: FlowStatus::Answered as u8,
        hook: Hook::Ingress as u8,
        mid_stream: 0,
        answered: 1,
        owners: owners(Some(Hook::Ingress), Some(Hook::Ingress)),
        tick: 0,
        nat: 0,
        _reserved: [0; 7],
    };
    assert_eq!(got, with_times(expected, &got, t0, t1), "same node");
    assert_events(
        &h.events(),
        &[
            event(EventKind::New, k, client_side, Hook::Ingress, 0),
            event(EventKind::Answered, k, client_side, Hook::Ingress, 0),
        ],
        t0,
        t1,
    );
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 8),
            (Counter::FlowCreated, 1),
            (Counter::FlowUpdated, 3),
            (Counter::Duplicate, 4),
            (Counter::EventsSent, 2),
        ],
    );

    // Across nodes (Calico): the request leaves through the pod interface's ingress and the
    // uplink's egress, the answer comes in at the uplink's ingress and then the pod's egress.
    let before = h.counters();
    let (k, client_side) = key(TCP, (CLIENT4.into(), 40_200), (SERVER4.into(), 80));
    let from_client = |flags| eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(40_200, 80, flags, b"")));
    let from_server = |flags| eth_ip(&ipv4(SERVER4, CLIENT4, TCP, &tcp(80, 40_200, flags, b"")));
    let (syn, synack, rst) = (from_client(SYN), from_server(SYN | ACK), from_server(RST));
    for (first, second, frame) in [
        (Hook::Ingress, Hook::UplinkEgress, &syn),
        (Hook::UplinkIngress, Hook::Egress, &synack),
        (Hook::UplinkIngress, Hook::Egress, &rst),
    ] {
        h.pass(first, frame);
        h.pass(second, frame);
    }
    let got = h
        .flow(&k)
        .unwrap_or_else(|| panic!("no flow entry for the cross-node connection"));
    assert_eq!(
        (got.packets, got.status(), got.answered, got.initiator),
        ([1, 2], Some(FlowStatus::Closed), 1, client_side as u8),
        "each packet once, the RST closes the answered flow once: {got:?}"
    );
    assert_eq!(
        (got.owner(true), got.owner(false)),
        (Some(Hook::Ingress), Some(Hook::UplinkIngress)),
        "{got:?}"
    );
    let kinds: Vec<_> = h.events().iter().map(|e| (e.kind(), e.hook())).collect();
    assert_eq!(
        kinds,
        [
            (Some(EventKind::New), Some(Hook::Ingress)),
            (Some(EventKind::Answered), Some(Hook::UplinkIngress)),
            (Some(EventKind::Closed), Some(Hook::UplinkIngress)),
        ],
        "one event per change, from the hook that counts"
    );
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 6),
            (Counter::FlowCreated, 1),
            (Counter::FlowUpdated, 2),
            (Counter::Duplicate, 3),
            (Counter::EventsSent, 3),
        ],
    );
}

/// On an uplink, an encapsulation's outer packet (VXLAN on 4789 and 8472, Geneve on 6081,
/// WireGuard on its configured port either way) is counted, not a flow; on a pod interface the
/// same packet is an ordinary UDP flow, and on an uplink other UDP is too.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn encapsulation_on_uplinks_is_counted_not_a_flow() {
    let mut h = Harness::with_config(&DatapathConfig {
        flow_table_entries: 1024,
        events_bytes: 64 * 1024,
        wireguard_port: 51_871,
        ..DatapathConfig::default()
    });
    let before = h.counters();
    let outer = |sport, dport| eth_ip(&ipv4(CLIENT4, SERVER4, UDP, &udp(sport, dport, b"inner")));
    let encapsulated = [
        outer(40_001, 4789),
        outer(40_002, 8472),
        outer(40_003, 6081),
        outer(40_004, 51_871),
        outer(51_871, 40_005),
    ];
    for frame in &encapsulated {
        h.pass(Hook::UplinkIngress, frame);
        h.pass(Hook::UplinkEgress, frame);
    }
    assert_eq!(h.flow_count(), 0, "no flow for outer packets");
    assert!(h.events().is_empty());
    assert_counters(
        &h,
        &before,
        &[(Counter::PacketsSeen, 10), (Counter::Encapsulated, 10)],
    );
    // WireGuard's default port is not Cilium's: with 51871 configured, 51820 is plain UDP.
    let before = h.counters();
    h.pass(Hook::UplinkIngress, &outer(40_006, 51_820));
    h.pass(Hook::UplinkIngress, &outer(40_007, 53));
    h.pass(Hook::Ingress, &outer(40_008, 4789));
    assert_eq!(
        h.flow_count(),
        3,
        "ordinary UDP, and VXLAN from a pod, are flows"
    );
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, 3),
            (Counter::FlowCreated, 3),
            (Counter::EventsSent, 3),
        ],
    );
}

/// Keeps the calling thread on the CPU it runs on while it lives. The kernel's LRU hands out
/// free nodes to each CPU in batches: a thread moving between CPUs while it fills a table
/// strands free nodes on the CPU it left, and the table then evicts before it is full.
struct OnOneCpu(libc::cpu_set_t);

impl OnOneCpu {
    fn pin() -> Self {
        // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
        let mut before: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid set of the size given; 0 is the calling thread.
        let rc =
            unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut before) };
        assert_eq!(
            rc,
            0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: no preconditions.
        let cpu = usize::try_from(unsafe { libc::sched_getcpu() })
            .unwrap_or_else(|_| panic!("sched_getcpu: {}", std::io::Error::last_os_error()));
        // SAFETY: as above.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is a CPU the thread runs on, so within the set.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        // SAFETY: a valid set of the size given.
        let rc =
            unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const one) };
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
        Self(before)
    }
}

impl Drop for OnOneCpu {
    fn drop(&mut self) {
        // SAFETY: the set read at creation.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const self.0) };
    }
}

/// `ENTRIES` distinct IPv4 TCP flows (SYNs from successive client ports), and their keys.
fn fill_tcp_table(h: &mut Harness, entries: u16) -> Vec<FlowKey> {
    (0..entries)
        .map(|i| {
            let port = 20_000 + i;
            h.pass(
                Hook::Egress,
                &eth_ip(&ipv4(CLIENT4, SERVER4, TCP, &tcp(port, 443, SYN, b""))),
            );
            key(TCP, (CLIENT4.into(), port), (SERVER4.into(), 443)).0
        })
        .collect()
}

/// Every counted mark, by key.
fn marks(h: &Harness) -> std::collections::HashMap<FlowKey, u64> {
    let mut marks = std::collections::HashMap::new();
    let n = h
        .datapath
        .for_each_reported(|key, first_seen| {
            assert!(marks.insert(key, first_seen).is_none(), "{key} read twice");
        })
        .unwrap_or_else(|e| panic!("reading the counted marks: {}", testrun::error_chain(&e)));
    assert_eq!(n, marks.len());
    marks
}

/// Marking counted flows writes the map of counted flows only: a table full to the last entry
/// keeps every flow, each with its counters untouched, however many are marked. (Marking by
/// rewriting the table entry, as before, failed this: an LRU update from user space takes a
/// free node before it replaces the old one, and a full table has none, so the kernel evicted
/// other flows to make room for each rewrite.)
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn marking_counted_flows_evicts_nothing_from_a_full_table() {
    const ENTRIES: u16 = 512;
    let _cpu = OnOneCpu::pin();
    let mut h = Harness::with_config(&DatapathConfig {
        flow_table_entries: u32::from(ENTRIES),
        ..DatapathConfig::default()
    });
    let before = h.counters();
    let keys = fill_tcp_table(&mut h, ENTRIES);
    let n = u64::from(ENTRIES);
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, n),
            (Counter::FlowCreated, n),
            (Counter::EventsSent, n),
        ],
    );
    let full: std::collections::HashMap<FlowKey, FlowState> = keys
        .iter()
        .map(|k| {
            let state = h
                .flow(k)
                .unwrap_or_else(|| panic!("{k} evicted before the table was full"));
            (*k, state)
        })
        .collect();
    assert_eq!(h.flow_count(), usize::from(ENTRIES), "the table is full");

    for (k, state) in &full {
        h.datapath
            .mark_reported(k, state.first_seen_ns)
            .unwrap_or_else(|e| panic!("marking {k}: {}", testrun::error_chain(&e)));
    }
    for (k, state) in &full {
        assert_eq!(
            h.flow(k).as_ref(),
            Some(state),
            "{k} evicted or changed by marking"
        );
    }
    assert_eq!(h.flow_count(), usize::from(ENTRIES), "nothing evicted");
    let expected: std::collections::HashMap<FlowKey, u64> =
        full.iter().map(|(k, s)| (*k, s.first_seen_ns)).collect();
    assert!(
        marks(&h) == expected,
        "every flow marked with its entry's first packet"
    );
    // No packet went anywhere but the table: counters as after the fill.
    assert_counters(
        &h,
        &before,
        &[
            (Counter::PacketsSeen, n),
            (Counter::FlowCreated, n),
            (Counter::EventsSent, n),
        ],
    );
}

/// The map of counted flows holds three tables' worth of marks and refuses a fourth table's
/// with `E2BIG` (what the stream counts in `flow_auditor_reported_mark_failures_total`); a mark
/// rewritten takes no room, and one forgotten makes room.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn a_full_map_of_counted_flows_refuses_new_marks() {
    const ENTRIES: u16 = 64;
    let mut h = Harness::with_config(&DatapathConfig {
        flow_table_entries: u32::from(ENTRIES),
        ..DatapathConfig::default()
    });
    let capacity = 3 * ENTRIES;
    let keys: Vec<FlowKey> = (0..=capacity)
        .map(|i| key(UDP, (CLIENT4.into(), 10_000 + i), (SERVER4.into(), 53)).0)
        .collect();
    for (first_seen, k) in (1u64..).zip(&keys[..usize::from(capacity)]) {
        h.datapath
            .mark_reported(k, first_seen)
            .unwrap_or_else(|e| panic!("mark {k}: {}", testrun::error_chain(&e)));
    }
    let last = &keys[usize::from(capacity)];
    let errno = |r: Result<(), LoadError>| match r {
        Ok(()) => None,
        Err(LoadError::Map {
            source: MapError::SyscallError(e),
            ..
        }) => e.io_error.raw_os_error(),
        Err(e) => panic!("not a system call's failure: {}", testrun::error_chain(&e)),
    };
    assert_eq!(
        errno(h.datapath.mark_reported(last, 7)),
        Some(libc::E2BIG),
        "a mark past the map's size"
    );
    assert_eq!(
        errno(h.datapath.mark_reported(&keys[0], 99)),
        None,
        "a rewrite"
    );
    assert_eq!(marks(&h).get(&keys[0]), Some(&99));
    h.datapath
        .forget_reported(&keys[1])
        .unwrap_or_else(|e| panic!("forget: {}", testrun::error_chain(&e)));
    h.datapath
        .forget_reported(&keys[1])
        .unwrap_or_else(|e| panic!("forget a missing mark: {}", testrun::error_chain(&e)));
    assert_eq!(errno(h.datapath.mark_reported(last, 7)), None, "room again");
    let marks = marks(&h);
    assert_eq!(marks.len(), usize::from(capacity));
    assert!(!marks.contains_key(&keys[1]) && marks.get(last) == Some(&7));
}

/// The map of counted flows is pinned beside the flow tables and handled like them: adopted
/// with its marks by a datapath of the same size, replaced (empty, the new size) when the size
/// changes, and removed with another layout's pins.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn the_counted_marks_are_pinned_adopted_and_replaced_with_the_tables() {
    let pins = bpffs::PinDir::new("tr-marks");
    let config = |entries| DatapathConfig {
        flow_table_entries: entries,
        ..DatapathConfig::default()
    };
    let load = |entries| {
        Datapath::load_pinned(&config(entries), Some(pins.path()))
            .unwrap_or_else(|e| panic!("load pinned: {}", testrun::error_chain(&e)))
    };
    let (k, _) = key(UDP, (CLIENT4.into(), 10_000), (SERVER4.into(), 53));
    let mut first = load(128);
    assert!(first.pinned().is_some_and(|p| !p.adopted));
    first
        .mark_reported(&k, 42)
        .unwrap_or_else(|e| panic!("mark: {}", testrun::error_chain(&e)));
    let dir = first
        .pinned()
        .map_or_else(|| panic!("not pinned"), |p| p.dir.clone());
    drop(first);
    let layout = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut pinned: Vec<String> = PINNED.iter().map(|name| (*name).to_owned()).collect();
    pinned.sort();
    assert_eq!(pins.list(&layout), pinned, "the tables and the marks");
    let info = |entries: u32| {
        let info = MapInfo::from_pin(dir.join(REPORTED_MAP))
            .unwrap_or_else(|e| panic!("{REPORTED_MAP} pinned: {e}"));
        assert_eq!(
            (info.max_entries(), info.key_size(), info.value_size()),
            (3 * entries, 40, 8),
            "{REPORTED_MAP}: three tables' entries of FlowKey -> u64"
        );
        assert!(matches!(info.map_type(), Ok(MapType::Hash)), "a plain hash");
    };
    info(128);

    let second = load(128);
    assert!(
        second.pinned().is_some_and(|p| p.adopted),
        "same size: adopted"
    );
    let adopted = Harness { datapath: second };
    assert_eq!(marks(&adopted).get(&k), Some(&42), "the mark survived");
    drop(adopted);

    let third = load(256);
    assert!(
        third.pinned().is_some_and(|p| !p.adopted),
        "another size: replaced"
    );
    let replaced = Harness { datapath: third };
    assert!(marks(&replaced).is_empty(), "the replaced map is new");
    info(256);
}
