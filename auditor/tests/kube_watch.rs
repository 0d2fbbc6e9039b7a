//! The Kubernetes API source against an in-process API server speaking the real list/watch
//! protocol: initial lists, watch events, bookmarks, dropped watches, `410 Gone` relists, an
//! unreachable server and missing Cilium CRDs, each checked through the model's verdicts.

#[path = "common/apiserver.rs"]
mod apiserver;

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use auditor::audit::{Cluster, ClusterConfig, FlowQuery as Flow};
use auditor::policy::ir::PolicyKind;
use auditor::source::kube::{KubeSource, WatchOptions};
use auditor::source::{Kind, SourceStatus, Update, watched_resources};
use auditor::vocab::{ObjectKey, Protocol};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use apiserver::ApiServer;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

const WEB: &str = "10.244.0.10";
const WORKER: &str = "10.244.0.11";
const EXTRA: &str = "10.244.0.12";
const PG: &str = "10.244.1.20";

fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("test address {text}: {e}"))
}

fn to_pg(src: &str) -> Flow {
    Flow {
        src: ip(src),
        dst: ip(PG),
        protocol: Protocol::Tcp,
        port: 5432,
    }
}

fn namespace(name: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

fn node(name: &str, address: &str, cidr: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    })
}

fn pod(namespace: &str, name: &str, app: &str, address: &str, port: Option<u16>) -> Value {
    let ports = port.map_or_else(
        || json!([]),
        |p| json!([{"name": "pg", "containerPort": p, "protocol": "TCP"}]),
    );
    json!({
        "metadata": {"namespace": namespace, "name": name, "labels": {"app": app}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "main", "image": "x", "ports": ports}]},
        "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]},
    })
}

fn kubernetes_slice() -> Value {
    json!({
        "metadata": {
            "namespace": "default",
            "name": "kubernetes",
            "labels": {"kubernetes.io/service-name": "kubernetes"},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.1"], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
    })
}

/// db/pg admits only `app=web` pods of namespace `shop`, on 5432.
fn netpol_pg_from_web() -> Value {
    json!({
        "metadata": {"namespace": "db", "name": "pg-from-web"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "pg"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
                }],
                "ports": [{"port": 5432, "protocol": "TCP"}],
            }],
        },
    })
}

/// The same intent as a `CiliumNetworkPolicy`, but for `app=worker`.
fn cnp_pg_from_worker() -> Value {
    json!({
        "metadata": {"namespace": "db", "name": "pg-from-worker"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "pg"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {
                    "app": "worker",
                    "k8s:io.kubernetes.pod.namespace": "shop",
                }}],
                "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}],
            }],
        },
    })
}

/// A cluster: two namespaces, a node, web/worker in `shop`, pg in `db`, the API server slice.
fn seed(server: &ApiServer) {
    server.apply(apiserver::NAMESPACES, namespace("shop"));
    server.apply(apiserver::NAMESPACES, namespace("db"));
    server.apply(
        apiserver::NODES,
        node("node-a", "192.0.2.10", "10.244.0.0/16"),
    );
    server.apply(apiserver::PODS, pod("shop", "web", "web", WEB, None));
    server.apply(
        apiserver::PODS,
        pod("shop", "worker", "worker", WORKER, None),
    );
    server.apply(apiserver::PODS, pod("db", "pg", "pg", PG, Some(5432)));
    server.apply(apiserver::ENDPOINT_SLICES, kubernetes_slice());
}

fn options() -> WatchOptions {
    WatchOptions {
        ignore_policies: false,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
        missing_retry: Duration::from_secs(60),
        watch_timeout: Duration::from_secs(60),
        // Small pages, so lists take several requests.
        page_size: 2,
        request_timeout: Duration::from_secs(5),
    }
}

/// Applies an update to the cluster the way the daemon does; `false` for news about the source,
/// which change nothing.
fn apply(model: &mut Cluster, update: Update) -> bool {
    match update.into_change() {
        Some(change) => {
            model.apply(change);
            true
        }
        None => false,
    }
}

/// The daemon's side of the channel: a model fed by the source, and its status.
struct Daemon {
    source: KubeSource,
    rx: mpsc::Receiver<Update>,
    model: Cluster,
    status: SourceStatus,
    log: Vec<Update>,
}

