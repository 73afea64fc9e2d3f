//! Guest end-to-end at scale: the guest walks a share of 100,000 files. Ferry must answer every
//! lookup without running out of descriptors (nodes past its descriptor budget keep file
//! handles instead).

use std::time::Duration;

use ferry_tests::{wait_for, FerryProcess, GuestSpec, Qemu};

const DEADLINE: Duration = Duration::from_secs(600);
const DIRS: usize = 100;
const FILES_PER_DIR: usize = 1000;

const SCRIPT: &str = r#"
n=$(find /mnt/big/tree -type f | wc -l)
if [ "$n" = 100000 ]; then echo "FERRY-CHECK walk-100k ok $n"; else echo "FERRY-CHECK walk-100k fail $n files"; fi
# Every file is still known to the guest's dentry cache, so ferry still holds every node.
n=$(cat /mnt/big/tree/d099/f0999 /mnt/big/tree/d000/f0000 | wc -c)
if [ "$n" = 10 ]; then echo "FERRY-CHECK read-after-walk ok"; else echo "FERRY-CHECK read-after-walk fail $n bytes"; fi
touch /mnt/big/walked
i=0; while [ ! -e /mnt/big/counted ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
"#;

#[test]
fn guest_walks_100k_files_without_exhausting_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("big");
    for d in 0..DIRS {
        let sub = share.join(format!("tree/d{d:03}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..FILES_PER_DIR {
            std::fs::write(sub.join(format!("f{f:04}")), b"12345").unwrap();
        }
    }
    let sock = dir.path().join("big.sock");
    let mut ferry = FerryProcess::serve(
        dir.path(),
        &[
            "--share".into(),
            format!("tag=big,dir={},socket={}", share.display(), sock.display()),
        ],
        std::slice::from_ref(&sock),
    );
    let mut qemu = Qemu::boot(
        dir.path(),
        &GuestSpec {
            script: SCRIPT.into(),
            shares: vec![("big".into(), sock)],
            memory_mib: 1024,
            ..Default::default()
        },
    );
    if wait_for(DEADLINE, || share.join("walked").exists().then_some(())).is_none() {
        panic!(
            "the walk did not finish; console:\n{}\nferry log:\n{}",
            ferry_tests::tail(&qemu.console(), 40),
            ferry.log_tail()
        );
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", ferry.serving_pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    std::fs::write(share.join("counted"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    let failed: Vec<_> = out.checks.iter().filter(|c| !c.ok).collect();
    assert!(
        failed.is_empty() && out.checks.len() == 2,
        "failed: {failed:#?}\nconsole:\n{}\nferry log:\n{}",
        ferry_tests::tail(&out.console, 40),
        ferry.log_tail()
    );
    // 100,000 nodes are held, but no more than the descriptor budget (16384) plus a little.
    assert!(
        fds > 0 && fds < 17_000,
        "ferry held {fds} descriptors while the guest held 100,000 nodes"
    );
    assert!(ferry.is_running());
}
