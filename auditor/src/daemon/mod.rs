//! `auditor run` (SPEC 5.2): the driver that wires the stages together. Flow records from the
//! datapath go through the audit against the cluster as the sources describe it (snapshot files,
//! a policy directory, or the Kubernetes API, all sending [`Update`]s over one channel) into
//! metrics and the unexpected-flow log, while `/metrics`, `/healthz` and `/readyz` are served;
//! SIGTERM detaches everything and exits 0.
//!
//! One task owns the cluster, the flow stream and the audit, so a flow is always judged against a
//! consistent state and nothing needs a lock; the sources run on tasks and threads of their own
//! (reading and parsing files never stalls the pipeline), and the HTTP server only reads the
//! shared metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use auditor_ebpf::flow::Counter;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditConfig, AuditedFlow, Auditor, Cluster, DEFAULT_DENY_RULE, EphemeralRange};
use crate::config::{Config, ConfigError, PinDir, parse_duration};
use crate::datapath::attach::{AttachConfig, HookMode};
use crate::datapath::conntrack::Conntrack;
use crate::datapath::load::{Datapath, DatapathConfig, LoadError as DatapathLoadError};
use crate::datapath::manager::{DatapathManager, ManagerError};
use crate::export::{
    DEFAULT_METRICS_ADDR, ExportError, LogLimits, LostSource, Metrics, Readiness, Server,
    UnexpectedLog,
};
use crate::flows::{FlowRecord, FlowSource, FlowStream, FlowsConfig};
use crate::inventory::Inventory;
use crate::source::files::{FileSource, Watching};
use crate::source::kube::{self, KubeError, KubeSource};
use crate::source::load::{LoadError, Select};
use crate::source::{Change, Origin, SourceStatus, Update};

/// How often the audit releases held flows, health gauges are refreshed and watched files are
/// polled for changes.
const TICK: Duration = Duration::from_secs(1);
/// How often freed memory is handed back to the kernel (glibc keeps freed pages inside its heap;
/// a burst of flows leaves megabytes of them). A trim walks the allocator's free lists, so it
/// runs every ten ticks rather than on every one.
const TRIM_EVERY_TICKS: u32 = 10;
/// Updates from the sources applied in one go before flows get their turn again.
const UPDATES_PER_BATCH: usize = 256;

/// `auditor run` flags (SPEC 5.2).
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Inventory and policies from the Kubernetes API, watched (the default inside a pod).
    #[arg(long, conflicts_with = "cluster")]
    pub kube: bool,
    /// Snapshot files or directories (as for `check`), reloaded when they change. Repeatable.
    #[arg(long = "cluster", value_name = "PATH")]
    pub cluster: Vec<PathBuf>,
    /// Judge against the policies found here (watched) instead of the cluster's.
    #[arg(long, value_name = "PATH")]
    pub policies: Option<PathBuf>,
    /// Interface name globs to attach to, comma-separated [default: cali*,lxc*,veth*].
    #[arg(long, value_name = "GLOB,...", value_delimiter = ',')]
    pub interfaces: Vec<String>,
    /// The node's uplinks, attached at ingress and egress with the uplink programs: native and
    /// tunnel devices by name or glob, comma-separated, and `:default-route` for the device(s)
    /// of the default routes. Needed where the CNI delivers packets into pods past the pod
    /// interface's egress hook (Cilium: `cilium_vxlan,cilium_geneve,cilium_wg0,:default-route`),
    /// and for hostNetwork and external traffic [default: the config file's `uplinks`, else none].
    #[arg(long, value_name = "IFACE,...", value_delimiter = ',')]
    pub uplink: Vec<String>,
    /// Configuration file (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// How long a flow waits for an answer before it is `unanswered` [default: the config
    /// file's, else 5s].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub answer_timeout: Option<Duration>,
    /// This node's name, for the cross-node counting rule [default: $`NODE_NAME`, else the
    /// hostname].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Log the TC program's rare paths (headers it could not read, flows its table would not
    /// take), target `auditor_ebpf` [default: the config file's `kernelLog`, else off].
    #[arg(long)]
    pub kernel_log: bool,
    /// A flow without packets for this long leaves the flow table; a connection resuming later
    /// is recognised and not counted again [default: the config file's `idleTimeout`, else 300s].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub idle_timeout: Option<Duration>,
    /// Where the flow tables are pinned in bpffs, so they survive restarts; `none` to not pin
    /// them [default: the config file's `pinDir`, else /sys/fs/bpf/flow-auditor].
    #[arg(long, value_name = "DIR", value_parser = PinDir::parse)]
    pub pin_dir: Option<PinDir>,
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration (e.g. 5s, 500ms, 1m)"))
}

