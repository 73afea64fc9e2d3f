//! The path MTUs the guest reports for IPv6 packets the stack sends it: Packet Too Big from a
//! guest that routes them on.
//!
//! Theory of operation. A guest that routes what it receives (a container engine's bridge or
//! a VPN inside it, of MTU 1500 while ferry's link is 65520) cannot pass on an IPv6 packet
//! longer than the next link: IPv6 routers never fragment, so it drops the packet and answers
//! the source with Packet Too Big (RFC 8201). The source, as the guest sees it, is ferry (the
//! NAT sends every remote's datagram on itself), so ferry does what a source does: it keeps
//! the MTU for that path, source and destination as the guest saw them, for ten minutes
//! (Linux's `mtu_expires`), and `FrameTx` sends the path's next packets in fragments that fit.
//! IPv4 needs none of this: its packets to the guest carry no Don't Fragment but TCP's, whose
//! segments follow the MSS of the end that receives them, so the guest fragments them itself.
//!
//! An MTU below IPv6's minimum of 1280 is taken as 1280 (RFC 8200 5: every link carries
//! that), so a guest cannot make the stack send tiny fragments; the table holds at most
//! `MAX_PATHS` paths, the oldest going first, so a guest that reports many costs no more.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

/// How long a reported MTU holds, as Linux's `net.ipv6.route.mtu_expires`.
const EXPIRES: Duration = Duration::from_secs(600);

/// Paths kept at most.
const MAX_PATHS: usize = 64;

/// IPv6's minimum link MTU.
const MIN_MTU: usize = 1280;

/// The guest's reported path MTUs, by (source, destination) of the packets they limit.
#[derive(Default)]
pub(super) struct GuestPaths {
    paths: HashMap<(Ipv6Addr, Ipv6Addr), (usize, Instant)>,
}

impl GuestPaths {
    /// Takes the Packet Too Big the guest sent (its ICMPv6 message `icmp`: type 2, the MTU,
    /// then the start of the packet it could not pass on). Returns whether it was one.
    pub(super) fn learn(&mut self, icmp: &[u8]) -> bool {
        const PACKET_TOO_BIG: u8 = 2;
        if icmp.first() != Some(&PACKET_TOO_BIG) {
            return false;
        }
        let (Some(mtu), Some(quoted)) = (icmp.get(4..8), icmp.get(8..48)) else {
            return true;
        };
        let mtu = u32::from_be_bytes([mtu[0], mtu[1], mtu[2], mtu[3]]);
        let mtu = usize::try_from(mtu).unwrap_or(usize::MAX).max(MIN_MTU);
        if quoted[0] >> 4 != 6 {
            return true;
        }
        let src = addr(&quoted[8..24]);
        let dst = addr(&quoted[24..40]);
        let now = Instant::now();
        self.paths
            .retain(|_, (_, at)| now.duration_since(*at) < EXPIRES);
        if self.paths.len() >= MAX_PATHS && !self.paths.contains_key(&(src, dst)) {
            let oldest = self
                .paths
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.paths.remove(&k);
            }
        }
        log::debug!("net: the guest's path from {src} to {dst} takes {mtu}-byte packets");
        self.paths.insert((src, dst), (mtu, now));
        true
    }

    /// The MTU the guest reported for the path of `frame` (an Ethernet frame for the guest),
    /// if it did and the report still holds.
    pub(super) fn mtu_for(&self, frame: &[u8]) -> Option<usize> {
        if self.paths.is_empty() || frame.get(12..14) != Some(&[0x86, 0xdd]) {
            return None;
        }
        let src = addr(frame.get(22..38)?);
        let dst = addr(frame.get(38..54)?);
        let &(mtu, at) = self.paths.get(&(src, dst))?;
        (at.elapsed() < EXPIRES).then_some(mtu)
    }
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Packet Too Big of `mtu` quoting a packet `src` -> `dst`.
    fn too_big(mtu: u32, src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut m = vec![2, 0, 0, 0];
        m.extend_from_slice(&mtu.to_be_bytes());
        m.extend_from_slice(&[0x60, 0, 0, 0, 0x05, 0xdc, 17, 64]);
        m.extend_from_slice(&src.octets());
        m.extend_from_slice(&dst.octets());
        m.extend_from_slice(&[0; 8]);
        m
    }

    fn frame(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f
    }

    #[test]
    fn a_reported_mtu_holds_for_its_path_only_and_never_below_1280() {
        let (a, b, c): (Ipv6Addr, Ipv6Addr, Ipv6Addr) = (
            "2001:db8::1".parse().unwrap(),
            "fd46::2".parse().unwrap(),
            "2001:db8::3".parse().unwrap(),
        );
        let mut p = GuestPaths::default();
        assert_eq!(p.mtu_for(&frame(a, b)), None);
        assert!(p.learn(&too_big(1500, a, b)));
        assert_eq!(p.mtu_for(&frame(a, b)), Some(1500));
        assert_eq!(p.mtu_for(&frame(c, b)), None, "another source's path");
        assert!(p.learn(&too_big(300, c, b)));
        assert_eq!(p.mtu_for(&frame(c, b)), Some(1280));
        // Other messages are not its; a cut one is taken and ignored.
        assert!(!p.learn(&[1, 4, 0, 0, 0, 0, 0, 0]));
        assert!(p.learn(&[2, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn the_table_keeps_the_newest_paths() {
        let mut p = GuestPaths::default();
        let dst: Ipv6Addr = "fd46::2".parse().unwrap();
        for i in 0..(MAX_PATHS as u16 + 10) {
            let src = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i);
            p.learn(&too_big(1400, src, dst));
        }
        assert_eq!(p.paths.len(), MAX_PATHS);
        let newest = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, MAX_PATHS as u16 + 9);
        assert_eq!(p.mtu_for(&frame(newest, dst)), Some(1400));
    }
}
