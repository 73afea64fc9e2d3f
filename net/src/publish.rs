//! Port publishing specs: `[tcp|udp/][BIND_IP:]HOST_PORT:GUEST_PORT`, as in `docker run -p`,
//! and, as passt takes them, ranges, lists and exclusions in one spec: `8000-8010:9000-9010`
//! (a range onto a range of the same length), `3000,3001,5432` (each to the same port in the
//! guest), `8000-8010,~8005` (all but one).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// A transport protocol that can be published.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Ports one spec publishes at most.
pub const MAX_SPEC_PORTS: usize = 1024;

/// A malformed publish spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--publish {spec}: {reason}; write it as [tcp|udp/][BIND_IP:]HOST_PORT:GUEST_PORT, for example 127.0.0.1:8080:80 (ranges and lists: 8000-8010:9000-9010, 3000,3001,~3002)")]
pub struct PortSpecError {
    spec: String,
    reason: &'static str,
}

/// One published port: host `bind:host_port` forwards to the guest's `guest_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The host address to listen on.
    pub bind: IpAddr,
    /// The host port.
    pub host_port: u16,
    /// The guest port.
    pub guest_port: u16,
}

impl PortSpec {
    /// Parses `s`, binding to `default_bind` when the spec names no address.
    pub fn parse_with_default(s: &str, default_bind: IpAddr) -> Result<Self, PortSpecError> {
        let err = |reason| PortSpecError {
            spec: s.to_string(),
            reason,
        };
        let (protocol, rest, v6) = split_protocol(s).map_err(err)?;
        let (addr, ports) = if let Some((a, ports)) = v6 {
            (Some(a), ports)
        } else {
            match rest.matches(':').count() {
                1 => (None, rest),
                2 => {
                    let (a, p) = rest.split_once(':').unwrap_or_default();
                    (Some(a), p)
                }
                _ => return Err(err("expected HOST_PORT:GUEST_PORT")),
            }
        };
        let bind = match addr {
            Some(a) => a
                .parse::<IpAddr>()
                .map_err(|_| err("the bind address is not an IP address"))?,
            None => default_bind,
        };
        let (h, g) = ports
            .split_once(':')
            .ok_or_else(|| err("expected HOST_PORT:GUEST_PORT"))?;
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err("ports must be numbers from 1 to 65535"))
        };
        Ok(PortSpec {
            protocol,
            bind,
            host_port: port(h)?,
            guest_port: port(g)?,
        })
    }
}

/// A spec's protocol (tcp unless given), the rest, and, when the rest starts with a bracketed
/// IPv6 address, that address and what follows it.
#[allow(clippy::type_complexity)]
fn split_protocol(s: &str) -> Result<(Protocol, &str, Option<(&str, &str)>), &'static str> {
    let (protocol, rest) = match s.split_once('/') {
        Some(("tcp", rest)) => (Protocol::Tcp, rest),
        Some(("udp", rest)) => (Protocol::Udp, rest),
        Some(_) => return Err("the protocol must be tcp or udp"),
        None => (Protocol::Tcp, s),
    };
    let v6 = match rest.strip_prefix('[') {
        Some(v6) => Some(
            v6.split_once("]:")
                .ok_or("an IPv6 bind address needs brackets and ports after it")?,
        ),
        None => None,
    };
    Ok((protocol, rest, v6))
}

/// The ports of `list` (`N`, `N-M`, `~N`, `~N-M`, comma separated: the exclusions taken out
/// of the rest), in order; `None` if malformed.
fn port_list(list: &str) -> Option<Vec<u16>> {
    let mut take = Vec::new();
    let mut leave = Vec::new();
    for item in list.split(',') {
        let (out, item) = match item.strip_prefix('~') {
            Some(i) => (true, i),
            None => (false, item),
        };
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let (a, b): (u16, u16) = (a.parse().ok()?, b.parse().ok()?);
        if a == 0 || b < a || usize::from(b - a) >= MAX_SPEC_PORTS {
            return None;
        }
        let v = if out { &mut leave } else { &mut take };
        v.extend(a..=b);
    }
    take.retain(|p| !leave.contains(p));
    let mut seen = std::collections::HashSet::new();
    take.retain(|p| seen.insert(*p));
    Some(take)
}

