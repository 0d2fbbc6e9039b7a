//! The Kubernetes API as the daemon's source (`auditor run --kube`): one list/watch task per kind
//! turns every change into a [`ModelUpdate`] sent over a channel; the daemon applies them to its
//! `Model` and reports readiness and staleness from them without knowing about HTTP.
//!
//! The loop is written on kube's `Api::list`/`Api::watch` rather than `kube_runtime::watcher`
//! because the staleness gauge needs to know when a watch is established again (the runtime
//! watcher re-watches silently, so a quiet cluster would look stale forever after an outage), and
//! because a `410 Gone` answered on watch start must force a relist (the runtime watcher retries the
//! expired resourceVersion). Each task keeps the keys and resourceVersions it has reported, its
//! reflector: a relist sends only what changed and removes what vanished during a gap.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchParams};
use kube::core::WatchEvent;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{EndpointSlice, Namespace, Node, ObjectKey, Pod, Service, k8s};
use crate::policy::cilium::{self, CiliumPolicy};
use crate::policy::ir::{CompiledPolicy, PolicyKey, PolicyKind};
use crate::policy::model::Model;
use crate::policy::netpol;

/// Exactly the API resources the source lists and watches, as `(group, version, resource)`: the
/// read-only RBAC in `deploy/` must grant `list` and `watch` on each (the core group is `""`).
pub const WATCHED_KINDS: &[(&str, &str, &str)] = &[
    ("", "v1", "namespaces"),
    ("", "v1", "nodes"),
    ("", "v1", "pods"),
    ("", "v1", "services"),
    ("discovery.k8s.io", "v1", "endpointslices"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("cilium.io", "v2", "ciliumnetworkpolicies"),
    ("cilium.io", "v2", "ciliumclusterwidenetworkpolicies"),
];

/// A kind the source watches; its index in [`Kind::ALL`] is its row in [`WATCHED_KINDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    NetworkPolicy,
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
}

impl Kind {
    pub const ALL: [Self; 8] = [
        Self::Namespace,
        Self::Node,
        Self::Pod,
        Self::Service,
        Self::EndpointSlice,
        Self::NetworkPolicy,
        Self::CiliumNetworkPolicy,
        Self::CiliumClusterwideNetworkPolicy,
    ];

