//! The guest network's addressing plan: subnet, IPv6 prefix, well-known addresses, MACs and
//! MTU.
//!
//! Theory of operation. Every address the guest meets on its link follows from two prefixes
//! by fixed rules, as in passt and gvisor-tap-vsock: the gateway is the first address of
//! each family (`.1`, `prefix::1`), the host alias the last usable IPv4 one (`.254` in a /24)
//! and its mirror `prefix::fe` in IPv6. Nothing is negotiated or stored, so a guest, a test
//! or a user can predict every address from the command line alone, and a restarted ferry
//! hands out the same plan. IPv6 is a /64 because SLAAC builds 64-bit interface identifiers;
//! the router itself speaks from the link-local `fe80::1`, as router advertisements must.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The subnet used when `--subnet` is not given (the same plan as gvisor-tap-vsock).
pub const DEFAULT_SUBNET: &str = "192.168.127.0/24";
/// The guest's IPv6 prefix when `--subnet6` is not given, DESIGN.md's: a unique local /64
/// (RFC 4193; the bytes spell "Ferry"). A ULA is never routed outside, so a dual-stack guest
/// keeps preferring IPv4 for destinations that have both (RFC 6724 ranks a ULA source below
/// IPv4 for global destinations) and uses IPv6 where only IPv6 answers, which is what a NAT
/// wants. A fixed prefix, as passt and gvisor-tap-vsock use fixed addresses, keeps the plan
/// predictable.
pub const DEFAULT_SUBNET6: &str = "fd46:6572:7279::/64";
/// The MTU used when `--mtu` is not given (the same as passt).
pub const DEFAULT_MTU: u16 = 65520;
/// The MAC address the guest's NIC gets through the virtio-net config space.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x46, 0x52, 0x59, 0x00, 0x02];
/// The MAC address of Ferry's side of the link (gateway, DNS and host alias).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x46, 0x52, 0x59, 0x00, 0x01];

/// Smallest MTU accepted: the IPv4 minimum.
const MIN_MTU: u16 = 68;
/// Largest prefix that still leaves room for gateway, guest and host alias.
const MAX_PREFIX: u8 = 29;

/// Errors in the network configuration given by the user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The subnet is not in `A.B.C.D/N` form or has bad numbers.
    #[error(
        "--subnet {0}: not an IPv4 subnet; write it as A.B.C.D/N, for example {DEFAULT_SUBNET}"
    )]
    SubnetSyntax(String),
    /// The prefix leaves no room for gateway, guest and host alias.
    #[error("--subnet {0}: the prefix must be between /8 and /{MAX_PREFIX} so that gateway, guest and host alias fit")]
    SubnetPrefix(String),
    /// Host bits are set in the subnet address.
    #[error("--subnet {given}: host bits are set; use {suggested}")]
    SubnetHostBits {
        /// What the user wrote.
        given: String,
        /// The same subnet with host bits cleared.
        suggested: String,
    },
    /// The IPv6 prefix is not a /64 unicast prefix.
    #[error("--subnet6 {0}: not an IPv6 /64 prefix; write it as a /64 such as {DEFAULT_SUBNET6} (SLAAC needs a /64), or off for no IPv6")]
    Subnet6(String),
    /// The MTU is out of range.
    #[error("--mtu {0}: the MTU must be between {MIN_MTU} and 65535")]
    Mtu(u32),
}

/// An IPv4 subnet, `network/prefix`, with the host bits of `network` clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask, for example 255.255.255.0 for a /24.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    /// The n-th address in the subnet (0 is the network address).
    fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + n)
    }

    /// The subnet's broadcast address (all host bits set).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// The number of addresses in the subnet, network and broadcast included.
    fn size(&self) -> u32 {
        1u32 << (32 - u32::from(self.prefix))
    }

    /// Whether `addr` is inside the subnet.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }
}

/// The guest's IPv6 /64: its first 64 bits, the rest clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet6 {
    prefix: Ipv6Addr,
}

impl Subnet6 {
    /// The prefix (interface identifier bits clear).
    pub fn prefix(&self) -> Ipv6Addr {
        self.prefix
    }

    /// The address with interface identifier `id` in the prefix.
    pub fn nth(&self, id: u64) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.prefix) | u128::from(id))
    }

    /// Whether `addr` is in the prefix.
    pub fn contains(&self, addr: Ipv6Addr) -> bool {
        u128::from(addr) >> 64 == u128::from(self.prefix) >> 64
    }
}

