//! `PassthroughFs`: serves a host directory to the guest.
//!
//! Every node the guest knows is an `O_PATH` file descriptor the server holds, and everything is
//! resolved relative to those descriptors with `*at` calls and `O_NOFOLLOW`, never by joining
//! paths. The server never follows a symlink on the guest's behalf, and `..` at the share's
//! root is the root itself, so the guest cannot name anything outside the share. Operations
//! that need a real file descriptor reopen a node through `/proc/self/fd`, which reaches the
//! same inode without walking a path.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::abi::{self, ROOT_ID};
use crate::filesystem::{
    Context, DirEntry, Entry, FileLock, FileReader, FileSystem, FileWriter, InitFlags, SetattrArgs,
    TimeSpec,
};

/// How long the guest may cache attributes and entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// No caching: every access asks the host. For shares the host changes often.
    Never,
    /// Cache metadata briefly, but not file data.
    Metadata,
    /// Cache metadata briefly and file data until the file changes on the host (the default).
    #[default]
    Auto,
    /// Cache everything for a long time. For shares only the guest changes.
    Always,
}

impl CachePolicy {
    /// How long attributes and entries may be cached under this policy.
    pub fn attr_timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Metadata | CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86400),
        }
    }

    /// FOPEN_* flags for files opened under this policy.
    fn open_flags(self) -> u32 {
        match self {
            CachePolicy::Never | CachePolicy::Metadata => abi::FOPEN_DIRECT_IO,
            CachePolicy::Auto => 0,
            CachePolicy::Always => abi::FOPEN_KEEP_CACHE,
        }
    }
}

impl std::str::FromStr for CachePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(CachePolicy::Never),
            "metadata" => Ok(CachePolicy::Metadata),
            "auto" => Ok(CachePolicy::Auto),
            "always" => Ok(CachePolicy::Always),
            _ => Err(format!(
                "cache={s} is not a cache policy; use never, metadata, auto or always"
            )),
        }
    }
}

/// Options for one share.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Cache policy.
    pub cache: CachePolicy,
    /// Answer every write with EROFS.
    pub readonly: bool,
    /// How many nodes may keep a descriptor open before nodes keep file handles instead
    /// (None: half the open-file limit, at most 16384).
    pub node_fds: Option<usize>,
    /// Let the guest cache writes (FUSE writeback cache): faster small writes, but a host
    /// process may see the guest's writes late.
    pub writeback: bool,
    /// Answer the xattr requests with ENOSYS, as virtiofsd does without `--xattr`: the guest
    /// then stops asking, which saves the GETXATTR of `security.capability` that it sends
    /// before the first write to every file.
    pub no_xattr: bool,
    /// User ids the guest and the host see differently (no ranges: the same ids both ways).
    pub uid_map: IdMaps,
    /// Group ids the same way.
    pub gid_map: IdMaps,
}

/// A range of ids that the guest and the host name differently, as virtiofsd's
/// `--translate-uid map:GUEST:HOST:COUNT`: guest id `guest + i` is host id `host + i` for `i`
/// below `count`, both ways. Ids outside the range pass unchanged, so a host id in the guest's
/// range (host `0` with `0:1000:1`) shows under two names in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMap {
    /// The first id as the guest sees it.
    pub guest: u32,
    /// The first id as the host sees it.
    pub host: u32,
    /// How many ids; neither range reaches `u32::MAX` (which means "no change" in SETATTR).
    pub count: u32,
}

impl IdMap {
    /// The map `GUEST:HOST[:COUNT]` (COUNT 1 when left out), or why it is not one.
    pub fn parse(s: &str) -> Result<Self, String> {
        let n: Vec<&str> = s.split(':').collect();
        let num = |v: &str| {
            v.parse::<u32>()
                .ok()
                .filter(|v| *v != u32::MAX)
                .ok_or_else(|| format!("{v:?} is not an id (0 to 4294967294)"))
        };
        let (guest, host, count) = match n.as_slice() {
            [g, h] => (num(g)?, num(h)?, 1),
            [g, h, c] => (num(g)?, num(h)?, num(c)?),
            _ => return Err("expected GUEST:HOST or GUEST:HOST:COUNT".into()),
        };
        if count == 0 {
            return Err("COUNT must be at least 1".into());
        }
        let end = |first: u32| u64::from(first) + u64::from(count) <= u64::from(u32::MAX);
        if !end(guest) || !end(host) {
            return Err("the range runs past the largest id, 4294967294".into());
        }
        Ok(IdMap { guest, host, count })
    }

    /// Host id for guest id `id`, when the range holds it.
    fn to_host(self, id: u32) -> Option<u32> {
        (id.wrapping_sub(self.guest) < self.count).then(|| self.host + (id - self.guest))
    }

    /// Guest id for host id `id`, when the range holds it.
    fn to_guest(self, id: u32) -> Option<u32> {
        (id.wrapping_sub(self.host) < self.count).then(|| self.guest + (id - self.host))
    }

    /// The ids `a` and `b` both hold, as (first, last), when they share any.
    fn common((a, b): (u32, u32), (c, d): (u32, u32)) -> Option<(u32, u32)> {
        if b == 0 || d == 0 {
            return None;
        }
        let first = a.max(c);
        let last = (u64::from(a) + u64::from(b) - 1).min(u64::from(c) + u64::from(d) - 1);
        (u64::from(first) <= last).then_some((first, last as u32))
    }
}

impl std::fmt::Display for IdMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.guest, self.host, self.count)
    }
}

/// The id ranges a share names differently (`uidmap=` given once or more): none, or ranges
/// that overlap neither on the guest's side nor on the host's, so that each id has one name
/// each way, as virtiofsd's repeated `--translate-uid map:`. Ids in no range pass unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMaps(Vec<IdMap>);

impl IdMaps {
    /// The ranges `maps`, or why they cannot go together.
    pub fn new(maps: Vec<IdMap>) -> Result<Self, String> {
        for (i, a) in maps.iter().enumerate() {
            for b in &maps[..i] {
                for (side, x, y) in [("guest", a.guest, b.guest), ("host", a.host, b.host)] {
                    if let Some((first, last)) = IdMap::common((x, a.count), (y, b.count)) {
                        return Err(format!(
                            "{b} and {a} both map {side} ids {first} to {last}; give ranges that do not overlap"
                        ));
                    }
                }
            }
        }
        Ok(IdMaps(maps))
    }

    /// Host id for guest id `id`.
    pub fn to_host(&self, id: u32) -> u32 {
        self.0.iter().find_map(|m| m.to_host(id)).unwrap_or(id)
    }

