//! Loads the TC program, attaches it to pod interfaces as they come and go, and reads its flow
//! table and events. Everything that needs the kernel sits behind this module.

pub mod attach;
pub mod batch;
pub mod conntrack;
pub mod kernel_log;
pub mod load;
pub mod manager;
pub mod netlink;

/// The TC program, compiled by build.rs for the bpf target.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/auditor-ebpf"));
