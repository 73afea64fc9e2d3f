//! Cloud Hypervisor's vhost-user frontends, replayed without a VM: frames and FUSE requests
//! cross `ferry serve` through real split virtqueues set up as Cloud Hypervisor sets them up.
//!
//! What this proves. `tests/vhost_user.rs` negotiates the way QEMU does and stops at
//! SET_MEM_TABLE. Here the test is Cloud Hypervisor (CH) and the guest driver at once: it
//! sends CH's messages in CH's order with CH's feature masks, lays out the virtqueues in a
//! memfd it shares with Ferry, and then moves data through them. The net device must answer
//! an ARP request for the gateway on its RX ring and return the request on its TX ring; the
//! fs device must answer FUSE_INIT on its request queue, and with two request queues
//! (`--fs num_queues=2`) a request on each. Each answer is read back from guest
//! memory, and each ring's call eventfd must have fired, so a device that negotiates fine
//! but cannot find, read, write or complete the rings fails here, with no QEMU or guest
//! kernel in the way.
//!
//! Theory of operation. CH's frontend is `virtio-devices/src/vhost_user/` in
//! cloud-hypervisor/cloud-hypervisor (read at commit ae44c2971c83): `vu_common_ctrl.rs`
//! (`VhostUserHandle`: connect, negotiate, set up the rings, reset), `net.rs` and `fs.rs`
//! (what each device asks for), `mod.rs` (`DEFAULT_VIRTIO_FEATURES`, `activate`). The
//! sequence is
//!
//! 1. `connect_vhost_user`: connect, SET_OWNER, GET_FEATURES.
//! 2. `negotiate_features_vhost_user`: ack the intersection of what CH offers and what the
//!    backend offers; with VHOST_USER_F_PROTOCOL_FEATURES in it, GET_PROTOCOL_FEATURES and
//!    SET_PROTOCOL_FEATURES (the intersection again); with REPLY_ACK, NEED_REPLY on every
//!    message from then on.
//! 3. `Net::new` / `Fs::new`: GET_QUEUE_NUM (with MQ), and for net GET_CONFIG (with CONFIG)
//!    for the backend's MAC and MTU.
//! 4. The guest acks features; CH keeps VHOST_USER_F_PROTOCOL_FEATURES set on its behalf
//!    (no guest knows that bit) and at activation `setup_vhost_user` sends SET_FEATURES (the
//!    acks, masked with the backend's features), SET_MEM_TABLE, SET_VRING_NUM for every ring,
//!    then per ring SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL, SET_VRING_KICK, and last
//!    SET_VRING_ENABLE 1 for every ring.
//! 5. On a guest reset, `reset_vhost_user`: SET_VRING_ENABLE 0 and GET_VRING_BASE per ring.
//!
//! The vring addresses in SET_VRING_ADDR are the frontend's own virtual addresses, which
//! the backend translates through the memory table's `userspace_addr`; so guest RAM here is
//! a `GuestMemoryMmap` over a memfd (vm-memory maps a file MAP_SHARED), exactly what CH
//! passes, and the test reads and writes guest memory through that same mapping. The rings
//! are laid out by hand with the virtio 1.x split-ring alignments (descriptor table 16,
//! available ring 2, used ring 4), as a guest driver would.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_tests::{wait_for, FerryProcess};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

// Feature bits (virtio 1.x; virtio_net.h; virtio_ring.h).
const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_MTU: u64 = 1 << 3;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_F_IN_ORDER: u64 = 1 << 35;
const VIRTIO_F_ORDER_PLATFORM: u64 = 1 << 36;
const VIRTIO_F_NOTIFICATION_DATA: u64 = 1 << 38;
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// CH `mod.rs` `DEFAULT_VIRTIO_FEATURES`: what every CH vhost-user device offers.
const CH_DEFAULT_VIRTIO_FEATURES: u64 = VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_F_VERSION_1
    | VIRTIO_F_IN_ORDER
    | VIRTIO_F_ORDER_PLATFORM
    | VIRTIO_F_NOTIFICATION_DATA
    | PROTOCOL_FEATURES
    | VhostUserVirtioFeatures::LOG_ALL.bits();

/// CH `net.rs` `Net::new`: `backend_avail_features`, with CH's defaults `offload_csum`,
/// `offload_tso` and `offload_ufo` all on.
const CH_NET_FEATURES: u64 = VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_CTRL_VQ
    | VIRTIO_NET_F_GUEST_ANNOUNCE
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MQ
    | CH_DEFAULT_VIRTIO_FEATURES
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_UFO
    | VIRTIO_NET_F_GUEST_UFO;

/// CH `net.rs` `Net::new`: `avail_protocol_features`.
fn ch_net_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::CONFIG
}

/// CH `fs.rs` `Fs::new`: `avail_protocol_features` (no CONFIG: CH builds the fs config space,
/// tag and request queue count, from its own `--fs tag=` option).
fn ch_fs_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// CH `vm_config.rs` defaults: `--net num_queues=2,queue_size=256` (one pair) and
/// `--fs num_queues=1,queue_size=1024` (plus the high-priority queue: `fs.rs` adds
/// `NUM_QUEUE_OFFSET`).
const NET_NUM_QUEUES: usize = 2;
const NET_QUEUE_SIZE: u16 = 256;
const FS_NUM_QUEUES: usize = 1 + 1;
const FS_QUEUE_SIZE: u16 = 1024;

