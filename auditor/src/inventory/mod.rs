//! The inventory store: who is who. Pods, nodes, Services, `EndpointSlices` and namespaces as
//! plain facts, the owners of every address, and what follows from several objects at once: the
//! API server's endpoints, the pod CIDRs, and the ready endpoints behind each Service port
//! (`services`). Pure and incremental: the sources feed it changes; [`k8s`] turns Kubernetes
//! objects into these facts. Nothing here knows about policies.

pub mod k8s;
mod services;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;
use slotmap::SlotMap;

use crate::vocab::{ContainerPort, Labels, NAMESPACE_NAME_LABEL, ObjectKey, Protocol};

pub use services::ServiceEndpoints;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// What runs a pod, from its controller owner reference (a `ReplicaSet`'s hash suffix stripped so
/// the Deployment is named); a bare pod is its own workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    pub name: String,
    /// `InternalIP` and `ExternalIP` addresses.
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Empty for headless Services (their flows go to pod addresses directly).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `None`: endpoints are managed by hand (`EndpointSlices` only).
    pub selector: Option<Labels>,
}

impl Service {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub target: TargetPort,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// An `EndpointSlice` (or a legacy Endpoints object, turned into one).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
}

slotmap::new_key_type! {
    /// A pod while it exists. Generational: an id kept past the pod's deletion finds nothing.
    pub struct PodId;
    /// A node while it exists.
    pub struct NodeId;
    /// A Service while it exists.
    pub struct ServiceId;
}

/// What an address belongs to, most specific first: a node address shadows a hostNetwork pod's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Node(NodeId),
    Pod(PodId),
    Service(ServiceId),
}

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

    fn is(pods: &SlotMap<PodId, Pod>, id: PodId, key: &ObjectKey) -> bool {
        pods.get(id)
            .is_some_and(|p| p.namespace == key.namespace && p.name == key.name)
    }

    fn get(&self, pods: &SlotMap<PodId, Pod>, key: &ObjectKey) -> Option<PodId> {
        self.0
            .find(Self::hash(&key.namespace, &key.name), |&id| {
                Self::is(pods, id, key)
            })
            .copied()
    }

    /// Indexes `id`, which `pods` already holds under `key`.
    fn insert(&mut self, pods: &SlotMap<PodId, Pod>, key: &ObjectKey, id: PodId) {
        self.0
            .insert_unique(Self::hash(&key.namespace, &key.name), id, |&other| {
                pods.get(other).map_or(0, Self::hash_pod)
            });
    }

    /// Call before the pod leaves `pods`.
    fn remove(&mut self, pods: &SlotMap<PodId, Pod>, key: &ObjectKey) -> Option<PodId> {
        self.0
            .find_entry(Self::hash(&key.namespace, &key.name), |&id| {
                Self::is(pods, id, key)
            })
            .ok()
            .map(|entry| entry.remove().0)
    }
}

/// The ports an API server address serves (`None`: every port, a slice without ports).
type ApiserverPorts = Option<Vec<u16>>;

/// The facts about the cluster and what is derived from them.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    namespaces: HashMap<String, Namespace>,
    pods: SlotMap<PodId, Pod>,
    pod_ids: PodIndex,
    pods_by_namespace: HashMap<String, Vec<PodId>>,
    nodes: SlotMap<NodeId, Node>,
    node_ids: HashMap<String, NodeId>,
    services: SlotMap<ServiceId, Service>,
    service_ids: HashMap<ObjectKey, ServiceId>,
    slices: HashMap<ObjectKey, EndpointSlice>,
    /// Slices by the Service they belong to.
    slices_by_service: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// Every owner claiming an address; [`Inventory::owner`] picks the most specific.
    addresses: FxHashMap<IpAddr, Vec<Owner>>,
    /// The endpoints of `default/kubernetes`, refreshed when slices change.
    apiserver: FxHashMap<IpAddr, ApiserverPorts>,
    /// Every node's pod CIDRs, refreshed when nodes change.
    pod_cidrs: Vec<IpNet>,
    /// Ready endpoints per Service port, rebuilt by [`Inventory::refresh`] after changes.
    endpoints: ServiceEndpoints,
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

