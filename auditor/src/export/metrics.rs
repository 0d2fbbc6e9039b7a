//! The Prometheus metrics of SPEC 5.3: the flow counter, the per-rule hit counter and the health
//! set, in one registry encoded as OpenMetrics text. Label sets are bounded by the inventory and
//! the policies, and series go away with the namespace, workload or policy they name.
//!
//! Exposed (all prefixed `flow_auditor_`):
//! - `flows_total{verdict, outcome, src_namespace, src_workload, dst_namespace, dst_workload,
//!   protocol, dst_port}`; one zero-valued series per verdict and possible outcome, with every
//!   other label empty, exists from the start so `sum by (verdict)` alerts have a series;
//! - `policy_rule_hits_total{policy_kind, policy_namespace, policy_name, direction, rule, action}`
//!   (`rule="default-deny"` for each policy isolating a pod no rule admitted the flow to), one
//!   series per rule of every loaded policy from the moment it is loaded, at zero until used;
//! - `lost_events_total{source=ring_buffer|flow_table|sampling}`, `flow_table_entries`,
//!   `flow_table_capacity`, `attached_interfaces{mode=tcx|clsact}`, `policies{kind}`,
//!   `policy_errors`, `model_generation`, `model_last_update_timestamp_seconds`,
//!   `inventory_staleness_seconds`, `unexpected_logs_suppressed_total`, `build_info{version}`.
use std::fmt::Write as _;
use std::hash::{Hash, Hasher as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use rustc_hash::{FxHashMap, FxHasher};

use crate::audit::{AuditVerdict, AuditedFlow, RuleHit};
use crate::datapath::attach::HookMode;
use crate::policy::ir::{Action, Direction, PolicyKey, PolicyKind};

use super::ExportError;

/// Labels of `flow_auditor_flows_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
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
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
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

/// The series of a family created so far, with their counters, found by a hash of the label
/// values: counting a flow of an existing series builds no label set and takes no family lock.
/// Also what removal walks, since a family cannot be listed.
#[derive(Debug)]
struct Series<L> {
    by_hash: FxHashMap<u64, Vec<(L, Counter)>>,
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
    /// The counter of the series `matches` picks among those hashed `hash`, created at zero
    /// (labels from `make`) in `family` when new.
    fn counter(
        &mut self,
        hash: u64,
        matches: impl Fn(&L) -> bool,
        make: impl FnOnce() -> L,
        create: impl FnOnce(&L) -> Counter,
    ) -> &Counter {
        // Nearly every bucket holds one series: sized exactly, not the four a pushed-to empty
        // `Vec` reserves (with thousands of rule series that was most of their memory).
        let bucket = self
            .by_hash
            .entry(hash)
            .or_insert_with(|| Vec::with_capacity(1));
        let at = match bucket.iter().position(|(labels, _)| matches(labels)) {
            Some(at) => at,
            None => {
                let labels = make();
                let counter = create(&labels);
                bucket.push((labels, counter));
                self.len += 1;
                bucket.len() - 1
            }
        };
        &bucket[at].1
    }

    /// Removes the series `gone` picks (telling `removed` of each); returns how many.
    fn remove(&mut self, gone: impl Fn(&L) -> bool, mut removed: impl FnMut(&L)) -> usize {
        let before = self.len;
        self.by_hash.retain(|_, bucket| {
            bucket.retain(|(labels, _)| {
                let remove = gone(labels);
                if remove {
                    removed(labels);
                }
                !remove
            });
            !bucket.is_empty()
        });
        self.len = self.by_hash.values().map(Vec::len).sum();
        before - self.len
    }
}

/// `flow_auditor_policy_rule_hits_total`, encoded straight from the series index.
#[derive(Debug)]
struct RuleHits(Arc<Mutex<Series<RuleLabels>>>);

impl Collector for RuleHits {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series = lock(&self.0);
        // As a family does: no series, no descriptor.
        if series.len == 0 {
            return Ok(());
        }
        let mut metric = encoder.encode_descriptor(
            "policy_rule_hits",
            "Flows decided by each policy rule, per direction",
            None,
            MetricType::Counter,
        )?;
        for (labels, counter) in series.by_hash.values().flatten() {
            counter.encode(metric.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// Where events were lost (SPEC 3: nothing is lost silently).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LostSource {
    /// The ring buffer was full when the datapath had an event to send.
    RingBuffer,
    /// The flow table refused an insert.
    FlowTable,
    /// Established-flow packets skipped by sampling (counted, not judged).
    Sampling,
}

impl LostSource {
    pub const ALL: [Self; 3] = [Self::RingBuffer, Self::FlowTable, Self::Sampling];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RingBuffer => "ring_buffer",
            Self::FlowTable => "flow_table",
            Self::Sampling => "sampling",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type GaugeF64 = Gauge<f64, AtomicU64>;

/// Every metric the daemon exposes. Shared (`Arc`) between the pipeline and the HTTP server;
/// every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    flows: Family<FlowLabels, Counter>,
    /// The label sets created so far (see [`Series`]).
    flow_series: Mutex<Series<FlowLabels>>,
    /// The rule hit series: stored here only, and encoded from here by [`RuleHits`] (a family
    /// would keep a second copy of every label set, and there is a series per rule).
    rule_series: Arc<Mutex<Series<RuleLabels>>>,
    lost: Family<SourceLabel, Counter>,
    flow_table_entries: Gauge,
    flow_table_capacity: Gauge,
    attached: Family<ModeLabel, Gauge>,
    policies: Family<KindLabel, Gauge>,
    policy_errors: Gauge,
    model_generation: Gauge,
    model_updated: GaugeF64,
    inventory_staleness: GaugeF64,
    /// Unix time (as f64 bits) of the last moment the inventory was known in sync; 0 while it is.
    inventory_stale_since: AtomicU64,
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
        let mut registry = Registry::with_prefix("flow_auditor");
        let flows = Family::<FlowLabels, Counter>::default();
        registry.register(
            "flows",
            "Flows counted, by audit verdict, outcome, peers, protocol and destination port",
            flows.clone(),
        );
        let rule_series = Arc::new(Mutex::new(Series::default()));
        registry.register_collector(Box::new(RuleHits(Arc::clone(&rule_series))));
        let lost = Family::<SourceLabel, Counter>::default();
        registry.register(
            "lost_events",
            "Datapath events not turned into flows, by where they were lost",
            lost.clone(),
        );
        let flow_table_entries = Gauge::default();
        registry.register(
            "flow_table_entries",
            "Entries in the kernel flow table",
            flow_table_entries.clone(),
        );
        let flow_table_capacity = Gauge::default();
        registry.register(
            "flow_table_capacity",
            "Maximum entries of the kernel flow table",
            flow_table_capacity.clone(),
        );
        let attached = Family::<ModeLabel, Gauge>::default();
        registry.register(
            "attached_interfaces",
            "Interfaces the datapath is attached to, by attach mode",
            attached.clone(),
        );
        let policies = Family::<KindLabel, Gauge>::default();
        registry.register(
            "policies",
            "Policy objects in the intended model, by kind",
            policies.clone(),
        );
        let policy_errors = Gauge::default();
        registry.register(
            "policy_errors",
            "Policy objects left out of the model because they could not be compiled",
            policy_errors.clone(),
        );
        let model_generation = Gauge::default();
        registry.register(
            "model_generation",
            "Generation of the intended model, bumped on every change",
            model_generation.clone(),
        );
        let model_updated = GaugeF64::default();
        registry.register_with_unit(
            "model_last_update_timestamp",
            "Unix time of the last change of the intended model",
            Unit::Seconds,
            model_updated.clone(),
        );
        let inventory_staleness = GaugeF64::default();
        registry.register_with_unit(
            "inventory_staleness",
            "Seconds since the inventory was last known in sync with its source; 0 while in sync",
            Unit::Seconds,
            inventory_staleness.clone(),
        );
        let log_suppressed = Counter::default();
        registry.register(
            "unexpected_logs_suppressed",
            "Unexpected-flow log lines dropped by the rate limit",
            log_suppressed.clone(),
        );
        // A gauge fixed at 1 rather than an OpenMetrics info: both text formats (and promtool)
        // understand it, and it joins the usual way (`* on() group_left(version) ...`).
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Build of the running auditor, always 1",
            build_info,
        );

        for source in LostSource::ALL {
            drop(lost.get_or_create(&SourceLabel {
                source: source.as_str(),
            }));
        }
        for mode in HookMode::ALL {
            drop(attached.get_or_create(&ModeLabel {
                mode: mode.as_str(),
            }));
        }
        for kind in [
            PolicyKind::NetworkPolicy,
            PolicyKind::CiliumNetworkPolicy,
            PolicyKind::CiliumClusterwideNetworkPolicy,
        ] {
            drop(policies.get_or_create(&KindLabel {
                kind: kind.as_str(),
            }));
        }
        let metrics = Self {
            registry,
            flows,
            flow_series: Mutex::new(Series::default()),
            rule_series,
            lost,
            flow_table_entries,
            flow_table_capacity,
            attached,
            policies,
            policy_errors,
            model_generation,
            model_updated,
            inventory_staleness,
            inventory_stale_since: AtomicU64::new(0),
            log_suppressed,
        };
        metrics.create_placeholders();
        metrics
    }

    fn create_placeholders(&self) {
        for verdict in AuditVerdict::ALL {
            for outcome in verdict.outcomes() {
                drop(
                    self.flows
                        .get_or_create(&FlowLabels::placeholder(verdict, &outcome.to_string())),
                );
            }
        }
    }

    /// Counts one audited flow and the rules that decided it.
    pub fn record(&self, flow: &AuditedFlow) {
        // Under the index's lock, so a concurrent removal sees the series in both places or
        // neither.
        lock(&self.flow_series)
            .counter(
                FlowLabels::hash_of(flow),
                |labels| labels.describe(flow),
                || FlowLabels::of(flow),
                |labels| self.flows.get_or_create(labels).clone(),
            )
            .inc();
        let mut rule_series = lock(&self.rule_series);
        for decision in &flow.judgement.decisions {
            rule_series
                .counter(
                    RuleLabels::hash_of(decision),
                    |labels| labels.describe(decision),
                    || RuleLabels::of(decision),
                    |_| Counter::default(),
                )
                .inc();
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
                |_| Counter::default(),
            );
        }
    }

    /// The current value of a rule series (`None` when it does not exist).
    #[must_use]
    pub fn rule_count(&self, labels: &RuleLabels) -> Option<u64> {
        lock(&self.rule_series)
            .by_hash
            .values()
            .flatten()
            .find(|(l, _)| l == labels)
            .map(|(_, c)| c.get())
    }

    /// The current value of a flow series (`None` when it does not exist).
    #[must_use]
    pub fn flow_count(&self, labels: &FlowLabels) -> Option<u64> {
        self.flows.get(labels).map(|c| c.get())
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
        let flows =
            self.remove_flows(|l| l.src_namespace == namespace || l.dst_namespace == namespace);
        let rules = lock(&self.rule_series).remove(|l| *l.policy_namespace == *namespace, |_| {});
        flows + rules
    }

    /// Removes every flow series naming the workload `namespace/workload` on either side.
    pub fn remove_workload(&self, namespace: &str, workload: &str) -> usize {
        if namespace.is_empty() {
            return 0;
        }
        self.remove_flows(|l| {
            (l.src_namespace == namespace && l.src_workload == workload)
                || (l.dst_namespace == namespace && l.dst_workload == workload)
        })
    }

    /// Removes every rule series of a policy.
    pub fn remove_policy(&self, key: &PolicyKey) -> usize {
        lock(&self.rule_series).remove(|l| l.names(key), |_| {})
    }

    fn remove_flows(&self, gone: impl Fn(&FlowLabels) -> bool) -> usize {
        lock(&self.flow_series).remove(gone, |labels| {
            self.flows.remove(labels);
        })
    }

    /// Brings a lost-events counter up to the datapath's total (kernel counters only grow; a
    /// smaller total, after a reload, adds nothing).
    pub fn set_lost_events(&self, source: LostSource, total: u64) {
        let counter = self.lost.get_or_create(&SourceLabel {
            source: source.as_str(),
        });
        let current = counter.get();
        if total > current {
            counter.inc_by(total - current);
        }
    }

    pub fn set_flow_table(&self, entries: u64, capacity: u64) {
        self.flow_table_entries.set(saturating_i64(entries));
        self.flow_table_capacity.set(saturating_i64(capacity));
    }

    pub fn set_attached_interfaces(&self, mode: HookMode, count: usize) {
        self.attached
            .get_or_create(&ModeLabel {
                mode: mode.as_str(),
            })
            .set(saturating_i64(count as u64));
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
            self.policies
                .get_or_create(&KindLabel {
                    kind: kind.as_str(),
                })
                .set(saturating_i64(count as u64));
        }
        self.policy_errors.set(saturating_i64(errors as u64));
        self.model_generation.set(saturating_i64(generation));
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
        self.inventory_stale_since
            .store(value.to_bits(), Ordering::Relaxed);
    }

    /// The counter the unexpected-flow log bumps for each line it drops.
    #[must_use]
    pub fn unexpected_logs_suppressed(&self) -> Counter {
        self.log_suppressed.clone()
    }

    /// The OpenMetrics text of every metric, as of `now`.
    ///
    /// # Errors
    /// Only if encoding fails, which writing to a `String` does not.
    pub fn encode(&self, now: SystemTime) -> Result<String, ExportError> {
        let since = f64::from_bits(self.inventory_stale_since.load(Ordering::Relaxed));
        let staleness = if since > 0.0 {
            (unix_seconds(now) - since).max(0.0)
        } else {
            0.0
        };
        self.inventory_staleness.set(staleness);
        let mut out = String::with_capacity(16 * 1024);
        text::encode(&mut out, &self.registry).map_err(|_| ExportError::Encode)?;
        // The encoder ends with `# EOF`; make sure the last line is terminated for strict parsers.
        if !out.ends_with('\n') {
            let _ = writeln!(out);
        }
        Ok(out)
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition, for clients that ask
/// for `text/plain` (and for `promtool check metrics`, which reads only that format): counter
/// families are named with their `_total` suffix, and `# UNIT` / `# EOF` do not exist.
#[must_use]
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|rest| ("# HELP ", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let _ = writeln!(out, "{prefix}{name}{suffix} {tail}");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
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

    #[test]
    fn text_format_names_counters_with_total_and_drops_openmetrics_lines() {
        let om = "# HELP a_flows Flows.\n# TYPE a_flows counter\na_flows_total{x=\"1\"} 3\n\
                  # HELP a_age Age.\n# TYPE a_age_seconds gauge\n# UNIT a_age_seconds seconds\n\
                  a_age_seconds 1.5\n# EOF\n";
        let text = to_text_format(om);
        assert_eq!(
            text,
            "# HELP a_flows_total Flows.\n# TYPE a_flows_total counter\na_flows_total{x=\"1\"} 3\n\
             # HELP a_age Age.\n# TYPE a_age_seconds gauge\na_age_seconds 1.5\n"
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
        let text = m
            .encode(SystemTime::now())
            .unwrap_or_else(|e| panic!("{e}"));
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
        m.set_lost_events(LostSource::FlowTable, 10);
        m.set_lost_events(LostSource::FlowTable, 25);
        m.set_lost_events(LostSource::FlowTable, 3);
        let text = m
            .encode(SystemTime::now())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            text.contains("flow_auditor_lost_events_total{source=\"flow_table\"} 25\n"),
            "{text}"
        );
    }
}
