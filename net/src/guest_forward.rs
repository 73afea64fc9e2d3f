//! Guest forwards (`--guest-forward ADDR:PORT=unix:/path` or `=tcp:HOST:PORT`): a virtual
//! address and port the guest connects to, served by a host UNIX socket or host address, as
//! QEMU's `guestfwd` and passt's `--map-guest-addr` do (a credential helper, an SSH agent).
//!
//! Theory of operation. The stack answers ARP and neighbour solicitations for each forward's
//! address, as it does for the gateway's, so the address may be in the guest's subnet or
//! anywhere else (routed through the gateway). A guest SYN to ADDR:PORT makes the host
//! connection to the target instead of to ADDR; the guest sees SYN-ACK only once it is made,
//! and RST when the target refuses, as for any outbound connection. Other ports of the address
//! meet no listener (RST). The rules do not apply: the forward is the user's own mapping, not
//! a destination the guest chose.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use crate::NetConfig;

/// Where a guest forward's connections go on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardTarget {
    /// A UNIX stream socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

/// One `--guest-forward`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestForward {
    /// The address and port the guest connects to.
    pub addr: SocketAddr,
    /// What serves it.
    pub target: ForwardTarget,
}

const FORM: &str =
    "use ADDR:PORT=unix:/PATH or ADDR:PORT=tcp:HOST:PORT, e.g. 192.168.127.100:22=unix:/run/user/1000/ssh-agent.sock";

impl FromStr for GuestForward {
    type Err = String;

    /// Parses `ADDR:PORT=unix:/PATH` or `ADDR:PORT=tcp:HOST:PORT` (IPv6 as `[ADDR]:PORT`; a
    /// HOST name is looked up now, once).
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((addr, target)) = s.split_once('=') else {
            return Err(format!("{s:?}: no target; {FORM}"));
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not ADDR:PORT; {FORM}"))?;
        if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(format!(
                "{s:?}: {addr} is not an address and port a guest can connect to; {FORM}"
            ));
        }
        let target = if let Some(path) = target.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute; {FORM}"));
            }
            ForwardTarget::Unix(PathBuf::from(path))
        } else if let Some(host) = target.strip_prefix("tcp:") {
            let to = host
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    format!("{s:?}: {host:?} is not a HOST:PORT ferry can find; {FORM}")
                })?;
            ForwardTarget::Tcp(to)
        } else {
            return Err(format!("{s:?}: the target needs unix: or tcp:; {FORM}"));
        };
        Ok(GuestForward { addr, target })
    }
}

impl fmt::Display for GuestForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            ForwardTarget::Unix(p) => write!(f, "{}=unix:{}", self.addr, p.display()),
            ForwardTarget::Tcp(a) => write!(f, "{}=tcp:{a}", self.addr),
        }
    }
}

/// Addresses guest forwards may use at most: each takes one of the stack's interface
/// addresses (smoltcp holds eight; the gateway, the host alias and their IPv6 ones take five).
pub fn max_addresses(cfg: &NetConfig) -> usize {
    if cfg.subnet6.is_some() {
        3
    } else {
        6
    }
}

/// Checks `forwards` against the plan: no address of the gateway, the guest or the host alias,
/// no address and port twice, IPv6 only with IPv6 on, and no more distinct addresses than
/// fit. The message says what to change.
pub fn check(cfg: &NetConfig, forwards: &[GuestForward]) -> Result<(), String> {
    let mut reserved = vec![
        IpAddr::V4(cfg.gateway()),
        IpAddr::V4(cfg.guest()),
        IpAddr::V4(cfg.host_alias()),
        IpAddr::V4(cfg.subnet.network()),
        IpAddr::V4(std::net::Ipv4Addr::from(
            u32::from(cfg.subnet.network()) | !u32::from(cfg.subnet.netmask()),
        )),
    ];
    if cfg.subnet6.is_some() {
        reserved.extend([
            IpAddr::V6(cfg.gateway6()),
            IpAddr::V6(cfg.host_alias6()),
            IpAddr::V6(cfg.gateway_ll()),
        ]);
    }
    let mut addrs: Vec<IpAddr> = Vec::new();
    for (i, f) in forwards.iter().enumerate() {
        let ip = f.addr.ip();
        if reserved.contains(&ip) {
            return Err(format!(
                "--guest-forward {f}: {ip} is the gateway's, the guest's or the host alias's address; choose another"
            ));
        }
        if ip.is_ipv6() && cfg.subnet6.is_none() {
            return Err(format!(
                "--guest-forward {f}: IPv6 is off (--subnet6 none); use an IPv4 address"
            ));
        }
        if forwards[..i].iter().any(|o| o.addr == f.addr) {
            return Err(format!(
                "--guest-forward {f}: {} is forwarded twice; give each address and port once",
                f.addr
            ));
        }
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    if addrs.len() > max_addresses(cfg) {
        return Err(format!(
            "--guest-forward: {} addresses, more than the {} the stack can answer for; put several ports on one address",
            addrs.len(),
            max_addresses(cfg)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_targets_and_says_what_is_wrong() {
        let f: GuestForward = "192.168.127.100:22=unix:/run/agent.sock".parse().unwrap();
        assert_eq!(f.addr, "192.168.127.100:22".parse().unwrap());
        assert_eq!(f.target, ForwardTarget::Unix("/run/agent.sock".into()));
        assert_eq!(f.to_string(), "192.168.127.100:22=unix:/run/agent.sock");
        let f: GuestForward = "[fd46:6572:7279::100]:80=tcp:127.0.0.1:8080"
            .parse()
            .unwrap();
        assert_eq!(
            f.target,
            ForwardTarget::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        for (bad, says) in [
            ("10.0.0.1:22", "no target"),
            ("10.0.0.1=unix:/x", "not ADDR:PORT"),
            ("10.0.0.1:0=unix:/x", "can connect to"),
            ("0.0.0.0:22=unix:/x", "can connect to"),
            ("10.0.0.1:22=unix:x", "absolute"),
            ("10.0.0.1:22=tcp:nohost", "ferry can find"),
            ("10.0.0.1:22=udp:1.2.3.4:5", "unix: or tcp:"),
        ] {
            let e = bad.parse::<GuestForward>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn checks_against_the_plan() {
        let cfg = NetConfig::default();
        let f = |s: &str| s.parse::<GuestForward>().unwrap();
        assert!(check(
            &cfg,
            &[
                f("192.168.127.100:22=unix:/a"),
                f("192.168.127.100:23=unix:/b")
            ]
        )
        .is_ok());
        let e = check(&cfg, &[f("192.168.127.1:22=unix:/a")]).unwrap_err();
        assert!(e.contains("gateway"), "{e}");
        let e = check(&cfg, &[f("10.9.9.9:22=unix:/a"), f("10.9.9.9:22=unix:/b")]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let many: Vec<_> = (1..=4)
            .map(|i| f(&format!("10.9.9.{i}:22=unix:/a")))
            .collect();
        let e = check(&cfg, &many).unwrap_err();
        assert!(e.contains("several ports on one address"), "{e}");
        let mut v4 = cfg.clone();
        v4.subnet6 = None;
        assert!(check(&v4, &many).is_ok());
        let e = check(&v4, &[f("[fd00::5]:22=unix:/a")]).unwrap_err();
        assert!(e.contains("IPv6 is off"), "{e}");
    }
}
