//! `auditor check` as a user runs it (the built binary): JSON Lines in and out in order, the
//! text table, `--policies`, `--config`, JSON and `List` input, and bad input: exit 2 with one
//! message naming the file and line or object, and nothing on stdout.

#[path = "common/tempdir.rs"]
mod tempdir;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tempdir::TempDir;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calico-homelab")
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_auditor"))
        .arg("check")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run auditor: {e}"));
    if let Some(mut pipe) = child.stdin.take() {
        // The process may exit before reading (bad cluster files): ignore a broken pipe.
        let _ = pipe.write_all(stdin.as_bytes());
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("auditor did not finish: {e}"));
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn path(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", p.display()))
}

#[track_caller]
fn expect_bad_input(run: &Run, needles: &[&str]) {
    assert_eq!(
        run.code,
        Some(2),
        "expected exit 2, got {:?}; stderr: {}",
        run.code,
        run.stderr
    );
    assert!(
        run.stdout.is_empty(),
        "bad input must print nothing on stdout, got: {}",
        run.stdout
    );
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "stderr should name {needle:?}: {}",
            run.stderr
        );
    }
    assert_eq!(
        run.stderr.trim().lines().count(),
        1,
        "one message: {}",
        run.stderr
    );
}

const FLOWS: &str = r#"{"src": "10.244.1.20", "dst": "10.244.2.80", "protocol": "TCP", "port": 8085, "note": "prometheus scrapes velero"}

{"src": "10.244.1.90", "dst": "10.244.2.80", "protocol": "tcp", "port": 8085}
{"src": "10.244.2.80", "dst": "10.96.0.1", "protocol": "TCP", "port": 443}
"#;

#[test]
fn jsonl_verdicts_in_input_order() {
    let dir = fixtures();
    let run = check(&["--cluster", path(&dir)], FLOWS);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let verdicts: Vec<&str> = lines
        .iter()
        .map(|l| l["verdict"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(verdicts, ["allow", "deny", "deny"], "{}", run.stdout);
    assert_eq!(lines[1]["src"], "10.244.1.90");
    assert_eq!(lines[1]["protocol"], "TCP");
    assert_eq!(lines[0]["dst_peer"]["namespace"], "velero");
    let reason = lines[2]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("service default/kubernetes"), "{reason}");
    assert!(
        reason.contains("NetworkPolicy velero/velero-network-policy"),
        "{reason}"
    );
}

#[test]
fn flows_from_a_file_and_the_text_table() {
    let tmp = TempDir::new("check-cli");
    let flows = tmp.write("flows.jsonl", FLOWS);
    let dir = fixtures();
    let run = check(
        &[
            "--cluster",
            path(&dir),
            "--flows",
            path(&flows),
            "--output",
            "text",
        ],
        "",
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", run.stdout);
    assert!(lines[0].starts_with("VERDICT"), "{}", lines[0]);
    assert!(lines[1].starts_with("ALLOW "), "{}", lines[1]);
    assert!(lines[1].contains("TCP/8085"), "{}", lines[1]);
    assert!(lines[2].starts_with("DENY "), "{}", lines[2]);
    // Columns line up: every row's second column starts where the header's does.
    let col = lines[0].find("FLOW").unwrap_or(0);
    assert!(
        lines
            .iter()
            .all(|l| l[col..].starts_with(|c: char| c.is_ascii_uppercase()))
    );
}

#[test]
fn policies_flag_replaces_the_cluster_policies() {
    let dir = fixtures();
    let cluster = dir.join("cluster.yaml");
    let flow = r#"{"src": "10.244.2.80", "dst": "10.244.1.60", "protocol": "TCP", "port": 3100}"#;
    // Without any policy velero may reach loki.
    let run = check(&["--cluster", path(&cluster)], flow);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert!(
        run.stdout.contains(r#""verdict":"allow""#),
        "{}",
        run.stdout
    );
    // The same cluster judged against the seed's policies (a GitOps source).
    let run = check(
        &[
            "--cluster",
            path(&cluster),
            "--policies",
            path(&dir.join("policies.yaml")),
        ],
        flow,
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert!(run.stdout.contains(r#""verdict":"deny""#), "{}", run.stdout);
    // --policies pointing at a directory without policies: the cluster's are ignored.
    let tmp = TempDir::new("check-cli");
    tmp.write("empty/readme.yaml", "kind: Kustomization\nresources: []\n");
    let run = check(
        &[
            "--cluster",
            path(&dir),
            "--policies",
            path(&tmp.0.join("empty")),
        ],
        flow,
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert!(
        run.stdout.contains(r#""verdict":"allow""#),
        "{}",
        run.stdout
    );
}

const POD_CIDR_CLUSTER: &str = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {"apiVersion": "v1", "kind": "Pod",
     "metadata": {"name": "a", "namespace": "x"}, "status": {"podIP": "10.244.0.10"}},
    {"apiVersion": "v1", "kind": "Pod",
     "metadata": {"name": "b", "namespace": "x"}, "status": {"podIP": "10.244.0.11"}},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ignored", "namespace": "x"}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
     "metadata": {"name": "by-cidr", "namespace": "x"},
     "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16"}}]}]}}
  ]
}
"#;

