//! Faults that must lose nothing, from inside the guest: a full host disk gives the guest
//! ENOSPC, ferry stopped (SIGSTOP) for 5 s in the middle of a copy picks up where it was, and
//! QEMU killed with SIGKILL while the guest writes loses no byte the guest had fsynced, and
//! the next boot is served by the same ferry.

use std::time::Duration;

use ferry_tests::{wait_for, FerryProcess, GuestSpec, Qemu, Tmpfs};

const DEADLINE: Duration = Duration::from_secs(300);

const HELPERS: &str = r#"
ok() { echo "FERRY-CHECK $1 ok $2"; }
fail() { echo "FERRY-CHECK $1 fail $2"; }
check() { if [ "$2" = "$3" ]; then ok "$1" "$2"; else fail "$1" "want '$3' got '$2'"; fi; }
S=/mnt/rw; T=/mnt/small
"#;

const FIRST_BOOT: &str = r#"
# A full host disk: the guest's write fails with ENOSPC, and the share works again once the
# guest makes room.
dd if=/dev/zero of=$T/fill bs=1M count=16 2>/tmp/err
check enospc "$(grep -c 'No space left' /tmp/err)" 1
rm $T/fill && echo room > $T/after && check after-enospc "$(cat $T/after)" room

# The guest copies 16 MiB into the share again and again, checking each copy, while the host
# stops ferry for 5 s (SIGSTOP) and lets it go on; then the host says so.
dd if=/dev/urandom of=/tmp/big bs=1M count=16 2>/dev/null
want=$(sha256sum /tmp/big | cut -d' ' -f1)
touch $S/want-stop
rounds=0; bad=0
while [ ! -e $S/resumed ] && [ $rounds -lt 500 ]; do
    cp /tmp/big $S/big && sync
    [ "$(sha256sum $S/big | cut -d' ' -f1)" = "$want" ] || bad=$((bad+1))
    rounds=$((rounds+1))
done
check copies-across-a-stop "$bad" 0
echo "copy rounds: $rounds"

# Blocks of 1 MiB, each fsynced before the guest says so; QEMU is killed at some point.
i=0
while [ $i -lt 64 ]; do
    dd if=/dev/urandom of=/tmp/blk bs=1M count=1 2>/dev/null
    dd if=/tmp/blk of=$S/synced bs=1M seek=$i count=1 conv=notrunc,fsync 2>/dev/null || break
    echo "FERRY-SYNCED $i $(sha256sum /tmp/blk | cut -d' ' -f1)"
    i=$((i+1))
done
sleep 3600
"#;

const SECOND_BOOT: &str = r#"
check next-boot-reads "$(cat $S/marker)" "after the kill"
echo again > $S/second && check next-boot-writes "$(cat $S/second)" again
"#;

fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut c = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap_or("")
        .to_string()
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory effects; the pid is ferry's, a child of this test.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
}

