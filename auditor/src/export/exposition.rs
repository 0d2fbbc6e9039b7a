//! The two text formats Prometheus reads, written by one encoder from the same families:
//! `OpenMetrics` 1.0.0 and the Prometheus text format 0.0.4, and the choice between them from a
//! request's `Accept` header.
//!
//! The samples are the same in both. Only the metadata differs: `OpenMetrics` names a counter
//! family without the `_total` its samples carry, writes `# UNIT` for a family with a unit and
//! ends with `# EOF`; the 0.0.4 format names every family as its samples are named and has
//! neither line.

use std::fmt::Write as _;

/// The content type of `OpenMetrics` text 1.0.0.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `OpenMetrics` text 1.0.0.
    OpenMetrics,
    /// The Prometheus text format 0.0.4: what a client gets unless it asks for `OpenMetrics`, as
    /// Prometheus' own client libraries do (and what `promtool check metrics` reads).
    Text,
}

impl Format {
    /// The format asked for by a request's `Accept` header values: `OpenMetrics` when
    /// `application/openmetrics-text` (without a version, or version 1.0.0) has a quality above
    /// zero and none of the other types this side can serve is preferred to it (an equal
    /// quality goes to the one listed first, a wildcard losing to a named type); otherwise, and
    /// with no header, the 0.0.4 text format.
    pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> Self {
        // (quality in thousandths, named rather than a wildcard, format)
        let mut best: Option<(u16, bool, Self)> = None;
        for range in accept.into_iter().flat_map(|value| value.split(',')) {
            let Some(offer) = MediaRange::parse(range) else {
                continue;
            };
            let Some((format, named)) = offer.format() else {
                continue;
            };
            if offer.quality == 0 {
                continue;
            }
            let better = best.is_none_or(|(q, best_named, _)| {
                offer.quality > q || (offer.quality == q && named && !best_named)
            });
            if better {
                best = Some((offer.quality, named, format));
            }
        }
        best.map_or(Self::Text, |(_, _, format)| format)
    }

    /// The `Content-Type` of a body in this format.
    #[must_use]
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Self::Text => TEXT_CONTENT_TYPE,
        }
    }
}

/// One media range of an `Accept` header: its type and the parameters that matter here.
struct MediaRange<'a> {
    /// `type/subtype`, as written (compared without case).
    media: &'a str,
    version: Option<&'a str>,
    /// In thousandths, as RFC 9110 writes qualities: 0 refuses, 1000 (the default) is best.
    quality: u16,
}

impl<'a> MediaRange<'a> {
    fn parse(range: &'a str) -> Option<Self> {
        let mut parts = range.split(';');
        let media = parts.next()?.trim();
        if media.is_empty() {
            return None;
        }
        let mut offer = Self {
            media,
            version: None,
            quality: 1000,
        };
        for param in parts {
            let Some((name, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            match name.trim() {
                n if n.eq_ignore_ascii_case("q") => offer.quality = quality(value)?,
                n if n.eq_ignore_ascii_case("version") => offer.version = Some(value),
                _ => {}
            }
        }
        Some(offer)
    }

    /// The format this range stands for, and whether it names it (not a wildcard).
    fn format(&self) -> Option<(Format, bool)> {
        let is = |name: &str| self.media.eq_ignore_ascii_case(name);
        if is("application/openmetrics-text") {
            matches!(self.version, None | Some("1.0.0")).then_some((Format::OpenMetrics, true))
        } else if is("text/plain") {
            matches!(self.version, None | Some("0.0.4")).then_some((Format::Text, true))
        } else if is("*/*") || is("text/*") {
            Some((Format::Text, false))
        } else {
            None
        }
    }
}

/// A quality value (`0`, `0.5`, `1.000`) in thousandths; `None` when malformed.
fn quality(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = format!("{fraction:0<3}").parse::<u16>().ok()?;
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// A metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
        }
    }
}

/// A metric family: its name as `OpenMetrics` has it (a counter's without `_total`; with a unit,
/// ending in it), help text, unit and type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub unit: Option<&'static str>,
    pub kind: Kind,
}

/// A sample's value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// A counter's.
    Count(u64),
    Int(i64),
    Float(f64),
}

