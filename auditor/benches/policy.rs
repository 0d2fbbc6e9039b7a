//! Policy model benchmark (`cargo bench -p auditor --bench policy`): a deterministic synthetic
//! cluster of 200 namespaces, 10,000 pods, 2,000 policies (`NetworkPolicy` and
//! `CiliumNetworkPolicy`) and 100 Services; measures the build, incremental updates, and verdicts
//! per second on one core, cold (distinct flows, empty cache) and warm (repeated flows). Times
//! are the thread's CPU time, so other work on the machine does not skew them.
#![expect(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "figures printed for people: a float rounded in its 16th digit, or a count far below 2^52, does not change them; synthetic indices are drawn below the width they are cast to"
)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use auditor::audit::{Cluster, ClusterConfig, FlowQuery as Flow};
use auditor::inventory::{self, k8s};
use auditor::policy::cilium::{self, CiliumPolicy};
use auditor::policy::ir::{CompiledPolicy, PolicyKind};
use auditor::policy::netpol;
use auditor::vocab::Protocol;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as networking;
use serde_json::json;

const NAMESPACES: usize = 200;
const PODS: usize = 10_000;
const POLICIES_PER_NAMESPACE: usize = 10;
const SERVICES: usize = 100;
const NODES: usize = 20;
const FLOWS: usize = 100_000;
const WARM_PASSES: usize = 20;
const UPDATES: usize = 50;

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("synthetic object: {e}"))
}

fn ns_name(i: usize) -> String {
    format!("ns-{i:03}")
}

fn pod_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or_else(|_| panic!("pod index"));
    Ipv4Addr::from(0x0a00_0000 + 0x100 + i)
}

struct Objects {
    namespaces: Vec<core::Namespace>,
    nodes: Vec<core::Node>,
    pods: Vec<core::Pod>,
    services: Vec<core::Service>,
    netpols: Vec<networking::NetworkPolicy>,
    cnps: Vec<CiliumPolicy>,
}

fn pod_object(i: usize, app_override: Option<&str>) -> core::Pod {
    let ns = i % NAMESPACES;
    let app = app_override.map_or_else(|| format!("app-{}", (i / NAMESPACES) % 5), str::to_owned);
    let tier = ["web", "api", "db"][(i / NAMESPACES) % 3];
    from_json(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("pod-{i}"), "namespace": ns_name(ns),
            "labels": {"app": app, "tier": tier, "version": if i.is_multiple_of(2) { "v1" } else { "v2" },
                       "pod-template-hash": "abc12"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{app}-abc12"), "uid": "u", "controller": true}]
        },
        "spec": {"nodeName": format!("node-{}", i % NODES), "containers": [{"name": "c",
            "ports": [{"name": "http", "containerPort": 8080},
                      {"name": "metrics", "containerPort": 9090},
                      {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
        "status": {"podIP": pod_ip(i).to_string()}
    }))
}

fn netpol_object(ns: usize, k: usize, variant: usize) -> networking::NetworkPolicy {
    let name = format!("np-{k}-v{variant}");
    let namespace = ns_name(ns);
    let spec = match k {
        0 => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        1 => json!({"podSelector": {"matchLabels": {"app": "app-0"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "app-1"}}}],
                         "ports": [{"port": 8080 + variant}]}]}),
        2 => json!({"podSelector": {"matchLabels": {"tier": "api"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", ns % 10)}}}],
                         "ports": [{"port": "http"}]}]}),
        3 => json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-000"}},
                                   "podSelector": {"matchLabels": {"app": "app-4"}}}],
                         "ports": [{"port": "metrics"}]}]}),
        4 => json!({"podSelector": {"matchLabels": {"app": "app-2"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                        "ports": [{"port": 443}]},
                       {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-001"}}}],
                        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}]}]}),
        _ => json!({"podSelector": {"matchExpressions": [
                {"key": "version", "operator": "NotIn", "values": ["v0"]},
                {"key": "tier", "operator": "Exists"}]},
            "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                            {"key": "canary", "operator": "DoesNotExist"}]}}],
                         "ports": [{"port": 30000, "endPort": 30100 + variant}]}]}),
    };
    from_json(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec
    }))
}