impl Daemon {
    fn start(server: &ApiServer, options: &WatchOptions) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let source = KubeSource::spawn(&server.client(), options, &tx);
        let status = source.status();
        Self {
            source,
            rx,
            model: Cluster::new(ClusterConfig::default()),
            status,
            log: Vec::new(),
        }
    }

    /// Applies updates as they come until `done` holds; panics naming `what` after [`WAIT`].
    async fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            let update = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(update)) => update,
                Ok(None) => panic!("{what}: the source stopped"),
                Err(tokio::time::error::Elapsed { .. }) => panic!(
                    "{what}: not reached within {WAIT:?}; last updates: {:#?}",
                    &self.log[self.log.len().saturating_sub(8)..]
                ),
            };
            self.status.observe(&update);
            self.log.push(update.clone());
            apply(&mut self.model, update);
        }
    }

    fn allowed(&self, flow: &Flow) -> bool {
        self.model.judge(flow).allowed
    }

    fn has_pod(&self, namespace: &str, name: &str) -> bool {
        self.model
            .inventory()
            .pod_id(&ObjectKey::new(namespace, name))
            .is_some()
    }

    fn count(&self, matches: impl Fn(&Update) -> bool) -> usize {
        self.log.iter().filter(|u| matches(u)).count()
    }
}

/// Polls the server until `done` holds (for server-side facts, such as open watches).
async fn server_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn total_lists(server: &ApiServer) -> usize {
    server.requests().iter().filter(|r| !r.watch).count()
}

#[tokio::test]
async fn initial_list_then_watch_events_change_the_verdicts() {
    let server = ApiServer::start().await;
    seed(&server);
    let mut daemon = Daemon::start(&server, &options());
    daemon.until("initial sync", |d| d.status.synced()).await;

    // Every watched kind was listed, Cilium ones included (installed, empty), nothing else.
    let mut paths: Vec<String> = server
        .requests()
        .iter()
        .filter_map(|r| r.resource.map(|r| r.path.to_owned()))
        .collect();
    paths.sort();
    paths.dedup();
    let mut expected: Vec<String> = watched_resources()
        .iter()
        .map(|(group, version, resource)| {
            if group.is_empty() {
                format!("/api/{version}/{resource}")
            } else {
                format!("/apis/{group}/{version}/{resource}")
            }
        })
        .collect();
    expected.sort();
    assert_eq!(
        paths, expected,
        "the resources requested are the watched kinds'"
    );
    assert!(
        server.requests().iter().all(|r| r.resource.is_some()),
        "no request outside the watched resources: {:?}",
        server.requests()
    );
    // Three pods in pages of two.
    assert_eq!(server.lists(apiserver::PODS), 2, "pods listed in two pages");
    assert!(
        daemon
            .status
            .is_synced(Kind::Policy(PolicyKind::CiliumNetworkPolicy))
    );
    assert!(daemon.has_pod("shop", "web") && daemon.has_pod("db", "pg"));
    assert_eq!(
        daemon.model.inventory().apiserver_addresses(),
        vec![ip("192.0.2.1")],
        "the API server's address comes from the default/kubernetes EndpointSlice"
    );
    assert!(daemon.allowed(&to_pg(WEB)) && daemon.allowed(&to_pg(WORKER)));

    // A policy added: only web may reach pg.
    server.apply(apiserver::NETWORK_POLICIES, netpol_pg_from_web());
    daemon
        .until("NetworkPolicy added", |d| d.model.policy_count() == 1)
        .await;
    assert!(
        daemon.allowed(&to_pg(WEB)),
        "web -> pg allowed by the policy"
    );
    assert!(!daemon.allowed(&to_pg(WORKER)), "worker -> pg denied");

    // A label change takes web out of the policy's peers.
    server.apply(apiserver::PODS, pod("shop", "web", "frontend", WEB, None));
    daemon
        .until("web relabelled", |d| !d.allowed(&to_pg(WEB)))
        .await;

    // A new pod with the allowed label.
    server.apply(apiserver::PODS, pod("shop", "web-2", "web", EXTRA, None));
    daemon
        .until("pod added", |d| d.allowed(&to_pg(EXTRA)))
        .await;

    // The policy deleted: everything open again.
    server.delete(apiserver::NETWORK_POLICIES, "db", "pg-from-web");
    daemon
        .until("NetworkPolicy deleted", |d| d.model.policy_count() == 0)
        .await;
    assert!(daemon.allowed(&to_pg(WEB)) && daemon.allowed(&to_pg(WORKER)));

    // A CiliumNetworkPolicy, read as a dynamic object, flips the verdicts the other way.
    server.apply(apiserver::CILIUM_NETWORK_POLICIES, cnp_pg_from_worker());
    daemon
        .until("CiliumNetworkPolicy added", |d| {
            d.model.policy_count() == 1 && d.allowed(&to_pg(WORKER))
        })
        .await;
    assert!(!daemon.allowed(&to_pg(WEB)), "web -> pg denied by the CNP");
    assert!(
        !daemon.allowed(&to_pg(EXTRA)),
        "web-2 -> pg denied by the CNP"
    );

    // A clusterwide deny on top: deny beats the CNP's allow.
    server.apply(
        apiserver::CILIUM_CLUSTERWIDE_NETWORK_POLICIES,
        json!({
            "metadata": {"name": "no-db-from-shop"},
            "spec": {
                "endpointSelector": {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "db"}},
                "ingressDeny": [{"fromEndpoints": [{"matchLabels": {
                    "k8s:io.kubernetes.pod.namespace": "shop",
                }}]}],
            },
        }),
    );
    daemon
        .until("clusterwide deny added", |d| !d.allowed(&to_pg(WORKER)))
        .await;
    server.delete(
        apiserver::CILIUM_CLUSTERWIDE_NETWORK_POLICIES,
        "",
        "no-db-from-shop",
    );
    daemon
        .until("clusterwide deny deleted", |d| d.allowed(&to_pg(WORKER)))
        .await;

    // A pod deleted leaves the inventory; one that finished gives its address back.
    server.delete(apiserver::PODS, "shop", "web-2");
    daemon
        .until("pod deleted", |d| !d.has_pod("shop", "web-2"))
        .await;
    let mut done = pod("shop", "worker", "worker", WORKER, None);
    done["status"]["phase"] = json!("Succeeded");
    server.apply(apiserver::PODS, done);
    daemon
        .until("finished pod removed", |d| !d.has_pod("shop", "worker"))
        .await;
    assert_eq!(
        daemon.count(|u| matches!(u, Update::Stale { .. })),
        0,
        "no outage was reported"
    );
}

