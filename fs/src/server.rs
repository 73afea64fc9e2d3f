//! The FUSE request dispatcher: decodes one request, calls the `FileSystem`, encodes the reply.
//!
//! The transport (a virtio descriptor chain, or memory in tests) is behind the
//! [`RequestReader`] and [`ReplyWriter`] traits. The guest is untrusted: every length in a request
//! is checked against what the transport really holds, names must be NUL-terminated and short,
//! and a reply that does not fit is never written in part.
//!
//! INIT is answered in `init`; lock requests, and the sessions a lock wait spans, in `locks`;
//! the security context of a request that makes a node is read in `extensions`; `wire` holds
//! the decoding and encoding helpers.

use std::collections::HashSet;
use std::ffi::CStr;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use vm_memory::ByteValued;

use crate::abi::{self, opcode, InHeader, OutHeader};
use crate::filesystem::{
    Context, DirEntry, Entry, FileReader, FileSystem, FileWriter, SecCtx, SetattrArgs, TimeSpec,
};
pub use crate::stats::ServerStats;

/// Largest WRITE payload Ferry accepts, and the size the kernel sizes its requests by.
pub const MAX_WRITE: u32 = 1 << 20;
/// Pages per request that fit `MAX_WRITE`.
const MAX_PAGES: u16 = (MAX_WRITE / 4096) as u16;
/// Largest request body read into memory for name-carrying requests (an xattr value is at most
/// 64 KiB, plus its name).
const MAX_BODY: usize = 64 * 1024 + 4096;
/// Longest name in a directory.
const NAME_MAX: usize = 255;
/// Longest symlink target.
const PATH_MAX: usize = 4096;

/// The readable part of one request.
pub trait RequestReader: Read + FileReader {
    /// Bytes left to read.
    fn available_bytes(&self) -> usize;
}

/// The writable part of one request, where the reply goes.
pub trait ReplyWriter: Write + FileWriter + Sized {
    /// Room left for the reply.
    fn available_bytes(&self) -> usize;

    /// Splits the room after the first `offset` bytes off into a writer of its own, so data
    /// can be written after a header that is written last.
    fn split_at(&mut self, offset: usize) -> io::Result<Self>;
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
    /// The request's session ended before it was answered, or while it waited for a lock
    /// (the guest rebooted, the frontend left): nothing was written back, and the transport
    /// must not return its buffers either, which belong to whoever owns that memory now.
    #[error("the FUSE session ended before the request was answered; it is dropped unanswered")]
    Abandoned,
}

/// Crate result type for the server.
pub type Result<T> = std::result::Result<T, Error>;

/// A FUSE server over one `FileSystem`.
pub struct Server<F> {
    fs: F,
    stats: ServerStats,
    /// Requests the guest interrupted (by unique id) while they wait for a lock.
    interrupts: Mutex<HashSet<u64>>,
    /// Bumped to abandon every wait (the session ended).
    generation: AtomicU64,
    /// Bumped to end every wait with ENOLCK (the transport stops its queues).
    refusals: AtomicU64,
    /// The session asked for the labels of the nodes the guest makes (FUSE_SECURITY_CTX).
    secctx: AtomicBool,
    /// Where file events go (`audit=files`), once set.
    audit: std::sync::OnceLock<crate::audit::FileAudit>,
    /// An INIT has been answered: the next one starts a new session (a guest that rebooted).
    started: AtomicBool,
}

mod extensions;
mod init;
mod locks;
mod quick;
mod wire;
use extensions::{security_context, split_extensions};
pub use locks::may_block;
use locks::{is_session_ended, SessionEnded};
use wire::*;

impl<F: FileSystem> Server<F> {
    /// A server for `fs`.
    pub fn new(fs: F) -> Self {
        Server {
            fs,
            stats: ServerStats::default(),
            interrupts: Mutex::new(HashSet::new()),
            generation: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            secctx: AtomicBool::new(false),
            audit: std::sync::OnceLock::new(),
            started: AtomicBool::new(false),
        }
    }

    /// The security context of a request that makes a node: in its extensions (`ext`, 6.2 and
    /// later guests), or after its names (`rest`, earlier ones), on a session that asked for
    /// it; `None` on one that did not (then `rest` is whatever followed, as ever ignored).
    fn secctx<'a>(&self, ext: &'a [u8], rest: &'a [u8]) -> io::Result<Option<SecCtx<'a>>> {
        if !ext.is_empty() {
            return security_context(ext);
        }
        if self.secctx.load(Ordering::Relaxed) {
            return security_context(rest);
        }
        Ok(None)
    }

    /// A file, folder, node or link `kind` named `name` was made in `node`.
    fn created(&self, ctx: &Context, node: u64, name: &CStr, kind: &str) {
        if let Some(a) = self.audit.get() {
            let extra = ferry_audit::json!({ "kind": kind });
            a.event(&self.fs, ctx, "create", node, Some(name), extra);
        }
    }