fn cnp_object(ns: usize, k: usize, variant: usize) -> CiliumPolicy {
    let spec = match k {
        7 => json!({"endpointSelector": {"matchLabels": {"app": "app-3"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "app-3"}}],
                         "toPorts": [{"ports": [{"port": (8080 + variant).to_string(), "protocol": "TCP"}]}]}]}),
        8 => json!({"endpointSelector": {"matchLabels": {"app": "app-4"}},
            "ingress": [{"fromEntities": ["cluster"],
                         "toPorts": [{"ports": [{"port": "9090", "protocol": "ANY"}]}]}]}),
        _ => json!({"endpointSelector": {},
            "ingressDeny": [{"fromCIDRSet": [{"cidr": "203.0.113.0/24"}]}],
            "egress": [{"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": ns_name((ns + 1) % NAMESPACES)}}],
                        "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]},
                       {"toEntities": ["kube-apiserver", "world"]}]}),
    };
    from_json(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": format!("cnp-{k}-v{variant}"), "namespace": ns_name(ns)},
        "spec": spec
    }))
}

fn synthesise() -> Objects {
    let namespaces = (0..NAMESPACES)
        .map(|i| {
            from_json(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": ns_name(i),
                "labels": {"team": format!("team-{}", i % 10), "env": if i.is_multiple_of(3) { "prod" } else { "dev" }}}}))
        })
        .collect();
    let nodes = (0..NODES)
        .map(|i| {
            from_json(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{i}")},
                "spec": {"podCIDR": format!("10.{}.0.0/16", 100 + i)},
                "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.0.{}", 10 + i)}]}}))
        })
        .collect();
    let pods = (0..PODS).map(|i| pod_object(i, None)).collect();
    let services = (0..SERVICES)
        .map(|i| {
            from_json(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": ns_name(i)},
                "spec": {"clusterIP": format!("10.96.0.{}", 10 + i), "selector": {"app": "app-0"},
                         "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))
        })
        .collect();
    let mut netpols = Vec::new();
    let mut cnps = Vec::new();
    for ns in 0..NAMESPACES {
        for k in 0..POLICIES_PER_NAMESPACE {
            if k < 7 {
                netpols.push(netpol_object(ns, k, 0));
            } else {
                cnps.push(cnp_object(ns, k, 0));
            }
        }
    }
    Objects {
        namespaces,
        nodes,
        pods,
        services,
        netpols,
        cnps,
    }
}

fn compile_all(objects: &Objects) -> Vec<CompiledPolicy> {
    let mut out = Vec::with_capacity(objects.netpols.len() + objects.cnps.len());
    for p in &objects.netpols {
        out.push(netpol::compile(p).unwrap_or_else(|e| panic!("netpol: {e}")));
    }
    for p in &objects.cnps {
        out.push(
            cilium::compile(PolicyKind::CiliumNetworkPolicy, p)
                .unwrap_or_else(|e| panic!("cnp: {e}")),
        );
    }
    out
}

fn build(objects: &Objects) -> Cluster {
    let mut model = Cluster::new(ClusterConfig::default());
    for o in &objects.namespaces {
        model.upsert_namespace(k8s::namespace(o).unwrap_or_else(|e| panic!("{e}")));
    }
    for o in &objects.nodes {
        model.upsert_node(k8s::node(o).unwrap_or_else(|e| panic!("{e}")));
    }
    for o in &objects.pods {
        model.upsert_pod(k8s::pod(o).unwrap_or_else(|e| panic!("{e}")));
    }
    for o in &objects.services {
        model.upsert_service(k8s::service(o).unwrap_or_else(|e| panic!("{e}")));
    }
    for p in compile_all(objects) {
        model.upsert_policy(p);
    }
    model
}

fn flows() -> Vec<Flow> {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(FLOWS);
    while out.len() < FLOWS {
        let src = IpAddr::V4(pod_ip(rng.below(PODS)));
        let dst = match rng.below(10) {
            0 => IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10 + rng.below(SERVICES) as u8)),
            1 => IpAddr::V4(Ipv4Addr::new(203, 0, 113, rng.below(256) as u8)),
            _ => IpAddr::V4(pod_ip(rng.below(PODS))),
        };
        let (protocol, port) = match rng.below(8) {
            0 => (Protocol::Udp, 53),
            1 => (Protocol::Tcp, 80),
            2 => (Protocol::Tcp, 9090),
            3 => (Protocol::Tcp, 443),
            4 => (Protocol::Tcp, 30000 + rng.below(200) as u16),
            _ => (Protocol::Tcp, 8080),
        };
        let flow = Flow {
            src,
            dst,
            protocol,
            port,
        };
        if seen.insert(flow) {
            out.push(flow);
        }
    }
    out
}

