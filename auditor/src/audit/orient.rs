//! Orienting a flow first seen mid-stream (SPEC 3): the datapath takes the sender of the first
//! packet it saw for the initiator, which after an agent restart, an eviction or an idle expiry
//! is often the server (a keepalive, a streaming response). UDP and SCTP flows first seen in the
//! join window of an agent that adopted no tables come here too (see
//! [`crate::flows::FlowTracker::open_join_window`]). Evidence decides instead, in this
//! order: the node's conntrack (the ORIGINAL tuple: who really opened it), the ports the
//! responder declares (container ports, Service ports, ports a policy names), the ephemeral
//! port range (the initiator's port is in it, the responder's is not). Without evidence the
//! flow is judged both ways (see [`super::Auditor::push_with`]).

use std::net::SocketAddr;

use serde::Serialize;

use super::Cluster;
use super::peer::Peer;
use crate::flows::{FlowRecord, PerDirection};

/// How a flow's initiator was established: the `orientation` of the unexpected-flow log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Orientation {
    /// The opening packet was seen (TCP SYN, the first packet of a conversation).
    Opening,
    /// The node's conntrack entry's ORIGINAL direction.
    Conntrack,
    /// Only one side declares its port (container, Service or policy port): the responder.
    DeclaredPort,
    /// Only one side's port is in the ephemeral range: the initiator.
    EphemeralRange,
    /// No evidence: judged both ways, never `unexpected` unless both are denied.
    Unknown,
}

impl Orientation {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Opening => "opening",
            Self::Conntrack => "conntrack",
            Self::DeclaredPort => "declared_port",
            Self::EphemeralRange => "ephemeral_range",
            Self::Unknown => "unknown",
        }
    }
}

/// The node's ephemeral (local) port range, `net.ipv4.ip_local_port_range`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EphemeralRange {
    pub low: u16,
    pub high: u16,
}

impl Default for EphemeralRange {
    /// Linux's default.
    fn default() -> Self {
        Self {
            low: 32_768,
            high: 60_999,
        }
    }
}

impl EphemeralRange {
    /// Parses the sysctl's text ("32768\t60999").
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split_whitespace().map(str::parse::<u16>);
        let (Some(Ok(low)), Some(Ok(high)), None) = (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        (low <= high).then_some(Self { low, high })
    }

    /// Reads the node's range (read-only), or Linux's default when it cannot be read.
    #[must_use]
    pub fn of_node() -> Self {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    #[must_use]
    pub const fn contains(self, port: u16) -> bool {
        self.low <= port && port <= self.high
    }
}

/// What the node's conntrack says of a flow: the endpoint that sent its ORIGINAL direction.
pub type ConntrackOriginator = Option<SocketAddr>;

/// Orients a record first seen mid-stream: the evidence that decided, and whether the record's
/// initiator and responder must swap. `None` for the orientation when nothing decided.
pub(super) fn orient(
    record: &FlowRecord,
    conntrack: ConntrackOriginator,
    cluster: &Cluster,
    ephemeral: EphemeralRange,
) -> (Orientation, bool) {
    if !record.mid_stream {
        return (Orientation::Opening, false);
    }
    let (a, b) = (record.initiator, record.responder);
    if let Some(origin) = conntrack {
        if origin == a {
            return (Orientation::Conntrack, false);
        }
        if origin == b {
            return (Orientation::Conntrack, true);
        }
    }
    let declares = |end: SocketAddr| {
        let peer: Peer = cluster.peer(end.ip(), Some(end.port()));
        cluster
            .port_label(&peer, end.ip(), record.protocol, end.port())
            .is_some()
    };
    if !record.protocol.is_icmp() {
        match (declares(a), declares(b)) {
            (false, true) => return (Orientation::DeclaredPort, false),
            (true, false) => return (Orientation::DeclaredPort, true),
            _ => {}
        }
        match (ephemeral.contains(a.port()), ephemeral.contains(b.port())) {
            (true, false) => return (Orientation::EphemeralRange, false),
            (false, true) => return (Orientation::EphemeralRange, true),
            _ => {}
        }
    }
    (Orientation::Unknown, false)
}

/// The record seen the other way round: initiator and responder, and their counters, swapped.
pub(super) fn flipped(mut record: FlowRecord) -> FlowRecord {
    std::mem::swap(&mut record.initiator, &mut record.responder);
    let swap = |d: PerDirection| PerDirection {
        to_responder: d.to_initiator,
        to_initiator: d.to_responder,
    };
    record.packets = swap(record.packets);
    record.bytes = swap(record.bytes);
    record
}

#[cfg(test)]
mod tests {
    use super::EphemeralRange;

    #[test]
    fn ephemeral_range_parses_the_sysctl() {
        assert_eq!(
            EphemeralRange::parse("32768\t60999\n"),
            Some(EphemeralRange {
                low: 32_768,
                high: 60_999
            })
        );
        assert_eq!(
            EphemeralRange::parse("1024 65535"),
            Some(EphemeralRange {
                low: 1024,
                high: 65535
            })
        );
        assert_eq!(EphemeralRange::parse("60999 32768"), None);
        assert_eq!(EphemeralRange::parse("32768"), None);
        assert_eq!(EphemeralRange::parse("a b"), None);
        assert_eq!(EphemeralRange::parse("1 2 3"), None);
        let r = EphemeralRange::default();
        assert!(
            r.contains(32_768) && r.contains(60_999) && !r.contains(8080) && !r.contains(61_000)
        );
    }
}
