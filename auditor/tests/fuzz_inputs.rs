//! Property tests standing in for a fuzzer, bounded so CI runs them in seconds: the object
//! loader and the flow-line parser never panic on any input, errors are errors, and what parses
//! parses to what was written. Mutated real clusters must load-or-fail and then judge flows.

use std::path::Path;

use auditor::audit::{ClusterConfig, FlowQuery};
use auditor::check;
use auditor::decode::Strictness;
use auditor::policy::model::IpBlockReading;
use auditor::source::load::{self, Located, Select};
use auditor::vocab::Protocol;
use proptest::prelude::*;

const CLUSTER: &str = include_str!("fixtures/calico-homelab/cluster.yaml");
const POLICIES: &str = include_str!("fixtures/calico-homelab/policies.yaml");

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Replaces, deletes or inserts characters at a few positions of a valid manifest.
fn mutate(text: &str, edits: &[(usize, u8, u8)]) -> String {
    let mut bytes: Vec<u8> = text.as_bytes().to_vec();
    for &(at, op, byte) in edits {
        if bytes.is_empty() {
            break;
        }
        let at = at % bytes.len();
        // Characters that matter to YAML and to the objects' fields.
        let pool = b" :-[]{}\n#'\"0123456789abcxyz.,/*&!|>";
        let c = pool[usize::from(byte) % pool.len()];
        match op % 3 {
            0 => bytes[at] = c,
            1 => {
                bytes.remove(at);
            }
            _ => bytes.insert(at, c),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn judge_some(objects: Vec<Located>) {
    let mut model = check::cluster_from(
        objects,
        ClusterConfig {
            ipblock: IpBlockReading::Calico,
            ingress: Vec::new(),
        },
    );
    for (src, dst, port) in [
        ("10.244.1.20", "10.244.2.80", 8085),
        ("10.244.2.80", "10.96.0.1", 443),
        ("10.244.1.60", "10.244.2.61", 9095),
        ("203.0.113.1", "10.244.1.2", 53),
    ] {
        let flow = FlowQuery {
            src: src.parse().unwrap_or_else(|_| panic!("ip")),
            dst: dst.parse().unwrap_or_else(|_| panic!("ip")),
            protocol: Protocol::Tcp,
            port,
        };
        let verdict = model.verdict(&flow);
        let explanation = model.explain(&flow, &verdict);
        assert!(!explanation.reason.is_empty());
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn loader_survives_any_text(text in ".{0,400}") {
        for name in ["any.yaml", "any.json"] {
            let _ = load::load_text(Path::new(name), &text, Select::ALL, Strictness::Strict);
        }
    }

    #[test]
    fn loader_survives_mutated_clusters(
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
        policies in any::<bool>(),
    ) {
        let source = if policies { POLICIES } else { CLUSTER };
        let text = mutate(source, &edits);
        // Compile errors are fine (bad CIDRs, ...); a panic is not.
        match load::load_text(Path::new("mutated.yaml"), &text, Select::ALL, Strictness::Strict) {
            Ok(out) => judge_some(out),
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.contains("mutated.yaml"), "error without the file: {message}");
            }
        }
    }

    #[test]
    fn flow_parser_survives_any_line(line in ".{0,200}") {
        let _ = check::parse_flow(&line);
    }

    #[test]
    fn flow_parser_round_trips(
        src in any::<std::net::IpAddr>(),
        dst in any::<std::net::IpAddr>(),
        protocol in prop::sample::select(vec!["TCP", "udp", "SCTP", "ICMP", "icmpv6", "GRE", ""]),
        port in any::<i64>(),
        extra in "[a-z]{0,8}",
    ) {
        let line = format!(
            r#"{{"src": "{src}", "dst": "{dst}", "protocol": "{protocol}", "port": {port}, "x{extra}": [1, {{}}]}}"#
        );
        match check::parse_flow(&line) {
            Ok(flow) => {
                prop_assert_eq!(flow.src, src);
                prop_assert_eq!(flow.dst, dst);
                prop_assert_eq!(Some(flow.protocol), Protocol::parse(protocol));
                prop_assert_eq!(i64::from(flow.port), port);
            }
            Err(message) => {
                let bad_protocol = Protocol::parse(protocol).is_none();
                let bad_port = u16::try_from(port).is_err();
                prop_assert!(bad_protocol || bad_port, "{line}: {message}");
            }
        }
    }
}
