//! Who is who: pods, nodes, services and the API server by address, kept as plain facts.
//! Pure and incremental (the daemon feeds it watch events, `check` feeds it files through `load`);
//! `k8s` turns Kubernetes objects into these facts; `kube` watches them in the API.

pub mod k8s;
pub mod kube;
pub mod load;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;

use crate::vocab::Protocol;
pub use crate::vocab::{
    CILIUM_SERVICE_ACCOUNT_LABEL, ContainerPort, Labels, NAMESPACE_NAME_LABEL, ObjectKey,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// What runs a pod, from its controller owner reference (a ReplicaSet's hash suffix stripped so
/// the Deployment is named); a bare pod is its own workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub workload: Workload,
    pub node: Option<String>,
    /// A hostNetwork pod has its node's addresses and is judged as that node.
    pub host_network: bool,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// InternalIP and ExternalIP addresses.
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Empty for headless Services (their flows go to pod addresses directly).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `None`: endpoints are managed by hand (EndpointSlices only).
    pub selector: Option<Labels>,
}

impl Service {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub target: TargetPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// An EndpointSlice (or a legacy Endpoints object, turned into one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
}

/// Stable index of a pod while it exists (reused after deletion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodId(pub u32);

/// Stable index of a node while it exists (reused after deletion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// What an address belongs to, most specific first: a node address shadows a hostNetwork pod's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Node(NodeId),
    Pod(PodId),
    Service(ServiceId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub u32);

/// Pods by namespace and name. Holds only ids: keys are hashed and compared through the pods
/// themselves, so names are not stored a second time (with 10,000 pods that was a megabyte).
#[derive(Clone, Debug, Default)]
struct PodIndex(hashbrown::HashTable<PodId>);

impl PodIndex {
    fn hash(namespace: &str, name: &str) -> u64 {
        let mut h = rustc_hash::FxHasher::default();
        namespace.hash(&mut h);
        name.hash(&mut h);
        h.finish()
    }

    fn hash_pod(pod: &Pod) -> u64 {
        Self::hash(&pod.namespace, &pod.name)
    }

    fn is(pods: &Slab<Pod>, id: PodId, key: &ObjectKey) -> bool {
        pods.get(id.0)
            .is_some_and(|p| p.namespace == key.namespace && p.name == key.name)
    }

    fn get(&self, pods: &Slab<Pod>, key: &ObjectKey) -> Option<PodId> {
        self.0
            .find(Self::hash(&key.namespace, &key.name), |&id| {
                Self::is(pods, id, key)
            })
            .copied()
    }

    /// Indexes `id`, which `pods` already holds under `key`.
    fn insert(&mut self, pods: &Slab<Pod>, key: &ObjectKey, id: PodId) {
        self.0
            .insert_unique(Self::hash(&key.namespace, &key.name), id, |&other| {
                pods.get(other.0).map_or(0, Self::hash_pod)
            });
    }

    /// Call before the pod leaves `pods`.
    fn remove(&mut self, pods: &Slab<Pod>, key: &ObjectKey) -> Option<PodId> {
        self.0
            .find_entry(Self::hash(&key.namespace, &key.name), |&id| {
                Self::is(pods, id, key)
            })
            .ok()
            .map(|entry| entry.remove().0)
    }
}

/// A slab: ids stay valid until their object is deleted, and deleted slots are reused.
#[derive(Clone, Debug)]
struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, value: T) -> u32 {
        if let Some(id) = self.free.pop() {
            self.slots[id as usize] = Some(value);
            id
        } else {
            self.slots.push(Some(value));
            u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
        }
    }

    fn remove(&mut self, id: u32) -> Option<T> {
        let value = self.slots.get_mut(id as usize)?.take();
        if value.is_some() {
            self.free.push(id);
        }
        value
    }

    fn get(&self, id: u32) -> Option<&T> {
        self.slots.get(id as usize)?.as_ref()
    }

    fn shrink_to_fit(&mut self) {
        self.slots.shrink_to_fit();
        self.free.shrink_to_fit();
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((u32::try_from(i).ok()?, v.as_ref()?)))
    }
}

/// What changed, so the policy model refreshes only what depends on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Pod { id: PodId, old: Option<Pod> },
    PodRemoved { id: PodId, old: Pod },
    Namespace(String),
    Other,
}

/// The facts about the cluster and the address index derived from them.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    namespaces: HashMap<String, Namespace>,
    pods: Slab<Pod>,
    pod_ids: PodIndex,
    pods_by_namespace: HashMap<String, Vec<PodId>>,
    nodes: Slab<Node>,
    node_ids: HashMap<String, NodeId>,
    services: Slab<Service>,
    service_ids: HashMap<ObjectKey, ServiceId>,
    slices: HashMap<ObjectKey, EndpointSlice>,
    /// Slices by the Service they belong to.
    slices_by_service: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// Every owner claiming an address; [`Inventory::owner`] picks the most specific.
    addresses: FxHashMap<IpAddr, Vec<Owner>>,
    generation: u64,
}