/// CH `net_util` `VirtioNetConfig`: mac, status, max_virtqueue_pairs, mtu, speed, duplex
/// (packed), the size CH asks GET_CONFIG for.
const CH_NET_CONFIG_LEN: usize = 17;

/// Split-ring descriptor flags.
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// `virtio_net_hdr_v1`, before every frame (VERSION_1: 12 bytes, `num_buffers` included).
const NET_HDR_LEN: usize = 12;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// Ferry's network plan by default: its MAC for the guest (what GET_CONFIG reports), the
/// gateway's MAC, the gateway's and the guest's addresses.
const FERRY_GUEST_MAC: [u8; 6] = [0x02, 0x46, 0x52, 0x59, 0x00, 0x02];
const FERRY_GATEWAY_MAC: [u8; 6] = [0x02, 0x46, 0x52, 0x59, 0x00, 0x01];
const GATEWAY_IP: [u8; 4] = [192, 168, 127, 1];
const GUEST_IP: [u8; 4] = [192, 168, 127, 2];
/// The MAC the test's guest uses: not Ferry's default, so the reply must be addressed to
/// what the request said, not to what Ferry assumed.
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
const MTU: u16 = 65520;

/// How long the device has to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Guest RAM: 4 MiB at guest-physical 0 in a memfd, mapped shared in this process (the
/// mapping CH would have), with a bump allocator for rings and buffers.
struct GuestRam {
    mem: GuestMemoryMmap,
    next: u64,
}

const RAM_SIZE: usize = 4 << 20;

