//! Making nodes: files, folders, device nodes, FIFOs and sockets, symlinks and hard links.
//!
//! Each is made as the guest's caller would make it (`ownership::creating_as`), with the mode
//! the guest asked for (`acl::creation_mode` applies the umask where ACLs hand it over, and
//! `ownership::settle_mode` undoes what ferry's own umask took), labelled on a share that
//! takes the guest's security labels (`seclabel`), then looked up, and on a share that
//! emulates ownership given the caller's owner and mode (`ownership::adopt`).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use super::sys::{cvt, proc_path};
use super::PassthroughFs;
use crate::filesystem::{Context, Entry, SecCtx};

impl PassthroughFs {
    pub(super) fn make_symlink(
        &self,
        ctx: Context,
        target: &CStr,
        parent: u64,
        name: &CStr,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let p = self.inode(parent)?;
        let pfd = p.fd()?;
        {
            let _c = self.creating_as(ctx);
            // SAFETY: both strings are NUL-terminated and the fd is valid.
            cvt(unsafe { libc::symlinkat(target.as_ptr(), pfd.as_raw_fd(), name.as_ptr()) })?;
        }
        self.label_new(pfd.as_raw_fd(), name, libc::S_IFLNK, None, secctx)?;
        let entry = self.do_lookup(parent, &p, name)?;
        self.adopt(ctx, &p, entry, 0o777)
    }
    #[allow(clippy::too_many_arguments)] // the FUSE request's fields, as the trait's
    pub(super) fn make_node(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        // FIFOs, sockets and plain files only, unless the share takes devices: a device node
        // made by the guest would open the host's device through the share.
        match mode & libc::S_IFMT {
            libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFREG => {}
            libc::S_IFCHR | libc::S_IFBLK if self.cfg.devices => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EPERM)),
        }
        let p = self.inode(parent)?;
        let pfd = p.fd()?;
        let (mode, inherits) = self.creation_mode(&p, mode, umask);
        {
            let _c = self.creating_as(ctx);
            let host_mode = self.create_mode(mode, mode & libc::S_IFMT);
            // SAFETY: the name is NUL-terminated and the fd is valid.
            cvt(unsafe {
                libc::mknodat(pfd.as_raw_fd(), name.as_ptr(), host_mode, u64::from(rdev))
            })?;
        }
        self.label_new(pfd.as_raw_fd(), name, mode & libc::S_IFMT, None, secctx)?;
        let mut entry = self.do_lookup(parent, &p, name)?;
        let mode = self.settle_mode(&mut entry, mode, mode & libc::S_IFMT, inherits)?;
        self.adopt(ctx, &p, entry, mode)
    }
    pub(super) fn make_dir(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let p = self.inode(parent)?;
        let pfd = p.fd()?;
        let (mode, inherits) = self.creation_mode(&p, mode, umask);
        {
            let _c = self.creating_as(ctx);
            let host_mode = self.create_mode(mode, libc::S_IFDIR);
            // SAFETY: the name is NUL-terminated and the fd is valid.
            cvt(unsafe { libc::mkdirat(pfd.as_raw_fd(), name.as_ptr(), host_mode) })?;
        }
        self.label_new(pfd.as_raw_fd(), name, libc::S_IFDIR, None, secctx)?;
        let mut entry = self.do_lookup(parent, &p, name)?;
        let mode = self.settle_mode(&mut entry, mode, libc::S_IFDIR, inherits)?;
        self.adopt(ctx, &p, entry, mode)
    }
    pub(super) fn make_link(
        &self,
        ctx: Context,
        inode: u64,
        newparent: u64,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let node = self.inode(inode)?;
        let p = self.inode(newparent)?;
        let nf = node.fd()?;
        let src = proc_path(nf.as_raw_fd());
        {
            let _c = self.creating_as(ctx);
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
    #[allow(clippy::too_many_arguments)] // the FUSE request's fields, as the trait's
    pub(super) fn make_file(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        flags: u32,
        umask: u32,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<(Entry, u64, u32)> {
        self.check_writable()?;
        let p = self.inode(parent)?;
        let (mode, inherits) = self.creation_mode(&p, mode, umask);
        let pfd = p.fd()?;
        let host_mode = self.create_mode(mode, libc::S_IFREG);
        let open = |extra: i32| {
            // SAFETY: the name is NUL-terminated and the fd is valid. O_NOFOLLOW: a symlink
            // at `name` is refused, never followed.
            cvt(unsafe {
                libc::openat(
                    pfd.as_raw_fd(),
                    name.as_ptr(),
                    (self.host_flags(flags) | extra | libc::O_CLOEXEC | libc::O_NOFOLLOW)
                        & !libc::O_DIRECTORY,
                    host_mode,
                )
            })
        };
        // O_EXCL first: only a file this request made takes the caller's ownership. One that
        // appeared since the guest's lookup is opened as it is, as O_CREAT would.
        let (fd, made) = {
            let _c = self.creating_as(ctx);
            match open(libc::O_CREAT | libc::O_EXCL) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EEXIST)
                        && flags as i32 & libc::O_EXCL == 0 =>
                {
                    (open(0)?, false)
                }
                r => (r?, true),
            }
        };
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        if made {
            self.label_new(pfd.as_raw_fd(), name, libc::S_IFREG, Some(&file), secctx)?;
        }
        let mut entry = self.do_lookup(parent, &p, name)?;
        let entry = if made {
            let mode = self.settle_mode(&mut entry, mode, libc::S_IFREG, inherits)?;
            self.adopt(ctx, &p, entry, mode)?
        } else {
            entry
        };
        let fh = self.add_handle(file, entry.inode)?;
        Ok((entry, fh, self.cfg.cache.open_flags()))
    }
}
