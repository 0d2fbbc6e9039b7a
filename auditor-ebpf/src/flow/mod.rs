//! Flow keys, per-flow state, the events the TC program sends to user space and its counters.
//! Every type here is `#[repr(C)]` and free of implicit padding, because the kernel hashes and
//! copies these bytes verbatim: both sides must agree on every byte, padding included.

#[cfg(feature = "user")]
mod user;

/// Which side of a [`FlowKey`] an endpoint is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The `lo_*` endpoint of the key.
    Lo = 0,
    /// The `hi_*` endpoint of the key.
    Hi = 1,
}

impl Side {
    /// Decodes a raw byte from a map value or event; `None` for anything the program never writes.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Self::Lo),
            1 => Some(Self::Hi),
            _ => None,
        }
    }
}

/// Which TC hook saw a packet, and on which kind of interface. Each has its own program (see
/// [`crate::PROGRAM_INGRESS`], [`crate::PROGRAM_UPLINK_INGRESS`]), so the hook is a constant of
/// the program, known without asking the kernel.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// TC ingress of a pod interface: the packet arrived from the pod.
    Ingress = 0,
    /// TC egress of a pod interface: the packet is being delivered to the pod.
    Egress = 1,
    /// TC ingress of an uplink (a native or tunnel device of the node): where a CNI that hands
    /// packets to pods with `bpf_redirect_peer` (Cilium's BPF host routing, its tunnels) is the
    /// last place they are seen before the pod. Encapsulation's outer packets are not flows here
    /// ([`Counter::Encapsulated`]).
    UplinkIngress = 2,
    /// TC egress of an uplink: hostNetwork and external traffic leaving the node.
    UplinkEgress = 3,
}

impl Hook {
    /// Every hook, in raw-value order.
    pub const ALL: [Self; 4] = [
        Self::Ingress,
        Self::Egress,
        Self::UplinkIngress,
        Self::UplinkEgress,
    ];

    /// Decodes a raw byte; `None` for anything the program never writes.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            2 => Some(Self::UplinkIngress),
            3 => Some(Self::UplinkEgress),
            _ => None,
        }
    }

    /// Whether this is a TC ingress hook (of either kind of interface).
    pub const fn is_ingress(self) -> bool {
        matches!(self, Self::Ingress | Self::UplinkIngress)
    }

    /// Whether this hook is on an uplink rather than a pod interface.
    pub const fn is_uplink(self) -> bool {
        matches!(self, Self::UplinkIngress | Self::UplinkEgress)
    }

    /// The value this hook has in [`FlowState::owners`]: never 0, which means "no hook yet".
    pub const fn owner(self) -> u8 {
        self as u8 + 1
    }
}

/// Destination UDP ports of encapsulation that is never a flow of its own on an uplink: VXLAN
/// (IANA's 4789, and 8472, the Linux kernel's old default that Cilium and Flannel use) and
/// Geneve (6081). WireGuard's port is configured ([`crate::WIREGUARD_PORT_GLOBAL`]).
pub const ENCAPSULATION_PORTS: [u16; 3] = [4789, 8472, 6081];

/// IP protocol numbers the program parses. Everything else is counted in
/// [`Counter::OtherProtocol`].
pub mod proto {
    /// ICMP (IPv4).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;
}

/// The values of [`FlowState::mid_stream`] and [`FlowEvent::mid_stream`].
pub mod first_seen {
    /// The opening packet was seen (TCP SYN, the first packet of a conversation).
    pub const OPENING: u8 = 0;
    /// First seen mid-stream: the initiator is the first sender, a guess.
    pub const MID_STREAM: u8 = 1;
    /// First seen at its answer (SYN-ACK, ICMP echo reply): the initiator is known.
    pub const ANSWER: u8 = 2;
}

