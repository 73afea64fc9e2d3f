//! Guest end-to-end under libvirt: a domain as docs/libvirt.md documents it, defined in a
//! libvirt daemon from Debian's packages (see `ferry_tests::libvirt`), started with `virsh
//! start`. libvirt chooses the NIC's MAC. The guest takes its lease from ferry, resolves
//! `host.ferry.internal`, sees the two queue pairs `<driver queues='2'/>` asks for, fetches a page from a server on the host's loopback through the host
//! alias, pings a test host and writes a file the host reads; then `virsh destroy` and a second
//! `virsh start`, served by the same ferry.
//!
//! Ferry runs in a test namespace with no route out; the "outside" is a test host on a veth
//! link and the host's loopback is that namespace's. libvirt and its QEMU stay outside the
//! namespaces: they reach ferry only through its UNIX sockets.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use ferry_tests::libvirt::{wait_console_done, Domain, DomainFs, Libvirt, LIBVIRT_ID};
use ferry_tests::{FerryProcess, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(180);
const TAG: &str = "hostshare";
const PAGE: &str = "a page on the host's loopback";

/// The guest's checks; each boot numbers itself by the files earlier boots left in the share.
fn script(remote: &str) -> String {
    format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
echo "FERRY-MAC $(cat /sys/class/net/eth0/address)"
check lease "$(ip -4 -o addr show eth0 | awk '{{print $4}}')" 192.168.127.2/24
check queue-pairs "$(ls /sys/class/net/eth0/queues | tr '\n' ' ')" "rx-0 rx-1 tx-0 tx-1 "
check dns-host "$(nslookup -type=A host.ferry.internal 2>&1 | awk '/^Address/ {{a=$2}} END {{print a}}')" 192.168.127.254
check fetch-host-alias "$(wget -q -O - http://host.ferry.internal:8089/page.txt 2>&1)" "{PAGE}"
check ping-test-host "$(ping -c 1 -W 3 {remote} 2>&1 | grep -c 'bytes from')" 1
n=$(( $(ls /mnt/{TAG} | grep -c '^boot-') + 1 ))
echo "boot $n" > /mnt/{TAG}/boot-$n && sync
check fs-write "$(cat /mnt/{TAG}/boot-$n)" "boot $n"
"#
    )
}

