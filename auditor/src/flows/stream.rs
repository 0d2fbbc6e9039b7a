//! The flow-record stream: drives a [`FlowSource`] (the datapath: events, periodic table walks,
//! answer deadlines) through the [`FlowTracker`] and yields each flow's [`FlowRecord`] once its
//! outcome is decided. This is what the daemon consumes.

use std::{collections::VecDeque, time::Duration};

use auditor_ebpf::flow::{EventKind, FlowKey};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at};

use super::{FlowRecord, FlowSource, FlowTracker, FlowsConfig, Now, tracker::Evictions};
use crate::datapath::manager::{DatapathHealth, DatapathManager};

/// How often pending flows are checked against their answer deadline: the precision of
/// "unanswered after N seconds".
const DEADLINE_TICK: Duration = Duration::from_millis(100);
/// From this many flows due in one tick on, their table entries are read by one batched walk of
/// the tables rather than a lookup (a system call) each: a walk of two 64k-entry tables costs
/// about as much as fifteen thousand lookups.
const BATCH_RESOLVE_MIN: usize = 16_384;
/// Records handed out between two reads of the ring buffer while decided flows queue up.
const EVENTS_EVERY: usize = 256;
/// At most one log line per this long about counted marks that could not be written.
const MARK_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Flow records, one per flow, in the order their outcomes were decided, read from the datapath
/// `S` (the real one unless a test says otherwise).
#[derive(Debug)]
pub struct FlowStream<S = DatapathManager> {
    source: S,
    tracker: FlowTracker,
    ready: VecDeque<FlowRecord>,
    /// Kept across calls so a steady flow of events cannot keep postponing deadlines and walks;
    /// created on the first call, inside the runtime.
    ticks: Option<Interval>,
    /// When the next table walk is due, on the source's clock.
    next_walk_ns: u64,
    losses: Losses,
    /// Records handed out since events were last read (see [`EVENTS_EVERY`]).
    handed_out: usize,
    /// The counted marks a predecessor left were read (before the first event).
    inherited: bool,
    marks: MarkFailures,
}

/// Counted marks that could not be written (the map full, or another error): counted, and
/// logged at most once per [`MARK_FAILURE_LOG_EVERY`].
#[derive(Debug, Default)]
struct MarkFailures {
    total: u64,
    /// Failures since the last log line.
    unlogged: u64,
    /// Kernel time of the last log line; `None` before the first.
    logged_at: Option<u64>,
}

/// Where the datapath's lost-event count stood, for knowing which flows may have missed one.
#[derive(Debug)]
struct Losses {
    /// Events lost so far.
    total: u64,
    /// Kernel time of the deadline tick that noticed the last loss (`u64::MAX` until the count
    /// was first read).
    since: u64,
}

impl<S: FlowSource> FlowStream<S> {
    #[must_use]
    pub fn new(source: S, config: FlowsConfig) -> Self {
        Self {
            source,
            tracker: FlowTracker::new(config),
            ready: VecDeque::new(),
            ticks: None,
            // The first walk adopts flows that were in the table before we started reading.
            next_walk_ns: 0,
            losses: Losses {
                total: 0,
                since: u64::MAX,
            },
            handed_out: 0,
            inherited: false,
            marks: MarkFailures::default(),
        }
    }

    /// The next decided flow. Cancel-safe: records decided while a call was pending are kept for
    /// the next call.
    ///
    /// # Errors
    /// When the datapath cannot be read (a poll or map failure, not a single flow's problem).
    pub async fn next(&mut self) -> Result<FlowRecord, S::Error> {
        let Self {
            source,
            tracker,
            ready,
            ticks,
            next_walk_ns,
            losses,
            handed_out,
            inherited,
            marks,
        } = self;
        inherit(source, tracker, inherited)?;
        let ticks = ticks.get_or_insert_with(|| {
            let mut ticks = interval_at(Instant::now() + DEADLINE_TICK, DEADLINE_TICK);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticks
        });
        loop {
            // A tick can decide thousands of flows at once: while they are handed out, the ring
            // buffer keeps being read, or it would fill.
            if *handed_out >= EVENTS_EVERY {
                *handed_out = 0;
                let events = source.read_events();
                on_events(source, tracker, ready, marks, &events, &source.now())?;
            }
            if let Some(record) = ready.pop_front() {
                *handed_out += 1;
                return Ok(record);
            }
            *handed_out = 0;
            tokio::select! {
                events = source.next_events() => {
                    let events = events?;
                    on_events(source, tracker, ready, marks, &events, &source.now())?;
                }
                _ = ticks.tick() => tick(source, tracker, ready, marks, next_walk_ns, losses)?,
            }
        }
    }

