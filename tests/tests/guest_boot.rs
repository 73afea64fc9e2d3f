//! Guest end-to-end: the tiny guest boots with Ferry's net and fs devices from one `ferry serve`,
//! reports what it sees, and boots again against the same process after QEMU is killed.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use ferry_tests::{FerryProcess, GuestOutcome, GuestSpec, Qemu};

/// Hangs are caught by this; a healthy boot under TCG takes a few seconds.
const DEADLINE: Duration = Duration::from_secs(180);
const MAC: &str = "02:46:52:59:00:02";
const TAG: &str = "hostshare";

/// The checks the guest runs. Expected values come from the host side, so each check can fail.
fn script(share: &Path, then: &str) -> String {
    let meta = std::fs::metadata(share).unwrap();
    // SAFETY: statvfs is plain data and `st` is a valid destination; the path is NUL-terminated.
    let blocks = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        let p = std::ffi::CString::new(share.to_str().unwrap()).unwrap();
        assert_eq!(libc::statvfs(p.as_ptr(), &mut st), 0);
        // The guest reports blocks in units of f_frsize, as the host does.
        st.f_blocks
    };
    format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
check eth0-mac "$(cat /sys/class/net/eth0/address 2>&1)" {MAC}
# The lease from ferry's DHCP server (QEMU is given no host_mtu: the MTU comes from DHCP).
check eth0-mtu "$(cat /sys/class/net/eth0/mtu 2>&1)" 65520
check dhcp-address "$(ip -4 -o addr show eth0 | awk '{{print $4}}')" 192.168.127.2/24
check dhcp-router "$(ip route | awk '/^default/ {{print $3}}')" 192.168.127.1
check dhcp-dns "$(awk '/^nameserver/ {{print $2; exit}}' /etc/resolv.conf)" 192.168.127.1
check dhcp-search "$(awk '/^search/ {{print $2; exit}}' /etc/resolv.conf)" ferry.internal
check ping-gateway "$(ping -c 2 -W 2 192.168.127.1 2>&1 | grep -c 'bytes from 192.168.127.1')" 2
check ping-host-alias "$(ping -c 1 -W 2 192.168.127.254 2>&1 | grep -c 'bytes from')" 1
check eth0-carrier "$(cat /sys/class/net/eth0/carrier 2>&1)" 1
# DNS on the gateway: the plan's names locally; others go to an upstream that refuses.
lookup() {{ nslookup -type=A "$1" 2>&1 | awk '/^Address/ {{a=$2}} END {{print a}}'; }}
check dns-host "$(lookup host.ferry.internal)" 192.168.127.254
check dns-docker-host "$(lookup host.docker.internal)" 192.168.127.254
check dns-gateway "$(lookup gateway.ferry.internal)" 192.168.127.1
t0=$(cut -d' ' -f1 /proc/uptime)
nslookup other.example.test > /tmp/ns.out 2>&1; rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
check dns-other-servfail "$rc $(grep -q SERVFAIL /tmp/ns.out && echo 1) $(echo "$t1 $t0" | awk '{{print ($1 - $2) < 2}}')" "1 1 1"
check virtiofs-mounted "$(awk '$2 == "/mnt/{TAG}" {{print $1, $3}}' /proc/mounts)" "{TAG} virtiofs"
check virtiofs-root-inode "$(stat -c %i /mnt/{TAG} 2>&1)" {ino}
check virtiofs-root-mode "$(stat -c %a /mnt/{TAG} 2>&1)" {mode:o}
check virtiofs-statfs-blocks "$(stat -f -c %b /mnt/{TAG} 2>&1)" {blocks}
{then}
"#,
        ino = meta.ino(),
        mode = meta.mode() & 0o7777,
    )
}

fn spec(dir: &Path, script: String) -> GuestSpec {
    GuestSpec {
        script,
        net_socket: Some(dir.join("net.sock")),
        mac: Some(MAC.into()),
        mtu: None,
        shares: vec![(TAG.into(), dir.join("fs.sock"))],
        no_dhcp: false,
        memory_mib: 256,
        queue_pairs: 1,
        ..Default::default()
    }
}

fn assert_all_ok(run: &str, out: &GuestOutcome, ferry: &FerryProcess, expected: usize) {
    let failed: Vec<_> = out.checks.iter().filter(|c| !c.ok).collect();
    assert!(
        failed.is_empty() && out.checks.len() == expected,
        "{run}: {} of {expected} checks reported, failed: {failed:?}\nconsole:\n{}\nferry log:\n{}",
        out.checks.len(),
        ferry_tests::tail(&out.console, 60),
        ferry.log_tail()
    );
}

