//! The model verdict of a flow: each end resolved, a flow to a Service `ClusterIP` translated to
//! its ready endpoints (SPEC 4.4: allowed only if every ready endpoint would be), and each
//! direction decided by the policy model; a pod and its own node may always talk. Verdicts are
//! cached until the next change ([`super::cache`]).

use std::net::IpAddr;

use super::cluster::{Cluster, Side};
use super::verdict::{
    DEFAULT_DENY_RULE, FlowQuery, Judgement, ModelVerdict, RuleHit, ServiceHop, ServiceProblem,
    Verdict,
};
use crate::inventory::ServiceId;
use crate::policy::ir::{Action, PolicyKey};
use crate::policy::model::{AddressFacts, Decision, IdentityId, NodeTag, Question};
use crate::vocab::{Direction, Protocol};

impl AddressFacts for Cluster {
    fn is_apiserver(&self, ip: IpAddr) -> bool {
        self.inventory().is_apiserver_address(ip)
    }

    fn in_pod_cidr(&self, ip: IpAddr) -> bool {
        self.inventory().in_pod_cidr(ip)
    }

    fn is_ingress(&self, ip: IpAddr) -> bool {
        self.is_ingress_address(ip)
    }
}

impl Cluster {
    /// The verdict for a flow, from the cache when this flow was judged since the last change.
    pub fn verdict(&mut self, flow: &FlowQuery) -> Verdict {
        // The cache keys flows as policies see them (see `FlowQuery::normalized`).
        if let Some(v) = self.cache.get(flow) {
            return v;
        }
        self.refresh();
        let v = self.judge(flow);
        self.cache.insert(flow, v);
        v
    }

    /// The verdict for a flow, computed (no cache).
    #[must_use]
    pub fn judge(&self, flow: &FlowQuery) -> Verdict {
        let flow = flow.normalized();
        let src = self.resolve(flow.src);
        match self.resolve(flow.dst) {
            Side::Service(service) => self.judge_service(&flow, src, service),
            dst => self.judge_direct(flow.src, src, flow.dst, dst, flow.protocol, flow.port),
        }
    }

    /// The verdict with the rules that decided it (the rule-hit labels).
    #[must_use]
    pub fn judgement(&self, flow: &FlowQuery) -> Judgement {
        let flow = flow.normalized();
        let verdict = self.judge(&flow);
        // Ingress of a ClusterIP flow is the chosen endpoint's.
        let ingress_ip = verdict
            .service
            .and_then(|s| s.endpoint)
            .map_or(flow.dst, |(ip, _)| ip);
        let mut decisions = Vec::new();
        for (direction, decision, ip) in [
            (Direction::Egress, verdict.egress, flow.src),
            (Direction::Ingress, verdict.ingress, ingress_ip),
        ] {
            match decision {
                Decision::Allowed(id) | Decision::Denied(id) => {
                    if let Some((key, rule)) = self.policy().rule(id) {
                        decisions.push(RuleHit {
                            policy: key.clone(),
                            direction,
                            rule: rule.name.clone(),
                            action: rule.action,
                        });
                    }
                }
                Decision::DefaultDeny { .. } => {
                    decisions.extend(self.isolating_policies(ip, direction).into_iter().map(
                        |key| RuleHit {
                            policy: key.clone(),
                            direction,
                            rule: DEFAULT_DENY_RULE.to_owned(),
                            action: Action::Deny,
                        },
                    ));
                }
                Decision::NotAPod | Decision::OwnNode | Decision::NotIsolated => {}
            }
        }
        Judgement {
            verdict: if verdict.allowed {
                ModelVerdict::Allow
            } else {
                ModelVerdict::Deny
            },
            decisions,
        }
    }

    /// The identity of the pod at `ip`, if a pod (not a hostNetwork one) has it.
    pub(super) fn identity_at(&self, ip: IpAddr) -> Option<IdentityId> {
        match self.resolve(ip) {
            Side::Pod { identity, .. } => Some(identity),
            Side::Node { .. } | Side::Service(_) | Side::External => None,
        }
    }

    /// The policies that isolate the pod at `ip` in `direction`, sorted.
    #[must_use]
    pub fn isolating_policies(&self, ip: IpAddr, direction: Direction) -> Vec<&PolicyKey> {
        self.identity_at(ip)
            .map(|identity| self.policy().isolating_policies(identity, direction))
            .unwrap_or_default()
    }

    fn judge_service(&self, flow: &FlowQuery, src: Side, id: ServiceId) -> Verdict {
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
        let Some(service) = self.inventory().service(id) else {
            return denied(ServiceProblem::NoReadyEndpoint);
        };
        let Some(index) = service
            .ports
            .iter()
            .position(|p| p.port == flow.port && p.protocol == flow.protocol)
        else {
            return denied(ServiceProblem::NoSuchPort);
        };
        let endpoints = self.inventory().service_endpoints(id, index);
        let mut shown: Option<(Verdict, (IpAddr, u16))> = None;
        for &(ip, target) in endpoints.iter() {
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

    fn judge_direct(
        &self,
        src_ip: IpAddr,
        src: Side,
        dst_ip: IpAddr,
        dst: Side,
        protocol: Protocol,
        port: u16,
    ) -> Verdict {
        let destination = match dst {
            Side::Pod { identity, .. } => Some(identity),
            _ => None,
        };
        let decide =
            |subject: Side, direction: Direction, peer_ip: IpAddr, peer: Side| match subject {
                Side::Pod { identity, node, .. } => {
                    if own_node(node, peer) {
                        Decision::OwnNode
                    } else {
                        self.policy().decide(
                            &Question {
                                direction,
                                subject: identity,
                                subject_node: node,
                                peer_ip,
                                peer: peer.endpoint(),
                                protocol,
                                port,
                                destination,
                            },
                            self,
                        )
                    }
                }
                Side::Node { .. } | Side::Service(_) | Side::External => Decision::NotAPod,
            };
        let egress = decide(src, Direction::Egress, dst_ip, dst);
        let ingress = decide(dst, Direction::Ingress, src_ip, src);
        Verdict {
            allowed: egress.allows() && ingress.allows(),
            egress,
            ingress,
            service: None,
        }
    }
}

/// A pod and its own node may always talk (`NetworkPolicy`'s and Cilium's host exemption).
fn own_node(pod_node: Option<NodeTag>, peer: Side) -> bool {
    pod_node.is_some() && matches!(peer, Side::Node { node } if node == pod_node)
}
