//! A request's descriptor chain as the `ferry-fs` transport: the device-readable buffers are
//! the request, the device-writable ones the reply.
//!
//! File data moves between the file and guest memory with `preadv`/`pwritev` on the guest's
//! buffers, with no copy in between. A chain of up to 16 buffers (every request but bulk
//! I/O, and every net frame) allocates nothing; a longer one, such as a 1 MiB READ in 4 KiB
//! pages, allocates its buffer list once.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use ferry_fs::{FileReader, FileWriter, ReplyWriter, RequestReader};
use smallvec::SmallVec;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, Permissions, VolatileSlice};

/// Most iovecs one preadv/pwritev takes (IOV_MAX).
const IOV_MAX: usize = 1024;
/// Buffers held without a heap allocation. The lists move with the reader and writer, so the
/// inline part is kept small: when it held a whole 1 MiB request (260 buffers), moving two
/// of them cost every 1400-byte datagram the guest sent 13% of ferry's CPU (perf). Longer
/// chains spill to the heap.
const INLINE: usize = 16;
/// Iovecs built on the stack for one preadv/pwritev: a 1 MiB request in 4 KiB pages plus
/// its headers. They are built for each call and handed straight to it.
const IOV_INLINE: usize = 260;

type Slices<'a> = SmallVec<[VolatileSlice<'a>; INLINE]>;
type Iovecs = SmallVec<[libc::iovec; IOV_INLINE]>;

/// Why a chain cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A descriptor points outside guest memory.
    #[error("a descriptor points outside guest memory")]
    BadAddress,
    /// The lengths overflow.
    #[error("the descriptor lengths overflow")]
    Overflow,
}

/// A run of guest buffers, consumed front to back.
#[derive(Clone)]
struct Buffers<'a> {
    slices: Slices<'a>,
    /// Index of the first slice not fully consumed.
    idx: usize,
    /// Bytes consumed in `slices[idx]`.
    off: usize,
    left: usize,
}

impl<'a> Buffers<'a> {
    fn new(slices: Slices<'a>) -> Result<Self, Error> {
        let left = slices
            .iter()
            .try_fold(0usize, |acc, s| acc.checked_add(s.len()))
            .ok_or(Error::Overflow)?;
        Ok(Buffers {
            slices,
            idx: 0,
            off: 0,
            left,
        })
    }

    fn advance(&mut self, mut n: usize) {
        self.left -= n;
        while n > 0 {
            let room = self.slices[self.idx].len() - self.off;
            if n < room {
                self.off += n;
                return;
            }
            n -= room;
            self.idx += 1;
            self.off = 0;
        }
        while self.idx < self.slices.len() && self.slices[self.idx].len() == self.off {
            self.idx += 1;
            self.off = 0;
        }
    }

    /// The next up to `count` bytes as iovecs (capped at IOV_MAX entries).
    fn iovecs(&self, count: usize) -> Iovecs {
        let mut v = Iovecs::new();
        let mut want = count.min(self.left);
        let mut off = self.off;
        for s in &self.slices[self.idx..] {
            if want == 0 || v.len() == IOV_MAX {
                break;
            }
            let len = (s.len() - off).min(want);
            if len > 0 {
                v.push(libc::iovec {
                    // SAFETY: `off` is within the slice, so the pointer stays inside guest
                    // memory that the slice covers.
                    iov_base: unsafe { s.ptr_guard_mut().as_ptr().add(off) }.cast(),
                    iov_len: len,
                });
            }
            want -= len;
            off = 0;
        }
        v
    }

    /// Splits off everything after the next `offset` bytes.
    fn split_at(&mut self, offset: usize) -> io::Result<Self> {
        if offset > self.left {
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        }
        let mut rest = self.clone();
        rest.advance(offset);
        // Keep this side to exactly `offset` bytes.
        self.left = offset;
        Ok(rest)
    }
}

/// The device-readable part of a chain.
#[derive(Clone)]
pub(crate) struct ChainReader<'a>(Buffers<'a>);

impl ChainReader<'_> {
    /// The FUSE opcode of the request, without consuming anything (0 if too short).
    pub(crate) fn peek_opcode(&self) -> u32 {
        let mut hdr = [0u8; 8];
        let mut r = self.clone();
        match r.read_exact(&mut hdr) {
            Ok(()) => u32::from_ne_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]),
            Err(_) => 0,
        }
    }
}

/// The device-writable part of a chain.
#[derive(Clone)]
pub(crate) struct ChainWriter<'a> {
    bufs: Buffers<'a>,
}

/// Splits a chain into its request and reply parts.
pub(crate) fn split_chain<'a, M, T>(
    mem: &'a M,
    chain: DescriptorChain<T>,
) -> Result<(ChainReader<'a>, ChainWriter<'a>), Error>
where
    M: GuestMemory,
    M::Bitmap: vm_memory::bitmap::WithBitmapSlice<'a, S = ()>,
    T: std::ops::Deref,
    T::Target: GuestMemory + Sized,
{
    let mut read = Slices::new();
    let mut write = Slices::new();
    for desc in chain {
        let (list, perm) = if desc.is_write_only() {
            (&mut write, Permissions::Write)
        } else {
            (&mut read, Permissions::Read)
        };
        let slices = mem
            .get_slices(desc.addr(), desc.len() as usize, perm)
            .map_err(|_| Error::BadAddress)?;
        for s in slices {
            list.push(s.map_err(|_| Error::BadAddress)?);
        }
    }
    Ok((
        ChainReader(Buffers::new(read)?),
        ChainWriter {
            bufs: Buffers::new(write)?,
        },
    ))
}

