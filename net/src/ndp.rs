//! Router advertisements for the guest (RFC 4861, with RFC 8106's DNS options).
//!
//! Theory of operation. Ferry is the only router on the guest's link. A guest that brings
//! IPv6 up solicits a router; the advertisement that answers (and the unsolicited ones the
//! stack sends to all nodes now and then) carries everything a distribution's network stack
//! needs with no DHCPv6 address server: the /64 to build its address in by SLAAC (on-link and
//! autonomous), the link MTU, the DNS server and search list (RDNSS, DNSSL: systemd-networkd,
//! NetworkManager and dhcpcd read them), and the "other configuration" flag without the
//! "managed" one, which sends clients that do not read them (ifupdown, busybox-style
//! scripts) to stateless DHCPv6 ([`crate::dhcpv6`]) for the same, and never to DHCPv6 for an
//! address. The advertisement comes from the router's link-local address with hop limit 255,
//! as receivers check (RFC 4861 6.1.2: only a neighbour can send one). Neighbour
//! solicitations are smoltcp's to answer. Router advertisements the guest sends are ignored:
//! smoltcp is built without `proto-ipv6-slaac`, so nothing in ferry configures itself from
//! them, and the stack drops them, so no guest becomes another guest's router.
//!
//! The base of the advertisement (header, source link-layer address, MTU, prefix) is
//! smoltcp's [`NdiscRepr`]; smoltcp has no RDNSS or DNSSL, so those are appended by hand and
//! the checksum is computed last, over the whole message.

use std::net::Ipv6Addr;

use smoltcp::time::Duration;
use smoltcp::wire::{
    Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr, NdiscPrefixInfoFlags,
    NdiscPrefixInformation, NdiscRepr, NdiscRouterFlags, RawHardwareAddress,
};

use crate::{dhcp, NetConfig, GATEWAY_MAC};

/// The all-nodes multicast group, where unsolicited advertisements go.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Its Ethernet address (RFC 2464 7: 33:33 and the group's last 32 bits).
pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// The hop limit guests use for their own packets.
const CUR_HOP_LIMIT: u8 = 64;
/// How long the guest may use ferry as its default router without hearing from it again.
const ROUTER_LIFETIME: u64 = 1800;
/// How long the prefix stays valid, and preferred, without a new advertisement.
const VALID_LIFETIME: u64 = 86400;
const PREFERRED_LIFETIME: u64 = 14400;
/// How long the DNS server and search list hold (RFC 8106 5.1 suggests at least three
/// times the longest advertisement interval; the stack advertises every 300 s).
const DNS_LIFETIME: u32 = 1800;

/// The ICMPv6 types of a router solicitation and of an advertisement.
const ROUTER_SOLICIT: u8 = 133;
/// Neighbour discovery option types (RFC 8106).
const OPT_RDNSS: u8 = 25;
const OPT_DNSSL: u8 = 31;

/// Ethernet and IPv6 header lengths.
const ETH_HEADER: usize = 14;
const IPV6_HEADER: usize = 40;
/// The largest IPv6 packet an advertisement makes: the IPv6 minimum MTU, which any link
/// carries, so a long search list never makes the advertisement too big for the guest.
const MAX_PACKET: usize = 1280;

/// Whether `frame` is a router solicitation: an Ethernet frame carrying IPv6 (no extension
/// headers) with hop limit 255 and ICMPv6 type 133, code 0, whose checksum holds and whose
/// options are well formed (RFC 4861 6.1.1, which also forbids a source link-layer address
/// option from the unspecified address). Anything else, malformed or truncated, is `false`.
pub fn is_router_solicit(frame: &[u8]) -> bool {
    if frame.get(12..14) != Some(&[0x86, 0xdd]) {
        return false;
    }
    let Some(ip) = frame.get(ETH_HEADER..) else {
        return false;
    };
    let Ok(p) = Ipv6Packet::new_checked(ip) else {
        return false;
    };
    let Ok(repr) = Ipv6Repr::parse(&p) else {
        return false;
    };
    if repr.next_header != IpProtocol::Icmpv6 || repr.hop_limit != 255 {
        return false;
    }
    // The Ethernet frame may carry padding past the IPv6 payload.
    let Some(payload) = p.payload().get(..repr.payload_len) else {
        return false;
    };
    if payload.first() != Some(&ROUTER_SOLICIT) || payload.get(1) != Some(&0) {
        return false;
    }
    let Ok(icmp) = Icmpv6Packet::new_checked(payload) else {
        return false;
    };
    if !icmp.verify_checksum(&repr.src_addr, &repr.dst_addr) {
        return false;
    }
    match NdiscRepr::parse(&icmp) {
        Ok(NdiscRepr::RouterSolicit { lladdr }) => {
            !(repr.src_addr.is_unspecified() && lladdr.is_some())
        }
        _ => false,
    }
}