fn add_owner(map: &mut FxHashMap<IpAddr, Vec<Owner>>, ip: IpAddr, owner: Owner) {
    map.entry(ip).or_default().push(owner);
}

/// The API server's Service, whose endpoints are the API server.
fn apiserver_service() -> ObjectKey {
    ObjectKey::new("default", "kubernetes")
}

impl Inventory {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives back the room that growing one object at a time left over (up to half of each
    /// table): for after a bulk load.
    pub fn shrink_to_fit(&mut self) {
        let pods = &self.pods;
        self.pod_ids
            .0
            .shrink_to_fit(|id| pods.get(*id).map_or(0, PodIndex::hash_pod));
        self.pods_by_namespace.shrink_to_fit();
        for ids in self.pods_by_namespace.values_mut() {
            ids.shrink_to_fit();
        }
        self.node_ids.shrink_to_fit();
        self.service_ids.shrink_to_fit();
        self.slices.shrink_to_fit();
        self.slices_by_service.shrink_to_fit();
        self.addresses.shrink_to_fit();
        self.namespaces.shrink_to_fit();
    }

    /// Bumped on every change.
    #[must_use]
    pub const fn generation(&self) -> u64 {
        self.generation
    }

    fn changed(&mut self) {
        self.generation += 1;
    }

    /// Something that moves Service endpoints changed.
    fn endpoints_changed(&mut self) {
        self.endpoints.mark_stale();
        self.changed();
    }

    // ---- namespaces ----

    pub fn upsert_namespace(&mut self, namespace: Namespace) {
        self.namespaces.insert(namespace.name.clone(), namespace);
        self.changed();
    }

    pub fn remove_namespace(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.changed();
        }
    }

    /// A namespace's labels with its name label; one that was never seen still has its name
    /// label, as the API server would give it.
    #[must_use]
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

    // ---- pods ----

    /// Adds or replaces a pod (matched by namespace and name); returns its id and the version
    /// it replaced.
    pub fn upsert_pod(&mut self, pod: Pod) -> (PodId, Option<Pod>) {
        let key = pod.key();
        let (id, old) = if let Some(id) = self.pod_ids.get(&self.pods, &key) {
            let old = self
                .pods
                .get_mut(id)
                .map(|slot| std::mem::replace(slot, pod));
            if let Some(old) = &old {
                for &ip in &old.ips {
                    remove_owner(&mut self.addresses, ip, Owner::Pod(id));
                }
            }
            (id, old)
        } else {
            let id = self.pods.insert(pod);
            self.pods_by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .push(id);
            self.pod_ids.insert(&self.pods, &key, id);
            (id, None)
        };
        if let Some(pod) = self.pods.get(id) {
            for &ip in &pod.ips {
                add_owner(&mut self.addresses, ip, Owner::Pod(id));
            }
        }
        self.endpoints_changed();
        (id, old)
    }

