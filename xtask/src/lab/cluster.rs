//! The miniature Calico homelab: which pods and external hosts exist, their addresses and ports,
//! and the snapshot (`auditor run --cluster`) that tells the daemon who they are. The seed's five
//! `NetworkPolicies` ride along verbatim as the intended model.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// The one node of the lab; every pod is scheduled on it.
pub const NODE_NAME: &str = "lab-node";
/// The node's address on its uplink (the "LAN"), also its `InternalIP` in the snapshot.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
/// The LAN router the node's default route points at.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
/// The node's pod CIDR (Calico hands out /32s from it).
pub const POD_CIDR: &str = "10.244.0.0/24";
/// Calico's fixed next hop inside every pod, answered by proxy ARP on the `cali*` side.
pub const CALICO_GATEWAY: &str = "169.254.1.1";

/// The seed's `NetworkPolicies`, verbatim.
pub const SEED_POLICIES: &str = include_str!("seed-policies.yaml");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// A container port a pod declares (and the lab serves).
#[derive(Clone, Copy, Debug)]
pub struct Port {
    pub name: &'static str,
    pub number: u16,
    pub proto: Proto,
}

const fn tcp(name: &'static str, number: u16) -> Port {
    Port {
        name,
        number,
        proto: Proto::Tcp,
    }
}

const fn udp(name: &'static str, number: u16) -> Port {
    Port {
        name,
        number,
        proto: Proto::Udp,
    }
}

/// What owns a pod, so the daemon derives the workload label the way it does in a cluster.
#[derive(Clone, Copy, Debug)]
pub enum Owner {
    /// A Deployment's pod: owned by the `ReplicaSet` `<name>-<hash>`.
    Deployment {
        name: &'static str,
        hash: &'static str,
    },
    StatefulSet(&'static str),
    DaemonSet(&'static str),
    /// A bare pod.
    None,
}

#[derive(Clone, Copy, Debug)]
pub struct Pod {
    /// Short handle used by the traffic script and in namespace names.
    pub key: &'static str,
    pub namespace: &'static str,
    pub name: &'static str,
    pub owner: Owner,
    pub labels: &'static [(&'static str, &'static str)],
    /// Last octet in [`POD_CIDR`].
    pub host: u8,
    pub ports: &'static [Port],
}

impl Pod {
    pub const fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, self.host)
    }

    /// The host-side veth, named as Calico names it: `cali` + 11 hex digits of a hash of the
    /// pod's identity (Calico uses SHA-1; any stable hash gives the same shape).
    pub fn cali(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.namespace.bytes().chain(*b".").chain(self.name.bytes()) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("cali{:011x}", hash & 0xfff_ffff_ffff)
    }
}

/// A host outside the cluster, reached through the node and the LAN router.
#[derive(Clone, Copy, Debug)]
pub struct External {
    pub key: &'static str,
    pub what: &'static str,
    pub ip: Ipv4Addr,
    pub ports: &'static [Port],
}

/// The namespaces of the cluster, in display order. `sandbox` has no policy at all.
pub const NAMESPACES: &[&str] = &[
    "default",
    "kube-system",
    "velero",
    "localstack",
    "loki",
    "unipoller",
    "trivy-system",
    "ingress-nginx",
    "sandbox",
];

