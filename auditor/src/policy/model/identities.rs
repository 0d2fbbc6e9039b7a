//! Identities: the pods of one namespace with the same labels and declared ports are one
//! identity, counted, so ten replicas cost one entry. Each identity keeps the rules whose subject
//! selects it and the policies isolating it, per direction; namespace labels are kept here too,
//! since namespace selectors match on them.

use std::collections::HashMap;

use slab::Slab;

use super::{Model, PolicyId, RuleId, SelectorId};
use crate::vocab::{ContainerPort, Labels, NAMESPACE_NAME_LABEL};

/// An identity while it has pods. Ids are reused once the last pod of an identity is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityId(pub(super) u32);

impl IdentityId {
    pub(super) fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct IdentityKey {
    pub namespace: String,
    pub labels: Labels,
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug)]
pub(super) struct Identity {
    pub key: IdentityKey,
    /// Pods holding it.
    pub pods: u32,
    /// Rules whose subject selects it, per direction, in the order they are tried.
    pub rules: [Vec<RuleId>; 2],
    /// The policies isolating it, per direction (a policy once per isolation that selects
    /// it): the default-deny rule hits of its flows.
    pub isolating: [Vec<PolicyId>; 2],
}

#[derive(Clone, Debug, Default)]
pub(super) struct Identities {
    slab: Slab<Identity>,
    ids: HashMap<IdentityKey, IdentityId>,
    by_namespace: HashMap<String, Vec<IdentityId>>,
    /// Labels of namespaces that have identities or were given labels, with their name label.
    namespace_labels: HashMap<String, Labels>,
}

impl Identities {
    pub fn get(&self, id: IdentityId) -> Option<&Identity> {
        self.slab.get(id.index())
    }

    pub fn get_mut(&mut self, id: IdentityId) -> Option<&mut Identity> {
        self.slab.get_mut(id.index())
    }

    pub fn in_namespace(&self, namespace: &str) -> &[IdentityId] {
        self.by_namespace.get(namespace).map_or(&[], Vec::as_slice)
    }

    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &[IdentityId])> {
        self.by_namespace
            .iter()
            .map(|(ns, ids)| (ns.as_str(), ids.as_slice()))
    }

    /// A namespace's labels; one never described has its name label, as the API server gives.
    pub fn labels_of(&self, namespace: &str) -> Labels {
        self.namespace_labels
            .get(namespace)
            .cloned()
            .unwrap_or_else(|| Labels::from([(NAMESPACE_NAME_LABEL, namespace)]))
    }

    pub fn shrink_to_fit(&mut self) {
        self.slab.shrink_to_fit();
        self.ids.shrink_to_fit();
        self.by_namespace.shrink_to_fit();
        self.namespace_labels.shrink_to_fit();
    }
}

impl Model {
    /// One more pod of the identity (namespace, labels, ports), created (and matched against
    /// every selector that can select it) when it is new.
    pub fn acquire_identity(
        &mut self,
        namespace: String,
        labels: Labels,
        ports: Vec<ContainerPort>,
    ) -> IdentityId {
        let key = IdentityKey {
            namespace,
            labels,
            ports,
        };
        if let Some(&id) = self.identities.ids.get(&key) {
            if let Some(identity) = self.identities.get_mut(id) {
                identity.pods += 1;
            }
            return id;
        }
        let namespace = key.namespace.clone();
        let index = self.identities.slab.insert(Identity {
            key: key.clone(),
            pods: 1,
            rules: [Vec::new(), Vec::new()],
            isolating: [Vec::new(), Vec::new()],
        });
        let id = IdentityId(u32::try_from(index).unwrap_or(u32::MAX));
        self.identities.ids.insert(key, id);
        self.identities
            .by_namespace
            .entry(namespace)
            .or_default()
            .push(id);
        self.attach_identity(id);
        self.changed();
        id
    }