impl GuestRam {
    fn new() -> Self {
        // SAFETY: the name is a valid C string; memfd_create has no other memory effects.
        let fd = unsafe { libc::memfd_create(c"ferry-ch-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(RAM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            RAM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("map the guest RAM memfd");
        GuestRam { mem, next: 0 }
    }

    /// `len` bytes of guest memory aligned to `align`; returns their guest-physical address.
    fn alloc(&mut self, len: usize, align: u64) -> u64 {
        let at = self.next.next_multiple_of(align);
        self.next = at + len as u64;
        assert!(self.next <= RAM_SIZE as u64, "guest RAM exhausted");
        at
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    /// This process's address of guest range `gpa..gpa+len`, as CH's
    /// `get_host_address_range` gives it for SET_VRING_ADDR.
    fn host_addr(&self, gpa: u64, len: usize) -> u64 {
        assert!(self.mem.check_range(GuestAddress(gpa), len));
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    /// CH `vu_common_ctrl.rs` `update_mem_table`: one region per RAM region, its fd, its
    /// offset in that fd, and the frontend's own mapping address.
    fn memory_table(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .map(|region| {
                let file = region.file_offset().expect("guest RAM is memfd-backed");
                VhostUserMemoryRegionInfo {
                    guest_phys_addr: region.start_addr().raw_value(),
                    memory_size: region.len(),
                    userspace_addr: region.as_ptr() as u64,
                    mmap_offset: file.start(),
                    mmap_handle: file.file().as_raw_fd(),
                }
            })
            .collect()
    }
}

/// One buffer of a descriptor chain: guest-physical address, length, device-writable.
#[derive(Clone, Copy)]
struct Buf {
    gpa: u64,
    len: u32,
    writable: bool,
}

impl Buf {
    fn readable(gpa: u64, len: usize) -> Self {
        Buf {
            gpa,
            len: len as u32,
            writable: false,
        }
    }

    fn writable(gpa: u64, len: usize) -> Self {
        Buf {
            gpa,
            len: len as u32,
            writable: true,
        }
    }
}

/// A split virtqueue in guest RAM, driven from the driver's side, with its kick and call
/// eventfds. Descriptors are handed out once each (the tests post fewer than the ring holds).
struct SplitQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    kick: EventFd,
    call: EventFd,
}

impl SplitQueue {
    /// Lays out a ring of `size` entries: descriptor table (16 bytes each, 16-aligned),
    /// available ring (flags, idx, ring[size], used_event; 2-aligned) and used ring (flags,
    /// idx, {id, len}[size], avail_event; 4-aligned), all zero.
    fn new(ram: &mut GuestRam, size: u16) -> Self {
        let n = usize::from(size);
        let desc = ram.alloc(16 * n, 16);
        let avail = ram.alloc(6 + 2 * n, 2);
        let used = ram.alloc(6 + 8 * n, 4);
        SplitQueue {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    /// CH `setup_vhost_user`'s `VringConfigData`: sizes and this process's addresses of the
    /// three parts (CH computes the ranges the same way: 16 * size, 4 + 8 * size, 4 + 2 * size).
    fn config_data(&self, ram: &GuestRam) -> VringConfigData {
        let n = usize::from(self.size);
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: ram.host_addr(self.desc, 16 * n),
            used_ring_addr: ram.host_addr(self.used, 4 + 8 * n),
            avail_ring_addr: ram.host_addr(self.avail, 4 + 2 * n),
            log_addr: None,
        }
    }

    /// The available ring's idx as it is in guest memory: what CH sends as SET_VRING_BASE.
    fn avail_idx_in_memory(&self, ram: &GuestRam) -> u16 {
        ram.mem
            .load(GuestAddress(self.avail + 2), Ordering::Acquire)
            .unwrap()
    }

    fn take_desc(&mut self) -> u16 {
        let i = self.next_desc;
        assert!(i < self.size, "out of descriptors");
        self.next_desc += 1;
        i
    }

    /// Writes `bufs` as a chain into the table at `table` from entry `first` on.
    fn write_chain(ram: &GuestRam, table: u64, first: u16, bufs: &[Buf]) {
        for (k, b) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let more = k + 1 < bufs.len();
            let flags = if b.writable { VRING_DESC_F_WRITE } else { 0 }
                | if more { VRING_DESC_F_NEXT } else { 0 };
            let next = if more { i + 1 } else { 0 };
            write_desc(ram, table, i, b.gpa, b.len, flags, next);
        }
    }

    /// Posts `bufs` as one chain of direct descriptors; returns the head's index.
    fn add_chain(&mut self, ram: &GuestRam, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for _ in bufs {
            self.take_desc();
        }
        Self::write_chain(ram, self.desc, head, bufs);
        self.publish(ram, head);
        head
    }

    /// Posts `bufs` through an indirect descriptor table (VIRTIO_RING_F_INDIRECT_DESC), as
    /// Linux does for a multi-buffer request; returns the head's index.
    fn add_indirect_chain(&mut self, ram: &mut GuestRam, bufs: &[Buf]) -> u16 {
        let table = ram.alloc(16 * bufs.len(), 16);
        Self::write_chain(ram, table, 0, bufs);
        let head = self.take_desc();
        let len = (16 * bufs.len()) as u32;
        write_desc(ram, self.desc, head, table, len, VRING_DESC_F_INDIRECT, 0);
        self.publish(ram, head);
        head
    }

    /// Puts `head` in the available ring and publishes it (the idx store is a release: the
    /// descriptors and the ring entry are visible to the device before the new idx).
    fn publish(&mut self, ram: &GuestRam, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        ram.write(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.mem
            .store(
                self.avail_idx,
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .unwrap();
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// The used ring's idx (acquire: the entries and buffers it covers are visible after).
    fn used_idx(&self, ram: &GuestRam) -> u16 {
        ram.mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .unwrap()
    }

    /// Used ring entry `i`: (descriptor head id, bytes written).
    fn used_elem(&self, ram: &GuestRam, i: u16) -> (u32, u32) {
        let e = ram.read(self.used + 4 + 8 * u64::from(i % self.size), 8);
        (
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            u32::from_le_bytes(e[4..8].try_into().unwrap()),
        )
    }

    /// Waits until the device has used `n` chains; `None` after the timeout.
    fn wait_used(&self, ram: &GuestRam, n: u16) -> Option<u16> {
        wait_for(ANSWER_TIMEOUT, || {
            let idx = self.used_idx(ram);
            (idx >= n).then_some(idx)
        })
    }

    /// Waits until the device has signalled the call eventfd; returns whether it did.
    fn wait_call(&self) -> bool {
        wait_for(ANSWER_TIMEOUT, || self.call.read().ok()).is_some()
    }
}

/// Writes descriptor `i` of the table at `table`.
fn write_desc(ram: &GuestRam, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    ram.write(table + 16 * u64::from(i), &d);
}

/// CH's `VhostUserHandle`, reduced to the steps these devices take.
struct ChFrontend {
    vu: Frontend,
    /// GET_FEATURES' answer, kept for masking SET_FEATURES (as CH does).
    backend_features: u64,
}

impl ChFrontend {
    /// CH `vu_common_ctrl.rs` `connect_vhost_user` (client mode): connect (CH retries for a
    /// minute; the socket exists already here), then SET_OWNER and GET_FEATURES.
    fn connect(socket: &Path, num_queues: usize) -> Self {
        let vu = wait_for(ANSWER_TIMEOUT, || {
            Frontend::connect(socket, num_queues as u64).ok()
        })
        .expect("connect to ferry's vhost-user socket");
        vu.set_owner().expect("SET_OWNER");
        let backend_features = vu.get_features().expect("GET_FEATURES");
        ChFrontend {
            vu,
            backend_features,
        }
    }

    /// CH `vu_common_ctrl.rs` `negotiate_features_vhost_user`: returns the acked virtio and
    /// protocol features.
    fn negotiate(
        &mut self,
        avail_features: u64,
        avail_protocol: VhostUserProtocolFeatures,
    ) -> (u64, VhostUserProtocolFeatures) {
        let acked = avail_features & self.backend_features;
        let acked_protocol = if acked & PROTOCOL_FEATURES != 0 {
            let backend_protocol = self
                .vu
                .get_protocol_features()
                .expect("GET_PROTOCOL_FEATURES");
            let acked_protocol = avail_protocol & backend_protocol;
            self.vu
                .set_protocol_features(acked_protocol)
                .expect("SET_PROTOCOL_FEATURES");
            acked_protocol
        } else {
            VhostUserProtocolFeatures::empty()
        };
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message from here on asks for an ack, which the frontend waits for.
            self.vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        (acked, acked_protocol)
    }

    /// CH `vu_common_ctrl.rs` `setup_vhost_user`, at device activation, for `queues` as
    /// vrings 0, 1, ... (no inflight tracking and no backend request channel: neither is
    /// acked with Ferry).
    fn setup(&mut self, ram: &GuestRam, queues: &[&SplitQueue], acked_features: u64) {
        // "Mask out any frontend only negotiated features" (VIRTIO_NET_F_MAC, for one).
        let acked_features = acked_features & self.backend_features;
        self.vu.set_features(acked_features).expect("SET_FEATURES");
        self.vu
            .set_mem_table(&ram.memory_table())
            .expect("SET_MEM_TABLE");
        // CH sends every ring's size first ("it could tell backends, like SPDK, how many
        // virt queues to be handled").
        for (i, q) in queues.iter().enumerate() {
            self.vu.set_vring_num(i, q.size).expect("SET_VRING_NUM");
        }
        for (i, q) in queues.iter().enumerate() {
            self.vu
                .set_vring_addr(i, &q.config_data(ram))
                .expect("SET_VRING_ADDR");
            self.vu
                .set_vring_base(i, q.avail_idx_in_memory(ram))
                .expect("SET_VRING_BASE");
            self.vu.set_vring_call(i, &q.call).expect("SET_VRING_CALL");
            self.vu.set_vring_kick(i, &q.kick).expect("SET_VRING_KICK");
        }
        for i in 0..queues.len() {
            self.vu
                .set_vring_enable(i, true)
                .expect("SET_VRING_ENABLE 1");
        }
    }

    /// CH `vu_common_ctrl.rs` `reset_vhost_user` (the guest resets the device): per ring,
    /// SET_VRING_ENABLE 0 and GET_VRING_BASE. Returns the bases.
    fn reset(&mut self, num_queues: usize) -> Vec<u32> {
        (0..num_queues)
            .map(|i| {
                self.vu
                    .set_vring_enable(i, false)
                    .expect("SET_VRING_ENABLE 0");
                self.vu.get_vring_base(i).expect("GET_VRING_BASE")
            })
            .collect()
    }
}

/// `ferry serve` with a net device and a share, as the other vhost-user tests start it.
fn start(dir: &Path) -> (FerryProcess, PathBuf, PathBuf) {
    let net = dir.join("net.sock");
    let fs = dir.join("fs.sock");
    let share = dir.join("share");
    std::fs::create_dir(&share).unwrap();
    let ferry = FerryProcess::serve(
        dir,
        &[
            "--net-socket".into(),
            net.display().to_string(),
            "--share".into(),
            format!("tag=t,dir={},socket={}", share.display(), fs.display()),
            "--mtu".into(),
            MTU.to_string(),
        ],
        &[net.clone(), fs.clone()],
    );
    (ferry, net, fs)
}

/// The guest's "who has 192.168.127.1?", padded to the Ethernet minimum of 60 bytes.
fn arp_request() -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    // Ethernet, IPv4, 6-byte and 4-byte addresses, request.
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GATEWAY_IP);
    f.resize(60, 0);
    f
}

/// Whether `frame` is the gateway's ARP reply to [`arp_request`].
fn is_gateway_arp_reply(frame: &[u8]) -> bool {
    frame.len() >= 42
        && frame[0..6] == GUEST_MAC
        && frame[6..12] == FERRY_GATEWAY_MAC
        && frame[12..14] == [0x08, 0x06]
        && frame[14..22] == [0, 1, 0x08, 0x00, 6, 4, 0, 2]
        && frame[22..28] == FERRY_GATEWAY_MAC
        && frame[28..32] == GATEWAY_IP
        && frame[32..38] == GUEST_MAC
        && frame[38..42] == GUEST_IP
}

#[test]
fn net_frames_cross_rings_set_up_as_cloud_hypervisor_does() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ferry, net, _) = start(dir.path());

    // CH vu_common_ctrl.rs connect_vhost_user: connect, SET_OWNER, GET_FEATURES.
    let mut vu = ChFrontend::connect(&net, NET_NUM_QUEUES);
    // CH vu_common_ctrl.rs negotiate_features_vhost_user, with net.rs's masks:
    // GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, then NEED_REPLY on everything.
    let (backend_acked, acked_protocol) = vu.negotiate(CH_NET_FEATURES, ch_net_protocol_features());
    assert_ne!(
        backend_acked & PROTOCOL_FEATURES,
        0,
        "no VHOST_USER_F_PROTOCOL_FEATURES"
    );
    // CH needs MQ to ask GET_QUEUE_NUM, CONFIG to take the MAC and MTU from the backend and
    // REPLY_ACK to learn of failed set-up messages.
    let needed = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(
        acked_protocol.contains(needed),
        "CH acks protocol features {acked_protocol:?}"
    );

    // CH net.rs Net::new: GET_QUEUE_NUM; CH fails the device ("requested too many queues")
    // when it asked for more rings than the answer. CH compares its ring count; Ferry answers
    // in queue pairs, as QEMU reads it, so CH can use at most that many rings.
    let backend_num_queues = vu.vu.get_queue_num().expect("GET_QUEUE_NUM");
    assert!(
        NET_NUM_QUEUES as u64 <= backend_num_queues,
        "CH would refuse the device: {NET_NUM_QUEUES} rings wanted, {backend_num_queues} offered"
    );

    // CH net.rs Net::new: GET_CONFIG for a whole VirtioNetConfig. With MAC and MTU acked, and
    // no mac= or mtu= of CH's own, the guest sees the backend's MAC and MTU.
    let (_, cfg) = vu
        .vu
        .get_config(
            0,
            CH_NET_CONFIG_LEN as u32,
            VhostUserConfigFlags::WRITABLE,
            &[0u8; CH_NET_CONFIG_LEN],
        )
        .expect("GET_CONFIG");
    assert_eq!(cfg.len(), CH_NET_CONFIG_LEN);
    assert_ne!(backend_acked & VIRTIO_NET_F_MAC, 0, "MAC not acked");
    assert_ne!(backend_acked & VIRTIO_NET_F_MTU, 0, "MTU not acked");
    assert_eq!(&cfg[0..6], &FERRY_GUEST_MAC, "the MAC in config space");
    let mtu = u16::from_le_bytes([cfg[10], cfg[11]]);
    assert_eq!(mtu, MTU, "the MTU in config space");

    // The guest driver (played here) acks from what CH offers it: CH's net.rs
    // guest_avail_features adds MAC (and MTU) to what the backend acked. It leaves out
    // EVENT_IDX (so every used buffer raises an interrupt) and MRG_RXBUF (so each frame lands
    // in one RX buffer, sized for the MTU). It takes MQ, as a Linux guest does, and so needs
    // CTRL_VQ beside it: Linux fails the probe of a NIC with MQ but no CTRL_VQ
    // (virtnet_validate_features), and CH offers the guest a control queue (its own, served
    // by the VMM) only when the backend offers CTRL_VQ.
    let guest_avail = backend_acked | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU;
    assert!(
        guest_avail & VIRTIO_NET_F_MQ == 0 || guest_avail & VIRTIO_NET_F_CTRL_VQ != 0,
        "MQ without CTRL_VQ: a Linux guest under CH would refuse the NIC"
    );
    let guest_acks = VIRTIO_F_VERSION_1
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_MTU
        | VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_MQ
        | VIRTIO_NET_F_CTRL_VQ
        | VIRTIO_RING_F_INDIRECT_DESC;
    assert_eq!(
        guest_avail & guest_acks,
        guest_acks,
        "features the guest needs are missing"
    );
    // CH keeps VHOST_USER_F_PROTOCOL_FEATURES in the acked set on the guest's behalf.
    let acked_features = guest_acks | (backend_acked & PROTOCOL_FEATURES);

    // Device activation, CH vu_common_ctrl.rs setup_vhost_user: SET_FEATURES, SET_MEM_TABLE,
    // SET_VRING_NUM x2, then per ring SET_VRING_ADDR/BASE/CALL/KICK, then SET_VRING_ENABLE x2.
    let mut ram = GuestRam::new();
    let mut rx = SplitQueue::new(&mut ram, NET_QUEUE_SIZE);
    let mut tx = SplitQueue::new(&mut ram, NET_QUEUE_SIZE);
    vu.setup(&ram, &[&rx, &tx], acked_features);

    // The guest fills the RX ring (write-only buffers with room for the largest frame the
    // MTU allows, after the header), marks them so writes show, and kicks.
    let rx_len = NET_HDR_LEN + usize::from(mtu) + 14 + 4;
    let mut rx_bufs = Vec::new();
    for _ in 0..8 {
        let gpa = ram.alloc(rx_len, 8);
        ram.write(gpa, &vec![0xa5; rx_len]);
        let head = rx.add_chain(&ram, &[Buf::writable(gpa, rx_len)]);
        rx_bufs.push((head, gpa));
    }
    rx.kick();

    // The guest asks for the gateway's MAC on the TX ring: header, then the frame.
    let mut packet = vec![0u8; NET_HDR_LEN];
    packet.extend_from_slice(&arp_request());
    let tx_gpa = ram.alloc(packet.len(), 8);
    ram.write(tx_gpa, &packet);
    let tx_head = tx.add_chain(&ram, &[Buf::readable(tx_gpa, packet.len())]);
    tx.kick();

    // The reply arrives on the RX ring, in one of the posted buffers.
    let reply = wait_for(ANSWER_TIMEOUT, || {
        let used = rx.used_idx(&ram);
        (0..used).find_map(|i| {
            let (id, len) = rx.used_elem(&ram, i);
            let &(_, gpa) = rx_bufs.iter().find(|(h, _)| u32::from(*h) == id)?;
            let bytes = ram.read(gpa, len as usize);
            (bytes.len() >= NET_HDR_LEN && is_gateway_arp_reply(&bytes[NET_HDR_LEN..]))
                .then_some((id, len, bytes))
        })
    });
    let Some((id, len, bytes)) = reply else {
        // What the device did put there: (id, len, num_buffers) per used entry.
        let used: Vec<_> = (0..rx.used_idx(&ram))
            .map(|i| {
                let (id, len) = rx.used_elem(&ram, i);
                let gpa = rx_bufs
                    .iter()
                    .find(|(h, _)| u32::from(*h) == id)
                    .map(|b| b.1);
                let nb = gpa
                    .map(|g| ram.read(g + 10, 2))
                    .map(|b| u16::from_le_bytes([b[0], b[1]]));
                (id, len, nb)
            })
            .collect();
        panic!(
            "no whole ARP reply in one RX buffer within {ANSWER_TIMEOUT:?} (used: {used:?}); log:\n{}",
            ferry.log_tail()
        );
    };
    assert!(
        (NET_HDR_LEN + 42..=rx_len).contains(&(len as usize)),
        "RX used length {len} for descriptor {id}"
    );
    let hdr = &bytes[..NET_HDR_LEN];
    assert_eq!(
        hdr[0] & !(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID),
        0,
        "header flags {:#x}",
        hdr[0]
    );
    assert_eq!(hdr[1], VIRTIO_NET_HDR_GSO_NONE, "no GSO was negotiated");
    assert_eq!(
        u16::from_le_bytes([hdr[10], hdr[11]]),
        1,
        "num_buffers without MRG_RXBUF"
    );
    // The device wrote exactly what it said it wrote: the byte after is still the guest's.
    let &(_, gpa) = rx_bufs.iter().find(|(h, _)| u32::from(*h) == id).unwrap();
    if (len as usize) < rx_len {
        assert_eq!(ram.read(gpa + u64::from(len), 1), [0xa5]);
    }
    assert!(rx.wait_call(), "RX call eventfd never signalled");

    // The request went back to the guest on the TX ring, and the guest was told.
    assert_eq!(
        tx.wait_used(&ram, 1),
        Some(1),
        "TX used idx; log:\n{}",
        ferry.log_tail()
    );
    assert_eq!(tx.used_elem(&ram, 0).0, u32::from(tx_head));
    assert!(tx.wait_call(), "TX call eventfd never signalled");

    // The guest resets the device, CH vu_common_ctrl.rs reset_vhost_user: SET_VRING_ENABLE 0
    // and GET_VRING_BASE per ring. The bases are where the device stopped: on TX after the
    // one request, on RX after the buffers it filled (read once the ring is stopped).
    let bases = vu.reset(NET_NUM_QUEUES);
    let rx_used = rx.used_idx(&ram);
    assert_eq!(bases, vec![u32::from(rx_used), 1], "vring bases (RX, TX)");

    assert!(ferry.is_running(), "{}", ferry.log_tail());
}

/// FUSE_INIT's opcode, and the sizes of the structures around it (`linux/fuse.h`).
const FUSE_INIT: u32 = 26;
const FUSE_IN_HEADER_LEN: usize = 40;
const FUSE_INIT_IN_LEN: usize = 64;
const FUSE_OUT_HEADER_LEN: usize = 16;
const FUSE_INIT_OUT_LEN: usize = 64;

/// A Linux 6.x guest's FUSE_INIT: fuse_in_header then fuse_init_in (7.38, with flags2).
fn fuse_init_request(unique: u64) -> (Vec<u8>, Vec<u8>) {
    let mut hdr = Vec::with_capacity(FUSE_IN_HEADER_LEN);
    hdr.extend_from_slice(&((FUSE_IN_HEADER_LEN + FUSE_INIT_IN_LEN) as u32).to_le_bytes());
    hdr.extend_from_slice(&FUSE_INIT.to_le_bytes());
    hdr.extend_from_slice(&unique.to_le_bytes());
    hdr.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    hdr.extend_from_slice(&0u32.to_le_bytes()); // uid
    hdr.extend_from_slice(&0u32.to_le_bytes()); // gid
    hdr.extend_from_slice(&0u32.to_le_bytes()); // pid
    hdr.extend_from_slice(&0u16.to_le_bytes()); // total_extlen
    hdr.extend_from_slice(&0u16.to_le_bytes()); // padding
    assert_eq!(hdr.len(), FUSE_IN_HEADER_LEN);
    let mut init = Vec::with_capacity(FUSE_INIT_IN_LEN);
    init.extend_from_slice(&7u32.to_le_bytes()); // major
    init.extend_from_slice(&38u32.to_le_bytes()); // minor
    init.extend_from_slice(&(128u32 * 1024).to_le_bytes()); // max_readahead
    init.extend_from_slice(&0x4000_0000u32.to_le_bytes()); // flags: INIT_EXT
    init.extend_from_slice(&0u32.to_le_bytes()); // flags2
    init.resize(FUSE_INIT_IN_LEN, 0); // unused[11]
    (hdr, init)
}

#[test]
fn fs_answers_fuse_init_on_rings_set_up_as_cloud_hypervisor_does() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ferry, _, fs) = start(dir.path());

