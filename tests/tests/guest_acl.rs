//! Guest end-to-end for POSIX ACLs on a `posixacl` share: `setfacl` and `getfacl` (the host's,
//! through the tools share) in the guest set and read ACLs that the host's `getfacl` sees, the
//! guest's kernel lets a user the ACL names write a file its mode keeps from it, a folder's
//! default ACL is inherited by what the guest makes in it, the umask applies where there is
//! none, and an ACL set on the host shows in the guest. The share emulates ownership (no
//! `trusted`), as a default share does.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_tests::{host_program, tools_share, FerryProcess, GuestSpec, Qemu};

const DEADLINE: Duration = Duration::from_secs(180);

fn getfacl(p: &Path) -> String {
    let out = Command::new("getfacl")
        .args(["-c", "-n", "-p"])
        .arg(p)
        .output()
        .expect("run getfacl (apt-get install acl; scripts/install-deps.sh does)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn acls_set_in_the_guest_are_enforced_inherited_and_seen_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tools = tools_share(d);
    let setfacl = host_program(&tools.dir, "setfacl", Path::new("/usr/bin/setfacl"));
    let getfacl_guest = host_program(&tools.dir, "getfacl", Path::new("/usr/bin/getfacl"));
    let data = d.join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("hostfile"), b"h").unwrap();
    let st = Command::new("setfacl")
        .args(["-m", "g:2345:r"])
        .arg(data.join("hostfile"))
        .status()
        .expect("run setfacl");
    assert!(st.success(), "setfacl on the host");
    let sock = d.join("data.sock");
    let ferry = FerryProcess::serve(
        d,
        &[
            "--share".into(),
            tools.share.clone(),
            "--share".into(),
            format!(
                "tag=data,dir={},socket={},posixacl",
                data.display(),
                sock.display()
            ),
        ],
        &[tools.socket.clone(), sock.clone()],
    );
    let script = format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
SF="{setfacl}"; GF="{getfacl_guest}"
echo 'acluser:x:1234:1234::/:/bin/sh' >> /etc/passwd
cd /mnt/data && umask 022
printf x > f && chmod 600 f
check acl-set "$($SF -m u:1234:rw f 2>&1; echo $?)" 0
check acl-get "$($GF -c -n f 2>/dev/null | grep '^user:1234')" user:1234:rw-
check acl-mask-in-mode "$(stat -c %a f)" 660
su -s /bin/sh acluser -c 'printf y >> /mnt/data/f'
check acl-grants "$(cat f)" xy
printf z > g && chmod 600 g
check no-acl-denies "$(su -s /bin/sh acluser -c 'printf y >> /mnt/data/g' 2>&1 | grep -c 'denied')" 1
mkdir d && $SF -d -m u:1234:rwx d
printf n > d/new && mkdir d/sub
check default-inherited-by-file "$($GF -c -n d/new 2>/dev/null | grep -c '^user:1234:rwx')" 1
check default-inherited-by-folder "$($GF -c -n -d d/sub 2>/dev/null | grep -c 'user:1234:rwx')" 1
printf p > plain && mkdir plaindir
check umask-without-default "$(stat -c %a plain) $(stat -c %a plaindir)" "644 755"
check host-made-acl "$($GF -c -n hostfile 2>/dev/null | grep '^group:2345')" group:2345:r--
sync
"#
    );
    let mut qemu = Qemu::boot(
        d,
        &GuestSpec {
            script,
            shares: vec![
                ("tools".into(), tools.socket.clone()),
                ("data".into(), sock.clone()),
            ],
            ..Default::default()
        },
    );
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(9, &format!("ferry log:\n{}", ferry.log_tail()));
    // The host's own tools read what the guest set.
    assert!(
        getfacl(&data.join("f")).contains("user:1234:rw-"),
        "{}",
        getfacl(&data.join("f"))
    );
    assert!(
        getfacl(&data.join("d/new")).contains("user:1234:rwx"),
        "{}",
        getfacl(&data.join("d/new"))
    );
    assert_eq!(std::fs::read(data.join("f")).unwrap(), b"xy");
    drop(qemu);
    drop(ferry);
}
