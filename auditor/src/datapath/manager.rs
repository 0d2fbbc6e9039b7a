//! The running datapath: the loaded programs attached to the matching interfaces of one network
//! namespace (kept in step with link notifications, and with default-route notifications when
//! `:default-route` is an uplink), the event ring buffer (and the program's log records, when
//! on) read asynchronously, and the flow table and counters read on demand. It hands out raw
//! flow events and table entries; `flows` turns them into records.
//!
//! Run it on a thread of the namespace to watch, inside a tokio runtime (any flavour: the
//! attacher refuses kernel calls from a thread in another namespace; see [`super::attach`]).

use std::{
    collections::VecDeque,
    os::fd::{AsRawFd as _, RawFd},
};

use auditor_ebpf::flow::{Counter, FlowEvent, FlowKey, FlowState};
use aya::maps::{MapData, MapError, RingBuf};
use serde::Serialize;
use tokio::io::{
    Interest,
    unix::{AsyncFd, AsyncFdReadyMutGuard},
};

use super::{
    attach::{AttachConfig, AttachError, AttachedInterface, Attacher, DEFAULT_ROUTE},
    kernel_log::KernelLog,
    load::{CounterTotals, Datapath, LoadError},
    netlink::{self, LinkChange, LinkWatcher, NetlinkError},
};

/// At most this many events per call of [`DatapathManager::next_events`], so a flood cannot
/// starve the link watcher or the caller's timers.
const EVENTS_PER_BATCH: usize = 4096;
/// Interface changes applied between two looks at the ring buffer (and two yields to the
/// caller's other tasks): about 100 ms of TCX attaching.
const CHANGES_PER_STEP: usize = 4;

/// Errors of the running datapath.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("watching interfaces: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("registering the {what} ring buffer (fd {fd}) with tokio: {source}")]
    Register {
        what: &'static str,
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for events: {source}")]
    Poll {
        #[source]
        source: std::io::Error,
    },
    #[error("flow table {op}: {source}")]
    Table {
        op: &'static str,
        #[source]
        source: MapError,
    },
}

/// The datapath's health, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatapathHealth {
    /// Interfaces the programs are attached to, with the hook mode of each.
    pub attached: Vec<AttachedInterface>,
    /// Entries, at the last walk, of the fullest flow table (IPv4 TCP, other IPv4, the rest).
    pub flow_table_entries: u64,
    /// Capacity of each flow table: the LRU evicts once `flow_table_entries` reaches it.
    pub flow_table_capacity: u32,
    /// Events the kernel could not write (ring buffer full).
    pub events_lost: u64,
    /// Flows the kernel could not insert (table update failed).
    pub inserts_failed: u64,
    /// Packets counted as truncated or malformed (passed on, never dropped).
    pub parse_errors: u64,
    /// Ring-buffer records user space could not decode (a size mismatch: a build problem).
    pub undecodable_events: u64,
    /// Every datapath counter by name, summed over CPUs.
    pub counters: Vec<(&'static str, u64)>,
}

/// The loaded datapath, attached and watched. See the [module docs](self).
pub struct DatapathManager {
    datapath: Datapath,
    attacher: Attacher,
    watcher: LinkWatcher,
    events: AsyncFd<RingBuf<MapData>>,
    /// The program's log records, when the datapath was loaded with them on.
    kernel_log: Option<AsyncFd<KernelLog>>,
    /// Interface changes read but not applied yet.
    changes: VecDeque<LinkChange>,
    table_entries: u64,
    undecodable_events: u64,
}

impl std::fmt::Debug for DatapathManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathManager")
            .field("datapath", &self.datapath)
            .field("attacher", &self.attacher)
            .finish_non_exhaustive()
    }
}

