//! The daemon's event loop without a kernel: the real daemon (snapshot files watched, the audit,
//! the metrics endpoint) driven by the fake datapath, as an ordinary unprivileged test. Flows are
//! opened, answered or left unanswered on the fake, and counted through `/metrics`; a policy
//! edited on disk changes the next verdict while flows keep being read. And the join window: a
//! UDP conversation whose server speaks first, oriented by evidence when no tables were adopted
//! and the window is open, by its first packet otherwise.
#![expect(
    clippy::float_cmp,
    reason = "metric samples compared here are whole counts, which an f64 holds exactly"
)]

#[path = "common/tempdir.rs"]
mod tempdir;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tempdir::TempDir;

use auditor::daemon::{Daemon, RunArgs};
use auditor::flows::fake::{FakeDatapath, Peer};
use auditor_ebpf::flow::proto;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;

/// Every wait in this test is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

const CLUSTER: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {kubernetes.io/metadata.name: web}}
---
apiVersion: v1
kind: Namespace
metadata: {name: db, labels: {kubernetes.io/metadata.name: db}}
---
apiVersion: v1
kind: Namespace
metadata: {name: tools, labels: {kubernetes.io/metadata.name: tools}}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.0.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: web, labels: {app: frontend}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: probe, namespace: tools, labels: {app: probe}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.0.30}
---
apiVersion: v1
kind: Pod
metadata: {name: postgres, namespace: db, labels: {app: postgres}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 5432}]}]}
status: {podIP: 10.244.0.20}
";

fn policy(from: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: db-from, namespace: db}}\n\
         spec:\n  podSelector: {{}}\n  ingress:\n  - from:\n    - namespaceSelector: \
         {{matchLabels: {{kubernetes.io/metadata.name: {from}}}}}\n    ports: [{{port: 5432}}]\n"
    )
}

fn args(cluster: &Path) -> RunArgs {
    RunArgs {
        kube: false,
        cluster: vec![cluster.to_path_buf()],
        policies: None,
        interfaces: Vec::new(),
        uplink: Vec::new(),
        config: None,
        metrics_addr: "127.0.0.1:0"
            .parse()
            .unwrap_or_else(|e| panic!("address: {e}")),
        answer_timeout: Some(Duration::from_secs(2)),
        node: Some("n1".to_owned()),
        kernel_log: false,
        idle_timeout: None,
        // The fake datapath has no tables to pin.
        pin_dir: Some(auditor::config::PinDir::Off),
    }
}

async fn metrics(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .write_all(
            b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap_or_else(|e| panic!("request: {e}"));
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .unwrap_or_else(|e| panic!("response: {e}"));
    response
        .split_once("\r\n\r\n")
        .map_or_else(String::new, |(_, body)| body.to_owned())
}

/// The value of one `flow_auditor_flows_total` series picked by its label values.
fn count(text: &str, verdict: &str, outcome: &str, src: &str) -> f64 {
    let wanted = [
        format!("verdict=\"{verdict}\""),
        format!("outcome=\"{outcome}\""),
        format!("src_workload=\"{src}\""),
        "dst_workload=\"postgres\"".to_owned(),
    ];
    text.lines()
        .filter(|l| l.starts_with("flow_auditor_flows_total{"))
        .filter(|l| wanted.iter().all(|w| l.contains(w.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Scrapes until `done` holds; panics naming `what` after [`WAIT`].
async fn until(addr: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = metrics(addr).await;
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {WAIT:?}; metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_audits_a_fake_datapath_and_follows_policy_edits() {
    let dir = TempDir::new("daemon-loop");
    dir.write("cluster.yaml", CLUSTER);
    dir.write("policy.yaml", &policy("web"));
    let daemon = Daemon::start(&args(&dir.0))
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    let addr = daemon.metrics_addr();
    let fake = FakeDatapath::with_interfaces(&[(7, "cali0")]);
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(daemon.run(fake.clone(), async move {
        let _ = stopped.await;
        "test over"
    }));
    let socket = |text: &str| -> SocketAddr {
        text.parse()
            .unwrap_or_else(|e| panic!("socket {text}: {e}"))
    };
    let pg = socket("10.244.0.20:5432");

    // Allowed and answered; forbidden and answered (the policy is not enforced: unexpected);
    // forbidden and never answered.
    let web = fake.open(proto::TCP, socket("10.244.0.10:40000"), pg, 7);
    fake.send(&web, Peer::Responder);
    let probe = fake.open(proto::TCP, socket("10.244.0.30:40001"), pg, 7);
    fake.send(&probe, Peer::Responder);
    fake.open(proto::TCP, socket("10.244.0.30:40002"), pg, 7);
    fake.advance(Duration::from_secs(3));
    let text = until(addr, "three flows counted", |t| {
        count(t, "allowed", "established", "frontend") == 1.0
            && count(t, "unexpected", "established", "probe") == 1.0
            && count(t, "denied", "unanswered", "probe") == 1.0
    })
    .await;
    let generation = sample(&text, "flow_auditor_model_generation");

    // The policy now admits tools too; the file watcher reloads it off the pipeline.
    dir.write("policy.yaml", &policy("tools"));
    until(addr, "policy reloaded", |t| {
        sample(t, "flow_auditor_model_generation") > generation
    })
    .await;
    let again = fake.open(proto::TCP, socket("10.244.0.30:40003"), pg, 7);
    fake.send(&again, Peer::Responder);
    until(addr, "the edited policy decides", |t| {
        count(t, "allowed", "established", "probe") == 1.0
    })
    .await;
    // A broken edit keeps the last good policy and says so, until it is fixed.
    dir.write("policy.yaml", "kind: NetworkPolicy\nmetadata: [\n");
    until(addr, "policy error reported", |t| {
        sample(t, "flow_auditor_policy_errors") == 1.0
    })
    .await;
    dir.write("policy.yaml", &policy("tools"));
    until(addr, "policy error cleared", |t| {
        sample(t, "flow_auditor_policy_errors") == 0.0
    })
    .await;

    let _ = stop.send(());
    let stopped = match tokio::time::timeout(WAIT, running).await {
        Ok(Ok(Ok(stopped))) => stopped,
        Ok(Ok(Err(e))) => panic!("daemon: {e}"),
        Ok(Err(e)) => panic!("daemon task: {e}"),
        Err(tokio::time::error::Elapsed { .. }) => {
            panic!("the daemon did not stop within {WAIT:?}")
        }
    };
    assert_eq!(stopped.counted, 4, "every flow counted once");
    assert!(stopped.source.is_shut_down(), "the datapath was detached");
}

/// A DNS server declaring UDP 53, and a policy isolating the frontend's ingress: a conversation
/// frontend -> dns:53 is allowed, the same seen the wrong way round (dns -> frontend) denied.
const DNS: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: tools, labels: {app: dns}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 53, protocol: UDP}]}]}
status: {podIP: 10.244.0.53}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-no-ingress, namespace: web}
spec:
  podSelector: {matchLabels: {app: frontend}}
  policyTypes: [Ingress]
