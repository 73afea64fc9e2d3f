//! In-memory transport: a request and a reply buffer, for unit tests, fuzzing and the host
//! FUSE adapter.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use crate::filesystem::{FileReader, FileWriter};
use crate::server::{ReplyWriter, RequestReader};

/// A request held in memory.
#[derive(Clone, Debug, Default)]
pub struct RequestBuf {
    data: Vec<u8>,
    pos: usize,
}

impl RequestBuf {
    /// A reader over `data`.
    pub fn new(data: Vec<u8>) -> Self {
        RequestBuf { data, pos: 0 }
    }
}

impl Read for RequestBuf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl FileReader for RequestBuf {
    fn read_to_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize> {
        let n = count.min(self.data.len() - self.pos);
        let written = f.write_at(&self.data[self.pos..self.pos + n], off)?;
        self.pos += written;
        Ok(written)
    }
}

impl RequestReader for RequestBuf {
    fn available_bytes(&self) -> usize {
        self.data.len() - self.pos
    }
}

/// A reply buffer with a fixed amount of room; split views share the same bytes.
#[derive(Clone, Debug)]
pub struct ReplyBuf {
    data: Rc<RefCell<Vec<u8>>>,
    start: usize,
    pos: usize,
    end: usize,
}

impl ReplyBuf {
    /// A reply buffer with room for `room` bytes.
    pub fn new(room: usize) -> Self {
        ReplyBuf {
            data: Rc::new(RefCell::new(vec![0; room])),
            start: 0,
            pos: 0,
            end: room,
        }
    }

    /// The first `len` bytes of the whole buffer (what the server says it wrote).
    pub fn bytes(&self, len: usize) -> Vec<u8> {
        self.data.borrow()[..len].to_vec()
    }
}

impl Write for ReplyBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let at = self.start + self.pos;
        let n = buf.len().min(self.end - at);
        self.data.borrow_mut()[at..at + n].copy_from_slice(&buf[..n]);
        self.pos += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FileWriter for ReplyBuf {
    fn write_from_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize> {
        let at = self.start + self.pos;
        let n = count.min(self.end - at);
        let got = f.read_at(&mut self.data.borrow_mut()[at..at + n], off)?;
        self.pos += got;
        Ok(got)
    }

    fn write_cached_from_file_at(&mut self, f: &File, count: usize, off: u64) -> io::Result<usize> {
        let at = self.start + self.pos;
        let n = count.min(self.end - at);
        let mut data = self.data.borrow_mut();
        let iov = libc::iovec {
            iov_base: data[at..at + n].as_mut_ptr().cast(),
            iov_len: n,
        };
        // SAFETY: the iovec covers `n` bytes of the buffer, borrowed mutably for the call.
        let got = unsafe { crate::filesystem::read_cached_into(f, &[iov], off) }?;
        self.pos += got;
        Ok(got)
    }
}

impl ReplyWriter for ReplyBuf {
    fn available_bytes(&self) -> usize {
        self.end - self.start - self.pos
    }

    fn split_at(&mut self, offset: usize) -> io::Result<Self> {
        let at = self.start + self.pos + offset;
        if at > self.end {
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        }
        let other = ReplyBuf {
            data: self.data.clone(),
            start: at,
            pos: 0,
            end: self.end,
        };
        self.end = at;
        Ok(other)
    }
}
