//! Scratch directories of the test's own, removed with everything in them
//! on drop, also when the test panics.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use crate::unique_name;

/// A directory removed (recursively) on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `<system temp dir>/lat-<pid>-<n>-<suffix>`.
    pub fn new(suffix: &str) -> Self {
        Self::at(std::env::temp_dir().join(format!("{}-{suffix}", unique_name())))
    }

    /// Creates `path` (its parent must exist, it must not) with mode 0755
    /// whatever the umask: the other UIDs a test runs may enter it.
    pub fn at(path: PathBuf) -> Self {
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let guard = Self { path };
        fs::set_permissions(&guard.path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod 755 {}: {e}", guard.path.display()));
        guard
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` in it (mode 0644: every UID may read it) and returns
    /// its path.
    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.path.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("chmod 644 {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("lattice-tests: rm -r {}: {e}", self.path.display());
        }
    }
}
