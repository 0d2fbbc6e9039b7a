//! The cross-node counting rule: a flow between two nodes passes the attached interfaces of both
//! agents, and exactly one of them must count it. This module decides which one, as a pure
//! function of the peers, so every agent reaches the same answer without talking to the others.
//!
//! The rule, in order (the first that applies names the counting node):
//! 1. the initiator is a pod scheduled on a node: that node;
//! 2. else the responder is a pod scheduled on a node: that node;
//! 3. else the initiator is a node (a host process, or a hostNetwork pod): that node;
//! 4. else the responder is a node: that node;
//! 5. else (world, API server, Services or unknown addresses on both sides) every agent that sees
//!    it counts it: such a flow only crosses a node's uplink, so one agent sees it.
//!
//! Why the initiator's node first: its pod-side interface carries the opening packet before any
//! CNI policy can drop it (TCX attaches first), so that agent sees every attempt, refused or
//! unanswered ones included, while the responder's agent never sees a SYN the source node's egress
//! policy dropped. Pods come before nodes because pod interfaces are always attached, whereas a
//! node's own traffic is only seen when its uplink is. A flow first seen mid-stream is oriented
//! by evidence every agent reads alike (conntrack, declared ports, the ephemeral range); when
//! there is none, the audit takes its endpoints in address order for this rule instead of the
//! kernel's guess, which two agents can make differently.

use super::Peer;

/// The node whose agent counts a flow between `initiator` and `responder`; `None` when no peer
/// is tied to a node (every agent that sees the flow counts it).
#[must_use]
pub fn counting_node<'a>(initiator: &'a Peer, responder: &'a Peer) -> Option<&'a str> {
    let pod_node = |peer: &'a Peer| match peer {
        Peer::Pod(_) => peer.node(),
        _ => None,
    };
    let node = |peer: &'a Peer| match peer {
        Peer::Node { .. } => peer.node(),
        _ => None,
    };
    pod_node(initiator)
        .or_else(|| pod_node(responder))
        .or_else(|| node(initiator))
        .or_else(|| node(responder))
}

/// Whether the agent on `local_node` counts the flow. Without a local node name (a machine
/// that is not part of the inventory, e.g. `--cluster` snapshots of another cluster) the agent
/// counts everything it sees.
#[must_use]
pub fn counts_here(local_node: Option<&str>, initiator: &Peer, responder: &Peer) -> bool {
    match (local_node, counting_node(initiator, responder)) {
        (Some(local), Some(owner)) => local == owner,
        (None, _) | (_, None) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::PodPeer;

    fn pod(node: Option<&str>) -> Peer {
        Peer::Pod(PodPeer {
            namespace: "ns".into(),
            name: "p".into(),
            workload: "w".into(),
            node: node.map(str::to_owned),
        })
    }

    fn node(name: &str) -> Peer {
        Peer::Node { name: name.into() }
    }

    /// Every pair of peers across two nodes is counted by exactly one of the two agents, or by
    /// both only when no peer is tied to a node.
    #[test]
    fn exactly_one_agent_counts_node_bound_flows() {
        let peers = [
            pod(Some("a")),
            pod(Some("b")),
            pod(None),
            node("a"),
            node("b"),
            Peer::World,
            Peer::KubeApiserver,
            Peer::Ingress,
            Peer::Unknown,
            Peer::Service {
                namespace: "ns".into(),
                name: "svc".into(),
                workload: "w".into(),
            },
        ];
        for initiator in &peers {
            for responder in &peers {
                let on_a = counts_here(Some("a"), initiator, responder);
                let on_b = counts_here(Some("b"), initiator, responder);
                let bound = counting_node(initiator, responder).is_some();
                assert!(
                    !bound || on_a != on_b,
                    "{initiator:?} -> {responder:?}: a={on_a} b={on_b}, want exactly one"
                );
                assert!(
                    bound || (on_a && on_b),
                    "{initiator:?} -> {responder:?}: unbound flow must count everywhere"
                );
            }
        }
    }

    #[test]
    fn initiator_pod_node_wins() {
        assert_eq!(counting_node(&pod(Some("a")), &pod(Some("b"))), Some("a"));
        assert_eq!(counting_node(&pod(Some("b")), &pod(Some("a"))), Some("b"));
        assert_eq!(counting_node(&pod(Some("b")), &node("a")), Some("b"));
    }

    #[test]
    fn responder_pod_counts_when_initiator_is_not_a_pod() {
        assert_eq!(counting_node(&Peer::World, &pod(Some("b"))), Some("b"));
        assert_eq!(counting_node(&node("a"), &pod(Some("b"))), Some("b"));
        assert_eq!(counting_node(&pod(None), &pod(Some("b"))), Some("b"));
        assert!(!counts_here(Some("a"), &node("a"), &pod(Some("b"))));
    }

    #[test]
    fn node_traffic_counts_on_the_initiating_node_then_the_responder() {
        assert_eq!(counting_node(&node("a"), &node("b")), Some("a"));
        assert_eq!(counting_node(&node("a"), &Peer::World), Some("a"));
        assert_eq!(counting_node(&Peer::World, &node("b")), Some("b"));
        assert_eq!(counting_node(&Peer::KubeApiserver, &Peer::World), None);
    }

    #[test]
    fn without_a_local_node_everything_counts() {
        assert!(counts_here(None, &pod(Some("a")), &pod(Some("b"))));
        assert!(counts_here(None, &Peer::World, &Peer::World));
    }
}
