//! Cilium selectors: keys with their label source (`k8s:`, `reserved:`, ...), the pod namespace
//! label, namespace labels copied onto endpoints, the cluster-name label, and how a selector
//! becomes a subject or a peer of the IR.

use super::{EndpointSelector, Scope, SelectorOperator, SelectorRequirement, error};
use crate::policy::ir::{
    CompileError, Entity, LabelSelector, NamespaceScope, Operator, Peer, Requirement, Subject,
    Unjudgeable,
};
use crate::vocab::NAMESPACE_NAME_LABEL;

/// The label every Cilium endpoint carries with its pod's namespace.
const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Cilium copies each namespace label `k=v` onto the endpoint as this prefix + `k`.
const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// The cluster name Cilium puts in `io.cilium.k8s.policy.cluster` when none is configured.
const DEFAULT_CLUSTER_NAME: &str = "default";
const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// One requirement of a Cilium selector, with its key already split from its source prefix.
struct RawRequirement {
    source: LabelSource,
    key: String,
    operator: Operator,
    /// Came from `matchLabels` (Cilium overrides those for the namespace of a CNP's subject).
    from_match_labels: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LabelSource {
    /// `k8s:`, `any:`, `unspec:` or no prefix: labels derived from Kubernetes.
    Kubernetes,
    /// `reserved:` (or `$`): Cilium's entities.
    Reserved,
    /// `container:`, `cidr:`, `fqdn:` and the like, which the model has no facts for.
    Other,
}

/// Splits `k8s:app` into its source and key, the way Cilium parses selector keys.
fn split_source(key: &str) -> (LabelSource, &str) {
    if let Some(rest) = key.strip_prefix('$') {
        return (LabelSource::Reserved, rest);
    }
    match key.split_once(':') {
        None => (LabelSource::Kubernetes, key),
        Some(("k8s" | "any" | "unspec", rest)) => (LabelSource::Kubernetes, rest),
        Some(("reserved", rest)) => (LabelSource::Reserved, rest),
        Some((_, rest)) => (LabelSource::Other, rest),
    }
}

fn raw_requirements(
    selector: &EndpointSelector,
    field: &str,
    out: &mut Vec<RawRequirement>,
) -> Result<(), CompileError> {
    let EndpointSelector {
        match_labels,
        match_expressions,
    } = selector;
    for (key, value) in match_labels.iter().flatten() {
        let (source, key) = split_source(key);
        out.push(RawRequirement {
            source,
            key: key.to_owned(),
            operator: Operator::In(vec![value.clone()]),
            from_match_labels: true,
        });
    }
    for (index, expression) in match_expressions.iter().flatten().enumerate() {
        let SelectorRequirement {
            key,
            operator,
            values,
        } = expression;
        let path = format!("{field}.matchExpressions[{index}]");
        let values = values.clone().unwrap_or_default();
        let operator = match operator {
            SelectorOperator::In | SelectorOperator::NotIn if values.is_empty() => {
                return Err(error(path, "In and NotIn need at least one value"));
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist if !values.is_empty() => {
                return Err(error(path, "Exists and DoesNotExist take no values"));
            }
            SelectorOperator::In => Operator::In(values),
            SelectorOperator::NotIn => Operator::NotIn(values),
            SelectorOperator::Exists => Operator::Exists,
            SelectorOperator::DoesNotExist => Operator::DoesNotExist,
        };
        let (source, key) = split_source(key);
        out.push(RawRequirement {
            source,
            key: key.to_owned(),
            operator,
            from_match_labels: false,
        });
    }
    Ok(())
}

/// A selector's requirements sorted by what they are about.
#[derive(Default)]
struct Split {
    pods: Vec<Requirement>,
    namespaces: Vec<Requirement>,
    /// A requirement on the pod namespace label: the selector picks its namespaces itself.
    names_namespace: bool,
    reserved: Vec<(String, Operator)>,
    /// Requirements the model has no facts for (other label sources).
    unknown: Vec<String>,
    /// A requirement that no endpoint of this cluster can meet (another cluster's name).
    impossible: bool,
}

/// Sorts requirements; `drop_namespace_match_labels` drops `matchLabels` on the namespace
/// label, which Cilium replaces by the policy's namespace in a CNP's endpointSelector.
fn split(raw: Vec<RawRequirement>, drop_namespace_match_labels: bool) -> Split {
    let mut split = Split::default();
    for RawRequirement {
        source,
        key,
        operator,
        from_match_labels,
    } in raw
    {
        match source {
            LabelSource::Reserved => split.reserved.push((key, operator)),
            LabelSource::Other => split.unknown.push(key),
            LabelSource::Kubernetes if key == POD_NAMESPACE_LABEL => {
                if drop_namespace_match_labels && from_match_labels {
                    continue;
                }
                split.names_namespace = true;
                split.namespaces.push(Requirement {
                    key: NAMESPACE_NAME_LABEL.to_owned(),
                    operator,
                });
            }
            LabelSource::Kubernetes if key == CLUSTER_LABEL => {
                let is_default =
                    |values: &[String]| values.iter().any(|v| v == DEFAULT_CLUSTER_NAME);
                split.impossible |= match &operator {
                    Operator::In(values) => !is_default(values),
                    Operator::NotIn(values) => is_default(values),
                    Operator::Exists => false,
                    Operator::DoesNotExist => true,
                };
            }
            LabelSource::Kubernetes => match key.strip_prefix(NAMESPACE_LABELS_PREFIX) {
                Some(ns_key) => split.namespaces.push(Requirement {
                    key: ns_key.to_owned(),
                    operator,
                }),
                None => split.pods.push(Requirement { key, operator }),
            },
        }
    }
    split
}

fn namespace_scope(named: Option<&str>, mut requirements: Vec<Requirement>) -> NamespaceScope {
    match named {
        Some(name) if requirements.is_empty() => NamespaceScope::Named(name.to_owned()),
        Some(name) => {
            NamespaceScope::NamedAndSelector(name.to_owned(), LabelSelector { requirements })
        }
        None if requirements.is_empty() => NamespaceScope::All,
        None => {
            if let [
                Requirement {
                    key,
                    operator: Operator::In(values),
                },
            ] = requirements.as_mut_slice()
                && key == NAMESPACE_NAME_LABEL
                && let [only] = values.as_mut_slice()
            {
                return NamespaceScope::Named(std::mem::take(only));
            }
            NamespaceScope::Selector(LabelSelector { requirements })
        }
    }
}

/// The endpoints a rule applies to; in a CNP always in the policy's namespace. `None` when the
/// selector requires a `reserved:` (or other non-Kubernetes) label, which no pod has: it selects
/// Cilium's special endpoints (health, ...), which the model does not judge.
pub(super) fn subject_of(
    scope: Scope<'_>,
    selector: &EndpointSelector,
    field: &str,
) -> Result<Option<Subject>, CompileError> {
    let mut raw = Vec::new();
    raw_requirements(selector, field, &mut raw)?;
    // Pods carry no such labels: NotIn / DoesNotExist on them hold for every pod, In / Exists
    // for none.
    let mut non_pod = false;
    raw.retain(|r| {
        if r.source == LabelSource::Kubernetes {
            return true;
        }
        non_pod |= matches!(r.operator, Operator::In(_) | Operator::Exists);
        false
    });
    if non_pod {
        return Ok(None);
    }
    let split = split(raw, scope.namespace.is_some());
    let Split {
        pods,
        namespaces,
        names_namespace: _,
        reserved: _,
        unknown: _,
        impossible,
    } = split;
    let mut pods = LabelSelector { requirements: pods };
    if impossible {
        pods.requirements.push(never_requirement());
    }
    Ok(Some(Subject {
        namespaces: namespace_scope(scope.namespace, namespaces),
        pods,
    }))
}

/// A requirement no pod meets: `In` with no values.
pub(super) fn never_requirement() -> Requirement {
    Requirement {
        key: CLUSTER_LABEL.to_owned(),
        operator: Operator::In(Vec::new()),
    }
}

/// One `fromEndpoints`/`toEndpoints` selector, with the entry's `fromRequires`/`toRequires`
/// `ANDed` in.
pub(super) fn peer_of(
    scope: Scope<'_>,
    selector: &EndpointSelector,
    required: &[(String, &EndpointSelector)],
    field: &str,
) -> Result<Peer, CompileError> {
    let mut raw = Vec::new();
    raw_requirements(selector, field, &mut raw)?;
    for (path, extra) in required {
        raw_requirements(extra, path, &mut raw)?;
    }
    let Split {
        pods,
        namespaces,
        names_namespace,
        reserved,
        unknown,
        impossible,
    } = split(raw, false);
    if !unknown.is_empty() {
        return Ok(Peer::Unjudgeable(Unjudgeable::Other(format!(
            "endpoint selector on labels {}",
            unknown.join(", ")
        ))));
    }
    if !reserved.is_empty() {
        // `reserved:host` and friends: Cilium's spelling of an entity as a label.
        return Ok(reserved_peer(
            &reserved,
            pods.is_empty() && namespaces.is_empty(),
        ));
    }
    let mut pods = LabelSelector { requirements: pods };
    if impossible {
        pods.requirements.push(never_requirement());
    }
    // A selector without the namespace label stays in the policy's namespace (CNP) or covers
    // every namespace (CCNP, where Cilium requires the label to exist: pods only).
    let named = if names_namespace {
        None
    } else {
        scope.namespace
    };
    Ok(Peer::Endpoints(Subject {
        namespaces: namespace_scope(named, namespaces),
        pods,
    }))
}

fn reserved_peer(reserved: &[(String, Operator)], alone: bool) -> Peer {
    let entity = match reserved {
        [(key, Operator::Exists)] if alone => key.as_str(),
        [(key, Operator::In(values))] if alone && values.iter().all(String::is_empty) => {
            key.as_str()
        }
        _ => "",
    };
    let entity = match entity {
        "host" => Some(Entity::Host),
        "remote-node" => Some(Entity::RemoteNode),
        "world" => Some(Entity::World),
        "world-ipv4" => Some(Entity::WorldIpv4),
        "world-ipv6" => Some(Entity::WorldIpv6),
        "kube-apiserver" => Some(Entity::KubeApiserver),
        "ingress" => Some(Entity::Ingress),
        "health" => Some(Entity::Health),
        "init" => Some(Entity::Init),
        "unmanaged" => Some(Entity::Unmanaged),
        _ => None,
    };
    match entity {
        Some(entity) => Peer::Entity(entity),
        None => Peer::Unjudgeable(Unjudgeable::Other(format!(
            "endpoint selector on reserved labels {}",
            reserved
                .iter()
                .map(|(key, _)| key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
