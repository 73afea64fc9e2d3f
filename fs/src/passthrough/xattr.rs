//! Extended attributes: the guest's `user.*` ones pass through to the host file. On a share
//! that emulates ownership, the attribute that keeps it (`ownership::XATTR`) is ferry's: the
//! guest neither sees nor changes it. A share's `xattrmap=` rules rename attributes on the way
//! (see `xattrmap`); the checks below apply to the host's name, after the mapping.

use std::borrow::Cow;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;

use super::sys::{cvt, proc_path, set_xattr_fd};
use super::xattrmap::HostName;
use super::PassthroughFs;
use super::{acl, ownership};
use crate::filesystem::Context;

impl PassthroughFs {
    /// The guest may change `user.*` attributes only: `security.*` and `trusted.*` ones would
    /// grant file capabilities or other privileges on the host; and not the one that keeps the
    /// ownership it set, which would let a guest user make its file look like root's.
    pub(super) fn check_xattr_name(&self, name: &CStr) -> io::Result<()> {
        // ACLs, on a share that takes them: the guest's kernel checked that the caller owns
        // the file (see `acl`).
        if self.acls() && acl::is_acl(name.to_bytes()) {
            return Ok(());
        }
        if name.to_bytes().starts_with(b"user.") && !self.is_ferrys(name) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
    }

    /// Whether `name` is an attribute ferry keeps the guest's ownership with on this share.
    fn is_ferrys(&self, name: &CStr) -> bool {
        !self.cfg.trusted && (name == ownership::XATTR || name == ownership::MARK)
    }

    /// The host's name for the guest's attribute `name`; a name the mapping keeps from the
    /// guest gets `reserved` (EPERM to change it, ENODATA to read it, as if it were not there).
    pub(super) fn host_name<'a>(&self, name: &'a CStr, reserved: i32) -> io::Result<Cow<'a, CStr>> {
        match self.cfg.xattr_map.to_host(name.to_bytes()) {
            HostName::Same(_) => Ok(Cow::Borrowed(name)),
            // The mapped name is the guest's tail under a host prefix, neither holding a NUL.
            HostName::Mapped(h) => CString::new(h)
                .map(Cow::Owned)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)),
            HostName::Reserved => Err(io::Error::from_raw_os_error(reserved)),
        }
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
        let name = self.host_name(name, libc::EPERM)?;
        self.check_xattr_name(&name)?;
        let mapped;
        let value = if self.acls() && acl::is_acl(name.to_bytes()) {
            mapped = self.map_acl(value, true)?;
            &mapped[..]
        } else {
            value
        };
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        set_xattr_fd(nf.as_raw_fd(), &name, value, flags as i32)
    }

    pub(super) fn get_xattr(
        &self,
        _ctx: Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<Vec<u8>> {
        self.check_xattr_on()?;
        let name = self.host_name(name, libc::ENODATA)?;
        if self.is_ferrys(&name) {
            return Err(io::Error::from_raw_os_error(libc::ENODATA));
        }
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
        let value = xattr_result(n, size, buf)?;
        if size != 0 && self.acls() && acl::is_acl(name.to_bytes()) {
            return self.map_acl(&value, false);
        }
        Ok(value)
    }

    pub(super) fn list_xattr(&self, _ctx: Context, inode: u64, size: u32) -> io::Result<Vec<u8>> {
        self.check_xattr_on()?;
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        let p = proc_path(nf.as_raw_fd());
        if self.cfg.trusted && self.cfg.xattr_map.is_empty() {
            let mut buf = vec![0u8; size as usize];
            // SAFETY: the path is NUL-terminated and `buf` has the room given.
            let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            return xattr_result(n, size, buf);
        }
        // The whole list (at most XATTR_LIST_MAX), so ferry's attribute can be taken out
        // before the size the guest sees is known.
        let mut buf = vec![0u8; 65536];
        // SAFETY: the path is NUL-terminated and `buf` has the room given.
        let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let host = xattr_result(n, 1, buf)?;
        let mut list = Vec::with_capacity(host.len());
        for name in host.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let ours = !self.cfg.trusted
                && (name == ownership::XATTR.to_bytes() || name == ownership::MARK.to_bytes());
            if ours {
                continue;
            }
            if let Some(guest) = self.cfg.xattr_map.to_guest(name) {
                list.extend_from_slice(&guest);
                list.push(0);
            }
        }
        if size == 0 {
            return Ok(vec![0u8; list.len()]);
        }
        if list.len() > size as usize {
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        }
        Ok(list)
    }

    pub(super) fn remove_xattr(&self, _ctx: Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.check_xattr_on()?;
        self.check_writable()?;
        let name = self.host_name(name, libc::EPERM)?;
        self.check_xattr_name(&name)?;
        let node = self.inode(inode)?;
        let nf = node.fd()?;
        let p = proc_path(nf.as_raw_fd());
        // SAFETY: strings are NUL-terminated.
        cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(|_| ())
    }
}
