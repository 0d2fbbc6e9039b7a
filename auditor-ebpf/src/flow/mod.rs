//! Flow keys, per-flow state and the events the TC program sends to user space.

#[cfg(feature = "user")]
mod user;

/// A flow key, normalised so both directions of a conversation find the same entry: the
/// (address, port) pair that sorts lower is `lo`. Addresses are 16 bytes; IPv4 uses the
/// IPv4-mapped form (::ffff:a.b.c.d). For ICMP echo both ports hold the identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub lo_addr: [u8; 16],
    pub hi_addr: [u8; 16],
    pub lo_port: u16,
    pub hi_port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6).
    pub proto: u8,
    pub _pad: [u8; 3],
}
