//! The server name in a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3), for transparent
//! mode: a guest that connects to port 443 with no proxy settings is tunnelled through the
//! upstream as a CONNECT to the name it asked for, read from its first record. Nothing is
//! decrypted, and the bytes go on unchanged.

/// Bytes of the ClientHello's record needed before the name can be read: the whole first
/// record, at most 5 + 16 KiB. `None` while fewer have come; `Some(n)` once `n` bytes make
/// the record (or at once when this is not TLS, which has no name to wait for).
pub(super) fn record_len(head: &[u8]) -> Option<usize> {
    if head.first().is_some_and(|b| *b != 22) {
        return Some(head.len());
    }
    let len = usize::from(u16::from_be_bytes([*head.get(3)?, *head.get(4)?]));
    Some(5 + len.min(16 * 1024))
}

/// The `host_name` of the ClientHello in `rec` (one TLS record), if it is one and has one.
pub(super) fn server_name(rec: &[u8]) -> Option<String> {
    let mut r = Reader(rec);
    if r.u8()? != 22 {
        return None;
    }
    r.skip(2)?; // the record's version
    let mut r = r.vec16()?;
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let mut hello = r.vec24()?;
    hello.skip(2 + 32)?; // version, random
    let sid = usize::from(hello.u8()?);
    hello.skip(sid)?;
    let suites = usize::from(hello.u16()?);
    hello.skip(suites)?;
    let comp = usize::from(hello.u8()?);
    hello.skip(comp)?;
    let mut exts = hello.vec16()?;
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let mut body = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = body.vec16()?;
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?.0;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                let ok = !name.is_empty()
                    && name.len() <= 253
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
                return ok.then(|| name.to_ascii_lowercase());
            }
        }
        return None;
    }
    None
}

/// A cursor over bytes; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
    /// A vector with a 16-bit length before it.
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u16()?);
        self.take(n).map(Reader)
    }
    /// A vector with a 24-bit length before it.
    fn vec24(&mut self) -> Option<Reader<'a>> {
        let n = self.u24()?;
        self.take(n).map(Reader)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A minimal ClientHello record naming `name` (or none).
    pub(crate) fn client_hello(name: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        // An extension before the name: supported_versions.
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if let Some(n) = name {
            let n = n.as_bytes();
            let entry_len = 3 + n.len();
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&((entry_len + 2) as u16).to_be_bytes());
            exts.extend_from_slice(&(entry_len as u16).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&(n.len() as u16).to_be_bytes());
            exts.extend_from_slice(n);
        }
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[7; 32]);
        hello.push(0);
        hello.extend_from_slice(&[0, 2, 0x13, 0x01]);
        hello.extend_from_slice(&[1, 0]);
        hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        hello.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&hello);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn reads_the_name_and_nothing_from_garbage() {
        let rec = client_hello(Some("Origin.Test"));
        assert_eq!(record_len(&rec[..3]), None);
        assert_eq!(record_len(&rec), Some(rec.len()));
        assert_eq!(server_name(&rec).as_deref(), Some("origin.test"));
        assert_eq!(server_name(&client_hello(None)), None);
        assert_eq!(record_len(b"GET / HTTP/1.1"), Some(14));
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n\r\n"), None);
        for cut in 0..rec.len() {
            assert_eq!(server_name(&rec[..cut]), None, "{cut}");
        }
        let mut seed = 7u32;
        for _ in 0..2000 {
            let mut r = rec.clone();
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let i = (seed >> 8) as usize % r.len();
            r[i] = (seed >> 20) as u8;
            let _ = server_name(&r);
        }
        assert_eq!(server_name(&client_hello(Some("a b"))), None);
    }
}
