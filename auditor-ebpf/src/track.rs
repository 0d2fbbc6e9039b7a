//! Flow tracking: finds or creates the packet's flow, updates its counters, moves its status
//! (new -> answered -> closed, new -> refused) and sends an event on each status change. Every
//! packet ends in exactly one outcome counter.

use auditor_ebpf::{
    MAX_HEADER_BYTES,
    flow::{
        Counter, ENCAPSULATION_PORTS, EventKind, FlowEvent, FlowKey, FlowKey4, FlowState,
        FlowStatus, Hook, Side, first_seen, proto, tcp_flags,
    },
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};

use crate::{
    diag,
    parse::{self, Opening, PROTO_IPV4, PROTO_IPV6, Parsed, Seen},
    program::{COUNTERS, EVENTS, FLOWS, FLOWS4, FLOWS4_TCP, SAMPLE_EVERY, WIREGUARD_PORT},
};

const EEXIST: i32 = 17;

/// Facts about the packet being handled, besides what the parser found. Passed by value: its two
/// words travel in registers, so the established-flow path stores nothing for the calls only the
/// rare paths make.
#[derive(Clone, Copy)]
struct Meta {
    hook: Hook,
    /// The context, for what only some paths read ([`Meta::len`], [`Meta::ifindex`]).
    skb: *const __sk_buff,
}

impl Meta {
    /// `skb->len`.
    #[inline(always)]
    fn len(self) -> u32 {
        // SAFETY: the program's context, valid for the whole run.
        unsafe { (*self.skb).len }
    }

    /// The interface's index. Read only when a flow is created or an event sent: the context
    /// field is two dependent loads (`skb->dev->ifindex`) an established flow's packet skips.
    #[inline(always)]
    fn ifindex(self) -> u32 {
        // SAFETY: the program's context, valid for the whole run.
        unsafe { (*self.skb).ifindex }
    }
}

/// Handles one packet and counts it in exactly one outcome counter (the sum of those is the
/// packets seen, so there is no separate count per packet).
#[inline(always)]
pub fn observe(ctx: &TcContext, hook: Hook) {
    let outcome = match handle(ctx, hook) {
        Ok(c) | Err(c) => c,
    };
    count(outcome);
}

#[inline(always)]
fn handle(ctx: &TcContext, hook: Hook) -> Result<Counter, Counter> {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // The common case, an Ethernet frame with IPv4 without options and TCP or UDP, is read by the
    // inlined fast parser straight into the narrow key of its IPv4 table. The packet's length
    // and the protocol for the other paths are read from the context after it, not held in
    // registers across it: the parser needs all it can get.
    // SAFETY: the context of a TC program is the kernel's `__sk_buff` view, valid for the run.
    if unsafe { (*skb).protocol } == PROTO_IPV4 {
        if let Some(seen) = parse::fast4(ctx) {
            return track(&seen, Meta { hook, skb });
        }
    }
    // SAFETY: as above; volatile so the load is repeated rather than kept from the first.
    let protocol = unsafe { core::ptr::read_volatile(&raw const (*skb).protocol) };
    if protocol != PROTO_IPV4 && protocol != PROTO_IPV6 {
        return Err(Counter::NonIp);
    }
    let meta = Meta { hook, skb };
    // IPv6 without extension headers has a fast parser too; anything else is parsed in full.
    let fast6 = if protocol == PROTO_IPV6 {
        parse::fast6(ctx)
    } else {
        None
    };
    let parsed = match fast6 {
        Some(seen) => Parsed::Flow(seen),
        None => match parse_any(ctx, protocol, meta.len()) {
            Ok(parsed) => parsed,
            Err(outcome) => return Err(unparsed(outcome, meta)),
        },
    };
    dispatch(&parsed, meta)
}

/// A packet the parser could not key, ending in `outcome`; the headers it could not read are
/// logged (when the loader turned logging on), the protocols it does not track are not.
#[inline(always)]
fn unparsed(outcome: Counter, meta: Meta) -> Counter {
    if matches!(outcome, Counter::Truncated | Counter::Malformed) {
        diag::unreadable(meta.skb, meta.hook, outcome);
    }
    outcome
}

