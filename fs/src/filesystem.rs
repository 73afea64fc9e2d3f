//! The `FileSystem` trait: what a file server implements, one method per FUSE operation.
//!
//! Methods take decoded arguments and return `io::Result`. The server turns errors into errno
//! replies; implementations never see the wire format. Every method has a default that returns
//! ENOSYS, so the kernel learns what is not implemented and stops asking.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

pub use crate::abi::FileLock;

/// Who is asking: the caller's ids in the guest, from the request header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// The caller's uid.
    pub uid: u32,
    /// The caller's gid.
    pub gid: u32,
    /// The caller's pid.
    pub pid: u32,
}

pub use crate::abi::InitFlags;

/// The label the guest's LSM gives a node it makes (FUSE_SECURITY_CTX): an attribute name,
/// `security.selinux` in practice, and its value, to be set on the node as it is made.
#[derive(Clone, Copy, Debug)]
pub struct SecCtx<'a> {
    /// The attribute's name in the guest.
    pub name: &'a CStr,
    /// Its value, as the guest's LSM made it.
    pub value: &'a [u8],
}

/// A looked-up node: what LOOKUP, MKDIR, CREATE and friends answer.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// The node id the kernel uses from now on.
    pub inode: u64,
    /// The node's attributes.
    pub attr: libc::stat64,
    /// FUSE attribute flags (`abi::ATTR_SUBMOUNT`).
    pub attr_flags: u32,
    /// How long the kernel may cache the attributes.
    pub attr_timeout: Duration,
    /// How long the kernel may cache the name.
    pub entry_timeout: Duration,
}

/// What SETATTR changes; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetattrArgs {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSpec>,
    /// New modification time.
    pub mtime: Option<TimeSpec>,
}

/// A time to set: a given instant, or now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSpec {
    /// The current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, u32),
}

/// Where WRITE's data comes from: the request, read straight into the file.
pub trait FileReader {
    /// Writes up to `count` bytes of the request into `f` at `off`; returns how many.
    fn read_to_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize>;
}

/// Where READ's data goes: the reply, filled straight from the file.
pub trait FileWriter {
    /// Reads up to `count` bytes from `f` at `off` into the reply; returns how many.
    fn write_from_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize>;