    /// Sends this share's file events to `audit` from now on (`audit=files`).
    pub fn set_file_audit(&self, audit: crate::audit::FileAudit) {
        let _ = self.audit.set(audit);
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
    pub fn handle_message<R: RequestReader, W: ReplyWriter>(&self, r: R, w: W) -> Result<usize> {
        self.handle(r, w, true, self.session())
    }

    /// [`Self::handle_message`] for a request taken off the transport during `session`
    /// ([`Self::session`] then), answered later on another thread: a request whose session
    /// has ended by then is dropped unanswered ([`Error::Abandoned`]), its buffers being the
    /// previous kernel's.
    pub fn handle_message_in_session<R: RequestReader, W: ReplyWriter>(
        &self,
        session: u64,
        r: R,
        w: W,
    ) -> Result<usize> {
        self.handle(r, w, true, session)
    }

    /// [`Self::handle_message`] for a transport that cannot spare a thread to wait: a SETLKW
    /// whose lock is taken is refused with ENOLCK ("no locks available", what fcntl and flock
    /// say when the lock table is full) instead of waiting. Waiting on the thread that takes
    /// the share's requests would hold up the very request that frees the lock.
    pub fn handle_message_without_waiting<R: RequestReader, W: ReplyWriter>(
        &self,
        r: R,
        w: W,
    ) -> Result<usize> {
        self.handle(r, w, false, self.session())
    }

    fn handle<R: RequestReader, W: ReplyWriter>(
        &self,
        mut r: R,
        mut w: W,
        may_wait: bool,
        session: u64,
    ) -> Result<usize> {
        if self.session() != session {
            return Err(Error::Abandoned);
        }
        let start = std::time::Instant::now();
        let _answering = self.stats.in_flight();
        let total = r.available_bytes();
        let hdr: InHeader = match read_obj(&mut r) {
            Ok(h) => h,
            Err(_) => {
                self.stats.count_malformed();
                return Err(Error::ShortHeader(total));
            }
        };
        self.stats.count_op(hdr.opcode);
        // The kernel's length must agree with what the transport carries; a request that lies
        // about its size is answered with EINVAL and nothing in it is trusted.
        if hdr.len as usize != total {
            self.stats.count_malformed();
            return self.reply_error(&hdr, libc::EINVAL, &mut w);
        }
        let res = self.dispatch(&hdr, &mut r, &mut w, may_wait, session);
        self.stats.observe(start.elapsed());
        log::trace!(
            "fuse: unique {} op {} node {} -> {:?}",
            hdr.unique,
            hdr.opcode,
            hdr.nodeid,
            res.as_ref().map_err(|e| e.raw_os_error())
        );
        match res {
            Ok(n) => Ok(n),
            Err(e) if is_session_ended(&e) => Err(Error::Abandoned),
            Err(e) => {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    self.stats.count_malformed();
                }
                self.reply_error(&hdr, errno(&e), &mut w)
            }
        }
    }

