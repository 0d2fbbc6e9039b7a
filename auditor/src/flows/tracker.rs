//! The outcome state machine: one entry per flow key, from the first event to the moment the
//! table entry is deleted. No I/O: the caller feeds it events, table entries and the time, and
//! performs the lookups and deletions it asks for.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    hash::BuildHasher as _,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use auditor_ebpf::flow::{
    EventKind, FlowEvent, FlowKey, FlowState, FlowStatus, Hook, Side, first_seen,
};

use super::{FlowRecord, FlowsConfig, Outcome, PerDirection, Protocol};

/// The time, on both clocks the tracker needs: the kernel's monotonic coarse clock (what the
/// datapath stamps packets with) and the wall clock (what records carry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono_ns: u64,
    pub wall: SystemTime,
}

impl Now {
    /// Reads both clocks. `CLOCK_MONOTONIC_COARSE` is what `bpf_ktime_get_coarse_ns` reads.
    #[must_use]
    pub fn read() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to write to; CLOCK_MONOTONIC_COARSE always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
        let secs = u64::try_from(ts.tv_sec).unwrap_or_default();
        let nanos = u64::try_from(ts.tv_nsec).unwrap_or_default();
        Self {
            mono_ns: secs.saturating_mul(1_000_000_000).saturating_add(nanos),
            wall: SystemTime::now(),
        }
    }

    /// The wall-clock time of a kernel timestamp.
    #[must_use]
    pub fn wall_of(&self, mono_ns: u64) -> SystemTime {
        if mono_ns <= self.mono_ns {
            self.wall - Duration::from_nanos(self.mono_ns - mono_ns)
        } else {
            self.wall + Duration::from_nanos(mono_ns - self.mono_ns)
        }
    }
}

/// What a table walk should do with one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkVerdict {
    /// The flow's record, when this entry decided it (its event was lost).
    pub record: Option<FlowRecord>,
    /// Delete the entry from the table: closed or refused and lingered, or idle too long.
    pub remove: bool,
}

/// A flow whose outcome is known: all the tracker keeps of it until its table entry goes,
/// in 16 bytes (with its key's hash, 24 per flow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settled {
    /// Its table entry's first packet (kernel clock), the value its counted mark carries: a
    /// `New` event of this time or earlier is this flow's own, read after a table walk had
    /// already adopted and decided it, not a new use of the key; an entry of the key with
    /// another first packet is a new entry (the flow resumed after an eviction), whose mark is
    /// still to be written.
    first_seen_ns: u64,
    /// Its last packet, in [`Ticks`].
    last_seen: Ticks,
    /// Walk generation that last saw the entry in the table (wrapping: only entries seen by
    /// the latest walk survive it, so an old generation never comes back to match).
    seen_in_walk: u16,
    /// TCP close seen (or the flow was refused): only lingers until deletion.
    finished: bool,
    /// Its counted mark was written, or is queued ([`FlowTracker::take_marks`]); false after
    /// the write failed ([`FlowTracker::mark_failed`]), so the next walk tries again.
    marked: bool,
}

/// The kernel clock in units of 2^20 ns (about a millisecond), wrapping every 52 days: the
/// idle and linger spans measured with it are minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ticks(u32);

impl Ticks {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "wrapping is the representation"
    )]
    const fn of(ns: u64) -> Self {
        Self((ns >> 20) as u32)
    }

    /// The later of two times less than 26 days apart.
    const fn max(self, other: Self) -> Self {
        if self.since(other) > 0 { self } else { other }
    }

    /// How far `self` is after `earlier`, negative when before.
    #[expect(clippy::cast_possible_wrap, reason = "wrapping difference")]
    const fn since(self, earlier: Self) -> i32 {
        self.0.wrapping_sub(earlier.0) as i32
    }

    /// Whether at least `span` passed from `earlier` to `self`.
    fn passed(self, earlier: Self, span: Duration) -> bool {
        let elapsed = u64::try_from(self.since(earlier)).unwrap_or(0);
        elapsed >= duration_ns(span) >> 20
    }
}

/// A flow waiting for its answer, with what its record will carry.
#[derive(Debug, Clone)]
struct Tracked {
    initiator: Side,
    first_seen_ns: u64,
    last_seen_ns: u64,
    ifindex: u32,
    hook: Hook,
    mid_stream: bool,
    packets: [u64; 2],
    bytes: [u64; 2],
    /// Walk generation current when it became pending, and the last walk that saw its entry: a
    /// walk that started after it became pending and did not see it means the LRU evicted it.
    walk_born: u16,
    seen_in_walk: u16,
    /// Its eviction was counted.
    evicted: bool,
}

/// How many counted flows whose table entries went (idle expiry, eviction) are remembered, so
/// that the connection resuming later is not counted again: about 28 bytes each.
pub const GONE_CAPACITY: usize = 32_768;

/// Flows evicted from the flow table by the kernel's LRU (it does so silently; the tracker
/// notices entries it knew that vanished without having been deleted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evictions {
    /// Flows already decided (and counted): only their later counters and close are lost.
    pub decided: u64,
    /// Flows still waiting for their answer: their outcome is a guess (`unanswered` unless an
    /// event says otherwise).
    pub undecided: u64,
}

/// Key hashes of counted flows whose entries went, oldest first, bounded.
#[derive(Debug, Default)]
struct Gone {
    /// Hash -> sequence number of its entry in `order` (only that one's expiry forgets it).
    by_hash: HashMap<u64, u32, rustc_hash::FxBuildHasher>,
    order: VecDeque<(u32, u64)>,
    next_seq: u32,
}