/// Failures of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}", join(.0))]
    Input(Vec<LoadError>),
    #[error("{0}")]
    Usage(String),
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("installing the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("loading the datapath: {0}")]
    Load(#[from] DatapathLoadError),
    #[error("datapath: {0}")]
    Datapath(#[from] ManagerError),
    #[error("reading flows: {0}")]
    Flows(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Kube(#[from] KubeError),
}

fn join(errors: &[LoadError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\nerror: ")
}

impl DaemonError {
    /// Whether the error is the input's fault (exit 2): nothing was attached or served then.
    #[must_use]
    pub const fn is_bad_input(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Input(_) | Self::Usage(_))
    }
}

/// Where the inventory (and, without `--policies`, the policies) come from.
#[derive(Clone, Debug)]
enum Source {
    Snapshot(Vec<PathBuf>),
    Kube,
}

/// Everything `run` decided from the flags, before anything is started.
#[derive(Debug)]
struct Settings {
    source: Source,
    policies: Option<PathBuf>,
    config: Config,
    attach: AttachConfig,
    flows: FlowsConfig,
    metrics_addr: SocketAddr,
    node: Option<String>,
    pin_dir: PinDir,
}

impl Settings {
    fn from_args(args: &RunArgs) -> Result<Self, DaemonError> {
        let RunArgs {
            kube,
            cluster,
            policies,
            interfaces,
            uplink,
            config,
            metrics_addr,
            answer_timeout,
            node,
            kernel_log,
            idle_timeout,
            pin_dir,
        } = args;
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let source = if *kube || (cluster.is_empty() && in_pod) {
            Source::Kube
        } else if cluster.is_empty() {
            return Err(DaemonError::Usage(
                "outside a Kubernetes pod, --cluster PATH (snapshot files) or --kube is required"
                    .to_owned(),
            ));
        } else {
            Source::Snapshot(cluster.clone())
        };
        let mut config = match config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        config.kernel_log |= *kernel_log;
        let cleaned = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|g| g.trim().to_owned())
                .filter(|g| !g.is_empty())
                .collect()
        };
        let mut attach = AttachConfig {
            uplinks: if uplink.is_empty() {
                config.uplinks.clone()
            } else {
                cleaned(uplink)
            },
            mode: config.attach_mode,
            ..AttachConfig::default()
        };
        if !interfaces.is_empty() {
            attach.interfaces = interfaces
                .iter()
                .map(|g| g.trim().to_owned())
                .filter(|g| !g.is_empty())
                .collect();
        }
        crate::datapath::attach::validate(&attach)
            .map_err(|e| DaemonError::Usage(format!("--interfaces / --uplink / uplinks: {e}")))?;
        let flows = FlowsConfig {
            answer_timeout: answer_timeout.unwrap_or(config.answer_timeout),
            idle_timeout: idle_timeout.unwrap_or(config.idle_timeout),
            ..FlowsConfig::default()
        };
        if flows.idle_timeout < Duration::from_secs(1) {
            return Err(DaemonError::Usage(format!(
                "the idle timeout ({:?}) must be at least 1s: shorter, live flows would leave the table between two packets",
                flows.idle_timeout
            )));
        }
        let pin_dir = pin_dir.clone().unwrap_or_else(|| config.pin_dir.clone());
        let node = node
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|n| !n.is_empty());
        Ok(Self {
            source,
            policies: policies.clone(),
            config,
            attach,
            flows,
            metrics_addr: *metrics_addr,
            node,
            pin_dir,
        })
    }
}

/// Runs the daemon until SIGTERM or SIGINT. Bad input is reported before anything is attached.
///
/// # Errors
/// Bad flags, configuration or snapshot files ([`DaemonError::is_bad_input`]), or a failure of
/// the datapath, the metrics endpoint or the API client.
pub fn run(args: &RunArgs) -> Result<(), DaemonError> {
    tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // One worker for the pipeline, one for scrapes and watches: the Pi has four cores and
        // shares them with the workloads.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async {
        let mut terminate =
            signal(SignalKind::terminate()).map_err(|source| DaemonError::Signal {
                signal: "SIGTERM",
                source,
            })?;
        let mut interrupt =
            signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signal {
                signal: "SIGINT",
                source,
            })?;
        let daemon = Daemon::start(args).await?;
        let datapath_config = DatapathConfig {
            kernel_log: daemon.settings.config.kernel_log,
            wireguard_port: daemon.settings.config.wireguard_port,
            ..DatapathConfig::default()
        };
        let datapath = match Datapath::load_pinned(&datapath_config, daemon.settings.pin_dir.path())
        {
            // No bpffs where the tables should be pinned: audit anyway, without surviving a
            // restart, and say so.
            Err(DatapathLoadError::Pins { path, op, source }) => {
                tracing::error!(
                    dir = %path.display(),
                    %source,
                    "cannot pin the flow tables: {op}; running with unpinned tables (a restart will count live connections again)"
                );
                Datapath::load(&datapath_config)?
            }
            other => other?,
        };
        if let Some(pinned) = datapath.pinned() {
            for old in &pinned.removed_layouts {
                tracing::info!(dir = %old.display(), "removed the flow tables of another layout");
            }
            tracing::info!(
                dir = %pinned.dir.display(),
                adopted = pinned.adopted,
                "flow tables pinned{}",
                if pinned.adopted { ": adopting the flows of the previous agent" } else { "" }
            );
        } else {
            tracing::info!("flow tables not pinned: a restart forgets every flow");
        }
        let manager = DatapathManager::start(datapath, daemon.settings.attach.clone())?;
        let stop = async {
            tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            }
        };
        daemon.run(manager, stop).await.map(|_| ())
    })
}

