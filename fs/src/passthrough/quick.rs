//! Which open files the share's queue worker may read or write itself: a share with a pool
//! of threads answers a READ from the page cache and a small buffered WRITE where it takes
//! them (`Server::handle_read_if_cached`, `Server::is_quick_write`), for the hand-over to a
//! pool thread would cost as much as the copy.
//!
//! Theory of operation. The worker holds the request ring while it answers, and the
//! frontend's GET_VRING_BASE waits for the ring: nothing it answers itself may wait long.
//! A READ is tried with RWF_NOWAIT, which fails rather than wait for the disk; but not on a
//! file opened O_DIRECT, where the flag only spares lock waits and the read still goes to
//! the device. A file system without RWF_NOWAIT reads (tmpfs, NFS, FUSE, overlayfs) says
//! EOPNOTSUPP, once per handle: it is not tried again. A WRITE cannot be tried that way
//! (ext4 refuses RWF_NOWAIT for buffered writes), so the worker writes only to files opened
//! without O_DIRECT or O_DSYNC (which O_SYNC includes) on a local file system (ext4, XFS,
//! btrfs, f2fs, tmpfs), where a buffered write lands in the page cache; on NFS or a FUSE
//! mount inside the share a write may wait on the network or another process for good, and
//! hold the ring with it. (A write to a local disk may still wait, for dirty-page
//! throttling or the journal: the device pauses its own writes after a slow one,
//! `devices/src/fs_inline.rs`.) The flags are the host descriptor's, fixed at open: a
//! guest's `fcntl(F_SETFL)` does not reach the host.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use super::inode::Handle;
use super::sys::{fs_type, status_flags};
use crate::filesystem::FileWriter;

/// File systems whose buffered writes land in the page cache, without a network or another
/// process behind them: ext2/3/4, XFS, btrfs, f2fs, tmpfs.
const LOCAL: [i64; 5] = [0xEF53, 0x5846_5342, 0x9123_683E, 0xF2F5_2010, 0x0102_1994];

/// What the worker may do with one handle, worked out on first use.
#[derive(Debug)]
pub(super) struct Quick {
    /// Try reads with RWF_NOWAIT (cleared when the file system refuses it).
    reads: AtomicBool,
    /// Small writes may be answered on the worker.
    writes: bool,
}

impl Quick {
    pub(super) fn of(file: &File) -> Quick {
        let fd = file.as_raw_fd();
        let flags = status_flags(fd).unwrap_or(libc::O_DIRECT);
        let direct = flags & libc::O_DIRECT != 0;
        let sync = flags & libc::O_DSYNC != 0;
        let local = fs_type(fd).is_ok_and(|t| LOCAL.contains(&t));
        Quick {
            reads: AtomicBool::new(!direct),
            writes: local && !direct && !sync,
        }
    }

    pub(super) fn writes(&self) -> bool {
        self.writes
    }
}

/// Reads up to `size` bytes at `offset` of `h` into `w` if the host's page cache holds them;
/// WouldBlock if not, or if the handle is not to be read this way.
pub(super) fn read(
    h: &Handle,
    w: &mut dyn FileWriter,
    size: u32,
    offset: u64,
) -> io::Result<usize> {
    let quick = h.quick();
    if !quick.reads.load(Ordering::Relaxed) {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    match w.write_cached_from_file_at(&h.file, size as usize, offset) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            quick.reads.store(false, Ordering::Relaxed);
            Err(io::ErrorKind::WouldBlock.into())
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(flags: i32) -> (tempfile::TempDir, File) {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(flags)
            .open(dir.path().join("f"))
            .unwrap();
        (dir, f)
    }

    #[test]
    fn direct_and_synced_handles_are_never_read_or_written_on_the_worker() {
        let (_d, plain) = open(0);
        let local = fs_type(plain.as_raw_fd()).is_ok_and(|t| LOCAL.contains(&t));
        let q = Quick::of(&plain);
        assert!(q.reads.load(Ordering::Relaxed));
        assert_eq!(q.writes(), local);
        for flags in [libc::O_DSYNC, libc::O_SYNC] {
            let (_d, f) = open(flags);
            let q = Quick::of(&f);
            assert!(
                q.reads.load(Ordering::Relaxed),
                "{flags:o}: reads from the cache"
            );
            assert!(!q.writes(), "{flags:o}: writes wait for the disk");
        }
        let (_d, direct) = open(libc::O_DIRECT);
        let q = Quick::of(&direct);
        assert!(
            !q.reads.load(Ordering::Relaxed),
            "O_DIRECT reads go to the device"
        );
        assert!(!q.writes());
    }
}
