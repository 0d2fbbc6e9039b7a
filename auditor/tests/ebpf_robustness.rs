//! Robustness of the TC program: 120,000 random and mutated packets (seeded, so a failure replays
//! exactly) through `BPF_PROG_TEST_RUN`. No run may fail, every run must return
//! `TC_ACT_UNSPEC`, and the counters, events and flow table must add up afterwards.

#[path = "common/packets.rs"]
mod packets;
#[path = "common/testrun.rs"]
mod testrun;

use std::net::{Ipv4Addr, Ipv6Addr};

use auditor::datapath::load::{DatapathConfig, TABLES, table_index};
use auditor_ebpf::flow::{Counter, EventKind, FlowStatus, Hook, Side, first_seen};
use packets::*;
use testrun::{Harness, PASS};

const SEED: u64 = 0x00F1_0A0D_17ED;
const PACKETS: u32 = 120_000;
/// Small, so the LRU evicts during the run.
const FLOW_TABLE: u32 = 2048;

/// The shortest frame `TestRun` accepts for an `EtherType`: it refuses (EINVAL) an IPv4 or IPv6
/// frame shorter than the fixed IP header, and anything under an Ethernet header.
fn min_len(frame: &[u8]) -> usize {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => 14 + 20,
        ETH_P_IPV6 => 14 + 40,
        _ => 14,
    }
}

fn addr4(rng: &mut Rng) -> Ipv4Addr {
    // A handful of addresses so flows repeat and get answered.
    let pool = [
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(192, 0, 2, 2),
        Ipv4Addr::new(198, 51, 100, 7),
        Ipv4Addr::new(203, 0, 113, 9),
        Ipv4Addr::new(8, 0, 0, 1),
    ];
    pool[rng.index(5)]
}

fn addr6(rng: &mut Rng) -> Ipv6Addr {
    let pool = [
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
        Ipv6Addr::new(0x2001, 0xdb8, 0x86dd, 0, 0, 0, 0, 3),
    ];
    pool[rng.index(3)]
}

fn port(rng: &mut Rng) -> u16 {
    [22, 53, 80, 443, 5000, 40_000, 40_001][rng.index(7)]
}

/// A well-formed transport payload for `proto` (family `v6` for ICMP).
fn transport(rng: &mut Rng, proto: u8, v6: bool) -> Vec<u8> {
    let (sp, dp) = (port(rng), port(rng));
    match proto {
        TCP => {
            let flags = [
                SYN,
                SYN | ACK,
                ACK,
                PSH | ACK,
                FIN | ACK,
                RST,
                RST | ACK,
                rng.byte(),
            ];
            tcp(sp, dp, flags[rng.index(8)], &rng.bytes_below(40))
        }
        UDP => udp(sp, dp, &rng.bytes_below(40)),
        SCTP => sctp(sp, dp, &rng.bytes(16)),
        _ if v6 => icmpv6_echo(rng.chance(50), u16::try_from(rng.below(4)).unwrap_or(0), 1),
        _ => icmp_echo(rng.chance(50), u16::try_from(rng.below(4)).unwrap_or(0), 1),
    }
}

