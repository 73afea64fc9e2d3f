//! Serving a [`FileSystem`] through the host kernel's `/dev/fuse` with the `fuser` crate.
//!
//! [`HostFuse`] forwards every `fuser::Filesystem` operation to the same [`FileSystem`] trait
//! the virtio-fs path serves, so `ferry mount` shows on the host exactly what a guest sees. This
//! is an inspection and test tool: READ and WRITE copy through a buffer instead of going
//! straight between the file and the kernel.
//!
//! Differences from the virtio path, all forced by `fuser`'s API:
//! - `fuser` reports one number as both the FUSE node id and `st_ino`, so `stat` on the mount
//!   shows Ferry's node ids, not the host's inode numbers (hard links still share one).
//!   The kernel is asked to always use READDIRPLUS, so directory entries carry the same
//!   numbers.
//! - There is no INTERRUPT. POSIX locks go to the file system (a waiting SETLKW retries on the
//!   mount's one thread); flock stays with the host kernel, since fuser drops SETLK's flock flag.
//! - One thread serves the mount, and only the mounting user may use it (no `allow_other`:
//!   without `default_permissions` other users would get the server's access checks only).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

pub use fuser::BackgroundSession;

use crate::filesystem::{DirEntry, Entry, FileLock, FileSystem, SetattrArgs};
use crate::server::MAX_WRITE;

/// The most COPY_FILE_RANGE copies at once: the largest page multiple its 32-bit reply counts.
const MAX_COPY: u64 = 0xffff_f000;

/// The generation every node gets: node ids are never reused within a session.
const GENERATION: Generation = Generation(0);

/// A [`FileSystem`] as a `fuser::Filesystem`, for mounting on the host.
pub struct HostFuse<F: FileSystem> {
    fs: F,
    confine: Option<Confine>,
}

impl<F: FileSystem> HostFuse<F> {
    /// Wraps `fs`.
    pub fn new(fs: F) -> Self {
        HostFuse { fs, confine: None }
    }

    /// The file system served.
    pub fn fs(&self) -> &F {
        &self.fs
    }
}

/// What [`spawn_mount`] mounts with.
pub struct MountConfig {
    /// The file system's name in /proc/mounts (the "device" column).
    pub fsname: String,
    /// Runs on the thread that serves the mount before it answers the kernel's INIT, after
    /// the mount is made: where `ferry mount` enters its sandbox, which the mount itself must
    /// precede. An error fails the INIT, and so the mount.
    pub confine: Option<Confine>,
}

/// A confinement for the serving thread (see [`MountConfig::confine`]).
pub type Confine = Box<dyn FnOnce() -> io::Result<()> + Send + Sync>;

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            fsname: "ferry".to_string(),
            confine: None,
        }
    }
}

/// Mounts `fs` at `mountpoint` and serves it on a background thread until the returned session
/// is dropped (which unmounts) or the mount point is unmounted from outside (the session's
/// thread then ends). Blocks until the kernel's INIT has been answered.
///
/// The kernel does no permission checks of its own (no `default_permissions`): the file system
/// checks access itself, as it does for a guest. Only the mounting user may use the mount.
pub fn spawn_mount<F: FileSystem + 'static>(
    fs: F,
    mountpoint: &Path,
    cfg: MountConfig,
) -> io::Result<BackgroundSession> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(cfg.fsname.clone()),
        MountOption::Subtype("ferry".to_string()),
    ];
    let host = HostFuse {
        fs,
        confine: cfg.confine,
    };
    fuser::spawn_mount(host, mountpoint, &config)
}

mod convert;
use convert::*;

