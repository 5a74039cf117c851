//! Fault injection for the store's file operations (failpoints).
//!
//! Every file operation of the log passes through [`hit`] first, naming the
//! path and the kind of operation. In debug builds and with the cargo feature
//! `failpoints`, a test can [`inject`] an error (ENOSPC, EDQUOT, EIO, ...) for
//! the Nth matching call; in release builds without the feature `hit` is an
//! empty inline function and costs nothing.
//!
//! Rules match on a substring of the path, so tests running in parallel in
//! one process (each with its own temporary data directory) do not see each
//! other's faults.
//!
//! A test can also [`hold`] the syncs of matching paths: each such sync
//! waits in `hit` until [`release`] (at most [`HOLD_MAX`]), which makes a
//! slow disk without any timing; [`held`] says how many wait right now.

use std::io;
use std::path::Path;

/// The kinds of file operation the store performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Creating a file (segment, `meta.tmp`, reserve).
    Create,
    /// Writing to a file. An injected ENOSPC or EDQUOT writes the first half
    /// of the buffer before failing, like a disk that fills mid-write.
    Write,
    /// `fdatasync`/`fsync` of a file or directory.
    Sync,
    /// Renaming a file over another (`meta.tmp` to `meta`).
    Rename,
    /// Deleting a file.
    Remove,
    /// Truncating a file.
    Truncate,
}

/// One injected fault.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Matches paths containing this string.
    pub path_contains: String,
    /// Matches this kind of operation.
    pub op: Op,
    /// Matching calls to let pass before the first failure.
    pub skip: u32,
    /// Matching calls that fail after that; `u32::MAX` = every later one.
    pub times: u32,
    /// The `errno` the failing calls return.
    pub errno: i32,
}

/// Longest a held sync waits for [`release`]: a test that forgets to
/// release does not hang forever.
pub const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(60);

#[cfg(any(debug_assertions, feature = "failpoints"))]
mod imp {
    use super::*;
    use std::sync::{Condvar, Mutex};
    use std::time::Instant;

    static RULES: Mutex<Vec<Rule>> = Mutex::new(Vec::new());
    /// Held path filters, each with the number of syncs waiting on it.
    static HOLDS: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());
    static RELEASED: Condvar = Condvar::new();

    /// Holds every later sync of a path containing `path_contains` (see the
    /// module docs) until [`release`].
    pub fn hold(path_contains: &str) {
        let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
        holds.push((path_contains.to_string(), 0));
    }

    /// Lets the syncs held by `path_contains` go, and later ones pass.
    pub fn release(path_contains: &str) {
        let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
        holds.retain(|(p, _)| p != path_contains);
        RELEASED.notify_all();
    }

    /// Syncs waiting on the hold `path_contains` right now.
    pub fn held(path_contains: &str) -> usize {
        let holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
        holds
            .iter()
            .find(|(p, _)| p == path_contains)
            .map_or(0, |(_, n)| *n)
    }

    /// Waits while a hold matches this sync of `path`.
    fn wait_if_held(path: &str) {
        let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
        let Some(key) = holds
            .iter_mut()
            .find(|(p, _)| path.contains(p.as_str()))
            .map(|(p, n)| {
                *n += 1;
                p.clone()
            })
        else {
            return;
        };
        let deadline = Instant::now() + HOLD_MAX;
        while holds.iter().any(|(p, _)| *p == key) && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            holds = RELEASED
                .wait_timeout(holds, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if let Some((_, n)) = holds.iter_mut().find(|(p, _)| *p == key) {
            *n -= 1;
        }
    }

    /// Adds a fault rule (see [`Rule`]).
    pub fn inject(rule: Rule) {
        RULES.lock().unwrap_or_else(|e| e.into_inner()).push(rule);
    }

    /// Removes every rule whose path filter contains `path_contains`.
    pub fn clear(path_contains: &str) {
        RULES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| !r.path_contains.contains(path_contains));
    }

    /// Returns the injected error for this call, if a rule says so (a held
    /// sync waits first).
    pub fn hit(path: &Path, op: Op) -> io::Result<()> {
        if op == Op::Sync {
            wait_if_held(&path.to_string_lossy());
        }
        let mut rules = RULES.lock().unwrap_or_else(|e| e.into_inner());
        if rules.is_empty() {
            return Ok(());
        }
        let path = path.to_string_lossy();
        for rule in rules.iter_mut() {
            if rule.op != op || !path.contains(rule.path_contains.as_str()) {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            if rule.times == 0 {
                continue;
            }
            if rule.times != u32::MAX {
                rule.times -= 1;
            }
            return Err(io::Error::from_raw_os_error(rule.errno));
        }
        Ok(())
    }
}

#[cfg(not(any(debug_assertions, feature = "failpoints")))]
mod imp {
    use super::*;

    /// Fault injection is compiled out: nothing to add.
    pub fn inject(_rule: Rule) {}

    /// Fault injection is compiled out: nothing to clear.
    pub fn clear(_path_contains: &str) {}

    /// Fault injection is compiled out: nothing is held.
    pub fn hold(_path_contains: &str) {}

    /// Fault injection is compiled out: nothing to release.
    pub fn release(_path_contains: &str) {}

