//! The file root TFTP and HTTP serve from: read-only, and confined. A requested name is
//! taken relative to the root (a leading '/' is the root itself, as TFTP clients often send
//! it); `..`, NUL bytes, backslashes and any path that resolves outside the root (a symlink
//! out) are refused before a file is opened.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

/// Why a name is not served. One wire reaction each: TFTP error 1 / HTTP 404, or TFTP
/// error 2 / HTTP 403.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("no such file")]
    NotFound,
    #[error("access denied: {0}")]
    Denied(&'static str),
}

/// A directory whose regular files are served read-only.
#[derive(Debug, Clone)]
pub struct FileRoot {
    /// Canonical (symlinks resolved) root directory.
    root: PathBuf,
}

/// Longest name accepted (TFTP filenames and URL paths alike).
pub const MAX_NAME: usize = 1024;

impl FileRoot {
    /// The root must exist and be a directory.
    pub fn new(dir: &Path) -> std::io::Result<FileRoot> {
        let root = std::fs::canonicalize(dir)?;
        if !root.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(FileRoot { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Check a requested name without touching the file system: the relative path it names.
    pub fn check_name(name: &str) -> Result<PathBuf, FileError> {
        if name.len() > MAX_NAME {
            return Err(FileError::Denied("name too long"));
        }
        if name.contains('\0') || name.contains('\\') {
            return Err(FileError::Denied("bad character in name"));
        }
        let rel = name.trim_start_matches('/');
        if rel.is_empty() {
            return Err(FileError::NotFound);
        }
        let mut out = PathBuf::new();
        for c in Path::new(rel).components() {
            match c {
                Component::Normal(p) => out.push(p),
                Component::CurDir => {}
                Component::ParentDir => return Err(FileError::Denied("'..' in name")),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(FileError::Denied("absolute name"))
                }
            }
        }
        if out.as_os_str().is_empty() {
            return Err(FileError::NotFound);
        }
        Ok(out)
    }

    /// Resolve a name to a canonical path inside the root (symlinks followed, then checked).
    pub fn resolve(&self, name: &str) -> Result<PathBuf, FileError> {
        let rel = Self::check_name(name)?;
        let full = std::fs::canonicalize(self.root.join(rel)).map_err(|_| FileError::NotFound)?;
        if !full.starts_with(&self.root) {
            return Err(FileError::Denied("outside the root"));
        }
        Ok(full)
    }

    /// Open a regular file inside the root; returns it and its length.
    pub fn open(&self, name: &str) -> Result<(File, u64), FileError> {
        let path = self.resolve(name)?;
        let file = File::open(&path).map_err(|_| FileError::NotFound)?;
        let meta = file.metadata().map_err(|_| FileError::NotFound)?;
        if !meta.is_file() {
            return Err(FileError::NotFound);
        }
        Ok((file, meta.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_confined() {
        assert_eq!(
            FileRoot::check_name("/undionly.kpxe").unwrap(),
            PathBuf::from("undionly.kpxe")
        );
        assert_eq!(
            FileRoot::check_name("efi/./x.efi").unwrap(),
            PathBuf::from("efi/x.efi")
        );
        for bad in ["../etc/passwd", "a/../../b", "a\\..\\b", "x\0y", "a/.."] {
            assert!(
                matches!(FileRoot::check_name(bad), Err(FileError::Denied(_))),
                "{bad:?}"
            );
        }
        assert_eq!(FileRoot::check_name("/"), Err(FileError::NotFound));
        assert!(FileRoot::check_name(&"a".repeat(MAX_NAME + 1)).is_err());
    }

    #[test]
    fn symlinks_out_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("in.bin"), b"in").unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("in.bin", root.join("alias")).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        let r = FileRoot::new(&root).unwrap();
        assert_eq!(r.open("in.bin").unwrap().1, 2);
        assert_eq!(r.open("/alias").unwrap().1, 2);
        assert_eq!(
            r.open("out").err(),
            Some(FileError::Denied("outside the root"))
        );
        assert_eq!(r.open("sub").err(), Some(FileError::NotFound));
        assert_eq!(r.open("missing").err(), Some(FileError::NotFound));
    }
}