#[test]
fn json_list_input_and_the_config_file() {
    let tmp = TempDir::new("check-cli");
    let cluster = tmp.write("nested/dir/cluster.json", POD_CIDR_CLUSTER);
    let flow = r#"{"src": "10.244.0.10", "dst": "10.244.0.11", "protocol": "TCP", "port": 80}"#;
    // Directory recursion finds the JSON file; Calico's reading is the default.
    let run = check(&["--cluster", path(&tmp.0)], flow);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert!(
        run.stdout.contains(r#""verdict":"allow""#),
        "{}",
        run.stdout
    );
    let config = tmp.write(
        "config.yaml",
        "# Cilium cluster\nipBlockReading: cilium\nentities:\n  ingress: [10.0.0.0/24]\nanswerTimeout: 3s\n",
    );
    let run = check(
        &["--cluster", path(&cluster), "--config", path(&config)],
        flow,
    );
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert!(run.stdout.contains(r#""verdict":"deny""#), "{}", run.stdout);
    // A misspelt key is an error naming the file and line.
    let bad = tmp.write("bad-config.yaml", "entities:\n  ingres: [10.0.0.0/24]\n");
    let run = check(&["--cluster", path(&cluster), "--config", path(&bad)], flow);
    expect_bad_input(&run, &["bad-config.yaml:2", "ingres"]);
}

#[test]
fn malformed_yaml_names_file_and_line() {
    let tmp = TempDir::new("check-cli");
    let file = tmp.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n   namespace: bad-indent\n",
    );
    let run = check(&["--cluster", path(&file)], "");
    expect_bad_input(&run, &["broken.yaml:"]);
    // The error is in the second document (lines 5-9), not the first.
    let line: usize = run
        .stderr
        .split("broken.yaml:")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no line number in {}", run.stderr));
    assert!((5..=9).contains(&line), "line {line}: {}", run.stderr);
    let json = tmp.write("broken.json", "{\"kind\": \"Pod\",\n \"metadata\": {\n}\n");
    let run = check(&["--cluster", path(&json)], "");
    expect_bad_input(&run, &["broken.json:"]);
}

#[test]
fn wrong_field_type_names_the_object() {
    let tmp = TempDir::new("check-cli");
    let file = tmp.write(
        "policies.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - port: [80]\n",
    );
    let run = check(&["--cluster", path(&file)], "");
    expect_bad_input(
        &run,
        &["policies.yaml:14", "NetworkPolicy shop/web", "port"],
    );
    // A policy whose content is wrong beyond types (a bad CIDR) names the object and field.
    let file = tmp.write(
        "cidr.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ext, namespace: shop}\nspec:\n  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.300/8}}]}]\n",
    );
    let run = check(&["--cluster", path(&file)], "");
    expect_bad_input(
        &run,
        &[
            "cidr.yaml:1",
            "NetworkPolicy shop/ext",
            "spec.egress[0].to[0].ipBlock.cidr",
        ],
    );
}

#[test]
fn bad_flow_lines_name_the_line() {
    let dir = fixtures();
    let good = r#"{"src": "10.244.1.20", "dst": "10.244.2.80", "protocol": "TCP", "port": 8085}"#;
    let run = check(
        &["--cluster", path(&dir)],
        &format!("{good}\nthis is not json\n"),
    );
    expect_bad_input(&run, &["<stdin>:2", "not a flow JSON object"]);
    let run = check(
        &["--cluster", path(&dir)],
        &format!("{good}\n{good}\n{}\n", good.replace("TCP", "GRE")),
    );
    expect_bad_input(&run, &["<stdin>:3", "unknown protocol \"GRE\""]);
    let tmp = TempDir::new("check-cli");
    let flows = tmp.write(
        "flows.jsonl",
        &format!("{}\n", good.replace("10.244.2.80", "10.244.2.800")),
    );
    let run = check(&["--cluster", path(&dir), "--flows", path(&flows)], "");
    expect_bad_input(&run, &["flows.jsonl:1", "dst"]);
    let run = check(&["--cluster", path(&dir)], &good.replace("8085", "70000"));
    expect_bad_input(&run, &["<stdin>:1", "port"]);
    let run = check(&["--cluster", path(&dir.join("missing.yaml"))], "");
    expect_bad_input(&run, &["missing.yaml"]);
}