/// A well-formed packet of some kind: Ethernet or bare L3, v4 or v6, with the occasional
/// extension header, fragment or ICMP error quoting another packet.
fn valid(rng: &mut Rng) -> Vec<u8> {
    let v6 = rng.chance(40);
    let proto = [TCP, UDP, SCTP, if v6 { ICMPV6 } else { ICMP }][rng.index(4)];
    let ip_packet = if v6 {
        let (s, d) = (addr6(rng), addr6(rng));
        let l4 = transport(rng, proto, true);
        if rng.chance(10) {
            let inner = ipv6(d, s, UDP, &udp(port(rng), port(rng), b"q"));
            ipv6(s, d, ICMPV6, &icmpv6_unreachable(4, &inner))
        } else {
            let mut ext = Vec::new();
            for _ in 0..rng.below(4) {
                match rng.below(3) {
                    0 => ext.push((0u8, vec![1, 4, 0, 0, 0, 0])),
                    1 => ext.push((60u8, vec![1, 4, 0, 0, 0, 0])),
                    _ => ext.push((44u8, vec![0, u8::from(rng.chance(30)) << 3, 0, 0, 0, 1])),
                }
            }
            ipv6_ext(s, d, &ext, proto, &l4)
        }
    } else {
        let (s, d) = (addr4(rng), addr4(rng));
        let l4 = transport(rng, proto, false);
        if rng.chance(10) {
            let inner = ipv4(d, s, UDP, &udp(port(rng), port(rng), b"q"));
            ipv4(s, d, ICMP, &icmp_unreachable(3, &inner))
        } else if rng.chance(5) {
            ipv4_frag(s, d, proto, 0x0001, &l4)
        } else {
            ipv4(s, d, proto, &l4)
        }
    };
    // Bare L3 only where TestRun would see the right protocol (see ebpf_testrun's L3 test).
    if rng.chance(10) && (ip_packet[12..14] == [0x08, 0x00] || ip_packet[12..14] == [0x86, 0xdd]) {
        ip_packet
    } else {
        eth_ip(&ip_packet)
    }
}

/// A random frame: random bytes behind an `EtherType` that is usually IPv4 or IPv6.
fn random(rng: &mut Rng) -> Vec<u8> {
    let len = 14 + rng.index(300);
    let mut f = rng.bytes(len);
    match rng.below(10) {
        0..=4 => f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes()),
        5..=7 => f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes()),
        _ => {}
    }
    if rng.chance(50) && f.len() > 14 {
        // A plausible version nibble, so parsing gets past the first check more often.
        f[14] = (f[14] & 0x0f) | if f[13] == 0xdd { 0x60 } else { 0x40 };
    }
    f
}

