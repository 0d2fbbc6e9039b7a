//! The HTTP endpoint: `/metrics` (either text format, see [`super::exposition`]), `/healthz` and
//! `/readyz`, served by hyper's HTTP/1 server on tokio, with keep-alive.
//!
//! The port is on the node's host network, so anything on the node network can open
//! connections to it, and a scrape must not wait behind them. Every connection is its own task;
//! a connection may take [`Limits::header_timeout`] from the first byte of a request head to
//! its end, [`Limits::response_timeout`] from there to the end of its response, and
//! [`Limits::idle_timeout`] waiting for its next request; and past [`Limits::max_connections`]
//! a new connection closes the one waiting longest for a request (idle, or still sending its
//! head), never one being answered. So connections held open cost their holder a socket each
//! and cost a scrape nothing.
//!
//! Default port 19925 (see [`DEFAULT_METRICS_ADDR`]): the agent runs with host networking, so the
//! port must be free on every node. The Prometheus exporter range 9100-9999 is fully allocated
//! (any number in it belongs to some exporter, e.g. node-exporter 9100, Calico Felix 9091,
//! Cilium 9962-9965, Alertmanager 9093/9094, Loki 9095), the kubelet and kube-proxy sit at
//! 10248-10256 and the control plane at 10257-10259, `NodePorts` at 30000-32767 and ephemeral
//! ports from 32768; 19925 is outside all of these and free of Loki's 3100/7946, etcd's
//! 2379-2381, Hubble's 4244/4245, VXLAN 4789/8472 and `WireGuard` 51820/51821.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::{ExportError, Format, Metrics};

/// `--metrics-addr` default; see the module docs for why this port.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:19925";

/// What the endpoint allows each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once. A new one past it closes the connection that has waited
    /// longest for a request, or is closed itself when every connection is being answered.
    pub max_connections: usize,
    /// From the first byte of a request head to its end.
    pub header_timeout: Duration,
    /// From a request head to the end of its response (Prometheus gives up after 10 s).
    pub response_timeout: Duration,
    /// How long a connection may wait for its next (or first) request: longer than the usual
    /// scrape intervals (15 s to 1 min), so Prometheus keeps its connection.
    pub idle_timeout: Duration,
    /// The largest request head (request line and headers); larger is answered 431.
    pub max_head: usize,
    /// The largest request body accepted (and dropped: nothing here reads one); a larger or
    /// chunked one is answered 413 and the connection closed.
    pub max_body: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Prometheus replicas, probes and people need a handful; each held connection costs
            // about 10 KiB and a descriptor.
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            // A scrape or a probe sends a few hundred bytes; hyper's smallest read buffer.
            max_head: 8 * 1024,
            max_body: 4 * 1024,
        }
    }
}

/// Raises this process' soft limit of open files to its hard limit: container runtimes often
/// start a process with 1,024, which [`Limits::max_connections`], the datapath's maps and the
/// API watches share. Returns the (soft, hard) limits now in force.
///
/// # Errors
/// When the limits cannot be read or set.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit to the pointer it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        // An unlimited hard limit still stops at the kernel's per-process maximum.
        let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|n| n.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(limit.rlim_max);
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max.min(most).max(limit.rlim_cur),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from the pointer it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// What `/readyz` waits for: the datapath attached and the model loaded.
#[derive(Debug, Default)]
pub struct Readiness {
    attached: AtomicBool,
    model_loaded: AtomicBool,
}

impl Readiness {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_attached(&self, attached: bool) {
        self.attached.store(attached, Ordering::Release);
    }

    pub fn set_model_loaded(&self, loaded: bool) {
        self.model_loaded.store(loaded, Ordering::Release);
    }

    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.missing().is_empty()
    }

    /// What readiness still waits for.
    #[must_use]
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.attached.load(Ordering::Acquire) {
            missing.push("datapath not attached");
        }
        if !self.model_loaded.load(Ordering::Acquire) {
            missing.push("policy model not loaded");
        }
        missing
    }
}

