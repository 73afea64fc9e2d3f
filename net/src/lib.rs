//! Ferry's network side: the userspace stack that ends the guest's Ethernet frames and the services
//! behind it (DHCP, DNS, NAT to host sockets, port publishing, the HTTP(S) proxy, rules with counters).
//!
//! This crate knows nothing of virtio. It takes and produces Ethernet frames as byte slices, so it
//! can be tested without a VM. The vhost-user device in `ferry-devices` moves frames between the
//! guest's queues and this crate.

mod config;

pub use config::{
    Error, NetConfig, Subnet, Subnet6, DEFAULT_MAX_CONNECTIONS, DEFAULT_MTU, DEFAULT_SUBNET,
    DEFAULT_SUBNET6, GATEWAY_MAC, GUEST_MAC,
};

mod publish;

pub use publish::{PortSpec, PortSpecError, Protocol};

pub mod dhcp;
pub mod dhcpv6;
pub mod dns;
pub mod ext_headers;
pub mod fragments;
pub mod guest;
pub mod guest_forward;
pub mod names;
pub mod ndp;
pub mod pcap;
pub mod pcap_live;
pub mod ports;
pub mod proxy;
pub mod rules;
pub mod stack;

/// Held by the tests that start a process and by those that need a port free the moment its
/// socket closes: a child between fork and exec holds a copy of every descriptor of this
/// (multi-threaded) test process, so a socket another test closes meanwhile stays bound.
#[cfg(test)]
pub(crate) static SPAWN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
