//! The flow-record stream: drives a [`DatapathManager`] (events, periodic table walks, answer
//! deadlines) through the [`FlowTracker`] and yields each flow's [`FlowRecord`] once its outcome
//! is decided. This is what the daemon consumes.

use std::{collections::VecDeque, time::Duration};

use auditor_ebpf::flow::EventKind;
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at};

use super::{FlowRecord, FlowTracker, FlowsConfig, Now};
use crate::datapath::manager::{DatapathHealth, DatapathManager, ManagerError};

/// How often pending flows are checked against their answer deadline: the precision of
/// "unanswered after N seconds".
const DEADLINE_TICK: Duration = Duration::from_millis(100);

/// Flow records, one per flow, in the order their outcomes were decided.
#[derive(Debug)]
pub struct FlowStream {
    manager: DatapathManager,
    tracker: FlowTracker,
    ready: VecDeque<FlowRecord>,
    /// Kept across calls so a steady flow of events cannot keep postponing deadlines and walks;
    /// created on the first call, inside the runtime.
    ticks: Option<Interval>,
    next_walk: Instant,
}

impl FlowStream {
    #[must_use]
    pub fn new(manager: DatapathManager, config: FlowsConfig) -> Self {
        Self {
            manager,
            tracker: FlowTracker::new(config),
            ready: VecDeque::new(),
            ticks: None,
            // The first walk adopts flows that were in the table before we started reading.
            next_walk: Instant::now(),
        }
    }

    /// The next decided flow. Cancel-safe: records decided while a call was pending are kept for
    /// the next call.
    ///
    /// # Errors
    /// When the datapath cannot be read (a poll or map failure, not a single flow's problem).
    pub async fn next(&mut self) -> Result<FlowRecord, ManagerError> {
        let Self {
            manager,
            tracker,
            ready,
            ticks,
            next_walk,
        } = self;
        let ticks = ticks.get_or_insert_with(|| {
            let mut ticks = interval_at(Instant::now() + DEADLINE_TICK, DEADLINE_TICK);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticks
        });
        loop {
            if let Some(record) = ready.pop_front() {
                return Ok(record);
            }
            tokio::select! {
                events = manager.next_events() => {
                    let events = events?;
                    let now = Now::read();
                    for event in &events {
                        // New carries no counters worth a syscall; the others decide the flow.
                        let state = match event.kind() {
                            Some(EventKind::New) | None => None,
                            Some(_) => manager.lookup(&event.key)?,
                        };
                        if let Some(record) = tracker.on_event(event, state.as_ref(), &now) {
                            push(manager, ready, record);
                        }
                    }
                }
                _ = ticks.tick() => {
                    let now = Now::read();
                    for key in tracker.due(&now) {
                        let state = manager.lookup(&key)?;
                        if let Some(record) = tracker.resolve(&key, state.as_ref(), &now) {
                            push(manager, ready, record);
                        }
                    }
                    if Instant::now() >= *next_walk {
                        walk(manager, tracker, ready, &now)?;
                        *next_walk = Instant::now() + tracker.config().walk_interval;
                    }
                }
            }
        }
    }

    /// Health of the datapath under the stream.
    ///
    /// # Errors
    /// When the counters cannot be read.
    pub fn health(&self) -> Result<DatapathHealth, ManagerError> {
        self.manager.health()
    }

    /// Flows waiting for an answer now.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.tracker.pending()
    }

    /// The datapath under the stream.
    #[must_use]
    pub const fn manager(&self) -> &DatapathManager {
        &self.manager
    }

    /// Detaches everything (see [`DatapathManager::shutdown`]) and hands the manager back.
    ///
    /// # Errors
    /// When called from a thread in another network namespace.
    pub fn shutdown(mut self) -> Result<DatapathManager, ManagerError> {
        self.manager.shutdown()?;
        Ok(self.manager)
    }
}

/// Walks the flow table through the tracker: adopts and decides flows whose events were lost,
/// deletes expired entries.
fn walk(
    manager: &mut DatapathManager,
    tracker: &mut FlowTracker,
    ready: &mut VecDeque<FlowRecord>,
    now: &Now,
) -> Result<(), ManagerError> {
    let entries = manager.walk()?;
    tracker.begin_walk();
    let mut removed = 0usize;
    for (key, state) in &entries {
        let verdict = tracker.on_table_entry(key, state, now);
        if let Some(record) = verdict.record {
            push(manager, ready, record);
        }
        if verdict.remove {
            manager.remove(key)?;
            removed += 1;
        }
    }
    tracker.end_walk();
    tracing::debug!(
        entries = entries.len(),
        removed,
        tracked = tracker.len(),
        "flow table walked"
    );
    Ok(())
}

/// Queues a record, naming its interface when it is still attached.
fn push(manager: &DatapathManager, ready: &mut VecDeque<FlowRecord>, mut record: FlowRecord) {
    if let Some(name) = manager.interface_name(record.ifindex) {
        record.interface = name;
    }
    ready.push_back(record);
}
