//! One table for every flow through the NAT, whatever its protocol, direction or family, and
//! the one enum of epoll sources.
//!
//! Theory of operation. A flow is a conversation between the guest and one host socket: a TCP
//! connection (the guest's, or a published port's client), a UDP flow (the guest's datagrams
//! to one destination, or one client of a published UDP port), or the guest's pings to one
//! host. Each entry carries both of its sides (the guest's end and the other end as the guest
//! sees it, and where the host socket really goes), the rule verdict that let it through (the
//! counters its traffic adds to), when it started and last moved, and what its protocol keeps
//! (`Kind`). Entries live in slots found by index, as passt's `flow.c` keeps them: an epoll
//! token names its flow by slot and generation, so an event is one array index away from its
//! flow, and an event for a flow that closed (a slot since reused) names an old generation and
//! finds nothing. New flows are looked up by `FlowKey` (protocol, the guest's address and its
//! port or echo identifier, the other end), in either address family.
//!
//! The protocols (`tcp`, `udp_flows`, `ping`) own what happens in their flows; this module
//! only keeps them. The caps are theirs too: the table counts flows per protocol for them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::rules::Counters;

/// Every source of events on the stack's epoll, as its token says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Token {
    /// The socket connected to the DNS upstream.
    DnsUpstream,
    /// The published ports' handover (an eventfd the ports thread signals).
    Published,
    /// A flow's host socket.
    Flow(FlowId),
}

/// Tokens of flows carry this tag in their top bits; the others are small numbers.
const FLOW_TAG: u64 = 1 << 63;

impl Token {
    /// The token as epoll carries it.
    pub(crate) fn to_u64(self) -> u64 {
        match self {
            Token::DnsUpstream => 1,
            Token::Published => 2,
            Token::Flow(id) => FLOW_TAG | (u64::from(id.gen) << 32) | u64::from(id.index),
        }
    }

    /// The source an epoll token names (`None`: not one of ours).
    pub(crate) fn from_u64(t: u64) -> Option<Token> {
        match t {
            1 => Some(Token::DnsUpstream),
            2 => Some(Token::Published),
            t if t & FLOW_TAG != 0 => Some(Token::Flow(FlowId {
                index: t as u32,
                gen: ((t & !FLOW_TAG) >> 32) as u32,
            })),
            _ => None,
        }
    }
}

/// A flow's slot and the generation of that slot when the flow took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FlowId {
    index: u32,
    gen: u32,
}

/// A flow's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Proto {
    Tcp,
    Udp,
    Ping,
}

/// What a new packet is looked up by: the protocol, the guest's address and port (its echo
/// identifier for pings) and the other end as the guest addresses it (port 0 for pings). It
/// names one flow whichever side opened it: a published client's flow is found by the guest's
/// replies. The guest's address is the one its packets came from, and where the flow's
/// replies go: a guest may use several of a family at once (IPv6 privacy addresses beside the
/// stable one, a temporary address that replaced another while flows of the old one live).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub(crate) proto: Proto,
    pub(crate) guest: IpAddr,
    pub(crate) guest_port: u16,
    pub(crate) remote: SocketAddr,
}

/// Who opened a flow, and for what: the control API and the audit log name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The guest, to a destination of its choosing.
    Outbound,
    /// A published port's client.
    Published,
    /// The guest, to the gateway's HTTP proxy (the proxy's own connections are not flows).
    Proxy,
    /// The guest, to the gateway's DNS over TCP (`dns_tcp`).
    Dns,
    /// The guest, to a guest forward's address (`--guest-forward`).
    Forward,
    /// A client of a forwarded UNIX socket (`--forward-socket`).
    Socket,
}

impl Origin {
    /// Its name in the API: outbound, published, proxy, dns, forward, socket.
    pub fn name(self) -> &'static str {
        match self {
            Origin::Outbound => "outbound",
            Origin::Published => "published",
            Origin::Proxy => "proxy",
            Origin::Dns => "dns",
            Origin::Forward => "forward",
            Origin::Socket => "socket",
        }
    }

    /// Whether the host side opened it.
    pub fn inbound(self) -> bool {
        matches!(self, Origin::Published | Origin::Socket)
    }
}