    /// One pod fewer of an identity; the last one takes it away.
    pub fn release_identity(&mut self, id: IdentityId) {
        let Some(identity) = self.identities.slab.get_mut(id.index()) else {
            return;
        };
        identity.pods = identity.pods.saturating_sub(1);
        if identity.pods > 0 {
            return;
        }
        self.detach_identity(id);
        let identity = self.identities.slab.remove(id.index());
        self.identities.ids.remove(&identity.key);
        let namespace = &identity.key.namespace;
        if let Some(ids) = self.identities.by_namespace.get_mut(namespace) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.identities.by_namespace.remove(namespace);
            }
        }
        self.changed();
    }

    /// A namespace's labels (its name label included) changed, or it was deleted (`labels` are
    /// then those it is left with: its name label). Every identity of it is matched again.
    pub fn set_namespace_labels(&mut self, namespace: &str, labels: Labels) {
        if self.identities.namespace_labels.get(namespace) == Some(&labels) {
            return;
        }
        self.identities
            .namespace_labels
            .insert(namespace.to_owned(), labels);
        let ids = self.identities.in_namespace(namespace).to_vec();
        for id in ids {
            self.detach_identity(id);
            self.attach_identity(id);
        }
        self.changed();
    }

    /// The ports an identity's pods declare (for named ports).
    #[must_use]
    pub fn identity_ports(&self, id: IdentityId) -> &[ContainerPort] {
        self.identities
            .get(id)
            .map_or(&[], |identity| identity.key.ports.as_slice())
    }

    /// Tests the identity against every selector that can match it and takes on their rules
    /// and isolations.
    pub(super) fn attach_identity(&mut self, id: IdentityId) {
        let Some(identity) = self.identities.get(id) else {
            return;
        };
        let namespace = identity.key.namespace.clone();
        let ns_labels = self.identities.labels_of(&namespace);
        let mut rules: [Vec<RuleId>; 2] = [Vec::new(), Vec::new()];
        let mut isolating: [Vec<PolicyId>; 2] = [Vec::new(), Vec::new()];
        for sid in self.selectors.candidates(&namespace) {
            let Some(labels) = self.identities.get(id).map(|i| &i.key.labels) else {
                return;
            };
            let Some(selector) = self.selectors.get_mut(sid) else {
                continue;
            };
            if !selector.subject.matches(&namespace, &ns_labels, labels) {
                continue;
            }
            selector.members.grow_and_insert(id.index());
            for (into, from) in isolating.iter_mut().zip(&selector.isolations) {
                into.extend_from_slice(from);
            }
            for &rid in &selector.subject_rules {
                if let Some(entry) = self.rules.get(rid) {
                    rules[entry.rule.direction.index()].push(rid);
                }
            }
        }
        for list in &mut rules {
            self.order_rules(list);
        }
        if let Some(identity) = self.identities.get_mut(id) {
            identity.rules = rules;
            identity.isolating = isolating;
        }
    }

    pub(super) fn detach_identity(&mut self, id: IdentityId) {
        let Some(identity) = self.identities.get(id) else {
            return;
        };
        let namespace = identity.key.namespace.clone();
        for sid in self.selectors.candidates(&namespace) {
            if let Some(selector) = self.selectors.get_mut(sid)
                && selector.members.contains(id.index())
            {
                selector.members.set(id.index(), false);
            }
        }
        if let Some(identity) = self.identities.get_mut(id) {
            identity.rules = [Vec::new(), Vec::new()];
            identity.isolating = [Vec::new(), Vec::new()];
        }
    }

    /// The identities a selector matches now.
    pub(super) fn members(&self, sid: SelectorId) -> Vec<IdentityId> {
        self.selectors.get(sid).map_or_else(Vec::new, |selector| {
            selector
                .members
                .ones()
                .filter_map(|i| u32::try_from(i).ok().map(IdentityId))
                .collect()
        })
    }
}
