//! Snapshot files and policy directories as a watched source: loaded at start (any error is bad
//! input then), polled for changes afterwards on a thread of their own (parsing a large snapshot
//! must never stall the pipeline that drains the ring buffer), and turned into the changes since
//! the last good load. A load with a bad file changes nothing and says what is wrong until the
//! file is fixed.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::load::{self, LoadError, Located, Select};
use super::manifest::{Fingerprint, manifests};
use super::{Change, ChangeKey, Origin, Update};
use crate::decode::Strictness;

/// Files under some paths, and what of them the stores were last told.
#[derive(Debug)]
pub struct FileSource {
    origin: Origin,
    paths: Vec<PathBuf>,
    select: Select,
    print: Fingerprint,
    /// A hash of every object last reported, by key: a reload reports only what differs.
    known: HashMap<ChangeKey, u64>,
    hasher: foldhash::fast::FixedState,
}

/// A hash of the object a change adds (removals have none).
fn content_hash(hasher: &impl BuildHasher, change: &Change) -> Option<u64> {
    Some(match change {
        Change::Namespace(o) => hasher.hash_one(o),
        Change::Pod(o) => hasher.hash_one(o),
        Change::Node(o) => hasher.hash_one(o),
        Change::Service(o) => hasher.hash_one(o),
        Change::EndpointSlice(o) => hasher.hash_one(o),
        Change::Policy(o) => hasher.hash_one(o),
        Change::NamespaceRemoved(_)
        | Change::PodRemoved(_)
        | Change::NodeRemoved(_)
        | Change::ServiceRemoved(_)
        | Change::EndpointSliceRemoved(_)
        | Change::PolicyRemoved(_) => return None,
    })
}

impl FileSource {
    /// The objects `select` picks under `paths`, read strictly (hand-written files).
    #[must_use]
    pub fn new(origin: Origin, paths: Vec<PathBuf>, select: Select) -> Self {
        Self {
            origin,
            paths,
            select,
            print: Fingerprint::default(),
            known: HashMap::new(),
            hasher: foldhash::fast::FixedState::default(),
        }
    }

    #[must_use]
    pub const fn origin(&self) -> Origin {
        self.origin
    }

    /// Objects last reported.
    #[must_use]
    pub fn len(&self) -> usize {
        self.known.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Loads every file now and returns the changes since the last good load (everything, the
    /// first time), in the order they should be applied.
    ///
    /// # Errors
    /// Every file that cannot be read, parsed or converted (one error per file); nothing is
    /// reported then and the last good load stands.
    pub fn load(&mut self) -> Result<Vec<Change>, Vec<LoadError>> {
        self.print = Fingerprint::of(&self.paths);
        let mut located: Vec<Located> = Vec::new();
        let mut errors = Vec::new();
        for path in &self.paths {
            match manifests(path) {
                Ok(files) => {
                    for file in files {
                        match load::load_file(&file, self.select, Strictness::Strict) {
                            Ok(items) => located.extend(items),
                            Err(e) => errors.push(e),
                        }
                    }
                }
                Err(e) => errors.push(e.into()),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Of an object given twice, the last one wins, as applying them in turn would do.
        let mut now: HashMap<ChangeKey, (u64, Change)> = HashMap::with_capacity(located.len());
        for Located { change, .. } in located {
            let key = change.key();
            match content_hash(&self.hasher, &change) {
                Some(hash) => {
                    now.insert(key, (hash, change));
                }
                // A removal in a snapshot (a finished pod) means: not there.
                None => {
                    now.remove(&key);
                }
            }
        }
        let mut changes: Vec<Change> = Vec::new();
        let mut removed: Vec<Change> = self
            .known
            .keys()
            .filter(|key| !now.contains_key(*key))
            .cloned()
            .map(ChangeKey::removal)
            .collect();
        let mut known = HashMap::with_capacity(now.len());
        for (key, (hash, change)) in now {
            if self.known.get(&key) != Some(&hash) {
                changes.push(change);
            }
            known.insert(key, hash);
        }
        self.known = known;
        changes.sort_by_key(|c| (c.rank(), c.key()));
        // Removals last, policies first and namespaces last.
        removed.sort_by_key(|c| (std::cmp::Reverse(c.rank()), c.key()));
        changes.extend(removed);
        Ok(changes)
    }

    /// Whether the files changed since the last load (or load attempt).
    #[must_use]
    pub fn changed(&self) -> bool {
        Fingerprint::of(&self.paths) != self.print
    }

    /// Loads again if the files changed: the updates to send (the changes, then what is wrong
    /// with the files now), or `None` when nothing changed.
    pub fn poll(&mut self) -> Option<Vec<Update>> {
        if !self.changed() {
            return None;
        }
        Some(match self.load() {
            Ok(changes) => {
                let mut updates: Vec<Update> = changes.into_iter().map(Update::Change).collect();
                updates.push(Update::Files {
                    origin: self.origin,
                    errors: Vec::new(),
                });
                updates
            }
            Err(errors) => vec![Update::Files {
                origin: self.origin,
                errors: errors.iter().map(ToString::to_string).collect(),
            }],
        })
    }

    /// Polls every `every` on a thread of its own, sending what changed to `tx`, until the
    /// returned handle is dropped or the receiver is.
    #[must_use]
    pub fn watch(mut self, tx: mpsc::Sender<Update>, every: Duration) -> Watching {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let origin = self.origin;
        let spawned = std::thread::Builder::new()
            .name(format!("watch {origin}"))
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    let Some(updates) = self.poll() else {
                        continue;
                    };
                    for update in updates {
                        if tx.blocking_send(update).is_err() {
                            return;
                        }
                    }
                }
            });
        if let Err(error) = &spawned {
            tracing::error!(%error, %origin, "cannot watch the files; changes will not be seen");
        }
        Watching { stop }
    }
}

/// A running file watch; dropping it stops the thread at its next poll.
#[derive(Debug)]
pub struct Watching {
    stop: Arc<AtomicBool>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ir::PolicyKind;
    use crate::source::tempdir::TempDir;

