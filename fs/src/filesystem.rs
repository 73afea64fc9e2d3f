//! The `FileSystem` trait: what a file server implements, one method per FUSE operation.
//!
//! Methods take decoded arguments and return `io::Result`. The server turns errors into errno
//! replies; implementations never see the wire format. Every method has a default that returns
//! ENOSYS, so the kernel learns what is not implemented and stops asking.

use std::io;
use std::time::Duration;

/// Who is asking: the caller's ids in the guest, from the request header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// The caller's uid.
    pub uid: u32,
    /// The caller's gid.
    pub gid: u32,
    /// The caller's pid.
    pub pid: u32,
}

/// The INIT flags the kernel offers and the file system accepts (the `abi` flag bits).
pub type InitFlags = u32;

fn enosys<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// A file system served over FUSE.
pub trait FileSystem: Send + Sync {
    /// Starts a session. `capable` holds the flags the kernel supports; return the subset to use.
    fn init(&self, capable: InitFlags) -> io::Result<InitFlags> {
        let _ = capable;
        Ok(0)
    }

    /// Ends a session: the guest unmounted, or the driver went away. Drop all per-session state.
    fn destroy(&self) {}

    /// The attributes of `inode`, and how long the kernel may cache them.
    fn getattr(
        &self,
        ctx: Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(libc::stat64, Duration)> {
        let _ = (ctx, inode, handle);
        enosys()
    }

    /// File system statistics for the file system holding `inode`.
    fn statfs(&self, ctx: Context, inode: u64) -> io::Result<libc::statvfs64> {
        let _ = (ctx, inode);
        enosys()
    }
}