/// Tracks a packet the IPv4 fast path did not take. Not inlined: a frame of its own, beside the
/// parser's rather than under it, keeps the two within the verifier's 512 bytes of stack.
#[inline(never)]
fn dispatch(parsed: &Parsed, meta: Meta) -> Result<Counter, Counter> {
    match parsed {
        Parsed::Flow(seen) => track(seen, meta),
        Parsed::Unreachable { key, sender } => refuse(key, *sender, meta),
    }
}

/// [`parse::parse`], with the rare retry after making the headers linear.
#[inline(always)]
fn parse_any(ctx: &TcContext, protocol: u32, len: u32) -> Result<Parsed, Counter> {
    // One call site in a loop rather than two: inlined twice, the parser's stack temporaries
    // would be paid twice against the verifier's 512-byte stack.
    let mut pulled = false;
    loop {
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
            other => return other,
        }
    }
}

/// Whether bytes the parser could not reach exist in the skb's non-linear part.
#[inline(always)]
fn headers_not_linear(ctx: &TcContext, len: u32) -> bool {
    let linear = ctx.data_end() - ctx.data();
    linear < MAX_HEADER_BYTES as usize && (len as usize) > linear
}

/// The key of one of the flow tables.
trait TableKey {
    /// The flow's entry, if its table has it.
    fn find(&self) -> Option<*mut FlowState>;
    /// Inserts the flow into its table, unless another CPU just did (`-EEXIST`).
    fn enter(&self, state: &FlowState) -> Result<(), i32>;
    fn proto(&self) -> u8;
    /// The port of the endpoint on `side`.
    fn port(&self, side: Side) -> u16;
    /// The key as user space and the events know it.
    fn wide(&self) -> FlowKey;
}

/// An IPv4 flow is in the TCP table, under its key's first 12 bytes, or in the other IPv4 table.
impl TableKey for FlowKey4 {
    #[inline(always)]
    fn find(&self) -> Option<*mut FlowState> {
        if self.proto == proto::TCP {
            FLOWS4_TCP.get_ptr_mut(self.tcp_prefix())
        } else {
            FLOWS4.get_ptr_mut(self)
        }
    }

    #[inline(always)]
    fn enter(&self, state: &FlowState) -> Result<(), i32> {
        if self.proto == proto::TCP {
            FLOWS4_TCP.insert(self.tcp_prefix(), state, u64::from(BPF_NOEXIST))
        } else {
            FLOWS4.insert(self, state, u64::from(BPF_NOEXIST))
        }
    }

    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }

    #[inline(always)]
    fn port(&self, side: Side) -> u16 {
        match side {
            Side::Lo => self.lo_port,
            Side::Hi => self.hi_port,
        }
    }

    #[inline(always)]
    fn wide(&self) -> FlowKey {
        self.widen()
    }
}

/// A wide key whose addresses are both IPv4-mapped still lives in an IPv4 table, under its
/// narrow form, wherever the packet was parsed.
impl TableKey for FlowKey {
    #[inline(always)]
    fn find(&self) -> Option<*mut FlowState> {
        match self.narrow() {
            Some(key4) => key4.find(),
            None => FLOWS.get_ptr_mut(self),
        }
    }

    #[inline(always)]
    fn enter(&self, state: &FlowState) -> Result<(), i32> {
        match self.narrow() {
            Some(key4) => key4.enter(state),
            None => FLOWS.insert(self, state, u64::from(BPF_NOEXIST)),
        }
    }

    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }

    #[inline(always)]
    fn port(&self, side: Side) -> u16 {
        self.endpoint(side).1
    }

    #[inline(always)]
    fn wide(&self) -> FlowKey {
        *self
    }
}

/// Updates the packet's flow, or creates it. Inlined once per key type.
#[inline(always)]
fn track<K: TableKey>(seen: &Seen<K>, meta: Meta) -> Result<Counter, Counter> {
    // A constant in each program: the pod interfaces' programs do not have this check at all.
    if meta.hook.is_uplink() && encapsulated(seen) {
        return Ok(Counter::Encapsulated);
    }
    let state = match seen.key.find() {
        Some(state) => state,
        None => match create(seen, meta) {
            Some(outcome) => return outcome,
            // Another CPU created the flow between our lookup and insert: this packet updates it.
            None => match seen.key.find() {
                Some(state) => state,
                None => {
                    diag::entry_vanished(meta.skb, meta.hook, seen.key.proto());
                    return Err(Counter::InsertFailed);
                }
            },
        },
    };
    // SAFETY: a live value of the flow table; LRU values stay valid for this program run.
    Ok(update(unsafe { &mut *state }, seen, meta))
}