/// TCP flag bits as they appear in [`FlowState::tcp_flags`] (the low byte of the TCP header's
/// flags field).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// A flow's identity, normalised so both directions of a conversation find the same entry.
///
/// The (address, port) endpoint that sorts lower under [`FlowKey::new`]'s order is `lo`, the other
/// `hi`; the order is an implementation detail, so use [`FlowState::initiator`] or
/// [`FlowEvent::initiator`] to orient a flow, never the order itself. Build keys only with
/// [`FlowKey::new`] so user space and the kernel normalise identically.
///
/// Aligned to 8 (its size already is a multiple of 8, so the layout is unchanged) so the
/// program builds the key on its stack with word stores rather than byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Address of the `lo` endpoint, network byte order. IPv4 uses the IPv4-mapped IPv6 form
    /// (`::ffff:a.b.c.d`), so one key type serves both families.
    pub lo_addr: [u8; 16],
    /// Address of the `hi` endpoint, same form as `lo_addr`.
    pub hi_addr: [u8; 16],
    /// Port of the `lo` endpoint, host byte order. For ICMP/ICMPv6 echo both ports hold the echo
    /// identifier, so each ping session is its own flow.
    pub lo_port: u16,
    /// Port of the `hi` endpoint, host byte order.
    pub hi_port: u16,
    /// IP protocol number, one of [`proto`]; ICMP echo over IPv4 is [`proto::ICMP`], over IPv6
    /// [`proto::ICMPV6`].
    pub proto: u8,
    /// Always zero: the kernel hashes these bytes too.
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// Builds the normalised key of a packet from `src` to `dst`, and says which side of the key
    /// the sender (`src`) is.
    #[inline(always)]
    pub fn new(
        proto: u8,
        src_addr: [u8; 16],
        src_port: u16,
        dst_addr: [u8; 16],
        dst_port: u16,
    ) -> (Self, Side) {
        if endpoint_lt(&src_addr, src_port, &dst_addr, dst_port) {
            let key = Self {
                lo_addr: src_addr,
                hi_addr: dst_addr,
                lo_port: src_port,
                hi_port: dst_port,
                proto,
                _pad: [0; 3],
            };
            (key, Side::Lo)
        } else {
            let key = Self {
                lo_addr: dst_addr,
                hi_addr: src_addr,
                lo_port: dst_port,
                hi_port: src_port,
                proto,
                _pad: [0; 3],
            };
            (key, Side::Hi)
        }
    }

    /// [`FlowKey::new`] with each address given as its two native-endian 64-bit words (the form
    /// the normalisation compares), for the program's fast path, which loads them that way.
    #[inline(always)]
    pub fn from_words(
        proto: u8,
        src_addr: [u64; 2],
        src_port: u16,
        dst_addr: [u64; 2],
        dst_port: u16,
    ) -> (Self, Side) {
        let [s0, s1] = src_addr;
        let [d0, d1] = dst_addr;
        let src_lt = if s0 != d0 {
            s0 < d0
        } else if s1 != d1 {
            s1 < d1
        } else {
            src_port < dst_port
        };
        let ((lo, lo_port), (hi, hi_port), sender) = if src_lt {
            ((src_addr, src_port), (dst_addr, dst_port), Side::Lo)
        } else {
            ((dst_addr, dst_port), (src_addr, src_port), Side::Hi)
        };
        let tail = key_tail(lo_port, hi_port, proto);
        let [lo0, lo1] = lo;
        let [hi0, hi1] = hi;
        // SAFETY: `FlowKey` is `repr(C)`, 40 bytes without padding, made of byte arrays and
        // integers for which every bit pattern is valid; these five words are its fields in
        // order (`_pad` zero), each address as the two native-endian words `words` reads back.
        // Built as words so the program stores five words, not 40 bytes one by one.
        let key = unsafe { core::mem::transmute::<[u64; 5], Self>([lo0, lo1, hi0, hi1, tail]) };
        (key, sender)
    }

    /// The endpoint on `side`: (address, port).
    pub const fn endpoint(&self, side: Side) -> ([u8; 16], u16) {
        match side {
            Side::Lo => (self.lo_addr, self.lo_port),
            Side::Hi => (self.hi_addr, self.hi_port),
        }
    }

    /// The key of the IPv4 flow table when both addresses are IPv4-mapped, else `None` (the
    /// flow belongs in the IPv6 table). Works on words, as the program needs it per packet.
    #[inline(always)]
    pub fn narrow(&self) -> Option<FlowKey4> {
        // SAFETY: `FlowKey` is 40 bytes, 8-aligned and without padding, so its bytes are five
        // initialised words.
        let [lo0, lo1, hi0, hi1, tail] = unsafe { core::mem::transmute::<Self, [u64; 5]>(*self) };
        let prefix = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        if lo0 != 0 || hi0 != 0 || half(lo1, true) != prefix || half(hi1, true) != prefix {
            return None;
        }
        let addrs = concat_words(half(lo1, false), half(hi1, false));
        // SAFETY: `FlowKey4` is 16 bytes without padding, every bit pattern valid: its addresses
        // word, then ports, protocol and zero padding laid out exactly as `FlowKey`'s last word.
        Some(unsafe { core::mem::transmute::<[u64; 2], FlowKey4>([addrs, tail]) })
    }
}

/// The last word of both key types: the bytes `[lo_port (native), hi_port (native), proto, 0, 0,
/// 0]` as one native word, written as shifts (the byte form compiled to a mask and an OR per
/// byte).
#[inline(always)]
const fn key_tail(lo_port: u16, hi_port: u16, proto: u8) -> u64 {
    let (lo, hi, proto) = (lo_port as u64, hi_port as u64, proto as u64);
    if cfg!(target_endian = "little") {
        lo | hi << 16 | proto << 32
    } else {
        lo << 48 | hi << 32 | proto << 24
    }
}

/// The bytes of `first` then those of `second` (each native) as one native word.
#[inline(always)]
const fn concat_words(first: u32, second: u32) -> u64 {
    let (first, second) = (first as u64, second as u64);
    if cfg!(target_endian = "little") {
        first | second << 32
    } else {
        first << 32 | second
    }
}

/// The first (`first`) or last four bytes of a native-endian word, as a native-endian `u32`.
#[inline(always)]
const fn half(w: u64, first: bool) -> u32 {
    if cfg!(target_endian = "little") == first {
        w as u32
    } else {
        (w >> 32) as u32
    }
}

