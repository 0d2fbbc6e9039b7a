//! One JSON line per unexpected flow (for Promtail/Loki), rate-limited by a token bucket so a
//! misbehaving workload cannot flood the log; what the limit drops is counted, and the count is
//! written as a line of its own when logging resumes.

use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::audit::{AuditVerdict, AuditedFlow, Decision, Peer};
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
    denied_by: Vec<&'a Decision>,
    reason: &'a str,
    interface: &'a str,
    mid_stream: bool,
    first_seen: String,
}

#[derive(Serialize)]
struct SuppressedLine {
    time: String,
    msg: &'static str,
    suppressed: u64,
}

fn end<'a>(peer: &'a Peer, address: std::net::SocketAddr) -> EndLine<'a> {
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

    /// Logs `flow` if it is unexpected and the rate allows; `wall` stamps the line.
    ///
    /// # Errors
    /// When writing fails.
    pub fn log(
        &mut self,
        flow: &AuditedFlow,
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
            reason: &flow.judgement.reason,
            interface: &record.interface,
            mid_stream: record.mid_stream,
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

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC, what Loki and Promtail parse.
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (400-year era arithmetic).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}
