//! The metrics endpoint over real TCP: serve on 127.0.0.1:0, scrape, parse the exposition, and
//! check the flow counter, rule hits, zero-valued verdict series, series removal, the health
//! set, the probes, both exposition formats (with curl, and `promtool` from Debian's
//! `prometheus` package, which must be installed), keep-alive, concurrent scrapes, and that
//! connections held open do not keep a scrape waiting.
#![expect(
    clippy::float_cmp,
    reason = "metric samples compared here are whole counts, which an f64 holds exactly"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use auditor::audit::{AuditVerdict, AuditedFlow, Judgement, ModelVerdict, Peer, PodPeer, RuleHit};
use auditor::datapath::attach::HookMode;
use auditor::export::{
    Limits, LostSource, Metrics, OPENMETRICS_CONTENT_TYPE, Readiness, Server, TEXT_CONTENT_TYPE,
};
use auditor::flows::{FlowRecord, Outcome, PerDirection};
use auditor::policy::ir::{Action, PolicyKey, PolicyKind};
use auditor::vocab::{Direction, Protocol};
use auditor_ebpf::flow::{FlowKey, Hook, proto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Reads one response from `stream`: the head, then `Content-Length` bytes of body (none for a
/// HEAD request), or everything up to the end of the stream when the length is not given.
async fn read_reply(stream: &mut TcpStream, head_only: bool) -> Reply {
    let mut bytes = Vec::new();
    // On the heap: a 16 KiB array would make every future that awaits this one as large.
    let mut chunk = vec![0_u8; 16 * 1024];
    let read = async {
        let head_end = loop {
            if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let n = stream
                .read(&mut chunk)
                .await
                .unwrap_or_else(|e| panic!("read: {e}"));
            assert!(
                n > 0,
                "connection closed before the end of the response head: {bytes:?}"
            );
            bytes.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(bytes[..head_end].to_vec())
            .unwrap_or_else(|e| panic!("response head is not UTF-8: {e}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
            .collect::<BTreeMap<_, _>>();
        let mut body = bytes.split_off(head_end + 4);
        let length = headers.get("content-length").map(|len| {
            len.parse::<usize>()
                .unwrap_or_else(|e| panic!("bad content-length {len}: {e}"))
        });
        match length {
            _ if head_only => {}
            Some(length) => {
                while body.len() < length {
                    let n = stream
                        .read(&mut chunk)
                        .await
                        .unwrap_or_else(|e| panic!("read: {e}"));
                    assert!(
                        n > 0,
                        "connection closed {} bytes into a {length}-byte body",
                        body.len()
                    );
                    body.extend_from_slice(&chunk[..n]);
                }
                assert_eq!(length, body.len(), "content-length disagrees with the body");
            }
            None => {
                stream
                    .read_to_end(&mut body)
                    .await
                    .unwrap_or_else(|e| panic!("read: {e}"));
            }
        }
        let body = String::from_utf8(body).unwrap_or_else(|e| panic!("body is not UTF-8: {e}"));
        Reply {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("no complete response within 10 s"))
}

/// One request over a fresh connection, the raw way a scraper sends it.
async fn request(addr: SocketAddr, raw: &str) -> Reply {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .write_all(raw.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    read_reply(&mut stream, raw.starts_with("HEAD ")).await
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: application/openmetrics-text\r\n\r\n"
        ),
    )
    .await
}

/// A server on 127.0.0.1:0 with `limits`: its address, what stops it, and its task.
async fn start(
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    limits: Limits,
) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    let server = Server::bind(localhost, Arc::clone(metrics), Arc::clone(readiness))
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"))
        .with_limits(limits);
    let addr = server
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    (addr, stop, serving)
}

async fn stop(stop: oneshot::Sender<()>, serving: JoinHandle<()>) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .unwrap_or_else(|_| panic!("server did not stop within 5 s"))
        .unwrap_or_else(|e| panic!("server task: {e}"));
}

/// One sample of the exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses `OpenMetrics` text strictly enough to catch malformed lines: every line is a comment
/// (`# HELP|TYPE|UNIT|EOF`) or `name{k="v",...} value`, and the text ends with `# EOF`.
fn parse(text: &str) -> Vec<Sample> {
    assert!(text.ends_with("# EOF\n"), "exposition must end with # EOF");
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap_or_default();
            assert!(
                ["HELP", "TYPE", "UNIT", "EOF"].contains(&kind),
                "unknown comment line {line:?}"
            );
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("no value on line {line:?}"),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name on line {line:?}"
        );
        let mut labels = BTreeMap::new();
        let value_text = if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let end = loop {
                let Some(&(start, c)) = chars.peek() else {
                    panic!("unterminated labels on {line:?}")
                };
                if c == '}' {
                    break start;
                }
                if c == ',' {
                    chars.next();
                    continue;
                }
                let mut key = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                    chars.next();
                }
                assert_eq!(
                    chars.next().map(|(_, c)| c),
                    Some('='),
                    "no = in labels on {line:?}"
                );
                assert_eq!(
                    chars.next().map(|(_, c)| c),
                    Some('"'),
                    "unquoted label value on {line:?}"
                );
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => panic!("dangling escape on {line:?}"),
                        },
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label value on {line:?}"),
                    }
                }
                assert!(
                    labels.insert(key.clone(), value).is_none(),
                    "label {key} twice on {line:?}"
                );
            };
            &inner[end + 1..]
        } else {
            rest
        };
        let value_text = value_text.trim();
        let value = value_text
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("bad value {value_text:?} on line {line:?}: {e}"));
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out
}

fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn pod(namespace: &str, workload: &str, node: &str) -> Peer {
    Peer::Pod(PodPeer {
        namespace: namespace.into(),
        name: format!("{workload}-0"),
        workload: workload.into(),
        node: Some(node.into()),
    })
}

fn flow(
    src: Peer,
    dst: Peer,
    port: u16,
    outcome: Outcome,
    verdict: AuditVerdict,
    decisions: Vec<RuleHit>,
) -> AuditedFlow {
    let initiator: SocketAddr = "10.244.0.10:40000"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
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
            outcome,
            key,
        },
        src,
        dst,
        dst_port: Some(port),
        judgement: Judgement {
            verdict: if verdict == AuditVerdict::Allowed {
                ModelVerdict::Allow
            } else {
                ModelVerdict::Deny
            },
            decisions,
        },
        verdict,
        orientation: auditor::audit::Orientation::Opening,
    }
}

fn decision(namespace: &str, name: &str, rule: &str, action: Action) -> RuleHit {
    RuleHit {
        policy: PolicyKey {
            kind: PolicyKind::NetworkPolicy,
            namespace: namespace.into(),
            name: name.into(),
        },
        direction: Direction::Ingress,
        rule: rule.into(),
        action,
    }
}

/// The classic text format (what promtool reads) of the same metrics, fetched over HTTP.
async fn scrape_text(addr: SocketAddr) -> String {
    let reply = request(
        addr,
        "GET /metrics HTTP/1.1\r\nAccept: text/plain;version=0.0.4\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers.get("content-type").map(String::as_str),
        Some(TEXT_CONTENT_TYPE)
    );
    assert!(
        !reply.body.contains("# EOF") && !reply.body.contains("# UNIT"),
        "OpenMetrics-only lines in text format"
    );
    reply.body
}

/// `promtool check metrics` (lint included) on a text-format exposition. promtool must be
/// there: a missing one fails the test rather than skipping the check.
fn promtool(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool cannot be run ({e}): install Debian's prometheus package \
                 (apt-get install prometheus, or cargo xtask setup); the exposition must be linted"
            )
        });
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("writing to promtool: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("promtool: {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{report}\n--- exposition ---\n{text}"
    );
    assert!(
        report.trim().is_empty(),
        "promtool lint findings:\n{report}"
    );
}