/// The metrics endpoint, bound and ready to serve.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    limits: Limits,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]), with the default
    /// [`Limits`]. Raises the soft limit of open files first ([`raise_nofile_limit`]).
    ///
    /// # Errors
    /// When the address cannot be bound (in use, not local, no permission).
    pub async fn bind(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> Result<Self, ExportError> {
        match raise_nofile_limit() {
            Ok((soft, hard)) => tracing::debug!(soft, hard, "open files limit"),
            Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ExportError::Bind { addr, source })?;
        Ok(Self {
            listener,
            metrics,
            readiness,
            limits: Limits::default(),
        })
    }

    /// The same server with other limits.
    #[must_use]
    pub fn with_limits(self, limits: Limits) -> Self {
        Self { limits, ..self }
    }

    /// The address actually bound.
    ///
    /// # Errors
    /// When the socket cannot report it (it always can once bound).
    pub fn local_addr(&self) -> Result<SocketAddr, ExportError> {
        self.listener
            .local_addr()
            .map_err(|source| ExportError::Io {
                op: "local_addr",
                source,
            })
    }

    /// Serves until `shutdown` completes, then closes the listener and tells every connection
    /// to finish: idle ones close at once, one being answered after its response.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            metrics,
            readiness,
            limits,
        } = self;
        let mut http = http1::Builder::new();
        http.max_buf_size(limits.max_head.max(8 * 1024))
            .max_header_size(limits.max_head)
            .keep_alive(true)
            // hyper's own timeout runs from the end of one response to the end of the next
            // request head, idle time included; each connection's watchdog keeps the two apart.
            .header_read_timeout(None);
        let shared = Arc::new(Shared {
            metrics,
            readiness,
            limits,
            http,
            epoch: Instant::now(),
            connections: Mutex::new(FxHashMap::default()),
        });
        let (stop, stopping) = watch::channel(());
        let mut next_id = 0_u64;
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // The response goes in one write; no reason to hold its last segment back.
                    let _ = stream.set_nodelay(true);
                    let id = next_id;
                    next_id += 1;
                    let connection = Arc::new(Connection::new(shared.now_ms()));
                    if !shared.admit(id, &connection) {
                        tracing::debug!(%peer, "metrics connection refused: every connection is being answered");
                        continue;
                    }
                    tokio::spawn(serve_connection(
                        stream,
                        peer,
                        id,
                        connection,
                        Arc::clone(&shared),
                        stopping.clone(),
                    ));
                }
                Err(error) => {
                    // Out of file descriptors or the like: free one, and back off instead of
                    // spinning.
                    tracing::warn!(%error, "accepting a metrics connection failed");
                    shared.evict();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        drop(listener);
        let _ = stop.send(());
    }
}

/// What every connection of a server shares.
struct Shared {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    limits: Limits,
    http: http1::Builder,
    /// Where [`Connection`] times count from.
    epoch: Instant,
    connections: Mutex<FxHashMap<u64, Arc<Connection>>>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Registers a new connection, closing the one waiting longest for a request when the
    /// server is full; `false` when none could be closed (every one is being answered).
    fn admit(&self, id: u64, connection: &Arc<Connection>) -> bool {
        let mut connections = lock(&self.connections);
        if connections.len() >= self.limits.max_connections && !evict_from(&mut connections) {
            return false;
        }
        connections.insert(id, Arc::clone(connection));
        true
    }

    fn evict(&self) {
        evict_from(&mut lock(&self.connections));
    }
}

/// Closes the connection of `connections` that has waited longest for a request and takes it
/// out; `false` when every one is being answered.
fn evict_from(connections: &mut FxHashMap<u64, Arc<Connection>>) -> bool {
    loop {
        let oldest = connections
            .iter()
            .filter_map(|(id, c)| {
                let (phase, since) = c.state();
                matches!(phase, Phase::Idle | Phase::Head).then_some((since, *id))
            })
            .min();
        let Some((_, id)) = oldest else {
            return false;
        };
        let Some(connection) = connections.get(&id) else {
            return false;
        };
        // Its request may have just begun: then it is not to be closed, look again.
        if connection.close() {
            connections.remove(&id);
            return true;
        }
    }
}

/// Where a connection is in its request cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request (the first, or the next on a kept-alive connection).
    Idle = 0,
    /// A request head has begun to arrive.
    Head = 1,
    /// A request is being answered.
    Busy = 2,
    /// To be closed now (to make room for a new connection).
    Closing = 3,
}

impl Phase {
    const fn of(state: u64) -> Self {
        match state & 3 {
            0 => Self::Idle,
            1 => Self::Head,
            2 => Self::Busy,
            _ => Self::Closing,
        }
    }
}

/// One connection's phase and when it began, in one word (milliseconds since the server's
/// epoch, shifted, and the phase in the low two bits), so both always change together. The
/// connection's own task moves it through its cycle; the accept loop only closes it, and only
/// while it waits for a request.
#[derive(Debug)]
struct Connection {
    state: AtomicU64,
    /// Woken when the connection is to be closed.
    closed: Notify,
}

impl Connection {
    fn new(now_ms: u64) -> Self {
        Self {
            state: AtomicU64::new(now_ms << 2 | Phase::Idle as u64),
            closed: Notify::new(),
        }
    }

    fn state(&self) -> (Phase, u64) {
        let state = self.state.load(Ordering::Acquire);
        (Phase::of(state), state >> 2)
    }

