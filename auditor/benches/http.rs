//! The metrics endpoint under the load a host-network port can get (`cargo bench -p auditor
//! --bench http`, or `cargo xtask bench http`): the server on a runtime of its own with one
//! worker (the daemon has two, shared with its pipeline), fed metrics of a homelab's size
//! (1,000 flow series, 400 rule series), and clients on another runtime on 127.0.0.1.
//!
//! Figures: the latency of a scrape (a new connection, `GET /metrics` asking for `OpenMetrics`,
//! the whole body read), median and maximum over `SCRAPES` scrapes one after another, first with
//! nothing else connected, then while 1,000 connections that each sent part of a request head
//! are held open (the target: no more than 100 ms added); and the time for 50 scrapers started
//! together to all have their bodies; and the resident memory the held connections add (the
//! server's end and the bench's own). Ends with the one summary line.
#![expect(
    clippy::cast_precision_loss,
    reason = "figures printed for people: a float rounded in its 16th digit, or a count far below 2^52, does not change them"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use auditor::audit::{AuditVerdict, AuditedFlow, Judgement, ModelVerdict, Peer, PodPeer, RuleHit};
use auditor::export::{Metrics, Readiness, Server, raise_nofile_limit};
use auditor::flows::{FlowRecord, Outcome, PerDirection};
use auditor::policy::ir::{Action, PolicyKey, PolicyKind};
use auditor::vocab::{Direction, Protocol};
use auditor_ebpf::flow::{FlowKey, Hook, proto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SCRAPES: usize = 200;
const HELD: usize = 1000;
const CONCURRENT: usize = 50;
const FLOW_SERIES: usize = 1000;
const POLICIES: usize = 100;

fn pod(namespace: String, workload: String) -> Peer {
    Peer::Pod(PodPeer {
        name: format!("{workload}-0"),
        namespace,
        workload,
        node: Some("node-a".into()),
    })
}

fn flow(i: usize) -> AuditedFlow {
    let initiator: SocketAddr = "10.244.0.10:40000"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let port = 1000 + u16::try_from(i % 50).unwrap_or(0);
    let responder = SocketAddr::new(
        "10.244.1.20".parse().unwrap_or_else(|e| panic!("{e}")),
        port,
    );
    let (key, _) = FlowKey::from_addrs(
        proto::TCP,
        (initiator.ip(), initiator.port()),
        (responder.ip(), responder.port()),
    );
    let now = SystemTime::now();
    let policy = i % POLICIES;
    AuditedFlow {
        record: FlowRecord {
            protocol: Protocol::Tcp,
            initiator,
            responder,
            ifindex: 4,
            interface: "cali1".into(),
            hook: Hook::Ingress,
            packets: PerDirection::default(),
            bytes: PerDirection::default(),
            first_seen: now,
            last_seen: now,
            mid_stream: false,
            outcome: Outcome::Established,
            key,
        },
        src: pod(format!("ns-{}", i % 20), format!("client-{}", i / 50)),
        dst: pod(format!("ns-{}", (i + 7) % 20), format!("server-{}", i % 10)),
        dst_port: Some(port),
        judgement: Judgement {
            verdict: ModelVerdict::Allow,
            decisions: vec![RuleHit {
                policy: PolicyKey {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: format!("ns-{}", policy % 20),
                    name: format!("policy-{policy}"),
                },
                direction: Direction::Ingress,
                rule: format!("ingress[{}]", (i / POLICIES) % 4),
                action: Action::Allow,
            }],
        },
        verdict: AuditVerdict::Allowed,
        orientation: auditor::audit::Orientation::Opening,
    }
}

/// One scrape on a new connection: the body's length.
async fn scrape(addr: SocketAddr) -> usize {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    stream
        .write_all(
            b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: application/openmetrics-text\r\n\r\n",
        )
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let mut bytes = Vec::with_capacity(256 * 1024);
    let mut chunk = vec![0_u8; 64 * 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .unwrap_or_else(|e| panic!("read: {e}"));
        assert!(n > 0, "connection closed before the end of the response");
        bytes.extend_from_slice(&chunk[..n]);
        let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no content-length in {head}"));
        if bytes.len() >= end + 4 + length {
            return length;
        }
    }
}

/// `SCRAPES` scrapes one after another: (median, max) in milliseconds.
async fn latencies(addr: SocketAddr) -> (f64, f64) {
    let mut times = Vec::with_capacity(SCRAPES);
    for _ in 0..SCRAPES {
        let started = Instant::now();
        scrape(addr).await;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[times.len() - 1])
}

fn main() {
    let (soft, _) = raise_nofile_limit().unwrap_or_else(|e| panic!("RLIMIT_NOFILE: {e}"));
    let needed = 2 * HELD as u64 + 512;
    assert!(
        soft >= needed,
        "the bench needs {needed} open files, the limit is {soft}"
    );

    let metrics = Arc::new(Metrics::new());
    for i in 0..FLOW_SERIES {
        metrics.record(&flow(i));
    }
    let readiness = Arc::new(Readiness::new());
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    let server = server_runtime
        .block_on(Server::bind(localhost, Arc::clone(&metrics), readiness))
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = server
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = server_runtime.spawn(server.serve(async {
        let _ = stopped.await;
    }));

    let clients = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    clients.block_on(async {
        let body = scrape(addr).await;
        println!(
            "exposition: {FLOW_SERIES} flow series, {} rule series, {body} bytes (OpenMetrics)",
            metrics_rule_series(&metrics)
        );

        let (idle_median, idle_max) = latencies(addr).await;
        println!(
            "scrape, nothing else connected: median {idle_median:.2} ms, max {idle_max:.2} ms over {SCRAPES}"
        );

        let rss_before = rss_kib();
        let opened = Instant::now();
        // Opened 100 at a time: one after another takes seconds on a loaded machine, and the
        // first ones would reach the 10 s head timeout before the last scrape.
        let mut held = Vec::with_capacity(HELD);
        for batch in 0..HELD.div_ceil(100) {
            let opening = (batch * 100..HELD.min(batch * 100 + 100)).map(|i| async move {
                let mut stream = TcpStream::connect(addr)
                    .await
                    .unwrap_or_else(|e| panic!("connect #{i}: {e}"));
                stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: appl")
                    .await
                    .unwrap_or_else(|e| panic!("send #{i}: {e}"));
                stream
            });
            held.extend(futures_util::future::join_all(opening).await);
        }
        let opening = opened.elapsed();
        // Let the server read what each sent before its memory is read.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let per_connection = rss_kib().saturating_sub(rss_before) as f64 / HELD as f64;
        println!(
            "{HELD} half-open connections opened in {:.0} ms; resident memory +{per_connection:.1} KiB per connection (both ends, this process)",
            opening.as_secs_f64() * 1e3
        );
        let (held_median, held_max) = latencies(addr).await;
        let mut closed = 0;
        for stream in &mut held {
            let mut byte = [0_u8; 1];
            let read = tokio::time::timeout(Duration::ZERO, stream.read(&mut byte)).await;
            closed += usize::from(matches!(read, Ok(Ok(0) | Err(_))));
        }
        assert_eq!(
            closed,
            0,
            "{closed} held connections were closed during the scrapes ({:.1} s after the first \
             was opened; the head timeout is 10 s): the figures are not of {HELD} held",
            opened.elapsed().as_secs_f64()
        );
        println!(
            "scrape, {HELD} half-open connections held: median {held_median:.2} ms, max {held_max:.2} ms over {SCRAPES} (target: no more than 100 ms added, here {:+.2} ms at the max)",
            held_max - idle_max
        );
        drop(held);

        let started = Instant::now();
        let scrapers: Vec<_> = (0..CONCURRENT)
            .map(|_| tokio::spawn(scrape(addr)))
            .collect();
        for scraper in scrapers {
            scraper.await.unwrap_or_else(|e| panic!("scraper: {e}"));
        }
        let concurrent = started.elapsed().as_secs_f64() * 1e3;
        println!("{CONCURRENT} concurrent scrapers all served in {concurrent:.1} ms");

        println!(
            "http: scrape_ms_median={idle_median:.2} scrape_ms_max={idle_max:.2} \
             held{HELD}_scrape_ms_median={held_median:.2} held{HELD}_scrape_ms_max={held_max:.2} \
             concurrent{CONCURRENT}_ms={concurrent:.1} held_kib_per_connection={per_connection:.1} \
             body_bytes={body}"
        );
    });
    let _ = stop.send(());
    server_runtime
        .block_on(serving)
        .unwrap_or_else(|e| panic!("server task: {e}"));
}

/// This process' resident set.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Rule series, as the exposition lists them.
fn metrics_rule_series(metrics: &Metrics) -> usize {
    metrics
        .encode(SystemTime::now(), auditor::export::Format::Text)
        .lines()
        .filter(|l| l.starts_with("flow_auditor_policy_rule_hits_total{"))
        .count()
}
