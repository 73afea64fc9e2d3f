//! Packet capture (`--pcap FILE`): every frame between the guest and the stack, both ways, in
//! the classic libpcap format (`tcpdump -r`, Wireshark), as passt's `--pcap` and QEMU's
//! `filter-dump` write it.
//!
//! Frames are buffered and written when the stack finishes a poll, so a capture costs a copy
//! per frame and a write per wake-up, not a system call per frame. A write error ends the
//! capture (logged once); the guest's traffic goes on.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use log::{info, warn};

/// Microsecond timestamps, host byte order (readers detect the order from the magic).
const MAGIC: u32 = 0xa1b2_c3d4;
/// LINKTYPE_ETHERNET.
const LINKTYPE_ETHERNET: u32 = 1;
/// Flush the buffer once it holds this much, even inside a poll.
const FLUSH_AT: usize = 256 * 1024;

/// An open capture file.
pub struct Capture {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    snaplen: u32,
    frames: u64,
    bytes: u64,
}

/// What a capture has written, for `/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// The file.
    pub path: PathBuf,
    /// Frames recorded.
    pub frames: u64,
    /// Their bytes on the wire (before any truncation to the snap length).
    pub bytes: u64,
}

impl Capture {
    /// Opens `path` (created if missing; set to mode 0600 either way, since it will hold the
    /// guest's traffic) without touching what it holds: [`begin`](Self::begin) empties it
    /// once ferry knows it will run, so a second ferry started by mistake with the same path
    /// fails before it spoils the first one's capture. `snaplen` is the longest frame kept
    /// whole.
    pub fn open(path: &Path, snaplen: u32) -> io::Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(Capture {
            file,
            path: path.to_path_buf(),
            buf: Vec::with_capacity(FLUSH_AT + 64 * 1024),
            snaplen,
            frames: 0,
            bytes: 0,
        })
    }

    /// Empties the file and writes the file header.
    pub fn begin(&mut self) -> io::Result<()> {
        use std::io::Seek;
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.buf.clear();
        self.buf.extend_from_slice(&file_header(self.snaplen));
        self.flush()?;
        info!(
            "net: capturing the guest's frames to {}",
            self.path.display()
        );
        Ok(())
    }

    /// Appends one frame, stamped now.
    pub fn record(&mut self, frame: &[u8]) {
        append_record(&mut self.buf, frame, self.snaplen);
        self.frames += 1;
        self.bytes += frame.len() as u64;
    }

    /// Whether the buffer is due for writing.
    pub fn full(&self) -> bool {
        self.buf.len() >= FLUSH_AT
    }

    /// Writes what is buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self.file.write_all(&self.buf);
        self.buf.clear();
        r
    }

    /// Its counters.
    pub fn stats(&self) -> CaptureStats {
        CaptureStats {
            path: self.path.clone(),
            frames: self.frames,
            bytes: self.bytes,
        }
    }
}

/// The libpcap file header: version 2.4, microsecond stamps, Ethernet, `snaplen`.
pub(crate) fn file_header(snaplen: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&MAGIC.to_ne_bytes());
    b.extend_from_slice(&2u16.to_ne_bytes());
    b.extend_from_slice(&4u16.to_ne_bytes());
    // Time zone, accuracy, snap length, link type.
    for v in [0, 0, snaplen, LINKTYPE_ETHERNET] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b
}

/// Appends `frame`'s record (stamped now, cut at `snaplen`) to `buf`.
fn append_record(buf: &mut Vec<u8>, frame: &[u8], snaplen: u32) {
    let (secs, micros) = crate::pcap_live::stamp();
    let kept = frame.len().min(snaplen as usize);
    for v in [secs, micros, kept as u32, frame.len() as u32] {
        buf.extend_from_slice(&v.to_ne_bytes());
    }
    buf.extend_from_slice(&frame[..kept]);
}

/// `frame`'s record alone.
pub(crate) fn encode_record(frame: &[u8], snaplen: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + frame.len().min(snaplen as usize));
    append_record(&mut b, frame, snaplen);
    b
}

/// Records `frame` in `cap` if a capture is on; ends the capture when its file fails.
pub(crate) fn record(cap: &mut Option<Capture>, frame: &[u8]) {
    if let Some(c) = cap {
        c.record(frame);
        if c.full() {
            flush(cap);
        }
    }
}

/// Writes `cap`'s buffer; on an error, logs it and ends the capture.
pub(crate) fn flush(cap: &mut Option<Capture>) {
    if let Some(c) = cap {
        if let Err(e) = c.flush() {
            warn!(
                "net: cannot write the capture {} ({e}); capture stopped after {} frames, check the disk",
                c.path.display(),
                c.frames
            );
            *cap = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(path: &Path, snaplen: u32) -> io::Result<Capture> {
        let mut c = Capture::open(path, snaplen)?;
        c.begin()?;
        Ok(c)
    }

    #[test]
    fn writes_a_libpcap_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.pcap");
        let mut cap = Some(create(&path, 64).unwrap());
        record(&mut cap, &[0xaa; 60]);
        record(&mut cap, &[0xbb; 100]);
        flush(&mut cap);
        let b = std::fs::read(&path).unwrap();
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(0), MAGIC);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 2);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), 4);
        assert_eq!((u32_at(16), u32_at(20)), (64, LINKTYPE_ETHERNET));
        // Record 1: whole.
        assert_eq!((u32_at(24 + 8), u32_at(24 + 12)), (60, 60));
        assert!(b[40..100].iter().all(|&x| x == 0xaa));
        // Record 2: cut at the snap length, its real length kept.
        assert_eq!((u32_at(100 + 8), u32_at(100 + 12)), (64, 100));
        assert_eq!(b.len(), 100 + 16 + 64);
        let s = cap.unwrap().stats();
        assert_eq!((s.frames, s.bytes), (2, 160));
    }

    #[test]
    fn a_failing_file_ends_the_capture() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = create(&dir.path().join("c.pcap"), 100).unwrap();
        // The disk fills up.
        c.file = File::options().write(true).open("/dev/full").unwrap();
        let mut cap = Some(c);
        record(&mut cap, &[0; 60]);
        assert!(cap.is_some());
        flush(&mut cap);
        assert!(cap.is_none());
        assert!(create(Path::new("/dev/full"), 100).is_err());
    }
}
