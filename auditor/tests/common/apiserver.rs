//! An in-process Kubernetes API server for tests: plain HTTP/1.1 on 127.0.0.1 that speaks the
//! list/watch protocol kube clients use (paged lists with a resourceVersion, chunked watch streams
//! of ADDED/MODIFIED/DELETED/BOOKMARK/ERROR events, `410 Gone`), with knobs to script outages.
//! One global resourceVersion counter and an event log, like etcd; `compact` forgets the log.

#![allow(
    dead_code,
    reason = "each test binary that includes this module uses a different part of it"
)]

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A resource the server knows: its URL path, and how its objects and lists are typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    pub path: &'static str,
    pub api_version: &'static str,
    pub kind: &'static str,
    /// Custom resources keep `apiVersion`/`kind` in list items; built-in kinds do not.
    pub custom: bool,
}

pub const NAMESPACES: Resource = Resource {
    path: "/api/v1/namespaces",
    api_version: "v1",
    kind: "Namespace",
    custom: false,
};
pub const NODES: Resource = Resource {
    path: "/api/v1/nodes",
    api_version: "v1",
    kind: "Node",
    custom: false,
};
pub const PODS: Resource = Resource {
    path: "/api/v1/pods",
    api_version: "v1",
    kind: "Pod",
    custom: false,
};
pub const SERVICES: Resource = Resource {
    path: "/api/v1/services",
    api_version: "v1",
    kind: "Service",
    custom: false,
};
pub const ENDPOINT_SLICES: Resource = Resource {
    path: "/apis/discovery.k8s.io/v1/endpointslices",
    api_version: "discovery.k8s.io/v1",
    kind: "EndpointSlice",
    custom: false,
};
pub const NETWORK_POLICIES: Resource = Resource {
    path: "/apis/networking.k8s.io/v1/networkpolicies",
    api_version: "networking.k8s.io/v1",
    kind: "NetworkPolicy",
    custom: false,
};
pub const CILIUM_NETWORK_POLICIES: Resource = Resource {
    path: "/apis/cilium.io/v2/ciliumnetworkpolicies",
    api_version: "cilium.io/v2",
    kind: "CiliumNetworkPolicy",
    custom: true,
};
pub const CILIUM_CLUSTERWIDE_NETWORK_POLICIES: Resource = Resource {
    path: "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies",
    api_version: "cilium.io/v2",
    kind: "CiliumClusterwideNetworkPolicy",
    custom: true,
};

pub const ALL: [Resource; 8] = [
    NAMESPACES,
    NODES,
    PODS,
    SERVICES,
    ENDPOINT_SLICES,
    NETWORK_POLICIES,
    CILIUM_NETWORK_POLICIES,
    CILIUM_CLUSTERWIDE_NETWORK_POLICIES,
];

/// A request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub resource: Option<Resource>,
    pub watch: bool,
    pub resource_version: Option<String>,
    pub query: BTreeMap<String, String>,
}

struct Event {
    version: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    version: u64,
    /// (resource, namespace, name) -> object with its resourceVersion.
    objects: BTreeMap<(Resource, String, String), Value>,
    events: Vec<Event>,
    /// Watches from a version older than this get `410 Gone`.
    compacted: u64,
    /// Resources answering 404, like a CRD that is not installed.
    missing: HashSet<Resource>,
    /// Answer an expired watch with an HTTP 410 instead of an ERROR event.
    gone_as_status: bool,
    hang: bool,
    /// Bumped to make every open watch do something once.
    drop_epoch: u64,
    expire_epoch: u64,
    fail_epoch: u64,
    fail_code: u16,
    bookmark_epoch: u64,
    bookmarks_sent: u64,
    active_watches: usize,
    requests: Vec<Seen>,
}

struct Shared {
    state: Mutex<State>,
    /// Ticks on every change, so open watches look at the state again.
    tick: watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; keep serving.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn poke(&self) {
        self.tick.send_modify(|t| *t += 1);
    }
}

/// Opens the listening socket: where it is created decides the network namespace it serves.
pub type Bind = Box<dyn Fn(SocketAddr) -> std::net::TcpListener + Send + Sync>;

/// The server; dropping it stops every connection.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    bind: Bind,
}

