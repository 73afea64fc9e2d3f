//! The DNS server on the gateway: the names of the network plan are answered here (A, and AAAA
//! when the guest has IPv6); other names go upstream or get SERVFAIL at once.
//!
//! Theory of operation. The plan's names (`gateway.ferry.internal`, `host.ferry.internal` and
//! Docker Desktop's `*.docker.internal` equivalents) name addresses that exist only on the
//! guest's link, so no upstream server could answer them: they are answered here, with the
//! address of each family the guest has. A name has an AAAA record exactly when the guest
//! has IPv6 (the mirror address, `prefix::1` or `prefix::fe`); with IPv6 off an AAAA query
//! gets an empty NOERROR answer, which says "the name exists, with no IPv6 address", so a
//! resolver asking both families uses the A record at once instead of failing or waiting.
//!
//! Ferry is the authority for `ferry.internal`: its negative answers there (a name that does
//! not exist, or one without the type asked) carry the zone's SOA, so resolvers cache them
//! (RFC 2308) instead of asking again for every short name their search list tries first.
//!
//! Queries come from the guest and are treated as hostile: every length is checked, names are
//! read without following compression pointers (a question never needs them), and anything
//! malformed gets no answer rather than a guess.

use std::net::{IpAddr, Ipv4Addr};

use crate::NetConfig;

/// The DNS port.
pub const PORT: u16 = 53;
const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SOA: u16 = 6;
const CLASS_IN: u16 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
/// TTL of local answers: short, since the plan can change with `--subnet` on restart.
const TTL: u32 = 60;
/// Longest name on the wire.
const MAX_NAME: usize = 255;
/// The UDP payload size the gateway's own answers offer with EDNS (DNS flag day 2020's).
const EDNS_PAYLOAD: u16 = 1232;

/// One question, as parsed from a query.
#[derive(Debug, PartialEq, Eq)]
pub struct Question {
    /// The name, lowercase, dot-separated, no trailing dot.
    pub name: String,
    /// The query type.
    pub qtype: u16,
    /// The query class.
    pub qclass: u16,
    /// Where the question ends in the query (the answer section starts there).
    end: usize,
    /// The query offers EDNS (an OPT record follows the question, RFC 6891).
    edns: bool,
}

/// The question of a standard query with exactly one question; `None` for anything else.
pub fn parse_query(q: &[u8]) -> Option<Question> {
    if q.len() < HEADER {
        return None;
    }
    let flags = u16::from_be_bytes([q[2], q[3]]);
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let qdcount = u16::from_be_bytes([q[4], q[5]]);
    if is_response || opcode != 0 || qdcount != 1 {
        return None;
    }
    let mut pos = HEADER;
    let mut name = String::new();
    loop {
        let len = *q.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        // Compression pointers and the reserved label types never appear in a question.
        if len & 0xc0 != 0 {
            return None;
        }
        let label = q.get(pos..pos + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            name.push(b.to_ascii_lowercase() as char);
        }
        if name.len() > MAX_NAME {
            return None;
        }
        pos += len;
    }
    let qtype = u16::from_be_bytes([*q.get(pos)?, *q.get(pos + 1)?]);
    let qclass = u16::from_be_bytes([*q.get(pos + 2)?, *q.get(pos + 3)?]);
    // A query's only additional record, when it has one, is its OPT: the root name (0), then
    // type 41.
    let arcount = u16::from_be_bytes([q[10], q[11]]);
    let edns = arcount == 1 && q.get(pos + 4..pos + 7) == Some(&[0, 0, 41][..]);
    Some(Question {
        name,
        qtype,
        qclass,
        end: pos + 4,
        edns,
    })
}

/// The address of a name the gateway answers itself, if it is one.
pub fn local_name(cfg: &NetConfig, name: &str) -> Option<Ipv4Addr> {
    match name {
        // http.docker.internal names the HTTP proxy (port 3128), which is the gateway's.
        "gateway.ferry.internal" | "gateway.docker.internal" | "http.docker.internal" => {
            Some(cfg.gateway())
        }
        // kubernetes.docker.internal is Docker Desktop's name for the host's Kubernetes API
        // endpoint (its kubeconfig's server): the host, as from the host itself.
        "host.ferry.internal" | "host.docker.internal" | "kubernetes.docker.internal" => {
            Some(cfg.host_alias())
        }
        _ => None,
    }
}