/// The key of the IPv4 TCP flow table ([`crate::FLOWS4_TCP_MAP`]): a TCP [`FlowKey4`] without
/// the protocol, which the table implies, nor padding. Its 12 bytes are exactly the first 12 of
/// that [`FlowKey4`], so the program looks a TCP flow up through the key it already built.
///
/// TCP, the bulk of pod traffic, has this table of its own for the per-packet lookup: the kernel
/// hashes keys with jhash, which for up to 12 bytes runs only its final mixing round, so a
/// 12-byte key is the cheapest lookup (the lookup is most of an established packet's cost; see
/// `auditor/benches/datapath.rs` for what was measured).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKeyTcp4 {
    /// As [`FlowKey4::lo_addr`].
    pub lo_addr: [u8; 4],
    /// As [`FlowKey4::hi_addr`].
    pub hi_addr: [u8; 4],
    /// As [`FlowKey4::lo_port`].
    pub lo_port: u16,
    /// As [`FlowKey4::hi_port`].
    pub hi_port: u16,
}

impl FlowKeyTcp4 {
    /// The [`FlowKey4`] this key is the prefix of.
    pub const fn narrow4(&self) -> FlowKey4 {
        FlowKey4 {
            lo_addr: self.lo_addr,
            hi_addr: self.hi_addr,
            lo_port: self.lo_port,
            hi_port: self.hi_port,
            proto: proto::TCP,
            _pad: [0; 3],
        }
    }

    /// The [`FlowKey`] of this flow.
    pub const fn widen(&self) -> FlowKey {
        self.narrow4().widen()
    }
}

/// The key of the IPv4 flow tables: a [`FlowKey`] whose addresses are both IPv4-mapped, without
/// the 24 bytes all such keys share. TCP flows are in [`crate::FLOWS4_TCP_MAP`] under this key's
/// first 12 bytes ([`FlowKey4::tcp`]), the others in [`crate::FLOWS4_MAP`] under all 16. IPv4
/// flows have tables of their own because the kernel hashes and compares the whole key on every
/// packet, and 16 bytes cost markedly less than 40. Get one with [`FlowKey::narrow`];
/// [`FlowKey4::widen`] goes back.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    /// IPv4 address of the `lo` endpoint, network byte order.
    pub lo_addr: [u8; 4],
    /// IPv4 address of the `hi` endpoint, network byte order.
    pub hi_addr: [u8; 4],
    /// As [`FlowKey::lo_port`].
    pub lo_port: u16,
    /// As [`FlowKey::hi_port`].
    pub hi_port: u16,
    /// As [`FlowKey::proto`].
    pub proto: u8,
    /// Always zero: the kernel hashes these bytes too.
    pub _pad: [u8; 3],
}

impl FlowKey4 {
    /// [`FlowKey::new`] and [`FlowKey::narrow`] in one step, for the program's IPv4 fast path:
    /// the key of a packet from `src` to `dst`, and which side of it the sender is. The
    /// addresses are as loaded from the packet into a native-endian `u32` (network byte order in
    /// memory); compared that way they sort exactly as their IPv4-mapped forms do in
    /// [`FlowKey::new`], whose first words are equal and whose second words differ only there.
    #[inline(always)]
    pub fn from_native(
        proto: u8,
        src: u32,
        src_port: u16,
        dst: u32,
        dst_port: u16,
    ) -> (Self, Side) {
        let src_lt = if src != dst {
            src < dst
        } else {
            src_port < dst_port
        };
        let ((lo, lo_port), (hi, hi_port), sender) = if src_lt {
            ((src, src_port), (dst, dst_port), Side::Lo)
        } else {
            ((dst, dst_port), (src, src_port), Side::Hi)
        };
        let addrs = concat_words(lo, hi);
        // SAFETY: as in `narrow`: the addresses word, then ports, protocol and zero padding.
        let key = unsafe {
            core::mem::transmute::<[u64; 2], Self>([addrs, key_tail(lo_port, hi_port, proto)])
        };
        (key, sender)
    }

    /// The key of the TCP table when this is a TCP flow's key, else `None` (the flow belongs in
    /// this key's own table).
    pub const fn tcp(&self) -> Option<FlowKeyTcp4> {
        if self.proto == proto::TCP {
            Some(*self.tcp_prefix())
        } else {
            None
        }
    }

    /// This key's first 12 bytes, in place: the [`FlowKeyTcp4`] of the flow if it is TCP (see
    /// [`FlowKey4::tcp`]), meaningless otherwise.
    #[inline(always)]
    pub const fn tcp_prefix(&self) -> &FlowKeyTcp4 {
        // SAFETY: `FlowKeyTcp4` is `repr(C)`, its fields are the first four of `FlowKey4` at the
        // same offsets (asserted below), it is 12 bytes against 16, and its alignment (4) divides
        // `FlowKey4`'s (8); every bit pattern of its fields is valid.
        unsafe { &*(self as *const Self).cast::<FlowKeyTcp4>() }
    }

    /// The [`FlowKey`] this key was narrowed from.
    ///
    /// Built as words, like [`FlowKey::from_words`]: the program widens keys for its events, and
    /// the byte form compiled to byte-wise copies there.
    #[inline(always)]
    pub const fn widen(&self) -> FlowKey {
        // SAFETY: `FlowKey4` is 16 bytes without padding: two initialised words.
        let [addrs, tail] = unsafe { core::mem::transmute::<Self, [u64; 2]>(*self) };
        let prefix = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        let lo1 = concat_words(prefix, half(addrs, true));
        let hi1 = concat_words(prefix, half(addrs, false));
        // SAFETY: as in `from_words`: `FlowKey`'s five words in order, each address as zeros
        // then the IPv4-mapped prefix and the address, the tail word as in `FlowKey4`.
        unsafe { core::mem::transmute::<[u64; 5], FlowKey>([0, lo1, 0, hi1, tail]) }
    }
}

