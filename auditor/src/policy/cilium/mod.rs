//! `CiliumNetworkPolicy` and `CiliumClusterwideNetworkPolicy` (cilium.io/v2) compiled into the rule
//! IR with Cilium's semantics: the objects (`crd`), their selectors and label sources
//! (`labels`), their peers (`peers`) and their ports and ICMP fields (`ports`).

mod crd;
mod labels;
mod peers;
mod ports;
#[cfg(test)]
mod tests;

pub use crd::*;

use super::ir::{
    Action, CompileError, CompiledPolicy, Isolation, Peers, PolicyKey, PolicyKind, Rule, Subject,
};
use crate::vocab::Direction;
use labels::subject_of;
use peers::{egress_peers, ingress_peers};
use ports::{EntryPorts, ports_of};

/// Compiles a Cilium policy object of `kind` (one of the two Cilium kinds) into the rule IR.
/// A `CiliumNetworkPolicy` without a namespace lives in `default`, as `kubectl apply` would put it.
pub fn compile(kind: PolicyKind, policy: &CiliumPolicy) -> Result<CompiledPolicy, CompileError> {
    let CiliumPolicy {
        metadata,
        spec,
        specs,
    } = policy;
    let namespace = match kind {
        PolicyKind::CiliumNetworkPolicy => Some(
            metadata
                .namespace
                .clone()
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
        ),
        PolicyKind::CiliumClusterwideNetworkPolicy => None,
        PolicyKind::NetworkPolicy => {
            return Err(CompileError {
                field: "kind".to_owned(),
                reason: "a NetworkPolicy is not a Cilium policy".to_owned(),
            });
        }
    };
    let name = metadata
        .name
        .clone()
        .filter(|name| !name.is_empty())
        .ok_or_else(|| error("metadata.name", "missing"))?;
    let key = PolicyKey {
        kind,
        namespace: namespace.clone().unwrap_or_default(),
        name,
    };
    let mut compiled = CompiledPolicy {
        key,
        isolations: Vec::new(),
        rules: Vec::new(),
        unjudged: Vec::new(),
        unknown: Vec::new(),
    };
    if spec.is_none() && specs.is_none() {
        return Err(CompileError {
            field: "spec".to_owned(),
            reason: "a Cilium policy needs `spec` or `specs`".to_owned(),
        });
    }
    let scope = Scope {
        namespace: namespace.as_deref(),
    };
    if let Some(rule) = spec {
        compile_rule(scope, rule, "spec", "", &mut compiled)?;
    }
    for (index, rule) in specs.iter().flatten().enumerate() {
        let path = format!("specs[{index}]");
        let prefix = format!("specs[{index}].");
        compile_rule(scope, rule, &path, &prefix, &mut compiled)?;
    }
    Ok(compiled)
}

/// Where a policy lives: `Some(namespace)` for a `CiliumNetworkPolicy`, `None` for the
/// clusterwide kind. It decides how selectors without a namespace label are scoped.
#[derive(Clone, Copy)]
struct Scope<'a> {
    namespace: Option<&'a str>,
}

