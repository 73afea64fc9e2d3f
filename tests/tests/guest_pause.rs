//! A VM paused and resumed while both devices are busy: QEMU's `stop` and `cont` (libvirt's
//! `virsh suspend`/`resume`, the way desktop tools park an idle VM). QEMU stops every vhost
//! ring at the pause (GET_VRING_BASE) and sets them up again at the resume, with the rings'
//! positions it was given. Downloads and uploads through the NAT, and writers on a share with
//! a pool (`threads=4`, whose requests are answered off the queue's thread), run across two
//! pauses; every byte must arrive, every file read back as written, and both devices serve
//! new work after.
//!
//! Ferry runs in a test namespace with no route out; the "outside" is a test host on a veth
//! link.

use std::time::Duration;

use ferry_tests::{GuestSpec, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(240);
const SIZE: usize = 8 << 20;

#[test]
fn a_paused_vm_resumes_with_its_transfers_and_writes_whole() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let _host = TestHost::start(
        &net.remote,
        &[
            &remote,
            "--tcp-blob",
            "7000",
            &SIZE.to_string(),
            "--tcp-sha",
            "7001",
            &SIZE.to_string(),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw");
    std::fs::create_dir(&rw).unwrap();
    let rw_sock = dir.path().join("rw.sock");
    // Four writers of 4 KiB files, each synced and read back, downloads and uploads one after
    // another: all in the background, going on until the host has paused the VM twice.
    let script = format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
writer() {{
  i=0; bad=0
  while [ ! -e /mnt/tools/paused-twice ] || [ $i -lt 20 ]; do
    head -c 4096 /dev/urandom > /tmp/w$1
    dd if=/tmp/w$1 of=/mnt/rw/w$1-$i bs=4096 conv=fsync 2>/dev/null
    cmp -s /tmp/w$1 /mnt/rw/w$1-$i || bad=$((bad+1))
    i=$((i+1))
  done
  echo $bad > /tmp/bad$1; echo $i > /tmp/n$1
}}
for w in 1 2 3 4; do writer $w & done
(k=0; while [ ! -e /mnt/tools/paused-twice ] || [ $k -lt 2 ]; do nc {remote} 7000 | wc -c; k=$((k+1)); done > /tmp/down) &
(k=0; while [ ! -e /mnt/tools/paused-twice ] || [ $k -lt 2 ]; do head -c {SIZE} /dev/zero | nc {remote} 7001; echo; k=$((k+1)); done > /tmp/up) &
echo FERRY-BUSY
wait
check writes "$(cat /tmp/bad1 /tmp/bad2 /tmp/bad3 /tmp/bad4 | tr '\n' ' ')" "0 0 0 0 "
check downloads "$(sort -u /tmp/down)" "{SIZE}"
want=$(head -c {SIZE} /dev/zero | sha256sum | cut -d' ' -f1)
check uploads "$(grep . /tmp/up | sort -u)" "$want"
check files "$(ls /mnt/rw | wc -l)" "$(( $(cat /tmp/n1) + $(cat /tmp/n2) + $(cat /tmp/n3) + $(cat /tmp/n4) ))"
check after "$(nc {remote} 7000 | wc -c) $(echo again > /mnt/rw/after && cat /mnt/rw/after)" "{SIZE} again"
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
            shares: vec![("rw".into(), rw_sock.clone())],
            ..Default::default()
        },
        &[
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
            "--share".into(),
            format!(
                "tag=rw,dir={},socket={},threads=4",
                rw.display(),
                rw_sock.display()
            ),
        ],
        std::slice::from_ref(&rw_sock),
    );
    qemu.wait_console("FERRY-BUSY", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    for pause in 0..2 {
        std::thread::sleep(Duration::from_millis(700));
        let stopped = qemu.hmp("stop").and_then(|_| qemu.hmp("info status"));
        let status = stopped.unwrap_or_else(|e| panic!("pause {pause}: {e}"));
        assert!(status.contains("paused"), "pause {pause}: {status}");
        std::thread::sleep(Duration::from_millis(1500));
        qemu.hmp("cont")
            .unwrap_or_else(|e| panic!("resume {pause}: {e}"));
    }
    std::fs::write(tools.dir.join("paused-twice"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(5, &format!("ferry log:\n{}", ferry.log_tail()));
    assert!(ferry.is_running());
}
