//! The policy engine behind the audit's [`Judge`] seam: the model's verdict for each direction
//! turned into the deciding rules (the rule-hit labels) and, for denied flows, the explanation.

use crate::policy::ir::{Action, Direction};
use crate::policy::model::{self, Model};

use super::{Decision, FlowQuery, Judge, Judgement, ModelVerdict};

/// Rule name of the hit recorded against each policy that isolates a pod when no rule allows
/// its flow (Kubernetes' and Cilium's default deny).
pub const DEFAULT_DENY_RULE: &str = "default-deny";

/// The model's question for a flow.
fn flow_of(query: &FlowQuery) -> model::Flow {
    model::Flow {
        src: query.src,
        dst: query.dst,
        protocol: query.protocol,
        // The model takes ICMP without a port; the flow's "port" is an echo identifier.
        port: if query.protocol == crate::policy::ir::Protocol::Icmp {
            0
        } else {
            query.port
        },
    }
}

impl Judge for Model {
    fn judge(&self, query: &FlowQuery) -> Judgement {
        let flow = flow_of(query);
        let verdict = Model::judge(self, &flow);
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
                model::Decision::Allowed(id) | model::Decision::Denied(id) => {
                    if let Some((key, rule)) = self.rule(id) {
                        decisions.push(Decision {
                            policy: key.clone(),
                            direction,
                            rule: rule.name.clone(),
                            action: rule.action,
                        });
                    }
                }
                model::Decision::DefaultDeny { .. } => {
                    decisions.extend(self.isolating_policies(ip, direction).into_iter().map(
                        |key| Decision {
                            policy: key.clone(),
                            direction,
                            rule: DEFAULT_DENY_RULE.to_owned(),
                            action: Action::Deny,
                        },
                    ));
                }
                model::Decision::NotAPod
                | model::Decision::OwnNode
                | model::Decision::NotIsolated => {}
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

    fn explain(&self, query: &FlowQuery) -> String {
        let flow = flow_of(query);
        let verdict = Model::judge(self, &flow);
        Model::explain(self, &flow, &verdict).reason
    }
}
