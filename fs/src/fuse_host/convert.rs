//! Between `fuser`'s types and Ferry's [`FileSystem`](crate::filesystem::FileSystem) types
//! for the host mount: errors, names, times, attributes, file types, and the buffers READ
//! and WRITE copy through (fuser hands a request's data as a slice and takes a reply's as
//! one, where the virtio path goes straight between the file and guest memory).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo, Request, TimeOrNow};

use crate::filesystem::{Context, FileReader, FileWriter, TimeSpec};

pub(super) fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(crate::server::errno(e))
}

pub(super) fn ctx(req: &Request) -> Context {
    Context {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

pub(super) fn cname(name: &OsStr) -> Result<CString, Errno> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// `sec` + `nsec` since the epoch (either may describe a time before it).
pub(super) fn system_time(sec: i64, nsec: i64) -> SystemTime {
    let nsec = Duration::from_nanos(nsec.clamp(0, 999_999_999) as u64);
    let t = if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(sec as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(sec.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(nsec)).unwrap_or(UNIX_EPOCH)
}

pub(super) fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// A `DT_*` directory entry type as a `FileType` (unknown types as regular files).
pub(super) fn dirent_type(t: u32) -> FileType {
    match u8::try_from(t).unwrap_or(libc::DT_UNKNOWN) {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        libc::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// The attributes of node `ino` from the host's `stat`. `ino` is the node id: fuser uses the
/// attribute's inode number as the node id.
pub(super) fn file_attr(ino: u64, st: &libc::stat64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size.max(0) as u64,
        blocks: st.st_blocks.max(0) as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        // The low 32 bits of glibc's dev_t are the kernel's new_encode_dev() form, which is
        // what FUSE carries.
        rdev: st.st_rdev as u32,
        blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
        flags: 0,
    }
}

pub(super) fn time_spec(t: TimeOrNow) -> TimeSpec {
    match t {
        TimeOrNow::Now => TimeSpec::Now,
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::At(
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                d.subsec_nanos(),
            ),
            Err(e) => {
                // Before the epoch: whole seconds down, nanoseconds up.
                let d = e.duration();
                let mut sec = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                TimeSpec::At(sec, nsec)
            }
        },
    }
}

/// READ's destination: a buffer the data is copied into before it is sent.
pub(super) struct VecWriter {
    pub(super) buf: Vec<u8>,
}

impl FileWriter for VecWriter {
    fn write_from_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize> {
        let start = self.buf.len();
        self.buf.resize(start + count, 0);
        let mut done = 0;
        let res = loop {
            if done == count {
                break Ok(done);
            }
            match f.read_at(&mut self.buf[start + done..], off + done as u64) {
                Ok(0) => break Ok(done),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Data already read is returned; the error shows on the next read.
                Err(_) if done > 0 => break Ok(done),
                Err(e) => break Err(e),
            }
        };
        self.buf.truncate(start + done);
        res
    }
}

/// WRITE's source: the request's data.
pub(super) struct SliceReader<'a> {
    pub(super) data: &'a [u8],
}

impl FileReader for SliceReader<'_> {
    fn read_to_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize> {
        let count = count.min(self.data.len());
        let mut done = 0;
        while done < count {
            match f.write_at(&self.data[done..count], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) if done > 0 => break,
                Err(e) => return Err(e),
            }
        }
        self.data = &self.data[done..];
        Ok(done)
    }
}
