//! `PassthroughFs`: serves a host directory to the guest.
//!
//! Everything is resolved relative to file descriptors the server holds, never by joining paths,
//! so the guest cannot name anything outside the shared directory.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::Duration;

use crate::abi::ROOT_ID;
use crate::filesystem::{Context, FileSystem, InitFlags};

/// How long the guest may cache attributes and entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// No caching: every access asks the host. For shares the host changes often.
    Never,
    /// Cache metadata briefly, but not file data.
    Metadata,
    /// Cache metadata briefly and file data until the file changes on the host (the default).
    #[default]
    Auto,
    /// Cache everything for a long time. For shares only the guest changes.
    Always,
}

impl CachePolicy {
    /// How long attributes may be cached under this policy.
    pub fn attr_timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Metadata | CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86400),
        }
    }
}

impl std::str::FromStr for CachePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(CachePolicy::Never),
            "metadata" => Ok(CachePolicy::Metadata),
            "auto" => Ok(CachePolicy::Auto),
            "always" => Ok(CachePolicy::Always),
            _ => Err(format!(
                "cache={s} is not a cache policy; use never, metadata, auto or always"
            )),
        }
    }
}

/// Options for one share.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Cache policy.
    pub cache: CachePolicy,
    /// Answer every write with EROFS.
    pub readonly: bool,
}

/// A file system that passes requests through to a host directory.
pub struct PassthroughFs {
    root: File,
    cfg: Config,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl PassthroughFs {
    /// Opens `dir` as the root of a share. Fails if it is not a directory that can be opened.
    pub fn new(dir: &Path, cfg: Config) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let mut path = dir.as_os_str().as_bytes().to_vec();
        path.push(0);
        let path = CStr::from_bytes_with_nul(&path)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `path` is a valid NUL-terminated string; open has no other memory effects.
        let fd = cvt(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let root = unsafe { File::from_raw_fd(fd) };
        Ok(PassthroughFs { root, cfg })
    }

    /// This share's options.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The O_PATH fd that stands for `inode`.
    fn inode_fd(&self, inode: u64) -> io::Result<&File> {
        match inode {
            ROOT_ID => Ok(&self.root),
            _ => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    fn stat(f: &File) -> io::Result<libc::stat64> {
        // SAFETY: stat64 is plain old data; all-zero is a valid value.
        let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is valid, the empty path is NUL-terminated, and `st` is a valid
        // destination of the right type.
        cvt(unsafe {
            libc::fstatat64(
                f.as_raw_fd(),
                c"".as_ptr(),
                &mut st,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(st)
    }
}

impl FileSystem for PassthroughFs {
    fn init(&self, _capable: InitFlags) -> io::Result<InitFlags> {
        Ok(0)
    }

    fn getattr(
        &self,
        _ctx: Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(libc::stat64, Duration)> {
        let st = Self::stat(self.inode_fd(inode)?)?;
        Ok((st, self.cfg.cache.attr_timeout()))
    }

    fn statfs(&self, _ctx: Context, inode: u64) -> io::Result<libc::statvfs64> {
        let f = self.inode_fd(inode)?;
        // SAFETY: statvfs64 is plain old data; all-zero is a valid value.
        let mut st: libc::statvfs64 = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is valid and `st` is a valid destination of the right type.
        cvt(unsafe { libc::fstatvfs64(f.as_raw_fd(), &mut st) })?;
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_attributes_come_from_the_host_dir() {
        let dir = std::env::temp_dir();
        let fs = PassthroughFs::new(&dir, Config::default()).unwrap();
        let (st, t) = fs.getattr(Context::default(), ROOT_ID, None).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(st.st_ino, meta.ino());
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFDIR);
        assert_eq!(t, Duration::from_secs(1));
        assert!(fs.statfs(Context::default(), ROOT_ID).unwrap().f_bsize > 0);
    }

    #[test]
    fn unknown_inodes_are_ebadf() {
        let fs = PassthroughFs::new(&std::env::temp_dir(), Config::default()).unwrap();
        let e = fs.getattr(Context::default(), 42, None).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn a_file_is_not_a_share_root() {
        let e = PassthroughFs::new(Path::new("/etc/hostname"), Config::default());
        assert_eq!(e.err().unwrap().raw_os_error(), Some(libc::ENOTDIR));
    }

    #[test]
    fn cache_policies_parse() {
        assert_eq!("never".parse(), Ok(CachePolicy::Never));
        assert_eq!("always".parse(), Ok(CachePolicy::Always));
        assert!("sometimes".parse::<CachePolicy>().is_err());
    }
}