#[tokio::test]
async fn bookmarks_and_dropped_watches_resume_without_relisting() {
    let server = ApiServer::start().await;
    seed(&server);
    let mut daemon = Daemon::start(&server, &options());
    daemon.until("initial sync", |d| d.status.synced()).await;
    server_until("every kind watching", || server.active_watches() == 8).await;

    // Versions move on in pods only: the other watches have no event to learn them from.
    server.apply(apiserver::PODS, pod("shop", "web-2", "web", EXTRA, None));
    daemon
        .until("pod added", |d| d.has_pod("shop", "web-2"))
        .await;
    server.bookmark();
    let bookmarked = server.version();
    server_until("bookmarks delivered", || server.bookmarks_sent() == 8).await;

    // History before the bookmark is gone: only a watcher that took the bookmark can resume.
    server.compact();
    let lists = total_lists(&server);
    let watches = server.watches(apiserver::NAMESPACES);
    server.drop_watches();
    server_until("watches reopened", || {
        server.watches(apiserver::NAMESPACES) > watches && server.active_watches() == 8
    })
    .await;
    server.apply(apiserver::NAMESPACES, namespace("late"));
    daemon
        .until("namespace added after the drop", |d| {
            d.model.inventory().namespaces().any(|n| n.name == "late")
        })
        .await;
    assert_eq!(
        total_lists(&server),
        lists,
        "resumed from the bookmarked resourceVersion, no relist"
    );
    let resumed = server
        .requests()
        .iter()
        .rev()
        .find(|r| r.watch && r.resource == Some(apiserver::NAMESPACES))
        .and_then(|r| r.resource_version.clone());
    assert_eq!(resumed, Some(bookmarked.to_string()));
    assert!(
        server.requests().iter().filter(|r| r.watch).all(|r| r
            .query
            .get("allowWatchBookmarks")
            .map(String::as_str)
            == Some("true")),
        "every watch asks for bookmarks"
    );
}

