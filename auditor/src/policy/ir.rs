//! The rule IR: every policy kind (`NetworkPolicy`, `CiliumNetworkPolicy`, the clusterwide kind) is
//! compiled into these types, and the verdict engine only ever sees them. It must be able to say
//! everything SPEC 4.1-4.2 says, so a new policy feature starts here.
//!
//! How a compiler plugs in (`policy::netpol` and `policy::cilium` have this shape):
//! - the object's serde type, decoded by [`crate::decode`] (errors carry the file's line or the
//!   field path; unknown fields are errors or handed back, see [`crate::decode::Strictness`]);
//! - `compile(&object) -> Result<CompiledPolicy, CompileError>`: one [`CompiledPolicy`] per object,
//!   holding its [`Isolation`]s and its [`Rule`]s, each rule with its own [`Subject`] (a Cilium
//!   `specs:` list simply yields rules with different subjects);
//! - a row in [`super::kinds::POLICY_KINDS`], which is all the sources and drivers look at.
//!
//! The engine's semantics, for reference:
//! - a direction of an endpoint is *isolated* when any [`Isolation`] of that direction selects it;
//! - per direction: denied if any `Action::Deny` rule matches; else allowed if not isolated or any
//!   `Action::Allow` rule matches; else denied by default;
//! - a pod-to-pod flow needs the source's egress AND the destination's ingress;
//! - a pod and its own node may always talk (`NetworkPolicy`'s and Cilium's host exemption);
//! - `Peer::Cidr` matches pod and node addresses only in the Calico reading (config switch).

use std::fmt;

use ipnet::IpNet;
use serde::Serialize;

use crate::vocab::{Direction, Protocol};

/// The kinds of policy object the model knows; each has its row in
/// [`super::kinds::POLICY_KINDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PolicyKind {
    NetworkPolicy,
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
}

impl PolicyKind {
    pub const ALL: [Self; 3] = [
        Self::NetworkPolicy,
        Self::CiliumNetworkPolicy,
        Self::CiliumClusterwideNetworkPolicy,
    ];

    /// Its place in [`PolicyKind::ALL`] (and in the kind table): for per-kind arrays.
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The Kubernetes `kind` string, also used as the `policy_kind` metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NetworkPolicy => "NetworkPolicy",
            Self::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Self::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies a policy object: what an update or a delete names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyKey {
    pub kind: PolicyKind,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// What a matching rule does. Deny beats every allow, of any policy kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// One compiled policy object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CompiledPolicy {
    pub key: PolicyKey,
    /// Which endpoints this policy makes default-deny, per direction. `NetworkPolicy`: one per
    /// entry of `policyTypes` (after defaulting). Cilium: one per direction that has any rule
    /// (deny rules too), left out when `enableDefaultDeny` opts out of that direction.
    pub isolations: Vec<Isolation>,
    pub rules: Vec<Rule>,
    /// Parts of the object the model does not judge at all, e.g. `spec (host policy)` for a
    /// Cilium `nodeSelector` rule: explanations of flows to and from nodes name them.
    pub unjudged: Vec<String>,
    /// Fields of the object this version does not know (read leniently, see
    /// [`crate::decode::Strictness`]). A rule holding one is never matched by itself (see
    /// [`CompiledPolicy::with_unknown_fields`]); the others are named in explanations.
    pub unknown: Vec<String>,
}

impl CompiledPolicy {
    /// Takes note of fields this version does not know (`paths` like `spec.ingress[0].x`): a
    /// rule whose entry holds one cannot be judged from what is known of it, so its peers
    /// become unjudgeable (it is named when it might have decided, never guessed); the paths
    /// are kept in [`CompiledPolicy::unknown`].
    #[must_use]
    pub fn with_unknown_fields(mut self, paths: Vec<String>) -> Self {
        for path in &paths {
            let within = path.strip_prefix("spec.").unwrap_or(path);
            for rule in &mut self.rules {
                let inside = within
                    .strip_prefix(rule.name.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']));
                if inside {
                    rule.peers = Peers::List(vec![Peer::Unjudgeable(Unjudgeable::Other(format!(
                        "unknown field {path}"
                    )))]);
                }
            }
        }
        self.unknown = paths;
        self
    }
}

/// "Endpoints selected by `subject` are default-deny for `direction`".
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Isolation {
    pub subject: Subject,
    pub direction: Direction,
}

/// One rule: who it applies to, which peers and ports it matches, and what it does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Where the rule sits in its object, for explanations and the `rule` metric label,
    /// e.g. `ingress[0]`, `egressDeny[1]`, `specs[2].egress[0]`.
    pub name: String,
    pub direction: Direction,
    pub action: Action,
    /// The endpoints the rule applies to (the policy's `podSelector` / `endpointSelector`).
    pub subject: Subject,
    /// The other side of the flow.
    pub peers: Peers,
    /// Destination ports; empty means every port of every protocol.
    pub ports: Vec<PortMatch>,
    /// The rule carries L7 rules (Cilium `toPorts[].rules`): it is judged on addresses and
    /// ports, and the explanation says that its L7 part was not judged.
    pub l7: bool,
}

/// The endpoints a policy or rule applies to. Only pods (Cilium endpoints) are ever subjects:
/// host policies (`nodeSelector`) are not modelled, a compiler reports them as unjudgeable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subject {
    pub namespaces: NamespaceScope,
    pub pods: LabelSelector,
}

