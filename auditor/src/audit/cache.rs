//! Verdicts of flows judged since the last change. IPv4 flows use a packed 16-byte key and every
//! entry points into a small table of distinct verdicts, so the hot set stays compact. Bounded:
//! past [`CACHE_LIMIT`] entries it starts over.

use std::net::IpAddr;

use rustc_hash::FxHashMap;

use super::verdict::{FlowQuery, Verdict};

/// Past this many cached verdicts the cache starts over, so memory stays bounded.
const CACHE_LIMIT: usize = 1 << 20;
/// Reserved at the first cached verdict (about 1.5 MiB), not before: the daemon judges without
/// the cache and should not pay for it. A busy node's flows then fit without the table growing;
/// a clear keeps the capacity.
const CACHE_RESERVE: usize = 1 << 16;

#[derive(Clone, Debug, Default)]
pub(super) struct VerdictCache {
    v4: FxHashMap<(u64, u32), u32>,
    other: FxHashMap<FlowQuery, u32>,
    verdicts: Vec<Verdict>,
    verdict_ids: FxHashMap<Verdict, u32>,
}

impl VerdictCache {
    fn len(&self) -> usize {
        self.v4.len() + self.other.len()
    }

    pub(super) fn clear(&mut self) {
        if self.len() > 0 || !self.verdicts.is_empty() {
            self.v4.clear();
            self.other.clear();
            self.verdicts.clear();
            self.verdict_ids.clear();
        }
    }

    /// The packed key of an IPv4 flow, of the flow as policies see it (see
    /// [`FlowQuery::normalized`]), computed in place: no copy of the flow on the way.
    #[inline]
    fn key4(flow: &FlowQuery) -> Option<(u64, u32)> {
        match (flow.src, flow.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let protocol = flow.protocol.policy();
                let port = if protocol.is_icmp() { 0 } else { flow.port };
                Some((
                    (u64::from(u32::from(s)) << 32) | u64::from(u32::from(d)),
                    (u32::from(protocol as u8) << 16) | u32::from(port),
                ))
            }
            _ => None,
        }
    }

    /// On the path of every flow counted: kept inline with its caller.
    #[inline]
    pub(super) fn get(&self, flow: &FlowQuery) -> Option<Verdict> {
        let id = match Self::key4(flow) {
            Some(k) => self.v4.get(&k)?,
            None => self.other.get(&flow.normalized())?,
        };
        self.verdicts.get(*id as usize).copied()
    }

    pub(super) fn insert(&mut self, flow: &FlowQuery, verdict: Verdict) {
        if self.len() >= CACHE_LIMIT {
            self.clear();
        }
        let next = u32::try_from(self.verdicts.len()).unwrap_or(u32::MAX);
        let id = *self.verdict_ids.entry(verdict).or_insert(next);
        if id == next {
            self.verdicts.push(verdict);
        }
        match Self::key4(flow) {
            Some(k) => {
                if self.v4.capacity() == 0 {
                    self.v4.reserve(CACHE_RESERVE);
                }
                self.v4.insert(k, id)
            }
            None => self.other.insert(flow.normalized(), id),
        };
    }
}
