//! `auditor check` (SPEC 5.1): build the model from snapshot files, judge JSON Lines flows, print
//! one verdict per flow with its reason. All input is read and validated before anything is
//! printed, so bad input gives one error (exit 2) and never a partial answer.

use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::audit::{Cluster, ClusterConfig, Explanation, FlowQuery, PeerInfo};
use crate::config::{Config, ConfigError};
use crate::decode::Strictness;
use crate::source::Change;
use crate::source::load::{self, LoadError, Located, Select};
use crate::vocab::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{file}:{line}: {message}")]
    Flow {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}: cannot read flows: {source}")]
    ReadFlows {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the output: {0}")]
    Write(#[source] std::io::Error),
}

impl CheckError {
    /// Whether the error is the input's fault (exit 2) rather than the environment's.
    #[must_use]
    pub const fn is_bad_input(&self) -> bool {
        !matches!(self, Self::Write(_))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One JSON object per flow.
    #[default]
    Jsonl,
    /// A table for people.
    Text,
}

/// `auditor check` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// Files or directories (recursive) of Kubernetes objects: Namespaces, Nodes, Pods,
    /// Services, `EndpointSlices`, policies. Repeatable.
    #[arg(long = "cluster", value_name = "PATH", required = true)]
    pub cluster: Vec<PathBuf>,
    /// Judge against the policies found here instead of those in --cluster.
    #[arg(long, value_name = "PATH")]
    pub policies: Option<PathBuf>,
    /// Configuration file (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// JSON Lines flows, `-` for stdin.
    #[arg(long, value_name = "FILE", default_value = "-")]
    pub flows: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Jsonl)]
    pub output: OutputFormat,
}

/// The changes a snapshot stands for, read strictly: the inventory from `cluster`, the policies
/// from `policies` when given, else from `cluster`; in the order they are applied.
///
/// # Errors
/// The first file that cannot be read, parsed or converted.
pub fn load_snapshot(
    cluster: &[PathBuf],
    policies: Option<&Path>,
) -> Result<Vec<Located>, CheckError> {
    let mut objects = load::load_paths(
        cluster,
        Select {
            inventory: true,
            policies: policies.is_none(),
        },
        Strictness::Strict,
    )?;
    if let Some(dir) = policies {
        objects.extend(load::load_paths(
            &[dir.to_path_buf()],
            Select::POLICIES,
            Strictness::Strict,
        )?);
    }
    objects.sort_by_key(|o| o.change.rank());
    Ok(objects)
}

/// A cluster built from loaded changes.
#[must_use]
pub fn cluster_from(objects: Vec<Located>, config: ClusterConfig) -> Cluster {
    Cluster::from_changes(config, objects.into_iter().map(|o| o.change))
}

/// Builds the cluster from snapshot files (see [`load_snapshot`]).
///
/// # Errors
/// The first file that cannot be read, parsed or converted.
pub fn build_model(
    cluster: &[PathBuf],
    policies: Option<&Path>,
    config: &Config,
) -> Result<Cluster, CheckError> {
    let objects = load_snapshot(cluster, policies)?;
    let policies = objects
        .iter()
        .filter(|o| matches!(o.change, Change::Policy(_)))
        .count();
    tracing::debug!(
        objects = objects.len() - policies,
        policies,
        "snapshot loaded"
    );
    Ok(cluster_from(objects, config.cluster_config()))
}

/// The fields of a flow line; other keys are allowed and ignored.
#[derive(serde::Deserialize)]
struct FlowLine {
    src: String,
    dst: String,
    protocol: String,
    #[serde(default)]
    port: Option<u32>,
}