/// The IPv4-mapped IPv6 form of an IPv4 address, as stored in [`FlowKey`].
#[inline(always)]
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The order `FlowKey::new` normalises by: two native-endian 64-bit words then the port. Cheap in
/// the kernel (no byte swapping) and identical in user space on the same machine, which is all a
/// normalisation needs.
#[inline(always)]
fn endpoint_lt(a: &[u8; 16], a_port: u16, b: &[u8; 16], b_port: u16) -> bool {
    let (a0, a1) = words(a);
    let (b0, b1) = words(b);
    if a0 != b0 {
        return a0 < b0;
    }
    if a1 != b1 {
        return a1 < b1;
    }
    a_port < b_port
}

#[inline(always)]
fn words(a: &[u8; 16]) -> (u64, u64) {
    let [w0 @ .., _, _, _, _, _, _, _, _] = *a;
    let [_, _, _, _, _, _, _, _, w1 @ ..] = *a;
    (u64::from_ne_bytes(w0), u64::from_ne_bytes(w1))
}

/// Where a flow stands, from the kernel's point of view. Stored as a byte in
/// [`FlowState::status`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowStatus {
    /// Seen from the initiator only (so far).
    New = 0,
    /// The responder answered: SYN-ACK for TCP, any packet back for UDP, SCTP and ICMP echo
    /// (and any non-RST packet back for a TCP flow first seen mid-stream).
    Answered = 1,
    /// Refused before any answer: TCP RST from the responder, or an ICMP/ICMPv6 destination
    /// unreachable about the initiator's packet.
    Refused = 2,
    /// TCP only: FIN seen both ways, or RST after an answer, or the initiator's RST before one.
    Closed = 3,
}

impl FlowStatus {
    /// Decodes a raw byte; `None` for anything the program never writes.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Self::New),
            1 => Some(Self::Answered),
            2 => Some(Self::Refused),
            3 => Some(Self::Closed),
            _ => None,
        }
    }
}

/// Per-flow state, the value of every flow table ([`crate::FLOWS4_TCP_MAP`],
/// [`crate::FLOWS4_MAP`], [`crate::FLOWS_MAP`]).
///
/// Arrays of two are indexed by who sent the packet: `[0]` the initiator, `[1]` the responder.
/// Counters are plain (non-atomic) adds: two CPUs updating the same flow in the same instant can
/// lose an increment, which is the price of a cheap fast path; state changes that produce events
/// are never sampled out. Packets dropped by sampling ([`crate::SAMPLE_EVERY_GLOBAL`]) are not in
/// `packets`/`bytes`; they are counted in [`Counter::SampledOut`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowState {
    /// When the first packet was seen, `CLOCK_MONOTONIC_COARSE` nanoseconds
    /// (`bpf_ktime_get_coarse_ns`: tick resolution, which is plenty for second-scale timeouts).
    pub first_seen_ns: u64,
    /// When the last (not sampled-out) packet was seen, same clock as `first_seen_ns`. Read at
    /// the flow's first packet in each timer tick (see `tick`), so, like the clock itself, it has
    /// tick resolution; a packet in the first microsecond of a tick can leave it one tick early.
    pub last_seen_ns: u64,
    /// Packets `[from initiator, from responder]`.
    pub packets: [u64; 2],
    /// Bytes `[from initiator, from responder]`: the skb length as TC sees it (L2 header
    /// included on Ethernet devices).
    pub bytes: [u64; 2],
    /// Interface index where the flow was first seen.
    pub ifindex: u32,
    /// OR of the TCP flags ([`tcp_flags`]) seen `[from initiator, from responder]`; zero for
    /// other protocols.
    pub tcp_flags: [u8; 2],
    /// Which side of the key initiated the flow, a [`Side`] as a byte.
    pub initiator: u8,
    /// A [`FlowStatus`] as a byte.
    pub status: u8,
    /// The [`Hook`] (as a byte) of the hook that saw the first packet.
    pub hook: u8,
    /// How the flow was first seen, one of [`first_seen`]: its opening packet (0), mid-stream
    /// (1: for TCP a segment without SYN, the initiator a guess user space replaces by evidence),
    /// or its answer (2: a SYN-ACK, an ICMP echo reply; the initiator is the answer's receiver,
    /// certain).
    pub mid_stream: u8,
    /// 1 once the responder has answered, kept when the flow later closes, so user space can tell
    /// a closed established flow from an abandoned attempt. 0 otherwise.
    pub answered: u8,
    /// Which observation point counts each direction of the flow, so a packet that crosses two
    /// hooks on one node (an uplink's ingress, then the pod interface's egress; one pod's
    /// interface, then another's on the same node) adds to the counters once: the low nibble
    /// for the initiator's packets, the high nibble for the responder's, each the
    /// [`Hook::owner`] of the first hook that saw a packet of that direction, 0 before one did.
    /// A packet of a direction owned by another hook is [`Counter::Duplicate`] and changes
    /// nothing (the owning hook saw the same packet, or will: every packet of one direction
    /// crosses the same hooks in the same order).
    pub owners: u8,
    /// The program's own bookkeeping, not a time to read: the low 32 bits of the kernel's jiffies
    /// when `last_seen_ns` was last stamped. A packet reads the clock only when jiffies has moved
    /// since (the coarse clock moves only then), so a busy flow pays for the clock once per timer
    /// tick, not per packet.
    pub tick: u32,
    /// The program's own byte, reserved for address translation: no meaning yet, always 0 (the
    /// program writes 0 when it creates the entry). Whether an agent counted the flow is not
    /// here but in [`crate::REPORTED_MAP`], which user space alone writes, so marking a flow
    /// never rewrites its table entry.
    pub nat: u8,
    /// Always zero; room for later fields without another layout change of the first 64 bytes.
    pub _reserved: [u8; 7],
}