#[test]
fn a_libvirt_domain_is_served_and_served_again_after_destroy() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    // libvirt's QEMU runs as nobody: it must reach the folder, write the console and read the
    // script; ferry's sockets are opened to its group with --socket-group.
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o777)).unwrap();
    let share = dir.path().join("share");
    let web = dir.path().join("web");
    std::fs::create_dir(&share).unwrap();
    std::fs::create_dir(&web).unwrap();
    std::fs::write(web.join("page.txt"), format!("{PAGE}\n")).unwrap();
    // Ferry answers the guest's pings through ping sockets, which a new namespace keeps off.
    net.allow_ping_sockets();
    let _remote = TestHost::start(&net.remote, &[&net.remote_addr]);
    let _web = TestHost::start(
        &net.inner,
        &["127.0.0.1", "--http", "8089", web.to_str().unwrap()],
    );

    let net_sock = dir.path().join("net.sock");
    let fs_sock = dir.path().join("fs.sock");
    let ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            net_sock.display().to_string(),
            "--share".into(),
            format!(
                "tag={TAG},dir={},socket={}",
                share.display(),
                fs_sock.display()
            ),
            "--socket-group".into(),
            LIBVIRT_ID.to_string(),
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
        ],
        &[net_sock.clone(), fs_sock.clone()],
    );

    let lv = Libvirt::start(dir.path()).expect("start a private libvirt daemon");
    let script_path = dir.path().join("guest.sh");
    std::fs::write(&script_path, script(&net.remote_addr)).unwrap();
    let console = dir.path().join("console.log");
    let name = "ferry-guest";
    let domain = Domain {
        name,
        script: &script_path,
        console: &console,
        net_socket: Some(&net_sock),
        fs: DomainFs::Socket(&fs_sock),
        tag: TAG,
        emulator: std::env::var_os("FERRY_QEMU")
            .filter(|q| !q.is_empty())
            .map(Into::into),
        queues: 2,
    };
    lv.define(name, &domain.xml())
        .unwrap_or_else(|e| panic!("{e}\nlibvirtd:\n{}", lv.daemon_log()));
    let mut macs = Vec::new();
    for boot in 1..=2 {
        // Each boot's console on its own: libvirt opens the file anew at each start.
        let _ = std::fs::remove_file(&console);
        lv.virsh(&["start", name]).unwrap_or_else(|e| {
            panic!(
                "{e}\nQEMU log:\n{}\nferry log:\n{}",
                lv.qemu_log(name),
                ferry.log_tail()
            )
        });
        let out = wait_console_done(&console, DEADLINE).unwrap_or_else(|e| {
            panic!(
                "boot {boot}: {e}\nQEMU log:\n{}\nferry log:\n{}\nQEMU's view:\n{}\nferry's threads:\n{}",
                lv.qemu_log(name),
                ferry.log_tail(),
                lv.virtio_state(name, &[("fs0", 2), ("ua-net0", 5)]),
                ferry.threads()
            )
        });
        out.assert_all_ok(6, &format!("boot {boot}; ferry log:\n{}", ferry.log_tail()));
        assert_eq!(
            std::fs::read_to_string(share.join(format!("boot-{boot}"))).unwrap(),
            format!("boot {boot}\n")
        );
        let mac = out
            .console
            .lines()
            .find_map(|l| l.split("FERRY-MAC ").nth(1))
            .map(|m| m.trim().to_string())
            .expect("the guest printed its MAC");
        // libvirt's own prefix: the MAC is libvirt's choice, not ferry's or the harness's.
        assert!(mac.starts_with("52:54:00:"), "{mac}");
        macs.push(mac);
        if boot == 1 {
            // The guest powers off after its checks; libvirt reaps it (on_poweroff destroy).
            // `virsh destroy` is what an operator runs; it fails only if it is gone already.
            let _ = lv.virsh(&["destroy", name]);
            let off = ferry_tests::wait_for(Duration::from_secs(30), || {
                let state = lv.virsh(&["domstate", name]).ok()?;
                state.contains("shut off").then_some(())
            });
            assert!(off.is_some(), "the domain did not shut off");
        }
    }
    // The same definition both times: libvirt's MAC stays, and ferry learned it each time.
    assert_eq!(macs[0], macs[1]);
    let xml = lv.virsh(&["dumpxml", "ferry-guest"]).unwrap();
    assert!(xml.contains("type='vhostuser'"), "{xml}");
    drop(lv);
    drop(ferry);
}

/// The processes whose command line holds every one of `words`.
fn pids_with(words: &[&str]) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            words.iter().all(|w| cmd.contains(w)).then_some((pid, cmd))
        })
        .collect()
}

/// How many of `pid`'s descriptors are files under `dir`.
fn fds_under(pid: u32, dir: &std::path::Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir)))
        .count()
}

/// The guest's script for the front-end tests: it writes through the share, then holds the
/// file open for a while so the host can see whose descriptor it is.
const HOLDING_SCRIPT: &str = r#"
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
check mounted "$(awk '$2 == "/mnt/lvfs" {print $3}' /proc/mounts)" virtiofs
n=$(( $(ls /mnt/lvfs | grep -c '^boot-') + 1 ))
echo "boot $n" > /mnt/lvfs/boot-$n && sync
check write "$(cat /mnt/lvfs/boot-$n)" "boot $n"
exec 3< /mnt/lvfs/boot-$n
echo FERRY-HOLDING
sleep 4
exec 3<&-
"#;

