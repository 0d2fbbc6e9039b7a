//! The deployment checks of `cargo xtask test`: every Kustomize overlay in `deploy/` builds with
//! `kubectl kustomize`, every object it yields is valid for its kind (built-in kinds parsed
//! strictly against the Kubernetes API types, unknown fields rejected; the Prometheus Operator and
//! `ArgoCD` kinds checked for their required fields), the objects fit together (selectors, ports,
//! references), and every alert of the `PrometheusRule` passes its promtool unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_yaml_ng::Value;

use crate::display;

/// The capabilities the agent may hold, each justified in deploy/base/daemonset.yaml.
const ALLOWED_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "PERFMON"];
/// The host's bpffs mount, the only hostPath volume the agent may have.
const BPFFS: &str = "/sys/fs/bpf";

/// Where the dashboards live; the base turns them into the sidecar's `ConfigMap`.
const DASHBOARD_FILE: &str = "deploy/dashboards/flow-auditor.json";

/// Pass and fail counts of one step, printed as `<step>: N passed, M failed`.
pub struct Checks {
    step: &'static str,
    passed: usize,
    failed: usize,
}

impl Checks {
    pub fn new(step: &'static str) -> Self {
        Self {
            step,
            passed: 0,
            failed: 0,
        }
    }

    pub fn record(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                eprintln!("{}: ok: {name}", self.step);
            }
            Err(e) => {
                self.failed += 1;
                eprintln!("{}: FAILED: {name}: {e:#}", self.step);
            }
        }
    }

    /// Prints the closing line; an error when anything failed.
    pub fn finish(self) -> Result<()> {
        println!(
            "{}: {} passed, {} failed",
            self.step, self.passed, self.failed
        );
        if self.failed > 0 {
            bail!("{}: {} check(s) failed", self.step, self.failed);
        }
        Ok(())
    }
}

/// One object of a built overlay, parsed for its kind.
#[expect(
    clippy::large_enum_variant,
    reason = "a dozen objects per overlay, parsed once"
)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    DaemonSet(DaemonSet),
    Service(Service),
    ConfigMap(ConfigMap),
    NetworkPolicy(NetworkPolicy),
    ServiceMonitor(Value),
    PrometheusRule(Value),
}

