//! The incremental model against itself built from scratch: random sequences of inventory and
//! policy changes (adds, label edits, moves of addresses between pods, deletes, re-adds) are
//! applied one by one to a cluster, and a second cluster is built from the objects that exist at
//! the end. For every flow between the addresses involved, both must give the same verdict and
//! the same explanation (which names the deciding rules and isolating policies). Identity and
//! selector ids are reused, counts go up and down and addresses are re-indexed on the way: this
//! is where the incremental bookkeeping would go wrong.

use std::collections::BTreeMap;
use std::net::IpAddr;

use auditor::audit::{Cluster, ClusterConfig, FlowQuery};
use auditor::inventory::{
    Endpoint, EndpointPort, EndpointSlice, Namespace, Node, Pod, Service, ServicePort, TargetPort,
    Workload,
};
use auditor::policy::cilium::{self, CiliumPolicy};
use auditor::policy::ir::{CompiledPolicy, PolicyKind};
use auditor::policy::model::IpBlockReading;
use auditor::policy::netpol;
use auditor::source::{Change, ChangeKey};
use auditor::vocab::{ContainerPort, Labels, NAMESPACE_NAME_LABEL, Protocol};
use proptest::prelude::*;
use serde_json::json;

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const APPS: [&str; 3] = ["web", "db", "cache"];
/// Pod addresses: fewer than pods may hold over a run, so addresses move between pods.
const POD_IPS: [&str; 6] = [
    "10.244.1.1",
    "10.244.1.2",
    "10.244.1.3",
    "10.244.2.1",
    "10.244.2.2",
    "10.244.2.3",
];
const NODE_IPS: [&str; 2] = ["192.168.0.1", "192.168.0.2"];
const SERVICE_IPS: [&str; 2] = ["10.96.0.10", "10.96.0.11"];
const EXTERNAL: &str = "203.0.113.5";

fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("test address {text}: {e}"))
}

/// One change to the world, drawn at random.
#[derive(Clone, Debug)]
enum Op {
    Namespace {
        ns: usize,
        team: Option<u8>,
    },
    RemoveNamespace {
        ns: usize,
    },
    Pod(PodSpec),
    RemovePod {
        name: usize,
    },
    Node {
        node: usize,
        with_cidr: bool,
    },
    RemoveNode {
        node: usize,
    },
    Service {
        index: usize,
        app: usize,
        named: bool,
    },
    RemoveService {
        index: usize,
    },
    Slice {
        index: usize,
        ready: Vec<usize>,
    },
    RemoveSlice {
        index: usize,
    },
    Policy(PolicySpec),
    RemovePolicy {
        index: usize,
        cilium: bool,
    },
}

#[derive(Clone, Debug)]
struct PodSpec {
    name: usize,
    ns: usize,
    app: usize,
    tier: u8,
    ip: usize,
    node: usize,
    host_network: bool,
    pg_port: bool,
}

#[derive(Clone, Debug)]
struct PolicySpec {
    index: usize,
    ns: usize,
    cilium: bool,
    subject: usize,
    peer: u8,
    peer_value: usize,
    named_port: bool,
    egress: bool,
}

fn op() -> impl Strategy<Value = Op> {
    let pod = (
        0..8_usize,
        0..3_usize,
        0..3_usize,
        0..3_u8,
        0..POD_IPS.len(),
        0..2_usize,
        prop::bool::weighted(0.1),
        any::<bool>(),
    )
        .prop_map(|(name, ns, app, tier, ip, node, host_network, pg_port)| {
            Op::Pod(PodSpec {
                name,
                ns,
                app,
                tier,
                ip,
                node,
                host_network,
                pg_port,
            })
        });
    let policy = (
        0..4_usize,
        0..3_usize,
        any::<bool>(),
        0..3_usize,
        0..4_u8,
        0..3_usize,
        any::<bool>(),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(index, ns, cilium, subject, peer, peer_value, named_port, egress)| {
                Op::Policy(PolicySpec {
                    index,
                    ns,
                    cilium,
                    subject,
                    peer,
                    peer_value,
                    named_port,
                    egress,
                })
            },
        );
    prop_oneof![
        3 => (0..3_usize, prop::option::of(0..2_u8)).prop_map(|(ns, team)| Op::Namespace { ns, team }),
        1 => (0..3_usize).prop_map(|ns| Op::RemoveNamespace { ns }),
        8 => pod,
        3 => (0..8_usize).prop_map(|name| Op::RemovePod { name }),
        2 => (0..2_usize, any::<bool>()).prop_map(|(node, with_cidr)| Op::Node { node, with_cidr }),
        1 => (0..2_usize).prop_map(|node| Op::RemoveNode { node }),
        2 => (0..2_usize, 0..3_usize, any::<bool>())
            .prop_map(|(index, app, named)| Op::Service { index, app, named }),
        1 => (0..2_usize).prop_map(|index| Op::RemoveService { index }),
        2 => (0..2_usize, prop::collection::vec(0..POD_IPS.len(), 0..3))
            .prop_map(|(index, ready)| Op::Slice { index, ready }),
        1 => (0..2_usize).prop_map(|index| Op::RemoveSlice { index }),
        6 => policy,
        2 => (0..4_usize, any::<bool>()).prop_map(|(index, cilium)| Op::RemovePolicy { index, cilium }),
    ]
}