    // CH vu_common_ctrl.rs connect_vhost_user: connect, SET_OWNER, GET_FEATURES.
    let mut vu = ChFrontend::connect(&fs, FS_NUM_QUEUES);
    // CH vu_common_ctrl.rs negotiate_features_vhost_user, with fs.rs's masks.
    let (backend_acked, acked_protocol) =
        vu.negotiate(CH_DEFAULT_VIRTIO_FEATURES, ch_fs_protocol_features());
    assert_ne!(backend_acked & VIRTIO_F_VERSION_1, 0, "VERSION_1 not acked");
    let needed = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(
        acked_protocol.contains(needed),
        "CH acks protocol features {acked_protocol:?}"
    );
    // CH fs.rs Fs::new: GET_QUEUE_NUM; the high-priority queue and one request queue must fit.
    let backend_num_queues = vu.vu.get_queue_num().expect("GET_QUEUE_NUM");
    assert!(
        FS_NUM_QUEUES as u64 <= backend_num_queues,
        "CH would refuse the device: {FS_NUM_QUEUES} queues wanted, {backend_num_queues} offered"
    );
    // No GET_CONFIG: CH's fs frontend does not ask for CONFIG and fills the fs config space
    // (tag, num_request_queues) itself, so nothing here depends on Ferry's (which holds the
    // tag for frontends that read it: tests/tests/vhost_user.rs).