/// Runs every deployment check; prints `deploy: N passed, M failed`.
pub fn run(root: &Path) -> Result<()> {
    let mut checks = Checks::new("deploy");
    let mut dirs = vec![root.join("deploy/base")];
    let overlays = root.join("deploy/overlays");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&overlays)
        .with_context(|| format!("reading {}", overlays.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    found.sort();
    checks.record(
        "overlays for calico and cilium exist",
        ["calico", "cilium"].iter().try_for_each(|name| {
            ensure!(
                found.iter().any(|p| p.ends_with(name)),
                "no deploy/overlays/{name}"
            );
            Ok(())
        }),
    );
    dirs.extend(found);
    let mut rules_for_promtool = None;
    for dir in &dirs {
        let label = dir.strip_prefix(root).unwrap_or(dir).display().to_string();
        let docs = match kustomize(dir) {
            Ok(docs) => {
                checks.record(&format!("{label}: kubectl kustomize builds"), Ok(()));
                docs
            }
            Err(e) => {
                checks.record(&format!("{label}: kubectl kustomize builds"), Err(e));
                continue;
            }
        };
        let mut objects = Vec::new();
        for doc in docs {
            let name = describe(&doc);
            match parse(doc) {
                Ok(object) => {
                    checks.record(&format!("{label}: {name} is valid"), Ok(()));
                    objects.push(object);
                }
                Err(e) => checks.record(&format!("{label}: {name} is valid"), Err(e)),
            }
        }
        for (what, result) in coherence(root, &objects) {
            checks.record(&format!("{label}: {what}"), result);
        }
        if rules_for_promtool.is_none() {
            rules_for_promtool = objects.iter().find_map(|o| match o {
                Object::PrometheusRule(v) => Some(v.clone()),
                _ => None,
            });
        }
    }
    checks.record(
        "deploy/argocd/application.yaml is a valid Application pointing at an overlay",
        argocd_application(root),
    );
    match rules_for_promtool {
        Some(rule) => promtool(root, &rule, &mut checks),
        None => checks.record("promtool", Err(anyhow!("no PrometheusRule was built"))),
    }
    checks.finish()
}

/// `kubectl kustomize DIR`, split into its documents.
fn kustomize(dir: &Path) -> Result<Vec<Value>> {
    let mut cmd = Command::new("kubectl");
    cmd.arg("kustomize").arg(dir);
    let out = cmd
        .output()
        .with_context(|| format!("could not start {}", display(&cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            display(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8(out.stdout).context("kustomize output is not UTF-8")?;
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc = <Value as serde::Deserialize>::deserialize(de)
            .context("kustomize output is not YAML")?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    ensure!(!docs.is_empty(), "kustomize built nothing");
    Ok(docs)
}

fn describe(doc: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let meta = &doc["metadata"];
    match meta.get("namespace") {
        Some(ns) => format!("{} {}/{}", s(&doc["kind"]), s(ns), s(&meta["name"])),
        None => format!("{} {}", s(&doc["kind"]), s(&meta["name"])),
    }
}

/// Deserializes `doc` into `T`, failing on any field `T` does not know (the API server would
/// drop it silently, or reject it under strict field validation) and on any required field
/// missing: k8s-openapi fills those with defaults, so they show up as fields the parsed object
/// serializes that the document did not have.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<T> {
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(doc.clone(), |path| {
        unknown.push(path.to_string().replace(".?", ""));
    });
    let parsed: T = parsed.map_err(|e| anyhow!("{e}"))?;
    ensure!(unknown.is_empty(), "unknown fields: {}", unknown.join(", "));
    let back = serde_yaml_ng::to_value(&parsed).context("re-encoding")?;
    let mut missing = Vec::new();
    defaulted(doc, &back, "", &mut missing);
    ensure!(
        missing.is_empty(),
        "required fields missing: {}",
        missing.join(", ")
    );
    Ok(parsed)
}

/// Paths present in `back` (the parsed object re-encoded) but absent from `doc`.
fn defaulted(doc: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (doc, back) {
        (Value::Mapping(d), Value::Mapping(b)) => {
            for (key, value) in b {
                let name = key.as_str().unwrap_or("?");
                let here = if path.is_empty() {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                };
                match d.get(key) {
                    Some(original) => defaulted(original, value, &here, out),
                    None => out.push(here),
                }
            }
        }
        (Value::Sequence(d), Value::Sequence(b)) => {
            for (i, (original, value)) in d.iter().zip(b).enumerate() {
                defaulted(original, value, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn parse(doc: Value) -> Result<Object> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    ensure!(!name.is_empty(), "metadata.name is missing");
    let namespaced = doc["metadata"].get("namespace").is_some();
    let cluster_scoped = matches!(
        kind.as_str(),
        "Namespace" | "ClusterRole" | "ClusterRoleBinding"
    );
    // No namespace transformer in the base: each namespaced object must say where it goes.
    ensure!(
        namespaced != cluster_scoped,
        "{kind} must {}have metadata.namespace",
        if cluster_scoped { "not " } else { "" }
    );
    Ok(match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(strict(&doc)?),
        ("v1", "ServiceAccount") => Object::ServiceAccount(strict(&doc)?),
        ("v1", "Service") => Object::Service(strict(&doc)?),
        ("v1", "ConfigMap") => Object::ConfigMap(strict(&doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(strict(&doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(strict(&doc)?)
        }
        ("apps/v1", "DaemonSet") => Object::DaemonSet(strict(&doc)?),
        ("networking.k8s.io/v1", "NetworkPolicy") => Object::NetworkPolicy(strict(&doc)?),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            service_monitor(&doc)?;
            Object::ServiceMonitor(doc)
        }
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            prometheus_rule(&doc)?;
            Object::PrometheusRule(doc)
        }
        _ => bail!("no validator for {api_version} {kind}: add one before shipping it"),
    })
}

/// Keys a Prometheus Operator object may carry at `path`; anything else is a typo.
fn only_keys(v: &Value, path: &str, allowed: &[&str]) -> Result<()> {
    let Some(map) = v.as_mapping() else {
        bail!("{path} is not a mapping");
    };
    for key in map.keys() {
        let key = key.as_str().unwrap_or("?");
        ensure!(allowed.contains(&key), "{path}.{key} is not a known field");
    }
    Ok(())
}

fn required_str<'a>(v: &'a Value, path: &str) -> Result<&'a str> {
    match v.as_str() {
        Some(s) if !s.is_empty() => Ok(s),
        _ => bail!("{path} is required (a non-empty string)"),
    }
}

/// `ServiceMonitor` (monitoring.coreos.com/v1): `spec.selector` and `spec.endpoints` are required,
/// each endpoint names a port.
fn service_monitor(doc: &Value) -> Result<()> {
    only_keys(doc, "", &["apiVersion", "kind", "metadata", "spec"])?;
    let spec = &doc["spec"];
    only_keys(
        spec,
        "spec",
        &[
            "selector",
            "endpoints",
            "namespaceSelector",
            "jobLabel",
            "targetLabels",
            "podTargetLabels",
            "sampleLimit",
        ],
    )?;
    ensure!(spec["selector"].is_mapping(), "spec.selector is required");
    let endpoints = spec["endpoints"]
        .as_sequence()
        .filter(|e| !e.is_empty())
        .ok_or_else(|| anyhow!("spec.endpoints is required and non-empty"))?;
    for (i, e) in endpoints.iter().enumerate() {
        let path = format!("spec.endpoints[{i}]");
        only_keys(
            e,
            &path,
            &[
                "port",
                "targetPort",
                "path",
                "scheme",
                "interval",
                "scrapeTimeout",
                "honorLabels",
                "relabelings",
                "metricRelabelings",
            ],
        )?;
        ensure!(
            e.get("port").is_some() || e.get("targetPort").is_some(),
            "{path} names neither port nor targetPort"
        );
        for key in ["interval", "scrapeTimeout"] {
            if let Some(d) = e.get(key) {
                duration(required_str(d, &format!("{path}.{key}"))?)
                    .with_context(|| format!("{path}.{key}"))?;
            }
        }
    }
    Ok(())
}

/// `PrometheusRule` (monitoring.coreos.com/v1): groups with a name and rules; each rule an alert or
/// a record with an `expr`; alerts carry the summary and description on-call needs.
fn prometheus_rule(doc: &Value) -> Result<()> {
    only_keys(doc, "", &["apiVersion", "kind", "metadata", "spec"])?;
    only_keys(&doc["spec"], "spec", &["groups"])?;
    let groups = doc["spec"]["groups"]
        .as_sequence()
        .filter(|g| !g.is_empty())
        .ok_or_else(|| anyhow!("spec.groups is required and non-empty"))?;
    let mut names = BTreeSet::new();
    for (g, group) in groups.iter().enumerate() {
        let gpath = format!("spec.groups[{g}]");
        only_keys(group, &gpath, &["name", "interval", "rules"])?;
        let name = required_str(&group["name"], &format!("{gpath}.name"))?;
        ensure!(names.insert(name.to_owned()), "group {name} appears twice");
        let rules = group["rules"]
            .as_sequence()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| anyhow!("{gpath}.rules is required and non-empty"))?;
        for (r, rule) in rules.iter().enumerate() {
            let rpath = format!("{gpath}.rules[{r}]");
            only_keys(
                rule,
                &rpath,
                &["alert", "record", "expr", "for", "labels", "annotations"],
            )?;
            required_str(&rule["expr"], &format!("{rpath}.expr"))?;
            let alert = rule.get("alert").is_some();
            ensure!(
                alert != rule.get("record").is_some(),
                "{rpath} must have exactly one of alert and record"
            );
            if let Some(f) = rule.get("for") {
                duration(required_str(f, &format!("{rpath}.for"))?)
                    .with_context(|| format!("{rpath}.for"))?;
            }
            if alert {
                let alert = required_str(&rule["alert"], &format!("{rpath}.alert"))?;
                for key in ["summary", "description"] {
                    required_str(
                        &rule["annotations"][key],
                        &format!("{alert}: annotations.{key}"),
                    )?;
                }
                required_str(
                    &rule["labels"]["severity"],
                    &format!("{alert}: labels.severity"),
                )?;
            }
        }
    }
    Ok(())
}

/// A Prometheus duration such as `30s`, `5m`, `1h30m`.
fn duration(text: &str) -> Result<()> {
    let mut rest = text;
    ensure!(!rest.is_empty(), "empty duration");
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        ensure!(digits > 0, "{text:?} is not a duration");
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u))
            .ok_or_else(|| anyhow!("{text:?} is not a duration"))?;
        rest = &rest[unit.len()..];
    }
    Ok(())
}

/// Whether every pair of `selector` is among `labels`.
fn selects(
    selector: Option<&BTreeMap<String, String>>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let (Some(selector), Some(labels)) = (selector, labels) else {
        return false;
    };
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The objects of one overlay fit together: what the `DaemonSet` needs exists, the Service selects
/// its pods, the `ServiceMonitor` the Service, Prometheus in `default` may scrape, and the
/// dashboard `ConfigMap` carries the dashboard file for Grafana's sidecar.
fn coherence(root: &Path, objects: &[Object]) -> Vec<(&'static str, Result<()>)> {
    let mut out = Vec::new();
    let daemonsets: Vec<&DaemonSet> = objects
        .iter()
        .filter_map(|o| match o {
            Object::DaemonSet(d) => Some(d),
            _ => None,
        })
        .collect();
    let Some(ds) = daemonsets
        .first()
        .copied()
        .filter(|_| daemonsets.len() == 1)
    else {
        out.push((
            "exactly one DaemonSet",
            Err(anyhow!("found {}", daemonsets.len())),
        ));
        return out;
    };
    out.push((
        "agent pod security (least capabilities, no privileged, read-only root)",
        agent_security(ds),
    ));
    out.push((
        "agent placement (arm64 and amd64, control-plane, host network)",
        agent_placement(ds),
    ));
    out.push((
        "agent probes, NODE_NAME, resources and metrics port",
        agent_container(ds),
    ));
    out.push((
        "what the DaemonSet refers to exists",
        references(ds, objects),
    ));
    out.push((
        "Service and ServiceMonitor select the agent's metrics port",
        scrape_path(ds, objects),
    ));
    out.push((
        "NetworkPolicy lets Prometheus in `default` scrape",
        network_policy(ds, objects),
    ));
    out.push((
        "dashboard ConfigMap for the Grafana sidecar",
        dashboard(root, objects),
    ));
    out
}

fn pod_spec(ds: &DaemonSet) -> Result<&k8s_openapi::api::core::v1::PodSpec> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .ok_or_else(|| anyhow!("DaemonSet has no pod spec"))
}

fn agent(ds: &DaemonSet) -> Result<&k8s_openapi::api::core::v1::Container> {
    let spec = pod_spec(ds)?;
    ensure!(
        spec.containers.len() == 1,
        "the agent pod has {} containers, want 1",
        spec.containers.len()
    );
    Ok(&spec.containers[0])
}

fn agent_security(ds: &DaemonSet) -> Result<()> {
    let spec = pod_spec(ds)?;
    ensure!(
        spec.host_pid != Some(true) && spec.host_ipc != Some(true),
        "hostPID/hostIPC are not needed"
    );
    let c = agent(ds)?;
    let sc = c
        .security_context
        .as_ref()
        .ok_or_else(|| anyhow!("no securityContext"))?;
    ensure!(sc.privileged != Some(true), "privileged: true");
    ensure!(
        sc.read_only_root_filesystem == Some(true),
        "readOnlyRootFilesystem is not true"
    );
    ensure!(
        sc.allow_privilege_escalation == Some(false),
        "allowPrivilegeEscalation is not false"
    );
    let caps = sc
        .capabilities
        .as_ref()
        .ok_or_else(|| anyhow!("no capabilities"))?;
    ensure!(
        caps.drop
            .as_deref()
            .is_some_and(|d| d.iter().any(|c| c == "ALL")),
        "capabilities.drop does not drop ALL"
    );
    for cap in caps.add.as_deref().unwrap_or_default() {
        ensure!(
            ALLOWED_CAPABILITIES.contains(&cap.as_str()),
            "capability {cap} is not justified"
        );
    }
    for volume in spec.volumes.as_deref().unwrap_or_default() {
        if let Some(host) = &volume.host_path {
            // The host's bpffs, where the flow tables are pinned to survive restarts: the one
            // host path the agent needs.
            ensure!(
                host.path == BPFFS && host.type_.as_deref() == Some("Directory"),
                "hostPath volume {} ({}) is not needed",
                volume.name,
                host.path
            );
        }
    }
    Ok(())
}

fn agent_placement(ds: &DaemonSet) -> Result<()> {
    let spec = pod_spec(ds)?;
    ensure!(spec.host_network == Some(true), "hostNetwork is not true");
    ensure!(
        spec.dns_policy.as_deref() == Some("ClusterFirstWithHostNet"),
        "dnsPolicy is not ClusterFirstWithHostNet"
    );
    let tolerates = spec
        .tolerations
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|t| {
            t.key.as_deref() == Some("node-role.kubernetes.io/control-plane")
                && t.operator.as_deref() == Some("Exists")
        });
    ensure!(
        tolerates,
        "no toleration for node-role.kubernetes.io/control-plane"
    );
    let arches: BTreeSet<&str> = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .into_iter()
        .flat_map(|s| &s.node_selector_terms)
        .flat_map(|t| t.match_expressions.as_deref().unwrap_or_default())
        .filter(|e| e.key == "kubernetes.io/arch" && e.operator == "In")
        .flat_map(|e| e.values.as_deref().unwrap_or_default())
        .map(String::as_str)
        .collect();
    ensure!(
        arches == BTreeSet::from(["amd64", "arm64"]),
        "required node affinity on kubernetes.io/arch is {arches:?}, want amd64 and arm64"
    );
    Ok(())
}

/// The port of `--metrics-addr=HOST:PORT` in the agent's arguments.
fn metrics_port(c: &k8s_openapi::api::core::v1::Container) -> Result<i32> {
    let addr = c
        .args
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .ok_or_else(|| anyhow!("the agent's args do not set --metrics-addr"))?;
    let port = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| anyhow!("--metrics-addr={addr} has no port"))?;
    Ok(port)
}