pub const PODS: &[Pod] = &[
    Pod {
        key: "prometheus",
        namespace: "default",
        name: "prometheus-kube-prometheus-stack-prometheus-0",
        owner: Owner::StatefulSet("prometheus-kube-prometheus-stack-prometheus"),
        labels: &[("app.kubernetes.io/name", "prometheus")],
        host: 10,
        ports: &[tcp("http-web", 9090)],
    },
    Pod {
        key: "grafana",
        namespace: "default",
        name: "kube-prometheus-stack-grafana-7d9f8c6b5-x2k4p",
        owner: Owner::Deployment {
            name: "kube-prometheus-stack-grafana",
            hash: "7d9f8c6b5",
        },
        labels: &[("app.kubernetes.io/name", "grafana")],
        host: 11,
        ports: &[tcp("grafana", 3000)],
    },
    Pod {
        key: "alertmanager",
        namespace: "default",
        name: "alertmanager-kube-prometheus-stack-alertmanager-0",
        owner: Owner::StatefulSet("alertmanager-kube-prometheus-stack-alertmanager"),
        labels: &[("app.kubernetes.io/name", "alertmanager")],
        host: 12,
        ports: &[tcp("http-web", 9093)],
    },
    Pod {
        key: "coredns",
        namespace: "kube-system",
        name: "coredns-668d6bf9bc-4xk2m",
        owner: Owner::Deployment {
            name: "coredns",
            hash: "668d6bf9bc",
        },
        labels: &[("k8s-app", "kube-dns")],
        host: 20,
        ports: &[udp("dns", 53), tcp("dns-tcp", 53), tcp("metrics", 9153)],
    },
    Pod {
        key: "velero",
        namespace: "velero",
        name: "velero-6b8f7c9d4-mq7zt",
        owner: Owner::Deployment {
            name: "velero",
            hash: "6b8f7c9d4",
        },
        labels: &[("app.kubernetes.io/name", "velero")],
        host: 30,
        ports: &[tcp("http-monitoring", 8085)],
    },
    Pod {
        key: "localstack",
        namespace: "localstack",
        name: "localstack-5c7b9d8f6-k9w2r",
        owner: Owner::Deployment {
            name: "localstack",
            hash: "5c7b9d8f6",
        },
        labels: &[("app.kubernetes.io/name", "localstack")],
        host: 31,
        ports: &[tcp("edge", 4566)],
    },
    Pod {
        key: "loki",
        namespace: "loki",
        name: "loki-0",
        owner: Owner::StatefulSet("loki"),
        labels: &[("app.kubernetes.io/name", "loki")],
        host: 40,
        ports: &[
            tcp("http-metrics", 3100),
            tcp("grpc", 9095),
            tcp("http-memberlist", 7946),
        ],
    },
    Pod {
        key: "promtail",
        namespace: "loki",
        name: "promtail-8xk2p",
        owner: Owner::DaemonSet("promtail"),
        labels: &[("app.kubernetes.io/name", "promtail")],
        host: 41,
        ports: &[tcp("http-metrics", 3101)],
    },
    Pod {
        key: "unipoller",
        namespace: "unipoller",
        name: "unipoller-7f9c8d6b5-p4v8n",
        owner: Owner::Deployment {
            name: "unipoller",
            hash: "7f9c8d6b5",
        },
        labels: &[("app", "unipoller")],
        host: 50,
        ports: &[tcp("metrics", 9130)],
    },
    Pod {
        key: "trivy",
        namespace: "trivy-system",
        name: "trivy-operator-6d9f8b7c5-h2j4k",
        owner: Owner::Deployment {
            name: "trivy-operator",
            hash: "6d9f8b7c5",
        },
        labels: &[("app.kubernetes.io/name", "trivy-operator")],
        host: 60,
        ports: &[tcp("metrics", 8080)],
    },
    Pod {
        key: "ingress-nginx",
        namespace: "ingress-nginx",
        name: "ingress-nginx-controller-5b8d7f6c9-r7t2w",
        owner: Owner::Deployment {
            name: "ingress-nginx-controller",
            hash: "5b8d7f6c9",
        },
        labels: &[
            ("app.kubernetes.io/name", "ingress-nginx"),
            ("app.kubernetes.io/component", "controller"),
        ],
        host: 70,
        ports: &[tcp("http", 80), tcp("https", 443), tcp("metrics", 10254)],
    },
    Pod {
        key: "debug",
        namespace: "sandbox",
        name: "debug-shell",
        owner: Owner::None,
        labels: &[("run", "debug-shell")],
        host: 80,
        ports: &[],
    },
];

pub const EXTERNALS: &[External] = &[
    // The seed's unipoller policy names the controller 10.0.1.1/32: the lab keeps that LAN
    // address (it only exists inside the lab's namespaces) so the policy stays verbatim.
    External {
        key: "unifi",
        what: "UniFi controller (LAN)",
        ip: Ipv4Addr::new(10, 0, 1, 1),
        ports: &[tcp("https", 443), tcp("https-alt", 8443)],
    },
    External {
        key: "registry",
        what: "container registry (internet)",
        ip: Ipv4Addr::new(203, 0, 113, 10),
        ports: &[tcp("https", 443)],
    },
    External {
        key: "backblaze",
        what: "Backblaze B2 stand-in (internet)",
        ip: Ipv4Addr::new(203, 0, 113, 20),
        ports: &[tcp("https", 443)],
    },
    External {
        key: "website",
        what: "some website (internet)",
        ip: Ipv4Addr::new(198, 51, 100, 80),
        ports: &[tcp("http", 80), tcp("https", 443)],
    },
];

pub fn pod(key: &str) -> Option<&'static Pod> {
    PODS.iter().find(|p| p.key == key)
}

