//! The FUSE wire ABI (`include/uapi/linux/fuse.h`), as much of it as Ferry speaks.
//!
//! fuser keeps its copy private and virtio-bindings has none, so Ferry owns these definitions.
//! Every struct is `#[repr(C)]`, plain old data, and size-checked against the kernel's layout.

use vm_memory::ByteValued;

/// The FUSE major version Ferry speaks.
pub const KERNEL_VERSION: u32 = 7;
/// The FUSE minor version Ferry speaks (7.36: INIT's `flags2`, for FUSE_SECURITY_CTX). The
/// kernel falls back to it when it is newer; what it sends beyond it is asked for by flag.
pub const KERNEL_MINOR_VERSION: u32 = 36;
/// The smallest minor version Ferry accepts (the first with `FUSE_MAX_PAGES`).
pub const MIN_KERNEL_MINOR_VERSION: u32 = 28;
/// The node id of the share's root directory.
pub const ROOT_ID: u64 = 1;

/// The INIT flags the kernel offers and the file system accepts: `flags`, and from 7.36 (with
/// [`INIT_EXT`]) `flags2` in the high 32 bits.
pub type InitFlags = u64;

/// INIT flag: `flags2` is valid (7.36).
pub const INIT_EXT: InitFlags = 1 << 30;
/// INIT flag (`flags2`): the kernel sends the security context (an LSM's label) of the node
/// a CREATE, MKNOD, MKDIR or SYMLINK makes, for the server to set on it (7.36).
pub const SECURITY_CTX: InitFlags = 1 << 32;
/// INIT flag: the file system accepts `max_pages` in INIT's reply.
pub const MAX_PAGES: InitFlags = 1 << 22;
/// INIT flag: the file system handles POSIX (fcntl) locks.
pub const POSIX_LOCKS: InitFlags = 1 << 1;
/// INIT flag: the file system handles BSD (flock) locks.
pub const FLOCK_LOCKS: InitFlags = 1 << 10;
/// LK request flag: the lock is a BSD flock, not a POSIX lock.
pub const LK_FLOCK: u32 = 1;
/// The end of a lock that reaches the end of the file.
pub const OFFSET_MAX: u64 = i64::MAX as u64;
/// INIT flag: reads may be issued in parallel.
pub const ASYNC_READ: InitFlags = 1 << 0;
/// INIT flag: the file system handles O_TRUNC in OPEN.
pub const ATOMIC_O_TRUNC: InitFlags = 1 << 3;
/// INIT flag: the file system handles LOOKUP of "." and "..".
pub const EXPORT_SUPPORT: InitFlags = 1 << 4;
/// INIT flag: writes larger than 4 KiB.
pub const BIG_WRITES: InitFlags = 1 << 5;
/// INIT flag: invalidate cached data when mtime or size change.
pub const AUTO_INVAL_DATA: InitFlags = 1 << 12;
/// INIT flag: READDIRPLUS is supported.
pub const DO_READDIRPLUS: InitFlags = 1 << 13;
/// INIT flag: the kernel chooses between READDIR and READDIRPLUS.
pub const READDIRPLUS_AUTO: InitFlags = 1 << 14;
/// INIT flag: the kernel caches writes (writeback cache).
pub const WRITEBACK_CACHE: InitFlags = 1 << 16;
/// INIT flag: directory operations may run in parallel.
pub const PARALLEL_DIROPS: InitFlags = 1 << 18;
/// INIT flag (from the kernel only): an OPENDIR answered with ENOSYS turns OPENDIR and
/// RELEASEDIR off for the session; directory requests then carry handle 0.
pub const NO_OPENDIR_SUPPORT: InitFlags = 1 << 24;
/// INIT flag: the server marks directories on other file systems (`ATTR_SUBMOUNT`), which the
/// guest mounts as submounts (7.32).
pub const SUBMOUNTS: InitFlags = 1 << 27;
/// `Attr::flags`: this directory is the root of another file system (7.32).
pub const ATTR_SUBMOUNT: u32 = 1 << 0;
/// INIT flag: the kernel sends create modes unmasked, with the umask beside them.
pub const DONT_MASK: InitFlags = 1 << 6;
/// INIT flag: the kernel enforces POSIX ACLs, which it reads and sets as attributes.
pub const POSIX_ACL: InitFlags = 1 << 20;
/// INIT flag: the server clears suid/sgid and capabilities when asked (the flags below), and
/// the guest stops asking for `security.capability` before every write.
pub const HANDLE_KILLPRIV_V2: InitFlags = 1 << 28;
/// WRITE's write_flags: clear suid/sgid (FUSE_WRITE_KILL_SUIDGID).
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// OPEN's and CREATE's open_flags: clear suid/sgid (with O_TRUNC).
pub const OPEN_KILL_SUIDGID: u32 = 1 << 0;

