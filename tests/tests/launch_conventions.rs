//! vhost-user's backend program conventions and systemd's, as launchers use them: the
//! capabilities JSON, a listening socket handed over with `--fd` / `fd=`, systemd socket
//! activation, and `--socket-group`. Each guest test boots the tiny guest on the sockets so
//! handed over and checks that both devices serve it.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_tests::{ferry_bin, FerryProcess, GuestSpec, Qemu};

const DEADLINE: Duration = Duration::from_secs(180);

/// The guest's checks: a lease, the gateway, and a file written through the share.
fn script(tag: &str) -> String {
    format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
check dhcp-address "$(ip -4 -o addr show eth0 | awk '{{print $4}}')" 192.168.127.2/24
check ping-gateway "$(ping -c 1 -W 2 192.168.127.1 2>&1 | grep -c 'bytes from')" 1
echo written-by-the-guest > /mnt/{tag}/from-guest && sync
check fs-write "$(cat /mnt/{tag}/from-guest 2>&1)" written-by-the-guest
"#
    )
}

fn boot_and_check(dir: &Path, net: &Path, fs: &Path, share: &Path, ferry: &FerryProcess) {
    let tag = "handed";
    let mut qemu = Qemu::boot(
        dir,
        &GuestSpec {
            script: script(tag),
            net_socket: Some(net.to_path_buf()),
            shares: vec![(tag.into(), fs.to_path_buf())],
            memory_mib: 256,
            ..Default::default()
        },
    );
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(3, &format!("ferry log:\n{}", ferry.log_tail()));
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest")).unwrap(),
        "written-by-the-guest\n"
    );
}

#[test]
fn print_capabilities_prints_the_specs_json_and_nothing_else() {
    let out = Command::new(ferry_bin())
        .args(["serve", "--print-capabilities"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["type"], "net", "{v}");
    assert!(v["features"].is_array(), "{v}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_socket_activation_serves_both_devices() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let net = dir.path().join("net.sock");
    let fs = dir.path().join("fs.sock");
    // systemd-socket-activate binds both, sets LISTEN_PID/LISTEN_FDS and execs ferry, which
    // finds each device's socket by the path it is bound to.
    let mut cmd = Command::new("systemd-socket-activate");
    for s in [&net, &fs] {
        cmd.arg("-l").arg(s);
    }
    cmd.arg(ferry_bin()).arg("serve").args([
        "--net-socket".into(),
        net.display().to_string(),
        "--share".into(),
        format!("tag=handed,dir={},socket={}", share.display(), fs.display()),
        "--dns-upstream".into(),
        "127.0.0.1:1".into(),
    ]);
    let mut ferry = FerryProcess::start(cmd, dir.path(), &[net.clone(), fs.clone()]);
    boot_and_check(dir.path(), &net, &fs, &share, &ferry);
    assert_eq!(ferry.terminate(), Some(0), "{}", ferry.log_tail());
}

#[test]
fn an_inherited_fd_serves_net_and_socket_group_opens_the_bound_one_to_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let net = dir.path().join("launcher-net.sock");
    let fs = dir.path().join("fs.sock");
    // What libvirt and the spec's `--fd` do: the launcher binds and listens, ferry inherits.
    let listener = UnixListener::bind(&net).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("serve").args([
        "--fd".into(),
        fd.to_string(),
        "--share".into(),
        format!("tag=handed,dir={},socket={}", share.display(), fs.display()),
        "--socket-group".into(),
        "nogroup".into(),
        "--dns-upstream".into(),
        "127.0.0.1:1".into(),
    ]);
    // SAFETY: between fork and exec only fcntl runs, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut ferry = FerryProcess::start(cmd, dir.path(), std::slice::from_ref(&fs));
    drop(listener); // ferry holds its own copy now
                    // The socket file appears at bind(); its group and mode follow at once.
    let meta = ferry_tests::wait_for(Duration::from_secs(5), || {
        let m = std::fs::metadata(&fs).ok()?;
        (m.mode() & 0o777 == 0o660).then_some(m)
    })
    .unwrap_or_else(|| panic!("the bound socket's mode never became 0660"));
    assert_eq!(meta.gid(), 65534, "the bound socket's group (nogroup)");
    boot_and_check(dir.path(), &net, &fs, &share, &ferry);
    assert_eq!(ferry.terminate(), Some(0), "{}", ferry.log_tail());
    // The socket ferry bound is removed; the one it was handed stays its launcher's.
    assert!(!fs.exists(), "ferry removes the socket it bound");
    assert!(
        net.exists(),
        "ferry leaves the handed-over socket to its launcher"
    );
}

#[test]
fn a_bad_fd_is_refused_with_a_sentence() {
    let out = Command::new(ferry_bin())
        .args(["serve", "--fd", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--fd 0: fd 0 is not a socket"), "{err}");
}
