//! The DHCP server: one lease, the guest address, with the router, DNS server, MTU, domain and
//! search list of the network plan.

use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, Ipv4Address,
    DHCP_MAX_DNS_SERVER_COUNT,
};

use crate::NetConfig;

/// Server port.
pub const SERVER_PORT: u16 = 67;
/// Client port.
pub const CLIENT_PORT: u16 = 68;
/// The domain given to the guest and searched for short names.
pub const DOMAIN: &str = "ferry.internal";
/// Lease time: a day (the guest is the only client and always gets the same address).
const LEASE_SECS: u32 = 86400;
/// DHCP option codes smoltcp has no field for.
const OPT_MTU: u8 = 26;
const OPT_DOMAIN_NAME: u8 = 15;
const OPT_DOMAIN_SEARCH: u8 = 119;

/// `name` in DNS wire format (length-prefixed labels, then a zero), as option 119 wants.
fn dns_labels(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(name.len() + 2);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        v.push(label.len() as u8);
        v.extend_from_slice(label.as_bytes());
    }
    v.push(0);
    v
}

/// The answer to one client message, as a DHCP payload for 255.255.255.255:68, or `None` for a
/// message that needs none (RELEASE, DECLINE, a reply, or something malformed).
pub fn reply(cfg: &NetConfig, request: &[u8]) -> Option<Vec<u8>> {
    let packet = DhcpPacket::new_checked(request).ok()?;
    let req = DhcpRepr::parse(&packet).ok()?;
    let guest = to_smol(cfg.guest());
    let gateway = to_smol(cfg.gateway());
    let message_type = match req.message_type {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        DhcpMessageType::Request => {
            // A request for another address (a lease from another network) is refused, and
            // the client starts over with DISCOVER.
            let wanted = req.requested_ip.unwrap_or(req.client_ip);
            if wanted == guest || wanted.is_unspecified() {
                DhcpMessageType::Ack
            } else {
                DhcpMessageType::Nak
            }
        }
        _ => return None,
    };
    let mtu = cfg.mtu.to_be_bytes();
    let search = dns_labels(DOMAIN);
    let options = [
        DhcpOption {
            kind: OPT_MTU,
            data: &mtu,
        },
        DhcpOption {
            kind: OPT_DOMAIN_NAME,
            data: DOMAIN.as_bytes(),
        },
        DhcpOption {
            kind: OPT_DOMAIN_SEARCH,
            data: &search,
        },
    ];
    let nak = message_type == DhcpMessageType::Nak;
    let mut dns = heapless_dns();
    if !nak {
        let _ = dns.push(gateway);
    }
    let repr = DhcpRepr {
        message_type,
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        client_ip: Ipv4Address::UNSPECIFIED,
        your_ip: if nak { Ipv4Address::UNSPECIFIED } else { guest },
        server_ip: gateway,
        router: (!nak).then_some(gateway),
        subnet_mask: (!nak).then_some(to_smol(cfg.subnet.netmask())),
        relay_agent_ip: Ipv4Address::UNSPECIFIED,
        broadcast: true,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(gateway),
        parameter_request_list: None,
        dns_servers: (!nak).then_some(dns),
        max_size: None,
        lease_duration: (!nak).then_some(LEASE_SECS),
        renew_duration: None,
        rebind_duration: None,
        additional_options: if nak { &[] } else { &options },
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    let mut out = DhcpPacket::new_unchecked(&mut buf[..]);
    repr.emit(&mut out).ok()?;
    Some(buf)
}

fn heapless_dns() -> heapless::Vec<Ipv4Address, DHCP_MAX_DNS_SERVER_COUNT> {
    heapless::Vec::new()
}

fn to_smol(a: std::net::Ipv4Addr) -> Ipv4Address {
    Ipv4Address::from(a.octets())
}

/// The client MAC a request came from, for logging.
pub fn client_mac(request: &[u8]) -> Option<EthernetAddress> {
    let packet = DhcpPacket::new_checked(request).ok()?;
    Some(packet.client_hardware_address())
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::DhcpRepr;

    fn request(kind: DhcpMessageType, requested: Option<Ipv4Address>) -> Vec<u8> {
        let repr = DhcpRepr {
            message_type: kind,
            transaction_id: 0x1234_5678,
            secs: 0,
            client_hardware_address: EthernetAddress(crate::GUEST_MAC),
            client_ip: Ipv4Address::UNSPECIFIED,
            your_ip: Ipv4Address::UNSPECIFIED,
            server_ip: Ipv4Address::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Address::UNSPECIFIED,
            broadcast: false,
            requested_ip: requested,
            client_identifier: None,
            server_identifier: None,
            parameter_request_list: Some(&[1, 3, 6, 15, 26, 119]),
            dns_servers: None,
            max_size: None,
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut DhcpPacket::new_unchecked(&mut buf[..]))
            .unwrap();
        buf
    }

    type Parsed = (
        DhcpMessageType,
        Ipv4Address,
        Option<Ipv4Address>,
        Vec<(u8, Vec<u8>)>,
    );

    fn parse(buf: &[u8]) -> Parsed {
        let p = DhcpPacket::new_checked(buf).unwrap();
        let r = DhcpRepr::parse(&p).unwrap();
        let opts = p.options().map(|o| (o.kind, o.data.to_vec())).collect();
        (r.message_type, r.your_ip, r.router, opts)
    }

    #[test]
    fn discover_gets_an_offer_and_request_an_ack_with_the_plan() {
        let cfg = NetConfig::default();
        let (t, yip, router, opts) =
            parse(&reply(&cfg, &request(DhcpMessageType::Discover, None)).unwrap());
        assert_eq!(t, DhcpMessageType::Offer);
        assert_eq!(yip, Ipv4Address::new(192, 168, 127, 2));
        assert_eq!(router, Some(Ipv4Address::new(192, 168, 127, 1)));
        let get = |k| {
            opts.iter()
                .find(|(kind, _)| *kind == k)
                .map(|(_, d)| d.clone())
        };
        assert_eq!(get(26), Some(65520u16.to_be_bytes().to_vec()));
        assert_eq!(get(6), Some(vec![192, 168, 127, 1]));
        assert_eq!(get(1), Some(vec![255, 255, 255, 0]));
        assert_eq!(get(15), Some(b"ferry.internal".to_vec()));
        assert_eq!(get(119), Some(b"\x05ferry\x08internal\x00".to_vec()));
        let ack = reply(
            &cfg,
            &request(
                DhcpMessageType::Request,
                Some(Ipv4Address::new(192, 168, 127, 2)),
            ),
        )
        .unwrap();
        assert_eq!(parse(&ack).0, DhcpMessageType::Ack);
    }

    #[test]
    fn a_request_for_another_address_is_refused() {
        let cfg = NetConfig::default();
        let nak = reply(
            &cfg,
            &request(
                DhcpMessageType::Request,
                Some(Ipv4Address::new(10, 0, 0, 9)),
            ),
        )
        .unwrap();
        let (t, yip, router, _) = parse(&nak);
        assert_eq!(
            (t, yip, router),
            (DhcpMessageType::Nak, Ipv4Address::UNSPECIFIED, None)
        );
    }

    #[test]
    fn garbage_and_releases_get_no_answer() {
        let cfg = NetConfig::default();
        assert!(reply(&cfg, &[]).is_none());
        assert!(reply(&cfg, &[0u8; 300]).is_none());
        assert!(reply(&cfg, &request(DhcpMessageType::Release, None)).is_none());
    }
}