impl FromStr for Subnet6 {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Subnet6(s.to_string());
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
        if len != "64"
            || u128::from(addr) & u128::from(u64::MAX) != 0
            || addr.is_multicast()
            || addr.is_unspecified()
            || addr.is_loopback()
            || (addr.segments()[0] & 0xffc0) == 0xfe80
        {
            return Err(bad());
        }
        Ok(Subnet6 { prefix: addr })
    }
}

impl fmt::Display for Subnet6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/64", self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p)),
    }
}

impl FromStr for Subnet {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let syntax = || Error::SubnetSyntax(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if prefix > 32 {
            return Err(syntax());
        }
        if !(8..=MAX_PREFIX).contains(&prefix) {
            return Err(Error::SubnetPrefix(s.to_string()));
        }
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        if network != addr {
            return Err(Error::SubnetHostBits {
                given: s.to_string(),
                suggested: format!("{network}/{prefix}"),
            });
        }
        Ok(Subnet { network, prefix })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The guest network's plan: where the gateway, the guest and the host alias live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest subnet.
    pub subnet: Subnet,
    /// The guest's IPv6 /64 (None: no IPv6).
    pub subnet6: Option<Subnet6>,
    /// The link MTU, given to the guest in the virtio-net config space and by DHCP.
    pub mtu: u16,
    /// The MAC address of the guest's NIC until its frames show another (the one the device
    /// offers in its config space).
    pub guest_mac: [u8; 6],
    /// `guest_mac` was given (`--guest-mac`): frames from other MACs teach nothing.
    pub guest_mac_pinned: bool,
    /// Most TCP connections through the NAT at once; past it, new ones get RST.
    pub max_connections: usize,
    /// The host's DNS search domains (its resolv.conf's), given to the guest after
    /// `ferry.internal`; the stack keeps them up to date as the resolv.conf changes.
    pub search: Vec<String>,
    /// `--guest-forward`: virtual addresses whose ports go to host services (checked with
    /// [`crate::guest_forward::check`]).
    pub guest_forwards: Vec<crate::guest_forward::GuestForward>,
}

/// The TCP connection cap when none is given.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16384;

impl NetConfig {
    /// Builds a plan, checking the MTU.
    pub fn new(subnet: Subnet, mtu: u32) -> Result<Self, Error> {
        let mtu = u16::try_from(mtu)
            .ok()
            .filter(|m| *m >= MIN_MTU)
            .ok_or(Error::Mtu(mtu))?;
        Ok(NetConfig {
            subnet,
            subnet6: Some(default_subnet6()),
            mtu,
            guest_mac: GUEST_MAC,
            guest_mac_pinned: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            search: Vec::new(),
            guest_forwards: Vec::new(),
        })
    }

    /// The gateway: the first address. DHCP, DNS and the HTTP proxy answer here.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.nth(1)
    }

    /// The address the guest is leased: the second one (a guest may set another: see
    /// [`crate::guest::Guest`]).
    pub fn guest(&self) -> Ipv4Addr {
        self.subnet.nth(2)
    }

    /// The host alias: the last address before broadcast. It reaches the host's 127.0.0.1.
    pub fn host_alias(&self) -> Ipv4Addr {
        self.subnet.nth(self.subnet.size() - 2)
    }

    /// The gateway's IPv6 address: `::1` in the prefix (DNS answers there too). Meaningful
    /// only with IPv6 on.
    pub fn gateway6(&self) -> Ipv6Addr {
        self.subnet6.unwrap_or_else(default_subnet6).nth(1)
    }

    /// The host alias's IPv6 address, `::fe` in the prefix (the mirror of IPv4's `.254`): it
    /// reaches the host's `::1`.
    pub fn host_alias6(&self) -> Ipv6Addr {
        self.subnet6.unwrap_or_else(default_subnet6).nth(0xfe)
    }

    /// The router's link-local address, `fe80::1`: router advertisements must come from a
    /// link-local address, and guests route through it.
    pub fn gateway_ll(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)
    }

    /// The DNS server the guest is given over IPv6 (router advertisement RDNSS and DHCPv6):
    /// the gateway, where the DNS server answers in either family. Meaningful only with IPv6
    /// on.
    pub fn dns6(&self) -> Ipv6Addr {
        self.gateway6()
    }
}

