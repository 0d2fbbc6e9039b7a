//! Who the two ends of a flow are, for labels, logs and explanations alike: pods by namespace and
//! workload, and every other address by what it is (node, API server, Service, ingress, world).
//! One classifier, so `check` and the daemon name a flow the same. Also which destination ports
//! are worth a label value of their own, so the `dst_port` label stays bounded.

use std::net::IpAddr;

use serde::Serialize;

use super::Cluster;
use crate::inventory::Owner;
use crate::vocab::{ObjectKey, Protocol};

/// A pod peer, as the labels and the log line name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodPeer {
    pub namespace: String,
    pub name: String,
    /// The workload's name (Deployment, `StatefulSet`, `DaemonSet`, Job, or the pod itself).
    pub workload: String,
    /// The node it is scheduled on, when known.
    pub node: Option<String>,
}

/// What one end of a flow is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    Pod(PodPeer),
    /// A node's address: host processes and hostNetwork pods. `name` is empty for a hostNetwork
    /// pod not scheduled on a known node.
    Node {
        name: String,
    },
    /// The API server: an address of the `default/kubernetes` `EndpointSlice`, reached on one of
    /// its ports when the address is also a node's.
    KubeApiserver,
    /// A Service `ClusterIP` the flow was seen addressed to, before translation. `workload` is
    /// what its ready endpoints run when they are all one workload (so the series matches the
    /// one a translated flow gets), else the Service's name.
    Service {
        namespace: String,
        name: String,
        workload: String,
    },
    /// An address of the `ingress` entity (configuration CIDRs).
    Ingress,
    /// An address inside a node's pod CIDR that no known pod holds (yet): a pod the watch has
    /// not delivered, or one just deleted. Labelled `cluster`.
    Unknown,
    /// Anything else.
    World,
}

impl Peer {
    /// The `*_namespace` label value: the pod's or Service's namespace, empty otherwise.
    #[must_use]
    pub fn namespace_label(&self) -> &str {
        match self {
            Self::Pod(pod) => &pod.namespace,
            Self::Service { namespace, .. } => namespace,
            Self::Node { .. }
            | Self::KubeApiserver
            | Self::Ingress
            | Self::Unknown
            | Self::World => "",
        }
    }

    /// The `*_workload` label value: the pod's workload, the Service's endpoints' workload, or
    /// what the peer is.
    #[must_use]
    pub fn workload_label(&self) -> &str {
        match self {
            Self::Pod(pod) => &pod.workload,
            Self::Service { workload, .. } => workload,
            Self::Node { .. } => "node",
            Self::KubeApiserver => "kube-apiserver",
            Self::Ingress => "ingress",
            Self::Unknown => "cluster",
            Self::World => "world",
        }
    }

    /// The kind of peer, for the log line and explanations.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pod(_) => "pod",
            Self::Node { .. } => "node",
            Self::KubeApiserver => "kube-apiserver",
            Self::Service { .. } => "service",
            Self::Ingress => "ingress",
            Self::Unknown => "cluster",
            Self::World => "world",
        }
    }

    /// The node a pod or node peer is bound to, for the counting rule.
    #[must_use]
    pub fn node(&self) -> Option<&str> {
        match self {
            Self::Pod(pod) => pod.node.as_deref(),
            Self::Node { name } if !name.is_empty() => Some(name),
            _ => None,
        }
    }
}

/// A peer as `check` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerInfo {
    /// `pod`, `node`, `kube-apiserver`, `service`, `ingress`, `cluster` or `world`.
    pub kind: &'static str,
    /// Empty for non-pods.
    pub namespace: String,
    /// The pod, node or Service name; the node for an API server on a node.
    pub name: String,
    /// The workload for pods, else what the peer is (`world`, `node`, ...).
    pub workload: String,
}