fn agent_container(ds: &DaemonSet) -> Result<()> {
    let c = agent(ds)?;
    let port = metrics_port(c)?;
    let declared = c
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.container_port == port)
        .ok_or_else(|| anyhow!("no containerPort {port} (--metrics-addr)"))?;
    let port_name = declared.name.clone().unwrap_or_default();
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .ok_or_else(|| anyhow!("no httpGet probe on {path}"))?;
        ensure!(
            get.path.as_deref() == Some(path),
            "probe path {:?}, want {path}",
            get.path
        );
        let ok = match &get.port {
            IntOrString::Int(p) => *p == port,
            IntOrString::String(name) => *name == port_name,
        };
        ensure!(
            ok,
            "the {path} probe does not target the metrics port {port}"
        );
    }
    let node_name = c.env.as_deref().unwrap_or_default().iter().any(|e| {
        e.name == "NODE_NAME"
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .is_some_and(|f| f.field_path == "spec.nodeName")
    });
    ensure!(node_name, "NODE_NAME does not come from spec.nodeName");
    let resources = c
        .resources
        .as_ref()
        .ok_or_else(|| anyhow!("no resources"))?;
    for (what, list) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        let list = list
            .as_ref()
            .ok_or_else(|| anyhow!("no resources.{what}"))?;
        for key in ["cpu", "memory"] {
            ensure!(list.contains_key(key), "no resources.{what}.{key}");
        }
    }
    Ok(())
}

