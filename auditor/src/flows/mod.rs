//! Flow records: the datapath's events and flow table turned into one record per flow, oriented
//! initiator -> responder, with the outcome (established, refused, unanswered) once it is decided.
//! The decision logic ([`FlowTracker`]) is pure: it is fed events, table entries and the time.
//! The stream ([`FlowStream`]) reads them from a [`FlowSource`]: the datapath, or a fake of it.
//!
//! Life of a flow, as this stage sees it:
//! - The kernel keys a flow once however many attached interfaces it crosses, and sends `New` when
//!   it enters the table. The tracker holds it as pending.
//! - `Answered` / `Refused` (or a table walk finding that status, when the event was lost) decide
//!   it and produce its [`FlowRecord`], exactly once. A pending flow still unanswered when the
//!   answer timeout passes is looked up in the table one last time, then recorded as
//!   [`Outcome::Unanswered`] unless the table shows an answer.
//! - After the decision no further record is produced for the flow: closing it (FIN both ways, RST)
//!   only starts a linger period, after which the walk deletes its table entry. Entries idle
//!   for longer than the idle timeout are deleted too, so the LRU table holds live flows. A flow
//!   that resumes after its entry was deleted (or evicted by the LRU) comes back marked
//!   mid-stream (TCP) or as a new conversation on the same 5-tuple (UDP and the rest): while the
//!   tracker still remembers it ([`tracker::GONE_CAPACITY`] such flows), that is recognised as
//!   the same flow and not reported again; after that it is reported again, with `mid_stream`
//!   set for TCP, and the audit orients it by evidence.
//! - An agent that adopted no predecessor's tables (first install, a new layout, `--pin-dir
//!   none`) joins conversations already going on; for the idle timeout after it starts, UDP and
//!   SCTP flows (which have no opening packet to tell) are recorded with `mid_stream` set, so the
//!   audit orients them by evidence ([`FlowStream::open_join_window`]).
//! - Every decided flow gets a counted mark ([`FlowSource::mark_reported`]: its key and its
//!   entry's `first_seen_ns`, in a map of their own, never in the table entry) before its record
//!   is handed out: with the maps pinned, the next agent adopts them and counts only the entries
//!   no mark matches. Marks go when their flows are forgotten for good: with expired entries,
//!   and, by a sweep after the walk, those of evicted flows and a predecessor's that match no
//!   entry. A mark that cannot be written is counted and tried again at the next walk. Entries
//!   the tracker knew that a walk no longer finds were evicted by the LRU; they are counted
//!   ([`tracker::Evictions`]).

pub mod fake;
pub mod source;
pub mod stream;
pub mod tracker;

use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use auditor_ebpf::flow::{FlowKey, Hook};

use crate::vocab::Protocol;
use serde::Serialize;

pub use source::FlowSource;
pub use stream::FlowStream;
pub use tracker::{FlowTracker, Now, WalkVerdict};

/// What the network did with a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The responder answered: SYN-ACK for TCP, any packet back for UDP, SCTP and ICMP.
    Established,
    /// TCP RST or ICMP destination unreachable came back before any answer.
    Refused,
    /// Nothing came back within the answer timeout (or the initiator gave up first).
    Unanswered,
}

impl Outcome {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::Refused => "refused",
            Self::Unanswered => "unanswered",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Packets or bytes of a flow, each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PerDirection {
    /// Sent by the initiator.
    pub to_responder: u64,
    /// Sent by the responder.
    pub to_initiator: u64,
}

/// One flow with its decided outcome: what the daemon classifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    pub protocol: Protocol,
    /// Who sent the first packet seen (for TCP, the SYN). For ICMP echo the "port" of both ends is
    /// the echo identifier.
    pub initiator: SocketAddr,
    pub responder: SocketAddr,
    /// Where the flow was first seen: interface index, and its name when the datapath knew it
    /// (empty otherwise).
    pub ifindex: u32,
    pub interface: String,
    /// Which hook of that interface saw the first packet.
    #[serde(serialize_with = "hook_name")]
    pub hook: Hook,
    /// Counters as of the last read of the flow's table entry before its outcome was decided:
    /// the event that decided it, a table walk (every `walk_interval`), or, for a flow decided
    /// unanswered, a lookup at its deadline when events were lost meanwhile. At least the
    /// first packet. Sampling (if configured) leaves established-flow packets out of these.
    pub packets: PerDirection,
    pub bytes: PerDirection,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// The first packet seen was not an opening one (the auditor started, or the table lost the
    /// entry, in the middle of the flow), so `initiator` is a best guess. Also set for UDP and
    /// SCTP flows first seen in the join window of an agent that adopted no tables (see
    /// [`FlowTracker::open_join_window`]): their first packet may have been either side's.
    pub mid_stream: bool,
    pub outcome: Outcome,
    /// The datapath's key, for correlating with the flow table.
    #[serde(skip)]
    pub key: FlowKey,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes the field by reference"
)]
fn hook_name<S: serde::Serializer>(d: &Hook, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match d {
        Hook::Ingress => "ingress",
        Hook::Egress => "egress",
        Hook::UplinkIngress => "uplink_ingress",
        Hook::UplinkEgress => "uplink_egress",
    })
}

/// Timeouts of the flow stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowsConfig {
    /// How long a responder has to answer before the flow is [`Outcome::Unanswered`].
    pub answer_timeout: Duration,
    /// A flow without packets for this long is deleted from the table (and forgotten).
    pub idle_timeout: Duration,
    /// How long a closed or refused flow's entry stays in the table: long enough to absorb
    /// retransmissions and late packets of the close without re-creating the entry.
    pub closed_linger: Duration,
    /// How often the flow table is walked: reconciles lost events, refreshes counters and
    /// expires entries. A walk costs two syscalls per table entry.
    pub walk_interval: Duration,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            // The SPEC's default.
            answer_timeout: Duration::from_secs(5),
            // Like conntrack's UDP stream timeout order of magnitude; TCP keepalives (2 h by
            // default) do not keep an entry, a resumed flow comes back marked mid-stream.
            idle_timeout: Duration::from_secs(300),
            // Covers TIME_WAIT-ish retransmissions of FIN/RST.
            closed_linger: Duration::from_secs(30),
            walk_interval: Duration::from_secs(2),
        }
    }
}
