//! CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (cilium.io/v2): the objects as written
//! and their compilation into the rule IR with Cilium's semantics. The serde types are strict
//! (unknown fields and wrong types are errors) because a misspelt `fromEndpoint` would otherwise
//! silently turn a narrow rule into an allow-from-everyone one.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::inventory::NAMESPACE_NAME_LABEL;

use super::ir::{
    Action, CompileError, CompiledPolicy, Direction, Entity, Isolation, LabelSelector,
    NamespaceScope, Operator, Peer, Peers, PolicyKey, PolicyKind, PortMatch, PortSpec, Protocol,
    Requirement, Rule, Subject, Unjudgeable,
};

/// The label every Cilium endpoint carries with its pod's namespace.
const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Cilium copies each namespace label `k=v` onto the endpoint as this prefix + `k`.
const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// A CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy object. Both kinds share the shape;
/// the kind decides how selectors are scoped, so it is passed to [`compile`].
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CiliumPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// A single rule.
    #[serde(default)]
    pub spec: Option<CiliumRule>,
    /// More rules; Cilium applies `spec` and every entry of `specs`.
    #[serde(default)]
    pub specs: Option<Vec<CiliumRule>>,
}

/// One Cilium rule (`spec` or an entry of `specs`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumRule {
    #[serde(default)]
    pub endpoint_selector: Option<EndpointSelector>,
    /// Host policies (clusterwide only): they apply to nodes, which the model does not judge.
    #[serde(default)]
    pub node_selector: Option<EndpointSelector>,
    #[serde(default)]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default)]
    pub ingress_deny: Option<Vec<IngressRule>>,
    #[serde(default)]
    pub egress: Option<Vec<EgressRule>>,
    #[serde(default)]
    pub egress_deny: Option<Vec<EgressRule>>,
    #[serde(default)]
    pub enable_default_deny: Option<DefaultDeny>,
    /// Metadata only.
    #[serde(default)]
    pub labels: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub description: Option<String>,
    /// Policy verdict logging settings: no effect on verdicts.
    #[serde(default)]
    pub log: Option<serde_json::Value>,
}

/// `enableDefaultDeny`: unset means "on for each direction the rule has rules for".
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultDeny {
    #[serde(default)]
    pub ingress: Option<bool>,
    #[serde(default)]
    pub egress: Option<bool>,
}

/// A Cilium endpoint selector: a Kubernetes label selector whose keys may carry a source prefix
/// (`k8s:`, `any:`, `reserved:`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSelector {
    #[serde(default)]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub match_expressions: Option<Vec<SelectorRequirement>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default)]
    pub values: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// An `ingress` or `ingressDeny` entry. Deny entries are the same shape minus L7 and
/// authentication, which [`compile`] rejects in them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    #[serde(default)]
    pub from_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default)]
    pub from_requires: Option<Vec<EndpointSelector>>,
    #[serde(default, rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default)]
    pub from_entities: Option<Vec<CiliumEntity>>,
    #[serde(default)]
    pub from_groups: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub from_nodes: Option<Vec<EndpointSelector>>,
    #[serde(default)]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(default, rename = "icmps")]
    pub icmps: Option<Vec<IcmpRule>>,
    #[serde(default)]
    pub authentication: Option<serde_json::Value>,
}

/// An `egress` or `egressDeny` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default)]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default)]
    pub to_requires: Option<Vec<EndpointSelector>>,
    #[serde(default, rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(default, rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default)]
    pub to_entities: Option<Vec<CiliumEntity>>,
    #[serde(default)]
    pub to_services: Option<Vec<serde_json::Value>>,
    #[serde(default, rename = "toFQDNs")]
    pub to_fqdns: Option<Vec<FqdnSelector>>,
    #[serde(default)]
    pub to_groups: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub to_nodes: Option<Vec<EndpointSelector>>,
    #[serde(default)]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(default, rename = "icmps")]
    pub icmps: Option<Vec<IcmpRule>>,
    #[serde(default)]
    pub authentication: Option<serde_json::Value>,
}

/// `fromCIDRSet` / `toCIDRSet` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrRule {
    #[serde(default)]
    pub cidr: Option<String>,
    #[serde(default)]
    pub except: Option<Vec<String>>,
    /// References a CiliumCIDRGroup object, which the model does not load.
    #[serde(default)]
    pub cidr_group_ref: Option<String>,
    #[serde(default)]
    pub cidr_group_selector: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FqdnSelector {
    #[serde(default)]
    pub match_name: Option<String>,
    #[serde(default)]
    pub match_pattern: Option<String>,
}

/// Cilium's entity names, as the CRD's enum lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CiliumEntity {
    All,
    World,
    #[serde(rename = "world-ipv4")]
    WorldIpv4,
    #[serde(rename = "world-ipv6")]
    WorldIpv6,
    Cluster,
    Host,
    RemoteNode,
    KubeApiserver,
    Ingress,
    Health,
    Init,
    Unmanaged,
    None,
}

