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
//!   could not take), `sampled_out_packets_total` (packets skipped on purpose),
//!   `flow_table_evictions_total{decided=true|false}` (flows the kernel's LRU evicted, before or
//!   after their outcome was decided), `reported_mark_failures_total` (counted marks the map
//!   of counted flows could not take: full, or another error);
//!   `encapsulated_packets_total` (tunnels' outer packets on the uplinks, not flows) and
//!   `duplicate_packets_total` (packets a second hook on the node saw, counted once);
//! - `flow_table_entries`, `flow_table_capacity`, `attached_interfaces{mode=tcx|clsact}`,
//!   `policies{kind}`,
//!   `policy_errors`, `model_generation`, `model_last_update_timestamp_seconds`,
//!   `inventory_staleness_seconds`, `unexpected_logs_suppressed_total`, `build_info{version}`.
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::audit::{AuditVerdict, AuditedFlow};
use crate::datapath::attach::HookMode;
use crate::policy::ir::{Action, PolicyKey, PolicyKind};
use crate::vocab::Direction;

use super::exposition::{Encoder, Family, Format, Kind, Sink, Value};

mod series;

use series::Series;
pub use series::{FlowLabels, RuleLabels};

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
const EVICTIONS: Family = counter(
    "flow_auditor_flow_table_evictions",
    "Flows the kernel flow table evicted to make room (LRU), by whether their outcome was \
     already decided; an undecided one is counted unanswered unless an event says otherwise.",
);
const MARK_FAILURES: Family = counter(
    "flow_auditor_reported_mark_failures",
    "Writes of a counted flow's mark that the map of counted flows (REPORTED) refused, full or \
     for another reason; an agent adopting the pinned tables after a restart would count such \
     a flow again. Tried again at the next table walk.",
);
const SAMPLED_OUT: Family = counter(
    "flow_auditor_sampled_out_packets",
    "Packets of established flows skipped by sampling: in no flow's packet and byte counts, \
     by design.",
);
const ENCAPSULATED: Family = counter(
    "flow_auditor_encapsulated_packets",
    "Outer packets of VXLAN, Geneve and WireGuard seen on the uplinks: their inner packets are \
     the flows, seen on the tunnel device.",
);
const DUPLICATES: Family = counter(
    "flow_auditor_duplicate_packets",
    "Packets seen by a second hook on this node (an uplink, then a pod interface; two pod \
     interfaces): counted in their flow once, by the first.",
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
    "Objects and files of the intended model that cannot be used now; 0 again once they are fixed or deleted.",
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
    /// Evictions of flows `[decided, undecided]`.
    evictions: [AtomicU64; 2],
    mark_failures: AtomicU64,
    sampled_out: AtomicU64,
    encapsulated: AtomicU64,
    duplicates: AtomicU64,
    flow_table_entries: AtomicI64,
    flow_table_capacity: AtomicI64,
    attached: [AtomicI64; HookMode::ALL.len()],
    policies: [AtomicI64; PolicyKind::ALL.len()],
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
            evictions: Default::default(),
            mark_failures: AtomicU64::new(0),
            sampled_out: AtomicU64::new(0),
            encapsulated: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
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

    /// Brings the flow-table eviction counters up to the flow stream's totals (as
    /// [`Metrics::set_lost_events`]).
    pub fn set_flow_table_evictions(&self, decided: u64, undecided: u64) {
        self.evictions[0].fetch_max(decided, Ordering::Relaxed);
        self.evictions[1].fetch_max(undecided, Ordering::Relaxed);
    }

    /// Brings the failed writes of counted marks up to the flow stream's total (as
    /// [`Metrics::set_lost_events`]).
    pub fn set_reported_mark_failures(&self, total: u64) {
        self.mark_failures.fetch_max(total, Ordering::Relaxed);
    }

    /// Brings the packets skipped by sampling up to the datapath's total (as
    /// [`Metrics::set_lost_events`]).
    pub fn set_sampled_out_packets(&self, total: u64) {
        self.sampled_out.fetch_max(total, Ordering::Relaxed);
    }

    /// Brings the uplinks' encapsulation packets and the packets seen twice on the node up to
    /// the datapath's totals (as [`Metrics::set_lost_events`]).
    pub fn set_not_flow_packets(&self, encapsulated: u64, duplicates: u64) {
        self.encapsulated.fetch_max(encapsulated, Ordering::Relaxed);
        self.duplicates.fetch_max(duplicates, Ordering::Relaxed);
    }

    pub fn set_flow_table(&self, entries: u64, capacity: u64) {
        self.flow_table_entries
            .store(saturating_i64(entries), Ordering::Relaxed);
        self.flow_table_capacity
            .store(saturating_i64(capacity), Ordering::Relaxed);
    }

    pub fn set_attached_interfaces(&self, mode: HookMode, count: usize) {
        self.attached[mode.index()].store(saturating_i64(count as u64), Ordering::Relaxed);
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
            self.policies[kind.index()].store(saturating_i64(count as u64), Ordering::Relaxed);
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
        sink.family(&EVICTIONS);
        for (decided, counter) in ["true", "false"].into_iter().zip(&self.evictions) {
            let count = Value::Count(counter.load(Ordering::Relaxed));
            sink.sample(&[("decided", decided)], count);
        }
        sink.family(&MARK_FAILURES);
        sink.sample(
            &[],
            Value::Count(self.mark_failures.load(Ordering::Relaxed)),
        );
        sink.family(&SAMPLED_OUT);
        sink.sample(&[], Value::Count(self.sampled_out.load(Ordering::Relaxed)));
        sink.family(&ENCAPSULATED);
        sink.sample(&[], Value::Count(self.encapsulated.load(Ordering::Relaxed)));
        sink.family(&DUPLICATES);
        sink.sample(&[], Value::Count(self.duplicates.load(Ordering::Relaxed)));
        sink.family(&FLOW_TABLE_ENTRIES);
        sink.sample(&[], relaxed(&self.flow_table_entries));
        sink.family(&FLOW_TABLE_CAPACITY);
        sink.sample(&[], relaxed(&self.flow_table_capacity));
        sink.family(&ATTACHED);
        for mode in HookMode::ALL {
            let count = relaxed(&self.attached[mode.index()]);
            sink.sample(&[("mode", mode.as_str())], count);
        }
        sink.family(&POLICIES);
        for kind in PolicyKind::ALL {
            let count = relaxed(&self.policies[kind.index()]);
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
mod tests;