/// SETATTR `valid` bits.
#[allow(missing_docs)]
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// OPEN reply flag: keep the page cache across opens.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// OPEN reply flag: bypass the page cache.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;

/// FUSE opcodes: a constant each, and [`opcode::name`], from one list.
#[allow(missing_docs)]
pub mod opcode {
    macro_rules! opcodes {
        ($($name:ident = $value:literal,)*) => {
            $(pub const $name: u32 = $value;)*

            /// The opcode's name as `fuse.h` has it, without `FUSE_` (`LOOKUP`, `READDIRPLUS`);
            /// `None` for one Ferry does not know.
            pub fn name(op: u32) -> Option<&'static str> {
                const NAMES: &[(u32, &str)] = &[$(($value, stringify!($name))),*];
                NAMES.iter().find(|(v, _)| *v == op).map(|(_, n)| *n)
            }
        };
    }

    opcodes! {
        LOOKUP = 1,
        FORGET = 2,
        GETATTR = 3,
        SETATTR = 4,
        READLINK = 5,
        SYMLINK = 6,
        MKNOD = 8,
        MKDIR = 9,
        UNLINK = 10,
        RMDIR = 11,
        RENAME = 12,
        LINK = 13,
        OPEN = 14,
        READ = 15,
        WRITE = 16,
        STATFS = 17,
        RELEASE = 18,
        FSYNC = 20,
        SETXATTR = 21,
        GETXATTR = 22,
        LISTXATTR = 23,
        REMOVEXATTR = 24,
        FLUSH = 25,
        INIT = 26,
        OPENDIR = 27,
        READDIR = 28,
        RELEASEDIR = 29,
        FSYNCDIR = 30,
        GETLK = 31,
        SETLK = 32,
        SETLKW = 33,
        ACCESS = 34,
        CREATE = 35,
        INTERRUPT = 36,
        BMAP = 37,
        DESTROY = 38,
        IOCTL = 39,
        POLL = 40,
        NOTIFY_REPLY = 41,
        BATCH_FORGET = 42,
        FALLOCATE = 43,
        READDIRPLUS = 44,
        RENAME2 = 45,
        LSEEK = 46,
        COPY_FILE_RANGE = 47,
        SETUPMAPPING = 48,
        REMOVEMAPPING = 49,
        SYNCFS = 50,
        TMPFILE = 51,
        STATX = 52,
    }

    /// The highest opcode Ferry knows by name; used to size per-opcode counters.
    pub const MAX: u32 = 52;
}

/// The header of every request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InHeader {
    /// Total length of the request, this header included.
    pub len: u32,
    /// What the kernel asks for (see [`opcode`]).
    pub opcode: u32,
    /// The request id, echoed in the reply.
    pub unique: u64,
    /// The node the request is about.
    pub nodeid: u64,
    /// The caller's uid in the guest.
    pub uid: u32,
    /// The caller's gid in the guest.
    pub gid: u32,
    /// The caller's pid in the guest.
    pub pid: u32,
    /// Length of extensions after the request, in 8-byte units.
    pub total_extlen: u16,
    /// Unused.
    pub padding: u16,
}

/// The header of every reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OutHeader {
    /// Total length of the reply, this header included.
    pub len: u32,
    /// Zero, or a negated errno.
    pub error: i32,
    /// The id of the request this answers.
    pub unique: u64,
}

/// INIT's request body (the part common to all minor versions).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InitIn {
    /// The kernel's major version.
    pub major: u32,
    /// The kernel's minor version.
    pub minor: u32,
    /// The kernel's readahead limit.
    pub max_readahead: u32,
    /// The flags the kernel supports.
    pub flags: u32,
}