impl Gone {
    fn remember(&mut self, hash: u64) {
        while self.order.len() >= GONE_CAPACITY {
            if let Some((seq, old)) = self.order.pop_front()
                && self.by_hash.get(&old) == Some(&seq)
            {
                self.by_hash.remove(&old);
            }
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.by_hash.insert(hash, seq);
        self.order.push_back((seq, hash));
    }

    /// Whether the flow was remembered; it is forgotten here (it is back in the table).
    fn take(&mut self, hash: u64) -> bool {
        self.by_hash.remove(&hash).is_some()
    }

    fn len(&self) -> usize {
        self.by_hash.len()
    }
}

/// Decides each flow's outcome once. See the [module docs](super) for the life of a flow.
#[derive(Debug)]
pub struct FlowTracker {
    config: FlowsConfig,
    /// Flows waiting for an answer, by key. The maps hash what pods send: a seeded hash, so no
    /// one can aim collisions at them, and a fast one (`SipHash` was a tenth of the daemon's time).
    pending: HashMap<FlowKey, Tracked, foldhash::fast::RandomState>,
    /// Decided flows still in the table, by a seeded 64-bit hash of their key: most tracked flows
    /// are here, and an entry is 16 bytes instead of 104. A false match needs two of the table's
    /// (at most some 10^5) keys to share a hash, about one chance in 10^9 for a full table; it
    /// would make the later flow's `New` look like a resumed one (`mid_stream`) or its events
    /// look like the earlier one's, so that one flow would go uncounted.
    settled: HashMap<u64, Settled, rustc_hash::FxBuildHasher>,
    hasher: foldhash::fast::RandomState,
    /// Answer deadlines of pending flows in the order they became pending (so, near enough, in
    /// deadline order): the deadline check looks at the due ones only, not at every flow.
    /// Entries of flows decided since are skipped when they come up.
    deadlines: VecDeque<(u64, FlowKey)>,
    walk: u16,
    /// Counted flows whose entries went, for recognising their resumption.
    gone: Gone,
    /// Flows decided since the last [`FlowTracker::take_marks`], with their entries'
    /// `first_seen_ns`: their counted marks to write.
    marks: Vec<(FlowKey, u64)>,
    /// The counted marks a predecessor left (the pinned map adopted), by key hash: the
    /// `first_seen_ns` each was counted with. Emptied by the first walk's end: every entry they
    /// matched is settled by then, the others are stale.
    inherited: HashMap<u64, u64, rustc_hash::FxBuildHasher>,
    /// The map of counted marks may hold marks of flows no longer tracked (inherited ones,
    /// evicted flows', or room is short after a failed write): see [`FlowTracker::take_sweep`].
    sweep_due: bool,
    evictions: Evictions,
    /// The end of the join window, on the kernel clock (see [`FlowTracker::open_join_window`]):
    /// UDP and SCTP flows first seen before it may have been joined mid-way. It lives here
    /// rather than in the audit because this is where a flow's first-packet time (on the same
    /// clock) and its record's `mid_stream` meet: the audit, the conntrack lookup and the log
    /// then treat such a flow as any other first seen mid-stream.
    join_window_until_ns: Option<u64>,
}

impl FlowTracker {
    #[must_use]
    pub fn new(config: FlowsConfig) -> Self {
        Self {
            config,
            pending: HashMap::default(),
            settled: HashMap::default(),
            hasher: foldhash::fast::RandomState::default(),
            deadlines: VecDeque::new(),
            walk: 0,
            gone: Gone::default(),
            marks: Vec::new(),
            inherited: HashMap::default(),
            sweep_due: false,
            evictions: Evictions::default(),
            join_window_until_ns: None,
        }
    }

    /// Opens the join window, until `until_ns` (kernel clock): an agent that started without
    /// adopting a predecessor's tables joins conversations already going on, and for UDP and
    /// SCTP (no opening packet the datapath could tell apart) the first packet it sees is often
    /// the responder's. Flows of those protocols first seen before `until_ns` are recorded
    /// `mid_stream`, so the audit orients them by evidence instead of by who spoke first. TCP
    /// says itself whether a packet opens a flow, and an ICMP echo's request or reply says who
    /// asked: neither is affected.
    pub const fn open_join_window(&mut self, until_ns: u64) {
        self.join_window_until_ns = Some(until_ns);
    }

    /// Whether a flow of `proto` first seen at `first_seen_ns` may have been joined mid-way
    /// (see [`FlowTracker::open_join_window`]).
    fn joined_mid_way(&self, proto: u8, first_seen_ns: u64) -> bool {
        use auditor_ebpf::flow::proto::{ICMP, ICMPV6, TCP};
        !matches!(proto, TCP | ICMP | ICMPV6)
            && self
                .join_window_until_ns
                .is_some_and(|until| first_seen_ns < until)
    }

    /// Keys of the flows decided since the last call, each with its table entry's
    /// `first_seen_ns`: write their counted marks (the map `REPORTED`, see
    /// [`super::FlowSource::mark_reported`]) before their records are counted.
    pub fn take_marks(&mut self) -> Vec<(FlowKey, u64)> {
        std::mem::take(&mut self.marks)
    }

    /// A counted mark a predecessor left (read from the adopted map before anything else): the
    /// flow of `key` whose entry was first seen at `first_seen_ns` was counted, so that entry is
    /// tracked without a record. An entry of the key with another first packet is a new one,
    /// counted as usual.
    pub fn inherit(&mut self, key: &FlowKey, first_seen_ns: u64) {
        let hash = self.hash(key);
        self.inherited.insert(hash, first_seen_ns);
        // After the first walk, marks that matched no entry are stale.
        self.sweep_due = true;
    }

    /// Whether a predecessor counted the flow of `key` (hashed `hash`) in the entry `state`.
    fn counted_before(&self, hash: u64, state: &FlowState) -> bool {
        self.inherited.get(&hash) == Some(&state.first_seen_ns)
    }

    /// Writing the counted mark of `key` (first seen at `first_seen_ns`) failed: the next walk
    /// that finds the entry tries again, after a sweep has made what room it can.
    pub fn mark_failed(&mut self, key: &FlowKey, first_seen_ns: u64) {
        let hash = self.hash(key);
        if let Some(settled) = self.settled.get_mut(&hash)
            && settled.first_seen_ns == first_seen_ns
        {
            settled.marked = false;
        }
        self.sweep_due = true;
    }

    /// Whether the map of counted marks should be swept now (once per call that says so):
    /// after a walk that followed the adoption of a predecessor's marks, that noticed evictions
    /// of counted flows, or after a mark could not be written. Delete every mark
    /// [`FlowTracker::keeps_mark`] refuses.
    pub fn take_sweep(&mut self) -> bool {
        std::mem::take(&mut self.sweep_due)
    }

    /// Whether the counted mark of `key` with `first_seen_ns` belongs to a flow tracked now, in
    /// the entry it was written for; any other mark is stale (its entry went, or was recreated)
    /// and is deleted by the sweep.
    #[must_use]
    pub fn keeps_mark(&self, key: &FlowKey, first_seen_ns: u64) -> bool {
        self.settled
            .get(&self.hash(key))
            .is_some_and(|s| s.first_seen_ns == first_seen_ns)
    }

    /// Evictions noticed so far.
    #[must_use]
    pub const fn evictions(&self) -> Evictions {
        self.evictions
    }

    /// Counted flows remembered after their entries went.
    #[must_use]
    pub fn remembered_gone(&self) -> usize {
        self.gone.len()
    }

    /// Records a decided flow that is not counted here (a predecessor counted it, or it resumes
    /// one counted before): it is tracked until its entry goes, and its entry marked unless it
    /// already is (`marked`: the predecessor's mark, which is then no longer inherited).
    fn settle_silently(
        &mut self,
        key: FlowKey,
        hash: u64,
        (first_seen_ns, last_seen_ns): (u64, u64),
        marked: bool,
    ) {
        self.pending.remove(&key);
        self.settled.insert(
            hash,
            Settled {
                first_seen_ns,
                last_seen: Ticks::of(last_seen_ns),
                seen_in_walk: self.walk,
                finished: false,
                marked: true,
            },
        );
        if marked {
            self.inherited.remove(&hash);
        } else {
            self.marks.push((key, first_seen_ns));
        }
    }

