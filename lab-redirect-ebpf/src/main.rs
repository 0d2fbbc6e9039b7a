//! The Cilium-style lab's fixture, never loaded by the agent. `lab_redirect` runs at the TC
//! ingress of a node's uplinks (the native device, the VXLAN device) and hands every IPv4 packet
//! for a pod of this node straight to the pod's side of its veth with `bpf_redirect_peer`, the
//! way Cilium's BPF host routing does: such a packet never crosses the TC egress of the pod's
//! `lxc*` interface. `lab_egress_probe` runs at that egress and counts what does cross it, by
//! whether its source is a pod of this node, so the lab can prove the redirect bypassed it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_UNSPEC},
        helpers::bpf_redirect_peer,
        macros::{classifier, map},
        maps::{HashMap, PerCpuArray},
        programs::TcContext,
    };

    /// This node's pods: IPv4 address (network byte order, as in the packet) -> ifindex of the
    /// host side of its veth. Filled by the loader, like Cilium's endpoint map.
    #[map]
    static ENDPOINTS: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);

    /// Per-CPU counters, indexed by the `SLOT_*` constants.
    #[map]
    static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

    /// Packets handed to a pod with `bpf_redirect_peer`.
    const SLOT_REDIRECTED: u32 = 0;
    /// Packets whose source is not a pod of this node seen at a pod interface's egress: what the
    /// redirect should have made impossible.
    const SLOT_PROBE_REMOTE: u32 = 1;
    /// Packets from a pod of this node seen at a pod interface's egress (same-node traffic,
    /// which the kernel routes): proof that the probe itself sees packets.
    const SLOT_PROBE_LOCAL: u32 = 2;
    /// Redirects the kernel refused.
    const SLOT_REDIRECT_FAILED: u32 = 3;

    const ETH_HLEN: usize = 14;
    const ETH_P_IP: u16 = 0x0800;

    #[classifier]
    pub fn lab_redirect(ctx: TcContext) -> i32 {
        let Some((_, dst)) = addresses(&ctx) else {
            return TC_ACT_OK as i32;
        };
        // SAFETY: a read of a map value by key; the value is copied out at once.
        let Some(ifindex) = (unsafe { ENDPOINTS.get(&dst) }).copied() else {
            return TC_ACT_OK as i32;
        };
        // SAFETY: a helper with plain arguments; it only records where the packet goes.
        let rc = unsafe { bpf_redirect_peer(ifindex, 0) };
        if rc == i64::from(aya_ebpf::bindings::TC_ACT_REDIRECT) {
            count(SLOT_REDIRECTED);
        } else {
            count(SLOT_REDIRECT_FAILED);
        }
        rc as i32
    }

    #[classifier]
    pub fn lab_egress_probe(ctx: TcContext) -> i32 {
        if let Some((src, _)) = addresses(&ctx) {
            // SAFETY: a read of a map value by key.
            let local = unsafe { ENDPOINTS.get(&src) }.is_some();
            count(if local {
                SLOT_PROBE_LOCAL
            } else {
                SLOT_PROBE_REMOTE
            });
        }
        TC_ACT_UNSPEC
    }

    /// Source and destination of an IPv4 packet in an Ethernet frame, as loaded (network order).
    #[inline(always)]
    fn addresses(ctx: &TcContext) -> Option<(u32, u32)> {
        let ethertype: u16 = ctx.load(12).ok()?;
        if u16::from_be(ethertype) != ETH_P_IP {
            return None;
        }
        let src: u32 = ctx.load(ETH_HLEN + 12).ok()?;
        let dst: u32 = ctx.load(ETH_HLEN + 16).ok()?;
        Some((src, dst))
    }

    #[inline(always)]
    fn count(slot: u32) {
        if let Some(value) = STATS.get_ptr_mut(slot) {
            // SAFETY: this CPU's slot of a per-CPU array.
            unsafe { *value += 1 };
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// Built for the host only so workspace-wide `cargo` commands have something to build.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
