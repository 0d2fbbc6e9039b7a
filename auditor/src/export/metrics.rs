//! The Prometheus metrics of SPEC 5.3: the flow counter, the per-rule hit counter and the health
//! set, kept here and written in either exposition format ([`super::exposition`]) at each
//! scrape. Label sets are bounded by the inventory and the policies, and series go away with
//! the namespace, workload or policy they name.
//!
//! Exposed (all prefixed `flow_auditor_`):
//! - `flows_total{verdict, outcome, src_namespace, src_workload, dst_namespace, dst_workload,
//!   protocol, dst_port}`; one zero-valued series per verdict and possible outcome, with every
//!   other label empty, exists from the start so `sum by (verdict)` alerts have a series;
//! - `policy_rule_hits_total{policy_kind, policy_namespace, policy_name, direction, rule, action}`
//!   (`rule="default-deny"` for each policy isolating a pod no rule admitted the flow to), one
//!   series per rule of every loaded policy from the moment it is loaded, at zero until used;
//! - one unit per metric for what the datapath could not pass on: `lost_events_total{source=
//!   ring_buffer}` (events), `flow_table_insert_failures_total` (packets whose flow the table
//!   could not take), `sampled_out_packets_total` (packets skipped on purpose);
//! - `flow_table_entries`, `flow_table_capacity`, `attached_interfaces{mode=tcx|clsact}`,
//!   `policies{kind}`,
//!   `policy_errors`, `model_generation`, `model_last_update_timestamp_seconds`,
//!   `inventory_staleness_seconds`, `unexpected_logs_suppressed_total`, `build_info{version}`.
use std::hash::{Hash, Hasher as _};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustc_hash::{FxHashMap, FxHasher};

use crate::audit::{AuditVerdict, AuditedFlow, RuleHit};
use crate::datapath::attach::HookMode;
use crate::policy::ir::{Action, PolicyKey, PolicyKind};
use crate::vocab::Direction;

