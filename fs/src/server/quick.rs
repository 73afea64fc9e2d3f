//! Requests a transport with a pool of threads may answer where it takes them: a READ from
//! the host's page cache, and a small buffered WRITE.
//!
//! Theory of operation. A share with a pool of threads (`threads=N`) hands each request to a
//! pool thread, so that one that waits on the host's disk (a cold read, an fsync) does not
//! hold up the others. For a read whose data the host already has in its page cache, or a
//! small write into it, that hand-over is most of the cost: the wake-up of a pool thread is
//! as long as the copy. For reads this is io_uring's answer to the same question: try the
//! read without blocking (`preadv2(RWF_NOWAIT)`), and hand it to a thread only when that
//! cannot complete it. A read that the cache does not hold in full is left unanswered,
//! nothing counted, for the caller to hand over, which answers it in full; so is anything
//! else (another opcode, a malformed request, an error), which the full decoder answers as
//! ever. Buffered writes cannot be tried that way on every host file system (ext4 refuses
//! RWF_NOWAIT for them, EOPNOTSUPP), so [`Server::is_quick_write`] only says which WRITEs
//! are candidates (small, to a file opened neither O_SYNC, O_DSYNC nor O_DIRECT, on a
//! handle the file system vouches for); whether the transport answers them itself, and
//! when it stops because one took long, is its policy.

use std::mem::size_of;

use super::wire::read_obj;
use super::{ReplyWriter, RequestReader, Server, MAX_WRITE};
use crate::abi::{self, opcode, InHeader, OutHeader};
use crate::filesystem::{Context, FileSystem};

use vm_memory::ByteValued;

impl<F: FileSystem> Server<F> {
    /// Whether the request `r` holds is a WRITE of at most `most` bytes that the host's page
    /// cache takes, usually within microseconds: to a file the guest opened neither O_DSYNC
    /// (which O_SYNC includes) nor O_DIRECT, on a handle the file system says lands in the
    /// cache without a network or another process behind it
    /// ([`FileSystem::write_is_quick`]). Reads nothing off `r`.
    pub fn is_quick_write<R: RequestReader + Clone>(&self, r: &R, most: u32) -> bool {
        let mut r = r.clone();
        let mut head = [0u8; size_of::<InHeader>() + size_of::<abi::WriteIn>()];
        if r.read_exact(&mut head).is_err() {
            return false;
        }
        let (h, a) = head.split_at(size_of::<InHeader>());
        let (Some(hdr), Some(arg)) = (InHeader::from_slice(h), abi::WriteIn::from_slice(a)) else {
            return false;
        };
        let waits = (libc::O_DSYNC | libc::O_DIRECT) as u32;
        hdr.opcode == opcode::WRITE
            && arg.size <= most
            && arg.flags & waits == 0
            && self.fs.write_is_quick(arg.fh)
    }