/// What crossed a flow one way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Payload bytes.
    pub bytes: u64,
    /// Packets: datagrams (UDP, ICMP) or segments (TCP, bare ACKs included, counted as
    /// they cross the link, `NetStack::tcp_in` and `tcp_count_to_guest`).
    pub packets: u64,
}

/// One flow.
pub(crate) struct Flow<K> {
    /// How the guest sees it.
    pub(crate) key: FlowKey,
    /// Where the host side goes: the socket's real destination (the host's loopback for the
    /// host alias, the DNS upstream for the gateway's port 53), or a published port's client.
    pub(crate) host: SocketAddr,
    /// Who opened it, and for what.
    pub(crate) origin: Origin,
    /// What went to the guest, and what came from it.
    pub(crate) to_guest: Traffic,
    pub(crate) from_guest: Traffic,
    /// The counters of the rule that let it through (None: no rules are set).
    pub(crate) counters: Option<Arc<Counters>>,
    /// When it opened, and when traffic last crossed it.
    pub(crate) since: Instant,
    pub(crate) last: Instant,
    /// What its protocol keeps.
    pub(crate) kind: K,
    /// The host socket's local and peer addresses as the API shows them, once asked for
    /// (`NetStack::flow_info`); emptied when the flow moves to a new host socket.
    pub(crate) host_addrs: std::cell::OnceCell<(Option<String>, Option<String>)>,
}

impl<K> Flow<K> {
    /// A flow opened now.
    pub(crate) fn new(key: FlowKey, host: SocketAddr, origin: Origin, kind: K) -> Self {
        let now = Instant::now();
        Flow {
            key,
            host,
            origin,
            to_guest: Traffic::default(),
            from_guest: Traffic::default(),
            counters: None,
            since: now,
            last: now,
            kind,
            host_addrs: std::cell::OnceCell::new(),
        }
    }

    /// Counts a datagram of `n` bytes to the guest, for the flow and its rule, and marks the
    /// flow busy.
    pub(crate) fn count_to_guest(&mut self, n: usize) {
        self.to_guest.packets += 1;
        self.count_bytes(n, 0);
    }

    /// Counts a datagram of `n` bytes from the guest, as [`count_to_guest`](Self::count_to_guest).
    pub(crate) fn count_from_guest(&mut self, n: usize) {
        self.from_guest.packets += 1;
        self.count_bytes(0, n);
    }

    /// Counts stream bytes each way, for the flow and its rule, and marks the flow busy.
    pub(crate) fn count_bytes(&mut self, to_guest: usize, from_guest: usize) {
        self.to_guest.bytes += to_guest as u64;
        self.from_guest.bytes += from_guest as u64;
        if let Some(c) = &self.counters {
            c.add_bytes(to_guest + from_guest);
        }
        self.last = Instant::now();
    }
}

struct Slot<K> {
    gen: u32,
    flow: Option<Flow<K>>,
}

/// The flows, by slot and by key.
pub(crate) struct FlowTable<K> {
    slots: Vec<Slot<K>>,
    free: Vec<u32>,
    by_key: HashMap<FlowKey, FlowId>,
    counts: [usize; 3],
}

impl<K> Default for FlowTable<K> {
    fn default() -> Self {
        FlowTable {
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            counts: [0; 3],
        }
    }
}

fn slot_of(p: Proto) -> usize {
    match p {
        Proto::Tcp => 0,
        Proto::Udp => 1,
        Proto::Ping => 2,
    }
}