    const NETPOL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
        metadata: {name: deny-all, namespace: web}\nspec: {podSelector: {}}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: web}\n\
        status: {podIP: 10.0.0.1}\n";

    fn keys(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| format!("{}{:?}", if c.is_removal() { "-" } else { "+" }, c.key()))
            .collect()
    }

    #[test]
    fn reloads_report_only_what_changed() {
        let dir = TempDir::new("diff");
        dir.write("a.yaml", NETPOL);
        dir.write("b.yaml", POD);
        let mut source = FileSource::new(Origin::Cluster, vec![dir.0.clone()], Select::ALL);
        let first = source.load().unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(first.len(), 2, "{:?}", keys(&first));
        assert!(matches!(first[0], Change::Pod(_)), "inventory first");
        assert!(source.poll().is_none(), "nothing changed");
        std::fs::remove_file(dir.0.join("b.yaml")).unwrap_or_else(|e| panic!("{e}"));
        dir.write(
            "a.yaml",
            &NETPOL.replace("{podSelector: {}}", "{podSelector: {matchLabels: {a: b}}}"),
        );
        let updates = source.poll().unwrap_or_else(|| panic!("changes not seen"));
        let changes: Vec<Change> = updates
            .iter()
            .cloned()
            .filter_map(Update::into_change)
            .collect();
        assert_eq!(
            keys(&changes),
            [
                "+Policy(PolicyKey { kind: NetworkPolicy, namespace: \"web\", name: \"deny-all\" })",
                "-Pod(ObjectKey { namespace: \"web\", name: \"p\" })"
            ]
        );
        assert_eq!(
            updates.last(),
            Some(&Update::Files {
                origin: Origin::Cluster,
                errors: Vec::new()
            })
        );
    }

    #[test]
    fn a_bad_file_changes_nothing_and_says_so_until_fixed() {
        let dir = TempDir::new("bad");
        dir.write("good.yaml", NETPOL);
        let mut source = FileSource::new(Origin::Policies, vec![dir.0.clone()], Select::POLICIES);
        let first = source.load().unwrap_or_else(|e| panic!("{e:?}"));
        assert!(
            matches!(&first[..], [Change::Policy(p)] if p.key.kind == PolicyKind::NetworkPolicy)
        );
        dir.write("bad1.yaml", "kind: NetworkPolicy\nmetadata: [\n");
        dir.write(
            "bad2.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: y}\n\
             spec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - port: 70000\n",
        );
        let updates = source.poll().unwrap_or_else(|| panic!("edit not seen"));
        let [Update::Files { errors, .. }] = updates.as_slice() else {
            panic!("a bad load reports only its errors: {updates:?}");
        };
        assert_eq!(errors.len(), 2, "one error per bad file: {errors:?}");
        assert!(
            errors[0].contains("bad1.yaml:"),
            "names the file: {}",
            errors[0]
        );
        assert!(
            errors[1].contains("bad2.yaml:1"),
            "names file and line: {}",
            errors[1]
        );
        std::fs::remove_file(dir.0.join("bad1.yaml")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::remove_file(dir.0.join("bad2.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let updates = source.poll().unwrap_or_else(|| panic!("fix not seen"));
        assert_eq!(
            updates,
            [Update::Files {
                origin: Origin::Policies,
                errors: Vec::new()
            }],
            "fixed, and nothing else changed"
        );
    }
}