impl FlowState {
    /// The decoded [`FlowState::status`].
    pub const fn status(&self) -> Option<FlowStatus> {
        FlowStatus::from_raw(self.status)
    }

    /// The decoded [`FlowState::initiator`].
    pub const fn initiator(&self) -> Option<Side> {
        Side::from_raw(self.initiator)
    }

    /// The decoded [`FlowState::hook`].
    pub const fn hook(&self) -> Option<Hook> {
        Hook::from_raw(self.hook)
    }

    /// The hook that counts the packets of the initiator (`from_initiator`) or of the responder,
    /// if one has seen any ([`FlowState::owners`]).
    pub const fn owner(&self, from_initiator: bool) -> Option<Hook> {
        let nibble = if from_initiator {
            self.owners & 0x0f
        } else {
            self.owners >> 4
        };
        match nibble {
            0 => None,
            n => Hook::from_raw(n - 1),
        }
    }
}

/// Why an event was sent. Stored as a byte in [`FlowEvent::kind`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A flow entered the table (its first packet, or a new TCP SYN reusing the key of a refused
    /// or closed flow).
    New = 1,
    /// The responder answered (see [`FlowStatus::Answered`]).
    Answered = 2,
    /// The flow was refused (see [`FlowStatus::Refused`]).
    Refused = 3,
    /// The flow closed (see [`FlowStatus::Closed`]).
    Closed = 4,
}

impl EventKind {
    /// Decodes a raw byte; `None` for anything the program never writes.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::New),
            2 => Some(Self::Answered),
            3 => Some(Self::Refused),
            4 => Some(Self::Closed),
            _ => None,
        }
    }
}

/// One record of the event ring buffer ([`crate::EVENTS_MAP`]). Sent when a flow starts and when
/// its status changes, never per packet; the flow table has the counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowEvent {
    /// The flow.
    pub key: FlowKey,
    /// When the packet that caused the event was seen, same clock as
    /// [`FlowState::first_seen_ns`].
    pub ts_ns: u64,
    /// Interface index of the packet that caused the event (for [`EventKind::Refused`] by ICMP,
    /// of the ICMP error).
    pub ifindex: u32,
    /// An [`EventKind`] as a byte.
    pub kind: u8,
    /// Which side of the key initiated the flow, a [`Side`] as a byte.
    pub initiator: u8,
    /// The [`Hook`] (as a byte) of the hook that saw the packet.
    pub hook: u8,
    /// Copy of [`FlowState::mid_stream`].
    pub mid_stream: u8,
}

impl FlowEvent {
    /// The decoded [`FlowEvent::kind`].
    pub const fn kind(&self) -> Option<EventKind> {
        EventKind::from_raw(self.kind)
    }

    /// The decoded [`FlowEvent::initiator`].
    pub const fn initiator(&self) -> Option<Side> {
        Side::from_raw(self.initiator)
    }

    /// The decoded [`FlowEvent::hook`].
    pub const fn hook(&self) -> Option<Hook> {
        Hook::from_raw(self.hook)
    }
}

/// Indices into the per-CPU counter array ([`crate::COUNTERS_MAP`]).
///
/// Every packet increments exactly one of the *outcome* counters ([`Counter::OUTCOMES`]); the
/// others count events, not packets. [`Counter::PacketsSeen`] is their sum, which user space
/// works out: the program leaves its slot at zero rather than pay a second increment per packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Every packet the program ran on: the sum of the outcome counters, derived by user space
    /// (`CounterTotals` in the `auditor` crate); the program never writes this slot.
    PacketsSeen = 0,
    /// Outcome: `skb->protocol` was neither IPv4 nor IPv6 (ARP, LLDP, ...).
    NonIp = 1,
    /// Outcome: a header the program needed ended before the packet did (or lay beyond the
    /// first [`crate::MAX_HEADER_BYTES`] bytes).
    Truncated = 2,
    /// Outcome: a header was invalid (IP version disagreeing with `skb->protocol`, IPv4 IHL
    /// under 5, more IPv6 extension headers than the program walks).
    Malformed = 3,
    /// Outcome: an IP fragment other than the first (no ports to key by).
    Fragment = 4,
    /// Outcome: an IP packet whose protocol is not TCP, UDP, SCTP, ICMP or ICMPv6.
    OtherProtocol = 5,
    /// Outcome: ICMP/ICMPv6 other than echo and destination unreachable (neighbour discovery,
    /// time exceeded, packet too big, ...).
    IcmpOther = 6,
    /// Outcome: an ICMP/ICMPv6 destination unreachable about a flow in the table (the flow is
    /// refused if it was still [`FlowStatus::New`]).
    IcmpErrorMatched = 7,
    /// Outcome: an ICMP/ICMPv6 destination unreachable whose embedded packet is not a flow in
    /// the table, was not sent by the flow's initiator, or could not be parsed.
    IcmpErrorUnmatched = 8,
    /// Outcome: the packet started a flow: a new table entry, or a TCP SYN restarting a refused
    /// or closed flow with the same key (TIME_WAIT reuse, a retry from the same port).
    FlowCreated = 9,
    /// Outcome: the packet updated an existing flow.
    FlowUpdated = 10,
    /// Outcome: an established-flow packet skipped by sampling.
    SampledOut = 11,
    /// Outcome: the packet would have started a flow but the insert into the table failed.
    InsertFailed = 12,
    /// Events written to the ring buffer.
    EventsSent = 13,
    /// Events lost because the ring buffer was full.
    EventsLost = 14,
    /// Outcome: a packet of a flow's direction that another hook on this node counts (see
    /// [`FlowState::owners`]): the same packet seen a second time, not counted again.
    Duplicate = 15,
    /// Outcome: an encapsulation's outer packet on an uplink (VXLAN, Geneve, WireGuard; see
    /// [`ENCAPSULATION_PORTS`]): its inner packet is seen on the tunnel device, so the outer one
    /// is not a flow of its own.
    Encapsulated = 16,
}

