//! The sources: what reads the world and tells the stores what changed. The Kubernetes API
//! ([`kube`]), snapshot files and policy directories ([`files`], read through [`load`] and found
//! by [`manifest`]) all emit the same typed [`Change`]s, converted by the same code ([`kinds`]:
//! inventory kinds here, policy kinds through the policy store's kind table), plus news about
//! themselves ([`Update`]). `check` and the daemon drive the same sources.

pub mod files;
pub mod kinds;
pub mod kube;
pub mod load;
pub mod manifest;
#[cfg(test)]
#[path = "../../tests/common/tempdir.rs"]
mod tempdir;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, SystemTime};

use crate::inventory::{EndpointSlice, Namespace, Node, Pod, Service};
use crate::policy::ir::{CompiledPolicy, PolicyKey, PolicyKind};
use crate::vocab::ObjectKey;

/// A kind of object a source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    /// Every policy kind of [`crate::policy::kinds::POLICY_KINDS`].
    Policy(PolicyKind),
}

impl Kind {
    /// The inventory kinds, in the order a snapshot is applied (namespaces first, so identities
    /// see their labels at once; nodes next, for the address index).
    pub const INVENTORY: [Self; 5] = [
        Self::Namespace,
        Self::Node,
        Self::Pod,
        Self::Service,
        Self::EndpointSlice,
    ];

    /// Every kind: the inventory kinds, then every policy kind.
    pub fn all() -> impl Iterator<Item = Self> {
        Self::INVENTORY
            .into_iter()
            .chain(PolicyKind::ALL.into_iter().map(Self::Policy))
    }

    /// The Kubernetes `kind`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Node => "Node",
            Self::Pod => "Pod",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Policy(kind) => kind.as_str(),
        }
    }

    /// `(group, version, resource)`: what the watch lists and the RBAC must grant.
    #[must_use]
    pub fn resource(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Namespace => ("", "v1", "namespaces"),
            Self::Node => ("", "v1", "nodes"),
            Self::Pod => ("", "v1", "pods"),
            Self::Service => ("", "v1", "services"),
            Self::EndpointSlice => ("discovery.k8s.io", "v1", "endpointslices"),
            Self::Policy(kind) => {
                let info = kind.info();
                (info.group, info.version, info.plural)
            }
        }
    }

    /// Part of the intended model: left out when `--policies DIR` replaces it.
    #[must_use]
    pub const fn is_policy(self) -> bool {
        matches!(self, Self::Policy(_))
    }

    #[must_use]
    pub const fn policy_kind(self) -> Option<PolicyKind> {
        match self {
            Self::Policy(kind) => Some(kind),
            _ => None,
        }
    }

    /// Defined by a CRD that a cluster may not have.
    #[must_use]
    pub fn is_optional(self) -> bool {
        self.policy_kind().is_some_and(|k| k.info().optional)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exactly the API resources the Kubernetes source lists and watches, as `(group, version,
/// resource)`: the read-only RBAC in `deploy/` must grant `list` and `watch` on each (the core
/// group is `""`).
#[must_use]
pub fn watched_resources() -> Vec<(&'static str, &'static str, &'static str)> {
    Kind::all().map(Kind::resource).collect()
}

/// One change of what the stores hold.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Namespace(Namespace),
    NamespaceRemoved(String),
    Pod(Pod),
    PodRemoved(ObjectKey),
    Node(Node),
    NodeRemoved(String),
    Service(Service),
    ServiceRemoved(ObjectKey),
    EndpointSlice(EndpointSlice),
    EndpointSliceRemoved(ObjectKey),
    Policy(CompiledPolicy),
    PolicyRemoved(PolicyKey),
}

/// What a change is about: the object it adds, replaces or removes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangeKey {
    Namespace(String),
    Node(String),
    Pod(ObjectKey),
    Service(ObjectKey),
    EndpointSlice(ObjectKey),
    Policy(PolicyKey),
}

