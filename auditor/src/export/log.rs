//! One JSON line per unexpected flow (for Promtail/Loki), rate-limited by a token bucket so a
//! misbehaving workload cannot flood the log; what the limit drops is counted, and the count is
//! written as a line of its own when logging resumes.

use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::metrics::Counter;
use crate::audit::{AuditVerdict, AuditedFlow, Peer, RuleHit};
use crate::flows::Outcome;

/// A token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    #[must_use]
    pub fn new(per_second: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            burst,
            per_second: per_second.max(0.0),
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token if one is left at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Limits of the unexpected-flow log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogLimits {
    /// Sustained lines per second.
    pub per_second: f64,
    /// Lines allowed in a burst.
    pub burst: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        // Enough to see every flow of a single misbehaving client, little enough that a scan
        // does not flood Loki: 10 lines/s sustained, bursts of 100.
        Self {
            per_second: 10.0,
            burst: 100,
        }
    }
}

/// What [`UnexpectedLog::log`] did with a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logged {
    Written,
    Suppressed,
    /// Not an unexpected flow: nothing to log.
    Skipped,
}

/// Writes unexpected flows as JSON lines to `W` (stdout in the daemon).
#[derive(Debug)]
pub struct UnexpectedLog<W: Write> {
    writer: W,
    bucket: TokenBucket,
    suppressed: u64,
    suppressed_total: Option<Counter>,
}

#[derive(Serialize)]
struct EndLine<'a> {
    kind: &'static str,
    address: String,
    port: u16,
    #[serde(skip_serializing_if = "str::is_empty")]
    namespace: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
    workload: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
}

#[derive(Serialize)]
struct FlowLine<'a> {
    time: String,
    msg: &'static str,
    verdict: AuditVerdict,
    outcome: Outcome,
    protocol: String,
    src: EndLine<'a>,
    dst: EndLine<'a>,
    dst_port: String,
    /// The rules that deny the flow, per direction.
    denied_by: Vec<&'a RuleHit>,
    reason: String,
    interface: &'a str,
    mid_stream: bool,
    /// Whether the flow's opening was seen (false: first seen mid-stream).
    seen_from_opening: bool,
    /// How the initiator was established: `opening`, `conntrack`, `declared_port`,
    /// `ephemeral_range`, `unknown`.
    orientation: &'static str,
    first_seen: String,
}

#[derive(Serialize)]
struct SuppressedLine {
    time: String,
    msg: &'static str,
    suppressed: u64,
}

fn end(peer: &Peer, address: std::net::SocketAddr) -> EndLine<'_> {
    let (pod, node) = match peer {
        Peer::Pod(p) => (Some(p.name.as_str()), p.node.as_deref()),
        Peer::Node { name } => (None, Some(name.as_str())),
        Peer::KubeApiserver
        | Peer::Service { .. }
        | Peer::Ingress
        | Peer::Unknown
        | Peer::World => (None, None),
    };
    EndLine {
        kind: peer.kind(),
        address: address.ip().to_string(),
        port: address.port(),
        namespace: peer.namespace_label(),
        pod,
        workload: peer.workload_label(),
        node,
    }
}

impl<W: Write> UnexpectedLog<W> {
    /// `suppressed_total` (the metrics' counter) is bumped for every dropped line.
    pub fn new(
        writer: W,
        limits: LogLimits,
        suppressed_total: Option<Counter>,
        now: Instant,
    ) -> Self {
        Self {
            writer,
            bucket: TokenBucket::new(limits.per_second, limits.burst, now),
            suppressed: 0,
            suppressed_total,
        }
    }

    /// Dropped lines not reported yet.
    #[must_use]
    pub const fn pending_suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Logs `flow` if it is unexpected and the rate allows; `wall` stamps the line. `explain`
    /// gives the line's `reason` (see [`crate::audit::Cluster::explain`]); it is called only for
    /// a line that is written.
    ///
    /// # Errors
    /// When writing fails.
    pub fn log(
        &mut self,
        flow: &AuditedFlow,
        explain: impl FnOnce() -> String,
        now: Instant,
        wall: SystemTime,
    ) -> io::Result<Logged> {
        if flow.verdict != AuditVerdict::Unexpected {
            return Ok(Logged::Skipped);
        }
        if !self.bucket.try_take(now) {
            self.suppressed += 1;
            if let Some(counter) = &self.suppressed_total {
                counter.inc();
            }
            return Ok(Logged::Suppressed);
        }
        let time = rfc3339(wall);
        if self.suppressed > 0 {
            let line = SuppressedLine {
                time: time.clone(),
                msg: "unexpected flow log lines suppressed by the rate limit",
                suppressed: self.suppressed,
            };
            write_line(&mut self.writer, &line)?;
            self.suppressed = 0;
        }
        let record = &flow.record;
        let line = FlowLine {
            time,
            msg: "unexpected flow",
            verdict: flow.verdict,
            outcome: record.outcome,
            protocol: record.protocol.to_string(),
            src: end(&flow.src, record.initiator),
            dst: end(&flow.dst, record.responder),
            dst_port: flow
                .dst_port
                .map_or_else(|| "other".to_owned(), |p| p.to_string()),
            denied_by: flow
                .judgement
                .decisions
                .iter()
                .filter(|d| d.action == crate::policy::ir::Action::Deny)
                .collect(),
            reason: explain(),
            interface: &record.interface,
            mid_stream: record.mid_stream,
            seen_from_opening: !record.mid_stream,
            orientation: flow.orientation.as_str(),
            first_seen: rfc3339(record.first_seen),
        };
        write_line(&mut self.writer, &line)?;
        Ok(Logged::Written)
    }

