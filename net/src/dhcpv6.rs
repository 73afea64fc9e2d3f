//! The DHCPv6 server (RFC 8415): DNS servers and the search list for every guest that asks,
//! and an address for a guest configured to take one from DHCPv6 rather than SLAAC.
//!
//! Theory of operation. Addresses come from SLAAC by default (the router advertisement's
//! managed flag is off, its other-configuration flag on), so most guests only send an
//! INFORMATION-REQUEST, which gets a REPLY with the gateway as DNS server and
//! `ferry.internal` (then the host's search domains) as search list. Those two options go in
//! every answer that can carry configuration, whether or not the client's option request
//! option names them: they are what this server is for, and a client ignores options it did
//! not ask for. A guest set up for stateful DHCPv6 (NetworkManager's `ipv6.method=dhcp`,
//! netplan's `dhcp6` without SLAAC) sends an IA_NA: it gets one address in the prefix whose
//! interface identifier is a hash of its DUID and IAID (`lease_for`), so the same client's IA
//! gets the same address every time, on every run, while the server keeps no state: a
//! REQUEST, RENEW or REBIND is answered by computing the address again (anything else the IA
//! names comes back with zero lifetimes, RFC 8415 18.3.4), RELEASE and DECLINE have nothing
//! to free, and SOLICIT with Rapid Commit gets the REPLY at once. Temporary addresses (IA_TA)
//! and delegated prefixes (IA_PD) are not given: NoAddrsAvail and NoPrefixAvail in their IAs.
//! A CONFIRM is answered from the prefix alone. Messages that name another server, or break
//! RFC 8415 section 16's rules on which messages carry a server or client identifier, and
//! anything malformed get no answer: every option is bounds-checked, none is trusted.

use std::net::Ipv6Addr;

use crate::{dhcp, NetConfig, GATEWAY_MAC};

/// The port DHCPv6 servers and relays listen on.
pub const SERVER_PORT: u16 = 547;
/// The port DHCPv6 clients listen on, where answers go.
pub const CLIENT_PORT: u16 = 546;
/// All_DHCP_Relay_Agents_and_Servers, where clients send (RFC 8415 7.1).
pub const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);

// Message types.
const SOLICIT: u8 = 1;
const ADVERTISE: u8 = 2;
const REQUEST: u8 = 3;
const CONFIRM: u8 = 4;
const RENEW: u8 = 5;
const REBIND: u8 = 6;
const REPLY: u8 = 7;
const RELEASE: u8 = 8;
const DECLINE: u8 = 9;
const INFORMATION_REQUEST: u8 = 11;

// Options.
const OPTION_CLIENTID: u16 = 1;
const OPTION_SERVERID: u16 = 2;
const OPTION_IA_NA: u16 = 3;
const OPTION_IA_TA: u16 = 4;
const OPTION_IAADDR: u16 = 5;
const OPTION_STATUS_CODE: u16 = 13;
const OPTION_RAPID_COMMIT: u16 = 14;
const OPTION_DNS_SERVERS: u16 = 23;
const OPTION_DOMAIN_LIST: u16 = 24;
const OPTION_IA_PD: u16 = 25;
const OPTION_IAPREFIX: u16 = 26;
const OPTION_INFORMATION_REFRESH_TIME: u16 = 32;

// Status codes.
const SUCCESS: u16 = 0;
const NO_ADDRS_AVAIL: u16 = 2;
const NO_BINDING: u16 = 3;
const NOT_ON_LINK: u16 = 4;
const NO_PREFIX_AVAIL: u16 = 6;

/// Longest client id kept (RFC 8415 11.1: a DUID is at most 128 octets plus its type).
const MAX_DUID: usize = 130;
/// Most options read from one message or one IA: real clients send a dozen.
const MAX_OPTIONS: usize = 64;
/// Longest search list sent, in wire format.
const MAX_DOMAIN_LIST: usize = 1024;
/// How often a stateless client asks again (RFC 4242): as often as the router advertisement's
/// DNS options expire, so a changed search list reaches the guest in the same time.
const INFORMATION_REFRESH: u32 = 1800;

/// How long a leased address stays preferred and valid: a day, as DHCP's IPv4 lease (the
/// same address comes back at every renewal anyway).
const LEASE: u32 = 86400;
/// When the client renews (T1) and rebinds (T2): at half and at 80% of the lease.
const T1: u32 = LEASE / 2;
const T2: u32 = LEASE / 5 * 4;

