//! A stateless DHCPv6 server (RFC 8415, the part RFC 3736 describes): DNS servers and the
//! search list for guests that ask DHCPv6 rather than read them from router advertisements.
//!
//! Theory of operation. Addresses come from SLAAC (the router advertisement says so: its
//! managed flag is off, its other-configuration flag on), so this server hands out none. An
//! INFORMATION-REQUEST gets a REPLY with the gateway as DNS server and `ferry.internal` as
//! search list. A client that wants an address anyway (a SOLICIT or REQUEST with an IA_NA, as
//! some stateful-only clients send) gets the same options with the IA_NA's status NoAddrsAvail,
//! so it stops asking and keeps its SLAAC address. RENEW and REBIND of leases this server never
//! gave get NoBinding. Messages for another server (a SERVERID that is not ours) and anything
//! malformed get no answer: every option is bounds-checked, none is trusted.

use crate::{dhcp, NetConfig, GATEWAY_MAC};

/// The port DHCPv6 servers listen on, and the one clients do.
pub const SERVER_PORT: u16 = 547;
pub const CLIENT_PORT: u16 = 546;

// Message types.
const SOLICIT: u8 = 1;
const ADVERTISE: u8 = 2;
const REQUEST: u8 = 3;
const CONFIRM: u8 = 4;
const RENEW: u8 = 5;
const REBIND: u8 = 6;
const REPLY: u8 = 7;
const INFORMATION_REQUEST: u8 = 11;

// Options.
const OPTION_CLIENTID: u16 = 1;
const OPTION_SERVERID: u16 = 2;
const OPTION_IA_NA: u16 = 3;
const OPTION_STATUS_CODE: u16 = 13;
const OPTION_DNS_SERVERS: u16 = 23;
const OPTION_DOMAIN_LIST: u16 = 24;

// Status codes.
const NO_ADDRS_AVAIL: u16 = 2;
const NO_BINDING: u16 = 3;
const NOT_ON_LINK: u16 = 4;

/// Longest client id kept (RFC 8415 caps DUIDs at 128 octets plus the type).
const MAX_DUID: usize = 130;

/// Ferry's DUID: DUID-LL (type 3) of hardware type Ethernet (1) and the gateway's MAC.
fn server_duid() -> Vec<u8> {
    let mut d = vec![0, 3, 0, 1];
    d.extend_from_slice(&GATEWAY_MAC);
    d
}

/// The options of a message body, as (code, data), or None if one overruns the message.
fn options(mut b: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let code = u16::from_be_bytes([*b.first()?, *b.get(1)?]);
        let len = usize::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]));
        let data = b.get(4..4 + len)?;
        out.push((code, data));
        b = &b[4 + len..];
        if out.len() > 64 {
            return None;
        }
    }
    Some(out)
}