/// A `ferry serve` for the front-end tests: only the API and `--runtime-shares ROOT`, as
/// `user` when given; and a two-line `<binary>` wrapper that names its API socket (libvirt
/// passes no arguments of its own choosing). `caps` replaces the wrapper's answer to
/// `--print-capabilities` when given.
struct FrontEndSetup {
    ferry: FerryProcess,
    api: std::path::PathBuf,
    share: std::path::PathBuf,
}

fn front_end_setup(dir: &std::path::Path, user: Option<u32>) -> FrontEndSetup {
    let root = dir.join("shares");
    let share = root.join("vm");
    std::fs::create_dir_all(&share).unwrap();
    if let Some(u) = user {
        std::process::Command::new("chown")
            .args(["-R", &format!("{u}:{u}")])
            .arg(&root)
            .status()
            .unwrap();
    }
    let api = dir.join("api.sock");
    let ferry = FerryProcess::serve_as(
        None,
        user.map(|u| u.to_string()).as_deref(),
        &ferry_tests::ferry_bin(),
        dir,
        &[
            "--api-socket".into(),
            api.display().to_string(),
            "--runtime-shares".into(),
            root.display().to_string(),
        ],
        std::slice::from_ref(&api),
    );
    FrontEndSetup { ferry, api, share }
}

