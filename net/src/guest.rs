//! The guest as its own frames show it: its MAC, its IPv4 address and its IPv6 addresses.
//!
//! Theory of operation. Ferry never assumes how the guest is configured: libvirt gives every
//! NIC its own `52:54:00:…` MAC, QEMU's default is another, and a guest may set a static
//! address instead of taking the DHCP lease. So, as passt, libslirp and gvproxy do, every
//! frame from the guest is looked at (its Ethernet source, and the sender of an ARP packet or
//! the source of an IPv4 packet when that lies in the guest's subnet and is nobody else's)
//! and the frames ferry makes for the guest itself (ping replies, ICMP errors, published UDP,
//! published TCP connections) go to what was seen last. smoltcp learns the guest's MAC from
//! its ARP traffic on its own; this covers what ferry writes without smoltcp. Until the guest
//! has sent anything, the plan's address (`.2`) and the configured MAC stand in. `--guest-mac`
//! pins the MAC: frames from others are then not learned from.
//!
//! IPv6: the guest's global address (the one in the link's /64, which SLAAC builds) and its
//! link-local one are learned from the source of its IPv6 packets, and from the target of its
//! duplicate address detection (a neighbour solicitation from `::`), which is the first thing
//! a guest says of an address it is about to use. Until then the address SLAAC builds from the
//! MAC (EUI-64) stands in: what most guests use.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{NetConfig, GATEWAY_MAC};

/// What the guest uses, as last seen.
#[derive(Clone, Debug)]
pub struct Guest {
    mac: [u8; 6],
    ip: Ipv4Addr,
    /// Its IPv6 address in the link's /64, once seen.
    ip6: Option<Ipv6Addr>,
    /// Its IPv6 link-local address, once seen.
    ll6: Option<Ipv6Addr>,
    /// The MAC was given (`--guest-mac`): only its frames teach anything.
    pinned: bool,
    cfg: NetConfig,
}

impl Guest {
    /// The guest of the plan `cfg`, before it says anything.
    pub fn new(cfg: &NetConfig) -> Self {
        Guest {
            mac: cfg.guest_mac,
            ip: cfg.guest(),
            ip6: None,
            ll6: None,
            pinned: cfg.guest_mac_pinned,
            cfg: cfg.clone(),
        }
    }

    /// The guest's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The guest's IPv4 address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The guest's IPv6 address in the link's /64 (None when IPv6 is off): the one seen, or
    /// the one SLAAC builds from its MAC.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.cfg.subnet6.as_ref()?;
        Some(
            self.ip6
                .unwrap_or_else(|| eui64(self.cfg.gateway6(), self.mac)),
        )
    }

    /// The guest's IPv6 link-local address: the one seen, or the one built from its MAC.
    pub fn link_local(&self) -> Option<Ipv6Addr> {
        self.cfg.subnet6.as_ref()?;
        let fe80 = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0);
        Some(self.ll6.unwrap_or_else(|| eui64(fe80, self.mac)))
    }

    /// Learns the guest's IPv6 addresses from an IPv6 packet of its.
    fn learn6(&mut self, frame: &[u8]) -> bool {
        let addr = |r: std::ops::Range<usize>| {
            frame
                .get(r)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(Ipv6Addr::from)
        };
        let Some(mut src) = addr(22..38) else {
            return false;
        };
        if src.is_unspecified() {
            // Duplicate address detection: a neighbour solicitation (ICMPv6 135, no
            // extension headers) names the address about to be used.
            if frame.get(20) != Some(&58) || frame.get(54) != Some(&135) {
                return false;
            }
            let Some(target) = addr(62..78) else {
                return false;
            };
            src = target;
        }
        let link_local = (src.segments()[0] & 0xffc0) == 0xfe80;
        let ours = [
            self.cfg.gateway6(),
            self.cfg.host_alias6(),
            self.cfg.gateway_ll(),
        ];
        if ours.contains(&src) {
            return false;
        }
        let slot = if link_local {
            &mut self.ll6
        } else if src.segments()[..4] == self.cfg.gateway6().segments()[..4] {
            &mut self.ip6
        } else {
            return false;
        };
        if *slot == Some(src) {
            return false;
        }
        log::info!("net: the guest uses address {src}");
        *slot = Some(src);
        true
    }

    /// Learns from one frame the guest sent. Returns whether the MAC or address changed.
    pub fn learn(&mut self, frame: &[u8]) -> bool {
        let Some(src) = frame.get(6..12) else {
            return false;
        };
        let src: [u8; 6] = src.try_into().unwrap_or_default();
        // A multicast source (the low bit of the first byte) or ferry's own is no guest's.
        if src[0] & 1 != 0 || src == GATEWAY_MAC || src == [0; 6] {
            return false;
        }
        if self.pinned && src != self.mac {
            return false;
        }
        let mut changed = false;
        if self.cfg.subnet6.is_some() && frame.get(12..14) == Some(&[0x86, 0xdd]) {
            changed |= self.learn6(frame);
        }
        let ip = match frame.get(12..14) {
            // IPv4: the source address.
            Some([0x08, 0x00]) => frame.get(26..30),
            // ARP for Ethernet and IPv4: the sender's protocol address.
            Some([0x08, 0x06]) if frame.get(14..20) == Some(&[0, 1, 8, 0, 6, 4]) => {
                frame.get(28..32)
            }
            _ => None,
        }
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(Ipv4Addr::from)
        .filter(|ip| self.could_be_guest(*ip));
        if src != self.mac {
            log::info!(
                "net: the guest uses MAC {}",
                src.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            );
            self.mac = src;
            changed = true;
        }
        if let Some(ip) = ip {
            if ip != self.ip {
                log::info!("net: the guest uses address {ip}");
                self.ip = ip;
                changed = true;
            }
        }
        changed
    }

    /// Whether `ip` may be the guest's: in its subnet, and not the network or broadcast
    /// address, the gateway or the host alias (0.0.0.0, a DHCP client's, is not in it).
    fn could_be_guest(&self, ip: Ipv4Addr) -> bool {
        let s = &self.cfg.subnet;
        let broadcast = u32::from(s.network()) | !u32::from(s.netmask());
        s.contains(ip)
            && ip != s.network()
            && u32::from(ip) != broadcast
            && ip != self.cfg.gateway()
            && ip != self.cfg.host_alias()
    }
}

