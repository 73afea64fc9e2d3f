//! Rules for the guest's outbound traffic, with counters: the job of Docker's `DOCKER-USER`
//! chain, and `iptables -L -v` to see what each rule did.
//!
//! A rule is `ACTION[,proto=tcp|udp|icmp][,to=ADDR[/LEN]][,port=N[-M]]`, with ACTION one of
//! `allow`, `reject` or `drop`. Rules are checked in order on the first packet of each new
//! flow the guest opens (a TCP SYN, a UDP datagram to a destination it has no flow to, every
//! ICMP echo request), with the address the guest used (so `to=` names the host alias, not
//! 127.0.0.1). The first match decides; with none, the flow is allowed, as Docker's NAT is.
//! A verdict holds for the flow's life: a rule added later does not cut open flows, as with
//! iptables' usual `ESTABLISHED` accept. Refused flows keep no state, so each of their packets
//! is checked again.
//!
//! The gateway's HTTP proxy checks the servers it connects to directly; there the host's own
//! loopback is checked as the host alias, so `to=ALIAS` keeps the guest off the host's
//! loopback whichever way it asks.
//!
//! `reject` answers at once, as `iptables -j REJECT` does: TCP with RST (the guest's connect
//! fails with ECONNREFUSED), UDP and ICMP with ICMP port unreachable. `drop` says nothing, and
//! the guest times out.
//!
//! Each rule counts packets and bytes:
//! - `packets`: the guest packets it decided: the first packet of each flow it let through,
//!   every packet it refused;
//! - `bytes`: what the flows it let through carried, both ways (TCP and UDP payload, what the
//!   proxy relayed, the ICMP echo requests), and for `reject` and `drop` the size of the IP
//!   packets refused.
//!
//! The table is shared by the net thread, which reads it once per new flow, and the control
//! API, which changes it; counters are atomics that flows hold on to.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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

/// A malformed rule spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("rule {spec}: {reason}; write it as allow|reject|drop[,proto=tcp|udp|icmp][,to=ADDR[/LEN]][,port=N[-M]], for example reject,proto=tcp,to=10.0.0.0/8")]
pub struct RuleSpecError {
    spec: String,
    reason: String,
}

/// What a rule matches and what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// The verdict.
    pub action: Action,
    /// The protocol matched.
    pub proto: Proto,
    /// The destination network, as the guest addresses it.
    pub to: Ipv4Addr,
    /// Its prefix length (0 matches every address).
    pub prefix: u8,
    /// The destination ports matched, first and last (TCP and UDP only).
    pub ports: Option<(u16, u16)>,
}

