//! IP fragments from the guest, put back together: IPv4's, and IPv6's Fragment header.
//!
//! Theory of operation. A guest whose MTU is smaller than a datagram it sends (a guest that
//! kept 1500 and ignored DHCP's MTU option, a UDP application that sends 8 KiB) fragments it,
//! and the NAT, which reads whole UDP datagrams and ICMP messages from single frames, would
//! never see it whole. So every fragment the guest sends is kept here, keyed as RFC 791 keys
//! IPv4's (source, destination, protocol, identification) and RFC 8200 IPv6's (source,
//! destination, identification), until the datagram is complete; it then goes through the
//! stack as one frame, as if the guest had sent it unfragmented. IPv6 fragments are read
//! where the Fragment header follows the fixed header, as every sender puts it for UDP and
//! ICMPv6; a packet with other extension headers before it goes to smoltcp as before. An
//! IPv6 "atomic fragment" (offset 0, no more to come) is a whole datagram at once.
//!
//! What the guest sends is hostile: fragments that overlap (the old way to slip past
//! filters) drop their datagram, a datagram may not run past 65,535 bytes, at most
//! [`MAX_DATAGRAMS`] are in the making at once (a new one past that drops the oldest), and one
//! not completed within [`TIMEOUT`] is dropped. Memory is bounded by the datagrams in the
//! making times the 64 KiB each may take.

use std::time::{Duration, Instant};

/// Datagrams in the making at once.
pub const MAX_DATAGRAMS: usize = 16;
/// How long a datagram may take to arrive whole (Linux gives 30 s; a guest on a memory link
/// sends all its fragments at once).
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest IPv4 datagram, header included; the largest IPv6 payload.
const MAX_DATAGRAM: usize = 65535;
/// The header a reassembled IPv4 datagram gets (the first fragment's, without options).
const HEADER: usize = 20;
/// IPv6's fixed header, and the Fragment header after it.
const HEADER6: usize = 40;
const FRAGMENT6: usize = 8;
/// IPv6's next-header value of the Fragment header.
const NEXT_FRAGMENT: u8 = 44;

/// What one frame was.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a fragment: the stack takes the frame as it is.
    Whole,
    /// A fragment, kept (or dropped as malformed); nothing for the stack yet.
    Kept,
    /// The last missing fragment: here is the whole datagram, as one Ethernet frame.
    Complete(Vec<u8>),
}

/// Which datagram a fragment belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    /// IPv4's protocol (IPv6 keys no protocol: 0).
    proto: u8,
    id: u32,
}

/// One fragment, as either family carries it.
struct Piece<'a> {
    key: Key,
    /// Where `data` goes in the datagram's payload.
    offset: usize,
    /// Whether more fragments follow (IPv4's MF, IPv6's M).
    more: bool,
    data: &'a [u8],
    /// The Ethernet and IP header the whole datagram is given when this is its first
    /// fragment: IPv4's without options, IPv6's fixed header.
    head: &'a [u8],
    /// IPv6: the protocol of the payload (the Fragment header's next header).
    next: u8,
}

/// The fragment in `frame`: `None` when it is not one, `Some(Err)` when it is one too
/// malformed to keep.
fn piece(frame: &[u8]) -> Option<Result<Piece<'_>, ()>> {
    match frame.get(12..14)? {
        [0x08, 0x00] => piece4(frame),
        [0x86, 0xdd] => piece6(frame),
        _ => None,
    }
}

fn piece4(frame: &[u8]) -> Option<Result<Piece<'_>, ()>> {
    // A header of at least 20 bytes, and a fragment: MF or an offset.
    let ip = frame.get(14..).filter(|ip| ip.len() >= HEADER)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let flags_off = u16::from_be_bytes([ip[6], ip[7]]);
    let more = flags_off & 0x2000 != 0;
    let offset = usize::from(flags_off & 0x1fff) * 8;
    if ip[0] >> 4 != 4 || (!more && offset == 0) {
        return None;
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < HEADER || total_len < ihl || total_len > ip.len() {
        return Some(Err(()));
    }
    let mut key = Key {
        v6: false,
        src: [0; 16],
        dst: [0; 16],
        proto: ip[9],
        id: u32::from(u16::from_be_bytes([ip[4], ip[5]])),
    };
    key.src[..4].copy_from_slice(&ip[12..16]);
    key.dst[..4].copy_from_slice(&ip[16..20]);
    Some(Ok(Piece {
        key,
        offset,
        more,
        data: &ip[ihl..total_len],
        head: &frame[..14 + HEADER],
        next: ip[9],
    }))
}

