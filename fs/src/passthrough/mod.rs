//! `PassthroughFs`: serves a host directory to the guest.
//!
//! Every node the guest knows is an `O_PATH` file descriptor the server holds, and everything is
//! resolved relative to those descriptors with `*at` calls and `O_NOFOLLOW`, never by joining
//! paths. The server never follows a symlink on the guest's behalf, and `..` at the share's
//! root is the root itself, so the guest cannot name anything outside the share. Operations
//! that need a real file descriptor reopen a node through `/proc/self/fd`, which reaches the
//! same inode without walking a path.

mod acl;
mod attr;
mod config;
mod idmap;
mod inode;
mod locks;
mod make;
mod ownership;
mod paths;
mod quick;
mod seclabel;
mod submounts;
mod sys;
mod xattr;
mod xattrmap;

pub use config::{CachePolicy, Config};
pub use idmap::{IdMap, IdMaps};
pub use xattrmap::{HostName, XattrMap, XattrRule};

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::abi::{self, ROOT_ID};
use crate::filesystem::{
    Context, DirEntry, Entry, FileLock, FileReader, FileSystem, FileWriter, InitFlags, SecCtx,
    SetattrArgs,
};
use inode::{fd_budget, file_handle, Handle, Inode, InodeMap, NodeFd, PathFd};
use locks::posix_lock;
use sys::{cvt, ebadf, erofs, off_t, read_dir_at, stat_fd, sync_fd};

/// A file system that passes requests through to a host directory.
pub struct PassthroughFs {
    cfg: Config,
    inodes: RwLock<InodeMap>,
    next_inode: AtomicU64,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    root: Arc<Inode>,
    /// Whether the server may take other ids when creating files (it runs as root).
    switch_creds: bool,
    /// The share folder's owner and group: whom new host files belong to on a share that
    /// emulates ownership, when ferry runs as root.
    share_owner: (u32, u32),
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
    /// Whether nodes of this share may keep ownership the guest set (see `ownership`): the
    /// share's folder is marked once ferry keeps some in it. Until then nodes are not asked,
    /// which spares a cold walk a system call per node.
    keeps_ownership: AtomicBool,
    /// The host file systems the share spans (see `submounts`).
    spanned: submounts::Spanned,
    /// The guest sends create modes unmasked (FUSE_DONT_MASK, asked for with `posix_acl`).
    dont_mask: AtomicBool,
}

