//! Files and directories only the server's own user may touch: the data
//! directory (every queued message is in it) and the TLS private key.
//!
//! The rules follow PostgreSQL (data directory) and OpenSSH (private keys):
//! a start is refused, with the path, the mode found and the `chmod` that
//! fixes it, when group or others have any access. The checks look at the
//! mode bits only, so they mean the same for root.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of directories Tern creates for private data.
pub const DIR_MODE: u32 = 0o700;
/// Mode of private files Tern creates.
pub const FILE_MODE: u32 = 0o600;
/// Permission bits of group and others; none may be set on private data.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Creates directory `path` with mode 0700 if it does not exist (its missing
/// parents get the default mode). An existing directory is left as it is.
pub fn create_dir(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Options that create (or truncate) a file with mode 0600 for writing.
pub fn create_file_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE);
    options
}

/// Refuses a directory that group or others can read, write or enter.
/// `what` names it in the error (`data_dir`).
pub fn check_dir(path: &Path, what: &str) -> Result<(), String> {
    let mode = mode_of(path, what)?;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(format!(
            "{what} {} has mode {mode:04o}: group or others can access it, and it holds every \
             queued message. Fix: chmod 700 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Refuses a file that group or others can read or write. `what` names it
/// in the error (`tls_key`).
pub fn check_file(path: &Path, what: &str) -> Result<(), String> {
    let mode = mode_of(path, what)?;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(format!(
            "{what} {} has mode {mode:04o}: group or others can read it, and it is a private \
             key. Fix: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// The permission bits of `path` (links followed).
fn mode_of(path: &Path, what: &str) -> Result<u32, String> {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .map_err(|e| format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn created_dir_is_private_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/data");
        create_dir(&dir).unwrap();
        check_dir(&dir, "data_dir").unwrap();
        assert_eq!(mode_of(&dir, "x").unwrap() & 0o777, 0o700);
        create_dir(&dir).unwrap(); // exists: fine
        for mode in [0o750, 0o705, 0o701, 0o755, 0o770] {
            chmod(&dir, mode);
            let e = check_dir(&dir, "data_dir").unwrap_err();
            assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
            assert!(e.contains(&format!("chmod 700 {}", dir.display())), "{e}");
        }
    }

    #[test]
    fn key_file_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("key.pem");
        create_file_options().open(&key).unwrap();
        check_file(&key, "tls_key").unwrap();
        chmod(&key, 0o400);
        check_file(&key, "tls_key").unwrap();
        for mode in [0o640, 0o604, 0o644, 0o620] {
            chmod(&key, mode);
            let e = check_file(&key, "tls_key").unwrap_err();
            assert!(e.starts_with("tls_key "), "{e}");
            assert!(e.contains(&format!("chmod 600 {}", key.display())), "{e}");
        }
        let e = check_file(&tmp.path().join("none"), "tls_key").unwrap_err();
        assert!(e.contains("none"), "{e}");
    }
}
