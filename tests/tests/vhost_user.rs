//! VM-less vhost-user tests: a test frontend (vhost's `Frontend`, with a memfd as guest RAM)
//! drives `ferry serve` through its real sockets.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::{wait_for, FerryProcess};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_MTU: u64 = 1 << 3;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// 1 MiB of "guest RAM" in a memfd, as QEMU's memory-backend-memfd gives.
fn guest_ram() -> File {
    // SAFETY: the name is a valid C string; memfd_create has no other memory effects.
    let fd = unsafe { libc::memfd_create(c"ferry-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(1 << 20).unwrap();
    f
}

fn connect(sock: &Path) -> Frontend {
    // 16 rings: the frontend library refuses ring indexes past this itself, and one test
    // needs to ask ferry for ring 8.
    wait_for(Duration::from_secs(5), || Frontend::connect(sock, 16).ok())
        .expect("connect to ferry's vhost-user socket")
}

/// Negotiates features the way QEMU does and returns what the device offered. `queue_num` is
/// what GET_QUEUE_NUM must answer: a NIC's queue pairs, another device's queues.
fn negotiate(fe: &mut Frontend, want_protocol: VhostUserProtocolFeatures, queue_num: u64) -> u64 {
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    fe.set_features(offered).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(want_protocol), "protocol features {proto:?}");
    fe.set_protocol_features(want_protocol).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), queue_num);
    let ram = guest_ram();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 1 << 20,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: ram.as_raw_fd(),
    };
    fe.set_mem_table(&[region]).unwrap();
    offered
}

fn start(dir: &Path) -> (FerryProcess, PathBuf, PathBuf) {
    let net = dir.join("net.sock");
    let fs = dir.join("fs.sock");
    let ferry = FerryProcess::serve(
        dir,
        &[
            "--net-socket".into(),
            net.display().to_string(),
            "--share".into(),
            format!("tag=t,dir={},socket={}", dir.display(), fs.display()),
            "--mtu".into(),
            "65520".into(),
        ],
        &[net.clone(), fs.clone()],
    );
    (ferry, net, fs)
}

#[test]
fn net_negotiates_and_exposes_mac_and_mtu_across_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ferry, net, _) = start(dir.path());
    let proto = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK;
    for round in 0..3 {
        let mut fe = connect(&net);
        let offered = negotiate(&mut fe, proto, 4);
        for f in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MQ,
        ] {
            assert_ne!(offered & f, 0, "round {round}: feature {f:#x} not offered");
        }
        let (_, cfg) = fe
            .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
            .unwrap();
        assert_eq!(&cfg[0..6], &[0x02, 0x46, 0x52, 0x59, 0x00, 0x02], "MAC");
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 4, "queue pairs");
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 65520, "MTU");
        // Disconnect; ferry must serve the next frontend on the same socket.
        drop(fe);
        assert!(
            ferry.is_running(),
            "round {round}: ferry exited:\n{}",
            ferry.log_tail()
        );
    }
    let log = ferry.log_text();
    assert!(
        log.matches("net: frontend disconnected").count() >= 2,
        "reconnects not logged:\n{log}"
    );
    assert_eq!(ferry.terminate(), Some(0));
    assert!(!net.exists(), "socket left behind");
}

/// A GET_VRING_BASE as a connection's first request belongs to the frontend's previous
/// connection (a listening QEMU that accepted a restarted ferry before it stopped the old
/// device). Answered (a fresh ring's position, 0), the frontend would take it for the guest's;
/// ferry closes the connection instead, so the request fails and QEMU reads the position from
/// the guest's used ring. The next connection is served as usual.
#[test]
fn a_rings_position_asked_on_a_fresh_connection_gets_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ferry, net, fs) = start(dir.path());
    for (sock, queue_num) in [(&net, 4), (&fs, 17)] {
        let fe = connect(sock);
        let got = fe.get_vring_base(0);
        assert!(got.is_err(), "{}: answered {got:?}", sock.display());
        let mut fe = connect(sock);
        negotiate(
            &mut fe,
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
            queue_num,
        );
    }
    assert!(ferry.is_running(), "{}", ferry.log_tail());
    assert!(
        ferry
            .log_text()
            .contains("before setting this connection up"),
        "{}",
        ferry.log_tail()
    );
}

