//! Deciding one direction of a flow for one identity: deny rules first (any match denies), then,
//! when the identity is isolated for that direction, the first allow rule that matches, else the
//! default deny. The other end of the flow is described by the caller: what it is
//! ([`Endpoint`]) and, for entity and CIDR rules, facts about its address ([`AddressFacts`]).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{CompiledPeer, IdentityId, IpBlockReading, Model, RuleEntry, RuleId};
use crate::policy::ir::{Action, Entity, PortMatch, PortSpec};
use crate::vocab::{ContainerPort, Direction, Protocol};

/// A node, as the caller tells nodes apart: equal tags are the same node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeTag(pub u32);

/// What the other end of a flow is, as far as policies care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A pod (not a hostNetwork one: those are their node).
    Pod {
        identity: IdentityId,
        node: Option<NodeTag>,
    },
    /// A node's address, or a hostNetwork pod's; the node may be unknown.
    Node { node: Option<NodeTag> },
    /// Anything else: a Service address, an address outside the cluster, an unknown pod.
    Other,
}

/// Facts about addresses that only the cluster's inventory and configuration know; asked only
/// when a rule needs them (entities, CIDR rules).
pub trait AddressFacts {
    /// An API server endpoint address (`default/kubernetes`).
    fn is_apiserver(&self, ip: IpAddr) -> bool;
    /// Inside a node's pod CIDR.
    fn in_pod_cidr(&self, ip: IpAddr) -> bool;
    /// One of the `ingress` entity's addresses (configured).
    fn is_ingress(&self, ip: IpAddr) -> bool;
}

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
    #[must_use]
    pub const fn allows(self) -> bool {
        matches!(
            self,
            Self::NotAPod | Self::OwnNode | Self::NotIsolated | Self::Allowed(_)
        )
    }

    /// The rule that decided, for explanations and rule-hit metrics.
    #[must_use]
    pub const fn rule(self) -> Option<RuleId> {
        match self {
            Self::Allowed(r) | Self::Denied(r) => Some(r),
            _ => None,
        }
    }
}

/// One direction of a flow, from the point of view of the pod a policy would select.
#[derive(Clone, Copy, Debug)]
pub struct Question {
    pub direction: Direction,
    /// The pod whose policies decide.
    pub subject: IdentityId,
    pub subject_node: Option<NodeTag>,
    /// The other end.
    pub peer_ip: IpAddr,
    pub peer: Endpoint,
    /// As policies name it (see [`Protocol::policy`]).
    pub protocol: Protocol,
    /// The destination port (0 for ICMP).
    pub port: u16,
    /// The destination pod, whose declared ports resolve named ports.
    pub destination: Option<IdentityId>,
}

fn cidr_contains(net: &IpNet, except: &[IpNet], ip: IpAddr) -> bool {
    net.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
}

impl Model {
    /// Decides one direction of a flow.
    pub fn decide(&self, q: &Question, facts: &impl AddressFacts) -> Decision {
        let Some(subject) = self.identities.get(q.subject) else {
            return Decision::NotIsolated;
        };
        let d = q.direction.index();
        let isolated = !subject.isolating[d].is_empty();
        let dst_ports = q.destination.map(|i| self.identity_ports(i));
        let mut unjudged = None;
        for &rid in &subject.rules[d] {
            let Some(entry) = self.rules.get(rid) else {
                continue;
            };
            let deny = entry.rule.action == Action::Deny;
            if !deny && !isolated {
                // Deny rules come first: past them, an unisolated pod is allowed.
                break;
            }
            if !ports_match(&entry.rule.ports, q.protocol, q.port, dst_ports) {
                continue;
            }
            if self.peers_match(entry, q, facts) {
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

    /// Deny rules of an identity for `direction` whose ports fit the flow but whose peers cannot
    /// all be judged from addresses (Cilium deny rules with `toServices`, `toGroups`,
    /// `fromRequires`, ...): they might refuse a flow the model allows, so an explanation names
    /// them. `destination` resolves named ports.
    #[must_use]
    pub fn unjudged_denies(
        &self,
        subject: IdentityId,
        direction: Direction,
        destination: Option<IdentityId>,
        protocol: Protocol,
        port: u16,
    ) -> Vec<RuleId> {
        let Some(identity) = self.identities.get(subject) else {
            return Vec::new();
        };
        let dst_ports = destination.map(|i| self.identity_ports(i));
        identity.rules[direction.index()]
            .iter()
            .copied()
            .filter(|rid| {
                self.rules.get(*rid).is_some_and(|entry| {
                    entry.rule.action == Action::Deny
                        && entry.has_unjudgeable
                        && ports_match(&entry.rule.ports, protocol, port, dst_ports)
                })
            })
            .collect()
    }

    fn peers_match(&self, entry: &RuleEntry, q: &Question, facts: &impl AddressFacts) -> bool {
        let Some(peers) = &entry.peers else {
            return true;
        };
        let cluster_address = matches!(q.peer, Endpoint::Pod { .. } | Endpoint::Node { .. });
        peers.iter().any(|peer| match peer {
            CompiledPeer::Endpoints(sid) => match q.peer {
                Endpoint::Pod { identity, .. } => self.selectors.matches(*sid, identity.index()),
                Endpoint::Node { .. } | Endpoint::Other => false,
            },
            CompiledPeer::Cidr { net, except } => {
                (self.ipblock == IpBlockReading::Calico || !cluster_address)
                    && cidr_contains(net, except, q.peer_ip)
            }
            CompiledPeer::ExternalCidr { net, except } => {
                !cluster_address
                    && !facts.is_ingress(q.peer_ip)
                    && cidr_contains(net, except, q.peer_ip)
            }
            CompiledPeer::Entity(entity) => entity_matches(*entity, q, facts),
            CompiledPeer::Unjudgeable => false,
        })
    }
}

/// World: not a pod, node, pod-CIDR or `ingress` address. An API server outside the cluster
/// stays world (and is kube-apiserver too).
fn is_world(q: &Question, facts: &impl AddressFacts) -> bool {
    matches!(q.peer, Endpoint::Other)
        && !facts.in_pod_cidr(q.peer_ip)
        && !facts.is_ingress(q.peer_ip)
}

fn entity_matches(entity: Entity, q: &Question, facts: &impl AddressFacts) -> bool {
    let ip = q.peer_ip;
    match entity {
        Entity::All => true,
        Entity::World => is_world(q, facts),
        Entity::WorldIpv4 => ip.is_ipv4() && is_world(q, facts),
        Entity::WorldIpv6 => ip.is_ipv6() && is_world(q, facts),
        Entity::Cluster => !is_world(q, facts) || facts.is_apiserver(ip),
        Entity::Host => {
            matches!(q.peer, Endpoint::Node { node } if node.is_some() && node == q.subject_node)
        }
        Entity::RemoteNode => {
            matches!(q.peer, Endpoint::Node { node } if node.is_none() || node != q.subject_node)
        }
        Entity::KubeApiserver => facts.is_apiserver(ip),
        Entity::Ingress => facts.is_ingress(ip),
        // Not visible from addresses; the compiler documents this in the IR.
        Entity::Health | Entity::Init | Entity::Unmanaged => false,
    }
}

/// Whether a flow's protocol and destination port fit a rule's ports; named ports resolve on
/// the destination pod's declared ports. Tried for every rule a decision walks: inline.
#[inline]
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
