//! The metrics against an independent encoder, and their bookkeeping: series created, counted
//! and removed with what they name.

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
    m.set_flow_table_evictions(3, 1);
    m.set_flow_table_evictions(2, 5);
    m.set_not_flow_packets(7, 5);
    m.set_not_flow_packets(6, 2);
    m.set_reported_mark_failures(6);
    m.set_reported_mark_failures(2);
    let text = m.encode(SystemTime::now(), Format::Text);
    for line in [
        "flow_auditor_encapsulated_packets_total 7\n",
        "flow_auditor_duplicate_packets_total 5\n",
        "flow_auditor_lost_events_total{source=\"ring_buffer\"} 25\n",
        "flow_auditor_flow_table_insert_failures_total 4\n",
        "flow_auditor_flow_table_evictions_total{decided=\"true\"} 3\n",
        "flow_auditor_flow_table_evictions_total{decided=\"false\"} 5\n",
        "flow_auditor_sampled_out_packets_total 9\n",
        "flow_auditor_reported_mark_failures_total 6\n",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    assert_eq!(
        text.matches("flow_auditor_lost_events_total{").count(),
        1,
        "events only: {text}"
    );
}