    /// Health of the datapath under the stream.
    ///
    /// # Errors
    /// When the counters cannot be read.
    pub fn health(&self) -> Result<DatapathHealth, S::Error> {
        self.source.health()
    }

    /// Opens the join window for the idle timeout from now (see
    /// [`FlowTracker::open_join_window`]): for an agent that adopted no predecessor's tables,
    /// UDP and SCTP flows first seen until then are oriented by evidence, not by who spoke
    /// first. A conversation going on when the agent started has a packet within the idle
    /// timeout (or it would have left a table anyway); later flows were seen from their start.
    /// Returns the window's length.
    pub fn open_join_window(&mut self) -> Duration {
        let span = self.tracker.config().idle_timeout;
        let until = self
            .source
            .now()
            .mono_ns
            .saturating_add(u64::try_from(span.as_nanos()).unwrap_or(u64::MAX));
        self.tracker.open_join_window(until);
        span
    }

    /// Flows waiting for an answer now.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.tracker.pending()
    }

    /// Flow-table evictions noticed so far (see [`FlowTracker::end_walk`]).
    #[must_use]
    pub const fn evictions(&self) -> Evictions {
        self.tracker.evictions()
    }

    /// Writes of counted marks that failed so far (the map of counted flows full, or another
    /// error): each such flow would be counted again by an agent adopting the tables after a
    /// restart. A walk finding the flow's entry tries again.
    #[must_use]
    pub const fn mark_failures(&self) -> u64 {
        self.marks.total
    }

    /// The datapath under the stream.
    #[must_use]
    pub const fn source(&self) -> &S {
        &self.source
    }

    /// Detaches everything (see [`FlowSource::shutdown`]) and hands the datapath back.
    ///
    /// # Errors
    /// When detaching fails (for the real datapath: when called from a thread in another
    /// network namespace).
    pub fn shutdown(mut self) -> Result<S, S::Error> {
        self.source.shutdown()?;
        Ok(self.source)
    }
}

impl FlowStream<DatapathManager> {
    /// The datapath under the stream (the same as [`FlowStream::source`]).
    #[must_use]
    pub const fn manager(&self) -> &DatapathManager {
        &self.source
    }
}

/// Reads the counted marks a predecessor left (the adopted map of counted flows), once, before
/// any event: a flow the predecessor counted must be known as such when its first event
/// arrives.
fn inherit<S: FlowSource>(
    source: &mut S,
    tracker: &mut FlowTracker,
    inherited: &mut bool,
) -> Result<(), S::Error> {
    if *inherited {
        return Ok(());
    }
    let n = source.walk_reported(|key, first_seen_ns| tracker.inherit(&key, first_seen_ns))?;
    if n > 0 {
        tracing::info!(
            flows = n,
            "adopted the marks of the flows a predecessor counted"
        );
    }
    *inherited = true;
    Ok(())
}

/// One deadline tick: reads what the ring buffer holds, decides the pending flows whose answer
/// timeout has passed (reading their entries when an event may have been lost) and walks the
/// table when the walk is due.
fn tick<S: FlowSource>(
    source: &mut S,
    tracker: &mut FlowTracker,
    ready: &mut VecDeque<FlowRecord>,
    marks: &mut MarkFailures,
    next_walk_ns: &mut u64,
    losses: &mut Losses,
) -> Result<(), S::Error> {
    // Events already sent are read first: an answer in the ring buffer must not lose the race
    // against its flow's deadline.
    let events = source.read_events();
    let now = source.now();
    on_events(source, tracker, ready, marks, &events, &now)?;
    let lost = source.events_lost()?;
    // A loss noticed now happened before now: flows first seen after the tick that noticed the
    // last loss have had every event read (no answer was missed, and their entries need not be
    // read: their counters are the last walk's); older ones are looked up. The first reading
    // counts as a loss: what came before it is unknown.
    if losses.since == u64::MAX || lost != losses.total {
        losses.total = lost;
        losses.since = now.mono_ns;
    }
    let mut unread = Vec::new();
    for (key, first_seen) in tracker.due(&now) {
        if first_seen > losses.since {
            if let Some(record) = tracker.resolve(&key, None, &now) {
                push(source, ready, record);
            }
        } else {
            unread.push(key);
        }
    }
    if unread.len() >= BATCH_RESOLVE_MIN {
        // Many at once: one batched read of the table beats a lookup each.
        let wanted: FxHashSet<FlowKey> = unread.iter().copied().collect();
        let mut states = FxHashMap::default();
        source.walk(|key, state| {
            if wanted.contains(&key) {
                states.insert(key, *state);
            }
        })?;
        for key in &unread {
            if let Some(record) = tracker.resolve(key, states.get(key), &now) {
                push(source, ready, record);
            }
        }
    } else {
        for key in &unread {
            let state = source.lookup(key)?;
            if let Some(record) = tracker.resolve(key, state.as_ref(), &now) {
                push(source, ready, record);
            }
        }
    }
    if source.now().mono_ns >= *next_walk_ns {
        walk(source, tracker, ready, &now)?;
        let interval = tracker.config().walk_interval;
        *next_walk_ns = source
            .now()
            .mono_ns
            .saturating_add(u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX));
    }
    mark(source, tracker, marks);
    Ok(())
}