fn wrapper(
    dir: &std::path::Path,
    name: &str,
    api: &std::path::Path,
    caps: Option<&str>,
) -> std::path::PathBuf {
    let path = dir.join(name);
    let caps = caps
        .map(|c| format!("[ \"$1\" = --print-capabilities ] && {{ echo '{c}'; exit 0; }}\n"))
        .unwrap_or_default();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n{caps}exec {} virtiofsd --api-socket {} \"$@\"\n",
            ferry_tests::ferry_bin().display(),
            api.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// Boots domain `name` whose `<filesystem>` names `binary`, and checks: libvirt passed
/// `syntax`; the guest's open file is a descriptor of `ferry serve`, not of the front end; the
/// share is listed while the domain runs and gone after `virsh destroy`.
fn boot_with_front_end(
    lv: &Libvirt,
    s: &FrontEndSetup,
    dir: &std::path::Path,
    name: &str,
    binary: &std::path::Path,
    syntax: &str,
    emulator: Option<std::path::PathBuf>,
) {
    let script_path = dir.join("guest.sh");
    std::fs::write(&script_path, HOLDING_SCRIPT).unwrap();
    let console = dir.join(format!("{name}.log"));
    let domain = Domain {
        name,
        script: &script_path,
        console: &console,
        net_socket: None,
        fs: DomainFs::Binary {
            binary,
            dir: &s.share,
        },
        tag: "lvfs",
        emulator,
        queues: 1,
    };
    let ferry = &s.ferry;
    lv.define(name, &domain.xml())
        .unwrap_or_else(|e| panic!("{e}\nlibvirtd:\n{}", lv.daemon_log()));
    lv.virsh(&["start", name]).unwrap_or_else(|e| {
        panic!(
            "{name}: {e}\nQEMU log:\n{}\nferry log:\n{}",
            lv.qemu_log(name),
            ferry.log_tail()
        )
    });
    let held = ferry_tests::wait_for(DEADLINE, || {
        std::fs::read_to_string(&console)
            .ok()?
            .contains("FERRY-HOLDING")
            .then_some(())
    });
    assert!(
        held.is_some(),
        "{name}: the guest never held its file\nconsole:\n{}\nQEMU log:\n{}\nferry log:\n{}",
        std::fs::read_to_string(&console).unwrap_or_default(),
        lv.qemu_log(name),
        ferry.log_tail()
    );
    // The guest's open file is ferry serve's descriptor, not the front end's.
    // This test's front end: its command line names this test's API socket.
    let api = s.api.display().to_string();
    let front = pids_with(&["virtiofsd", "--fd=", &api]);
    assert_eq!(front.len(), 1, "{name}: front ends: {front:?}");
    assert!(
        front[0].1.contains(syntax),
        "{name}: libvirt passed {}",
        front[0].1
    );
    assert!(
        fds_under(ferry.pid(), &s.share) > 0,
        "{name}: ferry serve holds no file of the share"
    );
    assert_eq!(
        fds_under(front[0].0, &s.share),
        0,
        "{name}: the front end holds share files"
    );
    let shares = ferry_tests::api_get(&s.api, "/shares");
    assert_eq!(shares.as_array().map(Vec::len), Some(1), "{shares}");
    let out = wait_console_done(&console, DEADLINE).unwrap();
    out.assert_all_ok(2, &format!("{name}; ferry log:\n{}", ferry.log_tail()));
    // The guest powered off; libvirt stops the front end, which removes the share.
    let _ = lv.virsh(&["destroy", name]);
    let gone = ferry_tests::wait_for(Duration::from_secs(15), || {
        let v = ferry_tests::api_get(&s.api, "/shares");
        (v.as_array().map(Vec::len) == Some(0)).then_some(())
    });
    assert!(
        gone.is_some(),
        "{name}: the share stayed after the domain stopped: {}\nferry log:\n{}",
        ferry_tests::api_get(&s.api, "/shares"),
        ferry.log_tail()
    );
}

/// libvirt 11.3 starts `ferry virtiofsd` as the `<filesystem>`'s `<binary>`, as it would start
/// virtiofsd: the front end hands its socket and options to the one running `ferry serve`,
/// whose process serves the guest's files; `virsh destroy` removes the share. First behind a
/// wrapper whose capabilities list no `separate-options`, so libvirt passes the `-o source=…`
/// syntax; then as it is, with its vhost-user descriptor, so libvirt passes `--shared-dir …`.
/// libvirt's session daemon starts the front end as its own user, so ferry serve runs as that
/// user too (the API socket is 0600).
#[test]
fn libvirt_starts_ferry_virtiofsd_and_the_running_ferry_serves_the_share() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o777)).unwrap();
    let s = front_end_setup(dir.path(), Some(LIBVIRT_ID));
    let lv = Libvirt::start(dir.path()).expect("start a private libvirt daemon");
    let emulator = || {
        std::env::var_os("FERRY_QEMU")
            .filter(|q| !q.is_empty())
            .map(Into::into)
    };
    let old_style = wrapper(
        dir.path(),
        "old-virtiofsd",
        &s.api,
        Some(r#"{"type": "fs", "features": []}"#),
    );
    boot_with_front_end(
        &lv,
        &s,
        dir.path(),
        "ferry-fs-o",
        &old_style,
        "-o source=",
        emulator(),
    );
    // The descriptor libvirt looks the binary up in (separate-options comes from the binary's
    // --print-capabilities).
    let current = wrapper(dir.path(), "ferry-virtiofsd", &s.api, None);
    let d = lv.config_home().join("qemu/vhost-user");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("50-ferry-fs.json"),
        format!(
            r#"{{"description": "ferry virtiofsd", "type": "fs", "binary": "{}"}}"#,
            current.display()
        ),
    )
    .unwrap();
    lv.give(&lv.config_home());
    boot_with_front_end(
        &lv,
        &s,
        dir.path(),
        "ferry-fs-sep",
        &current,
        "--shared-dir",
        emulator(),
    );
}

/// The same with Debian 12's own libvirt 9.0 (its system daemon, in a mount namespace of its
/// own, see `ferry_tests::libvirt`), which always passes virtiofsd's `-o source=…` syntax. It
/// cannot probe QEMU 10, so it runs the system's QEMU 7.2 whatever `FERRY_QEMU` says.
#[test]
fn libvirt_9_starts_ferry_virtiofsd_with_its_o_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let s = front_end_setup(dir.path(), None);
    let lv = Libvirt::start_system_9(dir.path()).expect("start libvirt 9.0's daemon");
    let current = wrapper(dir.path(), "ferry-virtiofsd", &s.api, None);
    boot_with_front_end(
        &lv,
        &s,
        dir.path(),
        "ferry-fs-9",
        &current,
        "-o source=",
        None,
    );
}
