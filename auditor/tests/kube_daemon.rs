//! `auditor run --kube` end to end: the real binary in a node namespace, its inventory and
//! policies from the in-process API server (bound inside that namespace, reached through a
//! kubeconfig), real UDP flows between two pods behind `cali*` veths, `/metrics` scraped over TCP.
//! Checks that a policy changed in the API changes the verdict of the next flow, and that an
//! unreachable API keeps the last model while the staleness gauge says so.
#![expect(
    clippy::float_cmp,
    reason = "metric samples compared here are whole counts, which an f64 holds exactly"
)]

#[path = "common/apiserver.rs"]
mod apiserver;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/tempdir.rs"]
mod tempdir;

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempdir::TempDir;

use apiserver::ApiServer;
use netns::{Netns, require_root, sample};
use serde_json::{Value, json};

const POD_A: &str = "192.0.2.10";
const POD_B: &str = "192.0.2.20";
const METRICS: &str = "127.0.0.1:19947";
/// Every wait here is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

/// A node namespace with pod A (`web/frontend`) and pod B (`db/postgres`), each behind a
/// `cali*` veth with a /32 route, as Calico wires them.
struct Cluster {
    node: Netns,
    pod_a: Netns,
    pod_b: Netns,
}

impl Cluster {
    fn new() -> Self {
        let node = Netns::new("knode");
        let pod_a = Netns::new("kpoda");
        let pod_b = Netns::new("kpodb");
        node.sysctl("net.ipv4.ip_forward", "1");
        for (pod, cali, addr, n) in [(&pod_a, "caliA", POD_A, 1), (&pod_b, "caliB", POD_B, 2)] {
            netns::calico_pod(&node, pod, cali, addr, 0x10 + n);
        }
        Self { node, pod_a, pod_b }
    }
}

/// Binds the API server's socket inside `netns` (a thread that enters it opens the socket; the
/// socket stays in that namespace).
fn bind_in(netns: &Netns) -> apiserver::Bind {
    let path = format!("/var/run/netns/{}", netns.name());
    Box::new(move |addr| {
        let inside = path.clone();
        std::thread::spawn(move || {
            let path = inside;
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: a valid namespace fd; setns affects only this thread for CLONE_NEWNET.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert!(
                rc == 0,
                "setns({path}): {}",
                std::io::Error::last_os_error()
            );
            apiserver::bind_here(addr)
        })
        .join()
        .unwrap_or_else(|_| panic!("binding the API server in {}", netns_name(&path)))
    })
}

fn netns_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn seed(server: &ApiServer) {
    for name in ["web", "db"] {
        server.apply(
            apiserver::NAMESPACES,
            json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}}),
        );
    }
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
        json!({
            "metadata": {"namespace": "web", "name": "frontend", "labels": {"app": "frontend"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "x"}]},
            "status": {"phase": "Running", "podIP": POD_A, "podIPs": [{"ip": POD_A}]},
        }),
    );
    server.apply(
        apiserver::PODS,
        json!({
            "metadata": {"namespace": "db", "name": "postgres", "labels": {"app": "postgres"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "db", "image": "x", "ports": [
                {"containerPort": 5432},
                {"containerPort": 5353, "protocol": "UDP"},
            ]}]},
            "status": {"phase": "Running", "podIP": POD_B, "podIPs": [{"ip": POD_B}]},
        }),
    );
    server.apply(apiserver::NETWORK_POLICIES, postgres_policy(false));
}