";

/// The `flow_auditor_flows_total` series of UDP flows `src` -> `dst` with `verdict`.
fn udp_count(text: &str, verdict: &str, src: &str, dst: &str) -> f64 {
    let wanted = [
        format!("verdict=\"{verdict}\""),
        format!("src_workload=\"{src}\""),
        format!("dst_workload=\"{dst}\""),
        "protocol=\"udp\"".to_owned(),
    ];
    text.lines()
        .filter(|l| l.starts_with("flow_auditor_flows_total{"))
        .filter(|l| wanted.iter().all(|w| l.contains(w.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs the daemon on a fake whose tables pass for adopted (or not), with a 10 s idle timeout;
/// the server dns:53 speaks first to the frontend, which answers; then, past the window, the
/// same again from another frontend port. Returns the metrics after each.
async fn server_speaks_first(adopted: bool) -> (String, String) {
    let dir = TempDir::new(if adopted {
        "join-adopted"
    } else {
        "join-fresh"
    });
    dir.write("cluster.yaml", CLUSTER);
    dir.write("dns.yaml", DNS);
    let mut args = args(&dir.0);
    args.idle_timeout = Some(Duration::from_secs(10));
    let daemon = Daemon::start(&args)
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    let addr = daemon.metrics_addr();
    let fake = FakeDatapath::with_interfaces(&[(7, "cali0")]);
    fake.set_tables_adopted(adopted);
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(daemon.run(fake.clone(), async move {
        let _ = stopped.await;
        "test over"
    }));
    let socket = |text: &str| -> SocketAddr {
        text.parse()
            .unwrap_or_else(|e| panic!("socket {text}: {e}"))
    };
    let dns = socket("10.244.0.53:53");
    let counted = |t: &str| {
        udp_count(t, "allowed", "frontend", "dns") + udp_count(t, "unexpected", "dns", "frontend")
    };
    // The fake's first packet is the server's: it is what the datapath takes for the initiator.
    let joined = fake.open(proto::UDP, dns, socket("10.244.0.10:41000"), 7);
    fake.send(&joined, Peer::Responder);
    let in_window = until(addr, "the joined conversation", |t| counted(t) == 1.0).await;
    fake.advance(Duration::from_secs(11));
    let later = fake.open(proto::UDP, dns, socket("10.244.0.10:41001"), 7);
    fake.send(&later, Peer::Responder);
    let after_window = until(addr, "the later conversation", |t| counted(t) == 2.0).await;
    let _ = stop.send(());
    match tokio::time::timeout(WAIT, running).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => panic!("daemon: {e}"),
        Ok(Err(e)) => panic!("daemon task: {e}"),
        Err(tokio::time::error::Elapsed { .. }) => {
            panic!("the daemon did not stop within {WAIT:?}")
        }
    }
    (in_window, after_window)
}

/// No tables adopted: in the window the conversation is oriented by the port dns declares
/// (frontend -> dns, allowed); past it, by its first packet (dns -> frontend, unexpected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_adopted_tables_udp_is_oriented_by_evidence_in_the_join_window() {
    let (in_window, after_window) = server_speaks_first(false).await;
    assert_eq!(
        (
            udp_count(&in_window, "allowed", "frontend", "dns"),
            udp_count(&in_window, "unexpected", "dns", "frontend")
        ),
        (1.0, 0.0),
        "{in_window}"
    );
    assert_eq!(
        udp_count(&after_window, "unexpected", "dns", "frontend"),
        1.0,
        "{after_window}"
    );
}

/// Tables adopted: there is no join window, the first packet's sender is the initiator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_adopted_tables_udp_keeps_the_first_packet_rule() {
    let (in_window, after_window) = server_speaks_first(true).await;
    assert_eq!(
        udp_count(&in_window, "unexpected", "dns", "frontend"),
        1.0,
        "{in_window}"
    );
    assert_eq!(
        udp_count(&after_window, "unexpected", "dns", "frontend"),
        2.0,
        "{after_window}"
    );
}