    // The guest acks VERSION_1 and INDIRECT_DESC (and, as for net, not EVENT_IDX); CH adds
    // VHOST_USER_F_PROTOCOL_FEATURES.
    let guest_acks = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC;
    assert_eq!(backend_acked & guest_acks, guest_acks);
    let acked_features = guest_acks | (backend_acked & PROTOCOL_FEATURES);

    // Activation, CH setup_vhost_user: vring 0 the high-priority queue, vring 1 requests.
    let mut ram = GuestRam::new();
    let hiprio = SplitQueue::new(&mut ram, FS_QUEUE_SIZE);
    let mut requests = SplitQueue::new(&mut ram, FS_QUEUE_SIZE);
    vu.setup(&ram, &[&hiprio, &requests], acked_features);

    // FUSE_INIT as Linux's virtio-fs sends it: in header and in arg readable, out header and
    // out arg writable, through an indirect table. The reply buffers are marked first.
    let unique = 0x1234_5678_9abc_def0;
    let (in_hdr, init_in) = fuse_init_request(unique);
    let in_hdr_gpa = ram.alloc(in_hdr.len(), 8);
    ram.write(in_hdr_gpa, &in_hdr);
    let init_in_gpa = ram.alloc(init_in.len(), 8);
    ram.write(init_in_gpa, &init_in);
    let out_hdr_gpa = ram.alloc(FUSE_OUT_HEADER_LEN, 8);
    ram.write(out_hdr_gpa, &[0xa5; FUSE_OUT_HEADER_LEN]);
    let init_out_gpa = ram.alloc(FUSE_INIT_OUT_LEN, 8);
    ram.write(init_out_gpa, &[0xa5; FUSE_INIT_OUT_LEN]);
    let head = requests.add_indirect_chain(
        &mut ram,
        &[
            Buf::readable(in_hdr_gpa, in_hdr.len()),
            Buf::readable(init_in_gpa, init_in.len()),
            Buf::writable(out_hdr_gpa, FUSE_OUT_HEADER_LEN),
            Buf::writable(init_out_gpa, FUSE_INIT_OUT_LEN),
        ],
    );
    requests.kick();

