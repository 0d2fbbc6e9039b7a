//! The Kubernetes API as a source (`auditor run --kube`): one list/watch task per kind turns
//! every change into an [`Update`] sent over a channel; the daemon applies them to its stores
//! and reports readiness and staleness from them without knowing about HTTP.
//!
//! The loop is written on kube's `Api::list`/`Api::watch` rather than `kube_runtime::watcher`
//! because the staleness gauge needs to know when a watch is established again (the runtime
//! watcher re-watches silently, so a quiet cluster would look stale forever after an outage), and
//! because a `410 Gone` answered on watch start must force a relist (the runtime watcher retries the
//! expired resourceVersion). Each task keeps the keys and resourceVersions it has reported, its
//! reflector: a relist sends only what changed and removes what vanished during a gap.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchParams};
use kube::core::WatchEvent;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::kinds::InventoryObject;
use super::{Change, ChangeKey, Kind, SourceStatus, Update};
use crate::decode::{Document, Strictness};
use crate::vocab::ObjectKey;

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
    pub fn spawn(client: &Client, options: &WatchOptions, tx: &mpsc::Sender<Update>) -> Self {
        let kinds: Vec<Kind> = Kind::all()
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

/// Turns an object of a watched kind into its changes, or says why it cannot be used.
type Convert<K> = fn(Kind, &K) -> Result<Vec<Change>, String>;

fn spawn_kind(
    kind: Kind,
    client: Client,
    options: WatchOptions,
    tx: mpsc::Sender<Update>,
) -> JoinHandle<()> {
    match kind {
        Kind::Namespace => {
            spawn_watch::<core::Namespace>(kind, Api::all(client), inventory, options, tx)
        }
        Kind::Node => spawn_watch::<core::Node>(kind, Api::all(client), inventory, options, tx),
        Kind::Pod => spawn_watch::<core::Pod>(kind, Api::all(client), inventory, options, tx),
        Kind::Service => {
            spawn_watch::<core::Service>(kind, Api::all(client), inventory, options, tx)
        }
        Kind::EndpointSlice => {
            spawn_watch::<discovery::EndpointSlice>(kind, Api::all(client), inventory, options, tx)
        }
        Kind::Policy(policy_kind) => {
            // Dynamic, so the binary works (and the other kinds sync) where a CRD is absent.
            let info = policy_kind.info();
            let resource = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(info.group, info.version, policy_kind.as_str()),
                info.plural,
            );
            let api = Api::<DynamicObject>::all_with(client, &resource);
            spawn_watch(kind, api, policy, options, tx)
        }
    }
}

fn inventory<K: InventoryObject>(_: Kind, object: &K) -> Result<Vec<Change>, String> {
    object
        .changes()
        .map_err(|e| format!("{}: {}", e.field, e.reason))
}

/// A policy object the API server has already validated: read leniently, so fields of a newer
/// API keep the object (reported as not judged) instead of dropping it and leaving its pods
/// looking unisolated.
fn policy(kind: Kind, object: &DynamicObject) -> Result<Vec<Change>, String> {
    let Some(policy_kind) = kind.policy_kind() else {
        return Err(format!("{kind} is not a policy kind"));
    };
    let value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    let compiled = policy_kind
        .info()
        .compile(Document::Value(value), Strictness::Lenient)
        .map_err(|e| e.to_string())?;
    if !compiled.unknown.is_empty() {
        tracing::warn!(policy = %compiled.key, fields = ?compiled.unknown,
            "policy kept; fields this version does not know are not judged");
    }
    Ok(vec![Change::Policy(compiled)])
}

fn object_key<K: Resource>(object: &K) -> ObjectKey {
    ObjectKey::new(object.namespace().unwrap_or_default(), object.name_any())
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
    tx: mpsc::Sender<Update>,
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
        rejected: HashSet::new(),
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
    tx: mpsc::Sender<Update>,
    /// What the stores have of this kind: object key -> resourceVersion last reported.
    known: HashMap<ObjectKey, String>,
    /// Objects whose last version could not be used: reported as rejected until a good version
    /// or their deletion clears them.
    rejected: HashSet<ObjectKey>,
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

    async fn send(&self, update: Update) -> Result<(), Closed> {
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
        self.send(Update::Stale {
            kind: self.kind,
            since,
            error: error.to_string(),
        })
        .await
    }

    async fn mark_fresh(&mut self) -> Result<(), Closed> {
        if self.stale_since.take().is_some() {
            tracing::info!(kind = %self.kind, "Kubernetes API reachable again");
            self.send(Update::Fresh(self.kind)).await?;
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
            if let Some(next) = page.metadata.continue_.filter(|t| !t.is_empty()) {
                token = Some(next);
            } else {
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

    /// Lists until it works; the model then holds exactly the listed objects.
    async fn list(&mut self) -> Result<String, Closed> {
        loop {
            match self.list_pages().await {
                Ok(version) => {
                    self.backoff = self.options.initial_backoff;
                    if std::mem::take(&mut self.missing) {
                        tracing::info!(kind = %self.kind, "API installed; watching it");
                    }
                    self.send(Update::Synced(self.kind)).await?;
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
                        self.send(Update::NotInstalled(self.kind)).await?;
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
            self.gone(&key).await?;
        }
        Ok(())
    }

    /// Tells that an object is gone (and with it, any rejection of it).
    async fn gone(&mut self, key: &ObjectKey) -> Result<(), Closed> {
        let removal = ChangeKey::of(self.kind, key).removal();
        self.send(Update::Change(removal)).await?;
        self.clear(key).await
    }

    /// Tells that an object rejected before is no longer (fixed, or gone).
    async fn clear(&mut self, key: &ObjectKey) -> Result<(), Closed> {
        if self.rejected.remove(key) {
            self.send(Update::Cleared {
                kind: self.kind,
                object: key.to_string(),
            })
            .await?;
        }
        Ok(())
    }

    async fn report(&mut self, key: &ObjectKey, object: &K) -> Result<(), Closed> {
        match (self.convert)(self.kind, object) {
            Ok(changes) => {
                for change in changes {
                    self.send(Update::Change(change)).await?;
                }
                self.clear(key).await
            }
            Err(reason) => {
                tracing::warn!(kind = %self.kind, object = %key, %reason,
                    "object not usable; keeping its last good version");
                self.rejected.insert(key.clone());
                self.send(Update::Rejected {
                    kind: self.kind,
                    object: key.to_string(),
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
            self.gone(&key).await?;
        }
        Ok(())
    }
}

fn advance<K: Resource>(version: &mut String, object: &K) {
    if let Some(v) = object.resource_version().filter(|v| !v.is_empty()) {
        *version = v;
    }
}
