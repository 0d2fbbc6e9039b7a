//! Reduces a packet to what flow tracking needs: the normalised flow key, who sent it, its TCP
//! flags, or, for an ICMP destination unreachable, the flow it is about. Works on Ethernet and on
//! L3-only devices, IPv4 and IPv6 (extension headers skipped, bounded). Every read is bounds
//! checked against the packet; a failure is the [`Counter`] the packet ends up in.

use auditor_ebpf::{
    MAX_HEADER_BYTES,
    flow::{Counter, FlowKey, FlowKey4, Side, ipv4_mapped, proto, tcp_flags},
};
use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};

const ETH_HLEN: usize = 14;
/// `skb->protocol` values, as the kernel stores them (network byte order in the low 16 bits).
pub const PROTO_IPV4: u32 = 0x0800u16.to_be() as u32;
pub const PROTO_IPV6: u32 = 0x86DDu16.to_be() as u32;
const MAX_OFF: usize = MAX_HEADER_BYTES as usize;
/// IPv6 extension headers walked before giving up (Malformed). Real traffic rarely has more than
/// two; the bound keeps the verifier's work small.
const IPV6_MAX_EXT_HEADERS: usize = 6;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// What a packet says about who started its flow, if it is the first packet seen of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// An opening packet: TCP SYN without ACK, ICMP echo request, any UDP or SCTP packet.
    Opening,
    /// Can only be an answer: TCP SYN-ACK, ICMP echo reply. Its receiver started the flow.
    Answer,
    /// Anything else (TCP without SYN): the flow was already going when we first saw it.
    MidStream,
}

/// Which [`Opening`] a TCP packet with `flags` is.
#[inline(always)]
fn tcp_opening(flags: u8) -> Opening {
    match flags & (tcp_flags::SYN | tcp_flags::ACK) {
        tcp_flags::SYN => Opening::Opening,
        f if f == tcp_flags::SYN | tcp_flags::ACK => Opening::Answer,
        _ => Opening::MidStream,
    }
}

/// A packet of a flow, keyed for the table it belongs in: [`FlowKey4`] on the IPv4 fast path,
/// [`FlowKey`] everywhere else.
pub struct Seen<K = FlowKey> {
    pub key: K,
    /// The sender's side of `key`.
    pub sender: Side,
    /// TCP flags byte; 0 for other protocols.
    pub tcp_flags: u8,
    /// The [`Opening`] of anything but TCP; `None` for TCP, whose opening follows from
    /// `tcp_flags` and is worked out only when needed ([`Seen::opening`]): an established
    /// flow's packet never needs it.
    opening: Option<Opening>,
}

impl<K> Seen<K> {
    /// What this packet says about who started its flow.
    #[inline(always)]
    pub fn opening(&self) -> Opening {
        match self.opening {
            Some(opening) => opening,
            None => tcp_opening(self.tcp_flags),
        }
    }
}

/// What a parsed packet is.
pub enum Parsed {
    Flow(Seen),
    /// An ICMP/ICMPv6 destination unreachable quoting a packet that `sender` sent in `key`.
    Unreachable {
        key: FlowKey,
        sender: Side,
    },
}

/// Bounds-checked direct access to the linear part of the packet.
struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    /// The `N` bytes at `off`, read in place, or `None` when they are not in the packet (or
    /// beyond [`MAX_HEADER_BYTES`], which also keeps every offset bounded for the verifier).
    /// In place rather than copied: copies of headers filled the 512-byte BPF stack.
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<&[u8; N]> {
        if off > MAX_OFF {
            return None;
        }
        let at = self.start + off;
        if at + N > self.end {
            return None;
        }
        // SAFETY: `at..at + N` was just checked to lie inside the packet's linear data, which
        // stays put for the program run (we pull only before parsing), and a byte array has no
        // alignment requirement.
        Some(unsafe { &*(at as *const [u8; N]) })
    }
}