#[tokio::test]
async fn scrape_probes_and_series_lifecycle() {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new());
    let (addr, stopper, serving) = start(&metrics, &readiness, Limits::default()).await;

    // Before any flow: one zero-valued series per verdict and possible outcome.
    let reply = get(addr, "/metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers.get("content-type").map(String::as_str),
        Some(OPENMETRICS_CONTENT_TYPE)
    );
    let samples = parse(&reply.body);
    for verdict in AuditVerdict::ALL {
        let series = find(
            &samples,
            "flow_auditor_flows_total",
            &[("verdict", verdict.as_str())],
        );
        assert_eq!(
            series.len(),
            verdict.outcomes().len(),
            "placeholders of {verdict}: {series:?}"
        );
        assert!(
            series.iter().all(|s| s.value == 0.0),
            "placeholders must be zero: {series:?}"
        );
    }
    for source in LostSource::ALL {
        assert_eq!(
            find(
                &samples,
                "flow_auditor_lost_events_total",
                &[("source", source.as_str())]
            )
            .len(),
            1,
            "lost-events series for {} must exist from the start",
            source.as_str()
        );
    }
    for name in [
        "flow_auditor_flow_table_insert_failures_total",
        "flow_auditor_sampled_out_packets_total",
        "flow_auditor_encapsulated_packets_total",
        "flow_auditor_duplicate_packets_total",
        "flow_auditor_reported_mark_failures_total",
    ] {
        let series = find(&samples, name, &[]);
        assert_eq!(series.len(), 1, "{name} must exist from the start");
        assert_eq!(series[0].value, 0.0);
    }
    let build = find(
        &samples,
        "flow_auditor_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
    );
    assert_eq!(build.len(), 1, "build info");
    promtool(&scrape_text(addr).await);

    // Flows and health data.
    let allow = decision("db", "allow-web", "ingress[0]", Action::Allow);
    let isolate = decision("db", "allow-web", "default-deny", Action::Deny);
    let web = || pod("web", "frontend", "node-a");
    let db = || pod("db", "postgres", "node-b");
    for _ in 0..3 {
        metrics.record(&flow(
            web(),
            db(),
            5432,
            Outcome::Established,
            AuditVerdict::Allowed,
            vec![allow.clone()],
        ));
    }
    metrics.record(&flow(
        pod("monitoring", "prometheus", "node-a"),
        db(),
        5432,
        Outcome::Established,
        AuditVerdict::Unexpected,
        vec![isolate.clone()],
    ));
    metrics.record(&flow(
        web(),
        Peer::World,
        443,
        Outcome::Unanswered,
        AuditVerdict::Allowed,
        vec![],
    ));
    metrics.set_lost_events(LostSource::RingBuffer, 7);
    metrics.set_lost_events(LostSource::RingBuffer, 5); // a smaller total after a reload adds nothing
    metrics.set_flow_table_insert_failures(11);
    metrics.set_sampled_out_packets(40);
    metrics.set_flow_table(1234, 65536);
    metrics.set_attached_interfaces(HookMode::Tcx, 12);
    metrics.set_model(
        &[(PolicyKind::NetworkPolicy, 5)],
        1,
        42,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    );
    metrics.set_inventory_synced(false, SystemTime::now() - Duration::from_secs(30));

    let body = get(addr, "/metrics").await.body;
    let samples = parse(&body);
    let web_db = find(
        &samples,
        "flow_auditor_flows_total",
        &[
            ("verdict", "allowed"),
            ("outcome", "established"),
            ("src_namespace", "web"),
            ("src_workload", "frontend"),
            ("dst_namespace", "db"),
            ("dst_workload", "postgres"),
            ("protocol", "tcp"),
            ("dst_port", "5432"),
        ],
    );
    assert_eq!(web_db.len(), 1, "web -> db series: {web_db:?}");
    assert_eq!(web_db[0].value, 3.0);
    let unexpected = find(
        &samples,
        "flow_auditor_flows_total",
        &[("verdict", "unexpected"), ("src_namespace", "monitoring")],
    );
    assert_eq!(unexpected.len(), 1);
    assert_eq!(unexpected[0].value, 1.0);
    let world = find(
        &samples,
        "flow_auditor_flows_total",
        &[
            ("dst_namespace", ""),
            ("dst_workload", "world"),
            ("outcome", "unanswered"),
        ],
    );
    assert_eq!(
        world.len(),
        1,
        "non-pod peers have an empty namespace: {world:?}"
    );
    let hits = find(
        &samples,
        "flow_auditor_policy_rule_hits_total",
        &[
            ("policy_kind", "NetworkPolicy"),
            ("policy_namespace", "db"),
            ("policy_name", "allow-web"),
            ("direction", "ingress"),
            ("rule", "ingress[0]"),
            ("action", "allow"),
        ],
    );
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].value, 3.0);
    let scalar = |name: &str, labels: &[(&str, &str)]| {
        let found = find(&samples, name, labels);
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    };
    assert_eq!(
        scalar(
            "flow_auditor_lost_events_total",
            &[("source", "ring_buffer")]
        ),
        7.0
    );
    assert_eq!(
        scalar("flow_auditor_flow_table_insert_failures_total", &[]),
        11.0
    );
    assert_eq!(scalar("flow_auditor_sampled_out_packets_total", &[]), 40.0);
    assert_eq!(scalar("flow_auditor_flow_table_entries", &[]), 1234.0);
    assert_eq!(scalar("flow_auditor_flow_table_capacity", &[]), 65536.0);
    assert_eq!(
        scalar("flow_auditor_attached_interfaces", &[("mode", "tcx")]),
        12.0
    );
    assert_eq!(
        scalar("flow_auditor_policies", &[("kind", "NetworkPolicy")]),
        5.0
    );
    assert_eq!(
        scalar("flow_auditor_policies", &[("kind", "CiliumNetworkPolicy")]),
        0.0
    );
    assert_eq!(scalar("flow_auditor_policy_errors", &[]), 1.0);
    assert_eq!(scalar("flow_auditor_model_generation", &[]), 42.0);
    assert_eq!(
        scalar("flow_auditor_model_last_update_timestamp_seconds", &[]),
        1_700_000_000.0
    );
    let stale = scalar("flow_auditor_inventory_staleness_seconds", &[]);
    assert!(
        (30.0..120.0).contains(&stale),
        "staleness should be about 30 s, is {stale}"
    );
    promtool(&scrape_text(addr).await);

    // A workload goes away, then a namespace, then a policy: their series go with them.
    assert_eq!(metrics.remove_workload("monitoring", "prometheus"), 1);
    let samples = parse(&get(addr, "/metrics").await.body);
    assert!(
        find(
            &samples,
            "flow_auditor_flows_total",
            &[("src_workload", "prometheus")]
        )
        .is_empty()
    );
    assert_eq!(
        metrics.remove_namespace("db"),
        1 + 2,
        "the web -> db series and both rule series"
    );
    let samples = parse(&get(addr, "/metrics").await.body);
    assert!(
        find(
            &samples,
            "flow_auditor_flows_total",
            &[("dst_namespace", "db")]
        )
        .is_empty()
    );
    assert!(find(&samples, "flow_auditor_policy_rule_hits_total", &[]).is_empty());
    assert_eq!(
        find(
            &samples,
            "flow_auditor_flows_total",
            &[("dst_workload", "world")]
        )
        .len(),
        1
    );
    metrics.record(&flow(
        web(),
        db(),
        5432,
        Outcome::Refused,
        AuditVerdict::Denied,
        vec![isolate.clone()],
    ));
    assert_eq!(metrics.remove_policy(&isolate.policy), 1);
    let samples = parse(&get(addr, "/metrics").await.body);
    assert!(find(&samples, "flow_auditor_policy_rule_hits_total", &[]).is_empty());
    // The placeholders survive every removal.
    for verdict in AuditVerdict::ALL {
        assert_eq!(
            find(
                &samples,
                "flow_auditor_flows_total",
                &[("verdict", verdict.as_str()), ("src_workload", "")]
            )
            .len(),
            verdict.outcomes().len()
        );
    }

    // Probes and protocol edges.
    assert_eq!(get(addr, "/healthz").await.status, 200);
    let not_ready = get(addr, "/readyz").await;
    assert_eq!(not_ready.status, 503);
    assert!(
        not_ready.body.contains("not attached") && not_ready.body.contains("not loaded"),
        "{}",
        not_ready.body
    );
    readiness.set_attached(true);
    assert_eq!(
        get(addr, "/readyz").await.status,
        503,
        "ready needs the model too"
    );
    readiness.set_model_loaded(true);
    assert_eq!(get(addr, "/readyz").await.status, 200);
    assert_eq!(
        get(addr, "/metrics?x=1").await.status,
        200,
        "a query string is ignored"
    );
    assert_eq!(get(addr, "/nope").await.status, 404);
    let post = request(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(post.status, 405);
    assert_eq!(
        post.headers.get("allow").map(String::as_str),
        Some("GET, HEAD")
    );
    let head = request(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD must not send a body");
    assert_eq!(request(addr, "garbage\r\n\r\n").await.status, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(request(addr, &huge).await.status, 431);

    // Concurrent scrapes all complete.
    let scrapes: Vec<_> = (0..16)
        .map(|_| tokio::spawn(get(addr, "/metrics")))
        .collect();
    for scrape in scrapes {
        let reply = scrape.await.unwrap_or_else(|e| panic!("scrape task: {e}"));
        assert_eq!(reply.status, 200);
    }

    stop(stopper, serving).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still open after shutdown"
    );
}

#[tokio::test]
async fn bind_errors_name_the_address() {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new());
    let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    let first = Server::bind(localhost, Arc::clone(&metrics), Arc::clone(&readiness))
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let taken = first.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let err = Server::bind(taken, metrics, readiness)
        .await
        .err()
        .unwrap_or_else(|| panic!("binding a taken port must fail"));
    assert!(
        err.to_string().contains(&taken.to_string()),
        "error must name {taken}: {err}"
    );
}

