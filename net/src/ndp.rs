//! Router advertisements for the guest (RFC 4861, with RFC 8106's DNS options).
//!
//! Theory of operation. Ferry is the only router on the guest's link. A guest that brings
//! IPv6 up solicits a router; the advertisement that answers (and the unsolicited ones the
//! stack sends now and then) carries everything a distribution's network stack needs with no
//! DHCPv6 address server: the /64 to build its address in by SLAAC (on-link and autonomous),
//! the link MTU, the DNS server and search list (RDNSS, DNSSL: systemd-networkd and
//! NetworkManager read them), and the "other configuration" flag, which sends clients that do
//! not read them (ifupdown, busybox) to stateless DHCPv6 for the same. The advertisement comes
//! from the router's link-local address with hop limit 255, as receivers check. Neighbour
//! solicitations are smoltcp's to answer; router advertisements the guest sends are dropped by
//! the stack, so no guest can become another guest's router.

use std::net::Ipv6Addr;

use smoltcp::wire::{Icmpv6Packet, IpProtocol, Ipv6Packet, Ipv6Repr};

use crate::{dhcp, NetConfig, GATEWAY_MAC};

/// How long the guest may use ferry as its default router without hearing from it again.
const ROUTER_LIFETIME: u16 = 1800;
/// How long the prefix stays valid, and preferred, without a new advertisement.
const VALID_LIFETIME: u32 = 86400;
const PREFERRED_LIFETIME: u32 = 14400;
/// How long the DNS server and search list hold.
const DNS_LIFETIME: u32 = 1800;

/// The ICMPv6 type of a router solicitation and of an advertisement.
const ROUTER_SOLICIT: u8 = 133;
const ROUTER_ADVERT: u8 = 134;

/// Whether `frame` is a router solicitation: an Ethernet frame carrying IPv6 (no extension
/// headers) with hop limit 255 and ICMPv6 type 133 whose checksum holds.
pub fn is_router_solicit(frame: &[u8]) -> bool {
    let Some(ip) = frame.get(14..) else {
        return false;
    };
    if frame.get(12..14) != Some(&[0x86, 0xdd]) {
        return false;
    }
    let Ok(p) = Ipv6Packet::new_checked(ip) else {
        return false;
    };
    let Ok(repr) = Ipv6Repr::parse(&p) else {
        return false;
    };
    if repr.next_header != IpProtocol::Icmpv6 || repr.hop_limit != 255 {
        return false;
    }
    let Some(payload) = p.payload().get(..repr.payload_len) else {
        return false;
    };
    let Ok(icmp) = Icmpv6Packet::new_checked(payload) else {
        return false;
    };
    payload.first() == Some(&ROUTER_SOLICIT) && icmp.verify_checksum(&repr.src_addr, &repr.dst_addr)
}

/// The ICMPv6 body of the advertisement (checksum zero).
fn advert_body(cfg: &NetConfig) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    // Type, code, checksum; current hop limit 64; flags: O (other configuration by DHCPv6),
    // not M (no addresses by DHCPv6: SLAAC); router lifetime; reachable and retrans timers
    // left to the guest.
    b.extend_from_slice(&[ROUTER_ADVERT, 0, 0, 0, 64, 0x40]);
    b.extend_from_slice(&ROUTER_LIFETIME.to_be_bytes());
    b.extend_from_slice(&[0; 8]);
    // Source link-layer address.
    b.extend_from_slice(&[1, 1]);
    b.extend_from_slice(&GATEWAY_MAC);
    // MTU.
    b.extend_from_slice(&[5, 1, 0, 0]);
    b.extend_from_slice(&u32::from(cfg.mtu).to_be_bytes());
    // Prefix information: /64, on-link (L) and autonomous (A).
    b.extend_from_slice(&[3, 4, 64, 0xc0]);
    b.extend_from_slice(&VALID_LIFETIME.to_be_bytes());
    b.extend_from_slice(&PREFERRED_LIFETIME.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    let prefix = cfg.subnet6.map_or(Ipv6Addr::UNSPECIFIED, |s| s.prefix());
    b.extend_from_slice(&prefix.octets());
    // Recursive DNS server: the gateway.
    b.extend_from_slice(&[25, 3, 0, 0]);
    b.extend_from_slice(&DNS_LIFETIME.to_be_bytes());
    b.extend_from_slice(&cfg.gateway6().octets());
    // DNS search list, padded with zeros to a multiple of 8 octets.
    // The option's length counts 8-octet units in one byte.
    let mut names = dhcp::search_list(cfg, 255 * 8 - 8);
    let len = (8 + names.len()).div_ceil(8) * 8;
    names.resize(len - 8, 0);
    b.extend_from_slice(&[31, (len / 8) as u8, 0, 0]);
    b.extend_from_slice(&DNS_LIFETIME.to_be_bytes());
    b.extend_from_slice(&names);
    b
}

