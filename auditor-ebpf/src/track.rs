//! Flow tracking: finds or creates the packet's flow, updates its counters, moves its status
//! (new -> answered -> closed, new -> refused) and sends an event on each status change. Every
//! packet ends in exactly one outcome counter.

use auditor_ebpf::{
    MAX_HEADER_BYTES,
    flow::{
        Counter, Direction, EventKind, FlowEvent, FlowKey, FlowState, FlowStatus, Side, proto,
        tcp_flags,
    },
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};

use crate::{
    parse::{self, Opening, PROTO_IPV4, PROTO_IPV6, Parsed, Seen},
    program::{CLOCK, COUNTERS, EVENTS, FLOWS, FLOWS4, SAMPLE_EVERY},
};

const EEXIST: i32 = 17;

/// Facts about the packet being handled, besides what the parser found.
struct Meta {
    now: u64,
    len: u64,
    ifindex: u32,
    direction: Direction,
}

/// Handles one packet: counts it as seen and in exactly one outcome counter.
#[inline(always)]
pub fn observe(ctx: &TcContext, direction: Direction) {
    count(Counter::PacketsSeen);
    let outcome = match handle(ctx, direction) {
        Ok(c) | Err(c) => c,
    };
    count(outcome);
}

#[inline(always)]
fn handle(ctx: &TcContext, direction: Direction) -> Result<Counter, Counter> {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the context of a TC program is the kernel's `__sk_buff` view, valid for the run.
    let (protocol, len, ifindex) = unsafe { ((*skb).protocol, (*skb).len, (*skb).ifindex) };
    if protocol != PROTO_IPV4 && protocol != PROTO_IPV6 {
        return Err(Counter::NonIp);
    }
    // The common case (Ethernet, IPv4/IPv6 without options, TCP/UDP) of a flow already in the
    // table, without the parser's and tracker's subprogram calls; anything else is parsed and
    // tracked in full below.
    if let Some(seen) = parse::fast(ctx, protocol) {
        let meta = Meta {
            now: coarse_now(),
            len: u64::from(len),
            ifindex,
            direction,
        };
        return match find(&seen.key) {
            // SAFETY: a live value of the flow table; LRU values stay valid for this program run.
            Some(state) => Ok(update(unsafe { &mut *state }, &seen, &meta)),
            None => create(&seen, &meta),
        };
    }
    // One call site in a loop rather than two: inlined twice, the parser's stack temporaries
    // would be paid twice against the verifier's 512-byte stack.
    let mut pulled = false;
    let parsed = loop {
        match parse::parse(ctx, protocol) {
            Err(Counter::Truncated) if !pulled && headers_not_linear(ctx, len) => {
                // Rare (headers in page fragments): make the first bytes linear and parse again.
                // This moves bytes between the skb's buffers; their content and the packet's fate
                // stay.
                let want = if len < MAX_HEADER_BYTES {
                    len
                } else {
                    MAX_HEADER_BYTES
                };
                if ctx.pull_data(want).is_err() {
                    return Err(Counter::Truncated);
                }
                pulled = true;
            }
            other => break other?,
        }
    };
    let meta = Meta {
        now: coarse_now(),
        len: u64::from(len),
        ifindex,
        direction,
    };
    match parsed {
        Parsed::Flow(seen) => track(&seen, &meta),
        Parsed::Unreachable { key, sender } => refuse(&key, sender, &meta),
    }
}

/// Whether bytes the parser could not reach exist in the skb's non-linear part.
#[inline(always)]
fn headers_not_linear(ctx: &TcContext, len: u32) -> bool {
    let linear = ctx.data_end() - ctx.data();
    linear < MAX_HEADER_BYTES as usize && (len as usize) > linear
}

/// The table entry of the flow `key`: IPv4 flows are in their own table under the 16-byte key,
/// which the kernel hashes and compares in less time than the 40-byte one.
#[inline(always)]
fn find(key: &FlowKey) -> Option<*mut FlowState> {
    match key.narrow() {
        Some(key4) => FLOWS4.get_ptr_mut(&key4),
        None => FLOWS.get_ptr_mut(key),
    }
}

/// Inserts the flow `key` into its table, unless another CPU just did.
#[inline(always)]
fn enter(key: &FlowKey, state: &FlowState) -> Result<(), i32> {
    match key.narrow() {
        Some(key4) => FLOWS4.insert(&key4, state, u64::from(BPF_NOEXIST)),
        None => FLOWS.insert(key, state, u64::from(BPF_NOEXIST)),
    }
}