fn push_option(out: &mut Vec<u8>, code: u16, data: &[u8]) {
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// A status code option's data.
fn status(code: u16, text: &str) -> Vec<u8> {
    let mut d = code.to_be_bytes().to_vec();
    d.extend_from_slice(text.as_bytes());
    d
}

/// The answer to the DHCPv6 message `request` (a UDP payload from a client), or None when it
/// gets none.
pub fn reply(cfg: &NetConfig, request: &[u8]) -> Option<Vec<u8>> {
    cfg.subnet6?;
    let kind = *request.first()?;
    let xid = request.get(1..4)?;
    let opts = options(request.get(4..)?)?;
    let find = |code: u16| opts.iter().find(|(c, _)| *c == code).map(|(_, d)| *d);
    let client_id = find(OPTION_CLIENTID).filter(|d| (2..=MAX_DUID).contains(&d.len()));
    if let Some(server) = find(OPTION_SERVERID) {
        if server != server_duid().as_slice() {
            return None; // for another server
        }
    }
    let ia_na = find(OPTION_IA_NA).filter(|d| d.len() >= 12);
    let (answer_type, ia_status) = match kind {
        INFORMATION_REQUEST => (REPLY, None),
        // RFC 8415 18.3.1: a SOLICIT must carry a client id.
        SOLICIT => (ADVERTISE, Some(NO_ADDRS_AVAIL)),
        REQUEST => (REPLY, Some(NO_ADDRS_AVAIL)),
        RENEW | REBIND => (REPLY, Some(NO_BINDING)),
        // No address of the client's is on this link but the ones SLAAC gives it: a CONFIRM
        // of any other is not on link; one with no IA has nothing to confirm.
        CONFIRM => (REPLY, Some(NOT_ON_LINK)),
        _ => return None,
    };
    if kind != INFORMATION_REQUEST && client_id.is_none() {
        return None;
    }
    let mut out = Vec::with_capacity(128);
    out.push(answer_type);
    out.extend_from_slice(xid);
    if let Some(id) = client_id {
        push_option(&mut out, OPTION_CLIENTID, id);
    }
    push_option(&mut out, OPTION_SERVERID, &server_duid());
    match (ia_status, ia_na) {
        (Some(code), Some(ia)) if kind != CONFIRM => {
            // The client's IAID, T1 and T2 zero, and the status inside the IA.
            let mut d = ia[..4].to_vec();
            d.extend_from_slice(&[0; 8]);
            let text = if code == NO_ADDRS_AVAIL {
                "addresses come from SLAAC"
            } else {
                "no such lease"
            };
            push_option(&mut d, OPTION_STATUS_CODE, &status(code, text));
            push_option(&mut out, OPTION_IA_NA, &d);
        }
        (Some(code), _) if kind == CONFIRM => {
            push_option(
                &mut out,
                OPTION_STATUS_CODE,
                &status(code, "addresses come from SLAAC"),
            );
        }
        (Some(code), None) if kind == SOLICIT || kind == REQUEST => {
            push_option(
                &mut out,
                OPTION_STATUS_CODE,
                &status(code, "addresses come from SLAAC"),
            );
        }
        _ => {}
    }
    // The DNS options always: a client that asked for neither gets them too, harmlessly.
    push_option(&mut out, OPTION_DNS_SERVERS, &cfg.gateway6().octets());
    push_option(&mut out, OPTION_DOMAIN_LIST, &dhcp::search_list(cfg, 1024));
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

    const DUID: &[u8] = &[0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn an_information_request_gets_dns_and_the_search_list() {
        let cfg = NetConfig::default();
        let r = reply(
            &cfg,
            &msg(
                INFORMATION_REQUEST,
                &[(OPTION_CLIENTID, DUID), (6, &[0, 23, 0, 24])],
            ),
        )
        .unwrap();
        assert_eq!(&r[..4], &[REPLY, 0xab, 0xcd, 0xef]);
        let o = options(&r[4..]).unwrap();
        let get = |c| o.iter().find(|(k, _)| *k == c).map(|(_, d)| d.to_vec());
        assert_eq!(get(OPTION_CLIENTID).unwrap(), DUID);
        assert_eq!(get(OPTION_SERVERID).unwrap(), server_duid());
        assert_eq!(get(OPTION_DNS_SERVERS).unwrap(), cfg.gateway6().octets());
        assert_eq!(
            get(OPTION_DOMAIN_LIST).unwrap(),
            b"\x05ferry\x08internal\x00"
        );
        assert!(get(OPTION_IA_NA).is_none());
    }

    #[test]
    fn a_stateful_solicit_hears_that_addresses_come_from_slaac() {
        let cfg = NetConfig::default();
        let ia = [0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0];
        let r = reply(
            &cfg,
            &msg(SOLICIT, &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, &ia)]),
        )
        .unwrap();
        assert_eq!(r[0], ADVERTISE);
        let o = options(&r[4..]).unwrap();
        let ia = o.iter().find(|(k, _)| *k == OPTION_IA_NA).unwrap().1;
        assert_eq!(&ia[..4], &[0, 0, 0, 9]);
        let inner = options(&ia[12..]).unwrap();
        assert_eq!(inner[0].0, OPTION_STATUS_CODE);
        assert_eq!(&inner[0].1[..2], &NO_ADDRS_AVAIL.to_be_bytes());
        // A SOLICIT without a client id gets nothing.
        assert!(reply(&cfg, &msg(SOLICIT, &[(OPTION_IA_NA, ia)])).is_none());
    }

    #[test]
    fn messages_for_another_server_and_malformed_ones_get_nothing() {
        let cfg = NetConfig::default();
        assert!(reply(
            &cfg,
            &msg(
                REQUEST,
                &[
                    (OPTION_CLIENTID, DUID),
                    (OPTION_SERVERID, &[0, 3, 0, 1, 1, 2, 3, 4, 5, 6])
                ]
            )
        )
        .is_none());
        assert!(reply(&cfg, &msg(ADVERTISE, &[(OPTION_CLIENTID, DUID)])).is_none());
        assert!(reply(&cfg, &[11, 0, 0]).is_none());
        assert!(
            reply(&cfg, &[11, 0, 0, 0, 0, 1, 0, 9, 1]).is_none(),
            "an option overruns"
        );
        let off = NetConfig {
            subnet6: None,
            ..NetConfig::default()
        };
        assert!(reply(&off, &msg(INFORMATION_REQUEST, &[])).is_none());
        let mut x: u64 = 0xdead_beef_cafe_f00d;
        let seed = msg(
            SOLICIT,
            &[(OPTION_CLIENTID, DUID), (OPTION_IA_NA, &[0; 12])],
        );
        for i in 0..20_000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut m = seed.clone();
            let at = (x as usize) % m.len();
            m[at] = (x >> 40) as u8;
            m.truncate(i % (m.len() + 1));
            let _ = reply(&cfg, &m);
        }
    }
}