/// glibc's defaults trade memory for speed in ways a small agent does not want: an arena per
/// thread (each keeps its own free memory), and a threshold for serving large blocks from `mmap`
/// that rises each time such a block is freed, after which the flow tables' large, regrown
/// arrays come from the heap and leave holes when they are replaced. One arena (the pipeline is
/// one thread; scrapes and watches are light) and a fixed threshold, so a freed large array
/// goes back to the kernel at once. musl needs neither.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// Parsing a snapshot builds large temporary object trees; glibc keeps the freed pages resident,
/// so they are handed back once the model is built (musl returns them by itself).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The cluster as the sources describe it, and what the daemon knows about the sources.
struct Intended {
    cluster: Cluster,
    status: SourceStatus,
    /// The daemon's own generation: counts changes of the intended model.
    generation: u64,
    updated: SystemTime,
    /// The generation whose rules have their hit series (see [`Metrics::ensure_rules`]).
    rules_published: u64,
}

impl Intended {
    /// The state at start: snapshot files (or an empty inventory for the API to fill) and the
    /// `--policies` directory, loaded now. Any error is bad input. Returns the file sources too,
    /// to be watched once the daemon runs.
    fn initial(settings: &Settings) -> Result<(Self, Vec<FileSource>), DaemonError> {
        let mut files = Vec::new();
        if let Source::Snapshot(paths) = &settings.source {
            let select = Select {
                inventory: true,
                policies: settings.policies.is_none(),
            };
            files.push(FileSource::new(Origin::Cluster, paths.clone(), select));
        }
        if let Some(dir) = &settings.policies {
            files.push(FileSource::new(
                Origin::Policies,
                vec![dir.clone()],
                Select::POLICIES,
            ));
        }
        let mut changes: Vec<Change> = Vec::new();
        for source in &mut files {
            changes.extend(source.load().map_err(DaemonError::Input)?);
        }
        changes.sort_by_key(Change::rank);
        let cluster = Cluster::from_changes(settings.config.cluster_config(), changes);
        tracing::info!(
            pods = cluster.inventory().pods().count(),
            policies = cluster.policy_count(),
            "intended model loaded"
        );
        let intended = Self {
            cluster,
            status: SourceStatus::default(),
            generation: 1,
            updated: SystemTime::now(),
            rules_published: 0,
        };
        Ok((intended, files))
    }

