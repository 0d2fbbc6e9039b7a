//! Every case of the netpol-analyzer conformance corpus (`shared/conformance/netpol-analyzer`),
//! run through `auditor check`'s own code path (`check::run`): each flow's verdict must equal
//! the analyzer's expectation. Prints per-case counts; a failure lists the disagreements.

use std::io::Read;
use std::path::{Path, PathBuf};

use auditor::check::{self, CheckArgs, OutputFormat};

fn corpus() -> PathBuf {
    // CI clones the repository with `shared/` beside it.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/netpol-analyzer")
}

#[derive(serde::Deserialize)]
struct Expected {
    expected: String,
}

#[derive(serde::Deserialize)]
struct Verdict {
    verdict: String,
    reason: String,
}

struct CaseResult {
    name: String,
    flows: usize,
    disagreements: Vec<String>,
}

fn run_case(dir: &Path) -> CaseResult {
    let name = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let gz = std::fs::File::open(dir.join("flows.jsonl.gz"))
        .unwrap_or_else(|e| panic!("{name}: cannot open flows.jsonl.gz: {e}"));
    let mut input = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut input)
        .unwrap_or_else(|e| panic!("{name}: cannot decompress flows.jsonl.gz: {e}"));
    let args = CheckArgs {
        cluster: vec![dir.join("cluster.yaml")],
        policies: None,
        config: None,
        flows: PathBuf::from("-"),
        output: OutputFormat::Jsonl,
    };
    let mut output = Vec::new();
    if let Err(e) = check::run(&args, input.as_bytes(), &mut output) {
        panic!("{name}: auditor check failed: {e}");
    }
    let output = String::from_utf8(output).unwrap_or_else(|e| panic!("{name}: output: {e}"));
    let inputs: Vec<&str> = input.lines().filter(|l| !l.trim().is_empty()).collect();
    let outputs: Vec<&str> = output.lines().collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{name}: {} flows in, {} verdicts out",
        inputs.len(),
        outputs.len()
    );
    let mut disagreements = Vec::new();
    for (i, (line_in, line_out)) in inputs.iter().zip(&outputs).enumerate() {
        let flow: Expected = serde_json::from_str(line_in)
            .unwrap_or_else(|e| panic!("{name}:{}: bad input line: {e}", i + 1));
        let verdict: Verdict = serde_json::from_str(line_out)
            .unwrap_or_else(|e| panic!("{name}:{}: bad output line: {e}", i + 1));
        if flow.expected != verdict.verdict {
            disagreements.push(format!(
                "{name}:{}: {line_in} -> {}: {}",
                i + 1,
                verdict.verdict,
                verdict.reason
            ));
        }
    }
    CaseResult {
        name,
        flows: inputs.len(),
        disagreements,
    }
}

#[test]
fn netpol_analyzer_corpus_agrees() {
    let root = corpus();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("cluster.yaml").is_file())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 38,
        "expected the 38 cases of the corpus in {}, found {}",
        root.display(),
        cases.len()
    );
    // Two workers: the corpus is large and this machine has two cores.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<CaseResult> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(case) = cases.get(i) else { break done };
                        done.push(run_case(case));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join()
                    .unwrap_or_else(|_| panic!("a case worker panicked"))
            })
            .collect()
    });
    results.sort_by(|a, b| a.name.cmp(&b.name));
    let mut total = 0;
    let mut failures = Vec::new();
    for result in results {
        println!(
            "{:<70} {:>7} flows {:>5} disagreements",
            result.name,
            result.flows,
            result.disagreements.len()
        );
        total += result.flows;
        failures.extend(result.disagreements);
    }
    println!(
        "{} cases, {total} flows, {} disagreements",
        cases.len(),
        failures.len()
    );
    if !failures.is_empty() {
        let shown: Vec<&String> = failures.iter().take(40).collect();
        panic!(
            "{} of {total} flows disagree with the corpus (first {}):\n{}",
            failures.len(),
            shown.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(total > 300_000, "only {total} flows were checked");
}
