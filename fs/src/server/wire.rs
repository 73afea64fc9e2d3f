//! Reading a request's parts off the wire and making a reply's: the decoding every opcode of
//! the dispatcher shares. Every length is checked against what the transport holds (a short
//! request is EINVAL, never a read past it); names must end in NUL, be short, and hold no
//! slash.

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::time::Duration;

use vm_memory::ByteValued;

use super::{RequestReader, MAX_BODY, NAME_MAX};
use crate::abi;
use crate::filesystem::Entry;

pub(super) fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Reads one wire struct, or fails with EINVAL when the request is too short for it.
pub(super) fn read_obj<T: ByteValued + Default, R: RequestReader>(r: &mut R) -> io::Result<T> {
    let mut v = T::default();
    if r.available_bytes() < size_of::<T>() {
        return Err(einval());
    }
    r.read_exact(v.as_mut_slice())?;
    Ok(v)
}

/// Reads the rest of a request body into memory, refusing bodies larger than any valid one.
pub(super) fn read_body<R: RequestReader>(r: &mut R) -> io::Result<Vec<u8>> {
    let n = r.available_bytes();
    if n > MAX_BODY {
        return Err(einval());
    }
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Splits a NUL-terminated string off the front of `buf`. A missing NUL is EINVAL; a name
/// longer than `max` is ENAMETOOLONG.
pub(super) fn take_cstr(buf: &[u8], max: usize) -> io::Result<(&CStr, &[u8])> {
    let nul = buf.iter().position(|b| *b == 0).ok_or_else(einval)?;
    if nul > max {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let name = CStr::from_bytes_with_nul(&buf[..=nul]).map_err(|_| einval())?;
    Ok((name, &buf[nul + 1..]))
}

/// A directory name: no slash, not empty, at most NAME_MAX bytes.
pub(super) fn take_name(buf: &[u8]) -> io::Result<(&CStr, &[u8])> {
    let (name, rest) = take_cstr(buf, NAME_MAX)?;
    let b = name.to_bytes();
    if b.is_empty() || b.contains(&b'/') {
        return Err(einval());
    }
    Ok((name, rest))
}

pub(super) fn entry_out(e: &Entry) -> abi::EntryOut {
    abi::EntryOut {
        nodeid: e.inode,
        generation: 0,
        entry_valid: e.entry_timeout.as_secs(),
        attr_valid: e.attr_timeout.as_secs(),
        entry_valid_nsec: e.entry_timeout.subsec_nanos(),
        attr_valid_nsec: e.attr_timeout.subsec_nanos(),
        attr: abi::Attr {
            flags: e.attr_flags,
            ..abi::Attr::from(&e.attr)
        },
    }
}

pub(super) fn attr_out(st: &libc::stat64, timeout: Duration) -> abi::AttrOut {
    abi::AttrOut {
        attr_valid: timeout.as_secs(),
        attr_valid_nsec: timeout.subsec_nanos(),
        dummy: 0,
        attr: abi::Attr::from(st),
    }
}

/// Bytes a READDIR entry with a `namelen`-byte name takes, padded to 8.
pub(super) fn dirent_size(namelen: usize) -> usize {
    (size_of::<abi::Dirent>() + namelen + 7) & !7
}
