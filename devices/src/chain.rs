//! Descriptor-chain adapters: a virtio request's readable and writable halves as the
//! `ferry-fs` transport traits.

use std::io;

use ferry_fs::{ReplyWriter, RequestReader};
use virtio_queue::{Reader, Writer};

/// The device-readable part of a descriptor chain.
pub(crate) struct ChainReader<'a>(pub Reader<'a>);

/// The device-writable part of a descriptor chain.
pub(crate) struct ChainWriter<'a>(pub Writer<'a>);

impl io::Read for ChainReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl RequestReader for ChainReader<'_> {
    fn available_bytes(&self) -> usize {
        self.0.available_bytes()
    }
}

impl io::Write for ChainWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ReplyWriter for ChainWriter<'_> {
    fn available_bytes(&self) -> usize {
        self.0.available_bytes()
    }
}
