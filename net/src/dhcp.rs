//! The DHCP server: one lease, the guest address, with the router, DNS server, MTU, domain and
//! search list of the network plan; the same plan without a lease for a client that set its
//! own address and asks with INFORM.
//!
//! Where answers go (RFC 2131 4.1): to a client that names its address (`ciaddr`: a bound
//! client renewing, or one asking with INFORM) at that address, since it asks from a UDP
//! socket bound there (systemd-networkd, dhcpcd), and a broadcast would never reach it; to
//! everyone else, and every NAK, by broadcast, which a client still without an address takes
//! whether or not it set the broadcast flag.

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
const OPT_CLIENT_ID: u8 = 61;

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

/// The search list the guest is given, in DNS wire format: `ferry.internal`, then the host's
/// search domains (`NetConfig::search`), as many as fit in `max` bytes. DHCP's option 119,
/// DHCPv6's option 24 and the router advertisement's DNSSL all carry it.
pub fn search_list(cfg: &NetConfig, max: usize) -> Vec<u8> {
    let mut out = dns_labels(DOMAIN);
    for name in &cfg.search {
        let wire = dns_labels(name);
        if out.len() + wire.len() > max {
            break;
        }
        out.extend_from_slice(&wire);
    }
    out
}

/// The answer to one client message, and where it goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    /// The DHCP payload, for the client's port 68.
    pub payload: Vec<u8>,
    /// The client's own address, when the answer goes there rather than to 255.255.255.255.
    pub unicast: Option<std::net::Ipv4Addr>,
}

