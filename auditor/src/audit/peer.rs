//! Who the two ends of a flow are, for labels and logs: pods by namespace and workload, and every
//! other address by what it is (node, API server, Service, ingress, world). Also which destination
//! ports are worth a label value of their own, so the `dst_port` label stays bounded.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::inventory::{Inventory, ObjectKey, Owner};
use crate::policy::ir::{CompiledPolicy, PortSpec, Protocol};

/// A pod peer, as the labels and the log line name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodPeer {
    pub namespace: String,
    pub name: String,
    /// The workload's name (Deployment, StatefulSet, DaemonSet, Job, or the pod itself).
    pub workload: String,
    /// The node it is scheduled on, when known.
    pub node: Option<String>,
}

/// What one end of a flow is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    Pod(PodPeer),
    /// A node's address: host processes and hostNetwork pods.
    Node {
        name: String,
    },
    /// An API server endpoint (address and port of the `default/kubernetes` EndpointSlice).
    KubeApiserver,
    /// A Service ClusterIP the flow was seen addressed to, before translation. `workload` is
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
    /// not delivered, or one just deleted. Labelled `cluster`, as `auditor check` names it.
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

    /// The kind of peer, for the log line.
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
}

/// Resolves addresses to peers against the inventory and the `ingress` entity's CIDRs.
#[derive(Clone, Copy, Debug)]
pub struct Resolver<'a> {
    pub inventory: &'a Inventory,
    pub ingress: &'a [IpNet],
}