#[test]
fn guest_sees_both_devices_and_boots_again_after_qemu_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::set_permissions(&share, std::os::unix::fs::PermissionsExt::from_mode(0o751)).unwrap();
    let net = dir.path().join("net.sock");
    let fs = dir.path().join("fs.sock");
    let pcap = dir.path().join("guest.pcap");
    let mut ferry = FerryProcess::serve(
        dir.path(),
        &[
            "--net-socket".into(),
            net.display().to_string(),
            "--share".into(),
            format!("tag={TAG},dir={},socket={}", share.display(), fs.display()),
            // Never the machine's resolver: an upstream on loopback where nothing listens, so
            // names outside the plan fail at once.
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
            "--pcap".into(),
            pcap.display().to_string(),
        ],
        &[net.clone(), fs.clone()],
    );

    // First boot: run the checks, then hang until QEMU is killed from outside.
    let mut qemu = Qemu::boot(
        dir.path(),
        &spec(
            dir.path(),
            script(&share, "echo FERRY-WAITING-FOR-KILL; sleep 3600"),
        ),
    );
    if let Err(e) = qemu.wait_console("FERRY-WAITING-FOR-KILL", DEADLINE) {
        panic!("first boot: {e}\nferry log:\n{}", ferry.log_tail());
    }
    let first = GuestOutcome {
        rc: 0,
        checks: ferry_tests::parse_checks(&qemu.console()),
        console: qemu.console(),
    };
    assert_all_ok("first boot", &first, &ferry, 17);
    qemu.kill();
    assert!(
        ferry.is_running(),
        "ferry died with QEMU:\n{}",
        ferry.log_tail()
    );

    // Second boot against the same ferry process.
    let mut qemu = Qemu::boot(dir.path(), &spec(dir.path(), script(&share, "")));
    let second = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("second boot: {e}\nferry log:\n{}", ferry.log_tail()));
    assert_all_ok("second boot", &second, &ferry, 17);
    assert_eq!(second.rc, 0);
    drop(qemu);

    let log = ferry.log_text();
    assert!(log.contains("net: frontend disconnected"), "{log}");
    assert!(
        !log.contains("connection ended"),
        "a connection failed:\n{log}"
    );
    // The guest's frames (DHCP, ARP and pings at least) reached ferry's TX queue.
    let frames: u64 = log
        .lines()
        .filter_map(|l| l.split("the guest has sent ").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0);
    assert!(
        frames >= 2,
        "ferry saw {frames} frames from the guest:\n{log}"
    );
    assert!(
        log.contains(&format!("fs-{TAG}: frontend disconnected")),
        "{log}"
    );
    assert_eq!(ferry.terminate(), Some(0), "{}", ferry.log_tail());
    assert!(!net.exists() && !fs.exists(), "sockets left behind");
    check_capture(&pcap, frames, &log);
}

/// One record of a libpcap file: the frame as kept, and its length on the wire.
struct Record {
    data: Vec<u8>,
    orig_len: u32,
}

/// Reads a classic libpcap file (microsecond, host order, Ethernet), checking its header.
fn read_pcap(path: &Path) -> Vec<Record> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
    assert!(b.len() >= 24, "no pcap header");
    assert_eq!(u32_at(0), 0xa1b2_c3d4, "magic");
    assert_eq!(u32_at(20), 1, "link type Ethernet");
    let snaplen = u32_at(16);
    let mut out = Vec::new();
    let mut o = 24;
    while o < b.len() {
        assert!(o + 16 <= b.len(), "a record header is cut at {o}");
        let (incl, orig) = (u32_at(o + 8) as usize, u32_at(o + 12));
        assert!(
            incl <= snaplen as usize && incl as u32 <= orig,
            "record at {o}"
        );
        assert!(o + 16 + incl <= b.len(), "a record is cut at {o}");
        out.push(Record {
            data: b[o + 16..o + 16 + incl].to_vec(),
            orig_len: orig,
        });
        o += 16 + incl;
    }
    out
}

/// The capture holds both boots' traffic: as many frames from the guest as ferry took, and
/// the exchanges the checks made (DHCP, pings, DNS), both ways.
fn check_capture(path: &Path, frames_from_guest: u64, log: &str) {
    let records = read_pcap(path);
    let mac: Vec<u8> = MAC
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    let from_guest = |r: &&Record| r.data[6..12] == mac[..];
    let ipv4_udp = |r: &Record, sport: u16, dport: u16| {
        r.data.len() > 42
            && r.data[12..14] == [0x08, 0x00]
            && r.data[23] == 17
            && r.data[34..36] == sport.to_be_bytes()
            && r.data[36..38] == dport.to_be_bytes()
    };
    // ICMP echo (type 8) or reply (0) between the guest and `other`.
    let icmp = |r: &Record, kind: u8, other: [u8; 4], to_other: bool| {
        let (src, dst) = if to_other { (26, 30) } else { (30, 26) };
        r.data.len() > 34
            && r.data[12..14] == [0x08, 0x00]
            && r.data[23] == 1
            && r.data[src..src + 4] == [192, 168, 127, 2]
            && r.data[dst..dst + 4] == other
            && r.data[34] == kind
    };
    let count = |f: &dyn Fn(&Record) -> bool| records.iter().filter(|r| f(r)).count();
    let sent = records.iter().filter(from_guest).count() as u64;
    assert_eq!(
        sent, frames_from_guest,
        "the capture has {sent} frames from the guest, ferry took {frames_from_guest}:\n{log}"
    );
    assert!(
        records.len() as u64 > sent,
        "no frames to the guest in the capture"
    );
    assert!(
        records.iter().all(|r| r.data.len() as u32 == r.orig_len),
        "frames were cut"
    );
    // Both boots took a lease: two DISCOVER/REQUEST rounds at least, and the answers.
    assert!(count(&|r| ipv4_udp(r, 68, 67)) >= 4, "DHCP from the guest");
    assert!(count(&|r| ipv4_udp(r, 67, 68)) >= 4, "DHCP answers");
    // 2 pings of the gateway and 1 of the host alias, per boot, each answered.
    for (other, n) in [([192, 168, 127, 1], 4), ([192, 168, 127, 254], 2)] {
        assert!(
            count(&|r| icmp(r, 8, other, true)) >= n,
            "echo requests to {other:?}"
        );
        assert!(
            count(&|r| icmp(r, 0, other, false)) >= n,
            "echo replies from {other:?}"
        );
    }
    assert!(
        count(&|r| r.data.len() > 42 && r.data[36..38] == 53u16.to_be_bytes()) >= 8,
        "DNS queries"
    );
    assert!(
        count(&|r| r.data.len() > 42 && r.data[34..36] == 53u16.to_be_bytes()) >= 8,
        "DNS answers"
    );
}