/// A `toPorts` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRule {
    #[serde(default)]
    pub ports: Option<Vec<PortProtocol>>,
    /// L7 rules (`http`, `kafka`, `dns`, `l7proto`/`l7`): judged only at L3/L4.
    #[serde(default)]
    pub rules: Option<L7Rules>,
    #[serde(default, rename = "terminatingTLS")]
    pub terminating_tls: Option<serde_json::Value>,
    #[serde(default, rename = "originatingTLS")]
    pub originating_tls: Option<serde_json::Value>,
    #[serde(default)]
    pub server_names: Option<Vec<String>>,
    #[serde(default)]
    pub listener: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L7Rules {
    #[serde(default)]
    pub http: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub kafka: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub dns: Option<Vec<serde_json::Value>>,
    #[serde(default, rename = "l7proto")]
    pub l7proto: Option<String>,
    #[serde(default)]
    pub l7: Option<Vec<serde_json::Value>>,
}

impl L7Rules {
    /// The L7 protocols named, for explanations (`http`, `dns`, ...).
    fn kinds(&self) -> Vec<String> {
        let Self {
            http,
            kafka,
            dns,
            l7proto,
            l7: _,
        } = self;
        let mut kinds = Vec::new();
        if http.is_some() {
            kinds.push("http".to_owned());
        }
        if kafka.is_some() {
            kinds.push("kafka".to_owned());
        }
        if dns.is_some() {
            kinds.push("dns".to_owned());
        }
        if let Some(proto) = l7proto {
            kinds.push(proto.clone());
        }
        kinds
    }
}

/// One port of a `toPorts` entry. Cilium's `port` is a string: a number or a port name.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortProtocol {
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default)]
    pub end_port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpRule {
    #[serde(default)]
    pub fields: Option<Vec<IcmpField>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpField {
    #[serde(default)]
    pub family: Option<String>,
    #[serde(rename = "type")]
    pub icmp_type: IcmpType,
}

/// ICMP type: a number or one of Cilium's names (`EchoRequest`, ...).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum IcmpType {
    Number(u8),
    Name(String),
}

/// Compiles a Cilium policy object of `kind` (one of the two Cilium kinds) into the rule IR.
/// A CiliumNetworkPolicy without a namespace lives in `default`, as `kubectl apply` would put it.
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

/// Where a policy lives: `Some(namespace)` for a CiliumNetworkPolicy, `None` for the
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
            match subject_of(scope, selector, &format!("{path}.endpointSelector"))? {
                Some(subject) => subject,
                None => {
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
        }
    };

    let has_ingress = non_empty(ingress) || non_empty(ingress_deny);
    let has_egress = non_empty(egress) || non_empty(egress_deny);
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

fn non_empty<T>(list: &Option<Vec<T>>) -> bool {
    list.as_ref().is_some_and(|l| !l.is_empty())
}

/// The ports of one ingress/egress entry: plain ports and the ports that carry L7 rules are
/// kept apart so only the latter are flagged as "L7 not judged".
struct EntryPorts {
    /// `None`: the entry has neither `toPorts` nor `icmps`, so it matches every port.
    plain: Option<Vec<PortMatch>>,
    l7: Vec<PortMatch>,
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

/// The L3 fields of an ingress or egress entry, named as the direction spells them.
struct L3<'a> {
    endpoints: (&'static str, &'a Option<Vec<EndpointSelector>>),
    requires: (&'static str, &'a Option<Vec<EndpointSelector>>),
    cidr: (&'static str, &'a Option<Vec<String>>),
    cidr_set: (&'static str, &'a Option<Vec<CidrRule>>),
    entities: (&'static str, &'a Option<Vec<CiliumEntity>>),
    groups: (&'static str, &'a Option<Vec<serde_json::Value>>),
    nodes: (&'static str, &'a Option<Vec<EndpointSelector>>),
    services: Option<&'a Option<Vec<serde_json::Value>>>,
    fqdns: Option<&'a Option<Vec<FqdnSelector>>>,
    has_l4: bool,
}

fn ingress_peers(
    scope: Scope<'_>,
    entry: &IngressRule,
    field: &str,
) -> Result<Peers, CompileError> {
    let IngressRule {
        from_endpoints,
        from_requires,
        from_cidr,
        from_cidr_set,
        from_entities,
        from_groups,
        from_nodes,
        to_ports,
        icmps,
        authentication: _,
    } = entry;
    l3_peers(
        scope,
        field,
        &L3 {
            endpoints: ("fromEndpoints", from_endpoints),
            requires: ("fromRequires", from_requires),
            cidr: ("fromCIDR", from_cidr),
            cidr_set: ("fromCIDRSet", from_cidr_set),
            entities: ("fromEntities", from_entities),
            groups: ("fromGroups", from_groups),
            nodes: ("fromNodes", from_nodes),
            services: None,
            fqdns: None,
            has_l4: non_empty(to_ports) || non_empty(icmps),
        },
    )
}