/// The Ethernet address of the IPv6 multicast group `group` (RFC 2464 7).
pub fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The ICMPv6 body of the advertisement, checksum zero. With IPv6 off it still parses, but
/// says ferry is no default router (lifetime 0) and carries no prefix or DNS.
fn advert_body(cfg: &NetConfig) -> Vec<u8> {
    let on = cfg.subnet6.is_some();
    let base = NdiscRepr::RouterAdvert {
        hop_limit: CUR_HOP_LIMIT,
        // Other configuration (DNS) by DHCPv6; not managed: addresses by SLAAC only.
        flags: NdiscRouterFlags::OTHER,
        router_lifetime: Duration::from_secs(if on { ROUTER_LIFETIME } else { 0 }),
        // Zero: unspecified, the guest keeps its own neighbour timers.
        reachable_time: Duration::ZERO,
        retrans_time: Duration::ZERO,
        lladdr: Some(RawHardwareAddress::from_bytes(&GATEWAY_MAC)),
        mtu: Some(u32::from(cfg.mtu)),
        prefix_info: cfg.subnet6.map(|s| NdiscPrefixInformation {
            prefix_len: 64,
            flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
            valid_lifetime: Duration::from_secs(VALID_LIFETIME),
            preferred_lifetime: Duration::from_secs(PREFERRED_LIFETIME),
            prefix: s.prefix(),
        }),
    };
    let mut b = vec![0; Icmpv6Repr::Ndisc(base).buffer_len()];
    base.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]));
    if !on {
        return b;
    }
    // Recursive DNS server: the gateway. Length 3 units of 8 octets: one address.
    b.extend_from_slice(&[OPT_RDNSS, 3, 0, 0]);
    b.extend_from_slice(&DNS_LIFETIME.to_be_bytes());
    b.extend_from_slice(&cfg.dns6().octets());
    // DNS search list, padded with zeros to a multiple of 8 octets. The option's length
    // counts 8-octet units in one byte, and the packet stays within MAX_PACKET: the names
    // that do not fit are left out (dhcp::search_list drops whole names, never a part).
    let room = MAX_PACKET.saturating_sub(IPV6_HEADER + b.len() + 8);
    let max = (room / 8 * 8).min(255 * 8 - 8);
    let mut names = dhcp::search_list(cfg, max);
    if names.len() > max {
        // Not even ferry.internal fits: an MTU-independent constant, so never here.
        return b;
    }
    let units = (8 + names.len()).div_ceil(8);
    names.resize(units * 8 - 8, 0);
    // `units` is at most 255: `max` bounds it.
    b.extend_from_slice(&[OPT_DNSSL, units as u8, 0, 0]);
    b.extend_from_slice(&DNS_LIFETIME.to_be_bytes());
    b.extend_from_slice(&names);
    b
}

/// A whole Ethernet frame advertising the router to `dst_ip` at `dst_mac` (the guest's
/// addresses for an answer to its solicitation, or [`ALL_NODES`] at [`ALL_NODES_MAC`]),
/// from [`GATEWAY_MAC`] and [`NetConfig::gateway_ll`] with hop limit 255.
pub fn router_advert(cfg: &NetConfig, dst_mac: [u8; 6], dst_ip: Ipv6Addr) -> Vec<u8> {
    let body = advert_body(cfg);
    let src = cfg.gateway_ll();
    let mut frame = Vec::with_capacity(ETH_HEADER + IPV6_HEADER + body.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&GATEWAY_MAC);
    frame.extend_from_slice(&[0x86, 0xdd]);
    frame.resize(ETH_HEADER + IPV6_HEADER, 0);
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst_ip,
        next_header: IpProtocol::Icmpv6,
        payload_len: body.len(),
        hop_limit: 255,
    };
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut frame[ETH_HEADER..]));
    frame.extend_from_slice(&body);
    // Over the pseudo-header and the whole message, the hand-made options included.
    Icmpv6Packet::new_unchecked(&mut frame[ETH_HEADER + IPV6_HEADER..])
        .fill_checksum(&src, &dst_ip);
    frame
}