    assert_eq!(
        requests.wait_used(&ram, 1),
        Some(1),
        "no FUSE_INIT reply within {ANSWER_TIMEOUT:?}; log:\n{}",
        ferry.log_tail()
    );
    let (id, len) = requests.used_elem(&ram, 0);
    assert_eq!(id, u32::from(head), "used id");
    let reply_len = FUSE_OUT_HEADER_LEN + FUSE_INIT_OUT_LEN;
    assert_eq!(len as usize, reply_len, "used length");
    let out = ram.read(out_hdr_gpa, FUSE_OUT_HEADER_LEN);
    assert_eq!(
        u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize,
        reply_len,
        "fuse_out_header.len"
    );
    assert_eq!(
        i32::from_le_bytes(out[4..8].try_into().unwrap()),
        0,
        "fuse_out_header.error"
    );
    assert_eq!(
        u64::from_le_bytes(out[8..16].try_into().unwrap()),
        unique,
        "fuse_out_header.unique"
    );
    let init_out = ram.read(init_out_gpa, FUSE_INIT_OUT_LEN);
    let major = u32::from_le_bytes(init_out[0..4].try_into().unwrap());
    let minor = u32::from_le_bytes(init_out[4..8].try_into().unwrap());
    assert_eq!(major, 7, "fuse_init_out.major");
    assert!(
        (1..=38).contains(&minor),
        "fuse_init_out.minor {minor}: at most the guest's 38"
    );
    assert!(requests.wait_call(), "request queue call never signalled");
    // Nothing went to the high-priority queue.
    assert_eq!(hiprio.used_idx(&ram), 0);