    /// Writes the suppressed count now, if any (for shutdown, or a periodic flush when no
    /// unexpected flow comes to carry it).
    ///
    /// # Errors
    /// When writing fails.
    pub fn flush_suppressed(&mut self, wall: SystemTime) -> io::Result<()> {
        if self.suppressed > 0 {
            let line = SuppressedLine {
                time: rfc3339(wall),
                msg: "unexpected flow log lines suppressed by the rate limit",
                suppressed: self.suppressed,
            };
            write_line(&mut self.writer, &line)?;
            self.suppressed = 0;
        }
        self.writer.flush()
    }

    /// The writer, e.g. to inspect what a test captured.
    pub fn writer(&self) -> &W {
        &self.writer
    }
}

fn write_line<W: Write, T: Serialize>(writer: &mut W, line: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
    bytes.push(b'\n');
    // One write per line, so lines from one process never interleave.
    writer.write_all(&bytes)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC, what Loki and Promtail parse. Times outside what RFC 3339
/// can write (before 1970 here, after 9999) are clamped to its ends.
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    // The last millisecond of 9999-12-31.
    let last = SystemTime::UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
    humantime::format_rfc3339_millis(t.clamp(SystemTime::UNIX_EPOCH, last)).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;

    use auditor_ebpf::flow::{FlowKey, Hook, proto};

    use super::*;
    use crate::audit::{Judgement, ModelVerdict, PodPeer};
    use crate::flows::{FlowRecord, PerDirection};
    use crate::policy::ir::{Action, PolicyKey, PolicyKind};
    use crate::vocab::{Direction, Protocol};

    fn reason() -> String {
        "ingress of pod db/postgres-0 denied by default".to_owned()
    }

    fn unexplained() -> String {
        panic!("a line that is not written is not explained")
    }

    /// An audited flow for tests: monitoring/prometheus to db/postgres on TCP/5432, denied by
    /// default by `NetworkPolicy` db/allow-web.
    pub(crate) fn flow(verdict: AuditVerdict) -> AuditedFlow {
        let initiator: SocketAddr = "10.244.0.30:41000"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let responder: SocketAddr = "10.244.1.20:5432".parse().unwrap_or_else(|e| panic!("{e}"));
        let (key, _) = FlowKey::from_addrs(
            proto::TCP,
            (initiator.ip(), initiator.port()),
            (responder.ip(), responder.port()),
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_763_715_845_250);
        AuditedFlow {
            record: FlowRecord {
                protocol: Protocol::Tcp,
                initiator,
                responder,
                ifindex: 9,
                interface: "cali42".into(),
                hook: Hook::Ingress,
                packets: PerDirection::default(),
                bytes: PerDirection::default(),
                first_seen: at,
                last_seen: at,
                mid_stream: false,
                outcome: Outcome::Established,
                key,
            },
            src: Peer::Pod(PodPeer {
                namespace: "monitoring".into(),
                name: "prometheus-0".into(),
                workload: "prometheus".into(),
                node: Some("node-a".into()),
            }),
            dst: Peer::Pod(PodPeer {
                namespace: "db".into(),
                name: "postgres-0".into(),
                workload: "postgres".into(),
                node: Some("node-b".into()),
            }),
            dst_port: Some(5432),
            judgement: Judgement {
                verdict: ModelVerdict::Deny,
                decisions: vec![RuleHit {
                    policy: PolicyKey {
                        kind: PolicyKind::NetworkPolicy,
                        namespace: "db".into(),
                        name: "allow-web".into(),
                    },
                    direction: Direction::Ingress,
                    rule: "default-deny".into(),
                    action: Action::Deny,
                }],
            },
            verdict,
            orientation: crate::audit::Orientation::Opening,
        }
    }

    fn lines(log: &UnexpectedLog<Vec<u8>>) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(log.writer())
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }

    #[test]
    fn unexpected_flow_line_names_peers_and_the_denying_rule() {
        let now = Instant::now();
        let mut log = UnexpectedLog::new(Vec::new(), LogLimits::default(), None, now);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_763_715_846);
        assert_eq!(
            log.log(&flow(AuditVerdict::Allowed), unexplained, now, wall)
                .ok(),
            Some(Logged::Skipped)
        );
        assert_eq!(
            log.log(&flow(AuditVerdict::Denied), unexplained, now, wall)
                .ok(),
            Some(Logged::Skipped)
        );
        assert_eq!(
            log.log(&flow(AuditVerdict::Unexpected), reason, now, wall)
                .ok(),
            Some(Logged::Written)
        );
        let lines = lines(&log);
        assert_eq!(lines.len(), 1, "only the unexpected flow is logged");
        let l = &lines[0];
        assert_eq!(l["time"], "2025-11-21T09:04:06.000Z");
        assert_eq!(l["first_seen"], "2025-11-21T09:04:05.250Z");
        assert_eq!(l["verdict"], "unexpected");
        assert_eq!(l["outcome"], "established");
        assert_eq!(l["protocol"], "TCP");
        assert_eq!(l["src"]["namespace"], "monitoring");
        assert_eq!(l["src"]["pod"], "prometheus-0");
        assert_eq!(l["src"]["workload"], "prometheus");
        assert_eq!(l["src"]["address"], "10.244.0.30");
        assert_eq!(l["src"]["port"], 41000);
        assert_eq!(l["dst"]["pod"], "postgres-0");
        assert_eq!(l["dst"]["port"], 5432);
        assert_eq!(l["dst_port"], "5432");
        assert_eq!(l["denied_by"][0]["policy"]["name"], "allow-web");
        assert_eq!(l["denied_by"][0]["rule"], "default-deny");
        assert_eq!(l["denied_by"][0]["direction"], "ingress");
        assert_eq!(
            l["reason"],
            "ingress of pod db/postgres-0 denied by default"
        );
    }

    #[test]
    fn rate_limit_suppresses_counts_and_reports_when_logging_resumes() {
        let start = Instant::now();
        let counter = Counter::default();
        let limits = LogLimits {
            per_second: 2.0,
            burst: 3,
        };
        let mut log = UnexpectedLog::new(Vec::new(), limits, Some(counter.clone()), start);
        let wall = SystemTime::UNIX_EPOCH;
        let f = flow(AuditVerdict::Unexpected);
        let explained = std::cell::Cell::new(0);
        let mut results = Vec::new();
        for _ in 0..10 {
            let explain = || {
                explained.set(explained.get() + 1);
                reason()
            };
            results.push(
                log.log(&f, explain, start, wall)
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        assert_eq!(
            results.iter().filter(|r| **r == Logged::Written).count(),
            3,
            "burst of 3"
        );
        assert_eq!(log.pending_suppressed(), 7);
        assert_eq!(counter.get(), 7);
        assert_eq!(explained.get(), 3, "only written lines are explained");
        // Half a second later one token is back: the suppressed count comes first, then the flow.
        let later = start + Duration::from_millis(500);
        assert_eq!(log.log(&f, reason, later, wall).ok(), Some(Logged::Written));
        let lines = lines(&log);
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[3]["suppressed"], 7);
        assert_eq!(lines[4]["msg"], "unexpected flow");
        assert_eq!(log.pending_suppressed(), 0);
        // Suppressed again, then flushed at shutdown.
        assert_eq!(
            log.log(&f, unexplained, later, wall).ok(),
            Some(Logged::Suppressed)
        );
        log.flush_suppressed(wall).unwrap_or_else(|e| panic!("{e}"));
        let lines = self::lines(&log);
        assert_eq!(
            lines.last().map(|l| l["suppressed"].clone()),
            Some(serde_json::json!(1))
        );
        assert_eq!(counter.get(), 8);
    }

    #[test]
    fn token_bucket_refills_at_its_rate_up_to_its_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 5, start);
        assert_eq!((0..20).filter(|_| bucket.try_take(start)).count(), 5);
        let later = start + Duration::from_secs(1);
        assert_eq!(
            (0..20).filter(|_| bucket.try_take(later)).count(),
            5,
            "capped at the burst"
        );
        let a_bit_later = later + Duration::from_millis(250);
        assert_eq!((0..20).filter(|_| bucket.try_take(a_bit_later)).count(), 2);
    }

    #[test]
    fn rfc3339_dates() {
        let at = |secs: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59.000Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59.000Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(u64::from(u32::MAX) * 100), "9999-12-31T23:59:59.999Z");
    }
}
