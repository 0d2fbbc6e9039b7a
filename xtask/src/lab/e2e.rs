//! The lab's end-to-end test (a step of `cargo xtask test` when root): one deterministic round of
//! the traffic script, a real Prometheus scraping the daemon, and the exact flow counts per
//! verdict and namespace pair read back with `PromQL` against expectations worked out by hand from
//! the seed's policies and the lab's nftables enforcement. Grafana's panel queries run too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::daemon::Prometheus;
use super::traffic::{self, SCRIPT, Seen};
use super::{Lab, catch_signals};

/// Prometheus's listen address inside the node namespace.
const PROMETHEUS_ADDR: &str = "127.0.0.1:19090";
/// Short, so `unanswered` flows (dropped by `LocalStack`'s enforcement) resolve quickly.
const ANSWER_TIMEOUT: &str = "1s";
/// The script is played this many times, so counters rise between scrapes and the dashboard's
/// `increase()` / `rate()` panels have something to show; EXPECTED counts one round.
const ROUNDS: u64 = 2;
/// Between rounds: a few of Prometheus's 1 s scrapes.
const ROUND_GAP: Duration = Duration::from_secs(3);
/// How long the counts may take to settle in Prometheus (answer timeout + scrape interval +
/// the daemon's pipeline), polled every second.
const SETTLE: Duration = Duration::from_secs(30);

/// One expected `sum by (verdict, src_namespace, dst_namespace) (flow_auditor_flows_total)`
/// series for one round of the script: (verdict, source namespace, destination namespace,
/// flows, why). An empty namespace is
/// a peer outside the cluster.
type Expected = (&'static str, &'static str, &'static str, u64, &'static str);

/// Worked out by hand from the seed's five policies (namespaces without a policy, here
/// `default`, `kube-system`, `ingress-nginx` and `sandbox`, are open in both directions) and the
/// lab's enforcement (nftables enforces `velero` and `localstack` only).
const EXPECTED: &[Expected] = &[
    // allowed
    (
        "allowed",
        "default",
        "default",
        2,
        "Prometheus scrapes Grafana 3000 and Alertmanager 9093: default has no policy",
    ),
    (
        "allowed",
        "default",
        "kube-system",
        1,
        "Prometheus scrapes CoreDNS 9153: kube-system has no policy",
    ),
    (
        "allowed",
        "default",
        "velero",
        1,
        "Prometheus scrapes Velero 8085: velero ingress allows default on 8085",
    ),
    (
        "allowed",
        "default",
        "localstack",
        2,
        "Prometheus and Grafana to 4566: localstack ingress allows any pod of default on 4566",
    ),
    (
        "allowed",
        "default",
        "loki",
        2,
        "Prometheus and Grafana to Loki 3100: loki ingress allows default on 3100",
    ),
    (
        "allowed",
        "default",
        "unipoller",
        1,
        "Prometheus scrapes the poller 9130: unipoller ingress allows default on 9130",
    ),
    (
        "allowed",
        "default",
        "trivy-system",
        1,
        "Prometheus scrapes Trivy 8080: trivy-system ingress allows default on 8080",
    ),
    (
        "allowed",
        "default",
        "ingress-nginx",
        1,
        "Prometheus scrapes the controller 10254: ingress-nginx has no policy",
    ),
    (
        "allowed",
        "velero",
        "kube-system",
        2,
        "DNS UDP+TCP 53: every policy's egress allows the kube-system namespace on 53",
    ),
    (
        "allowed",
        "localstack",
        "kube-system",
        2,
        "DNS UDP+TCP 53 (egress: DNS only)",
    ),
    (
        "allowed",
        "loki",
        "kube-system",
        4,
        "DNS UDP+TCP 53 from Loki and from Promtail (both in loki)",
    ),
    ("allowed", "unipoller", "kube-system", 2, "DNS UDP+TCP 53"),
    (
        "allowed",
        "trivy-system",
        "kube-system",
        2,
        "DNS UDP+TCP 53",
    ),
    (
        "allowed",
        "velero",
        "localstack",
        2,
        "two S3 calls to 4566: velero egress and localstack ingress both name the other",
    ),
    (
        "allowed",
        "velero",
        "",
        1,
        "Backblaze B2 203.0.113.20:443: 0.0.0.0/0 except RFC 1918 on 443",
    ),
    (
        "allowed",
        "loki",
        "loki",
        2,
        "two Promtail pushes to Loki 3100: loki egress and ingress allow the loki namespace on 3100",
    ),
    (
        "allowed",
        "loki",
        "default",
        1,
        "Loki alerts Alertmanager 9093: loki egress allows default on 9093, default is open",
    ),
    (
        "allowed",
        "unipoller",
        "",
        2,
        "the UniFi controller 10.0.1.1 on 443 and 8443: unipoller egress ipBlock 10.0.1.1/32",
    ),
    (
        "allowed",
        "trivy-system",
        "",
        1,
        "the registry 203.0.113.10:443: 0.0.0.0/0 except RFC 1918 on 443",
    ),
    (
        "allowed",
        "ingress-nginx",
        "localstack",
        1,
        "LocalStack's UI 4566: localstack ingress allows ingress-nginx on 4566",
    ),
    // denied: the model refuses and the CNI (nftables) enforces it
    (
        "denied",
        "sandbox",
        "velero",
        1,
        "debug pod to Velero 8085: only default may; nftables resets it (refused)",
    ),
    (
        "denied",
        "sandbox",
        "localstack",
        1,
        "debug pod to LocalStack 4566: not an allowed namespace; nftables drops it (unanswered)",
    ),
    (
        "denied",
        "localstack",
        "",
        1,
        "LocalStack to 203.0.113.20:443: localstack egress is DNS only; nftables drops it",
    ),
    (
        "denied",
        "velero",
        "loki",
        1,
        "Velero to Loki 3100: velero egress does not name loki; nftables resets it",
    ),
    // unexpected: the model refuses, but loki, unipoller and trivy-system are not enforced
    (
        "unexpected",
        "loki",
        "loki",
        1,
        "Promtail to Loki's gRPC 9095: loki egress allows it, loki ingress only opens 3100",
    ),
    (
        "unexpected",
        "default",
        "loki",
        1,
        "Prometheus scrapes Promtail 3101: loki ingress opens only 3100 to default",
    ),
    (
        "unexpected",
        "unipoller",
        "",
        1,
        "the poller to a website 198.51.100.80:80: egress allows only DNS and the controller",
    ),
    (
        "unexpected",
        "sandbox",
        "loki",
        1,
        "debug pod to Loki 3100: loki ingress allows only loki and default",
    ),
    (
        "unexpected",
        "trivy-system",
        "",
        1,
        "Trivy to a website on port 80: its egress allows the internet on 443 only",
    ),
];

