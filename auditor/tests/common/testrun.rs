//! Runs crafted packets through the loaded TC programs with `BPF_PROG_TEST_RUN` (aya's
//! `TestRun`) and reads back what the program recorded: flow table entries, ring buffer events
//! and counters. Each [`Harness`] loads its own copy of the object, so its maps are private to
//! one test.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

use auditor::datapath::load::{CounterTotals, Datapath, DatapathConfig};
use auditor_ebpf::{
    PROGRAM_EGRESS, PROGRAM_INGRESS, PROGRAM_UPLINK_EGRESS, PROGRAM_UPLINK_INGRESS,
    flow::{FlowEvent, FlowKey, FlowState, Hook},
};
use aya::programs::{TestRun as _, TestRunOptions};

/// `TC_ACT_UNSPEC`, which is also `TCX_NEXT`: "let the next program decide".
pub const PASS: u32 = u32::MAX;

pub struct Harness {
    pub datapath: Datapath,
}

impl Harness {
    /// Loads the datapath with a small flow table.
    pub fn new() -> Self {
        Self::with_config(&DatapathConfig {
            flow_table_entries: 4096,
            events_bytes: 256 * 1024,
            sample_every: 1,
            kernel_log: false,
            ..DatapathConfig::default()
        })
    }

    pub fn with_config(config: &DatapathConfig) -> Self {
        match Datapath::load(config) {
            Ok(datapath) => Self { datapath },
            Err(e) => panic!("loading the datapath failed: {}", error_chain(&e)),
        }
    }

    /// Runs `frame` through the program of `hook` once and returns its return code.
    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> u32 {
        self.run_repeat(hook, frame, 1).0
    }

    /// Runs `frame` `repeat` times; returns the return code and the kernel's mean ns per run.
    pub fn run_repeat(&mut self, hook: Hook, frame: &[u8], repeat: u32) -> (u32, u64) {
        let name = match hook {
            Hook::Ingress => PROGRAM_INGRESS,
            Hook::Egress => PROGRAM_EGRESS,
            Hook::UplinkIngress => PROGRAM_UPLINK_INGRESS,
            Hook::UplinkEgress => PROGRAM_UPLINK_EGRESS,
        };
        run_program(&mut self.datapath, name, frame, repeat)
    }

    /// Runs `frame` and panics unless the program passed it on.
    pub fn pass(&mut self, hook: Hook, frame: &[u8]) {
        let rc = self.run(hook, frame);
        assert_eq!(
            rc, PASS,
            "the program must return TC_ACT_UNSPEC (-1), got {rc:#x}"
        );
    }

    /// Every event in the ring buffer now, oldest first.
    pub fn events(&mut self) -> Vec<FlowEvent> {
        let mut ring = match self.datapath.events_mut() {
            Ok(r) => r,
            Err(e) => panic!("opening the ring buffer failed: {}", error_chain(&e)),
        };
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(
                item.len(),
                size_of::<FlowEvent>(),
                "a ring buffer record must be exactly one FlowEvent"
            );
            // SAFETY: the length was just checked, FlowEvent is Pod, and read_unaligned makes no
            // alignment assumption.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        out
    }

    /// The flow table entry of `key`, if any.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowState> {
        let flows = match self.datapath.flows() {
            Ok(f) => f,
            Err(e) => panic!("opening the flow table failed: {}", error_chain(&e)),
        };
        flows.get(key).ok()
    }

    /// Number of entries in the flow tables (IPv4 TCP, other IPv4, the rest).
    pub fn flow_count(&self) -> usize {
        let flows = match self.datapath.flows() {
            Ok(f) => f,
            Err(e) => panic!("opening the flow table failed: {}", error_chain(&e)),
        };
        flows.iter().flatten().count()
    }

    pub fn counters(&self) -> CounterTotals {
        match self.datapath.counter_totals() {
            Ok(c) => c,
            Err(e) => panic!("reading the counters failed: {}", error_chain(&e)),
        }
    }
}

/// Runs program `name` of `datapath` on `frame` `repeat` times.
pub fn run_program(
    datapath: &mut Datapath,
    name: &'static str,
    frame: &[u8],
    repeat: u32,
) -> (u32, u64) {
    let program = match datapath.program(name) {
        Ok(p) => p,
        Err(e) => panic!("program {name}: {}", error_chain(&e)),
    };
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::default()
    };
    match program.test_run(opts) {
        Ok(r) => {
            let ns = u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX);
            (r.return_value, ns)
        }
        Err(e) => panic!(
            "BPF_PROG_TEST_RUN of {name} on a {}-byte frame failed: {}",
            frame.len(),
            error_chain(&e)
        ),
    }
}

/// `CLOCK_MONOTONIC_COARSE` now, the clock the program stamps flows with.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE) failed");
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

/// An error and its sources on one line (the verifier log is in there when loading fails).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