    /// Removes a pod; returns its id and what it was.
    pub fn remove_pod(&mut self, key: &ObjectKey) -> Option<(PodId, Pod)> {
        let id = self.pod_ids.remove(&self.pods, key)?;
        let old = self.pods.remove(id)?;
        if let Some(ids) = self.pods_by_namespace.get_mut(&key.namespace) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.pods_by_namespace.remove(&key.namespace);
            }
        }
        for &ip in &old.ips {
            remove_owner(&mut self.addresses, ip, Owner::Pod(id));
        }
        self.endpoints_changed();
        Some((id, old))
    }

    #[must_use]
    pub fn pod(&self, id: PodId) -> Option<&Pod> {
        self.pods.get(id)
    }

    #[must_use]
    pub fn pod_id(&self, key: &ObjectKey) -> Option<PodId> {
        self.pod_ids.get(&self.pods, key)
    }

    pub fn pods_in_namespace(&self, namespace: &str) -> impl Iterator<Item = (PodId, &Pod)> {
        self.pods_by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(|&id| Some((id, self.pods.get(id)?)))
    }

    pub fn pods(&self) -> impl Iterator<Item = (PodId, &Pod)> {
        self.pods.iter()
    }

    /// Whether some pod of `namespace` runs `workload`.
    #[must_use]
    pub fn has_workload(&self, namespace: &str, workload: &str) -> bool {
        self.pods_in_namespace(namespace)
            .any(|(_, p)| p.workload.name == workload)
    }

    // ---- nodes ----

    /// Adds or replaces a node (by name); returns the version it replaced.
    pub fn upsert_node(&mut self, node: Node) -> Option<Node> {
        let name = node.name.clone();
        let (id, old) = if let Some(&id) = self.node_ids.get(&name) {
            let old = self
                .nodes
                .get_mut(id)
                .map(|slot| std::mem::replace(slot, node));
            if let Some(old) = &old {
                for &ip in &old.addresses {
                    remove_owner(&mut self.addresses, ip, Owner::Node(id));
                }
            }
            (id, old)
        } else {
            let id = self.nodes.insert(node);
            self.node_ids.insert(name, id);
            (id, None)
        };
        if let Some(node) = self.nodes.get(id) {
            for &ip in &node.addresses {
                add_owner(&mut self.addresses, ip, Owner::Node(id));
            }
        }
        self.refresh_pod_cidrs();
        self.changed();
        old
    }

    /// Removes a node; returns what it was.
    pub fn remove_node(&mut self, name: &str) -> Option<Node> {
        let id = self.node_ids.remove(name)?;
        let old = self.nodes.remove(id)?;
        for &ip in &old.addresses {
            remove_owner(&mut self.addresses, ip, Owner::Node(id));
        }
        self.refresh_pod_cidrs();
        self.changed();
        Some(old)
    }

    #[must_use]
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    #[must_use]
    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.node_ids.get(name).copied()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes.iter()
    }

    fn refresh_pod_cidrs(&mut self) {
        let mut cidrs: Vec<IpNet> = self
            .nodes
            .values()
            .flat_map(|n| n.pod_cidrs.iter().copied())
            .collect();
        cidrs.sort_unstable();
        cidrs.dedup();
        self.pod_cidrs = cidrs;
    }

    /// Whether an address lies in a node's pod CIDR (a pod the inventory does not know yet).
    #[must_use]
    pub fn in_pod_cidr(&self, ip: IpAddr) -> bool {
        self.pod_cidrs.iter().any(|c| c.contains(&ip))
    }

    // ---- Services and their endpoints ----

    /// Adds or replaces a Service (by key); returns the version it replaced.
    pub fn upsert_service(&mut self, service: Service) -> Option<Service> {
        let key = service.key();
        let (id, old) = if let Some(&id) = self.service_ids.get(&key) {
            let old = self
                .services
                .get_mut(id)
                .map(|slot| std::mem::replace(slot, service));
            if let Some(old) = &old {
                for &ip in &old.cluster_ips {
                    remove_owner(&mut self.addresses, ip, Owner::Service(id));
                }
            }
            (id, old)
        } else {
            let id = self.services.insert(service);
            self.service_ids.insert(key, id);
            (id, None)
        };
        if let Some(service) = self.services.get(id) {
            for &ip in &service.cluster_ips {
                add_owner(&mut self.addresses, ip, Owner::Service(id));
            }
        }
        self.endpoints_changed();
        old
    }

    /// Removes a Service; returns what it was.
    pub fn remove_service(&mut self, key: &ObjectKey) -> Option<Service> {
        let id = self.service_ids.remove(key)?;
        let old = self.services.remove(id)?;
        for &ip in &old.cluster_ips {
            remove_owner(&mut self.addresses, ip, Owner::Service(id));
        }
        self.endpoints_changed();
        Some(old)
    }

    #[must_use]
    pub fn service(&self, id: ServiceId) -> Option<&Service> {
        self.services.get(id)
    }

    #[must_use]
    pub fn service_id(&self, key: &ObjectKey) -> Option<ServiceId> {
        self.service_ids.get(key).copied()
    }

    pub fn services(&self) -> impl Iterator<Item = (ServiceId, &Service)> {
        self.services.iter()
    }

    pub fn upsert_endpoint_slice(&mut self, slice: EndpointSlice) {
        let key = slice.key();
        if let Some(old) = self.slices.insert(key.clone(), slice) {
            self.unlink_slice(&key, &old);
        }
        if let Some(slice) = self.slices.get(&key) {
            let service = ObjectKey::new(&slice.namespace, &slice.service);
            self.slices_by_service.entry(service).or_default().push(key);
        }
        self.refresh_apiserver();
        self.endpoints_changed();
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

    pub fn remove_endpoint_slice(&mut self, key: &ObjectKey) {
        if let Some(old) = self.slices.remove(key) {
            self.unlink_slice(key, &old);
            self.refresh_apiserver();
            self.endpoints_changed();
        }
    }

    /// The `EndpointSlices` of a Service, `None` when it has none (endpoints then come from its
    /// selector).
    #[must_use]
    pub fn endpoint_slices(&self, service: &ObjectKey) -> Option<Vec<&EndpointSlice>> {
        let keys = self.slices_by_service.get(service)?;
        Some(keys.iter().filter_map(|k| self.slices.get(k)).collect())
    }

    fn refresh_apiserver(&mut self) {
        let mut apiserver: FxHashMap<IpAddr, ApiserverPorts> = FxHashMap::default();
        for slice in self
            .endpoint_slices(&apiserver_service())
            .unwrap_or_default()
        {
            let ports: ApiserverPorts = if slice.ports.is_empty() {
                None
            } else {
                Some(slice.ports.iter().map(|p| p.port).collect())
            };
            for ip in slice.endpoints.iter().flat_map(|e| e.addresses.iter()) {
                let entry = apiserver.entry(*ip).or_insert_with(|| Some(Vec::new()));
                match (entry.as_mut(), &ports) {
                    (Some(known), Some(more)) => known.extend_from_slice(more),
                    _ => *entry = None,
                }
            }
        }
        self.apiserver = apiserver;
    }

    /// The API server's addresses: the endpoints of `default/kubernetes`, sorted.
    #[must_use]
    pub fn apiserver_addresses(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self.apiserver.keys().copied().collect();
        out.sort_unstable();
        out
    }

    /// Whether an address is one of the API server's.
    #[must_use]
    pub fn is_apiserver_address(&self, ip: IpAddr) -> bool {
        self.apiserver.contains_key(&ip)
    }

    /// Whether `ip:port` is an API server endpoint (the API server is an address *and* a port:
    /// on k3s and kubeadm clusters it listens on a node address, whose other ports are the
    /// node's).
    #[must_use]
    pub fn is_apiserver_endpoint(&self, ip: IpAddr, port: u16) -> bool {
        match self.apiserver.get(&ip) {
            Some(None) => true,
            Some(Some(ports)) => ports.contains(&port),
            None => false,
        }
    }

    // ---- addresses ----

    /// The most specific owner of an address.
    #[must_use]
    pub fn owner(&self, ip: IpAddr) -> Option<Owner> {
        let owners = self.addresses.get(&ip)?;
        owners
            .iter()
            .find(|o| matches!(o, Owner::Node(_)))
            .or_else(|| owners.iter().find(|o| matches!(o, Owner::Pod(_))))
            .or_else(|| owners.first())
            .copied()
    }
}