/// `sum by (verdict, outcome)` for one round: every allowed and unexpected flow was answered
/// (the lab serves every port the script uses); of the four enforced denials, velero's chains
/// reset two (`refused`) and localstack's chains drop two (`unanswered`).
const EXPECTED_OUTCOMES: &[(&[&str], u64)] = &[
    (&["allowed", "established"], 33),
    (&["denied", "refused"], 2),
    (&["denied", "unanswered"], 2),
    (&["unexpected", "established"], 5),
];

/// `sum by (src_workload, dst_workload, dst_port)` of the unexpected flows, one round. Workloads
/// come from the owner references of the snapshot (`StatefulSet`, `DaemonSet`, a Deployment through
/// its `ReplicaSet`, a bare pod by its own name); a destination outside the cluster is `world`,
/// and port 80 there is `other` (no pod declares it and no policy names it).
const EXPECTED_UNEXPECTED: &[(&[&str], u64)] = &[
    (&["promtail", "loki", "9095"], 1),
    (
        &[
            "prometheus-kube-prometheus-stack-prometheus",
            "promtail",
            "3101",
        ],
        1,
    ),
    (&["debug-shell", "loki", "3100"], 1),
    (&["unipoller", "world", "other"], 1),
    (&["trivy-operator", "world", "other"], 1),
];

