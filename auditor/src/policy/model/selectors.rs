//! Selectors, interned: every distinct subject or peer selector of the loaded policies exists
//! once, counted by the rules and isolations that use it, and knows the identities it matches
//! as a bitset over identity ids. Selectors scoped to one namespace are indexed by it, so a new
//! identity is tested only against those that can match it.

use std::collections::HashMap;

use fixedbitset::FixedBitSet;
use slab::Slab;

use super::{Model, PolicyId, RuleId};
use crate::policy::ir::{NamespaceScope, Subject};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct SelectorId(u32);

impl SelectorId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Clone, Debug)]
pub(super) struct SelectorEntry {
    pub subject: Subject,
    /// The identities it matches, by identity id.
    pub members: FixedBitSet,
    /// Rules and isolations using it.
    refs: u32,
    /// Rules that have this selector as their subject.
    pub subject_rules: Vec<RuleId>,
    /// Policies isolating with this selector, per direction (a policy once per isolation), so
    /// the policies isolating a pod are found from its selectors, not by scanning them all.
    pub isolations: [Vec<PolicyId>; 2],
}

#[derive(Clone, Debug, Default)]
pub(super) struct Selectors {
    slab: Slab<SelectorEntry>,
    ids: HashMap<Subject, SelectorId>,
    by_namespace: HashMap<String, Vec<SelectorId>>,
    global: Vec<SelectorId>,
}

/// The one namespace a selector is confined to, if it is.
fn scope_namespace(subject: &Subject) -> Option<&str> {
    match &subject.namespaces {
        NamespaceScope::Named(n) | NamespaceScope::NamedAndSelector(n, _) => Some(n),
        NamespaceScope::All | NamespaceScope::Selector(_) => None,
    }
}

impl Selectors {
    pub fn get(&self, id: SelectorId) -> Option<&SelectorEntry> {
        self.slab.get(id.index())
    }

    pub fn get_mut(&mut self, id: SelectorId) -> Option<&mut SelectorEntry> {
        self.slab.get_mut(id.index())
    }

    /// Whether the selector matches the identity at `identity` (an identity id's index).
    pub fn matches(&self, id: SelectorId, identity: usize) -> bool {
        self.get(id).is_some_and(|s| s.members.contains(identity))
    }

    /// The selectors that can match an identity of `namespace`.
    pub fn candidates(&self, namespace: &str) -> Vec<SelectorId> {
        self.by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .chain(self.global.iter())
            .copied()
            .collect()
    }

    /// Selectors in use.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn shrink_to_fit(&mut self) {
        self.slab.shrink_to_fit();
        self.ids.shrink_to_fit();
        self.by_namespace.shrink_to_fit();
        self.global.shrink_to_fit();
    }
}

impl Model {
    /// The selector for `subject`, one more use of it; a new one is matched against every
    /// identity it can select.
    pub(super) fn intern_selector(&mut self, subject: &Subject) -> SelectorId {
        if let Some(&sid) = self.selectors.ids.get(subject) {
            if let Some(selector) = self.selectors.get_mut(sid) {
                selector.refs += 1;
            }
            return sid;
        }
        let mut members = FixedBitSet::new();
        let scoped: Vec<(&str, &[super::IdentityId])> = match scope_namespace(subject) {
            Some(ns) => vec![(ns, self.identities.in_namespace(ns))],
            None => self.identities.namespaces().collect(),
        };
        for (namespace, ids) in scoped {
            if ids.is_empty() {
                continue;
            }
            let labels = self.identities.labels_of(namespace);
            if !subject.namespaces.matches(namespace, &labels) {
                continue;
            }
            for id in ids {
                if let Some(identity) = self.identities.get(*id)
                    && subject.pods.matches(&identity.key.labels)
                {
                    members.grow_and_insert(id.index());
                }
            }
        }
        let index = self.selectors.slab.insert(SelectorEntry {
            subject: subject.clone(),
            members,
            refs: 1,
            subject_rules: Vec::new(),
            isolations: [Vec::new(), Vec::new()],
        });
        let sid = SelectorId(u32::try_from(index).unwrap_or(u32::MAX));
        self.selectors.ids.insert(subject.clone(), sid);
        match scope_namespace(subject) {
            Some(ns) => self
                .selectors
                .by_namespace
                .entry(ns.to_owned())
                .or_default()
                .push(sid),
            None => self.selectors.global.push(sid),
        }
        sid
    }

    /// One use fewer of a selector; the last one takes it away.
    pub(super) fn release_selector(&mut self, sid: SelectorId) {
        let Some(selector) = self.selectors.get_mut(sid) else {
            return;
        };
        selector.refs = selector.refs.saturating_sub(1);
        if selector.refs > 0 {
            return;
        }
        let selector = self.selectors.slab.remove(sid.index());
        self.selectors.ids.remove(&selector.subject);
        match scope_namespace(&selector.subject) {
            Some(ns) => {
                if let Some(list) = self.selectors.by_namespace.get_mut(ns) {
                    list.retain(|s| *s != sid);
                    if list.is_empty() {
                        self.selectors.by_namespace.remove(ns);
                    }
                }
            }
            None => self.selectors.global.retain(|s| *s != sid),
        }
    }
}
