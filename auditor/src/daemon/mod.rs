//! `auditor run` (SPEC 5.2): the daemon that ties the stages together. Flow records from the
//! datapath go through the audit against the intended model (kept current from snapshot files or
//! the Kubernetes API) into metrics and the unexpected-flow log, while `/metrics`, `/healthz` and
//! `/readyz` are served; SIGTERM detaches everything and exits 0.
//!
//! One task owns the model, the flow stream and the audit, so a flow is always judged against a
//! consistent model and nothing needs a lock; the HTTP server runs on its own task and only reads
//! the shared metrics.

mod files;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use auditor_ebpf::flow::Counter;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditConfig, AuditedFlow, Auditor, Context, Judge, NamedPorts, Resolver};
use crate::check::{self, CheckError};
use crate::config::{Config, ConfigError, parse_duration};
use crate::datapath::attach::{AttachConfig, HookMode};
use crate::datapath::load::{Datapath, DatapathConfig, LoadError};
use crate::datapath::manager::{DatapathManager, ManagerError};
use crate::export::{
    DEFAULT_METRICS_ADDR, ExportError, LogLimits, LostSource, Metrics, Readiness, Server,
    UnexpectedLog,
};
use crate::flows::{FlowRecord, FlowStream, FlowsConfig};
use crate::inventory::kube::{self, KubeError, KubeSource, ModelUpdate, SourceStatus};
use crate::inventory::{Inventory, ObjectKey};
use crate::policy::ir::{PolicyKey, PolicyKind};
use crate::policy::model::Model;

pub use files::{Fingerprint, Policies, Snapshot, load_policies, load_snapshot, manifests};

