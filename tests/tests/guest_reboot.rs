//! A guest that reboots in the same QEMU, as a user's VM does: QEMU resets both devices and
//! the guest's next kernel negotiates them again over the same vhost-user connections. The
//! network (DHCP, DNS, TCP to a test host, a published port) and the share (a new FUSE
//! session: INIT again, the first boot's files there; the first session's nodes and open files
//! dropped) must work in the second boot as in the first, with ferry still running.
//!
//! Ferry runs in a test namespace with no route out; the "outside" is a test host on a veth
//! link (`tests/servers/testhosts.py`). Nothing leaves the namespaces the test made.

use std::time::Duration;

use ferry_tests::{GuestSpec, TestHost, TestNet};

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
