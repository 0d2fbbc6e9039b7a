//! The label sets of the two label-rich families, and the index of the series created so far,
//! found by a hash of the label values so that counting a flow of an existing series builds no
//! label set.

use std::hash::{Hash, Hasher as _};
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHasher};

use crate::audit::{AuditVerdict, AuditedFlow, RuleHit};
use crate::policy::ir::{Action, PolicyKey};
use crate::vocab::Direction;

/// Labels of `flow_auditor_flows_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct FlowLabels {
    pub verdict: String,
    pub outcome: String,
    pub src_namespace: String,
    pub src_workload: String,
    pub dst_namespace: String,
    pub dst_workload: String,
    pub protocol: String,
    pub dst_port: String,
}

impl FlowLabels {
    /// The labels of a counted flow.
    #[must_use]
    pub fn of(flow: &AuditedFlow) -> Self {
        Self {
            verdict: flow.verdict.as_str().to_owned(),
            outcome: flow.record.outcome.as_str().to_owned(),
            src_namespace: flow.src.namespace_label().to_owned(),
            src_workload: flow.src.workload_label().to_owned(),
            dst_namespace: flow.dst.namespace_label().to_owned(),
            dst_workload: flow.dst.workload_label().to_owned(),
            protocol: flow.record.protocol.label().to_owned(),
            dst_port: flow
                .dst_port
                .map_or_else(|| "other".to_owned(), |p| p.to_string()),
        }
    }

    /// The labels as the exposition writes them, in this order.
    pub(super) fn pairs(&self) -> [(&'static str, &str); 8] {
        let Self {
            verdict,
            outcome,
            src_namespace,
            src_workload,
            dst_namespace,
            dst_workload,
            protocol,
            dst_port,
        } = self;
        [
            ("verdict", verdict),
            ("outcome", outcome),
            ("src_namespace", src_namespace),
            ("src_workload", src_workload),
            ("dst_namespace", dst_namespace),
            ("dst_workload", dst_workload),
            ("protocol", protocol),
            ("dst_port", dst_port),
        ]
    }

    /// Whether these are the labels of `flow` (compared without building them).
    pub(super) fn describe(&self, flow: &AuditedFlow) -> bool {
        let port_matches = match flow.dst_port {
            None => self.dst_port == "other",
            Some(port) => self.dst_port.parse() == Ok(port),
        };
        port_matches
            && self.verdict == flow.verdict.as_str()
            && self.outcome == flow.record.outcome.as_str()
            && self.src_namespace == flow.src.namespace_label()
            && self.src_workload == flow.src.workload_label()
            && self.dst_namespace == flow.dst.namespace_label()
            && self.dst_workload == flow.dst.workload_label()
            && self.protocol == flow.record.protocol.label()
    }

    /// A hash of `flow`'s label values, for [`Series`].
    pub(super) fn hash_of(flow: &AuditedFlow) -> u64 {
        let mut h = FxHasher::default();
        flow.verdict.hash(&mut h);
        flow.record.outcome.hash(&mut h);
        flow.src.namespace_label().hash(&mut h);
        flow.src.workload_label().hash(&mut h);
        flow.dst.namespace_label().hash(&mut h);
        flow.dst.workload_label().hash(&mut h);
        flow.record.protocol.hash(&mut h);
        flow.dst_port.hash(&mut h);
        h.finish()
    }

    /// The always-present series of a verdict and outcome: every other label empty (no real flow
    /// has an empty workload), so `sum by (verdict)` exists from the first scrape.
    pub(super) fn placeholder(verdict: AuditVerdict, outcome: &str) -> Self {
        Self {
            verdict: verdict.as_str().to_owned(),
            outcome: outcome.to_owned(),
            src_namespace: String::new(),
            src_workload: String::new(),
            dst_namespace: String::new(),
            dst_workload: String::new(),
            protocol: String::new(),
            dst_port: String::new(),
        }
    }
}

/// Labels of `flow_auditor_policy_rule_hits_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RuleLabels {
    pub policy_kind: &'static str,
    /// Shared by the series of one policy's rules, and with the series index.
    pub policy_namespace: Arc<str>,
    pub policy_name: Arc<str>,
    pub direction: &'static str,
    pub rule: Arc<str>,
    pub action: &'static str,
}

