//! The export stage: audited flows and health data out to the world, as Prometheus metrics
//! served over HTTP ([`http`]) in either text format ([`exposition`]), and one JSON log line
//! per unexpected flow ([`log`]). The metric names, labels and values are the contract of
//! SPEC 5.3 ([`metrics`]).

pub mod exposition;
pub mod http;
pub mod log;
pub mod metrics;

use std::net::SocketAddr;

pub use exposition::{Format, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};
pub use http::{DEFAULT_METRICS_ADDR, Limits, Readiness, Server, raise_nofile_limit};
pub use log::{LogLimits, Logged, TokenBucket, UnexpectedLog};
pub use metrics::{Counter, FlowLabels, LostSource, Metrics, RuleLabels};

/// Failures of the export stage.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics endpoint: {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}
