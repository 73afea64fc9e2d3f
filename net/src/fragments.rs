//! IPv4 fragments from the guest, put back together.
//!
//! Theory of operation. A guest whose MTU is smaller than a datagram it sends (a guest that
//! kept 1500 and ignored DHCP's MTU option, a UDP application that sends 8 KiB) fragments it,
//! and the NAT, which reads whole UDP datagrams and ICMP messages from single frames, would
//! never see it whole. So every fragment the guest sends is kept here, keyed as RFC 791 keys
//! them (source, destination, protocol, identification), until the datagram is complete; it
//! then goes through the stack as one frame, as if the guest had sent it unfragmented.
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
/// The largest IPv4 datagram, header included.
const MAX_DATAGRAM: usize = 65535;
/// The header a reassembled datagram gets (the first fragment's, without options).
const HEADER: usize = 20;

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

struct Datagram {
    key: ([u8; 4], [u8; 4], u8, u16),
    started: Instant,
    /// The payload so far, as long as the furthest fragment reaches.
    payload: Vec<u8>,
    /// The byte ranges received, [start, end).
    have: Vec<(usize, usize)>,
    /// The payload's length, once the last fragment (no More Fragments) came.
    total: Option<usize>,
    /// The Ethernet header and the IPv4 header (without options) of the first fragment.
    head: Option<[u8; 14 + HEADER]>,
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
        // Ethernet with IPv4, a header of at least 20 bytes, and a fragment: MF or an offset.
        if frame.len() < 14 + HEADER || frame[12..14] != [0x08, 0x00] {
            return Verdict::Whole;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let flags_off = u16::from_be_bytes([ip[6], ip[7]]);
        let more = flags_off & 0x2000 != 0;
        let offset = usize::from(flags_off & 0x1fff) * 8;
        if ip[0] >> 4 != 4 || (!more && offset == 0) {
            return Verdict::Whole;
        }
        let now = now();
        self.expire(now);
        let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ihl < HEADER || total_len < ihl || total_len > ip.len() {
            self.dropped += 1;
            return Verdict::Kept;
        }
        let data = &ip[ihl..total_len];
        let key = (
            <[u8; 4]>::try_from(&ip[12..16]).unwrap_or_default(),
            <[u8; 4]>::try_from(&ip[16..20]).unwrap_or_default(),
            ip[9],
            u16::from_be_bytes([ip[4], ip[5]]),
        );
        let i = match self.datagrams.iter().position(|d| d.key == key) {
            Some(i) => i,
            None => {
                if self.datagrams.len() >= MAX_DATAGRAMS {
                    // The oldest goes: a guest that starts many and finishes none gets nowhere.
                    self.datagrams.remove(0);
                    self.dropped += 1;
                }
                self.datagrams.push(Datagram {
                    key,
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
        let end = offset + data.len();
        let fits = end + HEADER <= MAX_DATAGRAM
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
            let mut head = [0u8; 14 + HEADER];
            head[..14].copy_from_slice(&frame[..14]);
            head[14..].copy_from_slice(&ip[..HEADER]);
            d.head = Some(head);
        }
        let (Some(total), Some(head)) = (d.total, d.head) else {
            return Verdict::Kept;
        };
        if d.have.iter().map(|(s, e)| e - s).sum::<usize>() != total {
            return Verdict::Kept;
        }
        let d = self.datagrams.swap_remove(i);
        let mut out = Vec::with_capacity(14 + HEADER + total);
        out.extend_from_slice(&head);
        out.extend_from_slice(&d.payload[..total]);
        let ip = &mut out[14..14 + HEADER];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((HEADER + total) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&[0, 0]);
        ip[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
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
fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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
}