/// The client's resourceVersion expires while it cannot watch; objects deleted in that gap
/// are only known from the relist, which must remove them.
async fn gone_relist_applies_the_gap(gone_as_status: bool) {
    let server = ApiServer::start().await;
    server.set_gone_as_status(gone_as_status);
    seed(&server);
    server.apply(apiserver::NETWORK_POLICIES, netpol_pg_from_web());
    let mut daemon = Daemon::start(&server, &options());
    daemon.until("initial sync", |d| d.status.synced()).await;
    assert!(daemon.allowed(&to_pg(WEB)) && !daemon.allowed(&to_pg(WORKER)));
    let pod_lists = server.lists(apiserver::PODS);
    let policy_lists = server.lists(apiserver::NETWORK_POLICIES);

    server.stop().await;
    daemon
        .until("outage noticed", |d| d.status.stale_since().is_some())
        .await;
    server.delete(apiserver::PODS, "shop", "worker");
    server.apply(apiserver::PODS, pod("shop", "web-2", "web", EXTRA, None));
    server.delete(apiserver::NETWORK_POLICIES, "db", "pg-from-web");
    server.compact();
    server.restart();

    daemon
        .until("state converged after the relist", |d| {
            !d.has_pod("shop", "worker")
                && d.has_pod("shop", "web-2")
                && d.model.policy_count() == 0
                && d.status.stale_since().is_none()
        })
        .await;
    assert!(server.lists(apiserver::PODS) > pod_lists, "pods relisted");
    assert!(
        server.lists(apiserver::NETWORK_POLICIES) > policy_lists,
        "policies relisted"
    );
    assert!(daemon.allowed(&to_pg(EXTRA)), "no policy left: open again");
}

#[tokio::test]
async fn gone_as_an_error_event_relists_and_applies_deletes_from_the_gap() {
    gone_relist_applies_the_gap(false).await;
}

#[tokio::test]
async fn gone_as_an_http_status_relists_and_applies_deletes_from_the_gap() {
    gone_relist_applies_the_gap(true).await;
}

#[tokio::test]
async fn an_expired_open_watch_relists() {
    let server = ApiServer::start().await;
    seed(&server);
    let mut daemon = Daemon::start(&server, &options());
    daemon.until("initial sync", |d| d.status.synced()).await;
    server_until("every kind watching", || server.active_watches() == 8).await;
    let pod_lists = server.lists(apiserver::PODS);
    server.expire_watches();
    server_until("pods relisted", || {
        server.lists(apiserver::PODS) > pod_lists
    })
    .await;
    server.apply(apiserver::PODS, pod("shop", "web-2", "web", EXTRA, None));
    daemon
        .until("watching again after the relist", |d| {
            d.has_pod("shop", "web-2")
        })
        .await;
    assert!(
        daemon.has_pod("shop", "worker"),
        "the relist kept what exists"
    );
}

#[tokio::test]
async fn a_failed_watch_resumes_from_its_version() {
    let server = ApiServer::start().await;
    seed(&server);
    let mut daemon = Daemon::start(&server, &options());
    daemon.until("initial sync", |d| d.status.synced()).await;
    server_until("every kind watching", || server.active_watches() == 8).await;
    let lists = total_lists(&server);
    let watches = server.watches(apiserver::PODS);
    server.fail_watches(500);
    server_until("pods watched again", || {
        server.watches(apiserver::PODS) > watches
    })
    .await;
    server.apply(apiserver::PODS, pod("shop", "web-2", "web", EXTRA, None));
    daemon
        .until("pod added after the failure", |d| {
            d.has_pod("shop", "web-2")
        })
        .await;
    assert_eq!(
        total_lists(&server),
        lists,
        "a 500 is not an expiry: no relist"
    );
}

