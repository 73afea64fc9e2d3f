//! Extended attributes.

use std::ffi::CStr;
use std::io;
use std::os::fd::AsRawFd;

use super::sys::{cvt, proc_path};
use super::PassthroughFs;
use crate::filesystem::Context;

/// The guest may change `user.*` attributes only: `security.*` and `trusted.*` ones would
/// grant file capabilities or other privileges on the host.
pub(super) fn check_xattr_name(name: &CStr) -> io::Result<()> {
    if name.to_bytes().starts_with(b"user.") {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// The outcome of a get/listxattr call into `buf`: the value, or (when the caller asked with
/// size 0) a buffer as long as the value would be.
pub(super) fn xattr_result(n: isize, size: u32, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if size == 0 {
        return Ok(vec![0u8; n as usize]);
    }
    buf.truncate(n as usize);
    Ok(buf)
}

impl PassthroughFs {
    pub(super) fn set_xattr(
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

    pub(super) fn get_xattr(
        &self,
        _ctx: Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<Vec<u8>> {
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

    pub(super) fn list_xattr(&self, _ctx: Context, inode: u64, size: u32) -> io::Result<Vec<u8>> {
        self.check_xattr_on()?;
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        let p = proc_path(nf.as_raw_fd());
        let mut buf = vec![0u8; size as usize];
        // SAFETY: the path is NUL-terminated and `buf` has the room given.
        let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        xattr_result(n, size, buf)
    }

    pub(super) fn remove_xattr(&self, _ctx: Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.check_xattr_on()?;
        self.check_writable()?;
        check_xattr_name(name)?;
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        let p = proc_path(nf.as_raw_fd());
        // SAFETY: strings are NUL-terminated.
        cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(|_| ())
    }
}
