//! Types shared by the TC program and user space, defined once (kunai-style): each module's
//! `mod.rs` holds the `#[repr(C)]` layout, `user.rs` (feature `user`) the aya `Pod` impls and
//! formatting. Map, program and global names are constants both sides use.
// std only for the host unit tests.
#![cfg_attr(not(test), no_std)]

pub mod flow;

/// Flow table of every flow that is not IPv4: LRU hash, [`flow::FlowKey`] -> [`flow::FlowState`].
/// Its size is set by the loader (`set_max_entries`); [`DEFAULT_FLOW_TABLE_ENTRIES`] is the
/// compiled-in default.
pub const FLOWS_MAP: &str = "FLOWS";
/// Flow table of IPv4 flows other than TCP (both addresses IPv4-mapped in the
/// [`flow::FlowKey`]): LRU hash, [`flow::FlowKey4`] -> [`flow::FlowState`], sized like
/// [`FLOWS_MAP`]. A flow is in exactly one of the three tables: [`flow::FlowKey::narrow`] picks
/// the IPv4 ones, [`flow::FlowKey4::tcp`] the TCP one among those.
pub const FLOWS4_MAP: &str = "FLOWS4";
/// Flow table of IPv4 TCP flows: LRU hash, [`flow::FlowKeyTcp4`] -> [`flow::FlowState`], sized
/// like [`FLOWS_MAP`].
pub const FLOWS4_TCP_MAP: &str = "FLOWS4_TCP";
/// The flows an agent counted: plain hash (not LRU: nothing in it is evicted to make room),
/// [`flow::FlowKey`] -> `u64`, the `first_seen_ns` of the flow's table entry when it was counted.
/// A flow is counted iff its entry's `first_seen_ns` equals the value here, so an entry recreated
/// under the same key (after an eviction, or a reused 5-tuple) is not taken for counted. Written
/// by user space only (the program never touches it, so marking a flow neither rewrites its
/// table entry nor races the program's updates of it); pinned beside the flow tables so an agent
/// adopting them after a restart knows what its predecessor counted. Sized by the loader to the
/// three tables' entries together; allocated as entries are written (`BPF_F_NO_PREALLOC`).
pub const REPORTED_MAP: &str = "REPORTED";
/// Ring buffer of [`flow::FlowEvent`]s. Its size must be a power-of-two multiple of the page size;
/// the loader rounds the configured size up.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU array of `u64` counters, indexed by [`flow::Counter`] (`max_entries` is
/// [`flow::Counter::COUNT`]).
pub const COUNTERS_MAP: &str = "COUNTERS";

/// The TC program for the ingress hook.
pub const PROGRAM_INGRESS: &str = "flow_auditor_ingress";
/// The TC program for the egress hook.
pub const PROGRAM_EGRESS: &str = "flow_auditor_egress";
/// The TC program for an uplink's ingress (a native or tunnel device of the node).
pub const PROGRAM_UPLINK_INGRESS: &str = "flow_auditor_uplink_ingress";
/// The TC program for an uplink's egress.
pub const PROGRAM_UPLINK_EGRESS: &str = "flow_auditor_uplink_egress";
/// A program that only returns `TC_ACT_UNSPEC`: the baseline of the datapath benchmark. Never
/// attached.
pub const PROGRAM_NOOP: &str = "flow_auditor_noop";

/// Global (`u32`, read-only once loaded): keep one in this many packets of an answered flow that
/// carry no state change; 0 or 1 keeps every packet. Set by the loader with `set_global`.
pub const SAMPLE_EVERY_GLOBAL: &str = "SAMPLE_EVERY";

/// Global (`u16`, read-only once loaded): the UDP port of WireGuard on this node's uplinks
/// (Calico's default 51820, Cilium's 51871). Packets to or from it on an uplink are
/// encapsulation, counted in [`flow::Counter::Encapsulated`]; 0 turns the check off. Set by the
/// loader with `set_global`.
pub const WIREGUARD_PORT_GLOBAL: &str = "WIREGUARD_PORT";
/// Its default.
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;

/// The `target` of every log record the program writes (aya-log, on its rare paths only, and only
/// when the loader turns logging on); user space re-emits the records as `tracing` events under
/// this same target.
pub const KERNEL_LOG_TARGET: &str = "auditor_ebpf";
/// aya-log's ring buffer of log records, as aya-log-ebpf names it. Its size is aya-log's default
/// (128 KiB) when logging is on; the loader shrinks it to one page when it is off.
pub const KERNEL_LOG_MAP: &str = "AYA_LOGS";

/// Compiled-in size of each flow table, used when the loader does not override it.
pub const DEFAULT_FLOW_TABLE_ENTRIES: u32 = 65_536;
/// Compiled-in ring buffer size in bytes (a multiple of every page size Linux uses).
pub const DEFAULT_EVENTS_BYTES: u32 = 1024 * 1024;

/// How many bytes from the start of the packet the program can read headers from. A packet whose
/// headers lie beyond this (deep IPv6 extension chains, ICMP errors quoting them) is counted as
/// [`flow::Counter::Truncated`].
pub const MAX_HEADER_BYTES: u32 = 256;
