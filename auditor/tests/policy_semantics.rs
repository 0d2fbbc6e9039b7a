//! SPEC 4.1 and 4.3 rules the conformance corpus does not cover: `NotIn` / `DoesNotExist`, IPv6,
//! own-node traffic, hostNetwork pods, the ipBlock reading switch, policyTypes defaulting,
//! Services (named target ports, several endpoints, `EndpointSlices`), incremental updates, and the
//! Calico homelab cluster of `shared/seeds/004_*` with the gaps its write-up mentions.

use std::path::{Path, PathBuf};

use auditor::audit::{Cluster, ClusterConfig, Explanation, FlowQuery};
use auditor::check;
use auditor::config::Config;
use auditor::decode::Strictness;
use auditor::policy::ir::{PolicyKey, PolicyKind};
use auditor::policy::model::IpBlockReading;
use auditor::source::load::{self, Select};
use auditor::vocab::Protocol;

fn model(yaml: &str, ipblock: IpBlockReading) -> Cluster {
    let objects = load::load_text(
        Path::new("inline.yaml"),
        yaml,
        Select::ALL,
        Strictness::Strict,
    )
    .unwrap_or_else(|e| panic!("fixture does not load: {e}"));
    let config = ClusterConfig {
        ipblock,
        ingress: Vec::new(),
    };
    check::cluster_from(objects, config)
}

fn flow(src: &str, dst: &str, protocol: &str, port: u16) -> FlowQuery {
    FlowQuery {
        src: src.parse().unwrap_or_else(|_| panic!("bad src {src}")),
        dst: dst.parse().unwrap_or_else(|_| panic!("bad dst {dst}")),
        protocol: Protocol::parse(protocol).unwrap_or_else(|| panic!("bad protocol {protocol}")),
        port,
    }
}

fn judge(model: &mut Cluster, src: &str, dst: &str, protocol: &str, port: u16) -> Explanation {
    let f = flow(src, dst, protocol, port);
    let verdict = model.verdict(&f);
    // The cache must never change an answer.
    assert_eq!(
        verdict,
        model.judge(&f),
        "cached and computed verdicts differ"
    );
    model.explain(&f, &verdict)
}

#[track_caller]
fn expect(model: &mut Cluster, src: &str, dst: &str, port: u16, verdict: &str) -> Explanation {
    let e = judge(model, src, dst, "TCP", port);
    assert!(
        e.verdict == verdict,
        "{src} -> {dst}:{port}: expected {verdict}, got {}: {}",
        e.verdict,
        e.reason
    );
    e
}

const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop, labels: {app: web, tier: front}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: shop, labels: {app: web, tier: back}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: shop, labels: {app: web, canary: "true"}}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: shop, labels: {app: db}}
status: {podIP: 10.0.0.4}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-front, namespace: shop}
spec:
  podSelector:
    matchExpressions: [{key: app, operator: In, values: [web]}]
  ingress:
  - from:
    - podSelector:
        matchExpressions:
        - {key: tier, operator: NotIn, values: [back]}
        - {key: canary, operator: DoesNotExist}
"#;

#[test]
fn not_in_and_does_not_exist() {
    let mut m = model(SHOP, IpBlockReading::Calico);
    // tier=back is excluded by NotIn.
    expect(&mut m, "10.0.0.2", "10.0.0.1", 80, "deny");
    // No tier label at all satisfies NotIn; no canary label satisfies DoesNotExist.
    let e = expect(&mut m, "10.0.0.4", "10.0.0.1", 80, "allow");
    assert!(
        e.reason
            .contains("allowed by NetworkPolicy shop/web-from-front ingress[0]"),
        "{}",
        e.reason
    );
    // A canary label fails DoesNotExist even though NotIn holds.
    expect(&mut m, "10.0.0.3", "10.0.0.2", 80, "deny");
    // d is not selected: not isolated.
    let e = expect(&mut m, "10.0.0.3", "10.0.0.4", 5432, "allow");
    assert_eq!(e.ingress.by, "not-isolated");
}

