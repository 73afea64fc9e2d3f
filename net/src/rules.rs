//! Rules with counters for the guest's traffic: the job of Docker's `DOCKER-USER` chain, and
//! `iptables -L -v` (and `-Z`) to see and reset what each rule did.
//!
//! A rule is `ACTION[,dir=out|in][,proto=tcp|udp|icmp][,to=ADDR[/LEN]|,from=ADDR[/LEN]][,port=N[-M]]`,
//! with ACTION one of `allow`, `reject` or `drop`.
//!
//! **Outbound rules** (`dir=out`, the default) see the flows the guest opens: the first packet
//! of each (a TCP SYN, a UDP datagram to a destination it has no flow to, every ICMP echo
//! request). `to=` and `port=` match the destination as the guest addressed it (so `to=` names
//! the host alias, not 127.0.0.1).
//!
//! **Inbound rules** (`dir=in`) see the clients of published ports, which is what most
//! `DOCKER-USER` rules are written for: keeping a published port to some networks. `from=`
//! (an IPv4 or IPv6 network: a port published on `[::]` has IPv6 clients) matches the client's
//! address and `port=` the published host port (the one clients
//! connect to, not the guest's). They are checked on each accepted TCP connection and on each
//! datagram from a UDP client the guest has no mapping for.
//!
//! Each direction has its own list, in order: the first match decides; with none, the flow
//! is allowed, as Docker's NAT is. A verdict holds for the flow's life: a rule added later does
//! not cut open flows, as with iptables' usual `ESTABLISHED` accept. Refused flows keep no
//! state, so each of their packets is checked again.
//!
//! The gateway's HTTP proxy checks the servers it connects to directly against the outbound
//! rules; there the host's own loopback is checked as the host alias, so `to=ALIAS` keeps the
//! guest off the host's loopback whichever way it asks.
//!
//! `reject` answers at once, as `iptables -j REJECT` does: an outbound TCP flow with RST (the
//! guest's connect fails with ECONNREFUSED), UDP and ICMP with ICMP port unreachable; a
//! published connection is reset (the host accepted it before any rule could see it, so its
//! client sees the connection reset rather than refused). `drop` says nothing: the guest times
//! out, a published connection is closed without a word, and a datagram is discarded.
//!
//! Each rule counts packets and bytes:
//! - `packets`: the packets it decided: the first packet of each flow it let through (for
//!   published TCP, the connection), every packet it refused;
//! - `bytes`: what the flows it let through carried, both ways (TCP and UDP payload, what the
//!   proxy relayed, the ICMP echo requests), and for `reject` and `drop` the size of what was
//!   refused (IP packets outbound; datagram payloads inbound, and nothing for connections).
//!
//! The table is shared by the net thread, which reads it once per new flow, and the control
//! API, which changes it; counters are atomics that flows hold on to.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Rules at most: each new flow walks the list.
pub const MAX_RULES: usize = 1024;

/// What a rule does with a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let it through.
    Allow,
    /// Refuse it and tell the guest: RST for TCP, ICMP port unreachable otherwise.
    Reject,
    /// Refuse it silently.
    Drop,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Reject => "reject",
            Action::Drop => "drop",
        })
    }
}

/// The protocol of a flow, or of a rule (`Any` matches all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// Every protocol.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo.
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Any => "all",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

/// Which traffic a rule sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Flows the guest opens.
    Out,
    /// Clients of published ports.
    In,
}

impl fmt::Display for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dir::Out => "out",
            Dir::In => "in",
        })
    }
}

/// A malformed rule spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("rule {spec}: {reason}; write it as allow|reject|drop[,dir=out|in][,proto=tcp|udp|icmp][,to=ADDR[/LEN] (out)|,from=ADDR[/LEN] (in)][,port=N[-M]], for example reject,proto=tcp,to=10.0.0.0/8 or drop,dir=in,from=10.0.0.0/8")]
pub struct RuleSpecError {
    spec: String,
    reason: String,
}