/// How often the audit releases held flows, health gauges are refreshed and watched files are
/// polled for changes.
const TICK: Duration = Duration::from_secs(1);
/// How often freed memory is handed back to the kernel (glibc keeps freed pages inside its heap;
/// a burst of flows leaves megabytes of them). A trim walks the allocator's free lists, so it
/// runs every ten ticks rather than on every one.
const TRIM_EVERY_TICKS: u32 = 10;
/// Model updates from the API applied in one go before flows get their turn again.
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
    /// The node's uplink, also attached (hostNetwork and external traffic).
    #[arg(long, value_name = "IFACE")]
    pub uplink: Option<String>,
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
    /// This node's name, for the cross-node counting rule [default: $NODE_NAME, else the
    /// hostname].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Log the TC program's rare paths (headers it could not read, flows its table would not
    /// take), target `auditor_ebpf` [default: the config file's `kernelLog`, else off].
    #[arg(long)]
    pub kernel_log: bool,
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
    Input(Vec<CheckError>),
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
    Load(#[from] LoadError),
    #[error("datapath: {0}")]
    Datapath(#[from] ManagerError),
    #[error(transparent)]
    Kube(#[from] KubeError),
}

fn join(errors: &[CheckError]) -> String {
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
        let mut attach = AttachConfig {
            uplink: uplink.clone(),
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
        let flows = FlowsConfig {
            answer_timeout: answer_timeout.unwrap_or(config.answer_timeout),
            ..FlowsConfig::default()
        };
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
    let settings = Settings::from_args(args)?;
    let intended = Intended::initial(&settings)?;
    release_freed_memory();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // One worker for the pipeline, one for scrapes and watches: the Pi has four cores and
        // shares them with the workloads.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(daemon(settings, intended))
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

/// The intended model and what the daemon knows about its sources.
struct Intended {
    model: Model,
    /// The policies in the model, kept for the `dst_port` label's named ports and for diffing
    /// a reloaded directory against.
    policies: Policies,
    named_ports: NamedPorts,
    named_ports_stale: bool,
    ingress: Vec<ipnet::IpNet>,
    /// The daemon's own generation: counts changes across model rebuilds.
    generation: u64,
    updated: SystemTime,
    /// Errors of the last load of each watched path (bad files keep the last good model).
    cluster_errors: usize,
    policy_errors: usize,
    rejected: u64,
    cluster_print: Fingerprint,
    policies_print: Fingerprint,
    /// The generation whose rules have their hit series (see [`Metrics::ensure_rules`]).
    rules_published: u64,
}

impl Intended {
    /// The model at start: snapshot files (or an empty inventory for the API to fill) and the
    /// `--policies` directory. Any error is bad input.
    fn initial(settings: &Settings) -> Result<Self, DaemonError> {
        let policies_print = settings
            .policies
            .as_ref()
            .map_or_else(Fingerprint::default, |p| {
                Fingerprint::of(std::slice::from_ref(p))
            });
        let overriding = match &settings.policies {
            Some(dir) => Some(load_policies(dir).map_err(DaemonError::Input)?),
            None => None,
        };
        let mut intended = Self {
            model: Model::new(settings.config.model_config()),
            policies: Policies::new(),
            named_ports: NamedPorts::default(),
            named_ports_stale: true,
            ingress: settings.config.entities.ingress.clone(),
            generation: 0,
            updated: SystemTime::now(),
            cluster_errors: 0,
            policy_errors: 0,
            rejected: 0,
            cluster_print: Fingerprint::default(),
            policies_print,
            rules_published: 0,
        };
        match &settings.source {
            Source::Snapshot(paths) => {
                intended.cluster_print = Fingerprint::of(paths);
                let snapshot =
                    load_snapshot(paths, overriding.is_none()).map_err(DaemonError::Input)?;
                let model = build(&settings.config, &snapshot, overriding.as_ref())
                    .map_err(|e| DaemonError::Input(vec![e]))?;
                intended.model = model;
                intended.policies = overriding.unwrap_or(snapshot.policies);
            }
            Source::Kube => {
                if let Some(policies) = overriding {
                    for policy in policies.values() {
                        intended.model.upsert_policy(policy.clone());
                    }
                    intended.policies = policies;
                }
            }
        }
        intended.generation = 1;
        tracing::info!(
            pods = intended.model.inventory().pods().count(),
            policies = intended.policies.len(),
            "intended model loaded"
        );
        Ok(intended)
    }

    fn changed(&mut self) {
        self.generation += 1;
        self.updated = SystemTime::now();
    }

    /// Makes the model's policies `new`, changing only what differs; series of removed policies
    /// go away.
    fn replace_policies(&mut self, new: Policies, metrics: &Metrics) {
        let mut changed = false;
        let gone: Vec<PolicyKey> = self
            .policies
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.model.remove_policy(key);
            metrics.remove_policy(key);
            changed = true;
        }
        for (key, policy) in &new {
            if self.policies.get(key) != Some(policy) {
                self.model.upsert_policy(policy.clone());
                changed = true;
            }
        }
        self.policies = new;
        if changed {
            self.named_ports_stale = true;
            self.changed();
        }
    }

    /// Rebuilds the model from a reloaded snapshot, keeping `--policies` ones when given.
    fn rebuild(
        &mut self,
        config: &Config,
        snapshot: Snapshot,
        overriding: bool,
        metrics: &Metrics,
    ) -> Result<(), CheckError> {
        let model = build(config, &snapshot, overriding.then_some(&self.policies))?;
        let before = Peers::of(self.model.inventory());
        let after = Peers::of(model.inventory());
        before.remove_gone(&after, metrics);
        self.model = model;
        if !overriding {
            let Snapshot { policies, .. } = snapshot;
            for key in self.policies.keys().filter(|k| !policies.contains_key(*k)) {
                metrics.remove_policy(key);
            }
            self.policies = policies;
        }
        self.named_ports_stale = true;
        self.changed();
        Ok(())
    }

    /// Applies one update from the API; news about the source go to `status`.
    fn apply(&mut self, update: ModelUpdate, status: &mut SourceStatus, metrics: &Metrics) {
        status.observe(&update);
        let gone = match &update {
            ModelUpdate::NamespaceRemoved(name) => {
                metrics.remove_namespace(name);
                None
            }
            ModelUpdate::PodRemoved(key) => self.workload_of(key),
            ModelUpdate::Policy(policy) => {
                self.policies.insert(policy.key.clone(), policy.clone());
                self.named_ports_stale = true;
                None
            }
            ModelUpdate::PolicyRemoved(key) => {
                self.policies.remove(key);
                metrics.remove_policy(key);
                self.named_ports_stale = true;
                None
            }
            ModelUpdate::Rejected {
                kind,
                object,
                reason,
            } => {
                self.rejected += 1;
                tracing::error!(%kind, %object, %reason, "object left out of the model");
                None
            }
            ModelUpdate::Stale { kind, error, .. } => {
                tracing::warn!(%kind, %error, "API unreachable; keeping the last good model");
                None
            }
            ModelUpdate::Fresh(kind) => {
                tracing::info!(%kind, "API watch resumed");
                None
            }
            _ => None,
        };
        if update.apply(&mut self.model) {
            self.changed();
        }
        if let Some((namespace, workload)) = gone {
            let remains = self
                .model
                .inventory()
                .pods()
                .any(|(_, p)| p.namespace == namespace && p.workload.name == workload);
            if !remains {
                metrics.remove_workload(&namespace, &workload);
            }
        }
    }

    fn workload_of(&self, key: &ObjectKey) -> Option<(String, String)> {
        let inventory = self.model.inventory();
        let pod = inventory.pod(inventory.pod_id(key)?)?;
        Some((pod.namespace.clone(), pod.workload.name.clone()))
    }

    fn named_ports(&mut self) -> &NamedPorts {
        if self.named_ports_stale {
            self.named_ports = NamedPorts::from_policies(self.policies.values());
            self.named_ports_stale = false;
        }
        &self.named_ports
    }

    fn publish(&mut self, metrics: &Metrics) {
        if self.rules_published != self.generation {
            metrics.ensure_rules(
                self.model
                    .rule_names(crate::audit::judge::DEFAULT_DENY_RULE),
            );
            self.rules_published = self.generation;
        }
        let mut per_kind = [
            (PolicyKind::NetworkPolicy, 0),
            (PolicyKind::CiliumNetworkPolicy, 0),
            (PolicyKind::CiliumClusterwideNetworkPolicy, 0),
        ];
        for key in self.policies.keys() {
            if let Some(slot) = per_kind.iter_mut().find(|(k, _)| *k == key.kind) {
                slot.1 += 1;
            }
        }
        let errors = self.cluster_errors
            + self.policy_errors
            + usize::try_from(self.rejected).unwrap_or(usize::MAX);
        metrics.set_model(&per_kind, errors, self.generation, self.updated);
    }
}

/// A model from snapshot objects and policies.
fn build(
    config: &Config,
    snapshot: &Snapshot,
    policies: Option<&Policies>,
) -> Result<Model, CheckError> {
    let mut model = Model::new(config.model_config());
    for located in &snapshot.inventory {
        check::apply_inventory_object(&mut model, located)?;
    }
    for policy in policies.unwrap_or(&snapshot.policies).values() {
        model.upsert_policy(policy.clone());
    }
    model.shrink_to_fit();
    Ok(model)
}

/// Namespaces and workloads of an inventory, to remove the metric series of those that go.
struct Peers {
    namespaces: BTreeSet<String>,
    workloads: BTreeSet<(String, String)>,
}

impl Peers {
    fn of(inventory: &Inventory) -> Self {
        let mut namespaces: BTreeSet<String> =
            inventory.namespaces().map(|n| n.name.clone()).collect();
        let mut workloads = BTreeSet::new();
        for (_, pod) in inventory.pods() {
            namespaces.insert(pod.namespace.clone());
            workloads.insert((pod.namespace.clone(), pod.workload.name.clone()));
        }
        Self {
            namespaces,
            workloads,
        }
    }

    fn remove_gone(&self, now: &Self, metrics: &Metrics) {
        for namespace in self.namespaces.difference(&now.namespaces) {
            metrics.remove_namespace(namespace);
        }
        for (namespace, workload) in self.workloads.difference(&now.workloads) {
            metrics.remove_workload(namespace, workload);
        }
    }
}

/// The audit and what it feeds.
struct Pipeline {
    auditor: Auditor,
    log: UnexpectedLog<std::io::Stdout>,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    fn count(&mut self, record: FlowRecord, intended: &mut Intended) {
        intended.named_ports();
        let ctx = Context {
            resolver: Resolver {
                inventory: intended.model.inventory(),
                ingress: &intended.ingress,
            },
            judge: &intended.model,
            named_ports: &intended.named_ports,
        };
        if let Some(flow) = self.auditor.push(record, &ctx, SystemTime::now()) {
            self.emit(&flow, ctx.judge);
        }
    }

    /// Releases held flows; `all` on shutdown.
    fn release(&mut self, intended: &mut Intended, all: bool) {
        intended.named_ports();
        let ctx = Context {
            resolver: Resolver {
                inventory: intended.model.inventory(),
                ingress: &intended.ingress,
            },
            judge: &intended.model,
            named_ports: &intended.named_ports,
        };
        let now = SystemTime::now();
        let flows = if all {
            self.auditor.flush(&ctx, now)
        } else {
            self.auditor.tick(&ctx, now)
        };
        for flow in &flows {
            self.emit(flow, ctx.judge);
        }
    }

    fn emit(&mut self, flow: &AuditedFlow, judge: &dyn Judge) {
        self.metrics.record(flow);
        let explain = || judge.explain(&flow.query());
        if let Err(error) = self
            .log
            .log(flow, explain, Instant::now(), SystemTime::now())
        {
            tracing::warn!(%error, "writing the unexpected-flow log failed");
        }
    }
}

/// Publishes the datapath's health: attached interfaces, flow table, lost events.
fn publish_health(stream: &FlowStream, metrics: &Metrics) {
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
    metrics.set_lost_events(LostSource::FlowTable, health.inserts_failed);
    metrics.set_lost_events(LostSource::Sampling, counter(Counter::SampledOut));
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
        ..AuditConfig::default()
    }
}

async fn daemon(settings: Settings, mut intended: Intended) -> Result<(), DaemonError> {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new());
    intended.publish(&metrics);
    metrics.set_inventory_synced(true, SystemTime::now());
    let mut terminate = signal(SignalKind::terminate()).map_err(|source| DaemonError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signal {
        signal: "SIGINT",
        source,
    })?;
    let server = Server::bind(
        settings.metrics_addr,
        Arc::clone(&metrics),
        Arc::clone(&readiness),
    )
    .await?;
    tracing::info!(addr = %server.local_addr()?, "serving /metrics, /healthz, /readyz");
    let (stop_server, server_stop) = oneshot::channel::<()>();
    let server = tokio::spawn(server.serve(async move {
        let _ = server_stop.await;
    }));

    let datapath = Datapath::load(&DatapathConfig {
        kernel_log: settings.config.kernel_log,
        ..DatapathConfig::default()
    })?;
    let manager = DatapathManager::start(datapath, settings.attach.clone())?;
    let mut stream = FlowStream::new(manager, settings.flows);
    readiness.set_attached(true);
    publish_health(&stream, &metrics);

    let (updates_tx, mut updates) = mpsc::channel::<ModelUpdate>(4096);
    let (kube_source, mut status) = match settings.source {
        Source::Kube => {
            let client = kube::client_from_env().await?;
            let options = kube::WatchOptions {
                ignore_policies: settings.policies.is_some(),
                ..kube::WatchOptions::default()
            };
            let source = KubeSource::spawn(&client, &options, &updates_tx);
            let status = source.status();
            (Some(source), status)
        }
        Source::Snapshot(_) => {
            readiness.set_model_loaded(true);
            (None, SourceStatus::default())
        }
    };
    // The sources hold their own senders; ours would keep the channel open forever.
    drop(updates_tx);

    let node = counting_node(&settings, intended.model.inventory());
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
    };
    let mut counting = node;
    let mut ticks = tokio::time::interval(TICK);
    let mut ticks_since_trim = 0_u32;
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal_name = loop {
        tokio::select! {
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
            record = stream.next() => pipeline.count(record?, &mut intended),
            Some(update) = updates.recv(), if kube_source.is_some() => {
                intended.apply(update, &mut status, &metrics);
                // Drain what is queued, bounded, so a relist is applied in few wake-ups.
                for _ in 0..UPDATES_PER_BATCH {
                    match updates.try_recv() {
                        Ok(update) => intended.apply(update, &mut status, &metrics),
                        Err(_) => break,
                    }
                }
                intended.publish(&metrics);
                readiness.set_model_loaded(status.synced());
            }
            _ = ticks.tick() => {
                pipeline.release(&mut intended, false);
                if let Err(error) = pipeline.log.flush_suppressed(SystemTime::now()) {
                    tracing::warn!(%error, "writing the unexpected-flow log failed");
                }
                reload(&settings, &mut intended, &metrics);
                if matches!(settings.source, Source::Snapshot(_)) {
                    let now_counting = counting_node(&settings, intended.model.inventory());
                    if now_counting != counting {
                        tracing::info!(node = ?now_counting, "local node changed in the snapshot; counting rule updated");
                        pipeline.release(&mut intended, true);
                        pipeline.auditor = Auditor::new(audit_config(now_counting.clone()));
                        counting = now_counting;
                    }
                    metrics.set_inventory_synced(true, SystemTime::now());
                } else {
                    match status.stale_since() {
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
    // Count what was seen: held ClusterIP flows are judged on every ready endpoint.
    pipeline.release(&mut intended, true);
    if let Err(error) = pipeline.log.flush_suppressed(SystemTime::now()) {
        tracing::warn!(%error, "writing the unexpected-flow log failed");
    }
    let detached = stream.shutdown();
    let _ = stop_server.send(());
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    detached?;
    tracing::info!(counted = pipeline.auditor.stats().counted, "stopped");
    Ok(())
}

/// Reloads watched files that changed. A bad file keeps the last good model and is reported
/// (log line naming file and line, the policy-errors gauge) until it is fixed.
fn reload(settings: &Settings, intended: &mut Intended, metrics: &Metrics) {
    if let Source::Snapshot(paths) = &settings.source {
        let print = Fingerprint::of(paths);
        if print != intended.cluster_print {
            intended.cluster_print = print;
            let overriding = settings.policies.is_some();
            let result = load_snapshot(paths, !overriding).and_then(|snapshot| {
                intended
                    .rebuild(&settings.config, snapshot, overriding, metrics)
                    .map_err(|e| vec![e])
            });
            match result {
                Ok(()) => {
                    release_freed_memory();
                    intended.cluster_errors = 0;
                    tracing::info!(
                        generation = intended.generation,
                        pods = intended.model.inventory().pods().count(),
                        policies = intended.policies.len(),
                        "cluster snapshot reloaded"
                    );
                }
                Err(errors) => {
                    intended.cluster_errors = errors.len();
                    for error in &errors {
                        tracing::error!(%error, "cluster snapshot not reloaded; keeping the last good one");
                    }
                }
            }
        }
    }
    if let Some(dir) = &settings.policies {
        let print = Fingerprint::of(std::slice::from_ref(dir));
        if print != intended.policies_print {
            intended.policies_print = print;
            match load_policies(dir) {
                Ok(policies) => {
                    intended.policy_errors = 0;
                    intended.replace_policies(policies, metrics);
                    tracing::info!(
                        generation = intended.generation,
                        policies = intended.policies.len(),
                        "policies reloaded"
                    );
                }
                Err(errors) => {
                    intended.policy_errors = errors.len();
                    for error in &errors {
                        tracing::error!(%error, "policies not reloaded; keeping the last good ones");
                    }
                }
            }
        }
    }
}
