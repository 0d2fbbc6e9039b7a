//! The cluster as the auditor judges it: the inventory (who is who) and the policy model (what
//! is intended) joined. Changes from any source are applied to both stores here; pods get their
//! policy identities, and every address the inventory knows is resolved once into what the
//! policy model needs to know of it ([`Side`]), so judging a flow costs one lookup per end.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;
use slotmap::SecondaryMap;

use super::cache::VerdictCache;
use super::named_ports::NamedPorts;
use crate::inventory::{
    EndpointSlice, Inventory, Namespace, Node, Owner, Pod, PodId, Service, ServiceId,
};
use crate::policy::ir::{CompiledPolicy, PolicyKey};
use crate::policy::model::{self, IdentityId, IpBlockReading, NodeTag};
use crate::source::Change;
use crate::vocab::ObjectKey;

/// What the judging needs beyond the cluster's objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterConfig {
    pub ipblock: IpBlockReading,
    /// The addresses of Cilium's `ingress` entity (the configuration file's).
    pub ingress: Vec<IpNet>,
}

/// One end of a flow, resolved.
#[derive(Clone, Copy, Debug)]
pub(super) enum Side {
    Pod {
        identity: IdentityId,
        node: Option<NodeTag>,
    },
    /// A node address (or a hostNetwork pod's); the node is unknown when only a hostNetwork pod
    /// without `nodeName` claims it.
    Node {
        node: Option<NodeTag>,
    },
    Service(ServiceId),
    External,
}

impl Side {
    /// What the policy model is told of this end.
    pub(super) const fn endpoint(self) -> model::Endpoint {
        match self {
            Self::Pod { identity, node, .. } => model::Endpoint::Pod { identity, node },
            Self::Node { node } => model::Endpoint::Node { node },
            Self::Service(_) | Self::External => model::Endpoint::Other,
        }
    }
}

/// Node names as tags, so comparing nodes on the hot path compares integers.
#[derive(Clone, Debug, Default)]
struct NodeTags {
    ids: HashMap<String, NodeTag>,
    next: u32,
}

impl NodeTags {
    fn of(&mut self, name: &str) -> NodeTag {
        if let Some(&tag) = self.ids.get(name) {
            return tag;
        }
        let tag = NodeTag(self.next);
        self.next += 1;
        self.ids.insert(name.to_owned(), tag);
        tag
    }
}

/// The inventory and the policy model, joined.
#[derive(Clone, Debug)]
pub struct Cluster {
    inventory: Inventory,
    policy: model::Model,
    ingress: Vec<IpNet>,
    pod_identity: SecondaryMap<PodId, IdentityId>,
    /// Every address the inventory knows, resolved.
    sides: FxHashMap<IpAddr, Side>,
    nodes: NodeTags,
    pub(super) cache: VerdictCache,
    named_ports: NamedPorts,
    /// The policy generation `named_ports` were collected at.
    named_ports_of: u64,
    generation: u64,
}

impl Cluster {
    #[must_use]
    pub fn new(config: ClusterConfig) -> Self {
        let ClusterConfig { ipblock, ingress } = config;
        Self {
            inventory: Inventory::new(),
            policy: model::Model::new(ipblock),
            ingress,
            pod_identity: SecondaryMap::new(),
            sides: FxHashMap::default(),
            nodes: NodeTags::default(),
            cache: VerdictCache::default(),
            named_ports: NamedPorts::default(),
            named_ports_of: 0,
            generation: 0,
        }
    }

    /// A cluster built from changes (a snapshot), applied in order.
    #[must_use]
    pub fn from_changes(config: ClusterConfig, changes: impl IntoIterator<Item = Change>) -> Self {
        let mut cluster = Self::new(config);
        for change in changes {
            cluster.apply(change);
        }
        cluster.refresh();
        cluster.shrink_to_fit();
        cluster
    }

    #[must_use]
    pub const fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    #[must_use]
    pub const fn policy(&self) -> &model::Model {
        &self.policy
    }

    /// Bumped by every change.
    #[must_use]
    pub const fn generation(&self) -> u64 {
        self.generation
    }

    #[must_use]
    pub fn policy_count(&self) -> usize {
        self.policy.policy_count()
    }

    pub(super) fn is_ingress_address(&self, ip: IpAddr) -> bool {
        self.ingress.iter().any(|c| c.contains(&ip))
    }

    /// Gives back the room that growing one object at a time left over: for after a bulk load.
    pub fn shrink_to_fit(&mut self) {
        self.inventory.shrink_to_fit();
        self.policy.shrink_to_fit();
        self.sides.shrink_to_fit();
    }

    /// Rebuilds what changes left to be rebuilt (Service endpoints, the ports policies name):
    /// after a batch of changes, before judging. Judging without it is right, only slower.
    pub fn refresh(&mut self) {
        self.inventory.refresh();
        if self.named_ports_of != self.policy.generation() {
            self.named_ports = NamedPorts::from_rules(self.policy.rules());
            self.named_ports_of = self.policy.generation();
        }
    }