/// What a rule matches and what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// The verdict.
    pub action: Action,
    /// The traffic it sees.
    pub dir: Dir,
    /// The protocol matched.
    pub proto: Proto,
    /// The network matched, IPv4 or IPv6: outbound, the destination as the guest addresses it
    /// (`to=`); inbound, the client's (`from=`).
    pub net: IpAddr,
    /// Its prefix length. `0.0.0.0/0` matches every address, IPv6 ones too; `::/0` every IPv6
    /// one.
    pub prefix: u8,
    /// The ports matched, first and last (TCP and UDP only): outbound the destination port,
    /// inbound the published host port.
    pub ports: Option<(u16, u16)>,
}

/// `addr` with all but its first `prefix` bits cleared.
fn network_of(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

impl RuleSpec {
    /// Whether a flow of `proto` matches: to `addr` for an outbound rule, from `addr` to
    /// host port `port` for an inbound one (port 0 for ICMP). An IPv4-mapped address is IPv4;
    /// an IPv6 one is in no IPv4 network but the whole of `0.0.0.0/0`, and an IPv4 one in no
    /// IPv6 network.
    pub fn matches(&self, proto: Proto, addr: IpAddr, port: u16) -> bool {
        let addr = match addr {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            a => a,
        };
        let in_network = match (self.net, addr) {
            (IpAddr::V4(_), IpAddr::V6(_)) => self.prefix == 0,
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
            _ => network_of(addr, self.prefix) == self.net,
        };
        (self.proto == Proto::Any || self.proto == proto)
            && in_network
            && self.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port))
    }
}

impl FromStr for RuleSpec {
    type Err = RuleSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| RuleSpecError {
            spec: s.to_string(),
            reason,
        };
        let mut parts = s.split(',');
        let action = match parts.next().map(str::trim) {
            Some("allow" | "accept") => Action::Allow,
            Some("reject") => Action::Reject,
            Some("drop" | "deny") => Action::Drop,
            Some(other) => {
                return Err(err(format!(
                    "'{other}' is not an action (allow, reject or drop)"
                )))
            }
            None => return Err(err("the action is missing".into())),
        };
        let mut spec = RuleSpec {
            action,
            dir: Dir::Out,
            proto: Proto::Any,
            net: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix: 0,
            ports: None,
        };
        let (mut seen_dir, mut seen_proto) = (false, false);
        // Which of to= and from= was given.
        let mut seen_net: Option<&str> = None;
        for part in parts {
            match part.trim().split_once('=') {
                Some(("dir", d)) if !seen_dir => {
                    seen_dir = true;
                    spec.dir = match d {
                        "out" => Dir::Out,
                        "in" => Dir::In,
                        _ => return Err(err(format!("dir={d}: expected out or in"))),
                    };
                }
                Some(("proto", p)) if !seen_proto => {
                    seen_proto = true;
                    spec.proto = match p {
                        "tcp" => Proto::Tcp,
                        "udp" => Proto::Udp,
                        "icmp" => Proto::Icmp,
                        "all" | "any" => Proto::Any,
                        _ => return Err(err(format!("proto={p}: expected tcp, udp, icmp or all"))),
                    };
                }
                Some((k @ ("to" | "from"), t)) if seen_net.is_none() => {
                    seen_net = Some(k);
                    let (addr, len) = t.split_once('/').map_or((t, None), |(a, l)| (a, Some(l)));
                    let addr: IpAddr = addr.parse().map_err(|_| {
                        err(format!("{k}={t}: {addr} is not an IPv4 or IPv6 address"))
                    })?;
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let len: u8 = match len {
                        None => max,
                        Some(l) => l.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
                            err(format!("{k}={t}: the prefix must be 0 to {max}"))
                        })?,
                    };
                    spec.prefix = len;
                    spec.net = network_of(addr, len);
                    if spec.net != addr {
                        return Err(err(format!(
                            "{k}={t}: host bits are set; use {}/{len}",
                            spec.net
                        )));
                    }
                }
                Some(("port", p)) if spec.ports.is_none() => {
                    let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                    let port = |v: &str| v.parse::<u16>().ok().filter(|v| *v != 0);
                    match (port(lo), port(hi)) {
                        (Some(lo), Some(hi)) if lo <= hi => spec.ports = Some((lo, hi)),
                        _ => {
                            return Err(err(format!(
                                "port={p}: expected a port or a range N-M, from 1 to 65535"
                            )))
                        }
                    }
                }
                Some((k @ ("to" | "from"), _)) if seen_net != Some(k) => {
                    return Err(err("to= and from= do not go together".into()))
                }
                Some((k @ ("dir" | "proto" | "to" | "from" | "port"), _)) => {
                    return Err(err(format!("{k}= is given twice")))
                }
                _ => {
                    return Err(err(format!(
                    "unknown part '{part}'; the known ones are dir=, proto=, to=, from= and port="
                )))
                }
            }
        }
        if spec.ports.is_some() && !matches!(spec.proto, Proto::Tcp | Proto::Udp) {
            return Err(err("port= needs proto=tcp or proto=udp".into()));
        }
        match (spec.dir, seen_net) {
            (Dir::Out, Some("from")) => {
                return Err(err(
                    "from= matches the clients of published ports; add dir=in".into()
                ))
            }
            (Dir::In, Some("to")) => {
                return Err(err(
                    "an inbound rule matches its clients with from= and the published host port with port=".into(),
                ))
            }
            (Dir::In, _) if spec.proto == Proto::Icmp => {
                return Err(err("inbound rules see TCP and UDP only".into()))
            }
            _ => {}
        }
        Ok(spec)
    }
}