impl ApiServer {
    /// Starts on an ephemeral port of 127.0.0.1 (of the calling thread's network namespace).
    pub async fn start() -> Self {
        Self::start_with(Box::new(bind_here)).await
    }

    /// Starts on an ephemeral port of 127.0.0.1 of the socket `bind` opens (on every restart).
    #[expect(
        clippy::unused_async,
        clippy::unused_async_trait_impl,
        reason = "it spawns the server's tasks, which needs the caller to be on a running runtime"
    )]
    pub async fn start_with(bind: Bind) -> Self {
        let (tick, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            tick,
            tasks: Mutex::new(Vec::new()),
        });
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local address of the test API server: {e}"));
        let server = Self { shared, addr, bind };
        server.serve(listener);
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client pointed at this server.
    pub fn client(&self) -> kube::Client {
        let uri = self
            .url()
            .parse()
            .unwrap_or_else(|e| panic!("test API server URL: {e}"));
        let config = kube::Config::new(uri);
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e}"))
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("non-blocking listener: {e}"));
        let listener = TcpListener::from_std(listener)
            .unwrap_or_else(|e| panic!("listener into the runtime: {e}"));
        let shared = Arc::clone(&self.shared);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = tokio::spawn(connection(Arc::clone(&shared), stream));
                let mut tasks = shared
                    .tasks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                tasks.retain(|t| !t.is_finished());
                tasks.push(conn);
            }
        });
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(accept);
    }

    fn abort_all(&self) -> Vec<JoinHandle<()>> {
        let tasks = std::mem::take(
            &mut *self
                .shared
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for task in &tasks {
            task.abort();
        }
        tasks
    }

    /// Unreachable: the listener closes and every connection is cut (connection refused).
    pub async fn stop(&self) {
        // Awaiting the aborted tasks makes sure their sockets are closed when this returns.
        for task in self.abort_all() {
            let _ = task.await;
        }
    }

    /// Listens again on the same address, with the same objects and history.
    pub fn restart(&self) {
        let listener = (self.bind)(self.addr);
        self.serve(listener);
    }

    fn key(object: &Value) -> (String, String) {
        let meta = &object["metadata"];
        (
            meta["namespace"].as_str().unwrap_or_default().to_owned(),
            meta["name"]
                .as_str()
                .unwrap_or_else(|| panic!("test object without metadata.name: {object}"))
                .to_owned(),
        )
    }

    /// Creates or replaces an object (ADDED or MODIFIED); returns its resourceVersion.
    pub fn apply(&self, resource: Resource, mut object: Value) -> u64 {
        let version = {
            let mut state = self.shared.lock();
            state.version += 1;
            let version = state.version;
            let (namespace, name) = Self::key(&object);
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            object["apiVersion"] = json!(resource.api_version);
            object["kind"] = json!(resource.kind);
            let previous = state
                .objects
                .insert((resource, namespace, name), object.clone());
            let kind = if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            state.events.push(Event {
                version,
                resource,
                kind,
                object,
            });
            version
        };
        self.shared.poke();
        version
    }

    /// Deletes an object (DELETED); panics if there is none, a test mistake.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> u64 {
        let version = {
            let mut state = self.shared.lock();
            let key = (resource, namespace.to_owned(), name.to_owned());
            let Some(mut object) = state.objects.remove(&key) else {
                panic!("test API server: no {} {namespace}/{name}", resource.kind);
            };
            state.version += 1;
            let version = state.version;
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            state.events.push(Event {
                version,
                resource,
                kind: "DELETED",
                object,
            });
            version
        };
        self.shared.poke();
        version
    }

    /// Forgets the event history: a watch from an older resourceVersion gets `410 Gone`.
    pub fn compact(&self) {
        let mut state = self.shared.lock();
        state.compacted = state.version;
        state.events.clear();
    }

    /// Cuts every open watch connection (no end-of-stream chunk), as a restarting server does.
    pub fn drop_watches(&self) {
        self.shared.lock().drop_epoch += 1;
        self.shared.poke();
    }

    /// Ends every open watch with an ERROR event carrying a 410 Status.
    pub fn expire_watches(&self) {
        let mut state = self.shared.lock();
        state.expire_epoch += 1;
        state.compacted = state.version;
        state.events.clear();
        drop(state);
        self.shared.poke();
    }

    /// Ends every open watch with an ERROR event carrying a Status with `code` (not an expiry:
    /// the history stays, so a client can resume).
    pub fn fail_watches(&self, code: u16) {
        let mut state = self.shared.lock();
        state.fail_epoch += 1;
        state.fail_code = code;
        drop(state);
        self.shared.poke();
    }

    /// Accepts connections and reads requests but never answers them (an overloaded server).
    pub fn set_hang(&self, on: bool) {
        self.shared.lock().hang = on;
    }

    /// Answers expired watches with an HTTP 410 status instead of an ERROR event.
    pub fn set_gone_as_status(&self, on: bool) {
        self.shared.lock().gone_as_status = on;
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch that asked for them.
    pub fn bookmark(&self) {
        self.shared.lock().bookmark_epoch += 1;
        self.shared.poke();
    }

    /// Makes a resource answer 404 (a CRD that is not installed), or serve again.
    pub fn set_missing(&self, resource: Resource, missing: bool) {
        let mut state = self.shared.lock();
        if missing {
            state.missing.insert(resource);
        } else {
            state.missing.remove(&resource);
        }
    }

    pub fn version(&self) -> u64 {
        self.shared.lock().version
    }

    pub fn active_watches(&self) -> usize {
        self.shared.lock().active_watches
    }

    pub fn bookmarks_sent(&self) -> u64 {
        self.shared.lock().bookmarks_sent
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.lock().requests.clone()
    }

    pub fn lists(&self, resource: Resource) -> usize {
        self.count(resource, false)
    }

    pub fn watches(&self, resource: Resource) -> usize {
        self.count(resource, true)
    }

    fn count(&self, resource: Resource, watch: bool) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.resource == Some(resource) && r.watch == watch)
            .count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// Binds in the calling thread's network namespace. The standard library sets `SO_REUSEADDR` on
