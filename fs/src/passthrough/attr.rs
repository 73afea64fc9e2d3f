//! Attributes: what the guest is shown (ids mapped, ownership kept, inode numbers made
//! distinct across host file systems), SETATTR (mode, owner, size, times), the clearing of
//! set-id bits after a write by another user, and ACCESS, each through the ownership emulation
//! of `ownership` on a share that is not `trusted`.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::inode::Inode;
use super::ownership::Ownership;
use super::sys::{cvt, ebadf, erofs, proc_path, stat_fd};
use super::PassthroughFs;
use crate::filesystem::{Context, Entry, SetattrArgs, TimeSpec};

impl PassthroughFs {
    /// The guest's entry for `node` (its id `inode`, host attributes `attr`).
    pub(super) fn entry(&self, inode: u64, node: &Inode, attr: libc::stat64) -> Entry {
        let t = self.cfg.cache.attr_timeout();
        Entry {
            inode,
            attr: self.guest_attr(node, attr),
            attr_flags: 0,
            attr_timeout: t,
            entry_timeout: t,
        }
    }

    /// The host attributes `st` of `node` as the guest sees them: with the ownership the
    /// guest set (see `ownership`), and ids as the guest names them.
    pub(super) fn guest_attr(&self, node: &Inode, mut st: libc::stat64) -> libc::stat64 {
        if let Some(o) = node.ownership() {
            o.apply(&mut st);
        }
        st.st_ino = self.spanned.guest_ino(st.st_dev, st.st_ino);
        self.guest_ids(st)
    }

    /// `st` with its owner and group as the guest names them.
    pub(super) fn guest_ids(&self, mut st: libc::stat64) -> libc::stat64 {
        st.st_uid = self.cfg.uid_map.to_guest(st.st_uid);
        st.st_gid = self.cfg.gid_map.to_guest(st.st_gid);
        st
    }

    pub(super) fn set_attr(
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
        if args.mode.is_some() && is_link {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        // Symlinks, FIFOs and sockets take the guest's owner and mode on the host on any share,
        // device nodes on a `devices` one (see `ownership`).
        let pass = self.passes(st.st_mode & libc::S_IFMT);
        if !pass {
            if args.mode.is_some() || args.uid.is_some() || args.gid.is_some() {
                self.set_ownership(&node, fd, &st, &args)?;
            }
        } else if let Some(mode) = args.mode {
            // SAFETY: `p` is NUL-terminated; chmod has no other memory effects.
            cvt(unsafe { libc::chmod(p.as_ptr(), mode & 0o7777) })?;
        }
        if pass && (args.uid.is_some() || args.gid.is_some()) {
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
                // The link itself, through its O_PATH descriptor (AT_EMPTY_PATH; a kernel that
                // refuses that for utimensat answers EINVAL, given as EOPNOTSUPP).
                // SAFETY: the fd is valid, the empty path is NUL-terminated and `times` holds
                // two timespecs.
                cvt(unsafe {
                    libc::utimensat(fd, c"".as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH)
                })
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EINVAL) => io::Error::from_raw_os_error(libc::EOPNOTSUPP),
                    _ => e,
                })?;
            } else {
                // SAFETY: `p` is NUL-terminated and `times` holds two timespecs.
                cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })?;
            }
        }
        Ok((
            self.guest_attr(&node, stat_fd(fd)?),
            self.cfg.cache.attr_timeout(),
        ))
    }

    pub(super) fn kill_set_ids(
        &self,
        _ctx: Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<()> {
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
        // The bits the guest set on a share that emulates ownership live in the node's
        // attribute: cleared there the same way.
        let node = self.inode(inode)?;
        if let Some(mut o) = node.ownership() {
            let clear = if o.mode & libc::S_IXGRP != 0 {
                libc::S_ISUID | libc::S_ISGID
            } else {
                libc::S_ISUID
            };
            if o.mode & clear != 0 {
                o.mode &= !clear;
                let kept = (o != Ownership::of(&st)).then_some(o);
                self.keep(node.fd()?.as_raw_fd(), libc::S_IFREG, kept)?;
                node.set_ownership(kept);
            }
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

    pub(super) fn check_access(&self, ctx: Context, inode: u64, mask: u32) -> io::Result<()> {
        let node = self.inode(inode)?;
        // Checked as the guest sees it: the caller's ids against the owner it is shown.
        let st = self.guest_attr(&node, stat_fd(node.fd()?.as_raw_fd())?);
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
}