/// Parses the packet in `ctx`; `skb_protocol` is `skb->protocol`, already known to be
/// [`PROTO_IPV4`] or [`PROTO_IPV6`].
///
/// A BPF subprogram, not inlined: it has many paths, each with its own temporaries, and inlined
/// into the caller (once per retry) they pushed one frame past the verifier's 512 bytes.
#[inline(never)]
pub fn parse(ctx: &TcContext, skb_protocol: u32) -> Result<Parsed, Counter> {
    let (start, end) = bounds(ctx);
    let pkt = Packet { start, end };
    let v6 = skb_protocol == PROTO_IPV6;
    let version = if v6 { 6 } else { 4 };
    let l3 = network_offset(&pkt, skb_protocol, version)?;
    if v6 { ipv6(&pkt, l3) } else { ipv4(&pkt, l3) }
}

/// Where the IP header starts: 14 on Ethernet devices, 0 on L3-only devices (tunl0, WireGuard),
/// decided per packet because one program serves both kinds.
///
/// An Ethernet frame always repeats `skb->protocol` as its EtherType (the kernel derived the one
/// from the other; VLAN tags are offloaded or make the protocol non-IP), followed by the right
/// IP version nibble. An L3 packet matches that only if its source address happens to put the
/// EtherType at bytes 12-13 and the version nibble at byte 14 (IPv4 sources in 8.0.64.0/20,
/// IPv6 sources with bytes 4-6 = 86:dd:6x); such a packet is read from offset 14, fails the
/// header checks and is counted, never mis-keyed silently. Cilium avoids the question by
/// compiling one program per device type; we keep one program and one attach path.
#[inline(always)]
fn network_offset(pkt: &Packet, skb_protocol: u32, version: u8) -> Result<usize, Counter> {
    if let Some(eth) = pkt.load::<{ ETH_HLEN + 1 }>(0) {
        let ethertype = u16::from_ne_bytes([eth[12], eth[13]]) as u32;
        if ethertype == skb_protocol && eth[14] >> 4 == version {
            return Ok(ETH_HLEN);
        }
    }
    // Two bytes, not one: LLVM turns a one-byte bounds check into `data >= data_end`, which the
    // verifier does not accept as proof. No IP header is shorter anyway.
    let first = pkt.load::<2>(0).ok_or(Counter::Truncated)?;
    if first[0] >> 4 == version {
        return Ok(0);
    }
    // Neither layout fits. A frame that is an Ethernet header and nothing more is truncated.
    match pkt.load::<ETH_HLEN>(0) {
        Some(eth) if u16::from_ne_bytes([eth[12], eth[13]]) as u32 == skb_protocol => {
            if pkt.load::<{ ETH_HLEN + 1 }>(0).is_none() {
                Err(Counter::Truncated)
            } else {
                Err(Counter::Malformed)
            }
        }
        _ => Err(Counter::Malformed),
    }
}

#[inline(always)]
fn ipv4(pkt: &Packet, l3: usize) -> Result<Parsed, Counter> {
    let h = pkt.load::<20>(l3).ok_or(Counter::Truncated)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(Counter::Malformed);
    }
    if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        return Err(Counter::Fragment);
    }
    let src = ipv4_mapped([h[12], h[13], h[14], h[15]]);
    let dst = ipv4_mapped([h[16], h[17], h[18], h[19]]);
    transport(pkt, l3 + ihl, h[9], src, dst, false)
}

#[inline(always)]
fn ipv6(pkt: &Packet, l3: usize) -> Result<Parsed, Counter> {
    let h = pkt.load::<40>(l3).ok_or(Counter::Truncated)?;
    if h[0] >> 4 != 6 {
        return Err(Counter::Malformed);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut off = l3 + 40;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let e = pkt.load::<2>(off).ok_or(Counter::Truncated)?;
                next = e[0];
                off += (usize::from(e[1]) + 1) * 8;
            }
            IPV6_AUTH => {
                let e = pkt.load::<2>(off).ok_or(Counter::Truncated)?;
                next = e[0];
                off += (usize::from(e[1]) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let e = pkt.load::<4>(off).ok_or(Counter::Truncated)?;
                if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                    return Err(Counter::Fragment);
                }
                next = e[0];
                off += 8;
            }
            _ => return transport(pkt, off, next, src, dst, true),
        }
    }
    Err(Counter::Malformed)
}