/// The address of IA_NA `iaid` of the client `duid`: the prefix and an interface identifier
/// hashed from both (FNV-1a, stable across runs and builds), its universal/local bit clear
/// (RFC 4291: not derived from a MAC), and never one of the low identifiers ferry's own
/// addresses use (`::1`, `::fe`).
fn lease_for(cfg: &NetConfig, duid: &[u8], iaid: &[u8]) -> Option<Ipv6Addr> {
    let subnet = cfg.subnet6?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in duid.iter().chain(iaid) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let id = (h & !(0x02 << 56)) | (1 << 32);
    Some(subnet.nth(id))
}

/// An IAADDR option (RFC 8415 21.6) for `addr` with both lifetimes `lifetime`.
fn iaaddr(addr: Ipv6Addr, lifetime: u32) -> Vec<u8> {
    let mut d = addr.octets().to_vec();
    d.extend_from_slice(&lifetime.to_be_bytes());
    d.extend_from_slice(&lifetime.to_be_bytes());
    let mut o = Vec::with_capacity(28);
    push_option(&mut o, OPTION_IAADDR, &d);
    o
}

/// Ferry's DUID: DUID-LL (type 3) of hardware type Ethernet (1) and the gateway's MAC. It
/// is the same on every run, as a DUID must be, without storing anything.
fn server_duid() -> [u8; 10] {
    let m = GATEWAY_MAC;
    [0, 3, 0, 1, m[0], m[1], m[2], m[3], m[4], m[5]]
}

/// The options in `b`, as (code, data), or `None` if one overruns it or there are too many.
fn options(mut b: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if out.len() == MAX_OPTIONS {
            return None;
        }
        let code = u16::from_be_bytes([*b.first()?, *b.get(1)?]);
        let len = usize::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]));
        out.push((code, b.get(4..4 + len)?));
        b = b.get(4 + len..)?;
    }
    Some(out)
}