/// The answer to one client message (DISCOVER, REQUEST, INFORM), or `None` for a message that
/// needs none (RELEASE, DECLINE, a reply, or something malformed).
pub fn reply(cfg: &NetConfig, request: &[u8]) -> Option<Reply> {
    // smoltcp's parser refuses a 7-byte client identifier that is not a MAC (type 1), as a
    // client naming itself by a 6-character string sends; the identifier is read here from
    // the raw options, so it is hidden from the parse.
    let mut parsed = request.to_vec();
    hide_client_id(&mut parsed);
    let packet = DhcpPacket::new_checked(&parsed[..]).ok()?;
    let req = DhcpRepr::parse(&packet).ok()?;
    let packet = DhcpPacket::new_checked(request).ok()?;
    let guest = to_smol(cfg.guest());
    let gateway = to_smol(cfg.gateway());
    let message_type = match req.message_type {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        // A client with an address of its own asks for the rest of the plan (RFC 2131 3.4):
        // an ACK with no address and no lease.
        DhcpMessageType::Inform => DhcpMessageType::Ack,
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
    let inform = req.message_type == DhcpMessageType::Inform;
    let mtu = cfg.mtu.to_be_bytes();
    let search = search_list(cfg, 255);
    // The client's identifier goes back as it came (RFC 6842: a MAC, the DUID
    // systemd-networkd and dhcpcd send, or a name), in every answer, a NAK's too.
    let client_id = packet
        .options()
        .find(|o| o.kind == OPT_CLIENT_ID && !o.data.is_empty())
        .map(|o| DhcpOption {
            kind: OPT_CLIENT_ID,
            data: o.data,
        });
    let plan = [
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
    let mut options: Vec<DhcpOption> = client_id.into_iter().collect();
    if !nak {
        options.extend_from_slice(&plan);
    }
    let mut dns = heapless_dns();
    if !nak {
        let _ = dns.push(gateway);
    }
    let repr = DhcpRepr {
        message_type,
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        // INFORM's answer names the address the client asked from (RFC 2131 4.3.5).
        client_ip: if inform {
            req.client_ip
        } else {
            Ipv4Address::UNSPECIFIED
        },
        your_ip: if nak || inform {
            Ipv4Address::UNSPECIFIED
        } else {
            guest
        },
        server_ip: gateway,
        router: (!nak).then_some(gateway),
        subnet_mask: (!nak).then_some(to_smol(cfg.subnet.netmask())),
        relay_agent_ip: Ipv4Address::UNSPECIFIED,
        // The client's flags come back as they came (RFC 2131 4.3.1).
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(gateway),
        parameter_request_list: None,
        dns_servers: (!nak).then_some(dns),
        max_size: None,
        lease_duration: (!nak && !inform).then_some(LEASE_SECS),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &options,
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    let mut out = DhcpPacket::new_unchecked(&mut buf[..]);
    repr.emit(&mut out).ok()?;
    let ciaddr = std::net::Ipv4Addr::from(req.client_ip.octets());
    let ours = [
        cfg.gateway(),
        cfg.host_alias(),
        cfg.subnet.network(),
        cfg.subnet.broadcast(),
    ];
    let unicast = (!nak
        && !ciaddr.is_unspecified()
        && cfg.subnet.contains(ciaddr)
        && !ours.contains(&ciaddr))
    .then_some(ciaddr);
    Some(Reply {
        payload: buf,
        unicast,
    })
}

/// Renames option 61 (client identifier) in a copy of a request to a code no parser reads
/// (224, site-specific), walking the options as RFC 2132 lays them out.
fn hide_client_id(request: &mut [u8]) {
    // op .. file (236 bytes), then the magic cookie.
    let mut at = 240;
    while at < request.len() {
        match request[at] {
            0 => at += 1,
            255 => return,
            kind => {
                let Some(&len) = request.get(at + 1) else {
                    return;
                };
                if kind == OPT_CLIENT_ID {
                    request[at] = 224;
                }
                at += 2 + usize::from(len);
            }
        }
    }
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
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::DhcpRepr;

    /// A client message of `kind` from the guest's MAC, asking for `requested`.
    pub(crate) fn request(kind: DhcpMessageType, requested: Option<Ipv4Address>) -> Vec<u8> {
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
        // smoltcp's parse refuses some identifiers a reply may echo; see `hide_client_id`.
        let mut copy = buf.to_vec();
        hide_client_id(&mut copy);
        let hidden = DhcpPacket::new_checked(&copy[..]).unwrap();
        let r = DhcpRepr::parse(&hidden).unwrap();
        let p = DhcpPacket::new_checked(buf).unwrap();
        let opts = p.options().map(|o| (o.kind, o.data.to_vec())).collect();
        (r.message_type, r.your_ip, r.router, opts)
    }

    /// `request` with option 61 (client identifier) `id` added before its end.
    fn with_client_id(mut req: Vec<u8>, id: &[u8]) -> Vec<u8> {
        let end = req.iter().rposition(|b| *b == 255).unwrap();
        let mut opt = vec![OPT_CLIENT_ID, id.len() as u8];
        opt.extend_from_slice(id);
        req.splice(end..end, opt);
        req
    }

    #[test]
    fn the_client_identifier_comes_back_as_it_came() {
        let cfg = NetConfig::default();
        // A DUID client identifier (type 255, IAID, DUID-LL), as systemd-networkd sends.
        let id = [255, 0, 0, 0, 1, 0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56];
        for (kind, answer) in [
            (DhcpMessageType::Discover, DhcpMessageType::Offer),
            (DhcpMessageType::Request, DhcpMessageType::Ack),
        ] {
            let req = with_client_id(request(kind, Some(to_smol(cfg.guest()))), &id);
            let (t, _, _, opts) = parse(&reply(&cfg, &req).unwrap().payload);
            assert_eq!(t, answer);
            assert!(opts.contains(&(OPT_CLIENT_ID, id.to_vec())), "{opts:?}");
        }
        let req = with_client_id(request(DhcpMessageType::Request, None), &id);
        let (_, _, _, opts) = parse(&reply(&cfg, &req).unwrap().payload);
        assert_eq!(opts.iter().filter(|(k, _)| *k == OPT_CLIENT_ID).count(), 1);
        // No identifier asked, none given.
        let (_, _, _, opts) = parse(
            &reply(&cfg, &request(DhcpMessageType::Discover, None))
                .unwrap()
                .payload,
        );
        assert!(!opts.iter().any(|(k, _)| *k == OPT_CLIENT_ID));
    }

    #[test]
    fn inform_gets_the_plan_without_an_address_or_a_lease() {
        let cfg = NetConfig::default();
        let mut req = request(DhcpMessageType::Inform, None);
        // ciaddr: the address the client set itself.
        req[12..16].copy_from_slice(&[192, 168, 127, 50]);
        let answer = reply(&cfg, &req).unwrap();
        assert_eq!(
            answer.unicast,
            Some([192, 168, 127, 50].into()),
            "sent to ciaddr"
        );
        let answer = answer.payload;
        assert_eq!(&answer[12..16], &[192, 168, 127, 50], "ciaddr named back");
        let (t, yiaddr, router, opts) = parse(&answer);
        assert_eq!(t, DhcpMessageType::Ack);
        assert_eq!(yiaddr, Ipv4Address::UNSPECIFIED);
        assert_eq!(router, Some(to_smol(cfg.gateway())));
        assert!(
            opts.iter()
                .any(|(k, v)| *k == 6 && v == &cfg.gateway().octets()),
            "DNS"
        );
        assert!(opts.iter().any(|(k, _)| *k == OPT_MTU));
        assert!(!opts.iter().any(|(k, _)| *k == 51), "no lease time");
    }

    #[test]
    fn the_hosts_search_domains_follow_ferry_internal_as_far_as_they_fit() {
        let cfg = NetConfig {
            search: vec!["corp.example".into(), "lab.corp.example".into()],
            ..NetConfig::default()
        };
        let (_, _, _, opts) = parse(
            &reply(&cfg, &request(DhcpMessageType::Discover, None))
                .unwrap()
                .payload,
        );
        let search = opts.iter().find(|(k, _)| *k == 119).map(|(_, d)| d.clone());
        assert_eq!(
            search.as_deref(),
            Some(
                &b"\x05ferry\x08internal\x00\x04corp\x07example\x00\x03lab\x04corp\x07example\x00"
                    [..]
            )
        );
        let long = NetConfig {
            search: (0..20)
                .map(|i| format!("{}.example", "x".repeat(40 + i)))
                .collect(),
            ..NetConfig::default()
        };
        assert!(search_list(&long, 255).len() <= 255);
    }

    #[test]
    fn discover_gets_an_offer_and_request_an_ack_with_the_plan() {
        let cfg = NetConfig::default();
        let (t, yip, router, opts) = parse(
            &reply(&cfg, &request(DhcpMessageType::Discover, None))
                .unwrap()
                .payload,
        );
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
        assert_eq!(
            ack.unicast, None,
            "a client without an address gets a broadcast"
        );
        assert_eq!(parse(&ack.payload).0, DhcpMessageType::Ack);
    }

    #[test]
    fn a_renewing_client_is_answered_at_its_address() {
        let cfg = NetConfig::default();
        // RENEWING (RFC 2131 4.3.2): ciaddr set, no requested address, no server id.
        let mut req = request(DhcpMessageType::Request, None);
        req[12..16].copy_from_slice(&cfg.guest().octets());
        let ack = reply(&cfg, &req).unwrap();
        assert_eq!(ack.unicast, Some(cfg.guest()));
        let (t, yiaddr, _, opts) = parse(&ack.payload);
        assert_eq!((t, yiaddr), (DhcpMessageType::Ack, to_smol(cfg.guest())));
        assert!(opts.iter().any(|(k, _)| *k == 51), "a lease time");
        // One that names another network's address is refused, by broadcast.
        req[12..16].copy_from_slice(&[10, 0, 0, 9]);
        let nak = reply(&cfg, &req).unwrap();
        assert_eq!(nak.unicast, None);
        assert_eq!(parse(&nak.payload).0, DhcpMessageType::Nak);
        // Nor is an answer ever sent to one of ferry's own addresses.
        let mut inform = request(DhcpMessageType::Inform, None);
        inform[12..16].copy_from_slice(&cfg.gateway().octets());
        assert_eq!(reply(&cfg, &inform).unwrap().unicast, None);
    }

    #[test]
    fn a_client_named_by_a_string_is_answered() {
        let cfg = NetConfig::default();
        // Type 0 and six characters: seven bytes that are not a MAC.
        let id = [0, b'g', b'u', b'e', b's', b't', b'1'];
        let req = with_client_id(request(DhcpMessageType::Discover, None), &id);
        let (t, _, _, opts) = parse(&reply(&cfg, &req).unwrap().payload);
        assert_eq!(t, DhcpMessageType::Offer);
        assert!(opts.contains(&(OPT_CLIENT_ID, id.to_vec())), "{opts:?}");
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
        let (t, yip, router, _) = parse(&nak.payload);
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
