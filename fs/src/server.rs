//! The FUSE request dispatcher: decodes one request, calls the `FileSystem`, encodes the reply.
//!
//! The transport (a virtio descriptor chain, or a byte buffer in tests) is behind the
//! [`RequestReader`] and [`ReplyWriter`] traits. The guest is untrusted: every length in a request
//! is checked against what the transport really holds, and a reply that does not fit is never
//! written in part.

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::ByteValued;

use crate::abi::{self, opcode, InHeader, OutHeader};
use crate::filesystem::{Context, FileSystem};

/// Largest WRITE payload Ferry accepts, and the size the kernel sizes its requests by.
pub const MAX_WRITE: u32 = 1 << 20;
/// Pages per request that fit `MAX_WRITE`.
const MAX_PAGES: u16 = (MAX_WRITE / 4096) as u16;

/// The readable part of one request.
pub trait RequestReader: Read {
    /// Bytes left to read.
    fn available_bytes(&self) -> usize;
}

/// The writable part of one request, where the reply goes.
pub trait ReplyWriter: Write {
    /// Room left for the reply.
    fn available_bytes(&self) -> usize;
}

/// Why a request could not be answered at all. The transport completes it with no reply.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is shorter than a FUSE header.
    #[error("FUSE request is shorter than its header ({0} bytes)")]
    ShortHeader(usize),
    /// The reply does not fit the buffer the guest gave for it.
    #[error("FUSE reply of {needed} bytes does not fit the guest's {available}-byte buffer")]
    ReplyTooLarge {
        /// Size of the reply.
        needed: usize,
        /// Room the guest gave.
        available: usize,
    },
    /// Writing the reply failed.
    #[error("cannot write the FUSE reply")]
    WriteReply(#[source] io::Error),
}

/// Crate result type for the server.
pub type Result<T> = std::result::Result<T, Error>;

/// Counters a server keeps for the control API.
#[derive(Debug)]
pub struct ServerStats {
    ops: Vec<AtomicU64>,
    errors: AtomicU64,
    malformed: AtomicU64,
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats {
            ops: (0..=opcode::MAX + 1).map(|_| AtomicU64::new(0)).collect(),
            errors: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        }
    }
}

impl ServerStats {
    /// Requests seen with `opcode` (unknown opcodes share the last slot).
    pub fn ops(&self, opcode: u32) -> u64 {
        let i = (opcode as usize).min(self.ops.len() - 1);
        self.ops[i].load(Ordering::Relaxed)
    }

