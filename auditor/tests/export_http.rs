//! The metrics endpoint over real TCP: serve on 127.0.0.1:0, scrape, parse the exposition, and
//! check the flow counter, rule hits, zero-valued verdict series, series removal, the health
//! set, the probes, and (when Debian's `prometheus` package is installed) `promtool`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use auditor::audit::{AuditVerdict, AuditedFlow, Judgement, ModelVerdict, Peer, PodPeer, RuleHit};
use auditor::datapath::attach::HookMode;
use auditor::export::{
    LostSource, Metrics, OPENMETRICS_CONTENT_TYPE, Readiness, Server, TEXT_CONTENT_TYPE,
};
use auditor::flows::{FlowRecord, Outcome, PerDirection, Protocol};
use auditor::policy::ir::{Action, Direction, PolicyKey, PolicyKind};
use auditor_ebpf::flow::{FlowKey, Hook, proto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
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
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .unwrap_or_else(|_| panic!("no complete response within 10 s to {raw:?}"))
        .unwrap_or_else(|e| panic!("read: {e}"));
    let text = String::from_utf8(bytes).unwrap_or_else(|e| panic!("response is not UTF-8: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect::<BTreeMap<_, _>>();
    if let Some(len) = headers.get("content-length") {
        let len: usize = len
            .parse()
            .unwrap_or_else(|e| panic!("bad content-length {len}: {e}"));
        if !raw.starts_with("HEAD ") {
            assert_eq!(len, body.len(), "content-length disagrees with the body");
        }
    }
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
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

/// One sample of the exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses OpenMetrics text strictly enough to catch malformed lines: every line is a comment
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

/// `promtool check metrics` (lint included) on a text-format exposition, when promtool is
/// installed.
fn promtool(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed (apt-get install prometheus): exposition not linted");
        return;
    };
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
    let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    let server = Server::bind(localhost, Arc::clone(&metrics), Arc::clone(&readiness))
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = server
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));

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

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .unwrap_or_else(|_| panic!("server did not stop within 5 s"))
        .unwrap_or_else(|e| panic!("server task: {e}"));
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
