//! Ownership the guest sets, kept apart from the host's.
//!
//! Theory of operation. A guest's root is root only inside the guest. If its `chown 0` and
//! `chmod 4755` reached the host file, a share served by ferry as root would hold a root-owned
//! set-user-ID program that any host user who can reach the share runs as root. So by default
//! (a share without `trusted`) the host file keeps the owner ferry creates files as (the share
//! folder's owner when ferry runs as root, ferry's own user otherwise) and never carries the
//! set-user-ID or set-group-ID bits, while the owner, group and mode the guest set are kept in
//! the `user.containers.override_stat` extended attribute of the host file: the convention of
//! containers/storage and fuse-overlayfs, so other tools read it too. The guest is shown the
//! attribute's values, so `chown 999` on a database's folder and a set-user-ID program in a
//! container image look done inside the guest, across remounts and restarts.
//!
//! The attribute is written only when what the guest set differs from what the host file
//! shows (a guest that creates files as the share's owner writes none), and it is read once
//! per node, when the guest first looks the node up: nodes cache it. Reading it costs a
//! system call per node (a third of a cold `find`), so the share's folder is marked
//! (`user.ferry.keeps-ownership`) the first time ferry keeps ownership in the share, and
//! nodes of an unmarked share are not asked: attributes other tools wrote there are not seen. The host's permission
//! bits follow the guest's, except that the owner may always read and write (and search
//! folders), so ferry keeps access to what it serves when it runs as that owner.
//!
//! Linux keeps `user.*` attributes on regular files and folders only. Symlinks, FIFOs and
//! sockets need none: nothing runs from them, so their owner and mode grant no privilege on the
//! host, and they pass through as on a `trusted` share (made as the guest's caller, chown and
//! chmod on the host file; see [`passes_through`]). Device nodes do only on a share given
//! `devices`, whose guest may make any device node with any mode anyway (a device node's owner
//! opens the host's device to that host user); elsewhere their owner and mode stay the
//! host's. A host file system that keeps no `user.*`
//! attributes refuses ownership changes of files and folders with EPERM, as for a user without
//! CAP_CHOWN. The guest can neither read nor change the attribute itself: a guest user
//! could otherwise make its own file look like a set-user-ID root program to the guest.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::inode::Inode;
use super::sys::{cvt, proc_path, set_xattr_fd, stat_fd, CredGuard};
use super::PassthroughFs;
use crate::filesystem::{Context, Entry, SetattrArgs};

/// The extended attribute that holds what the guest set.
pub(super) const XATTR: &CStr = c"user.containers.override_stat";

/// The attribute that marks a share's folder once ferry keeps ownership in the share: only
/// then are nodes asked for [`XATTR`] (reading it costs a system call per node looked up).
pub(super) const MARK: &CStr = c"user.ferry.keeps-ownership";

/// Whether the share folder `fd` is marked with [`MARK`].
pub(super) fn is_marked(fd: RawFd) -> bool {
    let p = proc_path(fd);
    // SAFETY: both strings are NUL-terminated; a zero size asks for the length only.
    unsafe { libc::getxattr(p.as_ptr(), MARK.as_ptr(), std::ptr::null_mut(), 0) >= 0 }
}

/// Mode bits the guest may set: permissions, set-id and sticky.
const MODE_BITS: u32 = 0o7777;

/// Owner, group and mode bits as the guest set them; the ids as the host names them (after
/// `uidmap=`/`gidmap=`), so an attribute means the same whichever map a share is served with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ownership {
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mode: u32,
}

impl Ownership {
    /// What the host file `st` itself shows.
    pub(super) fn of(st: &libc::stat64) -> Self {
        Ownership {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & MODE_BITS,
        }
    }

    /// `st` with this ownership in place of the host's.
    pub(super) fn apply(&self, st: &mut libc::stat64) {
        st.st_uid = self.uid;
        st.st_gid = self.gid;
        st.st_mode = (st.st_mode & libc::S_IFMT) | (self.mode & MODE_BITS);
    }

    /// Parses `UID:GID:MODE[:TYPE]` (MODE in octal), as containers/storage writes it; None for
    /// anything else, so a damaged attribute shows the host's values.
    fn parse(v: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(v).ok()?;
        let mut parts = s.trim_end_matches('\0').split(':');
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        let mode = u32::from_str_radix(parts.next()?, 8).ok()?;
        if mode & !MODE_BITS != 0 {
            return None;
        }
        Some(Ownership { uid, gid, mode })
    }