#[tokio::test]
async fn an_unreachable_server_keeps_the_model_and_reports_staleness() {
    let server = ApiServer::start().await;
    seed(&server);
    server.apply(apiserver::NETWORK_POLICIES, netpol_pg_from_web());
    let mut daemon = Daemon::start(&server, &options());
    daemon.until("initial sync", |d| d.status.synced()).await;
    assert_eq!(daemon.status.staleness(SystemTime::now()), Duration::ZERO);
    let flows = [to_pg(WEB), to_pg(WORKER), to_pg(EXTRA)];
    let before: Vec<bool> = flows.iter().map(|f| daemon.allowed(f)).collect();
    assert_eq!(before, [true, false, false]);
    let generation = daemon.model.generation();
    let lists = total_lists(&server);

    server.stop().await;
    daemon
        .until("staleness reported", |d| d.status.stale_since().is_some())
        .await;
    // Changes the source cannot see yet.
    server.delete(apiserver::NETWORK_POLICIES, "db", "pg-from-web");
    server.apply(apiserver::PODS, pod("shop", "web-2", "web", EXTRA, None));
    // Retries go on (with backoff) while the model stays as it was.
    tokio::time::sleep(Duration::from_millis(600)).await;
    while let Ok(update) = daemon.rx.try_recv() {
        daemon.status.observe(&update);
        daemon.log.push(update.clone());
        assert!(
            !apply(&mut daemon.model, update),
            "nothing reaches the model while the server is down: {:?}",
            daemon.log.last()
        );
    }
    assert_eq!(
        daemon.model.generation(),
        generation,
        "the old model is kept"
    );
    let during: Vec<bool> = flows.iter().map(|f| daemon.allowed(f)).collect();
    assert_eq!(
        during, before,
        "verdicts unchanged while the API is unreachable"
    );
    assert!(
        daemon.status.staleness(SystemTime::now()) >= Duration::from_millis(500),
        "the staleness gauge grows: {:?}",
        daemon.status.staleness(SystemTime::now())
    );
    for kind in Kind::all() {
        let reports = daemon.count(|u| matches!(u, Update::Stale { kind: k, .. } if *k == kind));
        assert!(
            reports <= 1,
            "{kind}: an outage is reported once, not once per retry ({reports} reports)"
        );
    }

    // Back: the watches resume from where they were and deliver what happened meanwhile.
    server.restart();
    daemon
        .until("recovered with the changes", |d| {
            d.status.stale_since().is_none()
                && d.model.policy_count() == 0
                && d.has_pod("shop", "web-2")
        })
        .await;
    let after: Vec<bool> = flows.iter().map(|f| daemon.allowed(f)).collect();
    assert_eq!(
        after,
        [true, true, true],
        "the next flows see the new policy set"
    );
    assert_eq!(
        total_lists(&server),
        lists,
        "the history was kept, so watches resumed without relisting"
    );
    assert_eq!(daemon.status.staleness(SystemTime::now()), Duration::ZERO);
}

#[tokio::test]
async fn a_server_that_stops_answering_is_an_outage() {
    let server = ApiServer::start().await;
    seed(&server);
    let mut daemon = Daemon::start(
        &server,
        &WatchOptions {
            request_timeout: Duration::from_millis(300),
            ..options()
        },
    );
    daemon.until("initial sync", |d| d.status.synced()).await;
    server_until("every kind watching", || server.active_watches() == 8).await;
    assert!(daemon.allowed(&to_pg(WORKER)));
    server.set_hang(true);
    server.drop_watches();
    daemon
        .until("staleness reported", |d| d.status.stale_since().is_some())
        .await;
    let error = daemon.log.iter().find_map(|u| match u {
        Update::Stale { error, .. } => Some(error.clone()),
        _ => None,
    });
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("no answer within")),
        "{error:?}"
    );
    server.apply(apiserver::NETWORK_POLICIES, netpol_pg_from_web());
    server.set_hang(false);
    daemon
        .until("answering again", |d| {
            d.status.stale_since().is_none() && !d.allowed(&to_pg(WORKER))
        })
        .await;
}

