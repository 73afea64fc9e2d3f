//! Ferry's network side: the userspace stack that ends the guest's Ethernet frames and the services
//! behind it (DHCP, DNS, NAT to host sockets, port publishing).
//!
//! This crate knows nothing of virtio. It takes and produces Ethernet frames as byte slices, so it
//! can be tested without a VM. The vhost-user device in `ferry-devices` moves frames between the
//! guest's queues and this crate.

mod config;

pub use config::{
    Error, NetConfig, Subnet, DEFAULT_MAX_CONNECTIONS, DEFAULT_MTU, DEFAULT_SUBNET, GATEWAY_MAC,
    GUEST_MAC,
};

mod publish;

pub use publish::{PortSpec, PortSpecError, Protocol};

pub mod dhcp;
pub mod dns;
pub mod icmp;
pub mod nat;
pub mod ports;
pub mod stack;
pub mod tcp_nat;

/// Completes a partial checksum (a guest's offloaded TCP/UDP sum): the 16-bit field at
/// `start + offset` of `frame` holds the pseudo-header's sum, and the final sum covers
/// `frame[start..]`. Returns false when the offsets point outside the frame.
pub fn finish_partial_checksum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let at = start + offset;
    if start >= frame.len() || at + 2 > frame.len() {
        return false;
    }
    let sum = !smoltcp::wire::checksum::data(&frame[start..]);
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}