/// Parses one JSON Lines flow; the error says what is wrong (the caller adds file and line).
pub fn parse_flow(line: &str) -> Result<FlowQuery, String> {
    let raw: FlowLine =
        serde_json::from_str(line).map_err(|e| format!("not a flow JSON object: {e}"))?;
    let ip = |field: &str, text: &str| {
        text.parse::<IpAddr>()
            .map_err(|_| format!("{field}: {text:?} is not an IP address"))
    };
    // Policies have one ICMP for both families: an `ICMPv6` line is judged (and printed) as ICMP.
    let protocol = Protocol::parse(&raw.protocol)
        .map(Protocol::policy)
        .ok_or_else(|| {
            format!(
                "protocol: unknown protocol {:?} (TCP, UDP, SCTP, ICMP, ICMPv6)",
                raw.protocol
            )
        })?;
    let port = match (raw.port, protocol) {
        (Some(p), _) => {
            u16::try_from(p).map_err(|_| format!("port: {p} is not a port (0-65535)"))?
        }
        (None, Protocol::Icmp | Protocol::Icmpv6) => 0,
        (None, _) => return Err("port: missing (the destination port)".to_owned()),
    };
    Ok(FlowQuery {
        src: ip("src", &raw.src)?,
        dst: ip("dst", &raw.dst)?,
        protocol,
        port,
    })
}

/// Reads every flow line; blank lines are skipped, anything else must be a flow.
pub fn read_flows(name: &str, reader: impl BufRead) -> Result<Vec<FlowQuery>, CheckError> {
    let mut flows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| CheckError::ReadFlows {
            file: name.to_owned(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let flow = parse_flow(&line).map_err(|message| CheckError::Flow {
            file: name.to_owned(),
            line: i + 1,
            message,
        })?;
        flows.push(flow);
    }
    Ok(flows)
}

#[derive(Serialize)]
struct OutputLine<'a> {
    src: IpAddr,
    dst: IpAddr,
    protocol: &'static str,
    port: u16,
    #[serde(flatten)]
    explanation: &'a Explanation,
}

/// Runs `auditor check`: `stdin` is used when the flows file is `-`.
pub fn run(args: &CheckArgs, stdin: impl BufRead, mut out: impl Write) -> Result<(), CheckError> {
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let mut model = build_model(&args.cluster, args.policies.as_deref(), &config)?;
    let flows = if args.flows.as_os_str() == "-" {
        read_flows("<stdin>", stdin)?
    } else {
        let name = args.flows.display().to_string();
        let file = std::fs::File::open(&args.flows).map_err(|source| CheckError::ReadFlows {
            file: name.clone(),
            source,
        })?;
        read_flows(&name, std::io::BufReader::new(file))?
    };
    let mut rows = Vec::with_capacity(flows.len());
    for flow in &flows {
        let verdict = model.verdict(flow);
        rows.push((flow, model.explain(flow, &verdict)));
    }
    match args.output {
        OutputFormat::Jsonl => {
            for (flow, explanation) in &rows {
                let line = OutputLine {
                    src: flow.src,
                    dst: flow.dst,
                    protocol: flow.protocol.as_str(),
                    port: flow.port,
                    explanation,
                };
                serde_json::to_writer(&mut out, &line).map_err(|e| CheckError::Write(e.into()))?;
                out.write_all(b"\n").map_err(CheckError::Write)?;
            }
        }
        OutputFormat::Text => write_table(&mut out, &rows).map_err(CheckError::Write)?,
    }
    out.flush().map_err(CheckError::Write)
}

fn peer_cell(ip: IpAddr, p: &PeerInfo) -> String {
    match p.kind {
        "pod" | "service" => format!("{ip} ({}/{})", p.namespace, p.name),
        kind if p.name.is_empty() => format!("{ip} ({kind})"),
        kind => format!("{ip} ({kind} {})", p.name),
    }
}

fn write_table(out: &mut impl Write, rows: &[(&FlowQuery, Explanation)]) -> std::io::Result<()> {
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|(flow, e)| {
            [
                e.verdict.to_uppercase(),
                if flow.protocol.is_icmp() {
                    "ICMP".to_owned()
                } else {
                    format!("{}/{}", flow.protocol, flow.port)
                },
                peer_cell(flow.src, &e.src_peer),
                peer_cell(flow.dst, &e.dst_peer),
                e.reason.clone(),
            ]
        })
        .collect();
    let header = ["VERDICT", "FLOW", "SOURCE", "DESTINATION", "REASON"].map(str::to_owned);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(cells.iter()) {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(cells.iter()) {
        writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        )?;
    }
    Ok(())
}