#[test]
fn a_full_disk_a_stopped_ferry_and_a_killed_qemu_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw");
    std::fs::create_dir(&rw).unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"), 4);
    let rw_sock = dir.path().join("rw.sock");
    let small_sock = dir.path().join("small.sock");
    let mut ferry = FerryProcess::serve(
        dir.path(),
        &[
            "--share".into(),
            format!("tag=rw,dir={},socket={}", rw.display(), rw_sock.display()),
            "--share".into(),
            format!(
                "tag=small,dir={},socket={}",
                small.0.display(),
                small_sock.display()
            ),
        ],
        &[rw_sock.clone(), small_sock.clone()],
    );
    let spec = |script: &str| GuestSpec {
        script: format!("{HELPERS}{script}"),
        shares: vec![
            ("rw".into(), rw_sock.clone()),
            ("small".into(), small_sock.clone()),
        ],
        memory_mib: 256,
        ..Default::default()
    };
    let mut qemu = Qemu::boot(dir.path(), &spec(FIRST_BOOT));

    // Stop ferry for 5 s while the guest copies, and let the guest go on for 2 s more.
    wait_for(DEADLINE, || rw.join("want-stop").exists().then_some(()))
        .unwrap_or_else(|| panic!("the guest never asked for the stop:\n{}", qemu.console()));
    std::thread::sleep(Duration::from_secs(1));
    signal(ferry.serving_pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(5));
    signal(ferry.serving_pid(), libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(rw.join("resumed"), b"").unwrap();

    // Kill QEMU once the guest has fsynced a few blocks.
    let synced = |console: &str| -> Vec<(usize, String)> {
        console
            .lines()
            .filter_map(|l| {
                let mut w = l.split("FERRY-SYNCED ").nth(1)?.split_whitespace();
                Some((w.next()?.parse().ok()?, w.next()?.to_string()))
            })
            .collect()
    };
    wait_for(DEADLINE, || {
        (synced(&qemu.console()).len() >= 4).then_some(())
    })
    .unwrap_or_else(|| panic!("the guest never synced 4 blocks:\n{}", qemu.console()));
    qemu.kill();
    let console = qemu.console();
    let failed: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("FERRY-CHECK") && l.contains(" fail "))
        .collect();
    assert!(failed.is_empty(), "{failed:#?}\n{}", ferry.log_tail());
    for name in ["enospc", "after-enospc", "copies-across-a-stop"] {
        assert!(
            console.contains(&format!("FERRY-CHECK {name} ok")),
            "no check {name}:\n{console}"
        );
    }
    // Every block the guest had fsynced is on the host, byte for byte.
    let data = std::fs::read(rw.join("synced")).unwrap();
    let blocks = synced(&console);
    for (i, sha) in &blocks {
        let block = data
            .get(i * (1 << 20)..(i + 1) * (1 << 20))
            .unwrap_or_else(|| panic!("block {i} is missing ({} bytes on the host)", data.len()));
        assert_eq!(&sha256_hex(block), sha, "block {i} differs after the kill");
    }
    assert!(ferry.is_running(), "{}", ferry.log_tail());

    // The next boot is served by the same ferry.
    std::fs::write(rw.join("marker"), b"after the kill").unwrap();
    let mut qemu = Qemu::boot(dir.path(), &spec(SECOND_BOOT));
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    let failed: Vec<_> = out.checks.iter().filter(|c| !c.ok).collect();
    assert!(
        failed.is_empty() && out.checks.len() == 2,
        "{failed:#?}\n{}",
        ferry_tests::tail(&out.console, 40)
    );
    assert_eq!(std::fs::read(rw.join("second")).unwrap(), b"again\n");
}

/// The guest serves a 48 MiB file on :80 through a published port. One client asks for it
/// and never reads; another resets its connection mid-transfer; a third downloads it whole,
/// as fast as alone, while they do.
#[test]
fn a_client_that_never_reads_or_resets_stalls_no_other_flow() {
    use ferry_tests::TestNet;
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
            "--publish".into(),
            "8080:80".into(),
        ],
        std::slice::from_ref(&sock),
    );
    let mut qemu = Qemu::boot(
        dir.path(),
        &GuestSpec {
            script: concat!(
                "mkdir -p /www && dd if=/dev/urandom of=/www/big bs=1M count=48 2>/dev/null\n",
                "sha256sum /www/big | cut -d' ' -f1 > /www/big.sha\n",
                "httpd -p 80 -h /www\necho FERRY-READY\nsleep 3600\n"
            )
            .into(),
            net_socket: Some(sock.clone()),
            mac: Some("02:46:52:59:00:02".into()),
            memory_mib: 512,
            ..Default::default()
        },
    );
    qemu.wait_console("FERRY-READY", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/clients.py");
    let staller = TestNet::command(&net.inner, "python3")
        .args([script, "stall", "127.0.0.1", "8080", "/big", "120"])
        .spawn()
        .expect("start the client that never reads");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _staller = Kill(staller);
    let reset = TestNet::command(&net.inner, "python3")
        .args([script, "resetmid", "127.0.0.1", "8080", "/big", "1048576"])
        .output()
        .expect("run the client that resets");
    assert!(
        String::from_utf8_lossy(&reset.stdout).starts_with("read "),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let want = TestNet::command(&net.inner, "curl")
        .args(["-sS", "-m", "60", "http://127.0.0.1:8080/big.sha"])
        .output()
        .expect("run curl");
    let got = TestNet::command(&net.inner, "sh")
        .args([
            "-c",
            "curl -sS -m 120 http://127.0.0.1:8080/big | sha256sum | cut -d' ' -f1",
        ])
        .output()
        .expect("run curl");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        String::from_utf8_lossy(&want.stdout).trim(),
        "the whole download, beside a stalled and a reset client: {} / {}{}\n{}",
        String::from_utf8_lossy(&got.stderr),
        String::from_utf8_lossy(&want.stderr),
        ferry_tests::tail(&qemu.console(), 20),
        ferry.log_tail()
    );
}