fn references(ds: &DaemonSet, objects: &[Object]) -> Result<()> {
    let ns = ds.metadata.namespace.as_deref().unwrap_or_default();
    let spec = pod_spec(ds)?;
    let account = spec.service_account_name.as_deref().unwrap_or("default");
    ensure!(
        objects.iter().any(|o| matches!(o, Object::ServiceAccount(sa)
            if sa.metadata.name.as_deref() == Some(account) && sa.metadata.namespace.as_deref() == Some(ns))),
        "ServiceAccount {ns}/{account} is not in the output"
    );
    ensure!(
        objects
            .iter()
            .any(|o| matches!(o, Object::Namespace(n) if n.metadata.name.as_deref() == Some(ns))),
        "Namespace {ns} is not in the output"
    );
    let bound = objects.iter().any(|o| match o {
        Object::ClusterRoleBinding(b) => b.subjects.as_deref().unwrap_or_default().iter().any(|s| {
            s.kind == "ServiceAccount" && s.name == account && s.namespace.as_deref() == Some(ns)
        }) && objects.iter().any(|r| matches!(r, Object::ClusterRole(role)
                if b.role_ref.kind == "ClusterRole" && role.metadata.name.as_deref() == Some(b.role_ref.name.as_str()))),
        _ => false,
    });
    ensure!(
        bound,
        "no ClusterRoleBinding gives {ns}/{account} a ClusterRole of the output"
    );
    for volume in spec.volumes.as_deref().unwrap_or_default() {
        if let Some(cm) = &volume.config_map {
            let exists = objects.iter().any(|o| matches!(o, Object::ConfigMap(c)
                if c.metadata.name == Some(cm.name.clone()) && c.metadata.namespace.as_deref() == Some(ns)));
            ensure!(
                exists,
                "volume {} refers to ConfigMap {ns}/{}, not in the output",
                volume.name,
                cm.name
            );
        }
    }
    Ok(())
}

