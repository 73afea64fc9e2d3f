//! IP packets for the guest that its link cannot carry whole, split into fragments that fit.
//!
//! Theory of operation. Every frame for the guest passes `FrameTx::push`, which sends here
//! the ones whose IP packet is longer than the link's MTU: a UDP datagram or ping reply larger
//! than the MTU, or any packet of a guest whose RX buffers take less than the MTU the stack
//! was made with (a guest without mergeable RX buffers, see `NetStack::limit_frames`).
//! smoltcp cannot do it: it fragments IPv4 only, and at the MTU it read when it was made.
//! Doing it at the link, after checksums are filled, covers what smoltcp's sockets send (the
//! gateway's DNS answers) and what the NAT builds itself, in one place.
//!
//! The stack is the packets' source, so it may fragment even where it set Don't Fragment,
//! and gives an unfragmented packet its own identification (smoltcp leaves it zero). An IPv4
//! packet that already is a fragment (smoltcp's own, at its MTU) is split again, its pieces
//! keeping its identification and offsets (RFC 791 allows it). IPv6 fragments carry a Fragment
//! header behind the fixed header (RFC 8200 4.5); the stack emits no other extension headers,
//! and a packet that has some is not split. What cannot be split is left whole, for the
//! device to drop and count.
//!
//! Don't Fragment, which smoltcp sets on every IPv4 packet, is cleared on all but TCP's
//! (`allow_fragments`): a guest that routes a datagram on (to the containers of an engine in
//! it, over a bridge of MTU 1500 while its own link's is 65520) must be free to fragment it, as
//! the host's kernel was for the datagram's sender; with DF it would drop the datagram and
//! answer "fragmentation needed" to the stack, which has no one to tell. TCP keeps DF: its
//! segments are sized by the MSS of the end that receives them.

use super::link::Frame;
use crate::fragments::checksum;
use std::cell::RefCell;

/// The Ethernet header.
const ETH: usize = 14;
/// IPv6's fixed header, and the Fragment header after it.
const HEADER6: usize = 40;
const FRAGMENT6: usize = 8;

/// Identifications for the datagrams the stack fragments, one counter per family.
#[derive(Default)]
pub(super) struct FragmentIds {
    v4: u16,
    v6: u32,
}

/// The length of the IP packet in `frame` (header included), if it is IPv4 or IPv6.
pub(super) fn ip_len(frame: &[u8]) -> Option<usize> {
    match frame.get(12..14)? {
        [0x08, 0x00] => Some(usize::from(u16::from_be_bytes([
            *frame.get(16)?,
            *frame.get(17)?,
        ]))),
        [0x86, 0xdd] => Some(
            HEADER6
                + usize::from(u16::from_be_bytes([
                    *frame.get(ETH + 4)?,
                    *frame.get(ETH + 5)?,
                ])),
        ),
        _ => None,
    }
}

