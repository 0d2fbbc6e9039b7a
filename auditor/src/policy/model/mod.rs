//! The policy store: compiled policies indexed so that deciding one direction of a flow costs a
//! few lookups. Pods are known here only as identities (namespace, labels, declared ports, with a
//! count of the pods that share them); every selector knows the identities it matches
//! (`selectors`), every identity the rules that apply to it (`identities`), so a change
//! touches only what it changes. `decide` answers for one end and one direction; joining the
//! two ends of a flow, Services and addresses is the judging stage's work.
//!
//! Pure: no I/O, and nothing here knows the inventory. What it needs to know about the other
//! end of a flow comes in with the question ([`Endpoint`], [`AddressFacts`]).

mod decide;
mod identities;
mod selectors;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use serde::Serialize;
use slotmap::SlotMap;

use super::ir::{Action, CompiledPolicy, Entity, Peer, Peers, PolicyKey, PolicyKind, Rule};
use crate::vocab::Direction;

pub use decide::{AddressFacts, Decision, Endpoint, NodeTag, Question};
use identities::Identities;
pub use identities::IdentityId;
use selectors::{SelectorId, Selectors};

/// How `ipBlock` treats cluster addresses (SPEC 4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IpBlockReading {
    /// An ipBlock matches any address, pods and nodes included.
    #[default]
    Calico,
    /// CIDR rules never match pod or node addresses.
    Cilium,
}

slotmap::new_key_type! {
    /// A loaded rule. Generational: an id kept past its policy's change or removal finds
    /// nothing rather than another rule.
    pub struct RuleId;
    /// A loaded policy object.
    struct PolicyId;
}

/// A peer of a rule, with its selector interned.
#[derive(Clone, Debug)]
enum CompiledPeer {
    Endpoints(SelectorId),
    Cidr { net: IpNet, except: Vec<IpNet> },
    ExternalCidr { net: IpNet, except: Vec<IpNet> },
    Entity(Entity),
    Unjudgeable,
}

#[derive(Clone, Debug)]
struct RuleEntry {
    policy: PolicyId,
    /// Its place in the policy: with the policy's key, the order in which rules are tried.
    index: u32,
    rule: Rule,
    subject: SelectorId,
    /// `None` is `Peers::Any`.
    peers: Option<Vec<CompiledPeer>>,
    has_unjudgeable: bool,
}

#[derive(Clone, Debug)]
struct PolicyEntry {
    key: PolicyKey,
    rules: Vec<RuleId>,
    isolations: Vec<(SelectorId, Direction)>,
}

/// A rule, named the way metrics label it and explanations print it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    pub policy_kind: &'static str,
    pub policy_namespace: String,
    pub policy_name: String,
    pub rule: String,
    pub action: &'static str,
    /// Its L7 part (Cilium `toPorts[].rules`) was not judged.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub l7: bool,
    /// Why it could not be judged from addresses, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unjudgeable: Option<String>,
}

impl RuleRef {
    /// `Kind namespace/name rule`.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = format!("{} ", self.policy_kind);
        if !self.policy_namespace.is_empty() {
            out.push_str(&self.policy_namespace);
            out.push('/');
        }
        out.push_str(&self.policy_name);
        out.push(' ');
        out.push_str(&self.rule);
        out
    }
}

/// The intended policy model.
#[derive(Clone, Debug, Default)]
pub struct Model {
    ipblock: IpBlockReading,
    identities: Identities,
    selectors: Selectors,
    rules: SlotMap<RuleId, RuleEntry>,
    policies: SlotMap<PolicyId, PolicyEntry>,
    policy_ids: HashMap<PolicyKey, PolicyId>,
    /// What loaded policies hold that is not judged (Cilium host policies), by policy.
    unjudged: BTreeMap<PolicyKey, Vec<String>>,
    /// Fields of loaded policies this version does not know, by policy.
    unknown: BTreeMap<PolicyKey, Vec<String>>,
    generation: u64,
}

impl Model {
    #[must_use]
    pub fn new(ipblock: IpBlockReading) -> Self {
        Self {
            ipblock,
            ..Self::default()
        }
    }

    #[must_use]
    pub const fn ipblock(&self) -> IpBlockReading {
        self.ipblock
    }

    /// Bumped by every change of the policies, the identities or namespace labels.
    #[must_use]
    pub const fn generation(&self) -> u64 {
        self.generation
    }

    fn changed(&mut self) {
        self.generation += 1;
    }

    /// Gives back the room that growing one object at a time left over: for after a bulk load.
    pub fn shrink_to_fit(&mut self) {
        self.identities.shrink_to_fit();
        self.selectors.shrink_to_fit();
        self.policy_ids.shrink_to_fit();
    }

