//! User-space side of the flow types: `aya::Pod` so maps and the ring buffer can hand them out,
//! and address helpers for display.

use core::fmt;
use core::net::{IpAddr, Ipv6Addr};

use super::{
    EventKind, FlowEvent, FlowKey, FlowKey4, FlowKeyTcp4, FlowState, FlowStatus, Hook, Side, proto,
};

// SAFETY: `#[repr(C)]`, no implicit padding (sizes asserted in mod.rs), every field is a plain
// integer or byte array, so every bit pattern is a valid value.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey4 {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKeyTcp4 {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowState {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowEvent {}

/// Turns a key address back into an `IpAddr`: IPv4-mapped addresses become IPv4.
pub fn key_addr(raw: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(raw);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The key form of an address (IPv4 as IPv4-mapped IPv6).
pub fn addr_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => super::ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl FlowKey {
    /// The endpoint on `side` as (address, port).
    pub fn socket(&self, side: Side) -> (IpAddr, u16) {
        let (addr, port) = self.endpoint(side);
        (key_addr(addr), port)
    }

    /// The key of a packet from `src` to `dst`, and which side the sender is.
    pub fn from_addrs(proto: u8, src: (IpAddr, u16), dst: (IpAddr, u16)) -> (Self, Side) {
        Self::new(proto, addr_key(src.0), src.1, addr_key(dst.0), dst.1)
    }
}

/// The protocol's conventional name, or its number.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        proto::ICMP => "ICMP",
        proto::ICMPV6 => "ICMPv6",
        _ => "other",
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lo, lo_port) = self.socket(Side::Lo);
        let (hi, hi_port) = self.socket(Side::Hi);
        write!(
            f,
            "{} {lo}:{lo_port} <-> {hi}:{hi_port}",
            proto_name(self.proto)
        )
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Lo => "lo",
            Self::Hi => "hi",
        })
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
            Self::UplinkIngress => "uplink_ingress",
            Self::UplinkEgress => "uplink_egress",
        })
    }
}

impl fmt::Display for FlowStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::New => "new",
            Self::Answered => "answered",
            Self::Refused => "refused",
            Self::Closed => "closed",
        })
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::New => "new",
            Self::Answered => "answered",
            Self::Refused => "refused",
            Self::Closed => "closed",
        })
    }
}
