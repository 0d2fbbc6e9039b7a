//! The judging stage. [`Cluster`] joins the two stores (who is who, what is intended) and gives
//! a flow its model verdict (`verdict`), its peers ([`peer`], one classifier for `check` and
//! the daemon) and its explanation ([`explain`]); [`Auditor`] turns a decided flow (the flows
//! stage's [`FlowRecord`]) into the audit verdict `allowed` / `denied` / `unexpected` (SPEC 2).
//! Pure and synchronous: no I/O, the caller passes the time.
//!
//! Each flow is counted once: records repeating a counted flow (same normalised key, overlapping
//! lifetime) are dropped; a flow seen both addressed to a Service `ClusterIP` and to the endpoint it
//! was translated to counts once, judged on the endpoint (the `ClusterIP` record is held briefly,
//! see [`AuditConfig::service_hold`], and judged against every ready endpoint when no endpoint
//! record turns up); across nodes, only the agent named by [`counting`]'s rule counts it.

mod cache;
mod cluster;
pub mod counting;
mod dedup;
pub mod explain;
mod judge;
mod named_ports;
pub mod orient;
pub mod peer;
mod verdict;

use std::fmt;
use std::time::{Duration, SystemTime};

use auditor_ebpf::flow::FlowKey;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::flows::{FlowRecord, Outcome};

pub use cluster::{Cluster, ClusterConfig};
pub use counting::{counting_node, counts_here};
pub use explain::Explanation;
pub use named_ports::NamedPorts;
pub use orient::{ConntrackOriginator, EphemeralRange, Orientation};
pub use peer::{Peer, PeerInfo, PodPeer};
pub use verdict::{
    DEFAULT_DENY_RULE, FlowQuery, Judgement, ModelVerdict, RuleHit, ServiceHop, ServiceProblem,
    Verdict,
};

/// The audit verdict, the `verdict` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditVerdict {
    /// The model allows the flow.
    Allowed,
    /// The model denies it and it did not get through: enforcement matches intent.
    Denied,
    /// The model denies it but it got through: not enforced yet, or an enforcement gap.
    Unexpected,
}

impl AuditVerdict {
    pub const ALL: [Self; 3] = [Self::Allowed, Self::Denied, Self::Unexpected];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Unexpected => "unexpected",
        }
    }

    /// The outcomes a flow with this verdict can have.
    #[must_use]
    pub const fn outcomes(self) -> &'static [Outcome] {
        match self {
            Self::Allowed => &[Outcome::Established, Outcome::Refused, Outcome::Unanswered],
            Self::Denied => &[Outcome::Refused, Outcome::Unanswered],
            Self::Unexpected => &[Outcome::Established],
        }
    }
}

impl fmt::Display for AuditVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The audit verdict of a flow the model judged `model` and the network treated as `outcome`.
#[must_use]
pub const fn classify(model: ModelVerdict, outcome: Outcome) -> AuditVerdict {
    match (model, outcome) {
        (ModelVerdict::Allow, _) => AuditVerdict::Allowed,
        (ModelVerdict::Deny, Outcome::Established) => AuditVerdict::Unexpected,
        (ModelVerdict::Deny, Outcome::Refused | Outcome::Unanswered) => AuditVerdict::Denied,
    }
}

/// A counted flow: what the export stage turns into metrics and log lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditedFlow {
    pub record: FlowRecord,
    pub src: Peer,
    pub dst: Peer,
    /// The `dst_port` label: `None` is `other`.
    pub dst_port: Option<u16>,
    pub judgement: Judgement,
    pub verdict: AuditVerdict,
    /// How the initiator was established (the opening was seen, or evidence for a flow first
    /// seen mid-stream).
    pub orientation: Orientation,
}

impl AuditedFlow {
    /// The question the model answered for this flow.
    #[must_use]
    pub fn query(&self) -> FlowQuery {
        FlowQuery::of(&self.record)
    }
}

impl FlowQuery {
    /// The flow a record is about: initiator to responder, on the responder's port.
    #[must_use]
    pub fn of(record: &FlowRecord) -> Self {
        Self {
            src: record.initiator.ip(),
            dst: record.responder.ip(),
            protocol: record.protocol,
            port: record.responder.port(),
        }
    }
}

/// How the audit stage remembers and waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditConfig {
    /// This agent's node (`spec.nodeName`); `None` counts every flow seen (see [`counting`]).
    pub local_node: Option<String>,
    /// How long a flow addressed to a Service `ClusterIP` waits for the record of the endpoint it
    /// was translated to. Both are decided by the same answer, so they arrive together; the wait
    /// only needs to cover one poll of the flow stream.
    pub service_hold: Duration,
    /// How long counted flows are remembered for recognising repeats. Longer than the time
    /// between two reports of one flow (two interfaces' events, a table walk after a lost event).
    pub horizon: Duration,
    /// At most this many counted flows are remembered (the oldest go first).
    pub capacity: usize,
    /// The node's ephemeral port range, evidence for orienting flows first seen mid-stream.
    pub ephemeral: EphemeralRange,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            local_node: None,
            service_hold: Duration::from_secs(1),
            // Repeats arrive within a walk interval (2 s) of each other; a margin on top.
            horizon: Duration::from_secs(30),
            // About 75 bytes each (a 24-byte entry in a table at most half full, 24 in the expiry
            // queue): 32k flows cost ~2.4 MiB at most, within the agent's memory budget. At high
            // flow rates the capacity, not the horizon, bounds the memory: 32k flows is a third
            // of a second at 100k flows/s, still far longer than two interfaces' events of one
            // flow are apart.
            capacity: 32_768,
            ephemeral: EphemeralRange::default(),
        }
    }
}