impl Counter {
    /// Number of counters: the counter map's `max_entries`.
    pub const COUNT: u32 = 17;

    /// Every counter, in index order.
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::PacketsSeen,
        Self::NonIp,
        Self::Truncated,
        Self::Malformed,
        Self::Fragment,
        Self::OtherProtocol,
        Self::IcmpOther,
        Self::IcmpErrorMatched,
        Self::IcmpErrorUnmatched,
        Self::FlowCreated,
        Self::FlowUpdated,
        Self::SampledOut,
        Self::InsertFailed,
        Self::EventsSent,
        Self::EventsLost,
        Self::Duplicate,
        Self::Encapsulated,
    ];

    /// The outcome counters: each packet increments exactly one of them.
    pub const OUTCOMES: [Self; 14] = [
        Self::NonIp,
        Self::Truncated,
        Self::Malformed,
        Self::Fragment,
        Self::OtherProtocol,
        Self::IcmpOther,
        Self::IcmpErrorMatched,
        Self::IcmpErrorUnmatched,
        Self::FlowCreated,
        Self::FlowUpdated,
        Self::SampledOut,
        Self::InsertFailed,
        Self::Duplicate,
        Self::Encapsulated,
    ];

    /// A stable snake_case name, for metric labels and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PacketsSeen => "packets_seen",
            Self::NonIp => "non_ip",
            Self::Truncated => "truncated",
            Self::Malformed => "malformed",
            Self::Fragment => "fragment",
            Self::OtherProtocol => "other_protocol",
            Self::IcmpOther => "icmp_other",
            Self::IcmpErrorMatched => "icmp_error_matched",
            Self::IcmpErrorUnmatched => "icmp_error_unmatched",
            Self::FlowCreated => "flow_created",
            Self::FlowUpdated => "flow_updated",
            Self::SampledOut => "sampled_out",
            Self::InsertFailed => "insert_failed",
            Self::EventsSent => "events_sent",
            Self::EventsLost => "events_lost",
            Self::Duplicate => "duplicate",
            Self::Encapsulated => "encapsulated",
        }
    }
}

/// Bump when the meaning of a flow table byte changes without its offset or size changing (a
/// field reused, a status added): [`FLOW_LAYOUT`] then changes too. 2: `mid_stream` 2 (first
/// seen at its answer); 3: the reported byte became [`FlowState::nat`], the counted flows went to
/// [`crate::REPORTED_MAP`] (pinned beside the tables, so it changes directory with them).
pub const FLOW_LAYOUT_REVISION: u32 = 3;

/// The version of the flow tables' layout: keys, value and the meaning of their bytes. Derived
/// from [`FLOW_LAYOUT_REVISION`] and the size and offset of every field of [`FlowKey`],
/// [`FlowKey4`], [`FlowKeyTcp4`] and [`FlowState`], so a change of any of them changes it
/// without anyone having to remember. The pinned tables live under a directory named after it
/// (`v<FLOW_LAYOUT as 8 hex digits>`), so an agent never adopts tables of another layout.
pub const FLOW_LAYOUT: u32 = layout_hash(&[
    FLOW_LAYOUT_REVISION as usize,
    core::mem::size_of::<FlowKey>(),
    core::mem::offset_of!(FlowKey, lo_addr),
    core::mem::offset_of!(FlowKey, hi_addr),
    core::mem::offset_of!(FlowKey, lo_port),
    core::mem::offset_of!(FlowKey, hi_port),
    core::mem::offset_of!(FlowKey, proto),
    core::mem::size_of::<FlowKey4>(),
    core::mem::offset_of!(FlowKey4, lo_addr),
    core::mem::offset_of!(FlowKey4, hi_addr),
    core::mem::offset_of!(FlowKey4, lo_port),
    core::mem::offset_of!(FlowKey4, hi_port),
    core::mem::offset_of!(FlowKey4, proto),
    core::mem::size_of::<FlowKeyTcp4>(),
    core::mem::offset_of!(FlowKeyTcp4, lo_addr),
    core::mem::offset_of!(FlowKeyTcp4, hi_addr),
    core::mem::offset_of!(FlowKeyTcp4, lo_port),
    core::mem::offset_of!(FlowKeyTcp4, hi_port),
    core::mem::size_of::<FlowState>(),
    core::mem::offset_of!(FlowState, first_seen_ns),
    core::mem::offset_of!(FlowState, last_seen_ns),
    core::mem::offset_of!(FlowState, packets),
    core::mem::offset_of!(FlowState, bytes),
    core::mem::offset_of!(FlowState, ifindex),
    core::mem::offset_of!(FlowState, tcp_flags),
    core::mem::offset_of!(FlowState, initiator),
    core::mem::offset_of!(FlowState, status),
    core::mem::offset_of!(FlowState, hook),
    core::mem::offset_of!(FlowState, mid_stream),
    core::mem::offset_of!(FlowState, answered),
    core::mem::offset_of!(FlowState, owners),
    core::mem::offset_of!(FlowState, tick),
    core::mem::offset_of!(FlowState, nat),
    core::mem::offset_of!(FlowState, _reserved),
]);