    /// Guest id for host id `id`.
    pub fn to_guest(&self, id: u32) -> u32 {
        self.0.iter().find_map(|m| m.to_guest(id)).unwrap_or(id)
    }

    /// The ranges, in the order given.
    pub fn ranges(&self) -> &[IdMap] {
        &self.0
    }
}

/// How the server reaches a node.
enum NodeFd {
    /// An `O_PATH | O_NOFOLLOW` descriptor held open.
    Fd(File),
    /// A file handle (`name_to_handle_at`), opened on demand against a descriptor on the same
    /// mount, so large trees do not cost one descriptor per node. `at` is the parent node and
    /// name it was last known by: a file whose dentry the host evicted comes back from its
    /// handle disconnected from any path, and Landlock refuses to open such a file for reading
    /// or writing (it cannot tell that it lies in a share), so [`PassthroughFs::reopen`] then
    /// goes through the name.
    Handle {
        mount: Arc<File>,
        handle: Vec<u8>,
        at: Mutex<(u64, CString)>,
    },
}

/// A node's descriptor for one operation: borrowed, or opened from its handle just now.
enum PathFd<'a> {
    Borrowed(&'a File),
    Owned(File),
}

impl AsRawFd for PathFd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            PathFd::Borrowed(f) => f.as_raw_fd(),
            PathFd::Owned(f) => f.as_raw_fd(),
        }
    }
}

/// One node the guest has looked up.
struct Inode {
    /// How to reach it.
    fd: NodeFd,
    /// (device, inode number) on the host: one node per host inode.
    key: (u64, u64),
    /// Lookups the kernel holds.
    refs: AtomicU64,
}

#[derive(Default)]
struct InodeMap {
    by_id: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<(u64, u64), u64>,
}

impl InodeMap {
    /// Takes one more lookup reference on the node registered for host inode `key`, if any.
    /// FORGET drops nodes under the write lock, so holding either lock is enough.
    fn take_ref(&self, key: (u64, u64)) -> Option<u64> {
        let id = *self.by_key.get(&key)?;
        let node = self.by_id.get(&id)?;
        node.refs.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }
}

/// An open file or directory.
struct Handle {
    file: File,
    /// Serialises seek + getdents on directory handles.
    dir_pos: Mutex<()>,
    /// The node the handle is open on.
    inode: u64,
    /// The guest pid that last took a lock through this handle (0: none), which GETLK
    /// reports for the lock: the host's open-file-description locks carry no pid.
    lock_pid: AtomicU32,
}

/// A file system that passes requests through to a host directory.
pub struct PassthroughFs {
    cfg: Config,
    inodes: RwLock<InodeMap>,
    next_inode: AtomicU64,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    root: Arc<Inode>,
    /// Whether the server may take the caller's ids when creating files.
    switch_creds: bool,
    /// Nodes that may still hold a descriptor of their own; past it, nodes keep file handles.
    fd_budget: AtomicI64,
    /// The budget to start a session with.
    fd_budget_start: i64,
    /// Whether file handles can be opened (needs CAP_DAC_READ_SEARCH, so root).
    use_handles: bool,
    /// A descriptor per mount (by mount id) to open handles against.
    mounts: Mutex<HashMap<i32, Arc<File>>>,
    /// Directories are read without OPENDIR: the kernel offered to stop sending OPENDIR and
    /// RELEASEDIR (FUSE_NO_OPENDIR_SUPPORT), so OPENDIR answers ENOSYS and each READDIR
    /// opens the directory for itself. A directory walk then costs the guest two requests
    /// per directory (a listing and the empty one that ends it) instead of four.
    stateless_dirs: AtomicBool,
}

/// The most nodes the guest may hold per share: past it, LOOKUP answers ENFILE.
const MAX_NODES: usize = 1 << 21;