fn piece6(frame: &[u8]) -> Option<Result<Piece<'_>, ()>> {
    let ip = frame.get(14..).filter(|ip| ip.len() >= HEADER6)?;
    if ip[0] >> 4 != 6 || ip[6] != NEXT_FRAGMENT {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if payload_len < FRAGMENT6 || HEADER6 + payload_len > ip.len() {
        return Some(Err(()));
    }
    let fh = &ip[HEADER6..HEADER6 + FRAGMENT6];
    let off_flags = u16::from_be_bytes([fh[2], fh[3]]);
    let mut key = Key {
        v6: true,
        src: [0; 16],
        dst: [0; 16],
        proto: 0,
        id: u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]),
    };
    key.src.copy_from_slice(&ip[8..24]);
    key.dst.copy_from_slice(&ip[24..40]);
    Some(Ok(Piece {
        key,
        offset: usize::from(off_flags >> 3) * 8,
        more: off_flags & 1 != 0,
        data: &ip[HEADER6 + FRAGMENT6..HEADER6 + payload_len],
        head: &frame[..14 + HEADER6],
        next: fh[0],
    }))
}

struct Datagram {
    key: Key,
    started: Instant,
    /// The payload so far, as long as the furthest fragment reaches.
    payload: Vec<u8>,
    /// The byte ranges received, [start, end).
    have: Vec<(usize, usize)>,
    /// The payload's length, once the last fragment (no More Fragments) came.
    total: Option<usize>,
    /// The Ethernet and IP header of the first fragment (see [`Piece::head`]), and IPv6's
    /// payload protocol.
    head: Option<(Vec<u8>, u8)>,
    /// Whether it was found malformed: its later fragments are dropped too, until it times out.
    poisoned: bool,
}

/// The datagrams the guest is sending in fragments.
#[derive(Default)]
pub struct Reassembly {
    datagrams: Vec<Datagram>,
    /// Fragments dropped: overlapping, too long, or of a datagram that never completed.
    pub dropped: u64,
}