/// Writes the counted marks of the flows decided since the last call, before their records are
/// handed out (so an agent killed in between undercounts one flow rather than double counting
/// it after a restart). A mark that cannot be written is counted and logged (rate-limited), and
/// tried again by the next walk that finds the flow's entry.
fn mark<S: FlowSource>(source: &mut S, tracker: &mut FlowTracker, failures: &mut MarkFailures) {
    for (key, first_seen_ns) in tracker.take_marks() {
        if let Err(error) = source.mark_reported(&key, first_seen_ns) {
            tracker.mark_failed(&key, first_seen_ns);
            failures.total += 1;
            failures.unlogged += 1;
            let now = source.now().mono_ns;
            let every = u64::try_from(MARK_FAILURE_LOG_EVERY.as_nanos()).unwrap_or(u64::MAX);
            if failures
                .logged_at
                .is_none_or(|at| now.saturating_sub(at) >= every)
            {
                tracing::warn!(
                    %error,
                    failed = failures.unlogged,
                    total = failures.total,
                    "cannot record counted flows in the map of counted flows (REPORTED); a restarted agent would count them again"
                );
                failures.logged_at = Some(now);
                failures.unlogged = 0;
            }
        }
    }
}

/// Feeds events to the tracker; New carries no counters worth a system call, the others decide
/// the flow and read its entry.
fn on_events<S: FlowSource>(
    source: &mut S,
    tracker: &mut FlowTracker,
    ready: &mut VecDeque<FlowRecord>,
    marks: &mut MarkFailures,
    events: &[auditor_ebpf::flow::FlowEvent],
    now: &Now,
) -> Result<(), S::Error> {
    for event in events {
        let state = match event.kind() {
            Some(EventKind::New) | None => None,
            Some(_) => source.lookup(&event.key)?,
        };
        if let Some(record) = tracker.on_event(event, state.as_ref(), now) {
            push(source, ready, record);
        }
    }
    mark(source, tracker, marks);
    Ok(())
}

/// Walks the flow table through the tracker: adopts and decides flows whose events were lost,
/// deletes expired entries (after the walk: the table is being read meanwhile).
fn walk<S: FlowSource>(
    source: &mut S,
    tracker: &mut FlowTracker,
    ready: &mut VecDeque<FlowRecord>,
    now: &Now,
) -> Result<(), S::Error> {
    tracker.begin_walk();
    let mut decided = Vec::new();
    let mut expired = Vec::new();
    let entries = source.walk(|key, state| {
        let verdict = tracker.on_table_entry(&key, state, now);
        if let Some(record) = verdict.record {
            decided.push(record);
        }
        if verdict.remove {
            expired.push(key);
        }
    })?;
    for record in decided {
        push(source, ready, record);
    }
    for key in &expired {
        source.remove(key)?;
        // Forgotten for good: its counted mark goes with it.
        source.forget_reported(key)?;
    }
    tracker.end_walk();
    tracing::debug!(
        entries,
        removed = expired.len(),
        tracked = tracker.len(),
        "flow table walked"
    );
    if tracker.take_sweep() {
        sweep(source, tracker)?;
    }
    Ok(())
}

/// Deletes the counted marks of flows no longer tracked: marks a predecessor left that matched
/// no entry of the adopted tables (or an entry recreated since, with another first packet), and
/// marks of evicted flows. Runs after a walk, and only when one of those can exist.
fn sweep<S: FlowSource>(source: &mut S, tracker: &FlowTracker) -> Result<(), S::Error> {
    let mut stale = Vec::new();
    let marks = source.walk_reported(|key, first_seen_ns| {
        if !tracker.keeps_mark(&key, first_seen_ns) {
            stale.push(key);
        }
    })?;
    for key in &stale {
        source.forget_reported(key)?;
    }
    tracing::debug!(marks, deleted = stale.len(), "stale counted marks deleted");
    Ok(())
}