/// Clears Don't Fragment on an IPv4 packet for the guest that is not TCP (see above).
pub(super) fn allow_fragments(frame: &mut [u8]) {
    if frame.get(12..14) != Some(&[0x08, 0x00]) || frame.len() < ETH + 20 {
        return;
    }
    let hdr = usize::from(frame[ETH] & 0x0f) * 4;
    let Some(h) = frame.get_mut(ETH..ETH + hdr) else {
        return;
    };
    if hdr < 20 || h[9] == 6 || h[6] & 0x40 == 0 {
        return;
    }
    h[6] &= !0x40;
    h[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// `frame`'s IP packet in fragments of at most `mtu` bytes each, as frames from `pool`;
/// `None` when it cannot be split (not IP, malformed, or an IPv6 packet with extension
/// headers).
pub(super) fn split(
    frame: &[u8],
    mtu: usize,
    ids: &mut FragmentIds,
    pool: &RefCell<Vec<Vec<u8>>>,
) -> Option<Vec<Frame>> {
    match frame.get(12..14)? {
        [0x08, 0x00] => split4(frame, mtu, ids, pool),
        [0x86, 0xdd] => split6(frame, mtu, ids, pool),
        _ => None,
    }
}

fn split4(
    frame: &[u8],
    mtu: usize,
    ids: &mut FragmentIds,
    pool: &RefCell<Vec<Vec<u8>>>,
) -> Option<Vec<Frame>> {
    let ip = frame.get(ETH..)?;
    let hdr = usize::from(ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    if hdr < 20 || total < hdr || total > ip.len() {
        return None;
    }
    let payload = &ip[hdr..total];
    let chunk = mtu.checked_sub(hdr)? & !7;
    if chunk == 0 {
        return None;
    }
    let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
    let more_after = flags_offset & 0x2000 != 0;
    let base = usize::from(flags_offset & 0x1fff) * 8;
    let ident = if more_after || base != 0 {
        u16::from_be_bytes([ip[4], ip[5]])
    } else {
        ids.v4 = ids.v4.wrapping_add(1);
        ids.v4
    };
    let mut out = Vec::with_capacity(payload.len().div_ceil(chunk));
    for (i, part) in payload.chunks(chunk).enumerate() {
        let last = (i + 1) * chunk >= payload.len();
        let offset = u16::try_from((base + i * chunk) / 8).ok()?;
        let mut f = Frame::take(pool, ETH + hdr + part.len());
        f[..ETH + hdr].copy_from_slice(&frame[..ETH + hdr]);
        let h = &mut f[ETH..ETH + hdr];
        h[2..4].copy_from_slice(&u16::try_from(hdr + part.len()).ok()?.to_be_bytes());
        h[4..6].copy_from_slice(&ident.to_be_bytes());
        let more = if last && !more_after { 0 } else { 0x2000 };
        h[6..8].copy_from_slice(&(more | offset).to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        f[ETH + hdr..].copy_from_slice(part);
        out.push(f);
    }
    Some(out)
}

fn split6(
    frame: &[u8],
    mtu: usize,
    ids: &mut FragmentIds,
    pool: &RefCell<Vec<Vec<u8>>>,
) -> Option<Vec<Frame>> {
    let ip = frame.get(ETH..)?;
    let next = *ip.get(6)?;
    // Hop-by-hop, routing, fragment, destination options: the stack sends none of them.
    if matches!(next, 0 | 43 | 44 | 60) {
        return None;
    }
    let payload = ip.get(HEADER6..ip_len(frame)?)?;
    let chunk = mtu.checked_sub(HEADER6 + FRAGMENT6)? & !7;
    if chunk == 0 {
        return None;
    }
    ids.v6 = ids.v6.wrapping_add(1);
    let mut out = Vec::with_capacity(payload.len().div_ceil(chunk));
    for (i, part) in payload.chunks(chunk).enumerate() {
        let more = u16::from((i + 1) * chunk < payload.len());
        let off_flags = u16::try_from(i * chunk / 8).ok()? << 3 | more;
        let mut f = Frame::take(pool, ETH + HEADER6 + FRAGMENT6 + part.len());
        f[..ETH + HEADER6].copy_from_slice(&frame[..ETH + HEADER6]);
        let h = &mut f[ETH..];
        h[4..6].copy_from_slice(&u16::try_from(FRAGMENT6 + part.len()).ok()?.to_be_bytes());
        h[6] = 44;
        // RFC 8200 4.5: next header, reserved, offset and M, identification.
        let fh = &mut h[HEADER6..HEADER6 + FRAGMENT6];
        fh[0] = next;
        fh[1] = 0;
        fh[2..4].copy_from_slice(&off_flags.to_be_bytes());
        fh[4..8].copy_from_slice(&ids.v6.to_be_bytes());
        h[HEADER6 + FRAGMENT6..].copy_from_slice(part);
        out.push(f);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fragments::{Reassembly, Verdict};

    /// An Ethernet frame carrying an IPv4 UDP-numbered packet of `len` payload bytes.
    fn ipv4(len: usize) -> Vec<u8> {
        let mut f = vec![0u8; ETH + 20 + len];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let h = &mut f[ETH..ETH + 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + len) as u16).to_be_bytes());
        h[6] = 0x40; // Don't Fragment, as smoltcp sets it
        h[8] = 64;
        h[9] = 17;
        h[12..16].copy_from_slice(&[10, 0, 2, 2]);
        h[16..20].copy_from_slice(&[10, 0, 2, 15]);
        let sum = checksum(h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        for (i, b) in f[ETH + 20..].iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        f
    }

    fn ipv6(len: usize, next: u8) -> Vec<u8> {
        let mut f = vec![0u8; ETH + HEADER6 + len];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let h = &mut f[ETH..];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        h[6] = next;
        h[7] = 64;
        h[8] = 0xfd;
        h[23] = 1;
        h[24] = 0xfd;
        h[39] = 2;
        for (i, b) in f[ETH + HEADER6..].iter_mut().enumerate() {
            *b = (i * 13) as u8;
        }
        f
    }

    /// The fragments, each checked to fit, put back together by the guest-side reassembler.
    fn reassemble(pieces: &[Frame], mtu: usize) -> Vec<u8> {
        let mut r = Reassembly::default();
        let mut whole = None;
        for p in pieces {
            assert!(ip_len(p).unwrap() <= mtu, "a piece over the MTU");
            assert_eq!(ip_len(p).unwrap() + ETH, p.len());
            if let Verdict::Complete(f) = r.take(p, std::time::Instant::now) {
                whole = Some(f);
            }
        }
        whole.expect("the pieces make the whole")
    }

    #[test]
    fn an_ipv4_packet_comes_back_whole_from_its_pieces() {
        let pool = RefCell::new(Vec::new());
        let mut ids = FragmentIds::default();
        let f = ipv4(65507 + 8);
        let pieces = split(&f, 1500, &mut ids, &pool).unwrap();
        assert_eq!(pieces.len(), (65515usize).div_ceil(1480));
        let back = reassemble(&pieces, 1500);
        assert_eq!(back[ETH + 20..], f[ETH + 20..]);
        for p in &pieces {
            assert_eq!(checksum(&p[ETH..ETH + 20]), 0, "header checksum");
        }
    }

    #[test]
    fn an_ipv4_fragment_splits_into_pieces_of_the_same_datagram() {
        let pool = RefCell::new(Vec::new());
        let mut ids = FragmentIds::default();
        // The first of two fragments (ident 77, more to come), 4,000 bytes of payload.
        let mut first = ipv4(4000);
        first[ETH + 4..ETH + 8].copy_from_slice(&[0, 77, 0x20, 0]);
        let pieces = split(&first, 1500, &mut ids, &pool).unwrap();
        assert_eq!(pieces.len(), 3);
        for (i, p) in pieces.iter().enumerate() {
            assert_eq!(
                &p[ETH + 4..ETH + 6],
                &[0, 77],
                "the datagram's identification"
            );
            let fo = u16::from_be_bytes([p[ETH + 6], p[ETH + 7]]);
            assert_eq!(fo & 0x2000, 0x2000, "more follow piece {i}");
            assert_eq!(usize::from(fo & 0x1fff) * 8, i * 1480);
        }
    }

    #[test]
    fn an_ipv6_packet_comes_back_whole_from_its_pieces() {
        let pool = RefCell::new(Vec::new());
        let mut ids = FragmentIds::default();
        let f = ipv6(9000, 17);
        let pieces = split(&f, 1280, &mut ids, &pool).unwrap();
        let back = reassemble(&pieces, 1280);
        assert_eq!(back[ETH + HEADER6..], f[ETH + HEADER6..]);
        assert_eq!(back[ETH + 6], 17);
    }

    #[test]
    fn only_tcp_keeps_dont_fragment() {
        let mut udp = ipv4(100);
        allow_fragments(&mut udp);
        assert_eq!(udp[ETH + 6] & 0x40, 0, "DF on a datagram");
        assert_eq!(checksum(&udp[ETH..ETH + 20]), 0, "header checksum");
        let mut tcp = ipv4(100);
        tcp[ETH + 9] = 6;
        let before = tcp.clone();
        allow_fragments(&mut tcp);
        assert_eq!(tcp, before, "a TCP segment changed");
    }

    #[test]
    fn what_cannot_be_split_is_left_alone() {
        let pool = RefCell::new(Vec::new());
        let mut ids = FragmentIds::default();
        assert!(split(&ipv6(3000, 0), 1280, &mut ids, &pool).is_none());
        assert!(split(&ipv6(3000, 44), 1280, &mut ids, &pool).is_none());
        let mut arp = ipv4(100);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(split(&arp, 60, &mut ids, &pool).is_none());
        let mut short = ipv4(3000);
        short.truncate(ETH + 1000);
        assert!(
            split(&short, 576, &mut ids, &pool).is_none(),
            "claims more than it has"
        );
        assert!(
            split(&ipv4(3000), 20, &mut ids, &pool).is_none(),
            "no room past the header"
        );
    }
}
