//! flow-auditor's TC program: observes every packet at TC ingress and egress, keeps one entry per
//! flow in an LRU table and tells user space, through a ring buffer, when a flow starts, is
//! answered, refused or closed. It never changes a packet or its fate: it always returns
//! `TC_ACT_UNSPEC` (`TCX_NEXT` under TCX, the same -1) so the next program, the CNI's, decides.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod diag;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod track;

#[cfg(target_arch = "bpf")]
mod program {
    use auditor_ebpf::{
        DEFAULT_EVENTS_BYTES, DEFAULT_FLOW_TABLE_ENTRIES,
        flow::{Counter, FlowKey, FlowKey4, FlowKeyTcp4, FlowState, Hook},
    };
    use aya_ebpf::{
        bindings::TC_ACT_UNSPEC,
        macros::{classifier, map},
        maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
        programs::TcContext,
    };

    /// The flow table of non-IPv4 flows ([`auditor_ebpf::FLOWS_MAP`]); the loader sets its
    /// real size.
    #[map]
    pub static FLOWS: LruHashMap<FlowKey, FlowState> =
        LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_ENTRIES, 0);

    /// The flow table of IPv4 flows but TCP ([`auditor_ebpf::FLOWS4_MAP`]); the loader sets its
    /// real size.
    #[map]
    pub static FLOWS4: LruHashMap<FlowKey4, FlowState> =
        LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_ENTRIES, 0);

    /// The flow table of IPv4 TCP flows ([`auditor_ebpf::FLOWS4_TCP_MAP`]); the loader sets its
    /// real size.
    #[map]
    pub static FLOWS4_TCP: LruHashMap<FlowKeyTcp4, FlowState> =
        LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_ENTRIES, 0);

    /// The flows user space counted ([`auditor_ebpf::REPORTED_MAP`]). No program reads or writes
    /// it: it is declared here so the object carries it (an exported symbol, which the linker
    /// keeps though no program refers to it) and the loader creates, sizes and pins it like
    /// the tables. `BPF_F_NO_PREALLOC`: memory only for the flows counted, not for every
    /// possible one.
    #[map]
    pub static REPORTED: HashMap<FlowKey, u64> = HashMap::with_max_entries(
        3 * DEFAULT_FLOW_TABLE_ENTRIES,
        aya_ebpf::bindings::BPF_F_NO_PREALLOC,
    );

    /// Flow events ([`auditor_ebpf::EVENTS_MAP`]); the loader sets its real size.
    #[map]
    pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_EVENTS_BYTES, 0);

    /// Per-CPU counters ([`auditor_ebpf::COUNTERS_MAP`]), indexed by [`Counter`].
    #[map]
    pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

    /// [`auditor_ebpf::SAMPLE_EVERY_GLOBAL`]. In `.rodata`, so once the loader has set it the
    /// verifier sees a constant and prunes the sampling code when it is off.
    #[unsafe(no_mangle)]
    pub static SAMPLE_EVERY: u32 = 0;

    /// [`auditor_ebpf::WIREGUARD_PORT_GLOBAL`], host byte order; in `.rodata` like
    /// [`SAMPLE_EVERY`]. Only the uplink programs read it.
    #[unsafe(no_mangle)]
    pub static WIREGUARD_PORT: u16 = auditor_ebpf::DEFAULT_WIREGUARD_PORT;

    #[classifier]
    pub fn flow_auditor_ingress(ctx: TcContext) -> i32 {
        crate::track::observe(&ctx, Hook::Ingress);
        TC_ACT_UNSPEC
    }

    #[classifier]
    pub fn flow_auditor_egress(ctx: TcContext) -> i32 {
        crate::track::observe(&ctx, Hook::Egress);
        TC_ACT_UNSPEC
    }

    /// An uplink's ingress: a program of its own so the hook kind is a constant to the
    /// verifier and the encapsulation check exists only here, never on a pod interface.
    #[classifier]
    pub fn flow_auditor_uplink_ingress(ctx: TcContext) -> i32 {
        crate::track::observe(&ctx, Hook::UplinkIngress);
        TC_ACT_UNSPEC
    }

    #[classifier]
    pub fn flow_auditor_uplink_egress(ctx: TcContext) -> i32 {
        crate::track::observe(&ctx, Hook::UplinkEgress);
        TC_ACT_UNSPEC
    }

    /// The benchmark's baseline: what a TC program costs when it does nothing.
    #[classifier]
    pub fn flow_auditor_noop(_ctx: TcContext) -> i32 {
        TC_ACT_UNSPEC
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        // Unreachable in a verified program: the verifier rejects any path that could get here.
        loop {}
    }

    // GPL-compatible so every helper is usable; the user-space code stays Apache-2.0.
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// Built for the host only so `cargo` commands over the whole workspace have something to build;
/// the real program exists for the bpf target alone.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