impl Change {
    /// The object the change is about.
    #[must_use]
    pub fn key(&self) -> ChangeKey {
        match self {
            Self::Namespace(o) => ChangeKey::Namespace(o.name.clone()),
            Self::NamespaceRemoved(name) => ChangeKey::Namespace(name.clone()),
            Self::Pod(o) => ChangeKey::Pod(o.key()),
            Self::PodRemoved(key) => ChangeKey::Pod(key.clone()),
            Self::Node(o) => ChangeKey::Node(o.name.clone()),
            Self::NodeRemoved(name) => ChangeKey::Node(name.clone()),
            Self::Service(o) => ChangeKey::Service(o.key()),
            Self::ServiceRemoved(key) => ChangeKey::Service(key.clone()),
            Self::EndpointSlice(o) => ChangeKey::EndpointSlice(o.key()),
            Self::EndpointSliceRemoved(key) => ChangeKey::EndpointSlice(key.clone()),
            Self::Policy(p) => ChangeKey::Policy(p.key.clone()),
            Self::PolicyRemoved(key) => ChangeKey::Policy(key.clone()),
        }
    }

    /// Whether it removes its object.
    #[must_use]
    pub const fn is_removal(&self) -> bool {
        matches!(
            self,
            Self::NamespaceRemoved(_)
                | Self::PodRemoved(_)
                | Self::NodeRemoved(_)
                | Self::ServiceRemoved(_)
                | Self::EndpointSliceRemoved(_)
                | Self::PolicyRemoved(_)
        )
    }

    /// The order a batch of changes is applied in: namespaces, nodes, the rest of the
    /// inventory, then policies (correct in any order, cheaper in this one).
    #[must_use]
    pub fn rank(&self) -> u8 {
        match self.key() {
            ChangeKey::Namespace(_) => 0,
            ChangeKey::Node(_) => 1,
            ChangeKey::Pod(_) | ChangeKey::Service(_) | ChangeKey::EndpointSlice(_) => 2,
            ChangeKey::Policy(_) => 3,
        }
    }
}

impl ChangeKey {
    /// The change that removes this object.
    #[must_use]
    pub fn removal(self) -> Change {
        match self {
            Self::Namespace(name) => Change::NamespaceRemoved(name),
            Self::Node(name) => Change::NodeRemoved(name),
            Self::Pod(key) => Change::PodRemoved(key),
            Self::Service(key) => Change::ServiceRemoved(key),
            Self::EndpointSlice(key) => Change::EndpointSliceRemoved(key),
            Self::Policy(key) => Change::PolicyRemoved(key),
        }
    }

    /// The key of an object of `kind` named `key` (cluster-scoped kinds: empty namespace).
    #[must_use]
    pub fn of(kind: Kind, key: &ObjectKey) -> Self {
        match kind {
            Kind::Namespace => Self::Namespace(key.name.clone()),
            Kind::Node => Self::Node(key.name.clone()),
            Kind::Pod => Self::Pod(key.clone()),
            Kind::Service => Self::Service(key.clone()),
            Kind::EndpointSlice => Self::EndpointSlice(key.clone()),
            Kind::Policy(kind) => Self::Policy(PolicyKey {
                kind,
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            }),
        }
    }
}

/// Which set of watched files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// `--cluster` snapshot paths.
    Cluster,
    /// The `--policies` path.
    Policies,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cluster => "cluster snapshot",
            Self::Policies => "policies",
        })
    }
}

/// A change, or news about a source.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    Change(Change),
    /// A (re)list of the kind is complete: the stores hold what the API holds.
    Synced(Kind),
    /// The kind's API does not exist (a CRD not installed): nothing of it is held, and the API
    /// is looked at again now and then.
    NotInstalled(Kind),
    /// An object that cannot be used; its last good version, if any, stays.
    Rejected {
        kind: Kind,
        /// `namespace/name` or `name`.
        object: String,
        reason: String,
    },
    /// A rejected object is usable again, or gone: its rejection no longer stands.
    Cleared {
        kind: Kind,
        object: String,
    },
    /// The API cannot be reached for the kind since `since`; the stores keep what they had.
    Stale {
        kind: Kind,
        since: SystemTime,
        error: String,
    },
    /// The kind is in contact with the API again.
    Fresh(Kind),
    /// Watched files were (re)loaded: `errors` is what is wrong with them now, empty when they
    /// loaded (a bad file keeps the last good version of everything).
    Files {
        origin: Origin,
        errors: Vec<String>,
    },
}