fn egress_peers(scope: Scope<'_>, entry: &EgressRule, field: &str) -> Result<Peers, CompileError> {
    let EgressRule {
        to_endpoints,
        to_requires,
        to_cidr,
        to_cidr_set,
        to_entities,
        to_services,
        to_fqdns,
        to_groups,
        to_nodes,
        to_ports,
        icmps,
        authentication: _,
    } = entry;
    l3_peers(
        scope,
        field,
        &L3 {
            endpoints: ("toEndpoints", to_endpoints),
            requires: ("toRequires", to_requires),
            cidr: ("toCIDR", to_cidr),
            cidr_set: ("toCIDRSet", to_cidr_set),
            entities: ("toEntities", to_entities),
            groups: ("toGroups", to_groups),
            nodes: ("toNodes", to_nodes),
            services: Some(to_services),
            fqdns: Some(to_fqdns),
            has_l4: non_empty(to_ports) || non_empty(icmps),
        },
    )
}

fn l3_peers(scope: Scope<'_>, field: &str, l3: &L3<'_>) -> Result<Peers, CompileError> {
    let L3 {
        endpoints,
        requires,
        cidr,
        cidr_set,
        entities,
        groups,
        nodes,
        services,
        fqdns,
        has_l4,
    } = l3;
    let any_l3 = endpoints.1.is_some()
        || requires.1.is_some()
        || cidr.1.is_some()
        || cidr_set.1.is_some()
        || entities.1.is_some()
        || groups.1.is_some()
        || nodes.1.is_some()
        || services.is_some_and(Option::is_some)
        || fqdns.is_some_and(Option::is_some);
    if !any_l3 {
        // An L4-only entry applies to every peer; an entry with nothing at all (`- {}`) only
        // switches default deny on and allows nothing.
        return Ok(if *has_l4 {
            Peers::Any
        } else {
            Peers::List(Vec::new())
        });
    }

    let mut peers = Vec::new();
    // fromRequires/toRequires narrow the endpoint selectors: Cilium ANDs them into every
    // endpoint selector of every rule for the subject; the model applies them within this
    // entry and names them, since their effect on other policies is not modelled.
    let mut required = Vec::new();
    for (index, selector) in requires.1.iter().flatten().enumerate() {
        required.push((format!("{field}.{}[{index}]", requires.0), selector));
    }
    if !required.is_empty() {
        peers.push(Peer::Unjudgeable(Unjudgeable::Other(format!(
            "{} (its effect on other rules is not modelled)",
            requires.0
        ))));
    }
    for (index, selector) in endpoints.1.iter().flatten().enumerate() {
        let path = format!("{field}.{}[{index}]", endpoints.0);
        peers.push(peer_of(scope, selector, &required, &path)?);
    }
    for (index, text) in cidr.1.iter().flatten().enumerate() {
        let path = format!("{field}.{}[{index}]", cidr.0);
        let net = parse_cidr(text, true, &path)?;
        peers.push(cidr_peer(net, Vec::new()));
    }
    for (index, rule) in cidr_set.1.iter().flatten().enumerate() {
        let path = format!("{field}.{}[{index}]", cidr_set.0);
        peers.push(cidr_rule_peer(rule, &path)?);
    }
    for entity in entities.1.iter().flatten() {
        if let Some(peer) = entity_peer(*entity) {
            peers.push(peer);
        }
    }
    if groups.1.is_some() {
        peers.push(Peer::Unjudgeable(Unjudgeable::ToGroups));
    }
    if nodes.1.is_some() {
        peers.push(Peer::Unjudgeable(Unjudgeable::Other(nodes.0.to_owned())));
    }
    if services.is_some_and(Option::is_some) {
        peers.push(Peer::Unjudgeable(Unjudgeable::ToServices));
    }
    if fqdns.is_some_and(Option::is_some) {
        peers.push(Peer::Unjudgeable(Unjudgeable::ToFqdns));
    }
    Ok(Peers::List(peers))
}

fn entity_peer(entity: CiliumEntity) -> Option<Peer> {
    let entity = match entity {
        CiliumEntity::All => Entity::All,
        CiliumEntity::World => Entity::World,
        CiliumEntity::WorldIpv4 => Entity::WorldIpv4,
        CiliumEntity::WorldIpv6 => Entity::WorldIpv6,
        CiliumEntity::Cluster => Entity::Cluster,
        CiliumEntity::Host => Entity::Host,
        CiliumEntity::RemoteNode => Entity::RemoteNode,
        CiliumEntity::KubeApiserver => Entity::KubeApiserver,
        CiliumEntity::Ingress => Entity::Ingress,
        CiliumEntity::Health => Entity::Health,
        CiliumEntity::Init => Entity::Init,
        CiliumEntity::Unmanaged => Entity::Unmanaged,
        // Selectable but never exists.
        CiliumEntity::None => return None,
    };
    Some(Peer::Entity(entity))
}

