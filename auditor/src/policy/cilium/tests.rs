//! Compiling Cilium policies: default deny, selector scoping, label sources, CIDRs, ports, L7,
//! ICMP and host policies.

use super::labels::never_requirement;
use super::*;
use crate::policy::ir::{
    Entity, LabelSelector, NamespaceScope, Operator, Peer, Peers, PortMatch, PortSpec, Requirement,
    Unjudgeable,
};
use crate::vocab::NAMESPACE_NAME_LABEL;
use crate::vocab::Protocol;

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
    let p = cnp(r"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress:
  - icmps: [{fields: [{type: 8}, {type: EchoRequest, family: IPv6}]}]
  - icmps: [{fields: [{type: DestinationUnreachable}]}]
");
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
        r"
metadata: {name: p, namespace: app}
spec:
  endpointSelector: {}
  ingress: [{icmps: [{fields: [{type: Pong}]}]}]
",
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