/// `frame` with a few bytes changed and perhaps cut short.
fn mutate(rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        let i = rng.index(frame.len());
        frame[i] = rng.byte();
    }
    if rng.chance(40) {
        let cut = rng.index(frame.len() + 1);
        frame.truncate(cut.max(14));
    }
    frame
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn random_and_mutated_packets_never_fail_and_counters_add_up() {
    let mut h = Harness::with_config(&DatapathConfig {
        flow_table_entries: FLOW_TABLE,
        events_bytes: 1024 * 1024,
        sample_every: 1,
        kernel_log: false,
        ..DatapathConfig::default()
    });
    let before = h.counters();
    let mut rng = Rng::new(SEED);
    let mut sent = 0u64;
    let mut expected_non_ip = 0u64;
    let mut events = 0u64;
    let mut created_events = 0u64;
    for i in 0..PACKETS {
        let mut frame = match rng.below(3) {
            0 => valid(&mut rng),
            1 => {
                let v = valid(&mut rng);
                mutate(&mut rng, v)
            }
            _ => random(&mut rng),
        };
        // Pad what TestRun would refuse; the padding is random too.
        while frame.len() < min_len(&frame) {
            frame.push(rng.byte());
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
            expected_non_ip += 1;
        }
        let hook = if rng.chance(50) {
            Hook::Ingress
        } else {
            Hook::Egress
        };
        let rc = h.run(hook, &frame);
        assert_eq!(
            rc, PASS,
            "packet {i} (seed {SEED:#x}): return code {rc:#x}, frame {frame:02x?}"
        );
        sent += 1;
        if i % 512 == 511 {
            for e in h.events() {
                events += 1;
                let kind = e
                    .kind()
                    .unwrap_or_else(|| panic!("event with unknown kind: {e:?}"));
                created_events += u64::from(kind == EventKind::New);
                assert!(
                    e.initiator().is_some() && e.hook().is_some(),
                    "bad event {e:?}"
                );
                assert!(
                    [
                        first_seen::OPENING,
                        first_seen::MID_STREAM,
                        first_seen::ANSWER
                    ]
                    .contains(&e.mid_stream),
                    "bad event {e:?}"
                );
            }
        }
    }
    for e in h.events() {
        events += 1;
        created_events += u64::from(e.kind() == Some(EventKind::New));
    }

    let d = h.counters().since(&before);
    for c in Counter::ALL {
        eprintln!("{:>22} {}", c.name(), d.get(c));
    }
    let outcomes: u64 = Counter::OUTCOMES.iter().map(|c| d.get(*c)).sum();
    assert_eq!(
        outcomes, sent,
        "each packet lands in exactly one outcome counter"
    );
    assert_eq!(
        d.get(Counter::NonIp),
        expected_non_ip,
        "non-IP frames are those with another EtherType"
    );
    assert_eq!(
        d.get(Counter::EventsSent),
        events,
        "every event counted as sent was read back"
    );
    assert_eq!(
        d.get(Counter::EventsLost),
        0,
        "the ring buffer was drained often enough to lose none"
    );
    assert_eq!(
        d.get(Counter::FlowCreated),
        created_events,
        "one New event per created flow"
    );
    assert_eq!(
        d.get(Counter::InsertFailed),
        0,
        "an LRU table makes room instead of failing"
    );
    assert_eq!(d.get(Counter::SampledOut), 0, "sampling is off");
    for c in [
        Counter::Truncated,
        Counter::Malformed,
        Counter::Fragment,
        Counter::FlowCreated,
        Counter::FlowUpdated,
        Counter::IcmpErrorMatched,
    ] {
        assert!(d.get(c) > 0, "the mix must exercise {}: {d:?}", c.name());
    }

    let flows = match h.datapath.flows() {
        Ok(f) => f,
        Err(e) => panic!("opening the flow table failed: {e}"),
    };
    let mut entries = 0u32;
    let mut per_table = [0u32; TABLES.len()];
    for item in flows.iter() {
        let (key, state) = item.unwrap_or_else(|e| panic!("walking the flow table failed: {e}"));
        entries += 1;
        per_table[table_index(&key)] += 1;
        assert_eq!(key._pad, [0; 3], "key padding must be zero: {key:?}");
        assert!(state.status().is_some(), "bad status: {state:?}");
        assert!(
            matches!(state.initiator(), Some(Side::Lo | Side::Hi)),
            "bad initiator: {state:?}"
        );
        assert!(state.hook().is_some(), "bad hook: {state:?}");
        assert!(
            state.packets[0] + state.packets[1] >= 1,
            "a flow has at least one packet: {state:?}"
        );
        assert!(
            state.first_seen_ns <= state.last_seen_ns,
            "time runs forward: {state:?}"
        );
        assert!(
            state.mid_stream <= first_seen::ANSWER && state.answered <= 1,
            "mid_stream is a first_seen value, answered 0 or 1: {state:?}"
        );
        for from_initiator in [true, false] {
            let nibble = if from_initiator {
                state.owners & 0x0f
            } else {
                state.owners >> 4
            };
            assert!(
                nibble == 0 || state.owner(from_initiator).is_some(),
                "each owner is a hook or none: {state:?}"
            );
        }
        assert!(
            state.owner(true).is_some() || state.owner(false).is_some(),
            "the hook that created the flow owns a direction: {state:?}"
        );
        if state.status() == Some(FlowStatus::Answered) {
            assert_eq!(
                state.answered, 1,
                "an answered flow has its answered flag: {state:?}"
            );
        }
        assert_eq!(
            (state.nat, state._reserved),
            (0, [0; 7]),
            "the program writes its reserved bytes as zero: {state:?}"
        );
    }
    // The map of counted flows is user space's alone: no packet wrote to it.
    let marks = h
        .datapath
        .for_each_reported(|key, first_seen| panic!("a mark no one wrote: {key} {first_seen}"))
        .unwrap_or_else(|e| panic!("reading the map of counted flows failed: {e}"));
    assert_eq!(marks, 0);
    // Each table is bounded on its own.
    assert!(
        per_table.iter().all(|n| *n <= FLOW_TABLE),
        "{per_table:?} entries ({TABLES:?}) in tables of {FLOW_TABLE}"
    );
    assert!(
        per_table.iter().all(|n| *n > 0),
        "the mix must fill every table: {per_table:?} ({TABLES:?})"
    );
    assert!(
        u64::from(entries) <= d.get(Counter::FlowCreated),
        "every entry was created by a packet"
    );
}
