//! Log records (aya-log) on the program's rare paths, the ones that otherwise only bump a
//! counter: a packet whose headers could not be read, a flow the table would not take. Off unless
//! the loader turns them on: it sets aya-log's level global (`.rodata`, so a constant to the
//! verifier) to 0, and the verifier then prunes every record as dead code. Nothing here is on the
//! established-flow path.
//!
//! Each record is written by a subprogram of its own, called from a shallow frame: a record's
//! temporaries then never add to the deep frames of the parser. Each function writes one record
//! per hook, so the text says where the packet was seen; the hook is a constant in each program,
//! so the verifier walks only that record.

use auditor_ebpf::{
    KERNEL_LOG_TARGET,
    flow::{Counter, Hook},
};
use aya_ebpf::bindings::__sk_buff;
use aya_log_ebpf::{error, warn};

/// The packet facts every record carries, read from the context here rather than passed:
/// BPF-to-BPF calls take at most five arguments, and the callers should not pay to keep them.
struct Packet {
    len: u32,
    /// Bytes of the packet in the skb's linear part, the part the parser reads.
    linear: u32,
    /// The EtherType of `skb->protocol`, host order.
    ethertype: u16,
    ifindex: u32,
}

impl Packet {
    #[inline(always)]
    fn of(skb: *const __sk_buff) -> Self {
        // SAFETY: the program's context, valid for the whole run.
        let skb = unsafe { &*skb };
        Self {
            len: skb.len,
            linear: skb.data_end.wrapping_sub(skb.data),
            ethertype: u16::from_be(skb.protocol as u16),
            ifindex: skb.ifindex,
        }
    }
}

/// A packet counted as [`Counter::Truncated`] or [`Counter::Malformed`]: the parser could not
/// key it. Any other outcome writes nothing.
#[inline(never)]
pub fn unreadable(skb: *const __sk_buff, hook: Hook, outcome: Counter) {
    let Packet {
        len,
        linear,
        ethertype,
        ifindex,
    } = Packet::of(skb);
    match (outcome, hook) {
        (Counter::Truncated, Hook::Ingress | Hook::UplinkIngress) => warn!(
            skb,
            target: KERNEL_LOG_TARGET,
            "headers cut short (counted as truncated): ingress, ifindex {}, EtherType 0x{:x}, {} bytes, {} linear",
            ifindex,
            ethertype,
            len,
            linear
        ),
        (Counter::Truncated, Hook::Egress | Hook::UplinkEgress) => warn!(
            skb,
            target: KERNEL_LOG_TARGET,
            "headers cut short (counted as truncated): egress, ifindex {}, EtherType 0x{:x}, {} bytes, {} linear",
            ifindex,
            ethertype,
            len,
            linear
        ),
        (Counter::Malformed, Hook::Ingress | Hook::UplinkIngress) => warn!(
            skb,
            target: KERNEL_LOG_TARGET,
            "invalid headers (counted as malformed): ingress, ifindex {}, EtherType 0x{:x}, {} bytes, {} linear",
            ifindex,
            ethertype,
            len,
            linear
        ),
        (Counter::Malformed, Hook::Egress | Hook::UplinkEgress) => warn!(
            skb,
            target: KERNEL_LOG_TARGET,
            "invalid headers (counted as malformed): egress, ifindex {}, EtherType 0x{:x}, {} bytes, {} linear",
            ifindex,
            ethertype,
            len,
            linear
        ),
        _ => {}
    }
}

/// The flow table refused a new flow with `errno` (not `EEXIST`, which is another CPU having
/// entered it first): [`Counter::InsertFailed`]. An LRU table makes room rather than fail, so
/// this is the kernel short of memory, or a bug.
#[inline(never)]
pub fn insert_failed(skb: *const __sk_buff, hook: Hook, proto: u8, errno: i32) {
    let Packet { ifindex, .. } = Packet::of(skb);
    let errno = errno.unsigned_abs();
    match hook {
        Hook::Ingress | Hook::UplinkIngress => error!(
            skb,
            target: KERNEL_LOG_TARGET,
            "flow table insert failed with errno {} (counted as insert_failed): ingress, ifindex {}, IP protocol {}",
            errno,
            ifindex,
            proto
        ),
        Hook::Egress | Hook::UplinkEgress => error!(
            skb,
            target: KERNEL_LOG_TARGET,
            "flow table insert failed with errno {} (counted as insert_failed): egress, ifindex {}, IP protocol {}",
            errno,
            ifindex,
            proto
        ),
    }
}

/// Another CPU entered the flow between our lookup and insert, and its entry was gone again by
/// our second lookup (evicted at once): the packet is [`Counter::InsertFailed`].
#[inline(never)]
pub fn entry_vanished(skb: *const __sk_buff, hook: Hook, proto: u8) {
    let Packet { ifindex, .. } = Packet::of(skb);
    match hook {
        Hook::Ingress | Hook::UplinkIngress => warn!(
            skb,
            target: KERNEL_LOG_TARGET,
            "flow entered by another CPU was gone at once (counted as insert_failed): ingress, ifindex {}, IP protocol {}",
            ifindex,
            proto
        ),
        Hook::Egress | Hook::UplinkEgress => warn!(
            skb,
            target: KERNEL_LOG_TARGET,
            "flow entered by another CPU was gone at once (counted as insert_failed): egress, ifindex {}, IP protocol {}",
            ifindex,
            proto
        ),
    }
}