    /// The Kubernetes `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Node => "Node",
            Self::Pod => "Pod",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Self::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }

    /// `(group, version, resource)`, the kind's row of [`WATCHED_KINDS`].
    pub fn resource(self) -> (&'static str, &'static str, &'static str) {
        let row = match self {
            Self::Namespace => 0,
            Self::Node => 1,
            Self::Pod => 2,
            Self::Service => 3,
            Self::EndpointSlice => 4,
            Self::NetworkPolicy => 5,
            Self::CiliumNetworkPolicy => 6,
            Self::CiliumClusterwideNetworkPolicy => 7,
        };
        WATCHED_KINDS[row]
    }

    /// Part of the intended model: left out when `--policies DIR` replaces it.
    pub fn is_policy(self) -> bool {
        self.policy_kind().is_some()
    }

    pub fn policy_kind(self) -> Option<PolicyKind> {
        match self {
            Self::NetworkPolicy => Some(PolicyKind::NetworkPolicy),
            Self::CiliumNetworkPolicy => Some(PolicyKind::CiliumNetworkPolicy),
            Self::CiliumClusterwideNetworkPolicy => {
                Some(PolicyKind::CiliumClusterwideNetworkPolicy)
            }
            Self::Namespace | Self::Node | Self::Pod | Self::Service | Self::EndpointSlice => None,
        }
    }

    /// Defined by a CRD that a cluster without Cilium does not have.
    pub fn is_optional(self) -> bool {
        matches!(
            self,
            Self::CiliumNetworkPolicy | Self::CiliumClusterwideNetworkPolicy
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change for the daemon's model, or news about the source itself.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelUpdate {
    Namespace(Namespace),
    NamespaceRemoved(String),
    Pod(Pod),
    PodRemoved(ObjectKey),
    Node(Node),
    NodeRemoved(String),
    Service(Service),
    ServiceRemoved(ObjectKey),
    EndpointSlice(EndpointSlice),
    EndpointSliceRemoved(ObjectKey),
    Policy(CompiledPolicy),
    PolicyRemoved(PolicyKey),
    /// A (re)list of the kind is complete: the model holds what the API holds.
    Synced(Kind),
    /// The kind's API does not exist (Cilium's CRDs are not installed): nothing of it is in the
    /// model, and the API is looked at again now and then.
    NotInstalled(Kind),
    /// An object the model cannot use; its last good version, if any, stays in the model.
    Rejected {
        kind: Kind,
        /// `namespace/name` or `name`.
        object: String,
        reason: String,
    },
    /// The API cannot be reached for the kind since `since`; the model keeps what it had.
    Stale {
        kind: Kind,
        since: SystemTime,
        error: String,
    },
    /// The kind is in contact with the API again.
    Fresh(Kind),
}

impl ModelUpdate {
    /// Applies the update to the model; `false` for news about the source, which do not change it.
    pub fn apply(self, model: &mut Model) -> bool {
        match self {
            Self::Namespace(o) => model.upsert_namespace(o),
            Self::NamespaceRemoved(name) => model.remove_namespace(&name),
            Self::Pod(o) => model.upsert_pod(o),
            Self::PodRemoved(key) => model.remove_pod(&key),
            Self::Node(o) => model.upsert_node(o),
            Self::NodeRemoved(name) => model.remove_node(&name),
            Self::Service(o) => model.upsert_service(o),
            Self::ServiceRemoved(key) => model.remove_service(&key),
            Self::EndpointSlice(o) => model.upsert_endpoint_slice(o),
            Self::EndpointSliceRemoved(key) => model.remove_endpoint_slice(&key),
            Self::Policy(p) => model.upsert_policy(p),
            Self::PolicyRemoved(key) => model.remove_policy(&key),
            Self::Synced(_)
            | Self::NotInstalled(_)
            | Self::Rejected { .. }
            | Self::Stale { .. }
            | Self::Fresh(_) => return false,
        }
        true
    }
}

/// What the daemon tells about the source (`/readyz`, the inventory staleness gauge), kept
/// current by passing it every update.
#[derive(Clone, Debug, Default)]
pub struct SourceStatus {
    expected: BTreeSet<Kind>,
    synced: BTreeSet<Kind>,
    not_installed: BTreeSet<Kind>,
    stale: BTreeMap<Kind, SystemTime>,
    rejected: u64,
}

impl SourceStatus {
    /// For a source watching `kinds` (see [`KubeSource::kinds`]).
    pub fn new(kinds: &[Kind]) -> Self {
        Self {
            expected: kinds.iter().copied().collect(),
            ..Self::default()
        }
    }

    pub fn observe(&mut self, update: &ModelUpdate) {
        match update {
            ModelUpdate::Synced(kind) => {
                self.synced.insert(*kind);
                self.not_installed.remove(kind);
            }
            ModelUpdate::NotInstalled(kind) => {
                self.not_installed.insert(*kind);
                self.synced.remove(kind);
            }
            ModelUpdate::Stale { kind, since, .. } => {
                self.stale.entry(*kind).or_insert(*since);
            }
            ModelUpdate::Fresh(kind) => {
                self.stale.remove(kind);
            }
            ModelUpdate::Rejected { .. } => self.rejected += 1,
            ModelUpdate::Namespace(_)
            | ModelUpdate::NamespaceRemoved(_)
            | ModelUpdate::Pod(_)
            | ModelUpdate::PodRemoved(_)
            | ModelUpdate::Node(_)
            | ModelUpdate::NodeRemoved(_)
            | ModelUpdate::Service(_)
            | ModelUpdate::ServiceRemoved(_)
            | ModelUpdate::EndpointSlice(_)
            | ModelUpdate::EndpointSliceRemoved(_)
            | ModelUpdate::Policy(_)
            | ModelUpdate::PolicyRemoved(_) => {}
        }
    }

    /// Every watched kind has been listed at least once (or is known not to exist).
    pub fn synced(&self) -> bool {
        self.expected
            .iter()
            .all(|k| self.synced.contains(k) || self.not_installed.contains(k))
    }

    pub fn is_synced(&self, kind: Kind) -> bool {
        self.synced.contains(&kind)
    }

    pub fn is_not_installed(&self, kind: Kind) -> bool {
        self.not_installed.contains(&kind)
    }

    /// Since when the oldest outage lasts, `None` when every kind is in contact with the API.
    pub fn stale_since(&self) -> Option<SystemTime> {
        self.stale.values().min().copied()
    }

    /// How out of date the model may be: zero while every watch is in contact.
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.stale_since()
            .and_then(|since| now.duration_since(since).ok())
            .unwrap_or_default()
    }

    /// Objects the model could not use, since start.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }
}