use super::exposition::{Encoder, Family, Format, Kind, Sink, Value};

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
    fn pairs(&self) -> [(&'static str, &str); 8] {
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
    fn describe(&self, flow: &AuditedFlow) -> bool {
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
    fn hash_of(flow: &AuditedFlow) -> u64 {
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
    fn placeholder(verdict: AuditVerdict, outcome: &str) -> Self {
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
    fn pairs(&self) -> [(&'static str, &str); 6] {
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

    fn names(&self, key: &PolicyKey) -> bool {
        self.policy_kind == key.kind.as_str()
            && *self.policy_namespace == *key.namespace
            && *self.policy_name == *key.name
    }

    fn of(decision: &RuleHit) -> Self {
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
    fn describe(&self, decision: &RuleHit) -> bool {
        self.is(
            &decision.policy,
            decision.direction,
            &decision.rule,
            decision.action,
        )
    }

    /// Whether these are the labels of that policy's rule.
    fn is(&self, policy: &PolicyKey, direction: Direction, rule: &str, action: Action) -> bool {
        self.names(policy)
            && self.direction == direction.as_str()
            && *self.rule == *rule
            && self.action == action.as_str()
    }

    fn hash_of(decision: &RuleHit) -> u64 {
        Self::hash_parts(
            &decision.policy,
            decision.direction,
            &decision.rule,
            decision.action,
        )
    }

    fn hash_parts(policy: &PolicyKey, direction: Direction, rule: &str, action: Action) -> u64 {
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
struct Series<L> {
    by_hash: FxHashMap<u64, Vec<(L, u64)>>,
    len: usize,
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
    fn counter(
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
    fn remove(&mut self, gone: impl Fn(&L) -> bool) -> usize {
        let before = self.len;
        self.by_hash.retain(|_, bucket| {
            bucket.retain(|(labels, _)| !gone(labels));
            !bucket.is_empty()
        });
        self.len = self.by_hash.values().map(Vec::len).sum();
        before - self.len
    }

    fn iter(&self) -> impl Iterator<Item = &(L, u64)> {
        self.by_hash.values().flatten()
    }
}

/// Where datapath events were lost (SPEC 3: nothing is lost silently). Each metric counts one
/// unit: events here; packets the flow table could not take and packets skipped by sampling
/// have counters of their own ([`Metrics::set_flow_table_insert_failures`],
/// [`Metrics::set_sampled_out_packets`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LostSource {
    /// The ring buffer was full when the datapath had an event to send, or user space could not
    /// decode an event it read.
    RingBuffer,
}

impl LostSource {
    pub const ALL: [Self; 1] = [Self::RingBuffer];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RingBuffer => "ring_buffer",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::RingBuffer => 0,
        }
    }
}

/// A counter that can be handed out: clones count together (the unexpected-flow log bumps the
/// one [`Metrics::unexpected_logs_suppressed`] gives it).
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    #[must_use]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge holding an `f64` (as its bits).
#[derive(Debug, Default)]
struct GaugeF64(AtomicU64);

impl GaugeF64 {
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// The policy kinds `flow_auditor_policies` has a series for, from the start.
const POLICY_KINDS: [PolicyKind; 3] = [
    PolicyKind::NetworkPolicy,
    PolicyKind::CiliumNetworkPolicy,
    PolicyKind::CiliumClusterwideNetworkPolicy,
];

const fn policy_kind_index(kind: PolicyKind) -> usize {
    match kind {
        PolicyKind::NetworkPolicy => 0,
        PolicyKind::CiliumNetworkPolicy => 1,
        PolicyKind::CiliumClusterwideNetworkPolicy => 2,
    }
}

const fn hook_mode_index(mode: HookMode) -> usize {
    match mode {
        HookMode::Tcx => 0,
        HookMode::Clsact => 1,
    }
}

const fn counter(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        help,
        unit: None,
        kind: Kind::Counter,
    }
}

const fn gauge(name: &'static str, help: &'static str, unit: Option<&'static str>) -> Family {
    Family {
        name,
        help,
        unit,
        kind: Kind::Gauge,
    }
}

// The families, in the order they are written.
const FLOWS: Family = counter(
    "flow_auditor_flows",
    "Flows counted, by audit verdict, outcome, peers, protocol and destination port.",
);
const RULE_HITS: Family = counter(
    "flow_auditor_policy_rule_hits",
    "Flows decided by each policy rule, per direction.",
);
const LOST_EVENTS: Family = counter(
    "flow_auditor_lost_events",
    "Datapath events lost before user space read them or could not be decoded, by where they \
     were lost.",
);
const INSERT_FAILURES: Family = counter(
    "flow_auditor_flow_table_insert_failures",
    "Packets that would have started a flow the kernel flow table could not take; their flows \
     are not tracked.",
);
const SAMPLED_OUT: Family = counter(
    "flow_auditor_sampled_out_packets",
    "Packets of established flows skipped by sampling: in no flow's packet and byte counts, \
     by design.",
);
const FLOW_TABLE_ENTRIES: Family = gauge(
    "flow_auditor_flow_table_entries",
    "Entries in the kernel flow table.",
    None,
);
const FLOW_TABLE_CAPACITY: Family = gauge(
    "flow_auditor_flow_table_capacity",
    "Maximum entries of the kernel flow table.",
    None,
);
const ATTACHED: Family = gauge(
    "flow_auditor_attached_interfaces",
    "Interfaces the datapath is attached to, by attach mode.",
    None,
);
const POLICIES: Family = gauge(
    "flow_auditor_policies",
    "Policy objects in the intended model, by kind.",
    None,
);
const POLICY_ERRORS: Family = gauge(
    "flow_auditor_policy_errors",
    "Policy objects left out of the model because they could not be compiled.",
    None,
);
const MODEL_GENERATION: Family = gauge(
    "flow_auditor_model_generation",
    "Generation of the intended model, bumped on every change.",
    None,
);
const MODEL_UPDATED: Family = gauge(
    "flow_auditor_model_last_update_timestamp_seconds",
    "Unix time of the last change of the intended model.",
    Some("seconds"),
);
const INVENTORY_STALENESS: Family = gauge(
    "flow_auditor_inventory_staleness_seconds",
    "Seconds since the inventory was last known in sync with its source; 0 while in sync.",
    Some("seconds"),
);
const LOGS_SUPPRESSED: Family = counter(
    "flow_auditor_unexpected_logs_suppressed",
    "Unexpected-flow log lines dropped by the rate limit.",
);
// A gauge fixed at 1 rather than an OpenMetrics info: both text formats (and promtool)
// understand it, and it joins the usual way (`* on() group_left(version) ...`).
const BUILD_INFO: Family = gauge(
    "flow_auditor_build_info",
    "Build of the running auditor, always 1.",
    None,
);

/// Every metric the daemon exposes. Shared (`Arc`) between the pipeline and the HTTP server;
/// every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    /// The always-present zero series of each verdict and outcome (see
    /// [`FlowLabels::placeholder`]); no flow counts in them.
    flow_placeholders: Vec<FlowLabels>,
    /// The flow series created by flows (see [`Series`]).
    flow_series: Mutex<Series<FlowLabels>>,
    rule_series: Mutex<Series<RuleLabels>>,
    lost: [AtomicU64; LostSource::ALL.len()],
    insert_failures: AtomicU64,
    sampled_out: AtomicU64,
    flow_table_entries: AtomicI64,
    flow_table_capacity: AtomicI64,
    attached: [AtomicI64; HookMode::ALL.len()],
    policies: [AtomicI64; POLICY_KINDS.len()],
    policy_errors: AtomicI64,
    model_generation: AtomicI64,
    model_updated: GaugeF64,
    /// Unix time of the last moment the inventory was known in sync; 0 while it is.
    inventory_stale_since: GaugeF64,
    log_suppressed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    pub fn new() -> Self {
        let flow_placeholders = AuditVerdict::ALL
            .into_iter()
            .flat_map(|verdict| {
                verdict
                    .outcomes()
                    .iter()
                    .map(move |outcome| FlowLabels::placeholder(verdict, &outcome.to_string()))
            })
            .collect();
        Self {
            flow_placeholders,
            flow_series: Mutex::new(Series::default()),
            rule_series: Mutex::new(Series::default()),
            lost: Default::default(),
            insert_failures: AtomicU64::new(0),
            sampled_out: AtomicU64::new(0),
            flow_table_entries: AtomicI64::new(0),
            flow_table_capacity: AtomicI64::new(0),
            attached: Default::default(),
            policies: Default::default(),
            policy_errors: AtomicI64::new(0),
            model_generation: AtomicI64::new(0),
            model_updated: GaugeF64::default(),
            inventory_stale_since: GaugeF64::default(),
            log_suppressed: Counter::default(),
        }
    }

    /// Counts one audited flow and the rules that decided it.
    pub fn record(&self, flow: &AuditedFlow) {
        *lock(&self.flow_series).counter(
            FlowLabels::hash_of(flow),
            |labels| labels.describe(flow),
            || FlowLabels::of(flow),
        ) += 1;
        let mut rule_series = lock(&self.rule_series);
        for decision in &flow.judgement.decisions {
            *rule_series.counter(
                RuleLabels::hash_of(decision),
                |labels| labels.describe(decision),
                || RuleLabels::of(decision),
            ) += 1;
        }
    }

    /// Makes sure every way the model's policies can decide a flow has a hit series, at zero
    /// until used (see [`crate::policy::model::Model::rule_names`]), so rules nothing used are
    /// listed. Series of rules a changed policy no longer has stay until the policy goes.
    pub fn ensure_rules<'a>(
        &self,
        rules: impl Iterator<Item = (&'a PolicyKey, Direction, &'a str, Action)>,
    ) {
        let mut series = lock(&self.rule_series);
        // The rules come policy by policy: one copy of a policy's names serves all its series.
        let mut names: Option<(&PolicyKey, Arc<str>, Arc<str>)> = None;
        for (policy, direction, rule, action) in rules {
            if names.as_ref().is_none_or(|(key, _, _)| *key != policy) {
                names = Some((
                    policy,
                    policy.namespace.as_str().into(),
                    policy.name.as_str().into(),
                ));
            }
            let Some((_, namespace, name)) = &names else {
                continue;
            };
            series.counter(
                RuleLabels::hash_parts(policy, direction, rule, action),
                |l| l.is(policy, direction, rule, action),
                || RuleLabels {
                    policy_kind: policy.kind.as_str(),
                    policy_namespace: Arc::clone(namespace),
                    policy_name: Arc::clone(name),
                    direction: direction.as_str(),
                    rule: rule.into(),
                    action: action.as_str(),
                },
            );
        }
    }

    /// The current value of a rule series (`None` when it does not exist).
    #[must_use]
    pub fn rule_count(&self, labels: &RuleLabels) -> Option<u64> {
        lock(&self.rule_series)
            .iter()
            .find(|(l, _)| l == labels)
            .map(|(_, count)| *count)
    }

    /// The current value of a flow series (`None` when it does not exist).
    #[must_use]
    pub fn flow_count(&self, labels: &FlowLabels) -> Option<u64> {
        if self.flow_placeholders.contains(labels) {
            return Some(0);
        }
        lock(&self.flow_series)
            .iter()
            .find(|(l, _)| l == labels)
            .map(|(_, count)| *count)
    }

    /// Number of flow series created by flows (the per-verdict placeholders not included).
    #[must_use]
    pub fn flow_series(&self) -> usize {
        lock(&self.flow_series).len
    }

    /// Removes every flow series naming `namespace` on either side, and every rule series of a
    /// policy in it. Returns how many series went away.
    pub fn remove_namespace(&self, namespace: &str) -> usize {
        if namespace.is_empty() {
            return 0;
        }
        let flows = lock(&self.flow_series)
            .remove(|l| l.src_namespace == namespace || l.dst_namespace == namespace);
        let rules = lock(&self.rule_series).remove(|l| *l.policy_namespace == *namespace);
        flows + rules
    }

    /// Removes every flow series naming the workload `namespace/workload` on either side.
    pub fn remove_workload(&self, namespace: &str, workload: &str) -> usize {
        if namespace.is_empty() {
            return 0;
        }
        lock(&self.flow_series).remove(|l| {
            (l.src_namespace == namespace && l.src_workload == workload)
                || (l.dst_namespace == namespace && l.dst_workload == workload)
        })
    }

    /// Removes every rule series of a policy.
    pub fn remove_policy(&self, key: &PolicyKey) -> usize {
        lock(&self.rule_series).remove(|l| l.names(key))
    }

    /// Brings a lost-events counter up to the datapath's total (kernel counters only grow; a
    /// smaller total, after a reload, adds nothing).
    pub fn set_lost_events(&self, source: LostSource, total: u64) {
        self.lost[source.index()].fetch_max(total, Ordering::Relaxed);
    }

    /// Brings the flow table's failed inserts up to the datapath's total (as
    /// [`Metrics::set_lost_events`]).
    pub fn set_flow_table_insert_failures(&self, total: u64) {
        self.insert_failures.fetch_max(total, Ordering::Relaxed);
    }

    /// Brings the packets skipped by sampling up to the datapath's total (as
    /// [`Metrics::set_lost_events`]).
    pub fn set_sampled_out_packets(&self, total: u64) {
        self.sampled_out.fetch_max(total, Ordering::Relaxed);
    }

    pub fn set_flow_table(&self, entries: u64, capacity: u64) {
        self.flow_table_entries
            .store(saturating_i64(entries), Ordering::Relaxed);
        self.flow_table_capacity
            .store(saturating_i64(capacity), Ordering::Relaxed);
    }

    pub fn set_attached_interfaces(&self, mode: HookMode, count: usize) {
        self.attached[hook_mode_index(mode)].store(saturating_i64(count as u64), Ordering::Relaxed);
    }

    /// The model as loaded: objects per kind, objects that failed to compile, its generation
    /// and when it changed.
    pub fn set_model(
        &self,
        per_kind: &[(PolicyKind, usize)],
        errors: usize,
        generation: u64,
        updated: SystemTime,
    ) {
        for &(kind, count) in per_kind {
            self.policies[policy_kind_index(kind)]
                .store(saturating_i64(count as u64), Ordering::Relaxed);
        }
        self.policy_errors
            .store(saturating_i64(errors as u64), Ordering::Relaxed);
        self.model_generation
            .store(saturating_i64(generation), Ordering::Relaxed);
        self.model_updated.set(unix_seconds(updated));
    }

    /// Whether the inventory is in sync with its source. While it is not, the staleness gauge
    /// grows from the moment it was last known in sync (`since`) at every scrape.
    pub fn set_inventory_synced(&self, synced: bool, since: SystemTime) {
        let value = if synced {
            0.0
        } else {
            unix_seconds(since).max(f64::MIN_POSITIVE)
        };
        self.inventory_stale_since.set(value);
    }

    /// The counter the unexpected-flow log bumps for each line it drops.
    #[must_use]
    pub fn unexpected_logs_suppressed(&self) -> Counter {
        self.log_suppressed.clone()
    }

    /// Every metric, as of `now`, in `format`.
    #[must_use]
    pub fn encode(&self, now: SystemTime, format: Format) -> String {
        let mut encoder = Encoder::new(format, 16 * 1024);
        self.collect(now, &mut encoder);
        encoder.finish()
    }

    /// Hands every family and its samples, as of `now`, to `sink`.
    fn collect(&self, now: SystemTime, sink: &mut impl Sink) {
        let relaxed = |v: &AtomicI64| Value::Int(v.load(Ordering::Relaxed));
        sink.family(&FLOWS);
        for labels in &self.flow_placeholders {
            sink.sample(&labels.pairs(), Value::Count(0));
        }
        for (labels, count) in lock(&self.flow_series).iter() {
            sink.sample(&labels.pairs(), Value::Count(*count));
        }
        sink.family(&RULE_HITS);
        for (labels, count) in lock(&self.rule_series).iter() {
            sink.sample(&labels.pairs(), Value::Count(*count));
        }
        sink.family(&LOST_EVENTS);
        for source in LostSource::ALL {
            let total = self.lost[source.index()].load(Ordering::Relaxed);
            sink.sample(&[("source", source.as_str())], Value::Count(total));
        }
        sink.family(&INSERT_FAILURES);
        let failures = self.insert_failures.load(Ordering::Relaxed);
        sink.sample(&[], Value::Count(failures));
        sink.family(&SAMPLED_OUT);
        sink.sample(&[], Value::Count(self.sampled_out.load(Ordering::Relaxed)));
        sink.family(&FLOW_TABLE_ENTRIES);
        sink.sample(&[], relaxed(&self.flow_table_entries));
        sink.family(&FLOW_TABLE_CAPACITY);
        sink.sample(&[], relaxed(&self.flow_table_capacity));
        sink.family(&ATTACHED);
        for mode in HookMode::ALL {
            let count = relaxed(&self.attached[hook_mode_index(mode)]);
            sink.sample(&[("mode", mode.as_str())], count);
        }
        sink.family(&POLICIES);
        for kind in POLICY_KINDS {
            let count = relaxed(&self.policies[policy_kind_index(kind)]);
            sink.sample(&[("kind", kind.as_str())], count);
        }
        sink.family(&POLICY_ERRORS);
        sink.sample(&[], relaxed(&self.policy_errors));
        sink.family(&MODEL_GENERATION);
        sink.sample(&[], relaxed(&self.model_generation));
        sink.family(&MODEL_UPDATED);
        sink.sample(&[], Value::Float(self.model_updated.get()));
        sink.family(&INVENTORY_STALENESS);
        let since = self.inventory_stale_since.get();
        let staleness = if since > 0.0 {
            (unix_seconds(now) - since).max(0.0)
        } else {
            0.0
        };
        sink.sample(&[], Value::Float(staleness));
        sink.family(&LOGS_SUPPRESSED);
        sink.sample(&[], Value::Count(self.log_suppressed.get()));
        sink.family(&BUILD_INFO);
        sink.sample(&[("version", env!("CARGO_PKG_VERSION"))], Value::Int(1));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a set that is still consistent: keep using it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicU64;

    use prometheus_client::metrics::counter::Counter as PcCounter;
    use prometheus_client::metrics::family::Family as PcFamily;
    use prometheus_client::metrics::gauge::Gauge as PcGauge;
    use prometheus_client::registry::{Metric, Registry, Unit};

    use crate::audit::{Peer, PodPeer};

    type PcLabels = Vec<(String, String)>;

    /// One family handed to `prometheus-client`, of the type its first sample's value says: a
    /// metric of its own for a family of one series without labels, else a family.
    enum PcMetric {
        Counter(PcFamily<PcLabels, PcCounter>),
        Int(PcFamily<PcLabels, PcGauge>),
        Float(PcFamily<PcLabels, PcGauge<f64, AtomicU64>>),
        /// Registered with its value: a metric of one series takes one sample.
        One,
    }

    /// The families of a [`Metrics`] rebuilt as `prometheus-client` families in its registry,
    /// for its own `OpenMetrics` encoder to write.
    #[derive(Default)]
    struct Reference {
        registry: Registry,
        family: Option<&'static Family>,
        metric: Option<PcMetric>,
    }

    impl Reference {
        fn register(&mut self, family: &Family, metric: impl Metric) {
            // prometheus-client ends every help text with a full stop of its own.
            let help = family.help.strip_suffix('.').unwrap_or(family.help);
            match family.unit {
                None => self.registry.register(family.name, help, metric),
                Some(unit) => {
                    let name = family
                        .name
                        .strip_suffix(&format!("_{unit}"))
                        .unwrap_or_else(|| panic!("{} does not end in its unit", family.name));
                    let unit = match unit {
                        "seconds" => Unit::Seconds,
                        other => Unit::Other(other.to_owned()),
                    };
                    self.registry.register_with_unit(name, help, unit, metric);
                }
            }
        }
    }

    impl Sink for Reference {
        fn family(&mut self, family: &'static Family) {
            self.family = Some(family);
            self.metric = None;
        }

        fn sample(&mut self, labels: &[(&str, &str)], value: Value) {
            let family = self
                .family
                .unwrap_or_else(|| panic!("a sample before a family"));
            assert_eq!(
                family.kind == Kind::Counter,
                matches!(value, Value::Count(_)),
                "{}: counters and only counters have counts",
                family.name
            );
            if self.metric.is_none() {
                let metric = match value {
                    Value::Count(v) if labels.is_empty() => {
                        let c: PcCounter = PcCounter::default();
                        c.inc_by(v);
                        self.register(family, c);
                        PcMetric::One
                    }
                    Value::Int(v) if labels.is_empty() => {
                        let g: PcGauge = PcGauge::default();
                        g.set(v);
                        self.register(family, g);
                        PcMetric::One
                    }
                    Value::Float(v) if labels.is_empty() => {
                        let g = PcGauge::<f64, AtomicU64>::default();
                        g.set(v);
                        self.register(family, g);
                        PcMetric::One
                    }
                    Value::Count(_) => {
                        let f = PcFamily::default();
                        self.register(family, f.clone());
                        PcMetric::Counter(f)
                    }
                    Value::Int(_) => {
                        let f = PcFamily::default();
                        self.register(family, f.clone());
                        PcMetric::Int(f)
                    }
                    Value::Float(_) => {
                        let f = PcFamily::default();
                        self.register(family, f.clone());
                        PcMetric::Float(f)
                    }
                };
                self.metric = Some(metric);
            }
            let labels: PcLabels = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            match (&self.metric, value) {
                (Some(PcMetric::Counter(f)), Value::Count(v)) => {
                    f.get_or_create(&labels).inc_by(v);
                }
                (Some(PcMetric::Int(f)), Value::Int(v)) => {
                    f.get_or_create(&labels).set(v);
                }
                (Some(PcMetric::Float(f)), Value::Float(v)) => {
                    f.get_or_create(&labels).set(v);
                }
                (Some(PcMetric::One), _) if labels.is_empty() => {
                    // Set above: the one sample of a family without labels.
                }
                _ => panic!(
                    "{}: samples of mixed value types, or more than one without labels",
                    family.name
                ),
            }
        }
    }

    /// An exposition as its families (from each `# HELP` on), each its metadata in order and
    /// its samples sorted (families keep series in no particular order); an integer value as
    /// written, a float as the number it reads as (prometheus-client's float writer does not
    /// always pick the shortest of the decimal forms that read back as the same number).
    fn families(text: &str) -> Vec<(Vec<&str>, Vec<String>)> {
        let mut out: Vec<(Vec<&str>, Vec<String>)> = Vec::new();
        for line in text.lines() {
            if line.starts_with("# HELP ") || out.is_empty() {
                out.push((Vec::new(), Vec::new()));
            }
            let Some((meta, samples)) = out.last_mut() else {
                continue;
            };
            if line.starts_with('#') {
                meta.push(line);
            } else {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("no value: {line:?}"));
                if value.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
                    samples.push(line.to_owned());
                } else {
                    let value: f64 = value
                        .parse()
                        .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
                    samples.push(format!("{series} {value:?} (a float)"));
                }
            }
        }
        for (_, samples) in &mut out {
            samples.sort_unstable();
        }
        out
    }

    /// Metrics with something in every family, and label values that need escaping.
    fn populated() -> Metrics {
        let m = Metrics::new();
        let policy = PolicyKey {
            kind: PolicyKind::NetworkPolicy,
            namespace: "db".into(),
            name: "allow-web".into(),
        };
        m.ensure_rules(
            [
                (&policy, Direction::Ingress, "ingress[0]", Action::Allow),
                (&policy, Direction::Ingress, "default-deny", Action::Deny),
            ]
            .into_iter(),
        );
        let flow = crate::export::log::tests::flow(AuditVerdict::Unexpected);
        for _ in 0..3 {
            m.record(&flow);
        }
        let mut odd = crate::export::log::tests::flow(AuditVerdict::Denied);
        odd.src = Peer::Pod(PodPeer {
            namespace: "we\\ird".into(),
            name: "x-0".into(),
            workload: "say \"hi\"\nthere".into(),
            node: None,
        });
        odd.dst_port = None;
        m.record(&odd);
        m.set_lost_events(LostSource::RingBuffer, 7);
        m.set_flow_table_insert_failures(2);
        m.set_sampled_out_packets(u64::MAX);
        m.set_flow_table(1234, 65536);
        m.set_attached_interfaces(HookMode::Tcx, 12);
        m.set_model(
            &[(PolicyKind::NetworkPolicy, 5)],
            1,
            42,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_250),
        );
        m.set_inventory_synced(
            false,
            SystemTime::now() - std::time::Duration::from_millis(30_125),
        );
        m.unexpected_logs_suppressed().inc_by(4);
        m
    }

    #[test]
    fn openmetrics_is_what_prometheus_client_writes_for_the_same_families() {
        for m in [Metrics::new(), populated()] {
            let now = SystemTime::now();
            let ours = m.encode(now, Format::OpenMetrics);
            let mut reference = Reference::default();
            m.collect(now, &mut reference);
            let mut theirs = String::new();
            prometheus_client::encoding::text::encode(&mut theirs, &reference.registry)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                families(&ours),
                families(&theirs),
                "ours:\n{ours}\nprometheus-client:\n{theirs}"
            );
        }
    }

    #[test]
    fn both_formats_carry_the_same_samples() {
        let m = populated();
        let now = SystemTime::now();
        let om = m.encode(now, Format::OpenMetrics);
        let text = m.encode(now, Format::Text);
        let samples = |t: &str| {
            let mut s: Vec<String> = t
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            s.sort_unstable();
            s
        };
        assert_eq!(samples(&om), samples(&text));
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(
            text.contains("# TYPE flow_auditor_flows_total counter\n")
                && !text.contains("# UNIT")
                && !text.contains("# EOF"),
            "{text}"
        );
        assert!(
            text.contains("src_workload=\"say \\\"hi\\\"\\nthere\""),
            "{text}"
        );
    }

    #[test]
    fn every_rule_has_a_series_from_the_start_and_hits_count_in_it() {
        let m = Metrics::new();
        let policy = PolicyKey {
            kind: PolicyKind::NetworkPolicy,
            namespace: "db".into(),
            name: "allow-web".into(),
        };
        let rules = [
            (&policy, Direction::Ingress, "ingress[0]", Action::Allow),
            (&policy, Direction::Ingress, "default-deny", Action::Deny),
        ];
        m.ensure_rules(rules.into_iter());
        m.ensure_rules(rules.into_iter());
        let labels = |rule: &str, action: &'static str| RuleLabels {
            policy_kind: "NetworkPolicy",
            policy_namespace: "db".into(),
            policy_name: "allow-web".into(),
            direction: "ingress",
            rule: rule.into(),
            action,
        };
        assert_eq!(m.rule_count(&labels("ingress[0]", "allow")), Some(0));
        assert_eq!(m.rule_count(&labels("default-deny", "deny")), Some(0));
        assert_eq!(lock(&m.rule_series).len, 2, "ensured twice, created once");
        // The flow denied by default counts in the series made for it, not a new one.
        m.record(&crate::export::log::tests::flow(AuditVerdict::Unexpected));
        assert_eq!(m.rule_count(&labels("default-deny", "deny")), Some(1));
        assert_eq!(m.rule_count(&labels("ingress[0]", "allow")), Some(0));
        assert_eq!(lock(&m.rule_series).len, 2);
        let text = m.encode(SystemTime::now(), Format::OpenMetrics);
        assert!(
            text.contains("rule=\"ingress[0]\",action=\"allow\"} 0\n"),
            "{text}"
        );
        // The policy going takes its series along.
        assert_eq!(m.remove_policy(&policy), 2);
        assert_eq!(m.rule_count(&labels("ingress[0]", "allow")), None);
    }

    #[test]
    fn lost_events_follow_the_kernel_total() {
        let m = Metrics::new();
        m.set_lost_events(LostSource::RingBuffer, 10);
        m.set_lost_events(LostSource::RingBuffer, 25);
        m.set_lost_events(LostSource::RingBuffer, 3);
        m.set_flow_table_insert_failures(4);
        m.set_flow_table_insert_failures(1);
        m.set_sampled_out_packets(9);
        let text = m.encode(SystemTime::now(), Format::Text);
        for line in [
            "flow_auditor_lost_events_total{source=\"ring_buffer\"} 25\n",
            "flow_auditor_flow_table_insert_failures_total 4\n",
            "flow_auditor_sampled_out_packets_total 9\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert_eq!(
            text.matches("flow_auditor_lost_events_total{").count(),
            1,
            "events only: {text}"
        );
    }
}