/// FNV-1a over the numbers' little-endian bytes: stable across builds and architectures.
const fn layout_hash(parts: &[usize]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < parts.len() {
        let bytes = (parts[i] as u64).to_le_bytes();
        let mut j = 0;
        while j < bytes.len() {
            hash ^= bytes[j] as u32;
            hash = hash.wrapping_mul(0x0100_0193);
            j += 1;
        }
        i += 1;
    }
    hash
}

// The kernel copies these verbatim: a layout change must be deliberate.
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<FlowKey4>() == 16);
const _: () = assert!(core::mem::offset_of!(FlowKey4, lo_port) == 8);
const _: () = assert!(core::mem::offset_of!(FlowKey, lo_port) == 32);
const _: () = assert!(core::mem::size_of::<FlowKeyTcp4>() == 12);
const _: () = assert!(core::mem::offset_of!(FlowKeyTcp4, hi_addr) == 4);
const _: () = assert!(core::mem::offset_of!(FlowKeyTcp4, lo_port) == 8);
const _: () = assert!(core::mem::offset_of!(FlowKeyTcp4, hi_port) == 10);
const _: () = assert!(core::mem::offset_of!(FlowKey4, hi_addr) == 4);
const _: () = assert!(core::mem::offset_of!(FlowKey4, hi_port) == 10);
const _: () = assert!(core::mem::size_of::<FlowState>() == 72);
const _: () = assert!(core::mem::offset_of!(FlowState, tick) == 60);
const _: () = assert!(core::mem::offset_of!(FlowState, nat) == 64);
const _: () = assert!(core::mem::offset_of!(FlowState, _reserved) == 65);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 56);
const _: () = assert!(core::mem::offset_of!(FlowEvent, ts_ns) == 40);
const _: () = assert!(Counter::ALL.len() == Counter::COUNT as usize);

#[cfg(test)]
mod tests {
    use super::{FLOW_LAYOUT, FlowKey, FlowKey4, ipv4_mapped, layout_hash, proto, words};

    /// The layout version follows the layout: this is the version of today's layout (the pinned
    /// tables' directory name). When this fails, the layout changed: the new value is right (an
    /// agent of the new layout starts with new tables and removes the old pins), so update the
    /// expected value here and the pin path in README's troubleshooting section.
    #[test]
    fn layout_version_is_the_layout_s() {
        assert_eq!(
            format!("v{FLOW_LAYOUT:08x}"),
            "v0e83d2e0",
            "the flow table layout changed"
        );
        // Any size or offset moving changes it.
        assert_ne!(layout_hash(&[1, 72, 64]), layout_hash(&[1, 72, 65]));
        assert_ne!(layout_hash(&[1, 72]), layout_hash(&[2, 72]));
    }

