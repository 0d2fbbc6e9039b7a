//! The policy store on its own: identities and selectors are shared and counted, and what a
//! policy change adds it takes away again.

use std::net::IpAddr;

use super::*;
use crate::policy::ir::{
    Isolation, LabelSelector, NamespaceScope, Operator, PortMatch, PortSpec, Requirement, Subject,
};
use crate::vocab::{Labels, Protocol};

struct NoFacts;

impl AddressFacts for NoFacts {
    fn is_apiserver(&self, _: IpAddr) -> bool {
        false
    }
    fn in_pod_cidr(&self, _: IpAddr) -> bool {
        false
    }
    fn is_ingress(&self, _: IpAddr) -> bool {
        false
    }
}

fn app(value: &str) -> LabelSelector {
    LabelSelector {
        requirements: vec![Requirement {
            key: "app".into(),
            operator: Operator::In(vec![value.into()]),
        }],
    }
}

fn subject(ns: &str, value: &str) -> Subject {
    Subject {
        namespaces: NamespaceScope::Named(ns.into()),
        pods: app(value),
    }
}

/// `ns/name`: pods `app=db` admit `app=web` of the same namespace on TCP 5432.
fn policy(ns: &str, name: &str) -> CompiledPolicy {
    CompiledPolicy {
        key: PolicyKey {
            kind: PolicyKind::NetworkPolicy,
            namespace: ns.into(),
            name: name.into(),
        },
        isolations: vec![Isolation {
            subject: subject(ns, "db"),
            direction: Direction::Ingress,
        }],
        rules: vec![Rule {
            name: "ingress[0]".into(),
            direction: Direction::Ingress,
            action: Action::Allow,
            subject: subject(ns, "db"),
            peers: Peers::List(vec![Peer::Endpoints(subject(ns, "web"))]),
            ports: vec![PortMatch {
                protocol: Some(Protocol::Tcp),
                port: PortSpec::Range(5432, 5432),
            }],
            l7: false,
        }],
        unjudged: Vec::new(),
        unknown: Vec::new(),
    }
}

fn labels(value: &str) -> Labels {
    Labels::from([("app", value)])
}

fn ask(model: &Model, db: IdentityId, web: IdentityId, port: u16) -> Decision {
    let question = Question {
        direction: Direction::Ingress,
        subject: db,
        subject_node: None,
        peer_ip: "10.0.0.1".parse().unwrap_or_else(|e| panic!("{e}")),
        peer: Endpoint::Pod {
            identity: web,
            node: None,
        },
        protocol: Protocol::Tcp,
        port,
        destination: Some(db),
    };
    model.decide(&question, &NoFacts)
}

#[test]
fn pods_with_the_same_labels_share_an_identity_until_the_last_goes() {
    let mut m = Model::new(IpBlockReading::Calico);
    let a = m.acquire_identity("shop".into(), labels("db"), Vec::new());
    let b = m.acquire_identity("shop".into(), labels("db"), Vec::new());
    assert_eq!(a, b, "same namespace, labels and ports: one identity");
    let other = m.acquire_identity("other".into(), labels("db"), Vec::new());
    assert_ne!(a, other, "another namespace is another identity");
    m.release_identity(a);
    assert!(m.identities.get(a).is_some(), "one pod still holds it");
    m.release_identity(b);
    assert!(m.identities.get(a).is_none(), "the last pod took it away");
}

#[test]
fn a_policy_decides_for_the_identities_it_selects_whenever_they_arrive() {
    let mut m = Model::new(IpBlockReading::Calico);
    let db = m.acquire_identity("shop".into(), labels("db"), Vec::new());
    m.upsert_policy(policy("shop", "p"));
    // An identity that arrives after the policy is matched against its selectors too.
    let web = m.acquire_identity("shop".into(), labels("web"), Vec::new());
    assert!(matches!(ask(&m, db, web, 5432), Decision::Allowed(_)));
    assert_eq!(
        ask(&m, db, web, 80),
        Decision::DefaultDeny { unjudged: None }
    );
    assert_eq!(
        ask(&m, web, db, 80),
        Decision::NotIsolated,
        "web is not isolated"
    );
}

#[test]
fn removing_a_policy_takes_away_its_rules_and_selectors() {
    let mut m = Model::new(IpBlockReading::Calico);
    let db = m.acquire_identity("shop".into(), labels("db"), Vec::new());
    let web = m.acquire_identity("shop".into(), labels("web"), Vec::new());
    m.upsert_policy(policy("shop", "p"));
    m.upsert_policy(policy("shop", "q"));
    assert_eq!(m.isolating_policies(db, Direction::Ingress).len(), 2);
    // Two policies share their two selectors.
    assert_eq!(m.selectors.len(), 2);
    m.remove_policy(&policy("shop", "p").key);
    assert_eq!(m.selectors.len(), 2, "q still uses both selectors");
    assert!(matches!(ask(&m, db, web, 5432), Decision::Allowed(_)));
    m.remove_policy(&policy("shop", "q").key);
    assert_eq!(m.selectors.len(), 0, "no policy, no selector");
    assert_eq!(m.rules.len(), 0);
    assert_eq!(ask(&m, db, web, 80), Decision::NotIsolated);
}

#[test]
fn which_rule_decides_does_not_depend_on_the_order_of_loading() {
    let mut forward = Model::new(IpBlockReading::Calico);
    let mut backward = Model::new(IpBlockReading::Calico);
    let mut answers = Vec::new();
    for (m, order) in [(&mut forward, ["a", "b"]), (&mut backward, ["b", "a"])] {
        let db = m.acquire_identity("shop".into(), labels("db"), Vec::new());
        let web = m.acquire_identity("shop".into(), labels("web"), Vec::new());
        for name in order {
            m.upsert_policy(policy("shop", name));
        }
        let Decision::Allowed(rule) = ask(m, db, web, 5432) else {
            panic!("allowed by both policies");
        };
        answers.push(m.rule(rule).map(|(key, _)| key.name.clone()));
    }
    assert_eq!(answers, [Some("a".into()), Some("a".into())]);
}

#[test]
fn namespace_labels_move_identities_between_selectors() {
    let mut m = Model::new(IpBlockReading::Calico);
    let mut p = policy("shop", "p");
    // Admit web pods of namespaces labelled team=blue.
    p.rules[0].peers = Peers::List(vec![Peer::Endpoints(Subject {
        namespaces: NamespaceScope::Selector(LabelSelector {
            requirements: vec![Requirement {
                key: "team".into(),
                operator: Operator::In(vec!["blue".into()]),
            }],
        }),
        pods: app("web"),
    })]);
    let db = m.acquire_identity("shop".into(), labels("db"), Vec::new());
    let web = m.acquire_identity("front".into(), labels("web"), Vec::new());
    m.upsert_policy(p);
    assert!(matches!(
        ask(&m, db, web, 5432),
        Decision::DefaultDeny { .. }
    ));
    m.set_namespace_labels("front", Labels::from([("team", "blue")]));
    assert!(matches!(ask(&m, db, web, 5432), Decision::Allowed(_)));
    m.set_namespace_labels("front", Labels::from([("team", "red")]));
    assert!(matches!(
        ask(&m, db, web, 5432),
        Decision::DefaultDeny { .. }
    ));
}
