//! Memory of recently counted flows, so a flow reported twice (seen on two local interfaces, or
//! by an event and again by a table walk) is counted once, and of the endpoints initiators just
//! reached, so a flow seen both addressed to a Service `ClusterIP` and to the endpoint it was
//! translated to is counted once. Bounded in time and in entries.

use std::collections::VecDeque;
use std::hash::BuildHasher as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use auditor_ebpf::flow::FlowKey;
use rustc_hash::FxHashMap;

use crate::vocab::Protocol;

/// Two sightings of one flow may disagree on its first-seen time by this much (the kernel clock
/// is coarse, and wall-clock conversion happens at slightly different instants).
const SLACK: Duration = Duration::from_secs(1);

/// An initiator's socket: what a `ClusterIP` record and its endpoint record share.
pub(super) type Initiator = (Protocol, SocketAddr);

/// A wall-clock time in milliseconds since the Unix epoch: half the size of a `SystemTime`,
/// and these memories hold tens of thousands of them.
type Millis = u64;

fn millis(t: SystemTime) -> Millis {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn duration_ms(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Entries are keyed by a seeded 64-bit hash of what they remember, not by the 40-byte key
/// itself (a fifth of the memory). Two keys sharing a hash would need about 2^32 remembered
/// entries at once to be likely; these hold at most the configured capacity (32k by default).
#[derive(Debug, Default)]
struct Hasher(foldhash::fast::RandomState);

impl Hasher {
    fn of(&self, value: &impl std::hash::Hash) -> u64 {
        self.0.hash_one(value)
    }
}

#[derive(Clone, Copy, Debug)]
struct Sighting {
    first_seen: Millis,
    /// Milliseconds from the first to the last packet (saturating at 49 days).
    lasted: u32,
    /// Which entry of `order` remembered it last: only that one's expiry forgets it.
    seq: u32,
}

impl Sighting {
    fn last_seen(&self) -> Millis {
        self.first_seen.saturating_add(u64::from(self.lasted))
    }
}

/// Counted flows by normalised key, for recognising repeats.
#[derive(Debug)]
pub(super) struct Recent {
    horizon: Duration,
    capacity: usize,
    hasher: Hasher,
    by_key: FxHashMap<u64, Sighting>,
    /// Insertion order, for expiry: (seq, key hash, when remembered).
    order: VecDeque<(u32, u64, Millis)>,
    next_seq: u32,
}

impl Recent {
    pub(super) fn new(horizon: Duration, capacity: usize) -> Self {
        Self {
            horizon,
            capacity: capacity.max(1),
            hasher: Hasher::default(),
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
        let first = millis(first_seen);
        let slack = duration_ms(SLACK);
        self.by_key.get(&self.hasher.of(key)).is_some_and(|seen| {
            first <= seen.last_seen().saturating_add(slack)
                && seen.first_seen <= first.saturating_add(slack)
        })
    }

    pub(super) fn remember(
        &mut self,
        key: FlowKey,
        first_seen: SystemTime,
        last_seen: SystemTime,
        now: SystemTime,
    ) {
        // Room first, so the queue never grows past its capacity (a push beyond it would double
        // its allocation for one entry).
        while self.order.len() >= self.capacity {
            self.pop_oldest();
        }
        // Sequence numbers only tell apart entries queued at the same time, at most `capacity`
        // of them: wrapping is harmless.
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let hash = self.hasher.of(&key);
        let (first, last) = (millis(first_seen), millis(last_seen));
        self.by_key.insert(
            hash,
            Sighting {
                first_seen: first,
                lasted: u32::try_from(last.saturating_sub(first)).unwrap_or(u32::MAX),
                seq,
            },
        );
        self.order.push_back((seq, hash, millis(now)));
    }

    /// Forgets what was remembered before `now - horizon`.
    pub(super) fn expire(&mut self, now: SystemTime) {
        let cutoff = millis(now).saturating_sub(duration_ms(self.horizon));
        while self.order.front().is_some_and(|&(_, _, at)| at < cutoff) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        let Some((seq, hash, _)) = self.order.pop_front() else {
            return;
        };
        // A newer sighting of the same key stays until its own turn.
        if self.by_key.get(&hash).is_some_and(|seen| seen.seq == seq) {
            self.by_key.remove(&hash);
        }
    }
}

/// A responder address in 16 bytes (IPv4 as IPv4-mapped IPv6), without `IpAddr`'s tag and
/// padding.
type Address = [u8; 16];

fn address(ip: IpAddr) -> Address {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn ip_of(address: Address) -> IpAddr {
    Ipv6Addr::from(address).to_canonical()
}

/// The responders each initiator socket reached recently (counted flows to pods), kept only
/// as long as a `ClusterIP` record of the same flow can still arrive.
#[derive(Debug)]
pub(super) struct Reached {
    window: Duration,
    capacity: usize,
    hasher: Hasher,
    /// By initiator hash, oldest first: one busy initiator socket (a port scan, a proxy) can
    /// hold thousands.
    by_initiator: FxHashMap<u64, VecDeque<(Address, Millis)>>,
    /// (initiator hash, when remembered), oldest first.
    order: VecDeque<(u64, Millis)>,
}

impl Reached {
    pub(super) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            hasher: Hasher::default(),
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
        let (first, within) = (millis(first_seen), duration_ms(within));
        self.by_initiator
            .get(&self.hasher.of(initiator))
            .is_some_and(|seen| {
                seen.iter().any(|&(responder, at)| {
                    at.abs_diff(first) <= within && is_candidate(ip_of(responder))
                })
            })
    }

    pub(super) fn insert(
        &mut self,
        initiator: Initiator,
        responder: IpAddr,
        first_seen: SystemTime,
        now: SystemTime,
    ) {
        while self.order.len() >= self.capacity {
            self.pop_oldest();
        }
        let hash = self.hasher.of(&initiator);
        self.by_initiator
            .entry(hash)
            .or_default()
            .push_back((address(responder), millis(first_seen)));
        self.order.push_back((hash, millis(now)));
    }

    pub(super) fn expire(&mut self, now: SystemTime) {
        let cutoff = millis(now).saturating_sub(duration_ms(self.window));
        while self.order.front().is_some_and(|&(_, at)| at < cutoff) {
            self.pop_oldest();
        }
    }

    /// Drops the oldest responder of the oldest entry's initiator (entries of one initiator are
    /// pushed in time order, so its first is its oldest).
    fn pop_oldest(&mut self) {
        let Some((hash, _)) = self.order.pop_front() else {
            return;
        };
        if let Some(seen) = self.by_initiator.get_mut(&hash) {
            seen.pop_front();
            if seen.is_empty() {
                self.by_initiator.remove(&hash);
            }
        }
    }
}

pub(super) fn close(a: SystemTime, b: SystemTime, window: Duration) -> bool {
    a.duration_since(b).unwrap_or_else(|e| e.duration()) <= window
}
