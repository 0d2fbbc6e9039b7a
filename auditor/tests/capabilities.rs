//! The `DaemonSet`'s Linux capabilities are the least that work. The real `auditor run` starts in
//! a node namespace of its own as the kubelet would start it: uid 0 with exactly the capabilities
//! `deploy/base/daemonset.yaml` adds (bounding, permitted and effective sets; nothing inheritable
//! or ambient), `no_new_privs` and a read-only root filesystem. With the list it becomes ready,
//! attaches (TCX where the kernel has it, clsact filters where it does not, as on Debian 12's
//! 6.1), removes the clsact filters a crashed agent left and counts a flow; without any one entry of
//! the list it must fail to start.
#![expect(
    clippy::float_cmp,
    reason = "metric samples compared here are whole counts, which an f64 holds exactly"
)]

#[path = "common/bpffs.rs"]
mod bpffs;
#[path = "common/hooks.rs"]
mod hooks;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/tempdir.rs"]
mod tempdir;

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};
use tempdir::TempDir;

use auditor::datapath::{
    attach::HookMode,
    load::{Datapath, DatapathConfig},
};
use aya::programs::{
    TcAttachType,
    tc::{self, NlOptions, TcAttach},
};
use netns::{Netns, flows_total, require_root, sample};
use serde_yaml_ng::Value;

const POD_A: &str = "192.0.2.10";
const POD_B: &str = "192.0.2.20";
/// Loopback of the node namespace: every test has its own, so the port never clashes.
const METRICS: &str = "127.0.0.1:19925";
/// How long a daemon may take to answer `/readyz` 200 (or, short a capability, to give up).
const READY_WITHIN: Duration = Duration::from_secs(20);

/// Capability names as Kubernetes spells them (`CAP_` dropped), by number (linux/capability.h).
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

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
metadata: {name: dns, namespace: db, labels: {app: dns}}
spec:
  nodeName: node-1
  containers: [{name: dns, image: x, ports: [{containerPort: 5353, protocol: UDP}]}]
status: {podIP: 192.0.2.20, podIPs: [{ip: 192.0.2.20}]}
";

/// The auditor container's `securityContext.capabilities` in the base `DaemonSet`: (drop, add).
fn daemonset_capabilities() -> (Vec<String>, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let daemonset: Value = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    let containers = daemonset["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{}: no containers", path.display()));
    let auditor = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("auditor"))
        .unwrap_or_else(|| panic!("{}: no container named auditor", path.display()));
    let names = |key: &str| -> Vec<String> {
        auditor["securityContext"]["capabilities"][key]
            .as_sequence()
            .unwrap_or_else(|| panic!("{}: no capabilities.{key} list", path.display()))
            .iter()
            .map(|v| {
                v.as_str()
                    .unwrap_or_else(|| panic!("{}: capability {v:?}", path.display()))
                    .to_owned()
            })
            .collect()
    };
    (names("drop"), names("add"))
}

/// The capabilities `add` lists, checked against the kernel's names; the daemon needs some.
fn capabilities_to_add() -> Vec<String> {
    let (drop, add) = daemonset_capabilities();
    assert!(
        drop == ["ALL"],
        "the DaemonSet must drop ALL and add back what it needs, drops {drop:?}"
    );
    assert!(!add.is_empty(), "the DaemonSet adds no capability");
    for cap in &add {
        assert!(
            CAPABILITIES.contains(&cap.as_str()),
            "{cap} is not a Linux capability name (as Kubernetes spells them, without CAP_)"
        );
    }
    add
}

/// The `/proc/<pid>/status` mask of `caps`.
fn mask(caps: &[String]) -> u64 {
    caps.iter()
        .map(|cap| {
            let bit = CAPABILITIES
                .iter()
                .position(|c| c == cap)
                .unwrap_or_else(|| panic!("unknown capability {cap}"));
            1_u64 << bit
        })
        .fold(0, |a, b| a | b)
}