/// How the source watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchOptions {
    /// Leave out the policy kinds: `--policies DIR` replaces the intended model.
    pub ignore_policies: bool,
    /// The first retry after an error; it doubles on each further error up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How often a kind whose API does not exist (no Cilium CRDs) is looked for again: rarely,
    /// so a cluster without Cilium is not an error storm.
    pub missing_retry: Duration,
    /// The server ends each watch after this (`timeoutSeconds`); the watch then resumes from its
    /// resourceVersion. A watch silent for this long plus a margin is considered broken.
    pub watch_timeout: Duration,
    /// Objects per list page.
    pub page_size: u32,
    /// How long a list page or the start of a watch may take: an API server that accepts
    /// connections but does not answer is an outage too.
    pub request_timeout: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            ignore_policies: false,
            initial_backoff: Duration::from_millis(500),
            // An outage of the API server is not worth hammering it when it comes back.
            max_backoff: Duration::from_secs(30),
            missing_retry: Duration::from_secs(300),
            // Below the API server's own limit, and what client-go uses on average.
            watch_timeout: Duration::from_secs(290),
            page_size: 500,
            request_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "cannot find a Kubernetes configuration (in-cluster service account or kubeconfig): {0}"
    )]
    Config(#[source] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("{op} {kind}: {source}")]
    Call {
        op: &'static str,
        kind: Kind,
        #[source]
        source: kube::Error,
    },
    #[error("{op} {kind}: no answer within {after:?}")]
    Timeout {
        op: &'static str,
        kind: Kind,
        after: Duration,
    },
    #[error("list {kind}: the answer has no resourceVersion to watch from")]
    NoResourceVersion { kind: Kind },
}

/// A client from the environment: the pod's service account inside a cluster, else kubeconfig.
pub async fn client_from_env() -> Result<Client, KubeError> {
    let config = kube::Config::infer().await.map_err(KubeError::Config)?;
    Client::try_from(config).map_err(KubeError::Client)
}

/// The running watch tasks; dropping it stops them.
#[derive(Debug)]
pub struct KubeSource {
    kinds: Vec<Kind>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts one list/watch task per kind on the current tokio runtime. Updates go to `tx`; the
    /// tasks end when its receiver is dropped.
    pub fn spawn(client: &Client, options: &WatchOptions, tx: &mpsc::Sender<ModelUpdate>) -> Self {
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| !(options.ignore_policies && k.is_policy()))
            .collect();
        let tasks = kinds
            .iter()
            .map(|&kind| spawn_kind(kind, client.clone(), options.clone(), tx.clone()))
            .collect();
        Self { kinds, tasks }
    }

    /// The kinds watched, for [`SourceStatus::new`].
    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    pub fn status(&self) -> SourceStatus {
        SourceStatus::new(&self.kinds)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

type Convert<K> = fn(Kind, &K) -> Result<ModelUpdate, String>;

fn spawn_kind(
    kind: Kind,
    client: Client,
    options: WatchOptions,
    tx: mpsc::Sender<ModelUpdate>,
) -> JoinHandle<()> {
    match kind {
        Kind::Namespace => {
            spawn_watch::<core::Namespace>(kind, Api::all(client), convert, options, tx)
        }
        Kind::Node => spawn_watch::<core::Node>(kind, Api::all(client), convert, options, tx),
        Kind::Pod => spawn_watch::<core::Pod>(kind, Api::all(client), convert, options, tx),
        Kind::Service => spawn_watch::<core::Service>(kind, Api::all(client), convert, options, tx),
        Kind::EndpointSlice => {
            spawn_watch::<discovery::EndpointSlice>(kind, Api::all(client), convert, options, tx)
        }
        Kind::NetworkPolicy => {
            spawn_watch::<networking::NetworkPolicy>(kind, Api::all(client), convert, options, tx)
        }
        Kind::CiliumNetworkPolicy | Kind::CiliumClusterwideNetworkPolicy => {
            // Dynamic, so the binary works (and the other kinds sync) where the CRDs are absent.
            let (group, version, plural) = kind.resource();
            let resource = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind.as_str()),
                plural,
            );
            let api = Api::<DynamicObject>::all_with(client, &resource);
            spawn_watch(kind, api, convert_cilium, options, tx)
        }
    }
}

