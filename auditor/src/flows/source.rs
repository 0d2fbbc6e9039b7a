//! The seam under the flow stream: what [`FlowStream`](super::FlowStream) needs from a datapath
//! (its events, its flow table, its map of counted flows, the clock its timestamps are on), as a
//! trait, so the stream's decisions can be tested without a kernel
//! ([`FakeDatapath`](super::fake::FakeDatapath)). The
//! real datapath, [`DatapathManager`], implements it here, since `datapath` knows nothing of
//! `flows`.

use std::future::Future;

use auditor_ebpf::flow::{FlowEvent, FlowKey, FlowState};

use super::Now;
use crate::datapath::manager::{DatapathHealth, DatapathManager, ManagerError};

/// A datapath the flow stream reads: events from its ring buffer, entries of its flow table, its
/// counters and its clock.
///
/// The stream calls it through generics, never through `dyn`: nothing is boxed per call, and the
/// table walk's callback is inlined as before.
pub trait FlowSource {
    /// A failure to read the datapath (not a single flow's problem): the stream stops with it.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Waits for events and returns them (never empty). Must be cancel-safe: the stream selects
    /// on it next to its timer, and dropping the future must lose no event.
    fn next_events(&mut self) -> impl Future<Output = Result<Vec<FlowEvent>, Self::Error>> + Send;

    /// The events sent and not read yet, without waiting (often none).
    fn read_events(&mut self) -> Vec<FlowEvent>;

    /// Events lost so far. While this does not move, every state change of every flow has been
    /// (or is about to be) read as an event.
    ///
    /// # Errors
    /// When the counters cannot be read.
    fn events_lost(&self) -> Result<u64, Self::Error>;

    /// A flow's table entry now; `None` when it is not (or no longer) in the table.
    ///
    /// # Errors
    /// When the lookup fails for another reason than a missing key.
    fn lookup(&self, key: &FlowKey) -> Result<Option<FlowState>, Self::Error>;

    /// Calls `each` for every entry of the flow table and returns how many there were. The
    /// datapath may keep changing the table meanwhile: a view over the walk, not a snapshot.
    ///
    /// # Errors
    /// When reading the table fails.
    fn walk(&mut self, each: impl FnMut(FlowKey, &FlowState)) -> Result<usize, Self::Error>;

    /// Deletes a flow's table entry; a missing key is fine.
    ///
    /// # Errors
    /// When the deletion fails for another reason.
    fn remove(&mut self, key: &FlowKey) -> Result<(), Self::Error>;

    /// Records that the flow of `key`, whose table entry was first seen at `first_seen_ns`, was
    /// counted (the map of counted flows, `REPORTED`, not the table entry): whoever adopts the
    /// tables after this agent (a restart with pinned tables) must not count that entry again.
    ///
    /// # Errors
    /// When the mark cannot be written (the map full, or another error): the stream counts the
    /// failure and goes on, it is no reason to stop.
    fn mark_reported(&mut self, key: &FlowKey, first_seen_ns: u64) -> Result<(), Self::Error>;

    /// Deletes the counted mark of `key` (its flow is forgotten for good); a missing one is
    /// fine.
    ///
    /// # Errors
    /// When the deletion fails for another reason.
    fn forget_reported(&mut self, key: &FlowKey) -> Result<(), Self::Error>;

    /// Calls `each` for every counted mark: the key and the `first_seen_ns` it was counted
    /// with. Returns how many there were.
    ///
    /// # Errors
    /// When reading the map fails.
    fn walk_reported(&mut self, each: impl FnMut(FlowKey, u64)) -> Result<usize, Self::Error>;

    /// The name of an attached interface.
    fn interface_name(&self, ifindex: u32) -> Option<&str>;

    /// The time now, on the clock the table entries and events are stamped with. Every deadline,
    /// expiry and walk of the stream is measured on it.
    fn now(&self) -> Now;

    /// Whether the flow tables were adopted from a predecessor (pinned tables found at start):
    /// then every flow in them was seen from its start by some agent. Otherwise the agent
    /// joins conversations already going on (see [`super::FlowStream::open_join_window`]).
    fn tables_adopted(&self) -> bool;

    /// The datapath's health, for whoever owns the stream.
    ///
    /// # Errors
    /// When the counters cannot be read.
    fn health(&self) -> Result<DatapathHealth, Self::Error>;

    /// Detaches the datapath from everything it is attached to.
    ///
    /// # Errors
    /// When detaching fails.
    fn shutdown(&mut self) -> Result<(), Self::Error>;
}

impl FlowSource for DatapathManager {
    type Error = ManagerError;

    fn next_events(&mut self) -> impl Future<Output = Result<Vec<FlowEvent>, ManagerError>> + Send {
        Self::next_events(self)
    }

    fn read_events(&mut self) -> Vec<FlowEvent> {
        Self::read_events(self)
    }

    fn events_lost(&self) -> Result<u64, ManagerError> {
        Self::events_lost(self)
    }

    fn lookup(&self, key: &FlowKey) -> Result<Option<FlowState>, ManagerError> {
        Self::lookup(self, key)
    }

    fn walk(&mut self, each: impl FnMut(FlowKey, &FlowState)) -> Result<usize, ManagerError> {
        Self::walk(self, each)
    }

    fn remove(&mut self, key: &FlowKey) -> Result<(), ManagerError> {
        Self::remove(self, key)
    }

    fn mark_reported(&mut self, key: &FlowKey, first_seen_ns: u64) -> Result<(), ManagerError> {
        Self::mark_reported(self, key, first_seen_ns)
    }

    fn forget_reported(&mut self, key: &FlowKey) -> Result<(), ManagerError> {
        Self::forget_reported(self, key)
    }

    fn walk_reported(&mut self, each: impl FnMut(FlowKey, u64)) -> Result<usize, ManagerError> {
        Self::walk_reported(self, each)
    }

    fn interface_name(&self, ifindex: u32) -> Option<&str> {
        Self::interface_name(self, ifindex)
    }

    /// `CLOCK_MONOTONIC_COARSE`, what the program stamps packets with.
    fn now(&self) -> Now {
        Now::read()
    }

    fn tables_adopted(&self) -> bool {
        Self::tables_adopted(self)
    }

    fn health(&self) -> Result<DatapathHealth, ManagerError> {
        Self::health(self)
    }

    fn shutdown(&mut self) -> Result<(), ManagerError> {
        Self::shutdown(self)
    }
}
