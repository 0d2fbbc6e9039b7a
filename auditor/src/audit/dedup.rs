//! Memory of recently counted flows, so a flow reported twice (seen on two local interfaces, or
//! by an event and again by a table walk) is counted once, and of the endpoints initiators just
//! reached, so a flow seen both addressed to a Service ClusterIP and to the endpoint it was
//! translated to is counted once. Bounded in time and in entries.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use auditor_ebpf::flow::FlowKey;
use rustc_hash::FxHashMap;

use crate::flows::Protocol;

/// Two sightings of one flow may disagree on its first-seen time by this much (the kernel clock
/// is coarse, and wall-clock conversion happens at slightly different instants).
const SLACK: Duration = Duration::from_secs(1);

/// An initiator's socket: what a ClusterIP record and its endpoint record share.
pub(super) type Initiator = (Protocol, SocketAddr);

#[derive(Clone, Copy, Debug)]
struct Seen {
    first_seen: SystemTime,
    last_seen: SystemTime,
    /// Which entry of `order` remembered it last: only that one's expiry forgets it.
    seq: u64,
}

/// Counted flows by normalised key, for recognising repeats.
#[derive(Debug)]
pub(super) struct Recent {
    horizon: Duration,
    capacity: usize,
    by_key: FxHashMap<FlowKey, Seen>,
    /// Insertion order, for expiry: (seq, key, when remembered).
    order: VecDeque<(u64, FlowKey, SystemTime)>,
    next_seq: u64,
}

impl Recent {
    pub(super) fn new(horizon: Duration, capacity: usize) -> Self {
        Self {
            horizon,
            capacity: capacity.max(1),
            by_key: FxHashMap::default(),
            order: VecDeque::new(),
            next_seq: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether a flow with this key and lifetime was already counted: same normalised key and
    /// overlapping lifetimes. A later flow reusing the 5-tuple starts after the earlier one's
    /// last packet, so it is new.
    pub(super) fn is_duplicate(&self, key: &FlowKey, first_seen: SystemTime) -> bool {
        self.by_key.get(key).is_some_and(|seen| {
            first_seen <= seen.last_seen + SLACK && seen.first_seen <= first_seen + SLACK
        })
    }

    pub(super) fn remember(
        &mut self,
        key: FlowKey,
        first_seen: SystemTime,
        last_seen: SystemTime,
        now: SystemTime,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_key.insert(
            key,
            Seen {
                first_seen,
                last_seen,
                seq,
            },
        );
        self.order.push_back((seq, key, now));
        while self.order.len() > self.capacity {
            self.pop_oldest();
        }
    }

    /// Forgets what was remembered before `now - horizon`.
    pub(super) fn expire(&mut self, now: SystemTime) {
        let cutoff = now
            .checked_sub(self.horizon)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        while self.order.front().is_some_and(|&(_, _, at)| at < cutoff) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        let Some((seq, key, _)) = self.order.pop_front() else {
            return;
        };
        // A newer sighting of the same key stays until its own turn.
        if self.by_key.get(&key).is_some_and(|seen| seen.seq == seq) {
            self.by_key.remove(&key);
        }
    }
}

/// The responders each initiator socket reached recently (counted flows to pods), kept only
/// as long as a ClusterIP record of the same flow can still arrive.
#[derive(Debug)]
pub(super) struct Reached {
    window: Duration,
    capacity: usize,
    /// Oldest first: one busy initiator socket (a port scan, a proxy) can hold thousands.
    by_initiator: FxHashMap<Initiator, VecDeque<(IpAddr, SystemTime)>>,
    order: VecDeque<(Initiator, SystemTime)>,
}

impl Reached {
    pub(super) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            by_initiator: FxHashMap::default(),
            order: VecDeque::new(),
        }
    }

    /// Whether `initiator` reached one of the candidates around `first_seen`.
    pub(super) fn reached(
        &self,
        initiator: &Initiator,
        first_seen: SystemTime,
        within: Duration,
        mut is_candidate: impl FnMut(IpAddr) -> bool,
    ) -> bool {
        self.by_initiator.get(initiator).is_some_and(|seen| {
            seen.iter()
                .any(|&(responder, at)| close(at, first_seen, within) && is_candidate(responder))
        })
    }

    pub(super) fn insert(
        &mut self,
        initiator: Initiator,
        responder: IpAddr,
        first_seen: SystemTime,
        now: SystemTime,
    ) {
        self.by_initiator
            .entry(initiator)
            .or_default()
            .push_back((responder, first_seen));
        self.order.push_back((initiator, now));
        while self.order.len() > self.capacity {
            self.pop_oldest();
        }
    }

    pub(super) fn expire(&mut self, now: SystemTime) {
        let cutoff = now
            .checked_sub(self.window)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        while self.order.front().is_some_and(|&(_, at)| at < cutoff) {
            self.pop_oldest();
        }
    }

    /// Drops the oldest responder of the oldest entry's initiator (entries of one initiator are
    /// pushed in time order, so its first is its oldest).
    fn pop_oldest(&mut self) {
        let Some((initiator, _)) = self.order.pop_front() else {
            return;
        };
        if let Some(seen) = self.by_initiator.get_mut(&initiator) {
            seen.pop_front();
            if seen.is_empty() {
                self.by_initiator.remove(&initiator);
            }
        }
    }
}

pub(super) fn close(a: SystemTime, b: SystemTime, window: Duration) -> bool {
    a.duration_since(b).unwrap_or_else(|e| e.duration()) <= window
}