    #[must_use]
    pub const fn config(&self) -> &FlowsConfig {
        &self.config
    }

    /// Flows tracked now (pending, decided or lingering).
    #[must_use]
    pub fn len(&self) -> usize {
        self.pending.len() + self.settled.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.settled.is_empty()
    }

    /// Flows still waiting for an answer.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Feeds one ring-buffer event. `state` is the flow's table entry read right after the event
    /// (for counters; `None` if it is already gone). Returns the flow's record when this event
    /// decided it. Events with undecodable fields are ignored (the kernel never writes them).
    pub fn on_event(
        &mut self,
        event: &FlowEvent,
        state: Option<&FlowState>,
        now: &Now,
    ) -> Option<FlowRecord> {
        let FlowEvent {
            key,
            ts_ns,
            ifindex,
            kind: _,
            initiator: _,
            hook: _,
            mid_stream,
        } = *event;
        let (kind, initiator, hook) = (event.kind()?, event.initiator()?, event.hook()?);
        let hash = self.hash(&key);
        let fresh = || Tracked {
            initiator,
            first_seen_ns: ts_ns,
            last_seen_ns: ts_ns,
            ifindex,
            hook,
            // Seen at its answer, the initiator is known: not a flow first seen mid-stream.
            mid_stream: mid_stream == first_seen::MID_STREAM,
            packets: [0; 2],
            bytes: [0; 2],
            walk_born: self.walk,
            seen_in_walk: self.walk,
            evicted: false,
        };
        if kind == EventKind::New {
            // The same flow seen on a second CPU or interface in the same instant.
            if self.pending.contains_key(&key) {
                return None;
            }
            // A counted flow resuming after its entry went (idle expiry, eviction): TCP says so
            // (not an opening packet); other protocols have no opening to tell, and the same
            // 5-tuple again is the same conversation.
            let resumable =
                mid_stream == first_seen::MID_STREAM || key.proto != auditor_ebpf::flow::proto::TCP;
            if let Some(settled) = self.settled.get_mut(&hash) {
                // This flow's own `New`, read after a table walk adopted and decided it (the ring
                // buffer lagging the walk): not a second flow.
                if ts_ns <= settled.first_seen_ns {
                    return None;
                }
                // A flow we already reported, resuming after its entry was deleted or evicted
                // before a walk noticed: the new entry (first seen at this event) is marked too,
                // so an agent adopting the table after a restart does not count it again.
                if resumable && !settled.finished {
                    settled.first_seen_ns = ts_ns;
                    settled.marked = true;
                    self.marks.push((key, ts_ns));
                    return None;
                }
            }
            if resumable && self.gone.take(hash) {
                self.settle_silently(key, hash, (ts_ns, ts_ns), false);
                return None;
            }
            self.settled.remove(&hash);
            let mut tracked = fresh();
            // The packet that created the entry, the initiator's (or the one taken for it);
            // later ones are counted when the table is read.
            tracked.packets[0] = 1;
            if let Some(state) = state {
                refresh(&mut tracked, state);
            }
            expect_answer(
                &mut self.deadlines,
                self.config.answer_timeout,
                key,
                tracked.first_seen_ns,
            );
            self.pending.insert(key, tracked);
            return None;
        }
        let finished = matches!(kind, EventKind::Closed | EventKind::Refused);
        // Already decided: the event only moves it on to lingering.
        if let Some(settled) = self.settled.get_mut(&hash) {
            settled.last_seen = settled.last_seen.max(Ticks::of(ts_ns));
            if let Some(state) = state {
                settled.last_seen = settled.last_seen.max(Ticks::of(state.last_seen_ns));
            }
            settled.finished |= finished;
            return None;
        }
        // A flow a predecessor counted (adopted with the pinned table): tracked, not counted.
        if let Some(state) = state.filter(|s| self.counted_before(hash, s)) {
            let times = (state.first_seen_ns, state.last_seen_ns.max(ts_ns));
            self.settle_silently(key, hash, times, true);
            return None;
        }
        // An answer, refusal or close whose `New` we never saw (lost event, or started before us).
        let mut tracked = self.pending.remove(&key).unwrap_or_else(fresh);
        if let Some(state) = state {
            refresh(&mut tracked, state);
        }
        tracked.last_seen_ns = tracked.last_seen_ns.max(ts_ns);
        let outcome = match kind {
            EventKind::New => return None,
            EventKind::Answered => Outcome::Established,
            EventKind::Refused => Outcome::Refused,
            EventKind::Closed => {
                // A flow first seen mid-stream was established before we saw it, whatever
                // closed it (a RST on it is no refusal).
                if state.is_some_and(|s| s.answered != 0) || mid_stream != 0 {
                    Outcome::Established
                } else {
                    // The initiator reset or finished before any answer: it gave up.
                    Outcome::Unanswered
                }
            }
        };
        self.settle(key, hash, &tracked, outcome, finished, now)
    }

    /// Keys of pending flows whose answer timeout has passed, each once, with when each was
    /// first seen (kernel clock). Look each up in the table and call [`FlowTracker::resolve`].
    pub fn due(&mut self, now: &Now) -> Vec<(FlowKey, u64)> {
        let timeout = duration_ns(self.config.answer_timeout);
        let mut due = Vec::new();
        while let Some(&(deadline, key)) = self.deadlines.front() {
            if deadline > now.mono_ns {
                break;
            }
            self.deadlines.pop_front();
            // A flow decided meanwhile, or one whose key was reused later (that use has an
            // entry of its own further back), is not due.
            if let Some(t) = self.pending.get(&key)
                && t.first_seen_ns.saturating_add(timeout) <= now.mono_ns
            {
                due.push((key, t.first_seen_ns));
            }
        }
        // A burst of new flows grows these far beyond what the steady state needs, and a hash
        // map never shrinks by itself: give the room back once the burst has been decided.
        shrink_map(&mut self.pending);
        if oversized(self.deadlines.len(), self.deadlines.capacity()) {
            self.deadlines.shrink_to(self.deadlines.len() * 2);
        }
        due
    }

    /// Decides a pending flow whose answer timeout has passed, from its table entry (`None` when
    /// the entry is gone): an answer or refusal there (whose event was lost) wins, otherwise it is
    /// unanswered.
    pub fn resolve(
        &mut self,
        key: &FlowKey,
        state: Option<&FlowState>,
        now: &Now,
    ) -> Option<FlowRecord> {
        let mut tracked = self.pending.remove(key)?;
        let hash = self.hash(key);
        if let Some(s) = state.filter(|s| self.counted_before(hash, s)) {
            self.settle_silently(*key, hash, (s.first_seen_ns, s.last_seen_ns), true);
            return None;
        }
        let outcome = state.map_or(Outcome::Unanswered, |s| {
            refresh(&mut tracked, s);
            outcome_of(s).unwrap_or(Outcome::Unanswered)
        });
        let finished = state
            .is_some_and(|s| matches!(s.status(), Some(FlowStatus::Closed | FlowStatus::Refused)));
        self.settle(*key, hash, &tracked, outcome, finished, now)
    }