impl PortSpec {
    /// Parses a spec that may name ranges, lists and exclusions (see the module), binding to
    /// `default_bind` when it names no address: one `PortSpec` per host port, in order.
    pub fn parse_many_with_default(
        s: &str,
        default_bind: IpAddr,
    ) -> Result<Vec<Self>, PortSpecError> {
        if let Ok(one) = Self::parse_with_default(s, default_bind) {
            return Ok(vec![one]);
        }
        let err = |reason| PortSpecError {
            spec: s.to_string(),
            reason,
        };
        let (protocol, rest, v6) = split_protocol(s).map_err(err)?;
        // [BIND_IP:]HOSTS[:GUESTS]: the part before the first colon is an address if it
        // parses as one (IPv6 in brackets).
        let (bind, ports) = if let Some((a, ports)) = v6 {
            let a = a
                .parse::<IpAddr>()
                .map_err(|_| err("the bind address is not an IP address"))?;
            (a, ports)
        } else {
            match rest.split_once(':') {
                Some((a, ports)) if a.parse::<IpAddr>().is_ok() => {
                    (a.parse().unwrap_or(default_bind), ports)
                }
                _ => (default_bind, rest),
            }
        };
        let (hosts, guests) = match ports.split_once(':') {
            Some((h, g)) => (h, Some(g)),
            None => (ports, None),
        };
        if guests.is_none() && !hosts.contains([',', '-', '~']) {
            // One port alone: Docker would pick a host port for it; ferry wants both.
            return Err(err("expected HOST_PORT:GUEST_PORT"));
        }
        let bad = || {
            err("ports must be numbers from 1 to 65535, ranges N-M, lists N,M and exclusions ~N")
        };
        let hosts = port_list(hosts).ok_or_else(bad)?;
        if hosts.is_empty() {
            return Err(err("the exclusions leave no port"));
        }
        if hosts.len() > MAX_SPEC_PORTS {
            return Err(err("one spec publishes 1024 ports at most"));
        }
        let guest_of: Box<dyn Fn(u16) -> Option<u16>> = match guests {
            None => Box::new(Some),
            Some(g) => {
                let (a, b) = g.split_once('-').unwrap_or((g, g));
                let a: u16 = a.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
                let b: u16 = b.parse().ok().filter(|p| *p >= a).ok_or_else(bad)?;
                // A range onto a range of the same length, port by port from the first.
                let (h0, h1) = (hosts[0], *hosts.iter().max().unwrap_or(&hosts[0]));
                if b - a != h1 - h0 || hosts.iter().any(|p| *p < h0) {
                    return Err(err(
                        "the guest ports must be one range as long as the host range (8000-8010:9000-9010)",
                    ));
                }
                Box::new(move |p| a.checked_add(p - h0))
            }
        };
        hosts
            .into_iter()
            .map(|h| {
                Ok(PortSpec {
                    protocol,
                    bind,
                    host_port: h,
                    guest_port: guest_of(h).ok_or_else(bad)?,
                })
            })
            .collect()
    }
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    /// Parses a spec, binding to 0.0.0.0 when it names no address (Docker's default).
    fn from_str(s: &str) -> Result<Self, PortSpecError> {
        PortSpec::parse_with_default(s, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bind {
            IpAddr::V4(a) => write!(f, "{}/{a}:", self.protocol)?,
            IpAddr::V6(a) => write!(f, "{}/[{a}]:", self.protocol)?,
        }
        write!(f, "{}:{}", self.host_port, self.guest_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_short_forms() {
        let p: PortSpec = "8080:80".parse().unwrap();
        assert_eq!(p.protocol, Protocol::Tcp);
        assert_eq!(p.bind, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!((p.host_port, p.guest_port), (8080, 80));
        let p: PortSpec = "udp/127.0.0.1:5353:53".parse().unwrap();
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(p.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(p.to_string(), "udp/127.0.0.1:5353:53");
        let p: PortSpec = "tcp/[::1]:8443:443".parse().unwrap();
        assert_eq!(p.to_string(), "tcp/[::1]:8443:443");
        let p = PortSpec::parse_with_default("80:80", IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        assert_eq!(p.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn ranges_lists_and_exclusions() {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let many = |s: &str| PortSpec::parse_many_with_default(s, any);
        let pairs = |v: Vec<PortSpec>| -> Vec<(u16, u16)> {
            v.iter().map(|p| (p.host_port, p.guest_port)).collect()
        };
        assert_eq!(pairs(many("8080:80").unwrap()), vec![(8080, 80)]);
        assert_eq!(
            pairs(many("8000-8002:9000-9002").unwrap()),
            vec![(8000, 9000), (8001, 9001), (8002, 9002)]
        );
        assert_eq!(
            pairs(many("3000,3001,5432").unwrap()),
            vec![(3000, 3000), (3001, 3001), (5432, 5432)]
        );
        assert_eq!(
            pairs(many("8000-8003,~8001:9000-9003").unwrap()),
            vec![(8000, 9000), (8002, 9002), (8003, 9003)]
        );
        let v = many("udp/127.0.0.1:5000-5001").unwrap();
        assert_eq!(v[1].to_string(), "udp/127.0.0.1:5001:5001");
        let v = many("[::1]:7000-7001:80-81").unwrap();
        assert_eq!(v[0].to_string(), "tcp/[::1]:7000:80");
        assert_eq!(many("1-1024").unwrap().len(), 1024);
        for (s, why) in [
            ("8000-8010:9000-9005", "as long as the host range"),
            ("8005-8000", "ranges N-M"),
            ("1-2000", "ranges N-M"),
            ("8000,~8000", "leave no port"),
            ("0-5", "ranges N-M"),
            ("x-y", "ranges N-M"),
            ("8000", "HOST_PORT:GUEST_PORT"),
            ("8000-8001:65535-65536", "ranges N-M"),
        ] {
            let e = many(s).unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn bad_specs_say_why() {
        for (s, why) in [
            ("sctp/80:80", "protocol"),
            ("80", "HOST_PORT:GUEST_PORT"),
            ("0:80", "1 to 65535"),
            ("70000:80", "1 to 65535"),
            ("1.2.3:80:80", "not an IP"),
            ("a:b:c:d", "HOST_PORT:GUEST_PORT"),
            ("[::1:80:80", "brackets"),
        ] {
            let e = s.parse::<PortSpec>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
            assert!(e.starts_with(&format!("--publish {s}: ")), "{e}");
        }
    }
}
