//! The lab's network: a "node" namespace with Calico-style host routing to one namespace per pod
//! (`cali*` veths, /32 routes, proxy ARP for 169.254.1.1), a LAN router namespace behind the
//! node's uplink, and one namespace per external host. Nothing here touches the machine's own
//! namespace: every command names a namespace the lab created, and guards delete them all.

use std::fmt::Write as _;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::cluster::{
    self, CALICO_GATEWAY, EXTERNALS, GATEWAY_IP, NODE_IP, POD_CIDR, PODS, Pod, Proto,
};

/// Every lab namespace is named `fal-<pid>-<role>`, so a later run can tell a crashed run's
/// leftovers (pid gone) from a lab running right now.
pub const PREFIX: &str = "fal-";

/// The nftables table the lab's CNI-like enforcement lives in (in the node namespace).
pub const NFT_TABLE: &str = "flow_auditor_lab";

/// A network namespace the lab created, deleted with everything in it on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: String) -> Result<Self> {
        cmd("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        // IPv6 off before any interface exists: link-local autoconfiguration and router
        // solicitations would otherwise be flows of their own and blur the lab's exact counts.
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        // Loose or strict reverse-path filtering inherited from the machine would drop
        // Calico-style asymmetric /32 routing; inside the lab it is not needed.
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        cmd("ip", &full).map(|_| ())
    }

    /// A sysctl of this namespace (net.* sysctls are per namespace: /proc/sys/net shows the
    /// namespace of the thread that opens it).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        in_netns(&self.name, || std::fs::write(&path, value))?
            .with_context(|| format!("sysctl {key}={value} in netns {}", self.name))
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        cmd("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces, the veth peers elsewhere, its nftables
        // tables and the TC programs attached to its interfaces.
        if let Err(e) = cmd("ip", &["netns", "del", &self.name]) {
            eprintln!("lab: warning: could not delete netns {}: {e:#}", self.name);
        }
    }
}

/// Runs a command, failing with its stderr.
pub fn cmd(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("could not start {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread that has joined namespace `ns`; sockets it creates belong to `ns` for
/// good, whichever thread uses them later.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("open {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a valid namespace fd; CLONE_NEWNET moves only the calling thread, which
            // ends with this closure.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context(format!("setns({path})"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in netns {ns} panicked"))?
    })
}