    /// Fault injection is compiled out: nothing is held.
    pub fn held(_path_contains: &str) -> usize {
        0
    }

    /// Fault injection is compiled out: every call passes.
    #[inline(always)]
    pub fn hit(_path: &Path, _op: Op) -> io::Result<()> {
        Ok(())
    }
}

pub use imp::{clear, held, hit, hold, inject, release};

/// Parses `TERN_FAILPOINTS`-style rules: entries separated by `;`, each
/// `OP:PATH_PART:SKIP:TIMES:ERRNO` with OP one of create, write, sync,
/// rename, remove, truncate; TIMES a number or `all`; ERRNO one of ENOSPC,
/// EDQUOT, EIO (e.g. `sync:shard-1:0:all:EIO`).
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let parts: Vec<&str> = entry.split(':').collect();
        let [op, path, skip, times, errno] = parts[..] else {
            return Err(format!("{entry:?}: expected OP:PATH_PART:SKIP:TIMES:ERRNO"));
        };
        let op = match op {
            "create" => Op::Create,
            "write" => Op::Write,
            "sync" => Op::Sync,
            "rename" => Op::Rename,
            "remove" => Op::Remove,
            "truncate" => Op::Truncate,
            _ => return Err(format!("{entry:?}: unknown operation {op:?}")),
        };
        let skip = skip
            .parse()
            .map_err(|_| format!("{entry:?}: SKIP must be a number"))?;
        let times = match times {
            "all" => u32::MAX,
            n => n
                .parse()
                .map_err(|_| format!("{entry:?}: TIMES must be a number or all"))?,
        };
        let errno = match errno {
            "ENOSPC" => libc::ENOSPC,
            "EDQUOT" => libc::EDQUOT,
            "EIO" => libc::EIO,
            _ => return Err(format!("{entry:?}: ERRNO must be ENOSPC, EDQUOT or EIO")),
        };
        rules.push(Rule {
            path_contains: path.to_string(),
            op,
            skip,
            times,
            errno,
        });
    }
    Ok(rules)
}

/// Injects the rules of the environment variable `TERN_FAILPOINTS` (see
/// [`parse_rules`]), for tests that run the real binary. Returns how many;
/// an error when the variable is malformed, or set in a build without
/// fault injection.
pub fn inject_from_env() -> Result<usize, String> {
    let Ok(text) = std::env::var("TERN_FAILPOINTS") else {
        return Ok(0);
    };
    if !ENABLED {
        return Err(
            "TERN_FAILPOINTS is set but this build has no fault injection \
                    (build with --features failpoints)"
                .to_string(),
        );
    }
    let rules = parse_rules(&text).map_err(|e| format!("TERN_FAILPOINTS: {e}"))?;
    let n = rules.len();
    rules.into_iter().for_each(inject);
    Ok(n)
}

/// Whether fault injection is compiled in (debug builds, or the `failpoints`
/// feature).
pub const ENABLED: bool = cfg!(any(debug_assertions, feature = "failpoints"));

/// Whether `e` says the filesystem is out of space or quota: the world's
/// error that a store answers by refusing new messages, not by crashing.
pub fn is_no_space(e: &io::Error) -> bool {
    // ENOSPC: the filesystem is full. EDQUOT: the user's quota is used up.
    // Both leave the file as it was plus possibly a partial write, which the
    // caller truncates away.
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[cfg(all(test, any(debug_assertions, feature = "failpoints")))]
mod tests {
    use super::*;

    #[test]
    fn nth_call_fails_then_passes() {
        inject(Rule {
            path_contains: "/fault-test-a/".into(),
            op: Op::Write,
            skip: 2,
            times: 1,
            errno: libc::ENOSPC,
        });
        let p = Path::new("/x/fault-test-a/seg");
        assert!(hit(p, Op::Write).is_ok());
        assert!(hit(p, Op::Sync).is_ok(), "other ops pass");
        assert!(hit(Path::new("/x/other/seg"), Op::Write).is_ok());
        assert!(hit(p, Op::Write).is_ok());
        let e = hit(p, Op::Write).unwrap_err();
        assert!(is_no_space(&e));
        assert!(hit(p, Op::Write).is_ok());
        clear("/fault-test-a/");
    }

    #[test]
    fn rules_parse_and_bad_ones_say_why() {
        let rules = parse_rules("sync:shard-1:0:all:EIO; write:/d/:2:1:ENOSPC").unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].op, Op::Sync);
        assert_eq!(rules[0].times, u32::MAX);
        assert_eq!(rules[1].skip, 2);
        assert_eq!(rules[1].errno, libc::ENOSPC);
        assert!(parse_rules("sync:x:0:1").unwrap_err().contains("expected"));
        assert!(parse_rules("seek:x:0:1:EIO").unwrap_err().contains("seek"));
        assert!(parse_rules("sync:x:0:1:EPERM")
            .unwrap_err()
            .contains("ERRNO"));
    }

    #[test]
    fn eio_is_not_no_space() {
        assert!(!is_no_space(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(is_no_space(&io::Error::from_raw_os_error(libc::EDQUOT)));
    }
}
