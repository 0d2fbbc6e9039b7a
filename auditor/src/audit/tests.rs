//! The audit stage against the real policy model: a two-node cluster with one `NetworkPolicy`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use auditor_ebpf::flow::{FlowKey, Hook, proto};
use ipnet::IpNet;

use super::*;
use crate::flows::{FlowRecord, Outcome, PerDirection};
use crate::inventory::{
    Endpoint, EndpointPort, EndpointSlice, Namespace, Node, Pod, Service, ServicePort, TargetPort,
    Workload,
};
use crate::policy::ir::{self, PolicyKind};
use crate::policy::netpol;
use crate::vocab::{ContainerPort, Direction, Labels, Protocol};

const FRONTEND: &str = "10.244.0.10";
const PROMETHEUS: &str = "10.244.0.30";
const POSTGRES: &str = "10.244.1.20";
const POSTGRES_SVC: &str = "10.96.0.50";
const NODE_A: &str = "10.0.0.1";
const NODE_B: &str = "10.0.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

fn net(s: &str) -> IpNet {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test CIDR {s}: {e}"))
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn pod(
    namespace: &str,
    name: &str,
    workload: &str,
    node: &str,
    addr: &str,
    ports: &[(u16, &str)],
) -> Pod {
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: labels(&[("app", workload)]),
        workload: Workload {
            kind: "Deployment".into(),
            name: workload.into(),
        },
        node: Some(node.into()),
        host_network: false,
        ips: vec![ip(addr)],
        ports: ports
            .iter()
            .map(|&(port, name)| ContainerPort {
                name: Some(name.into()),
                port,
                protocol: Protocol::Tcp,
            })
            .collect(),
    }
}

const ALLOW_WEB: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: db}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: web}}
      ports:
        - {port: 5432, protocol: TCP}
";

/// Two nodes; web/frontend and monitoring/prometheus on node-a, db/postgres on node-b behind a
/// `ClusterIP`; db admits only web on 5432.
fn model() -> Cluster {
    let mut model = Cluster::new(ClusterConfig {
        ingress: vec![net("192.0.2.0/28")],
        ..ClusterConfig::default()
    });
    for ns in ["web", "db", "monitoring", "default"] {
        model.upsert_namespace(Namespace {
            name: ns.into(),
            labels: labels(&[("kubernetes.io/metadata.name", ns)]),
        });
    }
    for (name, addr, cidr) in [
        ("node-a", NODE_A, "10.244.0.0/24"),
        ("node-b", NODE_B, "10.244.1.0/24"),
    ] {
        model.upsert_node(Node {
            name: name.into(),
            addresses: vec![ip(addr)],
            pod_cidrs: vec![net(cidr)],
        });
    }
    model.upsert_pod(pod(
        "web",
        "frontend-7d9f-abcde",
        "frontend",
        "node-a",
        FRONTEND,
        &[],
    ));
    model.upsert_pod(pod(
        "monitoring",
        "prometheus-0",
        "prometheus",
        "node-a",
        PROMETHEUS,
        &[(9090, "web")],
    ));
    model.upsert_pod(pod(
        "db",
        "postgres-0",
        "postgres",
        "node-b",
        POSTGRES,
        &[(5432, "pg")],
    ));
    model.upsert_service(Service {
        namespace: "db".into(),
        name: "postgres".into(),
        cluster_ips: vec![ip(POSTGRES_SVC)],
        ports: vec![ServicePort {
            name: Some("pg".into()),
            port: 5432,
            protocol: Protocol::Tcp,
            target: TargetPort::Number(5432),
        }],
        selector: Some(labels(&[("app", "postgres")])),
    });
    model.upsert_endpoint_slice(EndpointSlice {
        namespace: "db".into(),
        name: "postgres-x1".into(),
        service: "postgres".into(),
        ports: vec![EndpointPort {
            name: Some("pg".into()),
            port: 5432,
            protocol: Protocol::Tcp,
        }],
        endpoints: vec![Endpoint {
            addresses: vec![ip(POSTGRES)],
            ready: true,
        }],
    });
    model.upsert_endpoint_slice(EndpointSlice {
        namespace: "default".into(),
        name: "kubernetes".into(),
        service: "kubernetes".into(),
        ports: vec![EndpointPort {
            name: Some("https".into()),
            port: 6443,
            protocol: Protocol::Tcp,
        }],
        endpoints: vec![Endpoint {
            addresses: vec![ip(NODE_A)],
            ready: true,
        }],
    });
    model.upsert_policy(allow_web());
    model.refresh();
    model
}

