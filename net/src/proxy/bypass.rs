//! The bypass list: which servers the proxy reaches directly though an upstream is set.
//!
//! The syntax is the `NO_PROXY` that curl, wget, Go and Docker read, so the list a user
//! already keeps for their shell works here unchanged: entries separated by commas or
//! spaces; `*` for every host; a name, which also covers its subdomains (`example.com` and
//! `.example.com` both match `example.com` and `a.example.com`); an IP address or network
//! (`10.0.0.0/8`, `fd00::/8`, `[::1]`); any of them with `:PORT` to match that port only.
//! Names are compared as written, not resolved: a name is not matched against a network.

use std::net::IpAddr;

/// One entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    All,
    /// A name, lowercase, without a leading dot.
    Domain(String, Option<u16>),
    /// An address and prefix length.
    Net(IpAddr, u8, Option<u16>),
}

/// A parsed bypass list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bypass {
    entries: Vec<Entry>,
    /// The list as given, for display.
    text: String,
}

impl std::fmt::Display for Bypass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Bypass {
    type Err = String;

    fn from_str(s: &str) -> Result<Bypass, String> {
        let mut entries = Vec::new();
        for e in s
            .split([',', ' ', '\t'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            entries.push(parse_entry(e).map_err(|why| {
                format!("bad bypass entry {e:?}: {why}; give names (example.com), .suffixes, *, addresses or networks (10.0.0.0/8), each with an optional :PORT")
            })?);
        }
        Ok(Bypass {
            entries,
            text: s.trim().to_string(),
        })
    }
}

fn parse_entry(e: &str) -> Result<Entry, String> {
    if e == "*" {
        return Ok(Entry::All);
    }
    // A port after the host: `host:port`, `[v6]:port`; a bare IPv6 address has no port.
    let (host, port) = if let Some(rest) = e.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or("an unclosed [")?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p.parse::<u16>().map_err(|_| "the port is not a number")?),
            None if tail.is_empty() || tail.starts_with('/') => None,
            None => return Err("text after ]".into()),
        };
        (
            format!(
                "{h}{}",
                tail.split(':')
                    .next()
                    .filter(|t| t.starts_with('/'))
                    .unwrap_or("")
            ),
            port,
        )
    } else if e.matches(':').count() == 1 {
        let (h, p) = e.split_once(':').unwrap_or((e, ""));
        (
            h.to_string(),
            Some(p.parse::<u16>().map_err(|_| "the port is not a number")?),
        )
    } else {
        (e.to_string(), None)
    };
    let (addr, len) = match host.split_once('/') {
        Some((a, l)) => (
            a,
            Some(
                l.parse::<u8>()
                    .map_err(|_| "the prefix length is not a number")?,
            ),
        ),
        None => (host.as_str(), None),
    };
    if let Ok(ip) = addr.parse::<IpAddr>() {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        if len > max {
            return Err(format!("the prefix length is over {max}"));
        }
        return Ok(Entry::Net(ip, len, port));
    }
    if len.is_some() {
        return Err("a network needs an address before /".into());
    }
    let name = addr
        .trim_start_matches("*.")
        .trim_start_matches('.')
        .to_ascii_lowercase();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err("not a host name".into());
    }
    Ok(Entry::Domain(name, port))
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl Bypass {
    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether requests for `host:port` skip the upstream.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.');
        let ip = host.parse::<IpAddr>().ok();
        let lower = host.to_ascii_lowercase();
        self.entries.iter().any(|e| match e {
            Entry::All => true,
            Entry::Net(net, len, p) => {
                p.is_none_or(|p| p == port) && ip.is_some_and(|ip| in_net(ip, *net, *len))
            }
            Entry::Domain(d, p) => {
                p.is_none_or(|p| p == port)
                    && ip.is_none()
                    && (lower == *d
                        || lower
                            .strip_suffix(d.as_str())
                            .is_some_and(|s| s.ends_with('.')))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_as_no_proxy_does() {
        let b: Bypass =
            "example.com, .corp.internal 10.0.0.0/8,192.168.1.5:8080 [fd00::]/8 localhost:3000"
                .parse()
                .unwrap();
        for (host, port, want) in [
            ("example.com", 80, true),
            ("www.EXAMPLE.com", 443, true),
            ("notexample.com", 80, false),
            ("corp.internal", 80, true),
            ("a.b.corp.internal", 80, true),
            ("10.9.8.7", 80, true),
            ("11.0.0.1", 80, false),
            ("192.168.1.5", 8080, true),
            ("192.168.1.5", 80, false),
            ("fd12::1", 443, true),
            ("[fd12::1]", 443, true),
            ("fe80::1", 443, false),
            ("localhost", 3000, true),
            ("localhost", 80, false),
        ] {
            assert_eq!(b.matches(host, port), want, "{host}:{port}");
        }
        let all: Bypass = "*".parse().unwrap();
        assert!(all.matches("anything", 1));
        let none: Bypass = "".parse().unwrap();
        assert!(none.is_empty() && !none.matches("a", 1));
        assert_eq!(
            b.to_string(),
            "example.com, .corp.internal 10.0.0.0/8,192.168.1.5:8080 [fd00::]/8 localhost:3000"
        );
        for bad in ["a:b", "10.0.0.0/33", "x/8", "[::1", "a!b"] {
            let e = bad.parse::<Bypass>().unwrap_err();
            assert!(e.contains("bad bypass entry"), "{bad}: {e}");
        }
    }
}