/// Turns a typed object into its update.
trait ToUpdate {
    fn to_update(&self, kind: Kind) -> Result<ModelUpdate, String>;
}

impl ToUpdate for core::Namespace {
    fn to_update(&self, _: Kind) -> Result<ModelUpdate, String> {
        k8s::namespace(self)
            .map(ModelUpdate::Namespace)
            .map_err(|e| e.to_string())
    }
}

impl ToUpdate for core::Node {
    fn to_update(&self, _: Kind) -> Result<ModelUpdate, String> {
        k8s::node(self)
            .map(ModelUpdate::Node)
            .map_err(|e| e.to_string())
    }
}

impl ToUpdate for core::Pod {
    fn to_update(&self, _: Kind) -> Result<ModelUpdate, String> {
        // A finished pod's address goes back to the pool and may already belong to a new pod.
        let phase = self.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return Ok(ModelUpdate::PodRemoved(ObjectKey::new(
                self.namespace().unwrap_or_default(),
                self.name_any(),
            )));
        }
        k8s::pod(self)
            .map(ModelUpdate::Pod)
            .map_err(|e| e.to_string())
    }
}

impl ToUpdate for core::Service {
    fn to_update(&self, _: Kind) -> Result<ModelUpdate, String> {
        k8s::service(self)
            .map(ModelUpdate::Service)
            .map_err(|e| e.to_string())
    }
}

impl ToUpdate for discovery::EndpointSlice {
    fn to_update(&self, _: Kind) -> Result<ModelUpdate, String> {
        k8s::endpoint_slice(self)
            .map(ModelUpdate::EndpointSlice)
            .map_err(|e| e.to_string())
    }
}

impl ToUpdate for networking::NetworkPolicy {
    fn to_update(&self, _: Kind) -> Result<ModelUpdate, String> {
        netpol::compile(self)
            .map(ModelUpdate::Policy)
            .map_err(|e| e.to_string())
    }
}

fn convert<K: ToUpdate>(kind: Kind, object: &K) -> Result<ModelUpdate, String> {
    object.to_update(kind)
}

fn convert_cilium(kind: Kind, object: &DynamicObject) -> Result<ModelUpdate, String> {
    let Some(policy_kind) = kind.policy_kind() else {
        return Err(format!("{kind} is not a Cilium policy kind"));
    };
    let value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    let policy: CiliumPolicy =
        serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e))?;
    cilium::compile(policy_kind, &policy)
        .map(ModelUpdate::Policy)
        .map_err(|e| e.to_string())
}

/// The update that takes an object of `kind` out of the model.
fn removal(kind: Kind, key: &ObjectKey) -> ModelUpdate {
    match kind {
        Kind::Namespace => ModelUpdate::NamespaceRemoved(key.name.clone()),
        Kind::Node => ModelUpdate::NodeRemoved(key.name.clone()),
        Kind::Pod => ModelUpdate::PodRemoved(key.clone()),
        Kind::Service => ModelUpdate::ServiceRemoved(key.clone()),
        Kind::EndpointSlice => ModelUpdate::EndpointSliceRemoved(key.clone()),
        Kind::NetworkPolicy | Kind::CiliumNetworkPolicy | Kind::CiliumClusterwideNetworkPolicy => {
            ModelUpdate::PolicyRemoved(PolicyKey {
                kind: kind.policy_kind().unwrap_or(PolicyKind::NetworkPolicy),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            })
        }
    }
}

fn object_key<K: Resource>(object: &K) -> ObjectKey {
    ObjectKey::new(object.namespace().unwrap_or_default(), object.name_any())
}

fn display_key(key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        key.name.clone()
    } else {
        key.to_string()
    }
}

fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// The update receiver is gone: the daemon is stopping.
struct Closed;

enum ListFailure {
    Closed,
    Api(KubeError),
}

impl From<Closed> for ListFailure {
    fn from(Closed: Closed) -> Self {
        Self::Closed
    }
}

/// What ends a watch.
enum WatchEnd {
    /// The resourceVersion expired (`410 Gone`) or the API disappeared: list again.
    Relist,
    Closed,
}

fn spawn_watch<K>(
    kind: Kind,
    api: Api<K>,
    convert: Convert<K>,
    options: WatchOptions,
    tx: mpsc::Sender<ModelUpdate>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    let backoff = options.initial_backoff;
    let task = KindWatch {
        kind,
        api,
        convert,
        options,
        tx,
        known: HashMap::new(),
        stale_since: None,
        missing: false,
        backoff,
    };
    tokio::spawn(task.run())
}

