//! POSIX and flock locks on the host's open file descriptions.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use super::sys::{cvt, ebadf};
use super::PassthroughFs;
use crate::abi;
use crate::filesystem::{Context, FileLock};

/// A FUSE lock as a host `struct flock` for open-file-description locks (l_pid must be 0).
pub(super) fn posix_lock(lk: FileLock) -> io::Result<libc::flock> {
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

impl PassthroughFs {
    pub(super) fn get_lock(
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

    pub(super) fn set_lock(
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
}
