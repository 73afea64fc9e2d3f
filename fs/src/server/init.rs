//! INIT: the version and features a session speaks, and the start of a new session.

use std::io;
use std::mem::size_of;
use std::sync::atomic::Ordering;

use vm_memory::ByteValued;

use super::wire::read_obj;
use super::{to_io, ReplyWriter, RequestReader, Server, MAX_PAGES, MAX_WRITE};
use crate::abi::{self, InHeader};
use crate::filesystem::FileSystem;

impl<F: FileSystem> Server<F> {
    pub(super) fn init<R: RequestReader, W: ReplyWriter>(
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
            return self.reply_ok(hdr, &[out.as_slice()], w).map_err(to_io);
        }
        // 7.36 and later: `flags2` follows, valid when the kernel sets INIT_EXT.
        let mut capable = abi::InitFlags::from(init.flags);
        if capable & abi::INIT_EXT != 0 && r.available_bytes() >= size_of::<u32>() {
            let flags2: u32 = read_obj(r)?;
            capable |= abi::InitFlags::from(flags2) << 32;
        }
        if self.started.swap(true, Ordering::AcqRel) {
            // A guest that rebooted (or reloaded its driver) in the same VM: QEMU resets the
            // device but the connection stays, and no DESTROY came. The previous kernel can no
            // longer forget its nodes or release its files, which would hold their host
            // descriptors for good: drop them, as when a frontend leaves.
            log::info!("a new FUSE session replaces the previous one (the guest restarted): its nodes and open files are dropped");
            self.cancel_waits();
            self.fs.destroy();
        }
        let accepted = capable & (self.fs.init(capable)? | abi::MAX_PAGES);
        self.secctx
            .store(accepted & abi::SECURITY_CTX != 0, Ordering::Relaxed);
        out.flags = accepted as u32;
        out.flags2 = (accepted >> 32) as u32;
        if out.flags2 != 0 {
            out.flags |= abi::INIT_EXT as u32;
        }
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
        self.reply_ok(hdr, &[out.as_slice()], w).map_err(to_io)
    }
}