impl Update {
    /// The change it carries, if it is one.
    #[must_use]
    pub fn into_change(self) -> Option<Change> {
        match self {
            Self::Change(change) => Some(change),
            _ => None,
        }
    }
}

/// What the sources tell about themselves (`/readyz`, the inventory staleness gauge, the
/// policy-errors gauge), kept current by passing it every update.
#[derive(Clone, Debug, Default)]
pub struct SourceStatus {
    expected: BTreeSet<Kind>,
    synced: BTreeSet<Kind>,
    not_installed: BTreeSet<Kind>,
    stale: BTreeMap<Kind, SystemTime>,
    /// Objects rejected now, with why.
    rejected: BTreeMap<(Kind, String), String>,
    /// What is wrong with watched files now.
    file_errors: BTreeMap<Origin, Vec<String>>,
}

impl SourceStatus {
    /// For a source watching `kinds` (see [`kube::KubeSource::kinds`]); file sources expect none.
    #[must_use]
    pub fn new(kinds: &[Kind]) -> Self {
        Self {
            expected: kinds.iter().copied().collect(),
            ..Self::default()
        }
    }

    pub fn observe(&mut self, update: &Update) {
        match update {
            Update::Synced(kind) => {
                self.synced.insert(*kind);
                self.not_installed.remove(kind);
            }
            Update::NotInstalled(kind) => {
                self.not_installed.insert(*kind);
                self.synced.remove(kind);
            }
            Update::Stale { kind, since, .. } => {
                self.stale.entry(*kind).or_insert(*since);
            }
            Update::Fresh(kind) => {
                self.stale.remove(kind);
            }
            Update::Rejected {
                kind,
                object,
                reason,
            } => {
                self.rejected
                    .insert((*kind, object.clone()), reason.clone());
            }
            Update::Cleared { kind, object } => {
                self.rejected.remove(&(*kind, object.clone()));
            }
            Update::Files { origin, errors } => {
                if errors.is_empty() {
                    self.file_errors.remove(origin);
                } else {
                    self.file_errors.insert(*origin, errors.clone());
                }
            }
            Update::Change(_) => {}
        }
    }

    /// Every watched kind has been listed at least once (or is known not to exist).
    #[must_use]
    pub fn synced(&self) -> bool {
        self.expected
            .iter()
            .all(|k| self.synced.contains(k) || self.not_installed.contains(k))
    }

    #[must_use]
    pub fn is_synced(&self, kind: Kind) -> bool {
        self.synced.contains(&kind)
    }

    #[must_use]
    pub fn is_not_installed(&self, kind: Kind) -> bool {
        self.not_installed.contains(&kind)
    }

    /// Since when the oldest outage lasts, `None` when every kind is in contact with the API.
    #[must_use]
    pub fn stale_since(&self) -> Option<SystemTime> {
        self.stale.values().min().copied()
    }