/// Whether a packet seen on an uplink is an encapsulation's outer packet: UDP to a VXLAN or
/// Geneve port, or to or from WireGuard's. Not inlined: only the uplink programs call it.
#[inline(never)]
fn encapsulated<K: TableKey>(seen: &Seen<K>) -> bool {
    if seen.key.proto() != proto::UDP {
        return false;
    }
    let src = seen.key.port(seen.sender);
    let dst = seen.key.port(other(seen.sender));
    // SAFETY: a plain read of a global; volatile so the loader's value is read, not the default.
    let wireguard = unsafe { core::ptr::read_volatile(&WIREGUARD_PORT) };
    let [a, b, c] = ENCAPSULATION_PORTS;
    dst == a || dst == b || dst == c || (wireguard != 0 && (dst == wireguard || src == wireguard))
}

/// Enters a flow the table does not have: its outcome, or `None` when another CPU entered it
/// first. Not inlined: it is off the established-flow path, and a frame of its own keeps the
/// caller's small.
#[inline(never)]
fn create<K: TableKey>(seen: &Seen<K>, meta: Meta) -> Option<Result<Counter, Counter>> {
    let state = fresh_state(seen, meta);
    match seen.key.enter(&state) {
        Ok(()) => {
            emit(EventKind::New, &seen.key, &state, meta);
            if state.status == FlowStatus::Answered as u8 {
                emit(EventKind::Answered, &seen.key, &state, meta);
            }
            Some(Ok(Counter::FlowCreated))
        }
        Err(e) if e == -EEXIST => None,
        Err(e) => {
            diag::insert_failed(meta.skb, meta.hook, seen.key.proto(), e);
            Some(Err(Counter::InsertFailed))
        }
    }
}

/// The state of a flow whose first packet is `seen`. Not inlined, for the same stack reason as
/// `emit`; it is off the established-flow path.
#[inline(never)]
fn fresh_state<K>(seen: &Seen<K>, meta: Meta) -> FlowState {
    let (initiator, mid_stream, status) = match seen.opening() {
        Opening::Opening => (seen.sender, first_seen::OPENING, FlowStatus::New),
        Opening::Answer => (other(seen.sender), first_seen::ANSWER, FlowStatus::Answered),
        Opening::MidStream => (seen.sender, first_seen::MID_STREAM, FlowStatus::New),
    };
    // The tick before the clock, as in `stamp`.
    let tick = tick();
    let now = coarse_ns();
    let len = u64::from(meta.len());
    let flags = seen.tcp_flags;
    // Whole arrays rather than a store at a computed index, which compiled to byte-wise zeroing.
    let owner = meta.hook.owner();
    let (packets, bytes, tcp_flags, owners) = if seen.sender == initiator {
        ([1, 0], [len, 0], [flags, 0], owner)
    } else {
        ([0, 1], [0, len], [0, flags], owner << 4)
    };
    FlowState {
        first_seen_ns: now,
        last_seen_ns: now,
        packets,
        bytes,
        ifindex: meta.ifindex(),
        tcp_flags,
        initiator: initiator as u8,
        status: status as u8,
        hook: meta.hook as u8,
        mid_stream,
        answered: u8::from(status == FlowStatus::Answered),
        owners,
        tick,
        nat: 0,
        _reserved: [0; 7],
    }
}

