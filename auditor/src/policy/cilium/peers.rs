//! The peers of a Cilium rule entry: endpoint selectors (with `fromRequires`/`toRequires`),
//! CIDRs and CIDR sets, entities, and what cannot be judged from addresses.

use std::net::IpAddr;

use ipnet::IpNet;

use super::labels::peer_of;
use super::{
    CidrRule, CiliumEntity, EgressRule, EndpointSelector, FqdnSelector, IngressRule, Scope, error,
    non_empty,
};
use crate::policy::ir::{CompileError, Entity, Peer, Peers, Unjudgeable};

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

pub(super) fn ingress_peers(
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
            has_l4: non_empty(to_ports.as_deref()) || non_empty(icmps.as_deref()),
        },
    )
}

pub(super) fn egress_peers(
    scope: Scope<'_>,
    entry: &EgressRule,
    field: &str,
) -> Result<Peers, CompileError> {
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
            has_l4: non_empty(to_ports.as_deref()) || non_empty(icmps.as_deref()),
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
/// the ipBlock reading configured for `NetworkPolicy` says.
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