    /// [`Self::write_from_file_at`] if the host holds the `count` bytes (or all up to the
    /// file's end) in its page cache, without reading the disk; otherwise an error
    /// ([`io::ErrorKind::WouldBlock`] when it does not, or this writer cannot tell;
    /// EOPNOTSUPP from a file system that cannot say) and nothing counted as written (the
    /// bytes may have been copied, for a later write to overwrite).
    fn write_cached_from_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize> {
        let _ = (f, count, off);
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// Reads into `iov` from `f` at `off` only what the host's page cache holds, for
/// [`FileWriter::write_cached_from_file_at`]: all of it, or all up to the file's end;
/// otherwise WouldBlock (EOPNOTSUPP from a file system without RWF_NOWAIT reads). An
/// offset past `i64` is EINVAL, as `preadv` answers (`preadv2` would take -1 for the file's
/// position).
///
/// # Safety
/// Every iovec must point to memory the caller may write, for the length it gives.
pub unsafe fn read_cached_into(f: &File, iov: &[libc::iovec], off: u64) -> io::Result<usize> {
    let Ok(at) = i64::try_from(off) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let want: usize = iov.iter().map(|v| v.iov_len).sum();
    if want == 0 {
        return Ok(0);
    }
    // SAFETY: the caller vouches for the iovecs; RWF_NOWAIT only makes the read fail
    // (EAGAIN) or stop short where it would read from the disk.
    let n = unsafe {
        libc::preadv2(
            f.as_raw_fd(),
            iov.as_ptr(),
            iov.len() as i32,
            at,
            libc::RWF_NOWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // Short: the file ends there (a whole answer), or the rest is not in the cache (the
    // caller reads it all again on a thread that may wait).
    if n < want && !f.metadata().is_ok_and(|m| off + n as u64 >= m.len()) {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(n)
}

/// One entry READDIR returns.
#[derive(Clone, Copy, Debug)]
pub struct DirEntry<'a> {
    /// Inode number (as the guest sees it: see `passthrough::submounts`).
    pub ino: u64,
    /// Offset to resume reading after this entry.
    pub offset: u64,
    /// The `DT_*` type.
    pub type_: u32,
    /// The name.
    pub name: &'a [u8],
}

fn enosys<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// A file system served over FUSE.
#[allow(unused_variables, clippy::too_many_arguments)]
pub trait FileSystem: Send + Sync {
    /// Starts a session. `capable` holds the flags the kernel supports; return the subset to use.
    fn init(&self, capable: InitFlags) -> io::Result<InitFlags> {
        Ok(0)
    }

    /// Ends a session: the guest unmounted, or the driver went away. Drop all per-session state.
    fn destroy(&self) {}

    /// Where `inode` is inside the share, as `/a/b` (`/` for the root), for the audit log;
    /// `None` when the file system cannot tell.
    fn node_path(&self, inode: u64) -> Option<String> {
        let _ = inode;
        None
    }

    /// Looks up `name` in `parent`.
    fn lookup(&self, ctx: Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        enosys()
    }

    /// Looks up `name` in `parent` for a READDIRPLUS entry; `ino` is the inode number the
    /// directory listing gave, a hint the file system may use to skip work.
    fn lookup_listed(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        _ino: u64,
    ) -> io::Result<Entry> {
        self.lookup(ctx, parent, name)
    }

    /// The kernel dropped `count` references to `inode`.
    fn forget(&self, inode: u64, count: u64) {}

    /// The attributes of `inode`, and how long the kernel may cache them.
    fn getattr(
        &self,
        ctx: Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(libc::stat64, Duration)> {
        enosys()
    }

    /// Changes attributes; returns the new ones.
    fn setattr(
        &self,
        ctx: Context,
        inode: u64,
        handle: Option<u64>,
        args: SetattrArgs,
    ) -> io::Result<(libc::stat64, Duration)> {
        enosys()
    }

    /// The target of a symlink.
    fn readlink(&self, ctx: Context, inode: u64) -> io::Result<Vec<u8>> {
        enosys()
    }

    /// Creates a symlink `name` in `parent` pointing at `target`. `secctx` is the label the
    /// guest's LSM gives it, on a session with FUSE_SECURITY_CTX (the same for the other
    /// calls that make a node).
    fn symlink(
        &self,
        ctx: Context,
        target: &CStr,
        parent: u64,
        name: &CStr,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<Entry> {
        enosys()
    }

    /// Creates a special file (FIFO, socket, device).
    fn mknod(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<Entry> {
        enosys()
    }

    /// Creates a directory.
    fn mkdir(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<Entry> {
        enosys()
    }

    /// Removes a non-directory.
    fn unlink(&self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        enosys()
    }

    /// Removes an empty directory.
    fn rmdir(&self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        enosys()
    }

    /// Renames `olddir/oldname` to `newdir/newname`; `flags` are RENAME_NOREPLACE/EXCHANGE.
    fn rename(
        &self,
        ctx: Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        enosys()
    }

    /// Makes a hard link to `inode` as `newparent/newname`.
    fn link(&self, ctx: Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        enosys()
    }

    /// Opens a file; returns a handle and FOPEN_* flags.
    fn open(&self, ctx: Context, inode: u64, flags: u32) -> io::Result<(u64, u32)> {
        enosys()
    }

    /// Creates and opens a file.
    fn create(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        flags: u32,
        umask: u32,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<(Entry, u64, u32)> {
        enosys()
    }

    /// Reads up to `size` bytes at `offset` into `w`.
    fn read(
        &self,
        ctx: Context,
        inode: u64,
        handle: u64,
        w: &mut dyn FileWriter,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        enosys()
    }

    /// [`Self::read`] of data the host holds in its page cache, without waiting on a disk
    /// (see `FileWriter::write_cached_from_file_at`); an error when it cannot, for the caller
    /// to call `read` on a thread that may wait.
    fn read_cached(
        &self,
        ctx: Context,
        inode: u64,
        handle: u64,
        w: &mut dyn FileWriter,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Whether a small WRITE through `handle` lands in the host's page cache without waiting
    /// on a network or another process (a local file system, a file opened for buffered
    /// writes): one a transport may answer on the thread that takes its requests.
    fn write_is_quick(&self, handle: u64) -> bool {
        false
    }

    /// Clears set-user-ID, set-group-ID (when group-executable) and `security.capability` from
    /// `inode` (through `handle` when given). With FUSE_HANDLE_KILLPRIV_V2 the guest leaves this
    /// to the server, and asks for it when a writer without CAP_FSETID writes, truncates or
    /// changes the owner.
    fn kill_suidgid(&self, ctx: Context, inode: u64, handle: Option<u64>) -> io::Result<()> {
        enosys()
    }

    /// Writes `size` bytes from `r` at `offset`.
    fn write(
        &self,
        ctx: Context,
        inode: u64,
        handle: u64,
        r: &mut dyn FileReader,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        enosys()
    }

    /// File system statistics for the file system holding `inode`.
    fn statfs(&self, ctx: Context, inode: u64) -> io::Result<libc::statvfs64> {
        enosys()
    }

    /// The last close of an open file.
    fn release(&self, ctx: Context, inode: u64, handle: u64) -> io::Result<()> {
        enosys()
    }

    /// Flushes a file's data (and metadata unless `datasync`).
    fn fsync(&self, ctx: Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        enosys()
    }

    /// A close(2) of an open file.
    fn flush(&self, ctx: Context, inode: u64, handle: u64) -> io::Result<()> {
        enosys()
    }

    /// Sets an extended attribute.
    fn setxattr(
        &self,
        ctx: Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        enosys()
    }

    /// Gets an extended attribute; `size` 0 asks for its size only.
    fn getxattr(&self, ctx: Context, inode: u64, name: &CStr, size: u32) -> io::Result<Vec<u8>> {
        enosys()
    }

    /// Lists extended attribute names, NUL-separated.
    fn listxattr(&self, ctx: Context, inode: u64, size: u32) -> io::Result<Vec<u8>> {
        enosys()
    }

    /// Removes an extended attribute.
    fn removexattr(&self, ctx: Context, inode: u64, name: &CStr) -> io::Result<()> {
        enosys()
    }

    /// Opens a directory; returns a handle and FOPEN_* flags.
    fn opendir(&self, ctx: Context, inode: u64, flags: u32) -> io::Result<(u64, u32)> {
        enosys()
    }

    /// Lists entries from `offset`, calling `add` for each until it returns false (full).
    fn readdir(
        &self,
        ctx: Context,
        inode: u64,
        handle: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> bool,
    ) -> io::Result<()> {
        enosys()
    }

    /// Closes a directory.
    fn releasedir(&self, ctx: Context, inode: u64, handle: u64) -> io::Result<()> {
        enosys()
    }

    /// Syncs a directory.
    fn fsyncdir(&self, ctx: Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        enosys()
    }

    /// Checks access with the caller's ids.
    fn access(&self, ctx: Context, inode: u64, mask: u32) -> io::Result<()> {
        enosys()
    }

    /// Allocates or punches space.
    fn fallocate(
        &self,
        ctx: Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        enosys()
    }

    /// Repositions for SEEK_DATA/SEEK_HOLE (and the plain whences).
    fn lseek(
        &self,
        ctx: Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        enosys()
    }

    /// Copies a range between two open files on the host.
    fn copy_file_range(
        &self,
        ctx: Context,
        inode_in: u64,
        handle_in: u64,
        offset_in: u64,
        inode_out: u64,
        handle_out: u64,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        enosys()
    }

    /// The first lock that would conflict with `lock` (type F_UNLCK when none would).
    fn getlk(
        &self,
        ctx: Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
    ) -> io::Result<FileLock> {
        enosys()
    }

    /// Takes or releases a lock without waiting: EAGAIN when another holder conflicts. `flock`
    /// selects BSD flock semantics (whole file, per open file) over POSIX ranges.
    fn setlk(
        &self,
        ctx: Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flock: bool,
    ) -> io::Result<()> {
        enosys()
    }

    /// Syncs the whole file system.
    fn syncfs(&self, ctx: Context, inode: u64) -> io::Result<()> {
        enosys()
    }
}
