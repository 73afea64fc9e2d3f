//! POSIX ACLs (`posixacl`): the guest's `system.posix_acl_access` and `_default` attributes
//! pass through to the host file, and the guest's kernel enforces them.
//!
//! Theory of operation. With FUSE_POSIX_ACL the guest's kernel checks access against the ACLs
//! it reads from the server (virtiofs mounts with `default_permissions`), and hands ACL changes
//! to the server as the two attributes, in the kernel's binary form (a version word, then
//! entries of tag, permissions and id). Ferry stores them on the host file as they are, with
//! the ids of named users and groups renamed by the share's `uidmap`/`gidmap` on the way, so
//! the host's `getfacl` names the host's ids.
//!
//! Creation is where ACLs and the umask meet: a folder's default ACL replaces the creating
//! process's umask. So with ACLs the guest's kernel sends the mode unmasked, with the umask
//! beside it (FUSE_DONT_MASK), and ferry applies the umask only where the parent folder has
//! no default ACL; where it has one, the host kernel gives the new node the inherited ACL and
//! the mode that follows from it, as a local file system does.

use std::io;
use std::os::fd::AsRawFd;

use super::inode::Inode;
use super::sys::proc_path;
use super::PassthroughFs;

/// The access ACL's attribute.
pub(super) const ACCESS: &[u8] = b"system.posix_acl_access";
/// The default ACL's attribute (folders only).
pub(super) const DEFAULT: &[u8] = b"system.posix_acl_default";
/// `posix_acl_xattr_header.a_version`.
const VERSION: u32 = 2;
/// Entry tags that carry an id.
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;
/// Bytes per entry: tag (u16), permissions (u16), id (u32).
const ENTRY: usize = 8;

/// Whether `name` is one of the two ACL attributes.
pub(super) fn is_acl(name: &[u8]) -> bool {
    name == ACCESS || name == DEFAULT
}

impl PassthroughFs {
    /// Whether the guest's kernel handles ACLs on this share (`posixacl`, and the guest
    /// agreed to send modes unmasked).
    pub(super) fn acls(&self) -> bool {
        self.cfg.posix_acl && self.dont_mask.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The mode to make a node with in `parent`, for the guest's `mode` and `umask`, and
    /// whether the node inherits a default ACL (then the host kernel sets its mode, and ferry
    /// leaves it so). Without ACLs the guest's kernel applied the umask already.
    pub(super) fn creation_mode(&self, parent: &Inode, mode: u32, umask: u32) -> (u32, bool) {
        if !self.acls() {
            return (mode, false);
        }
        let inherits = parent
            .fd()
            .map(|fd| has_xattr(fd.as_raw_fd(), DEFAULT))
            .unwrap_or(false);
        if inherits {
            (mode, true)
        } else {
            (mode & !(umask & 0o777), false)
        }
    }

    /// An ACL attribute's value with the guest's ids renamed to the host's (`to_host`) or
    /// back. A value that is not an ACL is refused with EINVAL, as the host kernel would.
    pub(super) fn map_acl(&self, value: &[u8], to_host: bool) -> io::Result<Vec<u8>> {
        if value.len() < 4
            || !(value.len() - 4).is_multiple_of(ENTRY)
            || u32::from_le_bytes([value[0], value[1], value[2], value[3]]) != VERSION
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut out = value.to_vec();
        for e in out[4..].chunks_exact_mut(ENTRY) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let mapped = match (tag, to_host) {
                (ACL_USER, true) => self.cfg.uid_map.to_host(id),
                (ACL_USER, false) => self.cfg.uid_map.to_guest(id),
                (ACL_GROUP, true) => self.cfg.gid_map.to_host(id),
                (ACL_GROUP, false) => self.cfg.gid_map.to_guest(id),
                _ => continue,
            };
            e[4..8].copy_from_slice(&mapped.to_le_bytes());
        }
        Ok(out)
    }
}

/// Whether the node `fd` (an `O_PATH` descriptor will do) has the attribute `name`.
fn has_xattr(fd: i32, name: &[u8]) -> bool {
    let p = proc_path(fd);
    let Ok(n) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: both strings are NUL-terminated; a zero size asks for the length only.
    unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) >= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    #[test]
    fn names_are_the_two_acl_attributes() {
        assert!(is_acl(b"system.posix_acl_access"));
        assert!(is_acl(b"system.posix_acl_default"));
        assert!(!is_acl(b"system.posix_acl"));
        assert!(!is_acl(b"user.posix_acl_access"));
    }

    #[test]
    fn named_ids_follow_the_share_maps_and_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = super::super::Config {
            posix_acl: true,
            uid_map: super::super::IdMaps::new(vec![super::super::IdMap::parse("0:1000").unwrap()])
                .unwrap(),
            gid_map: super::super::IdMaps::new(vec![
                super::super::IdMap::parse("5:2000:10").unwrap()
            ])
            .unwrap(),
            ..Default::default()
        };
        let fs = PassthroughFs::new(dir.path(), cfg).unwrap();
        // USER_OBJ (1) has no id to map; USER 0 -> 1000; GROUP 7 -> 2002; MASK, OTHER stay.
        let guest = acl(&[
            (0x01, 6, u32::MAX),
            (ACL_USER, 6, 0),
            (ACL_GROUP, 4, 7),
            (0x10, 6, u32::MAX),
            (0x20, 4, u32::MAX),
        ]);
        let host = fs.map_acl(&guest, true).unwrap();
        assert_eq!(
            host,
            acl(&[
                (0x01, 6, u32::MAX),
                (ACL_USER, 6, 1000),
                (ACL_GROUP, 4, 2002),
                (0x10, 6, u32::MAX),
                (0x20, 4, u32::MAX),
            ])
        );
        assert_eq!(fs.map_acl(&host, false).unwrap(), guest);
    }

    #[test]
    fn a_value_that_is_no_acl_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fs = PassthroughFs::new(dir.path(), Default::default()).unwrap();
        for bad in [
            &b""[..],
            b"\x02\0\0\0\x01",
            b"\x01\0\0\0\x01\0\x06\0\xff\xff\xff\xff",
        ] {
            let e = fs.map_acl(bad, true).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad:?}");
        }
    }
}
