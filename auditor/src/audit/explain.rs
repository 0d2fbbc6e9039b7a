//! Verdicts put into words: for each direction, which policy and rule decided, or why no policy
//! applies, plus the Service translation and rules that could not be judged. Used by `check`'s
//! output and by the daemon's logs.

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;

use super::Cluster;
use super::peer::PeerInfo;
use super::verdict::{FlowQuery, ServiceProblem, Verdict};
use crate::policy::model::{Decision, RuleRef};
use crate::vocab::Direction;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectionExplanation {
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// `rule`, `default-deny`, `not-isolated`, `own-node` or `not-a-pod`.
    pub by: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
    /// For `default-deny`: the policies isolating the pod.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub isolated_by: Vec<String>,
    /// The sentence the `reason` is made of (kept out of JSON, which has `reason`).
    #[serde(skip)]
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceExplanation {
    pub namespace: String,
    pub name: String,
    pub ready_endpoints: u32,
    /// The endpoint whose verdict is shown (`ip:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub verdict: &'static str,
    pub reason: String,
    pub src_peer: PeerInfo,
    pub dst_peer: PeerInfo,
    pub egress: DirectionExplanation,
    pub ingress: DirectionExplanation,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceExplanation>,
    /// Rules that might have allowed the flow but cannot be judged from addresses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unjudged: Vec<RuleRef>,
}

fn peer_text(p: &PeerInfo) -> String {
    match p.kind {
        "pod" => format!("pod {}/{}", p.namespace, p.name),
        "service" => format!("service {}/{}", p.namespace, p.name),
        kind if p.name.is_empty() => kind.to_owned(),
        kind => format!("{kind} {}", p.name),
    }
}

impl Cluster {
    /// Explains a verdict this cluster gave for `flow`.
    #[must_use]
    pub fn explain(&self, flow: &FlowQuery, verdict: &Verdict) -> Explanation {
        let flow = flow.normalized();
        let src_peer = self.peer_info(flow.src, None);
        let dst_peer = self.peer_info(flow.dst, Some(flow.port));
        // After Service translation the pod whose ingress was judged is the chosen endpoint.
        let (ingress_ip, ingress_port) = match verdict.service.and_then(|s| s.endpoint) {
            Some((ip, port)) => (ip, port),
            None => (flow.dst, flow.port),
        };
        let ingress_peer = self.peer_info(ingress_ip, Some(ingress_port));
        let what = |port: u16| {
            if flow.protocol.is_icmp() {
                "ICMP".to_owned()
            } else {
                format!("{}/{port}", flow.protocol)
            }
        };
        let mut unjudged = Vec::new();
        let mut egress = self.direction(
            Direction::Egress,
            verdict.egress,
            flow.src,
            &src_peer,
            &format!("{} to {}", what(ingress_port), peer_text(&ingress_peer)),
            &mut unjudged,
        );
        let mut ingress = self.direction(
            Direction::Ingress,
            verdict.ingress,
            ingress_ip,
            &ingress_peer,
            &format!("{} from {}", what(ingress_port), peer_text(&src_peer)),
            &mut unjudged,
        );
        // An allowed direction may still be refused by a deny rule the model cannot judge.
        let directions = [
            (Direction::Egress, verdict.egress, flow.src, &mut egress),
            (
                Direction::Ingress,
                verdict.ingress,
                ingress_ip,
                &mut ingress,
            ),
        ];
        for (direction, decision, subject_ip, explanation) in directions {
            if !matches!(decision, Decision::Allowed(_) | Decision::NotIsolated) {
                continue;
            }
            let Some(subject) = self.identity_at(subject_ip) else {
                continue;
            };
            let denies: Vec<RuleRef> = self
                .policy()
                .unjudged_denies(
                    subject,
                    direction,
                    self.identity_at(ingress_ip),
                    flow.protocol,
                    ingress_port,
                )
                .into_iter()
                .filter_map(|id| self.policy().rule_ref(id))
                .collect();
            for r in denies {
                let _ = write!(
                    explanation.text,
                    " (but {} could deny it and was not judged: {})",
                    r.text(),
                    r.unjudgeable
                        .as_deref()
                        .unwrap_or("not judgeable from addresses")
                );
                unjudged.push(r);
            }
        }
        let service = verdict.service.and_then(|hop| {
            let s = self.inventory().service(hop.service)?;
            let text = match hop.problem {
                Some(ServiceProblem::NoSuchPort) => format!(
                    "service {}/{} has no port {}",
                    s.namespace,
                    s.name,
                    what(flow.port)
                ),
                Some(ServiceProblem::NoReadyEndpoint) => format!(
                    "service {}/{} has no ready endpoint for {}",
                    s.namespace,
                    s.name,
                    what(flow.port)
                ),
                None => format!(
                    "service {}/{} translated to {} ready endpoint(s); {}",
                    s.namespace,
                    s.name,
                    hop.endpoints,
                    if verdict.allowed {
                        "every one is allowed".to_owned()
                    } else {
                        format!("{} is denied", peer_text(&ingress_peer))
                    }
                ),
            };
            Some(ServiceExplanation {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                ready_endpoints: hop.endpoints,
                endpoint: hop.endpoint.map(|(ip, port)| match ip {
                    IpAddr::V4(v4) => format!("{v4}:{port}"),
                    IpAddr::V6(v6) => format!("[{v6}]:{port}"),
                }),
                text,
            })
        });
        let problem = verdict.service.is_some_and(|h| h.problem.is_some());
        let directions = format!("egress: {}; ingress: {}", egress.text, ingress.text);
        let reason = match &service {
            Some(s) if problem => s.text.clone(),
            Some(s) => format!("{}; {directions}", s.text),
            None => directions,
        };
        Explanation {
            verdict: if verdict.allowed { "allow" } else { "deny" },
            reason,
            src_peer,
            dst_peer,
            egress,
            ingress,
            service,
            unjudged,
        }
    }

    fn direction(
        &self,
        direction: Direction,
        decision: Decision,
        subject_ip: IpAddr,
        subject: &PeerInfo,
        flow_text: &str,
        unjudged: &mut Vec<RuleRef>,
    ) -> DirectionExplanation {
        let end = match direction {
            Direction::Egress => "source",
            Direction::Ingress => "destination",
        };
        let mut out = DirectionExplanation {
            decision: if decision.allows() { "allow" } else { "deny" },
            by: "",
            rule: None,
            isolated_by: Vec::new(),
            text: String::new(),
        };
        match decision {
            Decision::NotAPod => {
                out.by = "not-a-pod";
                out.text = format!("no policy applies, the {end} is {}", peer_text(subject));
                // A node's own traffic is what Cilium host policies govern, and those are not
                // judged: say so rather than let "no policy applies" stand unqualified.
                let on_node = subject.kind == "node"
                    || (subject.kind == "kube-apiserver" && !subject.name.is_empty());
                if on_node {
                    let host: Vec<String> = self
                        .policy()
                        .unjudged_policies()
                        .flat_map(|(key, what)| what.iter().map(move |w| format!("{key} {w}")))
                        .collect();
                    if !host.is_empty() {
                        let _ = write!(
                            out.text,
                            " (not judged, may apply to it: {})",
                            host.join(", ")
                        );
                    }
                }
            }
            Decision::OwnNode => {
                out.by = "own-node";
                "allowed, a pod and its own node may always talk".clone_into(&mut out.text);
            }
            Decision::NotIsolated => {
                out.by = "not-isolated";
                out.text = format!(
                    "allowed, no policy isolates {} for {direction}",
                    peer_text(subject)
                );
            }
            Decision::Allowed(id) | Decision::Denied(id) => {
                out.by = "rule";
                let rule = self.policy().rule_ref(id);
                let verb = if decision.allows() {
                    "allowed"
                } else {
                    "denied"
                };
                out.text = match &rule {
                    Some(r) if r.l7 => {
                        format!("{verb} by {} (its L7 rules were not judged)", r.text())
                    }
                    Some(r) => format!("{verb} by {}", r.text()),
                    None => format!("{verb} by a rule that was since removed"),
                };
                if let Some((key, _)) = self.policy().rule(id) {
                    out.text.push_str(&self.unknown_note(key));
                }
                out.rule = rule;
            }
            Decision::DefaultDeny { unjudged: maybe } => {
                out.by = "default-deny";
                let isolating = self.isolating_policies(subject_ip, direction);
                out.isolated_by = isolating.iter().map(ToString::to_string).collect();
                out.text = format!(
                    "denied, {} is isolated for {direction} by {} and no rule allows {flow_text}",
                    peer_text(subject),
                    out.isolated_by.join(", ")
                );
                for key in isolating {
                    out.text.push_str(&self.unknown_note(key));
                }
                if let Some(r) = maybe.and_then(|id| self.policy().rule_ref(id)) {
                    let _ = write!(
                        out.text,
                        " (but {} could allow it and was not judged: {})",
                        r.text(),
                        r.unjudgeable
                            .as_deref()
                            .unwrap_or("not judgeable from addresses")
                    );
                    unjudged.push(r);
                }
            }
        }
        out
    }

    /// Says which fields of a policy this version does not know and so did not judge (kept
    /// from an object the API server validated); empty when there are none.
    fn unknown_note(&self, key: &crate::policy::ir::PolicyKey) -> String {
        let unknown = self.policy().unknown_fields(key);
        if unknown.is_empty() {
            String::new()
        } else {
            format!(
                " ({key} has fields this version does not judge: {})",
                unknown.join(", ")
            )
        }
    }
}