/// Queues a record, naming its interface when it is still attached.
fn push<S: FlowSource>(source: &S, ready: &mut VecDeque<FlowRecord>, mut record: FlowRecord) {
    if let Some(name) = source.interface_name(record.ifindex) {
        name.clone_into(&mut record.interface);
    }
    ready.push_back(record);
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use auditor_ebpf::flow::proto;

    use super::*;
    use crate::flows::{
        Outcome,
        fake::{FakeDatapath, FakeError, Peer},
    };

    const TIMEOUT: Duration = Duration::from_secs(5);
    const MS: Duration = Duration::from_millis(1);

    /// No walk but the first one, unless a test asks for more.
    fn config() -> FlowsConfig {
        FlowsConfig {
            answer_timeout: TIMEOUT,
            walk_interval: Duration::from_secs(3600),
            ..FlowsConfig::default()
        }
    }

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn server() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 2], 80))
    }

    /// Runs one deadline tick, as the stream's timer does, and takes the records it decided.
    fn ticked(stream: &mut FlowStream<FakeDatapath>) -> Vec<FlowRecord> {
        tick_only(stream);
        stream.ready.drain(..).collect()
    }

    /// Runs one deadline tick and leaves its records queued for `next`.
    fn tick_only(stream: &mut FlowStream<FakeDatapath>) {
        let FlowStream {
            source,
            tracker,
            ready,
            ticks: _,
            next_walk_ns,
            losses,
            handed_out: _,
            inherited,
            marks,
        } = stream;
        inherit(source, tracker, inherited).unwrap_or_else(|e| panic!("inherit failed: {e}"));
        tick(source, tracker, ready, marks, next_walk_ns, losses)
            .unwrap_or_else(|e| panic!("tick failed: {e}"));
    }

    fn outcomes(records: &[FlowRecord]) -> Vec<(FlowKey, Outcome)> {
        records.iter().map(|r| (r.key, r.outcome)).collect()
    }

    #[test]
    fn unanswered_at_the_deadline_not_before() {
        let fake = FakeDatapath::new();
        let mut stream = FlowStream::new(fake.clone(), config());
        let opened = fake.now();
        let key = fake.open(proto::TCP, client(40000), server(), 7);
        assert!(ticked(&mut stream).is_empty());
        assert_eq!(stream.pending(), 1);
        fake.advance(TIMEOUT.saturating_sub(MS));
        assert!(
            ticked(&mut stream).is_empty(),
            "decided a millisecond before its deadline"
        );
        fake.advance(MS);
        let records = ticked(&mut stream);
        assert_eq!(outcomes(&records), [(key, Outcome::Unanswered)]);
        let record = &records[0];
        assert_eq!(
            (record.initiator, record.responder),
            (client(40000), server())
        );
        assert_eq!(record.first_seen, opened.wall);
        assert_eq!(
            (record.packets.to_responder, record.packets.to_initiator),
            (1, 0)
        );
        assert_eq!(stream.pending(), 0);
        fake.advance(TIMEOUT);
        assert!(ticked(&mut stream).is_empty(), "reported twice");
    }

    #[test]
    fn an_answer_sent_just_before_the_deadline_wins_over_it() {
        let fake = FakeDatapath::new();
        let mut stream = FlowStream::new(fake.clone(), config());
        // First seen after the first tick, so nothing lost can concern it: its entry is not read
        // at the deadline, only its events count.
        assert!(ticked(&mut stream).is_empty());
        fake.advance(MS);
        let key = fake.open(proto::TCP, client(40000), server(), 7);
        assert!(ticked(&mut stream).is_empty());
        fake.advance(TIMEOUT.saturating_sub(MS));
        fake.send(&key, Peer::Responder);
        // The deadline passes before the stream has read the answer from the ring buffer.
        fake.advance(MS);
        let records = ticked(&mut stream);
        assert_eq!(outcomes(&records), [(key, Outcome::Established)]);
        assert_eq!(records[0].packets.to_initiator, 1);
    }

    #[test]
    fn entries_are_read_at_the_deadline_only_for_flows_first_seen_before_the_last_loss() {
        let fake = FakeDatapath::new();
        let mut stream = FlowStream::new(fake.clone(), config());
        // The first tick counts as a loss: what came before it is unknown.
        let before = fake.open(proto::UDP, client(1), server(), 7);
        assert!(ticked(&mut stream).is_empty());
        fake.advance(MS);
        let after = fake.open(proto::UDP, client(2), server(), 7);
        assert!(ticked(&mut stream).is_empty());

        fake.advance(TIMEOUT.saturating_sub(MS));
        let lookups = fake.lookups();
        assert_eq!(
            outcomes(&ticked(&mut stream)),
            [(before, Outcome::Unanswered)]
        );
        assert_eq!(
            fake.lookups(),
            lookups + 1,
            "the older flow's entry is read"
        );
        fake.advance(MS);
        assert_eq!(
            outcomes(&ticked(&mut stream)),
            [(after, Outcome::Unanswered)]
        );
        assert_eq!(
            fake.lookups(),
            lookups + 1,
            "read the entry of a flow first seen after the last loss"
        );

        // An answer lost in a full ring buffer, noticed by the next tick, at the time the flow
        // was first seen.
        let lost = fake.open(proto::UDP, client(3), server(), 7);
        fake.set_ring_full(true);
        fake.send(&lost, Peer::Responder);
        fake.set_ring_full(false);
        assert_eq!(fake.lost_events(), 1);
        assert!(ticked(&mut stream).is_empty());
        fake.advance(MS);
        let later = fake.open(proto::UDP, client(4), server(), 7);
        fake.send(&later, Peer::Initiator);
        fake.send(&later, Peer::Initiator);
        assert!(ticked(&mut stream).is_empty());

        fake.advance(TIMEOUT.saturating_sub(MS));
        let lookups = fake.lookups();
        let records = ticked(&mut stream);
        assert_eq!(
            outcomes(&records),
            [(lost, Outcome::Established)],
            "the lost answer is found in the table"
        );
        assert_eq!(fake.lookups(), lookups + 1);
        fake.advance(MS);
        let records = ticked(&mut stream);
        assert_eq!(outcomes(&records), [(later, Outcome::Unanswered)]);
        assert_eq!(
            fake.lookups(),
            lookups + 1,
            "read the entry of a flow first seen after the last loss"
        );
        // Its counters are what the events said, not the table's three packets.
        assert_eq!(records[0].packets.to_responder, 1);
    }

    #[test]
    fn many_due_flows_are_read_by_one_walk_fewer_by_a_lookup_each() {
        for flows in [BATCH_RESOLVE_MIN - 1, BATCH_RESOLVE_MIN] {
            let fake = FakeDatapath::new();
            let mut stream = FlowStream::new(fake.clone(), config());
            // Flows whose `New` events were lost: the first walk adopts them.
            fake.set_ring_full(true);
            let keys: Vec<FlowKey> = (0..flows)
                .map(|i| {
                    let port = u16::try_from(1024 + i).unwrap_or_else(|e| panic!("{e}"));
                    fake.open(proto::UDP, client(port), server(), 7)
                })
                .collect();
            fake.set_ring_full(false);
            assert!(ticked(&mut stream).is_empty());
            assert_eq!(stream.pending(), flows);
            // One is answered, its event lost too.
            fake.set_ring_full(true);
            fake.send(&keys[7], Peer::Responder);
            fake.set_ring_full(false);

            fake.advance(TIMEOUT);
            let (lookups, walks) = (fake.lookups(), fake.walks());
            let records = ticked(&mut stream);
            assert_eq!(records.len(), flows);
            let established: Vec<_> = records
                .iter()
                .filter(|r| r.outcome == Outcome::Established)
                .map(|r| r.key)
                .collect();
            assert_eq!(established, [keys[7]], "{flows} flows");
            let read = (fake.lookups() - lookups, fake.walks() - walks);
            if flows < BATCH_RESOLVE_MIN {
                assert_eq!(read, (flows as u64, 0), "{flows} flows: a lookup each");
            } else {
                assert_eq!(read, (0, 1), "{flows} flows: one walk");
            }
        }
    }

    #[tokio::test]
    async fn the_ring_buffer_is_read_while_a_tick_hands_out_its_records() {
        let fake = FakeDatapath::new();
        let mut stream = FlowStream::new(fake.clone(), config());
        let many = EVENTS_EVERY + 44;
        for i in 0..many {
            let port = u16::try_from(1024 + i).unwrap_or_else(|e| panic!("{e}"));
            fake.open(proto::UDP, client(port), server(), 7);
        }
        assert!(ticked(&mut stream).is_empty());
        fake.advance(MS);
        let late = fake.open(proto::UDP, client(80), server(), 7);
        assert!(ticked(&mut stream).is_empty());
        fake.advance(TIMEOUT.saturating_sub(MS));
        tick_only(&mut stream);
        assert_eq!(stream.ready.len(), many);

        fake.send(&late, Peer::Responder);
        for handed in 0..EVENTS_EVERY {
            let record = stream.next().await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(record.outcome, Outcome::Unanswered);
            assert_eq!(fake.queued_events(), 1, "read after {handed} records");
        }
        let record = stream.next().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(record.outcome, Outcome::Unanswered);
        assert_eq!(
            fake.queued_events(),
            0,
            "not read after {EVENTS_EVERY} records"
        );
        for _ in EVENTS_EVERY + 1..many {
            let record = stream.next().await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(record.outcome, Outcome::Unanswered);
        }
        let record = stream.next().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((record.key, record.outcome), (late, Outcome::Established));
    }

    #[test]
    fn the_walk_adopts_flows_whose_events_were_lost() {
        let fake = FakeDatapath::new();
        let mut stream = FlowStream::new(fake.clone(), config());
        fake.set_ring_full(true);
        let quiet = fake.open(proto::UDP, client(1), server(), 7);
        let answered = fake.open(proto::TCP, client(2), server(), 7);
        fake.send(&answered, Peer::Responder);
        fake.send(&answered, Peer::Initiator);
        fake.set_ring_full(false);
        assert_eq!(fake.lost_events(), 3);

        let records = ticked(&mut stream);
        assert_eq!(
            outcomes(&records),
            [(answered, Outcome::Established)],
            "decided by the walk"
        );
        assert_eq!(
            (
                records[0].packets.to_responder,
                records[0].packets.to_initiator
            ),
            (2, 1),
            "the entry's counters"
        );
        assert_eq!(stream.pending(), 1);
        fake.advance(TIMEOUT);
        assert_eq!(
            outcomes(&ticked(&mut stream)),
            [(quiet, Outcome::Unanswered)]
        );
    }

    #[test]
    fn the_walk_deletes_closed_entries_after_lingering_and_idle_ones_after_the_idle_timeout() {
        let fake = FakeDatapath::new();
        let config = FlowsConfig {
            answer_timeout: TIMEOUT,
            idle_timeout: Duration::from_secs(300),
            closed_linger: Duration::from_secs(30),
            walk_interval: Duration::from_secs(2),
        };
        let mut stream = FlowStream::new(fake.clone(), config);
        let keys: Vec<FlowKey> = (1..=4)
            .map(|port| {
                let key = fake.open(proto::TCP, client(port), server(), 7);
                fake.send(&key, Peer::Responder);
                key
            })
            .collect();
        let [closed, idle, live, closed_too] = keys[..] else {
            unreachable!()
        };
        fake.close(&closed);
        fake.close(&closed_too);
        let records = ticked(&mut stream);
        assert_eq!(records.len(), 4);
        assert!(records.iter().all(|r| r.outcome == Outcome::Established));
        assert_eq!(fake.table_len(), 4, "nothing expired yet");

        fake.advance(Duration::from_secs(31));
        fake.send(&live, Peer::Initiator);
        assert!(ticked(&mut stream).is_empty());
        assert_eq!(fake.entry(&closed), None);
        assert_eq!(fake.entry(&closed_too), None);
        assert!(fake.entry(&idle).is_some(), "idle for 31 s only");
        assert!(fake.entry(&live).is_some());

        fake.advance(Duration::from_secs(270));
        fake.send(&live, Peer::Initiator);
        let walks = fake.walks();
        assert!(ticked(&mut stream).is_empty());
        assert_eq!(fake.walks(), walks + 1);
        assert_eq!(fake.entry(&idle), None, "idle for 301 s");
        assert!(fake.entry(&live).is_some());
        // Not walked again before the walk interval has passed.
        fake.advance(Duration::from_secs(1));
        assert!(ticked(&mut stream).is_empty());
        assert_eq!(fake.walks(), walks + 1, "walked before the walk interval");
        assert_eq!(fake.table_len(), 1);
        assert_eq!(stream.pending(), 0);
    }

    /// A walk every 2 s, the default timeouts otherwise.
    fn walking() -> FlowsConfig {
        FlowsConfig {
            answer_timeout: TIMEOUT,
            walk_interval: Duration::from_secs(2),
            ..FlowsConfig::default()
        }
    }

    /// Flows whose table entries are there but whose events were lost: what an agent finds in
    /// the tables it adopts. Each answered.
    fn adopted(fake: &FakeDatapath, ports: std::ops::RangeInclusive<u16>) -> Vec<FlowKey> {
        fake.set_ring_full(true);
        let keys = ports
            .map(|port| {
                let key = fake.open(proto::UDP, client(port), server(), 7);
                fake.send(&key, Peer::Responder);
                key
            })
            .collect();
        fake.set_ring_full(false);
        keys
    }

    fn first_seen(fake: &FakeDatapath, key: &FlowKey) -> u64 {
        fake.entry(key)
            .unwrap_or_else(|| panic!("no entry {key}"))
            .first_seen_ns
    }

    /// A decided flow is marked with its entry's first packet before its record is handed out,
    /// and its mark goes with its entry when it expires.
    #[test]
    fn decided_flows_are_marked_and_their_marks_go_with_their_entries() {
        let fake = FakeDatapath::new();
        let mut stream = FlowStream::new(fake.clone(), walking());
        let key = fake.open(proto::TCP, client(1), server(), 7);
        fake.send(&key, Peer::Responder);
        let records = ticked(&mut stream);
        assert_eq!(outcomes(&records), [(key, Outcome::Established)]);
        assert_eq!(fake.reported(&key), Some(first_seen(&fake, &key)));
        assert_eq!(fake.reported_len(), 1);
        // Walks while it lives leave the mark as it is and write nothing more.
        fake.advance(Duration::from_secs(2));
        fake.send(&key, Peer::Initiator);
        assert!(ticked(&mut stream).is_empty());
        assert_eq!(fake.reported(&key), Some(first_seen(&fake, &key)));
        // Idle past the idle timeout: entry and mark deleted by the walk.
        fake.advance(Duration::from_secs(301));
        assert!(ticked(&mut stream).is_empty());
        assert_eq!(fake.entry(&key), None);
        assert_eq!(
            fake.reported(&key),
            None,
            "the mark of an expired flow stays"
        );
        assert_eq!(stream.mark_failures(), 0);
    }

    /// After a restart on adopted maps: flows whose mark matches their entry's first packet are
    /// not counted again; an entry recreated under a counted key (another first packet) is
    /// counted and marked anew; marks matching no entry are deleted after the first walk.
    #[test]
    fn a_predecessor_s_marks_count_only_the_entries_they_were_written_for() {
        let fake = FakeDatapath::new();
        let keys = adopted(&fake, 1..=3);
        let [counted, recreated, unmarked] = keys[..] else {
            unreachable!()
        };
        fake.set_reported(counted, first_seen(&fake, &counted));
        fake.set_reported(recreated, first_seen(&fake, &recreated) - 1);
        let (gone, _) = FlowKey::from_addrs(
            proto::UDP,
            (client(9).ip(), 9),
            (server().ip(), server().port()),
        );
        fake.set_reported(gone, 12_345);
        let mut stream = FlowStream::new(fake.clone(), walking());
        let mut decided: Vec<FlowKey> = ticked(&mut stream).iter().map(|r| r.key).collect();
        decided.sort_unstable_by_key(|k| k.lo_port.max(k.hi_port));
        let mut expected = vec![recreated, unmarked];
        expected.sort_unstable_by_key(|k| k.lo_port.max(k.hi_port));
        assert_eq!(
            decided, expected,
            "counted again, or a new entry not counted"
        );
        for key in [counted, recreated, unmarked] {
            assert_eq!(
                fake.reported(&key),
                Some(first_seen(&fake, &key)),
                "{key}: marked with its entry's first packet"
            );
        }
        assert_eq!(fake.reported(&gone), None, "a stale mark kept");
        assert_eq!(fake.reported_len(), 3);
        // Later walks count nothing again.
        fake.advance(Duration::from_secs(2));
        assert!(ticked(&mut stream).is_empty());
        assert_eq!(fake.reported_len(), 3);
    }

    /// A counted flow the LRU evicted leaves its mark behind until the walk notices the
    /// eviction; the sweep after that walk deletes it, and only it.
    #[test]
    fn the_marks_of_evicted_flows_are_swept() {
        let fake = FakeDatapath::new();
        let mut stream = FlowStream::new(fake.clone(), walking());
        let keys: Vec<FlowKey> = (1..=2)
            .map(|port| {
                let key = fake.open(proto::UDP, client(port), server(), 7);
                fake.send(&key, Peer::Responder);
                key
            })
            .collect();
        assert_eq!(ticked(&mut stream).len(), 2);
        assert_eq!(fake.reported_len(), 2);
        fake.evict(&keys[0]);
        fake.advance(Duration::from_secs(2));
        assert!(ticked(&mut stream).is_empty());
        assert_eq!(stream.evictions().decided, 1);
        assert_eq!(
            fake.reported(&keys[0]),
            None,
            "the evicted flow's mark stays"
        );
        assert_eq!(fake.reported(&keys[1]), Some(first_seen(&fake, &keys[1])));
        // Resuming in a new entry, it is not counted again, and the new entry is marked.
        fake.advance(Duration::from_secs(1));
        let resumed = fake.open(proto::UDP, client(1), server(), 7);
        fake.send(&resumed, Peer::Responder);
        assert!(ticked(&mut stream).is_empty(), "counted again");
        assert_eq!(fake.reported(&resumed), Some(first_seen(&fake, &resumed)));
    }

    /// A mark the map of counted flows cannot take loses nothing silently: the record is still
    /// handed out, the failure counted, and the next walk tries again.
    #[test]
    fn a_mark_the_map_refuses_is_counted_and_written_by_a_later_walk() {
        let fake = FakeDatapath::new();
        fake.set_reported_capacity(0);
        let mut stream = FlowStream::new(fake.clone(), walking());
        // The first walk, of an empty table: the next is 2 s away.
        assert!(ticked(&mut stream).is_empty());
        let key = fake.open(proto::UDP, client(1), server(), 7);
        fake.send(&key, Peer::Responder);
        assert_eq!(
            outcomes(&ticked(&mut stream)),
            [(key, Outcome::Established)]
        );
        assert_eq!((fake.reported(&key), stream.mark_failures()), (None, 1));
        // Still full at the next walk: tried, counted again.
        fake.advance(Duration::from_secs(2));
        assert!(ticked(&mut stream).is_empty());
        assert_eq!((fake.reported(&key), stream.mark_failures()), (None, 2));
        // Room again: the walk after writes it, and the one after that has nothing to do.
        fake.set_reported_capacity(10);
        for _ in 0..2 {
            fake.advance(Duration::from_secs(2));
            assert!(ticked(&mut stream).is_empty(), "counted again");
            assert_eq!(fake.reported(&key), Some(first_seen(&fake, &key)));
            assert_eq!(stream.mark_failures(), 2);
        }
    }

    #[tokio::test]
    async fn next_waits_for_events_and_deadlines() {
        let fake = FakeDatapath::with_interfaces(&[(7, "caliA")]);
        let mut stream = FlowStream::new(fake.clone(), config());
        let key = fake.open(proto::TCP, client(40000), server(), 7);
        let answer = {
            let fake = fake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                fake.send(&key, Peer::Responder);
            })
        };
        let record = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no record for the answered flow"))
            .unwrap_or_else(|e| panic!("{e}"));
        answer.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((record.key, record.outcome), (key, Outcome::Established));
        assert_eq!(record.interface, "caliA");

        let quiet = fake.open(proto::UDP, client(40001), server(), 9);
        fake.advance(TIMEOUT);
        let record = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no record at the deadline"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((record.key, record.outcome), (quiet, Outcome::Unanswered));
        assert_eq!(record.interface, "", "interface 9 is not attached");
    }

    #[tokio::test]
    async fn a_datapath_failure_ends_the_stream() {
        let fake = FakeDatapath::new();
        let mut stream = FlowStream::new(fake.clone(), config());
        fake.open(proto::UDP, client(1), server(), 7);
        fake.set_failing(true);
        let result = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("the stream kept waiting"));
        assert!(matches!(result, Err(FakeError { .. })), "{result:?}");
    }

    #[test]
    fn health_and_shutdown_go_to_the_datapath() {
        let fake = FakeDatapath::with_interfaces(&[(7, "caliA"), (9, "caliB")]);
        let mut stream = FlowStream::new(fake.clone(), config());
        fake.open(proto::UDP, client(1), server(), 7);
        fake.lose_events(2);
        ticked(&mut stream);
        let health = stream.health().unwrap_or_else(|e| panic!("{e}"));
        let attached: Vec<_> = health.attached.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(attached, ["caliA", "caliB"]);
        assert_eq!((health.flow_table_entries, health.events_lost), (1, 2));
        assert!(!fake.is_shut_down());
        let source = stream.shutdown().unwrap_or_else(|e| panic!("{e}"));
        assert!(source.is_shut_down() && fake.is_shut_down());
    }
}