#[test]
fn ipv6_pods_and_ip_blocks() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: web, labels: {app: server}}
status: {podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}, {ip: "fd00::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: web, labels: {app: client}}
status: {podIP: "fd00::6", podIPs: [{ip: "fd00::6"}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: web}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from:
    - ipBlock: {cidr: "2001:db8::/32", except: ["2001:db8:bad::/48"]}
    ports: [{port: 443}]
  - from:
    - podSelector: {matchLabels: {app: client}}
    ports: [{port: 8443}]
"#;
    let mut m = model(yaml, IpBlockReading::Calico);
    expect(&mut m, "2001:db8:1::1", "fd00::5", 443, "allow");
    expect(&mut m, "2001:db8:bad::1", "fd00::5", 443, "deny");
    expect(&mut m, "2001:db8:1::1", "fd00::5", 444, "deny");
    // The same pod by its IPv4 address is the same endpoint.
    expect(&mut m, "203.0.113.1", "10.1.0.5", 443, "deny");
    expect(&mut m, "fd00::6", "fd00::5", 8443, "allow");
    expect(&mut m, "fd00::6", "10.1.0.5", 8443, "allow");
    expect(&mut m, "fd00::6", "fd00::5", 443, "deny");
    let e = judge(&mut m, "fd00::6", "fd00::5", "TCP", 8443);
    assert_eq!(e.src_peer.name, "client");
    assert_eq!(e.dst_peer.name, "server");
}

const NODES: &str = r"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.1.10}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.168.1.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: srv, namespace: app, labels: {app: srv}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 8080}]}]}
status: {podIP: 10.244.1.5}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lockdown, namespace: app}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lan, namespace: app}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 192.168.2.0/24}}]
    ports: [{port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: exporter-n1, namespace: monitoring}
spec: {nodeName: n1, hostNetwork: true, containers: [{name: c, ports: [{containerPort: 9100}]}]}
status: {podIP: 192.168.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: exporter-n2, namespace: monitoring}
spec: {nodeName: n2, hostNetwork: true, containers: [{name: c, ports: [{containerPort: 9100}]}]}
status: {podIP: 192.168.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: exporter-n3, namespace: monitoring}
spec: {nodeName: n3, hostNetwork: true}
status: {podIP: 192.168.2.12}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: monitoring-lockdown, namespace: monitoring}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
";

#[test]
fn own_node_traffic_is_always_allowed() {
    let mut m = model(NODES, IpBlockReading::Calico);
    let e = expect(&mut m, "192.168.1.10", "10.244.1.5", 8080, "allow");
    assert_eq!(e.ingress.by, "own-node");
    assert_eq!(e.src_peer.kind, "node");
    expect(&mut m, "192.168.1.11", "10.244.1.5", 8080, "deny");
    let e = expect(&mut m, "10.244.1.5", "192.168.1.10", 10250, "allow");
    assert_eq!(e.egress.by, "own-node");
    let e = expect(&mut m, "10.244.1.5", "192.168.1.11", 10250, "deny");
    assert_eq!(e.egress.by, "default-deny");
    assert_eq!(e.egress.isolated_by, vec!["NetworkPolicy app/lockdown"]);
}

#[test]
fn host_network_pods_are_their_node() {
    let mut m = model(NODES, IpBlockReading::Calico);
    // Policies selecting hostNetwork pods do not apply: the address is the node's.
    let e = expect(&mut m, "203.0.113.9", "192.168.1.11", 9100, "allow");
    assert_eq!(e.ingress.by, "not-a-pod");
    assert_eq!(e.dst_peer.kind, "node");
    // A hostNetwork pod whose Node object is missing is still a node, on its own node n3,
    // matched by the ipBlock in the Calico reading.
    let e = expect(&mut m, "192.168.2.12", "10.244.1.5", 8080, "allow");
    assert_eq!(e.src_peer.kind, "node");
    assert!(
        e.reason.contains("NetworkPolicy app/lan ingress[0]"),
        "{}",
        e.reason
    );
    // In Cilium's reading a CIDR rule never matches a node.
    let mut m = model(NODES, IpBlockReading::Cilium);
    expect(&mut m, "192.168.2.12", "10.244.1.5", 8080, "deny");
    // ... but its own node still may.
    expect(&mut m, "192.168.1.10", "10.244.1.5", 8080, "allow");
}

#[test]
fn ipblock_reading_switch_for_pods() {
    let yaml = r"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x}
status: {podIP: 10.244.0.11}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: by-cidr, namespace: x}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16}}]}]
";
    let mut calico = model(yaml, IpBlockReading::Calico);
    expect(&mut calico, "10.244.0.10", "10.244.0.11", 80, "allow");
    expect(&mut calico, "10.244.9.9", "10.244.0.11", 80, "allow");
    let mut cilium = model(yaml, IpBlockReading::Cilium);
    expect(&mut cilium, "10.244.0.10", "10.244.0.11", 80, "deny");
    // An address no pod or node has is still matched.
    expect(&mut cilium, "10.244.9.9", "10.244.0.11", 80, "allow");
}

