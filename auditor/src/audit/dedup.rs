//! Memory of recently counted flows, so a flow reported twice (seen on two local interfaces, by
//! two event paths, or once addressed to a Service ClusterIP and once to the endpoint it was
//! translated to) is counted once. Bounded in time and in entries.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use auditor_ebpf::flow::FlowKey;

use crate::flows::Protocol;

/// Two sightings of one flow may disagree on its first-seen time by this much (the kernel clock
/// is coarse, and wall-clock conversion happens at slightly different instants).
const SLACK: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
struct Seen {
    first_seen: SystemTime,
    last_seen: SystemTime,
    /// Which entry of `order` remembered it last: only that one's expiry forgets it.
    seq: u64,
}

/// The flows counted within the horizon, by normalised key and by initiator socket.
#[derive(Debug)]
pub(super) struct Recent {
    horizon: Duration,
    capacity: usize,
    by_key: HashMap<FlowKey, Seen>,
    /// Responders each initiator socket talked to, for pairing Service and endpoint records.
    by_initiator: HashMap<(Protocol, SocketAddr), Vec<(IpAddr, SystemTime)>>,
    /// Insertion order, for expiry.
    order: VecDeque<Remembered>,
    next_seq: u64,
}

#[derive(Clone, Copy, Debug)]
struct Remembered {
    seq: u64,
    key: FlowKey,
    initiator: (Protocol, SocketAddr),
    responder: IpAddr,
    at: SystemTime,
}

impl Recent {
    pub(super) fn new(horizon: Duration, capacity: usize) -> Self {
        Self {
            horizon,
            capacity: capacity.max(1),
            by_key: HashMap::new(),
            by_initiator: HashMap::new(),
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

    /// Whether `initiator` opened a flow to one of `responders` around `first_seen`.
    pub(super) fn initiator_reached(
        &self,
        initiator: (Protocol, SocketAddr),
        first_seen: SystemTime,
        window: Duration,
        mut is_candidate: impl FnMut(IpAddr) -> bool,
    ) -> bool {
        self.by_initiator.get(&initiator).is_some_and(|seen| {
            seen.iter()
                .any(|&(responder, at)| close(at, first_seen, window) && is_candidate(responder))
        })
    }

    pub(super) fn remember(
        &mut self,
        key: FlowKey,
        initiator: (Protocol, SocketAddr),
        responder: IpAddr,
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
        self.by_initiator
            .entry(initiator)
            .or_default()
            .push((responder, first_seen));
        self.order.push_back(Remembered {
            seq,
            key,
            initiator,
            responder,
            at: now,
        });
        while self.order.len() > self.capacity {
            self.pop_oldest();
        }
    }

    /// Forgets what was remembered before `now - horizon`.
    pub(super) fn expire(&mut self, now: SystemTime) {
        let cutoff = now
            .checked_sub(self.horizon)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        while self.order.front().is_some_and(|r| r.at < cutoff) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        let Some(Remembered {
            seq,
            key,
            initiator,
            responder,
            at: _,
        }) = self.order.pop_front()
        else {
            return;
        };
        // A newer sighting of the same key stays until its own turn.
        if self.by_key.get(&key).is_some_and(|seen| seen.seq == seq) {
            self.by_key.remove(&key);
        }
        if let Some(seen) = self.by_initiator.get_mut(&initiator) {
            if let Some(pos) = seen.iter().position(|&(r, _)| r == responder) {
                seen.remove(pos);
            }
            if seen.is_empty() {
                self.by_initiator.remove(&initiator);
            }
        }
    }
}

fn close(a: SystemTime, b: SystemTime, window: Duration) -> bool {
    let d = a.duration_since(b).unwrap_or_else(|e| e.duration());
    d <= window
}
