//! `auditor run` end to end: the real binary in a node namespace with two pods behind `cali*`
//! veths (Calico-style host routing), a snapshot cluster naming those pods, real TCP and UDP
//! traffic, and `/metrics` scraped over TCP. Checks exact flow counts, a `--policies` change
//! taking effect without a restart, a bad policy file keeping the last good policies, and that
//! nothing stays attached after SIGTERM or after a SIGKILL followed by a new start.
#![expect(
    clippy::float_cmp,
    reason = "metric samples compared here are whole counts, which an f64 holds exactly"
)]

#[path = "common/apiserver.rs"]
mod apiserver;
#[path = "common/hooks.rs"]
mod hooks;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/tempdir.rs"]
mod tempdir;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};
use tempdir::TempDir;

use apiserver::ApiServer;
use netns::{Netns, flows_total, require_root, sample};
use serde_json::{Value, json};

const POD_A: &str = "192.0.2.10";
const POD_B: &str = "192.0.2.20";
const METRICS: &str = "127.0.0.1:19925";

/// A node namespace with pod A (`web/frontend`) and pod B (`db/postgres`), each behind a
/// `cali*` veth with a /32 route, as Calico wires them.
struct Cluster {
    node: Netns,
    pod_a: Netns,
    pod_b: Netns,
}

impl Cluster {
    fn new() -> Self {
        let node = Netns::new("dnode");
        let pod_a = Netns::new("dpoda");
        let pod_b = Netns::new("dpodb");
        node.sysctl("net.ipv4.ip_forward", "1");
        for (pod, cali, addr, n) in [(&pod_a, "caliA", POD_A, 1), (&pod_b, "caliB", POD_B, 2)] {
            netns::calico_pod(&node, pod, cali, addr, n);
        }
        Self { node, pod_a, pod_b }
    }
}

const CLUSTER_YAML: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {kubernetes.io/metadata.name: web}}
---
apiVersion: v1
kind: Namespace
metadata: {name: db, labels: {kubernetes.io/metadata.name: db}}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
spec: {podCIDR: 192.0.2.0/24}
status:
  addresses: [{type: InternalIP, address: 198.51.100.1}]
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: web, labels: {app: frontend}}
spec:
  nodeName: node-1
  containers: [{name: app, image: x}]
status: {podIP: 192.0.2.10, podIPs: [{ip: 192.0.2.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: postgres, namespace: db, labels: {app: postgres}}
spec:
  nodeName: node-1
  containers:
  - name: db
    image: x
    ports: [{containerPort: 5432}, {containerPort: 5353, protocol: UDP}]
status: {podIP: 192.0.2.20, podIPs: [{ip: 192.0.2.20}]}
";

/// db accepts TCP 5432 from web only: UDP 5353 is denied by intent.
const POLICY_TCP_ONLY: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: postgres-ingress, namespace: db}
spec:
  podSelector: {matchLabels: {app: postgres}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: web}}}]
    ports: [{port: 5432}]
";

/// The same policy, now also allowing UDP 5353.
const POLICY_TCP_UDP: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: postgres-ingress, namespace: db}
spec:
  podSelector: {matchLabels: {app: postgres}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: web}}}]
    ports: [{port: 5432}, {port: 5353, protocol: UDP}]
";

/// The auditor daemon inside the node namespace; killed on drop if still running.
struct Daemon {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    fn start(node: &Netns, dir: &TempDir, extra: &[&str], tag: &str) -> Self {
        Self::start_with_env(node, dir, extra, tag, &[])
    }

