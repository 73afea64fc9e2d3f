//! Guest end-to-end for virtio-fs: the guest kernel's own FUSE client against `PassthroughFs`
//! through the vhost-user device. Each check prints a FERRY-CHECK line; expected values come
//! from the host side, and the host checks what the guest wrote.

use std::path::Path;
use std::time::Duration;

use ferry_tests::xattr::{get_xattr, set_xattr};
use ferry_tests::{wait_for, FerryProcess, GuestSpec, Qemu};

const DEADLINE: Duration = Duration::from_secs(300);

const SCRIPT: &str = r#"
ok() { echo "FERRY-CHECK $1 ok $2"; }
fail() { echo "FERRY-CHECK $1 fail $2"; }
check() { if [ "$2" = "$3" ]; then ok "$1" "$2"; else fail "$1" "want '$3' got '$2'"; fi; }
S=/mnt/rw; R=/mnt/ro
cd $S || { fail cd "cannot cd to $S"; exit 1; }

# Files: write 64 MiB, read it back, append, truncate.
dd if=/dev/urandom of=big bs=1M count=64 2>/dev/null
sha256sum big | cut -d' ' -f1 > big.sha256
check big-size "$(stat -c %s big)" 67108864
cp big big.copy && check copy-matches "$(sha256sum big.copy | cut -d' ' -f1)" "$(cat big.sha256)"
rm big.copy
printf hello > f && printf ' world' >> f && check append "$(cat f)" "hello world"
truncate -s 5 f && check truncate "$(cat f)" hello
truncate -s 1000000 f && check extend "$(stat -c %s f)" 1000000
check host-file "$(cat from-host.txt)" "written on the host"

# Four writers at once, each syncing: the share's pool (threads=4) answers their requests
# side by side (checked on the host through /stats).
for i in 1 2 3 4; do dd if=/dev/zero of=par$i bs=65536 count=32 conv=fsync 2>/dev/null & done; wait
check parallel-writes "$(cat par1 par2 par3 par4 | wc -c)" 8388608

# Directories and names.
mkdir -p d1/d2 && check mkdir "$(stat -c %F d1/d2)" directory
mv f d1/d2/g && check rename "$(cat d1/d2/g | head -c 5)" hello
rmdir d1/d2 2>/dev/null && fail rmdir-nonempty "removed a non-empty dir" || ok rmdir-nonempty ENOTEMPTY
rm d1/d2/g && rmdir d1/d2 d1 && check rmdir "$(ls -d d1 2>&1 | grep -c 'No such')" 1
printf x > target && ln target hard && check link-count "$(stat -c %h target)" 2
ln -s target soft && check readlink "$(readlink soft)" target && check symlink-read "$(cat soft)" x
chmod 640 target && check chmod "$(stat -c %a target)" 640
chown 65534:65534 target && check chown "$(stat -c '%u:%g' target)" 65534:65534
touch -d '2001-02-03 04:05:06' target && check utimes "$(stat -c %Y target)" 981173106
mkfifo fifo && check mkfifo "$(stat -c %F fifo)" fifo
mknod dev c 1 3 2>/tmp/err; check mknod-device-refused "$(grep -c 'not permitted' /tmp/err)" 1
fallocate -l 1048576 alloc && check fallocate "$(stat -c %s alloc)" 1048576
check readdir-10k "$(ls many | wc -l)" 10000
check walk "$(find walk | wc -l)" 161

# What busybox has no applet for: the static probe from tests/probe/probe.c.
P=$S/probe
check xattr-set "$($P xattr-set target user.color blue)" ok
check xattr-get "$($P xattr-get target user.color)" blue
check xattr-list "$($P xattr-list target)" "user.color,"
check xattr-rm "$($P xattr-rm target user.color)" ok
check xattr-gone "$($P xattr-get target user.color)" errno:ENODATA
check xattr-privileged "$($P xattr-set target trusted.ferry x)" errno:EPERM
# The share maps security. to user.virtiofs.security. (xattrmap=): the guest's root labels a
# file as an SELinux guest does, and the host keeps the label in a user. attribute (checked on
# the host); the mapped name itself is out of the guest's reach.
check label-set "$($P xattr-set target security.selinux system_u:object_r:container_file_t:s0)" ok
check label-get "$($P xattr-get target security.selinux)" system_u:object_r:container_file_t:s0
check label-list "$($P xattr-list target all)" "security.selinux,"
check label-forge "$($P xattr-set target user.virtiofs.security.selinux x)" errno:EPERM
check label-hidden "$($P xattr-get target user.virtiofs.security.selinux)" errno:ENODATA
check label-host-made "$($P xattr-get from-host.txt security.selinux)" host_label
printf A > ra && printf B > rb
check rename-noreplace "$($P rename2 ra rb noreplace)" errno:EEXIST
check rename-exchange "$($P rename2 ra rb exchange)$(cat ra)$(cat rb)" okBA
truncate -s 4194304 sparse && dd if=/dev/urandom of=sparse bs=4096 count=1 seek=256 conv=notrunc 2>/dev/null
check seek-data "$($P seek sparse data 0)" 1048576
check seek-hole "$($P seek sparse hole 1048576)" 1052672
check flock "$($P flock lockfile)" exclusive
check fcntl-locks "$($P fcntl lockfile2)" "getlk=1 setlk-refused=1 setlkw=1"
# A write by a user without CAP_FSETID clears set-user-ID and group-executable set-group-ID
# (ferry does it: the guest hands it over with FUSE_HANDLE_KILLPRIV_V2); root's writes keep them.
printf x > suid && chmod 6777 suid && printf y >> suid
check suid-kept-for-root "$(stat -c %a suid)" 6777
check suid-write-as-user "$($P write-as suid 65534)" ok
check suid-cleared "$(stat -c %a suid)" 777
check statfs-blocks "$(stat -f -c %b .)" "$STATFS_BLOCKS"