/// Unix, so a restart gets the same port back while old connections sit in `TIME_WAIT`.
pub fn bind_here(addr: SocketAddr) -> std::net::TcpListener {
    std::net::TcpListener::bind(addr)
        .unwrap_or_else(|e| panic!("bind the test API server to {addr}: {e}"))
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_owned(), v.replace("%3A", ":").replace("%2F", "/"))
        })
        .collect()
}

/// Serves requests on one connection until the client closes it or a watch ends it.
async fn connection(shared: Arc<Shared>, stream: TcpStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // Headers: nothing in them matters here, and GET has no body.
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header).await {
                Ok(0) | Err(_) => return,
                Ok(_) if header == "\r\n" || header == "\n" => break,
                Ok(_) => {}
            }
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let query = parse_query(query);
        let resource = ALL.into_iter().find(|r| r.path == path);
        let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
        shared.lock().requests.push(Seen {
            resource,
            watch,
            resource_version: query.get("resourceVersion").cloned(),
            query: query.clone(),
        });
        if shared.lock().hang {
            // Held until the client gives up or the server stops.
            std::future::pending::<()>().await;
        }
        let missing = resource.is_some_and(|r| shared.lock().missing.contains(&r));
        let Some(resource) = resource.filter(|_| method == "GET" && !missing) else {
            let body = status(
                404,
                "NotFound",
                &format!("the server could not find {path}"),
            );
            if respond(&mut write, 404, &body).await.is_err() {
                return;
            }
            continue;
        };
        if watch {
            serve_watch(&shared, &mut write, resource, &query).await;
            // A watch response ends the connection, as `Connection: close` said.
            return;
        }
        let body = list(&shared, resource, &query);
        if respond(&mut write, 200, &body).await.is_err() {
            return;
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

async fn respond<W: AsyncWrite + Unpin>(
    write: &mut W,
    code: u16,
    body: &Value,
) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body.as_bytes()).await?;
    write.flush().await
}