impl Reassembly {
    /// Looks at one frame from the guest; `now` is asked only of fragments, so a whole frame
    /// (every frame, nearly) costs no clock read.
    pub fn take(&mut self, frame: &[u8], now: impl FnOnce() -> Instant) -> Verdict {
        let p = match piece(frame) {
            None => return Verdict::Whole,
            Some(Err(())) => {
                self.dropped += 1;
                return Verdict::Kept;
            }
            Some(Ok(p)) => p,
        };
        let now = now();
        self.expire(now);
        let i = match self.datagrams.iter().position(|d| d.key == p.key) {
            Some(i) => i,
            None => {
                if self.datagrams.len() >= MAX_DATAGRAMS {
                    // The oldest goes: a guest that starts many and finishes none gets nowhere.
                    self.datagrams.remove(0);
                    self.dropped += 1;
                }
                self.datagrams.push(Datagram {
                    key: p.key,
                    started: now,
                    payload: Vec::new(),
                    have: Vec::new(),
                    total: None,
                    head: None,
                    poisoned: false,
                });
                self.datagrams.len() - 1
            }
        };
        let d = &mut self.datagrams[i];
        let (offset, data, more) = (p.offset, p.data, p.more);
        let end = offset + data.len();
        // IPv4's limit counts its header; IPv6's payload length does not.
        let limit = if p.key.v6 {
            MAX_DATAGRAM
        } else {
            MAX_DATAGRAM - HEADER
        };
        let fits = end <= limit
            && (more || d.total.is_none_or(|t| t == end))
            && d.total.is_none_or(|t| end <= t)
            && (!more || data.len().is_multiple_of(8));
        let overlaps = d.have.iter().any(|&(s, e)| offset < e && s < end);
        if d.poisoned || !fits || overlaps || data.is_empty() {
            d.poisoned = true;
            d.payload = Vec::new();
            self.dropped += 1;
            return Verdict::Kept;
        }
        if d.payload.len() < end {
            d.payload.resize(end, 0);
        }
        d.payload[offset..end].copy_from_slice(data);
        d.have.push((offset, end));
        if !more {
            d.total = Some(end);
        }
        if offset == 0 {
            d.head = Some((p.head.to_vec(), p.next));
        }
        let (Some(total), Some(_)) = (d.total, &d.head) else {
            return Verdict::Kept;
        };
        if d.have.iter().map(|(s, e)| e - s).sum::<usize>() != total {
            return Verdict::Kept;
        }
        let d = self.datagrams.swap_remove(i);
        let Some((head, next)) = d.head else {
            return Verdict::Kept;
        };
        let mut out = Vec::with_capacity(head.len() + total);
        out.extend_from_slice(&head);
        out.extend_from_slice(&d.payload[..total]);
        if d.key.v6 {
            // The Fragment header is gone: the payload follows the fixed header.
            let ip = &mut out[14..14 + HEADER6];
            ip[4..6].copy_from_slice(&(total as u16).to_be_bytes());
            ip[6] = next;
        } else {
            let ip = &mut out[14..14 + HEADER];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((HEADER + total) as u16).to_be_bytes());
            ip[6..8].copy_from_slice(&[0, 0]);
            ip[10..12].copy_from_slice(&[0, 0]);
            let sum = checksum(ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        Verdict::Complete(out)
    }

    /// Drops the datagrams that took too long.
    fn expire(&mut self, now: Instant) {
        let before = self.datagrams.len();
        self.datagrams
            .retain(|d| now.duration_since(d.started) < TIMEOUT);
        self.dropped += (before - self.datagrams.len()) as u64;
    }

    /// Datagrams in the making.
    pub fn pending(&self) -> usize {
        self.datagrams.len()
    }
}

/// The Internet checksum of `header` (its checksum field zero).
pub(crate) fn checksum(header: &[u8]) -> u16 {
    !fold(sum16(header))
}

/// The sum of `data` as big-endian 16-bit words (an odd last byte padded with zero), not
/// folded: at most 32 Ki words of at most 0xffff (an IP packet), so it fits.
pub(crate) fn sum16(data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    let mut sum: u32 = chunks
        .by_ref()
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a 32-bit one's complement sum into 16 bits.
pub(crate) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame with one IPv4 fragment of datagram `id`: `data` at byte `offset`.
    fn fragment(id: u16, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        let fo = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        ip[6..8].copy_from_slice(&fo.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[192, 168, 127, 2]);
        ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(data);
        f
    }

    /// An Ethernet frame with one IPv6 fragment of datagram `id` (a UDP payload): `data` at
    /// byte `offset`.
    fn fragment6(id: u32, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut ip = [0u8; 48];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        ip[6] = 44;
        ip[7] = 64;
        ip[8..24].copy_from_slice(
            &"fd46:6572:7279::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ip[24..40].copy_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ip[40] = 17;
        let fo = ((offset / 8) as u16) << 3 | u16::from(more);
        ip[42..44].copy_from_slice(&fo.to_be_bytes());
        ip[44..48].copy_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(data);
        f
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn puts_a_datagram_together_in_any_order() {
        let data = payload(8008);
        let mut r = Reassembly::default();
        let now = Instant::now();
        let parts = [(4440, false), (1480, true), (0, true), (2960, true)];
        for (k, &(off, more)) in parts.iter().enumerate() {
            let end = if more { off + 1480 } else { data.len() };
            let v = r.take(&fragment(9, off, more, &data[off..end]), || now);
            if k < parts.len() - 1 {
                assert_eq!(v, Verdict::Kept);
            } else {
                let Verdict::Complete(f) = v else {
                    panic!("not complete: {v:?}")
                };
                assert_eq!(&f[34..], &data[..]);
                assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, 20 + data.len());
                assert_eq!(&f[20..22], &[0, 0], "no fragment bits left");
                assert_eq!(checksum(&f[14..34]), 0, "a valid header checksum");
            }
        }
        assert_eq!(r.pending(), 0);
        assert_eq!(
            r.take(&fragment(9, 0, false, &data), || now),
            Verdict::Whole
        );
    }

    #[test]
    fn overlaps_overruns_floods_and_stragglers_are_dropped() {
        let data = payload(4000);
        let now = Instant::now();
        // Overlapping fragments drop the datagram, also when the rest arrives.
        let mut r = Reassembly::default();
        r.take(&fragment(1, 0, true, &data[..1480]), || now);
        assert_eq!(
            r.take(&fragment(1, 1472, true, &data[..1480]), || now),
            Verdict::Kept
        );
        assert_eq!(
            r.take(&fragment(1, 1480, false, &data[1480..]), || now),
            Verdict::Kept
        );
        assert!(r.dropped >= 2);
        // Past 65,535 bytes.
        let mut r = Reassembly::default();
        let v = r.take(&fragment(2, 65528, false, &data[..100]), || now);
        assert_eq!((v, r.dropped), (Verdict::Kept, 1));
        // Many datagrams started, none finished: at most MAX_DATAGRAMS are kept.
        let mut r = Reassembly::default();
        for id in 0..1000 {
            r.take(&fragment(id, 0, true, &data[..1480]), || now);
        }
        assert_eq!(r.pending(), MAX_DATAGRAMS);
        // One that never completes goes after TIMEOUT.
        let later = now + TIMEOUT + Duration::from_millis(1);
        r.take(&fragment(5000, 8, true, &data[..8]), || later);
        assert_eq!(r.pending(), 1);
        // A header that lies about its length.
        let mut f = fragment(7, 0, true, &data[..16]);
        f[16..18].copy_from_slice(&60000u16.to_be_bytes());
        assert_eq!(r.take(&f, || later), Verdict::Kept);
        assert_eq!(r.take(&f[..20], || later), Verdict::Whole);
    }

    #[test]
    fn puts_an_ipv6_datagram_together_without_its_fragment_header() {
        let data = payload(65507 + 8);
        let mut r = Reassembly::default();
        let now = Instant::now();
        // As Linux sends it at an MTU of 1500: 1448 bytes a fragment, the last one first.
        let mut offsets: Vec<usize> = (0..data.len()).step_by(1448).collect();
        offsets.rotate_right(1);
        let mut whole = None;
        for (k, &off) in offsets.iter().enumerate() {
            let end = (off + 1448).min(data.len());
            let v = r.take(
                &fragment6(77, off, end < data.len(), &data[off..end]),
                || now,
            );
            if k < offsets.len() - 1 {
                assert_eq!(v, Verdict::Kept, "fragment at {off}");
            } else {
                whole = Some(v);
            }
        }
        let Some(Verdict::Complete(f)) = whole else {
            panic!("not complete: {whole:?}")
        };
        assert_eq!(f.len(), 14 + 40 + data.len());
        assert_eq!(&f[54..], &data[..]);
        assert_eq!(usize::from(u16::from_be_bytes([f[18], f[19]])), data.len());
        assert_eq!(
            f[20], 17,
            "the payload's protocol, the Fragment header gone"
        );
        assert_eq!(r.pending(), 0);
        // An atomic fragment is a whole datagram at once; a frame without the header is not
        // a fragment at all.
        let v = r.take(&fragment6(78, 0, false, &data[..100]), || now);
        let Verdict::Complete(f) = v else {
            panic!("an atomic fragment: {v:?}")
        };
        assert_eq!((&f[54..], f[20]), (&data[..100], 17));
        let mut plain = fragment6(79, 0, false, &data[..100]);
        plain[20] = 17;
        assert_eq!(r.take(&plain, || now), Verdict::Whole);
    }

    #[test]
    fn hostile_ipv6_fragments_are_dropped() {
        let data = payload(4000);
        let now = Instant::now();
        let mut r = Reassembly::default();
        // Overlapping.
        r.take(&fragment6(1, 0, true, &data[..1448]), || now);
        assert_eq!(
            r.take(&fragment6(1, 1440, true, &data[..1448]), || now),
            Verdict::Kept
        );
        assert_eq!(
            r.take(&fragment6(1, 1448, false, &data[1448..2000]), || now),
            Verdict::Kept
        );
        // Past 65,535 bytes of payload.
        let before = r.dropped;
        r.take(&fragment6(2, 65528, false, &data[..100]), || now);
        // A payload length longer than the frame, and a Fragment header cut short.
        let mut f = fragment6(3, 0, true, &data[..16]);
        f[18..20].copy_from_slice(&60000u16.to_be_bytes());
        assert_eq!(r.take(&f, || now), Verdict::Kept);
        let mut f = fragment6(4, 0, true, &[]);
        f[18..20].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(r.take(&f[..58], || now), Verdict::Kept);
        assert_eq!(r.dropped, before + 3);
        // A flood of datagrams never finished stays bounded.
        for id in 0..1000 {
            r.take(&fragment6(100 + id, 0, true, &data[..1448]), || now);
        }
        assert_eq!(r.pending(), MAX_DATAGRAMS);
    }
}
