//! Which RX ring a frame to the guest goes on, when the guest uses several queue pairs.
//!
//! Theory of operation: a hash of the frame's flow (addresses, protocol and, unless the
//! datagram is a fragment, ports) picks the ring, so every frame of one flow takes the same
//! ring and arrives in order, while different flows spread over the guest's vCPUs, as a NIC's
//! receive-side scaling does. Frames that are not IP (ARP) take the first ring. Policy only:
//! the device does the writing.

/// The index, below `rings`, of the ring for `frame` (an Ethernet frame).
pub fn ring_for(frame: &[u8], rings: usize) -> usize {
    if rings <= 1 {
        return 0;
    }
    (flow_hash(frame) % rings as u32) as usize
}

/// FNV-1a over the flow's identifying bytes; 0 for frames that are not IP.
fn flow_hash(frame: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    let Some(ethertype) = frame.get(12..14) else {
        return 0;
    };
    let ip = &frame[14..];
    let (proto, transport) = match ethertype {
        [0x08, 0x00] => {
            let Some(&vihl) = ip.first() else { return 0 };
            let ihl = usize::from(vihl & 0x0f) * 4;
            let (Some(addrs), Some(&proto), Some(frag)) = (ip.get(12..20), ip.get(9), ip.get(6..8))
            else {
                return 0;
            };
            mix(addrs);
            // A fragment carries no ports past the first; all of a datagram's fragments then
            // hash alike only without them.
            let fragment = (u16::from_be_bytes([frag[0], frag[1]]) & 0x3fff) != 0;
            (proto, if fragment { None } else { ip.get(ihl..) })
        }
        [0x86, 0xdd] => {
            let (Some(addrs), Some(&next)) = (ip.get(8..40), ip.get(6)) else {
                return 0;
            };
            mix(addrs);
            (next, ip.get(40..))
        }
        _ => return 0,
    };
    mix(&[proto]);
    if matches!(proto, 6 | 17) {
        if let Some(ports) = transport.and_then(|t| t.get(0..4)) {
            mix(ports);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(src: [u8; 4], sport: u16, proto: u8, frag: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[14 + 6..14 + 8].copy_from_slice(&frag.to_be_bytes());
        f[14 + 9] = proto;
        f[14 + 12..14 + 16].copy_from_slice(&src);
        f[14 + 16..14 + 20].copy_from_slice(&[192, 168, 127, 2]);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f
    }

    #[test]
    fn one_flow_one_ring_and_flows_spread() {
        let a = ipv4([10, 0, 0, 1], 40000, 6, 0);
        assert_eq!(ring_for(&a, 2), ring_for(&a.clone(), 2));
        let used: std::collections::HashSet<usize> = (0..64u16)
            .map(|p| ring_for(&ipv4([10, 0, 0, 1], 40000 + p, 6, 0), 4))
            .collect();
        assert_eq!(used.len(), 4, "64 flows over 4 rings use them all");
        assert_eq!(ring_for(&a, 1), 0);
    }

    #[test]
    fn fragments_and_short_or_foreign_frames_are_safe() {
        // A later fragment has no ports: it hashes on addresses alone, like the first.
        let first = ipv4([10, 0, 0, 1], 40000, 17, 0x2000);
        let later = ipv4([10, 0, 0, 1], 9, 17, 0x00b9);
        assert_eq!(ring_for(&first, 4), ring_for(&later, 4));
        for f in [&[][..], &[0u8; 13][..], &[0u8; 15][..]] {
            assert!(ring_for(f, 4) < 4);
        }
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(ring_for(&arp, 4), 0);
    }
}
