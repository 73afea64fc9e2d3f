//! The TCP and UDP checksums of the frames smoltcp emits for the guest.
//!
//! Theory of operation. smoltcp emits TCP and UDP with the checksum field zero (the device's
//! capabilities say so, see `link::FrameQueue::capabilities`), and `FrameTx` decides here,
//! frame by frame, what the guest gets:
//! - a guest that takes partial checksums (GUEST_CSUM) gets the pseudo-header's sum in the
//!   field and the frame marked with where the sum starts and where it goes: the device sends
//!   it as VIRTIO_NET_HDR_F_NEEDS_CSUM, as a tap device hands the host's own packets to a
//!   guest. The guest's kernel takes the segment as checksummed (CHECKSUM_PARTIAL) and
//!   finishes the sum only if it sends the packet on (to a container's bridge, through a
//!   tunnel, out another NIC), so neither side sums a byte of a segment delivered locally,
//!   and one forwarded leaves with a correct checksum. (Marking a zero checksum DATA_VALID
//!   instead, as before, broke the spec's "the device validated it" and every packet a guest
//!   routed on: the next hop dropped it.)
//! - a guest that does not, or a packet the link splits into fragments (each fragment is not
//!   a segment the guest could finish), gets the whole checksum.
//!
//! IPv4 fragments smoltcp made itself keep their zero: only whole datagrams have a sum, and a
//! zero UDP checksum in IPv4 means "none".

use std::ops::Range;

use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet};

use crate::fragments::{fold, sum16};

/// A TCP or UDP checksum left partial in a frame for the guest: the field holds the
/// pseudo-header's sum, and whoever finishes it adds the bytes from `start` to the frame's
/// end and writes the complement at `start + offset` (virtio's `csum_start`, `csum_offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialChecksum {
    /// Where the summed bytes (the TCP or UDP header) start in the frame.
    pub start: u16,
    /// Where the checksum field is, from `start`.
    pub offset: u16,
}

/// Fills in the TCP or UDP checksum of a frame smoltcp emitted with it zero: whole when
/// `whole`, else partial (returned). Frames of other protocols, IPv4 fragments and malformed
/// frames are left as they are.
pub(super) fn fill(frame: &mut [u8], whole: bool) -> Option<PartialChecksum> {
    let (src, dst, proto, l4, end) = transport(frame)?;
    let offset: usize = match proto {
        IpProtocol::Tcp => 16,
        IpProtocol::Udp => 6,
        _ => return None,
    };
    let len = end.checked_sub(l4)?;
    if len < offset + 2 || len > usize::from(u16::MAX) {
        return None;
    }
    let pseudo = pseudo_header_sum(&frame[src], &frame[dst], proto, len);
    let at = l4 + offset;
    if whole {
        frame[at..at + 2].copy_from_slice(&[0, 0]);
        let sum = !fold(pseudo + sum16(&frame[l4..end]));
        // A UDP checksum that comes out zero is sent as all ones (zero means none).
        let sum = if sum == 0 && proto == IpProtocol::Udp {
            0xffff
        } else {
            sum
        };
        frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        return None;
    }
    frame[at..at + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
    Some(PartialChecksum {
        start: l4 as u16,
        offset: offset as u16,
    })
}

/// Finishes a partial checksum, as a guest's kernel does before it sends the packet on: for a
/// frame that reaches a guest that cannot take it partial.
pub(super) fn finish(frame: &mut [u8], p: PartialChecksum) {
    let Some((.., end)) = transport(frame) else {
        return;
    };
    let (start, at) = (usize::from(p.start), usize::from(p.start + p.offset));
    if at + 2 > end {
        return;
    }
    let sum = !fold(sum16(&frame[start..end]));
    // As whole: a UDP checksum that comes out zero is sent as all ones.
    let sum = if sum == 0 && p.offset == 6 {
        0xffff
    } else {
        sum
    };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Where the source and destination addresses lie in an IPv4 or IPv6 frame, its transport
/// protocol, and where the transport header starts and the packet ends (before any Ethernet
/// padding); `None` for an IPv4 fragment or a frame that is not IP. (smoltcp's IPv6 packets
/// carry no extension headers: the next header is the transport's.)
type Transport = (Range<usize>, Range<usize>, IpProtocol, usize, usize);

fn transport(frame: &[u8]) -> Option<Transport> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            let end = 14 + usize::from(ip.total_len());
            let l4 = 14 + usize::from(ip.header_len());
            (l4 <= end && end <= frame.len()).then_some((26..30, 30..34, ip.next_header(), l4, end))
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            let end = 14 + 40 + usize::from(ip.payload_len());
            (end <= frame.len()).then_some((22..38, 38..54, ip.next_header(), 14 + 40, end))
        }
        _ => None,
    }
}