impl<K> FlowTable<K> {
    /// Adds `flow`; `None` if its key is taken (the caller looked first).
    pub(crate) fn insert(&mut self, flow: Flow<K>) -> Option<FlowId> {
        if self.by_key.contains_key(&flow.key) {
            return None;
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { gen: 0, flow: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        let id = FlowId {
            index,
            gen: slot.gen,
        };
        self.counts[slot_of(flow.key.proto)] += 1;
        self.by_key.insert(flow.key, id);
        slot.flow = Some(flow);
        Some(id)
    }

    /// The id the next [`insert`](Self::insert) gives (a flow registers its host socket under
    /// it before it goes in).
    pub(crate) fn next_id(&self) -> FlowId {
        match self.free.last() {
            Some(&index) => FlowId {
                index,
                gen: self.slots[index as usize].gen,
            },
            None => FlowId {
                index: self.slots.len() as u32,
                gen: 0,
            },
        }
    }

    /// The flow named `key`.
    pub(crate) fn lookup(&self, key: &FlowKey) -> Option<FlowId> {
        self.by_key.get(key).copied()
    }

    /// The flow `id`, unless it has closed since.
    pub(crate) fn get(&self, id: FlowId) -> Option<&Flow<K>> {
        let s = self.slots.get(id.index as usize)?;
        (s.gen == id.gen).then_some(())?;
        s.flow.as_ref()
    }

    /// The flow `id`, unless it has closed since.
    pub(crate) fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow<K>> {
        let s = self.slots.get_mut(id.index as usize)?;
        (s.gen == id.gen).then_some(())?;
        s.flow.as_mut()
    }

    /// The flow named `key`, by key.
    pub(crate) fn by_key_mut(&mut self, key: &FlowKey) -> Option<(FlowId, &mut Flow<K>)> {
        let id = self.lookup(key)?;
        self.get_mut(id).map(|f| (id, f))
    }

    /// Takes flow `id` out; its slot is reused under the next generation.
    pub(crate) fn remove(&mut self, id: FlowId) -> Option<Flow<K>> {
        let s = self.slots.get_mut(id.index as usize)?;
        if s.gen != id.gen {
            return None;
        }
        let flow = s.flow.take()?;
        s.gen = s.gen.wrapping_add(1) & 0x7fff_ffff;
        self.free.push(id.index);
        self.by_key.remove(&flow.key);
        self.counts[slot_of(flow.key.proto)] -= 1;
        Some(flow)
    }

    /// How many flows of `proto` are open.
    pub(crate) fn count(&self, proto: Proto) -> usize {
        self.counts[slot_of(proto)]
    }

    /// Every open flow.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (FlowId, &Flow<K>)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.flow.as_ref().map(|f| {
                (
                    FlowId {
                        index: i as u32,
                        gen: s.gen,
                    },
                    f,
                )
            })
        })
    }

    /// The ids of open flows that `pick` chooses, into `out` (cleared first): a caller that
    /// changes the table while it walks them takes their ids first.
    pub(crate) fn select(&self, out: &mut Vec<FlowId>, mut pick: impl FnMut(&Flow<K>) -> bool) {
        out.clear();
        out.extend(self.iter().filter(|(_, f)| pick(f)).map(|(id, _)| id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            proto: Proto::Udp,
            guest: "fd00::2".parse().unwrap(),
            guest_port: port,
            remote: "[2001:db8::1]:53".parse().unwrap(),
        }
    }

    #[test]
    fn tokens_round_trip() {
        let mut t = FlowTable::default();
        let id = t
            .insert(Flow::new(key(1), key(1).remote, Origin::Outbound, ()))
            .unwrap();
        for tok in [Token::DnsUpstream, Token::Published, Token::Flow(id)] {
            assert_eq!(Token::from_u64(tok.to_u64()), Some(tok));
        }
        assert_eq!(Token::from_u64(0), None);
        assert_eq!(Token::from_u64(77), None);
    }

    #[test]
    fn a_closed_flows_token_finds_nothing_once_its_slot_is_reused() {
        let mut t = FlowTable::default();
        let a = t
            .insert(Flow::new(key(1), key(1).remote, Origin::Outbound, 1))
            .unwrap();
        assert!(t
            .insert(Flow::new(key(1), key(1).remote, Origin::Outbound, 9))
            .is_none());
        assert_eq!(t.count(Proto::Udp), 1);
        assert_eq!(t.remove(a).map(|f| f.kind), Some(1));
        let next = t.next_id();
        let b = t
            .insert(Flow::new(key(2), key(2).remote, Origin::Outbound, 2))
            .unwrap();
        assert_eq!(next, b);
        assert!(t.get(a).is_none(), "a stale id must not find the new flow");
        assert!(t.remove(a).is_none());
        assert_eq!(t.get(b).map(|f| f.kind), Some(2));
        assert_eq!(t.lookup(&key(2)), Some(b));
        assert_eq!(t.lookup(&key(1)), None);
        assert_eq!(t.count(Proto::Udp), 1);
        assert_eq!(t.count(Proto::Tcp), 0);
        let mut ids = Vec::new();
        t.select(&mut ids, |_| true);
        assert_eq!(ids, vec![b]);
    }
}