/// The IPv6 address of a name the gateway answers itself, if it is one and IPv6 is on: the
/// gateway's names get [`NetConfig::gateway6`], the host alias's [`NetConfig::host_alias6`].
pub fn local_name6(cfg: &NetConfig, name: &str) -> Option<std::net::Ipv6Addr> {
    cfg.subnet6?;
    // One table of names, in local_name: each IPv4 address has its IPv6 mirror.
    let v4 = local_name(cfg, name)?;
    Some(if v4 == cfg.gateway() {
        cfg.gateway6()
    } else {
        cfg.host_alias6()
    })
}

/// The SOA record of `ferry.internal` (RFC 1035 3.3.13): the gateway as primary server, the
/// TTL of local answers as the time a resolver keeps a negative answer (RFC 2308 5).
fn soa_record() -> Vec<u8> {
    const APEX: &[u8] = b"\x05ferry\x08internal\x00";
    let mut rdata = b"\x07gateway".to_vec();
    rdata.extend_from_slice(APEX);
    rdata.extend_from_slice(b"\x0ahostmaster");
    rdata.extend_from_slice(APEX);
    // Serial, refresh, retry, expire, minimum.
    for v in [1u32, 3600, 600, 86400, TTL] {
        rdata.extend_from_slice(&v.to_be_bytes());
    }
    let mut r = APEX.to_vec();
    r.extend_from_slice(&TYPE_SOA.to_be_bytes());
    r.extend_from_slice(&CLASS_IN.to_be_bytes());
    r.extend_from_slice(&TTL.to_be_bytes());
    r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    r.extend_from_slice(&rdata);
    r
}