/// A packet of a flow in the table. The common case, an answered flow's packet without SYN, FIN
/// or RST, cannot change the flow's status: it is counted here, inlined and, but for the first
/// packet of a tick, without a helper call, so no value has to be kept across one. Every other
/// packet goes through [`transition`]; with sampling on, steady packets go through
/// [`account_sampled`].
#[inline(always)]
fn update<K: TableKey>(state: &mut FlowState, seen: &Seen<K>, meta: Meta) -> Counter {
    // The hook that counts this direction: on the established path one byte compared with a
    // constant of the program.
    let shift = if seen.sender as u8 == state.initiator {
        0
    } else {
        4
    };
    if (state.owners >> shift) & 0x0f != meta.hook.owner() && !claim(state, shift, meta.hook) {
        return Counter::Duplicate;
    }
    if state.status == FlowStatus::Answered as u8
        && seen.tcp_flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) == 0
    {
        // A branch of its own: with sampling off the verifier sees it is never taken and
        // removes it.
        if sampling() {
            return account_sampled(state, seen.sender, seen.tcp_flags, meta);
        }
        account(state, seen.sender, seen.tcp_flags, meta);
        return Counter::FlowUpdated;
    }
    transition(state, seen, meta)
}

/// A packet of a direction this hook does not own: the hook takes it if no hook has seen that
/// direction yet (true), else the packet is the owner's, seen twice (false). Not inlined: off the
/// established path, where the owner is the hook running.
#[inline(never)]
fn claim(state: &mut FlowState, shift: u8, hook: Hook) -> bool {
    if (state.owners >> shift) & 0x0f != 0 {
        return false;
    }
    state.owners |= hook.owner() << shift;
    true
}

/// [`update`]'s steady packet with sampling on: counted if kept.
#[inline(never)]
fn account_sampled(state: &mut FlowState, sender: Side, flags: u8, meta: Meta) -> Counter {
    if sampled_out() {
        return Counter::SampledOut;
    }
    account(state, sender, flags, meta);
    Counter::FlowUpdated
}

/// Adds the packet to its sender's counters and flags, and moves `last_seen_ns` once per tick.
#[inline(always)]
fn account(state: &mut FlowState, sender: Side, flags: u8, meta: Meta) {
    // Read here, where it is compared, rather than once per packet up front: a value carried
    // from the start of the program is spilled to the stack and reloaded.
    let tick = tick();
    if state.tick != tick {
        account_new_tick(state, sender, flags, meta, tick);
    } else {
        add(state, sender, flags, meta.len());
    }
}

/// [`account`] when the tick has moved, so `last_seen_ns` does. Not inlined: reading the clock is
/// a helper call, and the counting is done here, after it, so the caller keeps nothing across
/// the call.
#[inline(never)]
fn account_new_tick(state: &mut FlowState, sender: Side, flags: u8, meta: Meta, tick: u32) {
    stamp(state, tick);
    add(state, sender, flags, meta.len());
}

/// Adds the packet to its sender's packet and byte counts and flags.
#[inline(always)]
fn add(state: &mut FlowState, sender: Side, flags: u8, len: u32) {
    let i = usize::from(sender as u8 != state.initiator);
    state.packets[i] += 1;
    state.bytes[i] += u64::from(len);
    // Only when it adds a flag: a store per packet for flags already seen dirties the line for
    // nothing.
    if state.tcp_flags[i] | flags != state.tcp_flags[i] {
        state.tcp_flags[i] |= flags;
    }
}

/// Sets `last_seen_ns` to the clock now, forward only: another CPU may have stored a later
/// reading. The tick is recorded only when the clock has moved past the stored reading, because
/// the timer tick moves jiffies a moment (about a microsecond) before the clock: a reading taken
/// in that moment, still equal to the stored one, leaves the tick unrecorded so the next packet
/// reads again. (If the flow's stored reading is older than the last tick, such a reading is
/// stored and stands for the tick: `last_seen_ns` one tick early, which second-scale timeouts do
/// not notice.)
#[inline(always)]
fn stamp(state: &mut FlowState, tick: u32) {
    let now = coarse_ns();
    if now > state.last_seen_ns {
        state.last_seen_ns = now;
        state.tick = tick;
    }
}