    // CH reset_vhost_user: the request queue's base is past the one request.
    assert_eq!(vu.reset(FS_NUM_QUEUES), vec![0, 1], "vring bases");

    assert!(ferry.is_running(), "{}", ferry.log_tail());
}

/// Puts one request (`parts`, readable) with room for an `out_len`-byte reply on `queue`,
/// kicks it and returns the reply once it is used.
fn fs_call(
    ram: &mut GuestRam,
    queue: &mut SplitQueue,
    parts: &[&[u8]],
    out_len: usize,
    ferry: &FerryProcess,
) -> Vec<u8> {
    let mut bufs = Vec::new();
    for p in parts {
        let gpa = ram.alloc(p.len(), 8);
        ram.write(gpa, p);
        bufs.push(Buf::readable(gpa, p.len()));
    }
    let out = ram.alloc(out_len, 8);
    ram.write(out, &vec![0xa5; out_len]);
    bufs.push(Buf::writable(out, out_len));
    let before = queue.used_idx(ram);
    let head = queue.add_chain(ram, &bufs);
    queue.kick();
    assert_eq!(
        queue.wait_used(ram, before + 1),
        Some(before + 1),
        "no reply within {ANSWER_TIMEOUT:?}; log:\n{}",
        ferry.log_tail()
    );
    let (id, len) = queue.used_elem(ram, before);
    assert_eq!(id, u32::from(head), "used id");
    ram.read(out, len as usize)
}

