//! Snapshot files as a watched source: which manifests a `--cluster` or `--policies` path holds,
//! a cheap fingerprint of them (polled, so no inotify limits or missed events on bind mounts),
//! and loading them into policies and inventory objects with every error naming file and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::check::CheckError;
use crate::inventory::load::{self, LoadError, Located, Object};
use crate::policy::cilium;
use crate::policy::ir::{CompiledPolicy, PolicyKey, PolicyKind};
use crate::policy::netpol;

/// At most this many files are looked at under one path: polling stays cheap, and a path
/// pointed at `/` by mistake does not walk the whole disk.
pub const MAX_FILES: usize = 10_000;

/// What a set of paths looked like: every manifest with its size, modification time and inode.
/// Any edit, replacement (editors, `kubectl`, ConfigMap symlink swaps), addition or removal
/// changes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>, u64)>);

impl Fingerprint {
    /// Stats every manifest under `paths` now. Unreadable paths count as their error text, so a
    /// path that vanishes or comes back is a change too.
    #[must_use]
    pub fn of(paths: &[PathBuf]) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        let mut entries = Vec::new();
        for path in paths {
            match manifests(path) {
                Ok(files) => {
                    for file in files {
                        // Follows symlinks: a ConfigMap volume swaps its `..data` link.
                        let (len, mtime, ino) = std::fs::metadata(&file)
                            .map_or((0, None, 0), |m| (m.len(), m.modified().ok(), m.ino()));
                        entries.push((file, len, mtime, ino));
                    }
                }
                Err(e) => entries.push((PathBuf::from(e.to_string()), 0, None, 0)),
            }
        }
        Self(entries)
    }

    /// Files in the fingerprint.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The manifests (`.yaml`, `.yml`, `.json`) under `path`, sorted; `path` itself when it is a
/// file. Hidden entries (`.git`, editor swap files, a ConfigMap's `..data`) are skipped.
///
/// # Errors
/// When `path` or a directory under it cannot be read.
pub fn manifests(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let read_err = |source| LoadError::Read {
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let entry_path = entry.path();
            // metadata() follows symlinks, so linked files and directories are read.
            let Ok(meta) = std::fs::metadata(&entry_path) else {
                continue;
            };
            if meta.is_dir() {
                dirs.push(entry_path);
            } else if is_manifest(&entry_path) {
                files.push(entry_path);
            }
            if files.len() + dirs.len() > MAX_FILES {
                return Err(LoadError::Read {
                    path: path.to_path_buf(),
                    source: std::io::Error::other(format!(
                        "more than {MAX_FILES} files and directories: not a manifest directory"
                    )),
                });
            }
        }
    }
    files.sort();
    Ok(files)
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The intended model's policies, by key.
pub type Policies = BTreeMap<PolicyKey, CompiledPolicy>;

/// Compiles one policy object; `None` for other kinds.
///
/// # Errors
/// When the policy cannot be compiled: the error names its file, line and object.
pub fn compile(located: &Located) -> Result<Option<CompiledPolicy>, CheckError> {
    let compiled = match &located.object {
        Object::NetworkPolicy(p) => netpol::compile(p),
        Object::CiliumNetworkPolicy(p) => cilium::compile(PolicyKind::CiliumNetworkPolicy, p),
        Object::CiliumClusterwideNetworkPolicy(p) => {
            cilium::compile(PolicyKind::CiliumClusterwideNetworkPolicy, p)
        }
        Object::Namespace(_)
        | Object::Node(_)
        | Object::Pod(_)
        | Object::Service(_)
        | Object::EndpointSlice(_)
        | Object::Endpoints(_) => return Ok(None),
    };
    compiled.map(Some).map_err(|error| CheckError::Compile {
        source_at: Box::new(located.source.clone()),
        object: located.name.clone(),
        error: Box::new(error),
    })
}

