//! Where a node is inside the share, for the audit log's file events.
//!
//! Theory of operation. The server reaches nodes by descriptor (or file handle), never by
//! path, so a path is asked of the kernel only when an event needs one: the node's descriptor
//! in `/proc/self/fd` names where the file is now (after renames, as the kernel tracks it),
//! and the share's root descriptor names the share; the difference is the path the guest
//! sees. A node removed since reads as its last path with " (deleted)", as the kernel says.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use super::{PassthroughFs, ROOT_ID};

fn fd_path(fd: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()
}

impl PassthroughFs {
    /// Node `id`'s path inside the share, as `/a/b` (`/` for the root).
    pub(super) fn path_of(&self, id: u64) -> Option<String> {
        let root = fd_path(self.root.fd().ok()?.as_raw_fd())?;
        if id == ROOT_ID {
            return Some("/".into());
        }
        let node = self.inode(id).ok()?;
        let fd = node.fd().ok()?;
        let p = fd_path(fd.as_raw_fd())?;
        let rel = p.strip_prefix(&root).ok()?;
        Some(format!("/{}", rel.display()))
    }
}
