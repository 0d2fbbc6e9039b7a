//! The verdict engine: the inventory plus compiled policies, indexed so a verdict costs a few
//! hash lookups. Pods are grouped into identities (namespace, labels, declared ports); every
//! selector knows the identities it matches and every identity the rules that apply to it, so an
//! update touches only what it changes. Verdicts are cached per flow until the next change.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::{FxHashMap, FxHashSet};

use super::ir::{
    Action, CompiledPolicy, Direction, Entity, NamespaceScope, Peer, Peers, PolicyKey, PortMatch,
    PortSpec, Protocol, Rule, Subject,
};
use crate::inventory::{
    ContainerPort, EndpointSlice, Inventory, Labels, Namespace, Node, ObjectKey, Owner, Pod, PodId,
    Service, ServiceId, TargetPort,
};

/// How `ipBlock` treats cluster addresses (SPEC 4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IpBlockReading {
    /// An ipBlock matches any address, pods and nodes included.
    #[default]
    Calico,
    /// CIDR rules never match pod or node addresses.
    Cilium,
}

/// What the model needs beyond the cluster's objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelConfig {
    pub ipblock: IpBlockReading,
    /// The addresses of Cilium's `ingress` entity.
    pub ingress_cidrs: Vec<IpNet>,
}

/// A flow as the model judges it: `port` is the destination port (0 for ICMP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// A rule while it is loaded; ids are reused after a policy changes, so an id is only
/// meaningful against the model that produced the verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub u32);

/// How one direction of a flow was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// This end is not a pod, so no policy applies to it in this direction.
    NotAPod,
    /// A pod and its own node may always talk.
    OwnNode,
    /// No policy isolates the pod for this direction.
    NotIsolated,
    Allowed(RuleId),
    Denied(RuleId),
    /// Isolated and no rule allows it; `unjudged` names a rule that might have (it has a peer
    /// that cannot be judged from addresses, such as `toFQDNs`).
    DefaultDeny {
        unjudged: Option<RuleId>,
    },
}

impl Decision {
    pub fn allows(self) -> bool {
        matches!(
            self,
            Self::NotAPod | Self::OwnNode | Self::NotIsolated | Self::Allowed(_)
        )
    }

    /// The rule that decided, for explanations and rule-hit metrics.
    pub fn rule(self) -> Option<RuleId> {
        match self {
            Self::Allowed(r) | Self::Denied(r) => Some(r),
            _ => None,
        }
    }
}

/// Why a flow to a Service address could not reach any endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceProblem {
    /// The Service has no port with this number and protocol.
    NoSuchPort,
    /// The Service has no ready endpoint for the port.
    NoReadyEndpoint,
}

/// A flow to a ClusterIP is judged per ready endpoint; this says which one the verdict shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceHop {
    pub service: ServiceId,
    /// How many ready endpoints were judged.
    pub endpoints: u32,
    /// The endpoint (address, translated port) whose verdict is shown: the first that is denied,
    /// or the first when all are allowed.
    pub endpoint: Option<(IpAddr, u16)>,
    pub problem: Option<ServiceProblem>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub allowed: bool,
    pub egress: Decision,
    pub ingress: Decision,
    pub service: Option<ServiceHop>,
}

/// A growable bit set over identity ids.
#[derive(Clone, Debug, Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn contains(&self, i: u32) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u32) {
        let w = (i / 64) as usize;
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << (i % 64);
    }

    fn clear(&mut self, i: u32) {
        if let Some(w) = self.0.get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
        }
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(wi, &w)| {
            let base = u32::try_from(wi * 64).unwrap_or(u32::MAX);
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(base + b)
            })
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct IdentityId(u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SelectorId(u32);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct IdentityKey {
    namespace: String,
    labels: Labels,
    ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug)]
struct Identity {
    key: IdentityKey,
    pods: u32,
    /// Rules whose subject selects this identity, per direction, deny rules first.
    rules: [Vec<RuleId>; 2],
    /// The policies isolating it, per direction (a policy once per isolation that selects it):
    /// the default-deny rule hits of its flows.
    isolating: [Vec<u32>; 2],
}

#[derive(Clone, Debug)]
struct SelectorEntry {
    subject: Subject,
    members: Bits,
    refs: u32,
    /// Rules that have this selector as their subject.
    subject_rules: Vec<RuleId>,
    /// Policies isolating with this selector, per direction (a policy id once per isolation),
    /// so the policies isolating a pod are found from its selectors, not by scanning them all.
    isolations: [Vec<u32>; 2],
}

#[derive(Clone, Debug)]
enum CompiledPeer {
    Endpoints(SelectorId),
    Cidr { net: IpNet, except: Vec<IpNet> },
    ExternalCidr { net: IpNet, except: Vec<IpNet> },
    Entity(Entity),
    Unjudgeable,
}

#[derive(Clone, Debug)]
struct RuleEntry {
    policy: u32,
    rule: Rule,
    subject: SelectorId,
    /// `None` is `Peers::Any`.
    peers: Option<Vec<CompiledPeer>>,
    has_unjudgeable: bool,
}