fn push_option(out: &mut Vec<u8>, code: u16, data: &[u8]) {
    out.extend_from_slice(&code.to_be_bytes());
    // Every option built here is far below 64 KiB: DUIDs, IAs, addresses, the search list.
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// A status code option (RFC 8415 21.13), appended to `out`.
fn push_status(out: &mut Vec<u8>, code: u16, text: &str) {
    let mut d = code.to_be_bytes().to_vec();
    d.extend_from_slice(text.as_bytes());
    push_option(out, OPTION_STATUS_CODE, &d);
}

/// An identity association from the client: an IA_NA, IA_TA or IA_PD.
struct Ia<'a> {
    code: u16,
    iaid: &'a [u8],
    options: Vec<(u16, &'a [u8])>,
}

impl<'a> Ia<'a> {
    /// The IA in option `code` with data `d`, `None` for another option, `Some(None)` for a
    /// malformed IA.
    fn parse(code: u16, d: &'a [u8]) -> Option<Option<Self>> {
        // IA_NA and IA_PD carry T1 and T2 after the IAID; IA_TA does not.
        let fixed = match code {
            OPTION_IA_NA | OPTION_IA_PD => 12,
            OPTION_IA_TA => 4,
            _ => return None,
        };
        let iaid = d.get(..4);
        let options = d.get(fixed..).and_then(options);
        Some(iaid.zip(options).map(|(iaid, options)| Ia {
            code,
            iaid,
            options,
        }))
    }

    /// The addresses (IA_NA, IA_TA) or prefixes (IA_PD) in the IA, as the option code and
    /// its data; `None` if one is too short to hold what it must.
    fn leases(&self) -> Option<Vec<(u16, &'a [u8])>> {
        let (code, min) = match self.code {
            OPTION_IA_PD => (OPTION_IAPREFIX, 25),
            _ => (OPTION_IAADDR, 24),
        };
        let mut out = Vec::new();
        for &(c, d) in &self.options {
            if c == code {
                out.push((c, d.get(..min)?));
            }
        }
        Some(out)
    }

    /// The IA as it goes back to the client, holding `inner` (options already encoded); its
    /// T1 and T2 are zero: there is nothing to renew.
    fn answer(&self, inner: &[u8]) -> Vec<u8> {
        self.answer_with(inner, 0, 0)
    }

    /// The IA as it goes back, holding `inner`, with renewal times `t1` and `t2`.
    fn answer_with(&self, inner: &[u8], t1: u32, t2: u32) -> Vec<u8> {
        let mut d = self.iaid.to_vec();
        if self.code != OPTION_IA_TA {
            d.extend_from_slice(&t1.to_be_bytes());
            d.extend_from_slice(&t2.to_be_bytes());
        }
        d.extend_from_slice(inner);
        let mut o = Vec::with_capacity(4 + d.len());
        push_option(&mut o, self.code, &d);
        o
    }

    /// The IA holding only a status code.
    fn with_status(&self, code: u16, text: &str) -> Vec<u8> {
        let mut inner = Vec::new();
        push_status(&mut inner, code, text);
        self.answer(&inner)
    }

    /// The status of an IA this server is asked to fill and does not: no temporary address,
    /// or no prefix.
    fn none_available(&self) -> Vec<u8> {
        if self.code == OPTION_IA_PD {
            self.with_status(NO_PREFIX_AVAIL, "no prefixes are delegated here")
        } else {
            self.with_status(NO_ADDRS_AVAIL, "temporary addresses come from SLAAC")
        }
    }

    /// An IA_NA filled with `lease`, the client's address, for a day; any other address the
    /// client named comes back with zero lifetimes (not ours to extend). `None` if an address
    /// the IA holds is malformed.
    fn leased(&self, lease: Ipv6Addr) -> Option<Vec<u8>> {
        let mut inner = iaaddr(lease, LEASE);
        for (_, d) in self.leases()? {
            let a: [u8; 16] = d.get(..16)?.try_into().ok()?;
            if Ipv6Addr::from(a) != lease {
                inner.extend_from_slice(&iaaddr(Ipv6Addr::from(a), 0));
            }
        }
        Some(self.answer_with(&inner, T1, T2))
    }
}

/// The answer to the DHCPv6 message `request` (a UDP payload from a client to
/// [`SERVER_PORT`]), to go back to the client's port; `None` when it gets none: IPv6 is off,
/// the message is malformed, not for this server, or not one a server answers.
pub fn reply(cfg: &NetConfig, request: &[u8]) -> Option<Vec<u8>> {
    cfg.subnet6?;
    let kind = *request.first()?;
    let xid = request.get(1..4)?;
    let opts = options(request.get(4..)?)?;
    let find = |code: u16| opts.iter().find(|(c, _)| *c == code).map(|(_, d)| *d);
    let client_id = match find(OPTION_CLIENTID) {
        Some(d) if (2..=MAX_DUID).contains(&d.len()) => Some(d),
        Some(_) => return None,
        None => None,
    };
    let duid = server_duid();
    // RFC 8415 16: which messages must name this server, and which must name none.
    match (kind, find(OPTION_SERVERID)) {
        (_, Some(s)) if s != duid.as_slice() => return None,
        (SOLICIT | CONFIRM | REBIND, Some(_)) => return None,
        (REQUEST | RENEW | RELEASE | DECLINE, None) => return None,
        _ => {}
    }
    if kind != INFORMATION_REQUEST && client_id.is_none() {
        return None;
    }
    let mut ias = Vec::new();
    for &(code, d) in &opts {
        if let Some(ia) = Ia::parse(code, d) {
            ias.push(ia?);
        }
    }

    // SOLICIT with Rapid Commit (RFC 8415 18.3.1) is answered with the REPLY at once, which
    // the client takes as REQUEST's.
    let rapid = kind == SOLICIT && find(OPTION_RAPID_COMMIT).is_some();
    let mut out = Vec::with_capacity(256);
    out.push(if kind == SOLICIT && !rapid {
        ADVERTISE
    } else {
        REPLY
    });
    out.extend_from_slice(xid);
    if let Some(id) = client_id {
        push_option(&mut out, OPTION_CLIENTID, id);
    }
    push_option(&mut out, OPTION_SERVERID, &duid);
    if rapid {
        push_option(&mut out, OPTION_RAPID_COMMIT, &[]);
    }
    // The address of an IA_NA of this client.
    let lease = |ia: &Ia| lease_for(cfg, client_id.unwrap_or_default(), ia.iaid);
    let mut configure = true;
    match kind {
        // RFC 8415 16.12: an information request with an IA is discarded.
        INFORMATION_REQUEST if !ias.is_empty() => return None,
        INFORMATION_REQUEST => {
            push_option(
                &mut out,
                OPTION_INFORMATION_REFRESH_TIME,
                &INFORMATION_REFRESH.to_be_bytes(),
            );
        }
        SOLICIT | REQUEST | RENEW | REBIND if ias.iter().any(|ia| ia.code == OPTION_IA_NA) => {
            // Each IA_NA its address (again, for RENEW and REBIND: the same one); the
            // temporary addresses and prefixes asked with them are not given.
            for ia in &ias {
                let answer = match (ia.code, lease(ia)) {
                    (OPTION_IA_NA, Some(a)) => ia.leased(a)?,
                    _ if matches!(kind, SOLICIT | REQUEST) => ia.none_available(),
                    _ => ia.with_status(NO_BINDING, "no such lease"),
                };
                out.extend_from_slice(&answer);
            }
        }
        SOLICIT | REQUEST => {
            for ia in &ias {
                out.extend_from_slice(&ia.none_available());
            }
            // RFC 3315 17.2.2's way of saying it in an advertisement, for older clients
            // (RFC 8415 moved it into the IAs, above).
            if kind == SOLICIT {
                push_status(
                    &mut out,
                    NO_ADDRS_AVAIL,
                    "only IA_NA addresses are given here",
                );
            }
        }
        RENEW => {
            for ia in &ias {
                out.extend_from_slice(&ia.with_status(NO_BINDING, "no such lease"));
            }
        }
        REBIND => {
            // RFC 8415 18.3.5: addresses no binding holds come back with zero lifetimes,
            // so the client drops them at once; an IA with none gets NoBinding.
            for ia in &ias {
                let leases = ia.leases()?;
                if leases.is_empty() {
                    out.extend_from_slice(&ia.with_status(NO_BINDING, "no such lease"));
                    continue;
                }
                let mut inner = Vec::new();
                for (code, d) in leases {
                    let mut z = d.to_vec();
                    // IAADDR: address, then preferred and valid lifetime; IAPREFIX: the
                    // lifetimes first.
                    let lifetimes = if code == OPTION_IAPREFIX {
                        0..8
                    } else {
                        16..24
                    };
                    z[lifetimes].fill(0);
                    push_option(&mut inner, code, &z);
                }
                out.extend_from_slice(&ia.answer(&inner));
            }
        }
        RELEASE | DECLINE => {
            // RFC 8415 18.3.7 and 18.3.8: Success overall; NoBinding in each IA but an
            // IA_NA's (whose address is computed, not held: nothing to free).
            for ia in ias.iter().filter(|ia| ia.code != OPTION_IA_NA) {
                out.extend_from_slice(&ia.with_status(NO_BINDING, "no such lease"));
            }
            push_status(&mut out, SUCCESS, "nothing to release");
            configure = false;
        }
        CONFIRM => {
            // RFC 8415 18.3.3: on link if every address is in the prefix; no addresses, no
            // answer. Prefixes are not confirmed.
            let mut addrs = Vec::new();
            for ia in ias.iter().filter(|ia| ia.code != OPTION_IA_PD) {
                for (_, d) in ia.leases()? {
                    let a: [u8; 16] = d.get(..16)?.try_into().ok()?;
                    addrs.push(Ipv6Addr::from(a));
                }
            }
            if addrs.is_empty() {
                return None;
            }
            let on_link = cfg
                .subnet6
                .is_some_and(|s| addrs.iter().all(|&a| s.contains(a)));
            if on_link {
                push_status(&mut out, SUCCESS, "all addresses still on link");
            } else {
                push_status(&mut out, NOT_ON_LINK, "not on this link");
            }
            configure = false;
        }
        _ => return None,
    }
    if configure {
        push_option(&mut out, OPTION_DNS_SERVERS, &cfg.dns6().octets());
        push_option(
            &mut out,
            OPTION_DOMAIN_LIST,
            &dhcp::search_list(cfg, MAX_DOMAIN_LIST),
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, opts: &[(u16, &[u8])]) -> Vec<u8> {
        let mut m = vec![kind, 0xab, 0xcd, 0xef];
        for (c, d) in opts {
            push_option(&mut m, *c, d);
        }
        m
    }

    /// The answer's type, and its options as (code, data).
    fn parsed(r: &[u8]) -> (u8, Vec<(u16, Vec<u8>)>) {
        assert_eq!(&r[1..4], &[0xab, 0xcd, 0xef], "the transaction id");
        let o = options(&r[4..]).expect("well-formed options");
        (r[0], o.into_iter().map(|(c, d)| (c, d.to_vec())).collect())
    }

    fn get(o: &[(u16, Vec<u8>)], code: u16) -> Option<&[u8]> {
        o.iter()
            .find(|(c, _)| *c == code)
            .map(|(_, d)| d.as_slice())
    }

    /// The status code inside an IA answer (after IAID, T1, T2 for IA_NA and IA_PD).
    fn ia_status(code: u16, ia: &[u8]) -> u16 {
        let fixed = if code == OPTION_IA_TA { 4 } else { 12 };
        let inner = options(&ia[fixed..]).unwrap();
        let s = inner
            .iter()
            .find(|(c, _)| *c == OPTION_STATUS_CODE)
            .unwrap();
        u16::from_be_bytes([s.1[0], s.1[1]])
    }

    const DUID: &[u8] = &[0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const IA_NA: &[u8] = &[0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0];

    fn ours() -> Vec<u8> {
        server_duid().to_vec()
    }

    fn iaaddr(a: &str) -> Vec<u8> {
        let mut d = a.parse::<Ipv6Addr>().unwrap().octets().to_vec();
        d.extend_from_slice(&[0, 0, 0x0e, 0x10, 0, 0, 0x1c, 0x20]);
        let mut ia = IA_NA.to_vec();
        push_option(&mut ia, OPTION_IAADDR, &d);
        ia
    }

    #[test]
    fn an_information_request_gets_dns_and_the_search_list() {
        let mut cfg = NetConfig::default();
        let r = reply(
            &cfg,
            &msg(
                INFORMATION_REQUEST,
                &[(OPTION_CLIENTID, DUID), (6, &[0, 23, 0, 24])],
            ),
        )
        .unwrap();
        let (kind, o) = parsed(&r);
        assert_eq!(kind, REPLY);
        assert_eq!(get(&o, OPTION_CLIENTID).unwrap(), DUID);
        assert_eq!(get(&o, OPTION_SERVERID).unwrap(), ours());
        assert_eq!(get(&o, OPTION_SERVERID).unwrap()[..4], [0, 3, 0, 1]);
        assert_eq!(get(&o, OPTION_SERVERID).unwrap()[4..], GATEWAY_MAC);
        assert_eq!(
            get(&o, OPTION_DNS_SERVERS).unwrap(),
            cfg.gateway6().octets()
        );
        assert_eq!(
            get(&o, OPTION_DOMAIN_LIST).unwrap(),
            b"\x05ferry\x08internal\x00"
        );
        assert_eq!(
            get(&o, OPTION_INFORMATION_REFRESH_TIME).unwrap(),
            1800u32.to_be_bytes()
        );
        assert!(get(&o, OPTION_IA_NA).is_none());
        assert!(get(&o, OPTION_STATUS_CODE).is_none());
        // Without a client id (allowed), without an option request (DNS anyway), and
        // naming this server (allowed); the host's search domains follow ferry.internal.
        cfg.search = vec!["corp.example".into()];
        let r = reply(
            &cfg,
            &msg(INFORMATION_REQUEST, &[(OPTION_SERVERID, &ours())]),
        )
        .unwrap();
        let (_, o) = parsed(&r);
        assert!(get(&o, OPTION_CLIENTID).is_none());
        assert_eq!(
            get(&o, OPTION_DOMAIN_LIST).unwrap(),
            b"\x05ferry\x08internal\x00\x04corp\x07example\x00"
        );
        // With an IA it is discarded (RFC 8415 16.12).
        assert!(reply(&cfg, &msg(INFORMATION_REQUEST, &[(OPTION_IA_NA, IA_NA)])).is_none());
    }

    /// The addresses of an IA_NA answer with their preferred and valid lifetimes, and its
    /// T1 and T2.
    fn addresses(na: &[u8]) -> (Vec<(Ipv6Addr, u32, u32)>, u32, u32) {
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let inner = options(&na[12..]).unwrap();
        let addrs = inner
            .iter()
            .filter(|(c, _)| *c == OPTION_IAADDR)
            .map(|(_, d)| {
                let a: [u8; 16] = d[..16].try_into().unwrap();
                (Ipv6Addr::from(a), be(&d[16..20]), be(&d[20..24]))
            })
            .collect();
        (addrs, be(&na[4..8]), be(&na[8..12]))
    }

    #[test]
    fn a_stateful_solicit_gets_an_address_of_its_own_and_no_temporary_ones_or_prefixes() {
        let cfg = NetConfig::default();
        let ia_ta: &[u8] = &[0, 0, 0, 7];
        let ia_pd: &[u8] = &[0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0];
        let solicit = |duid: &[u8], ias: &[(u16, &[u8])]| {
            let mut opts = vec![(OPTION_CLIENTID, duid)];
            opts.extend_from_slice(ias);
            parsed(&reply(&cfg, &msg(SOLICIT, &opts)).unwrap())
        };
        let (kind, o) = solicit(
            DUID,
            &[
                (OPTION_IA_NA, IA_NA),
                (OPTION_IA_TA, ia_ta),
                (OPTION_IA_PD, ia_pd),
            ],
        );
        assert_eq!(kind, ADVERTISE);
        let na = get(&o, OPTION_IA_NA).unwrap();
        assert_eq!(&na[..4], &IA_NA[..4], "the IAID");
        let (addrs, t1, t2) = addresses(na);
        assert_eq!((t1, t2), (43200, 69120));
        assert_eq!(addrs.len(), 1);
        let (lease, preferred, valid) = addrs[0];
        assert_eq!((preferred, valid), (86400, 86400));
        assert!(
            cfg.subnet6.unwrap().contains(lease),
            "{lease} in the prefix"
        );
        assert!(![cfg.gateway6(), cfg.host_alias6()].contains(&lease));
        assert_eq!(
            u128::from(lease) >> 57 & 1,
            0,
            "the universal/local bit clear"
        );
        let ta = get(&o, OPTION_IA_TA).unwrap();
        assert_eq!(&ta[..4], ia_ta);
        assert_eq!(ia_status(OPTION_IA_TA, ta), NO_ADDRS_AVAIL);
        let pd = get(&o, OPTION_IA_PD).unwrap();
        assert_eq!(ia_status(OPTION_IA_PD, pd), NO_PREFIX_AVAIL);
        assert!(
            get(&o, OPTION_STATUS_CODE).is_none(),
            "an address was given"
        );
        assert!(get(&o, OPTION_DNS_SERVERS).is_some());
        // The same client and IA: the same address, on every run; another IA or client:
        // another.
        let again = |duid: &[u8], ia: &[u8]| {
            let (_, o) = solicit(duid, &[(OPTION_IA_NA, ia)]);
            addresses(get(&o, OPTION_IA_NA).unwrap()).0[0].0
        };
        assert_eq!(again(DUID, IA_NA), lease);
        assert_ne!(again(DUID, &[0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0]), lease);
        assert_ne!(again(&[0, 3, 0, 1, 2, 0, 0, 0, 0, 1], IA_NA), lease);
        // Rapid Commit: the REPLY at once, saying so.
        let (kind, o) = solicit(DUID, &[(OPTION_IA_NA, IA_NA), (OPTION_RAPID_COMMIT, &[])]);
        assert_eq!(kind, REPLY);
        assert_eq!(get(&o, OPTION_RAPID_COMMIT), Some(&[][..]));
        assert_eq!(addresses(get(&o, OPTION_IA_NA).unwrap()).0[0].0, lease);
        // Only a temporary address asked: none, said in the IA and overall.
        let (_, o) = solicit(DUID, &[(OPTION_IA_TA, ia_ta)]);
        assert_eq!(
            get(&o, OPTION_STATUS_CODE).unwrap()[..2],
            NO_ADDRS_AVAIL.to_be_bytes()
        );
        // A SOLICIT without a client id, or naming a server (even this one), gets nothing.
        assert!(reply(&cfg, &msg(SOLICIT, &[(OPTION_IA_NA, IA_NA)])).is_none());
        assert!(reply(
            &cfg,
            &msg(
                SOLICIT,
                &[(OPTION_CLIENTID, DUID), (OPTION_SERVERID, &ours())]
            )
        )
        .is_none());
        // A REQUEST (which must name this server) gets a REPLY with the same address.
        let r = reply(
            &cfg,
            &msg(
                REQUEST,
                &[
                    (OPTION_CLIENTID, DUID),
                    (OPTION_SERVERID, &ours()),
                    (OPTION_IA_NA, IA_NA),
                ],
            ),
        )
        .unwrap();
        let (kind, o) = parsed(&r);
        assert_eq!(kind, REPLY);
        assert_eq!(
            addresses(get(&o, OPTION_IA_NA).unwrap()).0,
            vec![(lease, 86400, 86400)]
        );
        assert!(reply(
            &cfg,
            &msg(REQUEST, &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, IA_NA)])
        )
        .is_none());
    }

    #[test]
    fn renewals_get_the_same_address_and_others_are_dropped() {
        let cfg = NetConfig::default();
        let lease = lease_for(&cfg, DUID, &IA_NA[..4]).unwrap();
        let foreign = iaaddr("fd46:6572:7279::1234");
        let own = iaaddr(&lease.to_string());
        let to_us = |kind, ia: &[u8]| {
            reply(
                &cfg,
                &msg(
                    kind,
                    &[
                        (OPTION_CLIENTID, DUID),
                        (OPTION_SERVERID, &ours()),
                        (OPTION_IA_NA, ia),
                    ],
                ),
            )
        };
        let (kind, o) = parsed(&to_us(RENEW, &own).unwrap());
        assert_eq!(kind, REPLY);
        let (addrs, t1, t2) = addresses(get(&o, OPTION_IA_NA).unwrap());
        assert_eq!((addrs, t1, t2), (vec![(lease, 86400, 86400)], 43200, 69120));
        assert!(get(&o, OPTION_DNS_SERVERS).is_some());
        // An address this client's IA does not have comes back with zero lifetimes, beside
        // the one it has.
        let (_, o) = parsed(&to_us(RENEW, &foreign).unwrap());
        let foreign_addr: Ipv6Addr = "fd46:6572:7279::1234".parse().unwrap();
        assert_eq!(
            addresses(get(&o, OPTION_IA_NA).unwrap()).0,
            vec![(lease, 86400, 86400), (foreign_addr, 0, 0)]
        );
        // REBIND names no server; the same answer.
        let r = reply(
            &cfg,
            &msg(REBIND, &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, &own)]),
        )
        .unwrap();
        assert_eq!(
            addresses(get(&parsed(&r).1, OPTION_IA_NA).unwrap()).0,
            vec![(lease, 86400, 86400)]
        );
        // A temporary address was never given: NoBinding.
        let ia_ta: &[u8] = &[0, 0, 0, 7];
        let r = reply(
            &cfg,
            &msg(
                RENEW,
                &[
                    (OPTION_CLIENTID, DUID),
                    (OPTION_SERVERID, &ours()),
                    (OPTION_IA_TA, ia_ta),
                ],
            ),
        )
        .unwrap();
        assert_eq!(
            ia_status(OPTION_IA_TA, get(&parsed(&r).1, OPTION_IA_TA).unwrap()),
            NO_BINDING
        );
        // RELEASE and DECLINE: nothing is held, Success.
        for k in [RELEASE, DECLINE] {
            let (_, o) = parsed(&to_us(k, &own).unwrap());
            assert!(get(&o, OPTION_IA_NA).is_none());
            assert_eq!(
                get(&o, OPTION_STATUS_CODE).unwrap()[..2],
                SUCCESS.to_be_bytes()
            );
            assert!(get(&o, OPTION_DNS_SERVERS).is_none());
        }
        assert!(reply(
            &cfg,
            &msg(
                REBIND,
                &[
                    (OPTION_CLIENTID, DUID),
                    (OPTION_SERVERID, &ours()),
                    (OPTION_IA_NA, &own)
                ]
            )
        )
        .is_none());
        // RENEW, RELEASE and DECLINE must name this server.
        for k in [RENEW, RELEASE, DECLINE] {
            assert!(reply(
                &cfg,
                &msg(k, &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, &own)])
            )
            .is_none());
        }
    }

    #[test]
    fn a_confirm_is_answered_from_the_prefix() {
        let cfg = NetConfig::default();
        let confirm = |ia: &[u8]| {
            reply(
                &cfg,
                &msg(CONFIRM, &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, ia)]),
            )
        };
        let status = |r: Vec<u8>| {
            let (_, o) = parsed(&r);
            u16::from_be_bytes(
                get(&o, OPTION_STATUS_CODE).unwrap()[..2]
                    .try_into()
                    .unwrap(),
            )
        };
        assert_eq!(
            status(confirm(&iaaddr("fd46:6572:7279::99")).unwrap()),
            SUCCESS
        );
        assert_eq!(
            status(confirm(&iaaddr("2001:db8::99")).unwrap()),
            NOT_ON_LINK
        );
        assert!(confirm(IA_NA).is_none(), "nothing to confirm");
    }

    #[test]
    fn messages_for_another_server_and_malformed_ones_get_nothing() {
        let cfg = NetConfig::default();
        let other: &[u8] = &[0, 3, 0, 1, 1, 2, 3, 4, 5, 6];
        for kind in [INFORMATION_REQUEST, REQUEST, RENEW, RELEASE] {
            assert!(
                reply(
                    &cfg,
                    &msg(kind, &[(OPTION_CLIENTID, DUID), (OPTION_SERVERID, other)])
                )
                .is_none(),
                "{kind}"
            );
        }
        // Server and relay messages.
        for kind in [ADVERTISE, REPLY, 10, 12, 13, 0, 255] {
            assert!(reply(&cfg, &msg(kind, &[(OPTION_CLIENTID, DUID)])).is_none());
        }
        assert!(reply(&cfg, &[]).is_none());
        assert!(reply(&cfg, &[11, 0, 0]).is_none());
        assert!(
            reply(&cfg, &[11, 0, 0, 0, 0, 1, 0, 9, 1]).is_none(),
            "an option overruns"
        );
        assert!(reply(&cfg, &[11, 0, 0, 0, 0, 1]).is_none(), "half a header");
        assert!(
            reply(&cfg, &msg(SOLICIT, &[(OPTION_CLIENTID, &[0])])).is_none(),
            "a client id too short"
        );
        assert!(
            reply(
                &cfg,
                &msg(
                    SOLICIT,
                    &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, &[0, 0, 0, 1])]
                )
            )
            .is_none(),
            "an IA_NA without T1 and T2"
        );
        let mut bad_inner = IA_NA.to_vec();
        bad_inner.extend_from_slice(&[0, 5, 0, 30, 1, 2]);
        assert!(
            reply(
                &cfg,
                &msg(
                    SOLICIT,
                    &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, &bad_inner)]
                )
            )
            .is_none(),
            "an option inside the IA overruns it"
        );
        let mut short_addr = IA_NA.to_vec();
        push_option(&mut short_addr, OPTION_IAADDR, &[0xfd; 20]);
        assert!(
            reply(
                &cfg,
                &msg(
                    CONFIRM,
                    &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, &short_addr)]
                )
            )
            .is_none(),
            "an address option too short for its address"
        );
        let many: Vec<(u16, &[u8])> = (0..100).map(|_| (99, &[][..])).collect();
        assert!(reply(&cfg, &msg(INFORMATION_REQUEST, &many)).is_none());
        let off = NetConfig {
            subnet6: None,
            ..NetConfig::default()
        };
        assert!(reply(&off, &msg(INFORMATION_REQUEST, &[])).is_none());
    }

    #[test]
    fn random_bytes_never_panic() {
        let cfg = NetConfig::default();
        let ia = iaaddr("fd46:6572:7279::5");
        let seeds = [
            msg(
                SOLICIT,
                &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, &ia), (6, &[0, 23])],
            ),
            msg(
                RENEW,
                &[
                    (OPTION_CLIENTID, DUID),
                    (OPTION_SERVERID, &ours()),
                    (OPTION_IA_PD, IA_NA),
                ],
            ),
            msg(
                CONFIRM,
                &[(OPTION_CLIENTID, DUID), (OPTION_IA_TA, &ia[8..])],
            ),
            msg(INFORMATION_REQUEST, &[(OPTION_CLIENTID, DUID)]),
        ];
        let mut x: u64 = 0xdead_beef_cafe_f00d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut answered = 0;
        for i in 0..50_000usize {
            let mut m = seeds[i % seeds.len()].clone();
            for _ in 0..1 + next() % 3 {
                let r = next();
                let at = (r as usize) % m.len();
                m[at] = (r >> 40) as u8;
            }
            m.truncate((next() as usize) % (m.len() + 1));
            if reply(&cfg, &m).is_some() {
                answered += 1;
            }
            let noise: Vec<u8> = (0..next() % 200).map(|_| next() as u8).collect();
            let _ = reply(&cfg, &noise);
        }
        // The mutations leave some messages valid: the answering paths ran too.
        assert!(answered > 100, "{answered}");
    }
}
