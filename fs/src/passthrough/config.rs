//! A share's options.

use std::time::Duration;

use super::{IdMaps, XattrMap};
use crate::abi;

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
    /// How long attributes and entries may be cached under this policy.
    pub fn attr_timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Metadata | CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86400),
        }
    }

    /// FOPEN_* flags for files opened under this policy.
    pub(super) fn open_flags(self) -> u32 {
        match self {
            CachePolicy::Never | CachePolicy::Metadata => abi::FOPEN_DIRECT_IO,
            CachePolicy::Auto => 0,
            CachePolicy::Always => abi::FOPEN_KEEP_CACHE,
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
    /// How many nodes may keep a descriptor open before nodes keep file handles instead
    /// (None: half the open-file limit, at most 16384).
    pub node_fds: Option<usize>,
    /// Let the guest cache writes (FUSE writeback cache): faster small writes, but a host
    /// process may see the guest's writes late.
    pub writeback: bool,
    /// Answer the xattr requests with ENOSYS, as virtiofsd does without `--xattr`: the guest
    /// then stops asking, which saves the GETXATTR of `security.capability` that it sends
    /// before the first write to every file.
    pub no_xattr: bool,
    /// User ids the guest and the host see differently (no ranges: the same ids both ways).
    pub uid_map: IdMaps,
    /// Group ids the same way.
    pub gid_map: IdMaps,
    /// Pass the owner, group and set-id bits the guest sets through to the host file, as for a
    /// container's root file system. Without it the host file keeps the owner ferry creates
    /// files as and no set-id bits, and what the guest set is kept in an extended attribute
    /// that it is shown (see `ownership`).
    pub trusted: bool,
    /// Let the guest make block and character device nodes (and RENAME_WHITEOUT's), as for a
    /// container's root file system. Off by default: a device node the guest's root makes in a
    /// shared folder opens the host's device for any host user who can reach it. Needs
    /// CAP_MKNOD.
    pub devices: bool,
    /// Attribute names the guest and the host see differently (`xattrmap=`): how a guest
    /// keeps `security.` labels in the host's `user.` attributes.
    pub xattr_map: XattrMap,
    /// POSIX ACLs (`posixacl`): the guest's kernel enforces them and they pass through to the
    /// host files (see `acl`).
    pub posix_acl: bool,
    /// Security labels (`seclabel`): the label the guest's LSM gives each node it makes is set
    /// on the node as it is made (FUSE_SECURITY_CTX), under the host name `xattr_map` gives it
    /// (see `seclabel`).
    pub security_label: bool,
}
