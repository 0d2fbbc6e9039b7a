//! Which TC hook the running kernel offers, and what of ours is attached to an interface, read
//! back from the kernel: TCX programs through `BPF_PROG_QUERY`, clsact filters through `tc`.
//! Kernel tests use it to expect TCX where the kernel has it (6.6+) and clsact filters where it
//! does not (Debian 12's 6.1), instead of assuming the kernel they were written on.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

use std::ffi::CString;

use auditor::datapath::attach::HookMode;
use aya::{
    programs::{ProgramError, SchedClassifier, TcAttachType},
    sys::SyscallError,
};

use super::netns::Netns;

/// Whether the kernel has TCX, probed the way it answers: `BPF_PROG_QUERY` for the TCX ingress
/// attach type on `lo` of `ns` succeeds on 6.6+ and fails with `EINVAL` (an attach type it does
/// not know) before. Read-only: nothing is attached.
pub fn tcx_supported(ns: &Netns) -> bool {
    ns.run(
        || match SchedClassifier::query_tcx(c"lo", TcAttachType::Ingress) {
            Ok(_) => true,
            Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                false
            }
            Err(e) => panic!("probing TCX with BPF_PROG_QUERY on lo: {e}"),
        },
    )
}

/// The hook mode the agent's `auto` attach mode must pick on this kernel.
pub fn expected_mode(ns: &Netns) -> HookMode {
    if tcx_supported(ns) {
        HookMode::Tcx
    } else {
        HookMode::Clsact
    }
}

/// Program ids of ours (named `flow_auditor*`) attached by TCX to `ifname` in `ns`: (ingress,
/// egress). Empty on a kernel without TCX, where nothing can be attached that way.
pub fn tcx_programs(ns: &Netns, ifname: &str) -> (Vec<u32>, Vec<u32>) {
    if !tcx_supported(ns) {
        return (vec![], vec![]);
    }
    let name = CString::new(ifname).unwrap_or_else(|e| panic!("{e}"));
    ns.run(|| {
        let query = |attach_type| {
            let (_, programs) = SchedClassifier::query_tcx(&name, attach_type)
                .unwrap_or_else(|e| panic!("query_tcx {ifname}: {e}"));
            programs
                .iter()
                .filter(|p| {
                    p.name_as_str()
                        .is_some_and(|n| n.starts_with("flow_auditor"))
                })
                .map(aya::programs::ProgramInfo::id)
                .collect::<Vec<_>>()
        };
        (query(TcAttachType::Ingress), query(TcAttachType::Egress))
    })
}

/// One filter of a clsact qdisc, as `tc filter show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClsactFilter {
    /// The filter's priority (`pref`): lower runs first.
    pub pref: u32,
    /// The name the filter was given (ours: the program's name).
    pub name: String,
    /// The id of the BPF program it runs.
    pub program_id: u32,
}

/// The BPF filters on `ifname`'s clsact `direction` (`ingress` or `egress`) in `ns`, in the
/// order `tc` lists them (the order they run in). Empty when there is no clsact qdisc.
pub fn clsact_filters(ns: &Netns, ifname: &str, direction: &str) -> Vec<ClsactFilter> {
    let mut full = vec!["netns", "exec", ns.name()];
    full.extend_from_slice(&["tc", "filter", "show", "dev", ifname, direction]);
    let out = std::process::Command::new("ip")
        .args(&full)
        .output()
        .unwrap_or_else(|e| panic!("cannot run tc: {e}"));
    // Without a clsact qdisc tc says so on stderr and lists nothing.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_filter)
        .collect()
}

/// `filter protocol all pref 49152 bpf chain 0 handle 0x1 NAME direct-action not_in_hw id 45
/// name NAME tag ... jited`; `None` for other lines (the chain header without a handle).
fn parse_filter(line: &str) -> Option<ClsactFilter> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .copied()
    };
    if words.first() != Some(&"filter") || !words.contains(&"bpf") {
        return None;
    }
    let pref = after("pref")?.parse().ok()?;
    let name = after(after("handle")?)?;
    let program_id = after("id")?.parse().ok()?;
    Some(ClsactFilter {
        pref,
        // iproute2 prints the name with the program id appended (`NAME:[45]`) on some versions.
        name: name.split(":[").next().unwrap_or(name).to_owned(),
        program_id,
    })
}

/// Program ids of our clsact filters (named `flow_auditor*`) on `ifname` in `ns`: (ingress,
/// egress).
pub fn clsact_programs(ns: &Netns, ifname: &str) -> (Vec<u32>, Vec<u32>) {
    let ours = |direction| {
        clsact_filters(ns, ifname, direction)
            .into_iter()
            .filter(|f| f.name.starts_with("flow_auditor"))
            .map(|f| f.program_id)
            .collect::<Vec<_>>()
    };
    (ours("ingress"), ours("egress"))
}

/// Program ids of ours attached to `ifname` in `ns` by `mode`: (ingress, egress).
pub fn programs(ns: &Netns, ifname: &str, mode: HookMode) -> (Vec<u32>, Vec<u32>) {
    match mode {
        HookMode::Tcx => tcx_programs(ns, ifname),
        HookMode::Clsact => clsact_programs(ns, ifname),
    }
}

/// Whether anything of ours is attached to `ifname` in `ns`, by either mode.
pub fn anything_attached(ns: &Netns, ifname: &str) -> bool {
    let (tcx_in, tcx_out) = tcx_programs(ns, ifname);
    let (cls_in, cls_out) = clsact_programs(ns, ifname);
    !(tcx_in.is_empty() && tcx_out.is_empty() && cls_in.is_empty() && cls_out.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_filter_lines_parse() {
        let line = "filter protocol all pref 49151 bpf chain 0 handle 0x1 flow_auditor_ingress \
                    direct-action not_in_hw id 45 name flow_auditor_i tag 0123456789abcdef jited ";
        assert_eq!(
            parse_filter(line),
            Some(ClsactFilter {
                pref: 49151,
                name: "flow_auditor_ingress".into(),
                program_id: 45,
            })
        );
        let bracketed = "filter protocol all pref 1 bpf chain 0 handle 0x1 noop:[7] direct-action \
                         not_in_hw id 7 tag 00 jited";
        assert_eq!(
            parse_filter(bracketed).map(|f| (f.name, f.program_id)),
            Some(("noop".into(), 7))
        );
        assert_eq!(
            parse_filter("filter protocol all pref 49152 bpf chain 0 "),
            None
        );
        assert_eq!(parse_filter(""), None);
    }
}