/// A page of a list. The continue token holds the list's version and the next offset, so pages
/// of one list are consistent only as far as the test does not change things in between.
fn list(shared: &Shared, resource: Resource, query: &BTreeMap<String, String>) -> Value {
    let state = shared.lock();
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let (version, offset) = match query.get("continue").and_then(|c| c.split_once('-')) {
        Some((v, o)) => (v.parse().unwrap_or(state.version), o.parse().unwrap_or(0)),
        None => (state.version, 0),
    };
    let all: Vec<&Value> = state
        .objects
        .iter()
        .filter(|((r, _, _), _)| *r == resource)
        .map(|(_, o)| o)
        .collect();
    let items: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|o| {
            let mut item = (*o).clone();
            if !resource.custom
                && let Some(map) = item.as_object_mut()
            {
                map.remove("apiVersion");
                map.remove("kind");
            }
            item
        })
        .collect();
    let next = offset.saturating_add(items.len());
    let mut metadata = json!({ "resourceVersion": version.to_string() });
    if next < all.len() {
        metadata["continue"] = json!(format!("{version}-{next}"));
    }
    json!({
        "apiVersion": resource.api_version,
        "kind": format!("{}List", resource.kind),
        "metadata": metadata,
        "items": items,
    })
}

async fn chunk<W: AsyncWrite + Unpin>(write: &mut W, line: &Value) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write
        .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await?;
    write.flush().await
}

struct WatchGuard<'a>(&'a Shared);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.active_watches = state.active_watches.saturating_sub(1);
    }
}

async fn serve_watch<W: AsyncWrite + Unpin>(
    shared: &Shared,
    write: &mut W,
    resource: Resource,
    query: &BTreeMap<String, String>,
) {
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = shared.tick.subscribe();
    let (mut cursor, expired, as_status, drop0, expire0, fail0, bookmark0) = {
        let state = shared.lock();
        // "" and "0" mean "from anything": this server then starts at the present.
        let cursor = match query.get("resourceVersion").map(String::as_str) {
            None | Some("" | "0") => state.version,
            Some(v) => v.parse().unwrap_or(0),
        };
        (
            cursor,
            cursor < state.compacted,
            state.gone_as_status,
            state.drop_epoch,
            state.expire_epoch,
            state.fail_epoch,
            state.bookmark_epoch,
        )
    };
    let gone = status(
        410,
        "Expired",
        &format!("too old resource version: {cursor}"),
    );
    if expired && as_status {
        let _ = respond(write, 410, &gone).await;
        return;
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if write.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    if expired {
        let _ = chunk(write, &json!({"type": "ERROR", "object": gone})).await;
        let _ = write.write_all(b"0\r\n\r\n").await;
        return;
    }
    shared.lock().active_watches += 1;
    let _guard = WatchGuard(shared);
    let mut bookmark_seen = bookmark0;
    loop {
        let (lines, dropped, expire, fail, bookmark) = {
            let mut state = shared.lock();
            let lines: Vec<(u64, Value)> = state
                .events
                .iter()
                .filter(|e| e.resource == resource && e.version > cursor)
                .map(|e| (e.version, json!({"type": e.kind, "object": e.object})))
                .collect();
            let bookmark = (bookmarks && state.bookmark_epoch != bookmark_seen).then(|| {
                bookmark_seen = state.bookmark_epoch;
                state.bookmarks_sent += 1;
                state.version
            });
            (
                lines,
                state.drop_epoch != drop0,
                state.expire_epoch != expire0,
                (state.fail_epoch != fail0).then_some(state.fail_code),
                bookmark,
            )
        };
        if dropped {
            // Gone without the closing chunk, like a connection cut mid-stream.
            return;
        }
        if expire {
            let gone = status(410, "Expired", "too old resource version");
            let _ = chunk(write, &json!({"type": "ERROR", "object": gone})).await;
            let _ = write.write_all(b"0\r\n\r\n").await;
            return;
        }
        if let Some(code) = fail {
            let failure = status(code, "InternalError", "the watch failed");
            let _ = chunk(write, &json!({"type": "ERROR", "object": failure})).await;
            let _ = write.write_all(b"0\r\n\r\n").await;
            return;
        }
        for (version, line) in lines {
            if chunk(write, &line).await.is_err() {
                return;
            }
            cursor = version;
        }
        if let Some(version) = bookmark {
            let line = json!({
                "type": "BOOKMARK",
                "object": {
                    "apiVersion": resource.api_version,
                    "kind": resource.kind,
                    "metadata": {"resourceVersion": version.to_string()},
                },
            });
            if chunk(write, &line).await.is_err() {
                return;
            }
            cursor = cursor.max(version);
        }
        tokio::select! {
            changed = tick.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                let _ = write.write_all(b"0\r\n\r\n").await;
                let _ = write.flush().await;
                return;
            }
        }
    }
}
