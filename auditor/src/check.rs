//! `auditor check` (SPEC 5.1): build the model from snapshot files, judge JSON Lines flows, print
//! one verdict per flow with its reason. All input is read and validated before anything is
//! printed, so bad input gives one error (exit 2) and never a partial answer.

use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::inventory::k8s::{self, ObjectError};
use crate::inventory::load::{self, LoadError, Located, Object, Source};
use crate::policy::ir::{CompileError, PolicyKind, Protocol};
use crate::policy::model::{Flow, Model, ModelConfig};
use crate::policy::{cilium, netpol};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{source_at}: {error}")]
    Object {
        source_at: Box<Source>,
        #[source]
        error: Box<ObjectError>,
    },
    #[error("{source_at}: {object}: {error}")]
    Compile {
        source_at: Box<Source>,
        object: String,
        #[source]
        error: Box<CompileError>,
    },
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
    pub fn is_bad_input(&self) -> bool {
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
    /// Services, EndpointSlices, policies. Repeatable.
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

/// Counts of what was loaded, for logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    pub objects: usize,
    pub policies: usize,
}

/// Applies one non-policy object to the model.
pub fn apply_inventory_object(model: &mut Model, located: &Located) -> Result<(), CheckError> {
    let wrap = |error| CheckError::Object {
        source_at: Box::new(located.source.clone()),
        error: Box::new(error),
    };
    match &located.object {
        Object::Namespace(o) => model.upsert_namespace(k8s::namespace(o).map_err(wrap)?),
        Object::Node(o) => model.upsert_node(k8s::node(o).map_err(wrap)?),
        Object::Pod(o) => model.upsert_pod(k8s::pod(o).map_err(wrap)?),
        Object::Service(o) => model.upsert_service(k8s::service(o).map_err(wrap)?),
        Object::EndpointSlice(o) => {
            model.upsert_endpoint_slice(k8s::endpoint_slice(o).map_err(wrap)?);
        }
        Object::Endpoints(o) => {
            for slice in k8s::endpoints(o).map_err(wrap)? {
                model.upsert_endpoint_slice(slice);
            }
        }
        Object::NetworkPolicy(_)
        | Object::CiliumNetworkPolicy(_)
        | Object::CiliumClusterwideNetworkPolicy(_) => {}
    }
    Ok(())
}

/// Compiles and loads one policy object.
pub fn apply_policy_object(model: &mut Model, located: &Located) -> Result<(), CheckError> {
    let compiled = match &located.object {
        Object::NetworkPolicy(p) => netpol::compile(p),
        Object::CiliumNetworkPolicy(p) => cilium::compile(PolicyKind::CiliumNetworkPolicy, p),
        Object::CiliumClusterwideNetworkPolicy(p) => {
            cilium::compile(PolicyKind::CiliumClusterwideNetworkPolicy, p)
        }
        _ => return Ok(()),
    }
    .map_err(|error| CheckError::Compile {
        source_at: Box::new(located.source.clone()),
        object: located.name.clone(),
        error: Box::new(error),
    })?;
    model.upsert_policy(compiled);
    Ok(())
}

/// Builds the model from snapshot files: inventory from `cluster`, policies from `policies`
/// when given, else from `cluster`.
pub fn build_model(
    cluster: &[PathBuf],
    policies: Option<&Path>,
    config: &Config,
) -> Result<(Model, BuildStats), CheckError> {
    let objects = load::load_paths(cluster)?;
    let policy_objects = match policies {
        Some(dir) => load::load_paths(&[dir.to_path_buf()])?
            .into_iter()
            .filter(|o| o.object.is_policy())
            .collect(),
        None => objects
            .iter()
            .filter(|o| o.object.is_policy())
            .cloned()
            .collect::<Vec<_>>(),
    };
    let model = model_from_objects(&objects, &policy_objects, config.model_config())?;
    Ok((
        model,
        BuildStats {
            objects: objects.iter().filter(|o| !o.object.is_policy()).count(),
            policies: policy_objects.len(),
        },
    ))
}

/// Builds a model from loaded objects: the inventory from the non-policy objects of
/// `inventory`, the policies from `policies`.
pub fn model_from_objects(
    inventory: &[Located],
    policies: &[Located],
    config: ModelConfig,
) -> Result<Model, CheckError> {
    let mut model = Model::new(config);
    // Namespaces first so identities see their labels at once (correct either way, cheaper).
    let rank = |o: &Located| match o.object {
        Object::Namespace(_) => 0,
        Object::Node(_) => 1,
        _ => 2,
    };
    let mut objects: Vec<&Located> = inventory.iter().filter(|o| !o.object.is_policy()).collect();
    objects.sort_by_key(|o| rank(o));
    for located in objects {
        apply_inventory_object(&mut model, located)?;
    }
    for located in policies.iter().filter(|o| o.object.is_policy()) {
        apply_policy_object(&mut model, located)?;
    }
    Ok(model)
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
pub fn parse_flow(line: &str) -> Result<Flow, String> {
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
                "protocol: unknown protocol {:?} (TCP, UDP, SCTP, ICMP)",
                raw.protocol
            )
        })?;
    let port = match (raw.port, protocol) {
        (Some(p), _) => {
            u16::try_from(p).map_err(|_| format!("port: {p} is not a port (0-65535)"))?
        }
        (None, Protocol::Icmp) => 0,
        (None, _) => return Err("port: missing (the destination port)".to_owned()),
    };
    Ok(Flow {
        src: ip("src", &raw.src)?,
        dst: ip("dst", &raw.dst)?,
        protocol,
        port,
    })
}

/// Reads every flow line; blank lines are skipped, anything else must be a flow.
pub fn read_flows(name: &str, reader: impl BufRead) -> Result<Vec<Flow>, CheckError> {
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
    explanation: &'a crate::policy::explain::Explanation,
}

/// Runs `auditor check`: `stdin` is used when the flows file is `-`.
pub fn run(args: &CheckArgs, stdin: impl BufRead, mut out: impl Write) -> Result<(), CheckError> {
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let (mut model, stats) = build_model(&args.cluster, args.policies.as_deref(), &config)?;
    tracing::debug!(
        objects = stats.objects,
        policies = stats.policies,
        "model built"
    );
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

fn peer_cell(ip: IpAddr, p: &crate::policy::model::PeerInfo) -> String {
    match p.kind.as_str() {
        "pod" | "service" => format!("{ip} ({}/{})", p.namespace, p.name),
        kind if p.name.is_empty() => format!("{ip} ({kind})"),
        kind => format!("{ip} ({kind} {})", p.name),
    }
}

fn write_table(
    out: &mut impl Write,
    rows: &[(&Flow, crate::policy::explain::Explanation)],
) -> std::io::Result<()> {
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|(flow, e)| {
            [
                e.verdict.to_uppercase(),
                match flow.protocol {
                    Protocol::Icmp => "ICMP".to_owned(),
                    p => format!("{p}/{}", flow.port),
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
