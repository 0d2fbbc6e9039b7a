//! Which manifests a path holds (the one walk every source and `check` use: recursive, sorted,
//! hidden entries skipped, symlinks followed, bounded), and a cheap fingerprint of them for
//! noticing changes by polling (no inotify limits, no missed events on bind mounts).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A path that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot read: {source}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// At most this many files are looked at under one path: polling stays cheap, and a path
/// pointed at `/` by mistake does not walk the whole disk.
pub const MAX_FILES: usize = 10_000;

/// What a set of paths looked like: every manifest with its size, modification time and inode.
/// Any edit, replacement (editors, `kubectl`, `ConfigMap` symlink swaps), addition or removal
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
/// file. Hidden entries (`.git`, editor swap files, a `ConfigMap`'s `..data`) are skipped.
///
/// # Errors
/// When `path` or a directory under it cannot be read.
pub fn manifests(path: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let meta = std::fs::metadata(path).map_err(|source| ReadError {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let read_err = |source| ReadError {
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
                return Err(ReadError {
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

/// Whether a file name says YAML or JSON (`.yaml`, `.yml`, `.json`).
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::tempdir::TempDir;

    const NETPOL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
        metadata: {name: deny-all, namespace: web}\nspec: {podSelector: {}}\n";

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
}