    /// The attribute's value for a node of type `fmt` (`S_IFREG` or `S_IFDIR`).
    fn encode(&self, fmt: u32) -> String {
        let kind = if fmt == libc::S_IFDIR { "dir" } else { "file" };
        format!("{}:{}:0{:o}:{kind}", self.uid, self.gid, self.mode)
    }
}

/// Whether a node of type `fmt` can keep the attribute (Linux allows `user.*` attributes on
/// regular files and folders only).
pub(super) fn can_keep(fmt: u32) -> bool {
    fmt == libc::S_IFREG || fmt == libc::S_IFDIR
}

/// Whether a node of type `fmt` takes the guest's owner and mode on the host itself, on any
/// share: symlinks, FIFOs and sockets, which run nothing.
pub(super) fn passes_through(fmt: u32) -> bool {
    matches!(fmt, libc::S_IFLNK | libc::S_IFIFO | libc::S_IFSOCK)
}

/// The host's permission bits for a node the guest sees with `mode`: no set-id bits, and the
/// owner may read and write it (and search it, for a folder).
pub(super) fn host_mode(mode: u32, fmt: u32) -> u32 {
    // The sticky bit only means something on a folder (who may delete its entries).
    let (keep, owner) = if fmt == libc::S_IFDIR {
        (0o1777, 0o700)
    } else {
        (0o777, 0o600)
    };
    (mode & keep) | owner
}

/// The ownership the node `fd` (any descriptor, `O_PATH` included) keeps, if it keeps one.
pub(super) fn read(fd: RawFd) -> io::Result<Option<Ownership>> {
    let p = proc_path(fd);
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated and `buf` has the room given.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            XATTR.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // None kept, or a file system (or node type) that keeps no user attributes; a
            // value longer than any this module writes is not one of ours.
            Some(libc::ENODATA | libc::ENOTSUP | libc::EPERM | libc::ERANGE) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Ownership::parse(&buf[..n as usize]))
}

/// Keeps `o` on node `fd` of type `fmt`, or removes what it keeps (None). A file system that
/// keeps no user attributes answers EPERM: the change cannot be kept.
pub(super) fn write(fd: RawFd, fmt: u32, o: Option<Ownership>) -> io::Result<()> {
    let p = proc_path(fd);
    let r = match o {
        Some(o) => set_xattr_fd(fd, XATTR, o.encode(fmt).as_bytes(), 0),
        // SAFETY: both strings are NUL-terminated.
        None => match cvt(unsafe { libc::removexattr(p.as_ptr(), XATTR.as_ptr()) }) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
            r => r.map(|_| ()),
        },
    };
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                log::warn!(
                    "a share's host file system keeps no user.* extended attributes, so owners and modes the guest sets cannot be kept and are refused (EPERM); give the share the trusted option to pass them to the host"
                )
            });
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
        Err(e) => Err(e),
    }
}