pub fn external(key: &str) -> Option<&'static External> {
    EXTERNALS.iter().find(|e| e.key == key)
}

/// The snapshot `auditor run --cluster` reads: the Node, the Namespaces (with the
/// `kubernetes.io/metadata.name` label the API server sets) and the Pods, as `kubectl get -A -o
/// yaml` would print them.
pub fn snapshot_yaml() -> String {
    let mut y = String::from(
        "# Generated by `cargo xtask demo`: the lab's cluster in miniature.\n\
         apiVersion: v1\nkind: List\nitems:\n",
    );
    // `write!` to a String cannot fail; the results are ignored on purpose.
    let _ = write!(
        y,
        "- apiVersion: v1\n  kind: Node\n  metadata:\n    name: {NODE_NAME}\n  spec:\n    \
         podCIDR: {POD_CIDR}\n    podCIDRs: [{POD_CIDR}]\n  status:\n    addresses:\n    \
         - {{type: InternalIP, address: {NODE_IP}}}\n    - {{type: Hostname, address: {NODE_NAME}}}\n"
    );
    for ns in NAMESPACES {
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Namespace\n  metadata:\n    name: {ns}\n    labels: \
             {{kubernetes.io/metadata.name: {ns}}}\n"
        );
    }
    for pod in PODS {
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: {}\n    namespace: {}\n    \
             labels:\n",
            pod.name, pod.namespace
        );
        for (k, v) in pod.labels {
            let _ = writeln!(y, "      {k}: {v}");
        }
        match pod.owner {
            Owner::Deployment { name, hash } => {
                let _ = write!(
                    y,
                    "      pod-template-hash: {hash}\n    ownerReferences:\n    - {{apiVersion: \
                     apps/v1, kind: ReplicaSet, name: {name}-{hash}, controller: true, uid: \
                     {uid}}}\n",
                    uid = fake_uid(pod.name)
                );
            }
            Owner::StatefulSet(name) | Owner::DaemonSet(name) => {
                let kind = if matches!(pod.owner, Owner::StatefulSet(_)) {
                    "StatefulSet"
                } else {
                    "DaemonSet"
                };
                let _ = write!(
                    y,
                    "    ownerReferences:\n    - {{apiVersion: apps/v1, kind: {kind}, name: \
                     {name}, controller: true, uid: {uid}}}\n",
                    uid = fake_uid(pod.name)
                );
            }
            Owner::None => {}
        }
        let _ = write!(
            y,
            "  spec:\n    nodeName: {NODE_NAME}\n    containers:\n    - name: {}\n      image: \
             lab/{}\n",
            pod.key, pod.key
        );
        if !pod.ports.is_empty() {
            y.push_str("      ports:\n");
            for port in pod.ports {
                let _ = writeln!(
                    y,
                    "      - {{name: {}, containerPort: {}, protocol: {}}}",
                    port.name,
                    port.number,
                    port.proto.as_str()
                );
            }
        }
        let _ = write!(
            y,
            "  status:\n    phase: Running\n    hostIP: {NODE_IP}\n    podIP: {ip}\n    podIPs: \
             [{{ip: {ip}}}]\n",
            ip = pod.ip()
        );
    }
    y
}

/// A UUID-shaped uid derived from the name, so snapshots are reproducible.
fn fake_uid(name: &str) -> String {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in name.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let hex = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cali_names_fit_an_interface_name_and_are_distinct() {
        let names: std::collections::BTreeSet<String> = PODS.iter().map(Pod::cali).collect();
        assert!(
            names.len() == PODS.len(),
            "two pods share a cali name: {names:?}"
        );
        for n in &names {
            assert!(
                n.len() == 15,
                "{n} is not 15 characters (IFNAMSIZ - 1, as Calico's names are)"
            );
        }
    }

    #[test]
    fn every_pod_namespace_is_declared_and_addresses_are_unique() {
        let mut hosts = std::collections::BTreeSet::new();
        for p in PODS {
            assert!(
                NAMESPACES.contains(&p.namespace),
                "{} is in undeclared namespace {}",
                p.name,
                p.namespace
            );
            assert!(hosts.insert(p.host), "{} reuses address {}", p.name, p.ip());
        }
    }

    #[test]
    fn seed_policies_are_the_five_of_the_seed() {
        let count = SEED_POLICIES.matches("kind: NetworkPolicy").count();
        assert!(
            count == 5,
            "expected the seed's 5 NetworkPolicies, found {count}"
        );
    }
}