    /// Requests answered with an error.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Requests too malformed to answer.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    fn count_op(&self, opcode: u32) {
        let i = (opcode as usize).min(self.ops.len() - 1);
        self.ops[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A FUSE server over one `FileSystem`.
pub struct Server<F> {
    fs: F,
    stats: ServerStats,
}

/// Reads one wire struct, or fails with EINVAL when the request is too short for it.
fn read_obj<T: ByteValued + Default, R: RequestReader>(r: &mut R) -> io::Result<T> {
    let mut v = T::default();
    if r.available_bytes() < size_of::<T>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    r.read_exact(v.as_mut_slice())?;
    Ok(v)
}

impl<F: FileSystem> Server<F> {
    /// A server for `fs`.
    pub fn new(fs: F) -> Self {
        Server {
            fs,
            stats: ServerStats::default(),
        }
    }

    /// The file system served.
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Handles one request. Returns the number of reply bytes written (0 for requests that
    /// take no reply, such as FORGET).
    pub fn handle_message<R: RequestReader, W: ReplyWriter>(
        &self,
        mut r: R,
        mut w: W,
    ) -> Result<usize> {
        let total = r.available_bytes();
        let hdr: InHeader = match read_obj(&mut r) {
            Ok(h) => h,
            Err(_) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return Err(Error::ShortHeader(total));
            }
        };
        self.stats.count_op(hdr.opcode);
        let ctx = Context {
            uid: hdr.uid,
            gid: hdr.gid,
            pid: hdr.pid,
        };
        // The kernel's length must agree with what the transport carries; a request that lies
        // about its size is answered with EINVAL and nothing in it is trusted.
        if hdr.len as usize != total {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return self.reply_error(&hdr, libc::EINVAL, &mut w);
        }
        let res = match hdr.opcode {
            opcode::INIT => self.init(&hdr, &mut r, &mut w),
            opcode::DESTROY => {
                self.fs.destroy();
                self.reply_ok(&hdr, &[], &mut w).map_err(to_io)
            }
            opcode::GETATTR => self.getattr(ctx, &hdr, &mut r, &mut w),
            opcode::STATFS => match self.fs.statfs(ctx, hdr.nodeid) {
                Ok(st) => self
                    .reply_ok(&hdr, abi::StatfsOut::from(&st).as_slice(), &mut w)
                    .map_err(to_io),
                Err(e) => Err(e),
            },
            // These take no reply.
            opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT => return Ok(0),
            _ => Err(io::Error::from_raw_os_error(libc::ENOSYS)),
        };
        match res {
            Ok(n) => Ok(n),
            Err(e) => self.reply_error(&hdr, errno(&e), &mut w),
        }
    }

    fn init<R: RequestReader, W: ReplyWriter>(
        &self,
        hdr: &InHeader,
        r: &mut R,
        w: &mut W,
    ) -> io::Result<usize> {
        let init: abi::InitIn = read_obj(r)?;
        if init.major < abi::KERNEL_VERSION
            || (init.major == abi::KERNEL_VERSION && init.minor < abi::MIN_KERNEL_MINOR_VERSION)
        {
            log::error!(
                "the guest's FUSE is version {}.{}; Ferry needs {}.{} or newer: use a newer guest kernel",
                init.major,
                init.minor,
                abi::KERNEL_VERSION,
                abi::MIN_KERNEL_MINOR_VERSION
            );
            return Err(io::Error::from_raw_os_error(libc::EPROTO));
        }
        let mut out = abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor: abi::KERNEL_MINOR_VERSION,
            ..Default::default()
        };
        // A newer major version: answer with ours only, and the kernel asks again.
        if init.major > abi::KERNEL_VERSION {
            return self.reply_ok(hdr, out.as_slice(), w).map_err(to_io);
        }
        let wanted = self.fs.init(init.flags)? | abi::MAX_PAGES;
        out.flags = init.flags & wanted;
        out.max_readahead = init.max_readahead;
        out.max_background = u16::MAX;
        out.congestion_threshold = (u16::MAX / 4) * 3;
        out.max_write = MAX_WRITE;
        out.time_gran = 1;
        out.max_pages = MAX_PAGES;
        log::info!(
            "FUSE session started: guest speaks {}.{}, flags {:#x} accepted",
            init.major,
            init.minor,
            out.flags
        );
        self.reply_ok(hdr, out.as_slice(), w).map_err(to_io)
    }

    fn getattr<R: RequestReader, W: ReplyWriter>(
        &self,
        ctx: Context,
        hdr: &InHeader,
        r: &mut R,
        w: &mut W,
    ) -> io::Result<usize> {
        let arg: abi::GetattrIn = read_obj(r)?;
        let fh = (arg.flags & abi::GETATTR_FH != 0).then_some(arg.fh);
        let (st, timeout) = self.fs.getattr(ctx, hdr.nodeid, fh)?;
        let out = abi::AttrOut {
            attr_valid: timeout.as_secs(),
            attr_valid_nsec: timeout.subsec_nanos(),
            dummy: 0,
            attr: abi::Attr::from(&st),
        };
        self.reply_ok(hdr, out.as_slice(), w).map_err(to_io)
    }

    /// Writes a successful reply: header and body, whole or not at all.
    fn reply_ok<W: ReplyWriter>(&self, hdr: &InHeader, body: &[u8], w: &mut W) -> Result<usize> {
        let len = size_of::<OutHeader>() + body.len();
        if w.available_bytes() < len {
            return Err(Error::ReplyTooLarge {
                needed: len,
                available: w.available_bytes(),
            });
        }
        let out = OutHeader {
            len: len as u32,
            error: 0,
            unique: hdr.unique,
        };
        w.write_all(out.as_slice()).map_err(Error::WriteReply)?;
        w.write_all(body).map_err(Error::WriteReply)?;
        Ok(len)
    }

    fn reply_error<W: ReplyWriter>(&self, hdr: &InHeader, errno: i32, w: &mut W) -> Result<usize> {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let len = size_of::<OutHeader>();
        if w.available_bytes() < len {
            return Err(Error::ReplyTooLarge {
                needed: len,
                available: w.available_bytes(),
            });
        }
        let out = OutHeader {
            len: len as u32,
            error: -errno,
            unique: hdr.unique,
        };
        w.write_all(out.as_slice()).map_err(Error::WriteReply)?;
        Ok(len)
    }
}

/// The errno to send for `e`: its OS error, or EIO when it has none.
fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A reply that did not fit is reported to the guest as ERANGE-less EIO by the caller; keep the
/// reason in the log.
fn to_io(e: Error) -> io::Error {
    match e {
        Error::ReplyTooLarge { .. } => io::Error::from_raw_os_error(libc::ERANGE),
        Error::WriteReply(e) => e,
        Error::ShortHeader(_) => io::Error::from_raw_os_error(libc::EINVAL),
    }
}

/// A request or reply held in memory: the transport for unit tests and fuzzing.
#[derive(Debug, Default)]
pub struct ByteBuf {
    /// The bytes.
    pub data: Vec<u8>,
    pos: usize,
    limit: usize,
}

impl ByteBuf {
    /// A request reader over `data`.
    pub fn request(data: Vec<u8>) -> Self {
        let limit = data.len();
        ByteBuf {
            data,
            pos: 0,
            limit,
        }
    }