/// A node namespace with two Calico-wired pods.
struct Cluster {
    node: Netns,
    pod_a: Netns,
    pod_b: Netns,
    /// A bpffs of the test's own for the flow tables' pins.
    pins: bpffs::PinDir,
}

impl Cluster {
    fn new() -> Self {
        let node = Netns::new("cnode");
        let pod_a = Netns::new("cpoda");
        let pod_b = Netns::new("cpodb");
        node.sysctl("net.ipv4.ip_forward", "1");
        netns::calico_pod(&node, &pod_a, "caliA", POD_A, 1);
        netns::calico_pod(&node, &pod_b, "caliB", POD_B, 2);
        Self {
            node,
            pod_a,
            pod_b,
            pins: bpffs::PinDir::new("caps"),
        }
    }
}

/// `auditor run` with exactly `caps`, killed on drop if still running.
struct Daemon {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Daemon {
    fn start(cluster: &Cluster, dir: &TempDir, caps: &[String], tag: &str) -> Self {
        let snapshot = dir.0.join("cluster.yaml");
        std::fs::write(&snapshot, CLUSTER_YAML)
            .unwrap_or_else(|e| panic!("writing {}: {e}", snapshot.display()));
        let stderr = dir.0.join(format!("{tag}.stderr"));
        let file =
            |p: &Path| std::fs::File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        // As root, exec gives the new program permitted = effective = the bounding set (and the
        // inheritable set, emptied here): that is how a container runtime hands a uid 0
        // container its `capabilities.add`.
        let bounding: String = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let snapshot = snapshot.display().to_string();
        // The flow tables are pinned, as in the DaemonSet: pinning must work with these
        // capabilities too.
        let pins = cluster.pins.arg();
        let daemon = [
            "ip",
            "netns",
            "exec",
            cluster.node.name(),
            "setpriv",
            "--bounding-set",
            &bounding,
            "--inh-caps=-all",
            "--ambient-caps=-all",
            // allowPrivilegeEscalation: false.
            "--no-new-privs",
            "--",
            env!("CARGO_BIN_EXE_auditor"),
            "run",
            "--cluster",
            &snapshot,
            "--interfaces",
            "cali*",
            "--metrics-addr",
            METRICS,
            "--answer-timeout",
            "1s",
            "--node",
            "node-1",
            "--pin-dir",
            &pins,
        ];
        // readOnlyRootFilesystem: the root mount is read-only in a mount namespace of the
        // daemon's own (slave, so nothing propagates back to the machine's).
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "--", "sh", "-c"])
            .arg("mount -o remount,bind,ro / && exec \"$@\"")
            .arg("sh")
            .args(daemon)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file(&stderr))
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .env_remove("KUBERNETES_SERVICE_HOST")
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

    /// `Ok` once `/readyz` answers 200; `Err` with the exit status if the daemon exits first,
    /// or `None` as the status if it is neither ready nor gone within [`READY_WITHIN`].
    fn wait_ready(&mut self, node: &Netns) -> Result<(), Option<ExitStatus>> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let child = self.child.as_mut().unwrap_or_else(|| panic!("daemon gone"));
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(Some(status));
            }
            if get(node, "/readyz").is_some_and(|(status, _)| status == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The daemon's own `/proc/<pid>/status` line `field` (a hex capability mask). `unshare`,
    /// `sh`, `ip` and `setpriv` each exec the next, so the child's pid is the daemon's.
    fn status_mask(&self, field: &str) -> u64 {
        let child = self.child.as_ref().unwrap_or_else(|| panic!("daemon gone"));
        let path = format!("/proc/{}/status", child.id());
        let status =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("{path} has no {field}:\n{status}"));
        u64::from_str_radix(hex.trim(), 16).unwrap_or_else(|e| panic!("{field} {hex}: {e}"))
    }

    fn exe(&self) -> PathBuf {
        let child = self.child.as_ref().unwrap_or_else(|| panic!("daemon gone"));
        std::fs::read_link(format!("/proc/{}/exe", child.id()))
            .unwrap_or_else(|e| panic!("the daemon's exe: {e}"))
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

/// Programs of ours attached to `ifname` in `ns` by `mode`, both directions.
fn attached_programs(ns: &Netns, ifname: &str, mode: HookMode) -> usize {
    let (ingress, egress) = hooks::programs(ns, ifname, mode);
    ingress.len() + egress.len()
}

/// What an agent killed in clsact mode leaves on `ifname`: our two filters, running programs this
/// process loaded and then lets go of, as a dead process would. Returns their program ids.
fn leave_clsact_filters(ns: &Netns, ifname: &str) -> Vec<u32> {
    ns.run(|| {
        let mut datapath =
            Datapath::load(&DatapathConfig::default()).unwrap_or_else(|e| panic!("load: {e:?}"));
        let programs = datapath.programs().unwrap_or_else(|e| panic!("{e}"));
        let name = std::ffi::CString::new(ifname).unwrap_or_else(|e| panic!("{e}"));
        match tc::qdisc_add_clsact(name.as_c_str()) {
            Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
            Err(e) => panic!("adding clsact to {ifname}: {e}"),
        }
        let mut ids = Vec::new();
        for (program, attach_type) in [
            (programs.ingress, TcAttachType::Ingress),
            (programs.egress, TcAttachType::Egress),
        ] {
            let link = program
                .attach(
                    name.as_c_str(),
                    TcAttach::Netlink {
                        parent: attach_type.into(),
                        options: NlOptions::default(),
                    },
                )
                .and_then(|id| program.take_link(id))
                .unwrap_or_else(|e| panic!("clsact filter on {ifname}: {e}"));
            // The filter keeps its program; forgetting the link keeps the filter, as a crash does.
            std::mem::forget(link);
            ids.push(
                program
                    .info()
                    .unwrap_or_else(|e| panic!("program info: {e}"))
                    .id(),
            );
        }
        ids
    })
}

/// One UDP request and reply pod A -> pod B:5353.
fn udp_exchange(cluster: &Cluster) {
    let any = |ip: &str| SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), 0);
    let server = cluster
        .pod_b
        .run(|| UdpSocket::bind((POD_B, 5353)).unwrap_or_else(|e| panic!("bind: {e}")));
    let client = cluster
        .pod_a
        .run(|| UdpSocket::bind(any(POD_A)).unwrap_or_else(|e| panic!("bind: {e}")));
    for socket in [&server, &client] {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    client
        .send_to(b"query", (POD_B, 5353))
        .unwrap_or_else(|e| panic!("send: {e}"));
    let mut buf = [0_u8; 16];
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
fn the_daemonsets_capabilities_are_enough_to_attach_and_count() {
    require_root();
    let caps = capabilities_to_add();
    let cluster = Cluster::new();
    let mode = hooks::expected_mode(&cluster.node);
    // A crashed clsact agent's filters on caliA: the daemon must remove them at start-up with
    // no more than the list (TCX kernels run the same clean-up, for nodes that changed kernel).
    let leftovers = leave_clsact_filters(&cluster.node, "caliA");
    let dir = TempDir::new("enough");
    let mut daemon = Daemon::start(&cluster, &dir, &caps, "enough");
    if let Err(status) = daemon.wait_ready(&cluster.node) {
        panic!(
            "with exactly {caps:?} the daemon did not become ready ({}):\n{}",
            status.map_or_else(|| "still starting".to_owned(), |s| s.to_string()),
            daemon.log()
        );
    }
    // The daemon, not a wrapper, runs with exactly the list and nothing it could gain.
    let exe = daemon.exe();
    assert!(
        exe.ends_with("auditor"),
        "the child is {}, not the daemon",
        exe.display()
    );
    let want = mask(&caps);
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let got = daemon.status_mask(field);
        assert!(got == want, "{field} {got:#x}, want {want:#x} ({caps:?})");
    }
    for field in ["CapInh", "CapAmb"] {
        assert!(daemon.status_mask(field) == 0, "{field} is not empty");
    }
    assert!(
        daemon.log().contains("flow tables pinned") && !daemon.log().contains("cannot pin"),
        "the flow tables were not pinned with {caps:?}:
{}",
        daemon.log()
    );

    assert!(
        attached_programs(&cluster.node, "caliA", mode) == 2
            && attached_programs(&cluster.node, "caliB", mode) == 2,
        "not attached by {mode} (what this kernel offers) in both directions:\n{}",
        daemon.log()
    );
    let (ingress, egress) = hooks::clsact_programs(&cluster.node, "caliA");
    assert!(
        !ingress
            .iter()
            .chain(&egress)
            .any(|id| leftovers.contains(id)),
        "the leftover clsact filters (programs {leftovers:?}) are still on caliA: \
         ingress {ingress:?}, egress {egress:?}\n{}",
        daemon.log()
    );
    if mode == HookMode::Tcx {
        assert!(
            ingress.is_empty() && egress.is_empty(),
            "a clsact filter of ours beside TCX on caliA: {ingress:?} {egress:?}"
        );
    }
    udp_exchange(&cluster);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = match get(&cluster.node, "/metrics") {
            Some((200, body)) => body,
            other => panic!("scrape failed: {other:?}"),
        };
        let attached = sample(
            &metrics,
            &format!("flow_auditor_attached_interfaces{{mode=\"{mode}\"}}"),
        );
        if flows_total(&metrics) >= 1.0 && attached == 2.0 {
            println!(
                "capabilities {caps:?} (CapEff {want:#x}): ready, leftover clsact filters removed, \
                 {attached} interfaces attached by {mode}, {} flow(s) counted",
                flows_total(&metrics)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the UDP flow was not counted or the interfaces not reported attached \
             (attached {attached}):\n{}\n{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("flow_auditor_flows_total")
                    || l.starts_with("flow_auditor_attached"))
                .collect::<Vec<_>>()
                .join("\n"),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn the_daemon_fails_without_any_one_of_the_daemonsets_capabilities() {
    require_root();
    let caps = capabilities_to_add();
    let cluster = Cluster::new();
    let dir = TempDir::new("fewer");
    let mut needless = Vec::new();
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let tag = format!("without-{}", missing.to_lowercase());
        let mut daemon = Daemon::start(&cluster, &dir, &fewer, &tag);
        match daemon.wait_ready(&cluster.node) {
            Ok(()) => needless.push(missing.clone()),
            Err(status) => {
                let log = daemon.log();
                let error = log
                    .lines()
                    .find(|l| l.starts_with("Error:"))
                    .unwrap_or("(no Error: line)");
                // The innermost cause of anyhow's chain (`    N: ...`), and the verifier's
                // verdict when it is the verifier that refused.
                let cause = log
                    .lines()
                    .filter_map(|l| l.strip_prefix("    "))
                    .rfind(|l| l.starts_with(char::is_numeric))
                    .unwrap_or("");
                let verifier = log
                    .lines()
                    .find(|l| l.contains("prohibited") || l.contains("!root"))
                    .map_or("", str::trim);
                println!(
                    "without {missing}: {} - {error} / {} {verifier}",
                    status.map_or_else(|| "never ready".to_owned(), |s| s.to_string()),
                    cause.chars().take(160).collect::<String>()
                );
                // Exits for a capability problem, not anything else that could go wrong.
                assert!(
                    log.contains("Permission denied") || log.contains("Operation not permitted"),
                    "without {missing} the daemon failed, but not for lack of a permission:\n{log}"
                );
            }
        }
        drop(daemon);
        // Nothing of a failed start stays attached, by either hook.
        assert!(
            !hooks::anything_attached(&cluster.node, "caliA"),
            "a program stayed attached after the run without {missing}"
        );
    }
    assert!(
        needless.is_empty(),
        "the daemon works without {needless:?}: remove it from deploy/base/daemonset.yaml"
    );
}
