//! Nodes: how the server holds each host inode the guest knows (a descriptor, or a file
//! handle past the descriptor budget), looks names up, and reopens nodes for real I/O.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::ownership::{self, Ownership};
use super::quick::Quick;
use super::sys::{cvt, ebadf, open_node_at, proc_path, stat_at, stat_fd};
use super::{PassthroughFs, MAX_NODES};
use crate::abi::ROOT_ID;
use crate::filesystem::Entry;

/// How the server reaches a node.
pub(super) enum NodeFd {
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
pub(super) enum PathFd<'a> {
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
pub(super) struct Inode {
    /// How to reach it.
    pub(super) fd: NodeFd,
    /// (device, inode number) on the host: one node per host inode.
    pub(super) key: (u64, u64),
    /// Lookups the kernel holds.
    pub(super) refs: AtomicU64,
    /// The owner, group and mode the guest set, when they differ from the host file's (see
    /// `ownership`); read when the node is registered, kept up to date by SETATTR.
    pub(super) owner: Mutex<Option<Ownership>>,
}

#[derive(Default)]
pub(super) struct InodeMap {
    pub(super) by_id: HashMap<u64, Arc<Inode>>,
    pub(super) by_key: HashMap<(u64, u64), u64>,
}

impl InodeMap {
    /// Takes one more lookup reference on the node registered for host inode `key`, if any.
    /// FORGET drops nodes under the write lock, so holding either lock is enough.
    pub(super) fn take_ref(&self, key: (u64, u64)) -> Option<(u64, &Arc<Inode>)> {
        let id = *self.by_key.get(&key)?;
        let node = self.by_id.get(&id)?;
        node.refs.fetch_add(1, Ordering::Relaxed);
        Some((id, node))
    }
}

/// An open file or directory.
pub(super) struct Handle {
    pub(super) file: File,
    /// Serialises seek + getdents on directory handles.
    pub(super) dir_pos: Mutex<()>,
    /// The node the handle is open on.
    pub(super) inode: u64,
    /// The guest pid that last took a lock through this handle (0: none), which GETLK
    /// reports for the lock: the host's open-file-description locks carry no pid.
    pub(super) lock_pid: AtomicU32,
    /// Whether the queue's worker may read and write it itself (`quick.rs`), on first use.
    pub(super) quick: OnceLock<Quick>,
}

impl Handle {
    pub(super) fn quick(&self) -> &Quick {
        self.quick.get_or_init(|| Quick::of(&self.file))
    }
}

impl Inode {
    /// The ownership the guest set on this node, if it differs from the host file's.
    pub(super) fn ownership(&self) -> Option<Ownership> {
        self.owner.lock().map_or(None, |o| *o)
    }

    /// Records the ownership the node now keeps.
    pub(super) fn set_ownership(&self, o: Option<Ownership>) {
        if let Ok(mut g) = self.owner.lock() {
            *g = o;
        }
    }

    /// A descriptor for the node, valid while the returned value lives.
    pub(super) fn fd(&self) -> io::Result<PathFd<'_>> {
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
pub(super) fn fd_budget() -> i64 {
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
pub(super) fn file_handle(fd: RawFd) -> Option<(Vec<u8>, i32)> {
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
    /// Opens `name` in `parent` as a node and registers it (or takes another reference to the
    /// node already registered for the same host inode).
    pub(super) fn do_lookup(
        &self,
        parent_id: u64,
        parent: &Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.do_lookup_hinted(parent_id, parent, name, None)
    }

    /// As [`Self::do_lookup`]; `listed_ino` is the inode number a directory listing gave for
    /// `name`. When no node is registered for it, the name is most likely new to the guest,
    /// and the fstatat that would find a registered node is skipped.
    pub(super) fn do_lookup_hinted(
        &self,
        parent_id: u64,
        parent: &Inode,
        name: &CStr,
        listed_ino: Option<u64>,
    ) -> io::Result<Entry> {
        // The listing gave the number as the guest sees it (see `submounts`).
        let listed_ino = listed_ino.map(|i| self.spanned.guest_ino(parent.key.0, i));
        let entry = self.lookup_node(parent_id, parent, name, listed_ino)?;
        Ok(self.spanned.mark(entry, parent.key.0))
    }

    fn lookup_node(
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
            return Ok(self.entry(ROOT_ID, &self.root, st));
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
            if let Some((id, node)) = map.take_ref((st.st_dev, st.st_ino)) {
                return Ok(self.entry(id, node, st));
            }
        }
        let file = open_node_at(parent_fd.as_raw_fd(), name)?;
        // The name may have been replaced since the fstatat: what was opened is what counts.
        let st = stat_fd(file.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        // Before the write lock: a system call under it would hold up every other lookup.
        let owner = self.kept_ownership(file.as_raw_fd(), &st);
        let mut map = self.inodes.write().map_err(|_| ebadf())?;
        if let Some((id, node)) = map.take_ref(key) {
            return Ok(self.entry(id, node, st));
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
        let node = Arc::new(Inode {
            fd,
            key,
            refs: AtomicU64::new(1),
            owner: Mutex::new(owner),
        });
        let entry = self.entry(id, &node, st);
        map.by_id.insert(id, node);
        map.by_key.insert(key, id);
        Ok(entry)
    }

    /// The ownership host node `fd` (with attributes `st`) keeps, on a share that emulates
    /// ownership. One that cannot be read counts as none: the guest sees the host's values.
    pub(super) fn kept_ownership(&self, fd: RawFd, st: &libc::stat64) -> Option<Ownership> {
        if self.cfg.trusted
            || !self.keeps_ownership.load(Ordering::Relaxed)
            || !ownership::can_keep(st.st_mode & libc::S_IFMT)
        {
            return None;
        }
        ownership::read(fd).unwrap_or_else(|e| {
            log::debug!("cannot read the ownership a node keeps: {e}");
            None
        })
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
    pub(super) fn mount_fd(
        &self,
        mount_id: i32,
        file: &File,
        is_dir: bool,
    ) -> io::Result<Option<Arc<File>>> {
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
    pub(super) fn moved_to(&self, dir: RawFd, dir_id: u64, name: &CStr) {
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
    pub(super) fn release_node(&self, node: &Inode) {
        if matches!(node.fd, NodeFd::Fd(_)) {
            self.fd_budget.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A descriptor of directory node `inode` to read it through.
    pub(super) fn open_dir(&self, inode: u64) -> io::Result<File> {
        let node = self.inode(inode)?;
        self.reopen(&node, libc::O_RDONLY | libc::O_DIRECTORY)
    }

    /// Reopens a node with real access `flags` through /proc/self/fd.
    pub(super) fn reopen(&self, node: &Inode, flags: i32) -> io::Result<File> {
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
        let Ok(file) = open_node_at(pfd.as_raw_fd(), &name) else {
            return Ok(None);
        };
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
}
