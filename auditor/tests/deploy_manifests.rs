//! The manifests in `deploy/` against the code they deploy: the `ClusterRole` grants exactly the
//! list/watch the Kubernetes source needs (`watched_resources()`), the `DaemonSet`'s arguments are
//! accepted by the real `auditor run` flags, and each overlay's config file by the real parser.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use auditor::config::Config;
use auditor::daemon::RunArgs;
use auditor::source::watched_resources;
use clap::Parser as _;
use serde_yaml_ng::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every directory a user may build: the base and each overlay.
fn kustomizations() -> Vec<PathBuf> {
    let mut dirs = vec![deploy_dir().join("base")];
    let overlays = deploy_dir().join("overlays");
    let entries = std::fs::read_dir(&overlays)
        .unwrap_or_else(|e| panic!("reading {}: {e}", overlays.display()));
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no overlays in {}", overlays.display());
    dirs.extend(found);
    dirs
}

fn build(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running kubectl kustomize (is kubectl installed?): {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("not UTF-8: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|de| {
            <Value as serde::Deserialize>::deserialize(de)
                .unwrap_or_else(|e| panic!("kustomize output of {}: {e}", dir.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("not a string: {s:?}"))
                .to_owned()
        })
        .collect()
}

/// `(group, resource, verb)` of every grant of the built RBAC objects.
fn grants(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for doc in docs {
        match doc["kind"].as_str() {
            Some("ClusterRole" | "Role") => {}
            _ => continue,
        }
        for rule in doc["rules"].as_sequence().into_iter().flatten() {
            assert!(
                !(rule.get("nonResourceURLs").is_some() || rule.get("resourceNames").is_some()),
                "unexpected rule shape in {}: {rule:?}",
                doc["metadata"]["name"].as_str().unwrap_or("?")
            );
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        out.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_list_and_watch_on_the_watched_kinds() {
    let want: BTreeSet<(String, String, String)> = watched_resources()
        .iter()
        .flat_map(|(group, _, resource)| {
            ["list", "watch"]
                .map(|verb| ((*group).to_owned(), (*resource).to_owned(), verb.to_owned()))
        })
        .collect();
    for dir in kustomizations() {
        let got = grants(&build(&dir));
        let extra: Vec<_> = got.difference(&want).collect();
        let missing: Vec<_> = want.difference(&got).collect();
        assert!(
            !(!extra.is_empty() || !missing.is_empty()),
            "{}: RBAC differs from WATCHED_KINDS\n  granted but not watched: {extra:?}\n  watched but not granted: {missing:?}",
            dir.display()
        );
    }
}

#[derive(clap::Parser)]
#[command(name = "auditor")]
struct Cli {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    Run(RunArgs),
}

/// The `DaemonSet`'s container args with the env references Kubernetes expands (`$(VAR)`) replaced.
fn agent_args(docs: &[Value]) -> Vec<String> {
    let ds = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .unwrap_or_else(|| panic!("no DaemonSet"));
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<(String, String)> = container["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect();
    strings(&container["args"])
        .into_iter()
        .map(|mut arg| {
            for (name, value) in &env {
                arg = arg.replace(&format!("$({name})"), value);
            }
            assert!(
                !arg.contains("$("),
                "argument {arg:?} refers to an env var the container does not set"
            );
            arg
        })
        .collect()
}

#[test]
fn the_daemonset_arguments_and_config_file_are_accepted_by_the_daemon() {
    for dir in kustomizations() {
        let docs = build(&dir);
        let args = agent_args(&docs);
        let cli = Cli::try_parse_from(std::iter::once("auditor".to_owned()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("{}: auditor rejects {args:?}: {e}", dir.display()));
        let Sub::Run(run) = cli.command;
        assert!(
            run.kube && !run.interfaces.is_empty(),
            "{}: the agent must run with --kube and interface globs: {args:?}",
            dir.display()
        );
        let config_path = run
            .config
            .unwrap_or_else(|| panic!("{}: no --config in {args:?}", dir.display()));
        let file_name = config_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_else(|| panic!("--config {} has no file name", config_path.display()));
        let config_text = docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some("ConfigMap"))
            .find_map(|d| d["data"][file_name].as_str())
            .unwrap_or_else(|| panic!("{}: no ConfigMap carries {file_name}", dir.display()));
        if let Err(e) = Config::from_text(&config_path, config_text) {
            panic!("{}: the config file is rejected: {e}", dir.display());
        }
        let port = run.metrics_addr.port();
        let container = &docs
            .iter()
            .find(|d| d["kind"].as_str() == Some("DaemonSet"))
            .unwrap_or_else(|| panic!("no DaemonSet"))["spec"]["template"]["spec"]["containers"][0];
        let declared = container["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|p| p["containerPort"].as_u64() == Some(u64::from(port)));
        assert!(
            declared,
            "{}: --metrics-addr port {port} is not a containerPort",
            dir.display()
        );
    }
}

#[test]
fn the_cilium_overlay_reads_ipblocks_as_cilium_and_names_ingress_addresses() {
    let docs = build(&deploy_dir().join("overlays/cilium"));
    let text = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("ConfigMap"))
        .find_map(|d| d["data"]["config.yaml"].as_str())
        .unwrap_or_else(|| panic!("no config.yaml ConfigMap in the cilium overlay"));
    let config = Config::from_text(Path::new("overlays/cilium/config.yaml"), text)
        .unwrap_or_else(|e| panic!("{e}"));
    let model = config.cluster_config();
    assert!(
        !(model.ipblock != auditor::policy::model::IpBlockReading::Cilium
            || model.ingress.is_empty()),
        "the cilium overlay must use Cilium's ipBlock reading and list ingress CIDRs: {config:?}"
    );
    // Cilium delivers packets into pods past the lxc* egress hook from its tunnel devices and
    // the native device: the overlay must watch them, with Cilium's WireGuard port.
    for uplink in auditor::datapath::attach::CILIUM_UPLINKS {
        assert!(
            config.uplinks.iter().any(|u| u == uplink),
            "the cilium overlay must attach to {uplink}: {:?}",
            config.uplinks
        );
    }
    assert_eq!(config.wireguard_port, 51_871, "Cilium's WireGuard port");
}