#[test]
fn a_ring_past_the_queue_pairs_offered_fails_at_negotiation_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ferry, net, _) = start(dir.path());
    let mut fe = connect(&net);
    // As a frontend that ignores GET_QUEUE_NUM would (the frontend library holds a frontend
    // to what that answers, so it is not asked here).
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    fe.set_features(offered).unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(VhostUserProtocolFeatures::MQ)
        .unwrap();
    // Rings 0 to 7 are the four pairs; ring 7 is taken, ring 8 ends the connection.
    fe.set_vring_num(7, 256).unwrap();
    let _ = fe.set_vring_num(8, 256);
    let logged = wait_for(Duration::from_secs(5), || {
        ferry
            .log_text()
            .contains("set up vring 8, past the 4 queue pairs this NIC offers; ask for at most 4")
            .then_some(())
    });
    assert!(logged.is_some(), "no message:\n{}", ferry.log_tail());
    assert!(
        fe.get_features().is_err(),
        "the connection should be closed"
    );
    // The next frontend is served.
    let mut fe = connect(&net);
    negotiate(&mut fe, VhostUserProtocolFeatures::MQ, 4);
    assert!(ferry.is_running(), "{}", ferry.log_tail());
}

/// With CONFIG, the fs config space gives the tag and one request queue, as virtiofsd's
/// `--tag` does for frontends that read it (crosvm, QEMU's vhost-user-fs without `tag=`);
/// GET_QUEUE_NUM offers the high-priority queue and sixteen request queues.
#[test]
fn fs_negotiates_across_reconnects_and_gives_its_tag() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ferry, _, fs) = start(dir.path());
    let proto = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK;
    for _ in 0..2 {
        let mut fe = connect(&fs);
        let offered = negotiate(&mut fe, proto, 17);
        assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
        let (_, cfg) = fe
            .get_config(0, 40, VhostUserConfigFlags::WRITABLE, &[0u8; 40])
            .unwrap();
        let mut tag = [0u8; 36];
        tag[0] = b't';
        assert_eq!(&cfg[..36], &tag, "the tag, NUL-padded");
        assert_eq!(&cfg[36..], &1u32.to_le_bytes(), "request queues");
        // Part of it, as a frontend reading field by field asks.
        let (_, part) = fe
            .get_config(36, 4, VhostUserConfigFlags::WRITABLE, &[0u8; 4])
            .unwrap();
        assert_eq!(part, 1u32.to_le_bytes());
        drop(fe);
    }
    assert!(ferry.is_running(), "{}", ferry.log_tail());
}

#[test]
fn a_second_frontend_waits_for_the_first_to_leave() {
    let dir = tempfile::tempdir().unwrap();
    let (ferry, net, _) = start(dir.path());
    let mut first = connect(&net);
    negotiate(&mut first, VhostUserProtocolFeatures::MQ, 4);
    // The socket has one device behind it: a second frontend is queued, not served, until the
    // first disconnects; then it negotiates normally.
    let mut second = Frontend::connect(&net, 2).unwrap();
    drop(first);
    negotiate(&mut second, VhostUserProtocolFeatures::MQ, 4);
    drop(ferry);
}

/// How many of `pid`'s mappings are of the test frontend's guest RAM.
fn guest_ram_mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ferry-test-ram"))
        .count()
}

#[test]
fn a_departed_frontends_memory_is_unmapped() {
    let dir = tempfile::tempdir().unwrap();
    let (ferry, net, fs) = start(dir.path());
    for (sock, queue_num) in [(&net, 4), (&fs, 17)] {
        let mut fe = connect(sock);
        negotiate(&mut fe, VhostUserProtocolFeatures::MQ, queue_num);
        // The memory table is taken asynchronously from the frontend's view: wait for it.
        wait_for(Duration::from_secs(5), || {
            (guest_ram_mappings(ferry.pid()) > 0).then_some(())
        })
        .unwrap_or_else(|| panic!("{}: guest RAM never mapped", sock.display()));
        drop(fe);
        wait_for(Duration::from_secs(5), || {
            (guest_ram_mappings(ferry.pid()) == 0).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{}: the departed guest's RAM is still mapped:\n{}",
                sock.display(),
                ferry.log_tail()
            )
        });
    }
}