impl fmt::Display for RuleSpec {
    /// The canonical form, which parses back to the same rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.action)?;
        if self.dir == Dir::In {
            f.write_str(",dir=in")?;
        }
        if self.proto != Proto::Any {
            write!(f, ",proto={}", self.proto)?;
        }
        // 0.0.0.0/0 is every address and goes without saying; ::/0 is every IPv6 one.
        if self.prefix != 0 || self.net.is_ipv6() {
            let k = match self.dir {
                Dir::Out => "to",
                Dir::In => "from",
            };
            write!(f, ",{k}={}/{}", self.net, self.prefix)?;
        }
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, ",port={lo}"),
            Some((lo, hi)) => write!(f, ",port={lo}-{hi}"),
            None => Ok(()),
        }
    }
}

/// A rule's counters (see the module documentation).
#[derive(Debug, Default)]
pub struct Counters {
    /// Guest packets decided.
    pub packets: AtomicU64,
    /// Bytes carried, or refused.
    pub bytes: AtomicU64,
}

impl Counters {
    /// Counts `n` bytes moved on a flow this rule let through.
    pub fn add_bytes(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts one packet of `len` bytes decided.
    pub fn add_packet(&self, len: usize) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.add_bytes(len);
    }

    /// Packets and bytes, now.
    pub fn get(&self) -> (u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Starts both from 0 again (flows that hold them go on counting from there).
    fn zero(&self) {
        self.packets.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
    }
}

/// One rule in the table.
#[derive(Debug)]
struct Rule {
    id: u64,
    spec: RuleSpec,
    counters: Arc<Counters>,
}

/// A rule as the control API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    /// Stable for the rule's life: `DELETE /rules/{id}` names it.
    pub id: u64,
    /// Where it is checked, from 1.
    pub position: usize,
    /// What it matches and does.
    pub spec: RuleSpec,
    /// Packets decided.
    pub packets: u64,
    /// Bytes carried or refused.
    pub bytes: u64,
}

/// What the rules say of a new flow: the action, and the counters its traffic adds to.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// The first matching rule's action, or `Allow`.
    pub action: Action,
    /// That rule and its position (from 1), or None for the default policy.
    pub rule: Option<(usize, RuleSpec)>,
    /// That rule's counters, or the default policy's.
    pub counters: Arc<Counters>,
}

impl Verdict {
    /// Counts the packet of `len` bytes (IP) this verdict decided: its size too if refused.
    pub fn count(&self, len: usize) {
        self.counters.packets.fetch_add(1, Ordering::Relaxed);
        if self.action != Action::Allow {
            self.counters.add_bytes(len);
        }
    }
}

/// Adding a rule failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    /// The table is full.
    #[error("{MAX_RULES} rules are set, the most allowed; delete one first")]
    Full,
    /// No rule has this id.
    #[error("no rule has id {0}; `ferry ctl rules` lists them")]
    NoSuchRule(u64),
}

