//! Types shared by the TC program and user space, defined once (kunai-style): each module's
//! `mod.rs` holds the `#[repr(C)]` layout, `user.rs` (feature `user`) the aya `Pod` impls and
//! formatting. Map names are constants both sides use.
#![no_std]

pub mod flow;

/// Flow table: LRU hash, [`flow::FlowKey`] -> [`flow::FlowState`].
pub const FLOWS_MAP: &str = "FLOWS";
/// Ring buffer of [`flow::FlowEvent`]s. Its size must be a multiple of the page size.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU array of u64 counters indexed by [`flow::Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// The TC program's name in the object file.
pub const PROGRAM_NAME: &str = "flow_auditor";