    /// Applies one update from a source. Metric series of what goes away go with it.
    fn apply(&mut self, update: Update, metrics: &Metrics) {
        self.status.observe(&update);
        match update {
            Update::Change(change) => self.change(change, metrics),
            Update::Rejected {
                kind,
                object,
                reason,
            } => tracing::error!(%kind, %object, %reason, "object left out of the model"),
            Update::Cleared { kind, object } => {
                tracing::info!(%kind, %object, "object usable again, or gone");
            }
            Update::Stale { kind, error, .. } => {
                tracing::warn!(%kind, %error, "API unreachable; keeping the last good model");
            }
            Update::Fresh(kind) => tracing::info!(%kind, "API watch resumed"),
            Update::Files { origin, errors } if errors.is_empty() => tracing::info!(
                %origin,
                generation = self.generation,
                pods = self.cluster.inventory().pods().count(),
                policies = self.cluster.policy_count(),
                "reloaded"
            ),
            Update::Files { origin, errors } => {
                for error in &errors {
                    tracing::error!(%origin, %error, "not reloaded; keeping the last good version");
                }
            }
            Update::Synced(_) | Update::NotInstalled(_) => {}
        }
    }

    fn change(&mut self, change: Change, metrics: &Metrics) {
        let workload_of_removed = match &change {
            Change::NamespaceRemoved(name) => {
                metrics.remove_namespace(name);
                None
            }
            Change::PodRemoved(key) => {
                let inventory = self.cluster.inventory();
                inventory
                    .pod_id(key)
                    .and_then(|id| inventory.pod(id))
                    .map(|pod| (pod.namespace.clone(), pod.workload.name.clone()))
            }
            Change::PolicyRemoved(key) => {
                metrics.remove_policy(key);
                None
            }
            _ => None,
        };
        self.cluster.apply(change);
        self.generation += 1;
        self.updated = SystemTime::now();
        if let Some((namespace, workload)) = workload_of_removed
            && !self.cluster.inventory().has_workload(&namespace, &workload)
        {
            metrics.remove_workload(&namespace, &workload);
        }
    }

    fn publish(&mut self, metrics: &Metrics) {
        if self.rules_published != self.generation {
            metrics.ensure_rules(self.cluster.policy().rule_names(DEFAULT_DENY_RULE));
            self.rules_published = self.generation;
        }
        metrics.set_model(
            &self.cluster.policy().count_by_kind(),
            self.status.problems(),
            self.generation,
            self.updated,
        );
    }
}

/// The audit and what it feeds.
struct Pipeline {
    auditor: Auditor,
    log: UnexpectedLog<std::io::Stdout>,
    metrics: Arc<Metrics>,
    /// The node's conntrack, asked who opened flows first seen mid-stream; `None` when it
    /// cannot be opened (then the other evidence orients them).
    conntrack: Option<Conntrack>,
}

impl Pipeline {
    fn count(&mut self, record: FlowRecord, cluster: &Cluster) {
        let originator = if record.mid_stream {
            self.conntrack.as_mut().and_then(|ct| {
                let protocol = record.key.proto;
                match ct.originator(protocol, record.initiator, record.responder) {
                    Ok(found) => found,
                    Err(error) => {
                        tracing::warn!(%error, "asking conntrack who opened a flow failed");
                        None
                    }
                }
            })
        } else {
            None
        };
        if let Some(flow) = self
            .auditor
            .push_with(record, originator, cluster, SystemTime::now())
        {
            self.emit(&flow, cluster);
        }
    }

    /// Releases held flows; `all` on shutdown.
    fn release(&mut self, cluster: &Cluster, all: bool) {
        let now = SystemTime::now();
        let flows = if all {
            self.auditor.flush(cluster, now)
        } else {
            self.auditor.tick(cluster, now)
        };
        for flow in &flows {
            self.emit(flow, cluster);
        }
    }

    fn emit(&mut self, flow: &AuditedFlow, cluster: &Cluster) {
        self.metrics.record(flow);
        let explain = || {
            let query = flow.query();
            cluster.explain(&query, &cluster.judge(&query)).reason
        };
        if let Err(error) = self
            .log
            .log(flow, explain, Instant::now(), SystemTime::now())
        {
            tracing::warn!(%error, "writing the unexpected-flow log failed");
        }
    }
}