impl Cluster {
    /// What `ip` is when reached on `port` (`None`: the port is not known, such as a flow
    /// line's source). The API server is an address, and where that address is also a node's,
    /// an address and one of its ports (on k3s and kubeadm clusters it listens on a node
    /// address, whose other ports, and whose outgoing connections, are the node's).
    #[must_use]
    pub fn peer(&self, ip: IpAddr, port: Option<u16>) -> Peer {
        let inventory = self.inventory();
        match inventory.owner(ip) {
            Some(Owner::Pod(id)) => {
                if let Some(pod) = inventory.pod(id) {
                    if pod.host_network {
                        // Seen as its node's address (SPEC 4.1).
                        return Peer::Node {
                            name: pod.node.clone().unwrap_or_default(),
                        };
                    }
                    return Peer::Pod(PodPeer {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        workload: pod.workload.name.clone(),
                        node: pod.node.clone(),
                    });
                }
            }
            Some(Owner::Service(id)) => {
                if let Some(service) = inventory.service(id) {
                    let key = service.key();
                    return Peer::Service {
                        workload: inventory
                            .endpoint_workload(&key)
                            .map_or_else(|| service.name.clone(), str::to_owned),
                        namespace: key.namespace,
                        name: key.name,
                    };
                }
            }
            Some(Owner::Node(id)) => {
                if port.is_some_and(|p| inventory.is_apiserver_endpoint(ip, p)) {
                    return Peer::KubeApiserver;
                }
                if let Some(node) = inventory.node(id) {
                    return Peer::Node {
                        name: node.name.clone(),
                    };
                }
            }
            None => {}
        }
        if inventory.is_apiserver_address(ip) {
            Peer::KubeApiserver
        } else if self.is_ingress_address(ip) {
            Peer::Ingress
        } else if inventory.in_pod_cidr(ip) {
            Peer::Unknown
        } else {
            Peer::World
        }
    }

    /// A peer as `check` prints it.
    #[must_use]
    pub fn peer_info(&self, ip: IpAddr, port: Option<u16>) -> PeerInfo {
        let peer = self.peer(ip, port);
        let (namespace, name) = match &peer {
            Peer::Pod(pod) => (pod.namespace.clone(), pod.name.clone()),
            Peer::Service {
                namespace, name, ..
            } => (namespace.clone(), name.clone()),
            Peer::Node { name } => (String::new(), name.clone()),
            Peer::KubeApiserver => {
                let node = match self.inventory().owner(ip) {
                    Some(Owner::Node(id)) => self.inventory().node(id).map(|n| n.name.clone()),
                    _ => None,
                };
                (String::new(), node.unwrap_or_default())
            }
            Peer::Ingress | Peer::Unknown | Peer::World => (String::new(), String::new()),
        };
        PeerInfo {
            kind: peer.kind(),
            namespace,
            name,
            workload: peer.workload_label().to_owned(),
        }
    }

    /// Whether `ip` is a ready endpoint address of the Service `namespace/name`.
    #[must_use]
    pub fn is_endpoint_of(&self, namespace: &str, name: &str, ip: IpAddr) -> bool {
        self.inventory()
            .is_endpoint_of(&ObjectKey::new(namespace, name), ip)
    }

    /// The `dst_port` label: the port when the destination declares it (a container port of the
    /// pod, a port of the Service, the API server's) or a policy names it, `None` (`other`)
    /// otherwise.
    #[must_use]
    pub fn port_label(&self, dst: &Peer, ip: IpAddr, protocol: Protocol, port: u16) -> Option<u16> {
        // ICMP "ports" are echo identifiers: never a meaningful label.
        if protocol.is_icmp() {
            return None;
        }
        let inventory = self.inventory();
        let declared = match dst {
            Peer::Pod(_) => match inventory.owner(ip) {
                Some(Owner::Pod(id)) => inventory.pod(id).is_some_and(|p| {
                    p.ports
                        .iter()
                        .any(|c| c.port == port && c.protocol == protocol)
                }),
                _ => false,
            },
            Peer::Service { .. } => match inventory.owner(ip) {
                Some(Owner::Service(id)) => inventory.service(id).is_some_and(|s| {
                    s.ports
                        .iter()
                        .any(|p| p.port == port && p.protocol == protocol)
                }),
                _ => false,
            },
            Peer::KubeApiserver => true,
            Peer::Node { .. } | Peer::Ingress | Peer::Unknown | Peer::World => false,
        };
        (declared || self.named_ports().contains(protocol, port)).then_some(port)
    }
}