/// CPU time of this thread: the figures are per core, and the machine may be busy with other
/// work (wall time is printed beside it).
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert!(rc == 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Times `f` in thread CPU time and wall time.
fn per_second(n: usize, elapsed: Duration) -> u64 {
    (n as f64 / elapsed.as_secs_f64()) as u64
}

fn main() {
    let objects = synthesise();
    println!(
        "cluster: {} namespaces, {} pods, {} policies ({} NetworkPolicy, {} CiliumNetworkPolicy), {} services",
        objects.namespaces.len(),
        objects.pods.len(),
        objects.netpols.len() + objects.cnps.len(),
        objects.netpols.len(),
        objects.cnps.len(),
        objects.services.len()
    );

    // Build: best of three, each from the deserialised objects (conversion, compilation,
    // indexing), as the daemon does after its initial list.
    let mut build_time = Duration::MAX;
    let mut model = None;
    for _ in 0..3 {
        let t = cpu_now();
        let m = build(&objects);
        build_time = build_time.min(cpu_now().saturating_sub(t));
        model = Some(black_box(m));
    }
    let Some(mut model) = model else {
        panic!("no model was built")
    };
    println!("build: {:.1} ms", build_time.as_secs_f64() * 1e3);

    // Incremental updates: a pod's labels change (it moves to another identity and back), and
    // a policy changes (its port moves), each timed alone.
    let mut pod_total = Duration::ZERO;
    for n in 0..UPDATES {
        let i = (n * 197) % PODS;
        let changed = k8s::pod(&pod_object(i, Some(&format!("moved-{}", n % 3))))
            .unwrap_or_else(|e| panic!("{e}"));
        let t = cpu_now();
        model.upsert_pod(changed);
        pod_total += cpu_now().saturating_sub(t);
        let back = k8s::pod(&objects.pods[i]).unwrap_or_else(|e| panic!("{e}"));
        model.upsert_pod(back);
    }
    let mut policy_total = Duration::ZERO;
    for n in 0..UPDATES {
        let ns = (n * 7) % NAMESPACES;
        let compiled = if n % 2 == 0 {
            netpol::compile(&netpol_object(ns, 1 + n % 6, 1 + n))
        } else {
            cilium::compile(
                PolicyKind::CiliumNetworkPolicy,
                &cnp_object(ns, 7 + n % 3, 1 + n),
            )
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let t = cpu_now();
        model.upsert_policy(compiled);
        policy_total += cpu_now().saturating_sub(t);
    }
    let pod_us = pod_total.as_secs_f64() * 1e6 / UPDATES as f64;
    let policy_us = policy_total.as_secs_f64() * 1e6 / UPDATES as f64;
    println!(
        "update: pod label change {pod_us:.1} us, policy change {policy_us:.1} us (mean of {UPDATES})"
    );
    let update_us = pod_us.max(policy_us);

    let flows = flows();
    // Cold: every flow distinct and the cache empty (an update clears it).
    model.upsert_namespace(inventory::Namespace {
        name: "bench-clear".to_owned(),
        labels: auditor::vocab::Labels::default(),
    });
    let mut allowed = 0usize;
    let (t, w) = (cpu_now(), Instant::now());
    for f in &flows {
        allowed += usize::from(model.verdict(black_box(f)).allowed);
    }
    let cold = cpu_now().saturating_sub(t);
    let cold_wall = w.elapsed();
    // Warm: the same flows again, answered from the cache.
    let (t, w) = (cpu_now(), Instant::now());
    for _ in 0..WARM_PASSES {
        for f in &flows {
            allowed += usize::from(model.verdict(black_box(f)).allowed);
        }
    }
    let warm = cpu_now().saturating_sub(t);
    let warm_wall = w.elapsed();
    // For reference: the engine alone, without the cache (every call computes).
    let t = cpu_now();
    for f in &flows {
        allowed += usize::from(model.judge(black_box(f)).allowed);
    }
    let uncached = cpu_now().saturating_sub(t);
    println!(
        "verdicts without the cache: {}/s",
        per_second(flows.len(), uncached)
    );
    let cold_rate = per_second(flows.len(), cold);
    println!(
        "wall clock (other load included): cold {}/s, warm {}/s",
        per_second(flows.len(), cold_wall),
        per_second(flows.len() * WARM_PASSES, warm_wall)
    );
    let warm_rate = per_second(flows.len() * WARM_PASSES, warm);
    println!(
        "verdicts: cold {cold_rate}/s over {} distinct flows ({:.1}% allowed), warm {warm_rate}/s over {} repeats",
        flows.len(),
        100.0 * allowed as f64 / (flows.len() * (2 + WARM_PASSES)) as f64,
        flows.len() * WARM_PASSES
    );
    println!(
        "policy: build_ms={} update_us={} verdicts_per_s_cold={cold_rate} verdicts_per_s_warm={warm_rate}",
        build_time.as_millis(),
        update_us.round() as u64
    );
}
