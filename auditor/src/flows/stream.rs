//! The flow-record stream: drives a [`FlowSource`] (the datapath: events, periodic table walks,
//! answer deadlines) through the [`FlowTracker`] and yields each flow's [`FlowRecord`] once its
//! outcome is decided. This is what the daemon consumes.

use std::{collections::VecDeque, time::Duration};

use auditor_ebpf::flow::{EventKind, FlowKey};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at};

use super::{FlowRecord, FlowSource, FlowTracker, FlowsConfig, Now};
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
        } = self;
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
                on_events(source, tracker, ready, &events, &source.now())?;
            }
            if let Some(record) = ready.pop_front() {
                *handed_out += 1;
                return Ok(record);
            }
            *handed_out = 0;
            tokio::select! {
                events = source.next_events() => {
                    let events = events?;
                    on_events(source, tracker, ready, &events, &source.now())?;
                }
                _ = ticks.tick() => tick(source, tracker, ready, next_walk_ns, losses)?,
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

    /// Flows waiting for an answer now.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.tracker.pending()
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

/// One deadline tick: reads what the ring buffer holds, decides the pending flows whose answer
/// timeout has passed (reading their entries when an event may have been lost) and walks the
/// table when the walk is due.
fn tick<S: FlowSource>(
    source: &mut S,
    tracker: &mut FlowTracker,
    ready: &mut VecDeque<FlowRecord>,
    next_walk_ns: &mut u64,
    losses: &mut Losses,
) -> Result<(), S::Error> {
    // Events already sent are read first: an answer in the ring buffer must not lose the race
    // against its flow's deadline.
    let events = source.read_events();
    let now = source.now();
    on_events(source, tracker, ready, &events, &now)?;
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
    Ok(())
}

/// Feeds events to the tracker; New carries no counters worth a system call, the others decide
/// the flow and read its entry.
fn on_events<S: FlowSource>(
    source: &S,
    tracker: &mut FlowTracker,
    ready: &mut VecDeque<FlowRecord>,
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
    }
    tracker.end_walk();
    tracing::debug!(
        entries,
        removed = expired.len(),
        tracked = tracker.len(),
        "flow table walked"
    );
    Ok(())
}

/// Queues a record, naming its interface when it is still attached.
fn push<S: FlowSource>(source: &S, ready: &mut VecDeque<FlowRecord>, mut record: FlowRecord) {
    if let Some(name) = source.interface_name(record.ifindex) {
        name.clone_into(&mut record.interface);
    }
    ready.push_back(record);
}