fn scrape_path(ds: &DaemonSet, objects: &[Object]) -> Result<()> {
    let ns = ds.metadata.namespace.as_deref().unwrap_or_default();
    let pod_labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.as_ref());
    let c = agent(ds)?;
    let port = metrics_port(c)?;
    let port_name = c
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.container_port == port)
        .and_then(|p| p.name.clone())
        .unwrap_or_default();
    let service = objects
        .iter()
        .find_map(|o| match o {
            Object::Service(s)
                if s.metadata.namespace.as_deref() == Some(ns)
                    && selects(
                        s.spec.as_ref().and_then(|s| s.selector.as_ref()),
                        pod_labels,
                    ) =>
            {
                Some(s)
            }
            _ => None,
        })
        .ok_or_else(|| anyhow!("no Service in {ns} selects the agent's pods"))?;
    let service_port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default()
        .iter()
        .find(|p| match &p.target_port {
            Some(IntOrString::Int(p)) => *p == port,
            Some(IntOrString::String(name)) => *name == port_name,
            None => p.port == port,
        })
        .ok_or_else(|| anyhow!("the Service has no port targeting {port}"))?;
    let service_port_name = service_port.name.clone().unwrap_or_default();
    let monitors: Vec<&Value> = objects
        .iter()
        .filter_map(|o| match o {
            Object::ServiceMonitor(v) => Some(v),
            _ => None,
        })
        .collect();
    ensure!(
        monitors.len() == 1,
        "{} ServiceMonitors, want 1",
        monitors.len()
    );
    let monitor = monitors[0];
    ensure!(
        monitor["metadata"]["labels"]["release"].as_str() == Some("kube-prometheus-stack"),
        "the ServiceMonitor lacks the label release: kube-prometheus-stack"
    );
    let selector: BTreeMap<String, String> =
        serde_yaml_ng::from_value(monitor["spec"]["selector"]["matchLabels"].clone())
            .context("ServiceMonitor spec.selector.matchLabels")?;
    ensure!(
        selects(Some(&selector), service.metadata.labels.as_ref()),
        "the ServiceMonitor's selector does not match the Service's labels"
    );
    if let Some(names) = monitor["spec"]["namespaceSelector"]["matchNames"].as_sequence() {
        ensure!(
            names.iter().any(|n| n.as_str() == Some(ns)),
            "namespaceSelector leaves out {ns}"
        );
    }
    let endpoint_ok = monitor["spec"]["endpoints"]
        .as_sequence()
        .into_iter()
        .flatten()
        .all(|e| e["port"].as_str() == Some(service_port_name.as_str()));
    ensure!(
        endpoint_ok,
        "a ServiceMonitor endpoint does not name Service port {service_port_name:?}"
    );
    Ok(())
}