    /// How out of date the stores may be: zero while every watch is in contact.
    #[must_use]
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.stale_since()
            .and_then(|since| now.duration_since(since).ok())
            .unwrap_or_default()
    }

    /// What cannot be used now: rejected objects and errors in watched files. Zero again once
    /// each is fixed or deleted.
    #[must_use]
    pub fn problems(&self) -> usize {
        self.rejected.len() + self.file_errors.values().map(Vec::len).sum::<usize>()
    }

    /// Objects rejected now, with why.
    pub fn rejected(&self) -> impl Iterator<Item = (Kind, &str, &str)> {
        self.rejected
            .iter()
            .map(|((kind, object), reason)| (*kind, object.as_str(), reason.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_resource_and_policies_come_from_the_table() {
        let resources = watched_resources();
        assert_eq!(
            resources.len(),
            Kind::INVENTORY.len() + PolicyKind::ALL.len()
        );
        let policies: Vec<Kind> = Kind::all().filter(|k| k.is_policy()).collect();
        assert_eq!(
            policies,
            PolicyKind::ALL.map(Kind::Policy).to_vec(),
            "policy kinds in table order"
        );
        assert_eq!(
            Kind::Policy(PolicyKind::NetworkPolicy).resource(),
            ("networking.k8s.io", "v1", "networkpolicies")
        );
        assert!(Kind::Policy(PolicyKind::CiliumNetworkPolicy).is_optional());
        assert!(!Kind::Pod.is_optional());
    }

    #[test]
    fn status_is_ready_when_every_kind_is_synced_or_missing() {
        let cnp = Kind::Policy(PolicyKind::CiliumNetworkPolicy);
        let mut status = SourceStatus::new(&[Kind::Pod, cnp]);
        assert!(!status.synced());
        status.observe(&Update::Synced(Kind::Pod));
        assert!(!status.synced());
        status.observe(&Update::NotInstalled(cnp));
        assert!(status.synced());
        assert!(status.is_not_installed(cnp));
    }

    #[test]
    fn staleness_counts_from_the_oldest_outage_until_every_kind_is_fresh() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut status = SourceStatus::new(&[Kind::Pod, Kind::Node]);
        let stale = |kind, secs| Update::Stale {
            kind,
            since: t0 + Duration::from_secs(secs),
            error: "connection refused".to_owned(),
        };
        status.observe(&stale(Kind::Pod, 0));
        status.observe(&stale(Kind::Node, 5));
        // A repeated report does not move the start of the outage.
        status.observe(&stale(Kind::Pod, 8));
        assert_eq!(
            status.staleness(t0 + Duration::from_secs(10)),
            Duration::from_secs(10)
        );
        status.observe(&Update::Fresh(Kind::Pod));
        assert_eq!(
            status.staleness(t0 + Duration::from_secs(10)),
            Duration::from_secs(5)
        );
        status.observe(&Update::Fresh(Kind::Node));
        assert_eq!(status.stale_since(), None);
        assert_eq!(status.staleness(t0), Duration::ZERO);
    }

    #[test]
    fn problems_are_what_is_wrong_now() {
        let np = Kind::Policy(PolicyKind::NetworkPolicy);
        let mut status = SourceStatus::default();
        let reject = |object: &str| Update::Rejected {
            kind: np,
            object: object.to_owned(),
            reason: "bad CIDR".to_owned(),
        };
        status.observe(&reject("a/x"));
        status.observe(&reject("a/x"));
        status.observe(&reject("a/y"));
        status.observe(&Update::Files {
            origin: Origin::Policies,
            errors: vec!["p.yaml:3: broken".to_owned()],
        });
        assert_eq!(status.problems(), 3, "a repeated rejection counts once");
        status.observe(&Update::Cleared {
            kind: np,
            object: "a/x".to_owned(),
        });
        status.observe(&Update::Files {
            origin: Origin::Policies,
            errors: Vec::new(),
        });
        assert_eq!(status.problems(), 1);
        assert_eq!(
            status.rejected().collect::<Vec<_>>(),
            [(np, "a/y", "bad CIDR")]
        );
    }

    #[test]
    fn removals_name_the_objects() {
        let key = ObjectKey::new("ns", "x");
        assert_eq!(
            ChangeKey::of(Kind::Pod, &key).removal(),
            Change::PodRemoved(key.clone())
        );
        assert_eq!(
            ChangeKey::of(
                Kind::Policy(PolicyKind::CiliumClusterwideNetworkPolicy),
                &ObjectKey::new("", "cw")
            )
            .removal(),
            Change::PolicyRemoved(PolicyKey {
                kind: PolicyKind::CiliumClusterwideNetworkPolicy,
                namespace: String::new(),
                name: "cw".to_owned(),
            })
        );
        assert_eq!(
            ChangeKey::of(Kind::Node, &ObjectKey::new("", "n1")).removal(),
            Change::NodeRemoved("n1".to_owned())
        );
    }
}