fn allow_web() -> ir::CompiledPolicy {
    let object = serde_yaml_ng::from_str(ALLOW_WEB)
        .unwrap_or_else(|e| panic!("test policy does not parse: {e}"));
    netpol::compile(&object).unwrap_or_else(|e| panic!("test policy does not compile: {e}"))
}

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn record(src: &str, dst: &str, outcome: Outcome, first: u64) -> FlowRecord {
    let initiator: SocketAddr = src
        .parse()
        .unwrap_or_else(|e| panic!("bad socket {src}: {e}"));
    let responder: SocketAddr = dst
        .parse()
        .unwrap_or_else(|e| panic!("bad socket {dst}: {e}"));
    let (key, _) = FlowKey::from_addrs(
        proto::TCP,
        (initiator.ip(), initiator.port()),
        (responder.ip(), responder.port()),
    );
    FlowRecord {
        protocol: Protocol::Tcp,
        initiator,
        responder,
        ifindex: 7,
        interface: "cali0a1b2c3d4e5".into(),
        hook: Hook::Ingress,
        packets: PerDirection::default(),
        bytes: PerDirection::default(),
        first_seen: t(first),
        last_seen: t(first + 1),
        mid_stream: false,
        outcome,
        key,
    }
}

struct Fixture {
    model: Cluster,
}

impl Fixture {
    fn new() -> Self {
        Self { model: model() }
    }

    fn ctx(&self) -> &Cluster {
        &self.model
    }
}

fn auditor(local: Option<&str>) -> Auditor {
    Auditor::new(AuditConfig {
        local_node: local.map(str::to_owned),
        ..AuditConfig::default()
    })
}

#[test]
fn verdict_truth_table() {
    use AuditVerdict::{Allowed, Denied, Unexpected};
    use ModelVerdict::{Allow, Deny};
    let table = [
        (Allow, Outcome::Established, Allowed),
        (Allow, Outcome::Refused, Allowed),
        (Allow, Outcome::Unanswered, Allowed),
        (Deny, Outcome::Established, Unexpected),
        (Deny, Outcome::Refused, Denied),
        (Deny, Outcome::Unanswered, Denied),
    ];
    for (model, outcome, want) in table {
        let got = classify(model, outcome);
        assert_eq!(got, want, "{model:?} + {outcome:?}");
        assert!(
            got.outcomes().contains(&outcome),
            "{got} cannot have {outcome}"
        );
    }
}

#[test]
fn allowed_flow_names_its_rule_and_declared_port() {
    let fx = Fixture::new();
    let mut a = auditor(Some("node-a"));
    let flow = a
        .push(
            record(
                "10.244.0.10:40000",
                "10.244.1.20:5432",
                Outcome::Established,
                0,
            ),
            fx.ctx(),
            t(2),
        )
        .unwrap_or_else(|| panic!("the initiator's node must count the flow"));
    assert_eq!(flow.verdict, AuditVerdict::Allowed);
    assert_eq!(flow.src.workload_label(), "frontend");
    assert_eq!(flow.dst.namespace_label(), "db");
    assert_eq!(flow.dst.workload_label(), "postgres");
    assert_eq!(flow.dst_port, Some(5432));
    let rules: Vec<_> = flow
        .judgement
        .decisions
        .iter()
        .map(|d| {
            (
                d.policy.name.as_str(),
                d.direction,
                d.rule.as_str(),
                d.action,
            )
        })
        .collect();
    assert_eq!(
        rules,
        [(
            "allow-web",
            Direction::Ingress,
            "ingress[0]",
            ir::Action::Allow
        )]
    );
    assert_eq!(a.stats().counted, 1);
}

#[test]
fn denied_flow_is_unexpected_when_established_and_denied_otherwise() {
    let fx = Fixture::new();
    let mut a = auditor(Some("node-a"));
    let cases = [
        (Outcome::Established, AuditVerdict::Unexpected),
        (Outcome::Refused, AuditVerdict::Denied),
        (Outcome::Unanswered, AuditVerdict::Denied),
    ];
    for (i, (outcome, want)) in cases.into_iter().enumerate() {
        let port = 41000 + u16::try_from(i).unwrap_or_else(|e| panic!("{e}"));
        let flow = a
            .push(
                record(
                    &format!("{PROMETHEUS}:{port}"),
                    "10.244.1.20:5432",
                    outcome,
                    0,
                ),
                fx.ctx(),
                t(2),
            )
            .unwrap_or_else(|| panic!("flow {i} not counted"));
        assert_eq!(flow.verdict, want, "{outcome:?}");
        assert_eq!(flow.judgement.verdict, ModelVerdict::Deny);
        assert!(
            !fx.model
                .explain(&flow.query(), &fx.model.judge(&flow.query()))
                .reason
                .is_empty(),
            "a denied flow has its explanation"
        );
        let d = &flow.judgement.decisions;
        assert!(
            d.len() == 1
                && d[0].policy.kind == PolicyKind::NetworkPolicy
                && d[0].policy.name == "allow-web"
                && d[0].rule == DEFAULT_DENY_RULE
                && d[0].action == ir::Action::Deny,
            "default deny by allow-web's isolation expected, got {d:?}"
        );
    }
}