    /// Answers a READ of at most `most` bytes whose data the host holds in its page cache,
    /// without waiting on a disk: `Some(reply length)` when it did, `None` when the request
    /// is to be answered with [`Self::handle_message`] (or `handle_message_in_session`) as
    /// usual, nothing having been counted or replied.
    pub fn handle_read_if_cached<R: RequestReader, W: ReplyWriter>(
        &self,
        mut r: R,
        mut w: W,
        most: u32,
    ) -> Option<usize> {
        let start = std::time::Instant::now();
        let _answering = self.stats.in_flight();
        let total = r.available_bytes();
        let Ok(hdr) = read_obj::<InHeader, R>(&mut r) else {
            return None;
        };
        if hdr.opcode != opcode::READ || hdr.len as usize != total {
            return None;
        }
        let Ok(arg) = read_obj::<abi::ReadIn, R>(&mut r) else {
            return None;
        };
        if arg.size > most.min(MAX_WRITE) {
            return None;
        }
        let hlen = size_of::<OutHeader>();
        let Ok(mut data) = w.split_at(hlen) else {
            return None;
        };
        let size = (arg.size as usize).min(data.available_bytes());
        let ctx = Context {
            uid: hdr.uid,
            gid: hdr.gid,
            pid: hdr.pid,
        };
        let Ok(n) =
            self.fs
                .read_cached(ctx, hdr.nodeid, arg.fh, &mut data, size as u32, arg.offset)
        else {
            return None;
        };
        let out = OutHeader {
            len: (hlen + n) as u32,
            error: 0,
            unique: hdr.unique,
        };
        if w.write_all(out.as_slice()).is_err() {
            // The header's room was checked by the split: not reached, but the full decoder
            // would say what is wrong.
            return None;
        }
        self.stats.count_op(hdr.opcode);
        self.stats.observe(start.elapsed());
        Some(hlen + n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filesystem::FileWriter;
    use crate::membuf::{ReplyBuf, RequestBuf};
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A file system whose reads the host's page cache holds (`cached`) or does not (it
    /// counts the cached reads asked of it), and whose handles but [`ON_NFS`] take quick
    /// writes.
    #[derive(Default)]
    struct Cache {
        cached: bool,
        asked: AtomicUsize,
    }

    impl FileSystem for Cache {
        fn read_cached(
            &self,
            _ctx: Context,
            _inode: u64,
            _handle: u64,
            _w: &mut dyn FileWriter,
            _size: u32,
            _offset: u64,
        ) -> io::Result<usize> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            if self.cached {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }

        fn write_is_quick(&self, handle: u64) -> bool {
            handle != ON_NFS
        }
    }

    /// A handle whose writes may wait on the network.
    const ON_NFS: u64 = 13;

    fn read_request(opcode: u32, size: u32, len_lie: u32) -> Vec<u8> {
        let arg = abi::ReadIn {
            fh: 3,
            offset: 4096,
            size,
            ..Default::default()
        };
        let hdr = InHeader {
            len: (size_of::<InHeader>() + size_of::<abi::ReadIn>()) as u32 + len_lie,
            opcode,
            unique: 9,
            nodeid: 2,
            ..Default::default()
        };
        [hdr.as_slice(), arg.as_slice()].concat()
    }

    /// The server's answer to `req` over a share whose data is `cached` or not, the reply's
    /// bytes, and how many cached reads it asked of the file system.
    fn answer(cached: bool, req: Vec<u8>) -> (Option<usize>, Vec<u8>, usize, u64) {
        let server = Server::new(Cache {
            cached,
            ..Default::default()
        });
        let w = ReplyBuf::new(4096 + 16);
        let got = server.handle_read_if_cached(RequestBuf::new(req), w.clone(), 64 * 1024);
        let asked = server.fs().asked.load(Ordering::SeqCst);
        (got, w.bytes(16), asked, server.stats().ops(opcode::READ))
    }

    #[test]
    fn a_cached_read_is_answered_and_counted() {
        let (got, reply, asked, counted) = answer(true, read_request(opcode::READ, 4096, 0));
        assert_eq!(got, Some(16));
        let out = OutHeader::from_slice(&reply).unwrap();
        assert_eq!((out.len, out.error, out.unique), (16, 0, 9));
        assert_eq!((asked, counted), (1, 1));
    }

    #[test]
    fn a_read_the_cache_does_not_hold_is_left_unanswered_and_uncounted() {
        let (got, reply, asked, counted) = answer(false, read_request(opcode::READ, 4096, 0));
        assert_eq!(got, None);
        assert!(reply.iter().all(|&b| b == 0), "nothing replied");
        assert_eq!((asked, counted), (1, 0));
    }

    fn write_request(size: u32, flags: i32, fh: u64) -> RequestBuf {
        let arg = abi::WriteIn {
            fh,
            size,
            flags: flags as u32,
            ..Default::default()
        };
        let hdr = InHeader {
            len: (size_of::<InHeader>() + size_of::<abi::WriteIn>()) as u32 + size,
            opcode: opcode::WRITE,
            ..Default::default()
        };
        let data = vec![0u8; size as usize];
        RequestBuf::new([hdr.as_slice(), arg.as_slice(), &data].concat())
    }

    #[test]
    fn small_buffered_writes_on_handles_the_file_system_vouches_for_are_quick() {
        let server = Server::new(Cache::default());
        let most = 64 * 1024;
        let quick = |r: &RequestBuf| server.is_quick_write(r, most);
        assert!(quick(&write_request(4096, libc::O_WRONLY, 3)));
        assert!(quick(&write_request(most, libc::O_RDWR, 3)));
        for (size, flags, fh) in [
            (most + 1, libc::O_WRONLY, 3),
            (4096, libc::O_WRONLY | libc::O_SYNC, 3),
            (4096, libc::O_WRONLY | libc::O_DSYNC, 3),
            (4096, libc::O_WRONLY | libc::O_DIRECT, 3),
            (4096, libc::O_WRONLY, ON_NFS),
        ] {
            assert!(
                !quick(&write_request(size, flags, fh)),
                "{size} {flags:o} {fh}"
            );
        }
        assert!(!quick(&RequestBuf::new(read_request(
            opcode::READ,
            4096,
            0
        ))));
        assert!(!quick(&RequestBuf::new(vec![0; 20])));
        // It reads nothing off the request.
        let r = write_request(16, 0, 3);
        assert!(quick(&r));
        assert_eq!(r.available_bytes(), 40 + 40 + 16);
    }

    #[test]
    fn other_requests_large_reads_and_lies_are_left_to_the_full_decoder() {
        for req in [
            read_request(opcode::WRITE, 4096, 0),
            read_request(opcode::READ, 64 * 1024 + 1, 0),
            read_request(opcode::READ, 4096, 1),
            read_request(opcode::READ, 4096, 0)[..40].to_vec(),
        ] {
            let (got, _, asked, counted) = answer(true, req);
            assert_eq!((got, asked, counted), (None, 0, 0));
        }
    }
}