# Ownership the guest sets is emulated on a share without `trusted`: a set-user-ID root
# program and a folder given to 12345 look done here, and again after a remount (ferry reads
# them back from the host files), while the host files keep the share owner and no set-id bit
# (checked on the host).
cp $P plant && chown 0:0 plant && chmod 4755 plant
check plant-shown "$(stat -c %u:%g:%a plant)" 0:0:4755
mkdir given && chown 12345:12345 given && check chown-shown "$(stat -c %u:%g given)" 12345:12345
cd / && umount $S && mount -t virtiofs rw $S && cd $S && ok remount || fail remount "cannot remount $S"
check plant-after-remount "$(stat -c %u:%g:%a plant)" 0:0:4755
check chown-after-remount "$(stat -c %u:%g given)" 12345:12345
check chown-still-shown "$(stat -c %u:%g target)" 65534:65534

# Escapes: links made on the host that point outside the share resolve in the guest's own
# namespace, never on the host.
check escape-symlink "$(cat escape 2>&1 | grep -c HOST-SECRET)" 0
check escape-dir "$(ls escapedir/ 2>&1 | grep -c host-secret)" 0
check escape-dotdot "$(ls $S/.. | grep -c host-secret)" 0

# Read-only share.
( echo x > $R/new ) 2>/tmp/err; check ro-create "$(grep -c 'Read-only' /tmp/err)" 1
rm $R/keep 2>/tmp/err; check ro-unlink "$(grep -c 'Read-only' /tmp/err)" 1
check ro-read "$(cat $R/keep)" kept

# A share with the writeback cache and xattrs off: ferry answers ENOSYS once and the guest's
# kernel stops asking. It maps ids too (uidmap=0:1234,uidmap=1000:5000:10,gidmap=0:2345:10):
# two user ranges, as a rootless engine's root and subordinate ids. The host's 1234 is
# the guest's root.
W=/mnt/wb
check idmap-shown "$(stat -c %u:%g $W/owned)" 0:1
check idmap-unmapped "$(stat -c %u:%g $W/nobody)" 65534:65534
mkdir $W/madedir && check idmap-create "$(stat -c %u:%g $W/madedir)" 0:0
chown 7:3 $W/owned && check idmap-chown "$(stat -c %u:%g $W/owned)" 7:3
check idmap-root-writes "$(printf ok > $W/nobody 2>&1; cat $W/nobody)" ok
check idmap-second-range "$(stat -c %u:%g $W/sub)" 1003:0
chown 1001 $W/sub && check idmap-second-range-chown "$(stat -c %u $W/sub)" 1001
# A `trusted` share passes the plant through (checked on the host).
cp $P $W/plant && chown 0:0 $W/plant && chmod 4755 $W/plant
check trusted-plant "$(stat -c %u:%g:%a $W/plant)" 0:0:4755
dd if=/dev/urandom of=$W/f bs=65536 count=64 2>/dev/null && sha256sum $W/f | cut -d' ' -f1 > $W/f.sha256
printf abc > $W/w && printf def >> $W/w && check wb-append "$(cat $W/w)" abcdef
# The guest's kernel applied the guest's umask already: ferry's own takes nothing more off.
(umask 0; mkdir $W/open && printf x > $W/openf)
check umask-once "$(stat -c %a $W/open) $(stat -c %a $W/openf)" "777 666"
exec 4>$W/wo; printf xyz >&4; exec 4>&-; check wb-write-only "$(cat $W/wo)" xyz
check noxattr-get "$($P xattr-get $W/w user.color)" errno:EOPNOTSUPP
check noxattr-set "$($P xattr-set $W/w user.color blue)" errno:EOPNOTSUPP