/// Running totals of what the audit did with the records it was fed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    pub counted: u64,
    /// Repeats of a counted flow.
    pub duplicates: u64,
    /// Flows another node's agent counts.
    pub other_node: u64,
    /// `ClusterIP` records replaced by their endpoint's record.
    pub superseded: u64,
}

#[derive(Debug)]
struct Held {
    record: FlowRecord,
    src: Peer,
    dst: Peer,
    orientation: Orientation,
    due: SystemTime,
}

/// Turns flow records into counted, judged flows, once each.
#[derive(Debug)]
pub struct Auditor {
    config: AuditConfig,
    recent: dedup::Recent,
    reached: dedup::Reached,
    /// `ClusterIP` flows waiting for their endpoint's record, by key and by initiator socket.
    held: FxHashMap<FlowKey, Held>,
    held_by_initiator: FxHashMap<dedup::Initiator, Vec<FlowKey>>,
    stats: AuditStats,
}

impl Auditor {
    #[must_use]
    pub fn new(config: AuditConfig) -> Self {
        let recent = dedup::Recent::new(config.horizon, config.capacity);
        // The endpoint record and the ClusterIP record are decided by the same answer; a few
        // holds' worth of memory covers the stream delivering them apart.
        let reached = dedup::Reached::new(
            config.service_hold.max(Duration::from_secs(1)) * 4,
            config.capacity,
        );
        Self {
            config,
            recent,
            reached,
            held: FxHashMap::default(),
            held_by_initiator: FxHashMap::default(),
            stats: AuditStats::default(),
        }
    }

    #[must_use]
    pub const fn config(&self) -> &AuditConfig {
        &self.config
    }

    #[must_use]
    pub const fn stats(&self) -> AuditStats {
        self.stats
    }

    /// `ClusterIP` flows waiting for their endpoint's record.
    #[must_use]
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Counted flows remembered for recognising repeats.
    #[must_use]
    pub fn remembered(&self) -> usize {
        self.recent.len()
    }

    /// Feeds one decided flow. Returns it judged when this agent counts it now; `None` when it
    /// repeats a counted flow, belongs to another node's agent, or waits (a `ClusterIP` flow, see
    /// [`Auditor::tick`]).
    pub fn push(
        &mut self,
        record: FlowRecord,
        cluster: &Cluster,
        now: SystemTime,
    ) -> Option<AuditedFlow> {
        self.push_with(record, None, cluster, now)
    }

    /// [`Auditor::push`] with what the node's conntrack says of the flow (who sent its ORIGINAL
    /// direction), for orienting a flow first seen mid-stream (see [`orient`]): conntrack, then
    /// the ports the responder declares, then the ephemeral range; with no evidence the flow is
    /// judged both ways and allowed when either way is.
    pub fn push_with(
        &mut self,
        record: FlowRecord,
        conntrack: ConntrackOriginator,
        cluster: &Cluster,
        now: SystemTime,
    ) -> Option<AuditedFlow> {
        if self.recent.is_duplicate(&record.key, record.first_seen)
            || self.held.contains_key(&record.key)
        {
            self.stats.duplicates += 1;
            return None;
        }
        let (orientation, flip) =
            orient::orient(&record, conntrack, cluster, self.config.ephemeral);
        let record = if flip {
            orient::flipped(record)
        } else {
            record
        };
        let src = cluster.peer(record.initiator.ip(), Some(record.initiator.port()));
        let dst = cluster.peer(record.responder.ip(), Some(record.responder.port()));
        // Which agent counts it follows from the initiator; without evidence of the initiator,
        // each agent's kernel took whoever it saw speak first, which two nodes can see
        // differently (one restarted, the other not): the endpoints are then taken in an order
        // every agent sees alike (the lower address and port first), so exactly one counts it.
        let here = if orientation == Orientation::Unknown && record.responder < record.initiator {
            counts_here(self.config.local_node.as_deref(), &dst, &src)
        } else {
            counts_here(self.config.local_node.as_deref(), &src, &dst)
        };
        if !here {
            self.stats.other_node += 1;
            return None;
        }
        let initiator = (record.protocol, record.initiator);
        let hold = self.config.service_hold;
        if let Peer::Service {
            namespace, name, ..
        } = &dst
        {
            let translated = self
                .reached
                .reached(&initiator, record.first_seen, hold, |ip| {
                    cluster.is_endpoint_of(namespace, name, ip)
                });
            if translated {
                self.stats.superseded += 1;
                self.recent
                    .remember(record.key, record.first_seen, record.last_seen, now);
                return None;
            }
            self.held_by_initiator
                .entry(initiator)
                .or_default()
                .push(record.key);
            self.held.insert(
                record.key,
                Held {
                    record,
                    src,
                    dst,
                    orientation,
                    due: now + hold,
                },
            );
            return None;
        }
        if matches!(dst, Peer::Pod(_)) {
            self.supersede_held(&initiator, &record, cluster, now);
            self.reached
                .insert(initiator, record.responder.ip(), record.first_seen, now);
        }
        Some(self.audit(record, src, dst, orientation, cluster, now))
    }