/// Runs `promql` until its non-zero series, keyed by `labels`, equal `want` (times [`ROUNDS`]).
fn exact(
    prometheus: &Prometheus,
    promql: &str,
    labels: &[&str],
    want: &[(&[&str], u64)],
) -> Result<()> {
    let want: BTreeMap<Vec<String>, u64> = want
        .iter()
        .map(|(k, n)| (k.iter().map(|s| (*s).to_owned()).collect(), n * ROUNDS))
        .collect();
    let mut got = BTreeMap::new();
    let settled = wait_for(Duration::from_secs(10), || {
        got.clear();
        for series in prometheus.query(promql)? {
            let key: Vec<String> = labels
                .iter()
                .map(|l| series["metric"][l].as_str().unwrap_or("").to_owned())
                .collect();
            let value: f64 = series["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no value in {series}"))?;
            if value != 0.0 {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "flow counts are small non-negative integers"
                )]
                got.insert(key, value.round() as u64);
            }
        }
        if got == want {
            Ok(())
        } else {
            bail!("not equal yet")
        }
    });
    settled.map_err(|_| anyhow::anyhow!("{promql}: want {want:?}, got {got:?}"))
}

/// What each client of [`SCRIPT`] must see: the lab's network itself must behave as designed
/// (enforced denials refused or silent, everything else answered) for the counts to mean much.
fn expected_seen(from: &str, to: &str, port: u16) -> Seen {
    match (from, to, port) {
        // nftables: velero's chains reset, localstack's drop.
        ("debug", "velero", 8085) | ("velero", "loki", 3100) => Seen::Refused,
        ("debug", "localstack", 4566) | ("localstack", "backblaze", 443) => Seen::Silent,
        _ => Seen::Answered,
    }
}

struct Checks {
    passed: usize,
    failed: usize,
}

impl Checks {
    fn record(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                eprintln!("lab e2e: ok: {name}");
            }
            Err(e) => {
                self.failed += 1;
                eprintln!("lab e2e: FAILED: {name}: {e:#}");
            }
        }
    }
}

/// Runs the lab e2e with the release `binary`; prints `lab e2e: N passed, M failed` and fails
/// when anything did.
pub fn run(root: &Path, binary: &Path) -> Result<()> {
    if !crate::is_root() {
        bail!("the lab e2e creates network namespaces and loads eBPF programs: run it as root");
    }
    catch_signals();
    let started = Instant::now();
    let mut checks = Checks {
        passed: 0,
        failed: 0,
    };
    let outcome = run_checks(root, binary, &mut checks);
    if let Err(e) = &outcome {
        checks.failed += 1;
        eprintln!("lab e2e: FAILED: the lab could not run: {e:#}");
    }
    eprintln!("lab e2e: took {}s", started.elapsed().as_secs());
    println!(
        "lab e2e: {} passed, {} failed",
        checks.passed, checks.failed
    );
    if checks.failed > 0 {
        bail!("lab e2e: {} check(s) failed", checks.failed);
    }
    Ok(())
}

