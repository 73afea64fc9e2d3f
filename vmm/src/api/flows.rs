//! `/flows`: the NAT's flow table, live, as `conntrack -L` lists the kernel's: for every flow
//! both of its sides, ferry's host socket as `ss -tnpe` shows it (its descriptor and
//! addresses), what crossed it each way, and the rule that let it through. So the person
//! whose firewall or EDR shows a socket under ferry's PID can tell which guest flow it serves.
//!
//! Filters run here, not in the client: `?proto=tcp|udp|icmp`, `?port=N` (either end's
//! port, the guest's or the remote's), `?remote=ADDR[/LEN]` (the remote as the guest sees it,
//! or where ferry's socket goes).

use std::net::IpAddr;

use serde_json::{json, Value};

use super::{error, no_net, Control};
use ferry_net::stack::FlowInfo;

const HINT: &str = "filters: ?proto=tcp|udp|icmp, ?port=N, ?remote=ADDR[/LEN], joined with &";

/// What a query asks for.
#[derive(Default)]
struct Filter {
    proto: Option<String>,
    port: Option<u16>,
    remote: Option<(IpAddr, u8)>,
}

/// `%XX` escapes decoded (an IPv6 address's colons may come escaped).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse(query: &str) -> Result<Filter, String> {
    let mut f = Filter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = unescape(v);
        match k {
            "proto" => match v.as_str() {
                "tcp" | "udp" | "icmp" => f.proto = Some(v),
                _ => return Err(format!("proto={v}: give tcp, udp or icmp")),
            },
            "port" => {
                f.port = Some(
                    v.parse()
                        .map_err(|_| format!("port={v}: give a port number"))?,
                )
            }
            "remote" => {
                let (a, len) = v.split_once('/').unwrap_or((&v, ""));
                let ip: IpAddr = a
                    .trim_matches(['[', ']'])
                    .parse()
                    .map_err(|_| format!("remote={v}: give an IP address or ADDR/LEN"))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let len = if len.is_empty() {
                    max
                } else {
                    len.parse::<u8>()
                        .ok()
                        .filter(|l| *l <= max)
                        .ok_or_else(|| format!("remote={v}: the prefix length is 0 to {max}"))?
                };
                f.remote = Some((ip, len));
            }
            _ => return Err(format!("unknown filter {k:?}")),
        }
    }
    Ok(f)
}

fn in_net(a: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    match (a, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false,
    }
}

impl Filter {
    fn keeps(&self, f: &FlowInfo) -> bool {
        if let Some(p) = &self.proto {
            if !f.protocol.starts_with(p.as_str()) {
                return false;
            }
        }
        if let Some(p) = self.port {
            let icmp = f.protocol.starts_with("icmp");
            if icmp || (f.guest.port() != p && f.remote.port() != p) {
                return false;
            }
        }
        if let Some(net) = self.remote {
            let peer = f.host_peer.as_deref().and_then(|p| {
                p.parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|a| a.ip())
                    .or_else(|| p.parse().ok())
            });
            if !in_net(f.remote.ip(), net) && !peer.is_some_and(|p| in_net(p, net)) {
                return false;
            }
        }
        true
    }
}

fn flow_json(f: &FlowInfo, rule: Value) -> Value {
    json!({
        "proto": f.protocol,
        "origin": f.origin.name(),
        "direction": if f.origin.inbound() { "in" } else { "out" },
        "guest": f.guest.to_string(),
        "remote": f.remote.to_string(),
        "host": {
            "fd": f.fd,
            "local": f.host_local,
            "peer": f.host_peer,
        },
        "state": f.state,
        "to_guest": {"bytes": f.to_guest.bytes, "packets": f.to_guest.packets},
        "from_guest": {"bytes": f.from_guest.bytes, "packets": f.from_guest.packets},
        "age_secs": f.age.as_secs_f64(),
        "idle_secs": f.idle.as_secs_f64(),
        "rule": rule,
    })
}

/// GET /flows[?filters].
pub(super) fn list(control: &Control, query: &str) -> (u16, Value) {
    let Some(net) = &control.net else {
        return no_net("flows");
    };
    let filter = match parse(query) {
        Ok(f) => f,
        Err(e) => return error(400, e, HINT),
    };
    let flows = net.flows();
    let rows = flows
        .iter()
        .filter(|f| filter.keeps(f))
        .map(|f| {
            let rule = match (&f.counters, &control.rules) {
                (Some(c), Some(r)) => match r.rule_of(c) {
                    Some(id) => json!(id),
                    None => json!("default"),
                },
                _ => Value::Null,
            };
            flow_json(f, rule)
        })
        .collect();
    (200, Value::Array(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filters_and_says_what_is_wrong() {
        let f = parse("proto=tcp&port=443&remote=fd00%3A%3A1").unwrap();
        assert_eq!(f.proto.as_deref(), Some("tcp"));
        assert_eq!(f.port, Some(443));
        assert_eq!(f.remote, Some(("fd00::1".parse().unwrap(), 128)));
        let f = parse("remote=10.0.0.0/8").unwrap();
        assert!(in_net("10.9.8.7".parse().unwrap(), f.remote.unwrap()));
        assert!(!in_net("11.0.0.1".parse().unwrap(), f.remote.unwrap()));
        for (bad, says) in [
            ("proto=sctp", "tcp, udp or icmp"),
            ("port=http", "port number"),
            ("remote=host", "IP address"),
            ("remote=10.0.0.0/40", "0 to 32"),
            ("colour=red", "unknown filter"),
        ] {
            let e = parse(bad).err().unwrap();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