/// Where a family's samples go: [`Encoder`] writes them; a test hands them to another encoder.
pub trait Sink {
    /// Starts a family; the samples that follow are its.
    fn family(&mut self, family: &'static Family);
    /// One sample of the current family.
    fn sample(&mut self, labels: &[(&str, &str)], value: Value);
}

/// Writes an exposition in one format. A family without samples is left out, as the client
/// libraries do.
#[derive(Debug)]
pub struct Encoder {
    out: String,
    format: Format,
    family: Option<&'static Family>,
    /// Whether the current family's metadata is written (at its first sample).
    started: bool,
}

impl Encoder {
    #[must_use]
    pub fn new(format: Format, capacity: usize) -> Self {
        Self {
            out: String::with_capacity(capacity),
            format,
            family: None,
            started: false,
        }
    }

    /// The exposition written.
    #[must_use]
    pub fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }

    fn metadata(&mut self, family: &Family) {
        let Family {
            name,
            help,
            unit,
            kind,
        } = *family;
        debug_assert!(
            unit.is_none_or(|unit| name.ends_with(unit)),
            "{name}: a family's name ends with its unit"
        );
        debug_assert!(
            !name.ends_with("_total"),
            "{name}: `_total` is the samples' suffix"
        );
        // The 0.0.4 format names a counter family as its samples are named.
        let total = if kind == Kind::Counter && self.format == Format::Text {
            "_total"
        } else {
            ""
        };
        let out = &mut self.out;
        let _ = write!(out, "# HELP {name}{total} ");
        escape(out, help, self.format == Format::OpenMetrics);
        let _ = writeln!(out, "\n# TYPE {name}{total} {}", kind.as_str());
        if let (Some(unit), Format::OpenMetrics) = (unit, self.format) {
            let _ = writeln!(out, "# UNIT {name} {unit}");
        }
    }
}

impl Sink for Encoder {
    fn family(&mut self, family: &'static Family) {
        self.family = Some(family);
        self.started = false;
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: Value) {
        let Some(family) = self.family else {
            debug_assert!(false, "a sample before any family");
            return;
        };
        if !self.started {
            self.metadata(family);
            self.started = true;
        }
        let out = &mut self.out;
        out.push_str(family.name);
        if family.kind == Kind::Counter {
            out.push_str("_total");
        }
        if !labels.is_empty() {
            out.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(name);
                out.push_str("=\"");
                escape(out, value, true);
                out.push('"');
            }
            out.push('}');
        }
        out.push(' ');
        let _ = match value {
            Value::Count(v) => write!(out, "{v}"),
            Value::Int(v) => write!(out, "{v}"),
            Value::Float(v) if v.is_nan() => write!(out, "NaN"),
            Value::Float(v) if v.is_infinite() => {
                write!(out, "{}Inf", if v > 0.0 { '+' } else { '-' })
            }
            // Debug writes the shortest form that reads back exactly, with a `.0` on whole
            // numbers (`0.0`, `1700000000.0`, `1e-7`): valid in both formats.
            Value::Float(v) => write!(out, "{v:?}"),
        };
        out.push('\n');
    }
}