    /// Adds or replaces a policy (matched by its key).
    pub fn upsert_policy(&mut self, policy: CompiledPolicy) {
        if self.policy_ids.contains_key(&policy.key) {
            self.unload_policy(&policy.key);
        }
        let CompiledPolicy {
            key,
            isolations,
            rules,
            unjudged,
            unknown,
        } = policy;
        if !unjudged.is_empty() {
            self.unjudged.insert(key.clone(), unjudged);
        }
        if !unknown.is_empty() {
            self.unknown.insert(key.clone(), unknown);
        }
        let pid = self.policies.insert(PolicyEntry {
            key: key.clone(),
            rules: Vec::new(),
            isolations: Vec::new(),
        });
        self.policy_ids.insert(key, pid);
        let mut isolation_ids = Vec::with_capacity(isolations.len());
        for isolation in isolations {
            let sid = self.intern_selector(&isolation.subject);
            let d = isolation.direction.index();
            if let Some(selector) = self.selectors.get_mut(sid) {
                selector.isolations[d].push(pid);
            }
            for member in self.members(sid) {
                if let Some(identity) = self.identities.get_mut(member) {
                    identity.isolating[d].push(pid);
                }
            }
            isolation_ids.push((sid, isolation.direction));
        }
        let mut rule_ids = Vec::with_capacity(rules.len());
        for (index, rule) in rules.into_iter().enumerate() {
            let subject = self.intern_selector(&rule.subject);
            let mut has_unjudgeable = false;
            let peers = match &rule.peers {
                Peers::Any => None,
                Peers::List(list) => Some(
                    list.iter()
                        .map(|p| match p {
                            Peer::Endpoints(s) => CompiledPeer::Endpoints(self.intern_selector(s)),
                            Peer::Cidr { net, except } => CompiledPeer::Cidr {
                                net: *net,
                                except: except.clone(),
                            },
                            Peer::ClusterExternalCidr { net, except } => {
                                CompiledPeer::ExternalCidr {
                                    net: *net,
                                    except: except.clone(),
                                }
                            }
                            Peer::Entity(e) => CompiledPeer::Entity(*e),
                            Peer::Unjudgeable(_) => {
                                has_unjudgeable = true;
                                CompiledPeer::Unjudgeable
                            }
                        })
                        .collect(),
                ),
            };
            let d = rule.direction.index();
            let rid = self.rules.insert(RuleEntry {
                policy: pid,
                index: u32::try_from(index).unwrap_or(u32::MAX),
                rule,
                subject,
                peers,
                has_unjudgeable,
            });
            if let Some(selector) = self.selectors.get_mut(subject) {
                selector.subject_rules.push(rid);
            }
            for member in self.members(subject) {
                let Some(identity) = self.identities.get_mut(member) else {
                    continue;
                };
                let mut list = std::mem::take(&mut identity.rules[d]);
                list.push(rid);
                self.order_rules(&mut list);
                if let Some(identity) = self.identities.get_mut(member) {
                    identity.rules[d] = list;
                }
            }
            rule_ids.push(rid);
        }
        if let Some(entry) = self.policies.get_mut(pid) {
            entry.rules = rule_ids;
            entry.isolations = isolation_ids;
        }
        self.changed();
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) {
        if self.unload_policy(key) {
            self.changed();
        }
    }

    fn unload_policy(&mut self, key: &PolicyKey) -> bool {
        self.unjudged.remove(key);
        self.unknown.remove(key);
        let Some(pid) = self.policy_ids.remove(key) else {
            return false;
        };
        let Some(entry) = self.policies.remove(pid) else {
            return false;
        };
        for (sid, direction) in entry.isolations {
            let d = direction.index();
            if let Some(selector) = self.selectors.get_mut(sid) {
                let isolations = &mut selector.isolations[d];
                if let Some(i) = isolations.iter().position(|p| *p == pid) {
                    isolations.swap_remove(i);
                }
            }
            for member in self.members(sid) {
                if let Some(identity) = self.identities.get_mut(member) {
                    let list = &mut identity.isolating[d];
                    if let Some(i) = list.iter().position(|p| *p == pid) {
                        list.swap_remove(i);
                    }
                }
            }
            self.release_selector(sid);
        }
        for rid in entry.rules {
            let Some(rule) = self.rules.remove(rid) else {
                continue;
            };
            let d = rule.rule.direction.index();
            for member in self.members(rule.subject) {
                if let Some(identity) = self.identities.get_mut(member) {
                    identity.rules[d].retain(|r| *r != rid);
                }
            }
            if let Some(selector) = self.selectors.get_mut(rule.subject) {
                selector.subject_rules.retain(|r| *r != rid);
            }
            self.release_selector(rule.subject);
            for peer in rule.peers.into_iter().flatten() {
                if let CompiledPeer::Endpoints(sid) = peer {
                    self.release_selector(sid);
                }
            }
        }
        true
    }

