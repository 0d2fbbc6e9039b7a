//! A datapath without a kernel, for tests: a flow table, an event queue, a lost-event counter and
//! a clock that moves only when the test moves it. Tests simulate packets on it and run the real
//! [`FlowStream`](super::FlowStream) (or anything built on one, like the daemon's event loop) on
//! top, as an ordinary unprivileged test.
//!
//! ```
//! use std::time::Duration;
//!
//! use auditor::flows::{
//!     FlowStream, FlowsConfig, Outcome,
//!     fake::{FakeDatapath, Peer},
//! };
//! use auditor_ebpf::flow::proto;
//!
//! let fake = FakeDatapath::with_interfaces(&[(7, "caliA")]);
//! // The stream owns one handle; the test keeps another to make traffic.
//! let mut stream = FlowStream::new(fake.clone(), FlowsConfig::default());
//! let client = "10.0.0.1:40000".parse().unwrap();
//! let runtime = tokio::runtime::Builder::new_current_thread()
//!     .enable_time()
//!     .build()
//!     .unwrap();
//! runtime.block_on(async {
//!     let web = fake.open(proto::TCP, client, "10.0.0.2:80".parse().unwrap(), 7);
//!     fake.send(&web, Peer::Responder);
//!     let record = stream.next().await.unwrap();
//!     assert_eq!(record.outcome, Outcome::Established);
//!     assert_eq!(record.interface, "caliA");
//!
//!     // Nobody answers this one: five seconds later on the fake's clock, it is unanswered.
//!     fake.open(proto::UDP, client, "10.0.0.3:53".parse().unwrap(), 7);
//!     fake.advance(Duration::from_secs(5));
//!     let record = stream.next().await.unwrap();
//!     assert_eq!(record.outcome, Outcome::Unanswered);
//! });
//! ```

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use auditor_ebpf::{
    DEFAULT_FLOW_TABLE_ENTRIES,
    flow::{Counter, EventKind, FlowEvent, FlowKey, FlowState, FlowStatus, Hook},
};
use tokio::sync::Notify;

use super::{FlowSource, Now};
use crate::datapath::{
    attach::{AttachedInterface, HookMode, Role},
    manager::DatapathHealth,
};

/// Events handed out per read, as the real datapath bounds a read of its ring buffer.
pub const EVENTS_PER_READ: usize = 4096;
/// The length every simulated packet is counted with, in bytes.
pub const PACKET_LEN: u64 = 100;

/// Who sends a packet of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Initiator,
    Responder,
}

/// A failure the test asked for ([`FakeDatapath::set_failing`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fake datapath: {op} failed (the test made it fail)")]
pub struct FakeError {
    pub op: &'static str,
}

/// A fake datapath. Clones are handles to the same one: give one to the stream and keep one to
/// make traffic, move the clock and look at the table. See the [module docs](self).
///
/// It follows the kernel's rules where the stream relies on them: a flow's first packet creates
/// its entry and sends `New`, every status change sends an event, events sent while the ring
/// buffer is full are counted as lost instead, entries stay until removed, the map of counted
/// marks refuses a new key once full. It does not evict
/// by itself (use [`FakeDatapath::evict`]) and keeps no per-CPU or per-table detail.
#[derive(Debug, Clone)]
pub struct FakeDatapath {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Attached interfaces, fixed at creation.
    interfaces: Vec<(u32, String)>,
    /// What [`FlowSource::tables_adopted`] says.
    adopted: AtomicBool,
    state: Mutex<State>,
    /// Wakes a waiting [`FlowSource::next_events`] when events are queued.
    wake: Notify,
}

#[derive(Debug)]
struct State {
    now: Now,
    /// The flow table, in insertion order (removal moves the last entry into the gap), so walks
    /// are repeatable.
    table: Vec<(FlowKey, FlowState)>,
    index: HashMap<FlowKey, usize>,
    /// The map of counted flows (`REPORTED`): key -> the `first_seen_ns` it was counted with.
    reported: HashMap<FlowKey, u64>,
    /// Its capacity: a mark for a key not in it fails once it holds this many.
    reported_capacity: usize,
    events: VecDeque<FlowEvent>,
    lost: u64,
    ring_full: bool,
    failing: bool,
    lookups: u64,
    walks: u64,
    walked_entries: u64,
    shut_down: bool,
}