#[test]
fn a_flow_reported_twice_counts_once_and_a_later_reuse_counts_again() {
    let fx = Fixture::new();
    let mut a = auditor(None);
    let r = record(
        "10.244.0.10:40000",
        "10.244.1.20:5432",
        Outcome::Established,
        0,
    );
    assert!(a.push(r.clone(), fx.ctx(), t(2)).is_some());
    // The same flow from another interface: same key, first seen within the slack.
    let mut again = r.clone();
    again.first_seen += Duration::from_millis(300);
    again.interface = "cali99".into();
    assert!(a.push(again, fx.ctx(), t(2)).is_none(), "duplicate counted");
    assert_eq!(a.stats().duplicates, 1);
    // The 5-tuple reused by a new connection a minute later.
    let later = record(
        "10.244.0.10:40000",
        "10.244.1.20:5432",
        Outcome::Established,
        30,
    );
    assert!(
        a.push(later, fx.ctx(), t(31)).is_some(),
        "a new flow on an old 5-tuple must count"
    );
    assert_eq!(a.stats().counted, 2);
}

#[test]
fn only_the_initiators_node_counts_a_cross_node_flow() {
    let fx = Fixture::new();
    let r = record(
        "10.244.0.10:40000",
        "10.244.1.20:5432",
        Outcome::Established,
        0,
    );
    let mut on_a = auditor(Some("node-a"));
    let mut on_b = auditor(Some("node-b"));
    assert!(on_a.push(r.clone(), fx.ctx(), t(2)).is_some());
    assert!(on_b.push(r, fx.ctx(), t(2)).is_none());
    assert_eq!(on_b.stats().other_node, 1);
    // From outside the cluster: the responder's node counts.
    let w = record("203.0.113.9:50000", "10.244.1.20:5432", Outcome::Refused, 0);
    assert!(on_a.push(w.clone(), fx.ctx(), t(2)).is_none());
    let flow = on_b
        .push(w, fx.ctx(), t(2))
        .unwrap_or_else(|| panic!("node-b must count world -> its pod"));
    assert_eq!(flow.src, Peer::World);
    assert_eq!(flow.verdict, AuditVerdict::Denied);
}

#[test]
fn clusterip_and_endpoint_records_count_once_on_the_endpoint() {
    let fx = Fixture::new();
    let svc = record(
        "10.244.0.10:40001",
        "10.96.0.50:5432",
        Outcome::Established,
        0,
    );
    let ep = record(
        "10.244.0.10:40001",
        "10.244.1.20:5432",
        Outcome::Established,
        0,
    );

    // ClusterIP record first: held, then replaced by the endpoint's.
    let mut a = auditor(Some("node-a"));
    assert!(a.push(svc.clone(), fx.ctx(), t(1)).is_none());
    assert_eq!(a.held(), 1);
    let flow = a
        .push(ep.clone(), fx.ctx(), t(1))
        .unwrap_or_else(|| panic!("the endpoint record must count"));
    assert_eq!(flow.dst.workload_label(), "postgres");
    assert_eq!(a.held(), 0);
    assert!(
        a.tick(fx.ctx(), t(10)).is_empty(),
        "the held ClusterIP record came out too"
    );
    assert_eq!((a.stats().counted, a.stats().superseded), (1, 1));

    // Endpoint record first: the ClusterIP one is recognised at once.
    let mut b = auditor(Some("node-a"));
    assert!(b.push(ep, fx.ctx(), t(1)).is_some());
    assert!(b.push(svc.clone(), fx.ctx(), t(1)).is_none());
    assert_eq!(b.held(), 0);
    assert_eq!((b.stats().counted, b.stats().superseded), (1, 1));

    // No endpoint record (the endpoint is behind another node's uplink): judged on the Service.
    let mut c = auditor(Some("node-a"));
    assert!(c.push(svc, fx.ctx(), t(1)).is_none());
    assert!(
        c.tick(fx.ctx(), t(1)).is_empty(),
        "released before its hold"
    );
    let out = c.tick(fx.ctx(), t(3));
    assert_eq!(out.len(), 1, "the held flow must come out after its hold");
    assert_eq!(
        out[0].dst,
        Peer::Service {
            namespace: "db".into(),
            name: "postgres".into(),
            workload: "postgres".into(),
        }
    );
    assert_eq!(
        out[0].dst.workload_label(),
        "postgres",
        "same series as the translated flow's"
    );
    assert_eq!(
        out[0].verdict,
        AuditVerdict::Allowed,
        "web may reach every postgres endpoint"
    );
    assert_eq!(
        out[0].dst_port,
        Some(5432),
        "a Service port is a declared port"
    );
}

