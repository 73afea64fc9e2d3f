//! Security labels for what the guest makes (`seclabel`, FUSE_SECURITY_CTX).
//!
//! A guest that runs an LSM (SELinux) labels every node it makes. On a share with `seclabel`
//! its kernel sends the label with each CREATE, MKNOD, MKDIR and SYMLINK, and ferry sets it on
//! the new node before answering, so the node is never seen unlabelled by the guest; without
//! it the guest would label the node with a SETXATTR of its own after the reply, and a node it
//! cannot label (a read-only folder's entries) would stay unlabelled.
//!
//! The label's name (`security.selinux`) goes through the share's `xattrmap` like any other
//! attribute: ferry never sets a host `security.` attribute (that needs CAP_SYS_ADMIN, and on
//! an SELinux host would relabel the host's file), so the share's configuration must map the
//! guest's `security.` names to host `user.` ones (checked when the share is set up), as
//! virtiofsd's `--security-label` with `--xattrmap` does. The host keeps `user.` attributes on
//! regular files and folders only: symlinks, FIFOs, sockets and device nodes are made
//! unlabelled (the guest's LSM then sees them as the policy's unlabelled type), rather than
//! refused, which would break every `ln -s` in an SELinux guest.
//!
//! A label that cannot be set fails the request, and the node just made is removed again: the
//! guest's LSM decided the label, and a node without it must not appear under its name.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::sys::{cvt, open_node_at, set_xattr_fd};
use super::PassthroughFs;
use crate::filesystem::SecCtx;

impl PassthroughFs {
    /// Whether this share takes the labels the guest's LSM gives what it makes.
    pub(super) fn takes_labels(&self) -> bool {
        self.cfg.security_label && !self.cfg.no_xattr
    }

    /// Sets `secctx` on `name`, a node of type `fmt` this request just made in the folder
    /// `dir` (open as `file` when the request holds it open). When the label cannot be set,
    /// removes the node and returns why.
    pub(super) fn label_new(
        &self,
        dir: RawFd,
        name: &CStr,
        fmt: u32,
        file: Option<&File>,
        secctx: Option<SecCtx<'_>>,
    ) -> io::Result<()> {
        let Some(label) = secctx.filter(|_| self.takes_labels()) else {
            return Ok(());
        };
        let set = self.set_label(dir, name, fmt, file, label);
        if let Err(e) = &set {
            log::warn!(
                "cannot label {:?} with the guest's {:?} ({e}); the guest's request fails and the node is removed",
                name,
                label.name
            );
            let flags = if fmt == libc::S_IFDIR {
                libc::AT_REMOVEDIR
            } else {
                0
            };
            // SAFETY: the name is NUL-terminated and the fd is valid.
            if let Err(e) = cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }) {
                log::warn!("cannot remove the unlabelled {name:?} again: {e}");
            }
        }
        set
    }

    fn set_label(
        &self,
        dir: RawFd,
        name: &CStr,
        fmt: u32,
        file: Option<&File>,
        label: SecCtx<'_>,
    ) -> io::Result<()> {
        let host = self.host_name(label.name, libc::EPERM)?;
        self.check_xattr_name(&host)?;
        // `check_xattr_name` let only `user.` names through.
        if !matches!(fmt, libc::S_IFREG | libc::S_IFDIR) {
            log::debug!("{name:?} stays unlabelled: the host keeps user. attributes on files and folders only");
            return Ok(());
        }
        match file {
            Some(f) => set_xattr_fd(f.as_raw_fd(), &host, label.value, 0),
            None => {
                let node = open_node_at(dir, name)?;
                set_xattr_fd(node.as_raw_fd(), &host, label.value, 0)
            }
        }
    }
}