impl Default for FakeDatapath {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeDatapath {
    /// The kernel clock's reading when a fake starts.
    pub const START_MONO_NS: u64 = 1_000_000_000_000;
    /// The wall clock's reading when a fake starts, in seconds since the epoch (November 2023).
    pub const START_WALL_SECS: u64 = 1_700_000_000;

    /// A fake with an empty table and queue, attached to no interface, its clock at
    /// [`FakeDatapath::START_MONO_NS`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_interfaces(&[])
    }

    /// A fake attached to these interfaces (index, name): records of flows first seen on them
    /// carry the name, and health lists them (as TCX attachments).
    #[must_use]
    pub fn with_interfaces(interfaces: &[(u32, &str)]) -> Self {
        Self {
            shared: Arc::new(Shared {
                interfaces: interfaces
                    .iter()
                    .map(|(ifindex, name)| (*ifindex, (*name).to_owned()))
                    .collect(),
                adopted: AtomicBool::new(false),
                state: Mutex::new(State {
                    now: Now {
                        mono_ns: Self::START_MONO_NS,
                        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(Self::START_WALL_SECS),
                    },
                    table: Vec::new(),
                    index: HashMap::new(),
                    reported: HashMap::new(),
                    reported_capacity: 3 * DEFAULT_FLOW_TABLE_ENTRIES as usize,
                    events: VecDeque::new(),
                    lost: 0,
                    ring_full: false,
                    failing: false,
                    lookups: 0,
                    walks: 0,
                    walked_entries: 0,
                    shut_down: false,
                }),
                wake: Notify::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; the state is whole.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The time on the fake's clocks (kernel and wall).
    #[must_use]
    pub fn now(&self) -> Now {
        self.state().now
    }

    /// Moves both clocks forward.
    pub fn advance(&self, by: Duration) {
        let mut state = self.state();
        state.now.mono_ns = state
            .now
            .mono_ns
            .saturating_add(u64::try_from(by.as_nanos()).unwrap_or(u64::MAX));
        state.now.wall += by;
    }

    /// The initiator's first packet of a new flow, seen on `ifindex` at the ingress hook: creates
    /// its entry (one packet from the initiator) and sends `New`. Returns the flow's key. An
    /// existing entry with the same key is replaced, as the kernel does for a SYN reusing a
    /// closed flow's ports.
    pub fn open(
        &self,
        protocol: u8,
        initiator: SocketAddr,
        responder: SocketAddr,
        ifindex: u32,
    ) -> FlowKey {
        let (key, side) = FlowKey::from_addrs(
            protocol,
            (initiator.ip(), initiator.port()),
            (responder.ip(), responder.port()),
        );
        let mut state = self.state();
        let now = state.now.mono_ns;
        let entry = FlowState {
            first_seen_ns: now,
            last_seen_ns: now,
            packets: [1, 0],
            bytes: [PACKET_LEN, 0],
            ifindex,
            tcp_flags: [0; 2],
            initiator: side as u8,
            status: FlowStatus::New as u8,
            hook: Hook::Ingress as u8,
            mid_stream: 0,
            answered: 0,
            owners: 0,
            tick: 0,
            nat: 0,
            _reserved: [0; 7],
        };
        state.put(key, entry);
        let event = event_of(key, &entry, EventKind::New, now);
        self.send_event(state, event);
        key
    }

    /// One more packet of a flow. The responder's first packet answers it (`Answered`).
    ///
    /// # Panics
    /// When the flow is not in the table.
    pub fn send(&self, key: &FlowKey, from: Peer) {
        let mut state = self.state();
        let now = state.now.mono_ns;
        let entry = state.entry_mut(key);
        let side = match from {
            Peer::Initiator => 0,
            Peer::Responder => 1,
        };
        entry.packets[side] += 1;
        entry.bytes[side] += PACKET_LEN;
        entry.last_seen_ns = now;
        if from == Peer::Responder && entry.status() == Some(FlowStatus::New) {
            entry.status = FlowStatus::Answered as u8;
            entry.answered = 1;
            let event = event_of(*key, entry, EventKind::Answered, now);
            self.send_event(state, event);
        }
    }

    /// The responder refuses the flow (TCP RST, ICMP unreachable): `Refused` while it is still
    /// unanswered; after an answer, or on a flow first seen mid-stream, the reset closes it
    /// (`Closed`).
    ///
    /// # Panics
    /// When the flow is not in the table.
    pub fn refuse(&self, key: &FlowKey) {
        let mut state = self.state();
        let now = state.now.mono_ns;
        let entry = state.entry_mut(key);
        entry.last_seen_ns = now;
        // A reset of a flow first seen mid-stream closes it, as in the kernel.
        let kind = if entry.status() == Some(FlowStatus::New) && entry.mid_stream == 0 {
            entry.status = FlowStatus::Refused as u8;
            EventKind::Refused
        } else {
            entry.status = FlowStatus::Closed as u8;
            EventKind::Closed
        };
        let event = event_of(*key, entry, kind, now);
        self.send_event(state, event);
    }

    /// The flow closes (TCP FIN both ways): `Closed`.
    ///
    /// # Panics
    /// When the flow is not in the table.
    pub fn close(&self, key: &FlowKey) {
        let mut state = self.state();
        let now = state.now.mono_ns;
        let entry = state.entry_mut(key);
        entry.last_seen_ns = now;
        entry.status = FlowStatus::Closed as u8;
        let event = event_of(*key, entry, EventKind::Closed, now);
        self.send_event(state, event);
    }

    /// Sends an event as the kernel would (lost while the ring buffer is full).
    pub fn push_event(&self, event: FlowEvent) {
        let state = self.state();
        self.send_event(state, event);
    }

    /// Sets a table entry without sending anything: a flow already there when the stream
    /// started, or one whose events were lost (count the loss with
    /// [`FakeDatapath::set_ring_full`] or [`FakeDatapath::lose_events`]).
    pub fn insert(&self, key: FlowKey, entry: FlowState) {
        self.state().put(key, entry);
    }

    /// A flow's table entry now.
    #[must_use]
    pub fn entry(&self, key: &FlowKey) -> Option<FlowState> {
        let state = self.state();
        state.index.get(key).map(|&i| state.table[i].1)
    }

    /// The counted mark of `key` (the `first_seen_ns` it was counted with), if any.
    #[must_use]
    pub fn reported(&self, key: &FlowKey) -> Option<u64> {
        self.state().reported.get(key).copied()
    }

    /// Counted marks held now.
    #[must_use]
    pub fn reported_len(&self) -> usize {
        self.state().reported.len()
    }

    /// Sets a counted mark without the stream: one a predecessor left in the pinned map.
    pub fn set_reported(&self, key: FlowKey, first_seen_ns: u64) {
        self.state().reported.insert(key, first_seen_ns);
    }

    /// The map of counted flows' capacity (by default three times the real flow tables'):
    /// marks of new keys fail while it is full.
    pub fn set_reported_capacity(&self, capacity: usize) {
        self.state().reported_capacity = capacity;
    }

    /// Drops a flow's entry the way the LRU evicts it: no event, nothing counted.
    pub fn evict(&self, key: &FlowKey) -> Option<FlowState> {
        self.state().take(key)
    }

    /// Entries in the table now.
    #[must_use]
    pub fn table_len(&self) -> usize {
        self.state().table.len()
    }

    /// While full, events are not queued but counted as lost, as the kernel does when its ring
    /// buffer is full.
    pub fn set_ring_full(&self, full: bool) {
        self.state().ring_full = full;
    }

    /// Whether the fake's table is to pass for one adopted from a predecessor (default: no, a
    /// fresh table, as on an agent's first start).
    pub fn set_tables_adopted(&self, adopted: bool) {
        self.shared.adopted.store(adopted, Ordering::Relaxed);
    }

    /// Counts `n` events as lost without changing anything else.
    pub fn lose_events(&self, n: u64) {
        self.state().lost += n;
    }

    /// Events sent and not read yet.
    #[must_use]
    pub fn queued_events(&self) -> usize {
        self.state().events.len()
    }

    /// Events lost so far.
    #[must_use]
    pub fn lost_events(&self) -> u64 {
        self.state().lost
    }

    /// While failing, every fallible operation of [`FlowSource`] returns a [`FakeError`] (a
    /// waiting `next_events` too): a broken map, a failed poll.
    pub fn set_failing(&self, failing: bool) {
        self.state().failing = failing;
        self.shared.wake.notify_one();
    }

    /// Lookups of single entries made so far (each a system call on the real datapath).
    #[must_use]
    pub fn lookups(&self) -> u64 {
        self.state().lookups
    }

    /// Walks of the whole table made so far.
    #[must_use]
    pub fn walks(&self) -> u64 {
        self.state().walks
    }

    /// Whether [`FlowSource::shutdown`] was called.
    #[must_use]
    pub fn is_shut_down(&self) -> bool {
        self.state().shut_down
    }

    /// Queues an event (or counts it lost) and wakes the reader. Takes the guard so the event
    /// goes out with the table change that caused it.
    fn send_event(&self, mut state: MutexGuard<'_, State>, event: FlowEvent) {
        if state.ring_full {
            state.lost += 1;
            return;
        }
        state.events.push_back(event);
        drop(state);
        self.shared.wake.notify_one();
    }

    fn check(&self, op: &'static str) -> Result<MutexGuard<'_, State>, FakeError> {
        let state = self.state();
        if state.failing {
            return Err(FakeError { op });
        }
        Ok(state)
    }
}

impl State {
    fn put(&mut self, key: FlowKey, entry: FlowState) {
        if let Some(&i) = self.index.get(&key) {
            self.table[i].1 = entry;
        } else {
            self.index.insert(key, self.table.len());
            self.table.push((key, entry));
        }
    }

    fn take(&mut self, key: &FlowKey) -> Option<FlowState> {
        let i = self.index.remove(key)?;
        let (_, entry) = self.table.swap_remove(i);
        if let Some((moved, _)) = self.table.get(i) {
            self.index.insert(*moved, i);
        }
        Some(entry)
    }

    fn entry_mut(&mut self, key: &FlowKey) -> &mut FlowState {
        match self.index.get(key) {
            Some(&i) => &mut self.table[i].1,
            None => panic!("the fake datapath has no flow {key}"),
        }
    }

    fn take_events(&mut self) -> Vec<FlowEvent> {
        let n = self.events.len().min(EVENTS_PER_READ);
        self.events.drain(..n).collect()
    }
}

/// The event the kernel sends for a change of `entry`.
fn event_of(key: FlowKey, entry: &FlowState, kind: EventKind, now: u64) -> FlowEvent {
    FlowEvent {
        key,
        ts_ns: now,
        ifindex: entry.ifindex,
        kind: kind as u8,
        initiator: entry.initiator,
        hook: entry.hook,
        mid_stream: entry.mid_stream,
    }
}

impl FlowSource for FakeDatapath {
    type Error = FakeError;

    async fn next_events(&mut self) -> Result<Vec<FlowEvent>, FakeError> {
        loop {
            let events = self.check("waiting for events")?.take_events();
            if !events.is_empty() {
                return Ok(events);
            }
            // A notification sent since the check is kept (one permit): nothing is missed.
            self.shared.wake.notified().await;
        }
    }

    fn read_events(&mut self) -> Vec<FlowEvent> {
        self.state().take_events()
    }

    fn events_lost(&self) -> Result<u64, FakeError> {
        Ok(self.check("reading counters")?.lost)
    }

    fn lookup(&self, key: &FlowKey) -> Result<Option<FlowState>, FakeError> {
        let mut state = self.check("lookup")?;
        state.lookups += 1;
        Ok(state.index.get(key).map(|&i| state.table[i].1))
    }

    fn walk(&mut self, mut each: impl FnMut(FlowKey, &FlowState)) -> Result<usize, FakeError> {
        let mut state = self.check("walk")?;
        state.walks += 1;
        for (key, entry) in &state.table {
            each(*key, entry);
        }
        let entries = state.table.len();
        state.walked_entries = entries as u64;
        Ok(entries)
    }

    fn remove(&mut self, key: &FlowKey) -> Result<(), FakeError> {
        self.check("delete")?.take(key);
        Ok(())
    }

    /// As the kernel's hash map: an existing key is overwritten, a new one needs room.
    fn mark_reported(&mut self, key: &FlowKey, first_seen_ns: u64) -> Result<(), FakeError> {
        let mut state = self.check("mark reported")?;
        if !state.reported.contains_key(key) && state.reported.len() >= state.reported_capacity {
            return Err(FakeError {
                op: "mark reported (map full)",
            });
        }
        state.reported.insert(*key, first_seen_ns);
        Ok(())
    }

    fn forget_reported(&mut self, key: &FlowKey) -> Result<(), FakeError> {
        self.check("forget reported")?.reported.remove(key);
        Ok(())
    }

    fn walk_reported(&mut self, mut each: impl FnMut(FlowKey, u64)) -> Result<usize, FakeError> {
        let state = self.check("walk reported")?;
        let mut marks: Vec<(FlowKey, u64)> = state.reported.iter().map(|(k, v)| (*k, *v)).collect();
        drop(state);
        // A repeatable order.
        marks.sort_unstable_by_key(|(k, _)| (k.lo_addr, k.hi_addr, k.lo_port, k.hi_port, k.proto));
        for (key, first_seen_ns) in &marks {
            each(*key, *first_seen_ns);
        }
        Ok(marks.len())
    }

    fn interface_name(&self, ifindex: u32) -> Option<&str> {
        self.shared
            .interfaces
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map(|(_, name)| name.as_str())
    }

    fn now(&self) -> Now {
        Self::now(self)
    }

    fn tables_adopted(&self) -> bool {
        self.shared.adopted.load(Ordering::Relaxed)
    }

    /// Attached interfaces as given, table entries as of the last walk, capacity the real
    /// default, the lost events as the ring buffer's; every other counter zero.
    fn health(&self) -> Result<DatapathHealth, FakeError> {
        let state = self.check("reading counters")?;
        Ok(DatapathHealth {
            attached: self
                .shared
                .interfaces
                .iter()
                .map(|(ifindex, name)| AttachedInterface {
                    name: name.clone(),
                    ifindex: *ifindex,
                    mode: HookMode::Tcx,
                    role: Role::Pod,
                })
                .collect(),
            flow_table_entries: state.walked_entries,
            flow_table_capacity: DEFAULT_FLOW_TABLE_ENTRIES,
            events_lost: state.lost,
            inserts_failed: 0,
            parse_errors: 0,
            undecodable_events: 0,
            counters: Counter::ALL
                .iter()
                .map(|c| {
                    let value = if *c == Counter::EventsLost {
                        state.lost
                    } else {
                        0
                    };
                    (c.name(), value)
                })
                .collect(),
        })
    }

    fn shutdown(&mut self) -> Result<(), FakeError> {
        self.check("detaching")?.shut_down = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use auditor_ebpf::flow::proto;

    use super::*;

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn server() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 2], 80))
    }

    fn kinds(events: &[FlowEvent]) -> Vec<Option<EventKind>> {
        events.iter().map(FlowEvent::kind).collect()
    }

    #[test]
    fn status_changes_send_events_and_a_full_ring_buffer_loses_them() {
        let mut fake = FakeDatapath::new();
        let opened = fake.now();
        let key = fake.open(proto::TCP, client(40000), server(), 7);
        fake.send(&key, Peer::Initiator);
        fake.advance(Duration::from_millis(3));
        fake.send(&key, Peer::Responder);
        fake.send(&key, Peer::Responder);
        fake.close(&key);
        let events = fake.read_events();
        assert_eq!(
            kinds(&events),
            [
                Some(EventKind::New),
                Some(EventKind::Answered),
                Some(EventKind::Closed)
            ]
        );
        assert_eq!(events[0].ts_ns, opened.mono_ns);
        assert_eq!(events[1].ts_ns, opened.mono_ns + 3_000_000);
        // The initiator's side of the key, as the kernel writes it.
        let (_, side) =
            FlowKey::from_addrs(proto::TCP, (client(40000).ip(), 40000), (server().ip(), 80));
        assert!(events.iter().all(|e| e.initiator() == Some(side)));
        let entry = fake.entry(&key).unwrap_or_else(|| panic!("entry gone"));
        assert_eq!(
            (entry.packets, entry.bytes),
            ([2, 2], [2 * PACKET_LEN, 2 * PACKET_LEN])
        );
        assert_eq!(
            (entry.status(), entry.answered),
            (Some(FlowStatus::Closed), 1)
        );

        let refused = fake.open(proto::TCP, client(40001), server(), 7);
        fake.set_ring_full(true);
        fake.refuse(&refused);
        fake.set_ring_full(false);
        assert_eq!(kinds(&fake.read_events()), [Some(EventKind::New)]);
        assert_eq!(fake.lost_events(), 1);
        assert_eq!(
            fake.entry(&refused).map(|e| e.status()),
            Some(Some(FlowStatus::Refused))
        );
        assert_eq!(fake.events_lost(), Ok(1));
    }

    #[test]
    fn a_read_takes_at_most_a_batch() {
        let mut fake = FakeDatapath::new();
        for port in 0..u16::try_from(EVENTS_PER_READ + 1).unwrap_or(u16::MAX) {
            fake.open(proto::UDP, client(port), server(), 7);
        }
        assert_eq!(fake.read_events().len(), EVENTS_PER_READ);
        assert_eq!(fake.read_events().len(), 1);
        assert!(fake.read_events().is_empty());
    }

    #[test]
    fn removals_keep_the_table_consistent() {
        let mut fake = FakeDatapath::new();
        let keys: Vec<FlowKey> = (1..=3)
            .map(|port| fake.open(proto::UDP, client(port), server(), 7))
            .collect();
        assert_eq!(fake.evict(&keys[0]).map(|e| e.packets), Some([1, 0]));
        // The last entry moved into the gap: still found, and changed in place.
        fake.send(&keys[2], Peer::Responder);
        assert_eq!(
            fake.lookup(&keys[2]).map(|e| e.map(|e| e.status())),
            Ok(Some(Some(FlowStatus::Answered)))
        );
        assert_eq!(fake.remove(&keys[1]), Ok(()));
        assert_eq!(fake.remove(&keys[1]), Ok(()), "a missing key is fine");
        let mut walked = Vec::new();
        assert_eq!(fake.walk(|key, _| walked.push(key)), Ok(1));
        assert_eq!(walked, [keys[2]]);
        assert_eq!(fake.lookup(&keys[0]), Ok(None));
        assert_eq!((fake.lookups(), fake.walks()), (2, 1));
    }

    #[test]
    fn a_failing_datapath_fails_every_read() {
        let mut fake = FakeDatapath::new();
        let key = fake.open(proto::UDP, client(1), server(), 7);
        fake.set_failing(true);
        assert!(fake.lookup(&key).is_err());
        assert!(fake.walk(|_, _| {}).is_err());
        assert!(fake.remove(&key).is_err());
        assert!(fake.events_lost().is_err());
        assert!(FlowSource::health(&fake).is_err());
        fake.set_failing(false);
        assert_eq!(fake.lookup(&key).map(|e| e.is_some()), Ok(true));
    }
}