fn namespace(ns: usize, team: Option<u8>) -> Namespace {
    let mut labels = Labels::from([(NAMESPACE_NAME_LABEL, NAMESPACES[ns])]);
    if let Some(team) = team {
        labels.insert("team", if team == 0 { "red" } else { "blue" });
    }
    Namespace {
        name: NAMESPACES[ns].to_owned(),
        labels,
    }
}

fn pod(spec: &PodSpec) -> Pod {
    let mut labels = Labels::from([("app", APPS[spec.app])]);
    match spec.tier {
        1 => labels.insert("tier", "front"),
        2 => labels.insert("tier", "back"),
        _ => {}
    }
    Pod {
        namespace: NAMESPACES[spec.ns].to_owned(),
        name: format!("p{}", spec.name),
        labels,
        workload: Workload {
            kind: "Pod".to_owned(),
            name: format!("p{}", spec.name),
        },
        node: Some(format!("n{}", spec.node)),
        host_network: spec.host_network,
        ips: vec![ip(if spec.host_network {
            NODE_IPS[spec.node]
        } else {
            POD_IPS[spec.ip]
        })],
        ports: if spec.pg_port {
            vec![ContainerPort {
                name: Some("pg".to_owned()),
                port: 5432,
                protocol: Protocol::Tcp,
            }]
        } else {
            Vec::new()
        },
    }
}

fn node(node: usize, with_cidr: bool) -> Node {
    Node {
        name: format!("n{node}"),
        addresses: vec![ip(NODE_IPS[node])],
        pod_cidrs: if with_cidr {
            vec![
                format!("10.244.{}.0/24", node + 1)
                    .parse()
                    .unwrap_or_else(|e| panic!("{e}")),
            ]
        } else {
            Vec::new()
        },
    }
}

fn service(index: usize, app: usize, named: bool) -> Service {
    Service {
        namespace: "b".to_owned(),
        name: format!("s{index}"),
        cluster_ips: vec![ip(SERVICE_IPS[index])],
        ports: vec![ServicePort {
            name: Some("pg".to_owned()),
            port: 5432,
            protocol: Protocol::Tcp,
            target: if named {
                TargetPort::Name("pg".to_owned())
            } else {
                TargetPort::Number(5432)
            },
        }],
        selector: Some(Labels::from([("app", APPS[app])])),
    }
}

fn slice(index: usize, ready: &[usize]) -> EndpointSlice {
    EndpointSlice {
        namespace: "b".to_owned(),
        name: format!("s{index}-x"),
        service: format!("s{index}"),
        ports: vec![EndpointPort {
            name: Some("pg".to_owned()),
            port: 5432,
            protocol: Protocol::Tcp,
        }],
        endpoints: ready
            .iter()
            .map(|&i| Endpoint {
                addresses: vec![ip(POD_IPS[i])],
                ready: true,
            })
            .collect(),
    }
}

