//! `CiliumNetworkPolicy` and `CiliumClusterwideNetworkPolicy` end to end through the `auditor check`
//! binary: every entity, deny precedence across CNP, CCNP and `NetworkPolicy`, enableDefaultDeny,
//! toPorts, CIDR sets, selector scoping, unjudgeable rules, the seed's homelab cluster, bad input.
//!
//! Each case is a policy file plus a JSON Lines flow file whose lines carry the expectation next
//! to the flow (`expect`, and optionally `reason_has`, `reason_not`, `unjudged_has`): `check`
//! ignores keys it does not know, so the same file is both input and answer key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn run_check(
    cluster: &[PathBuf],
    policies: Option<&Path>,
    config: Option<&Path>,
    flows: &Path,
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_auditor"));
    cmd.arg("check");
    for path in cluster {
        cmd.arg("--cluster").arg(path);
    }
    if let Some(policies) = policies {
        cmd.arg("--policies").arg(policies);
    }
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.arg("--flows").arg(flows);
    match cmd.output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run {}: {e}", env!("CARGO_BIN_EXE_auditor")),
    }
}

/// Runs the flows of `flows` and compares every answer with the expectation on its line.
fn expect_verdicts(output: &Output, flows: &Path) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "auditor check failed ({}): {stderr}",
        output.status
    );
    let input = match std::fs::read_to_string(flows) {
        Ok(text) => text,
        Err(e) => panic!("cannot read {}: {e}", flows.display()),
    };
    let inputs: Vec<(usize, serde_json::Value)> = input
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| match serde_json::from_str(line) {
            Ok(value) => (i + 1, value),
            Err(e) => panic!("{}:{}: not JSON: {e}", flows.display(), i + 1),
        })
        .collect();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answers: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| match serde_json::from_str(line) {
            Ok(value) => value,
            Err(e) => panic!("output line is not JSON ({e}): {line}"),
        })
        .collect();
    assert_eq!(
        answers.len(),
        inputs.len(),
        "one answer per flow expected; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let mut failures = Vec::new();
    for ((line, flow), answer) in inputs.iter().zip(&answers) {
        let text = |v: &serde_json::Value, key: &str| {
            v.get(key).and_then(|x| x.as_str()).map(str::to_owned)
        };
        let expected = text(flow, "expect").unwrap_or_default();
        let verdict = text(answer, "verdict").unwrap_or_default();
        let reason = text(answer, "reason").unwrap_or_default();
        let why = text(flow, "why").unwrap_or_default();
        let mut problems = Vec::new();
        if verdict != expected {
            problems.push(format!("verdict {verdict}, expected {expected}"));
        }
        if let Some(needle) = text(flow, "reason_has")
            && !reason.contains(&needle)
        {
            problems.push(format!("reason lacks {needle:?}"));
        }
        if let Some(needle) = text(flow, "reason_not")
            && reason.contains(&needle)
        {
            problems.push(format!("reason should not contain {needle:?}"));
        }
        if let Some(rule) = text(flow, "unjudged_has") {
            let named = answer
                .get("unjudged")
                .and_then(|u| u.as_array())
                .is_some_and(|list| {
                    list.iter()
                        .any(|r| r.get("rule").and_then(|x| x.as_str()) == Some(rule.as_str()))
                });
            if !named {
                problems.push(format!("unjudged rules do not name {rule:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}:{line} ({why}): {}\n    reason: {reason}",
                flows.display(),
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} flows disagree:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

/// A case of the shared two-node cluster `cilium-base` with the case's own policies.
fn base_case(case: &str) {
    let base = fixtures().join("cilium-base");
    let dir = fixtures().join(case);
    let flows = dir.join("flows.jsonl");
    let output = run_check(
        &[base.join("cluster.yaml")],
        Some(&dir.join("policies.yaml")),
        Some(&base.join("config.yaml")),
        &flows,
    );
    expect_verdicts(&output, &flows);
}

#[test]
fn every_entity_matches_what_cilium_means_by_it() {
    base_case("cilium-entities");
}

#[test]
fn deny_beats_every_allow_across_cnp_ccnp_and_networkpolicy() {
    base_case("cilium-deny");
}

#[test]
fn enable_default_deny_isolates_when_any_policy_asks() {
    base_case("cilium-default-deny");
}

#[test]
fn to_ports_named_ports_any_ranges_and_icmp() {
    base_case("cilium-ports");
}

#[test]
fn cidr_sets_with_except_and_never_pods_or_nodes() {
    base_case("cilium-cidr");
}

#[test]
fn selectors_are_scoped_like_cilium_scopes_them() {
    base_case("cilium-selectors");
}

#[test]
fn host_policies_are_named_on_node_flows() {
    base_case("cilium-host");
}

#[test]
fn unjudgeable_rules_are_named_not_guessed() {
    base_case("cilium-unjudgeable");
}

/// The homelab cluster of seed `000_*`: per-namespace default deny from world, gateway
/// (`ingress` entity), internal and monitoring allows, kyverno's webhooks, openclaw's egress.
/// Its policies live in the cluster snapshot itself, as `kubectl get -A -o yaml` would give them.
#[test]
fn homelab_seed_cluster() {
    let dir = fixtures().join("cilium-homelab");
    let flows = dir.join("flows.jsonl");
    let output = run_check(
        &[dir.join("cluster.yaml"), dir.join("policies")],
        None,
        Some(&dir.join("config.yaml")),
        &flows,
    );
    expect_verdicts(&output, &flows);
}

/// Each bad policy must give exit 2, nothing on stdout, and a message naming the file and the
/// line or object plus what is wrong.
#[test]
fn bad_cilium_policies_are_rejected_with_where_and_why() {
    let base = fixtures().join("cilium-base");
    let bad = fixtures().join("cilium-bad");
    let flows = fixtures().join("cilium-deny/flows.jsonl");
    let cases: &[(&str, &[&str])] = &[
        ("wrong-type.yaml", &["wrong-type.yaml:", "fromEndpoints"]),
        ("unknown-entity.yaml", &["unknown-entity.yaml:", "wrld"]),
        (
            "misspelt-field.yaml",
            &["misspelt-field.yaml:", "fromEndpoint"],
        ),
        (
            "except-outside.yaml",
            &[
                "except-outside.yaml:",
                "app/bad-except",
                "except[0]",
                "198.51.100.0/25",
            ],
        ),
        (
            "bad-port-name.yaml",
            &[
                "bad-port-name.yaml:",
                "app/bad-port",
                "ports[0].port",
                "http_alt",
            ],
        ),
        (
            "node-selector-in-cnp.yaml",
            &["node-selector-in-cnp.yaml:", "nodeSelector"],
        ),
        (
            "no-selector.yaml",
            &["no-selector.yaml:", "endpointSelector"],
        ),
        (
            "wrong-type-json.json",
            &[
                "wrong-type-json.json:",
                "items[0]",
                "json-bad",
                "ports[0].endPort",
            ],
        ),
        (
            "l7-in-deny.yaml",
            &["l7-in-deny.yaml:", "ingressDeny[0].toPorts[0]"],
        ),
    ];
    let mut failures = Vec::new();
    for (file, needles) in cases {
        let output = run_check(
            &[base.join("cluster.yaml")],
            Some(&bad.join(file)),
            Some(&base.join("config.yaml")),
            &flows,
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() != Some(2) {
            failures.push(format!(
                "{file}: exit {:?}, expected 2; stderr: {stderr}",
                output.status.code()
            ));
            continue;
        }
        if !output.stdout.is_empty() {
            failures.push(format!("{file}: printed verdicts despite the error"));
        }
        for needle in *needles {
            if !stderr.contains(needle) {
                failures.push(format!("{file}: message lacks {needle:?}: {stderr}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn flow(src: &str, dst: &str, port: u16) -> auditor::audit::FlowQuery {
    let ip = |text: &str| match text.parse() {
        Ok(ip) => ip,
        Err(e) => panic!("{text}: {e}"),
    };
    auditor::audit::FlowQuery {
        src: ip(src),
        dst: ip(dst),
        protocol: auditor::vocab::Protocol::Tcp,
        port,
    }
}

/// The model as the daemon drives it: Cilium policies changed and deleted, a pod relabelled,
/// each applied incrementally and reflected in the next verdict.
#[test]
fn cilium_policy_and_label_changes_apply_incrementally() {
    use auditor::policy::cilium::{self, CiliumPolicy};
    use auditor::policy::ir::{PolicyKey, PolicyKind};

    let base = fixtures().join("cilium-base");
    let config = match auditor::config::Config::from_file(&base.join("config.yaml")) {
        Ok(config) => config,
        Err(e) => panic!("config: {e}"),
    };
    let policies = fixtures().join("cilium-deny/policies.yaml");
    let mut model =
        match auditor::check::build_model(&[base.join("cluster.yaml")], Some(&policies), &config) {
            Ok(built) => built,
            Err(e) => panic!("model: {e}"),
        };
    let client_to_web = flow("10.42.0.11", "10.42.0.10", 8080);
    let client_to_metrics = flow("10.42.0.11", "10.42.0.10", 9100);
    assert!(
        !model.verdict(&client_to_web).allowed,
        "web-deny-client refuses 8080"
    );
    assert!(
        model.verdict(&client_to_metrics).allowed,
        "9100 is allowed by the NetworkPolicy"
    );

    // Change the deny to port 9100.
    let changed: CiliumPolicy = match serde_yaml_ng::from_str(
        r"
metadata: {name: web-deny-client, namespace: app}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: metrics}]}]
",
    ) {
        Ok(policy) => policy,
        Err(e) => panic!("policy: {e}"),
    };
    match cilium::compile(PolicyKind::CiliumNetworkPolicy, &changed) {
        Ok(compiled) => model.upsert_policy(compiled),
        Err(e) => panic!("compile: {e}"),
    }
    assert!(
        model.verdict(&client_to_web).allowed,
        "the deny moved away from 8080"
    );
    assert!(
        !model.verdict(&client_to_metrics).allowed,
        "the deny now names metrics"
    );

    // Relabel app/client: the deny's fromEndpoints no longer selects it.
    let Some(mut client) = model
        .inventory()
        .pods_in_namespace("app")
        .find(|(_, pod)| pod.name == "client")
        .map(|(_, pod)| pod.clone())
    else {
        panic!("app/client is missing from the inventory");
    };
    client.labels.insert("app".to_owned(), "batch".to_owned());
    model.upsert_pod(client);
    assert!(
        model.verdict(&client_to_metrics).allowed,
        "relabelled client is not denied"
    );

    // Delete the clusterwide deny: tools/probe reaches web again.
    let probe_to_web = flow("10.42.1.22", "10.42.0.10", 8080);
    assert!(
        !model.verdict(&probe_to_web).allowed,
        "deny-from-tools refuses probe"
    );
    model.remove_policy(&PolicyKey {
        kind: PolicyKind::CiliumClusterwideNetworkPolicy,
        namespace: String::new(),
        name: "deny-from-tools".to_owned(),
    });
    assert!(model.verdict(&probe_to_web).allowed, "the CCNP is gone");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

    /// Any policy the types accept compiles or fails with an error naming a field under `spec`;
    /// nothing panics, whatever the ports, CIDRs, selectors and entities say.
    #[test]
    fn compiling_arbitrary_cilium_policies_never_panics(
        clusterwide in proptest::bool::ANY,
        selector_key in "(k8s:|any:|reserved:|container:|\\$)?[a-z.]{0,12}(namespace)?",
        selector_value in "[a-z0-9]{0,6}",
        operator in proptest::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
        values in proptest::collection::vec("[a-z]{0,4}", 0..3),
        entity in proptest::sample::select(vec![
            "all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "remote-node",
            "kube-apiserver", "ingress", "health", "init", "unmanaged", "none",
        ]),
        cidr in "([0-9]{1,3}\\.){3}[0-9]{1,3}(/[0-9]{1,2})?|[0-9a-f:]{2,12}(/[0-9]{1,3})?",
        except in "([0-9]{1,3}\\.){3}[0-9]{1,3}/[0-9]{1,2}",
        port in "[0-9]{0,6}|[a-zA-Z_-]{0,16}",
        end_port in proptest::option::of(-5i32..70_000),
        protocol in proptest::sample::select(vec!["TCP", "udp", "SCTP", "ANY", "ICMP", "IGMP", "", "QUIC"]),
        icmp_type in "[0-9]{1,3}|EchoRequest|EchoReply|Pong",
        family in proptest::sample::select(vec!["IPv4", "IPv6", "", "IPX"]),
        default_deny in proptest::option::of(proptest::bool::ANY),
        node_selector in proptest::bool::ANY,
    ) {
        use auditor::policy::cilium::{self, CiliumPolicy};
        use auditor::policy::ir::PolicyKind;

        let selector = serde_json::json!({
            "matchLabels": {selector_key.clone(): selector_value},
            "matchExpressions": [{"key": selector_key, "operator": operator, "values": values}],
        });
        let mut rule = serde_json::json!({
            "ingress": [
                {"fromEndpoints": [selector.clone()], "fromEntities": [entity],
                 "toPorts": [{"ports": [{"port": port, "endPort": end_port, "protocol": protocol}]}]},
                {"fromCIDRSet": [{"cidr": cidr, "except": [except]}], "fromCIDR": [cidr],
                 "icmps": [{"fields": [{"type": icmp_type, "family": family}]}]},
            ],
            "egressDeny": [{"toEndpoints": [selector.clone()], "toEntities": [entity]}],
        });
        if let Some(flag) = default_deny {
            rule["enableDefaultDeny"] = serde_json::json!({"ingress": flag, "egress": !flag});
        }
        let subject = if node_selector { "nodeSelector" } else { "endpointSelector" };
        rule[subject] = selector;
        let object = serde_json::json!({
            "metadata": {"name": "p", "namespace": "app"},
            "specs": [rule],
        });
        // Numbers where strings belong are type errors; those are the loader's to report.
        let Ok(policy) = serde_json::from_value::<CiliumPolicy>(object) else {
            return Ok(());
        };
        let kind = if clusterwide {
            PolicyKind::CiliumClusterwideNetworkPolicy
        } else {
            PolicyKind::CiliumNetworkPolicy
        };
        if let Err(e) = cilium::compile(kind, &policy) {
            proptest::prop_assert!(e.field.starts_with("specs[0]"), "{e}");
            proptest::prop_assert!(!e.reason.is_empty());
        }
    }
}