/// Deletes namespaces left by lab runs whose process is gone (a `SIGKILLed` demo).
pub fn remove_stale() -> Result<()> {
    let list = cmd("ip", &["netns", "list"])?;
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("lab: removing netns {name} left by an earlier run (pid {pid} is gone)");
        cmd("ip", &["netns", "del", name])?;
    }
    // The snapshot and logs of such runs (`flow-auditor-lab-<pid>`, `flow-auditor-lab-e2e-<pid>`).
    let tmp = std::env::temp_dir();
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("flow-auditor-lab-") {
            continue;
        }
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // The agents' pin mounts (`bpffs-*`) first: a directory cannot go while mounted on.
            for pins in std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if pins.file_name().to_string_lossy().starts_with("bpffs-")
                    && super::daemon::is_mounted(&pins.path())
                {
                    super::daemon::unmount(&pins.path());
                }
            }
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// The lab's namespaces. Dropped in reverse order of creation.
#[derive(Debug)]
pub struct Topology {
    pub node: Netns,
    pub gateway: Netns,
    /// By pod key.
    pub pods: Vec<(&'static str, Netns)>,
    /// By external key.
    pub externals: Vec<(&'static str, Netns)>,
}

impl Topology {
    pub fn ns_of(&self, key: &str) -> Option<&str> {
        self.pods
            .iter()
            .chain(&self.externals)
            .find(|(k, _)| *k == key)
            .map(|(_, ns)| ns.name())
    }

    /// Builds everything; on error, what was built is torn down by the guards.
    pub fn build() -> Result<Self> {
        let pid = std::process::id();
        let node = Netns::create(format!("{PREFIX}{pid}-node"))?;
        let gateway = Netns::create(format!("{PREFIX}{pid}-lan"))?;
        let mut topo = Self {
            node,
            gateway,
            pods: Vec::new(),
            externals: Vec::new(),
        };
        topo.uplink()?;
        for pod in PODS {
            let ns = Netns::create(format!("{PREFIX}{pid}-pod-{}", pod.key))?;
            attach_pod(&topo.node, &ns, pod)?;
            topo.pods.push((pod.key, ns));
        }
        for (i, ext) in EXTERNALS.iter().enumerate() {
            let ns = Netns::create(format!("{PREFIX}{pid}-ext-{}", ext.key))?;
            let side = format!("ext{i}");
            veth(&topo.gateway, &side, &ns, "eth0")?;
            let ip = format!("{}/32", ext.ip);
            ns.ip(&["addr", "add", &ip, "dev", "eth0"])?;
            ns.ip(&["route", "add", &GATEWAY_IP.to_string(), "dev", "eth0"])?;
            ns.ip(&["route", "add", "default", "via", &GATEWAY_IP.to_string()])?;
            topo.gateway
                .ip(&["route", "add", &ip, "dev", &side, "scope", "link"])?;
            topo.externals.push((ext.key, ns));
        }
        Ok(topo)
    }

    /// The node's uplink to the LAN router, which routes the pod CIDR back to the node: pods
    /// reach external hosts with their own addresses, as Calico without outgoing NAT does.
    fn uplink(&self) -> Result<()> {
        veth(&self.node, "eth0", &self.gateway, "eth0")?;
        self.node
            .ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
        self.gateway
            .ip(&["addr", "add", &format!("{GATEWAY_IP}/24"), "dev", "eth0"])?;
        self.node
            .ip(&["route", "add", "default", "via", &GATEWAY_IP.to_string()])?;
        self.gateway.ip(&[
            "route",
            "add",
            POD_CIDR,
            "via",
            &NODE_IP.to_string(),
            "dev",
            "eth0",
        ])?;
        self.node.sysctl("net.ipv4.ip_forward", "1")?;
        self.gateway.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(())
    }
}

/// Creates veth `a` in `ns_a` with peer `b` in `ns_b`, both up.
pub fn veth(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str) -> Result<()> {
    ns_a.ip(&[
        "link",
        "add",
        a,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        ns_b.name(),
    ])?;
    ns_a.ip(&["link", "set", a, "up"])?;
    ns_b.ip(&["link", "set", b, "up"])
}

/// Wires a pod as Calico does: the pod's eth0 holds a /32 and a default route via 169.254.1.1;
/// the node's `cali*` end has no address, answers ARP for everything by proxy, and the node
/// routes the pod's /32 to it.
fn attach_pod(node: &Netns, ns: &Netns, pod: &Pod) -> Result<()> {
    let cali = pod.cali();
    veth(node, &cali, ns, "eth0")?;
    node.sysctl(&format!("net.ipv4.conf.{cali}.proxy_arp"), "1")?;
    node.sysctl(&format!("net.ipv4.neigh.{cali}.proxy_delay"), "0")?;
    let ip = pod.ip().to_string();
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    ns.ip(&[
        "route",
        "add",
        CALICO_GATEWAY,
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        CALICO_GATEWAY,
        "dev",
        "eth0",
    ])?;
    node.ip(&[
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        &cali,
        "scope",
        "link",
    ])
}

/// The nftables table of the node namespace, deleted on drop (before the namespace goes).
#[derive(Debug)]
pub struct Enforcement {
    node: String,
}

impl Enforcement {
    /// Loads [`nft_rules`] into the node namespace.
    pub fn load(node: &Netns) -> Result<Self> {
        let script = nft_rules();
        let path = std::env::temp_dir().join(format!("{NFT_TABLE}-{}.nft", std::process::id()));
        std::fs::write(&path, &script).with_context(|| format!("write {}", path.display()))?;
        let loaded = node.exec(&["nft", "-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        loaded.context("loading the lab's nftables rules")?;
        Ok(Self {
            node: node.name().to_owned(),
        })
    }
}

impl Drop for Enforcement {
    fn drop(&mut self) {
        let args = [
            "netns", "exec", &self.node, "nft", "delete", "table", "inet", NFT_TABLE,
        ];
        if let Err(e) = cmd("ip", &args) {
            eprintln!("lab: warning: could not delete nftables table {NFT_TABLE}: {e:#}");
        }
    }
}

fn pod_set(namespace: &str) -> String {
    let ips: Vec<String> = PODS
        .iter()
        .filter(|p| p.namespace == namespace)
        .map(|p| p.ip().to_string())
        .collect();
    format!("{{ {} }}", ips.join(", "))
}

/// The CNI's enforcement of two of the seed's policies, in the node's forward path (where Calico
/// enforces pod-to-pod and pod-to-world traffic): `localstack` and `velero` are enforced,
/// `loki`, `unipoller` and `trivy-system` are "not tightened yet" and pass everything. Velero's
/// refusals are TCP resets / ICMP unreachables and `LocalStack`'s are silent drops, so the lab
/// shows both outcomes of a denial (`refused`, `unanswered`).
pub fn nft_rules() -> String {
    let mut s = String::new();
    let dns = |s: &mut String| {
        let _ = writeln!(
            s,
            "    ip daddr {} meta l4proto {{ tcp, udp }} th dport 53 return",
            pod_set("kube-system")
        );
    };
    let _ = writeln!(s, "table inet {NFT_TABLE} {{");
    s.push_str(
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n    \
         ct state established,related accept\n",
    );
    let _ = writeln!(s, "    ip saddr {} jump velero_egress", pod_set("velero"));
    let _ = writeln!(
        s,
        "    ip saddr {} jump localstack_egress",
        pod_set("localstack")
    );
    let _ = writeln!(s, "    ip daddr {} jump velero_ingress", pod_set("velero"));
    let _ = writeln!(
        s,
        "    ip daddr {} jump localstack_ingress",
        pod_set("localstack")
    );
    s.push_str("  }\n");

    // velero-network-policy, egress: DNS, LocalStack 4566, the API server, HTTPS outside RFC 1918.
    s.push_str("  chain velero_egress {\n");
    dns(&mut s);
    let _ = writeln!(
        s,
        "    ip daddr {} tcp dport 4566 return",
        pod_set("localstack")
    );
    s.push_str("    ip daddr 10.96.0.1 tcp dport 443 return\n");
    s.push_str(
        "    ip daddr != { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 } tcp dport 443 return\n",
    );
    s.push_str("    meta l4proto tcp reject with tcp reset\n    reject\n  }\n");

    // velero-network-policy, ingress: metrics from `default` only.
    s.push_str("  chain velero_ingress {\n");
    let _ = writeln!(
        s,
        "    ip saddr {} tcp dport 8085 return",
        pod_set("default")
    );
    s.push_str("    meta l4proto tcp reject with tcp reset\n    reject\n  }\n");

    // localstack-network-policy, egress: DNS only.
    s.push_str("  chain localstack_egress {\n");
    dns(&mut s);
    s.push_str("    drop\n  }\n");

    // localstack-network-policy, ingress: 4566 from velero, ingress-nginx and default.
    s.push_str("  chain localstack_ingress {\n");
    for from in ["velero", "ingress-nginx", "default"] {
        let _ = writeln!(s, "    ip saddr {} tcp dport 4566 return", pod_set(from));
    }
    s.push_str("    drop\n  }\n}\n");
    s
}

/// The ports a pod or external host serves, for the traffic servers.
pub fn served(key: &str) -> Vec<(std::net::Ipv4Addr, u16, Proto)> {
    if let Some(pod) = cluster::pod(key) {
        return pod
            .ports
            .iter()
            .map(|p| (pod.ip(), p.number, p.proto))
            .collect();
    }
    cluster::external(key)
        .map(|e| e.ports.iter().map(|p| (e.ip, p.number, p.proto)).collect())
        .unwrap_or_default()
}