impl Resolver<'_> {
    /// What `ip` is, when reached on `port` (the API server is an address *and* a port: on
    /// k3s and kubeadm clusters it listens on a node address, whose other ports are the node's).
    #[must_use]
    pub fn resolve(&self, ip: IpAddr, port: u16) -> Peer {
        // Pods and Services first: they are most flows, and never API server endpoints here.
        match self.inventory.owner(ip) {
            Some(Owner::Pod(id)) => {
                if let Some(pod) = self.inventory.pod(id) {
                    return Peer::Pod(PodPeer {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        workload: pod.workload.name.clone(),
                        node: pod.node.clone(),
                    });
                }
            }
            Some(Owner::Service(id)) => {
                if let Some(service) = self.inventory.service(id) {
                    return Peer::Service {
                        namespace: service.namespace.clone(),
                        name: service.name.clone(),
                        workload: self
                            .endpoint_workload(&service.namespace, &service.name)
                            .unwrap_or_else(|| service.name.clone()),
                    };
                }
            }
            Some(Owner::Node(id)) => {
                if self.is_apiserver(ip, port) {
                    return Peer::KubeApiserver;
                }
                if let Some(node) = self.inventory.node(id) {
                    return Peer::Node {
                        name: node.name.clone(),
                    };
                }
            }
            None => {}
        }
        if self.is_apiserver(ip, port) {
            Peer::KubeApiserver
        } else if self.ingress.iter().any(|net| net.contains(&ip)) {
            Peer::Ingress
        } else if self.inventory.in_pod_cidr(ip) {
            Peer::Unknown
        } else {
            Peer::World
        }
    }

    /// The one workload every ready endpoint of a Service runs, if there is exactly one.
    fn endpoint_workload(&self, namespace: &str, name: &str) -> Option<String> {
        let slices = self
            .inventory
            .endpoint_slices(&ObjectKey::new(namespace, name))?;
        let mut workload: Option<&str> = None;
        for ip in slices
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.ready)
            .flat_map(|e| e.addresses.iter())
        {
            let Some(Owner::Pod(id)) = self.inventory.owner(*ip) else {
                return None;
            };
            let this = self.inventory.pod(id)?.workload.name.as_str();
            match workload {
                Some(w) if w != this => return None,
                _ => workload = Some(this),
            }
        }
        workload.map(str::to_owned)
    }

    fn is_apiserver(&self, ip: IpAddr, port: u16) -> bool {
        let service = ObjectKey::new("default", "kubernetes");
        self.inventory
            .endpoint_slices(&service)
            .unwrap_or_default()
            .iter()
            .any(|slice| {
                let port_fits =
                    slice.ports.is_empty() || slice.ports.iter().any(|p| p.port == port);
                port_fits && slice.endpoints.iter().any(|e| e.addresses.contains(&ip))
            })
    }

    /// Whether `ip` is a ready endpoint address of the Service `namespace/name`: the endpoint a
    /// ClusterIP flow was translated to, when both records are seen.
    #[must_use]
    pub fn is_endpoint_of(&self, namespace: &str, name: &str, ip: IpAddr) -> bool {
        let service = ObjectKey::new(namespace, name);
        if let Some(slices) = self.inventory.endpoint_slices(&service) {
            return slices
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .any(|e| e.ready && e.addresses.contains(&ip));
        }
        // No slices (a snapshot without them): the Service's selector picks its pods.
        let Some(selector) = self
            .inventory
            .services()
            .find(|(_, s)| s.namespace == namespace && s.name == name)
            .and_then(|(_, s)| s.selector.clone())
        else {
            return false;
        };
        self.inventory.pods().any(|(_, pod)| {
            pod.namespace == namespace
                && pod.ips.contains(&ip)
                && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
        })
    }

    /// The `dst_port` label: the port when the destination declares it (a container port of the
    /// pod, a port of the Service) or a policy names it, `None` (`other`) otherwise.
    #[must_use]
    pub fn port_label(
        &self,
        dst: &Peer,
        ip: IpAddr,
        protocol: Protocol,
        port: u16,
        named: &NamedPorts,
    ) -> Option<u16> {
        // ICMP "ports" are echo identifiers: never a meaningful label.
        if protocol == Protocol::Icmp {
            return None;
        }
        let declared = match dst {
            Peer::Pod(_) => match self.inventory.owner(ip) {
                Some(Owner::Pod(id)) => self.inventory.pod(id).is_some_and(|p| {
                    p.ports
                        .iter()
                        .any(|c| c.port == port && c.protocol == protocol)
                }),
                _ => false,
            },
            Peer::Service { .. } => match self.inventory.owner(ip) {
                Some(Owner::Service(id)) => self.inventory.service(id).is_some_and(|s| {
                    s.ports
                        .iter()
                        .any(|p| p.port == port && p.protocol == protocol)
                }),
                _ => false,
            },
            Peer::KubeApiserver => true,
            Peer::Node { .. } | Peer::Ingress | Peer::Unknown | Peer::World => false,
        };
        (declared || named.contains(protocol, port)).then_some(port)
    }
}

/// Ports the policies name explicitly, per protocol. A range counts only when it is short, so a
/// policy allowing `1024-65535` cannot blow up the label set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamedPorts {
    ports: HashSet<(Option<Protocol>, u16)>,
}

/// The widest port range whose ports get label values of their own.
pub const MAX_LABELLED_RANGE: u16 = 16;

impl NamedPorts {
    /// Collects the numbered ports of every rule of `policies`.
    pub fn from_policies<'a>(policies: impl IntoIterator<Item = &'a CompiledPolicy>) -> Self {
        let mut ports = HashSet::new();
        for policy in policies {
            for rule in &policy.rules {
                for m in &rule.ports {
                    if let PortSpec::Range(first, last) = m.port
                        && last >= first
                        && last - first < MAX_LABELLED_RANGE
                    {
                        ports.extend((first..=last).map(|p| (m.protocol, p)));
                    }
                }
            }
        }
        Self { ports }
    }

    /// Whether some policy names `port` for `protocol` (or for any protocol).
    #[must_use]
    pub fn contains(&self, protocol: Protocol, port: u16) -> bool {
        self.ports.contains(&(Some(protocol), port)) || self.ports.contains(&(None, port))
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }
}
