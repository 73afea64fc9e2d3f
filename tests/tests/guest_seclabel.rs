//! Guest end-to-end for `seclabel` (FUSE_SECURITY_CTX): a guest booted with SELinux
//! (`security=selinux`, no policy loaded, so its LSM labels new nodes with its initial
//! context) makes a file, a folder, a symlink and a FIFO on a share with `seclabel` and the
//! usual `xattrmap=security.:user.virtiofs.security.`. The file and the folder carry the
//! label on the host, under the mapped name, as the guest made them (no SETXATTR of the
//! guest's could have put it there: without a policy, SELinux sets none); the guest reads the
//! same label back; the symlink and the FIFO are made, unlabelled (the host keeps `user.`
//! attributes on files and folders only). On a share without `seclabel` nothing is labelled.

use std::path::Path;
use std::time::Duration;

use ferry_tests::xattr::get_xattr;
use ferry_tests::{tools_share, FerryProcess, GuestSpec, Qemu};

const DEADLINE: Duration = Duration::from_secs(180);
const HOST_NAME: &str = "user.virtiofs.security.selinux";

fn label(p: &Path) -> Option<String> {
    get_xattr(p, HOST_NAME).ok().map(|v| {
        String::from_utf8_lossy(&v)
            .trim_end_matches('\0')
            .to_string()
    })
}

#[test]
fn an_selinux_guest_labels_what_it_makes_on_a_seclabel_share() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tools = tools_share(d);
    let (lab, plain) = (d.join("lab"), d.join("plain"));
    std::fs::create_dir(&lab).unwrap();
    std::fs::create_dir(&plain).unwrap();
    let (lab_sock, plain_sock) = (d.join("lab.sock"), d.join("plain.sock"));
    let map = "xattrmap=security.:user.virtiofs.security.";
    let ferry = FerryProcess::serve(
        d,
        &[
            "--share".into(),
            tools.share.clone(),
            "--share".into(),
            format!(
                "tag=lab,dir={},socket={},{map},seclabel",
                lab.display(),
                lab_sock.display()
            ),
            "--share".into(),
            format!(
                "tag=plain,dir={},socket={},{map}",
                plain.display(),
                plain_sock.display()
            ),
        ],
        &[tools.socket.clone(), lab_sock.clone(), plain_sock.clone()],
    );
    let script = r#"
P=/mnt/tools/probe
# Reports the guest's label of $2 as the check's detail (the host compares).
label() { v=$($P xattr-get "$2" security.selinux); case "$v" in ''|errno:*) echo "FERRY-CHECK $1 fail $v" ;; *) echo "FERRY-CHECK $1 ok $v" ;; esac; }
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
mount -t securityfs none /sys/kernel/security 2>/dev/null
check lsm "$(cat /sys/kernel/security/lsm 2>/dev/null | tr ',' '\n' | grep -c '^selinux$')" 1
cd /mnt/lab
printf x > f && mkdir d && ln -s f l && mkfifo p
label guest-file f
label guest-dir d
check made "$(ls | tr '\n' ' ')" "d f l p "
cd /mnt/plain
printf x > f && mkdir d
check plain-made "$(ls | tr '\n' ' ')" "d f "
sync
"#
    .to_string();
    let mut qemu = Qemu::boot(
        d,
        &GuestSpec {
            script,
            shares: vec![
                ("tools".into(), tools.socket.clone()),
                ("lab".into(), lab_sock.clone()),
                ("plain".into(), plain_sock.clone()),
            ],
            kernel_args: "security=selinux selinux=1".into(),
            ..Default::default()
        },
    );
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(5, &format!("ferry log:\n{}", ferry.log_tail()));
    let guest_file = out.check("guest-file").unwrap().detail.clone();
    let guest_dir = out.check("guest-dir").unwrap().detail.clone();
    assert_eq!(label(&lab.join("f")).as_deref(), Some(guest_file.as_str()));
    assert_eq!(label(&lab.join("d")).as_deref(), Some(guest_dir.as_str()));
    assert!(lab.join("l").symlink_metadata().is_ok() && lab.join("p").exists());
    assert_eq!(label(&plain.join("f")), None, "no seclabel, no label");
    assert_eq!(label(&plain.join("d")), None, "no seclabel, no label");
    drop(qemu);
    drop(ferry);
}