/// A response to `query` (whose question is `q`) with `rcode` and the given A and AAAA
/// records, for a name of ferry's own zone (`ferry.internal`) when `zone`: then ferry is the
/// authority, and an answer with no records (NXDOMAIN, or a name without the type asked)
/// carries the zone's SOA, so a resolver caches it (RFC 2308) rather than ask again for every
/// short name its search list tries first.
fn response(query: &[u8], q: &Question, rcode: u8, answers: &[IpAddr], zone: bool) -> Vec<u8> {
    let mut r = Vec::with_capacity(q.end + 80 + 28 * answers.len());
    r.extend_from_slice(&query[0..2]);
    // QR, the query's opcode (0) and RD, RA, and the rcode.
    let rd = query[2] & 0x01;
    // AA: the names answered here are ours to answer.
    let aa = if zone || (rcode == 0 && !answers.is_empty()) {
        0x04
    } else {
        0
    };
    // The apex's own SOA, asked for: the answer; any other empty answer of the zone: the
    // SOA as authority.
    let soa_asked = zone && q.name == "ferry.internal" && q.qtype == TYPE_SOA && rcode == 0;
    let soa_authority = zone && answers.is_empty() && !soa_asked;
    r.push(0x80 | aa | rd);
    r.push(0x80 | rcode);
    r.extend_from_slice(&1u16.to_be_bytes());
    let count = answers.len() + usize::from(soa_asked);
    r.extend_from_slice(&(count as u16).to_be_bytes());
    r.extend_from_slice(&u16::from(soa_authority).to_be_bytes());
    r.extend_from_slice(&u16::from(q.edns).to_be_bytes());
    r.extend_from_slice(&query[HEADER..q.end]);
    if soa_asked {
        r.extend_from_slice(&soa_record());
    }
    for ip in answers {
        r.extend_from_slice(&[0xc0, HEADER as u8]);
        let (ty, data) = match ip {
            IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
            IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
        };
        r.extend_from_slice(&ty.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&TTL.to_be_bytes());
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(&data);
    }
    if soa_authority {
        r.extend_from_slice(&soa_record());
    }
    if q.edns {
        // Our own OPT, as an EDNS responder answers one (RFC 6891 7): a resolver that finds
        // none takes the server for one without EDNS and falls back to 512-byte answers
        // (systemd-resolved's "degraded feature set"). Root name, type 41, our UDP payload
        // size as class, extended rcode and flags 0, no options.
        r.extend_from_slice(&[0, 0, 41]);
        r.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    r
}

/// The answer the gateway gives itself: for the plan's names (A, AAAA with IPv6 on, and an
/// empty answer for any other type), or SERVFAIL for everything else when there is no
/// upstream to ask. `None` for a query that gets no answer at all (malformed).
pub fn answer(cfg: &NetConfig, query: &[u8], have_upstream: bool) -> Option<Answer> {
    answer_with(cfg, query, have_upstream, |_| None)
}

/// [`answer`], with `names` asked before the query goes upstream (records set at run time,
/// the host's hosts file): a name it knows gets its addresses of the asked type.
pub fn answer_with(
    cfg: &NetConfig,
    query: &[u8],
    have_upstream: bool,
    names: impl FnOnce(&str) -> Option<Vec<IpAddr>>,
) -> Option<Answer> {
    let q = parse_query(query)?;
    let of_type = |addrs: &[IpAddr]| -> Vec<IpAddr> {
        addrs
            .iter()
            .copied()
            .filter(|a| {
                matches!(
                    (q.qtype, q.qclass, a),
                    (TYPE_A, CLASS_IN, IpAddr::V4(_)) | (TYPE_AAAA, CLASS_IN, IpAddr::V6(_))
                )
            })
            .collect()
    };
    let zone = q.name == "ferry.internal" || q.name.ends_with(".ferry.internal");
    if let Some(ip) = local_name(cfg, &q.name) {
        let mut addrs = vec![IpAddr::V4(ip)];
        addrs.extend(local_name6(cfg, &q.name).map(IpAddr::V6));
        let r = response(query, &q, 0, &of_type(&addrs), zone);
        return Some(Answer::Local(r));
    }
    // The zone's apex exists (it has names below it), with no records to give but its SOA:
    // NXDOMAIN there would tell a resolver that nothing below exists either (RFC 8020), and a
    // validating one asks for the apex's DS or SOA. Other names under it do not exist.
    if q.name == "ferry.internal" {
        return Some(Answer::Local(response(query, &q, 0, &[], true)));
    }
    if zone {
        return Some(Answer::Local(response(
            query,
            &q,
            RCODE_NXDOMAIN,
            &[],
            true,
        )));
    }
    if let Some(addrs) = names(&q.name) {
        return Some(Answer::Local(response(
            query,
            &q,
            0,
            &of_type(&addrs),
            false,
        )));
    }
    if !have_upstream {
        return Some(Answer::Local(response(
            query,
            &q,
            RCODE_SERVFAIL,
            &[],
            false,
        )));
    }
    Some(Answer::Forward)
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send this response.
    Local(Vec<u8>),
    /// Ask the upstream server and return its answer unchanged.
    Forward,
}

/// The first nameserver in `resolv_conf` (the text of /etc/resolv.conf), port 53.
pub fn upstream_from_resolv_conf(resolv_conf: &str) -> Option<std::net::SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, PORT))
        .next()
}

/// `name` as a query for `qtype`, for tests and tools.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// AAAA, for callers that build queries.
pub const QTYPE_AAAA: u16 = TYPE_AAAA;
/// A, for callers that build queries.
pub const QTYPE_A: u16 = TYPE_A;

#[cfg(test)]
mod tests {
    use super::*;

    fn local(a: Option<Answer>) -> Vec<u8> {
        match a {
            Some(Answer::Local(v)) => v,
            other => panic!("expected a local answer, got {other:?}"),
        }
    }