fn run_checks(root: &Path, binary: &Path, checks: &mut Checks) -> Result<()> {
    let lab = Lab::up(binary, ANSWER_TIMEOUT, "lab-e2e")?;
    let target: SocketAddr = super::METRICS_ADDR.parse()?;
    let mut prometheus = Prometheus::start(
        lab.topo.node.name(),
        target,
        PROMETHEUS_ADDR.parse()?,
        &lab.dir.0,
    )?;
    prometheus.wait_ready(Duration::from_secs(30))?;
    checks.record(
        "Prometheus scrapes the daemon",
        wait_for(Duration::from_secs(15), || {
            let up = prometheus.query("up{job=\"flow-auditor\"} == 1")?;
            if up.is_empty() {
                bail!("up{{job=\"flow-auditor\"}} is not 1 yet");
            }
            Ok(())
        }),
    );

    let mut results = Vec::new();
    for round in 0..ROUNDS {
        if round > 0 {
            std::thread::sleep(ROUND_GAP);
        }
        results.extend(traffic::play_all(&lab.topo, SCRIPT));
    }
    checks.record("the lab's network behaves as designed", {
        let mut wrong = Vec::new();
        for (conv, seen) in SCRIPT.iter().cycle().zip(&results) {
            let want = expected_seen(conv.from, conv.to, conv.port);
            match seen {
                Ok(seen) if *seen == want => {}
                Ok(seen) => wrong.push(format!(
                    "{} -> {}:{} saw {seen:?}, want {want:?}",
                    conv.from, conv.to, conv.port
                )),
                Err(e) => wrong.push(format!("{e:#}")),
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{}", wrong.join("; ")))
        }
    });

    let want: BTreeMap<(String, String, String), u64> = EXPECTED
        .iter()
        .map(|(v, s, d, n, _)| {
            (
                ((*v).to_owned(), (*s).to_owned(), (*d).to_owned()),
                n * ROUNDS,
            )
        })
        .collect();
    let query = "sum by (verdict, src_namespace, dst_namespace) (flow_auditor_flows_total)";
    let mut last = BTreeMap::new();
    let settled = wait_for(SETTLE, || {
        last = by_pair(&prometheus.query(query)?)?;
        if last == want {
            Ok(())
        } else {
            bail!("not equal yet")
        }
    });
    checks.record(
        "flow_auditor_flows_total by verdict and namespace pair, through PromQL",
        settled.map_err(|_| anyhow::anyhow!("{}", diff(&want, &last))),
    );

    checks.record("one JSON log line per unexpected flow", {
        let (lines, _) = lab.daemon.unexpected();
        let log = std::fs::read_to_string(lab.dir.0.join("unexpected.jsonl")).unwrap_or_default();
        let flows = log
            .lines()
            .filter(|l| l.contains("\"unexpected flow\""))
            .count();
        let want_unexpected: u64 = EXPECTED
            .iter()
            .filter(|e| e.0 == "unexpected")
            .map(|e| e.3 * ROUNDS)
            .sum();
        if u64::try_from(flows).ok() == Some(want_unexpected) {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "{flows} unexpected-flow lines (of {lines} stdout lines), want {want_unexpected}:\n{log}"
            ))
        }
    });

    checks.record(
        "outcomes: denials refused by velero's resets, unanswered by localstack's drops",
        exact(
            &prometheus,
            "sum by (verdict, outcome) (flow_auditor_flows_total)",
            &["verdict", "outcome"],
            EXPECTED_OUTCOMES,
        ),
    );
    checks.record(
        "unexpected flows by workload and port",
        exact(
            &prometheus,
            "sum by (src_workload, dst_workload, dst_port) \
             (flow_auditor_flows_total{verdict=\"unexpected\"})",
            &["src_workload", "dst_workload", "dst_port"],
            EXPECTED_UNEXPECTED,
        ),
    );

    dashboard_checks(root, &prometheus, checks)?;

    drop(prometheus);
    checks.record(
        "SIGTERM stops the daemon cleanly and the lab leaves nothing",
        lab.down(),
    );
    Ok(())
}

/// The query result as (verdict, src, dst) -> flows, dropping zero-valued placeholder series.
fn by_pair(result: &[serde_json::Value]) -> Result<BTreeMap<(String, String, String), u64>> {
    let mut out = BTreeMap::new();
    for series in result {
        let label = |k: &str| series["metric"][k].as_str().unwrap_or("").to_owned();
        let value: f64 = series["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no value in {series}"))?;
        if value == 0.0 {
            continue;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "flow counts are small non-negative integers"
        )]
        let flows = value.round() as u64;
        out.insert(
            (
                label("verdict"),
                label("src_namespace"),
                label("dst_namespace"),
            ),
            flows,
        );
    }
    Ok(out)
}

fn diff(
    want: &BTreeMap<(String, String, String), u64>,
    got: &BTreeMap<(String, String, String), u64>,
) -> String {
    let mut lines = Vec::new();
    let why = |k: &(String, String, String)| {
        EXPECTED
            .iter()
            .find(|e| e.0 == k.0 && e.1 == k.1 && e.2 == k.2)
            .map_or("", |e| e.4)
    };
    for (k, n) in want {
        match got.get(k) {
            Some(g) if g == n => {}
            g => lines.push(format!(
                "  {} {} -> {}: want {n}, got {} ({})",
                k.0,
                k.1,
                k.2,
                g.map_or("none".to_owned(), u64::to_string),
                why(k)
            )),
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            lines.push(format!("  {} {} -> {}: want none, got {g}", k.0, k.1, k.2));
        }
    }
    format!("the counts differ:\n{}", lines.join("\n"))
}