    /// xorshift64: a fixed sequence, so a failure reproduces.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    fn as_words(addr: &[u8; 16]) -> [u64; 2] {
        let (w0, w1) = words(addr);
        [w0, w1]
    }

    /// The fast path builds keys from words; user space and the slow path from bytes. Both must
    /// give the same key (padding included, it is hashed) and the same sender side, including
    /// the tie-breaks: equal addresses, equal first words, equal ports.
    #[test]
    fn from_words_builds_the_key_new_builds() {
        let mut rng = 0x9e37_79b9_7f4a_7c15;
        for i in 0..20_000u32 {
            let a = next(&mut rng);
            let b = next(&mut rng);
            let c = next(&mut rng);
            let (src, dst) = match i % 4 {
                0 => (
                    ipv4_mapped((a as u32).to_be_bytes()),
                    ipv4_mapped((b as u32).to_be_bytes()),
                ),
                1 => {
                    let mut s = [0u8; 16];
                    let mut d = [0u8; 16];
                    s[..8].copy_from_slice(&a.to_ne_bytes());
                    s[8..].copy_from_slice(&b.to_ne_bytes());
                    d[..8].copy_from_slice(&c.to_ne_bytes());
                    d[8..].copy_from_slice(&b.rotate_left(7).to_ne_bytes());
                    (s, d)
                }
                2 => {
                    let s = ipv4_mapped((a as u32).to_be_bytes());
                    (s, s)
                }
                _ => {
                    let mut s = [0u8; 16];
                    s[..8].copy_from_slice(&a.to_ne_bytes());
                    let mut d = s;
                    s[8..].copy_from_slice(&b.to_ne_bytes());
                    d[8..].copy_from_slice(&c.to_ne_bytes());
                    (s, d)
                }
            };
            let sport = (c >> 16) as u16;
            let dport = if i % 3 == 0 { sport } else { (c >> 32) as u16 };
            let protocol = [proto::TCP, proto::UDP, proto::SCTP, proto::ICMP][(i % 4) as usize];
            let by_bytes = FlowKey::new(protocol, src, sport, dst, dport);
            let by_words =
                FlowKey::from_words(protocol, as_words(&src), sport, as_words(&dst), dport);
            assert_eq!(
                by_words, by_bytes,
                "case {i}: {src:?}:{sport} -> {dst:?}:{dport} proto {protocol}"
            );
            assert_eq!(
                by_words.0._pad, [0; 3],
                "case {i}: padding is hashed, must be zero"
            );
        }
    }

    /// The IPv4 fast path builds the narrow key straight from the packet's address words; it
    /// must be the key (and side) that the wide key of the same packet narrows to, tie-breaks
    /// included.
    #[test]
    fn from_native_builds_the_key_new_narrows_to() {
        let mut rng = 0x6a09_e667_f3bc_c909;
        for i in 0..20_000u32 {
            let r = next(&mut rng);
            let src = r as u32;
            let dst = match i % 3 {
                0 => src,
                1 => src ^ (1 << (i % 32)),
                _ => (r >> 32) as u32,
            };
            let ports = next(&mut rng);
            let sport = ports as u16;
            let dport = if i % 5 == 0 {
                sport
            } else {
                (ports >> 16) as u16
            };
            let protocol = [proto::TCP, proto::UDP][(i % 2) as usize];
            // The packet's bytes, as the program's native load sees them.
            let (src_bytes, dst_bytes) = (src.to_ne_bytes(), dst.to_ne_bytes());
            let (wide, side) = FlowKey::new(
                protocol,
                ipv4_mapped(src_bytes),
                sport,
                ipv4_mapped(dst_bytes),
                dport,
            );
            let narrow = FlowKey4::from_native(protocol, src, sport, dst, dport);
            assert_eq!(
                (Some(narrow.0), narrow.1),
                (wide.narrow(), side),
                "case {i}: {src_bytes:?}:{sport} -> {dst_bytes:?}:{dport}"
            );
        }
    }

    /// IPv4 flows are keyed by the narrow key in the kernel and by the wide one everywhere
    /// else: the two must convert both ways without loss, and only IPv4-mapped pairs narrow.
    #[test]
    fn narrow_and_widen_round_trip_ipv4_keys_only() {
        let mut rng = 0x2545_f491_4f6c_dd1d;
        for i in 0..20_000u32 {
            let a = (next(&mut rng) as u32).to_be_bytes();
            let b = (next(&mut rng) as u32).to_be_bytes();
            let ports = next(&mut rng);
            let (sport, dport) = (ports as u16, (ports >> 16) as u16);
            let (key, _) = FlowKey::new(proto::TCP, ipv4_mapped(a), sport, ipv4_mapped(b), dport);
            let Some(narrow) = key.narrow() else {
                panic!("case {i}: an IPv4 key must narrow: {key:?}");
            };
            assert_eq!(narrow.widen(), key, "case {i}: round trip");
            let Some(tcp) = narrow.tcp() else {
                panic!("case {i}: a TCP key has a TCP-table key: {narrow:?}");
            };
            assert_eq!(
                (tcp.narrow4(), tcp.widen()),
                (narrow, key),
                "case {i}: TCP-table round trip"
            );
            assert_eq!(
                (
                    narrow.lo_addr,
                    narrow.hi_addr,
                    narrow.lo_port,
                    narrow.hi_port
                ),
                (
                    [
                        key.lo_addr[12],
                        key.lo_addr[13],
                        key.lo_addr[14],
                        key.lo_addr[15]
                    ],
                    [
                        key.hi_addr[12],
                        key.hi_addr[13],
                        key.hi_addr[14],
                        key.hi_addr[15]
                    ],
                    key.lo_port,
                    key.hi_port
                ),
                "case {i}: fields"
            );
            assert_eq!(
                (narrow.proto, narrow._pad),
                (proto::TCP, [0; 3]),
                "case {i}"
            );

            let mut v6 = ipv4_mapped(b);
            v6[(i % 12) as usize] ^= 1 << (i % 8);
            let (mixed, _) = FlowKey::new(proto::UDP, ipv4_mapped(a), sport, v6, dport);
            assert_eq!(
                mixed.narrow(),
                None,
                "case {i}: a non-mapped address: {mixed:?}"
            );
            let (udp, _) = FlowKey::new(proto::UDP, ipv4_mapped(a), sport, ipv4_mapped(b), dport);
            assert_eq!(
                udp.narrow().map(|k| k.tcp()),
                Some(None),
                "case {i}: only TCP keys go to the TCP table"
            );
            let (both, _) = FlowKey::new(proto::UDP, v6, sport, v6, dport);
            assert_eq!(both.narrow(), None, "case {i}: IPv6 addresses: {both:?}");
        }
        let zero = FlowKey4 {
            lo_addr: [0; 4],
            hi_addr: [0; 4],
            lo_port: 0,
            hi_port: 0,
            proto: proto::ICMP,
            _pad: [0; 3],
        };
        assert_eq!(
            zero.widen().narrow(),
            Some(zero),
            "0.0.0.0 is an IPv4 address too"
        );
    }
}