    /// Deny rules first, so a decision stops at the first allow; then by policy key and place
    /// in the policy, so which rule is named does not depend on the order of loading.
    fn order_rules(&self, list: &mut [RuleId]) {
        list.sort_by(|a, b| self.rule_order(*a).cmp(&self.rule_order(*b)));
    }

    fn rule_order(&self, rid: RuleId) -> (bool, Option<&PolicyKey>, u32) {
        match self.rules.get(rid) {
            Some(entry) => (
                entry.rule.action != Action::Deny,
                self.policies.get(entry.policy).map(|p| &p.key),
                entry.index,
            ),
            None => (true, None, u32::MAX),
        }
    }

    #[must_use]
    pub fn policy_count(&self) -> usize {
        self.policy_ids.len()
    }

    /// The loaded policies, in no particular order.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyKey> {
        self.policy_ids.keys()
    }

    /// Loaded policies per kind, every kind listed (zero included).
    #[must_use]
    pub fn count_by_kind(&self) -> Vec<(PolicyKind, usize)> {
        PolicyKind::ALL
            .iter()
            .map(|&kind| {
                let n = self.policy_ids.keys().filter(|k| k.kind == kind).count();
                (kind, n)
            })
            .collect()
    }

    /// Every rule of every loaded policy.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values().map(|entry| &entry.rule)
    }

    /// The rule behind an id, with its policy.
    #[must_use]
    pub fn rule(&self, id: RuleId) -> Option<(&PolicyKey, &Rule)> {
        let entry = self.rules.get(id)?;
        let policy = self.policies.get(entry.policy)?;
        Some((&policy.key, &entry.rule))
    }

    /// A rule as metrics and explanations name it.
    #[must_use]
    pub fn rule_ref(&self, id: RuleId) -> Option<RuleRef> {
        let (key, rule) = self.rule(id)?;
        let unjudgeable = match &rule.peers {
            Peers::List(list) => list.iter().find_map(|p| match p {
                Peer::Unjudgeable(u) => Some(u.to_string()),
                _ => None,
            }),
            Peers::Any => None,
        };
        Some(RuleRef {
            policy_kind: key.kind.as_str(),
            policy_namespace: key.namespace.clone(),
            policy_name: key.name.clone(),
            rule: rule.name.clone(),
            action: rule.action.as_str(),
            l7: rule.l7,
            unjudgeable,
        })
    }

    /// Every way a loaded policy can decide a flow, as (policy, direction, rule name, action):
    /// each of its rules, and a `default_deny` named entry per direction it isolates. The
    /// daemon exposes a zero-valued hit series for each, so rules nothing used show up.
    pub fn rule_names<'a>(
        &'a self,
        default_deny: &'a str,
    ) -> impl Iterator<Item = (&'a PolicyKey, Direction, &'a str, Action)> + 'a {
        self.policies.values().flat_map(move |policy| {
            let rules = policy.rules.iter().filter_map(|rid| {
                let entry = self.rules.get(*rid)?;
                Some((
                    &policy.key,
                    entry.rule.direction,
                    entry.rule.name.as_str(),
                    entry.rule.action,
                ))
            });
            let mut directions: Vec<Direction> =
                policy.isolations.iter().map(|(_, d)| *d).collect();
            directions.sort_by_key(|d| d.index());
            directions.dedup();
            let isolations = directions
                .into_iter()
                .map(move |d| (&policy.key, d, default_deny, Action::Deny));
            rules.chain(isolations)
        })
    }

    /// Parts of loaded policies that are not judged (Cilium host policies), by policy.
    pub fn unjudged_policies(&self) -> impl Iterator<Item = (&PolicyKey, &[String])> {
        self.unjudged
            .iter()
            .map(|(key, what)| (key, what.as_slice()))
    }

    /// Fields of a loaded policy that this version does not know (kept, not judged).
    #[must_use]
    pub fn unknown_fields(&self, key: &PolicyKey) -> &[String] {
        self.unknown.get(key).map_or(&[], Vec::as_slice)
    }

    /// The policies that isolate an identity in `direction`, sorted. Kept per identity, as this
    /// runs for every default-denied flow.
    #[must_use]
    pub fn isolating_policies(
        &self,
        identity: IdentityId,
        direction: Direction,
    ) -> Vec<&PolicyKey> {
        let Some(subject) = self.identities.get(identity) else {
            return Vec::new();
        };
        let mut out: Vec<&PolicyKey> = subject.isolating[direction.index()]
            .iter()
            .filter_map(|pid| self.policies.get(*pid).map(|p| &p.key))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}