impl DatapathManager {
    /// Takes a loaded datapath, removes what a crashed instance left attached, and attaches to
    /// every matching interface of the calling thread's namespace. Call inside a tokio runtime.
    ///
    /// # Errors
    /// When the namespace's interfaces cannot be listed or watched, the ring buffer cannot be
    /// registered, or attaching to an interface fails (for another reason than it vanishing).
    pub fn start(mut datapath: Datapath, config: AttachConfig) -> Result<Self, ManagerError> {
        // The default routes' devices are followed as routes change, when they are uplinks.
        let follow_routes = config.uplinks.iter().any(|u| u == DEFAULT_ROUTE);
        let mut attacher = Attacher::new(config)?;
        // Subscribe before the dump: a link that appears in between is then reported, not missed.
        let watcher = if follow_routes {
            LinkWatcher::open_with_routes()?
        } else {
            LinkWatcher::open()?
        };
        let links = netlink::dump_links()?;
        attacher.remove_stale(&links)?;
        let ring = datapath.take_events()?;
        let fd = ring.as_raw_fd();
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped,
        // which happens only when the AsyncFd (its owner) is dropped.
        let events =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                ManagerError::Register {
                    what: "event",
                    fd,
                    source: e.into_parts().1,
                }
            })?;
        // Off, the program writes no records: nothing to wait for.
        let kernel_log = match datapath.take_kernel_log() {
            Some(log) if datapath.config().kernel_log => {
                let fd = log.as_raw_fd();
                // SAFETY: as above: the logger owns its ring buffer's fd until the AsyncFd drops it.
                let log = unsafe { AsyncFd::register_with_interest(log, Interest::READABLE) }
                    .map_err(|e| ManagerError::Register {
                        what: "kernel log",
                        fd,
                        source: e.into_parts().1,
                    })?;
                Some(log)
            }
            _ => None,
        };
        attacher.sync(&mut datapath.programs()?, &links)?;
        tracing::info!(
            attached = attacher.attached().len(),
            interfaces = links.len(),
            "datapath attached"
        );
        Ok(Self {
            datapath,
            attacher,
            watcher,
            events,
            kernel_log,
            changes: VecDeque::new(),
            table_entries: 0,
            undecodable_events: 0,
        })
    }

    /// Waits for flow events and returns them (never empty), following interface changes
    /// meanwhile. Cancel-safe: neither an event nor an interface change is lost by dropping the
    /// future, so callers can `select!` on it next to their signals and timers.
    ///
    /// A burst of new interfaces is attached a few at a time with a yield in between (a TCX
    /// attach costs ~12 ms of kernel time): events keep being read, and the caller's other
    /// `select!` branches (SIGTERM) keep being served, while 200 pods start.
    ///
    /// # Errors
    /// When polling the ring buffer or the link watcher fails; attach failures of single
    /// interfaces are logged, not returned.
    pub async fn next_events(&mut self) -> Result<Vec<FlowEvent>, ManagerError> {
        loop {
            if !self.changes.is_empty() {
                self.apply_some_changes()?;
                let events = self.read_events();
                if !events.is_empty() {
                    return Ok(events);
                }
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                changes = self.watcher.next() => self.changes.extend(changes?),
                guard = self.events.readable_mut() => {
                    let mut guard = guard.map_err(|source| ManagerError::Poll { source })?;
                    let ring = guard.get_inner_mut();
                    let (events, undecodable) = drain(ring);
                    self.undecodable_events += undecodable;
                    if events.len() < EVENTS_PER_BATCH {
                        // Drained: wait for the next wake-up. Otherwise stay ready for the rest.
                        guard.clear_ready();
                    }
                    if !events.is_empty() {
                        return Ok(events);
                    }
                }
                guard = kernel_log_readable(self.kernel_log.as_mut()) => {
                    let mut guard = guard.map_err(|source| ManagerError::Poll { source })?;
                    // Drains the ring buffer: records are few, they come from rare paths only.
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
        }
    }

    /// Applies the next few queued interface changes.
    fn apply_some_changes(&mut self) -> Result<(), ManagerError> {
        let mut programs = self.datapath.programs()?;
        for _ in 0..CHANGES_PER_STEP {
            let Some(change) = self.changes.pop_front() else {
                break;
            };
            if let Err(e) = self.attacher.apply(&mut programs, &change) {
                tracing::error!(error = %e, "interface change not applied");
            }
            if let LinkChange::Resync(_) = change {
                tracing::info!(
                    attached = self.attacher.attached().len(),
                    "resynced interfaces"
                );
            }
        }
        Ok(())
    }

    /// Whether the flow tables are a predecessor's, adopted from their pins.
    #[must_use]
    pub const fn tables_adopted(&self) -> bool {
        match self.datapath.pinned() {
            Some(pinned) => pinned.adopted,
            None => false,
        }
    }

    /// Reads what the ring buffer holds now, without waiting for a wake-up.
    pub fn read_events(&mut self) -> Vec<FlowEvent> {
        let (events, undecodable) = drain(self.events.get_mut());
        self.undecodable_events += undecodable;
        events
    }

    /// Events lost so far: not sent (ring buffer full) or not decodable. While this does not
    /// move, every flow's every state change has been (or is about to be) read as an event.
    ///
    /// # Errors
    /// When the counters cannot be read.
    pub fn events_lost(&self) -> Result<u64, ManagerError> {
        let totals = self.datapath.counter_totals()?;
        Ok(totals.get(Counter::EventsLost) + self.undecodable_events)
    }

    /// A flow's table entry now; `None` when it is not (or no longer) in the table.
    ///
    /// # Errors
    /// When the lookup fails for another reason than a missing key.
    pub fn lookup(&self, key: &FlowKey) -> Result<Option<FlowState>, ManagerError> {
        match self.datapath.flows()?.get(key) {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(ManagerError::Table {
                op: "lookup",
                source,
            }),
        }
    }

    /// Calls `each` for every entry of every flow table. The kernel keeps inserting and
    /// evicting meanwhile, so this is a view over the walk's duration, not a snapshot: an entry
    /// may be missed or, rarely, seen twice. Records how many entries the fullest table holds.
    ///
    /// # Errors
    /// When reading the table fails.
    pub fn walk(&mut self, each: impl FnMut(FlowKey, &FlowState)) -> Result<usize, ManagerError> {
        let per_table = self.datapath.for_each_flow(each)?;
        // The fullest table's count: against one table's capacity it says when eviction starts.
        self.table_entries = per_table.into_iter().max().unwrap_or(0) as u64;
        Ok(per_table.into_iter().sum())
    }

    /// Deletes a flow from the table (expired); a missing key is fine.
    ///
    /// # Errors
    /// When the deletion fails for another reason.
    pub fn remove(&mut self, key: &FlowKey) -> Result<(), ManagerError> {
        match self.datapath.flows_mut()?.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(ManagerError::Table {
                op: "delete",
                source,
            }),
        }
    }

    /// Records that the flow of `key`, whose entry was first seen at `first_seen_ns`, was
    /// counted (see [`Datapath::mark_reported`]).
    ///
    /// # Errors
    /// When the map of counted flows cannot take it (full, or another error).
    pub fn mark_reported(&mut self, key: &FlowKey, first_seen_ns: u64) -> Result<(), ManagerError> {
        Ok(self.datapath.mark_reported(key, first_seen_ns)?)
    }

    /// Deletes the counted mark of `key`; a missing one is fine.
    ///
    /// # Errors
    /// When the deletion fails for another reason.
    pub fn forget_reported(&mut self, key: &FlowKey) -> Result<(), ManagerError> {
        Ok(self.datapath.forget_reported(key)?)
    }

    /// Calls `each` for every counted flow (key, `first_seen_ns` it was counted with).
    ///
    /// # Errors
    /// When reading the map fails.
    pub fn walk_reported(&mut self, each: impl FnMut(FlowKey, u64)) -> Result<usize, ManagerError> {
        Ok(self.datapath.for_each_reported(each)?)
    }

    /// The name of an attached interface.
    #[must_use]
    pub fn interface_name(&self, ifindex: u32) -> Option<&str> {
        self.attacher.name_of(ifindex)
    }

    /// The interfaces attached now.
    #[must_use]
    pub fn attached(&self) -> Vec<AttachedInterface> {
        self.attacher.attached()
    }

    /// The loaded datapath (configuration, counters, maps).
    #[must_use]
    pub const fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// Health data now.
    ///
    /// # Errors
    /// When the counters cannot be read.
    pub fn health(&self) -> Result<DatapathHealth, ManagerError> {
        let totals: CounterTotals = self.datapath.counter_totals()?;
        Ok(DatapathHealth {
            attached: self.attacher.attached(),
            flow_table_entries: self.table_entries,
            flow_table_capacity: self.datapath.config().flow_table_entries,
            events_lost: totals.get(Counter::EventsLost),
            inserts_failed: totals.get(Counter::InsertFailed),
            parse_errors: totals.get(Counter::Truncated) + totals.get(Counter::Malformed),
            undecodable_events: self.undecodable_events,
            counters: Counter::ALL
                .iter()
                .map(|c| (c.name(), totals.get(*c)))
                .collect(),
        })
    }

    /// Detaches from every interface. Dropping the manager does the same; this reports a call
    /// from the wrong namespace instead of leaving clsact filters behind silently.
    ///
    /// # Errors
    /// When called from a thread in another namespace.
    pub fn shutdown(&mut self) -> Result<(), ManagerError> {
        self.attacher.shutdown()?;
        if let Some(log) = &mut self.kernel_log {
            // What the program logged before it was detached.
            log.get_mut().flush();
        }
        tracing::info!("datapath detached");
        Ok(())
    }
}

