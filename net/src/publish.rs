//! Port publishing specs: `[tcp|udp/][BIND_IP:]HOST_PORT:GUEST_PORT`, as in `docker run -p`.

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

/// A malformed publish spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--publish {spec}: {reason}; write it as [tcp|udp/][BIND_IP:]HOST_PORT:GUEST_PORT, for example 127.0.0.1:8080:80")]
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
        let (protocol, rest) = match s.split_once('/') {
            Some(("tcp", rest)) => (Protocol::Tcp, rest),
            Some(("udp", rest)) => (Protocol::Udp, rest),
            Some(_) => return Err(err("the protocol must be tcp or udp")),
            None => (Protocol::Tcp, s),
        };
        let (addr, ports) = if let Some(v6) = rest.strip_prefix('[') {
            let (a, ports) = v6
                .split_once("]:")
                .ok_or_else(|| err("an IPv6 bind address needs brackets and ports after it"))?;
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