fn policy(spec: &PolicySpec) -> CompiledPolicy {
    let ns = NAMESPACES[spec.ns];
    let port = if spec.named_port {
        json!("pg")
    } else {
        json!(5432)
    };
    if spec.cilium {
        // Deny rules: they beat every allow, of any kind.
        let peer = match spec.peer {
            0 => json!({"fromEndpoints": [{"matchLabels": {"app": APPS[spec.peer_value]}}]}),
            1 => json!({"fromEntities": ["world"]}),
            2 => json!({"fromEndpoints": [{"matchLabels": {
                "k8s:io.kubernetes.pod.namespace": NAMESPACES[spec.peer_value]}}]}),
            _ => json!({"fromCIDRSet": [{"cidr": "10.244.0.0/16"}]}),
        };
        let mut entry = peer;
        entry["toPorts"] = json!([{"ports": [{"port": "5432"}]}]);
        let object = json!({
            "metadata": {"name": format!("c{}", spec.index), "namespace": ns},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": APPS[spec.subject]}},
                "ingressDeny": [entry],
            },
        });
        let parsed: CiliumPolicy =
            serde_json::from_value(object).unwrap_or_else(|e| panic!("cnp: {e}"));
        return cilium::compile(PolicyKind::CiliumNetworkPolicy, &parsed)
            .unwrap_or_else(|e| panic!("cnp: {e}"));
    }
    let peer = match spec.peer {
        0 => json!({"podSelector": {"matchLabels": {"app": APPS[spec.peer_value]}}}),
        1 => json!({"namespaceSelector": {"matchLabels": {
            "team": if spec.peer_value == 0 { "red" } else { "blue" }}}}),
        2 => json!({
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: NAMESPACES[spec.peer_value]}},
            "podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["back"]}]},
        }),
        _ => json!({"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}),
    };
    let rule = json!({"from": [peer.clone()], "ports": [{"port": port}]});
    let mut spec_json = json!({
        "podSelector": {"matchLabels": {"app": APPS[spec.subject]}},
        "ingress": [rule],
    });
    if spec.egress {
        spec_json["policyTypes"] = json!(["Ingress", "Egress"]);
        spec_json["egress"] = json!([{"to": [{"podSelector": {}}]}]);
    }
    let object = json!({
        "metadata": {"name": format!("q{}", spec.index), "namespace": ns},
        "spec": spec_json,
    });
    let parsed = serde_json::from_value(object).unwrap_or_else(|e| panic!("netpol: {e}"));
    netpol::compile(&parsed).unwrap_or_else(|e| panic!("netpol: {e}"))
}

/// The change an op stands for.
fn change(op: &Op) -> Change {
    match op {
        Op::Namespace { ns, team } => Change::Namespace(namespace(*ns, *team)),
        Op::RemoveNamespace { ns } => Change::NamespaceRemoved(NAMESPACES[*ns].to_owned()),
        Op::Pod(spec) => Change::Pod(pod(spec)),
        Op::RemovePod { name } => {
            // Which namespace the pod is in is not known here: removal by every namespace's key
            // is what a delete of an unknown object does (nothing); the caller picks the right one.
            Change::PodRemoved(auditor::vocab::ObjectKey::new("", format!("p{name}")))
        }
        Op::Node { node: n, with_cidr } => Change::Node(node(*n, *with_cidr)),
        Op::RemoveNode { node } => Change::NodeRemoved(format!("n{node}")),
        Op::Service { index, app, named } => Change::Service(service(*index, *app, *named)),
        Op::RemoveService { index } => {
            Change::ServiceRemoved(auditor::vocab::ObjectKey::new("b", format!("s{index}")))
        }
        Op::Slice { index, ready } => Change::EndpointSlice(slice(*index, ready)),
        Op::RemoveSlice { index } => {
            Change::EndpointSliceRemoved(auditor::vocab::ObjectKey::new("b", format!("s{index}-x")))
        }
        Op::Policy(spec) => Change::Policy(policy(spec)),
        Op::RemovePolicy { index, cilium } => {
            let name = format!("{}{index}", if *cilium { "c" } else { "q" });
            // Policies of either kind live in any namespace: remove from the one that has it.
            Change::PolicyRemoved(auditor::policy::ir::PolicyKey {
                kind: if *cilium {
                    PolicyKind::CiliumNetworkPolicy
                } else {
                    PolicyKind::NetworkPolicy
                },
                namespace: String::new(),
                name,
            })
        }
    }
}