/// Metrics with a few flows, rules and health figures, for the format tests.
fn busy_metrics() -> Arc<Metrics> {
    let metrics = Arc::new(Metrics::new());
    let allow = decision("db", "allow-web", "ingress[0]", Action::Allow);
    let isolate = decision("db", "allow-web", "default-deny", Action::Deny);
    metrics.record(&flow(
        pod("web", "frontend", "node-a"),
        pod("db", "postgres", "node-b"),
        5432,
        Outcome::Established,
        AuditVerdict::Allowed,
        vec![allow],
    ));
    metrics.record(&flow(
        pod("monitoring", "prometheus", "node-a"),
        pod("db", "postgres", "node-b"),
        5432,
        Outcome::Refused,
        AuditVerdict::Denied,
        vec![isolate],
    ));
    metrics.set_lost_events(LostSource::RingBuffer, 3);
    metrics.set_flow_table(10, 65536);
    metrics.set_attached_interfaces(HookMode::Clsact, 2);
    metrics.set_model(
        &[(PolicyKind::NetworkPolicy, 1)],
        0,
        2,
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500),
    );
    metrics.set_inventory_synced(false, SystemTime::now() - Duration::from_millis(1500));
    metrics
}

/// `curl -sS [-H Accept: ...] URL`: the status, the content type and the body.
fn curl(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut command = Command::new("curl");
    command.args([
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code} %{content_type}",
    ]);
    if let Some(accept) = accept {
        command.args(["-H", &format!("Accept: {accept}")]);
    }
    let out = command
        .arg(format!("http://{addr}{path}"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("curl cannot be run ({e}): apt-get install curl"));
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("not UTF-8: {e}"));
    let (body, status) = text
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status line from curl: {text:?}"));
    let (code, content_type) = status.split_once(' ').unwrap_or((status, ""));
    let code = code
        .parse()
        .unwrap_or_else(|e| panic!("bad status {code:?}: {e}"));
    (code, content_type.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_openmetrics_when_it_asks_and_the_text_format_otherwise() {
    let metrics = busy_metrics();
    let readiness = Arc::new(Readiness::new());
    let (addr, stopper, serving) = start(&metrics, &readiness, Limits::default()).await;

    let (om, text) = tokio::task::spawn_blocking(move || {
        (
            curl(
                addr,
                "/metrics",
                Some("application/openmetrics-text; version=1.0.0"),
            ),
            curl(addr, "/metrics", None),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("curl task: {e}"));

    let (status, content_type, body) = om;
    assert_eq!(status, 200);
    assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
    let samples = parse(&body);
    assert_eq!(
        find(
            &samples,
            "flow_auditor_flows_total",
            &[("verdict", "denied"), ("src_workload", "prometheus")]
        )
        .len(),
        1,
        "{body}"
    );
    assert!(body.contains("# UNIT flow_auditor_inventory_staleness_seconds seconds\n"));

    let (status, content_type, body) = text;
    assert_eq!(status, 200);
    assert_eq!(content_type, TEXT_CONTENT_TYPE);
    assert!(
        !body.contains("# EOF") && !body.contains("# UNIT"),
        "OpenMetrics-only lines in text format:\n{body}"
    );
    assert!(
        body.contains("# TYPE flow_auditor_flows_total counter\n"),
        "{body}"
    );
    promtool(&body);
    // The same samples either way (the staleness gauge moves between the two scrapes).
    let values = |text: &str| -> Vec<String> {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("flow_auditor_inventory_staleness"))
            .map(str::to_owned)
            .collect();
        lines.sort_unstable();
        lines
    };
    let openmetrics = metrics.encode(SystemTime::now(), auditor::export::Format::OpenMetrics);
    assert_eq!(values(&body), values(&openmetrics));

    stop(stopper, serving).await;
}

#[tokio::test]
async fn head_post_not_found_body_limit_and_keep_alive() {
    let metrics = busy_metrics();
    let readiness = Arc::new(Readiness::new());
    let (addr, stopper, serving) = start(&metrics, &readiness, Limits::default()).await;

    // HEAD: the headers a GET gets, without the body.
    let got = request(addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let head = request(addr, "HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD must not send a body");
    assert_eq!(
        head.headers.get("content-type"),
        got.headers.get("content-type")
    );
    let head_length: usize = head
        .headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("HEAD without content-length: {:?}", head.headers));
    // Both encode the same metrics; only the staleness gauge's digits can differ.
    assert!(
        head_length.abs_diff(got.body.len()) < 16,
        "HEAD says {head_length} bytes, GET sent {}",
        got.body.len()
    );
    let head_healthz = request(addr, "HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(head_healthz.status, 200);
    assert_eq!(
        head_healthz
            .headers
            .get("content-length")
            .map(String::as_str),
        Some("3")
    );

    // Other methods on a known path: 405 and what is allowed; an unknown path: 404.
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let reply = request(
            addr,
            &format!("{method} /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"),
        )
        .await;
        assert_eq!(reply.status, 405, "{method}");
        assert_eq!(
            reply.headers.get("allow").map(String::as_str),
            Some("GET, HEAD")
        );
    }
    let post = request(
        addr,
        "POST /readyz HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(
        post.status, 405,
        "a small body is dropped, the method refused"
    );
    assert_eq!(get(addr, "/metrics/").await.status, 404);
    assert_eq!(
        request(addr, "POST /nope HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .await
            .status,
        404
    );
    let big = request(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n",
    )
    .await;
    assert_eq!(big.status, 413);
    assert_eq!(
        big.headers.get("connection").map(String::as_str),
        Some("close")
    );

    // Keep-alive: two scrapes and a probe on one connection, then it closes when asked to.
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    for (path, accept) in [
        ("/metrics", "application/openmetrics-text"),
        ("/metrics", "text/plain"),
        ("/healthz", "*/*"),
    ] {
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: t\r\nAccept: {accept}\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let reply = read_reply(&mut stream, false).await;
        assert_eq!(reply.status, 200, "{path} on a kept-alive connection");
        assert_ne!(
            reply.headers.get("connection").map(String::as_str),
            Some("close")
        );
    }
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let last = read_reply(&mut stream, false).await;
    assert_eq!(last.status, 503);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("the connection stayed open after Connection: close"))
        .unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(n, 0, "nothing after the last response");

    stop(stopper, serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_scrapers_are_all_served() {
    let metrics = busy_metrics();
    let readiness = Arc::new(Readiness::new());
    let (addr, stopper, serving) = start(&metrics, &readiness, Limits::default()).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let scrapers: Vec<_> = (0..50)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr)
                    .await
                    .unwrap_or_else(|e| panic!("connect: {e}"));
                barrier.wait().await;
                // Two scrapes each, the second on the kept-alive connection.
                let mut bodies = Vec::new();
                for _ in 0..2 {
                    stream
                        .write_all(
                            b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: application/openmetrics-text\r\n\r\n",
                        )
                        .await
                        .unwrap_or_else(|e| panic!("send: {e}"));
                    let reply = read_reply(&mut stream, false).await;
                    assert_eq!(reply.status, 200);
                    bodies.push(reply.body);
                }
                bodies
            })
        })
        .collect();
    for scraper in scrapers {
        for body in scraper
            .await
            .unwrap_or_else(|e| panic!("scraper task: {e}"))
        {
            assert!(
                !find(&parse(&body), "flow_auditor_flows_total", &[]).is_empty(),
                "{body}"
            );
        }
    }
    stop(stopper, serving).await;
}