/// Publishes the datapath's health: attached interfaces, flow table, lost events.
fn publish_health<S: FlowSource>(stream: &FlowStream<S>, metrics: &Metrics) {
    let health = match stream.health() {
        Ok(h) => h,
        Err(error) => {
            tracing::warn!(%error, "reading datapath health failed");
            return;
        }
    };
    metrics.set_flow_table(
        health.flow_table_entries,
        u64::from(health.flow_table_capacity),
    );
    let tcx = health
        .attached
        .iter()
        .filter(|a| a.mode == HookMode::Tcx)
        .count();
    metrics.set_attached_interfaces(HookMode::Tcx, tcx);
    metrics.set_attached_interfaces(HookMode::Clsact, health.attached.len() - tcx);
    let counter = |c: Counter| {
        health
            .counters
            .iter()
            .find(|(name, _)| *name == c.name())
            .map_or(0, |(_, v)| *v)
    };
    metrics.set_lost_events(
        LostSource::RingBuffer,
        health.events_lost + health.undecodable_events,
    );
    metrics.set_flow_table_insert_failures(health.inserts_failed);
    let evictions = stream.evictions();
    metrics.set_flow_table_evictions(evictions.decided, evictions.undecided);
    metrics.set_reported_mark_failures(stream.mark_failures());
    metrics.set_sampled_out_packets(counter(Counter::SampledOut));
    metrics.set_not_flow_packets(counter(Counter::Encapsulated), counter(Counter::Duplicate));
}

/// The local node when the inventory knows it; otherwise every flow seen is counted (a machine
/// outside the snapshot's cluster, see `audit::counting`).
fn counting_node(settings: &Settings, inventory: &Inventory) -> Option<String> {
    let node = settings.node.clone()?;
    match settings.source {
        Source::Kube => Some(node),
        Source::Snapshot(_) => inventory.node_id(&node).is_some().then_some(node),
    }
}

fn audit_config(node: Option<String>) -> AuditConfig {
    AuditConfig {
        local_node: node,
        ephemeral: EphemeralRange::of_node(),
        ..AuditConfig::default()
    }
}

/// The daemon before it reads flows: its configuration and model loaded, `/metrics` served.
pub struct Daemon {
    settings: Settings,
    intended: Intended,
    files: Vec<FileSource>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    stop_server: oneshot::Sender<()>,
}

/// What a stopped daemon did.
#[derive(Debug)]
pub struct Stopped<S> {
    /// Flows counted.
    pub counted: u64,
    /// The flow source, detached.
    pub source: S,
}

impl Daemon {
    /// Reads the flags, the configuration and the snapshot or policy files (any error is bad
    /// input, reported before anything is attached) and starts serving `/metrics`.
    ///
    /// # Errors
    /// Bad input, or the metrics address cannot be bound.
    pub async fn start(args: &RunArgs) -> Result<Self, DaemonError> {
        let settings = Settings::from_args(args)?;
        let (intended, files) = Intended::initial(&settings)?;
        release_freed_memory();
        let metrics = Arc::new(Metrics::new());
        let readiness = Arc::new(Readiness::new());
        let server = Server::bind(
            settings.metrics_addr,
            Arc::clone(&metrics),
            Arc::clone(&readiness),
        )
        .await?;
        let addr = server.local_addr()?;
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        let (stop_server, server_stop) = oneshot::channel::<()>();
        let server = tokio::spawn(server.serve(async move {
            let _ = server_stop.await;
        }));
        Ok(Self {
            settings,
            intended,
            files,
            metrics,
            readiness,
            addr,
            server,
            stop_server,
        })
    }

