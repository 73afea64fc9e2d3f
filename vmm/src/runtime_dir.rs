//! Ferry's own folders under TMPDIR (`ferry-PID`, `ferry-run-PID`), and the ones a killed
//! ferry left behind.
//!
//! Theory of operation. A ferry removes its folders when it exits, but not when it is killed
//! (SIGKILL, the OOM killer, a crash), and each left one holds sockets no one serves. So every
//! folder holds `.lock`, on which its ferry keeps an exclusive `flock` for its whole life; the
//! kernel drops the lock when the process ends, however it ends. A starting ferry removes each
//! folder of its user whose lock it can take: no running ferry owns it. A lock and not the PID
//! in the name, since PIDs are reused and a ferry in another PID namespace (the namespace
//! sandbox, a container) that shares this TMPDIR has a PID that means nothing here. The lock
//! is taken on a file of another name and then renamed into place, so a folder never shows a
//! `.lock` that is not yet held; a folder without one (being made, or left by a ferry older
//! than this) is left alone.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const LOCK: &str = ".lock";
const LOCK_NEW: &str = ".lock.new";
/// The names ferry gives its folders: the prefix, then the PID.
const PREFIXES: [&str; 2] = ["ferry-run-", "ferry-"];

/// A folder of this ferry's, locked for as long as this lives.
pub struct RuntimeDir {
    path: PathBuf,
    _lock: File,
}

impl RuntimeDir {
    /// Makes `TMPDIR/PREFIX-PID` (mode 0700, emptied if a ferry of the same PID left it) and
    /// locks it, after removing the folders killed ferries left.
    pub fn create(prefix: &str) -> Result<Self, String> {
        let tmp = std::env::temp_dir();
        sweep(&tmp);
        let path = tmp.join(format!("{prefix}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let made = std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .and_then(|()| lock(&path));
        match made {
            Ok(lock) => Ok(RuntimeDir { path, _lock: lock }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                Err(format!(
                    "cannot create the private folder {}: {e}; check that TMPDIR is writable",
                    path.display()
                ))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Locks `dir`: `.lock.new` made and locked, then renamed to `.lock`.
fn lock(dir: &Path) -> std::io::Result<File> {
    let f = File::create(dir.join(LOCK_NEW))?;
    // SAFETY: flock only acts on the descriptor, which `f` owns and keeps open.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::fs::rename(dir.join(LOCK_NEW), dir.join(LOCK))?;
    Ok(f)
}

/// Removes the folders in `tmp` named as ferry names them, of this user, whose lock no
/// running process holds.
fn sweep(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let ours = PREFIXES.iter().any(|p| {
            name.strip_prefix(p)
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        });
        if !ours || name.ends_with(&format!("-{}", std::process::id())) {
            continue;
        }
        let path = e.path();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && m.uid() == me => {}
            _ => continue,
        }
        let Ok(f) = File::open(path.join(LOCK)) else {
            continue;
        };
        // SAFETY: as in `lock`.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            log::info!(
                "removing {}, left by a ferry that was killed",
                path.display()
            );
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder as a ferry of PID `pid` makes it in `tmp`, and the lock it holds.
    fn folder(tmp: &Path, pid: u32) -> (PathBuf, File) {
        let p = tmp.join(format!("ferry-{pid}"));
        std::fs::create_dir(&p).unwrap();
        let f = lock(&p).unwrap();
        (p, f)
    }

    #[test]
    fn a_killed_ferrys_folder_goes_and_a_running_ones_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let (dead, lock) = folder(tmp.path(), 4_000_001);
        drop(lock); // as the kernel does when its ferry dies
        let (alive, _held) = folder(tmp.path(), 4_000_002);
        // Held by another process, as a running ferry holds it.
        let (other, theirs) = folder(tmp.path(), 4_000_003);
        drop(theirs);
        let mut child = std::process::Command::new("flock")
            .arg(other.join(LOCK))
            .args(["sleep", "30"])
            .spawn()
            .expect("run flock(1)");
        std::thread::sleep(std::time::Duration::from_millis(300));
        // Not ferry's: another name, and a folder being made (no `.lock` yet).
        let unrelated = tmp.path().join("ferry-notes");
        std::fs::create_dir(&unrelated).unwrap();
        let making = tmp.path().join("ferry-4000004");
        std::fs::create_dir(&making).unwrap();
        sweep(tmp.path());
        let _ = child.kill();
        let _ = child.wait();
        assert!(!dead.exists(), "the killed ferry's folder was left");
        assert!(
            alive.exists() && other.exists(),
            "a running ferry's folder went"
        );
        assert!(
            unrelated.exists() && making.exists(),
            "a folder not ferry's went"
        );
    }
}