struct KindWatch<K> {
    kind: Kind,
    api: Api<K>,
    convert: Convert<K>,
    options: WatchOptions,
    tx: mpsc::Sender<ModelUpdate>,
    /// What the model has of this kind: object key -> resourceVersion last reported.
    known: HashMap<ObjectKey, String>,
    stale_since: Option<SystemTime>,
    /// The last list answered 404 (CRD not installed).
    missing: bool,
    backoff: Duration,
}

impl<K> KindWatch<K>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    async fn run(mut self) {
        loop {
            let Ok(version) = self.list().await else {
                return;
            };
            match self.watch(version).await {
                WatchEnd::Relist => {}
                WatchEnd::Closed => return,
            }
        }
    }

    async fn send(&self, update: ModelUpdate) -> Result<(), Closed> {
        self.tx.send(update).await.map_err(|_| Closed)
    }

    async fn mark_stale(&mut self, error: &KubeError) -> Result<(), Closed> {
        if self.stale_since.is_some() {
            tracing::debug!(kind = %self.kind, %error, "Kubernetes API still unavailable");
            return Ok(());
        }
        let since = SystemTime::now();
        self.stale_since = Some(since);
        tracing::warn!(kind = %self.kind, %error, "Kubernetes API unavailable; keeping the last model");
        self.send(ModelUpdate::Stale {
            kind: self.kind,
            since,
            error: error.to_string(),
        })
        .await
    }

    async fn mark_fresh(&mut self) -> Result<(), Closed> {
        if self.stale_since.take().is_some() {
            tracing::info!(kind = %self.kind, "Kubernetes API reachable again");
            self.send(ModelUpdate::Fresh(self.kind)).await?;
        }
        Ok(())
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(self.options.max_backoff);
    }

    fn timeout_error(&self, op: &'static str) -> KubeError {
        KubeError::Timeout {
            op,
            kind: self.kind,
            after: self.options.request_timeout,
        }
    }

    fn call_error(&self, op: &'static str, source: kube::Error) -> KubeError {
        KubeError::Call {
            op,
            kind: self.kind,
            source,
        }
    }

    /// Lists page by page, sending each page's changes as it comes so a large cluster is never
    /// held in memory whole; what no page holds any more is removed at the end. Returns the
    /// resourceVersion to watch from.
    async fn list_pages(&mut self) -> Result<String, ListFailure> {
        let mut seen = HashSet::with_capacity(self.known.len());
        let mut token: Option<String> = None;
        loop {
            let mut params = ListParams::default().limit(self.options.page_size);
            if let Some(token) = &token {
                params = params.continue_token(token);
            }
            let page = tokio::time::timeout(self.options.request_timeout, self.api.list(&params))
                .await
                .map_err(|_| ListFailure::Api(self.timeout_error("list")))?
                .map_err(|e| ListFailure::Api(self.call_error("list", e)))?;
            if token.is_none() {
                self.mark_fresh().await?;
            }
            for object in page.items {
                let key = object_key(&object);
                self.changed(key.clone(), &object).await?;
                seen.insert(key);
            }
            match page.metadata.continue_.filter(|t| !t.is_empty()) {
                Some(next) => token = Some(next),
                None => {
                    let version = page
                        .metadata
                        .resource_version
                        .filter(|v| !v.is_empty())
                        .ok_or(ListFailure::Api(KubeError::NoResourceVersion {
                            kind: self.kind,
                        }))?;
                    self.remove_unseen(&seen).await?;
                    return Ok(version);
                }
            }
        }
    }

    /// Lists until it works; the model then holds exactly the listed objects.
    async fn list(&mut self) -> Result<String, Closed> {
        loop {
            match self.list_pages().await {
                Ok(version) => {
                    self.backoff = self.options.initial_backoff;
                    if std::mem::take(&mut self.missing) {
                        tracing::info!(kind = %self.kind, "API installed; watching it");
                    }
                    self.send(ModelUpdate::Synced(self.kind)).await?;
                    return Ok(version);
                }
                Err(ListFailure::Closed) => return Err(Closed),
                Err(ListFailure::Api(KubeError::Call { source, .. }))
                    if self.kind.is_optional() && status_code(&source) == Some(404) =>
                {
                    // The API answered: not an outage, just a cluster without this CRD.
                    self.mark_fresh().await?;
                    if !self.missing {
                        self.missing = true;
                        tracing::info!(kind = %self.kind, "API not installed; looking again later");
                        self.remove_unseen(&HashSet::new()).await?;
                        self.send(ModelUpdate::NotInstalled(self.kind)).await?;
                    }
                    tokio::time::sleep(self.options.missing_retry).await;
                }
                Err(ListFailure::Api(error)) => {
                    self.mark_stale(&error).await?;
                    self.pause().await;
                }
            }
        }
    }

    /// Removes from the model what the API no longer has (deleted during a gap in watching).
    async fn remove_unseen(&mut self, seen: &HashSet<ObjectKey>) -> Result<(), Closed> {
        let gone: Vec<ObjectKey> = self
            .known
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.known.remove(&key);
            self.send(removal(self.kind, &key)).await?;
        }
        Ok(())
    }

    async fn report(&self, key: &ObjectKey, object: &K) -> Result<(), Closed> {
        match (self.convert)(self.kind, object) {
            Ok(update) => self.send(update).await,
            Err(reason) => {
                tracing::warn!(kind = %self.kind, object = %display_key(key), %reason,
                    "object not usable; keeping its last good version");
                self.send(ModelUpdate::Rejected {
                    kind: self.kind,
                    object: display_key(key),
                    reason,
                })
                .await
            }
        }
    }

    /// Watches from `version`, resuming after every end of the stream, until a relist is due.
    async fn watch(&mut self, mut version: String) -> WatchEnd {
        let timeout_secs =
            u32::try_from(self.options.watch_timeout.as_secs().max(1)).unwrap_or(u32::MAX);
        // A watch with no event, not even a bookmark, for longer than the server's own timeout
        // is a dead connection that TCP has not noticed.
        let idle_limit = self.options.watch_timeout + Duration::from_secs(30);
        loop {
            let params = WatchParams::default().timeout(timeout_secs);
            let started = tokio::time::timeout(
                self.options.request_timeout,
                self.api.watch(&params, &version),
            )
            .await;
            let stream = match started {
                Err(_) => {
                    let error = self.timeout_error("watch");
                    if self.mark_stale(&error).await.is_err() {
                        return WatchEnd::Closed;
                    }
                    self.pause().await;
                    continue;
                }
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) if status_code(&e) == Some(410) => {
                    tracing::info!(kind = %self.kind, "resourceVersion expired; listing again");
                    return WatchEnd::Relist;
                }
                Ok(Err(e)) if self.kind.is_optional() && status_code(&e) == Some(404) => {
                    return WatchEnd::Relist;
                }
                Ok(Err(e)) => {
                    let error = self.call_error("watch", e);
                    if self.mark_stale(&error).await.is_err() {
                        return WatchEnd::Closed;
                    }
                    self.pause().await;
                    continue;
                }
            };
            if self.mark_fresh().await.is_err() {
                return WatchEnd::Closed;
            }
            let started = Instant::now();
            let mut events = 0_u64;
            let mut failed = false;
            let mut stream = std::pin::pin!(stream);
            loop {
                let next = match tokio::time::timeout(idle_limit, stream.next()).await {
                    Ok(Some(next)) => next,
                    Ok(None) => break,
                    Err(_) => {
                        tracing::warn!(kind = %self.kind, "watch silent too long; reconnecting");
                        break;
                    }
                };
                let step = match next {
                    Ok(WatchEvent::Added(object) | WatchEvent::Modified(object)) => {
                        events += 1;
                        advance(&mut version, &object);
                        self.changed(object_key(&object), &object).await
                    }
                    Ok(WatchEvent::Deleted(object)) => {
                        events += 1;
                        advance(&mut version, &object);
                        self.deleted(&object).await
                    }
                    Ok(WatchEvent::Bookmark(bookmark)) => {
                        events += 1;
                        if !bookmark.metadata.resource_version.is_empty() {
                            version = bookmark.metadata.resource_version;
                        }
                        Ok(())
                    }
                    Ok(WatchEvent::Error(status)) if status.code == 410 => {
                        tracing::info!(kind = %self.kind, "watch expired (410 Gone); listing again");
                        return WatchEnd::Relist;
                    }
                    Ok(WatchEvent::Error(status)) => {
                        tracing::warn!(kind = %self.kind, code = status.code,
                            message = %status.message, "watch error; resuming");
                        failed = true;
                        break;
                    }
                    Err(e) if status_code(&e) == Some(410) => return WatchEnd::Relist,
                    Err(e) => {
                        tracing::warn!(kind = %self.kind, error = %e, "watch interrupted; resuming");
                        failed = true;
                        break;
                    }
                };
                if step.is_err() {
                    return WatchEnd::Closed;
                }
            }
            // A watch that works resets the backoff; one the server ends at once or with an
            // error, again and again (a proxy, an overloaded server), must not become a busy loop.
            if events > 0 && !failed {
                self.backoff = self.options.initial_backoff;
            } else if failed || started.elapsed() < Duration::from_secs(1) {
                self.pause().await;
            }
        }
    }

    /// Reports an object unless the model already has this version of it.
    async fn changed(&mut self, key: ObjectKey, object: &K) -> Result<(), Closed> {
        let version = object.resource_version().unwrap_or_default();
        if !version.is_empty() && self.known.get(&key) == Some(&version) {
            return Ok(());
        }
        self.report(&key, object).await?;
        self.known.insert(key, version);
        Ok(())
    }

    async fn deleted(&mut self, object: &K) -> Result<(), Closed> {
        let key = object_key(object);
        if self.known.remove(&key).is_some() {
            self.send(removal(self.kind, &key)).await?;
        }
        Ok(())
    }
}