/// A whole Ethernet frame advertising the router to `dst_ip` at `dst_mac` (the guest, or the
/// all-nodes group at 33:33:00:00:00:01).
pub fn router_advert(cfg: &NetConfig, dst_mac: [u8; 6], dst_ip: Ipv6Addr) -> Vec<u8> {
    let body = advert_body(cfg);
    let src = cfg.gateway_ll();
    let mut frame = Vec::with_capacity(14 + 40 + body.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&GATEWAY_MAC);
    frame.extend_from_slice(&[0x86, 0xdd]);
    frame.resize(14 + 40, 0);
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst_ip,
        next_header: IpProtocol::Icmpv6,
        payload_len: body.len(),
        hop_limit: 255,
    };
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut frame[14..]));
    frame.extend_from_slice(&body);
    Icmpv6Packet::new_unchecked(&mut frame[54..]).fill_checksum(&src, &dst_ip);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Icmpv6Repr, NdiscRepr};

    const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

    #[test]
    fn the_advertisement_parses_and_carries_prefix_mtu_and_dns() {
        let cfg = NetConfig::default();
        let f = router_advert(&cfg, [0x33, 0x33, 0, 0, 0, 1], ALL_NODES);
        let p = Ipv6Packet::new_checked(&f[14..]).unwrap();
        assert_eq!(p.hop_limit(), 255);
        assert_eq!(p.src_addr(), cfg.gateway_ll());
        let icmp = Icmpv6Packet::new_checked(p.payload()).unwrap();
        assert!(icmp.verify_checksum(&p.src_addr(), &p.dst_addr()));
        let repr =
            Icmpv6Repr::parse(&p.src_addr(), &p.dst_addr(), &icmp, &Default::default()).unwrap();
        match repr {
            Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
                hop_limit,
                router_lifetime,
                mtu,
                prefix_info,
                lladdr,
                ..
            }) => {
                assert_eq!(hop_limit, 64);
                assert_eq!(router_lifetime.secs(), 1800);
                assert_eq!(mtu, Some(u32::from(cfg.mtu)));
                assert_eq!(lladdr.unwrap().as_bytes(), &GATEWAY_MAC);
                let pi = prefix_info.unwrap();
                assert_eq!(pi.prefix_len, 64);
                assert_eq!(pi.prefix, cfg.subnet6.unwrap().prefix());
            }
            other => panic!("{other:?}"),
        }
        let body = p.payload();
        // The managed flag is off and other-config on.
        assert_eq!(body[5], 0x40);
        // RDNSS names the gateway, DNSSL the search domain.
        let gw = cfg.gateway6().octets();
        assert!(body.windows(16).any(|w| w == gw));
        assert!(body.windows(15).any(|w| w == b"\x05ferry\x08internal"));
        assert_eq!(body.len() % 8, 0);
    }

    #[test]
    fn solicitations_are_recognised_and_nothing_else() {
        let cfg = NetConfig::default();
        let rs_from = |hop_limit: u8| {
            let src: Ipv6Addr = "fe80::1234".parse().unwrap();
            let dst: Ipv6Addr = "ff02::2".parse().unwrap();
            let rs = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: None });
            let mut f = vec![0u8; 14 + 40 + rs.buffer_len()];
            f[12..14].copy_from_slice(&[0x86, 0xdd]);
            Ipv6Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: IpProtocol::Icmpv6,
                payload_len: rs.buffer_len(),
                hop_limit,
            }
            .emit(&mut Ipv6Packet::new_unchecked(&mut f[14..]));
            rs.emit(
                &src,
                &dst,
                &mut Icmpv6Packet::new_unchecked(&mut f[54..]),
                &Default::default(),
            );
            f
        };
        assert!(is_router_solicit(&rs_from(255)));
        assert!(!is_router_solicit(&rs_from(64)), "a routed solicitation");
        let mut bad = rs_from(255);
        bad[60] ^= 1;
        assert!(!is_router_solicit(&bad), "a bad checksum");
        assert!(!is_router_solicit(&router_advert(&cfg, [0; 6], ALL_NODES)));
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for i in 0..20_000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut f = rs_from(255);
            let at = 14 + (x as usize) % (f.len() - 14);
            f[at] = (x >> 32) as u8;
            f.truncate(i % (f.len() + 1));
            let _ = is_router_solicit(&f);
        }
    }
}