    fn dispatch<R: RequestReader, W: ReplyWriter>(
        &self,
        hdr: &InHeader,
        r: &mut R,
        w: &mut W,
        may_wait: bool,
        session: u64,
    ) -> io::Result<usize> {
        let ctx = Context {
            uid: hdr.uid,
            gid: hdr.gid,
            pid: hdr.pid,
        };
        let fs = &self.fs;
        let node = hdr.nodeid;
        let ok = |parts: &[&[u8]], w: &mut W| self.reply_ok(hdr, parts, w).map_err(to_io);
        let entry = |e: Entry, w: &mut W| ok(&[entry_out(&e).as_slice()], w);
        match hdr.opcode {
            opcode::INIT => return self.init(hdr, r, w),
            opcode::DESTROY => {
                fs.destroy();
                return ok(&[], w);
            }
            opcode::FORGET => {
                let arg: abi::ForgetIn = read_obj(r)?;
                fs.forget(node, arg.nlookup);
                return Ok(0);
            }
            opcode::BATCH_FORGET => {
                let arg: abi::BatchForgetIn = read_obj(r)?;
                for _ in 0..arg.count {
                    // A count larger than the body stops at the body's end.
                    let Ok(one) = read_obj::<abi::ForgetOne, R>(r) else {
                        break;
                    };
                    fs.forget(one.nodeid, one.nlookup);
                }
                return Ok(0);
            }
            opcode::GETLK => {
                let arg: abi::LkIn = read_obj(r)?;
                let lk = fs.getlk(ctx, node, arg.fh, arg.owner, arg.lk)?;
                return ok(&[lk.as_slice()], w);
            }
            // Only a lock wait lasts long enough to be interrupted; note the request for it.
            opcode::INTERRUPT => {
                let arg: abi::InterruptIn = read_obj(r)?;
                self.note_interrupt(arg.unique);
                return Ok(0);
            }
            opcode::SETLK | opcode::SETLKW => {
                let arg: abi::LkIn = read_obj(r)?;
                self.set_lock(ctx, hdr, &arg, may_wait, session)?;
                return ok(&[], w);
            }
            opcode::LOOKUP => {
                let body = read_body(r)?;
                let (name, _) = take_cstr(&body, NAME_MAX)?;
                return entry(fs.lookup(ctx, node, name)?, w);
            }
            opcode::GETATTR => {
                let arg: abi::GetattrIn = read_obj(r)?;
                let fh = (arg.flags & abi::GETATTR_FH != 0).then_some(arg.fh);
                let (st, t) = fs.getattr(ctx, node, fh)?;
                return ok(&[attr_out(&st, t).as_slice()], w);
            }
            opcode::SETATTR => {
                let arg: abi::SetattrIn = read_obj(r)?;
                let v = arg.valid;
                use abi::fattr;
                let time = |set: u32, now: u32, s: u64, ns: u32| {
                    if v & now != 0 {
                        Some(TimeSpec::Now)
                    } else if v & set != 0 {
                        Some(TimeSpec::At(s as i64, ns))
                    } else {
                        None
                    }
                };
                let args = SetattrArgs {
                    mode: (v & fattr::MODE != 0).then_some(arg.mode),
                    uid: (v & fattr::UID != 0).then_some(arg.uid),
                    gid: (v & fattr::GID != 0).then_some(arg.gid),
                    size: (v & fattr::SIZE != 0).then_some(arg.size),
                    atime: time(fattr::ATIME, fattr::ATIME_NOW, arg.atime, arg.atimensec),
                    mtime: time(fattr::MTIME, fattr::MTIME_NOW, arg.mtime, arg.mtimensec),
                };
                let fh = (v & fattr::FH != 0).then_some(arg.fh);
                if v & fattr::KILL_SUIDGID != 0 && v & fattr::MODE == 0 {
                    kill_suidgid(fs, ctx, node, fh);
                }
                let (st, t) = fs.setattr(ctx, node, fh, args)?;
                if let Some(a) = self.audit.get() {
                    if args.mode.is_some() || args.uid.is_some() || args.gid.is_some() {
                        let extra = crate::audit::setattr_fields(&args);
                        a.event(fs, &ctx, "setattr", node, None, extra);
                    }
                }
                return ok(&[attr_out(&st, t).as_slice()], w);
            }
            opcode::READLINK => {
                let target = fs.readlink(ctx, node)?;
                return ok(&[&target], w);
            }
            opcode::SYMLINK => {
                let body = read_body(r)?;
                let (args, ext) = split_extensions(&body, hdr.total_extlen)?;
                let (name, rest) = take_name(args)?;
                let (target, rest) = take_cstr(rest, PATH_MAX)?;
                let secctx = self.secctx(ext, rest)?;
                let e = fs.symlink(ctx, target, node, name, secctx)?;
                self.created(&ctx, node, name, "symlink");
                return entry(e, w);
            }
            opcode::MKNOD => {
                let arg: abi::MknodIn = read_obj(r)?;
                let body = read_body(r)?;
                let (args, ext) = split_extensions(&body, hdr.total_extlen)?;
                let (name, rest) = take_name(args)?;
                let secctx = self.secctx(ext, rest)?;
                let e = fs.mknod(ctx, node, name, arg.mode, arg.rdev, arg.umask, secctx)?;
                self.created(&ctx, node, name, "node");
                return entry(e, w);
            }
            opcode::MKDIR => {
                let arg: abi::MkdirIn = read_obj(r)?;
                let body = read_body(r)?;
                let (args, ext) = split_extensions(&body, hdr.total_extlen)?;
                let (name, rest) = take_name(args)?;
                let secctx = self.secctx(ext, rest)?;
                let e = fs.mkdir(ctx, node, name, arg.mode, arg.umask, secctx)?;
                self.created(&ctx, node, name, "dir");
                return entry(e, w);
            }
            opcode::UNLINK | opcode::RMDIR => {
                let body = read_body(r)?;
                let (name, _) = take_name(&body)?;
                // The path is read first: the entry is gone after.
                let a = self.audit.get();
                let path_then = a.map(|a| (a, a.entry_path(fs, node, name)));
                let op = if hdr.opcode == opcode::UNLINK {
                    fs.unlink(ctx, node, name)?;
                    "unlink"
                } else {
                    fs.rmdir(ctx, node, name)?;
                    "rmdir"
                };
                if let Some((a, path)) = path_then {
                    a.removed(&ctx, op, path);
                }
                return ok(&[], w);
            }
            opcode::RENAME | opcode::RENAME2 => {
                let (newdir, flags) = if hdr.opcode == opcode::RENAME {
                    (read_obj::<abi::RenameIn, R>(r)?.newdir, 0)
                } else {
                    let a: abi::Rename2In = read_obj(r)?;
                    (a.newdir, a.flags)
                };
                let body = read_body(r)?;
                let (old, rest) = take_name(&body)?;
                let (new, _) = take_name(rest)?;
                let a = self.audit.get();
                let from = a.map(|a| (a, a.entry_path(fs, node, old)));
                fs.rename(ctx, node, old, newdir, new, flags)?;
                if let Some((a, from)) = from {
                    a.renamed(fs, &ctx, from, newdir, new);
                }
                return ok(&[], w);
            }
            opcode::LINK => {
                let arg: abi::LinkIn = read_obj(r)?;
                let body = read_body(r)?;
                let (name, _) = take_name(&body)?;
                let e = fs.link(ctx, arg.oldnodeid, node, name)?;
                self.created(&ctx, node, name, "link");
                return entry(e, w);
            }
            opcode::OPEN | opcode::OPENDIR => {
                let arg: abi::OpenIn = read_obj(r)?;
                let (fh, flags) = if hdr.opcode == opcode::OPEN {
                    let (fh, flags) = fs.open(ctx, node, arg.flags)?;
                    if arg.open_flags & abi::OPEN_KILL_SUIDGID != 0 {
                        kill_suidgid(fs, ctx, node, Some(fh));
                    }
                    if let Some(a) = self.audit.get() {
                        if crate::audit::writes(arg.flags) {
                            let extra =
                                ferry_audit::json!({ "flags": format!("{:#o}", arg.flags) });
                            a.event(fs, &ctx, "open_write", node, None, extra);
                        }
                    }
                    (fh, flags)
                } else {
                    fs.opendir(ctx, node, arg.flags)?
                };
                let out = abi::OpenOut {
                    fh,
                    open_flags: flags,
                    padding: 0,
                };
                return ok(&[out.as_slice()], w);
            }
            opcode::CREATE => {
                let arg: abi::CreateIn = read_obj(r)?;
                let body = read_body(r)?;
                let (args, ext) = split_extensions(&body, hdr.total_extlen)?;
                let (name, rest) = take_name(args)?;
                let secctx = self.secctx(ext, rest)?;
                let (e, fh, flags) =
                    fs.create(ctx, node, name, arg.mode, arg.flags, arg.umask, secctx)?;
                self.created(&ctx, node, name, "file");
                if arg.open_flags & abi::OPEN_KILL_SUIDGID != 0 {
                    kill_suidgid(fs, ctx, e.inode, Some(fh));
                }
                let out = abi::OpenOut {
                    fh,
                    open_flags: flags,
                    padding: 0,
                };
                return ok(&[entry_out(&e).as_slice(), out.as_slice()], w);
            }
            opcode::READ => return self.read(ctx, hdr, r, w),
            opcode::WRITE => {
                let arg: abi::WriteIn = read_obj(r)?;
                // The payload must be in the request as announced, and within max_write.
                if arg.size > MAX_WRITE || arg.size as usize != r.available_bytes() {
                    return Err(einval());
                }
                let n = fs.write(ctx, node, arg.fh, r, arg.size, arg.offset)?;
                if arg.write_flags & abi::WRITE_KILL_SUIDGID != 0 {
                    kill_suidgid(fs, ctx, node, Some(arg.fh));
                }
                let out = abi::WriteOut {
                    size: n as u32,
                    padding: 0,
                };
                return ok(&[out.as_slice()], w);
            }
            opcode::STATFS => {
                let st = fs.statfs(ctx, node)?;
                return ok(&[abi::StatfsOut::from(&st).as_slice()], w);
            }
            opcode::RELEASE | opcode::RELEASEDIR => {
                let arg: abi::ReleaseIn = read_obj(r)?;
                if hdr.opcode == opcode::RELEASE {
                    fs.release(ctx, node, arg.fh)?;
                } else {
                    fs.releasedir(ctx, node, arg.fh)?;
                }
                return ok(&[], w);
            }
            opcode::FSYNC | opcode::FSYNCDIR => {
                let arg: abi::FsyncIn = read_obj(r)?;
                let datasync = arg.fsync_flags & 1 != 0;
                if hdr.opcode == opcode::FSYNC {
                    fs.fsync(ctx, node, datasync, arg.fh)?;
                } else {
                    fs.fsyncdir(ctx, node, datasync, arg.fh)?;
                }
                return ok(&[], w);
            }
            opcode::FLUSH => {
                let arg: abi::FlushIn = read_obj(r)?;
                fs.flush(ctx, node, arg.fh)?;
                return ok(&[], w);
            }
            opcode::SETXATTR => {
                let arg: abi::SetxattrIn = read_obj(r)?;
                let body = read_body(r)?;
                let (name, value) = take_cstr(&body, NAME_MAX)?;
                if value.len() != arg.size as usize {
                    return Err(einval());
                }
                fs.setxattr(ctx, node, name, value, arg.flags)?;
                return ok(&[], w);
            }
            opcode::GETXATTR | opcode::LISTXATTR => {
                let arg: abi::GetxattrIn = read_obj(r)?;
                let v = if hdr.opcode == opcode::GETXATTR {
                    let body = read_body(r)?;
                    let (name, _) = take_cstr(&body, NAME_MAX)?;
                    fs.getxattr(ctx, node, name, arg.size)?
                } else {
                    fs.listxattr(ctx, node, arg.size)?
                };
                if arg.size == 0 {
                    let out = abi::GetxattrOut {
                        size: v.len() as u32,
                        padding: 0,
                    };
                    return ok(&[out.as_slice()], w);
                }
                if v.len() > arg.size as usize {
                    return Err(io::Error::from_raw_os_error(libc::ERANGE));
                }
                return ok(&[&v], w);
            }
            opcode::REMOVEXATTR => {
                let body = read_body(r)?;
                let (name, _) = take_cstr(&body, NAME_MAX)?;
                fs.removexattr(ctx, node, name)?;
                return ok(&[], w);
            }
            opcode::READDIR | opcode::READDIRPLUS => return self.readdir(ctx, hdr, r, w),
            opcode::ACCESS => {
                let arg: abi::AccessIn = read_obj(r)?;
                fs.access(ctx, node, arg.mask)?;
                return ok(&[], w);
            }
            opcode::FALLOCATE => {
                let arg: abi::FallocateIn = read_obj(r)?;
                fs.fallocate(ctx, node, arg.fh, arg.mode, arg.offset, arg.length)?;
                return ok(&[], w);
            }
            opcode::LSEEK => {
                let arg: abi::LseekIn = read_obj(r)?;
                let off = fs.lseek(ctx, node, arg.fh, arg.offset, arg.whence)?;
                return ok(&[abi::LseekOut { offset: off }.as_slice()], w);
            }
            opcode::COPY_FILE_RANGE => {
                let a: abi::CopyFileRangeIn = read_obj(r)?;
                let n = fs.copy_file_range(
                    ctx,
                    node,
                    a.fh_in,
                    a.off_in,
                    a.nodeid_out,
                    a.fh_out,
                    a.off_out,
                    a.len,
                    a.flags,
                )?;
                let out = abi::WriteOut {
                    size: n as u32,
                    padding: 0,
                };
                return ok(&[out.as_slice()], w);
            }
            opcode::SYNCFS => {
                fs.syncfs(ctx, node)?;
                return ok(&[], w);
            }
            _ => {}
        }
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    /// READ: the data goes straight from the file into the reply, after a header written last.
    fn read<R: RequestReader, W: ReplyWriter>(
        &self,
        ctx: Context,
        hdr: &InHeader,
        r: &mut R,
        w: &mut W,
    ) -> io::Result<usize> {
        let arg: abi::ReadIn = read_obj(r)?;
        if arg.size > MAX_WRITE {
            return Err(einval());
        }
        let hlen = size_of::<OutHeader>();
        let mut data = w.split_at(hlen)?;
        let size = (arg.size as usize).min(data.available_bytes());
        let n = self
            .fs
            .read(ctx, hdr.nodeid, arg.fh, &mut data, size as u32, arg.offset)?;
        let out = OutHeader {
            len: (hlen + n) as u32,
            error: 0,
            unique: hdr.unique,
        };
        w.write_all(out.as_slice())?;
        Ok(hlen + n)
    }

    /// READDIR and READDIRPLUS: entries are packed into a buffer as large as the guest asked.
    fn readdir<R: RequestReader, W: ReplyWriter>(
        &self,
        ctx: Context,
        hdr: &InHeader,
        r: &mut R,
        w: &mut W,
    ) -> io::Result<usize> {
        let arg: abi::ReadIn = read_obj(r)?;
        let plus = hdr.opcode == opcode::READDIRPLUS;
        let room = (arg.size as usize)
            .min(MAX_WRITE as usize)
            .min(w.available_bytes().saturating_sub(size_of::<OutHeader>()));
        let mut buf = Vec::with_capacity(room);
        let fs = &self.fs;
        let mut lookup_err = None;
        let mut name_buf = Vec::with_capacity(256);
        fs.readdir(ctx, hdr.nodeid, arg.fh, arg.offset, &mut |e: DirEntry<
            '_,
        >| {
            let dsize = dirent_size(e.name.len());
            let need = dsize + if plus { size_of::<abi::EntryOut>() } else { 0 };
            if buf.len() + need > room {
                return false;
            }
            if plus {
                let is_dot = e.name == b"." || e.name == b"..";
                // "." and ".." carry no entry: node id 0 tells the kernel not to cache them.
                let eo = if is_dot {
                    abi::EntryOut::default()
                } else {
                    name_buf.clear();
                    name_buf.extend_from_slice(e.name);
                    name_buf.push(0);
                    let Ok(name) = CStr::from_bytes_with_nul(&name_buf) else {
                        return true;
                    };
                    match fs.lookup_listed(ctx, hdr.nodeid, name, e.ino) {
                        Ok(en) => entry_out(&en),
                        Err(err) => {
                            // The entry vanished between listing and lookup: skip it, unless
                            // it is the first (then report the error).
                            if buf.is_empty() {
                                lookup_err = Some(err);
                                return false;
                            }
                            return true;
                        }
                    }
                };
                buf.extend_from_slice(eo.as_slice());
            }
            let d = abi::Dirent {
                ino: e.ino,
                off: e.offset,
                namelen: e.name.len() as u32,
                type_: e.type_,
            };
            buf.extend_from_slice(d.as_slice());
            buf.extend_from_slice(e.name);
            buf.resize(
                buf.len() + dsize - size_of::<abi::Dirent>() - e.name.len(),
                0,
            );
            true
        })?;
        if let Some(e) = lookup_err {
            return Err(e);
        }
        self.reply_ok(hdr, &[&buf], w).map_err(to_io)
    }

    /// Writes a successful reply: header and body parts, whole or not at all.
    fn reply_ok<W: ReplyWriter>(
        &self,
        hdr: &InHeader,
        parts: &[&[u8]],
        w: &mut W,
    ) -> Result<usize> {
        let len = size_of::<OutHeader>() + parts.iter().map(|p| p.len()).sum::<usize>();
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
        for p in parts {
            w.write_all(p).map_err(Error::WriteReply)?;
        }
        Ok(len)
    }

    fn reply_error<W: ReplyWriter>(&self, hdr: &InHeader, errno: i32, w: &mut W) -> Result<usize> {
        self.stats.count_error(hdr.opcode);
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

/// The errno to send for `e`: its OS error, or EIO when it has none. Ferry's running out of
/// descriptors is logged once (per process): every request past the limit meets it, and a
/// line each would flood the log while saying nothing new.
pub(crate) fn errno(e: &io::Error) -> i32 {
    let n = e.raw_os_error().unwrap_or(libc::EIO);
    if n == libc::EMFILE || n == libc::ENFILE {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            log::warn!(
                "ferry has reached its open-file limit ({}); requests that need another descriptor fail with EMFILE until the client closes files (raise the limit with ulimit -n before starting ferry)",
                if n == libc::EMFILE { "RLIMIT_NOFILE" } else { "the system's file-max" }
            )
        });
    }
    n
}

/// A reply that does not fit becomes ERANGE for the guest; the reason stays in the log.
fn to_io(e: Error) -> io::Error {
    match e {
        Error::ReplyTooLarge { .. } => io::Error::from_raw_os_error(libc::ERANGE),
        Error::WriteReply(e) => e,
        Error::ShortHeader(_) => einval(),
        Error::Abandoned => io::Error::other(SessionEnded),
    }
}

/// Clears suid/sgid as the guest asked (FUSE_HANDLE_KILLPRIV_V2). The operation that asked has
/// succeeded already, so a failure here is logged rather than failing it.
fn kill_suidgid<F: FileSystem>(fs: &F, ctx: Context, node: u64, fh: Option<u64>) {
    if let Err(e) = fs.kill_suidgid(ctx, node, fh) {
        log::warn!("fs: cannot clear set-user-ID/set-group-ID on node {node}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membuf::{ReplyBuf, RequestBuf};
    use std::time::Duration;

    struct RootOnly;

    impl FileSystem for RootOnly {
        fn getattr(
            &self,
            _ctx: Context,
            inode: u64,
            _handle: Option<u64>,
        ) -> io::Result<(libc::stat64, Duration)> {
            if inode != abi::ROOT_ID {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            // SAFETY: stat64 is plain old data; all-zero is a valid value.
            let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
            st.st_ino = 1;
            st.st_mode = libc::S_IFDIR | 0o755;
            Ok((st, Duration::from_secs(1)))
        }

        fn lookup(&self, _ctx: Context, _parent: u64, name: &CStr) -> io::Result<Entry> {
            assert!(!name.to_bytes().is_empty());
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        }

        fn init(&self, _capable: abi::InitFlags) -> io::Result<abi::InitFlags> {
            Ok(abi::SECURITY_CTX)
        }

        /// EEXIST, or with a label ENOTEMPTY when it is `security.selinux`=`lbl`, else
        /// ENOTDIR: the tests tell what arrived by the errno.
        fn mkdir(
            &self,
            _ctx: Context,
            _parent: u64,
            name: &CStr,
            _mode: u32,
            _umask: u32,
            secctx: Option<SecCtx<'_>>,
        ) -> io::Result<Entry> {
            assert!(!name.to_bytes().contains(&b'/'));
            Err(io::Error::from_raw_os_error(match secctx {
                None => libc::EEXIST,
                Some(c) if c.name == c"security.selinux" && c.value == b"lbl" => libc::ENOTEMPTY,
                Some(_) => libc::ENOTDIR,
            }))
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
        let w = ReplyBuf::new(room);
        let res = server.handle_message(RequestBuf::new(req), w.clone());
        let n = *res.as_ref().unwrap_or(&0);
        (res, w.bytes(n))
    }

    fn out_header(reply: &[u8]) -> OutHeader {
        let mut h = OutHeader::default();
        h.as_mut_slice().copy_from_slice(&reply[..16]);
        h
    }

    fn errno_of(req: Vec<u8>) -> i32 {
        let (_, reply) = run(req, 4096);
        -out_header(&reply).error
    }

    fn init_body(major: u32, minor: u32) -> Vec<u8> {
        let mut v = abi::InitIn {
            major,
            minor,
            max_readahead: 4096,
            flags: abi::MAX_PAGES as u32 | 1,
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
        assert_eq!(out.flags, abi::MAX_PAGES as u32);
    }

    /// INIT from a 6.1 kernel, which offers FUSE_SECURITY_CTX in flags2.
    fn init_with_secctx() -> Vec<u8> {
        let mut v = abi::InitIn {
            major: 7,
            minor: 37,
            max_readahead: 4096,
            flags: (abi::MAX_PAGES | abi::INIT_EXT) as u32,
        }
        .as_slice()
        .to_vec();
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&[0u8; 44]);
        request(opcode::INIT, 0, &v)
    }

    #[test]
    fn init_takes_flags2_and_answers_with_init_ext() {
        let server = Server::new(RootOnly);
        let w = ReplyBuf::new(4096);
        let n = server
            .handle_message(RequestBuf::new(init_with_secctx()), w.clone())
            .unwrap();
        let mut out = abi::InitOut::default();
        out.as_mut_slice().copy_from_slice(&w.bytes(n)[16..80]);
        assert_eq!(out.flags2, 1);
        assert_ne!(out.flags & abi::INIT_EXT as u32, 0);
        // Without INIT_EXT from the kernel, flags2 is not there to read.
        let (_, reply) = run(request(opcode::INIT, 0, &init_body(7, 38)), 4096);
        out.as_mut_slice().copy_from_slice(&reply[16..80]);
        assert_eq!((out.flags2, out.flags & abi::INIT_EXT as u32), (0, 0));
    }

    #[test]
    fn security_contexts_arrive_in_both_layouts() {
        let server = Server::new(RootOnly);
        let call = |req: Vec<u8>| {
            let w = ReplyBuf::new(4096);
            let n = server
                .handle_message(RequestBuf::new(req), w.clone())
                .unwrap();
            -out_header(&w.bytes(n)).error
        };
        let mkdir = |ext: &[u8], in_ext: bool| {
            let mut body = abi::MkdirIn::default().as_slice().to_vec();
            body.extend_from_slice(b"d\0");
            body.extend_from_slice(ext);
            let mut req = request(opcode::MKDIR, 1, &body);
            if in_ext {
                let mut h = InHeader::default();
                h.as_mut_slice().copy_from_slice(&req[..40]);
                h.total_extlen = (ext.len() / 8) as u16;
                req[..40].copy_from_slice(h.as_slice());
            }
            req
        };
        let label = extensions::tests::record("security.selinux", b"lbl");
        // Before INIT asked for them, bytes after the name are ignored, as they always were.
        assert_eq!(call(mkdir(&label, false)), libc::EEXIST);
        // A 6.2 and later kernel says where its extensions are, asked for or not.
        assert_eq!(call(mkdir(&label, true)), libc::ENOTEMPTY);
        call(init_with_secctx());
        // 6.1: right after the name.
        assert_eq!(call(mkdir(&label, false)), libc::ENOTEMPTY);
        assert_eq!(call(mkdir(&label, true)), libc::ENOTEMPTY);
        // No LSM in the guest: an empty context, or none at all.
        assert_eq!(call(mkdir(&[8, 0, 0, 0, 0, 0, 0, 0], false)), libc::EEXIST);
        assert_eq!(call(mkdir(&[], false)), libc::EEXIST);
        let other = extensions::tests::record("security.SMACK64", b"lbl");
        assert_eq!(call(mkdir(&other, true)), libc::ENOTDIR);
        // Malformed: EINVAL, and an extension length past the request too.
        assert_eq!(call(mkdir(&label[..12], false)), libc::EINVAL);
        let mut long = mkdir(&label, true);
        long[36] = 200;
        assert_eq!(call(long), libc::EINVAL);
    }

    #[test]
    fn init_rejects_old_kernels() {
        assert_eq!(
            errno_of(request(opcode::INIT, 0, &init_body(7, 20))),
            libc::EPROTO
        );
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
        for op in [9999, opcode::STATFS, opcode::BMAP, opcode::SETUPMAPPING] {
            assert_eq!(
                errno_of(request(op, 1, &[0u8; 64])),
                libc::ENOSYS,
                "op {op}"
            );
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
        assert_eq!(errno_of(req), libc::EINVAL);
    }

    #[test]
    fn truncated_body_gets_einval() {
        assert_eq!(
            errno_of(request(opcode::GETATTR, 1, &[0u8; 4])),
            libc::EINVAL
        );
        assert_eq!(errno_of(request(opcode::READ, 1, &[0u8; 39])), libc::EINVAL);
    }

    #[test]
    fn names_without_nul_or_with_slash_get_einval() {
        assert_eq!(errno_of(request(opcode::LOOKUP, 1, b"abc")), libc::EINVAL);
        let mut body = abi::MkdirIn::default().as_slice().to_vec();
        body.extend_from_slice(b"a/b\0");
        assert_eq!(errno_of(request(opcode::MKDIR, 1, &body)), libc::EINVAL);
        let mut body = abi::MkdirIn::default().as_slice().to_vec();
        body.extend_from_slice(b"\0");
        assert_eq!(errno_of(request(opcode::MKDIR, 1, &body)), libc::EINVAL);
        // A well-formed name reaches the file system.
        let mut body = abi::MkdirIn::default().as_slice().to_vec();
        body.extend_from_slice(b"ok\0");
        assert_eq!(errno_of(request(opcode::MKDIR, 1, &body)), libc::EEXIST);
        assert_eq!(errno_of(request(opcode::LOOKUP, 1, b"x\0")), libc::ENOENT);
    }

    #[test]
    fn overlong_names_get_enametoolong() {
        let mut name = vec![b'a'; 300];
        name.push(0);
        assert_eq!(
            errno_of(request(opcode::LOOKUP, 1, &name)),
            libc::ENAMETOOLONG
        );
    }

    #[test]
    fn huge_sizes_are_refused() {
        let read = abi::ReadIn {
            size: u32::MAX,
            offset: u64::MAX,
            ..Default::default()
        };
        assert_eq!(
            errno_of(request(opcode::READ, 1, read.as_slice())),
            libc::EINVAL
        );
        // A WRITE whose size disagrees with its payload.
        let write = abi::WriteIn {
            size: 4096,
            ..Default::default()
        };
        let mut body = write.as_slice().to_vec();
        body.extend_from_slice(&[0u8; 10]);
        assert_eq!(errno_of(request(opcode::WRITE, 1, &body)), libc::EINVAL);
        // A body larger than any name-carrying request can be.
        let body = vec![b'a'; MAX_BODY + 1];
        assert_eq!(errno_of(request(opcode::LOOKUP, 1, &body)), libc::EINVAL);
    }

    #[test]
    fn batch_forget_with_a_lying_count_stops_at_the_end() {
        let arg = abi::BatchForgetIn {
            count: 1_000_000,
            dummy: 0,
        };
        let mut body = arg.as_slice().to_vec();
        body.extend_from_slice(abi::ForgetOne::default().as_slice());
        let (res, reply) = run(request(opcode::BATCH_FORGET, 0, &body), 4096);
        assert_eq!(res.unwrap(), 0);
        assert!(reply.is_empty());
    }

    #[test]
    fn reply_buffer_too_small() {
        let (res, reply) = run(
            request(opcode::GETATTR, 1, abi::GetattrIn::default().as_slice()),
            20,
        );
        // The attr reply does not fit; the server falls back to an error header, which does.
        assert_eq!(res.unwrap(), 16);
        assert_eq!(out_header(&reply).error, -libc::ERANGE);
        let (res, _) = run(
            request(opcode::GETATTR, 1, abi::GetattrIn::default().as_slice()),
            8,
        );
        assert!(matches!(res, Err(Error::ReplyTooLarge { .. })));
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
            let w = ReplyBuf::new(64);
            server
                .handle_message(RequestBuf::new(request(opcode::STATFS, 1, &[])), w)
                .unwrap();
        }
        assert_eq!(server.stats().ops(opcode::STATFS), 3);
        assert_eq!(server.stats().errors(), 3);
    }
}