/// Not inlined, like the parser: separate frames keep each under the verifier's stack limit.
#[inline(never)]
fn track(seen: &Seen, meta: &Meta) -> Result<Counter, Counter> {
    if let Some(state) = find(&seen.key) {
        // SAFETY: a live value of the flow table; LRU values stay valid for this program run.
        return Ok(update(unsafe { &mut *state }, seen, meta));
    }
    insert(seen, meta)
}

/// The fast path's [`insert`]: not inlined, it is off the established-flow path. A copy rather
/// than a call from `track`, where a fourth frame would pass the verifier's 512 bytes.
#[inline(never)]
fn create(seen: &Seen, meta: &Meta) -> Result<Counter, Counter> {
    insert(seen, meta)
}

/// Enters a flow the table does not have.
#[inline(always)]
fn insert(seen: &Seen, meta: &Meta) -> Result<Counter, Counter> {
    let state = fresh_state(seen, meta);
    match enter(&seen.key, &state) {
        Ok(()) => {
            emit(EventKind::New, &seen.key, &state, meta);
            if state.status == FlowStatus::Answered as u8 {
                emit(EventKind::Answered, &seen.key, &state, meta);
            }
            Ok(Counter::FlowCreated)
        }
        // Another CPU created the flow between our lookup and insert: this packet updates it.
        Err(e) if e == -EEXIST => match find(&seen.key) {
            // SAFETY: as above.
            Some(state) => Ok(update(unsafe { &mut *state }, seen, meta)),
            None => Err(Counter::InsertFailed),
        },
        Err(_) => Err(Counter::InsertFailed),
    }
}

/// The state of a flow whose first packet is `seen`. Not inlined, for the same stack reason as
/// `emit`; it is off the established-flow path.
#[inline(never)]
fn fresh_state(seen: &Seen, meta: &Meta) -> FlowState {
    let (initiator, mid_stream, status) = match seen.opening {
        Opening::Opening => (seen.sender, 0, FlowStatus::New),
        Opening::Answer => (other(seen.sender), 1, FlowStatus::Answered),
        Opening::MidStream => (seen.sender, 1, FlowStatus::New),
    };
    let mut state = FlowState {
        first_seen_ns: meta.now,
        last_seen_ns: meta.now,
        packets: [0; 2],
        bytes: [0; 2],
        ifindex: meta.ifindex,
        tcp_flags: [0; 2],
        initiator: initiator as u8,
        status: status as u8,
        direction: meta.direction as u8,
        mid_stream,
        answered: u8::from(status == FlowStatus::Answered),
        _pad: [0; 5],
    };
    let i = usize::from(seen.sender != initiator);
    state.packets[i] = 1;
    state.bytes[i] = meta.len;
    state.tcp_flags[i] = seen.tcp_flags;
    state
}

#[inline(always)]
fn update(state: &mut FlowState, seen: &Seen, meta: &Meta) -> Counter {
    let status = state.status;
    let flags = seen.tcp_flags;
    let is_tcp = seen.key.proto == proto::TCP;
    // A new SYN on a finished TCP flow is a new connection reusing the 5-tuple.
    if is_tcp
        && seen.opening == Opening::Opening
        && (status == FlowStatus::Refused as u8 || status == FlowStatus::Closed as u8)
    {
        *state = fresh_state(seen, meta);
        emit(EventKind::New, &seen.key, state, meta);
        return Counter::FlowCreated;
    }
    if status == FlowStatus::Answered as u8
        && flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) == 0
        && sampled_out()
    {
        return Counter::SampledOut;
    }
    let from_initiator = seen.sender as u8 == state.initiator;
    let i = usize::from(!from_initiator);
    // Forward only: another CPU's clock reading may be a tick behind this flow's last one (see
    // `coarse_now`), and within a tick the value is unchanged, so most packets store nothing.
    if meta.now > state.last_seen_ns {
        state.last_seen_ns = meta.now;
    }
    state.packets[i] += 1;
    state.bytes[i] += meta.len;
    // Only when it adds a flag: a store per packet for flags already seen dirties the line for
    // nothing.
    if state.tcp_flags[i] | flags != state.tcp_flags[i] {
        state.tcp_flags[i] |= flags;
    }
    let next = if is_tcp {
        next_tcp_status(status, from_initiator, flags, state)
    } else if status == FlowStatus::New as u8 && !from_initiator {
        FlowStatus::Answered as u8
    } else {
        status
    };
    if next != status {
        state.status = next;
        let kind = if next == FlowStatus::Answered as u8 {
            state.answered = 1;
            EventKind::Answered
        } else if next == FlowStatus::Refused as u8 {
            EventKind::Refused
        } else {
            EventKind::Closed
        };
        emit(kind, &seen.key, state, meta);
    }
    Counter::FlowUpdated
}

