//! IPv6 extension headers on the guest's packets: options taken off before the NAT reads them.
//!
//! Theory of operation. The NAT paths read an IPv6 packet's transport header right after the
//! fixed header, and the fragment code expects the Fragment header there. A guest may put
//! Hop-by-Hop Options, Destination Options or a Routing header with no segments left in
//! between (RFC 8200 section 4; `setsockopt(IPV6_HOPOPTS)`, `IPV6_DSTOPTS`, a jumbogram-aware
//! stack, an IDS probe). Ferry is not the packet's destination: like passt, which skips these
//! headers to find the layer-4 one, it translates the transport payload to a host socket,
//! and the host's kernel writes the IPv6 header of what leaves. So the options are dropped:
//! the headers are cut out of the frame, in place, and the packet goes on as if the guest had
//! sent it without them. The transport checksum still holds: IPv6's pseudo-header names the
//! final destination and the upper-layer length, never an extension header.
//!
//! Only packets that end in TCP, UDP, an ICMPv6 echo request or a Fragment header are
//! changed; others (ESP, MLD reports behind Router Alert, No Next Header) go to smoltcp
//! untouched, as before. Malformed chains are dropped: a Hop-by-Hop header anywhere but
//! first, a Routing header with segments left (Ferry routes nowhere by source route), a
//! header running past the packet, a jumbogram's zero payload length, or more than
//! [`MAX_HEADERS`] headers in a row (the walk is bounded; nothing here allocates).

/// Next-header values of the headers taken off, and of what may follow them.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DESTINATION: u8 = 60;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMPV6: u8 = 58;
/// ICMPv6 echo request's type.
const ECHO_REQUEST: u8 = 128;

/// Ethernet header, and the IPv6 fixed header after it.
const ETH: usize = 14;
const FIXED: usize = 40;

/// Extension headers walked at most before the packet is dropped (Linux's own limit on
/// options headers is in the same range; real stacks send one or two).
pub const MAX_HEADERS: usize = 8;

/// What became of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not IPv6, or no extension header to take off: the frame is as it was.
    Untouched,
    /// The headers are gone; the frame is this many bytes long now.
    Stripped(usize),
    /// Malformed: the caller drops the frame.
    Drop,
}