    /// Moves to `to` (since `now_ms`) if the phase is one of `from`.
    fn enter(&self, from: &[Phase], to: Phase, now_ms: u64) -> bool {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                from.contains(&Phase::of(state))
                    .then_some(now_ms << 2 | to as u64)
            })
            .is_ok()
    }

    /// Marks the connection to be closed, if it is waiting for a request.
    fn close(&self) -> bool {
        let (_, since) = self.state();
        let closing = self.enter(&[Phase::Idle, Phase::Head], Phase::Closing, since);
        if closing {
            self.closed.notify_one();
        }
        closing
    }

    /// When the current phase runs out, per `limits`.
    fn deadline(&self, limits: &Limits) -> Option<u64> {
        let (phase, since) = self.state();
        let allowed = match phase {
            Phase::Idle => limits.idle_timeout,
            Phase::Head => limits.header_timeout,
            Phase::Busy => limits.response_timeout,
            Phase::Closing => return None,
        };
        Some(since.saturating_add(u64::try_from(allowed.as_millis()).unwrap_or(u64::MAX)))
    }
}

/// The connection's socket, telling [`Connection`] when a request head begins to arrive.
struct Tracked {
    stream: TcpStream,
    connection: Arc<Connection>,
    shared: Arc<Shared>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.connection
                .enter(&[Phase::Idle], Phase::Head, this.shared.now_ms());
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Drives one connection until it ends, runs out of time, is closed for a new one, or the
/// server stops (then it finishes what it is answering).
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    connection: Arc<Connection>,
    shared: Arc<Shared>,
    mut stopping: watch::Receiver<()>,
) {
    let io = TokioIo::new(Tracked {
        stream,
        connection: Arc::clone(&connection),
        shared: Arc::clone(&shared),
    });
    let service = {
        let shared = Arc::clone(&shared);
        let connection = Arc::clone(&connection);
        service_fn(move |request| {
            std::future::ready(Ok::<_, Infallible>(respond(&request, &shared, &connection)))
        })
    };
    let http = shared.http.serve_connection(io, service);
    tokio::pin!(http);
    let shortest = [
        shared.limits.header_timeout,
        shared.limits.response_timeout,
        shared.limits.idle_timeout,
    ]
    .into_iter()
    .min()
    .unwrap_or_default();
    let mut draining = false;
    loop {
        // A phase that begins later ends no earlier than `now + shortest`: waking by then at
        // the latest sees every deadline in time.
        let now = shared.now_ms();
        let Some(deadline) = connection.deadline(&shared.limits) else {
            break;
        };
        if now >= deadline {
            tracing::debug!(%peer, phase = ?connection.state().0, "metrics connection timed out");
            break;
        }
        let wake = shared.instant(deadline).min(Instant::now() + shortest);
        tokio::select! {
            result = http.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "metrics connection ended with an error");
                }
                break;
            }
            () = connection.closed.notified() => {
                tracing::debug!(%peer, "metrics connection closed for a new one");
                break;
            }
            _ = stopping.changed(), if !draining => {
                draining = true;
                http.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    lock(&shared.connections).remove(&id);
}

/// A response body that marks its connection idle again when hyper is done with it (it drops
/// the body once the last byte is in its write buffer).
struct Reply {
    body: Full<Bytes>,
    done: Option<(Arc<Connection>, Arc<Shared>)>,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some((connection, shared)) = self.done.take() {
            connection.enter(&[Phase::Busy], Phase::Idle, shared.now_ms());
        }
    }
}

/// The answer to one request.
fn respond(
    request: &Request<Incoming>,
    shared: &Arc<Shared>,
    connection: &Arc<Connection>,
) -> Response<Reply> {
    let busy = connection.enter(&[Phase::Idle, Phase::Head], Phase::Busy, shared.now_ms());
    let (mut response, close) = if busy {
        route(request, shared)
    } else {
        // Closed for a new connection while its head arrived.
        (text(StatusCode::SERVICE_UNAVAILABLE, "closing\n"), true)
    };
    if close {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response.map(|body| Reply {
        body,
        done: busy.then(|| (Arc::clone(connection), Arc::clone(shared))),
    })
}

/// The response to a request, and whether the connection is to be closed after it.
fn route(request: &Request<Incoming>, shared: &Shared) -> (Response<Full<Bytes>>, bool) {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz" | "/") {
        return (text(StatusCode::NOT_FOUND, "not found\n"), false);
    }
    // Nothing here reads a body: a small one is dropped, a large or unbounded one refused.
    let body = request.body().size_hint();
    if body.exact().is_none_or(|len| len > shared.limits.max_body) {
        return (
            text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
            true,
        );
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return (response, false);
    }
    let response = match path {
        "/metrics" => {
            let format = Format::negotiate(
                request
                    .headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let body = shared.metrics.encode(SystemTime::now(), format);
            let mut response = text(StatusCode::OK, body);
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            headers.insert(header::VARY, HeaderValue::from_static("Accept"));
            response
        }
        // Live while this task answers: the pipeline's own failures show in /readyz and metrics.
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let missing = shared.readiness.missing();
            if missing.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", missing.join(", ")),
                )
            }
        }
        _ => text(
            StatusCode::OK,
            "flow-auditor: /metrics (Prometheus text or OpenMetrics), /healthz, /readyz\n",
        ),
    };
    (response, false)
}

/// A plain-text response, never cached.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a map that is still consistent: keep using it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
