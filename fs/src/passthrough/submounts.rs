//! A share that spans host mounts: distinct inode numbers, and submounts for the guest.
//!
//! Inode numbers are unique per file system, not per share. A share holding another host mount
//! (a tmpfs, a bind mount of another disk) would show the guest two files with one inode
//! number, and tools that take (device, inode) or an inode alone as a file's identity (`find
//! -inum`, `tar`'s and `rsync`'s hard-link detection, `du`) would be wrong. So the guest sees
//! the inode numbers of the share's own file system as they are, and those of every other
//! file system with that file system's index (1, 2, ... in the order met, at most 255) in the
//! top byte: `ino ^ (index << 56)`, distinct as long as host inode numbers stay below 2^56
//! (ext4, XFS and tmpfs numbers do). The same mapping undoes itself.
//!
//! When the guest takes FUSE_SUBMOUNTS, a directory whose device differs from its parent's
//! is announced as a submount (FUSE_ATTR_SUBMOUNT), as virtiofsd's `--announce-submounts`
//! does: the guest mounts it as a file system of its own, with its own `st_dev`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use crate::abi;
use crate::filesystem::Entry;

/// Other file systems that get an index of their own.
const MAX_OTHER: u64 = 255;

/// The host file systems a share spans.
pub(super) struct Spanned {
    /// The share's own file system.
    root_dev: u64,
    /// Whether any other has been met (so the common case takes no lock).
    spans: AtomicBool,
    /// Other file systems by device, with their index (read for every node on them, written
    /// once per file system).
    others: RwLock<HashMap<u64, u64>>,
    /// Whether the guest took FUSE_SUBMOUNTS.
    announce: AtomicBool,
}

impl Spanned {
    /// A share whose root is on device `root_dev`.
    pub(super) fn new(root_dev: u64) -> Self {
        Spanned {
            root_dev,
            spans: AtomicBool::new(false),
            others: RwLock::new(HashMap::new()),
            announce: AtomicBool::new(false),
        }
    }

    /// Whether the guest is told of submounts (it took FUSE_SUBMOUNTS at INIT).
    pub(super) fn set_announce(&self, on: bool) {
        self.announce.store(on, Ordering::Relaxed);
    }

    /// The inode number the guest sees for host inode `ino` on device `dev`, and back.
    pub(super) fn guest_ino(&self, dev: u64, ino: u64) -> u64 {
        if dev == self.root_dev {
            return ino;
        }
        if let Some(i) = self.others.read().ok().and_then(|o| o.get(&dev).copied()) {
            return ino ^ (i << 56);
        }
        let Ok(mut others) = self.others.write() else {
            return ino;
        };
        let next = others.len() as u64 + 1;
        let index = match others.get(&dev) {
            Some(i) => *i,
            None if next <= MAX_OTHER => {
                others.insert(dev, next);
                self.spans.store(true, Ordering::Relaxed);
                next
            }
            None => {
                log::warn!(
                    "this share spans more than {MAX_OTHER} host file systems: the guest may see one inode number for two files of the others"
                );
                return ino;
            }
        };
        ino ^ (index << 56)
    }

    /// Whether the share has met a file system other than its own.
    pub(super) fn spans(&self) -> bool {
        self.spans.load(Ordering::Relaxed)
    }

    /// `entry` (of a directory entry whose parent is on `parent_dev`) marked as a submount
    /// when it is a directory on another device and the guest takes submounts.
    pub(super) fn mark(&self, mut entry: Entry, parent_dev: u64) -> Entry {
        if self.announce.load(Ordering::Relaxed)
            && entry.attr.st_mode & libc::S_IFMT == libc::S_IFDIR
            && entry.attr.st_dev != parent_dev
        {
            entry.attr_flags |= abi::ATTR_SUBMOUNT;
        }
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_file_systems_get_distinct_numbers_that_map_back() {
        let s = Spanned::new(10);
        assert_eq!(s.guest_ino(10, 5), 5);
        assert!(!s.spans());
        let a = s.guest_ino(20, 5);
        let b = s.guest_ino(30, 5);
        assert!(s.spans());
        assert!(a != 5 && b != 5 && a != b);
        assert_eq!(s.guest_ino(20, a), 5, "the mapping undoes itself");
        assert_eq!(s.guest_ino(20, 5), a, "stable");
    }

    #[test]
    fn directories_on_another_device_are_announced_once_the_guest_takes_it() {
        let s = Spanned::new(10);
        // SAFETY: stat64 is plain data; all zeroes is a valid value.
        let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFDIR | 0o755;
        st.st_dev = 20;
        let entry = |st| Entry {
            inode: 2,
            attr: st,
            attr_flags: 0,
            attr_timeout: std::time::Duration::ZERO,
            entry_timeout: std::time::Duration::ZERO,
        };
        assert_eq!(s.mark(entry(st), 10).attr_flags, 0);
        s.set_announce(true);
        assert_eq!(s.mark(entry(st), 10).attr_flags, abi::ATTR_SUBMOUNT);
        assert_eq!(s.mark(entry(st), 20).attr_flags, 0, "same device");
        st.st_mode = libc::S_IFREG | 0o644;
        assert_eq!(s.mark(entry(st), 10).attr_flags, 0, "not a directory");
    }
}