#[inline(always)]
fn transport(
    pkt: &Packet,
    off: usize,
    protocol: u8,
    src: [u8; 16],
    dst: [u8; 16],
    v6: bool,
) -> Result<Parsed, Counter> {
    let (sport, dport, flags, opening) = match protocol {
        proto::TCP => {
            let h = pkt.load::<20>(off).ok_or(Counter::Truncated)?;
            (be16(h[0], h[1]), be16(h[2], h[3]), h[13], None)
        }
        proto::UDP => {
            let h = pkt.load::<8>(off).ok_or(Counter::Truncated)?;
            (
                be16(h[0], h[1]),
                be16(h[2], h[3]),
                0,
                Some(Opening::Opening),
            )
        }
        proto::SCTP => {
            let h = pkt.load::<12>(off).ok_or(Counter::Truncated)?;
            (
                be16(h[0], h[1]),
                be16(h[2], h[3]),
                0,
                Some(Opening::Opening),
            )
        }
        proto::ICMP if !v6 => {
            let h = pkt.load::<8>(off).ok_or(Counter::Truncated)?;
            let id = be16(h[4], h[5]);
            match h[0] {
                ICMP_ECHO_REQUEST => (id, id, 0, Some(Opening::Opening)),
                ICMP_ECHO_REPLY => (id, id, 0, Some(Opening::Answer)),
                // "Fragmentation needed" is path MTU discovery, not a refusal.
                ICMP_DEST_UNREACH if h[1] != ICMP_FRAG_NEEDED => return quoted_v4(pkt, off + 8),
                _ => return Err(Counter::IcmpOther),
            }
        }
        proto::ICMPV6 if v6 => {
            let h = pkt.load::<8>(off).ok_or(Counter::Truncated)?;
            let id = be16(h[4], h[5]);
            match h[0] {
                ICMPV6_ECHO_REQUEST => (id, id, 0, Some(Opening::Opening)),
                ICMPV6_ECHO_REPLY => (id, id, 0, Some(Opening::Answer)),
                ICMPV6_DEST_UNREACH => return quoted_v6(pkt, off + 8),
                _ => return Err(Counter::IcmpOther),
            }
        }
        _ => return Err(Counter::OtherProtocol),
    };
    let (key, sender) = FlowKey::new(protocol, src, sport, dst, dport);
    Ok(Parsed::Flow(Seen {
        key,
        sender,
        tcp_flags: flags,
        opening,
    }))
}

/// The packet quoted by an ICMP destination unreachable (its IP header and at least 8 bytes
/// after). Anything unusable is [`Counter::IcmpErrorUnmatched`]: the error is about nothing we
/// can name.
#[inline(always)]
fn quoted_v4(pkt: &Packet, off: usize) -> Result<Parsed, Counter> {
    let h = pkt.load::<20>(off).ok_or(Counter::IcmpErrorUnmatched)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(Counter::IcmpErrorUnmatched);
    }
    let src = ipv4_mapped([h[12], h[13], h[14], h[15]]);
    let dst = ipv4_mapped([h[16], h[17], h[18], h[19]]);
    quoted_transport(
        pkt,
        off + ihl,
        h[9],
        src,
        dst,
        proto::ICMP,
        ICMP_ECHO_REQUEST,
    )
}