impl PassthroughFs {
    /// Keeps `o` on node `fd` of type `fmt` (or removes what it kept), marking the share's
    /// folder the first time (see [`MARK`]).
    pub(super) fn keep(&self, fd: RawFd, fmt: u32, o: Option<Ownership>) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if o.is_some() && !self.keeps_ownership.load(Ordering::Relaxed) {
            let root = self.root.fd()?;
            let p = proc_path(root.as_raw_fd());
            // SAFETY: the strings are NUL-terminated and the value is valid for its length.
            let r =
                unsafe { libc::setxattr(p.as_ptr(), MARK.as_ptr(), c"1".as_ptr().cast(), 1, 0) };
            if r != 0 {
                let e = io::Error::last_os_error();
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    log::warn!("cannot mark a share's folder as keeping the guest's owners ({e}); they show until ferry restarts, not after")
                });
            }
            self.keeps_ownership.store(true, Ordering::Relaxed);
        }
        write(fd, fmt, o)
    }

    /// Takes the ids new host files get while alive, when ferry runs as root: the caller's (as
    /// the host names them) on a `trusted` share, the share folder's owner's on one that
    /// emulates ownership. Unprivileged, files are ferry's own.
    pub(super) fn creating_as(&self, ctx: Context) -> CredGuard {
        let ids = if self.cfg.trusted {
            self.host_ctx(ctx)
        } else {
            Context {
                uid: self.share_owner.0,
                gid: self.share_owner.1,
                ..ctx
            }
        };
        CredGuard::new(self.switch_creds, ids)
    }

    /// Whether a node of type `fmt` takes the guest's owner and mode on the host itself on
    /// this share: any on a `trusted` share, symlinks, FIFOs and sockets on every share, device
    /// nodes on a `devices` share.
    pub(super) fn passes(&self, fmt: u32) -> bool {
        self.cfg.trusted
            || passes_through(fmt)
            || (self.cfg.devices && matches!(fmt, libc::S_IFCHR | libc::S_IFBLK))
    }

    /// The mode to create a host node of type `fmt` with, for the guest's `mode`: as asked on
    /// a `trusted` share; without set-id bits on one that emulates ownership.
    pub(super) fn create_mode(&self, mode: u32, fmt: u32) -> u32 {
        if self.passes(fmt) {
            mode
        } else {
            (mode & libc::S_IFMT) | host_mode(mode, fmt)
        }
    }

    /// Puts back the permission bits of a node just made (`entry`, asked for with the guest's
    /// `mode`, of type `fmt`) that ferry's own umask took off. The guest's kernel applied the
    /// guest's umask already (the mode FUSE sends is masked), so the host node should have
    /// what was asked, as virtiofsd's have by running with umask 0. Only those bits: a
    /// set-group-ID bit the host kernel stripped (a caller outside the group) stays off.
    /// A node that `inherits` a default ACL has the mode the ACL gave it, and keeps it (see
    /// `acl`). Returns the mode the guest made the node with.
    pub(super) fn settle_mode(
        &self,
        entry: &mut Entry,
        mode: u32,
        fmt: u32,
        inherits: bool,
    ) -> io::Result<u32> {
        let want = self.create_mode(mode, fmt) & 0o777;
        let have = entry.attr.st_mode;
        if inherits {
            return Ok((mode & !0o777) | (have & 0o777));
        }
        if have & 0o777 == want || have & libc::S_IFMT == libc::S_IFLNK {
            return Ok(mode);
        }
        let node = self.inode(entry.inode)?;
        let nf = node.fd()?;
        let p = proc_path(nf.as_raw_fd());
        let settled = (have & 0o7000) | want;
        // SAFETY: `p` is NUL-terminated; chmod has no other memory effects.
        cvt(unsafe { libc::chmod(p.as_ptr(), settled) })?;
        entry.attr.st_mode = (have & libc::S_IFMT) | settled;
        Ok(mode)
    }

    /// On a share that emulates ownership, makes the node of `entry`, which the guest's
    /// caller `ctx` just made in `parent` with `mode`, look as the guest made it: the caller's,
    /// or a set-group-ID folder's group (which a folder inherits the bit of), with the mode
    /// asked for. A symlink, FIFO or socket is given that owner on the host; a device node
    /// shows the host's (see `ownership`).
    pub(super) fn adopt(
        &self,
        ctx: Context,
        parent: &Inode,
        mut entry: Entry,
        mode: u32,
    ) -> io::Result<Entry> {
        if self.cfg.trusted {
            return Ok(entry);
        }
        let node = self.inode(entry.inode)?;
        let nf = node.fd()?;
        let st = stat_fd(nf.as_raw_fd())?;
        let fmt = st.st_mode & libc::S_IFMT;
        if !can_keep(fmt) && !self.passes(fmt) {
            return Ok(entry);
        }
        let host = self.host_ctx(ctx);
        let mut want = Ownership {
            uid: host.uid,
            gid: host.gid,
            mode: mode & 0o7777,
        };
        let mut pst = stat_fd(parent.fd()?.as_raw_fd())?;
        if let Some(o) = parent.ownership() {
            o.apply(&mut pst);
        }
        if pst.st_mode & libc::S_ISGID != 0 {
            want.gid = pst.st_gid;
            if fmt == libc::S_IFDIR {
                want.mode |= libc::S_ISGID;
            }
        }
        if self.passes(fmt) {
            // Made as the share's owner (the caller may not write the host folder, whose
            // owner the guest does not see), then given to the caller, as the guest made it.
            if (want.uid, want.gid) != (st.st_uid, st.st_gid) {
                // SAFETY: the fd is valid and the empty path is NUL-terminated.
                let r = cvt(unsafe {
                    libc::fchownat(
                        nf.as_raw_fd(),
                        c"".as_ptr(),
                        want.uid,
                        want.gid,
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                });
                if let Err(e) = r {
                    log::debug!("cannot give a new node to its maker: {e}");
                }
            }
            entry.attr = self.guest_attr(&node, stat_fd(nf.as_raw_fd())?);
            return Ok(entry);
        }
        let kept = (want != Ownership::of(&st)).then_some(want);
        if kept != node.ownership() {
            // The node exists whatever happens here: a failure shows the host's values.
            match self.keep(nf.as_raw_fd(), fmt, kept) {
                Ok(()) => node.set_ownership(kept),
                Err(e) => log::debug!("cannot keep a new node's ownership: {e}"),
            }
        }
        entry.attr = self.guest_attr(&node, st);
        Ok(entry)
    }

    /// Applies the guest's chmod and chown to `node` (host attributes `st`) on a share that
    /// emulates ownership: the host file takes the permission bits (see
    /// `host_mode`), the attribute keeps the rest.
    pub(super) fn set_ownership(
        &self,
        node: &Inode,
        fd: RawFd,
        st: &libc::stat64,
        args: &SetattrArgs,
    ) -> io::Result<()> {
        let fmt = st.st_mode & libc::S_IFMT;
        let uid = args.uid.map(|u| self.cfg.uid_map.to_host(u));
        let gid = args.gid.map(|g| self.cfg.gid_map.to_host(g));
        if let Some(mode) = args.mode {
            let hm = host_mode(mode, fmt);
            if st.st_mode & 0o7777 != hm {
                let p = proc_path(fd);
                // SAFETY: `p` is NUL-terminated; chmod has no other memory effects.
                cvt(unsafe { libc::chmod(p.as_ptr(), hm) })?;
            }
        }
        if !can_keep(fmt) {
            // A device node the host made keeps the host's owner: refused, as for a caller
            // without CAP_CHOWN.
            let changes =
                uid.is_some_and(|u| u != st.st_uid) || gid.is_some_and(|g| g != st.st_gid);
            if changes {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            return Ok(());
        }
        let cur = node.ownership().unwrap_or_else(|| Ownership::of(st));
        let want = Ownership {
            uid: uid.unwrap_or(cur.uid),
            gid: gid.unwrap_or(cur.gid),
            mode: args.mode.map_or(cur.mode, |m| m & 0o7777),
        };
        let host = Ownership {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: match args.mode {
                Some(m) => host_mode(m, fmt),
                None => st.st_mode & 0o7777,
            },
        };
        let kept = (want != host).then_some(want);
        if kept != node.ownership() {
            self.keep(fd, fmt, kept)?;
            node.set_ownership(kept);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_containers_storage_writes_and_refuses_the_rest() {
        let o = Ownership {
            uid: 999,
            gid: 998,
            mode: 0o4755,
        };
        assert_eq!(o.encode(libc::S_IFREG), "999:998:04755:file");
        assert_eq!(Ownership::parse(b"999:998:04755:file"), Some(o));
        assert_eq!(Ownership::parse(b"999:998:4755"), Some(o));
        assert_eq!(Ownership::parse(b"999:998:04755:dir\0"), Some(o));
        for bad in [
            &b""[..],
            b"999",
            b"999:998",
            b"x:998:0755",
            b"999:998:9",
            b"999:998:0170755",
            b"-1:0:0755",
            b"\xff:0:0",
        ] {
            assert_eq!(Ownership::parse(bad), None, "{:?}", bad);
        }
    }

    #[test]
    fn host_mode_drops_set_id_bits_and_keeps_the_owner_in() {
        assert_eq!(host_mode(0o4755, libc::S_IFREG), 0o755);
        assert_eq!(host_mode(0o2750, libc::S_IFDIR), 0o750);
        assert_eq!(host_mode(0o1777, libc::S_IFDIR), 0o1777);
        assert_eq!(host_mode(0o1777, libc::S_IFREG), 0o777);
        assert_eq!(host_mode(0o000, libc::S_IFREG), 0o600);
        assert_eq!(host_mode(0o000, libc::S_IFDIR), 0o700);
    }
}