fn network_policy(ds: &DaemonSet, objects: &[Object]) -> Result<()> {
    let ns = ds.metadata.namespace.as_deref().unwrap_or_default();
    let port = metrics_port(agent(ds)?)?;
    let allowed = objects.iter().any(|o| {
        let Object::NetworkPolicy(p) = o else {
            return false;
        };
        let Some(spec) = &p.spec else { return false };
        p.metadata.namespace.as_deref() == Some(ns)
            && spec
                .ingress
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|rule| {
                    let from_default =
                        rule.from.as_deref().unwrap_or_default().iter().any(|peer| {
                            peer.pod_selector.is_none()
                                && peer.namespace_selector.as_ref().is_some_and(|s| {
                                    s.match_labels
                                        .as_ref()
                                        .and_then(|l| l.get("kubernetes.io/metadata.name"))
                                        == Some(&"default".to_owned())
                                })
                        });
                    let on_port = rule.ports.as_deref().unwrap_or_default().iter().any(|p| {
                        p.port == Some(IntOrString::Int(port))
                            && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                    });
                    from_default && on_port
                })
    });
    ensure!(
        allowed,
        "no NetworkPolicy in {ns} admits namespace default on TCP {port}"
    );
    Ok(())
}

fn dashboard(root: &Path, objects: &[Object]) -> Result<()> {
    let file = std::fs::read_to_string(root.join(DASHBOARD_FILE))
        .with_context(|| format!("reading {DASHBOARD_FILE}"))?;
    let cm = objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c)
                if c.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("grafana_dashboard"))
                    .map(String::as_str)
                    == Some("1") =>
            {
                Some(c)
            }
            _ => None,
        })
        .ok_or_else(|| anyhow!("no ConfigMap labelled grafana_dashboard: \"1\""))?;
    ensure!(
        cm.metadata.namespace.as_deref() == Some("default"),
        "the dashboard ConfigMap is not in Grafana's namespace `default`"
    );
    let data = cm
        .data
        .as_ref()
        .and_then(|d| d.get("flow-auditor.json"))
        .ok_or_else(|| anyhow!("the dashboard ConfigMap has no flow-auditor.json"))?;
    ensure!(
        *data == file,
        "the ConfigMap's dashboard differs from {DASHBOARD_FILE}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&file).with_context(|| format!("{DASHBOARD_FILE} is not JSON"))?;
    ensure!(
        json["schemaVersion"].as_u64().is_some_and(|v| v >= 39),
        "schemaVersion below 39"
    );
    ensure!(
        json["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "the dashboard has no uid"
    );
    let has_datasource_var = json["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v["type"] == "datasource" && v["query"] == "prometheus");
    ensure!(has_datasource_var, "no Prometheus datasource variable");
    Ok(())
}

/// The example Application: required fields of argoproj.io/v1alpha1 Application, a sync wave,
/// and a `path` that is one of our overlays.
fn argocd_application(root: &Path) -> Result<()> {
    let path = root.join("deploy/argocd/application.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let app: Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    ensure!(
        app["apiVersion"].as_str() == Some("argoproj.io/v1alpha1"),
        "apiVersion"
    );
    ensure!(app["kind"].as_str() == Some("Application"), "kind");
    required_str(&app["metadata"]["name"], "metadata.name")?;
    required_str(&app["metadata"]["namespace"], "metadata.namespace")?;
    let wave = required_str(
        &app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"],
        "sync-wave annotation",
    )?;
    wave.parse::<i32>()
        .with_context(|| format!("sync-wave {wave:?} is not an integer"))?;
    let spec = &app["spec"];
    only_keys(
        spec,
        "spec",
        &["project", "source", "destination", "syncPolicy"],
    )?;
    required_str(&spec["project"], "spec.project")?;
    required_str(&spec["source"]["repoURL"], "spec.source.repoURL")?;
    let overlay = required_str(&spec["source"]["path"], "spec.source.path")?;
    ensure!(
        root.join(overlay).join("kustomization.yaml").is_file()
            && overlay.starts_with("deploy/overlays/"),
        "spec.source.path {overlay} is not one of deploy/overlays/*"
    );
    ensure!(
        spec["destination"].get("server").is_some() != spec["destination"].get("name").is_some(),
        "spec.destination needs exactly one of server and name"
    );
    Ok(())
}

/// Extracts the rule groups of the `PrometheusRule` into a promtool rules file beside copies of
/// `deploy/tests/*.test.yaml`, checks that every alert has a firing and a not-firing case, and
/// runs `promtool check rules` and `promtool test rules`.
fn promtool(root: &Path, rule: &Value, checks: &mut Checks) {
    let dir = std::env::temp_dir().join(format!("flow-auditor-promtool-{}", std::process::id()));
    let result = promtool_in(root, rule, &dir, checks);
    // Best effort: a leftover directory in /tmp is harmless.
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        checks.record("promtool rule tests", Err(e));
    }
}

fn promtool_in(root: &Path, rule: &Value, dir: &Path, checks: &mut Checks) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut groups = serde_yaml_ng::Mapping::new();
    groups.insert("groups".into(), rule["spec"]["groups"].clone());
    let rules_file = dir.join("flow-auditor.rules.yaml");
    std::fs::write(&rules_file, serde_yaml_ng::to_string(&groups)?)
        .with_context(|| format!("writing {}", rules_file.display()))?;
    let mut check = Command::new("promtool");
    check.arg("check").arg("rules").arg(&rules_file);
    checks.record("promtool check rules", promtool_run(&mut check));

    let alerts: BTreeSet<String> = rule["spec"]["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect();
    let tests_dir = root.join("deploy/tests");
    let mut test_files: Vec<PathBuf> = std::fs::read_dir(&tests_dir)
        .with_context(|| format!("reading {}", tests_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".test.yaml"))
        .collect();
    test_files.sort();
    ensure!(!test_files.is_empty(), "no deploy/tests/*.test.yaml");
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for file in &test_files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let tests: Value = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("parsing {}", file.display()))?;
        for case in tests["tests"].as_sequence().into_iter().flatten() {
            for t in case["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = t["alertname"].as_str().unwrap_or_default().to_owned();
                if t["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()) {
                    firing.insert(name);
                } else {
                    quiet.insert(name);
                }
            }
        }
        let copy = dir.join(file.file_name().unwrap_or_default());
        std::fs::copy(file, &copy).with_context(|| format!("copying {}", file.display()))?;
        let mut test = Command::new("promtool");
        test.current_dir(dir).arg("test").arg("rules").arg(&copy);
        checks.record(
            &format!(
                "promtool test rules {}",
                file.strip_prefix(root).unwrap_or(file).display()
            ),
            promtool_run(&mut test),
        );
    }
    for alert in &alerts {
        let missing: Vec<&str> = [("firing", &firing), ("not firing", &quiet)]
            .into_iter()
            .filter(|(_, set)| !set.contains(alert))
            .map(|(what, _)| what)
            .collect();
        checks.record(
            &format!("alert {alert} is tested firing and not firing"),
            if missing.is_empty() {
                Ok(())
            } else {
                Err(anyhow!("no {} case", missing.join(" and no ")))
            },
        );
    }
    Ok(())
}

