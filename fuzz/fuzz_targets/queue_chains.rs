//! Descriptor tables and avail rings as a hostile guest lays them out, in guest memory, into
//! the real virtio-fs and virtio-net queue handlers (`VhostUserBackend::handle_event`, as the
//! library's worker calls it on a kick): indirect tables, loops, chains that point outside
//! memory or overlap the rings, lengths that overflow, avail indexes far ahead.
//!
//! Input: one byte of settings, then a 64 KiB guest-memory image laid at address 0. The
//! settings byte picks the device (bit 0: fs or net), the queue size (bits 1-3: 2 to 256),
//! EVENT_IDX (bit 4) and, for net, MRG_RXBUF (bit 5). The rings sit at fixed places: the
//! descriptor table at 0, the avail rings at 0x1000 (fs requests, net TX) and 0x1800 (fs
//! high-priority, net RX), the used rings at 0x3000 and 0x4000; buffers may be anywhere.
//! The fs backend serves a temporary folder through a server that has had its INIT; the net
//! backend's stack runs in a network namespace of its own (as `guest_frames`), so nothing
//! leaves. What must hold: no panic, no hang, no write outside guest memory (ASan), and no
//! lock wait that outlives the session.

#![no_main]

use std::sync::{Arc, Mutex};

use ferry_devices::{GuestMemoryAtomic, GuestMemoryMmap, Vring};
use ferry_devices::{VhostUserFsBackend, VhostUserNetBackend};
use ferry_fs::membuf::{ReplyBuf, RequestBuf};
use ferry_fs::passthrough::Config;
use ferry_fs::{PassthroughFs, Server};
use libfuzzer_sys::fuzz_target;

#[path = "common/fuse_init.rs"]
mod fuse_init;
use fuse_init::init;
use vhost_user_backend::{VhostUserBackend, VringT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

const MEM: usize = 0x10000;
const DESC: u64 = 0;
const AVAIL: [u64; 2] = [0x1000, 0x1800];
const USED: [u64; 2] = [0x3000, 0x4000];

struct Devices {
    _dir: tempfile::TempDir,
    fs: Arc<VhostUserFsBackend<PassthroughFs>>,
    net: Arc<VhostUserNetBackend>,
}

static DEVICES: Mutex<Option<Devices>> = Mutex::new(None);

fn devices() -> Devices {
    fuse_init::cap_file_size();
    // SAFETY: unshare has no memory effects; it only moves this thread into a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "cannot enter a network namespace of its own ({}); run the fuzz target as root",
            std::io::Error::last_os_error()
        );
    }
    let dir = tempfile::tempdir().expect("a temporary folder");
    std::fs::create_dir(dir.path().join("d")).ok();
    std::fs::write(dir.path().join("f"), b"ferry").ok();
    let server = Server::new(PassthroughFs::new(dir.path(), Config::default()).expect("a share"));
    let _ = server.handle_message(RequestBuf::new(init()), ReplyBuf::new(4096));
    let net = VhostUserNetBackend::new(ferry_net::NetConfig::default(), "127.0.0.1:9".parse().ok())
        .expect("a net device");
    Devices {
        _dir: dir,
        fs: VhostUserFsBackend::new(Arc::new(server), "fuzz"),
        net,
    }
}

/// Two vrings over `mem`, ready and enabled, with the rings where the input put them.
fn vrings(mem: &GuestMemoryAtomic, size: u16, event_idx: bool) -> Vec<Vring> {
    (0..2)
        .map(|q| {
            let v = Vring::new(mem.clone(), 256).expect("a vring");
            v.set_queue_size(size);
            v.set_queue_info(DESC, AVAIL[q], USED[q])
                .expect("ring addresses");
            v.set_queue_event_idx(event_idx);
            v.set_queue_ready(true);
            v.set_enabled(true);
            v
        })
        .collect()
}

/// This process's threads that wait for a lock for a request (`fs-lock-wait`).
fn lock_wait_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "fs-lock-wait")
        })
        .count()
}

fuzz_target!(|data: &[u8]| {
    let Some((&settings, image)) = data.split_first() else {
        return;
    };
    let mut guard = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    let d = guard.get_or_insert_with(devices);
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let n = image.len().min(MEM);
    memory
        .write_slice(&image[..n], GuestAddress(0))
        .expect("the image fits");
    let mem = GuestMemoryAtomic::new(memory);
    let size = 1u16 << (1 + ((settings >> 1) & 7));
    let event_idx = settings & 0x10 != 0;
    let rings = vrings(&mem, size, event_idx);
    if settings & 1 == 0 {
        // virtio-fs: the request queue, then the high-priority one.
        let fs = &d.fs;
        fs.set_event_idx(event_idx);
        fs.update_memory(mem).expect("memory");
        let _ = fs.handle_event(1, EventSet::IN, &rings, 0);
        let _ = fs.handle_event(0, EventSet::IN, &rings, 0);
        // A SETLKW that conflicts with a lock an earlier input took waits on a thread of its
        // own until the lock is free or the session ends. End the waits as the end of a
        // session does, and let those threads finish before the next input: left waiting,
        // they pile up across inputs (and the leak checker counts them).
        fs.server().cancel_waits();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // Until their threads are gone, not only their requests: a thread that has returned
        // its chain still runs its exit (thread-local destructors) for a moment.
        while (fs.waiting_requests() > 0 || lock_wait_threads() > 0)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            fs.waiting_requests(),
            0,
            "lock waits outlived their session"
        );
    } else {
        // virtio-net: TX (the guest's frames into the stack), then RX (its answers into the
        // guest's buffers), as the worker does on the two kicks.
        let net = &d.net;
        let mut features = 1u64 << 32 | 1 << 29; // VERSION_1, EVENT_IDX (set below)
        if settings & 0x20 != 0 {
            features |= 1 << 15; // MRG_RXBUF
        }
        net.acked_features(features);
        net.set_event_idx(event_idx);
        net.update_memory(mem).expect("memory");
        let _ = net.handle_event(1, EventSet::IN, &rings, 0);
        let _ = net.handle_event(0, EventSet::IN, &rings, 0);
    }
});