/// Raises this process' soft open-files limit (the test holds two descriptors per connection:
/// its own end and the server's) and makes sure it is at least `needed`.
fn enough_descriptors(needed: u64) {
    let (soft, hard) =
        auditor::export::raise_nofile_limit().unwrap_or_else(|e| panic!("RLIMIT_NOFILE: {e}"));
    assert!(
        soft >= needed,
        "this test needs {needed} open files; the limit is {soft} (hard {hard})"
    );
}

/// Opens `n` connections that each send the start of a request head and then wait.
async fn half_open(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect #{i}: {e}"));
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: text/pl")
            .await
            .unwrap_or_else(|e| panic!("send #{i}: {e}"));
        held.push(stream);
    }
    held
}

/// Whether the server closes `stream` within 5 s (a read sees the end of the stream or a
/// reset).
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0_u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// How many of `held` the server has closed (a read sees the end of the stream or a reset).
async fn closed_by_server(held: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for stream in held {
        let mut byte = [0_u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await;
        if matches!(read, Ok(Ok(0) | Err(_))) {
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_is_served_while_a_thousand_half_open_connections_are_held() {
    const HELD: usize = 1000;
    enough_descriptors(2 * HELD as u64 + 256);
    let metrics = busy_metrics();
    let readiness = Arc::new(Readiness::new());
    let (addr, stopper, serving) = start(&metrics, &readiness, Limits::default()).await;
    let mut held = half_open(addr, HELD).await;

    // A liveness bound, not a speed target (`cargo xtask bench http` measures): far below
    // Prometheus' 10 s scrape timeout, and far below what a server that serves connections
    // in turn takes behind 1,000 of them.
    let started = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(2), get(addr, "/metrics"))
        .await
        .unwrap_or_else(|_| panic!("no scrape within 2 s behind {HELD} half-open connections"));
    let took = started.elapsed();
    assert_eq!(reply.status, 200);
    assert!(!parse(&reply.body).is_empty());
    eprintln!(
        "scrape with {HELD} half-open connections held: {:.2} ms",
        took.as_secs_f64() * 1e3
    );
    assert_eq!(
        closed_by_server(&mut held).await,
        0,
        "{HELD} connections are within the default limit: none is closed"
    );
    drop(held);
    stop(stopper, serving).await;
}

#[tokio::test]
async fn past_the_connection_limit_the_longest_waiting_connection_makes_room() {
    const LIMIT: usize = 8;
    const HELD: usize = 40;
    let metrics = busy_metrics();
    let readiness = Arc::new(Readiness::new());
    let limits = Limits {
        max_connections: LIMIT,
        ..Limits::default()
    };
    let (addr, stopper, serving) = start(&metrics, &readiness, limits).await;
    let mut held = half_open(addr, HELD).await;
    let reply = tokio::time::timeout(Duration::from_secs(2), get(addr, "/metrics"))
        .await
        .unwrap_or_else(|_| panic!("no scrape within 2 s past the connection limit"));
    assert_eq!(reply.status, 200);
    // Give the closed connections' tasks a moment to run, then count.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let closed = closed_by_server(&mut held).await;
    assert!(
        closed >= HELD - LIMIT,
        "{closed} of {HELD} held connections closed with a limit of {LIMIT}"
    );
    // The oldest made room: the newest are still open.
    let mut newest = held.split_off(HELD - (LIMIT - 1));
    assert_eq!(closed_by_server(&mut newest).await, 0);
    stop(stopper, serving).await;
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed_and_kept_alive_ones_last() {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new());
    let limits = Limits {
        header_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(900),
        ..Limits::default()
    };
    let (addr, stopper, serving) = start(&metrics, &readiness, limits).await;
    let connect = || async {
        TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"))
    };
    let started = Instant::now();
    let mut slow = half_open(addr, 1).await;
    let mut silent = connect().await;
    let mut kept = connect().await;
    // The kept-alive connection asks every 500 ms: never idle for long, and longer between
    // requests than a response may take, so an answered request (HEAD too) must not leave it
    // counted as being answered.
    for method in ["GET", "HEAD", "GET", "HEAD"] {
        kept.write_all(format!("{method} /healthz HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let reply = read_reply(&mut kept, method == "HEAD").await;
        assert_eq!(reply.status, 200, "{method} on the kept-alive connection");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Liveness bounds only: both must be gone well within 5 s.
    assert!(closed(&mut slow[0]).await, "a head not finished is cut off");
    assert!(
        closed(&mut silent).await,
        "a connection that never asks is closed"
    );
    eprintln!(
        "slow head and silent connection closed, kept-alive one served, in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    stop(stopper, serving).await;
}