/// The rule table, first match wins; flows no rule matches are allowed.
#[derive(Debug, Default)]
pub struct Rules {
    table: RwLock<(Vec<Rule>, u64)>,
    /// The default policy's counters: outbound flows no rule matched.
    default: Arc<Counters>,
    /// The same for the clients of published ports.
    default_in: Arc<Counters>,
    /// The host alias: the host's own loopback and unspecified addresses, which only the
    /// proxy meets (the guest reaches the host's loopback through the alias), are checked as
    /// this address, so `to=ALIAS` covers every way to the host's loopback.
    host_alias: Option<Ipv4Addr>,
}

impl Rules {
    /// A table holding `specs` in order.
    pub fn new(specs: &[RuleSpec]) -> Self {
        Self::with_host_alias(specs, None)
    }

    /// A table holding `specs` in order, for a network whose host alias is `alias`.
    pub fn with_host_alias(specs: &[RuleSpec], alias: Option<Ipv4Addr>) -> Self {
        let rules = Rules {
            host_alias: alias,
            ..Rules::default()
        };
        for s in specs {
            // The caller's list is checked against MAX_RULES where it is parsed; past it the
            // rest would be refused here.
            let _ = rules.add(*s, None);
        }
        rules
    }

    /// Adds `spec` at `position` (from 1; past the end or None: last). Returns it as listed.
    pub fn add(&self, spec: RuleSpec, position: Option<usize>) -> Result<RuleInfo, RuleError> {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if t.0.len() >= MAX_RULES {
            return Err(RuleError::Full);
        }
        t.1 += 1;
        let id = t.1;
        let at = position
            .map(|p| p.saturating_sub(1).min(t.0.len()))
            .unwrap_or(t.0.len());
        t.0.insert(
            at,
            Rule {
                id,
                spec,
                counters: Arc::default(),
            },
        );
        Ok(info(at, &t.0[at]))
    }

    /// Deletes the rule `id`. Flows it let through stay open.
    pub fn remove(&self, id: u64) -> Result<RuleInfo, RuleError> {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let at =
            t.0.iter()
                .position(|r| r.id == id)
                .ok_or(RuleError::NoSuchRule(id))?;
        let r = t.0.remove(at);
        Ok(info(at, &r))
    }

    /// The rules in order, with their counters now.
    pub fn list(&self) -> Vec<RuleInfo> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        t.0.iter().enumerate().map(|(i, r)| info(i, r)).collect()
    }

    /// Which rule holds `counters` (a flow's): `Some(id)` for a rule, `None` for the default
    /// policy or a rule deleted since.
    pub fn rule_of(&self, counters: &Arc<Counters>) -> Option<u64> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        t.0.iter()
            .find(|r| Arc::ptr_eq(&r.counters, counters))
            .map(|r| r.id)
    }

    /// The default policy's counters for `dir` (flows no rule matched): packets and bytes.
    pub fn default_counters(&self, dir: Dir) -> (u64, u64) {
        match dir {
            Dir::Out => self.default.get(),
            Dir::In => self.default_in.get(),
        }
    }

    /// Sets every counter to 0, the default policy's too, as `iptables -Z` does.
    pub fn zero(&self) {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        for r in &t.0 {
            r.counters.zero();
        }
        self.default.zero();
        self.default_in.zero();
    }

    /// Decides a new flow of `proto` to `dst` whose first packet is `len` bytes (IP), and
    /// counts that packet.
    pub fn check(&self, proto: Proto, dst: SocketAddr, len: usize) -> Verdict {
        let v = self.peek(proto, dst);
        v.count(len);
        v
    }

    /// Decides a client at `client` of published host port `host_port` (a connection, or a
    /// datagram of `len` bytes), and counts it.
    pub fn check_in(
        &self,
        proto: Proto,
        client: SocketAddr,
        host_port: u16,
        len: usize,
    ) -> Verdict {
        let v = self.first_match(Dir::In, proto, client.ip(), host_port);
        v.count(len);
        v
    }

    /// What the outbound rules say of a flow of `proto` to `dst`, counting nothing.
    pub fn peek(&self, proto: Proto, dst: SocketAddr) -> Verdict {
        let host = match dst.ip() {
            IpAddr::V4(a) => a.is_loopback() || a.is_unspecified(),
            IpAddr::V6(a) => {
                a.is_loopback()
                    || a.is_unspecified()
                    || a.to_ipv4_mapped().is_some_and(|a| a.is_loopback())
            }
        };
        let ip = match self.host_alias {
            Some(alias) if host => IpAddr::V4(alias),
            _ => dst.ip(),
        };
        self.first_match(Dir::Out, proto, ip, dst.port())
    }

    /// The verdict of the first rule of `dir` that matches, or the default policy's.
    fn first_match(&self, dir: Dir, proto: Proto, addr: IpAddr, port: u16) -> Verdict {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let v = match t
            .0
            .iter()
            .enumerate()
            .find(|(_, r)| r.spec.dir == dir && r.spec.matches(proto, addr, port))
        {
            Some((i, r)) => Verdict {
                action: r.spec.action,
                rule: Some((i + 1, r.spec)),
                counters: r.counters.clone(),
            },
            None => Verdict {
                action: Action::Allow,
                rule: None,
                counters: match dir {
                    Dir::Out => self.default.clone(),
                    Dir::In => self.default_in.clone(),
                },
            },
        };
        drop(t);
        v
    }
}