#[derive(Clone, Debug)]
struct PolicyEntry {
    key: PolicyKey,
    rules: Vec<RuleId>,
    isolations: Vec<(SelectorId, Direction)>,
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// A node name, interned so comparing nodes on the hot path compares integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct NodeName(u32);

/// One end of a flow, resolved.
#[derive(Clone, Copy, Debug)]
enum Side {
    Pod {
        pod: PodId,
        identity: IdentityId,
        node: Option<NodeName>,
    },
    /// A node address (or a hostNetwork pod's); `name` is unknown when only a hostNetwork pod
    /// without `nodeName` claims it.
    Node {
        name: Option<NodeName>,
    },
    Service(ServiceId),
    External,
}

/// The cluster model and its policies.
#[derive(Clone, Debug)]
pub struct Model {
    config: ModelConfig,
    inventory: Inventory,
    identities: Vec<Option<Identity>>,
    free_identities: Vec<u32>,
    identity_ids: HashMap<IdentityKey, IdentityId>,
    identities_by_namespace: HashMap<String, Vec<IdentityId>>,
    pod_identity: Vec<Option<IdentityId>>,
    selectors: Vec<Option<SelectorEntry>>,
    free_selectors: Vec<u32>,
    selector_ids: HashMap<Subject, SelectorId>,
    /// Selectors scoped to one namespace, and the rest, so a new identity is only tested
    /// against selectors that can match it.
    selectors_by_namespace: HashMap<String, Vec<SelectorId>>,
    global_selectors: Vec<SelectorId>,
    rules: Vec<Option<RuleEntry>>,
    free_rules: Vec<u32>,
    policies: Vec<Option<PolicyEntry>>,
    free_policies: Vec<u32>,
    policy_ids: HashMap<PolicyKey, u32>,
    /// What loaded policies hold that is not judged (Cilium host policies), for explanations.
    unjudged: BTreeMap<PolicyKey, Vec<String>>,
    /// Namespace labels with the name label, for every namespace that has identities or an
    /// object (selectors borrow them instead of rebuilding them).
    ns_labels: HashMap<String, Labels>,
    apiserver: FxHashSet<IpAddr>,
    cluster_cidrs: Vec<IpNet>,
    /// Every address the inventory knows, resolved: one lookup per end of a flow.
    addresses: FxHashMap<IpAddr, Side>,
    node_names: Vec<String>,
    node_name_ids: HashMap<String, NodeName>,
    /// Ready endpoints per Service port (same order as the Service's ports), rebuilt by
    /// [`Model::verdict`] when `endpoints_dirty`.
    service_endpoints: FxHashMap<ServiceId, Vec<Vec<(IpAddr, u16)>>>,
    endpoints_dirty: bool,
    generation: u64,
    cache: VerdictCache,
}

/// Verdicts of flows judged since the last change. IPv4 flows use a packed 16-byte key and
/// every entry points into a small table of distinct verdicts, so the hot set stays compact.
#[derive(Clone, Debug, Default)]
struct VerdictCache {
    v4: FxHashMap<(u64, u32), u32>,
    other: FxHashMap<Flow, u32>,
    verdicts: Vec<Verdict>,
    verdict_ids: FxHashMap<Verdict, u32>,
}

impl VerdictCache {
    fn len(&self) -> usize {
        self.v4.len() + self.other.len()
    }

    fn clear(&mut self) {
        if self.len() > 0 || !self.verdicts.is_empty() {
            self.v4.clear();
            self.other.clear();
            self.verdicts.clear();
            self.verdict_ids.clear();
        }
    }

    fn key4(flow: &Flow) -> Option<(u64, u32)> {
        match (flow.src, flow.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Some((
                (u64::from(u32::from(s)) << 32) | u64::from(u32::from(d)),
                (u32::from(flow.protocol as u8) << 16) | u32::from(flow.port),
            )),
            _ => None,
        }
    }

    fn get(&self, flow: &Flow) -> Option<Verdict> {
        let id = match Self::key4(flow) {
            Some(k) => self.v4.get(&k)?,
            None => self.other.get(flow)?,
        };
        self.verdicts.get(*id as usize).copied()
    }