    /// Drops held `ClusterIP` records of the flow `record` (to an endpoint) is the translation of.
    fn supersede_held(
        &mut self,
        initiator: &dedup::Initiator,
        record: &FlowRecord,
        cluster: &Cluster,
        now: SystemTime,
    ) {
        let Some(keys) = self.held_by_initiator.get_mut(initiator) else {
            return;
        };
        let responder = record.responder.ip();
        let hold = self.config.service_hold;
        let held = &mut self.held;
        let recent = &mut self.recent;
        let mut superseded = 0;
        keys.retain(|key| {
            let Some(h) = held.get(key) else {
                return false;
            };
            let same = dedup::close(h.record.first_seen, record.first_seen, hold)
                && matches!(&h.dst, Peer::Service { namespace, name, .. }
                    if cluster.is_endpoint_of(namespace, name, responder));
            if same {
                if let Some(h) = held.remove(key) {
                    recent.remember(h.record.key, h.record.first_seen, h.record.last_seen, now);
                }
                superseded += 1;
            }
            !same
        });
        if keys.is_empty() {
            self.held_by_initiator.remove(initiator);
        }
        self.stats.superseded += superseded;
    }

    /// Releases `ClusterIP` flows whose wait is over (judged on every ready endpoint, by the
    /// model) and forgets counted flows older than the horizon. Call it about once a second.
    pub fn tick(&mut self, cluster: &Cluster, now: SystemTime) -> Vec<AuditedFlow> {
        self.recent.expire(now);
        self.reached.expire(now);
        let due: Vec<FlowKey> = self
            .held
            .iter()
            .filter(|(_, h)| h.due <= now)
            .map(|(k, _)| *k)
            .collect();
        self.release(due, cluster, now)
    }

    /// Releases every waiting flow (shutdown: count what was seen).
    pub fn flush(&mut self, cluster: &Cluster, now: SystemTime) -> Vec<AuditedFlow> {
        let all: Vec<FlowKey> = self.held.keys().copied().collect();
        self.release(all, cluster, now)
    }

    fn release(
        &mut self,
        keys: Vec<FlowKey>,
        cluster: &Cluster,
        now: SystemTime,
    ) -> Vec<AuditedFlow> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(Held {
                record,
                src,
                dst,
                orientation,
                due: _,
            }) = self.held.remove(&key)
            else {
                continue;
            };
            let initiator = (record.protocol, record.initiator);
            if let Some(keys) = self.held_by_initiator.get_mut(&initiator) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    self.held_by_initiator.remove(&initiator);
                }
            }
            out.push(self.audit(record, src, dst, orientation, cluster, now));
        }
        // Deterministic order for the caller (and its logs): by first sight.
        out.sort_by_key(|f| f.record.first_seen);
        out
    }

    fn audit(
        &mut self,
        mut record: FlowRecord,
        mut src: Peer,
        mut dst: Peer,
        orientation: Orientation,
        cluster: &Cluster,
        now: SystemTime,
    ) -> AuditedFlow {
        self.recent
            .remember(record.key, record.first_seen, record.last_seen, now);
        self.stats.counted += 1;
        let mut query = FlowQuery::of(&record).normalized();
        let mut judgement = cluster.judgement(&query);
        if orientation == Orientation::Unknown && judgement.verdict == ModelVerdict::Deny {
            // Either side may have opened it: denied only if denied both ways; when the other
            // way is allowed, it is reported that way.
            let reversed = orient::flipped(record.clone());
            let reversed_query = FlowQuery::of(&reversed).normalized();
            let reversed_judgement = cluster.judgement(&reversed_query);
            if reversed_judgement.verdict == ModelVerdict::Allow {
                record = reversed;
                std::mem::swap(&mut src, &mut dst);
                query = reversed_query;
                judgement = reversed_judgement;
            }
        }
        let verdict = classify(judgement.verdict, record.outcome);
        let dst_port = cluster.port_label(&dst, query.dst, query.protocol, query.port);
        AuditedFlow {
            record,
            src,
            dst,
            dst_port,
            judgement,
            verdict,
            orientation,
        }
    }
}

#[cfg(test)]
mod tests;