/// CH with `--fs num_queues=2` (three vrings: the high-priority queue and two request
/// queues, the count QEMU's `num-request-queues` sets too): FUSE_INIT on the second request
/// queue and a GETATTR of the root on the first are both answered.
#[test]
fn fs_answers_on_each_of_two_request_queues_set_up_as_cloud_hypervisor_does() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ferry, _, fs) = start(dir.path());
    let num_queues = 1 + 2;
    let mut vu = ChFrontend::connect(&fs, num_queues);
    let (backend_acked, _) = vu.negotiate(CH_DEFAULT_VIRTIO_FEATURES, ch_fs_protocol_features());
    let backend_num_queues = vu.vu.get_queue_num().expect("GET_QUEUE_NUM");
    assert!(
        num_queues as u64 <= backend_num_queues,
        "CH would refuse the device: {num_queues} queues wanted, {backend_num_queues} offered"
    );
    let guest_acks = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC;
    let acked_features = guest_acks | (backend_acked & PROTOCOL_FEATURES);
    let mut ram = GuestRam::new();
    let hiprio = SplitQueue::new(&mut ram, FS_QUEUE_SIZE);
    let mut first = SplitQueue::new(&mut ram, FS_QUEUE_SIZE);
    let mut second = SplitQueue::new(&mut ram, FS_QUEUE_SIZE);
    vu.setup(&ram, &[&hiprio, &first, &second], acked_features);

    let (hdr, init) = fuse_init_request(7);
    let reply = fs_call(
        &mut ram,
        &mut second,
        &[&hdr, &init],
        FUSE_OUT_HEADER_LEN + FUSE_INIT_OUT_LEN,
        &ferry,
    );
    assert_eq!(reply.len(), FUSE_OUT_HEADER_LEN + FUSE_INIT_OUT_LEN);
    assert_eq!(
        i32::from_le_bytes(reply[4..8].try_into().unwrap()),
        0,
        "INIT's error"
    );

    // GETATTR (3) of the root (node 1): fuse_in_header, fuse_getattr_in; the reply is
    // fuse_out_header and fuse_attr_out (104 bytes).
    let mut hdr = Vec::with_capacity(FUSE_IN_HEADER_LEN);
    hdr.extend_from_slice(&((FUSE_IN_HEADER_LEN + 16) as u32).to_le_bytes());
    hdr.extend_from_slice(&3u32.to_le_bytes());
    hdr.extend_from_slice(&8u64.to_le_bytes()); // unique
    hdr.extend_from_slice(&1u64.to_le_bytes()); // nodeid
    hdr.resize(FUSE_IN_HEADER_LEN, 0);
    let reply = fs_call(
        &mut ram,
        &mut first,
        &[&hdr, &[0u8; 16]],
        FUSE_OUT_HEADER_LEN + 104,
        &ferry,
    );
    assert_eq!(reply.len(), FUSE_OUT_HEADER_LEN + 104, "GETATTR's reply");
    assert_eq!(
        i32::from_le_bytes(reply[4..8].try_into().unwrap()),
        0,
        "GETATTR's error"
    );
    assert_eq!(
        u64::from_le_bytes(reply[8..16].try_into().unwrap()),
        8,
        "GETATTR's unique"
    );
    // mode, in fuse_attr at offset 16 + 16 + 60: a folder.
    let mode = u32::from_le_bytes(reply[92..96].try_into().unwrap());
    assert_eq!(mode & libc::S_IFMT, libc::S_IFDIR, "the root is a folder");
    assert_eq!(hiprio.used_idx(&ram), 0);
    assert_eq!(vu.reset(num_queues), vec![0, 1, 1], "vring bases");
    assert!(ferry.is_running(), "{}", ferry.log_tail());
}