    /// Where `/metrics` is served.
    #[must_use]
    pub const fn metrics_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Audits the flows of `source` until `stop` resolves (to the reason, for the log), then
    /// detaches it and counts what was held.
    ///
    /// # Errors
    /// When the flow source or the Kubernetes client fails.
    pub async fn run<S>(
        self,
        source: S,
        stop: impl Future<Output = &'static str>,
    ) -> Result<Stopped<S>, DaemonError>
    where
        S: FlowSource + Send,
    {
        let Self {
            settings,
            mut intended,
            files,
            metrics,
            readiness,
            addr: _,
            server,
            stop_server,
        } = self;
        intended.publish(&metrics);
        metrics.set_inventory_synced(true, SystemTime::now());
        let mut stream = FlowStream::new(source, settings.flows);
        // Without a predecessor's tables the agent joins conversations already going on: for
        // the idle timeout, UDP and SCTP flows are oriented by evidence (the tracker marks them
        // mid-stream), not by who happened to speak first.
        if !stream.source().tables_adopted() {
            let window = stream.open_join_window();
            tracing::info!(
                ?window,
                "no flow tables adopted: UDP and SCTP flows first seen in this window are oriented by evidence"
            );
        }
        readiness.set_attached(true);
        publish_health(&stream, &metrics);
        let (updates_tx, mut updates) = mpsc::channel::<Update>(4096);
        let watching: Vec<Watching> = files
            .into_iter()
            .map(|source| source.watch(updates_tx.clone(), TICK))
            .collect();
        let kube_source = match settings.source {
            Source::Kube => {
                let client = kube::client_from_env().await?;
                let options = kube::WatchOptions {
                    ignore_policies: settings.policies.is_some(),
                    ..kube::WatchOptions::default()
                };
                let source = KubeSource::spawn(&client, &options, &updates_tx);
                intended.status = source.status();
                Some(source)
            }
            Source::Snapshot(_) => {
                readiness.set_model_loaded(true);
                None
            }
        };
        // The sources hold their own senders; ours would keep the channel open forever.
        drop(updates_tx);

        let node = counting_node(&settings, intended.cluster.inventory());
        tracing::info!(
            node = node.as_deref().unwrap_or("(any: counting every flow seen)"),
            "counting rule"
        );
        let mut pipeline = Pipeline {
            auditor: Auditor::new(audit_config(node.clone())),
            log: UnexpectedLog::new(
                std::io::stdout(),
                LogLimits::default(),
                Some(metrics.unexpected_logs_suppressed()),
                Instant::now(),
            ),
            metrics: Arc::clone(&metrics),
            conntrack: match Conntrack::open() {
                Ok(ct) => Some(ct),
                Err(error) => {
                    tracing::info!(%error, "no conntrack: flows first seen mid-stream are oriented by their ports");
                    None
                }
            },
        };
        let mut counting = node;
        let mut ticks = tokio::time::interval(TICK);
        let mut ticks_since_trim = 0_u32;
        let mut sources_open = true;
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(stop);
        let signal_name = loop {
            tokio::select! {
                reason = &mut stop => break reason,
                record = stream.next() => pipeline.count(record.map_err(flow_error)?, &intended.cluster),
                update = updates.recv(), if sources_open => {
                    let Some(update) = update else {
                        sources_open = false;
                        continue;
                    };
                    intended.apply(update, &metrics);
                    // Drain what is queued, bounded, so a relist or a reload is applied in few
                    // wake-ups without starving the flows.
                    for _ in 0..UPDATES_PER_BATCH {
                        match updates.try_recv() {
                            Ok(update) => intended.apply(update, &metrics),
                            Err(_) => break,
                        }
                    }
                    intended.cluster.refresh();
                    intended.publish(&metrics);
                    if kube_source.is_some() {
                        readiness.set_model_loaded(intended.status.synced());
                    }
                }
                _ = ticks.tick() => {
                    pipeline.release(&intended.cluster, false);
                    if let Err(error) = pipeline.log.flush_suppressed(SystemTime::now()) {
                        tracing::warn!(%error, "writing the unexpected-flow log failed");
                    }
                    if matches!(settings.source, Source::Snapshot(_)) {
                        let now_counting = counting_node(&settings, intended.cluster.inventory());
                        if now_counting != counting {
                            tracing::info!(node = ?now_counting, "local node changed in the snapshot; counting rule updated");
                            pipeline.release(&intended.cluster, true);
                            pipeline.auditor = Auditor::new(audit_config(now_counting.clone()));
                            counting = now_counting;
                        }
                        metrics.set_inventory_synced(true, SystemTime::now());
                    } else {
                        match intended.status.stale_since() {
                            Some(since) => metrics.set_inventory_synced(false, since),
                            None => metrics.set_inventory_synced(true, SystemTime::now()),
                        }
                    }
                    intended.publish(&metrics);
                    publish_health(&stream, &metrics);
                    ticks_since_trim += 1;
                    if ticks_since_trim >= TRIM_EVERY_TICKS {
                        ticks_since_trim = 0;
                        release_freed_memory();
                    }
                }
            }
        };
        tracing::info!(signal = signal_name, "shutting down");
        readiness.set_attached(false);
        drop(kube_source);
        drop(watching);
        // Count what was seen: held ClusterIP flows are judged on every ready endpoint.
        pipeline.release(&intended.cluster, true);
        if let Err(error) = pipeline.log.flush_suppressed(SystemTime::now()) {
            tracing::warn!(%error, "writing the unexpected-flow log failed");
        }
        let detached = stream.shutdown();
        let _ = stop_server.send(());
        let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
        let source = detached.map_err(flow_error)?;
        let counted = pipeline.auditor.stats().counted;
        tracing::info!(counted, "stopped");
        Ok(Stopped { counted, source })
    }
}

fn flow_error(error: impl std::error::Error + Send + Sync + 'static) -> DaemonError {
    DaemonError::Flows(Box::new(error))
}
