//! A pin directory of the test's own: a bpffs instance of its own mounted on a temporary
//! directory (every `mount -t bpf` is a new, empty instance), unmounted and removed on drop with
//! everything pinned in it, so tests never share pinned flow tables with each other or with an
//! agent running on the machine, and need no bpffs on `/sys/fs/bpf` (`ip netns exec` mounts a
//! fresh `/sys` for the daemon anyway, without it). Mounted before the daemon is spawned, so the
//! daemon's mount namespace sees it.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// A bpffs mounted on `<tmp>/fa-bpf-<tag>-<pid>-<n>`, empty.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "fa-bpf-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(
            status.success(),
            "mount -t bpf on {}: {status}",
            dir.display()
        );
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }

    /// The names pinned (or directories) under `sub`, sorted; empty when it does not exist.
    pub fn list(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.0.join(sub))
            .map(|entries| {
                entries
                    .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Unpins and removes everything under `dir` (two levels: the layout directories and their
/// pins).
fn remove_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if let Ok(inner) = std::fs::read_dir(&path) {
                for pin in inner.flatten() {
                    let _ = std::fs::remove_file(pin.path());
                }
            }
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        remove_tree(&self.0);
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}