    /// The ports the policies name (see [`Cluster::refresh`]).
    pub(super) fn named_ports(&self) -> std::borrow::Cow<'_, NamedPorts> {
        if self.named_ports_of == self.policy.generation() {
            std::borrow::Cow::Borrowed(&self.named_ports)
        } else {
            std::borrow::Cow::Owned(NamedPorts::from_rules(self.policy.rules()))
        }
    }

    fn changed(&mut self) {
        self.generation += 1;
        self.cache.clear();
    }

    /// Applies one change to both stores.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Namespace(o) => self.upsert_namespace(o),
            Change::NamespaceRemoved(name) => self.remove_namespace(&name),
            Change::Pod(o) => self.upsert_pod(o),
            Change::PodRemoved(key) => self.remove_pod(&key),
            Change::Node(o) => self.upsert_node(o),
            Change::NodeRemoved(name) => self.remove_node(&name),
            Change::Service(o) => self.upsert_service(o),
            Change::ServiceRemoved(key) => self.remove_service(&key),
            Change::EndpointSlice(o) => self.upsert_endpoint_slice(o),
            Change::EndpointSliceRemoved(key) => self.remove_endpoint_slice(&key),
            Change::Policy(p) => self.upsert_policy(p),
            Change::PolicyRemoved(key) => self.remove_policy(&key),
        }
    }

    pub fn upsert_namespace(&mut self, namespace: Namespace) {
        let name = namespace.name.clone();
        self.inventory.upsert_namespace(namespace);
        self.policy
            .set_namespace_labels(&name, self.inventory.namespace_labels(&name));
        self.changed();
    }

    pub fn remove_namespace(&mut self, name: &str) {
        self.inventory.remove_namespace(name);
        self.policy
            .set_namespace_labels(name, self.inventory.namespace_labels(name));
        self.changed();
    }

    pub fn upsert_pod(&mut self, pod: Pod) {
        let (namespace, labels, ports) =
            (pod.namespace.clone(), pod.labels.clone(), pod.ports.clone());
        let mut ips = pod.ips.clone();
        let (id, old) = self.inventory.upsert_pod(pod);
        ips.extend(old.into_iter().flat_map(|o| o.ips));
        // The new identity first, so a pod that keeps its identity does not tear it down.
        let identity = self.policy.acquire_identity(namespace, labels, ports);
        if let Some(old) = self.pod_identity.insert(id, identity) {
            self.policy.release_identity(old);
        }
        self.reindex(&ips);
        self.changed();
    }

    pub fn remove_pod(&mut self, key: &ObjectKey) {
        if let Some((id, old)) = self.inventory.remove_pod(key) {
            self.reindex(&old.ips);
            if let Some(identity) = self.pod_identity.remove(id) {
                self.policy.release_identity(identity);
            }
            self.changed();
        }
    }

    fn node_addresses(&self, name: &str) -> Vec<IpAddr> {
        self.inventory
            .node_id(name)
            .and_then(|id| self.inventory.node(id))
            .map(|n| n.addresses.clone())
            .unwrap_or_default()
    }

    pub fn upsert_node(&mut self, node: Node) {
        let mut ips = node.addresses.clone();
        if let Some(old) = self.inventory.upsert_node(node) {
            ips.extend(old.addresses);
        }
        self.reindex(&ips);
        self.changed();
    }

    pub fn remove_node(&mut self, name: &str) {
        let ips = self.node_addresses(name);
        if self.inventory.remove_node(name).is_some() {
            self.reindex(&ips);
            self.changed();
        }
    }

    pub fn upsert_service(&mut self, service: Service) {
        let mut ips = service.cluster_ips.clone();
        if let Some(old) = self.inventory.upsert_service(service) {
            ips.extend(old.cluster_ips);
        }
        self.reindex(&ips);
        self.changed();
    }

    pub fn remove_service(&mut self, key: &ObjectKey) {
        if let Some(old) = self.inventory.remove_service(key) {
            self.reindex(&old.cluster_ips);
            self.changed();
        }
    }

    pub fn upsert_endpoint_slice(&mut self, slice: EndpointSlice) {
        self.inventory.upsert_endpoint_slice(slice);
        self.changed();
    }

    pub fn remove_endpoint_slice(&mut self, key: &ObjectKey) {
        self.inventory.remove_endpoint_slice(key);
        self.changed();
    }

    /// Adds or replaces a policy (matched by its key).
    pub fn upsert_policy(&mut self, policy: CompiledPolicy) {
        self.policy.upsert_policy(policy);
        self.changed();
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) {
        self.policy.remove_policy(key);
        self.changed();
    }

    /// Resolves again addresses whose owners may have changed.
    fn reindex(&mut self, ips: &[IpAddr]) {
        for &ip in ips {
            let side = match self.inventory.owner(ip) {
                Some(Owner::Node(id)) => Side::Node {
                    node: self
                        .inventory
                        .node(id)
                        .map(|n| n.name.clone())
                        .map(|name| self.nodes.of(&name)),
                },
                Some(Owner::Pod(pod_id)) => {
                    let Some(pod) = self.inventory.pod(pod_id) else {
                        self.sides.remove(&ip);
                        continue;
                    };
                    let host_network = pod.host_network;
                    let node = pod.node.clone().map(|n| self.nodes.of(&n));
                    if host_network {
                        Side::Node { node }
                    } else if let Some(&identity) = self.pod_identity.get(pod_id) {
                        Side::Pod { identity, node }
                    } else {
                        self.sides.remove(&ip);
                        continue;
                    }
                }
                Some(Owner::Service(id)) => Side::Service(id),
                None => {
                    self.sides.remove(&ip);
                    continue;
                }
            };
            self.sides.insert(ip, side);
        }
    }

    pub(super) fn resolve(&self, ip: IpAddr) -> Side {
        self.sides.get(&ip).copied().unwrap_or(Side::External)
    }
}