#[tokio::test]
async fn missing_cilium_crds_are_not_installed_rather_than_an_outage() {
    let server = ApiServer::start().await;
    seed(&server);
    server.set_missing(apiserver::CILIUM_NETWORK_POLICIES, true);
    server.set_missing(apiserver::CILIUM_CLUSTERWIDE_NETWORK_POLICIES, true);
    let retry = Duration::from_millis(300);
    let mut daemon = Daemon::start(
        &server,
        &WatchOptions {
            missing_retry: retry,
            ..options()
        },
    );
    let started = Instant::now();
    daemon
        .until("synced without Cilium", |d| d.status.synced())
        .await;
    assert!(
        daemon
            .status
            .is_not_installed(Kind::Policy(PolicyKind::CiliumNetworkPolicy))
    );
    assert!(
        daemon
            .status
            .is_not_installed(Kind::Policy(PolicyKind::CiliumClusterwideNetworkPolicy))
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let lists = server.lists(apiserver::CILIUM_NETWORK_POLICIES);
    // One look per `missing_retry`, not a retry storm.
    let bound = 2 + usize::try_from(started.elapsed().as_millis() / retry.as_millis()).unwrap_or(0);
    assert!(
        (1..=bound).contains(&lists),
        "{lists} lists of a missing CRD in {:?}",
        started.elapsed()
    );
    assert_eq!(server.watches(apiserver::CILIUM_NETWORK_POLICIES), 0);

    // The CRD installed later: picked up on the next look.
    server.set_missing(apiserver::CILIUM_NETWORK_POLICIES, false);
    server.apply(apiserver::CILIUM_NETWORK_POLICIES, cnp_pg_from_worker());
    daemon
        .until("CRD installed", |d| {
            d.status
                .is_synced(Kind::Policy(PolicyKind::CiliumNetworkPolicy))
                && d.model.policy_count() == 1
        })
        .await;
    assert!(daemon.allowed(&to_pg(WORKER)) && !daemon.allowed(&to_pg(WEB)));

    // The CRD uninstalled (its objects go with it): its policies leave the model.
    server.set_missing(apiserver::CILIUM_NETWORK_POLICIES, true);
    server.drop_watches();
    daemon
        .until("CRD uninstalled", |d| {
            d.status
                .is_not_installed(Kind::Policy(PolicyKind::CiliumNetworkPolicy))
                && d.model.policy_count() == 0
        })
        .await;
    assert!(daemon.allowed(&to_pg(WEB)) && daemon.allowed(&to_pg(WORKER)));
    assert_eq!(
        daemon.count(|u| matches!(u, Update::Stale { .. })),
        0,
        "a missing CRD is not an outage"
    );
}

#[tokio::test]
async fn watches_ended_by_the_server_timeout_resume_without_relisting() {
    let server = ApiServer::start().await;
    seed(&server);
    let mut daemon = Daemon::start(
        &server,
        &WatchOptions {
            watch_timeout: Duration::from_secs(1),
            ..options()
        },
    );
    daemon.until("initial sync", |d| d.status.synced()).await;
    let lists = total_lists(&server);
    server_until("pods watched three times", || {
        server.watches(apiserver::PODS) >= 3
    })
    .await;
    assert!(
        server.requests().iter().filter(|r| r.watch).all(|r| r
            .query
            .get("timeoutSeconds")
            .map(String::as_str)
            == Some("1")),
        "every watch asks the server to end it"
    );
    server.apply(apiserver::PODS, pod("shop", "web-2", "web", EXTRA, None));
    daemon
        .until("pod added", |d| d.has_pod("shop", "web-2"))
        .await;
    assert_eq!(
        total_lists(&server),
        lists,
        "no relist after a normal watch end"
    );
    assert_eq!(
        daemon.count(|u| matches!(u, Update::Stale { .. })),
        0,
        "a watch timeout is not an outage"
    );
}

#[tokio::test]
async fn ignore_policies_leaves_the_policy_kinds_unwatched() {
    let server = ApiServer::start().await;
    seed(&server);
    server.apply(apiserver::NETWORK_POLICIES, netpol_pg_from_web());
    server.apply(apiserver::CILIUM_NETWORK_POLICIES, cnp_pg_from_worker());
    let mut daemon = Daemon::start(
        &server,
        &WatchOptions {
            ignore_policies: true,
            ..options()
        },
    );
    assert!(daemon.source.kinds().iter().all(|k| !k.is_policy()));
    daemon.until("initial sync", |d| d.status.synced()).await;
    server.apply(apiserver::PODS, pod("shop", "web-2", "web", EXTRA, None));
    daemon
        .until("pod added", |d| d.has_pod("shop", "web-2"))
        .await;
    assert_eq!(daemon.model.policy_count(), 0);
    assert!(
        daemon.allowed(&to_pg(WORKER)),
        "cluster policies are not the model"
    );
    for resource in [
        apiserver::NETWORK_POLICIES,
        apiserver::CILIUM_NETWORK_POLICIES,
        apiserver::CILIUM_CLUSTERWIDE_NETWORK_POLICIES,
    ] {
        assert_eq!(
            server.lists(resource) + server.watches(resource),
            0,
            "{} not requested",
            resource.kind
        );
    }
}

#[tokio::test]
async fn unusable_objects_are_rejected_and_the_last_good_version_kept() {
    let server = ApiServer::start().await;
    seed(&server);
    server.apply(apiserver::NETWORK_POLICIES, netpol_pg_from_web());
    let mut daemon = Daemon::start(&server, &options());
    daemon.until("initial sync", |d| d.status.synced()).await;

    let mut broken = pod("shop", "web-3", "web", "10.244.0.13", None);
    broken["status"]["podIP"] = json!("not-an-ip");
    broken["status"]["podIPs"] = json!([{"ip": "not-an-ip"}]);
    server.apply(apiserver::PODS, broken);
    let mut bad_policy = cnp_pg_from_worker();
    bad_policy["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = json!("99999");
    server.apply(apiserver::CILIUM_NETWORK_POLICIES, bad_policy);
    daemon
        .until("both rejected", |d| d.status.problems() == 2)
        .await;
    let rejected: Vec<String> = daemon
        .log
        .iter()
        .filter_map(|u| match u {
            Update::Rejected { object, reason, .. } => Some(format!("{object}: {reason}")),
            _ => None,
        })
        .collect();
    assert!(
        rejected
            .iter()
            .any(|r| r.starts_with("shop/web-3") && r.contains("not-an-ip")),
        "{rejected:?}"
    );
    assert!(
        rejected.iter().any(|r| r.starts_with("db/pg-from-worker")),
        "{rejected:?}"
    );
    assert!(!daemon.has_pod("shop", "web-3"));
    assert_eq!(
        daemon.model.policy_count(),
        1,
        "only the good policy is loaded"
    );

    // A broken update of a loaded policy keeps the loaded version.
    let mut broken_np = netpol_pg_from_web();
    broken_np["spec"]["ingress"][0]["from"][0] = json!({"ipBlock": {"cidr": "nonsense"}});
    server.apply(apiserver::NETWORK_POLICIES, broken_np);
    daemon
        .until("policy update rejected", |d| d.status.problems() == 3)
        .await;
    assert!(daemon.allowed(&to_pg(WEB)) && !daemon.allowed(&to_pg(WORKER)));

    // Fixed: applied.
    server.apply(
        apiserver::PODS,
        pod("shop", "web-3", "web", "10.244.0.13", None),
    );
    daemon
        .until("fixed pod applied", |d| d.has_pod("shop", "web-3"))
        .await;
    // What is wrong is what is wrong now: a fixed object and a deleted one are no longer counted.
    daemon
        .until("the pod's rejection cleared", |d| d.status.problems() == 2)
        .await;
    server.apply(apiserver::NETWORK_POLICIES, netpol_pg_from_web());
    server.delete(apiserver::CILIUM_NETWORK_POLICIES, "db", "pg-from-worker");
    daemon
        .until("every rejection cleared", |d| d.status.problems() == 0)
        .await;
    assert!(daemon.allowed(&to_pg(WEB)) && !daemon.allowed(&to_pg(WORKER)));
}

/// An object the API server validated may carry fields of a newer API than this build knows: it
/// is kept (its pods stay isolated), and the rule holding the unknown field is reported as not
/// judged instead of being guessed; a second policy the same build fully knows still decides.
#[tokio::test]
async fn policies_with_fields_this_version_does_not_know_are_kept() {
    let server = ApiServer::start().await;
    seed(&server);
    let mut newer = netpol_pg_from_web();
    newer["spec"]["ingress"][0]["from"][0]["newPeerKind"] = json!({"selector": "x"});
    server.apply(apiserver::NETWORK_POLICIES, newer);
    let mut daemon = Daemon::start(&server, &options());
    daemon
        .until("synced with the policy", |d| {
            d.status.synced() && d.model.policy_count() == 1
        })
        .await;
    assert_eq!(daemon.status.problems(), 0, "a kept object is no error");
    let flow = to_pg(WEB);
    assert!(
        !daemon.allowed(&flow),
        "pg stays isolated, and the rule with the unknown field is not guessed to allow"
    );
    let explanation = daemon.model.explain(&flow, &daemon.model.judge(&flow));
    assert!(
        explanation
            .reason
            .contains("unknown field spec.ingress[0].from[0].newPeerKind"),
        "{}",
        explanation.reason
    );
}