fn promtool_run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {}", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed:\n{}{}",
            display(cmd),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_of_builtin_kinds_are_rejected() {
        let doc: Value = serde_yaml_ng::from_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: b}\n\
             spec: {ports: [{port: 1, targetPort: metrics, protcol: TCP}]}\n",
        )
        .unwrap_or_else(|e| panic!("test YAML: {e}"));
        match parse(doc) {
            Err(e) if e.to_string().contains("protcol") => {}
            Err(e) => panic!("rejected, but without naming the field: {e:#}"),
            Ok(_) => panic!("a misspelt field was accepted"),
        }
    }

    #[test]
    fn missing_required_fields_are_rejected() {
        let doc: Value = serde_yaml_ng::from_str(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: a, namespace: b}\n\
             spec: {template: {}}\n",
        )
        .unwrap_or_else(|e| panic!("test YAML: {e}"));
        assert!(
            parse(doc).is_err(),
            "a DaemonSet without spec.selector was accepted"
        );
        let rule: Value = serde_yaml_ng::from_str(
            "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\n\
             metadata: {name: a, namespace: b}\n\
             spec: {groups: [{name: g, rules: [{alert: A, expr: up == 0, labels: {severity: x}, \
             annotations: {summary: s}}]}]}\n",
        )
        .unwrap_or_else(|e| panic!("test YAML: {e}"));
        match parse(rule) {
            Err(e) if e.to_string().contains("description") => {}
            Err(e) => panic!("rejected for another reason: {e:#}"),
            Ok(_) => panic!("an alert without a description was accepted"),
        }
    }

    #[test]
    fn unknown_kinds_and_misplaced_namespaces_are_rejected() {
        for (yaml, want) in [
            (
                "apiVersion: v1\nkind: Secret\nmetadata: {name: a, namespace: b}\n",
                "no validator",
            ),
            (
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n",
                "must not",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
                "must have",
            ),
        ] {
            let doc: Value =
                serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("test YAML: {e}"));
            match parse(doc) {
                Err(e) if e.to_string().contains(want) => {}
                Err(e) => panic!("{yaml}: rejected for another reason: {e:#}"),
                Ok(_) => panic!("{yaml}: accepted"),
            }
        }
    }

    #[test]
    fn durations() {
        for ok in ["30s", "5m", "1h30m", "250ms"] {
            if let Err(e) = duration(ok) {
                panic!("{ok}: {e:#}");
            }
        }
        for bad in ["", "5", "m", "5 m", "1.5m"] {
            assert!(duration(bad).is_err(), "{bad:?} was accepted as a duration");
        }
    }
}