/// Appends `text` with backslash and line feed escaped, and the double quote too when `quote`
/// (label values in both formats; help text in `OpenMetrics`).
fn escape(out: &mut String, text: &str, quote: bool) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_openmetrics_only_when_asked_for_and_preferred() {
        let om = Format::OpenMetrics;
        let text = Format::Text;
        let cases: &[(&[&str], Format)] = &[
            (&[], text),
            (&["*/*"], text),
            (&["text/plain"], text),
            (&["application/openmetrics-text"], om),
            (&["Application/OpenMetrics-Text; Version=1.0.0"], om),
            (&["application/openmetrics-text; version=\"1.0.0\""], om),
            // What Prometheus 2.x and 3.x send.
            (
                &[
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ],
                om,
            ),
            // Only a version this side does not write.
            (
                &["application/openmetrics-text;version=0.0.1,text/plain;version=0.0.4;q=0.5"],
                text,
            ),
            (&["text/plain;version=0.0.4"], text),
            (&["text/plain;version=0.0.3"], text),
            // Qualities decide, whatever the order.
            (
                &["text/plain;q=0.5, application/openmetrics-text;q=0.9"],
                om,
            ),
            (&["application/openmetrics-text;q=0.4, text/plain"], text),
            (
                &["application/openmetrics-text;q=0.4", "text/plain;q=0.3"],
                om,
            ),
            (&["application/openmetrics-text;q=0"], text),
            (&["application/openmetrics-text;q=0.000, */*"], text),
            // Equal quality: the named type beats a wildcard, else the first listed wins.
            (&["*/*, application/openmetrics-text"], om),
            (&["text/plain, application/openmetrics-text"], text),
            (&["application/openmetrics-text, text/plain"], om),
            // A malformed quality drops its range only.
            (
                &["application/openmetrics-text;q=high, text/plain;q=0.1"],
                text,
            ),
            (&["application/openmetrics-text;q=1.5"], text),
            (&["application/json, image/png"], text),
            (&[" , ;q=1,"], text),
        ];
        for (accept, want) in cases {
            assert_eq!(
                Format::negotiate(accept.iter().copied()),
                *want,
                "Accept: {accept:?}"
            );
        }
    }

    #[test]
    fn qualities() {
        assert_eq!(quality("1"), Some(1000));
        assert_eq!(quality("1.000"), Some(1000));
        assert_eq!(quality("0.5"), Some(500));
        assert_eq!(quality("0.125"), Some(125));
        assert_eq!(quality("0"), Some(0));
        assert_eq!(quality("0."), Some(0));
        assert_eq!(quality("1.001"), None);
        assert_eq!(quality("0.1234"), None);
        assert_eq!(quality("-0.5"), None);
        assert_eq!(quality(""), None);
    }

    const REQUESTS: Family = Family {
        name: "app_requests",
        help: "Requests \"served\", by path\\route\nsecond line",
        unit: None,
        kind: Kind::Counter,
    };
    const AGE: Family = Family {
        name: "app_age_seconds",
        help: "Age",
        unit: Some("seconds"),
        kind: Kind::Gauge,
    };
    const EMPTY: Family = Family {
        name: "app_nothing",
        help: "Never sampled",
        unit: None,
        kind: Kind::Gauge,
    };

    fn write(format: Format) -> String {
        let mut e = Encoder::new(format, 0);
        e.family(&REQUESTS);
        e.sample(&[("path", "/a\"b\\c\nd"), ("code", "200")], Value::Count(3));
        e.sample(&[], Value::Count(0));
        e.family(&EMPTY);
        e.family(&AGE);
        e.sample(&[], Value::Float(1.5));
        e.sample(&[("k", "whole")], Value::Float(1_700_000_000.0));
        e.sample(&[("k", "nan")], Value::Float(f64::NAN));
        e.sample(&[("k", "inf")], Value::Float(f64::NEG_INFINITY));
        e.sample(&[("k", "int")], Value::Int(-2));
        e.finish()
    }

    #[test]
    fn both_formats_from_the_same_samples() {
        let samples = "app_requests_total{path=\"/a\\\"b\\\\c\\nd\",code=\"200\"} 3\n\
                       app_requests_total 0\n";
        let ages = "app_age_seconds 1.5\n\
                    app_age_seconds{k=\"whole\"} 1700000000.0\n\
                    app_age_seconds{k=\"nan\"} NaN\n\
                    app_age_seconds{k=\"inf\"} -Inf\n\
                    app_age_seconds{k=\"int\"} -2\n";
        assert_eq!(
            write(Format::OpenMetrics),
            format!(
                "# HELP app_requests Requests \\\"served\\\", by path\\\\route\\nsecond line\n\
                 # TYPE app_requests counter\n{samples}\
                 # HELP app_age_seconds Age\n# TYPE app_age_seconds gauge\n\
                 # UNIT app_age_seconds seconds\n{ages}# EOF\n"
            )
        );
        assert_eq!(
            write(Format::Text),
            format!(
                "# HELP app_requests_total Requests \"served\", by path\\\\route\\nsecond line\n\
                 # TYPE app_requests_total counter\n{samples}\
                 # HELP app_age_seconds Age\n# TYPE app_age_seconds gauge\n{ages}"
            )
        );
    }
}