impl RuleLabels {
    /// The labels as the exposition writes them, in this order.
    pub(super) fn pairs(&self) -> [(&'static str, &str); 6] {
        let Self {
            policy_kind,
            policy_namespace,
            policy_name,
            direction,
            rule,
            action,
        } = self;
        [
            ("policy_kind", policy_kind),
            ("policy_namespace", policy_namespace),
            ("policy_name", policy_name),
            ("direction", direction),
            ("rule", rule),
            ("action", action),
        ]
    }

    pub(super) fn names(&self, key: &PolicyKey) -> bool {
        self.policy_kind == key.kind.as_str()
            && *self.policy_namespace == *key.namespace
            && *self.policy_name == *key.name
    }

    pub(super) fn of(decision: &RuleHit) -> Self {
        Self {
            policy_kind: decision.policy.kind.as_str(),
            policy_namespace: decision.policy.namespace.as_str().into(),
            policy_name: decision.policy.name.as_str().into(),
            direction: decision.direction.as_str(),
            rule: decision.rule.as_str().into(),
            action: decision.action.as_str(),
        }
    }

    /// Whether these are the labels of `decision` (compared without building them).
    pub(super) fn describe(&self, decision: &RuleHit) -> bool {
        self.is(
            &decision.policy,
            decision.direction,
            &decision.rule,
            decision.action,
        )
    }

    /// Whether these are the labels of that policy's rule.
    pub(super) fn is(
        &self,
        policy: &PolicyKey,
        direction: Direction,
        rule: &str,
        action: Action,
    ) -> bool {
        self.names(policy)
            && self.direction == direction.as_str()
            && *self.rule == *rule
            && self.action == action.as_str()
    }

    pub(super) fn hash_of(decision: &RuleHit) -> u64 {
        Self::hash_parts(
            &decision.policy,
            decision.direction,
            &decision.rule,
            decision.action,
        )
    }

    pub(super) fn hash_parts(
        policy: &PolicyKey,
        direction: Direction,
        rule: &str,
        action: Action,
    ) -> u64 {
        let mut h = FxHasher::default();
        policy.hash(&mut h);
        direction.hash(&mut h);
        rule.hash(&mut h);
        action.hash(&mut h);
        h.finish()
    }
}

/// The series of a family created so far, with their counts, found by a hash of the label
/// values: counting a flow of an existing series builds no label set. The counts are plain
/// integers: they change and are read only under the lock that guards the index.
#[derive(Debug)]
pub(super) struct Series<L> {
    by_hash: FxHashMap<u64, Vec<(L, u64)>>,
    pub(super) len: usize,
}

impl<L> Default for Series<L> {
    fn default() -> Self {
        Self {
            by_hash: FxHashMap::default(),
            len: 0,
        }
    }
}

impl<L: Clone + Hash + Eq> Series<L> {
    /// The count of the series `matches` picks among those hashed `hash`, created at zero
    /// (labels from `make`) when new.
    pub(super) fn counter(
        &mut self,
        hash: u64,
        matches: impl Fn(&L) -> bool,
        make: impl FnOnce() -> L,
    ) -> &mut u64 {
        // Nearly every bucket holds one series: sized exactly, not the four a pushed-to empty
        // `Vec` reserves (with thousands of rule series that was most of their memory).
        let bucket = self
            .by_hash
            .entry(hash)
            .or_insert_with(|| Vec::with_capacity(1));
        let at = if let Some(at) = bucket.iter().position(|(labels, _)| matches(labels)) {
            at
        } else {
            bucket.push((make(), 0));
            self.len += 1;
            bucket.len() - 1
        };
        &mut bucket[at].1
    }

    /// Removes the series `gone` picks; returns how many.
    pub(super) fn remove(&mut self, gone: impl Fn(&L) -> bool) -> usize {
        let before = self.len;
        self.by_hash.retain(|_, bucket| {
            bucket.retain(|(labels, _)| !gone(labels));
            !bucket.is_empty()
        });
        self.len = self.by_hash.values().map(Vec::len).sum();
        before - self.len
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &(L, u64)> {
        self.by_hash.values().flatten()
    }
}
