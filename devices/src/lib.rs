//! Ferry's vhost-user devices: virtio-net ([`VhostUserNetBackend`]) and virtio-fs
//! ([`VhostUserFsBackend`]), and the loop that serves one device's socket across frontend
//! reconnects ([`serve_connections`]).
//!
//! This crate knows virtio and vhost-user. It hands frames to `ferry-net` and FUSE requests to
//! `ferry-fs`, which know neither.

mod chain;
mod connection;
mod fs_inline;
mod fs_poll;
mod fs_pool;
mod lost_interrupts;
mod queue;
mod relay;
pub mod ring_state;
mod rx_steer;
mod tx_poll;
pub mod vhu_fs;
pub mod vhu_net;

pub use connection::{bind_socket, serve_connections, Endpoint, Error};
pub use vhu_fs::VhostUserFsBackend;
pub use vhu_net::{NetServices, VhostUserNetBackend};

/// `size` bytes of a device's config space from `offset`, as GET_CONFIG answers: exactly the
/// size asked for, and zero past the fields the device defines.
pub(crate) fn config_bytes(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    (offset as usize..(offset as usize).saturating_add(size as usize))
        .map(|i| space.get(i).copied().unwrap_or(0))
        .collect()
}

/// Guest memory as the vhost-user backends see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
/// Guest memory that the frontend can replace at any time (SET_MEM_TABLE).
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type both backends use.
pub type Vring = vhost_user_backend::VringRwLock<GuestMemoryAtomic>;

/// How much guest memory `mem` maps, in MiB to the nearest (a frontend may leave out holes such
/// as the legacy VGA window): the sum of the regions of the frontend's last memory table (0
/// before the first). Memory plugged into a running VM shows here once the frontend has sent
/// the table with it.
pub(crate) fn mapped_mib(mem: &GuestMemoryAtomic) -> u64 {
    use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
    let bytes: u64 = mem.memory().iter().map(|r| r.len()).sum();
    (bytes + (1 << 19)) >> 20
}

/// For tests: an eventfd set as `vring`'s call descriptor, to read the interrupts it gets.
#[cfg(test)]
pub(crate) fn call_eventfd(vring: &Vring) -> vmm_sys_util::eventfd::EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vhost_user_backend::VringT;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let fd = call.try_clone().unwrap().into_raw_fd();
    // SAFETY: `fd` is a fresh duplicate that nothing else owns.
    vring.set_call(Some(unsafe { std::fs::File::from_raw_fd(fd) }));
    call
}