impl RuleSpec {
    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// Whether a new flow of `proto` to `dst` (port 0 for ICMP) matches. An IPv6 address
    /// (only the proxy meets them) is in no IPv4 network but the whole of `to=0.0.0.0/0`.
    pub fn matches(&self, proto: Proto, dst: SocketAddr) -> bool {
        let in_network = match dst.ip() {
            IpAddr::V4(a) => (u32::from(a) & self.mask()) == u32::from(self.to),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(a) => (u32::from(a) & self.mask()) == u32::from(self.to),
                None => self.prefix == 0,
            },
        };
        (self.proto == Proto::Any || self.proto == proto)
            && in_network
            && self
                .ports
                .is_none_or(|(lo, hi)| (lo..=hi).contains(&dst.port()))
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
            proto: Proto::Any,
            to: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
            ports: None,
        };
        let (mut seen_proto, mut seen_to) = (false, false);
        for part in parts {
            match part.trim().split_once('=') {
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
                Some(("to", t)) if !seen_to => {
                    seen_to = true;
                    let (addr, len) = t.split_once('/').unwrap_or((t, "32"));
                    let addr: Ipv4Addr = addr
                        .parse()
                        .map_err(|_| err(format!("to={t}: {addr} is not an IPv4 address")))?;
                    let len: u8 = len
                        .parse()
                        .ok()
                        .filter(|l| *l <= 32)
                        .ok_or_else(|| err(format!("to={t}: the prefix must be 0 to 32")))?;
                    spec.prefix = len;
                    spec.to = Ipv4Addr::from(u32::from(addr) & spec.mask());
                    if spec.to != addr {
                        return Err(err(format!(
                            "to={t}: host bits are set; use {}/{len}",
                            spec.to
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
                Some((k @ ("proto" | "to" | "port"), _)) => {
                    return Err(err(format!("{k}= is given twice")))
                }
                _ => {
                    return Err(err(format!(
                        "unknown part '{part}'; the known ones are proto=, to= and port="
                    )))
                }
            }
        }
        if spec.ports.is_some() && !matches!(spec.proto, Proto::Tcp | Proto::Udp) {
            return Err(err("port= needs proto=tcp or proto=udp".into()));
        }
        Ok(spec)
    }
}

impl fmt::Display for RuleSpec {
    /// The canonical form, which parses back to the same rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.action)?;
        if self.proto != Proto::Any {
            write!(f, ",proto={}", self.proto)?;
        }
        if self.prefix != 0 {
            write!(f, ",to={}/{}", self.to, self.prefix)?;
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
    default: Arc<Counters>,
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

    /// The default policy's counters (flows no rule matched): packets and bytes.
    pub fn default_counters(&self) -> (u64, u64) {
        (
            self.default.packets.load(Ordering::Relaxed),
            self.default.bytes.load(Ordering::Relaxed),
        )
    }

    /// Decides a new flow of `proto` to `dst` whose first packet is `len` bytes (IP), and
    /// counts that packet.
    pub fn check(&self, proto: Proto, dst: SocketAddr, len: usize) -> Verdict {
        let v = self.peek(proto, dst);
        v.count(len);
        v
    }

    /// What the rules say of a flow of `proto` to `dst`, counting nothing.
    pub fn peek(&self, proto: Proto, dst: SocketAddr) -> Verdict {
        let host = match dst.ip() {
            IpAddr::V4(a) => a.is_loopback() || a.is_unspecified(),
            IpAddr::V6(a) => {
                a.is_loopback()
                    || a.is_unspecified()
                    || a.to_ipv4_mapped().is_some_and(|a| a.is_loopback())
            }
        };
        let dst = match self.host_alias {
            Some(alias) if host => SocketAddr::new(IpAddr::V4(alias), dst.port()),
            _ => dst,
        };
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let v = match t
            .0
            .iter()
            .enumerate()
            .find(|(_, r)| r.spec.matches(proto, dst))
        {
            Some((i, r)) => Verdict {
                action: r.spec.action,
                rule: Some((i + 1, r.spec)),
                counters: r.counters.clone(),
            },
            None => Verdict {
                action: Action::Allow,
                rule: None,
                counters: self.default.clone(),
            },
        };
        drop(t);
        v
    }
}

fn info(at: usize, r: &Rule) -> RuleInfo {
    RuleInfo {
        id: r.id,
        position: at + 1,
        spec: r.spec,
        packets: r.counters.packets.load(Ordering::Relaxed),
        bytes: r.counters.bytes.load(Ordering::Relaxed),
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
        ] {
            assert_eq!(spec(s).to_string(), s);
        }
        assert_eq!(spec("deny,to=1.2.3.4").to_string(), "drop,to=1.2.3.4/32");
        assert_eq!(spec("accept,to=0.0.0.0/0").to_string(), "allow");
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (s, why) in [
            ("permit", "not an action"),
            ("reject,proto=sctp", "expected tcp, udp, icmp or all"),
            ("reject,to=10.0.0.1/8", "host bits are set; use 10.0.0.0/8"),
            ("reject,to=10.0.0.0/33", "the prefix must be 0 to 32"),
            ("reject,to=example.com", "not an IPv4 address"),
            ("reject,port=22", "port= needs proto=tcp or proto=udp"),
            ("reject,proto=tcp,port=0", "from 1 to 65535"),
            ("reject,proto=tcp,port=9-8", "a range N-M"),
            ("reject,proto=tcp,proto=udp", "proto= is given twice"),
            ("reject,from=1.2.3.4", "unknown part 'from=1.2.3.4'"),
        ] {
            let e = s.parse::<RuleSpec>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
            assert!(e.contains("write it as"), "{s}: {e}");
        }
    }

    #[test]
    fn matching_takes_protocol_network_and_ports() {
        let r = spec("reject,proto=tcp,to=10.1.0.0/16,port=20-22");
        assert!(r.matches(Proto::Tcp, dst("10.1.200.3:22")));
        assert!(!r.matches(Proto::Tcp, dst("10.1.200.3:23")));
        assert!(!r.matches(Proto::Udp, dst("10.1.200.3:22")));
        assert!(!r.matches(Proto::Tcp, dst("10.2.0.1:22")));
        let all = spec("drop");
        assert!(all.matches(Proto::Icmp, dst("8.8.8.8:0")));
        // IPv6 (the proxy's) is in 0.0.0.0/0 only; mapped IPv4 is IPv4.
        assert!(all.matches(Proto::Tcp, dst("[2001:db8::1]:80")));
        assert!(!r.matches(Proto::Tcp, dst("[2001:db8::1]:22")));
        assert!(r.matches(Proto::Tcp, dst("[::ffff:10.1.0.1]:22")));
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
        assert_eq!(rules.default_counters(), (1, 0));
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