fn error(field: impl Into<String>, reason: impl Into<String>) -> CompileError {
    CompileError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn compile_rule(
    scope: Scope<'_>,
    rule: &CiliumRule,
    path: &str,
    name_prefix: &str,
    out: &mut CompiledPolicy,
) -> Result<(), CompileError> {
    let CiliumRule {
        endpoint_selector,
        node_selector,
        ingress,
        ingress_deny,
        egress,
        egress_deny,
        enable_default_deny,
        labels: _,
        description: _,
        log: _,
    } = rule;
    let subject = match (endpoint_selector, node_selector) {
        (Some(_), Some(_)) => {
            return Err(error(
                path,
                "endpointSelector and nodeSelector are mutually exclusive",
            ));
        }
        (None, None) => {
            return Err(error(
                path,
                "a rule needs an endpointSelector (or, in a clusterwide policy, a nodeSelector)",
            ));
        }
        (None, Some(_)) if scope.namespace.is_some() => {
            return Err(error(
                format!("{path}.nodeSelector"),
                "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy",
            ));
        }
        (None, Some(_)) => {
            // Host policies judge traffic of the nodes themselves, which the model does not
            // do; explanations of flows to and from nodes name them instead.
            tracing::warn!(
                policy = %out.key,
                rule = path,
                "host policy (nodeSelector) is not judged"
            );
            out.unjudged.push(format!("{path} (host policy)"));
            return Ok(());
        }
        (Some(selector), None) => {
            if let Some(subject) = subject_of(scope, selector, &format!("{path}.endpointSelector"))?
            {
                subject
            } else {
                // It selects Cilium's special endpoints (health, init, ...), never a pod,
                // and no flow the model judges has those at either end.
                tracing::warn!(
                    policy = %out.key,
                    rule = path,
                    "endpointSelector on reserved labels selects no pod; not judged"
                );
                return Ok(());
            }
        }
    };

    let has_ingress = non_empty(ingress.as_deref()) || non_empty(ingress_deny.as_deref());
    let has_egress = non_empty(egress.as_deref()) || non_empty(egress_deny.as_deref());
    let DefaultDeny {
        ingress: dd_ingress,
        egress: dd_egress,
    } = enable_default_deny.clone().unwrap_or_default();
    // Cilium fills an unset enableDefaultDeny with "this direction has rules"; an explicit
    // `true` isolates even without rules.
    if dd_ingress.unwrap_or(has_ingress) {
        out.isolations.push(Isolation {
            subject: subject.clone(),
            direction: Direction::Ingress,
        });
    }
    if dd_egress.unwrap_or(has_egress) {
        out.isolations.push(Isolation {
            subject: subject.clone(),
            direction: Direction::Egress,
        });
    }

    let sections: [(&str, Action, Option<&Vec<IngressRule>>); 2] = [
        ("ingress", Action::Allow, ingress.as_ref()),
        ("ingressDeny", Action::Deny, ingress_deny.as_ref()),
    ];
    for (section, action, rules) in sections {
        for (index, entry) in rules.into_iter().flatten().enumerate() {
            let field = format!("{path}.{section}[{index}]");
            let name = format!("{name_prefix}{section}[{index}]");
            let l3 = ingress_peers(scope, entry, &field)?;
            let ports = ports_of(
                entry.to_ports.as_deref(),
                entry.icmps.as_deref(),
                action,
                &field,
            )?;
            if action == Action::Deny && entry.authentication.is_some() {
                return Err(error(
                    format!("{field}.authentication"),
                    "deny rules cannot require authentication",
                ));
            }
            push_rules(out, &subject, Direction::Ingress, action, name, l3, ports);
        }
    }
    let sections: [(&str, Action, Option<&Vec<EgressRule>>); 2] = [
        ("egress", Action::Allow, egress.as_ref()),
        ("egressDeny", Action::Deny, egress_deny.as_ref()),
    ];
    for (section, action, rules) in sections {
        for (index, entry) in rules.into_iter().flatten().enumerate() {
            let field = format!("{path}.{section}[{index}]");
            let name = format!("{name_prefix}{section}[{index}]");
            if action == Action::Deny {
                if entry.to_fqdns.is_some() {
                    return Err(error(
                        format!("{field}.toFQDNs"),
                        "toFQDNs is not allowed in deny rules",
                    ));
                }
                if entry.authentication.is_some() {
                    return Err(error(
                        format!("{field}.authentication"),
                        "deny rules cannot require authentication",
                    ));
                }
            }
            let l3 = egress_peers(scope, entry, &field)?;
            let ports = ports_of(
                entry.to_ports.as_deref(),
                entry.icmps.as_deref(),
                action,
                &field,
            )?;
            push_rules(out, &subject, Direction::Egress, action, name, l3, ports);
        }
    }
    Ok(())
}

fn non_empty<T>(list: Option<&[T]>) -> bool {
    list.is_some_and(|l| !l.is_empty())
}

fn push_rules(
    out: &mut CompiledPolicy,
    subject: &Subject,
    direction: Direction,
    action: Action,
    name: String,
    peers: Peers,
    ports: EntryPorts,
) {
    let EntryPorts { plain, l7 } = ports;
    let has_l7 = !l7.is_empty();
    match plain {
        None => out.rules.push(Rule {
            name,
            direction,
            action,
            subject: subject.clone(),
            peers,
            ports: Vec::new(),
            l7: false,
        }),
        Some(plain) => {
            // Every port is spelt out by now, so an empty list means "no port matches" (only
            // L7 ports, or protocols a flow never has) rather than the IR's "every port".
            if !plain.is_empty() {
                out.rules.push(Rule {
                    name: name.clone(),
                    direction,
                    action,
                    subject: subject.clone(),
                    peers: peers.clone(),
                    ports: plain,
                    l7: false,
                });
            }
            if has_l7 {
                out.rules.push(Rule {
                    name,
                    direction,
                    action,
                    subject: subject.clone(),
                    peers,
                    ports: l7,
                    l7: true,
                });
            }
        }
    }
}