/// The most nodes the guest may hold per share: past it, LOOKUP answers ENFILE.
const MAX_NODES: usize = 1 << 21;

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
            owner: Mutex::new(None),
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
            share_owner: (st.st_uid, st.st_gid),
            stateless_dirs: AtomicBool::new(false),
            keeps_ownership: AtomicBool::new(false),
            spanned: submounts::Spanned::new(st.st_dev),
            dont_mask: AtomicBool::new(false),
        };
        let root_fd = fs.root.fd()?.as_raw_fd();
        fs.keeps_ownership.store(
            !fs.cfg.trusted && ownership::is_marked(root_fd),
            Ordering::Relaxed,
        );
        fs.root.set_ownership(fs.kept_ownership(root_fd, &st));
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
            quick: std::sync::OnceLock::new(),
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

    /// The guest caller `ctx` with its ids as the host names them.
    fn host_ctx(&self, ctx: Context) -> Context {
        Context {
            uid: self.cfg.uid_map.to_host(ctx.uid),
            gid: self.cfg.gid_map.to_host(ctx.gid),
            ..ctx
        }
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
        self.spanned.set_announce(capable & abi::SUBMOUNTS != 0);
        let mut f = abi::SUBMOUNTS
            | abi::ASYNC_READ
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
        // ACLs need the umask apart (see `acl`): without DONT_MASK, none.
        let acls = self.cfg.posix_acl && !self.cfg.no_xattr && capable & abi::DONT_MASK != 0;
        self.dont_mask.store(acls, Ordering::Relaxed);
        if acls {
            f |= abi::POSIX_ACL | abi::DONT_MASK;
        }
        if self.takes_labels() {
            if capable & abi::SECURITY_CTX != 0 {
                f |= abi::SECURITY_CTX;
            } else {
                log::warn!(
                    "the guest's kernel does not send security labels (FUSE_SECURITY_CTX, Linux 5.17 and later): what it makes on this share is not labelled until it is told with setfattr"
                );
            }
        }
        Ok(f)
    }

    fn node_path(&self, inode: u64) -> Option<String> {
        self.path_of(inode)
    }

    fn destroy(&self) {
        // Closed after the lock is let go, as in `release`.
        let open = self.handles.write().map(|mut h| std::mem::take(&mut *h));
        drop(open);
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
        let node = self.inode(inode)?;
        let st = match handle.and_then(|fh| self.handle(fh).ok()) {
            Some(h) => stat_fd(h.file.as_raw_fd())?,
            None => stat_fd(node.fd()?.as_raw_fd())?,
        };
        Ok((self.guest_attr(&node, st), self.cfg.cache.attr_timeout()))
    }

    fn setattr(
        &self,
        ctx: Context,
        inode: u64,
        handle: Option<u64>,
        args: SetattrArgs,
    ) -> io::Result<(libc::stat64, Duration)> {
        self.set_attr(ctx, inode, handle, args)
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

    fn symlink(
        &self,
        ctx: Context,
        target: &CStr,
        parent: u64,
        name: &CStr,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<Entry> {
        self.make_symlink(ctx, target, parent, name, secctx)
    }

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
        self.make_node(ctx, parent, name, mode, rdev, umask, secctx)
    }

    fn mkdir(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<Entry> {
        self.make_dir(ctx, parent, name, mode, umask, secctx)
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
        // RENAME_WHITEOUT only where devices are taken: it makes a character device (0:0, the
        // whiteout overlayfs uses).
        let mut allowed = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if self.cfg.devices {
            allowed |= libc::RENAME_WHITEOUT;
        }
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
        self.make_link(ctx, inode, newparent, newname)
    }

    fn open(&self, _ctx: Context, inode: u64, flags: u32) -> io::Result<(u64, u32)> {
        if Self::is_write(flags) {
            self.check_writable()?;
        }
        let node = self.inode(inode)?;
        // Only regular files: a guest kernel opens FIFOs, sockets and device nodes itself
        // (special inodes never reach the server). An OPEN of one is a crafted driver's, and
        // would block a thread of ferry's on a FIFO for good or open a host device.
        let st = stat_fd(node.fd()?.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
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
        umask: u32,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<(Entry, u64, u32)> {
        self.make_file(ctx, parent, name, mode, flags, umask, secctx)
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

    fn read_cached(
        &self,
        _ctx: Context,
        _inode: u64,
        handle: u64,
        w: &mut dyn FileWriter,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        quick::read(&*self.handle(handle)?, w, size, offset)
    }

    fn write_is_quick(&self, handle: u64) -> bool {
        self.handle(handle).is_ok_and(|h| h.quick().writes())
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

    fn kill_suidgid(&self, ctx: Context, inode: u64, handle: Option<u64>) -> io::Result<()> {
        self.kill_set_ids(ctx, inode, handle)
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
        // The last close of a file flushes it (NFS, a FUSE mount under the share): seconds,
        // during which the handle table must not be held, or every READ and WRITE of the
        // share waits too. The handle is dropped once the guard is.
        let gone = self.handles.write().map_err(|_| ebadf())?.remove(&handle);
        drop(gone);
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
        ctx: Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.set_xattr(ctx, inode, name, value, flags)
    }

    fn getxattr(&self, ctx: Context, inode: u64, name: &CStr, size: u32) -> io::Result<Vec<u8>> {
        self.get_xattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: Context, inode: u64, size: u32) -> io::Result<Vec<u8>> {
        self.list_xattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.remove_xattr(ctx, inode, name)
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
        // Inode numbers as the guest sees them (see `submounts`), when the share spans more
        // than its own file system.
        let dev = match self.spanned.spans() {
            true => Some(self.inode(inode)?.key.0),
            false => None,
        };
        let add = &mut |mut e: DirEntry<'_>| {
            if let Some(d) = dev {
                e.ino = self.spanned.guest_ino(d, e.ino);
            }
            add(e)
        };
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
        // Closed after the lock is let go, as in `release`.
        let gone = self.handles.write().map_err(|_| ebadf())?.remove(&handle);
        drop(gone);
        Ok(())
    }

    fn fsyncdir(&self, ctx: Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        if handle == 0 {
            return sync_fd(self.open_dir(inode)?.as_raw_fd(), datasync);
        }
        self.fsync(ctx, inode, datasync, handle)
    }

    fn access(&self, ctx: Context, inode: u64, mask: u32) -> io::Result<()> {
        self.check_access(ctx, inode, mask)
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
        ctx: Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
    ) -> io::Result<FileLock> {
        self.get_lock(ctx, inode, handle, owner, lock)
    }

    fn setlk(
        &self,
        ctx: Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flock: bool,
    ) -> io::Result<()> {
        self.set_lock(ctx, inode, handle, owner, lock, flock)
    }

    fn syncfs(&self, _ctx: Context, _inode: u64) -> io::Result<()> {
        let f = self.reopen(&self.root, libc::O_RDONLY | libc::O_DIRECTORY)?;
        // SAFETY: the fd is valid; syncfs has no memory effects.
        cvt(unsafe { libc::syncfs(f.as_raw_fd()) }).map(|_| ())
    }
}