/// An unsolicited advertisement, to all nodes.
pub fn unsolicited_router_advert(cfg: &NetConfig) -> Vec<u8> {
    router_advert(cfg, ALL_NODES_MAC, ALL_NODES)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The advertisement's IPv6 packet, checked, and its ICMPv6 message.
    fn parse(f: &[u8]) -> (Ipv6Packet<&[u8]>, &[u8]) {
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let p = Ipv6Packet::new_checked(&f[ETH_HEADER..]).unwrap();
        assert_eq!(p.payload_len() as usize, f.len() - ETH_HEADER - IPV6_HEADER);
        let body = &f[ETH_HEADER + IPV6_HEADER..];
        (p, body)
    }

    /// The options of an ICMPv6 router advertisement, as (type, whole option).
    fn options(body: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut rest = &body[16..];
        while !rest.is_empty() {
            let len = usize::from(rest[1]) * 8;
            assert!(len > 0 && len <= rest.len(), "option overruns");
            out.push((rest[0], &rest[..len]));
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn the_advertisement_parses_and_carries_prefix_mtu_and_dns() {
        let cfg = NetConfig::default();
        let f = unsolicited_router_advert(&cfg);
        assert_eq!(&f[..6], &ALL_NODES_MAC);
        assert_eq!(&f[6..12], &GATEWAY_MAC);
        assert_eq!(multicast_mac(ALL_NODES), ALL_NODES_MAC);
        let (p, body) = parse(&f);
        assert_eq!(p.hop_limit(), 255);
        assert_eq!(p.src_addr(), cfg.gateway_ll());
        assert_eq!(p.dst_addr(), ALL_NODES);
        let icmp = Icmpv6Packet::new_checked(body).unwrap();
        assert!(icmp.verify_checksum(&p.src_addr(), &p.dst_addr()));
        let repr =
            Icmpv6Repr::parse(&p.src_addr(), &p.dst_addr(), &icmp, &Default::default()).unwrap();
        match repr {
            Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
                hop_limit,
                flags,
                router_lifetime,
                mtu,
                prefix_info,
                lladdr,
                ..
            }) => {
                assert_eq!(hop_limit, 64);
                assert_eq!(flags, NdiscRouterFlags::OTHER, "O, not M");
                assert_eq!(router_lifetime.secs(), 1800);
                assert_eq!(mtu, Some(u32::from(cfg.mtu)));
                assert_eq!(lladdr.unwrap().as_bytes(), &GATEWAY_MAC);
                let pi = prefix_info.unwrap();
                assert_eq!(pi.prefix_len, 64);
                assert_eq!(pi.prefix, cfg.subnet6.unwrap().prefix());
                assert_eq!(
                    pi.flags,
                    NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF
                );
                assert_eq!(pi.valid_lifetime.secs(), 86400);
                assert_eq!(pi.preferred_lifetime.secs(), 14400);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(body[5], 0x40, "the flags byte: O only");
        assert_eq!(body.len() % 8, 0);
        let opts = options(body);
        assert_eq!(
            opts.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [1, 5, 3, OPT_RDNSS, OPT_DNSSL]
        );
        let rdnss = opts[3].1;
        let mut want = vec![OPT_RDNSS, 3, 0, 0, 0, 0, 0x07, 0x08];
        want.extend_from_slice(&cfg.gateway6().octets());
        assert_eq!(rdnss, want.as_slice());
        let dnssl = opts[4].1;
        assert_eq!(
            dnssl,
            b"\x1f\x03\x00\x00\x00\x00\x07\x08\x05ferry\x08internal\x00"
        );
    }

    #[test]
    fn a_solicited_advertisement_goes_to_the_guest_and_search_lists_stay_small() {
        let mut cfg = NetConfig::default();
        let guest: Ipv6Addr = "fe80::46:52ff:fe59:2".parse().unwrap();
        let f = router_advert(&cfg, cfg.guest_mac, guest);
        assert_eq!(&f[..6], &cfg.guest_mac);
        let (p, body) = parse(&f);
        assert_eq!(p.dst_addr(), guest);
        assert!(Icmpv6Packet::new_checked(body)
            .unwrap()
            .verify_checksum(&p.src_addr(), &guest));
        // The host's search domains follow ferry.internal, as long as the packet stays
        // within the IPv6 minimum MTU.
        cfg.search = vec!["corp.example".into(), "lab.example".into()];
        let f = router_advert(&cfg, cfg.guest_mac, guest);
        let (_, body) = parse(&f);
        let dnssl = options(body)[4].1;
        assert!(dnssl.windows(13).any(|w| w == b"\x03lab\x07example\x00"));
        cfg.search = (0..200)
            .map(|i| format!("domain-{i:03}.example.org"))
            .collect();
        let f = router_advert(&cfg, cfg.guest_mac, guest);
        assert!(f.len() - ETH_HEADER <= MAX_PACKET, "{}", f.len());
        let (p, body) = parse(&f);
        assert!(Icmpv6Packet::new_checked(body)
            .unwrap()
            .verify_checksum(&p.src_addr(), &guest));
        let dnssl = options(body)[4].1;
        assert!(dnssl[8..].starts_with(b"\x05ferry\x08internal\x00\x0adomain-000"));
    }

    #[test]
    fn without_ipv6_the_router_is_no_default_router() {
        let cfg = NetConfig {
            subnet6: None,
            ..NetConfig::default()
        };
        let f = unsolicited_router_advert(&cfg);
        let (p, body) = parse(&f);
        let icmp = Icmpv6Packet::new_checked(body).unwrap();
        match Icmpv6Repr::parse(&p.src_addr(), &p.dst_addr(), &icmp, &Default::default()) {
            Ok(Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
                router_lifetime,
                prefix_info,
                ..
            })) => {
                assert_eq!(router_lifetime.secs(), 0);
                assert!(prefix_info.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(options(body).iter().all(|(t, _)| *t != OPT_RDNSS));
    }

    /// A router solicitation frame from `src` with `hop_limit`, with or without a source
    /// link-layer address option.
    fn rs_from(src: Ipv6Addr, hop_limit: u8, lladdr: bool) -> Vec<u8> {
        let dst: Ipv6Addr = "ff02::2".parse().unwrap();
        let rs = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit {
            lladdr: lladdr.then(|| RawHardwareAddress::from_bytes(&[2, 0, 0, 0, 0, 9])),
        });
        let mut f = vec![0u8; ETH_HEADER + IPV6_HEADER + rs.buffer_len()];
        f[..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmpv6,
            payload_len: rs.buffer_len(),
            hop_limit,
        }
        .emit(&mut Ipv6Packet::new_unchecked(&mut f[ETH_HEADER..]));
        rs.emit(
            &src,
            &dst,
            &mut Icmpv6Packet::new_unchecked(&mut f[ETH_HEADER + IPV6_HEADER..]),
            &Default::default(),
        );
        f
    }

    #[test]
    fn solicitations_are_recognised_and_nothing_else() {
        let cfg = NetConfig::default();
        let ll: Ipv6Addr = "fe80::1234".parse().unwrap();
        assert!(is_router_solicit(&rs_from(ll, 255, false)));
        assert!(is_router_solicit(&rs_from(ll, 255, true)));
        assert!(is_router_solicit(&rs_from(
            Ipv6Addr::UNSPECIFIED,
            255,
            false
        )));
        assert!(
            !is_router_solicit(&rs_from(Ipv6Addr::UNSPECIFIED, 255, true)),
            "a link-layer address from the unspecified address"
        );
        assert!(!is_router_solicit(&rs_from(ll, 64, false)), "a routed one");
        let mut padded = rs_from(ll, 255, false);
        padded.extend_from_slice(&[0; 6]);
        assert!(is_router_solicit(&padded), "Ethernet padding is no harm");
        let mut bad = rs_from(ll, 255, false);
        bad[ETH_HEADER + IPV6_HEADER + 4] ^= 1;
        assert!(!is_router_solicit(&bad), "a bad checksum");
        let mut code = rs_from(ll, 255, false);
        code[ETH_HEADER + IPV6_HEADER + 1] = 1;
        assert!(!is_router_solicit(&code), "code 1");
        let mut v4 = rs_from(ll, 255, false);
        v4[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(!is_router_solicit(&v4), "not IPv6");
        let good = rs_from(ll, 255, true);
        for n in 0..good.len() {
            assert!(!is_router_solicit(&good[..n]), "truncated to {n}");
        }
        assert!(!is_router_solicit(&unsolicited_router_advert(&cfg)));
        assert!(!is_router_solicit(&[]));
        assert!(!is_router_solicit(&[0xff; 200]));
    }

    #[test]
    fn random_bytes_never_panic() {
        let ll: Ipv6Addr = "fe80::1234".parse().unwrap();
        let seeds = [
            rs_from(ll, 255, true),
            unsolicited_router_advert(&NetConfig::default()),
        ];
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..50_000usize {
            let mut f = seeds[i % 2].clone();
            // A few random bytes changed, anywhere, and a random length.
            for _ in 0..1 + next() % 4 {
                let r = next();
                let at = (r as usize) % f.len();
                f[at] = (r >> 32) as u8;
            }
            f.truncate((next() as usize) % (f.len() + 1));
            let _ = is_router_solicit(&f);
            // And pure noise behind a valid Ethernet and IPv6 start.
            let mut g = f[..f.len().min(ETH_HEADER + 8)].to_vec();
            g.extend((0..next() % 120).map(|_| next() as u8));
            let _ = is_router_solicit(&g);
        }
    }
}