/// Every packet of a flow in the table that [`update`] does not count inline: anything on a flow
/// not yet answered, refused or closed, and SYN, FIN and RST. Moves the status and sends the
/// event of a change. Not inlined: one copy per key type, off the established-flow path.
#[inline(never)]
fn transition<K: TableKey>(state: &mut FlowState, seen: &Seen<K>, meta: Meta) -> Counter {
    let status = state.status;
    let flags = seen.tcp_flags;
    let is_tcp = seen.key.proto() == proto::TCP;
    // A new SYN on a finished TCP flow is a new connection reusing the 5-tuple.
    if is_tcp
        && seen.opening() == Opening::Opening
        && (status == FlowStatus::Refused as u8 || status == FlowStatus::Closed as u8)
    {
        *state = fresh_state(seen, meta);
        emit(EventKind::New, &seen.key, state, meta);
        return Counter::FlowCreated;
    }
    let from_initiator = seen.sender as u8 == state.initiator;
    account(state, seen.sender, flags, meta);
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
            // A reset of a flow first seen mid-stream ends a connection that was established
            // before we saw it, whoever sends it: never a refusal.
            NEW if from_initiator || state.mid_stream != 0 => FlowStatus::Closed as u8,
            NEW => FlowStatus::Refused as u8,
            ANSWERED => FlowStatus::Closed as u8,
            other => other,
        };
    }
    let mut next = status;
    // Answered: the responder's SYN-ACK (or any packet of the responder's on a flow first seen
    // mid-stream), or the initiator's first bare ACK after its SYN, which it only sends once a
    // SYN-ACK reached it: where the reply path passes no hook of ours (a CNI delivering replies
    // into the pod past its interface's egress), the ACK is the evidence that is left.
    if next == NEW
        && if from_initiator {
            state.mid_stream == 0
                && flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::ACK
                && state.tcp_flags[0] & tcp_flags::SYN != 0
        } else {
            flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN | tcp_flags::ACK
                || state.mid_stream != 0
        }
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
fn refuse(key: &FlowKey, sender: Side, meta: Meta) -> Result<Counter, Counter> {
    let Some(state) = key.find() else {
        return Err(Counter::IcmpErrorUnmatched);
    };
    // SAFETY: a live value of the flow table.
    let state = unsafe { &mut *state };
    // An error about the responder's packet says nothing about whether the flow was accepted.
    if sender as u8 != state.initiator {
        return Err(Counter::IcmpErrorUnmatched);
    }
    stamp(state, tick());
    if state.status == FlowStatus::New as u8 {
        state.status = FlowStatus::Refused as u8;
        emit(EventKind::Refused, key, state, meta);
    }
    Ok(Counter::IcmpErrorMatched)
}

/// `CLOCK_MONOTONIC_COARSE` now, in nanoseconds: the clock of every time the program stores.
/// A helper call, one of the dearest steps of a packet (see `auditor/benches/datapath.rs`), so
/// established-flow packets call it once per tick and flow (see [`stamp`]).
#[inline(always)]
fn coarse_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The low 32 bits of jiffies: one load (the verifier inlines `bpf_jiffies64` on 64-bit JITs).
#[inline(always)]
fn tick() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_jiffies64() as u32 }
}

/// Whether sampling is on: one in [`SAMPLE_EVERY`] steady packets is kept.
#[inline(always)]
fn sampling() -> bool {
    // SAFETY: a plain read of a global; volatile so the loader's value is read, not the default.
    unsafe { core::ptr::read_volatile(&SAMPLE_EVERY) > 1 }
}

/// Whether this steady packet is skipped by sampling.
#[inline(always)]
fn sampled_out() -> bool {
    // SAFETY: a plain read of a global; volatile so the loader's value is read, not the default.
    let every = unsafe { core::ptr::read_volatile(&SAMPLE_EVERY) };
    // SAFETY: helper without arguments.
    every > 1 && unsafe { bpf_get_prandom_u32() } % every != 0
}

/// Not inlined: five call sites on the rare state-change paths would each get their own event
/// on the stack.
///
/// The event's time is the flow's `last_seen_ns`, which every caller has just brought to the
/// current tick (`fresh_state`, `account` or `stamp`).
#[inline(never)]
fn emit<K: TableKey>(kind: EventKind, key: &K, state: &FlowState, meta: Meta) {
    let event = FlowEvent {
        key: key.wide(),
        ts_ns: state.last_seen_ns,
        ifindex: meta.ifindex(),
        kind: kind as u8,
        initiator: state.initiator,
        hook: meta.hook as u8,
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