    fn insert(&mut self, flow: &Flow, verdict: Verdict) {
        let next = u32::try_from(self.verdicts.len()).unwrap_or(u32::MAX);
        let id = *self.verdict_ids.entry(verdict).or_insert(next);
        if id == next {
            self.verdicts.push(verdict);
        }
        match Self::key4(flow) {
            Some(k) => {
                if self.v4.capacity() == 0 {
                    self.v4.reserve(CACHE_RESERVE);
                }
                self.v4.insert(k, id)
            }
            None => self.other.insert(*flow, id),
        };
    }
}

/// Past this many cached verdicts the cache starts over, so memory stays bounded.
const CACHE_LIMIT: usize = 1 << 20;
/// Reserved at the first cached verdict (about 1.5 MiB), not before: the daemon judges without
/// the cache and should not pay for it. A busy node's flows then fit without the table growing;
/// a clear keeps the capacity.
const CACHE_RESERVE: usize = 1 << 16;

fn slab_insert<T>(slots: &mut Vec<Option<T>>, free: &mut Vec<u32>, value: T) -> u32 {
    if let Some(i) = free.pop() {
        slots[i as usize] = Some(value);
        i
    } else {
        slots.push(Some(value));
        u32::try_from(slots.len() - 1).unwrap_or(u32::MAX)
    }
}

fn selector_namespace(subject: &Subject) -> Option<&str> {
    match &subject.namespaces {
        NamespaceScope::Named(n) | NamespaceScope::NamedAndSelector(n, _) => Some(n),
        NamespaceScope::All | NamespaceScope::Selector(_) => None,
    }
}

fn cidr_contains(net: &IpNet, except: &[IpNet], ip: IpAddr) -> bool {
    net.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
}

impl Model {
    pub fn new(config: ModelConfig) -> Self {
        Self {
            config,
            inventory: Inventory::new(),
            identities: Vec::new(),
            free_identities: Vec::new(),
            identity_ids: HashMap::new(),
            identities_by_namespace: HashMap::new(),
            pod_identity: Vec::new(),
            selectors: Vec::new(),
            free_selectors: Vec::new(),
            selector_ids: HashMap::new(),
            selectors_by_namespace: HashMap::new(),
            global_selectors: Vec::new(),
            rules: Vec::new(),
            free_rules: Vec::new(),
            policies: Vec::new(),
            free_policies: Vec::new(),
            policy_ids: HashMap::new(),
            unjudged: BTreeMap::new(),
            ns_labels: HashMap::new(),
            apiserver: FxHashSet::default(),
            cluster_cidrs: Vec::new(),
            addresses: FxHashMap::default(),
            node_names: Vec::new(),
            node_name_ids: HashMap::new(),
            service_endpoints: FxHashMap::default(),
            endpoints_dirty: false,
            generation: 0,
            cache: VerdictCache::default(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Gives back the room that growing one object at a time left over: for after a bulk load.
    pub fn shrink_to_fit(&mut self) {
        self.inventory.shrink_to_fit();
        self.identities.shrink_to_fit();
        self.identity_ids.shrink_to_fit();
        self.identities_by_namespace.shrink_to_fit();
        self.pod_identity.shrink_to_fit();
        self.selectors.shrink_to_fit();
        self.selector_ids.shrink_to_fit();
        self.selectors_by_namespace.shrink_to_fit();
        self.rules.shrink_to_fit();
        self.policies.shrink_to_fit();
        self.policy_ids.shrink_to_fit();
        self.ns_labels.shrink_to_fit();
        self.addresses.shrink_to_fit();
    }

    /// Bumped by every change to the inventory or the policies.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn changed(&mut self) {
        self.generation += 1;
        self.cache.clear();
    }

    /// Inventory changed in a way that may move Service endpoints.
    fn endpoints_changed(&mut self) {
        self.endpoints_dirty = true;
        self.changed();
    }

    fn labels_of_namespace(&self, name: &str) -> Option<&Labels> {
        self.ns_labels.get(name)
    }

    fn refresh_namespace_labels(&mut self, name: &str) {
        let labels = self.inventory.namespace_labels(name);
        self.ns_labels.insert(name.to_owned(), labels);
    }

    /// Facts derived from several objects (API server, cluster CIDRs), refreshed when nodes,
    /// Services or endpoints change.
    fn refresh_derived(&mut self) {
        self.apiserver = self.inventory.apiserver_addresses().into_iter().collect();
        let mut cidrs: Vec<IpNet> = self
            .inventory
            .nodes()
            .flat_map(|(_, n)| n.pod_cidrs.iter().copied())
            .collect();
        cidrs.sort_unstable();
        cidrs.dedup();
        self.cluster_cidrs = cidrs;
    }

    // ---- inventory updates ----

    pub fn upsert_namespace(&mut self, namespace: Namespace) {
        let name = namespace.name.clone();
        self.inventory.upsert_namespace(namespace);
        self.refresh_namespace_labels(&name);
        self.refresh_namespace(&name);
        self.changed();
    }

    pub fn remove_namespace(&mut self, name: &str) {
        self.inventory.remove_namespace(name);
        self.refresh_namespace_labels(name);
        self.refresh_namespace(name);
        self.changed();
    }

    /// Namespace labels changed: every identity of it may match other selectors now.
    fn refresh_namespace(&mut self, name: &str) {
        let ids = self
            .identities_by_namespace
            .get(name)
            .cloned()
            .unwrap_or_default();
        for id in ids {
            self.detach_identity(id);
            self.attach_identity(id);
        }
    }

    pub fn upsert_pod(&mut self, pod: Pod) {
        let key = IdentityKey {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
            ports: pod.ports.clone(),
        };
        let mut ips = pod.ips.clone();
        let change = self.inventory.upsert_pod(pod);
        let crate::inventory::Change::Pod { id, old } = change else {
            return;
        };
        ips.extend(old.into_iter().flat_map(|o| o.ips));
        let index = id.0 as usize;
        if self.pod_identity.len() <= index {
            self.pod_identity.resize(index + 1, None);
        }
        let new = self.identity_for(key);
        if let Some(old) = self.pod_identity[index].replace(new) {
            self.release_identity(old);
        }
        self.reindex(&ips);
        self.endpoints_changed();
    }

    pub fn remove_pod(&mut self, key: &ObjectKey) {
        if let Some(crate::inventory::Change::PodRemoved { id, old }) =
            self.inventory.remove_pod(key)
        {
            self.reindex(&old.ips);
            if let Some(old) = self
                .pod_identity
                .get_mut(id.0 as usize)
                .and_then(Option::take)
            {
                self.release_identity(old);
            }
            self.endpoints_changed();
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
        let mut ips = self.node_addresses(&node.name);
        ips.extend(node.addresses.iter().copied());
        self.inventory.upsert_node(node);
        self.reindex(&ips);
        self.refresh_derived();
        self.changed();
    }

    pub fn remove_node(&mut self, name: &str) {
        let ips = self.node_addresses(name);
        self.inventory.remove_node(name);
        self.reindex(&ips);
        self.refresh_derived();
        self.changed();
    }

    fn service_addresses(&self, key: &ObjectKey) -> Vec<IpAddr> {
        self.inventory
            .services()
            .find(|(_, s)| s.namespace == key.namespace && s.name == key.name)
            .map(|(_, s)| s.cluster_ips.clone())
            .unwrap_or_default()
    }

    pub fn upsert_service(&mut self, service: Service) {
        let mut ips = self.service_addresses(&service.key());
        ips.extend(service.cluster_ips.iter().copied());
        self.inventory.upsert_service(service);
        self.reindex(&ips);
        self.endpoints_changed();
    }

    pub fn remove_service(&mut self, key: &ObjectKey) {
        let ips = self.service_addresses(key);
        self.inventory.remove_service(key);
        self.reindex(&ips);
        self.endpoints_changed();
    }

    fn node_name(&mut self, name: &str) -> NodeName {
        if let Some(&id) = self.node_name_ids.get(name) {
            return id;
        }
        let id = NodeName(u32::try_from(self.node_names.len()).unwrap_or(u32::MAX));
        self.node_names.push(name.to_owned());
        self.node_name_ids.insert(name.to_owned(), id);
        id
    }

    /// Re-resolves addresses whose owners may have changed.
    fn reindex(&mut self, ips: &[IpAddr]) {
        for &ip in ips {
            let side = match self.inventory.owner(ip) {
                Some(Owner::Node(id)) => {
                    let name = self.inventory.node(id).map(|n| n.name.clone());
                    Side::Node {
                        name: name.map(|n| self.node_name(&n)),
                    }
                }
                Some(Owner::Pod(pod_id)) => {
                    let Some(pod) = self.inventory.pod(pod_id) else {
                        self.addresses.remove(&ip);
                        continue;
                    };
                    let host_network = pod.host_network;
                    let node = pod.node.clone().map(|n| self.node_name(&n));
                    if host_network {
                        Side::Node { name: node }
                    } else {
                        match self.pod_identity.get(pod_id.0 as usize).copied().flatten() {
                            Some(identity) => Side::Pod {
                                pod: pod_id,
                                identity,
                                node,
                            },
                            None => {
                                self.addresses.remove(&ip);
                                continue;
                            }
                        }
                    }
                }
                Some(Owner::Service(id)) => Side::Service(id),
                None => {
                    self.addresses.remove(&ip);
                    continue;
                }
            };
            self.addresses.insert(ip, side);
        }
    }

    pub fn upsert_endpoint_slice(&mut self, slice: EndpointSlice) {
        self.inventory.upsert_endpoint_slice(slice);
        self.refresh_derived();
        self.endpoints_changed();
    }

    pub fn remove_endpoint_slice(&mut self, key: &ObjectKey) {
        self.inventory.remove_endpoint_slice(key);
        self.refresh_derived();
        self.endpoints_changed();
    }

    // ---- identities ----

    fn identity(&self, id: IdentityId) -> Option<&Identity> {
        self.identities.get(id.0 as usize)?.as_ref()
    }

    fn identity_for(&mut self, key: IdentityKey) -> IdentityId {
        if let Some(&id) = self.identity_ids.get(&key) {
            if let Some(Some(identity)) = self.identities.get_mut(id.0 as usize) {
                identity.pods += 1;
            }
            return id;
        }
        let namespace = key.namespace.clone();
        if !self.ns_labels.contains_key(&namespace) {
            self.refresh_namespace_labels(&namespace);
        }
        let identity = Identity {
            key: key.clone(),
            pods: 1,
            rules: [Vec::new(), Vec::new()],
            isolating: [Vec::new(), Vec::new()],
        };
        let id = IdentityId(slab_insert(
            &mut self.identities,
            &mut self.free_identities,
            identity,
        ));
        self.identity_ids.insert(key, id);
        self.identities_by_namespace
            .entry(namespace)
            .or_default()
            .push(id);
        self.attach_identity(id);
        id
    }

    fn release_identity(&mut self, id: IdentityId) {
        let Some(Some(identity)) = self.identities.get_mut(id.0 as usize) else {
            return;
        };
        identity.pods -= 1;
        if identity.pods > 0 {
            return;
        }
        self.detach_identity(id);
        if let Some(identity) = self.identities[id.0 as usize].take() {
            self.identity_ids.remove(&identity.key);
            if let Some(ids) = self
                .identities_by_namespace
                .get_mut(&identity.key.namespace)
            {
                ids.retain(|i| *i != id);
                if ids.is_empty() {
                    self.identities_by_namespace.remove(&identity.key.namespace);
                }
            }
            self.free_identities.push(id.0);
        }
    }

    /// Tests the identity against every selector that can match it and takes on their rules.
    fn attach_identity(&mut self, id: IdentityId) {
        let Some(identity) = self.identity(id) else {
            return;
        };
        let namespace = identity.key.namespace.clone();
        let ns_labels = self
            .labels_of_namespace(&namespace)
            .cloned()
            .unwrap_or_else(|| self.inventory.namespace_labels(&namespace));
        let candidates: Vec<SelectorId> = self
            .selectors_by_namespace
            .get(&namespace)
            .into_iter()
            .flatten()
            .chain(self.global_selectors.iter())
            .copied()
            .collect();
        let mut rules: [Vec<RuleId>; 2] = [Vec::new(), Vec::new()];
        let mut isolating: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        for sid in candidates {
            let Some(Some(sel)) = self.selectors.get_mut(sid.0 as usize) else {
                continue;
            };
            let labels = match &self.identities[id.0 as usize] {
                Some(identity) => &identity.key.labels,
                None => return,
            };
            if !sel.subject.matches(&namespace, &ns_labels, labels) {
                continue;
            }
            sel.members.set(id.0);
            isolating[0].extend_from_slice(&sel.isolations[0]);
            isolating[1].extend_from_slice(&sel.isolations[1]);
            for &rid in &sel.subject_rules {
                if let Some(Some(entry)) = self.rules.get(rid.0 as usize) {
                    rules[dir_index(entry.rule.direction)].push(rid);
                }
            }
        }
        for list in &mut rules {
            self.order_rules(list);
        }
        if let Some(Some(identity)) = self.identities.get_mut(id.0 as usize) {
            identity.rules = rules;
            identity.isolating = isolating;
        }
    }

    /// Deny rules first, so a verdict stops at the first allow; then by rule id, which keeps
    /// the order policies were loaded in for explanations.
    fn order_rules(&self, list: &mut [RuleId]) {
        list.sort_by_key(|rid| {
            let deny = self
                .rules
                .get(rid.0 as usize)
                .and_then(Option::as_ref)
                .is_some_and(|e| e.rule.action == Action::Deny);
            (!deny, *rid)
        });
    }

    fn detach_identity(&mut self, id: IdentityId) {
        let Some(identity) = self.identity(id) else {
            return;
        };
        let namespace = identity.key.namespace.clone();
        let candidates: Vec<SelectorId> = self
            .selectors_by_namespace
            .get(&namespace)
            .into_iter()
            .flatten()
            .chain(self.global_selectors.iter())
            .copied()
            .collect();
        for sid in candidates {
            if let Some(Some(sel)) = self.selectors.get_mut(sid.0 as usize) {
                sel.members.clear(id.0);
            }
        }
        if let Some(Some(identity)) = self.identities.get_mut(id.0 as usize) {
            identity.rules = [Vec::new(), Vec::new()];
            identity.isolating = [Vec::new(), Vec::new()];
        }
    }

    // ---- selectors ----

    fn intern_selector(&mut self, subject: &Subject) -> SelectorId {
        if let Some(&sid) = self.selector_ids.get(subject) {
            if let Some(Some(sel)) = self.selectors.get_mut(sid.0 as usize) {
                sel.refs += 1;
            }
            return sid;
        }
        let mut members = Bits::default();
        let scoped = selector_namespace(subject).map(|ns| {
            self.identities_by_namespace
                .get_key_value(ns)
                .into_iter()
                .collect::<Vec<_>>()
        });
        let namespaces: Vec<(&String, &Vec<IdentityId>)> = match scoped {
            Some(one) => one,
            None => self.identities_by_namespace.iter().collect(),
        };
        for (namespace, ids) in namespaces {
            let matched = match self.labels_of_namespace(namespace) {
                Some(labels) => subject.namespaces.matches(namespace, labels),
                None => subject
                    .namespaces
                    .matches(namespace, &self.inventory.namespace_labels(namespace)),
            };
            if !matched {
                continue;
            }
            for id in ids {
                if let Some(identity) = self.identity(*id)
                    && subject.pods.matches(&identity.key.labels)
                {
                    members.set(id.0);
                }
            }
        }
        let entry = SelectorEntry {
            subject: subject.clone(),
            members,
            refs: 1,
            subject_rules: Vec::new(),
            isolations: [Vec::new(), Vec::new()],
        };
        let sid = SelectorId(slab_insert(
            &mut self.selectors,
            &mut self.free_selectors,
            entry,
        ));
        self.selector_ids.insert(subject.clone(), sid);
        match selector_namespace(subject) {
            Some(ns) => self
                .selectors_by_namespace
                .entry(ns.to_owned())
                .or_default()
                .push(sid),
            None => self.global_selectors.push(sid),
        }
        sid
    }

    fn release_selector(&mut self, sid: SelectorId) {
        let Some(Some(sel)) = self.selectors.get_mut(sid.0 as usize) else {
            return;
        };
        sel.refs -= 1;
        if sel.refs > 0 {
            return;
        }
        if let Some(sel) = self.selectors[sid.0 as usize].take() {
            self.selector_ids.remove(&sel.subject);
            match selector_namespace(&sel.subject) {
                Some(ns) => {
                    if let Some(list) = self.selectors_by_namespace.get_mut(ns) {
                        list.retain(|s| *s != sid);
                        if list.is_empty() {
                            self.selectors_by_namespace.remove(ns);
                        }
                    }
                }
                None => self.global_selectors.retain(|s| *s != sid),
            }
            self.free_selectors.push(sid.0);
        }
    }

    fn members(&self, sid: SelectorId) -> Vec<u32> {
        match self.selectors.get(sid.0 as usize) {
            Some(Some(sel)) => sel.members.iter().collect(),
            _ => Vec::new(),
        }
    }

    // ---- policies ----

    /// Adds or replaces a policy (matched by its key).
    pub fn upsert_policy(&mut self, policy: CompiledPolicy) {
        if self.policy_ids.contains_key(&policy.key) {
            self.unload_policy(&policy.key);
        }
        let CompiledPolicy {
            key,
            isolations,
            rules,
            unjudged,
        } = policy;
        if !unjudged.is_empty() {
            self.unjudged.insert(key.clone(), unjudged);
        }
        let pid = slab_insert(
            &mut self.policies,
            &mut self.free_policies,
            PolicyEntry {
                key: key.clone(),
                rules: Vec::new(),
                isolations: Vec::new(),
            },
        );
        self.policy_ids.insert(key, pid);
        let mut isolation_ids = Vec::with_capacity(isolations.len());
        for isolation in isolations {
            let sid = self.intern_selector(&isolation.subject);
            let d = dir_index(isolation.direction);
            if let Some(Some(sel)) = self.selectors.get_mut(sid.0 as usize) {
                sel.isolations[d].push(pid);
            }
            for m in self.members(sid) {
                if let Some(Some(identity)) = self.identities.get_mut(m as usize) {
                    identity.isolating[d].push(pid);
                }
            }
            isolation_ids.push((sid, isolation.direction));
        }
        let mut rule_ids = Vec::with_capacity(rules.len());
        for rule in rules {
            let subject = self.intern_selector(&rule.subject);
            let mut has_unjudgeable = false;
            let peers = match &rule.peers {
                Peers::Any => None,
                Peers::List(list) => Some(
                    list.iter()
                        .map(|p| match p {
                            Peer::Endpoints(s) => CompiledPeer::Endpoints(self.intern_selector(s)),
                            Peer::Cidr { net, except } => CompiledPeer::Cidr {
                                net: *net,
                                except: except.clone(),
                            },
                            Peer::ClusterExternalCidr { net, except } => {
                                CompiledPeer::ExternalCidr {
                                    net: *net,
                                    except: except.clone(),
                                }
                            }
                            Peer::Entity(e) => CompiledPeer::Entity(*e),
                            Peer::Unjudgeable(_) => {
                                has_unjudgeable = true;
                                CompiledPeer::Unjudgeable
                            }
                        })
                        .collect(),
                ),
            };
            let direction = rule.direction;
            let rid = RuleId(slab_insert(
                &mut self.rules,
                &mut self.free_rules,
                RuleEntry {
                    policy: pid,
                    rule,
                    subject,
                    peers,
                    has_unjudgeable,
                },
            ));
            if let Some(Some(sel)) = self.selectors.get_mut(subject.0 as usize) {
                sel.subject_rules.push(rid);
            }
            let d = dir_index(direction);
            for m in self.members(subject) {
                let mut list = match self.identities.get_mut(m as usize) {
                    Some(Some(identity)) => std::mem::take(&mut identity.rules[d]),
                    _ => continue,
                };
                list.push(rid);
                self.order_rules(&mut list);
                if let Some(Some(identity)) = self.identities.get_mut(m as usize) {
                    identity.rules[d] = list;
                }
            }
            rule_ids.push(rid);
        }
        if let Some(Some(entry)) = self.policies.get_mut(pid as usize) {
            entry.rules = rule_ids;
            entry.isolations = isolation_ids;
        }
        self.changed();
    }

    /// Parts of loaded policies that are not judged (Cilium host policies), by policy.
    pub fn unjudged_policies(&self) -> impl Iterator<Item = (&PolicyKey, &[String])> {
        self.unjudged
            .iter()
            .map(|(key, what)| (key, what.as_slice()))
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) {
        if self.unload_policy(key) {
            self.changed();
        }
    }

    fn unload_policy(&mut self, key: &PolicyKey) -> bool {
        self.unjudged.remove(key);
        let Some(pid) = self.policy_ids.remove(key) else {
            return false;
        };
        let Some(entry) = self.policies.get_mut(pid as usize).and_then(Option::take) else {
            return false;
        };
        self.free_policies.push(pid);
        for (sid, direction) in entry.isolations {
            let d = dir_index(direction);
            if let Some(Some(sel)) = self.selectors.get_mut(sid.0 as usize)
                && let Some(i) = sel.isolations[d].iter().position(|p| *p == pid)
            {
                sel.isolations[d].swap_remove(i);
            }
            for m in self.members(sid) {
                if let Some(Some(identity)) = self.identities.get_mut(m as usize) {
                    let list = &mut identity.isolating[d];
                    if let Some(i) = list.iter().position(|p| *p == pid) {
                        list.swap_remove(i);
                    }
                }
            }
            self.release_selector(sid);
        }
        for rid in entry.rules {
            let Some(rule) = self.rules.get_mut(rid.0 as usize).and_then(Option::take) else {
                continue;
            };
            self.free_rules.push(rid.0);
            let d = dir_index(rule.rule.direction);
            for m in self.members(rule.subject) {
                if let Some(Some(identity)) = self.identities.get_mut(m as usize) {
                    identity.rules[d].retain(|r| *r != rid);
                }
            }
            if let Some(Some(sel)) = self.selectors.get_mut(rule.subject.0 as usize) {
                sel.subject_rules.retain(|r| *r != rid);
            }
            self.release_selector(rule.subject);
            for peer in rule.peers.into_iter().flatten() {
                if let CompiledPeer::Endpoints(sid) = peer {
                    self.release_selector(sid);
                }
            }
        }
        true
    }

    pub fn policy_count(&self) -> usize {
        self.policy_ids.len()
    }

    pub fn policies(&self) -> impl Iterator<Item = &PolicyKey> {
        self.policy_ids.keys()
    }

    /// The rule behind an id, with its policy.
    pub fn rule(&self, id: RuleId) -> Option<(&PolicyKey, &Rule)> {
        let entry = self.rules.get(id.0 as usize)?.as_ref()?;
        let policy = self.policies.get(entry.policy as usize)?.as_ref()?;
        Some((&policy.key, &entry.rule))
    }

    /// Every way a loaded policy can decide a flow, as (policy, direction, rule name, action):
    /// each of its rules, and a `default_deny` named entry per direction it isolates. The
    /// daemon exposes a zero-valued hit series for each, so rules nothing used show up.
    pub fn rule_names<'a>(
        &'a self,
        default_deny: &'a str,
    ) -> impl Iterator<Item = (&'a PolicyKey, Direction, &'a str, Action)> + 'a {
        self.policies.iter().flatten().flat_map(move |policy| {
            let rules = policy.rules.iter().filter_map(|rid| {
                let entry = self.rules.get(rid.0 as usize)?.as_ref()?;
                Some((
                    &policy.key,
                    entry.rule.direction,
                    entry.rule.name.as_str(),
                    entry.rule.action,
                ))
            });
            let mut directions: Vec<Direction> =
                policy.isolations.iter().map(|(_, d)| *d).collect();
            directions.sort_by_key(|d| dir_index(*d));
            directions.dedup();
            let isolations = directions
                .into_iter()
                .map(move |d| (&policy.key, d, default_deny, Action::Deny));
            rules.chain(isolations)
        })
    }

    /// The policies that isolate the pod at `ip` for a direction (for explanations).
    /// Deny rules of the pod at `subject` for `direction` whose ports fit the flow but whose
    /// peers cannot all be judged from addresses (Cilium deny rules with `toServices`,
    /// `toGroups`, `fromRequires`, ...): they might refuse a flow the model allows, so an
    /// explanation names them. `dst` is the destination, for named ports.
    pub fn unjudged_denies(
        &self,
        subject: IpAddr,
        direction: Direction,
        dst: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Vec<RuleId> {
        let Side::Pod { identity, .. } = self.resolve(subject) else {
            return Vec::new();
        };
        let Some(subject) = self.identity(identity) else {
            return Vec::new();
        };
        let dst_ports = match self.resolve(dst) {
            Side::Pod { identity, .. } => self.identity(identity).map(|i| i.key.ports.as_slice()),
            _ => None,
        };
        subject.rules[dir_index(direction)]
            .iter()
            .copied()
            .filter(|rid| {
                matches!(
                    self.rules.get(rid.0 as usize),
                    Some(Some(entry)) if entry.rule.action == Action::Deny
                        && entry.has_unjudgeable
                        && ports_match(&entry.rule.ports, protocol, port, dst_ports)
                )
            })
            .collect()
    }

    /// The policies that isolate the pod at `ip` in `direction`, sorted. Kept per identity, as
    /// this runs for every default-denied flow.
    pub fn isolating_policies(&self, ip: IpAddr, direction: Direction) -> Vec<&PolicyKey> {
        let Side::Pod { identity, .. } = self.resolve(ip) else {
            return Vec::new();
        };
        let Some(subject) = self.identity(identity) else {
            return Vec::new();
        };
        let mut out: Vec<&PolicyKey> = subject.isolating[dir_index(direction)]
            .iter()
            .filter_map(|pid| match self.policies.get(*pid as usize) {
                Some(Some(policy)) => Some(&policy.key),
                _ => None,
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    // ---- verdicts ----

    fn resolve(&self, ip: IpAddr) -> Side {
        self.addresses.get(&ip).copied().unwrap_or(Side::External)
    }

    /// The verdict for a flow, from the cache when this flow was judged since the last change.
    pub fn verdict(&mut self, flow: &Flow) -> Verdict {
        if let Some(v) = self.cache.get(flow) {
            return v;
        }
        if self.endpoints_dirty {
            self.rebuild_service_endpoints();
        }
        let v = self.judge(flow);
        if self.cache.len() >= CACHE_LIMIT {
            self.cache.clear();
        }
        self.cache.insert(flow, v);
        v
    }

    fn rebuild_service_endpoints(&mut self) {
        let mut all = FxHashMap::default();
        for (id, service) in self.inventory.services() {
            let per_port = service
                .ports
                .iter()
                .map(|p| self.compute_service_endpoints(service, p))
                .collect();
            all.insert(id, per_port);
        }
        self.service_endpoints = all;
        self.endpoints_dirty = false;
    }

    /// The verdict for a flow, computed (no cache).
    pub fn judge(&self, flow: &Flow) -> Verdict {
        let src = self.resolve(flow.src);
        match self.resolve(flow.dst) {
            Side::Service(service) => self.judge_service(flow, src, service),
            dst => self.judge_direct(flow.src, src, flow.dst, dst, flow.protocol, flow.port),
        }
    }

    fn judge_service(&self, flow: &Flow, src: Side, id: ServiceId) -> Verdict {
        let denied = |problem| Verdict {
            allowed: false,
            egress: Decision::NotAPod,
            ingress: Decision::NotAPod,
            service: Some(ServiceHop {
                service: id,
                endpoints: 0,
                endpoint: None,
                problem: Some(problem),
            }),
        };
        let Some(service) = self.inventory.service(id) else {
            return denied(ServiceProblem::NoReadyEndpoint);
        };
        let Some((index, port)) = service
            .ports
            .iter()
            .enumerate()
            .find(|(_, p)| p.port == flow.port && p.protocol == flow.protocol)
        else {
            return denied(ServiceProblem::NoSuchPort);
        };
        let computed;
        let endpoints: &[(IpAddr, u16)] = match self.service_endpoints.get(&id) {
            Some(per_port) if !self.endpoints_dirty => {
                per_port.get(index).map_or(&[], Vec::as_slice)
            }
            _ => {
                computed = self.compute_service_endpoints(service, port);
                &computed
            }
        };
        let mut shown: Option<(Verdict, (IpAddr, u16))> = None;
        for &(ip, target) in endpoints {
            let v = self.judge_direct(flow.src, src, ip, self.resolve(ip), flow.protocol, target);
            let replace = match &shown {
                None => true,
                Some((s, _)) => s.allowed && !v.allowed,
            };
            if replace {
                shown = Some((v, (ip, target)));
            }
            if !v.allowed {
                break;
            }
        }
        match shown {
            None => denied(ServiceProblem::NoReadyEndpoint),
            Some((v, endpoint)) => Verdict {
                service: Some(ServiceHop {
                    service: id,
                    endpoints: u32::try_from(endpoints.len()).unwrap_or(u32::MAX),
                    endpoint: Some(endpoint),
                    problem: None,
                }),
                ..v
            },
        }
    }

    /// Ready endpoints (address, translated port) of a Service port: from its EndpointSlices,
    /// or from its selector and the pods' container ports when it has none.
    fn compute_service_endpoints(
        &self,
        service: &Service,
        port: &crate::inventory::ServicePort,
    ) -> Vec<(IpAddr, u16)> {
        let mut out = Vec::new();
        if let Some(slices) = self.inventory.endpoint_slices(&service.key()) {
            for slice in slices {
                let slice_port = slice.ports.iter().find(|p| {
                    p.protocol == port.protocol
                        && match (&p.name, &port.name) {
                            (Some(a), Some(b)) => a == b,
                            (None, None) => true,
                            // A single unnamed Service port may meet a slice port named "".
                            (a, b) => a.as_deref().unwrap_or("") == b.as_deref().unwrap_or(""),
                        }
                });
                let Some(slice_port) = slice_port else {
                    continue;
                };
                for e in slice.endpoints.iter().filter(|e| e.ready) {
                    for &ip in &e.addresses {
                        out.push((ip, slice_port.port));
                    }
                }
            }
        } else if let Some(selector) = &service.selector {
            for (_, pod) in self.inventory.pods_in_namespace(&service.namespace) {
                let selected = selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v));
                if !selected {
                    continue;
                }
                let target = match &port.target {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(name) => pod
                        .ports
                        .iter()
                        .find(|c| c.name.as_deref() == Some(name) && c.protocol == port.protocol)
                        .map(|c| c.port),
                };
                if let Some(target) = target {
                    for &ip in &pod.ips {
                        out.push((ip, target));
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn judge_direct(
        &self,
        src_ip: IpAddr,
        src: Side,
        dst_ip: IpAddr,
        dst: Side,
        protocol: Protocol,
        port: u16,
    ) -> Verdict {
        let dst_identity = match dst {
            Side::Pod { identity, .. } => Some(identity),
            _ => None,
        };
        let egress = match src {
            Side::Pod { identity, node, .. } => {
                if node.is_some() && matches!(dst, Side::Node { name } if name == node) {
                    Decision::OwnNode
                } else {
                    self.decide(
                        identity,
                        node,
                        Direction::Egress,
                        dst_ip,
                        dst,
                        protocol,
                        port,
                        dst_identity,
                    )
                }
            }
            _ => Decision::NotAPod,
        };
        let ingress = match dst {
            Side::Pod { identity, node, .. } => {
                if node.is_some() && matches!(src, Side::Node { name } if name == node) {
                    Decision::OwnNode
                } else {
                    self.decide(
                        identity,
                        node,
                        Direction::Ingress,
                        src_ip,
                        src,
                        protocol,
                        port,
                        dst_identity,
                    )
                }
            }
            _ => Decision::NotAPod,
        };
        Verdict {
            allowed: egress.allows() && ingress.allows(),
            egress,
            ingress,
            service: None,
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the hot path; a struct would only be rebuilt per call"
    )]
    fn decide(
        &self,
        identity: IdentityId,
        node: Option<NodeName>,
        direction: Direction,
        other_ip: IpAddr,
        other: Side,
        protocol: Protocol,
        port: u16,
        dst_identity: Option<IdentityId>,
    ) -> Decision {
        let Some(subject) = self.identity(identity) else {
            return Decision::NotIsolated;
        };
        let d = dir_index(direction);
        let isolated = !subject.isolating[d].is_empty();
        let dst_ports = dst_identity
            .and_then(|i| self.identity(i))
            .map(|i| i.key.ports.as_slice());
        let mut unjudged = None;
        for &rid in &subject.rules[d] {
            let Some(Some(entry)) = self.rules.get(rid.0 as usize) else {
                continue;
            };
            let deny = entry.rule.action == Action::Deny;
            if !deny && !isolated {
                // Deny rules come first: past them, an unisolated pod is allowed.
                break;
            }
            if !ports_match(&entry.rule.ports, protocol, port, dst_ports) {
                continue;
            }
            if self.peers_match(entry, other_ip, other, node) {
                return if deny {
                    Decision::Denied(rid)
                } else {
                    Decision::Allowed(rid)
                };
            }
            if entry.has_unjudgeable && !deny && unjudged.is_none() {
                unjudged = Some(rid);
            }
        }
        if isolated {
            Decision::DefaultDeny { unjudged }
        } else {
            Decision::NotIsolated
        }
    }

    fn peers_match(
        &self,
        entry: &RuleEntry,
        ip: IpAddr,
        other: Side,
        subject_node: Option<NodeName>,
    ) -> bool {
        let Some(peers) = &entry.peers else {
            return true;
        };
        peers.iter().any(|peer| match peer {
            CompiledPeer::Endpoints(sid) => match other {
                Side::Pod { identity, .. } => matches!(
                    self.selectors.get(sid.0 as usize),
                    Some(Some(sel)) if sel.members.contains(identity.0)
                ),
                _ => false,
            },
            CompiledPeer::Cidr { net, except } => {
                let cluster_address = matches!(other, Side::Pod { .. } | Side::Node { .. });
                (self.config.ipblock == IpBlockReading::Calico || !cluster_address)
                    && cidr_contains(net, except, ip)
            }
            CompiledPeer::ExternalCidr { net, except } => {
                !matches!(other, Side::Pod { .. } | Side::Node { .. })
                    && !self.is_ingress(ip)
                    && cidr_contains(net, except, ip)
            }
            CompiledPeer::Entity(entity) => self.entity_matches(*entity, ip, other, subject_node),
            CompiledPeer::Unjudgeable => false,
        })
    }

    fn is_ingress(&self, ip: IpAddr) -> bool {
        self.config.ingress_cidrs.iter().any(|c| c.contains(&ip))
    }

    /// World: not a pod, node, pod-CIDR or `ingress` address. An API server outside the
    /// cluster stays world (and is kube-apiserver too).
    fn is_world(&self, ip: IpAddr, side: Side) -> bool {
        matches!(side, Side::External | Side::Service(_))
            && !self.cluster_cidrs.iter().any(|c| c.contains(&ip))
            && !self.is_ingress(ip)
    }

    fn entity_matches(
        &self,
        entity: Entity,
        ip: IpAddr,
        other: Side,
        subject_node: Option<NodeName>,
    ) -> bool {
        match entity {
            Entity::All => true,
            Entity::World => self.is_world(ip, other),
            Entity::WorldIpv4 => ip.is_ipv4() && self.is_world(ip, other),
            Entity::WorldIpv6 => ip.is_ipv6() && self.is_world(ip, other),
            Entity::Cluster => !self.is_world(ip, other) || self.apiserver.contains(&ip),
            Entity::Host => {
                matches!(other, Side::Node { name } if name.is_some() && name == subject_node)
            }
            Entity::RemoteNode => {
                matches!(other, Side::Node { name } if name.is_none() || name != subject_node)
            }
            Entity::KubeApiserver => self.apiserver.contains(&ip),
            Entity::Ingress => self.is_ingress(ip),
            // Not visible from addresses; the compiler documents this in the IR.
            Entity::Health | Entity::Init | Entity::Unmanaged => false,
        }
    }

    /// What an address is, for explanations and metric labels.
    pub fn describe(&self, ip: IpAddr) -> PeerInfo {
        let apiserver = self.apiserver.contains(&ip);
        match self.resolve(ip) {
            Side::Pod { pod, .. } => match self.inventory.pod(pod) {
                Some(p) => PeerInfo {
                    kind: PeerKind::Pod,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    workload: p.workload.name.clone(),
                },
                None => PeerInfo::simple(PeerKind::World),
            },
            Side::Node { name } => PeerInfo {
                kind: if apiserver {
                    PeerKind::KubeApiserver
                } else {
                    PeerKind::Node
                },
                namespace: String::new(),
                name: name
                    .and_then(|n| self.node_names.get(n.0 as usize))
                    .cloned()
                    .unwrap_or_default(),
                workload: if apiserver { "kube-apiserver" } else { "node" }.to_owned(),
            },
            Side::Service(id) => match self.inventory.service(id) {
                Some(s) => PeerInfo {
                    kind: PeerKind::Service,
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    workload: s.name.clone(),
                },
                None => PeerInfo::simple(PeerKind::World),
            },
            Side::External if apiserver => PeerInfo::simple(PeerKind::KubeApiserver),
            Side::External if self.is_ingress(ip) => PeerInfo::simple(PeerKind::Ingress),
            Side::External if self.cluster_cidrs.iter().any(|c| c.contains(&ip)) => {
                PeerInfo::simple(PeerKind::Cluster)
            }
            Side::External => PeerInfo::simple(PeerKind::World),
        }
    }
}

/// What kind of peer an address is (SPEC 5.3's workload names for non-pods).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerKind {
    Pod,
    Node,
    KubeApiserver,
    Service,
    Ingress,
    /// An address in a pod CIDR that no known pod has.
    Cluster,
    World,
}

impl PeerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Node => "node",
            Self::KubeApiserver => "kube-apiserver",
            Self::Service => "service",
            Self::Ingress => "ingress",
            Self::Cluster => "cluster",
            Self::World => "world",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerInfo {
    pub kind: PeerKind,
    /// Empty for non-pods.
    pub namespace: String,
    pub name: String,
    /// The workload for pods, else what the peer is (`world`, `node`, ...).
    pub workload: String,
}

impl PeerInfo {
    fn simple(kind: PeerKind) -> Self {
        Self {
            kind,
            namespace: String::new(),
            name: String::new(),
            workload: kind.as_str().to_owned(),
        }
    }
}

/// Whether a flow's protocol and destination port fit a rule's ports; named ports resolve on
/// the destination pod's declared ports.
fn ports_match(
    ports: &[PortMatch],
    protocol: Protocol,
    port: u16,
    dst_ports: Option<&[ContainerPort]>,
) -> bool {
    if ports.is_empty() {
        return true;
    }
    ports.iter().any(|p| {
        if p.protocol.is_some_and(|rp| rp != protocol) {
            return false;
        }
        match &p.port {
            PortSpec::Any => true,
            PortSpec::Range(first, last) => (*first..=*last).contains(&port),
            PortSpec::Named(name) => dst_ports.is_some_and(|declared| {
                declared.iter().any(|c| {
                    c.name.as_deref() == Some(name.as_str())
                        && c.protocol == protocol
                        && c.port == port
                })
            }),
        }
    })
}
