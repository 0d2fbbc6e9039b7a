//! Crafted packets for the datapath tests and benchmark: Ethernet frames and bare IP packets
//! (as an L3 device hands them to TC), IPv4/IPv6 with optional extension headers, TCP, UDP,
//! SCTP, ICMP/ICMPv6 echo and destination unreachable. Checksums are filled where the format
//! has them cheaply (IPv4 header); the TC program never checks any.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// An Ethernet frame around `payload` (locally administered MACs).
pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An Ethernet frame around an IP packet, `EtherType` chosen from the IP version.
pub fn eth_ip(ip: &[u8]) -> Vec<u8> {
    let ethertype = if ip.first().is_some_and(|b| b >> 4 == 6) {
        ETH_P_IPV6
    } else {
        ETH_P_IP
    };
    eth(ethertype, ip)
}

/// An IPv4 packet (no options) carrying `payload` as protocol `proto`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_frag(src, dst, proto, 0, payload)
}

/// An IPv4 packet with the given flags/fragment-offset field (host order, e.g. 0x2000 = MF).
pub fn ipv4_frag(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet; `ext` are extension headers as (type, body) where body excludes the first two
/// bytes (next header, length) and is padded to the header's unit by the caller.
pub fn ipv6_ext(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ext: &[(u8, Vec<u8>)],
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    let mut first = proto;
    // Build back to front so each header knows its successor.
    let mut next = proto;
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for (kind, body) in ext.iter().rev() {
        let mut h = vec![next, 0];
        h.extend_from_slice(body);
        let len = match *kind {
            51 => (h.len() / 4).saturating_sub(2),
            44 => 0,
            _ => (h.len() / 8).saturating_sub(1),
        };
        h[1] = u8::try_from(len).unwrap_or(u8::MAX);
        parts.push(h);
        next = *kind;
        first = *kind;
    }
    for p in parts.iter().rev() {
        chain.extend_from_slice(p);
    }
    chain.extend_from_slice(payload);
    let len = u16::try_from(chain.len()).unwrap_or(u16::MAX);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[first, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&chain);
    h
}

/// An IPv6 packet without extension headers.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_ext(src, dst, &[], proto, payload)
}

/// An IP packet of the family of `src`/`dst` (both must be the same family).
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, payload),
        _ => panic!("mixed address families {src} and {dst}"),
    }
}

/// A TCP header (20 bytes, no options) with `flags`, followed by `payload`.
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1000u32.to_be_bytes());
    h.extend_from_slice(&2000u32.to_be_bytes());
    h.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h.extend_from_slice(payload);
    h
}

/// A UDP header and `payload`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// An SCTP common header (verification tag 0x01020304, checksum 0) and `chunks`.
pub fn sctp(sport: u16, dport: u16, chunks: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(12 + chunks.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4, 0, 0, 0, 0]);
    h.extend_from_slice(chunks);
    h
}

/// An ICMP or `ICMPv6` message: type, code, zero checksum, the 4-byte "rest of header", body.
pub fn icmp(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut h = vec![kind, code, 0, 0];
    h.extend_from_slice(&rest);
    h.extend_from_slice(body);
    h
}

/// ICMP (v4) echo request (`reply` false) or reply with identifier `id`.
pub fn icmp_echo(reply: bool, id: u16, seq: u16) -> Vec<u8> {
    let [a, b] = id.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    icmp(if reply { 0 } else { 8 }, 0, [a, b, c, d], b"ping")
}

/// `ICMPv6` echo request or reply with identifier `id`.
pub fn icmpv6_echo(reply: bool, id: u16, seq: u16) -> Vec<u8> {
    let [a, b] = id.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    icmp(if reply { 129 } else { 128 }, 0, [a, b, c, d], b"ping")
}

/// ICMP destination unreachable (`code` 3 = port unreachable) quoting `original` (an IPv4 packet,
/// cut to its header and 8 bytes as routers do).
pub fn icmp_unreachable(code: u8, original: &[u8]) -> Vec<u8> {
    let ihl = original.first().map_or(20, |b| usize::from(b & 0x0f) * 4);
    let quoted = &original[..original.len().min(ihl + 8)];
    icmp(3, code, [0; 4], quoted)
}

/// `ICMPv6` destination unreachable (`code` 4 = port unreachable) quoting `original`.
pub fn icmpv6_unreachable(code: u8, original: &[u8]) -> Vec<u8> {
    icmp(1, code, [0; 4], original)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// A small deterministic PRNG (xorshift64*), so the robustness test and the benchmark need no
/// dependency and replay exactly from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0), close enough for test data.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    /// Uniform index in `0..n` (n > 0).
    pub fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }

    /// Random bytes, up to `max - 1` of them.
    pub fn bytes_below(&mut self, max: usize) -> Vec<u8> {
        let len = self.index(max);
        self.bytes(len)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