#[test]
fn policy_types_defaulting() {
    let yaml = r"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
status: {podIP: 10.0.1.2}
---
# No policyTypes and egress rules: Ingress and Egress.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-dns-only, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  egress: [{ports: [{port: 53, protocol: UDP}]}]
---
# policyTypes [Ingress] with egress rules: the egress rules are ignored, egress stays open.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-ingress-only, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress: [{ports: [{port: 80, endPort: 90}]}]
  egress: [{ports: [{port: 1}]}]
";
    let mut m = model(yaml, IpBlockReading::Calico);
    let e = judge(&mut m, "10.0.1.1", "203.0.113.5", "UDP", 53);
    assert_eq!(e.verdict, "allow", "{}", e.reason);
    expect(&mut m, "10.0.1.1", "203.0.113.5", 53, "deny");
    // a is isolated for ingress too, with no ingress rule.
    expect(&mut m, "10.0.1.2", "10.0.1.1", 53, "deny");
    // b: ingress 80-90 from anyone (endPort), egress not isolated.
    expect(&mut m, "203.0.113.5", "10.0.1.2", 90, "allow");
    expect(&mut m, "203.0.113.5", "10.0.1.2", 91, "deny");
    let e = expect(&mut m, "10.0.1.2", "203.0.113.5", 443, "allow");
    assert_eq!(e.egress.by, "not-isolated");
    // Ports given means other protocols (ICMP) are not allowed.
    let e = judge(&mut m, "203.0.113.5", "10.0.1.2", "ICMP", 0);
    assert_eq!(e.verdict, "deny", "{}", e.reason);
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
status: {podIP: 10.0.2.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}}
status: {podIP: 10.0.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: shop, labels: {app: api}}
status: {podIP: 10.0.3.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api-3, namespace: shop, labels: {app: api, broken: "yes"}}
status: {podIP: 10.0.3.3}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.0.21
  ports: [{name: grpc, port: 9000, targetPort: 50051}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-abcde, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: grpc, port: 50051, protocol: TCP}]
endpoints:
- {addresses: [10.0.3.1], conditions: {ready: true}}
- {addresses: [10.0.3.2]}
- {addresses: [10.0.3.3], conditions: {ready: false}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-isolate, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-open, namespace: shop}
spec:
  podSelector:
    matchLabels: {app: api}
    matchExpressions: [{key: broken, operator: DoesNotExist}]
  ingress: [{ports: [{port: 50051}]}]
"#;

#[test]
fn services_are_judged_on_every_ready_endpoint() {
    let mut m = model(SERVICES, IpBlockReading::Calico);
    // Named target port: web-1 serves on 8080 (allowed), web-2 on 9090 (not).
    expect(&mut m, "10.0.2.9", "10.0.2.1", 8080, "allow");
    let e = expect(&mut m, "10.0.2.9", "10.96.0.20", 80, "deny");
    let service = e
        .service
        .as_ref()
        .unwrap_or_else(|| panic!("no service in {e:?}"));
    assert_eq!(service.ready_endpoints, 2);
    assert_eq!(service.endpoint.as_deref(), Some("10.0.2.2:9090"));
    assert!(e.reason.contains("service shop/web"), "{}", e.reason);
    assert_eq!(e.dst_peer.kind, "service");
    // A policy by port name resolves on each endpoint: both are allowed now.
    let mut fixed = model(
        &SERVICES.replace("ports: [{port: 8080}]", "ports: [{port: http}]"),
        IpBlockReading::Calico,
    );
    let e = expect(&mut fixed, "10.0.2.9", "10.96.0.20", 80, "allow");
    assert!(e.reason.contains("every one is allowed"), "{}", e.reason);
    // No such Service port.
    let e = expect(&mut m, "10.0.2.9", "10.96.0.20", 81, "deny");
    assert!(e.reason.contains("has no port TCP/81"), "{}", e.reason);
    // EndpointSlices: the not-ready api-3 (which the policy would refuse) is not a candidate;
    // the endpoint without conditions counts as ready.
    let e = expect(&mut m, "10.0.2.9", "10.96.0.21", 9000, "allow");
    assert_eq!(e.service.map(|s| s.ready_endpoints), Some(2));
    expect(&mut m, "10.0.2.9", "10.0.3.3", 50051, "deny");
}