/// INIT's reply body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InitOut {
    /// Ferry's major version.
    pub major: u32,
    /// Ferry's minor version.
    pub minor: u32,
    /// Readahead limit.
    pub max_readahead: u32,
    /// The flags both sides support.
    pub flags: u32,
    /// Background request limit.
    pub max_background: u16,
    /// Congestion threshold for background requests.
    pub congestion_threshold: u16,
    /// Largest WRITE payload Ferry accepts.
    pub max_write: u32,
    /// Timestamp granularity in nanoseconds.
    pub time_gran: u32,
    /// Largest request in pages (with [`MAX_PAGES`]).
    pub max_pages: u16,
    /// DAX mapping alignment.
    pub map_alignment: u16,
    /// More flags (minor 36 and later).
    pub flags2: u32,
    /// Reserved.
    pub unused: [u32; 7],
}

/// File attributes as FUSE carries them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

impl From<&libc::stat64> for Attr {
    fn from(st: &libc::stat64) -> Self {
        Attr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: st.st_atime as u64,
            mtime: st.st_mtime as u64,
            ctime: st.st_ctime as u64,
            atimensec: st.st_atime_nsec as u32,
            mtimensec: st.st_mtime_nsec as u32,
            ctimensec: st.st_ctime_nsec as u32,
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }
}

/// GETATTR's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GetattrIn {
    /// `GETATTR_FH` when `fh` is valid.
    pub flags: u32,
    /// Unused.
    pub dummy: u32,
    /// An open file handle, when the flag says so.
    pub fh: u64,
}

/// GETATTR flag: `fh` is set.
pub const GETATTR_FH: u32 = 1;

/// GETATTR's (and SETATTR's) reply body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttrOut {
    /// How long the kernel may cache the attributes, seconds part.
    pub attr_valid: u64,
    /// How long the kernel may cache the attributes, nanoseconds part.
    pub attr_valid_nsec: u32,
    /// Unused.
    pub dummy: u32,
    /// The attributes.
    pub attr: Attr,
}

/// STATFS's reply body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct StatfsOut {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}

impl From<&libc::statvfs64> for StatfsOut {
    fn from(st: &libc::statvfs64) -> Self {
        StatfsOut {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: st.f_namemax as u32,
            frsize: st.f_frsize as u32,
            padding: 0,
            spare: [0; 6],
        }
    }
}

// SAFETY: each of these is #[repr(C)], made only of integers (and arrays of them), has no
// implicit padding (checked by the size assertions below), so every bit pattern is valid.
unsafe impl ByteValued for InHeader {}
// SAFETY: as above.
unsafe impl ByteValued for OutHeader {}
// SAFETY: as above.
unsafe impl ByteValued for InitIn {}
// SAFETY: as above.
unsafe impl ByteValued for InitOut {}
// SAFETY: as above.
unsafe impl ByteValued for Attr {}
// SAFETY: as above.
unsafe impl ByteValued for GetattrIn {}
// SAFETY: as above.
unsafe impl ByteValued for AttrOut {}
// SAFETY: as above.
unsafe impl ByteValued for StatfsOut {}

const _: () = {
    assert!(std::mem::size_of::<InHeader>() == 40);
    assert!(std::mem::size_of::<OutHeader>() == 16);
    assert!(std::mem::size_of::<InitIn>() == 16);
    assert!(std::mem::size_of::<InitOut>() == 64);
    assert!(std::mem::size_of::<Attr>() == 88);
    assert!(std::mem::size_of::<GetattrIn>() == 16);
    assert!(std::mem::size_of::<AttrOut>() == 104);
    assert!(std::mem::size_of::<StatfsOut>() == 80);
};

/// LOOKUP's (and MKDIR's, MKNOD's, SYMLINK's, LINK's, CREATE's) reply body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

/// FORGET's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForgetIn {
    /// How many lookups to forget.
    pub nlookup: u64,
}

/// BATCH_FORGET's request header; `count` [`ForgetOne`]s follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct BatchForgetIn {
    pub count: u32,
    pub dummy: u32,
}

/// One node in BATCH_FORGET.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct ForgetOne {
    pub nodeid: u64,
    pub nlookup: u64,
}