# A file held open: the host checks that ferry itself holds it.
exec 3<big
touch holding
i=0; while [ ! -e released ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
exec 3<&-
check held-file-released "$(ls released)" released

# A change made on the host shows up in the guest.
touch want-host-change
i=0; while [ "$(cat host-change 2>/dev/null)" != later ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
check host-change-visible "$(cat host-change 2>/dev/null)" later
sync
"#;

#[test]
fn guest_file_operations_through_ferry() {
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw");
    let ro = dir.path().join("ro");
    let many = rw.join("many");
    std::fs::create_dir_all(&many).unwrap();
    std::fs::create_dir(&ro).unwrap();
    for i in 0..10_000 {
        std::fs::write(many.join(format!("entry-{i:05}")), b"").unwrap();
    }
    // A tree to walk: 40 folders of 3 files each.
    for d in 0..40 {
        let sub = rw.join(format!("walk/d{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..3 {
            std::fs::write(sub.join(format!("f{f}")), b"").unwrap();
        }
    }
    std::fs::write(rw.join("from-host.txt"), b"written on the host").unwrap();
    // A label the host set under the mapped name, as a share that virtiofsd served has.
    set_xattr(
        &rw.join("from-host.txt"),
        "user.virtiofs.security.selinux",
        b"host_label",
    )
    .expect("setxattr on the host");
    std::fs::copy(ferry_tests::probe(), rw.join("probe")).unwrap();
    std::fs::write(ro.join("keep"), b"kept").unwrap();
    std::fs::write(dir.path().join("host-secret"), b"HOST-SECRET").unwrap();
    std::os::unix::fs::symlink(dir.path().join("host-secret"), rw.join("escape")).unwrap();
    std::os::unix::fs::symlink(dir.path(), rw.join("escapedir")).unwrap();
    let blocks = {
        // SAFETY: statvfs is plain data and `st` is a valid destination.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let p = std::ffi::CString::new(rw.to_str().unwrap()).unwrap();
        // SAFETY: `p` is NUL-terminated and `st` is valid.
        assert_eq!(unsafe { libc::statvfs(p.as_ptr(), &mut st) }, 0);
        st.f_blocks
    };

    let wb = dir.path().join("wb");
    std::fs::create_dir(&wb).unwrap();
    // The share belongs to the host user the guest's root is mapped to, as it would.
    std::os::unix::fs::chown(&wb, Some(1234), Some(2345)).unwrap();
    for (name, uid, gid) in [
        ("owned", 1234, 2346),
        ("nobody", 65534, 65534),
        ("sub", 5003, 2345),
    ] {
        std::fs::write(wb.join(name), b"").unwrap();
        std::os::unix::fs::chown(wb.join(name), Some(uid), Some(gid)).unwrap();
    }
    let wb_sock = dir.path().join("wb.sock");
    let rw_sock = dir.path().join("rw.sock");
    let ro_sock = dir.path().join("ro.sock");
    let api = dir.path().join("api.sock");
    let mut ferry = FerryProcess::serve(
        dir.path(),
        &[
            "--api-socket".into(),
            api.display().to_string(),
            "--share".into(),
            format!(
                "tag=rw,dir={},socket={},xattrmap=security.:user.virtiofs.security.,threads=4",
                rw.display(),
                rw_sock.display()
            ),
            "--share".into(),
            format!(
                "tag=ro,dir={},socket={},readonly",
                ro.display(),
                ro_sock.display()
            ),
            "--share".into(),
            format!(
                "tag=wb,dir={},socket={},writeback,noxattr,trusted,uidmap=0:1234,uidmap=1000:5000:10,gidmap=0:2345:10",
                wb.display(),
                wb_sock.display()
            ),
        ],
        &[rw_sock.clone(), ro_sock.clone(), wb_sock.clone()],
    );
    let spec = GuestSpec {
        script: format!("STATFS_BLOCKS={blocks}\n{SCRIPT}"),
        shares: vec![
            ("rw".into(), rw_sock),
            ("ro".into(), ro_sock),
            ("wb".into(), wb_sock),
        ],
        memory_mib: 512,
        ..Default::default()
    };
    let mut qemu = Qemu::boot(dir.path(), &spec);

    // While the guest holds `big` open, that file is open in ferry's own fd table, and no
    // other process serves the share.
    let holding = wait_for(DEADLINE, || rw.join("holding").exists().then_some(()));
    if holding.is_none() {
        panic!(
            "the guest never reached the open-file check; console:\n{}\nferry log:\n{}",
            ferry_tests::tail(&qemu.console(), 60),
            ferry.log_tail()
        );
    }
    let held = open_in(ferry.serving_pid(), &rw.join("big"));
    let children = children_of(ferry.serving_pid());
    std::fs::write(rw.join("released"), b"").unwrap();
    assert!(
        held,
        "ferry (pid {}) does not hold big open",
        ferry.serving_pid()
    );
    assert!(
        children.is_empty(),
        "ferry has helper processes: {children:?}"
    );

    // A host-side change while the guest watches.
    wait_for(DEADLINE, || {
        rw.join("want-host-change").exists().then_some(())
    })
    .expect("guest asks for a host change");
    std::fs::write(rw.join("host-change"), b"later").unwrap();

    let out = qemu.wait_done(DEADLINE).unwrap_or_else(|e| {
        panic!("{e}\nferry log:\n{}", ferry.log_tail());
    });
    let failed: Vec<_> = out.checks.iter().filter(|c| !c.ok).collect();
    assert!(
        failed.is_empty() && out.checks.len() >= 71,
        "{} checks, failed: {failed:#?}\nconsole:\n{}\nferry log:\n{}",
        out.checks.len(),
        ferry_tests::tail(&out.console, 80),
        ferry.log_tail()
    );
    // What the guest wrote is on the host, byte for byte.
    let want = std::fs::read_to_string(rw.join("big.sha256")).unwrap();
    assert_eq!(sha256_hex(&rw.join("big")), want.trim());
    assert_eq!(std::fs::read(ro.join("keep")).unwrap(), b"kept");
    let want = std::fs::read_to_string(wb.join("f.sha256")).unwrap();
    assert_eq!(sha256_hex(&wb.join("f")), want.trim(), "writeback share");
    assert_eq!(std::fs::read(wb.join("w")).unwrap(), b"abcdef");
    // On the trusted share the guest's root made its files as the host's 1234:2345; its chown
    // to 7:3 is 7:2348.
    let owner = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(
        owner(&wb.join("w")),
        (1234, 2345),
        "idmap: a file the guest made"
    );
    assert_eq!(owner(&wb.join("madedir")), (1234, 2345), "idmap: a folder");
    assert_eq!(owner(&wb.join("owned")), (7, 2348), "idmap: chown");
    assert_eq!(
        owner(&wb.join("sub")),
        (5001, 2345),
        "idmap: chown in the second range"
    );
    assert!(!ro.join("new").exists());
    assert_eq!(
        get_xattr(&rw.join("target"), "user.virtiofs.security.selinux").as_deref(),
        Ok(&b"system_u:object_r:container_file_t:s0"[..]),
        "the guest's label under the mapped name on the host"
    );
    // The default share kept the plant and the chowns off the host; the trusted one did not.
    let attr = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    let share_owner = attr(&rw);
    assert_eq!(
        attr(&rw.join("plant")),
        (share_owner.0, share_owner.1, 0o755),
        "the guest's set-user-ID plant reached the host"
    );
    assert_eq!(
        attr(&rw.join("given")).0,
        share_owner.0,
        "a chown reached the host"
    );
    assert_eq!(
        attr(&rw.join("target")).0,
        share_owner.0,
        "a chown reached the host"
    );
    assert_eq!(attr(&wb.join("plant")), (1234, 2345, 0o4755), "trusted");
    // The guest's kernel read every folder without OPENDIR: ferry refused the first one and
    // the guest sent no more (nor RELEASEDIR), so each folder of the walk, the 10k-entry one
    // and the rest cost a listing and the empty read that ends it.
    let share = ferry_tests::share_stats(&api, "rw");
    let ops = &share["ops"];
    assert_eq!(ops["opendir"], 1, "{share}");
    // The pool's four threads answered the rw share, some requests side by side.
    assert!(
        share["max_in_flight"].as_u64().unwrap_or(0) >= 2,
        "threads=4 answered one request at a time: {share}"
    );
    let pool_threads = std::fs::read_dir(format!("/proc/{}/task", ferry.serving_pid()))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("fs-rw-"))
        })
        .count();
    assert_eq!(pool_threads, 4, "the rw share's pool threads");
    assert!(ops["releasedir"].is_null(), "{share}");
    let listings = ops["readdirplus"].as_u64().unwrap_or(0) + ops["readdir"].as_u64().unwrap_or(0);
    assert!(listings >= 2 * 41, "{share}");
    assert_eq!(
        std::fs::read(dir.path().join("host-secret")).unwrap(),
        b"HOST-SECRET"
    );
    assert!(ferry.is_running());
}

/// The child processes of `pid` (from every thread's `children` list).
fn children_of(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// Whether process `pid` has `path` open.
fn open_in(pid: u32, path: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    rd.flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == path))
}

fn sha256_hex(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap_or("")
        .to_string()
}
