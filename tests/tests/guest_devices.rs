//! Guest end-to-end: a share with `devices` (a container's root file system) lets the guest's
//! root make device nodes, as virtiofsd does; a default share refuses them with EPERM, so a
//! device node never reaches a shared folder unless asked for.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::Duration;

use ferry_tests::{FerryProcess, GuestSpec, Qemu};

#[test]
fn device_nodes_only_in_a_devices_share() {
    let dir = tempfile::tempdir().unwrap();
    let (rootfs, plain) = (dir.path().join("rootfs"), dir.path().join("plain"));
    for d in [&rootfs, &plain] {
        std::fs::create_dir(d).unwrap();
    }
    let (s1, s2) = (dir.path().join("fs1.sock"), dir.path().join("fs2.sock"));
    let ferry = FerryProcess::serve(
        dir.path(),
        &[
            "--share".into(),
            format!(
                "tag=rootfs,dir={},socket={},devices",
                rootfs.display(),
                s1.display()
            ),
            "--share".into(),
            format!("tag=plain,dir={},socket={}", plain.display(), s2.display()),
        ],
        &[s1.clone(), s2.clone()],
    );
    let script = r#"
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
mknod /mnt/rootfs/null c 1 3 2>&1; check mknod-devices "$?" 0
check write-to-it "$(echo data > /mnt/rootfs/null && echo written)" written
check stat-type "$(stat -c '%F %t:%T' /mnt/rootfs/null)" "character special file 1:3"
check mknod-plain "$(mknod /mnt/plain/null c 1 3 2>&1 | grep -c 'not permitted')" 1
check fifo-plain "$(mkfifo /mnt/plain/pipe && echo made)" made
"#;
    let mut qemu = Qemu::boot(
        dir.path(),
        &GuestSpec {
            script: script.into(),
            shares: vec![("rootfs".into(), s1), ("plain".into(), s2)],
            memory_mib: 256,
            ..Default::default()
        },
    );
    let out = qemu
        .wait_done(Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(5, &format!("ferry log:\n{}", ferry.log_tail()));
    let m = std::fs::symlink_metadata(rootfs.join("null")).unwrap();
    assert!(m.file_type().is_char_device() && m.rdev() == libc::makedev(1, 3));
    assert!(!plain.join("null").exists());
}