/// [`DEFAULT_SUBNET6`], parsed.
fn default_subnet6() -> Subnet6 {
    Subnet6 {
        prefix: Ipv6Addr::new(0xfd46, 0x6572, 0x7279, 0, 0, 0, 0, 0),
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        // The constants are valid; this cannot fail.
        let subnet = Subnet {
            network: Ipv4Addr::new(192, 168, 127, 0),
            prefix: 24,
        };
        NetConfig {
            subnet,
            subnet6: Some(default_subnet6()),
            mtu: DEFAULT_MTU,
            guest_mac: GUEST_MAC,
            guest_mac_pinned: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            search: Vec::new(),
            guest_forwards: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_prefixes_are_64s_of_unicast_space() {
        let s: Subnet6 = DEFAULT_SUBNET6.parse().unwrap();
        assert_eq!(s, default_subnet6());
        assert_eq!(s.to_string(), DEFAULT_SUBNET6);
        let c = NetConfig::default();
        assert_eq!(
            c.gateway6(),
            "fd46:6572:7279::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            c.host_alias6(),
            "fd46:6572:7279::fe".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(c.dns6(), c.gateway6());
        assert_eq!(c.gateway_ll(), "fe80::1".parse::<Ipv6Addr>().unwrap());
        let other: Subnet6 = "2001:db8:1:2::/64".parse().unwrap();
        let c = NetConfig {
            subnet6: Some(other),
            ..NetConfig::default()
        };
        assert_eq!(c.gateway6(), "2001:db8:1:2::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            c.host_alias6(),
            "2001:db8:1:2::fe".parse::<Ipv6Addr>().unwrap()
        );
        // IPv6 is on unless turned off.
        let s4 = DEFAULT_SUBNET.parse().unwrap();
        assert_eq!(NetConfig::new(s4, 1500).unwrap().subnet6, Some(s));
        assert!(s.contains("fd46:6572:7279::1234:5678:9abc:def0".parse().unwrap()));
        assert!(!s.contains("fd46:525a::1".parse().unwrap()));
        for bad in [
            "fd00::/48",
            "fd00::1/64",
            "fe80::/64",
            "ff02::/64",
            "::/64",
            "10.0.0.0/24",
            "fd00::",
            "fd00::/064",
            "fd00::/",
            "/64",
            "ff00::/64",
            "::1/64",
            "fd00::%eth0/64",
        ] {
            let e = bad.parse::<Subnet6>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("--subnet6 {bad}: ")), "{e}");
        }
    }

    #[test]
    fn default_plan_matches_design() {
        let c = NetConfig::default();
        assert_eq!(c.subnet, DEFAULT_SUBNET.parse().unwrap());
        assert_eq!(c.gateway(), Ipv4Addr::new(192, 168, 127, 1));
        assert_eq!(c.guest(), Ipv4Addr::new(192, 168, 127, 2));
        assert_eq!(c.host_alias(), Ipv4Addr::new(192, 168, 127, 254));
        assert_eq!(c.subnet.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.mtu, 65520);
    }

    #[test]
    fn other_prefixes_place_the_host_alias_before_broadcast() {
        let c = NetConfig::new("10.0.8.0/22".parse().unwrap(), 1500).unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 0, 8, 1));
        assert_eq!(c.host_alias(), Ipv4Addr::new(10, 0, 11, 254));
        assert!(c.subnet.contains(Ipv4Addr::new(10, 0, 9, 7)));
        assert!(!c.subnet.contains(Ipv4Addr::new(10, 0, 12, 1)));
    }

    #[test]
    fn bad_subnets_are_rejected_with_the_reason() {
        for s in ["300.1.1.0/24", "10.0.0.0", "10.0.0.0/33", "10.0.0.0/x", ""] {
            assert_eq!(
                s.parse::<Subnet>(),
                Err(Error::SubnetSyntax(s.into())),
                "{s}"
            );
        }
        assert_eq!(
            "10.0.0.0/30".parse::<Subnet>(),
            Err(Error::SubnetPrefix("10.0.0.0/30".into()))
        );
        let e = "192.168.127.5/24".parse::<Subnet>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--subnet 192.168.127.5/24: host bits are set; use 192.168.127.0/24"
        );
    }

    #[test]
    fn mtu_range_is_checked() {
        let s = DEFAULT_SUBNET.parse().unwrap();
        assert!(NetConfig::new(s, 68).is_ok());
        assert!(NetConfig::new(s, 65535).is_ok());
        assert_eq!(NetConfig::new(s, 67), Err(Error::Mtu(67)));
        assert_eq!(NetConfig::new(s, 65536), Err(Error::Mtu(65536)));
    }
}