/// The address SLAAC builds in `prefix` (its first 64 bits) from `mac` (modified EUI-64).
fn eui64(prefix: Ipv6Addr, mac: [u8; 6]) -> Ipv6Addr {
    let mut o = prefix.octets();
    o[8..].copy_from_slice(&[
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]);
    Ipv6Addr::from(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_frame(mac: [u8; 6], src: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 34];
        f[0..6].copy_from_slice(&GATEWAY_MAC);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&[192, 168, 127, 1]);
        f
    }

    fn arp_frame(mac: [u8; 6], sender: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 42];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
        f[20..22].copy_from_slice(&[0, 1]);
        f[22..28].copy_from_slice(&mac);
        f[28..32].copy_from_slice(&sender);
        f
    }

    #[test]
    fn learns_the_mac_and_address_the_guest_uses() {
        let cfg = NetConfig::default();
        let mut g = Guest::new(&cfg);
        assert_eq!(g.ip(), cfg.guest());
        let qemu = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        // A DHCP discover: the MAC, but 0.0.0.0 is nobody's address.
        assert!(g.learn(&ipv4_frame(qemu, [0, 0, 0, 0])));
        assert_eq!((g.mac(), g.ip()), (qemu, cfg.guest()));
        // A static address, by ARP and by IPv4.
        assert!(g.learn(&arp_frame(qemu, [192, 168, 127, 50])));
        assert_eq!(g.ip(), Ipv4Addr::new(192, 168, 127, 50));
        assert!(!g.learn(&ipv4_frame(qemu, [192, 168, 127, 50])));
        assert!(g.learn(&ipv4_frame(qemu, [192, 168, 127, 51])));
        // Nothing that cannot be the guest's.
        for bad in [
            [192, 168, 127, 1],
            [192, 168, 127, 254],
            [192, 168, 127, 255],
            [192, 168, 127, 0],
            [10, 0, 0, 5],
        ] {
            assert!(!g.learn(&ipv4_frame(qemu, bad)), "{bad:?}");
        }
        assert!(!g.learn(&ipv4_frame([0x01, 0, 0x5e, 0, 0, 1], [192, 168, 127, 9])));
        assert!(!g.learn(&ipv4_frame(GATEWAY_MAC, [192, 168, 127, 9])));
        assert!(!g.learn(&[0u8; 8]));
        assert_eq!(g.ip(), Ipv4Addr::new(192, 168, 127, 51));
    }

    #[test]
    fn a_pinned_mac_learns_only_from_its_own_frames() {
        let cfg = NetConfig {
            guest_mac_pinned: true,
            ..NetConfig::default()
        };
        let mut g = Guest::new(&cfg);
        assert!(!g.learn(&ipv4_frame([0x52, 0x54, 0, 1, 2, 3], [192, 168, 127, 9])));
        assert!(g.learn(&ipv4_frame(cfg.guest_mac, [192, 168, 127, 9])));
        assert_eq!(g.mac(), cfg.guest_mac);
    }
}