    /// Starts a walk of the flow table; call [`FlowTracker::on_table_entry`] for every entry and
    /// [`FlowTracker::end_walk`] after the last.
    pub fn begin_walk(&mut self) {
        self.walk = self.walk.wrapping_add(1);
    }

    /// Reconciles one table entry: adopts flows whose `New` event was lost, decides those whose
    /// answer or refusal event was lost, refreshes counters, and says whether to delete the entry.
    pub fn on_table_entry(&mut self, key: &FlowKey, state: &FlowState, now: &Now) -> WalkVerdict {
        let walk = self.walk;
        let finished = matches!(
            state.status(),
            Some(FlowStatus::Closed | FlowStatus::Refused)
        );
        let hash = self.hash(key);
        let mut record = None;
        if !self.settled.contains_key(&hash) && self.counted_before(hash, state) {
            // Counted by a predecessor (the table is pinned and was adopted): tracked only.
            let times = (state.first_seen_ns, state.last_seen_ns);
            self.settle_silently(*key, hash, times, true);
        } else if !self.settled.contains_key(&hash) {
            let Some(initiator) = state.initiator() else {
                return WalkVerdict {
                    record: None,
                    remove: false,
                };
            };
            let outcome = outcome_of(state);
            let tracked = match self.pending.entry(*key) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    let tracked = entry.insert(Tracked {
                        initiator,
                        first_seen_ns: state.first_seen_ns,
                        last_seen_ns: state.last_seen_ns,
                        ifindex: state.ifindex,
                        hook: state.hook().unwrap_or(Hook::Ingress),
                        mid_stream: state.mid_stream == first_seen::MID_STREAM,
                        packets: state.packets,
                        bytes: state.bytes,
                        walk_born: walk,
                        seen_in_walk: walk,
                        evicted: false,
                    });
                    if outcome.is_none() {
                        expect_answer(
                            &mut self.deadlines,
                            self.config.answer_timeout,
                            *key,
                            tracked.first_seen_ns,
                        );
                    }
                    tracked
                }
            };
            refresh(tracked, state);
            tracked.seen_in_walk = walk;
            let Some(outcome) = outcome else {
                return WalkVerdict {
                    record: None,
                    remove: false,
                };
            };
            if let Some(tracked) = self.pending.remove(key) {
                record = self.settle(*key, hash, &tracked, outcome, finished, now);
            }
        }
        let Some(settled) = self.settled.get_mut(&hash) else {
            return WalkVerdict {
                record,
                remove: false,
            };
        };
        settled.seen_in_walk = walk;
        settled.last_seen = settled.last_seen.max(Ticks::of(state.last_seen_ns));
        settled.finished |= finished;
        let linger = if settled.finished {
            self.config.closed_linger
        } else {
            self.config.idle_timeout
        };
        let remove = Ticks::of(now.mono_ns).passed(settled.last_seen, linger);
        // Counted, but this entry not marked: the flow resumed in an entry of its own (after an
        // eviction) before this walk, or writing its mark failed. Marked (again): an agent
        // adopting the table after a restart then does not count it a second time. Not an
        // entry the walk removes.
        // Another entry under the key while the flow was closed, or a TCP one opening (a
        // SYN), is a new flow, not this one resuming: its `New` event splits it off.
        let resumed = settled.first_seen_ns != state.first_seen_ns
            && !settled.finished
            && (state.mid_stream == first_seen::MID_STREAM
                || key.proto != auditor_ebpf::flow::proto::TCP);
        let unmarked = settled.first_seen_ns == state.first_seen_ns && !settled.marked;
        if record.is_none() && !remove && (resumed || unmarked) {
            settled.first_seen_ns = state.first_seen_ns;
            settled.marked = true;
            self.marks.push((*key, state.first_seen_ns));
        }
        if remove {
            let finished = settled.finished;
            self.settled.remove(&hash);
            // Idle, not closed: the connection may resume, and is then the same flow.
            if !finished {
                self.gone.remember(hash);
            }
        }
        WalkVerdict { record, remove }
    }

    /// Forgets decided flows the walk did not find (the LRU evicted them: nothing else deletes
    /// entries but the walk itself) and remembers them as gone, so their resumption is not
    /// counted again; counts them and the pending flows the walk should have found as evicted.
    /// Pending ones stay until their timeout resolves them.
    pub fn end_walk(&mut self) {
        let walk = self.walk;
        let gone = &mut self.gone;
        let mut decided = 0;
        self.settled.retain(|hash, s| {
            let kept = s.seen_in_walk == walk;
            if !kept {
                decided += 1;
                if !s.finished {
                    gone.remember(*hash);
                }
            }
            kept
        });
        let mut undecided = 0;
        for tracked in self.pending.values_mut() {
            // Pending before this walk began, so its entry existed all through the walk.
            if tracked.walk_born != walk && tracked.seen_in_walk != walk && !tracked.evicted {
                tracked.evicted = true;
                undecided += 1;
            }
        }
        self.evictions.decided += decided;
        self.evictions.undecided += undecided;
        // Evicted counted flows leave their marks behind; inherited marks no entry matched are
        // stale: the sweep deletes them.
        if decided > 0 {
            self.sweep_due = true;
        }
        if !self.inherited.is_empty() {
            self.inherited = HashMap::default();
        }
        if decided + undecided > 0 {
            tracing::debug!(decided, undecided, "flows evicted from the flow table");
        }
        shrink_map(&mut self.settled);
    }

    /// Moves a pending flow (its key hashed `hash`) to the decided ones and builds its record.
    fn settle(
        &mut self,
        key: FlowKey,
        hash: u64,
        tracked: &Tracked,
        outcome: Outcome,
        finished: bool,
        now: &Now,
    ) -> Option<FlowRecord> {
        self.settled.insert(
            hash,
            Settled {
                first_seen_ns: tracked.first_seen_ns,
                last_seen: Ticks::of(tracked.last_seen_ns),
                seen_in_walk: self.walk,
                finished,
                marked: true,
            },
        );
        self.marks.push((key, tracked.first_seen_ns));
        let joined = self.joined_mid_way(key.proto, tracked.first_seen_ns);
        record(key, tracked, outcome, now).map(|mut r| {
            r.mid_stream |= joined;
            r
        })
    }
}

/// Below this capacity a collection is never shrunk (not worth the reallocation).
const SHRINK_ABOVE: usize = 4096;

/// Whether a collection is worth shrinking to twice its length: less than a quarter full (so
/// one hovering around a size is not reallocated back and forth) and not small.
const fn oversized(len: usize, capacity: usize) -> bool {
    capacity > SHRINK_ABOVE && len * 4 < capacity
}

fn shrink_map<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(map: &mut HashMap<K, V, S>) {
    if oversized(map.len(), map.capacity()) {
        map.shrink_to(map.len() * 2);
    }
}