impl Read for ChainReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() && self.0.left > 0 {
            let s = &self.0.slices[self.0.idx];
            let part = s
                .offset(self.0.off)
                .map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
            let n = part.copy_to(&mut buf[done..]);
            done += n;
            self.0.advance(n);
        }
        Ok(done)
    }
}

impl FileReader for ChainReader<'_> {
    fn read_to_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize> {
        let iov = self.0.iovecs(count);
        if iov.is_empty() {
            return Ok(0);
        }
        // SAFETY: every iovec points into guest memory that stays mapped for the request;
        // pwritev only reads from it.
        let n =
            unsafe { libc::pwritev64(f.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off as i64) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.0.advance(n as usize);
        Ok(n as usize)
    }
}

impl RequestReader for ChainReader<'_> {
    fn available_bytes(&self) -> usize {
        self.0.left
    }
}

impl Write for ChainWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() && self.bufs.left > 0 {
            let s = &self.bufs.slices[self.bufs.idx];
            let room = (s.len() - self.bufs.off).min(self.bufs.left);
            let part = s
                .subslice(self.bufs.off, room)
                .map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
            let n = part.copy_from_slice_len(&buf[done..]);
            done += n;
            self.bufs.advance(n);
        }
        Ok(done)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Copying into a volatile slice, bounded by both lengths.
pub(crate) trait CopyFrom {
    fn copy_from_slice_len(&self, buf: &[u8]) -> usize;
}

impl CopyFrom for VolatileSlice<'_> {
    fn copy_from_slice_len(&self, buf: &[u8]) -> usize {
        let n = self.len().min(buf.len());
        self.copy_from(&buf[..n]);
        n
    }
}

impl FileWriter for ChainWriter<'_> {
    fn write_from_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize> {
        let iov = self.bufs.iovecs(count);
        if iov.is_empty() {
            return Ok(0);
        }
        // SAFETY: every iovec points into guest memory the guest gave us to write, which
        // stays mapped for the request.
        let n =
            unsafe { libc::preadv64(f.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off as i64) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.bufs.advance(n as usize);
        Ok(n as usize)
    }

    fn write_cached_from_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize> {
        let iov = self.bufs.iovecs(count);
        // SAFETY: every iovec points into guest memory the guest gave us to write, which
        // stays mapped for the request.
        let n = unsafe { ferry_fs::read_cached_into(f, &iov, off) }?;
        self.bufs.advance(n);
        Ok(n)
    }
}