/// Retries `f` every second until it succeeds or `limit` passes; the last error otherwise.
pub(super) fn wait_for(limit: Duration, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline || super::interrupted() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Every panel query of the Grafana dashboards in `deploy/dashboards/` must return data from
/// the Prometheus that scraped the lab.
fn dashboard_checks(root: &Path, prometheus: &Prometheus, checks: &mut Checks) -> Result<()> {
    let dir = root.join("deploy/dashboards");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!(
            "lab e2e: no {} yet: no dashboard queries to run",
            dir.display()
        );
        return Ok(());
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for file in files {
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        let json: serde_json::Value = match serde_json::from_str(&text) {
            Ok(j) => j,
            Err(e) => {
                checks.record(
                    &format!("{} parses", file.display()),
                    Err(anyhow::anyhow!("{e}")),
                );
                continue;
            }
        };
        let vars = Variables::of(&json);
        let mut queries = Vec::new();
        panel_queries(&json, &mut queries);
        let mut empty = Vec::new();
        for (title, expr) in &queries {
            let promql = vars.substitute(expr);
            let data = wait_for(Duration::from_secs(5), || {
                if prometheus.query(&promql)?.is_empty() {
                    bail!("no data");
                }
                Ok(())
            });
            if let Err(e) = data {
                empty.push(format!("panel {title:?}: {promql} ({e:#})"));
            }
        }
        let name = format!(
            "{}: all {} panel queries return data",
            file.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            queries.len()
        );
        let result = if queries.is_empty() {
            Err(anyhow::anyhow!("no panel queries found"))
        } else if empty.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "these returned nothing:\n  {}",
                empty.join("\n  ")
            ))
        };
        checks.record(&name, result);
        for (var, metric, label) in label_values_queries(&json) {
            let promql = vars.substitute(&metric);
            checks.record(
                &format!("variable ${var}: label_values({metric}, {label}) lists values"),
                prometheus.query(&promql).and_then(|series| {
                    if series
                        .iter()
                        .any(|s| s["metric"][&label].as_str().is_some_and(|v| !v.is_empty()))
                    {
                        Ok(())
                    } else {
                        bail!("{promql} has no series with a {label} label")
                    }
                }),
            );
        }
    }
    Ok(())
}

/// (variable, metric selector, label) of each query variable of the form
/// `label_values(selector, label)`: the drop-downs the panels' `$var` come from.
fn label_values_queries(dashboard: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or_default();
        if var["type"] != "query" {
            continue;
        }
        let Some(args) = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        else {
            continue;
        };
        if let (Some(name), Some((metric, label))) = (var["name"].as_str(), args.rsplit_once(',')) {
            out.push((
                name.to_owned(),
                metric.trim().to_owned(),
                label.trim().to_owned(),
            ));
        }
    }
    out
}

/// (panel title, expr) of every Prometheus target, rows' nested panels included.
fn panel_queries(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    for panel in v["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str()
                && !expr.trim().is_empty()
            {
                out.push((title.clone(), expr.to_owned()));
            }
        }
        panel_queries(panel, out);
    }
}

/// What Grafana's variables stand for when the lab runs a panel query: the dashboard's own
/// template variables as "All" selects them, its built-in intervals as windows this short-lived
/// Prometheus has data for. Any other `$name` (a `$1` or `$group` in `label_replace`) is the
/// query's own text and stays.
struct Variables(BTreeMap<String, String>);