/// Queues the answer deadline of a flow that became pending. Usually the latest so far; an
/// adopted flow (its `New` event lost) may be older than every queued one, and then goes first.
fn expect_answer(
    deadlines: &mut VecDeque<(u64, FlowKey)>,
    timeout: Duration,
    key: FlowKey,
    first_seen_ns: u64,
) {
    let deadline = first_seen_ns.saturating_add(duration_ns(timeout));
    if deadlines.front().is_some_and(|(d, _)| deadline <= *d) {
        deadlines.push_front((deadline, key));
    } else {
        deadlines.push_back((deadline, key));
    }
}

/// The outcome a table entry shows, if decided.
fn outcome_of(state: &FlowState) -> Option<Outcome> {
    match state.status()? {
        FlowStatus::New => None,
        FlowStatus::Answered => Some(Outcome::Established),
        FlowStatus::Refused => Some(Outcome::Refused),
        FlowStatus::Closed if state.answered != 0 || state.mid_stream != 0 => {
            Some(Outcome::Established)
        }
        FlowStatus::Closed => Some(Outcome::Unanswered),
    }
}

fn refresh(tracked: &mut Tracked, state: &FlowState) {
    tracked.packets = state.packets;
    tracked.bytes = state.bytes;
    tracked.last_seen_ns = tracked.last_seen_ns.max(state.last_seen_ns);
    tracked.first_seen_ns = tracked.first_seen_ns.min(state.first_seen_ns);
}

