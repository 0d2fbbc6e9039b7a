//! What judging a flow yields: the question ([`FlowQuery`]), the model's verdict per direction
//! ([`Verdict`], with the Service translation), and what the audit and the metrics take from it
//! ([`Judgement`], [`RuleHit`]). Plain types; [`super::judge`] computes them.

use std::net::IpAddr;

use serde::Serialize;

use crate::inventory::ServiceId;
use crate::policy::ir::{Action, PolicyKey};
use crate::policy::model::Decision;
use crate::vocab::{Direction, Protocol};

/// A flow as the model judges it: addresses as seen (a Service `ClusterIP` is the model's to
/// translate), the protocol, and the destination port (for ICMP, ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowQuery {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl FlowQuery {
    /// The question as policies ask it: one ICMP for both families, and no port for ICMP (the
    /// flow's "port" is an echo identifier).
    #[must_use]
    #[inline]
    pub const fn normalized(self) -> Self {
        let protocol = self.protocol.policy();
        Self {
            protocol,
            port: if protocol.is_icmp() { 0 } else { self.port },
            ..self
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

/// A flow to a `ClusterIP` is judged per ready endpoint; this says which one the verdict shows.
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

/// What the model says of a flow, direction by direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub allowed: bool,
    pub egress: Decision,
    pub ingress: Decision,
    pub service: Option<ServiceHop>,
}

/// What the intended model says of a flow, as the audit verdict needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelVerdict {
    Allow,
    Deny,
}

/// One rule that decided a direction of a flow: the `policy_rule_hits_total` labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RuleHit {
    pub policy: PolicyKey,
    pub direction: Direction,
    /// The rule's place in its object (`ingress[0]`), or how a default deny is named.
    pub rule: String,
    pub action: Action,
}

/// The model's answer for one flow, with the rules that decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Judgement {
    pub verdict: ModelVerdict,
    /// The deciding rules, per direction; empty when no policy applies.
    pub decisions: Vec<RuleHit>,
}

/// Rule name of the hit recorded against each policy that isolates a pod when no rule allows
/// its flow (Kubernetes' and Cilium's default deny).
pub const DEFAULT_DENY_RULE: &str = "default-deny";