/// As [`quoted_v4`] for ICMPv6. The quoted packet's extension headers are not walked: an error
/// about such a packet is counted as unmatched.
#[inline(always)]
fn quoted_v6(pkt: &Packet, off: usize) -> Result<Parsed, Counter> {
    let h = pkt.load::<40>(off).ok_or(Counter::IcmpErrorUnmatched)?;
    if h[0] >> 4 != 6 {
        return Err(Counter::IcmpErrorUnmatched);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    quoted_transport(
        pkt,
        off + 40,
        h[6],
        src,
        dst,
        proto::ICMPV6,
        ICMPV6_ECHO_REQUEST,
    )
}

#[inline(always)]
fn quoted_transport(
    pkt: &Packet,
    off: usize,
    protocol: u8,
    src: [u8; 16],
    dst: [u8; 16],
    icmp: u8,
    echo_request: u8,
) -> Result<Parsed, Counter> {
    let h = pkt.load::<8>(off).ok_or(Counter::IcmpErrorUnmatched)?;
    let (sport, dport) = match protocol {
        proto::TCP | proto::UDP | proto::SCTP => (be16(h[0], h[1]), be16(h[2], h[3])),
        p if p == icmp && h[0] == echo_request => {
            let id = be16(h[4], h[5]);
            (id, id)
        }
        _ => return Err(Counter::IcmpErrorUnmatched),
    };
    let (key, sender) = FlowKey::new(protocol, src, sport, dst, dport);
    Ok(Parsed::Unreachable { key, sender })
}

#[inline(always)]
const fn be16(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

/// The fast path's parser for IPv4: an Ethernet frame carrying IPv4 without options, not a later
/// fragment, then TCP or UDP, read with a few word loads straight into the narrow key. `None` for
/// anything else (or too short), which [`parse`] then handles and counts; for every packet this
/// accepts, [`parse`] would return the same [`Seen`], its key narrowed.
///
/// Inlined into the program, unlike [`parse`]: its few temporaries fit the caller's frame, and the
/// BPF-to-BPF call, byte-by-byte address copies, the returned enum and the wide key (built, then
/// narrowed) were most of the cost of an established-flow packet.
#[inline(always)]
pub fn fast4(ctx: &TcContext) -> Option<Seen<FlowKey4>> {
    let (start, end) = bounds(ctx);
    // Ethernet + 20-byte IPv4 header + the 8 bytes every transport needs for its ports.
    if start + ETH_HLEN + 20 + 8 > end {
        return None;
    }
    // SAFETY: the 42 bytes at `start` were just checked to lie in the packet.
    let (head, frag_proto, src, dst, ports) = unsafe {
        (
            // EtherType, version and IHL, TOS.
            word::<u32>(start + 12),
            // Flags and fragment offset, TTL, protocol.
            word::<u32>(start + ETH_HLEN + 6),
            word::<u32>(start + ETH_HLEN + 12),
            word::<u32>(start + ETH_HLEN + 16),
            word::<u32>(start + ETH_HLEN + 20),
        )
    };
    // EtherType IPv4, version 4 with IHL 5 (so the network offset is 14, as `network_offset`
    // decides), and not a later fragment (the offset's 13 bits of the big-endian field).
    const HEAD_MASK: u32 = u32::from_ne_bytes([0xff, 0xff, 0xff, 0]);
    const HEAD_IPV4: u32 = u32::from_ne_bytes([0x08, 0x00, 0x45, 0]);
    const FRAG_OFFSET: u32 = u32::from_ne_bytes([0x1f, 0xff, 0, 0]);
    if head & HEAD_MASK != HEAD_IPV4 || frag_proto & FRAG_OFFSET != 0 {
        return None;
    }
    let protocol = frag_proto.to_ne_bytes()[3];
    seen_fast(
        start + ETH_HLEN + 20,
        end,
        protocol,
        ports,
        |sport, dport| FlowKey4::from_native(protocol, src, sport, dst, dport),
    )
}

/// [`fast4`] for IPv6 without extension headers, into the wide key.
#[inline(always)]
pub fn fast6(ctx: &TcContext) -> Option<Seen> {
    let (start, end) = bounds(ctx);
    if start + ETH_HLEN + 40 + 8 > end {
        return None;
    }
    // SAFETY: the 62 bytes at `start` were just checked to lie in the packet.
    let (ethertype, version, protocol, s0, s1, d0, d1, ports) = unsafe {
        (
            word::<u16>(start + 12),
            word::<u8>(start + ETH_HLEN),
            word::<u8>(start + ETH_HLEN + 6),
            word::<u64>(start + ETH_HLEN + 8),
            word::<u64>(start + ETH_HLEN + 16),
            word::<u64>(start + ETH_HLEN + 24),
            word::<u64>(start + ETH_HLEN + 32),
            word::<u32>(start + ETH_HLEN + 40),
        )
    };
    if u32::from(ethertype) != PROTO_IPV6 || version >> 4 != 6 {
        return None;
    }
    seen_fast(
        start + ETH_HLEN + 40,
        end,
        protocol,
        ports,
        |sport, dport| FlowKey::from_words(protocol, [s0, s1], sport, [d0, d1], dport),
    )
}

/// The fast parsers' common end: the transport at `l4` (its first word, the ports, already
/// loaded as `ports`), then the key `key` builds from the source and destination port.
#[inline(always)]
fn seen_fast<K>(
    l4: usize,
    end: usize,
    protocol: u8,
    ports: u32,
    key: impl FnOnce(u16, u16) -> (K, Side),
) -> Option<Seen<K>> {
    let (flags, opening) = transport_fast(l4, end, protocol)?;
    let (sport, dport) = ports_of(ports);
    let (key, sender) = key(sport, dport);
    Some(Seen {
        key,
        sender,
        tcp_flags: flags,
        opening,
    })
}

/// The packet's linear data, `(start, end)`.
///
/// Volatile loads, so LLVM cannot hoist them into a caller and pass the packet pointers to a
/// subprogram as (zero-extended) integer arguments, which the verifier rejects as pointer
/// arithmetic.
#[inline(always)]
fn bounds(ctx: &TcContext) -> (usize, usize) {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the context of a TC program is the kernel's `__sk_buff` view, valid for the run.
    unsafe {
        (
            core::ptr::read_volatile(&raw const (*skb).data) as usize,
            core::ptr::read_volatile(&raw const (*skb).data_end) as usize,
        )
    }
}

/// The fast path's transport: TCP flags for TCP (its 20-byte header must be in the packet), with
/// the opening left to [`Seen::opening`]; UDP; else `None`. The caller checked that 8 bytes at
/// `l4` are in the packet.
#[inline(always)]
fn transport_fast(l4: usize, end: usize, protocol: u8) -> Option<(u8, Option<Opening>)> {
    if protocol == proto::TCP {
        if l4 + 20 > end {
            return None;
        }
        // SAFETY: just checked.
        let flags = unsafe { word::<u8>(l4 + 13) };
        Some((flags, None))
    } else if protocol == proto::UDP {
        Some((0, Some(Opening::Opening)))
    } else {
        None
    }
}

/// Source and destination port, host order, from the transport header's first word as loaded.
#[inline(always)]
const fn ports_of(ports: u32) -> (u16, u16) {
    let [s_hi, s_lo, d_hi, d_lo] = ports.to_ne_bytes();
    (be16(s_hi, s_lo), be16(d_hi, d_lo))
}

/// A `T` read at packet address `at`.
///
/// # Safety
/// `at..at + size_of::<T>()` must lie in the packet's linear data. Header fields sit at any
/// alignment there; the load is emitted as one instruction of `T`'s width, which the verifier
/// accepts for packet data on the architectures the kernel marks as having efficient unaligned
/// access (x86-64, arm64), the ones this program is built for.
#[inline(always)]
unsafe fn word<T: Copy>(at: usize) -> T {
    // SAFETY: in bounds per the caller; volatile so LLVM keeps it a single load of T's width
    // instead of splitting it by the alignment it can prove.
    unsafe { core::ptr::read_volatile(at as *const T) }
}