#[test]
fn peers_resolve_to_what_the_labels_name() {
    let fx = Fixture::new();
    let r = fx.ctx();
    assert_eq!(r.peer(ip(NODE_A), Some(6443)), Peer::KubeApiserver);
    assert_eq!(
        r.peer(ip(NODE_A), Some(22)),
        Peer::Node {
            name: "node-a".into()
        }
    );
    assert_eq!(
        r.peer(ip(NODE_B), Some(6443)),
        Peer::Node {
            name: "node-b".into()
        }
    );
    assert_eq!(r.peer(ip("10.244.1.99"), Some(80)), Peer::Unknown);
    assert_eq!(r.peer(ip("192.0.2.3"), Some(443)), Peer::Ingress);
    assert_eq!(r.peer(ip("198.51.100.7"), Some(443)), Peer::World);
    let p = r.peer(ip(POSTGRES), Some(5432));
    assert_eq!(
        (p.namespace_label(), p.workload_label(), p.kind()),
        ("db", "postgres", "pod")
    );
    for (peer, ns, wl) in [
        (Peer::World, "", "world"),
        (Peer::Node { name: "n".into() }, "", "node"),
        (Peer::KubeApiserver, "", "kube-apiserver"),
        (Peer::Ingress, "", "ingress"),
    ] {
        assert_eq!(
            (peer.namespace_label(), peer.workload_label()),
            (ns, wl),
            "{peer:?}"
        );
    }
}

#[test]
fn a_service_is_labelled_with_its_endpoints_workload_only_when_there_is_one() {
    let mut fx = Fixture::new();
    fx.model.upsert_service(Service {
        namespace: "db".into(),
        name: "mixed".into(),
        cluster_ips: vec![ip("10.96.0.60")],
        ports: vec![],
        selector: None,
    });
    fx.model.upsert_endpoint_slice(EndpointSlice {
        namespace: "db".into(),
        name: "mixed-1".into(),
        service: "mixed".into(),
        ports: vec![],
        endpoints: vec![
            Endpoint {
                addresses: vec![ip(POSTGRES)],
                ready: true,
            },
            Endpoint {
                addresses: vec![ip(FRONTEND)],
                ready: true,
            },
        ],
    });
    let r = fx.ctx();
    assert_eq!(r.peer(ip("10.96.0.60"), Some(80)).workload_label(), "mixed");
    assert_eq!(
        r.peer(ip(POSTGRES_SVC), Some(5432)).workload_label(),
        "postgres"
    );
    assert!(r.is_endpoint_of("db", "mixed", ip(FRONTEND)));
    assert!(!r.is_endpoint_of("db", "postgres", ip(FRONTEND)));
}

#[test]
fn dst_port_is_other_unless_declared_or_named_by_a_policy() {
    let fx = Fixture::new();
    let r = fx.ctx();
    let tcp = Protocol::Tcp;
    let pg = r.peer(ip(POSTGRES), Some(5432));
    assert_eq!(r.port_label(&pg, ip(POSTGRES), tcp, 5432), Some(5432));
    assert_eq!(r.port_label(&pg, ip(POSTGRES), tcp, 6000), None);
    assert_eq!(r.port_label(&pg, ip(POSTGRES), Protocol::Udp, 5432), None);
    // World on 5432: not declared, but the policy names 5432/TCP.
    assert_eq!(
        r.port_label(&Peer::World, ip("198.51.100.7"), tcp, 5432),
        Some(5432)
    );
    assert_eq!(
        r.port_label(&Peer::World, ip("198.51.100.7"), tcp, 443),
        None
    );
    assert_eq!(r.port_label(&pg, ip(POSTGRES), Protocol::Icmp, 5432), None);
}