impl ReplyWriter for ChainWriter<'_> {
    fn available_bytes(&self) -> usize {
        self.bufs.left
    }

    fn split_at(&mut self, offset: usize) -> io::Result<Self> {
        Ok(ChainWriter {
            bufs: self.bufs.split_at(offset)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    type Mem = vm_memory::GuestMemoryMmap<()>;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    /// Two readable buffers (8 + 8 bytes) and two writable ones (5 + 100 bytes).
    fn chain<'a>(m: &'a Mem, vq: &'a MockSplitQueue<'a, Mem>) -> DescriptorChain<&'a Mem> {
        let w = VRING_DESC_F_WRITE as u16;
        let descs = [
            SplitDescriptor::new(0x10_0000, 8, 0, 0),
            SplitDescriptor::new(0x10_1000, 8, 0, 0),
            SplitDescriptor::new(0x10_2000, 5, w, 0),
            SplitDescriptor::new(0x10_3000, 100, w, 0),
        ]
        .map(RawDescriptor::from);
        m.write_slice(b"abcdefgh", GuestAddress(0x10_0000)).unwrap();
        m.write_slice(b"ijklmnop", GuestAddress(0x10_1000)).unwrap();
        vq.build_desc_chain(&descs).unwrap()
    }

    #[test]
    fn reads_across_buffers_and_writes_across_buffers() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (mut r, mut w) = split_chain(&m, chain(&m, &vq)).unwrap();
        assert_eq!(r.available_bytes(), 16);
        let mut got = [0u8; 10];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abcdefghij");
        assert_eq!(r.available_bytes(), 6);
        assert_eq!(w.available_bytes(), 105);
        w.write_all(b"0123456789").unwrap();
        let mut a = [0u8; 5];
        m.read_slice(&mut a, GuestAddress(0x10_2000)).unwrap();
        assert_eq!(&a, b"01234");
        m.read_slice(&mut a, GuestAddress(0x10_3000)).unwrap();
        assert_eq!(&a, b"56789");
        // Writing past the end writes what fits and reports it.
        assert_eq!(w.write(&[7u8; 200]).unwrap(), 95);
        assert_eq!(w.available_bytes(), 0);
    }

    #[test]
    fn file_data_moves_straight_between_file_and_guest_buffers() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (mut r, mut w) = split_chain(&m, chain(&m, &vq)).unwrap();
        let mut f = tempfile_in_tmp();
        // Request side: 16 bytes from two guest buffers land in the file at offset 3.
        assert_eq!(r.read_to_file_at(&f, 100, 3).unwrap(), 16);
        f.rewind().unwrap();
        let mut content = Vec::new();
        f.read_to_end(&mut content).unwrap();
        assert_eq!(&content[3..], b"abcdefghijklmnop");
        // Reply side: a header-sized split, then data from the file after it.
        let mut data = w.split_at(2).unwrap();
        assert_eq!(w.available_bytes(), 2);
        assert_eq!(data.write_from_file_at(&f, 10, 3).unwrap(), 10);
        w.write_all(b"HD").unwrap();
        let mut a = [0u8; 5];
        m.read_slice(&mut a, GuestAddress(0x10_2000)).unwrap();
        assert_eq!(&a, b"HDabc");
        let mut b = [0u8; 7];
        m.read_slice(&mut b, GuestAddress(0x10_3000)).unwrap();
        assert_eq!(&b, b"defghij");
    }

    #[test]
    fn a_read_from_the_page_cache_is_all_or_nothing() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (_, mut w) = split_chain(&m, chain(&m, &vq)).unwrap();
        let mut f = tempfile_in_tmp();
        f.write_all(b"...abcdefghijklmnop").unwrap();
        // RWF_NOWAIT reads need a file system that has them: the disk-backed ones do (tmpfs
        // says EOPNOTSUPP, which the file server takes as "hand it over").
        // SAFETY: fstatfs fills the struct it is given, of the right type.
        let kind = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            assert_eq!(libc::fstatfs(f.as_raw_fd(), &mut st), 0);
            st.f_type
        };
        const ON_DISK: [libc::__fsword_t; 3] = [0xEF53, 0x5846_5342, 0x9123_683E];
        if !ON_DISK.contains(&kind) {
            eprintln!("the temporary folder is not on ext4, XFS or btrfs: not tested here");
            return;
        }
        let mut data = w.split_at(2).unwrap();
        // Just written, so cached: all of it, across the two guest buffers.
        assert_eq!(data.write_cached_from_file_at(&f, 10, 3).unwrap(), 10);
        let mut b = [0u8; 7];
        m.read_slice(&mut b, GuestAddress(0x10_3000)).unwrap();
        assert_eq!(&b, b"defghij");
        // Up to the file's end: short, and whole.
        let left = data.available_bytes();
        assert_eq!(data.write_cached_from_file_at(&f, 10, 13).unwrap(), 6);
        assert_eq!(data.available_bytes(), left - 6);
        let left = left - 6;
        // An offset preadv2 would take for "at the file's position" is refused.
        let e = data
            .write_cached_from_file_at(&f, 10, u64::MAX)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // Out of the cache (written back, then dropped): not read, nothing counted.
        f.sync_all().unwrap();
        // SAFETY: posix_fadvise takes an open fd and no memory.
        let dropped =
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(dropped, 0);
        let e = data.write_cached_from_file_at(&f, 10, 3).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(data.available_bytes(), left);
        // The read that may wait gets it.
        assert_eq!(data.write_from_file_at(&f, 10, 3).unwrap(), 10);
    }

    #[test]
    fn a_chain_longer_than_the_inline_lists_moves_all_its_bytes() {
        // 3 * INLINE writable pages after one readable header: both lists spill to the heap.
        let m = mem();
        let n = 3 * INLINE;
        let vq = MockSplitQueue::new(&m, 256);
        let w = VRING_DESC_F_WRITE as u16;
        let descs: Vec<_> = std::iter::once(SplitDescriptor::new(0x1000, 16, 0, 0))
            .chain((0..n).map(|i| SplitDescriptor::new(0x10_0000 + 0x1000 * i as u64, 4096, w, 0)))
            .map(RawDescriptor::from)
            .collect();
        let (_, mut wr) = split_chain(&m, vq.build_desc_chain(&descs).unwrap()).unwrap();
        let mut f = tempfile_in_tmp();
        let data: Vec<u8> = (0..n * 4096).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        assert_eq!(wr.available_bytes(), n * 4096);
        assert_eq!(wr.write_from_file_at(&f, n * 4096, 0).unwrap(), n * 4096);
        let mut back = vec![0u8; n * 4096];
        for i in 0..n {
            let page = &mut back[i * 4096..(i + 1) * 4096];
            m.read_slice(page, GuestAddress(0x10_0000 + 0x1000 * i as u64))
                .unwrap();
        }
        assert!(back == data);
    }

    #[test]
    fn a_descriptor_outside_guest_memory_is_refused() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x1f_fff0, 64, 0, 0,
        ))];
        let c = vq.build_desc_chain(&descs).unwrap();
        assert!(matches!(split_chain(&m, c), Err(Error::BadAddress)));
    }

    fn tempfile_in_tmp() -> File {
        // One name per test: tests run in parallel, and one that opened another's file would
        // truncate it.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ferry-chain-test-{}-{n}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }
}
