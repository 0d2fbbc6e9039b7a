//! `NetworkPolicy` (networking.k8s.io/v1) compiled into the rule IR, following the Kubernetes
//! documentation: policyTypes defaulting, peers (pod, namespace, both, ipBlock), ports by number
//! or name with endPort; rules of a direction missing from policyTypes are ignored, as the API does.

use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ir::{
    Action, CompileError, CompiledPolicy, Isolation, LabelSelector, NamespaceScope, Peer, Peers,
    PolicyKey, PolicyKind, PortMatch, PortSpec, Rule, Subject,
};
use crate::vocab::{Direction, Protocol};

fn err(field: impl Into<String>, reason: impl Into<String>) -> CompileError {
    CompileError {
        field: field.into(),
        reason: reason.into(),
    }
}

pub fn compile(policy: &networking::NetworkPolicy) -> Result<CompiledPolicy, CompileError> {
    let name = policy
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| err("metadata.name", "missing"))?;
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let key = PolicyKey {
        kind: PolicyKind::NetworkPolicy,
        namespace: namespace.clone(),
        name,
    };
    let spec = policy.spec.clone().unwrap_or_default();
    let pods = match &spec.pod_selector {
        Some(s) => LabelSelector::from_k8s(s, "spec.podSelector")?,
        None => LabelSelector::everything(),
    };
    let subject = Subject {
        namespaces: NamespaceScope::Named(namespace.clone()),
        pods,
    };
    let ingress_rules = spec.ingress.unwrap_or_default();
    let egress_rules = spec.egress.unwrap_or_default();
    let (mut ingress, mut egress) = (false, false);
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => {
                        return Err(err(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?} (Ingress, Egress)"),
                        ));
                    }
                }
            }
        }
        // The API server's defaulting: Ingress always, Egress when there are egress rules.
        _ => {
            ingress = true;
            egress = !egress_rules.is_empty();
        }
    }
    let mut isolations = Vec::new();
    let mut rules = Vec::new();
    if ingress {
        isolations.push(Isolation {
            subject: subject.clone(),
            direction: Direction::Ingress,
        });
        for (i, rule) in ingress_rules.iter().enumerate() {
            let field = format!("spec.ingress[{i}]");
            rules.push(Rule {
                name: format!("ingress[{i}]"),
                direction: Direction::Ingress,
                action: Action::Allow,
                subject: subject.clone(),
                peers: peers(rule.from.as_deref(), &namespace, &format!("{field}.from"))?,
                ports: ports(rule.ports.as_deref(), &format!("{field}.ports"))?,
                l7: false,
            });
        }
    }
    if egress {
        isolations.push(Isolation {
            subject: subject.clone(),
            direction: Direction::Egress,
        });
        for (i, rule) in egress_rules.iter().enumerate() {
            let field = format!("spec.egress[{i}]");
            rules.push(Rule {
                name: format!("egress[{i}]"),
                direction: Direction::Egress,
                action: Action::Allow,
                subject: subject.clone(),
                peers: peers(rule.to.as_deref(), &namespace, &format!("{field}.to"))?,
                ports: ports(rule.ports.as_deref(), &format!("{field}.ports"))?,
                l7: false,
            });
        }
    }
    // Kept for as long as the policy exists (growing one by one leaves up to four times the room).
    isolations.shrink_to_fit();
    rules.shrink_to_fit();
    Ok(CompiledPolicy {
        key,
        isolations,
        rules,
        unjudged: Vec::new(),
        unknown: Vec::new(),
    })
}

fn peers(
    list: Option<&[networking::NetworkPolicyPeer]>,
    namespace: &str,
    field: &str,
) -> Result<Peers, CompileError> {
    let list = match list {
        None | Some([]) => return Ok(Peers::Any),
        Some(list) => list,
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, peer) in list.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let networking::NetworkPolicyPeer {
            ip_block,
            namespace_selector,
            pod_selector,
        } = peer;
        let compiled = match (ip_block, namespace_selector, pod_selector) {
            (Some(block), None, None) => {
                let net = cidr(&block.cidr, &format!("{at}.ipBlock.cidr"))?;
                let mut except = Vec::new();
                for (j, e) in block.except.iter().flatten().enumerate() {
                    except.push(cidr(e, &format!("{at}.ipBlock.except[{j}]"))?);
                }
                Peer::Cidr { net, except }
            }
            (Some(_), _, _) => {
                return Err(err(
                    at,
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                ));
            }
            (None, None, None) => {
                return Err(err(
                    at,
                    "a peer needs podSelector, namespaceSelector or ipBlock",
                ));
            }
            (None, ns, pods) => {
                let namespaces = match ns {
                    None => NamespaceScope::Named(namespace.to_owned()),
                    Some(s) => {
                        let selector =
                            LabelSelector::from_k8s(s, &format!("{at}.namespaceSelector"))?;
                        if selector.requirements.is_empty() {
                            NamespaceScope::All
                        } else {
                            NamespaceScope::Selector(selector)
                        }
                    }
                };
                let pods = match pods {
                    None => LabelSelector::everything(),
                    Some(s) => LabelSelector::from_k8s(s, &format!("{at}.podSelector"))?,
                };
                Peer::Endpoints(Subject { namespaces, pods })
            }
        };
        out.push(compiled);
    }
    Ok(Peers::List(out))
}

fn cidr(text: &str, field: &str) -> Result<IpNet, CompileError> {
    text.trim()
        .parse()
        .map_err(|_| err(field, format!("{text:?} is not a CIDR")))
}

fn ports(
    list: Option<&[networking::NetworkPolicyPort]>,
    field: &str,
) -> Result<Vec<PortMatch>, CompileError> {
    let list = list.unwrap_or_default();
    let mut out = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(other) => {
                return Err(err(
                    format!("{at}.protocol"),
                    format!("unknown protocol {other:?} (TCP, UDP, SCTP)"),
                ));
            }
        };
        let number = |n: i32, f: &str| {
            u16::try_from(n)
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| err(format!("{at}.{f}"), format!("{n} is not a port (1-65535)")))
        };
        let port = match (&p.port, p.end_port) {
            (None, None) => PortSpec::Any,
            (None, Some(_)) => return Err(err(format!("{at}.endPort"), "endPort needs port")),
            (Some(IntOrString::Int(n)), end) => {
                let first = number(*n, "port")?;
                let last = match end {
                    Some(e) => number(e, "endPort")?,
                    None => first,
                };
                if last < first {
                    return Err(err(
                        format!("{at}.endPort"),
                        format!("endPort {last} is below port {first}"),
                    ));
                }
                PortSpec::Range(first, last)
            }
            (Some(IntOrString::String(name)), None) => PortSpec::Named(name.clone()),
            (Some(IntOrString::String(_)), Some(_)) => {
                return Err(err(
                    format!("{at}.endPort"),
                    "endPort cannot be used with a named port",
                ));
            }
        };
        out.push(PortMatch {
            protocol: Some(protocol),
            port,
        });
    }
    Ok(out)
}