#[test]
fn incremental_updates_change_verdicts() {
    let mut m = model(SHOP, IpBlockReading::Calico);
    expect(&mut m, "10.0.0.2", "10.0.0.1", 80, "deny");
    // b's tier changes from back to front: now allowed.
    let mut b = auditor::inventory::Pod {
        namespace: "shop".to_owned(),
        name: "b".to_owned(),
        labels: [("app", "web"), ("tier", "front")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        workload: auditor::inventory::Workload {
            kind: "Pod".to_owned(),
            name: "b".to_owned(),
        },
        node: None,
        host_network: false,
        ips: vec!["10.0.0.2".parse().unwrap_or_else(|_| panic!("ip"))],
        ports: Vec::new(),
    };
    m.upsert_pod(b.clone());
    expect(&mut m, "10.0.0.2", "10.0.0.1", 80, "allow");
    b.labels.insert("tier".to_owned(), "back".to_owned());
    m.upsert_pod(b);
    expect(&mut m, "10.0.0.2", "10.0.0.1", 80, "deny");
    // Deleting the policy opens everything; deleting the pod makes its address world.
    m.remove_policy(&PolicyKey {
        kind: PolicyKind::NetworkPolicy,
        namespace: "shop".to_owned(),
        name: "web-from-front".to_owned(),
    });
    let e = expect(&mut m, "10.0.0.2", "10.0.0.1", 80, "allow");
    assert_eq!(e.ingress.by, "not-isolated");
    m.remove_pod(&auditor::vocab::ObjectKey::new("shop", "b"));
    let e = expect(&mut m, "10.0.0.2", "10.0.0.1", 80, "allow");
    assert_eq!(e.src_peer.kind, "world");
}

fn homelab() -> Cluster {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calico-homelab");
    let model = check::build_model(&[dir], None, &Config::default())
        .unwrap_or_else(|e| panic!("homelab fixture: {e}"));
    assert_eq!(model.policy_count(), 5, "the seed has five policies");
    model
}

const PROMETHEUS: &str = "10.244.1.20";
const VELERO: &str = "10.244.2.80";

#[test]
fn calico_homelab_intended_paths() {
    let mut m = homelab();
    for (dst, port) in [
        ("10.244.2.80", 8085),
        ("10.244.1.60", 3100),
        ("10.244.2.40", 4566),
        ("10.244.1.50", 9130),
        ("10.244.1.70", 8080),
    ] {
        expect(&mut m, PROMETHEUS, dst, port, "allow");
    }
    // Velero to LocalStack S3, Backblaze B2, UniFi controller from unipoller.
    expect(&mut m, VELERO, "10.244.2.40", 4566, "allow");
    expect(&mut m, VELERO, "203.0.113.7", 443, "allow");
    expect(&mut m, "10.244.1.50", "10.0.1.1", 8443, "allow");
    expect(&mut m, "10.244.1.50", "10.0.1.2", 443, "deny");
    // DNS to CoreDNS.
    let e = judge(&mut m, VELERO, "10.244.1.2", "UDP", 53);
    assert_eq!(e.verdict, "allow", "{}", e.reason);
    // Promtail ships logs to Loki inside its namespace; Loki alerts Alertmanager.
    expect(&mut m, "10.244.2.62", "10.244.1.60", 3100, "allow");
    expect(&mut m, "10.244.1.60", "10.244.2.21", 9093, "allow");
    // Things the policies refuse.
    expect(&mut m, "10.244.1.90", "10.244.2.80", 8085, "deny");
    expect(&mut m, VELERO, "10.244.1.60", 3100, "deny");
}

#[test]
fn calico_homelab_gaps() {
    let mut m = homelab();
    // The DNS rule lists namespaceSelector and podSelector as two peers: any pod of kube-system
    // is reachable on port 53, not just kube-dns.
    let e = judge(&mut m, VELERO, "10.244.2.3", "UDP", 53);
    assert_eq!(e.verdict, "allow", "{}", e.reason);
    let rule = e
        .egress
        .rule
        .as_ref()
        .unwrap_or_else(|| panic!("no rule: {}", e.reason));
    assert_eq!(
        (rule.policy_name.as_str(), rule.rule.as_str()),
        ("velero-network-policy", "egress[0]")
    );
    // 10.96.0.1/32 never matches the API server once the Service is translated to
    // 192.168.1.10:6443, and the registry rule excludes 192.168.0.0/16.
    let e = expect(&mut m, VELERO, "10.96.0.1", 443, "deny");
    assert!(
        e.reason.contains("service default/kubernetes"),
        "{}",
        e.reason
    );
    assert_eq!(e.egress.by, "default-deny");
    assert_eq!(
        e.service.as_ref().and_then(|s| s.endpoint.as_deref()),
        Some("192.168.1.10:6443")
    );
    // Straight to the API server's address is refused too (only 443 is listed).
    expect(&mut m, VELERO, "192.168.1.10", 6443, "deny");
    // Loki's egress allows 9095 and 7946 to Loki, its own ingress refuses them.
    for port in [9095, 7946] {
        let e = expect(&mut m, "10.244.1.60", "10.244.2.61", port, "deny");
        assert_eq!(e.egress.decision, "allow", "{}", e.reason);
        assert_eq!(e.ingress.by, "default-deny", "{}", e.reason);
    }
}
