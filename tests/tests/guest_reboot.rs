//! A guest that reboots in the same QEMU, as a user's VM does: QEMU resets both devices and
//! the guest's next kernel negotiates them again over the same vhost-user connections. The
//! network (DHCP, DNS, TCP to a test host, a published port) and the share (a new FUSE
//! session: INIT again, the first boot's files there; the first session's nodes and open files
//! dropped) must work in the second boot as in the first, with ferry still running.
//!
//! Ferry runs in a test namespace with no route out; the "outside" is a test host on a veth
//! link (`tests/servers/testhosts.py`). Nothing leaves the namespaces the test made.

use std::os::fd::AsRawFd;
use std::time::Duration;

use ferry_tests::{FerryProcess, GuestSpec, Qemu, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(240);

#[test]
fn both_devices_work_again_after_the_guest_reboots() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let _host = TestHost::start(
        &net.remote,
        &[
            &remote,
            "--tcp-blob",
            "7000",
            "65536",
            "--dns",
            "53",
            &format!("remote.test={remote}"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    // The first boot leaves a file on the share and reboots; the second finds it and checks
    // everything again, then serves a page on the published port.
    let script = format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
if [ -e /mnt/tools/rebooted ]; then boot=2; else boot=1; fi
check boot$boot-address "$(ip -4 -o addr show eth0 | grep -c ' 192.168.127.2/24')" 1
check boot$boot-dns "$(nslookup remote.test 2>&1 | grep -c 'Address.*{remote}')" 1
check boot$boot-tcp "$(nc {remote} 7000 | wc -c)" 65536
if [ $boot = 1 ]; then
  echo "from the first boot" > /mnt/tools/rebooted
  sync
  echo FERRY-REBOOTING
  reboot -f
  sleep 60
fi
check boot2-share "$(cat /mnt/tools/rebooted)" "from the first boot"
check boot2-share-write "$(echo again > /mnt/tools/second && cat /mnt/tools/second)" again
mkdir -p /www && echo 'after a reboot' > /www/index.html && httpd -p 80 -h /www
echo FERRY-READY
i=0; while [ ! -e /mnt/tools/host-done ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
"#
    );
    let ferry_tests::ServedGuest {
        mut ferry,
        mut qemu,
        tools,
        ..
    } = ferry_tests::serve_and_boot_spec(
        &net.inner,
        dir.path(),
        GuestSpec {
            script,
            reboots: true,
            ..Default::default()
        },
        &[
            "--dns-upstream".into(),
            format!("{remote}:53"),
            "--publish".into(),
            "8080:80".into(),
        ],
        &[],
    );
    qemu.wait_console("FERRY-READY", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    let page = TestNet::command(&net.inner, "curl")
        .args(["-sS", "-m", "20", "http://127.0.0.1:8080/"])
        .output()
        .expect("run curl");
    std::fs::write(tools.dir.join("host-done"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(8, &format!("ferry log:\n{}", ferry.log_tail()));
    assert!(
        out.console.contains("FERRY-REBOOTING"),
        "the first boot rebooted"
    );
    assert_eq!(
        String::from_utf8_lossy(&page.stdout).trim(),
        "after a reboot",
        "published TCP after the reboot: {}",
        String::from_utf8_lossy(&page.stderr)
    );
    assert!(ferry.is_running());
    // The share's second INIT came on the same connection: the first boot's nodes and open
    // files went with it.
    let log = ferry.log_text();
    assert!(
        log.contains("a new FUSE session replaces the previous one"),
        "{log}"
    );
}

/// A guest process waits for a lock on a share, held by a host process, when the guest
/// reboots; the host frees it once the next kernel runs, before that kernel mounts the share.
/// QEMU stops the device at the reset (GET_VRING_BASE), after which its ring is not ferry's:
/// the wait must end then, not be answered when the lock comes free, into the ring of the next
/// kernel, whose driver never posted that chain ("id N is not a head!", the share dead).
#[test]
fn a_lock_wait_across_a_reboot_stays_out_of_the_next_kernels_ring() {
    let dir = tempfile::tempdir().unwrap();
    let tools = ferry_tests::tools_share(dir.path());
    let locks = dir.path().join("locks");
    std::fs::create_dir(&locks).unwrap();
    std::fs::write(locks.join("lockfile"), b"").unwrap();
    std::fs::write(locks.join("data"), b"still here\n").unwrap();
    let held = std::fs::File::open(locks.join("lockfile")).unwrap();
    // SAFETY: flock on a descriptor this test owns, open for as long as the call.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    let sock = dir.path().join("locks.sock");
    let mut ferry = FerryProcess::serve(
        dir.path(),
        &[
            "--share".into(),
            tools.share.clone(),
            "--share".into(),
            format!(
                "tag=locks,dir={},socket={}",
                locks.display(),
                sock.display()
            ),
        ],
        &[tools.socket.clone(), sock.clone()],
    );
    let script = r#"
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
mkdir -p /mnt/locks
if [ ! -e /mnt/tools/rebooted ]; then
  mount -t virtiofs locks /mnt/locks
  /mnt/tools/probe lockwait /mnt/locks/lockfile &
  sleep 2
  touch /mnt/tools/rebooted; sync
  echo FERRY-REBOOTING
  reboot -f
  sleep 60
fi
echo FERRY-SECOND-BOOT
i=0; while [ ! -e /mnt/tools/released ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
sleep 2
check mount "$(timeout 20 mount -t virtiofs locks /mnt/locks && echo mounted)" mounted
check read "$(timeout 20 cat /mnt/locks/data)" "still here"
check lock "$(timeout 20 /mnt/tools/probe lockwait /mnt/locks/lockfile)" locked
check ring "$(dmesg | grep -c 'is not a head')" 0
"#;
    let spec = GuestSpec {
        script: script.into(),
        shares: vec![
            ("tools".into(), tools.socket.clone()),
            ("locks".into(), sock),
        ],
        unmounted: vec!["locks".into()],
        reboots: true,
        ..Default::default()
    };
    let mut qemu = Qemu::boot(dir.path(), &spec);
    qemu.wait_console("FERRY-SECOND-BOOT", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    // The next kernel has set the share's rings up; its mount is to come.
    drop(held);
    std::fs::write(tools.dir.join("released"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(4, &format!("ferry log:\n{}", ferry.log_tail()));
    assert!(ferry.is_running());
}