fn remove_owner(map: &mut FxHashMap<IpAddr, Vec<Owner>>, ip: IpAddr, owner: Owner) {
    if let Some(owners) = map.get_mut(&ip) {
        owners.retain(|o| *o != owner);
        if owners.is_empty() {
            map.remove(&ip);
        }
    }
}

impl Inventory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives back the room that growing one object at a time left over (up to half of each
    /// table): for after a bulk load.
    pub fn shrink_to_fit(&mut self) {
        self.pods.shrink_to_fit();
        self.pod_ids
            .0
            .shrink_to_fit(|id| self.pods.get(id.0).map_or(0, PodIndex::hash_pod));
        self.pods_by_namespace.shrink_to_fit();
        for ids in self.pods_by_namespace.values_mut() {
            ids.shrink_to_fit();
        }
        self.nodes.shrink_to_fit();
        self.node_ids.shrink_to_fit();
        self.services.shrink_to_fit();
        self.service_ids.shrink_to_fit();
        self.slices.shrink_to_fit();
        self.slices_by_service.shrink_to_fit();
        self.addresses.shrink_to_fit();
        self.namespaces.shrink_to_fit();
    }

    /// Bumped on every change; caches built on the inventory compare it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn upsert_namespace(&mut self, namespace: Namespace) -> Change {
        self.generation += 1;
        let name = namespace.name.clone();
        self.namespaces.insert(name.clone(), namespace);
        Change::Namespace(name)
    }

    pub fn remove_namespace(&mut self, name: &str) -> Change {
        self.generation += 1;
        self.namespaces.remove(name);
        Change::Namespace(name.to_owned())
    }

    /// A namespace's labels; one that was never seen still has its name label, as the API
    /// server would give it.
    pub fn namespace_labels(&self, name: &str) -> Labels {
        match self.namespaces.get(name) {
            Some(ns) => {
                let mut labels = ns.labels.clone();
                if !labels.contains_key(NAMESPACE_NAME_LABEL) {
                    labels.insert(NAMESPACE_NAME_LABEL, name);
                }
                labels
            }
            None => Labels::from([(NAMESPACE_NAME_LABEL, name)]),
        }
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    /// Addresses a pod claims. A hostNetwork pod's are its node's: a Node object claiming them
    /// wins in [`Inventory::owner`], and without one the policy model still sees a node.
    fn pod_addresses(pod: &Pod) -> &[IpAddr] {
        &pod.ips
    }

    pub fn upsert_pod(&mut self, pod: Pod) -> Change {
        self.generation += 1;
        let key = pod.key();
        if let Some(id) = self.pod_ids.get(&self.pods, &key) {
            let old = self.pods.slots[id.0 as usize].replace(pod);
            if let Some(old) = &old {
                for &ip in Self::pod_addresses(old) {
                    remove_owner(&mut self.addresses, ip, Owner::Pod(id));
                }
            }
            self.index_pod(id);
            Change::Pod { id, old }
        } else {
            let id = PodId(self.pods.insert(pod));
            self.pods_by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .push(id);
            self.pod_ids.insert(&self.pods, &key, id);
            self.index_pod(id);
            Change::Pod { id, old: None }
        }
    }

    fn index_pod(&mut self, id: PodId) {
        if let Some(pod) = self.pods.get(id.0) {
            for &ip in Self::pod_addresses(pod) {
                self.addresses.entry(ip).or_default().push(Owner::Pod(id));
            }
        }
    }

    pub fn remove_pod(&mut self, key: &ObjectKey) -> Option<Change> {
        let id = self.pod_ids.remove(&self.pods, key)?;
        self.generation += 1;
        let old = self.pods.remove(id.0)?;
        if let Some(ids) = self.pods_by_namespace.get_mut(&key.namespace) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.pods_by_namespace.remove(&key.namespace);
            }
        }
        for &ip in Self::pod_addresses(&old) {
            remove_owner(&mut self.addresses, ip, Owner::Pod(id));
        }
        Some(Change::PodRemoved { id, old })
    }

    pub fn pod(&self, id: PodId) -> Option<&Pod> {
        self.pods.get(id.0)
    }

    pub fn pod_id(&self, key: &ObjectKey) -> Option<PodId> {
        self.pod_ids.get(&self.pods, key)
    }

    pub fn pods_in_namespace(&self, namespace: &str) -> impl Iterator<Item = (PodId, &Pod)> {
        self.pods_by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(|&id| Some((id, self.pods.get(id.0)?)))
    }

    pub fn pods(&self) -> impl Iterator<Item = (PodId, &Pod)> {
        self.pods.iter().map(|(i, p)| (PodId(i), p))
    }

    pub fn upsert_node(&mut self, node: Node) -> Change {
        self.generation += 1;
        let name = node.name.clone();
        let id = match self.node_ids.get(&name) {
            Some(&id) => {
                if let Some(old) = self.nodes.slots[id.0 as usize].replace(node) {
                    for &ip in &old.addresses {
                        remove_owner(&mut self.addresses, ip, Owner::Node(id));
                    }
                }
                id
            }
            None => {
                let id = NodeId(self.nodes.insert(node));
                self.node_ids.insert(name, id);
                id
            }
        };
        if let Some(node) = self.nodes.get(id.0) {
            for &ip in &node.addresses {
                self.addresses.entry(ip).or_default().push(Owner::Node(id));
            }
        }
        Change::Other
    }

    pub fn remove_node(&mut self, name: &str) -> Change {
        if let Some(id) = self.node_ids.remove(name) {
            self.generation += 1;
            if let Some(old) = self.nodes.remove(id.0) {
                for &ip in &old.addresses {
                    remove_owner(&mut self.addresses, ip, Owner::Node(id));
                }
            }
        }
        Change::Other
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.0)
    }

    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.node_ids.get(name).copied()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes.iter().map(|(i, n)| (NodeId(i), n))
    }

    pub fn upsert_service(&mut self, service: Service) -> Change {
        self.generation += 1;
        let key = service.key();
        let id = match self.service_ids.get(&key) {
            Some(&id) => {
                if let Some(old) = self.services.slots[id.0 as usize].replace(service) {
                    for &ip in &old.cluster_ips {
                        remove_owner(&mut self.addresses, ip, Owner::Service(id));
                    }
                }
                id
            }
            None => {
                let id = ServiceId(self.services.insert(service));
                self.service_ids.insert(key, id);
                id
            }
        };
        if let Some(service) = self.services.get(id.0) {
            for &ip in &service.cluster_ips {
                self.addresses
                    .entry(ip)
                    .or_default()
                    .push(Owner::Service(id));
            }
        }
        Change::Other
    }

    pub fn remove_service(&mut self, key: &ObjectKey) -> Change {
        if let Some(id) = self.service_ids.remove(key) {
            self.generation += 1;
            if let Some(old) = self.services.remove(id.0) {
                for &ip in &old.cluster_ips {
                    remove_owner(&mut self.addresses, ip, Owner::Service(id));
                }
            }
        }
        Change::Other
    }

    pub fn service(&self, id: ServiceId) -> Option<&Service> {
        self.services.get(id.0)
    }

    pub fn services(&self) -> impl Iterator<Item = (ServiceId, &Service)> {
        self.services.iter().map(|(i, s)| (ServiceId(i), s))
    }

    pub fn upsert_endpoint_slice(&mut self, slice: EndpointSlice) -> Change {
        self.generation += 1;
        let key = slice.key();
        if let Some(old) = self.slices.insert(key.clone(), slice) {
            self.unlink_slice(&key, &old);
        }
        if let Some(slice) = self.slices.get(&key) {
            let service = ObjectKey::new(&slice.namespace, &slice.service);
            self.slices_by_service.entry(service).or_default().push(key);
        }
        Change::Other
    }

    fn unlink_slice(&mut self, key: &ObjectKey, slice: &EndpointSlice) {
        let service = ObjectKey::new(&slice.namespace, &slice.service);
        if let Some(keys) = self.slices_by_service.get_mut(&service) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.slices_by_service.remove(&service);
            }
        }
    }

    pub fn remove_endpoint_slice(&mut self, key: &ObjectKey) -> Change {
        if let Some(old) = self.slices.remove(key) {
            self.generation += 1;
            self.unlink_slice(key, &old);
        }
        Change::Other
    }

    /// The EndpointSlices of a Service, `None` when it has none (endpoints then come from its
    /// selector).
    pub fn endpoint_slices(&self, service: &ObjectKey) -> Option<Vec<&EndpointSlice>> {
        let keys = self.slices_by_service.get(service)?;
        Some(keys.iter().filter_map(|k| self.slices.get(k)).collect())
    }

    /// The API server's addresses: the endpoints of `default/kubernetes`.
    pub fn apiserver_addresses(&self) -> Vec<IpAddr> {
        let service = ObjectKey::new("default", "kubernetes");
        let mut out: Vec<IpAddr> = self
            .endpoint_slices(&service)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|s| s.endpoints.iter())
            .flat_map(|e| e.addresses.iter().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The most specific owner of an address.
    pub fn owner(&self, ip: IpAddr) -> Option<Owner> {
        let owners = self.addresses.get(&ip)?;
        owners
            .iter()
            .find(|o| matches!(o, Owner::Node(_)))
            .or_else(|| owners.iter().find(|o| matches!(o, Owner::Pod(_))))
            .or_else(|| owners.first())
            .copied()
    }

    /// Whether an address lies in a node's pod CIDR (a pod the inventory does not know yet).
    pub fn in_pod_cidr(&self, ip: IpAddr) -> bool {
        self.nodes
            .iter()
            .any(|(_, n)| n.pod_cidrs.iter().any(|c| c.contains(&ip)))
    }
}