/// TCP status after a packet with `flags`; `state.tcp_flags` already includes them.
#[inline(always)]
fn next_tcp_status(status: u8, from_initiator: bool, flags: u8, state: &mut FlowState) -> u8 {
    const NEW: u8 = FlowStatus::New as u8;
    const ANSWERED: u8 = FlowStatus::Answered as u8;
    if flags & tcp_flags::RST != 0 {
        return match status {
            NEW if from_initiator => FlowStatus::Closed as u8,
            NEW => FlowStatus::Refused as u8,
            ANSWERED => FlowStatus::Closed as u8,
            other => other,
        };
    }
    let mut next = status;
    if next == NEW
        && !from_initiator
        && (flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN | tcp_flags::ACK
            || state.mid_stream != 0)
    {
        next = ANSWERED;
        state.answered = 1;
    }
    if (next == NEW || next == ANSWERED)
        && state.tcp_flags[0] & tcp_flags::FIN != 0
        && state.tcp_flags[1] & tcp_flags::FIN != 0
    {
        next = FlowStatus::Closed as u8;
    }
    next
}

/// An ICMP destination unreachable about a packet `sender` sent in flow `key`.
#[inline(never)]
fn refuse(key: &FlowKey, sender: Side, meta: &Meta) -> Result<Counter, Counter> {
    let Some(state) = find(key) else {
        return Err(Counter::IcmpErrorUnmatched);
    };
    // SAFETY: a live value of the flow table.
    let state = unsafe { &mut *state };
    // An error about the responder's packet says nothing about whether the flow was accepted.
    if sender as u8 != state.initiator {
        return Err(Counter::IcmpErrorUnmatched);
    }
    if meta.now > state.last_seen_ns {
        state.last_seen_ns = meta.now;
    }
    if state.status == FlowStatus::New as u8 {
        state.status = FlowStatus::Refused as u8;
        emit(EventKind::Refused, key, state, meta);
    }
    Ok(Counter::IcmpErrorMatched)
}

/// This CPU's last reading of the coarse clock and the jiffies value it was read at.
#[repr(C)]
pub struct ClockCache {
    jiffies: u64,
    now_ns: u64,
}

/// `CLOCK_MONOTONIC_COARSE` now, in nanoseconds.
///
/// The coarse clock moves only on a timer tick, when jiffies moves too. Reading jiffies is one
/// load (the verifier inlines `bpf_jiffies64` on 64-bit JITs) while the clock helper cost about
/// 12 ns a packet on the benchmark machine, so each CPU keeps its last reading and reads the
/// clock again only once jiffies has moved.
///
/// The tick moves jiffies a moment (about a microsecond) before the clock: a reading that has not
/// moved since the cached one is not cached, so the next packet reads again. After a CPU ran no
/// packet for a whole tick, a reading taken in that moment cannot be told from a fresh one and
/// stands for the rest of the tick: such a timestamp is one tick (at most 10 ms) early, which
/// second-scale timeouts do not notice.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: helper without arguments.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot of a per-CPU array; TC programs do not migrate or nest on a CPU.
    let cache = unsafe { &mut *cache };
    if cache.jiffies == jiffies {
        return cache.now_ns;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now != cache.now_ns {
        cache.jiffies = jiffies;
        cache.now_ns = now;
    }
    now
}

#[inline(always)]
fn sampled_out() -> bool {
    // SAFETY: a plain read of a global; volatile so the loader's value is read, not the default.
    let every = unsafe { core::ptr::read_volatile(&SAMPLE_EVERY) };
    // SAFETY: helper without arguments.
    every > 1 && unsafe { bpf_get_prandom_u32() } % every != 0
}

/// Not inlined: five call sites on the rare state-change paths would each get their own event
/// on the stack.
#[inline(never)]
fn emit(kind: EventKind, key: &FlowKey, state: &FlowState, meta: &Meta) {
    let event = FlowEvent {
        key: *key,
        ts_ns: meta.now,
        ifindex: meta.ifindex,
        kind: kind as u8,
        initiator: state.initiator,
        direction: meta.direction as u8,
        mid_stream: state.mid_stream,
    };
    match EVENTS.output(&event, 0) {
        Ok(()) => count(Counter::EventsSent),
        Err(_) => count(Counter::EventsLost),
    }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot of a per-CPU array; TC programs do not migrate mid-run.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
const fn other(side: Side) -> Side {
    match side {
        Side::Lo => Side::Hi,
        Side::Hi => Side::Lo,
    }
}