/// The one's complement sum of the pseudo-header (RFC 793, RFC 8200 8.1), not folded.
fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: IpProtocol, len: usize) -> u32 {
    sum16(src) + sum16(dst) + u32::from(u8::from(proto)) + len as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{IpAddress, TcpPacket, UdpPacket};

    /// An Ethernet frame with an IPv4 (or IPv6) header and `l4` after it, checksum zero.
    fn frame(v6: bool, proto: IpProtocol, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        if v6 {
            f[12..14].copy_from_slice(&[0x86, 0xdd]);
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            ip[6] = proto.into();
            ip[7] = 64;
            ip[8..24].copy_from_slice(&[0xfd, 0x46, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            ip[24..40].copy_from_slice(&[0xfd, 0x46, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            f.extend_from_slice(&ip);
        } else {
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(20 + l4.len() as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = proto.into();
            ip[12..16].copy_from_slice(&[203, 0, 113, 7]);
            ip[16..20].copy_from_slice(&[192, 168, 127, 2]);
            f.extend_from_slice(&ip);
        }
        f.extend_from_slice(l4);
        f
    }

    fn verifies(f: &[u8]) -> bool {
        let (src, dst, proto, l4, _) = transport(f).unwrap();
        let (s, d) = if f[12] == 0x86 {
            let a: [u8; 16] = f[src].try_into().unwrap();
            let b: [u8; 16] = f[dst].try_into().unwrap();
            (
                IpAddress::from(std::net::Ipv6Addr::from(a)),
                IpAddress::from(std::net::Ipv6Addr::from(b)),
            )
        } else {
            let a: [u8; 4] = f[src].try_into().unwrap();
            let b: [u8; 4] = f[dst].try_into().unwrap();
            (
                IpAddress::from(std::net::Ipv4Addr::from(a)),
                IpAddress::from(std::net::Ipv4Addr::from(b)),
            )
        };
        match proto {
            IpProtocol::Tcp => TcpPacket::new_checked(&f[l4..])
                .unwrap()
                .verify_checksum(&s, &d),
            _ => UdpPacket::new_checked(&f[l4..])
                .unwrap()
                .verify_checksum(&s, &d),
        }
    }

    /// A TCP header (20 bytes, ports 443 → 40000) and an odd-length payload.
    fn tcp() -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&443u16.to_be_bytes());
        t[2..4].copy_from_slice(&40000u16.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x18;
        t.extend((0..1001u32).map(|i| (i * 7) as u8));
        t
    }

    fn udp() -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&53u16.to_be_bytes());
        u[2..4].copy_from_slice(&40000u16.to_be_bytes());
        u[4..6].copy_from_slice(&(8u16 + 300).to_be_bytes());
        u.extend((0..300u32).map(|i| (i * 13) as u8));
        u
    }

    #[test]
    fn a_partial_sum_finished_as_the_guest_would_verifies() {
        for v6 in [false, true] {
            for (proto, l4, offset) in [(IpProtocol::Tcp, tcp(), 16), (IpProtocol::Udp, udp(), 6)] {
                let mut f = frame(v6, proto, &l4);
                let p = fill(&mut f, false).expect("left partial");
                let start = if v6 { 54 } else { 34 };
                assert_eq!(p, PartialChecksum { start, offset });
                assert!(!verifies(&f), "a partial sum alone is not the checksum");
                finish(&mut f, p);
                assert!(verifies(&f), "v6 {v6} {proto}");
            }
        }
    }

    #[test]
    fn ethernet_padding_is_not_summed() {
        let mut f = frame(false, IpProtocol::Udp, &[0, 53, 0x9c, 0x40, 0, 9, 0, 0, 7]);
        f.extend_from_slice(&[0xaa; 17]);
        let p = fill(&mut f, false).unwrap();
        finish(&mut f, p);
        let ip_end = 14 + 20 + 9;
        assert!(verifies(&f[..ip_end]));
        let mut f = frame(false, IpProtocol::Udp, &[0, 53, 0x9c, 0x40, 0, 9, 0, 0, 7]);
        f.extend_from_slice(&[0xaa; 17]);
        fill(&mut f, true);
        assert!(verifies(&f[..ip_end]));
    }

    #[test]
    fn a_whole_sum_verifies() {
        for v6 in [false, true] {
            for (proto, l4) in [(IpProtocol::Tcp, tcp()), (IpProtocol::Udp, udp())] {
                let mut f = frame(v6, proto, &l4);
                assert_eq!(fill(&mut f, true), None);
                assert!(verifies(&f), "v6 {v6} {proto}");
            }
        }
    }

    #[test]
    fn fragments_other_protocols_and_short_frames_are_left_alone() {
        let mut f = frame(false, IpProtocol::Udp, &udp());
        f[20] = 0x20; // more fragments
        let before = f.clone();
        assert_eq!(fill(&mut f, true), None);
        assert_eq!(f, before);
        let mut icmp = frame(false, IpProtocol::Icmp, &[8, 0, 0, 0, 0, 1, 0, 1]);
        let before = icmp.clone();
        assert_eq!(fill(&mut icmp, false), None);
        assert_eq!(icmp, before);
        // A TCP header cut short.
        let mut short = frame(false, IpProtocol::Tcp, &[0u8; 10]);
        assert_eq!(fill(&mut short, false), None);
        for n in 0..60 {
            let mut cut = frame(true, IpProtocol::Tcp, &tcp());
            cut.truncate(n);
            assert_eq!(fill(&mut cut, false), None);
        }
    }
}