/// SETATTR's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct SetattrIn {
    pub valid: u32,
    pub padding: u32,
    pub fh: u64,
    pub size: u64,
    pub lock_owner: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub unused4: u32,
    pub uid: u32,
    pub gid: u32,
    pub unused5: u32,
}

/// MKNOD's request body; the name follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct MknodIn {
    pub mode: u32,
    pub rdev: u32,
    pub umask: u32,
    pub padding: u32,
}

/// MKDIR's request body; the name follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct MkdirIn {
    pub mode: u32,
    pub umask: u32,
}

/// RENAME's request body; old and new names follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct RenameIn {
    pub newdir: u64,
}

/// RENAME2's request body; old and new names follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct Rename2In {
    pub newdir: u64,
    pub flags: u32,
    pub padding: u32,
}

/// LINK's request body; the new name follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct LinkIn {
    pub oldnodeid: u64,
}

/// OPEN's and OPENDIR's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

/// CREATE's request body; the name follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct CreateIn {
    pub flags: u32,
    pub mode: u32,
    pub umask: u32,
    pub open_flags: u32,
}

/// OPEN's, OPENDIR's and (after the entry) CREATE's reply body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub padding: u32,
}

/// RELEASE's and RELEASEDIR's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}

/// FLUSH's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct FlushIn {
    pub fh: u64,
    pub unused: u32,
    pub padding: u32,
    pub lock_owner: u64,
}

/// READ's, READDIR's and READDIRPLUS's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

/// WRITE's request body; the data follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct WriteIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub write_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

/// WRITE's reply body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct WriteOut {
    pub size: u32,
    pub padding: u32,
}

/// FSYNC's and FSYNCDIR's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct FsyncIn {
    pub fh: u64,
    pub fsync_flags: u32,
    pub padding: u32,
}

/// SETXATTR's request body (minor < 33); name and value follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct SetxattrIn {
    pub size: u32,
    pub flags: u32,
}

/// GETXATTR's and LISTXATTR's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct GetxattrIn {
    pub size: u32,
    pub padding: u32,
}

/// GETXATTR's and LISTXATTR's reply when the caller asked for the size only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct GetxattrOut {
    pub size: u32,
    pub padding: u32,
}

/// ACCESS's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct AccessIn {
    pub mask: u32,
    pub padding: u32,
}

/// FALLOCATE's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct FallocateIn {
    pub fh: u64,
    pub offset: u64,
    pub length: u64,
    pub mode: u32,
    pub padding: u32,
}

/// LSEEK's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct LseekIn {
    pub fh: u64,
    pub offset: u64,
    pub whence: u32,
    pub padding: u32,
}

/// LSEEK's reply body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct LseekOut {
    pub offset: u64,
}

/// COPY_FILE_RANGE's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct CopyFileRangeIn {
    pub fh_in: u64,
    pub off_in: u64,
    pub nodeid_out: u64,
    pub fh_out: u64,
    pub off_out: u64,
    pub len: u64,
    pub flags: u64,
}

/// One directory entry in READDIR's reply; the name and padding to 8 bytes follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct Dirent {
    pub ino: u64,
    pub off: u64,
    pub namelen: u32,
    pub type_: u32,
}