#[test]
fn named_ports_skip_wide_ranges() {
    let mut policy = allow_web();
    policy.rules[0].ports = vec![
        ir::PortMatch {
            protocol: Some(Protocol::Udp),
            port: ir::PortSpec::Range(5000, 5003),
        },
        ir::PortMatch {
            protocol: None,
            port: ir::PortSpec::Range(1024, 65535),
        },
    ];
    let named = NamedPorts::from_rules(&policy.rules);
    assert_eq!(named.len(), 4);
    assert!(named.contains(Protocol::Udp, 5002));
    assert!(!named.contains(Protocol::Tcp, 5002));
    assert!(!named.contains(Protocol::Tcp, 2000));
}

#[test]
fn remembered_flows_are_bounded_in_time_and_number() {
    let fx = Fixture::new();
    let mut a = Auditor::new(AuditConfig {
        capacity: 8,
        ..AuditConfig::default()
    });
    for port in 0..20_u16 {
        let r = record(
            &format!("{FRONTEND}:{}", 30000 + port),
            "10.244.1.20:5432",
            Outcome::Established,
            0,
        );
        assert!(a.push(r, fx.ctx(), t(1)).is_some());
    }
    assert_eq!(a.remembered(), 8);
    let horizon = a.config().horizon.as_secs();
    let _ = a.tick(fx.ctx(), t(2 + horizon));
    assert_eq!(
        a.remembered(),
        0,
        "flows older than the horizon must be forgotten"
    );
}

fn mid_stream(src: &str, dst: &str) -> FlowRecord {
    let mut r = record(src, dst, Outcome::Established, 0);
    r.mid_stream = true;
    r.packets = PerDirection {
        to_responder: 5,
        to_initiator: 2,
    };
    r
}

/// A flow first seen mid-stream from the server (its keepalive after an agent restart): the
/// server declares its port, so it is the responder; the record is turned round, counters too.
#[test]
fn a_mid_stream_flow_is_oriented_by_the_port_its_responder_declares() {
    let fx = Fixture::new();
    let mut a = auditor(None);
    let flow = a
        .push(
            mid_stream(&format!("{POSTGRES}:5432"), &format!("{FRONTEND}:41000")),
            fx.ctx(),
            t(2),
        )
        .unwrap_or_else(|| panic!("not counted"));
    assert_eq!(flow.orientation, Orientation::DeclaredPort);
    assert_eq!(
        (flow.record.initiator, flow.record.responder),
        (
            format!("{FRONTEND}:41000").parse().unwrap(),
            format!("{POSTGRES}:5432").parse().unwrap()
        )
    );
    assert_eq!(
        (
            flow.record.packets.to_responder,
            flow.record.packets.to_initiator
        ),
        (2, 5)
    );
    assert_eq!(flow.verdict, AuditVerdict::Allowed);
    assert_eq!(flow.dst_port, Some(5432));
    // A flow whose opening was seen keeps the orientation it was seen with.
    let opened = a
        .push(
            record(
                &format!("{FRONTEND}:41001"),
                &format!("{POSTGRES}:5432"),
                Outcome::Established,
                5,
            ),
            fx.ctx(),
            t(6),
        )
        .unwrap_or_else(|| panic!("not counted"));
    assert_eq!(opened.orientation, Orientation::Opening);
}

/// Conntrack's ORIGINAL tuple comes first: here it names prometheus, which the model denies,
/// so the established flow is a true `unexpected`, oriented by conntrack.
#[test]
fn conntrack_orients_before_ports() {
    let fx = Fixture::new();
    let mut a = auditor(None);
    let originator: SocketAddr = format!("{PROMETHEUS}:41002").parse().unwrap();
    let flow = a
        .push_with(
            mid_stream(&format!("{POSTGRES}:5432"), &originator.to_string()),
            Some(originator),
            fx.ctx(),
            t(2),
        )
        .unwrap_or_else(|| panic!("not counted"));
    assert_eq!(flow.orientation, Orientation::Conntrack);
    assert_eq!(flow.record.initiator, originator);
    assert_eq!(flow.verdict, AuditVerdict::Unexpected);
    // Conntrack wins over the declared port when they disagree.
    let server: SocketAddr = format!("{POSTGRES}:5432").parse().unwrap();
    let flow = a
        .push_with(
            mid_stream(&server.to_string(), &format!("{FRONTEND}:41003")),
            Some(server),
            fx.ctx(),
            t(3),
        )
        .unwrap_or_else(|| panic!("not counted"));
    assert_eq!(
        (flow.orientation, flow.record.initiator),
        (Orientation::Conntrack, server)
    );
}

