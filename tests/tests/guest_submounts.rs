//! A share that spans host mounts, from inside the guest: two tmpfs mounted inside the shared
//! folder hold files with the same host inode number, and the guest sees them as two files
//! (`find -inum` finds one), each tmpfs as a submount with its own `st_dev`.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use ferry_tests::{FerryProcess, GuestSpec, Qemu, Tmpfs};

const DEADLINE: Duration = Duration::from_secs(180);

const SCRIPT: &str = r#"
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
D=/mnt/data
check read-a "$(cat $D/a/f)" "in a"
check read-b "$(cat $D/b/f)" "in b"
ia=$(stat -c %i $D/a/f); ib=$(stat -c %i $D/b/f)
check distinct-inodes "$([ "$ia" != "$ib" ] && echo yes)" yes
check find-inum-a "$(find $D -inum $ia | wc -l)" 1
check find-inum-b "$(find $D -inum $ib | wc -l)" 1
check own-st-dev "$([ "$(stat -c %d $D/a)" != "$(stat -c %d $D)" ] && [ "$(stat -c %d $D/a)" != "$(stat -c %d $D/b)" ] && echo yes)" yes
check submount-listed "$(awk '$2 == "/mnt/data/a" {print $3}' /proc/mounts)" virtiofs
# Writes in a submount land in the host's tmpfs.
echo guest > $D/b/new && check write-b "$(cat $D/b/new)" guest
"#;

#[test]
fn a_share_spanning_host_mounts_shows_distinct_inodes_and_submounts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let a = Tmpfs::mount(&data.join("a"), 1);
    let b = Tmpfs::mount(&data.join("b"), 1);
    std::fs::write(a.0.join("f"), "in a\n").unwrap();
    std::fs::write(b.0.join("f"), "in b\n").unwrap();
    let (ma, mb) = (
        std::fs::metadata(a.0.join("f")).unwrap(),
        std::fs::metadata(b.0.join("f")).unwrap(),
    );
    // What makes the test bite: one inode number for two files on the host.
    assert_eq!(
        ma.ino(),
        mb.ino(),
        "the two tmpfs files should share an inode number"
    );
    let sock = dir.path().join("data.sock");
    let ferry = FerryProcess::serve(
        dir.path(),
        &[
            "--share".into(),
            format!("tag=data,dir={},socket={}", data.display(), sock.display()),
        ],
        std::slice::from_ref(&sock),
    );
    let mut qemu = Qemu::boot(
        dir.path(),
        &GuestSpec {
            script: SCRIPT.into(),
            shares: vec![("data".into(), sock.clone())],
            ..Default::default()
        },
    );
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(8, &format!("ferry log:\n{}", ferry.log_tail()));
    assert_eq!(std::fs::read_to_string(b.0.join("new")).unwrap(), "guest\n");
    drop(qemu);
    drop(ferry);
}