impl<F: FileSystem> HostFuse<F> {
    fn reply_entry(e: io::Result<Entry>, reply: ReplyEntry) {
        match e {
            Ok(e) => reply.entry_with_ttls(
                &e.attr_timeout,
                &e.entry_timeout,
                &file_attr(e.inode, &e.attr),
                GENERATION,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn reply_empty(r: io::Result<()>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn reply_xattr(r: io::Result<Vec<u8>>, size: u32, reply: ReplyXattr) {
        match r {
            Ok(v) if size == 0 => reply.size(u32::try_from(v.len()).unwrap_or(u32::MAX)),
            Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl<F: FileSystem + 'static> Filesystem for HostFuse<F> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Some(confine) = self.confine.take() {
            confine().inspect_err(|e| log::error!("{e}"))?;
        }
        let caps = config.capabilities();
        let wanted = self.fs.init(caps.bits() as u32)?;
        let mut flags = fuser::InitFlags::from_bits_truncate(u64::from(wanted)) & caps;
        // Always READDIRPLUS, so that entries carry node ids like `stat` does (see above).
        flags.remove(fuser::InitFlags::FUSE_READDIRPLUS_AUTO);
        // fuser does not pass on SETLK's flock flag, so flock stays with the host kernel
        // (which then locks locally); POSIX locks go to the file system.
        flags.remove(fuser::InitFlags::FUSE_FLOCK_LOCKS);
        if let Err(unsupported) = config.add_capabilities(flags) {
            log::warn!("the host's FUSE lacks INIT flags {unsupported:?}");
        }
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.fs.destroy();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match cname(name) {
            Ok(n) => Self::reply_entry(self.fs.lookup(ctx(req), parent.0, &n), reply),
            Err(e) => reply.error(e),
        }
    }

    // BATCH_FORGET: fuser's default calls `forget` for each node (fuser 0.18 does not export
    // `ForgetOne`, so it cannot be overridden).
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ctx(req), ino.0, fh.map(|h| h.0)) {
            Ok((st, ttl)) => reply.attr(&ttl, &file_attr(ino.0, &st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let args = SetattrArgs {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_spec),
            mtime: mtime.map(time_spec),
        };
        match self.fs.setattr(ctx(req), ino.0, fh.map(|h| h.0), args) {
            Ok((st, ttl)) => reply.attr(&ttl, &file_attr(ino.0, &st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ctx(req), ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match cname(name) {
            Ok(n) => Self::reply_entry(
                self.fs.mknod(ctx(req), parent.0, &n, mode, rdev, umask),
                reply,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match cname(name) {
            Ok(n) => Self::reply_entry(self.fs.mkdir(ctx(req), parent.0, &n, mode, umask), reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match cname(name) {
            Ok(n) => Self::reply_empty(self.fs.unlink(ctx(req), parent.0, &n), reply),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match cname(name) {
            Ok(n) => Self::reply_empty(self.fs.rmdir(ctx(req), parent.0, &n), reply),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match (cname(link_name), cname(target.as_os_str())) {
            (Ok(n), Ok(t)) => Self::reply_entry(self.fs.symlink(ctx(req), &t, parent.0, &n), reply),
            (Err(e), _) | (_, Err(e)) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match (cname(name), cname(newname)) {
            (Ok(o), Ok(n)) => Self::reply_empty(
                self.fs
                    .rename(ctx(req), parent.0, &o, newparent.0, &n, flags.bits()),
                reply,
            ),
            (Err(e), _) | (_, Err(e)) => reply.error(e),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match cname(newname) {
            Ok(n) => Self::reply_entry(self.fs.link(ctx(req), ino.0, newparent.0, &n), reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(ctx(req), ino.0, flags.0 as u32) {
            Ok((fh, f)) => reply.opened(FileHandle(fh), FopenFlags::from_bits_truncate(f)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let size = size.min(MAX_WRITE);
        let mut w = VecWriter {
            buf: Vec::with_capacity(size as usize),
        };
        match self.fs.read(ctx(req), ino.0, fh.0, &mut w, size, offset) {
            Ok(n) => reply.data(&w.buf[..n.min(w.buf.len())]),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Ok(size) = u32::try_from(data.len()) else {
            return reply.error(Errno::EINVAL);
        };
        let mut r = SliceReader { data };
        match self.fs.write(ctx(req), ino.0, fh.0, &mut r, size, offset) {
            Ok(n) => reply.written(u32::try_from(n).unwrap_or(size)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        Self::reply_empty(self.fs.flush(ctx(req), ino.0, fh.0), reply);
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        if flush {
            // RELEASE_FLUSH: the kernel skipped FLUSH; its errors have nowhere to go.
            let _ = self.fs.flush(ctx(req), ino.0, fh.0);
        }
        Self::reply_empty(self.fs.release(ctx(req), ino.0, fh.0), reply);
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::reply_empty(self.fs.fsync(ctx(req), ino.0, datasync, fh.0), reply);
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ctx(req), ino.0, flags.0 as u32) {
            Ok((fh, f)) => reply.opened(FileHandle(fh), FopenFlags::from_bits_truncate(f)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self
            .fs
            .readdir(ctx(req), ino.0, fh.0, offset, &mut |e: DirEntry<'_>| {
                // `add` answers true when the entry did not fit.
                !reply.add(
                    INodeNo(e.ino),
                    e.offset,
                    dirent_type(e.type_),
                    OsStr::from_bytes(e.name),
                )
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let c = ctx(req);
        let fs = &self.fs;
        let mut added = 0usize;
        let mut lookup_err = None;
        let res = fs.readdir(c, ino.0, fh.0, offset, &mut |e: DirEntry<'_>| {
            let Ok(name) = CString::new(e.name) else {
                return true;
            };
            let entry = match fs.lookup(c, ino.0, &name) {
                Ok(en) => en,
                Err(err) => {
                    // The entry vanished between listing and lookup: skip it, unless it is
                    // the first (then report the error).
                    if added == 0 {
                        lookup_err = Some(err);
                        return false;
                    }
                    return true;
                }
            };
            let full = reply.add(
                INodeNo(entry.inode),
                e.offset,
                OsStr::from_bytes(e.name),
                &entry.entry_timeout,
                &file_attr(entry.inode, &entry.attr),
                GENERATION,
            );
            // The kernel takes no reference for "." and "..", nor for an entry that did not
            // fit: give back the one the lookup took.
            let is_dot = e.name == b"." || e.name == b"..";
            if full || is_dot {
                fs.forget(entry.inode, 1);
            }
            if full {
                return false;
            }
            added += 1;
            true
        });
        match (res, lookup_err) {
            (Err(e), _) | (Ok(()), Some(e)) => reply.error(errno(&e)),
            (Ok(()), None) => reply.ok(),
        }
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        Self::reply_empty(self.fs.releasedir(ctx(req), ino.0, fh.0), reply);
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::reply_empty(self.fs.fsyncdir(ctx(req), ino.0, datasync, fh.0), reply);
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs(ctx(req), ino.0) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                u32::try_from(st.f_bsize).unwrap_or(u32::MAX),
                u32::try_from(st.f_namemax).unwrap_or(255),
                u32::try_from(st.f_frsize).unwrap_or(u32::MAX),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match cname(name) {
            Ok(n) => Self::reply_empty(
                self.fs.setxattr(ctx(req), ino.0, &n, value, flags as u32),
                reply,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match cname(name) {
            Ok(n) => Self::reply_xattr(self.fs.getxattr(ctx(req), ino.0, &n, size), size, reply),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        Self::reply_xattr(self.fs.listxattr(ctx(req), ino.0, size), size, reply);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match cname(name) {
            Ok(n) => Self::reply_empty(self.fs.removexattr(ctx(req), ino.0, &n), reply),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        Self::reply_empty(self.fs.access(ctx(req), ino.0, mask.bits() as u32), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let n = match cname(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match self
            .fs
            .create(ctx(req), parent.0, &n, mode, flags as u32, umask)
        {
            Ok((e, fh, f)) => reply.created(
                &e.entry_timeout,
                &file_attr(e.inode, &e.attr),
                GENERATION,
                FileHandle(fh),
                FopenFlags::from_bits_truncate(f),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let lock = FileLock {
            start,
            end,
            type_: typ as u32,
            pid,
        };
        match self.fs.getlk(ctx(req), ino.0, fh.0, lock_owner.0, lock) {
            Ok(l) => reply.locked(l.start, l.end, l.type_ as i32, l.pid),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let lock = FileLock {
            start,
            end,
            type_: typ as u32,
            pid,
        };
        // One thread serves the mount, so a waiting lock is retried here with a pause (a test
        // tool; the virtio path waits off the queue's thread).
        let mut pause = Duration::from_millis(1);
        loop {
            let r = self
                .fs
                .setlk(ctx(req), ino.0, fh.0, lock_owner.0, lock, false);
            match r {
                Err(e) if sleep && e.raw_os_error() == Some(libc::EAGAIN) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                other => return Self::reply_empty(other, reply),
            }
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        Self::reply_empty(
            self.fs
                .fallocate(ctx(req), ino.0, fh.0, mode as u32, offset, length),
            reply,
        );
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        match self.fs.lseek(ctx(req), ino.0, fh.0, offset, whence as u32) {
            Ok(off) => match i64::try_from(off) {
                Ok(off) => reply.offset(off),
                Err(_) => reply.error(Errno::EOVERFLOW),
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The reply carries a 32-bit count: copy at most that much (page-aligned) at once.
        let len = len.min(MAX_COPY);
        match self.fs.copy_file_range(
            ctx(req),
            ino_in.0,
            fh_in.0,
            offset_in,
            ino_out.0,
            fh_out.0,
            offset_out,
            len,
            flags.bits(),
        ) {
            Ok(n) => reply.written(u32::try_from(n).unwrap_or(u32::MAX)),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filesystem::{FileReader, FileWriter, TimeSpec};
    use fuser::FileType;
    use std::time::UNIX_EPOCH;

    #[test]
    fn times_before_and_after_the_epoch() {
        assert_eq!(system_time(5, 7), UNIX_EPOCH + Duration::new(5, 7));
        assert_eq!(
            system_time(-2, 500),
            UNIX_EPOCH - Duration::from_secs(2) + Duration::from_nanos(500)
        );
        let t = UNIX_EPOCH - Duration::from_secs(2) + Duration::from_nanos(500);
        assert_eq!(time_spec(TimeOrNow::SpecificTime(t)), TimeSpec::At(-2, 500));
        assert_eq!(
            time_spec(TimeOrNow::SpecificTime(UNIX_EPOCH + Duration::new(9, 1))),
            TimeSpec::At(9, 1)
        );
    }

    #[test]
    fn attr_takes_type_perm_and_node_id() {
        // SAFETY: stat64 is plain old data; all-zero is a valid value.
        let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFLNK | 0o4755;
        st.st_ino = 999;
        st.st_size = 12;
        st.st_nlink = 3;
        st.st_blksize = 4096;
        st.st_rdev = libc::makedev(8, 1);
        st.st_mtime = 100;
        st.st_mtime_nsec = 42;
        let a = file_attr(7, &st);
        assert_eq!(a.ino, INodeNo(7));
        assert_eq!(a.kind, FileType::Symlink);
        assert_eq!(a.perm, 0o4755);
        assert_eq!((a.size, a.nlink, a.blksize), (12, 3, 4096));
        assert_eq!(a.rdev, (8 << 8) | 1);
        assert_eq!(a.mtime, UNIX_EPOCH + Duration::new(100, 42));
        assert_eq!(dirent_type(u32::from(libc::DT_DIR)), FileType::Directory);
        assert_eq!(
            dirent_type(u32::from(libc::DT_UNKNOWN)),
            FileType::RegularFile
        );
    }

    #[test]
    fn adapters_copy_whole_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut r = SliceReader { data: &data };
        assert_eq!(r.read_to_file_at(&f, data.len(), 100).unwrap(), data.len());
        let mut w = VecWriter { buf: Vec::new() };
        assert_eq!(w.write_from_file_at(&f, 20_000, 100).unwrap(), data.len());
        assert_eq!(w.buf, data);
    }
}