    #[test]
    fn plan_names_get_a_and_aaaa_records() {
        let cfg = NetConfig::default();
        for (name, ip, ip6) in [
            (
                "host.ferry.internal",
                [192, 168, 127, 254],
                cfg.host_alias6(),
            ),
            (
                "HOST.docker.internal",
                [192, 168, 127, 254],
                cfg.host_alias6(),
            ),
            ("gateway.ferry.internal", [192, 168, 127, 1], cfg.gateway6()),
            ("http.docker.internal", [192, 168, 127, 1], cfg.gateway6()),
        ] {
            let r = local(answer(&cfg, &query(0x4242, name, TYPE_A), false));
            assert_eq!(&r[0..2], &[0x42, 0x42]);
            assert_eq!(r[3] & 0x0f, 0, "{name}: rcode");
            assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "{name}: one answer");
            assert_eq!(&r[r.len() - 4..], &ip, "{name}");
            let r = local(answer(&cfg, &query(1, name, TYPE_AAAA), false));
            assert_eq!((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])), (0, 1));
            assert_eq!(&r[r.len() - 16..], &ip6.octets(), "{name}: AAAA");
            // Without IPv6, an empty answer: the name exists, with no IPv6 address.
            let v4only = NetConfig {
                subnet6: None,
                ..cfg.clone()
            };
            let r = local(answer(&v4only, &query(1, name, TYPE_AAAA), false));
            assert_eq!((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])), (0, 0));
        }
    }

    #[test]
    fn local_names_mirror_into_ipv6_only_with_ipv6_on() {
        let cfg = NetConfig::default();
        for (name, v6) in [
            ("gateway.ferry.internal", Some(cfg.gateway6())),
            ("gateway.docker.internal", Some(cfg.gateway6())),
            ("http.docker.internal", Some(cfg.gateway6())),
            ("host.ferry.internal", Some(cfg.host_alias6())),
            ("host.docker.internal", Some(cfg.host_alias6())),
            ("kubernetes.docker.internal", Some(cfg.host_alias6())),
            ("example.test", None),
            ("ferry.internal", None),
        ] {
            assert_eq!(local_name6(&cfg, name), v6, "{name}");
        }
        let off = NetConfig {
            subnet6: None,
            ..cfg.clone()
        };
        assert_eq!(local_name6(&off, "host.ferry.internal"), None);
        assert_eq!(
            local_name(&off, "host.ferry.internal"),
            Some(cfg.host_alias())
        );
        // Another type (MX) for a local name: an empty NOERROR answer.
        let r = local(answer(&cfg, &query(3, "host.ferry.internal", 15), false));
        assert_eq!((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])), (0, 0));
    }

    #[test]
    fn other_names_servfail_without_upstream_and_forward_with_one() {
        let cfg = NetConfig::default();
        let r = local(answer(&cfg, &query(7, "example.test", TYPE_A), false));
        assert_eq!(r[3] & 0x0f, RCODE_SERVFAIL);
        assert_eq!(
            answer(&cfg, &query(7, "example.test", TYPE_A), true),
            Some(Answer::Forward)
        );
        let r = local(answer(&cfg, &query(7, "nope.ferry.internal", TYPE_A), true));
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        // The apex, whatever the type (DS, A): there, with nothing to give but its SOA (which
        // is the answer when asked for).
        for (qtype, answers) in [(43, 0), (TYPE_A, 0), (TYPE_SOA, 1)] {
            let r = local(answer(&cfg, &query(7, "Ferry.Internal", qtype), true));
            assert_eq!(
                (r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])),
                (0, answers),
                "{qtype}"
            );
        }
    }

    #[test]
    fn a_query_with_edns_gets_an_opt_back() {
        let cfg = NetConfig::default();
        let mut q = query(9, "host.ferry.internal", TYPE_A);
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0]);
        let r = local(answer(&cfg, &q, false));
        assert_eq!(
            u16::from_be_bytes([r[10], r[11]]),
            1,
            "one additional record"
        );
        assert_eq!(
            &r[r.len() - 11..],
            &[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "and the answer");
        // Without EDNS, none.
        let r = local(answer(
            &cfg,
            &query(9, "host.ferry.internal", TYPE_A),
            false,
        ));
        assert_eq!(u16::from_be_bytes([r[10], r[11]]), 0);
    }

    /// (answer count, authority count, additional count) of response `r`.
    fn counts(r: &[u8]) -> (u16, u16, u16) {
        let at = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
        (at(6), at(8), at(10))
    }

    #[test]
    fn negative_answers_of_ferrys_zone_carry_its_soa() {
        let cfg = NetConfig::default();
        let soa = soa_record();
        // NXDOMAIN below the apex: authoritative, the SOA as authority, its minimum the TTL.
        let r = local(answer(
            &cfg,
            &query(1, "nobody.ferry.internal", TYPE_A),
            true,
        ));
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        assert_ne!(r[2] & 0x04, 0, "AA");
        assert_eq!(counts(&r), (0, 1, 0));
        assert!(r.ends_with(&soa));
        assert_eq!(&soa[soa.len() - 4..], &TTL.to_be_bytes(), "negative TTL");
        assert_eq!(&soa[..16], b"\x05ferry\x08internal\x00");
        // A name of the zone without the type asked (AAAA with IPv6 off): NODATA, the SOA.
        let v4only = NetConfig {
            subnet6: None,
            ..NetConfig::default()
        };
        let r = local(answer(
            &v4only,
            &query(2, "gateway.ferry.internal", TYPE_AAAA),
            true,
        ));
        assert_eq!((r[3] & 0x0f, counts(&r)), (0, (0, 1, 0)));
        assert!(r.ends_with(&soa));
        // The apex: its SOA as the answer when asked, as authority otherwise.
        let r = local(answer(&cfg, &query(3, "ferry.internal", TYPE_SOA), true));
        assert_eq!((r[3] & 0x0f, counts(&r)), (0, (1, 0, 0)));
        assert!(r.ends_with(&soa));
        let r = local(answer(&cfg, &query(4, "ferry.internal", TYPE_A), true));
        assert_eq!(counts(&r), (0, 1, 0));
        // With EDNS the OPT still comes last; an answer with records has no SOA.
        let mut q = query(5, "nobody.ferry.internal", TYPE_A);
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0]);
        let r = local(answer(&cfg, &q, true));
        assert_eq!(counts(&r), (0, 1, 1));
        assert_eq!(r[r.len() - 11..r.len() - 8], [0, 0, 41]);
        let r = local(answer(&cfg, &query(6, "host.ferry.internal", TYPE_A), true));
        assert_eq!(counts(&r), (1, 0, 0));
        // Docker's names are not ferry's zone: no SOA of it.
        let r = local(answer(
            &v4only,
            &query(7, "host.docker.internal", TYPE_AAAA),
            true,
        ));
        assert_eq!(counts(&r), (0, 0, 0));
    }

    #[test]
    fn upstream_is_the_first_nameserver() {
        let conf = "# comment\nsearch example\nnameserver bogus\nnameserver 10.1.2.3\nnameserver 10.9.9.9\n";
        assert_eq!(
            upstream_from_resolv_conf(conf),
            Some("10.1.2.3:53".parse().unwrap())
        );
        assert_eq!(upstream_from_resolv_conf(""), None);
    }

    #[test]
    fn malformed_queries_get_no_answer() {
        let cfg = NetConfig::default();
        let good = query(1, "host.ferry.internal", TYPE_A);
        for bad in [
            vec![],
            good[..11].to_vec(),
            good[..good.len() - 1].to_vec(),
            {
                let mut v = good.clone();
                v[12] = 0xc0; // a compression pointer in the question
                v
            },
            {
                let mut v = good.clone();
                v[2] |= 0x80; // a response, not a query
                v
            },
            {
                let mut v = good.clone();
                v[5] = 2; // two questions
                v
            },
            {
                let mut v = good.clone();
                v[12] = 60; // a label longer than the packet
                v
            },
        ] {
            assert_eq!(answer(&cfg, &bad, false), None, "{bad:?}");
        }
    }
}