fn advance<K: Resource>(version: &mut String, object: &K) {
    if let Some(v) = object.resource_version().filter(|v| !v.is_empty()) {
        *version = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_watched_resources_agree() {
        assert_eq!(Kind::ALL.len(), WATCHED_KINDS.len());
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(kind.resource(), WATCHED_KINDS[i], "row of {kind}");
        }
        let policies: Vec<Kind> = Kind::ALL.into_iter().filter(|k| k.is_policy()).collect();
        assert_eq!(
            policies,
            [
                Kind::NetworkPolicy,
                Kind::CiliumNetworkPolicy,
                Kind::CiliumClusterwideNetworkPolicy
            ]
        );
    }

    #[test]
    fn status_is_ready_when_every_kind_is_synced_or_missing() {
        let mut status = SourceStatus::new(&[Kind::Pod, Kind::CiliumNetworkPolicy]);
        assert!(!status.synced());
        status.observe(&ModelUpdate::Synced(Kind::Pod));
        assert!(!status.synced());
        status.observe(&ModelUpdate::NotInstalled(Kind::CiliumNetworkPolicy));
        assert!(status.synced());
        assert!(status.is_not_installed(Kind::CiliumNetworkPolicy));
    }

    #[test]
    fn staleness_counts_from_the_oldest_outage_until_every_kind_is_fresh() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut status = SourceStatus::new(&[Kind::Pod, Kind::Node]);
        let stale = |kind, secs| ModelUpdate::Stale {
            kind,
            since: t0 + Duration::from_secs(secs),
            error: "connection refused".to_owned(),
        };
        status.observe(&stale(Kind::Pod, 0));
        status.observe(&stale(Kind::Node, 5));
        // A repeated report does not move the start of the outage.
        status.observe(&stale(Kind::Pod, 8));
        assert_eq!(
            status.staleness(t0 + Duration::from_secs(10)),
            Duration::from_secs(10)
        );
        status.observe(&ModelUpdate::Fresh(Kind::Pod));
        assert_eq!(
            status.staleness(t0 + Duration::from_secs(10)),
            Duration::from_secs(5)
        );
        status.observe(&ModelUpdate::Fresh(Kind::Node));
        assert_eq!(status.stale_since(), None);
        assert_eq!(status.staleness(t0), Duration::ZERO);
    }

    #[test]
    fn removals_name_the_model_objects() {
        let key = ObjectKey::new("ns", "x");
        assert_eq!(
            removal(Kind::Pod, &key),
            ModelUpdate::PodRemoved(key.clone())
        );
        assert_eq!(
            removal(
                Kind::CiliumClusterwideNetworkPolicy,
                &ObjectKey::new("", "cw")
            ),
            ModelUpdate::PolicyRemoved(PolicyKey {
                kind: PolicyKind::CiliumClusterwideNetworkPolicy,
                namespace: String::new(),
                name: "cw".to_owned(),
            })
        );
        assert_eq!(
            removal(Kind::Node, &ObjectKey::new("", "n1")),
            ModelUpdate::NodeRemoved("n1".to_owned())
        );
    }
}