/// db accepts TCP 5432 from web, and UDP 5353 too when `udp`.
fn postgres_policy(udp: bool) -> Value {
    let mut ports = vec![json!({"port": 5432})];
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

/// The auditor daemon inside the node namespace; killed on drop if still running.
struct Daemon {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Daemon {
    fn start(node: &Netns, dir: &TempDir, kubeconfig: &Path) -> Self {
        let stderr = dir.0.join("daemon.stderr");
        let file = |p: &Path| File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        // `ip netns exec` execs the binary in place: the child's pid is the daemon's.
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                node.name(),
                env!("CARGO_BIN_EXE_auditor"),
                "run",
                "--kube",
                "--interfaces",
                "cali*",
                "--metrics-addr",
                METRICS,
                "--answer-timeout",
                "1s",
                // Nothing here restarts: no pinned tables to clean up.
                "--pin-dir",
                "none",
                "--node",
                "node-1",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file(&dir.0.join("daemon.stdout")))
            .stderr(file(&stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the daemon: {e}"));
        Self {
            child: Some(child),
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_ready(&mut self, node: &Netns) {
        let deadline = Instant::now() + WAIT;
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
                "the daemon was not ready within {WAIT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap_or_else(|| panic!("daemon gone"));
        let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not stop within 5 s of SIGTERM:\n{}",
                    self.log()
                );
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

fn udp_series(verdict: &str) -> String {
    format!(
        "flow_auditor_flows_total{{verdict=\"{verdict}\",outcome=\"established\",\
         src_namespace=\"web\",src_workload=\"frontend\",dst_namespace=\"db\",\
         dst_workload=\"postgres\",protocol=\"udp\",dst_port=\"5353\"}}"
    )
}

const STALENESS: &str = "flow_auditor_inventory_staleness_seconds";
const GENERATION: &str = "flow_auditor_model_generation";
const NETPOLS: &str = "flow_auditor_policies{kind=\"NetworkPolicy\"}";

/// Scrapes until `done` holds; returns the last scrape.
fn wait_metrics(node: &Netns, daemon: &Daemon, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = match get(node, "/metrics") {
            Some((200, body)) => body,
            other => panic!("scrape failed: {other:?}\n{}", daemon.log()),
        };
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
                    || l.starts_with("flow_auditor_inventory")
                    || l.starts_with("flow_auditor_policies"))
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

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn kube_source_drives_the_daemon_verdicts_and_staleness() {
    require_root();
    let cluster = Cluster::new();
    let dir = TempDir::new("daemon");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let server = runtime.block_on(ApiServer::start_with(bind_in(&cluster.node)));
    seed(&server);
    let kubeconfig = dir.0.join("kubeconfig");
    let config = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters: [{{name: test, cluster: {{server: \"{}\"}}}}]\n\
         users: [{{name: test, user: {{}}}}]\n\
         contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n\
         current-context: test\n",
        server.url()
    );
    std::fs::write(&kubeconfig, config).unwrap_or_else(|e| panic!("write kubeconfig: {e}"));

    let mut daemon = Daemon::start(&cluster.node, &dir, &kubeconfig);
    daemon.wait_ready(&cluster.node);
    let metrics = wait_metrics(&cluster.node, &daemon, "the API's policy", |m| {
        sample(m, NETPOLS) == 1.0
    });
    assert_eq!(sample(&metrics, STALENESS), 0.0, "{metrics}");
    assert!(
        server.requests().iter().all(|r| r.resource.is_some()),
        "the daemon only asks for WATCHED_KINDS: {:?}",
        server.requests()
    );

    let udp_server = cluster
        .pod_b
        .run(|| UdpSocket::bind(addr(POD_B, 5353)).unwrap_or_else(|e| panic!("bind: {e}")));
    udp_server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));

    // The API's policy allows TCP only: UDP that gets through is unexpected.
    udp_exchange(&cluster, &udp_server);
    wait_metrics(&cluster.node, &daemon, "an unexpected UDP flow", |m| {
        sample(m, &udp_series("unexpected")) == 1.0
    });

    // The policy changed in the API: the next flow is allowed.
    let generation = sample(
        &wait_metrics(&cluster.node, &daemon, "a generation", |_| true),
        GENERATION,
    );
    server.apply(apiserver::NETWORK_POLICIES, postgres_policy(true));
    wait_metrics(&cluster.node, &daemon, "the policy update", |m| {
        sample(m, GENERATION) > generation
    });
    udp_exchange(&cluster, &udp_server);
    wait_metrics(&cluster.node, &daemon, "an allowed UDP flow", |m| {
        sample(m, &udp_series("allowed")) == 1.0
    });

    // The API goes away: the last model stays in use and the staleness gauge grows.
    runtime.block_on(server.stop());
    let metrics = wait_metrics(&cluster.node, &daemon, "staleness", |m| {
        sample(m, STALENESS) > 0.0
    });
    assert_eq!(
        sample(&metrics, NETPOLS),
        1.0,
        "the policy is kept:\n{metrics}"
    );
    assert_eq!(
        get(&cluster.node, "/readyz").map(|(status, _)| status),
        Some(200),
        "still ready on the last good model"
    );
    udp_exchange(&cluster, &udp_server);
    wait_metrics(
        &cluster.node,
        &daemon,
        "a flow judged on the kept model",
        |m| sample(m, &udp_series("allowed")) == 2.0,
    );

    // Back: in sync again.
    {
        let _context = runtime.enter();
        server.restart();
    }
    wait_metrics(&cluster.node, &daemon, "staleness back to 0", |m| {
        sample(m, STALENESS) == 0.0
    });
    let status = daemon.terminate();
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        daemon.log()
    );
    assert!(
        get(&cluster.node, "/metrics").is_none(),
        "the stopped daemon still answers"
    );
}