    fn start_with_env(
        node: &Netns,
        dir: &TempDir,
        extra: &[&str],
        tag: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let stdout = dir.0.join(format!("{tag}.stdout"));
        let stderr = dir.0.join(format!("{tag}.stderr"));
        let file =
            |p: &Path| std::fs::File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut args = vec![
            "netns",
            "exec",
            node.name(),
            env!("CARGO_BIN_EXE_auditor"),
            "run",
            "--interfaces",
            "cali*",
            "--metrics-addr",
            METRICS,
            "--answer-timeout",
            "1s",
            "--node",
            "node-1",
            // Restarts with pinned tables are tests/restart.rs'; these leave nothing pinned.
            "--pin-dir",
            "none",
        ];
        args.extend_from_slice(extra);
        // `ip netns exec` execs the binary in place: the child's pid is the daemon's.
        let child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(file(&stdout))
            .stderr(file(&stderr))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the daemon: {e}"));
        Self {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        let child = self.child.as_ref().unwrap_or_else(|| panic!("daemon gone"));
        i32::try_from(child.id()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until `/readyz` says 200, at most 20 s.
    fn wait_ready(&mut self, node: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the daemon exited ({status}) before ready:\n{}", self.log());
            }
            if get(node, "/readyz").is_some_and(|(status, _)| status == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon was not ready within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert!(rc == 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the exit, at most `limit`; returns the status and how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let mut child = self.child.take().unwrap_or_else(|| panic!("daemon gone"));
        loop {
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
                return (status, started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon did not exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET path` against the daemon in the node namespace: (status, body).
fn get(node: &Netns, path: &str) -> Option<(u16, String)> {
    node.http_get(METRICS, path)
}

fn scrape(node: &Netns) -> String {
    match get(node, "/metrics") {
        Some((200, body)) => body,
        other => panic!("scrape failed: {other:?}"),
    }
}

fn flow_series(verdict: &str, outcome: &str, protocol: &str, port: &str) -> String {
    format!(
        "flow_auditor_flows_total{{verdict=\"{verdict}\",outcome=\"{outcome}\",\
         src_namespace=\"web\",src_workload=\"frontend\",dst_namespace=\"db\",\
         dst_workload=\"postgres\",protocol=\"{protocol}\",dst_port=\"{port}\"}}"
    )
}

/// Scrapes until `done` holds, at most 15 s; returns the last scrape.
fn wait_metrics(node: &Netns, daemon: &Daemon, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = scrape(node);
        if done(&metrics) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last scrape:\n{}\ndaemon log:\n{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("flow_auditor_flows_total")
                    || l.starts_with("flow_auditor_model")
                    || l.starts_with("flow_auditor_policy_errors"))
                .collect::<Vec<_>>()
                .join("\n"),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), port)
}

/// One TCP connection A -> B:5432 with a request and an answer.
fn tcp_exchange(cluster: &Cluster, listener: &TcpListener) {
    let mut client = cluster.pod_a.run(|| {
        TcpStream::connect_timeout(&addr(POD_B, 5432), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("TCP connect A -> B:5432: {e}"))
    });
    let (mut server, _) = listener.accept().unwrap_or_else(|e| panic!("accept: {e}"));
    client
        .write_all(b"ping")
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut buf = [0u8; 4];
    server
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("read: {e}"));
    server
        .write_all(b"pong")
        .unwrap_or_else(|e| panic!("write: {e}"));
    client
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("read: {e}"));
}

/// One UDP request and reply A -> B:5353, from a fresh client port (a new flow).
fn udp_exchange(cluster: &Cluster, server: &UdpSocket) {
    let client = cluster
        .pod_a
        .run(|| UdpSocket::bind(addr(POD_A, 0)).unwrap_or_else(|e| panic!("{e}")));
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    client
        .send_to(b"query", addr(POD_B, 5353))
        .unwrap_or_else(|e| panic!("send: {e}"));
    let mut buf = [0u8; 16];
    let (n, from) = server
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("server recv: {e}"));
    server
        .send_to(&buf[..n], from)
        .unwrap_or_else(|e| panic!("reply: {e}"));
    client
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("client recv: {e}"));
}

/// TCP A -> B:9, a closed port: refused by a RST.
fn tcp_refused(cluster: &Cluster) {
    cluster.pod_a.run(|| {
        match TcpStream::connect_timeout(&addr(POD_B, 9), Duration::from_secs(5)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            other => panic!("TCP to a closed port should be refused, got {other:?}"),
        }
    });
}

/// Our programs on `ifname` in `ns`: how many are attached by TCX (both directions; none on a
/// kernel without TCX) and whether a clsact filter of ours is listed.
fn attached(ns: &Netns, ifname: &str) -> (usize, bool) {
    let (tcx_in, tcx_out) = hooks::tcx_programs(ns, ifname);
    let (cls_in, cls_out) = hooks::clsact_programs(ns, ifname);
    (
        tcx_in.len() + tcx_out.len(),
        !cls_in.is_empty() || !cls_out.is_empty(),
    )
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn daemon_counts_flows_exactly_and_follows_policy_changes() {
    require_root();
    let cluster = Cluster::new();
    let dir = TempDir::new("counts");
    let cluster_dir = dir.0.join("cluster");
    let policies_dir = dir.0.join("policies");
    dir.write("cluster/cluster.yaml", CLUSTER_YAML);
    dir.write("policies/postgres.yaml", POLICY_TCP_ONLY);
    let mut daemon = Daemon::start(
        &cluster.node,
        &dir,
        &[
            "--cluster",
            &cluster_dir.display().to_string(),
            "--policies",
            &policies_dir.display().to_string(),
        ],
        "counts",
    );
    daemon.wait_ready(&cluster.node);

    // Zero-valued series exist from the start, so alerts work before the first flow.
    let first = scrape(&cluster.node);
    assert!(
        first.contains("flow_auditor_flows_total{verdict=\"unexpected\",outcome=\"established\","),
        "no zero-valued unexpected series:\n{first}"
    );
    assert_eq!(
        flows_total(&first),
        0.0,
        "flows counted before any traffic:\n{first}"
    );
    assert_eq!(
        sample(&first, "flow_auditor_policies{kind=\"NetworkPolicy\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &first,
            &format!(
                "flow_auditor_attached_interfaces{{mode=\"{}\"}}",
                hooks::expected_mode(&cluster.node)
            )
        ),
        2.0
    );
    let generation = sample(&first, "flow_auditor_model_generation");

    let listener = cluster
        .pod_b
        .run(|| TcpListener::bind(addr(POD_B, 5432)).unwrap_or_else(|e| panic!("bind: {e}")));
    let udp_server = cluster
        .pod_b
        .run(|| UdpSocket::bind(addr(POD_B, 5353)).unwrap_or_else(|e| panic!("bind: {e}")));
    udp_server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));

    tcp_exchange(&cluster, &listener);
    tcp_exchange(&cluster, &listener);
    udp_exchange(&cluster, &udp_server);
    tcp_refused(&cluster);

    let allowed_tcp = flow_series("allowed", "established", "tcp", "5432");
    let unexpected_udp = flow_series("unexpected", "established", "udp", "5353");
    let denied_tcp = flow_series("denied", "refused", "tcp", "other");
    let allowed_udp = flow_series("allowed", "established", "udp", "5353");
    let metrics = wait_metrics(&cluster.node, &daemon, "4 flows", |m| flows_total(m) >= 4.0);
    // Each flow crossed two attached interfaces (caliA ingress, caliB egress): counted once.
    assert_eq!(sample(&metrics, &allowed_tcp), 2.0, "{metrics}");
    assert_eq!(sample(&metrics, &unexpected_udp), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, &denied_tcp), 1.0, "{metrics}");
    // Settle past the answer timeout and a table walk: nothing else may turn up.
    std::thread::sleep(Duration::from_secs(3));
    let metrics = scrape(&cluster.node);
    assert_eq!(
        flows_total(&metrics),
        4.0,
        "extra flows counted:\n{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "flow_auditor_policy_rule_hits_total{policy_kind=\"NetworkPolicy\",\
             policy_namespace=\"db\",policy_name=\"postgres-ingress\",direction=\"ingress\",\
             rule=\"ingress[0]\",action=\"allow\"}"
        ),
        2.0,
        "rule hits of the allowing rule:\n{metrics}"
    );

    // The unexpected flow was logged once, as JSON naming its peers and the denying policy.
    let stdout = std::fs::read_to_string(&daemon.stdout).unwrap_or_default();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 1, "one unexpected-flow line: {stdout}");
    let line = &lines[0];
    assert_eq!(line["verdict"], "unexpected", "{line}");
    assert_eq!(line["src"]["namespace"], "web", "{line}");
    assert_eq!(line["src"]["pod"], "frontend", "{line}");
    assert_eq!(line["dst"]["workload"], "postgres", "{line}");
    assert_eq!(line["dst"]["port"], 5353, "{line}");
    assert_eq!(line["protocol"], "UDP", "{line}");
    assert!(
        line["denied_by"].to_string().contains("postgres-ingress"),
        "the denying policy is named: {line}"
    );

    // A policy change reaches the verdicts of the next flows without a restart.
    dir.write("policies/postgres.yaml", POLICY_TCP_UDP);
    let metrics = wait_metrics(&cluster.node, &daemon, "the policy reload", |m| {
        sample(m, "flow_auditor_model_generation") > generation
    });
    let generation = sample(&metrics, "flow_auditor_model_generation");
    udp_exchange(&cluster, &udp_server);
    let metrics = wait_metrics(&cluster.node, &daemon, "the allowed UDP flow", |m| {
        flows_total(m) >= 5.0
    });
    assert_eq!(sample(&metrics, &allowed_udp), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, &unexpected_udp), 1.0, "{metrics}");
    assert_eq!(
        sample(&metrics, "flow_auditor_policy_errors"),
        0.0,
        "{metrics}"
    );

    // A bad file: the last good policies stay, the error is counted and logged with its file.
    dir.write("policies/broken.yaml", "kind: NetworkPolicy\nmetadata: [\n");
    let metrics = wait_metrics(&cluster.node, &daemon, "the policy error", |m| {
        sample(m, "flow_auditor_policy_errors") >= 1.0
    });
    assert_eq!(
        sample(&metrics, "flow_auditor_policy_errors"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "flow_auditor_model_generation"),
        generation,
        "a bad file must not change the model"
    );
    assert!(
        daemon.log().contains("broken.yaml:"),
        "the error names the file and line:\n{}",
        daemon.log()
    );
    udp_exchange(&cluster, &udp_server);
    let metrics = wait_metrics(&cluster.node, &daemon, "the sixth flow", |m| {
        flows_total(m) >= 6.0
    });
    assert_eq!(
        sample(&metrics, &allowed_udp),
        2.0,
        "last good policies used:\n{metrics}"
    );

    // SIGTERM: exit 0 within 5 s, nothing left attached.
    daemon.signal(libc::SIGTERM);
    let (status, took) = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}:\n{}", daemon.log());
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    for ifname in ["caliA", "caliB"] {
        assert_eq!(
            attached(&cluster.node, ifname),
            (0, false),
            "{ifname}: something stayed attached"
        );
    }
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn after_sigkill_the_next_start_cleans_up() {
    require_root();
    let cluster = Cluster::new();
    let dir = TempDir::new("kill");
    let cluster_file = dir.write("cluster.yaml", CLUSTER_YAML);
    // clsact filters outlive their process (TCX links do not): the hard case.
    let config = dir.write("config.yaml", "attachMode: clsact\n");
    let args = [
        "--cluster",
        &cluster_file.display().to_string(),
        "--config",
        &config.display().to_string(),
    ]
    .map(std::borrow::ToOwned::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let mut first = Daemon::start(&cluster.node, &dir, &args, "first");
    first.wait_ready(&cluster.node);
    assert_eq!(
        attached(&cluster.node, "caliA"),
        (0, true),
        "clsact filter while running"
    );
    first.signal(libc::SIGKILL);
    let (status, _) = first.wait_exit(Duration::from_secs(5));
    assert!(!status.success(), "SIGKILL is not a clean exit: {status}");
    assert_eq!(
        attached(&cluster.node, "caliA"),
        (0, true),
        "the killed instance's clsact filter stays until the next start"
    );

    let mut second = Daemon::start(&cluster.node, &dir, &args, "second");
    second.wait_ready(&cluster.node);
    assert!(
        second
            .log()
            .contains("removed clsact filters left by an earlier instance"),
        "the second instance removed the leftovers:\n{}",
        second.log()
    );
    // Exactly one filter per direction now: ours, not the dead instance's as well.
    for dir_name in ["ingress", "egress"] {
        let filters = cluster
            .node
            .output(&["tc", "filter", "show", "dev", "caliA", dir_name]);
        assert_eq!(
            filters
                .lines()
                .filter(|l| l.contains("flow_auditor"))
                .count(),
            1,
            "caliA {dir_name}: {filters}"
        );
    }
    second.signal(libc::SIGTERM);
    let (status, took) = second.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}:\n{}", second.log());
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    for ifname in ["caliA", "caliB"] {
        assert_eq!(
            attached(&cluster.node, ifname),
            (0, false),
            "{ifname}: something stayed attached"
        );
    }
}

#[test]
fn bad_input_exits_2_naming_the_file_before_attaching() {
    let dir = TempDir::new("bad");
    let cluster = dir.write("cluster.yaml", CLUSTER_YAML);
    let bad = dir.write("policies/bad.yaml", "kind: NetworkPolicy\nmetadata: [\n");
    let out = Command::new(env!("CARGO_BIN_EXE_auditor"))
        .args([
            "run",
            "--cluster",
            &cluster.display().to_string(),
            "--policies",
            &bad.parent()
                .unwrap_or_else(|| panic!("no parent"))
                .display()
                .to_string(),
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap_or_else(|e| panic!("run: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {stderr}");
    assert!(stderr.contains("bad.yaml:"), "names the file: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout");

    let out = Command::new(env!("CARGO_BIN_EXE_auditor"))
        .args(["run", "--metrics-addr", "127.0.0.1:0"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap_or_else(|e| panic!("run: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "no source: {stderr}");
    assert!(
        stderr.contains("--cluster"),
        "says what is missing: {stderr}"
    );

    for (flag, value, says) in [
        ("--pin-dir", "relative/pins", "absolute path"),
        ("--idle-timeout", "0s", "at least 1s"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_auditor"))
            .args(["run", "--cluster", &cluster.display().to_string()])
            .args(["--metrics-addr", "127.0.0.1:0", flag, value])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap_or_else(|e| panic!("run: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.contains("error")).count(),
            1,
            "one clear error: {stderr}"
        );
    }
}

fn netpol(udp: bool) -> Value {
    let mut ports = vec![json!({"port": 5432, "protocol": "TCP"})];
    if udp {
        ports.push(json!({"port": 5353, "protocol": "UDP"}));
    }
    json!({
        "metadata": {"namespace": "db", "name": "postgres-ingress"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "postgres"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}}}],
                "ports": ports,
            }],
        },
    })
}

fn kube_pod(namespace: &str, name: &str, ip: &str, ports: &Value) -> Value {
    json!({
        "metadata": {"namespace": namespace, "name": name, "labels": {"app": name}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// `--kube` against an in-process API server (list/watch over HTTP) in the node namespace: the
/// inventory and policies come from the API, a policy change through the API changes the next
/// verdicts, and when the API goes away the last good model stays and staleness is reported.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn daemon_follows_the_kubernetes_api() {
    require_root();
    let cluster = Cluster::new();
    let dir = TempDir::new("kube");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let ns_path = format!("/var/run/netns/{}", cluster.node.name());
    // The daemon runs in the node namespace: the API server listens on its loopback.
    let bind: apiserver::Bind = Box::new(move |addr| {
        let path = ns_path.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: a valid namespace fd; setns affects only this short-lived thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert!(rc == 0, "setns: {}", std::io::Error::last_os_error());
            apiserver::bind_here(addr)
        })
        .join()
        .unwrap_or_else(|_| panic!("binding in the node namespace panicked"))
    });
    let server: ApiServer = runtime.block_on(ApiServer::start_with(bind));
    let ns = |name: &str| json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}});
    server.apply(apiserver::NAMESPACES, ns("web"));
    server.apply(apiserver::NAMESPACES, ns("db"));
    server.apply(
        apiserver::NODES,
        json!({
            "metadata": {"name": "node-1"},
            "spec": {"podCIDR": "192.0.2.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.1"}]},
        }),
    );
    server.apply(
        apiserver::PODS,
        kube_pod("web", "frontend", POD_A, &json!([])),
    );
    server.apply(
        apiserver::PODS,
        kube_pod(
            "db",
            "postgres",
            POD_B,
            &json!([{"containerPort": 5432}, {"containerPort": 5353, "protocol": "UDP"}]),
        ),
    );
    server.apply(apiserver::NETWORK_POLICIES, netpol(false));
    let kubeconfig = dir.write(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: t, user: {{}}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: t}}}}]\n\
             current-context: t\n",
            server.url()
        ),
    );
    let kubeconfig = kubeconfig.display().to_string();
    let mut daemon = Daemon::start_with_env(
        &cluster.node,
        &dir,
        &["--kube"],
        "kube",
        &[("KUBECONFIG", &kubeconfig)],
    );
    daemon.wait_ready(&cluster.node);
    let first = scrape(&cluster.node);
    assert_eq!(
        sample(&first, "flow_auditor_policies{kind=\"NetworkPolicy\"}"),
        1.0,
        "{first}"
    );
    assert_eq!(
        sample(&first, "flow_auditor_inventory_staleness_seconds"),
        0.0,
        "{first}"
    );

    let udp_server = cluster
        .pod_b
        .run(|| UdpSocket::bind(addr(POD_B, 5353)).unwrap_or_else(|e| panic!("bind: {e}")));
    udp_server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    let unexpected_udp = flow_series("unexpected", "established", "udp", "5353");
    let allowed_udp = flow_series("allowed", "established", "udp", "5353");

    udp_exchange(&cluster, &udp_server);
    let metrics = wait_metrics(&cluster.node, &daemon, "the first flow", |m| {
        flows_total(m) >= 1.0
    });
    assert_eq!(sample(&metrics, &unexpected_udp), 1.0, "{metrics}");
    let generation = sample(&metrics, "flow_auditor_model_generation");

    // The policy changes in the API: the next flow is judged by the new version.
    server.apply(apiserver::NETWORK_POLICIES, netpol(true));
    wait_metrics(&cluster.node, &daemon, "the watched policy change", |m| {
        sample(m, "flow_auditor_model_generation") > generation
    });
    udp_exchange(&cluster, &udp_server);
    let metrics = wait_metrics(&cluster.node, &daemon, "the second flow", |m| {
        flows_total(m) >= 2.0
    });
    assert_eq!(sample(&metrics, &allowed_udp), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, &unexpected_udp), 1.0, "{metrics}");

    // The API goes away: staleness grows, the last good model keeps judging.
    runtime.block_on(server.stop());
    wait_metrics(&cluster.node, &daemon, "the staleness gauge", |m| {
        sample(m, "flow_auditor_inventory_staleness_seconds") > 0.0
    });
    udp_exchange(&cluster, &udp_server);
    let metrics = wait_metrics(&cluster.node, &daemon, "the third flow", |m| {
        flows_total(m) >= 3.0
    });
    assert_eq!(
        sample(&metrics, &allowed_udp),
        2.0,
        "last good model used:\n{metrics}"
    );
    assert_eq!(
        get(&cluster.node, "/readyz").map(|(s, _)| s),
        Some(200),
        "still ready"
    );

    daemon.signal(libc::SIGTERM);
    let (status, took) = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}:\n{}", daemon.log());
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
}