/// Lists directory `dir` from `offset` (a d_off cookie, 0 for the start), passing entries to
/// `add` until it returns false or the directory ends.
fn read_dir_at(
    dir: &File,
    offset: u64,
    add: &mut dyn FnMut(DirEntry<'_>) -> bool,
) -> io::Result<()> {
    let fd = dir.as_raw_fd();
    let off = off_t(offset)?;
    // SAFETY: the fd is valid; lseek has no memory effects.
    if unsafe { libc::lseek64(fd, off, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // A reply holds one page of entries (the kernel asks for 4 KiB), which a first read of 4 KiB
    // covers; the host's entries past what `add` takes are read for nothing, so later reads
    // grow only while `add` keeps taking.
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        let mut pos = 0usize;
        while pos + 19 <= n as usize {
            // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
            let rec = &buf[pos..n as usize];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or_default());
            let d_off = u64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
            let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
            let type_ = u32::from(rec[18]);
            if reclen < 19 || reclen > rec.len() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let name_field = &rec[19..reclen];
            let name_len = name_field
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_field.len());
            let entry = DirEntry {
                ino,
                offset: d_off,
                type_,
                name: &name_field[..name_len],
            };
            if !add(entry) {
                return Ok(());
            }
            pos += reclen;
        }
        if buf.len() < 32 * 1024 {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// fsync or fdatasync of `fd`.
fn sync_fd(fd: RawFd, datasync: bool) -> io::Result<()> {
    // SAFETY: the caller holds `fd` open; these calls have no memory effects.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(|_| ())
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn stat_fd(fd: RawFd) -> io::Result<libc::stat64> {
    fstatat(fd, c"", libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
}

/// lstat of `name` in the directory `dir`.
fn stat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat64> {
    fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW)
}

fn fstatat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat64> {
    // SAFETY: stat64 is plain old data; all-zero is a valid value.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is valid for the call, `name` is NUL-terminated, and `st` is a valid
    // destination of the right type.
    cvt(unsafe { libc::fstatat64(dir, name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// `/proc/self/fd/N` for `fd`: reaches the fd's inode without walking a path.
fn proc_path(fd: RawFd) -> CString {
    // The string has no interior NUL: it is made of ASCII digits and slashes.
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// The guest may change `user.*` attributes only: `security.*` and `trusted.*` ones would
/// grant file capabilities or other privileges on the host.
fn check_xattr_name(name: &CStr) -> io::Result<()> {
    if name.to_bytes().starts_with(b"user.") {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// A guest offset or length as the host's signed type; EINVAL past i64::MAX.
fn off_t(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A FUSE lock as a host `struct flock` for open-file-description locks (l_pid must be 0).
fn posix_lock(lk: FileLock) -> io::Result<libc::flock> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let start = i64::try_from(lk.start).map_err(|_| einval())?;
    let len = if lk.end >= abi::OFFSET_MAX {
        0
    } else if lk.end < lk.start {
        return Err(einval());
    } else {
        i64::try_from(lk.end - lk.start + 1).map_err(|_| einval())?
    };
    let type_ = match lk.type_ as i32 {
        t @ (libc::F_RDLCK | libc::F_WRLCK | libc::F_UNLCK) => t as libc::c_short,
        _ => return Err(einval()),
    };
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = type_;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    Ok(fl)
}

/// The outcome of a get/listxattr call into `buf`: the value, or (when the caller asked with
/// size 0) a buffer as long as the value would be.
fn xattr_result(n: isize, size: u32, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if size == 0 {
        return Ok(vec![0u8; n as usize]);
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Takes the guest caller's ids for file creation while alive (when running as root), so new
/// files belong to whoever created them in the guest, as on a local file system.
struct CredGuard {
    active: bool,
}

impl CredGuard {
    fn new(switch: bool, ctx: Context) -> Self {
        if !switch {
            return CredGuard { active: false };
        }
        // SAFETY: setfsgid/setfsuid only change this thread's file-system ids.
        unsafe {
            libc::setfsgid(ctx.gid);
            libc::setfsuid(ctx.uid);
        }
        CredGuard { active: true }
    }
}

impl Drop for CredGuard {
    fn drop(&mut self) {
        if self.active {
            // SAFETY: as in `new`; this restores root's ids.
            unsafe {
                libc::setfsuid(0);
                libc::setfsgid(0);
            }
        }
    }
}

impl Inode {
    /// A descriptor for the node, valid while the returned value lives.
    fn fd(&self) -> io::Result<PathFd<'_>> {
        match &self.fd {
            NodeFd::Fd(f) => Ok(PathFd::Borrowed(f)),
            NodeFd::Handle { mount, handle, .. } => {
                // SAFETY: `handle` holds a struct file_handle exactly as name_to_handle_at
                // wrote it, and the mount fd is valid; the call only reads them.
                let fd = unsafe {
                    libc::syscall(
                        libc::SYS_open_by_handle_at,
                        mount.as_raw_fd(),
                        handle.as_ptr(),
                        libc::O_PATH | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `fd` was just opened and is owned by nobody else.
                Ok(PathFd::Owned(unsafe { File::from_raw_fd(fd as RawFd) }))
            }
        }
    }
}

/// How many nodes may keep a descriptor open: half the open-file limit, at most 16384.
fn fd_budget() -> i64 {
    // SAFETY: rlimit is plain data; getrlimit only writes it.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 512;
    }
    (r.rlim_cur / 2).min(16384) as i64
}

/// Largest `struct file_handle` payload (MAX_HANDLE_SZ).
const MAX_HANDLE_SZ: usize = 128;

/// The file handle of `fd` and the id of its mount, when the file system gives one.
fn file_handle(fd: RawFd) -> Option<(Vec<u8>, i32)> {
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the handle.
    let mut buf = vec![0u8; 8 + MAX_HANDLE_SZ];
    buf[0..4].copy_from_slice(&(MAX_HANDLE_SZ as u32).to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is a struct file_handle with room for MAX_HANDLE_SZ bytes, the path is
    // NUL-terminated, and `mount_id` is a valid destination.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd,
            c"".as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r < 0 {
        return None;
    }
    let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
    buf.truncate(8 + len.min(MAX_HANDLE_SZ));
    Some((buf, mount_id))
}

impl PassthroughFs {
    /// Opens `dir` as the root of a share. Fails if it is not a directory that can be opened.
    pub fn new(dir: &Path, cfg: Config) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `path` is a valid NUL-terminated string; open has no other memory effects.
        let fd = cvt(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let st = stat_fd(file.as_raw_fd())?;
        let root = Arc::new(Inode {
            fd: NodeFd::Fd(file),
            key: (st.st_dev, st.st_ino),
            refs: AtomicU64::new(2),
        });
        let mut map = InodeMap::default();
        map.by_id.insert(ROOT_ID, root.clone());
        map.by_key.insert(root.key, ROOT_ID);
        // SAFETY: geteuid has no memory effects.
        let root_user = unsafe { libc::geteuid() } == 0;
        let budget = cfg.node_fds.map_or_else(fd_budget, |n| n as i64);
        let fs = PassthroughFs {
            fd_budget: AtomicI64::new(budget),
            fd_budget_start: budget,
            use_handles: root_user,
            mounts: Mutex::new(HashMap::new()),
            cfg,
            inodes: RwLock::new(map),
            next_inode: AtomicU64::new(ROOT_ID + 1),
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            root,
            switch_creds: root_user,
            stateless_dirs: AtomicBool::new(false),
        };
        fs.register_root_mount();
        Ok(fs)
    }

    /// Makes the root's mount known, so handles on it can be opened from the first node on.
    fn register_root_mount(&self) {
        if !self.use_handles {
            return;
        }
        if let Ok(root) = self.root.fd() {
            if let Some((_, mount_id)) = file_handle(root.as_raw_fd()) {
                if let PathFd::Borrowed(f) = root {
                    let _ = self.mount_fd(mount_id, f, true);
                }
            }
        }
    }

    /// This share's options.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Nodes the guest currently holds (the root included).
    pub fn inode_count(&self) -> usize {
        self.inodes.read().map(|m| m.by_id.len()).unwrap_or(0)
    }

    /// Open file and directory handles.
    pub fn handle_count(&self) -> usize {
        self.handles.read().map(|m| m.len()).unwrap_or(0)
    }

    fn inode(&self, id: u64) -> io::Result<Arc<Inode>> {
        if id == ROOT_ID {
            return Ok(self.root.clone());
        }
        let map = self.inodes.read().map_err(|_| ebadf())?;
        map.by_id.get(&id).cloned().ok_or_else(ebadf)
    }

    fn handle(&self, fh: u64) -> io::Result<Arc<Handle>> {
        let map = self.handles.read().map_err(|_| ebadf())?;
        map.get(&fh).cloned().ok_or_else(ebadf)
    }

    fn add_handle(&self, file: File, inode: u64) -> io::Result<u64> {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(Handle {
            file,
            dir_pos: Mutex::new(()),
            inode,
            lock_pid: AtomicU32::new(0),
        });
        self.handles.write().map_err(|_| ebadf())?.insert(fh, h);
        Ok(fh)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.cfg.readonly {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// ENOSYS when the share has xattrs off; the guest then asks no more.
    fn check_xattr_on(&self) -> io::Result<()> {
        if self.cfg.no_xattr {
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        } else {
            Ok(())
        }
    }

    fn entry(&self, inode: u64, attr: libc::stat64) -> Entry {
        let t = self.cfg.cache.attr_timeout();
        Entry {
            inode,
            attr: self.guest_ids(attr),
            attr_timeout: t,
            entry_timeout: t,
        }
    }

    /// `st` with its owner and group as the guest names them.
    fn guest_ids(&self, mut st: libc::stat64) -> libc::stat64 {
        st.st_uid = self.cfg.uid_map.to_guest(st.st_uid);
        st.st_gid = self.cfg.gid_map.to_guest(st.st_gid);
        st
    }

    /// The guest caller `ctx` with its ids as the host names them.
    fn host_ctx(&self, ctx: Context) -> Context {
        Context {
            uid: self.cfg.uid_map.to_host(ctx.uid),
            gid: self.cfg.gid_map.to_host(ctx.gid),
            ..ctx
        }
    }

    /// Opens `name` in `parent` as a node and registers it (or takes another reference to the
    /// node already registered for the same host inode).
    fn do_lookup(&self, parent_id: u64, parent: &Inode, name: &CStr) -> io::Result<Entry> {
        self.do_lookup_hinted(parent_id, parent, name, None)
    }

    /// As [`Self::do_lookup`]; `listed_ino` is the inode number a directory listing gave for
    /// `name`. When no node is registered for it, the name is most likely new to the guest,
    /// and the fstatat that would find a registered node is skipped.
    fn do_lookup_hinted(
        &self,
        parent_id: u64,
        parent: &Inode,
        name: &CStr,
        listed_ino: Option<u64>,
    ) -> io::Result<Entry> {
        let name_b = name.to_bytes();
        // ".." of the root is the root: the guest never gets above the share.
        if (name_b == b".." || name_b == b".") && parent.key == self.root.key {
            let st = stat_fd(self.root.fd()?.as_raw_fd())?;
            self.root.refs.fetch_add(1, Ordering::Relaxed);
            return Ok(self.entry(ROOT_ID, st));
        }
        let parent_fd = parent.fd()?;
        // A node the guest already holds needs no descriptor of its own: one fstatat answers
        // (revalidation after the entry timeout, READDIRPLUS over a listed directory). A
        // mount point lists the inode under it, so a wrong hint only costs the open below,
        // which checks the key again.
        let known = match listed_ino {
            Some(ino) => self.is_registered((parent.key.0, ino))?,
            None => true,
        };
        if known {
            let st = stat_at(parent_fd.as_raw_fd(), name)?;
            let map = self.inodes.read().map_err(|_| ebadf())?;
            if let Some(id) = map.take_ref((st.st_dev, st.st_ino)) {
                return Ok(self.entry(id, st));
            }
        }
        // SAFETY: the parent fd is valid, `name` is NUL-terminated; O_NOFOLLOW keeps a
        // symlink a symlink instead of following it.
        let fd = cvt(unsafe {
            libc::openat(
                parent_fd.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        // The name may have been replaced since the fstatat: what was opened is what counts.
        let st = stat_fd(file.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut map = self.inodes.write().map_err(|_| ebadf())?;
        if let Some(id) = map.take_ref(key) {
            return Ok(self.entry(id, st));
        }
        if map.by_id.len() >= MAX_NODES {
            log::warn!(
                "the guest holds {MAX_NODES} nodes of this share; refusing more until it forgets some"
            );
            return Err(io::Error::from_raw_os_error(libc::ENFILE));
        }
        let fd = self.node_fd(
            file,
            st.st_mode & libc::S_IFMT == libc::S_IFDIR,
            (parent_id, name),
        )?;
        let id = self.next_inode.fetch_add(1, Ordering::Relaxed);
        map.by_id.insert(
            id,
            Arc::new(Inode {
                fd,
                key,
                refs: AtomicU64::new(1),
            }),
        );
        map.by_key.insert(key, id);
        Ok(self.entry(id, st))
    }

    /// Whether a node is registered for host inode `key`.
    fn is_registered(&self, key: (u64, u64)) -> io::Result<bool> {
        Ok(self
            .inodes
            .read()
            .map_err(|_| ebadf())?
            .by_key
            .contains_key(&key))
    }

    /// Keeps `file` open while the descriptor budget lasts; past it, keeps a file handle
    /// instead (when running as root on a file system that gives handles).
    fn node_fd(&self, file: File, is_dir: bool, at: (u64, &CStr)) -> io::Result<NodeFd> {
        if self.fd_budget.fetch_sub(1, Ordering::Relaxed) > 0 {
            return Ok(NodeFd::Fd(file));
        }
        let handle = if self.use_handles {
            file_handle(file.as_raw_fd())
        } else {
            None
        };
        let mount = match &handle {
            Some((_, mount_id)) => self.mount_fd(*mount_id, &file, is_dir)?,
            None => None,
        };
        match (handle, mount) {
            (Some((handle, _)), Some(mount)) => {
                self.fd_budget.fetch_add(1, Ordering::Relaxed);
                Ok(NodeFd::Handle {
                    mount,
                    handle,
                    at: Mutex::new((at.0, at.1.to_owned())),
                })
            }
            // No handle to keep: the node keeps its descriptor past the budget.
            _ => Ok(NodeFd::Fd(file)),
        }
    }

    /// The descriptor handles on mount `mount_id` are opened against. open_by_handle_at wants
    /// a real (not O_PATH) descriptor: the first directory seen on a mount lends one.
    fn mount_fd(&self, mount_id: i32, file: &File, is_dir: bool) -> io::Result<Option<Arc<File>>> {
        let mut mounts = self.mounts.lock().map_err(|_| ebadf())?;
        if let Some(m) = mounts.get(&mount_id) {
            return Ok(Some(m.clone()));
        }
        if !is_dir {
            return Ok(None);
        }
        let p = proc_path(file.as_raw_fd());
        // SAFETY: `p` is NUL-terminated; open has no other memory effects.
        let fd = unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Ok(None);
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let m = Arc::new(unsafe { File::from_raw_fd(fd) });
        mounts.insert(mount_id, m.clone());
        Ok(Some(m))
    }

    /// Records that the file now named `name` in directory `dir` (node `dir_id`) is reached by
    /// that name, if it is a handle node.
    fn moved_to(&self, dir: RawFd, dir_id: u64, name: &CStr) {
        let Ok(st) = stat_at(dir, name) else {
            return;
        };
        let Ok(map) = self.inodes.read() else {
            return;
        };
        let Some(node) = map
            .by_key
            .get(&(st.st_dev, st.st_ino))
            .and_then(|id| map.by_id.get(id))
        else {
            return;
        };
        if let NodeFd::Handle { at, .. } = &node.fd {
            if let Ok(mut at) = at.lock() {
                *at = (dir_id, name.to_owned());
            }
        }
    }

    /// Gives a removed node's descriptor back to the budget.
    fn release_node(&self, node: &Inode) {
        if matches!(node.fd, NodeFd::Fd(_)) {
            self.fd_budget.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A descriptor of directory node `inode` to read it through.
    fn open_dir(&self, inode: u64) -> io::Result<File> {
        let node = self.inode(inode)?;
        self.reopen(&node, libc::O_RDONLY | libc::O_DIRECTORY)
    }

    /// Reopens a node with real access `flags` through /proc/self/fd.
    fn reopen(&self, node: &Inode, flags: i32) -> io::Result<File> {
        let nf = node.fd()?;
        match Self::reopen_fd(nf.as_raw_fd(), flags) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                // A handle node may have come back disconnected (see NodeFd::Handle): reach it
                // through its name, checked to still be the same file, and open that.
                match self.path_fd_by_name(node)? {
                    Some(f) => Self::reopen_fd(f.as_raw_fd(), flags),
                    None => Err(e),
                }
            }
            r => r,
        }
    }

    /// An `O_PATH` descriptor of handle node `node` opened through its parent and name, when
    /// that name still leads to it.
    fn path_fd_by_name(&self, node: &Inode) -> io::Result<Option<File>> {
        let NodeFd::Handle { at, .. } = &node.fd else {
            return Ok(None);
        };
        let (parent_id, name) = at.lock().map_err(|_| ebadf())?.clone();
        let Ok(parent) = self.inode(parent_id) else {
            return Ok(None);
        };
        let pfd = parent.fd()?;
        // SAFETY: the parent fd is valid and `name` is NUL-terminated.
        let fd = unsafe {
            libc::openat(
                pfd.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Ok(None);
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let st = stat_fd(file.as_raw_fd())?;
        Ok(((st.st_dev, st.st_ino) == node.key).then_some(file))
    }

    /// Opens the file `fd` refers to anew, with `flags`.
    fn reopen_fd(fd: RawFd, flags: i32) -> io::Result<File> {
        let p = proc_path(fd);
        // SAFETY: `p` is NUL-terminated; open has no other memory effects. O_NOFOLLOW is
        // dropped because the magic link itself must be followed to reach the node.
        let fd = cvt(unsafe {
            libc::open(
                p.as_ptr(),
                (flags | libc::O_CLOEXEC) & !libc::O_NOFOLLOW & !libc::O_CREAT,
            )
        })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The open flags to use on the host. With the writeback cache the kernel reads pages of
    /// files opened write-only and sends appends at explicit offsets, so a write-only open
    /// becomes read-write and O_APPEND is dropped.
    fn host_flags(&self, flags: u32) -> i32 {
        let mut f = flags as i32;
        if self.cfg.writeback {
            if f & libc::O_ACCMODE == libc::O_WRONLY {
                f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            f &= !libc::O_APPEND;
        }
        f
    }

    fn is_write(flags: u32) -> bool {
        let acc = flags as i32 & libc::O_ACCMODE;
        acc == libc::O_WRONLY || acc == libc::O_RDWR || flags as i32 & libc::O_TRUNC != 0
    }
}

impl FileSystem for PassthroughFs {
    fn init(&self, capable: InitFlags) -> io::Result<InitFlags> {
        self.stateless_dirs
            .store(capable & abi::NO_OPENDIR_SUPPORT != 0, Ordering::Relaxed);
        let mut f = abi::ASYNC_READ
            | abi::ATOMIC_O_TRUNC
            | abi::EXPORT_SUPPORT
            | abi::BIG_WRITES
            | abi::DO_READDIRPLUS
            | abi::READDIRPLUS_AUTO
            | abi::PARALLEL_DIROPS
            | abi::POSIX_LOCKS
            | abi::FLOCK_LOCKS
            // The guest then caches "nothing to clear" per inode (SB_NOSEC) instead of asking
            // for security.capability before every write; kill_suidgid does the clearing.
            | abi::HANDLE_KILLPRIV_V2;
        if self.cfg.cache == CachePolicy::Auto {
            f |= abi::AUTO_INVAL_DATA;
        }
        if self.cfg.writeback && !self.cfg.readonly {
            f |= abi::WRITEBACK_CACHE;
        }
        Ok(f)
    }

    fn destroy(&self) {
        if let Ok(mut h) = self.handles.write() {
            h.clear();
        }
        if let Ok(mut m) = self.inodes.write() {
            m.by_id.retain(|id, _| *id == ROOT_ID);
            m.by_key.retain(|_, id| *id == ROOT_ID);
        }
        if let Ok(mut m) = self.mounts.lock() {
            m.clear();
        }
        self.register_root_mount();
        self.fd_budget
            .store(self.fd_budget_start, Ordering::Relaxed);
    }

    fn lookup(&self, _ctx: Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let p = self.inode(parent)?;
        self.do_lookup(parent, &p, name)
    }

    fn lookup_listed(
        &self,
        _ctx: Context,
        parent: u64,
        name: &CStr,
        ino: u64,
    ) -> io::Result<Entry> {
        let p = self.inode(parent)?;
        self.do_lookup_hinted(parent, &p, name, Some(ino))
    }

    fn forget(&self, inode: u64, count: u64) {
        if inode == ROOT_ID {
            return;
        }
        let Ok(mut map) = self.inodes.write() else {
            return;
        };
        let Some(node) = map.by_id.get(&inode) else {
            return;
        };
        // Saturate: a guest that forgets more than it looked up only drops the node.
        let old = node.refs.load(Ordering::Relaxed);
        let new = old.saturating_sub(count);
        node.refs.store(new, Ordering::Relaxed);
        if new == 0 {
            let key = node.key;
            self.release_node(node);
            map.by_id.remove(&inode);
            if map.by_key.get(&key) == Some(&inode) {
                map.by_key.remove(&key);
            }
        }
    }

    fn getattr(
        &self,
        _ctx: Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(libc::stat64, Duration)> {
        let st = match handle.and_then(|fh| self.handle(fh).ok()) {
            Some(h) => stat_fd(h.file.as_raw_fd())?,
            None => stat_fd(self.inode(inode)?.fd()?.as_raw_fd())?,
        };
        Ok((self.guest_ids(st), self.cfg.cache.attr_timeout()))
    }

    fn setattr(
        &self,
        _ctx: Context,
        inode: u64,
        handle: Option<u64>,
        args: SetattrArgs,
    ) -> io::Result<(libc::stat64, Duration)> {
        self.check_writable()?;
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        let fd = nf.as_raw_fd();
        let p = proc_path(fd);
        let st = stat_fd(fd)?;
        let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if let Some(mode) = args.mode {
            if is_link {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            // SAFETY: `p` is NUL-terminated; chmod has no other memory effects.
            cvt(unsafe { libc::chmod(p.as_ptr(), mode & 0o7777) })?;
        }
        if args.uid.is_some() || args.gid.is_some() {
            let uid = args.uid.map_or(u32::MAX, |u| self.cfg.uid_map.to_host(u));
            let gid = args.gid.map_or(u32::MAX, |g| self.cfg.gid_map.to_host(g));
            // SAFETY: the fd is valid and the empty path is NUL-terminated.
            cvt(unsafe {
                libc::fchownat(
                    fd,
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if let Some(size) = args.size {
            let size =
                i64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
            // Ferry's own credentials, as for OPEN: the guest kernel checked the caller's
            // permission (virtiofs mounts with default_permissions), and reopening through
            // /proc/self/fd as another fsuid is refused. Clearing suid/sgid is asked for
            // separately (FATTR_KILL_SUIDGID).
            let res = match handle.and_then(|fh| self.handle(fh).ok()) {
                // SAFETY: the handle's fd is valid; ftruncate has no memory effects.
                Some(h) => cvt(unsafe { libc::ftruncate64(h.file.as_raw_fd(), size) }),
                None => {
                    let f = self.reopen(&node, libc::O_WRONLY)?;
                    // SAFETY: as above.
                    cvt(unsafe { libc::ftruncate64(f.as_raw_fd(), size) })
                }
            };
            res?;
        }
        if args.atime.is_some() || args.mtime.is_some() {
            let ts = |t: Option<TimeSpec>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(TimeSpec::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(TimeSpec::At(s, ns)) => libc::timespec {
                    tv_sec: s,
                    tv_nsec: i64::from(ns),
                },
            };
            let times = [ts(args.atime), ts(args.mtime)];
            if is_link {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            // SAFETY: `p` is NUL-terminated and `times` holds two timespecs.
            cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })?;
        }
        Ok((self.guest_ids(stat_fd(fd)?), self.cfg.cache.attr_timeout()))
    }

    fn readlink(&self, _ctx: Context, inode: u64) -> io::Result<Vec<u8>> {
        let node = self.inode(inode)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: the fd is valid, the empty path is NUL-terminated and `buf` has the room
        // given.
        let n = unsafe {
            libc::readlinkat(
                node.fd()?.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn symlink(&self, ctx: Context, target: &CStr, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.check_writable()?;
        let p = self.inode(parent)?;
        {
            let _c = CredGuard::new(self.switch_creds, self.host_ctx(ctx));
            // SAFETY: both strings are NUL-terminated and the fd is valid.
            cvt(unsafe { libc::symlinkat(target.as_ptr(), p.fd()?.as_raw_fd(), name.as_ptr()) })?;
        }
        self.do_lookup(parent, &p, name)
    }

    fn mknod(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        // FIFOs, sockets and plain files only: a device node made by the guest would open the
        // host's device through the share.
        match mode & libc::S_IFMT {
            libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFREG => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EPERM)),
        }
        let p = self.inode(parent)?;
        {
            let _c = CredGuard::new(self.switch_creds, self.host_ctx(ctx));
            // SAFETY: the name is NUL-terminated and the fd is valid.
            cvt(unsafe {
                libc::mknodat(p.fd()?.as_raw_fd(), name.as_ptr(), mode, u64::from(rdev))
            })?;
        }
        self.do_lookup(parent, &p, name)
    }

    fn mkdir(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let p = self.inode(parent)?;
        {
            let _c = CredGuard::new(self.switch_creds, self.host_ctx(ctx));
            // SAFETY: the name is NUL-terminated and the fd is valid.
            cvt(unsafe { libc::mkdirat(p.fd()?.as_raw_fd(), name.as_ptr(), mode) })?;
        }
        self.do_lookup(parent, &p, name)
    }

    fn unlink(&self, _ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        let p = self.inode(parent)?;
        // SAFETY: the name is NUL-terminated and the fd is valid.
        cvt(unsafe { libc::unlinkat(p.fd()?.as_raw_fd(), name.as_ptr(), 0) }).map(|_| ())
    }

    fn rmdir(&self, _ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        let p = self.inode(parent)?;
        // SAFETY: the name is NUL-terminated and the fd is valid.
        cvt(unsafe { libc::unlinkat(p.fd()?.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
            .map(|_| ())
    }

    fn rename(
        &self,
        _ctx: Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        // Not RENAME_WHITEOUT: it makes a character device.
        let allowed = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !allowed != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let o = self.inode(olddir)?;
        let n = self.inode(newdir)?;
        let (ofd, nfd) = (o.fd()?, n.fd()?);
        // SAFETY: names are NUL-terminated and the fds are valid.
        cvt(unsafe {
            libc::renameat2(
                ofd.as_raw_fd(),
                oldname.as_ptr(),
                nfd.as_raw_fd(),
                newname.as_ptr(),
                flags,
            )
        })?;
        // Handle nodes keep the name they are reached by (see NodeFd::Handle).
        if self.use_handles {
            self.moved_to(nfd.as_raw_fd(), newdir, newname);
            if flags & libc::RENAME_EXCHANGE != 0 {
                self.moved_to(ofd.as_raw_fd(), olddir, oldname);
            }
        }
        Ok(())
    }

    fn link(&self, ctx: Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.check_writable()?;
        let node = self.inode(inode)?;
        let p = self.inode(newparent)?;
        let nf = node.fd()?;
        let src = proc_path(nf.as_raw_fd());
        {
            let _c = CredGuard::new(self.switch_creds, self.host_ctx(ctx));
            // SAFETY: paths are NUL-terminated and the fd is valid. AT_SYMLINK_FOLLOW follows
            // the /proc magic link to the node itself (a symlink stays a symlink).
            cvt(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    src.as_ptr(),
                    p.fd()?.as_raw_fd(),
                    newname.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })?;
        }
        self.do_lookup(newparent, &p, newname)
    }

    fn open(&self, _ctx: Context, inode: u64, flags: u32) -> io::Result<(u64, u32)> {
        if Self::is_write(flags) {
            self.check_writable()?;
        }
        let node = self.inode(inode)?;
        // With ferry's own credentials, as virtiofsd does: the guest kernel has checked the
        // caller's permission (virtiofs mounts with default_permissions), and /proc/self/fd
        // refuses a reopen by another fsuid (EPERM for every non-root guest user).
        let f = self.reopen(&node, self.host_flags(flags))?;
        Ok((self.add_handle(f, inode)?, self.cfg.cache.open_flags()))
    }

    fn create(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        flags: u32,
        _umask: u32,
    ) -> io::Result<(Entry, u64, u32)> {
        self.check_writable()?;
        let p = self.inode(parent)?;
        let fd = {
            let _c = CredGuard::new(self.switch_creds, self.host_ctx(ctx));
            // SAFETY: the name is NUL-terminated and the fd is valid. O_NOFOLLOW: a symlink
            // at `name` is refused, never followed.
            cvt(unsafe {
                libc::openat(
                    p.fd()?.as_raw_fd(),
                    name.as_ptr(),
                    (self.host_flags(flags) | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW)
                        & !libc::O_DIRECTORY,
                    mode,
                )
            })?
        };
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let entry = self.do_lookup(parent, &p, name)?;
        let fh = self.add_handle(file, entry.inode)?;
        Ok((entry, fh, self.cfg.cache.open_flags()))
    }

    fn read(
        &self,
        _ctx: Context,
        _inode: u64,
        handle: u64,
        w: &mut dyn FileWriter,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        let h = self.handle(handle)?;
        w.write_from_file_at(&h.file, size as usize, offset)
    }

    fn write(
        &self,
        _ctx: Context,
        _inode: u64,
        handle: u64,
        r: &mut dyn FileReader,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        self.check_writable()?;
        let h = self.handle(handle)?;
        r.read_to_file_at(&h.file, size as usize, offset)
    }

    fn kill_suidgid(&self, _ctx: Context, inode: u64, handle: Option<u64>) -> io::Result<()> {
        self.check_writable()?;
        // Through /proc: the node's own fd is O_PATH, which fchmod does not take.
        let path = match handle {
            Some(fh) => format!("/proc/self/fd/{}", self.handle(fh)?.file.as_raw_fd()),
            None => {
                let node = self.inode(inode)?;
                let fd = node.fd()?;
                format!("/proc/self/fd/{}", fd.as_raw_fd())
            }
        };
        let c = std::ffi::CString::new(path).map_err(|_| ebadf())?;
        // SAFETY: stat64 is plain old data; all-zero is a valid value.
        let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `st` a valid destination.
        cvt(unsafe { libc::stat64(c.as_ptr(), &mut st) })?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(());
        }
        let mut clear = libc::S_ISUID;
        if st.st_mode & libc::S_IXGRP != 0 {
            // Set-group-ID without group execute means mandatory locking: kept, as Linux does.
            clear |= libc::S_ISGID;
        }
        if st.st_mode & clear != 0 {
            // SAFETY: `c` is a valid C string.
            cvt(unsafe { libc::chmod(c.as_ptr(), st.st_mode & 0o7777 & !clear) })?;
        }
        // SAFETY: both arguments are valid C strings; ENODATA just means there was none.
        let r = unsafe { libc::removexattr(c.as_ptr(), c"security.capability".as_ptr()) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP)) {
                return Err(e);
            }
        }
        Ok(())
    }

    fn statfs(&self, _ctx: Context, inode: u64) -> io::Result<libc::statvfs64> {
        let node = self.inode(inode)?;
        // SAFETY: statvfs64 is plain old data; all-zero is a valid value.
        let mut st: libc::statvfs64 = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is valid and `st` is a valid destination of the right type.
        cvt(unsafe { libc::fstatvfs64(node.fd()?.as_raw_fd(), &mut st) })?;
        Ok(st)
    }

    fn release(&self, _ctx: Context, _inode: u64, handle: u64) -> io::Result<()> {
        self.handles.write().map_err(|_| ebadf())?.remove(&handle);
        Ok(())
    }

    fn fsync(&self, _ctx: Context, _inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let h = self.handle(handle)?;
        sync_fd(h.file.as_raw_fd(), datasync)
    }

    fn flush(&self, _ctx: Context, _inode: u64, handle: u64) -> io::Result<()> {
        let h = self.handle(handle)?;
        // close(dup(fd)) gives the host file system the close it would see locally (and drops
        // POSIX locks of this owner), without closing the handle.
        // A close releases the closer's POSIX locks on the file; the host's locks here belong
        // to the handle (open file description), so release those.
        if h.lock_pid.swap(0, Ordering::Relaxed) != 0 {
            let mut fl = posix_lock(FileLock {
                start: 0,
                end: abi::OFFSET_MAX,
                type_: libc::F_UNLCK as u32,
                pid: 0,
            })?;
            // SAFETY: the fd is valid and `fl` is a valid struct flock.
            let _ = unsafe { libc::fcntl(h.file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        }
        // SAFETY: dup and close on a valid fd have no memory effects.
        let d = cvt(unsafe { libc::dup(h.file.as_raw_fd()) })?;
        // SAFETY: `d` is ours.
        cvt(unsafe { libc::close(d) }).map(|_| ())
    }

    fn setxattr(
        &self,
        _ctx: Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.check_xattr_on()?;
        self.check_writable()?;
        check_xattr_name(name)?;
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        let p = proc_path(nf.as_raw_fd());
        // SAFETY: strings are NUL-terminated and `value` is valid for its length.
        cvt(unsafe {
            libc::setxattr(
                p.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags as i32,
            )
        })
        .map(|_| ())
    }

    fn getxattr(&self, _ctx: Context, inode: u64, name: &CStr, size: u32) -> io::Result<Vec<u8>> {
        self.check_xattr_on()?;
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        let p = proc_path(nf.as_raw_fd());
        let mut buf = vec![0u8; size as usize];
        // SAFETY: strings are NUL-terminated and `buf` has the room given (0 asks for the
        // size only).
        let n = unsafe {
            libc::getxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        xattr_result(n, size, buf)
    }

    fn listxattr(&self, _ctx: Context, inode: u64, size: u32) -> io::Result<Vec<u8>> {
        self.check_xattr_on()?;
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        let p = proc_path(nf.as_raw_fd());
        let mut buf = vec![0u8; size as usize];
        // SAFETY: the path is NUL-terminated and `buf` has the room given.
        let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        xattr_result(n, size, buf)
    }

    fn removexattr(&self, _ctx: Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.check_xattr_on()?;
        self.check_writable()?;
        check_xattr_name(name)?;
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        let p = proc_path(nf.as_raw_fd());
        // SAFETY: strings are NUL-terminated.
        cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(|_| ())
    }

    fn opendir(&self, _ctx: Context, inode: u64, _flags: u32) -> io::Result<(u64, u32)> {
        if self.stateless_dirs.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let f = self.open_dir(inode)?;
        Ok((self.add_handle(f, inode)?, 0))
    }

    fn readdir(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> bool,
    ) -> io::Result<()> {
        if handle == 0 {
            // No OPENDIR (see `stateless_dirs`): a descriptor of this request's own. The
            // offsets the guest passes are the host's d_off cookies, which hold across opens
            // (NFS servers rely on that too).
            return read_dir_at(&self.open_dir(inode)?, offset, add);
        }
        let h = self.handle(handle)?;
        let _pos = h.dir_pos.lock().map_err(|_| ebadf())?;
        read_dir_at(&h.file, offset, add)
    }

    fn releasedir(&self, _ctx: Context, _inode: u64, handle: u64) -> io::Result<()> {
        self.handles.write().map_err(|_| ebadf())?.remove(&handle);
        Ok(())
    }

    fn fsyncdir(&self, ctx: Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        if handle == 0 {
            return sync_fd(self.open_dir(inode)?.as_raw_fd(), datasync);
        }
        self.fsync(ctx, inode, datasync, handle)
    }

    fn access(&self, ctx: Context, inode: u64, mask: u32) -> io::Result<()> {
        let node = self.inode(inode)?;
        // Checked as the guest sees it: the caller's ids against the owner it is shown.
        let st = self.guest_ids(stat_fd(node.fd()?.as_raw_fd())?);
        let mask = mask as i32;
        if mask == libc::F_OK {
            return Ok(());
        }
        if mask & libc::W_OK != 0 && self.cfg.readonly {
            return Err(erofs());
        }
        let mode = st.st_mode;
        let denied = || Err(io::Error::from_raw_os_error(libc::EACCES));
        if ctx.uid == 0 {
            // root may read and write anything, and execute what anyone may execute.
            if mask & libc::X_OK != 0 && mode & 0o111 == 0 && mode & libc::S_IFMT != libc::S_IFDIR {
                return denied();
            }
            return Ok(());
        }
        let bits = if st.st_uid == ctx.uid {
            (mode >> 6) & 7
        } else if st.st_gid == ctx.gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        let want = ((mask & libc::R_OK != 0) as u32) << 2
            | ((mask & libc::W_OK != 0) as u32) << 1
            | (mask & libc::X_OK != 0) as u32;
        if bits & want != want {
            return denied();
        }
        Ok(())
    }

    fn fallocate(
        &self,
        _ctx: Context,
        _inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        let h = self.handle(handle)?;
        let off = off_t(offset)?;
        let len = off_t(length)?;
        // SAFETY: the fd is valid; fallocate has no memory effects.
        cvt(unsafe { libc::fallocate64(h.file.as_raw_fd(), mode as i32, off, len) }).map(|_| ())
    }

    fn lseek(
        &self,
        _ctx: Context,
        _inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let h = self.handle(handle)?;
        let off = off_t(offset)?;
        // SAFETY: the fd is valid; lseek has no memory effects.
        let r = unsafe { libc::lseek64(h.file.as_raw_fd(), off, whence as i32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as u64)
    }

    fn copy_file_range(
        &self,
        _ctx: Context,
        _inode_in: u64,
        handle_in: u64,
        offset_in: u64,
        _inode_out: u64,
        handle_out: u64,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        self.check_writable()?;
        let i = self.handle(handle_in)?;
        let o = self.handle(handle_out)?;
        let mut off_in = off_t(offset_in)?;
        let mut off_out = off_t(offset_out)?;
        let len = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(isize::MAX as usize);
        // SAFETY: fds are valid and the offsets are valid places to update.
        let n = unsafe {
            libc::copy_file_range(
                i.file.as_raw_fd(),
                &mut off_in,
                o.file.as_raw_fd(),
                &mut off_out,
                len,
                flags as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn getlk(
        &self,
        _ctx: Context,
        _inode: u64,
        handle: u64,
        _owner: u64,
        lock: FileLock,
    ) -> io::Result<FileLock> {
        let h = self.handle(handle)?;
        let mut fl = posix_lock(lock)?;
        // SAFETY: the fd is valid and `fl` is a valid struct flock.
        cvt(unsafe { libc::fcntl(h.file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) })?;
        if fl.l_type == libc::F_UNLCK as libc::c_short {
            return Ok(FileLock {
                type_: libc::F_UNLCK as u32,
                ..lock
            });
        }
        // The holder: a guest process that locked through another handle on this node, or
        // (pid 0) someone on the host.
        let pid = self
            .handles
            .read()
            .map_err(|_| ebadf())?
            .iter()
            .filter(|(fh, o)| **fh != handle && o.inode == h.inode)
            .map(|(_, o)| o.lock_pid.load(Ordering::Relaxed))
            .find(|p| *p != 0)
            .unwrap_or(0);
        let start = fl.l_start as u64;
        Ok(FileLock {
            start,
            end: if fl.l_len == 0 {
                abi::OFFSET_MAX
            } else {
                start + fl.l_len as u64 - 1
            },
            type_: fl.l_type as u32,
            pid,
        })
    }

    fn setlk(
        &self,
        _ctx: Context,
        _inode: u64,
        handle: u64,
        _owner: u64,
        lock: FileLock,
        flock: bool,
    ) -> io::Result<()> {
        let h = self.handle(handle)?;
        let fd = h.file.as_raw_fd();
        let res = if flock {
            let op = match lock.type_ as i32 {
                libc::F_RDLCK => libc::LOCK_SH,
                libc::F_WRLCK => libc::LOCK_EX,
                libc::F_UNLCK => libc::LOCK_UN,
                _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
            // SAFETY: the fd is valid; flock has no memory effects.
            cvt(unsafe { libc::flock(fd, op | libc::LOCK_NB) })
        } else {
            let mut fl = posix_lock(lock)?;
            // SAFETY: the fd is valid and `fl` is a valid struct flock.
            cvt(unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl) })
        };
        match res {
            Ok(_) => {
                if lock.type_ != libc::F_UNLCK as u32 && !flock {
                    h.lock_pid.store(lock.pid.max(1), Ordering::Relaxed);
                }
                Ok(())
            }
            // A conflicting holder: the same answer for both lock kinds.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EWOULDBLOCK)) => {
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            }
            Err(e) => Err(e),
        }
    }

    fn syncfs(&self, _ctx: Context, _inode: u64) -> io::Result<()> {
        let f = self.reopen(&self.root, libc::O_RDONLY | libc::O_DIRECTORY)?;
        // SAFETY: the fd is valid; syncfs has no memory effects.
        cvt(unsafe { libc::syncfs(f.as_raw_fd()) }).map(|_| ())
    }
}