/// Cilium's CIDR rules never select pods or nodes (they have identities of their own), whatever
/// the ipBlock reading configured for NetworkPolicy says.
fn cidr_peer(net: IpNet, except: Vec<IpNet>) -> Peer {
    Peer::ClusterExternalCidr { net, except }
}

/// Parses `10.0.0.0/8`, or with `bare_ip` also `10.0.0.1`, as a network (host bits cleared).
fn parse_cidr(text: &str, bare_ip: bool, field: &str) -> Result<IpNet, CompileError> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if bare_ip && let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(error(
        field,
        format!("`{text}` is not a CIDR like 192.0.2.0/24 or 2001:db8::/32"),
    ))
}

fn cidr_rule_peer(rule: &CidrRule, field: &str) -> Result<Peer, CompileError> {
    let CidrRule {
        cidr,
        except,
        cidr_group_ref,
        cidr_group_selector,
    } = rule;
    match (cidr, cidr_group_ref, cidr_group_selector) {
        (Some(cidr), None, None) => {
            let net = parse_cidr(cidr, false, &format!("{field}.cidr"))?;
            let mut excepts = Vec::new();
            for (index, text) in except.iter().flatten().enumerate() {
                let path = format!("{field}.except[{index}]");
                let ex = parse_cidr(text, false, &path)?;
                if !net.contains(&ex.network()) {
                    return Err(error(path, format!("{ex} is not inside {net}")));
                }
                excepts.push(ex);
            }
            Ok(cidr_peer(net, excepts))
        }
        (None, Some(group), None) => Ok(Peer::Unjudgeable(Unjudgeable::Other(format!(
            "cidrGroupRef {group}"
        )))),
        (None, None, Some(_)) => Ok(Peer::Unjudgeable(Unjudgeable::Other(
            "cidrGroupSelector".to_owned(),
        ))),
        _ => Err(error(
            field,
            "exactly one of cidr, cidrGroupRef and cidrGroupSelector is needed",
        )),
    }
}

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
fn subject_of(
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
fn never_requirement() -> Requirement {
    Requirement {
        key: CLUSTER_LABEL.to_owned(),
        operator: Operator::In(Vec::new()),
    }
}

/// One `fromEndpoints`/`toEndpoints` selector, with the entry's `fromRequires`/`toRequires`
/// ANDed in.
fn peer_of(
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

/// The protocols Cilium's `ANY` stands for (ICMP is only matched by ICMP rules).
const ANY_PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

fn ports_of(
    to_ports: Option<&[PortRule]>,
    icmps: Option<&[IcmpRule]>,
    action: Action,
    field: &str,
) -> Result<EntryPorts, CompileError> {
    let to_ports = to_ports.unwrap_or_default();
    let icmps = icmps.unwrap_or_default();
    if to_ports.is_empty() && icmps.is_empty() {
        return Ok(EntryPorts {
            plain: None,
            l7: Vec::new(),
        });
    }
    let mut plain = Vec::new();
    let mut l7 = Vec::new();
    for (index, port_rule) in to_ports.iter().enumerate() {
        let path = format!("{field}.toPorts[{index}]");
        let PortRule {
            ports,
            rules,
            terminating_tls,
            originating_tls,
            server_names,
            listener,
        } = port_rule;
        let l7_kinds = rules.as_ref().map(L7Rules::kinds).unwrap_or_default();
        let proxied = !l7_kinds.is_empty()
            || terminating_tls.is_some()
            || originating_tls.is_some()
            || server_names.as_ref().is_some_and(|names| !names.is_empty())
            || listener.is_some();
        if action == Action::Deny && (proxied || rules.is_some()) {
            return Err(error(
                path,
                "deny rules take only `ports` (no L7 rules, TLS, serverNames or listener)",
            ));
        }
        let target = if proxied { &mut l7 } else { &mut plain };
        match ports.as_deref() {
            // No ports: every port of every protocol `ANY` covers.
            None | Some([]) => target.extend(ANY_PROTOCOLS.iter().map(|&protocol| PortMatch {
                protocol: Some(protocol),
                port: PortSpec::Any,
            })),
            Some(ports) => {
                for (port_index, port) in ports.iter().enumerate() {
                    let path = format!("{path}.ports[{port_index}]");
                    target.extend(port_matches(port, &path)?);
                }
            }
        }
    }
    for (index, icmp) in icmps.iter().enumerate() {
        let IcmpRule { fields } = icmp;
        for (field_index, icmp_field) in fields.iter().flatten().enumerate() {
            let path = format!("{field}.icmps[{index}].fields[{field_index}]");
            // Flows carry no ICMP type: an ICMP conversation the auditor sees is an echo
            // exchange, so only the echo-request type can match one; other types are checked
            // for validity and then match nothing.
            if icmp_is_echo_request(icmp_field, &path)? {
                plain.push(PortMatch {
                    protocol: Some(Protocol::Icmp),
                    port: PortSpec::Any,
                });
            }
        }
    }
    Ok(EntryPorts {
        plain: Some(plain),
        l7,
    })
}

/// Cilium port names follow IANA service names: lower-case letters, digits and single inner
/// hyphens, at least one letter, at most 15 characters. Cilium compares them case-insensitively.
fn is_port_name(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    !lower.is_empty()
        && lower.len() <= 15
        && lower
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && lower.bytes().any(|b| b.is_ascii_lowercase())
        && !lower.starts_with('-')
        && !lower.ends_with('-')
        && !lower.contains("--")
}

fn port_matches(port: &PortProtocol, field: &str) -> Result<Vec<PortMatch>, CompileError> {
    let PortProtocol {
        port,
        end_port,
        protocol,
    } = port;
    let protocols: Vec<Protocol> = match protocol.as_deref().map(str::to_ascii_uppercase).as_deref()
    {
        None | Some("" | "ANY") => ANY_PROTOCOLS.to_vec(),
        Some("TCP") => vec![Protocol::Tcp],
        Some("UDP") => vec![Protocol::Udp],
        Some("SCTP") => vec![Protocol::Sctp],
        Some("ICMP" | "ICMPV6") => vec![Protocol::Icmp],
        // Valid in Cilium, but no flow the auditor judges carries them.
        Some("VRRP" | "IGMP") => Vec::new(),
        Some(other) => {
            return Err(error(
                format!("{field}.protocol"),
                format!(
                    "unknown protocol `{other}` (expected TCP, UDP, SCTP, ICMP, ICMPv6 or ANY)"
                ),
            ));
        }
    };
    let text = port.as_deref().unwrap_or("0");
    let spec = if text.is_empty() {
        PortSpec::Any
    } else if text.bytes().all(|b| b.is_ascii_digit()) {
        let number: u16 = text.parse().map_err(|_| {
            error(
                format!("{field}.port"),
                format!("port `{text}` is out of range"),
            )
        })?;
        match end_port {
            _ if number == 0 => PortSpec::Any,
            Some(end) if *end > i32::from(number) => {
                let end = u16::try_from(*end).map_err(|_| {
                    error(
                        format!("{field}.endPort"),
                        format!("endPort {end} is out of range"),
                    )
                })?;
                PortSpec::Range(number, end)
            }
            _ => PortSpec::Range(number, number),
        }
    } else if is_port_name(text) {
        PortSpec::Named(text.to_ascii_lowercase())
    } else {
        return Err(error(
            format!("{field}.port"),
            format!("`{text}` is neither a port number nor a port name"),
        ));
    };
    // For ICMP the "port" is the ICMP type; flows carry none, and an ICMP conversation is an
    // echo exchange, so only "any type" and echo request can match one (as with `icmps`).
    let icmp_spec = match &spec {
        PortSpec::Any | PortSpec::Range(8 | 128, _) => Some(PortSpec::Any),
        PortSpec::Range(..) | PortSpec::Named(_) => None,
    };
    Ok(protocols
        .into_iter()
        .filter_map(|protocol| {
            let port = if protocol == Protocol::Icmp {
                icmp_spec.clone()?
            } else {
                spec.clone()
            };
            Some(PortMatch {
                protocol: Some(protocol),
                port,
            })
        })
        .collect())
}

fn icmp_is_echo_request(field: &IcmpField, path: &str) -> Result<bool, CompileError> {
    let IcmpField { family, icmp_type } = field;
    let v6 = match family.as_deref() {
        None | Some("" | "IPv4") => false,
        Some("IPv6") => true,
        Some(other) => {
            return Err(error(
                format!("{path}.family"),
                format!("unknown family `{other}` (expected IPv4 or IPv6)"),
            ));
        }
    };
    let number = match icmp_type {
        IcmpType::Number(number) => *number,
        IcmpType::Name(name) => icmp_type_by_name(name, v6).ok_or_else(|| {
            error(
                format!("{path}.type"),
                format!("unknown ICMP type name `{name}`"),
            )
        })?,
    };
    Ok(number == if v6 { 128 } else { 8 })
}

/// The ICMP type names Cilium accepts, per family.
fn icmp_type_by_name(name: &str, v6: bool) -> Option<u8> {
    let v4 = [
        ("EchoReply", 0),
        ("DestinationUnreachable", 3),
        ("Redirect", 5),
        ("Echo", 8),
        ("EchoRequest", 8),
        ("RouterAdvertisement", 9),
        ("RouterSelection", 10),
        ("TimeExceeded", 11),
        ("ParameterProblem", 12),
        ("Timestamp", 13),
        ("TimestampReply", 14),
        ("Photuris", 40),
        ("ExtendedEchoRequest", 42),
        ("ExtendedEchoReply", 43),
    ];
    let v6_names = [
        ("DestinationUnreachable", 1),
        ("PacketTooBig", 2),
        ("TimeExceeded", 3),
        ("ParameterProblem", 4),
        ("EchoRequest", 128),
        ("EchoReply", 129),
        ("MulticastListenerQuery", 130),
        ("MulticastListenerReport", 131),
        ("MulticastListenerDone", 132),
        ("RouterSolicitation", 133),
        ("RouterAdvertisement", 134),
        ("NeighborSolicitation", 135),
        ("NeighborAdvertisement", 136),
        ("RedirectMessage", 137),
        ("RouterRenumbering", 138),
        ("ICMPNodeInformationQuery", 139),
        ("ICMPNodeInformationResponse", 140),
        ("InverseNeighborDiscoverySolicitation", 141),
        ("InverseNeighborDiscoveryAdvertisement", 142),
        ("HomeAgentAddressDiscoveryRequest", 144),
        ("HomeAgentAddressDiscoveryReply", 145),
        ("MobilePrefixSolicitation", 146),
        ("MobilePrefixAdvertisement", 147),
        ("DuplicateAddressRequestCodeSuffix", 157),
        ("DuplicateAddressConfirmationCodeSuffix", 158),
        ("ExtendedEchoRequest", 160),
        ("ExtendedEchoReply", 161),
    ];
    let table: &[(&str, u8)] = if v6 { &v6_names } else { &v4 };
    table
        .iter()
        .find(|(known, _)| *known == name)
        .map(|&(_, number)| number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> CiliumPolicy {
        match serde_yaml_ng::from_str(yaml) {
            Ok(policy) => policy,
            Err(e) => panic!("fixture does not parse: {e}\n{yaml}"),
        }
    }

    fn cnp(yaml: &str) -> CompiledPolicy {
        match compile(PolicyKind::CiliumNetworkPolicy, &parse(yaml)) {
            Ok(compiled) => compiled,
            Err(e) => panic!("does not compile: {e}\n{yaml}"),
        }
    }

    fn ccnp(yaml: &str) -> CompiledPolicy {
        match compile(PolicyKind::CiliumClusterwideNetworkPolicy, &parse(yaml)) {
            Ok(compiled) => compiled,
            Err(e) => panic!("does not compile: {e}\n{yaml}"),
        }
    }

    fn cnp_error(yaml: &str) -> CompileError {
        match compile(PolicyKind::CiliumNetworkPolicy, &parse(yaml)) {
            Ok(compiled) => panic!("compiled although invalid: {compiled:?}"),
            Err(e) => e,
        }
    }

    fn directions(policy: &CompiledPolicy) -> Vec<Direction> {
        policy.isolations.iter().map(|i| i.direction).collect()
    }

    fn only_peer(rule: &Rule) -> &Peer {
        match &rule.peers {
            Peers::List(list) if list.len() == 1 => &list[0],
            other => panic!("expected one peer, got {other:?}"),
        }
    }

    fn named(ns: &str) -> NamespaceScope {
        NamespaceScope::Named(ns.to_owned())
    }

    fn req(key: &str, operator: Operator) -> Requirement {
        Requirement {
            key: key.to_owned(),
            operator,
        }
    }

    #[test]
    fn default_deny_follows_the_directions_that_have_rules() {
        let p = cnp("
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  egressDeny: [{toEntities: [world]}]
");
        assert_eq!(directions(&p), vec![Direction::Egress]);

        // An explicitly empty list is no rule: nothing is isolated.
        let p = cnp("
metadata: {name: p, namespace: app}
spec: {endpointSelector: {}, ingress: []}
");
        assert!(p.isolations.is_empty(), "{p:?}");

        // Opting out removes the direction; opting in adds one without rules.
        let p = cnp("
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  enableDefaultDeny: {ingress: false, egress: true}
  ingress: [{fromEntities: [cluster]}]
");
        assert_eq!(directions(&p), vec![Direction::Egress]);
        assert_eq!(p.rules.len(), 1);
    }

    #[test]
    fn subjects_of_a_cnp_stay_in_its_namespace() {
        // Cilium replaces a namespace in a CNP's endpointSelector by the policy's own.
        let p = cnp("
metadata: {name: p, namespace: app}
spec:
  endpointSelector:
    matchLabels: {k8s:io.kubernetes.pod.namespace: other, k8s:role: api}
  ingress: [{}]
");
        let subject = &p.isolations[0].subject;
        assert_eq!(subject.namespaces, named("app"));
        assert_eq!(
            subject.pods.requirements,
            vec![req("role", Operator::In(vec!["api".to_owned()]))]
        );
        // `- {}` allows nothing.
        assert_eq!(p.rules[0].peers, Peers::List(Vec::new()));

        let p = ccnp(
            "
metadata: {name: p}
spec:
  endpointSelector:
    matchExpressions:
    - {key: io.kubernetes.pod.namespace, operator: NotIn, values: [kube-system]}
  ingress: [{fromEndpoints: [{}]}]
",
        );
        let rule = &p.rules[0];
        assert_eq!(
            rule.subject.namespaces,
            NamespaceScope::Selector(LabelSelector {
                requirements: vec![req(
                    NAMESPACE_NAME_LABEL,
                    Operator::NotIn(vec!["kube-system".to_owned()])
                )]
            })
        );
        // An empty peer selector in a CCNP is every pod of every namespace.
        assert_eq!(
            only_peer(rule),
            &Peer::Endpoints(Subject {
                namespaces: NamespaceScope::All,
                pods: LabelSelector::default(),
            })
        );
    }

    #[test]
    fn namespace_labels_keep_a_cnp_peer_in_its_namespace() {
        let p = cnp("
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  egress:
  - toEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.team: shop}}]
");
        assert_eq!(
            only_peer(&p.rules[0]),
            &Peer::Endpoints(Subject {
                namespaces: NamespaceScope::NamedAndSelector(
                    "app".to_owned(),
                    LabelSelector {
                        requirements: vec![req("team", Operator::In(vec!["shop".to_owned()]))]
                    }
                ),
                pods: LabelSelector::default(),
            })
        );
    }

    #[test]
    fn reserved_labels_are_entities_and_other_sources_unjudgeable() {
        let p = cnp(r#"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {"reserved:host": ""}}]
  - fromEndpoints: [{matchLabels: {"reserved:host": "", app: x}}]
  - fromEndpoints: [{matchLabels: {"container:id": "abc"}}]
"#);
        assert_eq!(only_peer(&p.rules[0]), &Peer::Entity(Entity::Host));
        assert!(matches!(only_peer(&p.rules[1]), Peer::Unjudgeable(_)));
        assert!(matches!(only_peer(&p.rules[2]), Peer::Unjudgeable(_)));
    }

    #[test]
    fn cluster_name_label_matches_the_default_cluster_only() {
        let p = ccnp(
            "
metadata: {name: p}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.cluster: default}}]
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.cluster: elsewhere}}]
",
        );
        let Peer::Endpoints(first) = only_peer(&p.rules[0]) else {
            panic!("expected endpoints: {:?}", p.rules[0]);
        };
        assert!(first.pods.requirements.is_empty(), "{first:?}");
        let Peer::Endpoints(second) = only_peer(&p.rules[1]) else {
            panic!("expected endpoints: {:?}", p.rules[1]);
        };
        assert_eq!(second.pods.requirements, vec![never_requirement()]);
    }

    #[test]
    fn from_requires_narrows_the_endpoints_and_is_named() {
        let p = cnp("
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {role: api}}]
    fromRequires: [{matchLabels: {env: prod}}]
");
        let Peers::List(peers) = &p.rules[0].peers else {
            panic!("expected a list: {:?}", p.rules[0]);
        };
        assert!(
            matches!(&peers[0], Peer::Unjudgeable(Unjudgeable::Other(what)) if what.starts_with("fromRequires"))
        );
        assert_eq!(
            peers[1],
            Peer::Endpoints(Subject {
                namespaces: named("app"),
                pods: LabelSelector {
                    requirements: vec![
                        req("role", Operator::In(vec!["api".to_owned()])),
                        req("env", Operator::In(vec!["prod".to_owned()])),
                    ]
                },
            })
        );
    }

    #[test]
    fn cidrs_accept_bare_addresses_and_clear_host_bits() {
        let p = cnp(r#"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  egress:
  - toCIDR: [192.0.2.7, "2001:db8::1", 198.51.100.77/24]
"#);
        let Peers::List(peers) = &p.rules[0].peers else {
            panic!("expected a list: {:?}", p.rules[0]);
        };
        let nets: Vec<String> = peers
            .iter()
            .map(|peer| match peer {
                Peer::ClusterExternalCidr { net, except } if except.is_empty() => net.to_string(),
                other => panic!("unexpected peer {other:?}"),
            })
            .collect();
        assert_eq!(nets, ["192.0.2.7/32", "2001:db8::1/128", "198.51.100.0/24"]);

        let e = cnp_error(
            "
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  egress: [{toCIDRSet: [{cidr: 192.0.2.7}]}]
",
        );
        assert_eq!(e.field, "spec.egress[0].toCIDRSet[0].cidr");
    }

    #[test]
    fn ports_numbers_names_ranges_and_protocols() {
        let p = cnp(r#"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports:
      - {port: "80", endPort: 79, protocol: tcp}
      - {port: HTTP-Alt, protocol: UDP}
      - {port: "0", protocol: SCTP}
      - {port: "112", protocol: VRRP}
"#);
        assert_eq!(p.rules[0].peers, Peers::Any);
        assert_eq!(
            p.rules[0].ports,
            vec![
                PortMatch {
                    protocol: Some(Protocol::Tcp),
                    port: PortSpec::Range(80, 80)
                },
                PortMatch {
                    protocol: Some(Protocol::Udp),
                    port: PortSpec::Named("http-alt".to_owned())
                },
                PortMatch {
                    protocol: Some(Protocol::Sctp),
                    port: PortSpec::Any
                },
            ]
        );

        // Only protocols a flow never has: the entry matches nothing, so no rule at all
        // (an empty port list would mean every port).
        let p = cnp(r#"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress: [{toPorts: [{ports: [{port: "0", protocol: IGMP}]}]}]
"#);
        assert!(p.rules.is_empty(), "{p:?}");
        assert_eq!(directions(&p), vec![Direction::Ingress]);

        for (port, field) in [("65536", "port"), ("-1", "port"), ("a_b", "port")] {
            let e = cnp_error(&format!(
                "
metadata: {{name: p, namespace: app}}
spec:
  endpointSelector: {{}}
  ingress: [{{toPorts: [{{ports: [{{port: \"{port}\"}}]}}]}}]
"
            ));
            assert_eq!(
                e.field,
                format!("spec.ingress[0].toPorts[0].ports[0].{field}"),
                "{port}"
            );
        }
        let e = cnp_error(
            r#"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress: [{toPorts: [{ports: [{port: "80", protocol: QUIC}]}]}]
"#,
        );
        assert_eq!(e.field, "spec.ingress[0].toPorts[0].ports[0].protocol");
    }

    #[test]
    fn l7_ports_are_split_from_plain_ports() {
        let p = cnp(r#"
metadata: {name: p, namespace: app}
specs:
- endpointSelector: {}
  egress:
  - toEndpoints: [{}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
    - ports: [{port: "443", protocol: TCP}]
- endpointSelector: {}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules: {dns: [{matchPattern: "*"}]}
"#);
        let summary: Vec<(&str, bool, usize)> = p
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.l7, r.ports.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("specs[0].egress[0]", false, 1),
                ("specs[0].egress[0]", true, 1),
                ("specs[1].egress[0]", true, 1),
            ]
        );
    }

    #[test]
    fn icmp_rules_match_echo_requests_only() {
        let p = cnp(r#"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress:
  - icmps: [{fields: [{type: 8}, {type: EchoRequest, family: IPv6}]}]
  - icmps: [{fields: [{type: DestinationUnreachable}]}]
"#);
        let icmp_any = PortMatch {
            protocol: Some(Protocol::Icmp),
            port: PortSpec::Any,
        };
        assert_eq!(p.rules.len(), 1, "{p:?}");
        assert_eq!(p.rules[0].ports, vec![icmp_any.clone(), icmp_any.clone()]);
        let p = cnp(r#"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: "8", protocol: ICMP}, {port: "3", protocol: ICMP}]}]
"#);
        assert_eq!(p.rules[0].ports, vec![icmp_any]);
        let e = cnp_error(
            r#"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress: [{icmps: [{fields: [{type: Pong}]}]}]
"#,
        );
        assert_eq!(e.field, "spec.ingress[0].icmps[0].fields[0].type");
    }

    #[test]
    fn host_policies_compile_to_a_note_only() {
        let p = ccnp(
            "
metadata: {name: p}
spec:
  nodeSelector: {}
  ingress: [{fromEntities: [cluster]}]
",
        );
        assert!(p.rules.is_empty() && p.isolations.is_empty(), "{p:?}");
        assert_eq!(p.unjudged, ["spec (host policy)"]);
    }

    #[test]
    fn subjects_on_reserved_labels_select_no_pod() {
        let p = ccnp(
            r#"
metadata: {name: p}
specs:
- endpointSelector: {matchLabels: {"reserved:health": ""}}
  ingress: [{fromEntities: [remote-node]}]
- endpointSelector:
    matchLabels: {app: web}
    matchExpressions: [{key: "reserved:host", operator: DoesNotExist}]
  ingress: [{fromEntities: [cluster]}]
"#,
        );
        assert!(p.unjudged.is_empty(), "{p:?}");
        assert_eq!(p.rules.len(), 1, "{p:?}");
        assert_eq!(
            p.rules[0].subject.pods.requirements,
            vec![req("app", Operator::In(vec!["web".to_owned()]))]
        );
    }

    #[test]
    fn a_policy_needs_a_name() {
        let e = cnp_error(
            "
metadata: {namespace: app}
spec: {endpointSelector: {}}
",
        );
        assert_eq!(e.field, "metadata.name");
    }

    #[test]
    fn a_cnp_without_namespace_lives_in_default() {
        let p = cnp("
metadata: {name: p}
spec: {endpointSelector: {}, ingress: [{}]}
");
        assert_eq!(p.key.namespace, "default");
        assert_eq!(p.isolations[0].subject.namespaces, named("default"));
    }

    #[test]
    fn selector_operators_are_checked() {
        let e = cnp_error(
            "
metadata: {name: p, namespace: app}
spec:
  endpointSelector:
    matchExpressions: [{key: app, operator: In}]
",
        );
        assert_eq!(e.field, "spec.endpointSelector.matchExpressions[0]");
        let e = cnp_error(
            "
metadata: {name: p, namespace: app}
spec:
  endpointSelector:
    matchExpressions: [{key: app, operator: Exists, values: [x]}]
",
        );
        assert_eq!(e.field, "spec.endpointSelector.matchExpressions[0]");
    }
}