/// A decided flow's record (`None` for a protocol the datapath never keys flows by).
fn record(key: FlowKey, tracked: &Tracked, outcome: Outcome, now: &Now) -> Option<FlowRecord> {
    let responder_side = match tracked.initiator {
        Side::Lo => Side::Hi,
        Side::Hi => Side::Lo,
    };
    let socket = |side| SocketAddr::from(key.socket(side));
    Some(FlowRecord {
        protocol: Protocol::from_number(key.proto)?,
        initiator: socket(tracked.initiator),
        responder: socket(responder_side),
        ifindex: tracked.ifindex,
        interface: String::new(),
        hook: tracked.hook,
        packets: PerDirection {
            to_responder: tracked.packets[0],
            to_initiator: tracked.packets[1],
        },
        bytes: PerDirection {
            to_responder: tracked.bytes[0],
            to_initiator: tracked.bytes[1],
        },
        first_seen: now.wall_of(tracked.first_seen_ns),
        last_seen: now.wall_of(tracked.last_seen_ns),
        mid_stream: tracked.mid_stream,
        outcome,
        key,
    })
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use auditor_ebpf::flow::proto;

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn now(secs: u64) -> Now {
        Now {
            mono_ns: 1000 * SEC + secs * SEC,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs),
        }
    }

    fn client() -> (IpAddr, u16) {
        ("10.0.0.1".parse().unwrap(), 40000)
    }

    fn server() -> (IpAddr, u16) {
        ("10.0.0.2".parse().unwrap(), 80)
    }

    fn key(p: u8) -> (FlowKey, Side) {
        FlowKey::from_addrs(p, client(), server())
    }

    fn event(p: u8, kind: EventKind, at: u64) -> FlowEvent {
        let (key, initiator) = key(p);
        FlowEvent {
            key,
            ts_ns: now(at).mono_ns,
            ifindex: 7,
            kind: kind as u8,
            initiator: initiator as u8,
            hook: Hook::Egress as u8,
            mid_stream: 0,
        }
    }

    fn state(p: u8, status: FlowStatus, answered: bool, first: u64, last: u64) -> FlowState {
        FlowState {
            first_seen_ns: now(first).mono_ns,
            last_seen_ns: now(last).mono_ns,
            packets: [3, u64::from(answered) * 2],
            bytes: [180, u64::from(answered) * 120],
            ifindex: 7,
            tcp_flags: [0; 2],
            initiator: key(p).1 as u8,
            status: status as u8,
            hook: Hook::Egress as u8,
            mid_stream: 0,
            answered: u8::from(answered),
            owners: 0,
            tick: 0,
            nat: 0,
            _reserved: [0; 7],
        }
    }

    fn tracker() -> FlowTracker {
        FlowTracker::new(FlowsConfig::default())
    }

    #[test]
    fn answered_flow_is_recorded_once_and_oriented() {
        let mut t = tracker();
        assert!(
            t.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(0))
                .is_none()
        );
        // The same flow's New from a second interface is not a second flow.
        assert!(
            t.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(0))
                .is_none()
        );
        let s = state(proto::TCP, FlowStatus::Answered, true, 0, 1);
        let r = t
            .on_event(
                &event(proto::TCP, EventKind::Answered, 1),
                Some(&s),
                &now(1),
            )
            .expect("the answer decides the flow");
        assert_eq!(r.outcome, Outcome::Established);
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!(r.initiator, SocketAddr::from(client()));
        assert_eq!(r.responder, SocketAddr::from(server()));
        assert_eq!(
            r.packets,
            PerDirection {
                to_responder: 3,
                to_initiator: 2
            }
        );
        assert_eq!(r.first_seen, now(0).wall);
        assert_eq!(r.last_seen, now(1).wall);
        assert_eq!((r.ifindex, r.hook, r.mid_stream), (7, Hook::Egress, false));
        // Neither the close nor a walk reports it again, and nothing is due.
        let closed = state(proto::TCP, FlowStatus::Closed, true, 0, 2);
        assert!(
            t.on_event(
                &event(proto::TCP, EventKind::Closed, 2),
                Some(&closed),
                &now(2)
            )
            .is_none()
        );
        t.begin_walk();
        assert!(
            t.on_table_entry(&key(proto::TCP).0, &closed, &now(3))
                .record
                .is_none()
        );
        t.end_walk();
        assert!(t.due(&now(100)).is_empty());
    }

    #[test]
    fn refusal_and_timeout() {
        let mut t = tracker();
        t.on_event(&event(proto::UDP, EventKind::New, 0), None, &now(0));
        let r = t
            .on_event(&event(proto::UDP, EventKind::Refused, 0), None, &now(0))
            .unwrap();
        assert_eq!(r.outcome, Outcome::Refused);

        let mut t = tracker();
        t.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(0));
        assert!(t.due(&now(4)).is_empty(), "due before the answer timeout");
        let due = t.due(&now(5));
        assert_eq!(due, vec![(key(proto::TCP).0, now(0).mono_ns)]);
        assert!(t.due(&now(5)).is_empty(), "due once");
        let s = state(proto::TCP, FlowStatus::New, false, 0, 4);
        let r = t.resolve(&due[0].0, Some(&s), &now(5)).unwrap();
        assert_eq!(r.outcome, Outcome::Unanswered);
        assert_eq!(r.packets.to_responder, 3);
        assert!(
            t.resolve(&due[0].0, Some(&s), &now(6)).is_none(),
            "decided twice"
        );
    }

    #[test]
    fn lost_answer_is_found_at_the_deadline() {
        let mut t = tracker();
        t.on_event(&event(proto::UDP, EventKind::New, 0), None, &now(0));
        let s = state(proto::UDP, FlowStatus::Answered, true, 0, 0);
        let r = t.resolve(&key(proto::UDP).0, Some(&s), &now(5)).unwrap();
        assert_eq!(r.outcome, Outcome::Established);
    }

    #[test]
    fn walk_adopts_lost_events_and_expires() {
        let mut t = tracker();
        let (k, _) = key(proto::TCP);
        t.begin_walk();
        let v = t.on_table_entry(
            &k,
            &state(proto::TCP, FlowStatus::Answered, true, 0, 1),
            &now(2),
        );
        assert_eq!(v.record.map(|r| r.outcome), Some(Outcome::Established));
        assert!(!v.remove);
        t.end_walk();
        // Idle past the idle timeout: deleted and forgotten.
        t.begin_walk();
        let v = t.on_table_entry(
            &k,
            &state(proto::TCP, FlowStatus::Answered, true, 0, 1),
            &now(301),
        );
        assert!(v.record.is_none());
        assert!(v.remove);
        t.end_walk();
        assert!(t.is_empty());
        // A refused flow lingers 30 s.
        t.begin_walk();
        let s = state(proto::TCP, FlowStatus::Refused, false, 0, 0);
        assert_eq!(
            t.on_table_entry(&k, &s, &now(1)).record.map(|r| r.outcome),
            Some(Outcome::Refused)
        );
        assert!(t.on_table_entry(&k, &s, &now(31)).remove);
    }

    #[test]
    fn evicted_decided_flows_are_forgotten_pending_ones_kept() {
        let mut t = tracker();
        t.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(0));
        t.on_event(&event(proto::UDP, EventKind::New, 0), None, &now(0));
        t.on_event(&event(proto::UDP, EventKind::Answered, 0), None, &now(0))
            .unwrap();
        t.begin_walk();
        t.end_walk();
        assert_eq!((t.len(), t.pending()), (1, 1));
    }

    #[test]
    fn resumed_flow_is_not_reported_again_but_a_reused_key_is() {
        let mut t = tracker();
        t.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(0));
        t.on_event(&event(proto::TCP, EventKind::Answered, 0), None, &now(0))
            .unwrap();
        let mut resumed = event(proto::TCP, EventKind::New, 10);
        resumed.mid_stream = 1;
        t.on_event(&resumed, None, &now(10));
        assert!(
            t.on_event(&event(proto::TCP, EventKind::Answered, 10), None, &now(10))
                .is_none()
        );
        // After a close, a new SYN on the same 4-tuple is a new connection.
        t.on_event(&event(proto::TCP, EventKind::Closed, 11), None, &now(11));
        t.on_event(&event(proto::TCP, EventKind::New, 12), None, &now(12));
        let r = t
            .on_event(&event(proto::TCP, EventKind::Answered, 12), None, &now(12))
            .unwrap();
        assert_eq!(r.first_seen, now(12).wall);
    }

    /// The ring buffer lags the table walk (a slow or busy CPU): the walk adopts and decides the
    /// flow first, then its own `New` and `Answered` events arrive. One record, not two.
    #[test]
    fn a_walk_ahead_of_the_events_does_not_count_the_flow_twice() {
        let mut t = tracker();
        let (k, _) = key(proto::TCP);
        let answered = state(proto::TCP, FlowStatus::Answered, true, 0, 0);
        t.begin_walk();
        let v = t.on_table_entry(&k, &answered, &now(1));
        assert_eq!(v.record.map(|r| r.outcome), Some(Outcome::Established));
        t.end_walk();
        assert_eq!(
            t.take_marks(),
            vec![(k, answered.first_seen_ns)],
            "the decided flow's entry is marked"
        );
        assert!(
            t.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(1))
                .is_none()
        );
        assert!(
            t.on_event(
                &event(proto::TCP, EventKind::Answered, 0),
                Some(&answered),
                &now(1)
            )
            .is_none(),
            "counted twice"
        );
        assert_eq!(t.pending(), 0);
        // A later connection reusing the key (after a close) is a new flow still.
        t.on_event(&event(proto::TCP, EventKind::Closed, 2), None, &now(2));
        t.on_event(&event(proto::TCP, EventKind::New, 3), None, &now(3));
        assert!(
            t.on_event(&event(proto::TCP, EventKind::Answered, 3), None, &now(3))
                .is_some()
        );
    }

    /// After a restart the pinned table is adopted: flows the predecessor counted (a mark in
    /// the map of counted flows with their entry's first packet) are tracked without a record,
    /// whatever reaches us first; unmarked ones are counted, with the initiator the table
    /// recorded.
    #[test]
    fn flows_a_predecessor_counted_are_not_counted_again() {
        let mut t = tracker();
        let (tcp_key, _) = key(proto::TCP);
        let counted = state(proto::TCP, FlowStatus::Answered, true, 0, 5);
        t.inherit(&tcp_key, counted.first_seen_ns);
        t.begin_walk();
        let verdict = t.on_table_entry(&tcp_key, &counted, &now(6));
        assert!(verdict.record.is_none() && !verdict.remove);
        t.end_walk();
        assert_eq!(t.len(), 1);
        assert!(t.take_marks().is_empty(), "its entry is marked already");
        // Its close later is no record either.
        assert!(
            t.on_event(
                &event(proto::TCP, EventKind::Closed, 7),
                Some(&counted),
                &now(7)
            )
            .is_none()
        );
        // An event before any walk, for a counted flow: no record.
        let mut t = tracker();
        let (udp_key, _) = key(proto::UDP);
        let udp = state(proto::UDP, FlowStatus::Closed, true, 0, 5);
        t.inherit(&udp_key, udp.first_seen_ns);
        assert!(
            t.on_event(
                &event(proto::UDP, EventKind::Closed, 6),
                Some(&udp),
                &now(6)
            )
            .is_none()
        );
        // An unmarked entry (decided while no agent ran) is counted, once.
        let mut t = tracker();
        t.begin_walk();
        let fresh = state(proto::UDP, FlowStatus::Answered, true, 0, 5);
        let r = t.on_table_entry(&udp_key, &fresh, &now(6)).record;
        assert_eq!(
            r.map(|r| (r.initiator, r.outcome)),
            Some((SocketAddr::from(client()), Outcome::Established))
        );
        assert!(t.on_table_entry(&udp_key, &fresh, &now(7)).record.is_none());
    }

    /// A connection idle past the idle timeout leaves the table; when it resumes (the server
    /// speaking first, so mid-stream), it is the same flow: not counted again. A UDP one too.
    #[test]
    fn a_connection_resuming_after_idle_expiry_is_not_counted_again() {
        for p in [proto::TCP, proto::UDP] {
            let mut t = tracker();
            let (k, initiator) = key(p);
            t.on_event(&event(p, EventKind::New, 0), None, &now(0));
            assert!(
                t.on_event(&event(p, EventKind::Answered, 0), None, &now(0))
                    .is_some()
            );
            t.begin_walk();
            let idle = state(p, FlowStatus::Answered, true, 0, 0);
            assert!(t.on_table_entry(&k, &idle, &now(301)).remove);
            t.end_walk();
            assert!(t.is_empty());
            assert_eq!(t.remembered_gone(), 1);
            // The server speaks first: the kernel takes it for the initiator.
            let server_side = match initiator {
                Side::Lo => Side::Hi,
                Side::Hi => Side::Lo,
            };
            let mut resumed = event(p, EventKind::New, 400);
            resumed.initiator = server_side as u8;
            resumed.mid_stream = u8::from(p == proto::TCP);
            assert!(t.on_event(&resumed, None, &now(400)).is_none());
            assert_eq!(t.pending(), 0, "{p}: waiting to count it again");
            assert!(
                t.on_event(&event(p, EventKind::Answered, 400), None, &now(400))
                    .is_none(),
                "{p}: counted again"
            );
            assert_eq!(t.take_marks().len(), 2, "{p}: both uses marked");
            assert_eq!(
                t.evictions(),
                Evictions::default(),
                "{p}: expiry is no eviction"
            );
        }
    }

    /// Entries the tracker knew that a walk no longer finds were evicted: counted by whether
    /// their outcome was decided, and a decided one resuming is not counted again.
    #[test]
    fn evictions_are_counted_by_decision() {
        let mut t = tracker();
        t.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(0));
        t.on_event(&event(proto::TCP, EventKind::Answered, 0), None, &now(0))
            .unwrap();
        t.on_event(&event(proto::UDP, EventKind::New, 0), None, &now(0));
        // A walk that sees neither.
        t.begin_walk();
        t.end_walk();
        assert_eq!(
            t.evictions(),
            Evictions {
                decided: 1,
                undecided: 1
            }
        );
        // Counted once: the next walk adds nothing.
        t.begin_walk();
        t.end_walk();
        assert_eq!(t.evictions().undecided, 1);
        // A flow the walk itself adopted is not evicted by it.
        let mut t = tracker();
        t.begin_walk();
        let (k, _) = key(proto::UDP);
        t.on_table_entry(
            &k,
            &state(proto::UDP, FlowStatus::New, false, 0, 0),
            &now(0),
        );
        t.end_walk();
        assert_eq!(t.evictions(), Evictions::default());
        let mut resumed = event(proto::TCP, EventKind::New, 10);
        resumed.mid_stream = 1;
        let mut t2 = tracker();
        t2.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(0));
        t2.on_event(&event(proto::TCP, EventKind::Answered, 0), None, &now(0));
        t2.begin_walk();
        t2.end_walk();
        assert!(t2.on_event(&resumed, None, &now(10)).is_none());
        assert_eq!(
            t2.pending(),
            0,
            "an evicted, counted flow resuming is not counted again"
        );
    }

    /// A counted conversation whose entry the LRU evicted and that resumed in a new entry before
    /// any walk noticed (its settled record still there): UDP has no opening to tell, so the
    /// same 5-tuple again is the same conversation, not a second one; and the new entry is
    /// marked, so an agent adopting the table after a restart does not count it either.
    #[test]
    fn a_conversation_resuming_before_a_walk_is_not_counted_again_and_is_marked() {
        for p in [proto::UDP, proto::TCP] {
            let mut t = tracker();
            t.on_event(&event(p, EventKind::New, 0), None, &now(0));
            let answered = t.on_event(&event(p, EventKind::Answered, 0), None, &now(0));
            assert!(answered.is_some(), "{p}: decided");
            let _ = t.take_marks();
            let mut resumed = event(p, EventKind::New, 10);
            // TCP says it resumed (no SYN); UDP cannot.
            resumed.mid_stream = u8::from(p == proto::TCP);
            let mut entry = state(p, FlowStatus::New, false, 10, 10);
            entry.mid_stream = resumed.mid_stream;
            assert!(t.on_event(&resumed, Some(&entry), &now(10)).is_none());
            assert_eq!(t.pending(), 0, "{p}: the resumed flow is counted again");
            assert_eq!(
                t.take_marks(),
                vec![(key(p).0, entry.first_seen_ns)],
                "{p}: the new entry is not marked, with its own first packet"
            );
            // A walk finds the entry whose mark is written (or queued): nothing to do.
            t.begin_walk();
            let verdict = t.on_table_entry(&key(p).0, &entry, &now(11));
            t.end_walk();
            assert!(verdict.record.is_none(), "{p}: counted by the walk");
            assert!(
                t.take_marks().is_empty(),
                "{p}: a marked entry marked again"
            );
            // Writing the mark failed: the next walk that finds the entry tries again, after a
            // sweep has made room, and only that one.
            t.mark_failed(&key(p).0, entry.first_seen_ns);
            assert!(t.take_sweep(), "{p}: a failed mark asks for no sweep");
            for (at, marks) in [(12, 1), (13, 0)] {
                t.begin_walk();
                t.on_table_entry(&key(p).0, &entry, &now(at));
                t.end_walk();
                assert_eq!(t.take_marks().len(), marks, "{p}: marks at {at} s");
            }
        }
    }

    /// A walk that finds a new TCP connection (a SYN) in the entry of a closed flow still
    /// lingering under the same key does not take it for the old flow resuming: its `New`
    /// splits it off and it is counted, and its mark is written when it is decided, with its own
    /// first packet.
    #[test]
    fn a_new_connection_under_a_lingering_key_is_no_resumption() {
        let mut t = tracker();
        let (k, _) = key(proto::TCP);
        t.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(0));
        assert!(
            t.on_event(&event(proto::TCP, EventKind::Answered, 0), None, &now(0))
                .is_some()
        );
        t.on_event(&event(proto::TCP, EventKind::Closed, 1), None, &now(1));
        assert_eq!(t.take_marks(), vec![(k, now(0).mono_ns)]);
        // The walk sees the new SYN's entry before its event is read.
        let reopened = state(proto::TCP, FlowStatus::New, false, 5, 5);
        t.begin_walk();
        let verdict = t.on_table_entry(&k, &reopened, &now(5));
        t.end_walk();
        assert!(verdict.record.is_none() && !verdict.remove);
        assert!(
            t.take_marks().is_empty(),
            "the new connection marked as the old one"
        );
        assert!(!t.keeps_mark(&k, now(5).mono_ns));
        t.on_event(&event(proto::TCP, EventKind::New, 5), None, &now(5));
        let r = t.on_event(
            &event(proto::TCP, EventKind::Answered, 5),
            Some(&state(proto::TCP, FlowStatus::Answered, true, 5, 5)),
            &now(5),
        );
        assert!(r.is_some(), "the new connection is not counted");
        assert_eq!(t.take_marks(), vec![(k, now(5).mono_ns)]);
        assert!(t.keeps_mark(&k, now(5).mono_ns) && !t.keeps_mark(&k, now(0).mono_ns));
    }

    /// The marks a predecessor left are honoured until the first walk has matched them; what it
    /// did not match is stale (the sweep deletes it), and so are the marks of evicted flows.
    #[test]
    fn inherited_marks_last_one_walk_and_evictions_ask_for_a_sweep() {
        let mut t = tracker();
        let (tcp, _) = key(proto::TCP);
        let (udp, _) = key(proto::UDP);
        let counted = state(proto::TCP, FlowStatus::Answered, true, 0, 1);
        t.inherit(&tcp, counted.first_seen_ns);
        t.inherit(&udp, 7);
        t.begin_walk();
        assert!(t.on_table_entry(&tcp, &counted, &now(2)).record.is_none());
        t.end_walk();
        assert!(
            t.take_sweep(),
            "the first walk after adopting marks asks for no sweep"
        );
        assert!(t.keeps_mark(&tcp, counted.first_seen_ns));
        assert!(!t.keeps_mark(&udp, 7), "a mark no entry matched is kept");
        // After that walk an entry under the UDP key with the inherited time is a new flow.
        let mut late = state(proto::UDP, FlowStatus::Answered, true, 0, 3);
        late.first_seen_ns = 7;
        t.begin_walk();
        t.on_table_entry(&tcp, &counted, &now(3));
        assert!(t.on_table_entry(&udp, &late, &now(3)).record.is_some());
        t.end_walk();
        assert!(
            !t.take_sweep(),
            "a walk that found every flow asks for a sweep"
        );
        // The TCP flow evicted: its mark is left behind, the sweep deletes it.
        t.begin_walk();
        t.on_table_entry(&udp, &late, &now(4));
        t.end_walk();
        assert!(t.take_sweep(), "evicted flows' marks left behind");
        assert!(!t.keeps_mark(&tcp, counted.first_seen_ns));
        assert!(t.keeps_mark(&udp, 7));
    }

    /// A flow first seen at its answer (a SYN-ACK: the agent started during the handshake, or
    /// the SYN passed no hook of ours) has a known initiator, the answer's receiver: it is no
    /// flow first seen mid-stream, so no evidence turns it round, and it is a new connection,
    /// not a counted one resuming.
    #[test]
    fn a_flow_first_seen_at_its_answer_keeps_its_initiator() {
        let mut t = tracker();
        let mut new = event(proto::TCP, EventKind::New, 0);
        new.mid_stream = first_seen::ANSWER;
        t.on_event(&new, None, &now(0));
        let mut answered = event(proto::TCP, EventKind::Answered, 0);
        answered.mid_stream = first_seen::ANSWER;
        let r = t
            .on_event(&answered, None, &now(0))
            .unwrap_or_else(|| panic!("not decided"));
        assert_eq!(
            (r.initiator, r.mid_stream, r.outcome),
            (SocketAddr::from(client()), false, Outcome::Established)
        );
        // The same, but truly mid-stream: marked so, for evidence to orient.
        let mut t = tracker();
        let mut new = event(proto::TCP, EventKind::New, 0);
        new.mid_stream = first_seen::MID_STREAM;
        t.on_event(&new, None, &now(0));
        let mut answered = event(proto::TCP, EventKind::Answered, 0);
        answered.mid_stream = first_seen::MID_STREAM;
        let r = t
            .on_event(&answered, None, &now(0))
            .unwrap_or_else(|| panic!("not decided"));
        assert!(r.mid_stream);
    }

    /// A flow first seen mid-stream and closed (a RST on it) was established before we saw it.
    #[test]
    fn a_mid_stream_flow_closed_is_established() {
        let mut t = tracker();
        let mut new = event(proto::TCP, EventKind::New, 0);
        new.mid_stream = 1;
        t.on_event(&new, None, &now(0));
        let mut closed = event(proto::TCP, EventKind::Closed, 1);
        closed.mid_stream = 1;
        let mut s = state(proto::TCP, FlowStatus::Closed, false, 0, 1);
        s.mid_stream = 1;
        let r = t.on_event(&closed, Some(&s), &now(1)).unwrap();
        assert_eq!((r.outcome, r.mid_stream), (Outcome::Established, true));
        assert_eq!(outcome_of(&s), Some(Outcome::Established));
    }

    #[test]
    fn initiator_giving_up_is_unanswered() {
        let mut t = tracker();
        t.on_event(&event(proto::TCP, EventKind::New, 0), None, &now(0));
        let s = state(proto::TCP, FlowStatus::Closed, false, 0, 1);
        let r = t
            .on_event(&event(proto::TCP, EventKind::Closed, 1), Some(&s), &now(1))
            .unwrap();
        assert_eq!(r.outcome, Outcome::Unanswered);
    }
    /// New, then answered a second later: the flow's record.
    fn decide(t: &mut FlowTracker, p: u8, at: u64) -> FlowRecord {
        t.on_event(&event(p, EventKind::New, at), None, &now(at));
        let s = state(p, FlowStatus::Answered, true, at, at + 1);
        t.on_event(
            &event(p, EventKind::Answered, at + 1),
            Some(&s),
            &now(at + 1),
        )
        .unwrap_or_else(|| panic!("protocol {p} at {at}s: not decided"))
    }

    /// An agent that adopted no table joins conversations already going on: UDP and SCTP flows
    /// first seen in the join window are marked mid-stream (their first packet may be the
    /// responder's); TCP keeps what its flags said and ICMP echo what its type said.
    #[test]
    fn flows_first_seen_in_the_join_window_may_be_mid_stream() {
        let mut t = tracker();
        t.open_join_window(now(10).mono_ns);
        for (p, joined) in [
            (proto::UDP, true),
            (proto::SCTP, true),
            (proto::TCP, false),
            (proto::ICMP, false),
            (proto::ICMPV6, false),
        ] {
            assert_eq!(decide(&mut t, p, 5).mid_stream, joined, "protocol {p}");
        }
        // Adopted by a table walk (its events lost), first seen in the window: the same.
        let mut t = tracker();
        t.open_join_window(now(10).mono_ns);
        let (k, _) = key(proto::UDP);
        t.begin_walk();
        let v = t.on_table_entry(
            &k,
            &state(proto::UDP, FlowStatus::Answered, true, 9, 11),
            &now(11),
        );
        t.end_walk();
        assert!(v.record.is_some_and(|r| r.mid_stream));
    }

    /// After the join window, and without one (the tables were adopted), a UDP flow's first
    /// packet's sender is its initiator, as always.
    #[test]
    fn a_udp_flow_first_seen_after_the_join_window_keeps_the_first_packet_rule() {
        let mut t = tracker();
        t.open_join_window(now(10).mono_ns);
        let r = decide(&mut t, proto::UDP, 10);
        assert!(!r.mid_stream, "first seen as the window closed");
        assert_eq!(
            (r.initiator, r.responder),
            (SocketAddr::from(client()), SocketAddr::from(server()))
        );
        let mut t = tracker();
        assert!(!decide(&mut t, proto::UDP, 5).mid_stream, "no window");
    }
}