    /// An empty reply buffer with room for `limit` bytes.
    pub fn reply(limit: usize) -> Self {
        ByteBuf {
            data: Vec::new(),
            pos: 0,
            limit,
        }
    }
}

impl Read for ByteBuf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for ByteBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.limit - self.data.len());
        self.data.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl RequestReader for &mut ByteBuf {
    fn available_bytes(&self) -> usize {
        self.data.len() - self.pos
    }
}

impl ReplyWriter for &mut ByteBuf {
    fn available_bytes(&self) -> usize {
        self.limit - self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct RootOnly;

    impl FileSystem for RootOnly {
        fn getattr(
            &self,
            _ctx: Context,
            inode: u64,
            _handle: Option<u64>,
        ) -> io::Result<(libc::stat64, std::time::Duration)> {
            if inode != abi::ROOT_ID {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            // SAFETY: stat64 is plain old data; all-zero is a valid value.
            let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
            st.st_ino = 1;
            st.st_mode = libc::S_IFDIR | 0o755;
            Ok((st, std::time::Duration::from_secs(1)))
        }
    }

    fn request(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let hdr = InHeader {
            len: (size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: 7,
            nodeid,
            ..Default::default()
        };
        let mut v = hdr.as_slice().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn run(req: Vec<u8>, room: usize) -> (Result<usize>, Vec<u8>) {
        let server = Server::new(RootOnly);
        let mut r = ByteBuf::request(req);
        let mut w = ByteBuf::reply(room);
        let res = server.handle_message(&mut r, &mut w);
        (res, w.data)
    }

    fn out_header(reply: &[u8]) -> OutHeader {
        let mut h = OutHeader::default();
        h.as_mut_slice().copy_from_slice(&reply[..16]);
        h
    }

    fn init_body(major: u32, minor: u32) -> Vec<u8> {
        let mut v = abi::InitIn {
            major,
            minor,
            max_readahead: 4096,
            flags: abi::MAX_PAGES | 1,
        }
        .as_slice()
        .to_vec();
        // Newer kernels send a longer INIT (flags2 and reserved words); it must be accepted.
        v.extend_from_slice(&[0u8; 48]);
        v
    }

    #[test]
    fn init_negotiates_version_and_limits() {
        let (res, reply) = run(request(opcode::INIT, 0, &init_body(7, 38)), 4096);
        assert_eq!(res.unwrap(), 16 + 64);
        let h = out_header(&reply);
        assert_eq!((h.len, h.error, h.unique), (80, 0, 7));
        let mut out = abi::InitOut::default();
        out.as_mut_slice().copy_from_slice(&reply[16..80]);
        assert_eq!((out.major, out.minor), (7, abi::KERNEL_MINOR_VERSION));
        assert_eq!(out.max_write, MAX_WRITE);
        assert_eq!(out.max_pages, 256);
        // Only flags the file system accepted are echoed: bit 0 (ASYNC_READ) is not.
        assert_eq!(out.flags, abi::MAX_PAGES);
    }

    #[test]
    fn init_rejects_old_kernels() {
        let (_, reply) = run(request(opcode::INIT, 0, &init_body(7, 20)), 4096);
        assert_eq!(out_header(&reply).error, -libc::EPROTO);
    }

    #[test]
    fn getattr_of_root() {
        let (res, reply) = run(
            request(opcode::GETATTR, 1, abi::GetattrIn::default().as_slice()),
            4096,
        );
        assert_eq!(res.unwrap(), 16 + 104);
        let mut out = abi::AttrOut::default();
        out.as_mut_slice().copy_from_slice(&reply[16..]);
        assert_eq!(out.attr.mode, libc::S_IFDIR | 0o755);
        assert_eq!(out.attr_valid, 1);
    }

    #[test]
    fn unknown_and_unimplemented_opcodes_get_enosys() {
        for op in [9999, opcode::READ, opcode::STATFS] {
            let (_, reply) = run(request(op, 1, &[]), 4096);
            assert_eq!(out_header(&reply).error, -libc::ENOSYS, "opcode {op}");
        }
    }

    #[test]
    fn short_header_is_an_error_not_a_panic() {
        let (res, reply) = run(vec![1, 2, 3], 4096);
        assert!(matches!(res, Err(Error::ShortHeader(3))));
        assert!(reply.is_empty());
    }

    #[test]
    fn length_that_disagrees_with_the_chain_gets_einval() {
        let mut req = request(opcode::GETATTR, 1, abi::GetattrIn::default().as_slice());
        req[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        let (_, reply) = run(req, 4096);
        assert_eq!(out_header(&reply).error, -libc::EINVAL);
    }

    #[test]
    fn truncated_body_gets_einval() {
        let (_, reply) = run(request(opcode::GETATTR, 1, &[0u8; 4]), 4096);
        assert_eq!(out_header(&reply).error, -libc::EINVAL);
    }

    #[test]
    fn reply_buffer_too_small_writes_nothing() {
        let (res, reply) = run(
            request(opcode::GETATTR, 1, abi::GetattrIn::default().as_slice()),
            20,
        );
        // The attr reply does not fit; the server falls back to an error header, which does.
        assert_eq!(res.unwrap(), 16);
        assert_eq!(out_header(&reply).error, -libc::ERANGE);
        let (res, reply) = run(
            request(opcode::GETATTR, 1, abi::GetattrIn::default().as_slice()),
            8,
        );
        assert!(matches!(res, Err(Error::ReplyTooLarge { .. })));
        assert!(reply.is_empty());
    }

    #[test]
    fn forget_takes_no_reply() {
        let (res, reply) = run(request(opcode::FORGET, 5, &[0u8; 8]), 4096);
        assert_eq!(res.unwrap(), 0);
        assert!(reply.is_empty());
    }

    #[test]
    fn stats_count_ops_and_errors() {
        let server = Server::new(RootOnly);
        for _ in 0..3 {
            let mut r = ByteBuf::request(request(opcode::READ, 1, &[]));
            let mut w = ByteBuf::reply(64);
            server.handle_message(&mut r, &mut w).unwrap();
        }
        assert_eq!(server.stats().ops(opcode::READ), 3);
        assert_eq!(server.stats().errors(), 3);
    }
}
