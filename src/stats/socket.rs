//! The stats socket's file: who may connect ([`SocketAccess`]: mode and
//! group), claiming its path from a stale socket left by a crash, and
//! removing it when the server stops, unless another process replaced it.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::server::context;
use crate::config::{Config, ConfigError, Group};

/// Who may connect to the stats socket (`stats_socket_mode`,
/// `stats_socket_group`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits, e.g. `0o600`.
    pub mode: u32,
    /// Group given the socket; `None` keeps the process's.
    pub gid: Option<u32>,
}

impl SocketAccess {
    /// Owner only, the process's group: the default.
    pub const PRIVATE: SocketAccess = SocketAccess {
        mode: 0o600,
        gid: None,
    };

    /// The access `config` asks for, looking its group name up.
    ///
    /// # Errors
    ///
    /// A group name this system does not know, or a failed lookup, naming
    /// the key `stats_socket_group`.
    pub fn from_config(config: &Config) -> Result<SocketAccess, ConfigError> {
        let gid = match &config.stats_socket_group {
            None => None,
            Some(group) => Some(group_id(group).map_err(|message| ConfigError {
                key: "stats_socket_group".to_string(),
                message,
            })?),
        };
        Ok(SocketAccess {
            mode: config.stats_socket_mode.0,
            gid,
        })
    }

    /// Gives the file at `path` this group and mode; errors name the key.
    pub(super) fn apply(&self, path: &Path) -> io::Result<()> {
        if let Some(gid) = self.gid {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
                context(
                    e,
                    format_args!(
                        "`stats_socket_group`: giving {} to group {gid} (the server must run as root or as a member of that group)",
                        path.display()
                    ),
                )
            })?;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(self.mode)).map_err(|e| {
            context(
                e,
                format_args!(
                    "`stats_socket_mode`: setting {} to {:04o}",
                    path.display(),
                    self.mode
                ),
            )
        })
    }
}

/// The gid of `group`: a number as it is, a name from the group database.
fn group_id(group: &Group) -> Result<u32, String> {
    let name = match group {
        Group::Id(gid) => return Ok(*gid),
        Group::Name(name) => name,
    };
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return name.parse().map_err(|_| format!("{name}: not a valid gid"));
    }
    let c_name = std::ffi::CString::new(name.as_str())
        .map_err(|_| format!("{name:?}: a group name has no NUL byte"))?;
    let mut buf = vec![0u8; 4096];
    // getgrnam_r says ERANGE while the buffer is too small for the entry
    // (a group with many members); grow it, up to a bound.
    loop {
        // SAFETY: all-zero bytes are a valid `group` (null pointers, zero ids).
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the NUL-terminated
        // name, our entry, `buf` with its true length, and `found`.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => {
                return Err(format!(
                    "no group named {name:?} on this system (create it, or give an existing group or a numeric gid)"
                ))
            }
            0 => return Ok(entry.gr_gid),
            libc::ERANGE if buf.len() < GROUP_ENTRY_BYTES_MAX => buf.resize(buf.len() * 2, 0),
            rc => {
                return Err(format!(
                    "looking up group {name:?}: {}",
                    io::Error::from_raw_os_error(rc)
                ))
            }
        }
    }
}

/// Largest group database entry [`group_id`] makes room for.
const GROUP_ENTRY_BYTES_MAX: usize = 1 << 20;

/// Makes `path` free to bind, or explains why it is not.
pub(super) fn claim_path(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(context(e, format_args!("inspecting {}", path.display()))),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    let live = || {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another tern is serving stats at {}", path.display()),
        )
    };
    match UnixStream::connect(path) {
        Ok(_) => Err(live()),
        // ECONNREFUSED: a socket file with no listener behind it, left by a
        // process that died before removing it. It is stale.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::warn!("removing stale stats socket {}", path.display());
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                // Someone else removed it meanwhile; the path is free all the same.
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(context(
                    e,
                    format_args!("removing stale {}", path.display()),
                )),
            }
        }
        // ENOENT: removed between our stat and our connect (its owner shut
        // down). The path is free.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // EAGAIN: a listener is there but its backlog is full. It is alive.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(live()),
        // EACCES and the rest: we cannot tell whether it is live, so we must
        // not remove it.
        Err(e) => Err(context(e, format_args!("probing {}", path.display()))),
    }
}

/// The socket file this server bound. Dropping it removes the file, unless
/// the file at that path is no longer ours (another process replaced it).
pub(super) struct SocketFile {
    pub(super) path: PathBuf,
    pub(super) dev: u64,
    pub(super) ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    log::warn!("removing stats socket {}: {e}", self.path.display());
                }
            }
            Ok(_) => log::warn!(
                "stats socket {} was replaced by another; leaving it",
                self.path.display()
            ),
            // Already gone (removed by hand); nothing to do.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("inspecting stats socket {}: {e}", self.path.display()),
        }
    }
}