/// Takes the Hop-by-Hop, Destination Options and spent Routing headers off the IPv6 packet
/// in `frame` (an Ethernet frame), in place. On [`Outcome::Stripped`] the frame's first `n`
/// bytes are the new frame.
pub fn strip(frame: &mut [u8]) -> Outcome {
    if frame.get(12..14) != Some(&[0x86, 0xdd]) || frame.len() < ETH + FIXED {
        return Outcome::Untouched;
    }
    let first = frame[ETH + 6];
    if !matches!(first, HOP_BY_HOP | ROUTING | DESTINATION) {
        return Outcome::Untouched;
    }
    let payload_len = usize::from(u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]));
    if payload_len == 0 {
        // A jumbogram (RFC 2675) or nothing at all: neither fits a link of 65,520 bytes.
        return Outcome::Drop;
    }
    let end = ETH + FIXED + payload_len;
    if end > frame.len() {
        return Outcome::Drop;
    }
    let (mut next, mut at) = (first, ETH + FIXED);
    let mut walked = 0;
    while matches!(next, HOP_BY_HOP | ROUTING | DESTINATION) {
        walked += 1;
        if walked > MAX_HEADERS || (next == HOP_BY_HOP && at != ETH + FIXED) {
            return Outcome::Drop;
        }
        let Some(&[following, ext_len]) = frame.get(at..at + 2) else {
            return Outcome::Drop;
        };
        // RFC 8200 4.4: the fourth byte of a Routing header is Segments Left.
        if next == ROUTING && frame.get(at + 3).is_none_or(|&left| left != 0) {
            return Outcome::Drop;
        }
        let len = (usize::from(ext_len) + 1) * 8;
        if at + len > end {
            return Outcome::Drop;
        }
        next = following;
        at += len;
    }
    let keep = match next {
        TCP | UDP | FRAGMENT => true,
        ICMPV6 => frame.get(at) == Some(&ECHO_REQUEST),
        _ => false,
    };
    if !keep {
        return Outcome::Untouched;
    }
    let cut = at - (ETH + FIXED);
    frame.copy_within(at..end, ETH + FIXED);
    frame[ETH + 6] = next;
    frame[ETH + 4..ETH + 6].copy_from_slice(&((payload_len - cut) as u16).to_be_bytes());
    Outcome::Stripped(end - cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv6 frame with `headers` (each: its type and its whole bytes, next-header byte
    /// filled in here) before a payload of type `last`.
    fn frame(headers: &[(u8, Vec<u8>)], last: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut ip = vec![0u8; FIXED];
        ip[0] = 0x60;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&[0xfd, 0x46, 0x52, 0x59, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        ip[24..40].copy_from_slice(&[
            0xfd, 0x46, 0x52, 0x59, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe,
        ]);
        let mut body = Vec::new();
        let types: Vec<u8> = headers.iter().map(|h| h.0).chain([last]).collect();
        ip[6] = types[0];
        for (i, (_, h)) in headers.iter().enumerate() {
            let mut h = h.clone();
            h[0] = types[i + 1];
            body.extend_from_slice(&h);
        }
        body.extend_from_slice(payload);
        ip[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&body);
        f
    }

    /// An options header of `n` 8-byte units (PadN fills it).
    fn options(n: u8) -> Vec<u8> {
        let mut h = vec![0u8; usize::from(n) * 8];
        h[1] = n - 1;
        h[2] = 1; // PadN
        h[3] = (usize::from(n) * 8 - 4) as u8;
        h
    }

    fn routing(left: u8) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[2] = 0;
        h[3] = left;
        h
    }

    #[test]
    fn options_before_tcp_udp_and_echo_requests_are_taken_off() {
        let udp = [0x9c, 0x40, 0, 53, 0, 12, 0xab, 0xcd, b'a', b'b', b'c', b'd'];
        let plain = frame(&[], UDP, &udp);
        for headers in [
            vec![(HOP_BY_HOP, options(1))],
            vec![(DESTINATION, options(2))],
            vec![(HOP_BY_HOP, options(1)), (DESTINATION, options(1))],
            vec![
                (HOP_BY_HOP, options(1)),
                (ROUTING, routing(0)),
                (DESTINATION, options(3)),
            ],
        ] {
            let mut f = frame(&headers, UDP, &udp);
            f.extend_from_slice(&[0; 6]); // Ethernet padding stays out of the packet
            let Outcome::Stripped(n) = strip(&mut f) else {
                panic!("not stripped: {headers:?}");
            };
            assert_eq!(&f[..n], &plain[..], "{headers:?}");
        }
        for (last, payload) in [(TCP, vec![0u8; 20]), (ICMPV6, vec![ECHO_REQUEST, 0, 0, 0])] {
            let mut f = frame(&[(DESTINATION, options(1))], last, &payload);
            assert_eq!(
                strip(&mut f),
                Outcome::Stripped(ETH + FIXED + payload.len())
            );
            assert_eq!(f[ETH + 6], last);
        }
        // Before a Fragment header: it then follows the fixed header, where reassembly reads it.
        let mut f = frame(
            &[(HOP_BY_HOP, options(1))],
            FRAGMENT,
            &[UDP, 0, 0, 1, 0, 0, 0, 9],
        );
        assert_eq!(strip(&mut f), Outcome::Stripped(ETH + FIXED + 8));
        assert_eq!(f[ETH + 6], FRAGMENT);
    }

    #[test]
    fn other_packets_are_left_as_they_are() {
        // No extension header; an MLD report behind Router Alert; ESP; not IPv6 at all.
        let mut plain = frame(&[], UDP, &[0; 8]);
        let mld = frame(&[(HOP_BY_HOP, options(1))], ICMPV6, &[143, 0, 0, 0]);
        let esp = frame(&[(DESTINATION, options(1))], 50, &[0; 16]);
        assert_eq!(strip(&mut plain), Outcome::Untouched);
        for f in [mld, esp] {
            let mut g = f.clone();
            assert_eq!(strip(&mut g), Outcome::Untouched);
            assert_eq!(f, g);
        }
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(strip(&mut arp), Outcome::Untouched);
    }

    #[test]
    fn malformed_chains_are_dropped() {
        // Hop-by-Hop second; a Routing header with a segment left; too many headers.
        let late_hbh = frame(
            &[(DESTINATION, options(1)), (HOP_BY_HOP, options(1))],
            UDP,
            &[0; 8],
        );
        let source_routed = frame(&[(ROUTING, routing(1))], UDP, &[0; 8]);
        let many = frame(
            &vec![(DESTINATION, options(1)); MAX_HEADERS + 1],
            UDP,
            &[0; 8],
        );
        // A header longer than the packet; the payload length past the frame; a jumbogram.
        let mut long = frame(&[(DESTINATION, options(1))], UDP, &[0; 8]);
        long[ETH + FIXED + 1] = 200;
        let mut short = frame(&[(DESTINATION, options(1))], UDP, &[0; 8]);
        short[ETH + 4] = 0x40;
        let mut jumbo = frame(&[(HOP_BY_HOP, options(1))], UDP, &[0; 8]);
        jumbo[ETH + 4..ETH + 6].copy_from_slice(&[0, 0]);
        // A truncated header: its length byte past the packet.
        let mut cut = frame(&[], UDP, &[]);
        cut[ETH + 6] = DESTINATION;
        cut.push(UDP);
        cut[ETH + 5] = 1;
        for (what, mut f) in [
            ("late hop-by-hop", late_hbh),
            ("source routed", source_routed),
            ("too many", many),
            ("too long", long),
            ("short", short),
            ("jumbo", jumbo),
            ("truncated", cut),
        ] {
            assert_eq!(strip(&mut f), Outcome::Drop, "{what}");
        }
    }

    #[test]
    fn any_bytes_after_an_ipv6_header_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 120) as usize;
            let mut f = frame(&[], UDP, &vec![0; len]);
            let mut s = seed;
            for b in f[ETH + FIXED..].iter_mut() {
                s = s.rotate_left(7) ^ 0x9e37_79b9;
                *b = s as u8 % 64;
            }
            f[ETH + 6] = [HOP_BY_HOP, ROUTING, DESTINATION][(seed % 3) as usize];
            let before = f.len();
            if let Outcome::Stripped(n) = strip(&mut f) {
                assert!(n < before);
            }
        }
    }
}
