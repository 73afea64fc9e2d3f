//! The extra part of a request that makes a node: the security context (FUSE_SECURITY_CTX).
//!
//! When a session negotiated FUSE_SECURITY_CTX, the guest's kernel adds the label its LSM gives
//! the new node to every CREATE, MKNOD, MKDIR and SYMLINK. Two kernels, one layout:
//! - before 6.2 (FUSE 7.36–7.37) it is one more argument, right after the name(s), unaligned;
//! - from 6.2 (7.38) it is a request extension: the header's `total_extlen` counts the 8-byte
//!   units at the request's end, and the same bytes sit there.
//!
//! Either way the bytes are a chain of records, each `{ size, type }` (size counting itself,
//! padded to 8); a type from 0 to 31 is a security context holding `type` labels (the kernel
//! sends at most one, and a record with 0 when the guest has no LSM that labels). A label is
//! `{ size, padding }`, its attribute name up to a NUL, then `size` bytes of value. Other
//! record types (32 is the caller's supplementary groups, which Ferry does not ask for) are
//! skipped. Anything that does not add up is EINVAL: the guest gets an error, never a read
//! past the request.

use std::ffi::CStr;
use std::io;

use super::einval;
use crate::filesystem::SecCtx;

/// Size of a record's header (`fuse_ext_header` / `fuse_secctx_header`), and of a label's
/// (`fuse_secctx`).
const HEADER: usize = 8;
/// Record types below this are security contexts (`FUSE_MAX_NR_SECCTX` is 31).
const MAX_NR_SECCTX: u32 = 31;

/// The request's arguments and its extension block, apart: the last `total_extlen` 8-byte
/// units of `body`, when the header announces them.
pub(super) fn split_extensions(body: &[u8], total_extlen: u16) -> io::Result<(&[u8], &[u8])> {
    let n = usize::from(total_extlen) * 8;
    if n > body.len() {
        return Err(einval());
    }
    Ok(body.split_at(body.len() - n))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at + 4)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// The security context in the records `ext`, if the guest gave one.
pub(super) fn security_context(ext: &[u8]) -> io::Result<Option<SecCtx<'_>>> {
    let mut rest = ext;
    let mut found = None;
    while !rest.is_empty() {
        let (Some(size), Some(kind)) = (u32_at(rest, 0), u32_at(rest, 4)) else {
            return Err(einval());
        };
        let size = size as usize;
        if size < HEADER || size > rest.len() {
            return Err(einval());
        }
        let (record, next) = rest.split_at(size);
        rest = next;
        if kind > MAX_NR_SECCTX {
            continue;
        }
        if found.is_some() {
            return Err(einval());
        }
        found = Some(match kind {
            0 => None,
            1 => Some(label(&record[HEADER..])?),
            // One label per node is what every kernel sends.
            _ => return Err(einval()),
        });
    }
    Ok(found.flatten())
}

/// One label: `{ size, padding }`, the name with its NUL, the value.
fn label(b: &[u8]) -> io::Result<SecCtx<'_>> {
    let size = u32_at(b, 0).ok_or_else(einval)? as usize;
    let after = b.get(HEADER..).ok_or_else(einval)?;
    let nul = after.iter().position(|c| *c == 0).ok_or_else(einval)?;
    let name = CStr::from_bytes_with_nul(&after[..=nul]).map_err(|_| einval())?;
    let value = after
        .get(nul + 1..nul + 1 + size)
        .filter(|_| size > 0 && !name.to_bytes().is_empty())
        .ok_or_else(einval)?;
    Ok(SecCtx { name, value })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A security context record as the kernel builds it (padded to 8).
    pub(in crate::server) fn record(name: &str, value: &[u8]) -> Vec<u8> {
        let mut label = Vec::new();
        label.extend_from_slice(&(value.len() as u32).to_le_bytes());
        label.extend_from_slice(&0u32.to_le_bytes());
        label.extend_from_slice(name.as_bytes());
        label.push(0);
        label.extend_from_slice(value);
        while !label.len().is_multiple_of(8) {
            label.push(0);
        }
        let mut r = Vec::new();
        r.extend_from_slice(&((HEADER + label.len()) as u32).to_le_bytes());
        r.extend_from_slice(&1u32.to_le_bytes());
        r.extend_from_slice(&label);
        r
    }

    #[test]
    fn a_label_is_read() {
        let r = record("security.selinux", b"system_u:object_r:unlabeled_t:s0\0");
        let c = security_context(&r).unwrap().unwrap();
        assert_eq!(c.name.to_bytes(), b"security.selinux");
        assert_eq!(c.value, b"system_u:object_r:unlabeled_t:s0\0");
    }

    #[test]
    fn no_lsm_sends_an_empty_context() {
        let empty = [8u8, 0, 0, 0, 0, 0, 0, 0];
        assert!(security_context(&empty).unwrap().is_none());
        assert!(security_context(&[]).unwrap().is_none());
    }

    #[test]
    fn other_records_are_skipped() {
        // The supplementary groups record (type 32), then the label.
        let mut r = vec![16, 0, 0, 0, 32, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0];
        r.extend(record("security.selinux", b"x"));
        assert_eq!(security_context(&r).unwrap().unwrap().value, b"x");
    }

    #[test]
    fn malformed_contexts_are_einval_not_panics() {
        let good = record("security.selinux", b"label");
        let bad: Vec<Vec<u8>> = vec![
            good[..5].to_vec(),
            // size past the end
            [&[200u8, 0, 0, 0][..], &good[4..]].concat(),
            // size below a header
            [&[4u8, 0, 0, 0][..], &good[4..]].concat(),
            // two labels
            [&good[..4], &[2u8, 0, 0, 0][..], &good[8..]].concat(),
            // a value longer than the record
            [&good[..8], &[255u8, 0, 0, 0][..], &good[12..]].concat(),
            // two security contexts
            [good.clone(), good.clone()].concat(),
        ];
        for b in bad {
            assert_eq!(
                security_context(&b).unwrap_err().raw_os_error(),
                Some(libc::EINVAL),
                "{b:?}"
            );
        }
        // Every cut of a good record is an error or nothing, never a panic.
        for n in 0..good.len() {
            let _ = security_context(&good[..n]);
        }
    }

    #[test]
    fn extensions_come_off_the_end() {
        let body = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(
            split_extensions(&body, 1).unwrap(),
            (&body[..2], &body[2..])
        );
        assert_eq!(split_extensions(&body, 0).unwrap(), (&body[..], &[][..]));
        assert!(split_extensions(&body, 2).is_err());
    }
}