fn info(at: usize, r: &Rule) -> RuleInfo {
    let (packets, bytes) = r.counters.get();
    RuleInfo {
        id: r.id,
        position: at + 1,
        spec: r.spec,
        packets,
        bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> RuleSpec {
        s.parse().unwrap()
    }

    fn dst(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn specs_parse_and_print_back() {
        for s in [
            "allow",
            "reject,proto=tcp,to=10.0.0.0/8",
            "drop,proto=udp,to=192.168.127.254/32,port=53",
            "reject,proto=tcp,port=8000-8999",
            "drop,proto=icmp",
            "drop,dir=in,from=10.0.0.0/8",
            "reject,dir=in,proto=tcp,from=192.168.1.7/32,port=8080",
            "drop,dir=in,from=2001:db8::/32",
            "reject,proto=udp,to=2001:db8::/32",
            "reject,dir=in,proto=udp,from=::1/128,port=53",
            "drop,dir=in,from=::/0",
        ] {
            assert_eq!(spec(s).to_string(), s);
        }
        assert_eq!(spec("deny,to=1.2.3.4").to_string(), "drop,to=1.2.3.4/32");
        assert_eq!(spec("accept,to=0.0.0.0/0").to_string(), "allow");
        assert_eq!(spec("allow,dir=out").to_string(), "allow");
        assert_eq!(
            spec("drop,dir=in,from=fd00::7").to_string(),
            "drop,dir=in,from=fd00::7/128"
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (s, why) in [
            ("permit", "not an action"),
            ("reject,proto=sctp", "expected tcp, udp, icmp or all"),
            ("reject,to=10.0.0.1/8", "host bits are set; use 10.0.0.0/8"),
            ("reject,to=10.0.0.0/33", "the prefix must be 0 to 32"),
            ("reject,to=example.com", "not an IPv4 or IPv6 address"),
            ("drop,dir=in,from=fd00::/129", "the prefix must be 0 to 128"),
            (
                "drop,dir=in,from=fd00::1/8",
                "host bits are set; use fd00::/8",
            ),
            ("reject,port=22", "port= needs proto=tcp or proto=udp"),
            ("reject,proto=tcp,port=0", "from 1 to 65535"),
            ("reject,proto=tcp,port=9-8", "a range N-M"),
            ("reject,proto=tcp,proto=udp", "proto= is given twice"),
            ("reject,via=1.2.3.4", "unknown part 'via=1.2.3.4'"),
            (
                "reject,from=1.2.3.4",
                "from= matches the clients of published ports; add dir=in",
            ),
            ("reject,dir=in,to=1.2.3.4", "matches its clients with from="),
            (
                "reject,dir=in,proto=icmp",
                "inbound rules see TCP and UDP only",
            ),
            ("reject,dir=sideways", "dir=sideways: expected out or in"),
            (
                "reject,dir=in,from=10.0.0.1/8",
                "from=10.0.0.1/8: host bits are set",
            ),
            (
                "reject,to=1.2.3.4,from=1.2.3.4",
                "to= and from= do not go together",
            ),
            ("reject,dir=in,dir=in", "dir= is given twice"),
        ] {
            let e = s.parse::<RuleSpec>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
            assert!(e.contains("write it as"), "{s}: {e}");
        }
    }

    #[test]
    fn matching_takes_protocol_network_and_ports() {
        let m = |r: &RuleSpec, proto, d: &str| {
            let d = dst(d);
            r.matches(proto, d.ip(), d.port())
        };
        let r = spec("reject,proto=tcp,to=10.1.0.0/16,port=20-22");
        assert!(m(&r, Proto::Tcp, "10.1.200.3:22"));
        assert!(!m(&r, Proto::Tcp, "10.1.200.3:23"));
        assert!(!m(&r, Proto::Udp, "10.1.200.3:22"));
        assert!(!m(&r, Proto::Tcp, "10.2.0.1:22"));
        let all = spec("drop");
        assert!(m(&all, Proto::Icmp, "8.8.8.8:0"));
        // IPv6 (the proxy's) is in 0.0.0.0/0 only; mapped IPv4 is IPv4.
        assert!(m(&all, Proto::Tcp, "[2001:db8::1]:80"));
        assert!(!m(&r, Proto::Tcp, "[2001:db8::1]:22"));
        assert!(m(&r, Proto::Tcp, "[::ffff:10.1.0.1]:22"));
        // An IPv6 network holds IPv6 clients only: ::/0 is every IPv6 one, no IPv4 one
        // (mapped ones are IPv4).
        let v6 = spec("drop,dir=in,from=2001:db8::/32");
        assert!(m(&v6, Proto::Tcp, "[2001:db8:1::5]:80"));
        assert!(!m(&v6, Proto::Tcp, "[2001:db9::5]:80"));
        assert!(!m(&v6, Proto::Tcp, "10.1.0.1:80"));
        let any6 = spec("drop,dir=in,from=::/0");
        assert!(m(&any6, Proto::Udp, "[::1]:5"));
        assert!(!m(&any6, Proto::Udp, "127.0.0.1:5"));
        assert!(!m(&any6, Proto::Udp, "[::ffff:127.0.0.1]:5"));
    }

    #[test]
    fn inbound_rules_see_only_published_clients() {
        let rules = Rules::new(&[
            spec("allow,dir=in,from=192.168.1.0/24"),
            spec("reject,dir=in,proto=tcp,port=8080"),
            spec("drop,proto=tcp"),
        ]);
        // Outbound flows never meet the inbound rules, nor clients the outbound ones.
        assert_eq!(
            rules.peek(Proto::Tcp, dst("10.0.0.1:8080")).action,
            Action::Drop
        );
        let client = dst("10.0.0.9:40000");
        assert_eq!(
            rules.check_in(Proto::Tcp, client, 8080, 0).action,
            Action::Reject
        );
        assert_eq!(
            rules.check_in(Proto::Tcp, client, 8081, 0).action,
            Action::Allow
        );
        assert_eq!(
            rules.check_in(Proto::Udp, client, 8080, 30).action,
            Action::Allow
        );
        let v = rules.check_in(Proto::Tcp, dst("192.168.1.5:40000"), 8080, 0);
        assert_eq!((v.action, v.rule.map(|r| r.0)), (Action::Allow, Some(1)));
        // A client on IPv6 is in from=0.0.0.0/0 only; an IPv4-mapped one is IPv4.
        assert_eq!(
            rules
                .check_in(Proto::Tcp, dst("[::ffff:192.168.1.5]:1"), 8080, 0)
                .action,
            Action::Allow
        );
        assert_eq!(
            rules
                .check_in(Proto::Tcp, dst("[2001:db8::1]:1"), 8080, 0)
                .action,
            Action::Reject
        );
        let l = rules.list();
        assert_eq!(l[0].packets, 2);
        assert_eq!(l[1].packets, 2);
        assert_eq!(l[2].packets, 0, "peek counts nothing");
        assert_eq!(rules.default_counters(Dir::In), (2, 0));
        assert_eq!(rules.default_counters(Dir::Out), (0, 0));
    }

    #[test]
    fn zero_resets_every_counter_and_flows_count_on() {
        let rules = Rules::new(&[spec("allow,proto=tcp"), spec("drop,dir=in")]);
        let v = rules.check(Proto::Tcp, dst("10.0.0.1:80"), 60);
        v.counters.add_bytes(500);
        rules.check(Proto::Udp, dst("10.0.0.1:53"), 40);
        rules.check_in(Proto::Udp, dst("10.0.0.2:5"), 53, 40);
        rules.check_in(Proto::Udp, dst("10.0.0.2:5"), 53, 40);
        assert_eq!(rules.list()[1].bytes, 80);
        rules.zero();
        assert!(rules.list().iter().all(|r| (r.packets, r.bytes) == (0, 0)));
        assert_eq!(rules.default_counters(Dir::Out), (0, 0));
        // A flow that was let through before goes on adding to its rule.
        v.counters.add_bytes(7);
        assert_eq!(rules.list()[0].bytes, 7);
    }

    #[test]
    fn first_match_wins_and_counts() {
        let rules = Rules::new(&[
            spec("allow,proto=tcp,to=10.0.0.5/32"),
            spec("reject,proto=tcp,to=10.0.0.0/8"),
        ]);
        let v = rules.check(Proto::Tcp, dst("10.0.0.5:80"), 60);
        assert_eq!(v.action, Action::Allow);
        v.counters.add_bytes(1000);
        assert_eq!(
            rules.check(Proto::Tcp, dst("10.0.0.6:80"), 60).action,
            Action::Reject
        );
        assert_eq!(
            rules.check(Proto::Tcp, dst("11.0.0.6:80"), 60).action,
            Action::Allow
        );
        let l = rules.list();
        assert_eq!((l[0].packets, l[0].bytes), (1, 1000));
        assert_eq!((l[1].packets, l[1].bytes), (1, 60));
        assert_eq!(rules.default_counters(Dir::Out), (1, 0));
    }

    #[test]
    fn the_hosts_loopback_is_checked_as_the_host_alias() {
        let alias = Ipv4Addr::new(192, 168, 127, 254);
        let rules = Rules::with_host_alias(&[spec("reject,to=192.168.127.254")], Some(alias));
        for d in [
            "127.0.0.1:22",
            "127.1.2.3:22",
            "0.0.0.0:22",
            "[::1]:22",
            "[::ffff:127.0.0.1]:22",
        ] {
            assert_eq!(rules.peek(Proto::Tcp, dst(d)).action, Action::Reject, "{d}");
        }
        assert_eq!(
            rules.peek(Proto::Tcp, dst("10.0.0.1:22")).action,
            Action::Allow
        );
        // Peeking counts nothing.
        assert_eq!(rules.list()[0].packets, 0);
    }

    #[test]
    fn rules_are_inserted_and_deleted_by_id() {
        let rules = Rules::new(&[spec("drop,proto=udp")]);
        let first = rules.add(spec("allow,proto=udp,port=53"), Some(1)).unwrap();
        assert_eq!(first.position, 1);
        let last = rules.add(spec("drop"), Some(99)).unwrap();
        assert_eq!(last.position, 3);
        assert_eq!(
            rules.check(Proto::Udp, dst("1.1.1.1:53"), 40).action,
            Action::Allow
        );
        let gone = rules.remove(first.id).unwrap();
        assert_eq!(gone.spec, spec("allow,proto=udp,port=53"));
        assert_eq!(rules.remove(first.id), Err(RuleError::NoSuchRule(first.id)));
        assert_eq!(
            rules.check(Proto::Udp, dst("1.1.1.1:53"), 40).action,
            Action::Drop
        );
        let ids: Vec<u64> = rules.list().iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.iter().all(|i| *i != first.id));
    }

    #[test]
    fn the_table_has_a_limit() {
        let rules = Rules::default();
        for _ in 0..MAX_RULES {
            rules.add(spec("allow"), None).unwrap();
        }
        assert_eq!(rules.add(spec("allow"), None), Err(RuleError::Full));
    }
}