impl Variables {
    /// The variables `dashboard` defines (`templating.list`), plus Grafana's built-ins.
    fn of(dashboard: &serde_json::Value) -> Self {
        let mut vars: BTreeMap<String, String> = [
            ("__rate_interval", "1m"),
            ("__interval", "15s"),
            ("__interval_ms", "15000"),
            ("__range", "5m"),
            ("__range_s", "300"),
            ("__range_ms", "300000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for var in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(name) = var["name"].as_str() else {
                continue;
            };
            // "All" is the custom all value when the dashboard sets one, else any value.
            let all = var["allValue"]
                .as_str()
                .filter(|v| !v.is_empty())
                .unwrap_or(".*");
            vars.insert(name.to_owned(), all.to_owned());
        }
        Self(vars)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `expr` with `$var`, `${var}`, `${var:format}` and `[[var]]` of known variables replaced.
    /// A matcher `label="$var"` becomes `label=~"..."`, as "All" needs a regex match.
    fn substitute(&self, expr: &str) -> String {
        let mut out = String::with_capacity(expr.len());
        let mut rest = expr;
        while let Some(i) = rest.find(['$', '[']) {
            out.push_str(&rest[..i]);
            let (name, len) = reference(&rest[i..]);
            if let Some((name, value)) = name.and_then(|n| Some((n, self.get(n)?))) {
                if !name.starts_with("__") && out.ends_with("=\"") && !out.ends_with("!=\"") {
                    out.truncate(out.len() - 2);
                    out.push_str("=~\"");
                }
                out.push_str(value);
                rest = &rest[i + len..];
            } else {
                // Not a variable of ours: keep the character and go on after it.
                let c = rest[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&rest[i..i + c]);
                rest = &rest[i + c..];
            }
        }
        out.push_str(rest);
        out
    }
}

/// The variable name `text` starts with in one of Grafana's syntaxes (`$name`, `${name}`,
/// `${name:format}`, `[[name]]`) and the length of the whole reference.
fn reference(text: &str) -> (Option<&str>, usize) {
    let word = |s: &str| {
        s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len())
    };
    if let Some(body) = text.strip_prefix("${") {
        let len = word(body);
        let tail = &body[len..];
        let close = if tail.starts_with('}') {
            Some(0)
        } else if tail.starts_with(':') {
            tail.find('}')
        } else {
            None
        };
        return match close {
            Some(close) if len > 0 => (Some(&body[..len]), 2 + len + close + 1),
            _ => (None, 0),
        };
    }
    if let Some(body) = text.strip_prefix("[[") {
        let len = word(body);
        return if len > 0 && body[len..].starts_with("]]") {
            (Some(&body[..len]), 2 + len + 2)
        } else {
            (None, 0)
        };
    }
    if let Some(body) = text.strip_prefix('$') {
        let len = word(body);
        if len > 0 {
            return (Some(&body[..len]), 1 + len);
        }
    }
    (None, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_variables() -> Variables {
        Variables::of(&serde_json::json!({
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "instance", "type": "query", "includeAll": true, "allValue": ".*",
                 "query": {"query": "label_values(flow_auditor_build_info, instance)"}},
                {"name": "verdict", "type": "custom", "includeAll": true,
                 "query": "allowed,denied,unexpected"},
                {"name": "ns", "type": "custom", "includeAll": true, "allValue": "web|db",
                 "query": "web,db"},
            ]}
        }))
    }

    #[test]
    fn the_dashboards_variables_become_their_all_values() {
        let vars = lab_variables();
        let got = vars.substitute(
            "sum(rate(x{instance=\"$instance\",verdict=~\"${verdict}\",a=~\"${ns:regex}\",b!=\"[[ns]]\"}[$__rate_interval]))",
        );
        let want = "sum(rate(x{instance=~\".*\",verdict=~\".*\",a=~\"web|db\",b!=\"web|db\"}[1m]))";
        assert!(got == want, "got {got}\nwant {want}");
    }

    #[test]
    fn regex_replacement_references_and_unknown_names_stay() {
        let vars = lab_variables();
        // `$1`, `${1}`, named groups (`$src`, `${dst}`), a `$` with no name, brackets that are
        // a range selector: none is a variable of the dashboard.
        let kept = "label_replace(label_replace(x[$__range], \"a\", \"$1-${1}\", \"k\", \"(.+)\"), \"b\", \"$src/${dst}$\", \"k\", \"(?P<src>.+)/(?P<dst>.+)\")[5m:1m]";
        let got = vars.substitute(kept);
        let want = kept.replace("$__range", "5m");
        assert!(got == want, "got {got}\nwant {want}");
        let got = vars.substitute("x{instance=\"$instances\"} + y{v=\"${verdict\"}");
        let want = "x{instance=\"$instances\"} + y{v=\"${verdict\"}";
        assert!(got == want, "got {got}\nwant {want}");
    }

    #[test]
    fn label_values_variables_name_their_metric_and_label() {
        let dashboard = serde_json::json!({"templating": {"list": [
            {"name": "instance", "type": "query",
             "query": {"query": "label_values(flow_auditor_build_info{job=\"a,b\"}, instance)"}},
            {"name": "verdict", "type": "custom", "query": "label_values(nope, x)"},
        ]}});
        let got = label_values_queries(&dashboard);
        let want = [(
            "instance".to_owned(),
            "flow_auditor_build_info{job=\"a,b\"}".to_owned(),
            "instance".to_owned(),
        )];
        assert!(got == want, "got {got:?}");
    }

    /// The lab's network without the daemon: Calico-style routing, the LAN router, the external
    /// hosts and the nftables enforcement give every conversation of the script the answer the
    /// expectations assume; and the teardown leaves no namespace behind.
    #[test]
    #[ignore = "needs root and the kernel; run by cargo xtask test"]
    fn the_lab_network_answers_as_designed_and_is_removed() {
        let prefix = format!("{}{}-", super::super::net::PREFIX, std::process::id());
        {
            let topo = super::super::net::Topology::build()
                .unwrap_or_else(|e| panic!("building the lab: {e:#}"));
            let _nft = super::super::net::Enforcement::load(&topo.node)
                .unwrap_or_else(|e| panic!("loading nftables: {e:#}"));
            let _servers = super::super::traffic::Servers::start(&topo)
                .unwrap_or_else(|e| panic!("starting servers: {e:#}"));
            let results = traffic::play_all(&topo, SCRIPT);
            let mut wrong = Vec::new();
            for (conv, seen) in SCRIPT.iter().zip(results) {
                let want = expected_seen(conv.from, conv.to, conv.port);
                match seen {
                    Ok(seen) if seen == want => {}
                    other => wrong.push(format!(
                        "{} -> {}:{}/{}: {other:?}, want {want:?}",
                        conv.from,
                        conv.to,
                        conv.port,
                        conv.proto.as_str()
                    )),
                }
            }
            assert!(
                wrong.is_empty(),
                "conversations went wrong:\n{}",
                wrong.join("\n")
            );
        }
        let list = super::super::net::cmd("ip", &["netns", "list"])
            .unwrap_or_else(|e| panic!("ip netns list: {e:#}"));
        assert!(
            !list.lines().any(|l| l.starts_with(&prefix)),
            "lab namespaces left behind:\n{list}"
        );
    }

    /// The comparison itself: placeholder zeros are ignored, a missing, extra or different
    /// count is reported with the reason written next to the expectation.
    #[test]
    fn counts_compare_exactly_and_name_the_difference() {
        let result: Vec<serde_json::Value> = serde_json::from_str(
            r#"[
              {"metric": {"verdict": "allowed", "src_namespace": "default", "dst_namespace": "default"}, "value": [1, "4"]},
              {"metric": {"verdict": "denied", "src_namespace": "", "dst_namespace": ""}, "value": [1, "0"]},
              {"metric": {"verdict": "unexpected", "src_namespace": "loki", "dst_namespace": "loki"}, "value": [1, "3"]}
            ]"#,
        )
        .unwrap_or_else(|e| panic!("bad fixture: {e}"));
        let got = by_pair(&result).unwrap_or_else(|e| panic!("by_pair: {e:#}"));
        let key = |v: &str, s: &str, d: &str| (v.to_owned(), s.to_owned(), d.to_owned());
        let want: BTreeMap<_, _> = [
            (key("allowed", "default", "default"), 4),
            (key("unexpected", "loki", "loki"), 2),
            (key("allowed", "velero", ""), 2),
        ]
        .into_iter()
        .collect();
        assert!(
            got.len() == 2,
            "the zero-valued placeholder should be dropped: {got:?}"
        );
        let text = diff(&want, &got);
        for needle in [
            "unexpected loki -> loki: want 2, got 3 (Promtail to Loki's gRPC 9095",
            "allowed velero -> : want 2, got none",
        ] {
            assert!(text.contains(needle), "diff lacks {needle:?}:\n{text}");
        }
        assert!(
            !text.contains("default -> default"),
            "an equal count was reported as a difference:\n{text}"
        );
    }

    #[test]
    fn expectations_cover_every_conversation_of_the_script() {
        let by_verdict =
            |v: &str| -> u64 { EXPECTED.iter().filter(|e| e.0 == v).map(|e| e.3).sum() };
        let outcomes = |v: &str| -> u64 {
            EXPECTED_OUTCOMES
                .iter()
                .filter(|(k, _)| k[0] == v)
                .map(|(_, n)| n)
                .sum()
        };
        for verdict in ["allowed", "denied", "unexpected"] {
            assert!(
                by_verdict(verdict) == outcomes(verdict),
                "{verdict}: the pair table and the outcome table disagree"
            );
        }
        let unexpected: u64 = EXPECTED_UNEXPECTED.iter().map(|(_, n)| n).sum();
        assert!(
            unexpected == by_verdict("unexpected"),
            "the workload table counts {unexpected} unexpected flows"
        );
        let total: u64 = EXPECTED.iter().map(|e| e.3).sum();
        assert!(
            total == SCRIPT.len() as u64,
            "EXPECTED counts {total} flows but the script plays {}",
            SCRIPT.len()
        );
    }
}