// SAFETY: each of these is #[repr(C)], made only of integers (and arrays of them, or Attr),
// has no implicit padding (checked by the size assertions below), so every bit pattern is valid.
unsafe impl ByteValued for EntryOut {}
// SAFETY: as above.
unsafe impl ByteValued for ForgetIn {}
// SAFETY: as above.
unsafe impl ByteValued for BatchForgetIn {}
// SAFETY: as above.
unsafe impl ByteValued for ForgetOne {}
// SAFETY: as above.
unsafe impl ByteValued for SetattrIn {}
// SAFETY: as above.
unsafe impl ByteValued for MknodIn {}
// SAFETY: as above.
unsafe impl ByteValued for MkdirIn {}
// SAFETY: as above.
unsafe impl ByteValued for RenameIn {}
// SAFETY: as above.
unsafe impl ByteValued for Rename2In {}
// SAFETY: as above.
unsafe impl ByteValued for LinkIn {}
// SAFETY: as above.
unsafe impl ByteValued for OpenIn {}
// SAFETY: as above.
unsafe impl ByteValued for CreateIn {}
// SAFETY: as above.
unsafe impl ByteValued for OpenOut {}
// SAFETY: as above.
unsafe impl ByteValued for ReleaseIn {}
// SAFETY: as above.
unsafe impl ByteValued for FlushIn {}
// SAFETY: as above.
unsafe impl ByteValued for ReadIn {}
// SAFETY: as above.
unsafe impl ByteValued for WriteIn {}
// SAFETY: as above.
unsafe impl ByteValued for WriteOut {}
// SAFETY: as above.
unsafe impl ByteValued for FsyncIn {}
// SAFETY: as above.
unsafe impl ByteValued for SetxattrIn {}
// SAFETY: as above.
unsafe impl ByteValued for GetxattrIn {}
// SAFETY: as above.
unsafe impl ByteValued for GetxattrOut {}
// SAFETY: as above.
unsafe impl ByteValued for AccessIn {}
// SAFETY: as above.
unsafe impl ByteValued for FallocateIn {}
// SAFETY: as above.
unsafe impl ByteValued for LseekIn {}
// SAFETY: as above.
unsafe impl ByteValued for LseekOut {}
// SAFETY: as above.
unsafe impl ByteValued for CopyFileRangeIn {}
// SAFETY: as above.
unsafe impl ByteValued for Dirent {}

const _: () = {
    assert!(std::mem::size_of::<EntryOut>() == 128);
    assert!(std::mem::size_of::<ForgetIn>() == 8);
    assert!(std::mem::size_of::<BatchForgetIn>() == 8);
    assert!(std::mem::size_of::<ForgetOne>() == 16);
    assert!(std::mem::size_of::<SetattrIn>() == 88);
    assert!(std::mem::size_of::<MknodIn>() == 16);
    assert!(std::mem::size_of::<MkdirIn>() == 8);
    assert!(std::mem::size_of::<RenameIn>() == 8);
    assert!(std::mem::size_of::<Rename2In>() == 16);
    assert!(std::mem::size_of::<LinkIn>() == 8);
    assert!(std::mem::size_of::<OpenIn>() == 8);
    assert!(std::mem::size_of::<CreateIn>() == 16);
    assert!(std::mem::size_of::<OpenOut>() == 16);
    assert!(std::mem::size_of::<ReleaseIn>() == 24);
    assert!(std::mem::size_of::<FlushIn>() == 24);
    assert!(std::mem::size_of::<ReadIn>() == 40);
    assert!(std::mem::size_of::<WriteIn>() == 40);
    assert!(std::mem::size_of::<WriteOut>() == 8);
    assert!(std::mem::size_of::<FsyncIn>() == 16);
    assert!(std::mem::size_of::<SetxattrIn>() == 8);
    assert!(std::mem::size_of::<GetxattrIn>() == 8);
    assert!(std::mem::size_of::<AccessIn>() == 8);
    assert!(std::mem::size_of::<FallocateIn>() == 32);
    assert!(std::mem::size_of::<LseekIn>() == 24);
    assert!(std::mem::size_of::<CopyFileRangeIn>() == 56);
    assert!(std::mem::size_of::<Dirent>() == 24);
};

/// A lock as FUSE carries it: an inclusive byte range, a type (F_RDLCK, F_WRLCK, F_UNLCK) and
/// the holder's pid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct FileLock {
    pub start: u64,
    pub end: u64,
    pub type_: u32,
    pub pid: u32,
}

/// GETLK's, SETLK's and SETLKW's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct LkIn {
    pub fh: u64,
    pub owner: u64,
    pub lk: FileLock,
    pub lk_flags: u32,
    pub padding: u32,
}

/// INTERRUPT's request body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct InterruptIn {
    pub unique: u64,
}

// SAFETY: #[repr(C)] integers only, no implicit padding (size-checked below).
unsafe impl ByteValued for FileLock {}
// SAFETY: as above.
unsafe impl ByteValued for LkIn {}
// SAFETY: as above.
unsafe impl ByteValued for InterruptIn {}

const _: () = {
    assert!(std::mem::size_of::<FileLock>() == 24);
    assert!(std::mem::size_of::<LkIn>() == 48);
    assert!(std::mem::size_of::<InterruptIn>() == 8);
};
