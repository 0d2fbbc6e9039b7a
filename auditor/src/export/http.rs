//! The HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz` and `/readyz`. A small HTTP/1.1
//! responder on tokio: one request per connection, bounded request size, time and concurrency,
//! which is all a Prometheus scrape and a kubelet probe need.
//!
//! Default port 19925 (see [`DEFAULT_METRICS_ADDR`]): the agent runs with host networking, so the
//! port must be free on every node. The Prometheus exporter range 9100-9999 is fully allocated
//! (any number in it belongs to some exporter, e.g. node-exporter 9100, Calico Felix 9091,
//! Cilium 9962-9965, Alertmanager 9093/9094, Loki 9095), the kubelet and kube-proxy sit at
//! 10248-10256 and the control plane at 10257-10259, NodePorts at 30000-32767 and ephemeral
//! ports from 32768; 19925 is outside all of these and free of Loki's 3100/7946, etcd's
//! 2379-2381, Hubble's 4244/4245, VXLAN 4789/8472 and WireGuard 51820/51821.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::{ExportError, Format, Metrics};

/// `--metrics-addr` default; see the module docs for why this port.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:19925";

/// Largest request head accepted; scrapes and probes send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;

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
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]).
    ///
    /// # Errors
    /// When the address cannot be bound (in use, not local, no permission).
    pub async fn bind(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> Result<Self, ExportError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ExportError::Bind { addr, source })?;
        Ok(Self {
            listener,
            metrics,
            readiness,
        })
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

    /// Serves until `shutdown` completes; connections in flight finish on their own tasks.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            metrics,
            readiness,
        } = self;
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::pin!(shutdown);
        loop {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let metrics = Arc::clone(&metrics);
                    let readiness = Arc::clone(&readiness);
                    tokio::spawn(async move {
                        if let Err(error) = handle(stream, &metrics, &readiness).await {
                            tracing::debug!(%peer, %error, "metrics connection ended with an error");
                        }
                        drop(permit);
                    });
                }
                Err(error) => {
                    // Out of file descriptors or the like: back off instead of spinning.
                    tracing::warn!(%error, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: false,
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    readiness: &Readiness,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, &mut head)).await;
    let (response, head_only) = match read {
        Err(_) => (
            Response::text("408 Request Timeout", "request timeout\n"),
            false,
        ),
        Ok(Err(error)) => return Err(error),
        Ok(Ok(HeadRead::TooLarge)) => (
            Response::text(
                "431 Request Header Fields Too Large",
                "request head too large\n",
            ),
            false,
        ),
        Ok(Ok(HeadRead::Closed)) => return Ok(()),
        Ok(Ok(HeadRead::Complete)) => route(&head, metrics, readiness),
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if response.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&response.body);
    }
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "writing the response timed out",
        )
    })?
}

enum HeadRead {
    Complete,
    TooLarge,
    Closed,
}

async fn read_head(stream: &mut TcpStream, head: &mut Vec<u8>) -> std::io::Result<HeadRead> {
    let mut chunk = [0_u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(HeadRead::Closed);
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(HeadRead::Complete);
        }
        if head.len() > MAX_HEAD {
            return Ok(HeadRead::TooLarge);
        }
    }
}

/// The format the request's `Accept` headers ask for.
fn format(head: &[u8]) -> Format {
    let head = String::from_utf8_lossy(head);
    Format::negotiate(
        head.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
            .map(|(_, value)| value),
    )
}

/// The response to a request head, and whether only the head is to be sent (HEAD).
fn route(head: &[u8], metrics: &Metrics, readiness: &Readiness) -> (Response, bool) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (
            Response::text("400 Bad Request", "malformed request line\n"),
            false,
        );
    };
    if !version.starts_with("HTTP/1.") {
        return (
            Response::text("505 HTTP Version Not Supported", "HTTP/1.x only\n"),
            false,
        );
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut response = Response::text("405 Method Not Allowed", "GET or HEAD only\n");
            response.allow = true;
            return (response, false);
        }
    };
    let path = target.split('?').next().unwrap_or_default();
    let response = match path {
        "/metrics" => {
            let format = format(head);
            Response {
                status: "200 OK",
                content_type: format.content_type(),
                body: metrics.encode(SystemTime::now(), format),
                allow: false,
            }
        }
        // Live while this task answers: the pipeline's own failures show in /readyz and metrics.
        "/healthz" => Response::text("200 OK", "ok\n"),
        "/readyz" => {
            let missing = readiness.missing();
            if missing.is_empty() {
                Response::text("200 OK", "ready\n")
            } else {
                Response::text(
                    "503 Service Unavailable",
                    format!("not ready: {}\n", missing.join(", ")),
                )
            }
        }
        "/" => Response::text(
            "200 OK",
            "flow-auditor: /metrics (OpenMetrics), /healthz, /readyz\n",
        ),
        _ => Response::text("404 Not Found", "not found\n"),
    };
    (response, head_only)
}