/// Waits until the program's log records are readable; never, when there is no reader.
async fn kernel_log_readable(
    log: Option<&mut AsyncFd<KernelLog>>,
) -> std::io::Result<AsyncFdReadyMutGuard<'_, KernelLog>> {
    match log {
        Some(log) => log.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// Up to [`EVENTS_PER_BATCH`] events from the ring buffer, and how many records were
/// undecodable.
fn drain(ring: &mut RingBuf<MapData>) -> (Vec<FlowEvent>, u64) {
    let mut events = Vec::new();
    let mut undecodable = 0;
    while events.len() < EVENTS_PER_BATCH {
        let Some(item) = ring.next() else { break };
        match decode_event(&item) {
            Some(event) => events.push(event),
            None => undecodable += 1,
        }
    }
    (events, undecodable)
}

/// A ring-buffer record as a [`FlowEvent`]; `None` when its size is not the event's.
fn decode_event(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() != size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: the length matches, FlowEvent is plain old data valid for any bit pattern
    // (`aya::Pod`), and read_unaligned copes with the ring buffer's 8-byte alignment.
    Some(unsafe { bytes.as_ptr().cast::<FlowEvent>().read_unaligned() })
}

#[cfg(test)]
mod tests {
    use auditor_ebpf::flow::{EventKind, Hook, proto};

    use super::*;

    #[test]
    fn decodes_events_of_the_right_size_only() {
        let (key, side) = FlowKey::from_addrs(
            proto::UDP,
            ("192.0.2.1".parse().unwrap(), 5000),
            ("192.0.2.2".parse().unwrap(), 53),
        );
        let event = FlowEvent {
            key,
            ts_ns: 42,
            ifindex: 3,
            kind: EventKind::New as u8,
            initiator: side as u8,
            hook: Hook::Ingress as u8,
            mid_stream: 0,
        };
        // SAFETY (test): viewing a Pod value's bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&event).cast::<u8>(),
                size_of::<FlowEvent>(),
            )
        };
        assert_eq!(decode_event(bytes), Some(event));
        assert_eq!(decode_event(&bytes[1..]), None);
        assert_eq!(decode_event(&[bytes, &[0u8; 8]].concat()), None);
    }
}