/// Neither port declared: the ephemeral range decides (the initiator's port is in it).
#[test]
fn the_ephemeral_range_orients_when_no_port_is_declared() {
    let fx = Fixture::new();
    let mut a = auditor(None);
    let flow = a
        .push(
            mid_stream(&format!("{POSTGRES}:7000"), &format!("{FRONTEND}:45000")),
            fx.ctx(),
            t(2),
        )
        .unwrap_or_else(|| panic!("not counted"));
    assert_eq!(flow.orientation, Orientation::EphemeralRange);
    assert_eq!(flow.record.responder.port(), 7000);
}

/// No evidence at all: judged both ways. Prometheus to db is denied (db admits only web), db to
/// prometheus is allowed (nothing isolates monitoring): allowed, reported the allowed way, never
/// `unexpected`.
#[test]
fn a_flow_without_evidence_is_unexpected_only_if_denied_both_ways() {
    let fx = Fixture::new();
    let mut a = auditor(None);
    let flow = a
        .push(
            mid_stream(&format!("{PROMETHEUS}:9999"), &format!("{POSTGRES}:7000")),
            fx.ctx(),
            t(2),
        )
        .unwrap_or_else(|| panic!("not counted"));
    assert_eq!(flow.orientation, Orientation::Unknown);
    assert_eq!(flow.verdict, AuditVerdict::Allowed);
    assert_eq!(flow.record.initiator.ip(), ip(POSTGRES));
    // The same flow seen from its opening is judged the way it was opened only.
    let opened = a
        .push(
            record(
                &format!("{PROMETHEUS}:9998"),
                &format!("{POSTGRES}:7000"),
                Outcome::Established,
                5,
            ),
            fx.ctx(),
            t(6),
        )
        .unwrap_or_else(|| panic!("not counted"));
    assert_eq!(
        opened.verdict,
        AuditVerdict::Unexpected,
        "seen from its opening, the same flow is judged one way only"
    );
}

/// No evidence, and both ways denied (monitoring isolated too): then, and only then, an
/// established flow of unknown orientation is `unexpected`.
#[test]
fn a_flow_without_evidence_denied_both_ways_is_unexpected() {
    let mut model = model();
    let object = serde_yaml_ng::from_str(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: deny-all, namespace: monitoring}\n\
         spec: {podSelector: {}, policyTypes: [Ingress]}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    model.upsert_policy(netpol::compile(&object).unwrap_or_else(|e| panic!("{e}")));
    model.refresh();
    let mut a = auditor(None);
    let flow = a
        .push(
            mid_stream(&format!("{PROMETHEUS}:9999"), &format!("{POSTGRES}:7000")),
            &model,
            t(2),
        )
        .unwrap_or_else(|| panic!("not counted"));
    assert_eq!(flow.orientation, Orientation::Unknown);
    assert_eq!(flow.verdict, AuditVerdict::Unexpected);
}

/// No evidence of who opened a cross-node flow: each node's kernel took whoever it saw speak
/// first, and two nodes can see it differently (one agent restarted, the other not). Exactly one
/// agent counts it whichever way each guessed: the endpoints are then taken in an order every
/// agent sees alike.
#[test]
fn a_flow_without_evidence_is_counted_by_one_node_whatever_each_guessed() {
    let fx = Fixture::new();
    let one_way = || mid_stream(&format!("{PROMETHEUS}:9999"), &format!("{POSTGRES}:7000"));
    let other_way = || mid_stream(&format!("{POSTGRES}:7000"), &format!("{PROMETHEUS}:9999"));
    for (a_saw, b_saw) in [
        (one_way(), one_way()),
        (one_way(), other_way()),
        (other_way(), one_way()),
        (other_way(), other_way()),
    ] {
        let mut on_a = auditor(Some("node-a"));
        let mut on_b = auditor(Some("node-b"));
        let counted_on_a = on_a.push(a_saw, fx.ctx(), t(2)).is_some();
        let counted_on_b = on_b.push(b_saw, fx.ctx(), t(2)).is_some();
        assert!(
            counted_on_a != counted_on_b,
            "counted on node-a: {counted_on_a}, on node-b: {counted_on_b}"
        );
        // The lower address (prometheus, on node-a) goes first: node-a counts it.
        assert!(counted_on_a, "node-b counted it");
    }
}