/// Loads the policies of a `--policies` path, file by file, so every bad file is reported (not
/// only the first). Non-policy objects are ignored, as `check` does.
///
/// # Errors
/// Every file that could not be read, parsed or compiled, each with file and line; the caller
/// keeps its last good policies then.
pub fn load_policies(path: &Path) -> Result<Policies, Vec<CheckError>> {
    let files = manifests(path).map_err(|e| vec![CheckError::Load(e)])?;
    let mut policies = Policies::new();
    let mut errors = Vec::new();
    for file in &files {
        let mut objects = Vec::new();
        if let Err(e) = load::load_file(file, &mut objects) {
            errors.push(CheckError::Load(e));
            continue;
        }
        for located in &objects {
            match compile(located) {
                Ok(Some(policy)) => {
                    policies.insert(policy.key.clone(), policy);
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

/// A `--cluster` snapshot: its inventory objects and, compiled, its policy objects.
#[derive(Debug)]
pub struct Snapshot {
    pub inventory: Vec<Located>,
    pub policies: Policies,
}

/// Loads `--cluster` paths. Inventory objects are converted later, on the model; policies are
/// compiled here unless `with_policies` is false (`--policies` replaces them).
///
/// # Errors
/// The first file that cannot be read or parsed, or every policy that cannot be compiled.
pub fn load_snapshot(paths: &[PathBuf], with_policies: bool) -> Result<Snapshot, Vec<CheckError>> {
    let objects = load::load_paths(paths).map_err(|e| vec![CheckError::Load(e)])?;
    let mut policies = Policies::new();
    let mut errors = Vec::new();
    let mut inventory = Vec::with_capacity(objects.len());
    for located in objects {
        if !located.object.is_policy() {
            inventory.push(located);
        } else if with_policies {
            match compile(&located) {
                Ok(Some(policy)) => {
                    policies.insert(policy.key.clone(), policy);
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
    }
    if errors.is_empty() {
        // Namespaces first, then nodes, so identities see their labels at once.
        inventory.sort_by_key(|o| match o.object {
            Object::Namespace(_) => 0,
            Object::Node(_) => 1,
            _ => 2,
        });
        Ok(Snapshot {
            inventory,
            policies,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETPOL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
        metadata: {name: deny-all, namespace: web}\nspec: {podSelector: {}}\n";

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "fa-files-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {dir:?}: {e}"));
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir: {e}"));
            }
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn fingerprint_changes_on_edit_add_and_remove_only() {
        let dir = TempDir::new("fp");
        let file = dir.write("a.yaml", NETPOL);
        let paths = [dir.0.clone()];
        let first = Fingerprint::of(&paths);
        assert_eq!(first.len(), 1, "one manifest: {first:?}");
        assert_eq!(Fingerprint::of(&paths), first, "nothing changed");
        dir.write("notes.txt", "not a manifest");
        dir.write(".hidden.yaml", NETPOL);
        assert_eq!(
            Fingerprint::of(&paths),
            first,
            "non-manifests and hidden files ignored"
        );
        dir.write("sub/b.yml", NETPOL);
        let second = Fingerprint::of(&paths);
        assert_eq!(second.len(), 2, "nested manifest found: {second:?}");
        std::fs::write(&file, format!("{NETPOL}# edited, longer\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        let third = Fingerprint::of(&paths);
        assert_ne!(third, second, "an edit must change the fingerprint");
        std::fs::remove_file(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Fingerprint::of(&paths).len(), 1, "removal seen");
    }

    #[test]
    fn policies_load_per_file_and_report_every_bad_file() {
        let dir = TempDir::new("pol");
        dir.write("good.yaml", NETPOL);
        let policies = load_policies(&dir.0).unwrap_or_else(|e| panic!("{e:?}"));
        let names: Vec<String> = policies.keys().map(ToString::to_string).collect();
        assert_eq!(names, ["NetworkPolicy web/deny-all"]);
        dir.write("bad1.yaml", "kind: NetworkPolicy\nmetadata: [\n");
        dir.write(
            "bad2.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: y}\n\
             spec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - port: 70000\n",
        );
        let errors = match load_policies(&dir.0) {
            Ok(p) => panic!("bad files accepted: {p:?}"),
            Err(errors) => errors,
        };
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "one error per bad file: {text:?}");
        assert!(
            text[0].contains("bad1.yaml:"),
            "names the file: {}",
            text[0]
        );
        assert!(
            text[1].contains("bad2.yaml:1"),
            "names file and line: {}",
            text[1]
        );
    }
}