/// Applies the ops to `cluster` one by one, and returns what exists at the end, by key.
fn run(ops: &[Op], cluster: &mut Cluster) -> BTreeMap<ChangeKey, Change> {
    let mut world: BTreeMap<ChangeKey, Change> = BTreeMap::new();
    for op in ops {
        let mut change = change(op);
        // Removals name objects by name only: find the key the world has (pods and policies
        // may be in any namespace).
        let named = |world: &BTreeMap<ChangeKey, Change>, pick: &dyn Fn(&ChangeKey) -> bool| {
            world.keys().find(|k| pick(k)).cloned()
        };
        match &change {
            Change::PodRemoved(key) => {
                let found = named(
                    &world,
                    &|k| matches!(k, ChangeKey::Pod(p) if p.name == key.name),
                );
                match found {
                    Some(ChangeKey::Pod(real)) => change = Change::PodRemoved(real),
                    _ => continue,
                }
            }
            Change::PolicyRemoved(key) => {
                let found = named(
                    &world,
                    &|k| matches!(k, ChangeKey::Policy(p) if p.name == key.name && p.kind == key.kind),
                );
                match found {
                    Some(ChangeKey::Policy(real)) => change = Change::PolicyRemoved(real),
                    _ => continue,
                }
            }
            _ => {}
        }
        // Two live pods never share an address here: which one would own it depends on the
        // order events arrived in, in a real cluster as here. An address is reused only once
        // its pod is gone.
        if let Change::Pod(p) = &change
            && !p.host_network
            && world.iter().any(|(k, c)| {
                matches!(c, Change::Pod(o) if o.name != p.name && !o.host_network && o.ips == p.ips)
                    && matches!(k, ChangeKey::Pod(_))
            })
        {
            continue;
        }
        // A pod moved to another namespace is another object: the old one goes first.
        if let Change::Pod(p) = &change
            && let Some(ChangeKey::Pod(old)) = named(
                &world,
                &|k| matches!(k, ChangeKey::Pod(o) if o.name == p.name),
            )
            && old.namespace != p.namespace
        {
            world.remove(&ChangeKey::Pod(old.clone()));
            cluster.apply(Change::PodRemoved(old));
        }
        // So do policies with the same name in another namespace.
        if let Change::Policy(p) = &change
            && let Some(ChangeKey::Policy(old)) = named(
                &world,
                &|k| matches!(k, ChangeKey::Policy(o) if o.name == p.key.name && o.kind == p.key.kind),
            )
            && old.namespace != p.key.namespace
        {
            world.remove(&ChangeKey::Policy(old.clone()));
            cluster.apply(Change::PolicyRemoved(old));
        }
        let key = change.key();
        if change.is_removal() {
            world.remove(&key);
        } else {
            world.insert(key, change.clone());
        }
        cluster.apply(change);
    }
    world
}

fn config(ipblock: IpBlockReading) -> ClusterConfig {
    ClusterConfig {
        ipblock,
        ingress: Vec::new(),
    }
}

fn addresses() -> Vec<IpAddr> {
    POD_IPS
        .iter()
        .chain(NODE_IPS.iter())
        .chain(SERVICE_IPS.iter())
        .chain([EXTERNAL].iter())
        .map(|a| ip(a))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn incremental_and_from_scratch_models_agree(
        ops in prop::collection::vec(op(), 1..48),
        cilium_reading in any::<bool>(),
    ) {
        let reading = if cilium_reading { IpBlockReading::Cilium } else { IpBlockReading::Calico };
        let mut incremental = Cluster::new(config(reading));
        let world = run(&ops, &mut incremental);
        let mut objects: Vec<Change> = world.into_values().collect();
        objects.sort_by_key(Change::rank);
        let mut scratch = Cluster::from_changes(config(reading), objects);
        let addresses = addresses();
        for &src in &addresses {
            for &dst in &addresses {
                for port in [5432, 80] {
                    let flow = FlowQuery { src, dst, protocol: Protocol::Tcp, port };
                    let a = incremental.verdict(&flow);
                    let b = scratch.verdict(&flow);
                    prop_assert_eq!(a.allowed, b.allowed, "{:?}\nops: {:#?}", flow, ops);
                    prop_assert_eq!(a, incremental.judge(&flow), "cached and computed differ");
                    let ea = incremental.explain(&flow, &a);
                    let eb = scratch.explain(&flow, &b);
                    prop_assert_eq!(&ea, &eb, "{:?}\nops: {:#?}", flow, ops);
                    prop_assert_eq!(incremental.judgement(&flow), scratch.judgement(&flow));
                }
            }
        }
        prop_assert_eq!(incremental.policy_count(), scratch.policy_count());
    }
}