/// Which namespaces an endpoint selector covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NamespaceScope {
    /// Every namespace (CCNP subjects, `NetworkPolicy` `namespaceSelector: {}`).
    All,
    /// Exactly this namespace (a `NetworkPolicy`'s own namespace, Cilium's namespace label).
    Named(String),
    /// Namespaces whose labels match. Every namespace carries `kubernetes.io/metadata.name`.
    Selector(LabelSelector),
    /// Namespaces matching the selector AND named this (Cilium: namespace label plus
    /// `io.cilium.k8s.namespace.labels.*` in one selector).
    NamedAndSelector(String, LabelSelector),
}

/// A Kubernetes label selector: all requirements must hold; no requirement selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
}

/// `matchLabels: {k: v}` is `In([v])`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// The peers a rule matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peers {
    /// Every address (`NetworkPolicy`: empty or missing `from`/`to`; Cilium: an L3-less rule).
    Any,
    /// Any one of these (a union). An empty list matches nothing.
    List(Vec<Peer>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Pods selected by namespace and pod labels (`NetworkPolicy` `podSelector` /
    /// `namespaceSelector`, Cilium `fromEndpoints` / `toEndpoints`).
    Endpoints(Subject),
    /// An address block minus exceptions (`ipBlock`, `fromCIDR`, `toCIDRSet`, ...).
    Cidr { net: IpNet, except: Vec<IpNet> },
    /// Cilium's CIDR rules (`fromCIDR`, `toCIDRSet`, ...): the block minus exceptions, but never
    /// a pod, node or `ingress` address (Cilium gives those identities of their own), whatever
    /// the ipBlock reading is. An API server outside the cluster does match.
    ClusterExternalCidr { net: IpNet, except: Vec<IpNet> },
    /// A Cilium entity, resolved by the engine from inventory facts.
    Entity(Entity),
    /// A peer that cannot be judged from addresses: it never matches by itself; when nothing
    /// else allows the flow and the rule's ports fit, the verdict names the rule.
    Unjudgeable(Unjudgeable),
}

/// Cilium's reserved entities (SPEC 4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Addresses outside the cluster.
    World,
    /// `world` restricted to IPv4 addresses.
    WorldIpv4,
    /// `world` restricted to IPv6 addresses.
    WorldIpv6,
    /// Everything in the cluster: pods, nodes, API server, pod and node CIDRs.
    Cluster,
    /// The selected endpoint's own node.
    Host,
    /// Every other node.
    RemoteNode,
    /// The API server's addresses (`default/kubernetes` `EndpointSlice` / Endpoints).
    KubeApiserver,
    /// Cilium's ingress / Gateway proxy: the `entities.ingress` CIDRs of the config file.
    Ingress,
    /// Cilium health endpoints: not in the inventory, so never matched.
    Health,
    /// Endpoints still initialising: not observable from addresses, never matched.
    Init,
    /// Pods not managed by Cilium: not distinguishable here, never matched.
    Unmanaged,
    /// Everything.
    All,
}

impl Entity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::World => "world",
            Self::WorldIpv4 => "world-ipv4",
            Self::WorldIpv6 => "world-ipv6",
            Self::Cluster => "cluster",
            Self::Host => "host",
            Self::RemoteNode => "remote-node",
            Self::KubeApiserver => "kube-apiserver",
            Self::Ingress => "ingress",
            Self::Health => "health",
            Self::Init => "init",
            Self::Unmanaged => "unmanaged",
            Self::All => "all",
        }
    }
}

/// Why a peer cannot be judged from addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Unjudgeable {
    ToFqdns,
    ToServices,
    ToGroups,
    /// `fromRequires` / `toRequires` and other constructs; the string names it.
    Other(String),
}

impl fmt::Display for Unjudgeable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ToFqdns => f.write_str("toFQDNs"),
            Self::ToServices => f.write_str("toServices"),
            Self::ToGroups => f.write_str("toGroups"),
            Self::Other(what) => f.write_str(what),
        }
    }
}

/// One destination-port condition of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortMatch {
    /// `None` is Cilium's `ANY`. `NetworkPolicy` defaults to TCP before it gets here.
    pub protocol: Option<Protocol>,
    pub port: PortSpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortSpec {
    /// Every port of the protocol (port omitted, Cilium port `0`).
    Any,
    /// `first..=last` (`port` alone is `Range(p, p)`; `endPort` extends it).
    Range(u16, u16),
    /// A container port name, resolved on the destination pod with the same protocol; it
    /// matches nothing when the destination is not a pod or has no such port.
    Named(String),
}

/// A policy object that cannot be compiled, with the field at fault. The loader adds the file,
/// line and object name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct CompileError {
    /// A path like `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    pub reason: String,
}
