//! Raw system calls and their conversions, in one place.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use crate::filesystem::{Context, DirEntry};

/// Lists directory `dir` from `offset` (a d_off cookie, 0 for the start), passing entries to
/// `add` until it returns false or the directory ends.
pub(super) fn read_dir_at(
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
pub(super) fn sync_fd(fd: RawFd, datasync: bool) -> io::Result<()> {
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

pub(super) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(super) fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

pub(super) fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// The open file's status flags (O_DIRECT, O_DSYNC, ...).
pub(super) fn status_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL reads the flags of an fd the caller holds; no memory is passed.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// The magic number of the file system `fd` is on (`statfs`'s `f_type`).
pub(super) fn fs_type(fd: RawFd) -> io::Result<i64> {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is the caller's and `st` a valid destination of the right type.
    cvt(unsafe { libc::fstatfs(fd, &mut st) })?;
    Ok(st.f_type as i64)
}

pub(super) fn stat_fd(fd: RawFd) -> io::Result<libc::stat64> {
    fstatat(fd, c"", libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
}

/// lstat of `name` in the directory `dir`.
pub(super) fn stat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat64> {
    fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW)
}

pub(super) fn fstatat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat64> {
    // SAFETY: stat64 is plain old data; all-zero is a valid value.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is valid for the call, `name` is NUL-terminated, and `st` is a valid
    // destination of the right type.
    cvt(unsafe { libc::fstatat64(dir, name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// An `O_PATH` descriptor of `name` in the directory `dir`: the node itself, a symlink never
/// followed.
pub(super) fn open_node_at(dir: RawFd, name: &CStr) -> io::Result<File> {
    // SAFETY: the fd is valid for the call and `name` is NUL-terminated.
    let fd = cvt(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// setxattr(2) of `name` on the node `fd` (an `O_PATH` descriptor will do), through /proc.
pub(super) fn set_xattr_fd(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: both strings are NUL-terminated and `value` is valid for its length.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(|_| ())
}

/// `/proc/self/fd/N` for `fd`: reaches the fd's inode without walking a path.
pub(super) fn proc_path(fd: RawFd) -> CString {
    // The string has no interior NUL: it is made of ASCII digits and slashes.
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// A guest offset or length as the host's signed type; EINVAL past i64::MAX.
pub(super) fn off_t(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Takes the guest caller's ids for file creation while alive (when running as root), so new
/// files belong to whoever created them in the guest, as on a local file system.
pub(super) struct CredGuard {
    active: bool,
}

impl CredGuard {
    pub(super) fn new(switch: bool, ctx: Context) -> Self {
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
