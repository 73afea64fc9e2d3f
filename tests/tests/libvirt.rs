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
check dns-host "$(nslookup host.ferry.internal 2>&1 | awk '/^Address/ {{a=$2}} END {{print a}}')" 192.168.127.254
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
    let sysctl = TestNet::command(&net.inner, "sysctl")
        .args(["-qw", "net.ipv4.ping_group_range=0 2147483647"])
        .status()
        .unwrap();
    assert!(sysctl.success(), "cannot allow ping sockets");
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
                "boot {boot}: {e}\nQEMU log:\n{}\nferry log:\n{}",
                lv.qemu_log(name),
                ferry.log_tail()
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

/// libvirt starts `ferry virtiofsd` as the `<filesystem>`'s `<binary>`, as it would start
/// virtiofsd: the front end hands its socket and options to the one running `ferry serve`,
/// whose process serves the guest's files; `virsh destroy` removes the share. First behind a
/// wrapper whose capabilities list no `separate-options`, so libvirt passes the option syntax
/// libvirt 9.0 always uses (`-o source=…`); then as it is, with its vhost-user descriptor, so
/// libvirt passes `--shared-dir …`.
#[test]
fn libvirt_starts_ferry_virtiofsd_and_the_running_ferry_serves_the_share() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o777)).unwrap();
    // Everything runs as libvirt's user here: its session daemon starts the front end as
    // itself, and the front end must reach ferry serve's API socket (mode 0600).
    let root = dir.path().join("shares");
    let share = root.join("vm");
    std::fs::create_dir_all(&share).unwrap();
    let chown = |p: &std::path::Path| {
        std::process::Command::new("chown")
            .args(["-R", &format!("{LIBVIRT_ID}:{LIBVIRT_ID}")])
            .arg(p)
            .status()
            .unwrap()
    };
    chown(&root);
    let api = dir.path().join("api.sock");
    let ferry = FerryProcess::serve_as(
        None,
        Some(&LIBVIRT_ID.to_string()),
        &ferry_tests::ferry_bin(),
        dir.path(),
        &[
            "--api-socket".into(),
            api.display().to_string(),
            "--runtime-shares".into(),
            root.display().to_string(),
        ],
        std::slice::from_ref(&api),
    );
    // libvirt's <binary> is one program with no arguments: a two-line wrapper names the API.
    let wrapper = dir.path().join("ferry-virtiofsd");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} virtiofsd --api-socket {} \"$@\"\n",
            ferry_tests::ferry_bin().display(),
            api.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, PermissionsExt::from_mode(0o755)).unwrap();
    let old_style = dir.path().join("old-virtiofsd");
    std::fs::write(
        &old_style,
        format!(
            "#!/bin/sh
[ \"$1\" = --print-capabilities ] && {{ echo '{{\"type\": \"fs\", \"features\": []}}'; exit 0; }}
exec {} virtiofsd --api-socket {} \"$@\"
",
            ferry_tests::ferry_bin().display(),
            api.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&old_style, PermissionsExt::from_mode(0o755)).unwrap();

    let lv = Libvirt::start(dir.path()).expect("start a private libvirt daemon");
    let script_path = dir.path().join("guest.sh");
    std::fs::write(
        &script_path,
        r#"
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
check mounted "$(awk '$2 == "/mnt/lvfs" {print $3}' /proc/mounts)" virtiofs
n=$(( $(ls /mnt/lvfs | grep -c '^boot-') + 1 ))
echo "boot $n" > /mnt/lvfs/boot-$n && sync
check write "$(cat /mnt/lvfs/boot-$n)" "boot $n"
exec 3< /mnt/lvfs/boot-$n
echo FERRY-HOLDING
sleep 4
exec 3<&-
"#,
    )
    .unwrap();
    let console = dir.path().join("console.log");
    for (boot, syntax, binary) in [(1, "-o source=", &old_style), (2, "--shared-dir", &wrapper)] {
        if boot == 2 {
            // The descriptor libvirt looks the binary up in (separate-options comes from the
            // binary's --print-capabilities).
            let d = lv.config_home().join("qemu/vhost-user");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("50-ferry-fs.json"),
                format!(
                    r#"{{"description": "ferry virtiofsd", "type": "fs", "binary": "{}"}}"#,
                    wrapper.display()
                ),
            )
            .unwrap();
            lv.give(&lv.config_home());
        }
        let name = format!("ferry-fs-{boot}");
        let domain = Domain {
            name: &name,
            script: &script_path,
            console: &console,
            net_socket: None,
            fs: DomainFs::Binary {
                binary,
                dir: &share,
            },
            tag: "lvfs",
            emulator: std::env::var_os("FERRY_QEMU")
                .filter(|q| !q.is_empty())
                .map(Into::into),
            queues: 1,
        };
        lv.define(domain.name, &domain.xml())
            .unwrap_or_else(|e| panic!("{e}\nlibvirtd:\n{}", lv.daemon_log()));
        let _ = std::fs::remove_file(&console);
        lv.virsh(&["start", domain.name]).unwrap_or_else(|e| {
            panic!(
                "boot {boot}: {e}\nQEMU log:\n{}\nferry log:\n{}",
                lv.qemu_log(domain.name),
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
            "boot {boot}: the guest never held its file\nconsole:\n{}\nQEMU log:\n{}\nferry log:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default(),
            lv.qemu_log(domain.name),
            ferry.log_tail()
        );
        // The guest's open file is ferry serve's descriptor, not the front end's.
        let front = pids_with(&["virtiofsd", "--fd="]);
        assert_eq!(front.len(), 1, "boot {boot}: front ends: {front:?}");
        assert!(
            front[0].1.contains(syntax),
            "boot {boot}: libvirt passed {}",
            front[0].1
        );
        assert!(
            fds_under(ferry.pid(), &share) > 0,
            "boot {boot}: ferry serve holds no file of the share"
        );
        assert_eq!(
            fds_under(front[0].0, &share),
            0,
            "boot {boot}: the front end holds share files"
        );
        let shares = ferry_tests::api_get(&api, "/shares");
        assert_eq!(shares.as_array().map(Vec::len), Some(1), "{shares}");
        let out = wait_console_done(&console, DEADLINE).unwrap();
        out.assert_all_ok(2, &format!("boot {boot}; ferry log:\n{}", ferry.log_tail()));
        assert_eq!(
            std::fs::read_to_string(share.join(format!("boot-{boot}"))).unwrap(),
            format!("boot {boot}\n")
        );
        // The guest powered off; libvirt stops the front end, which removes the share.
        let _ = lv.virsh(&["destroy", domain.name]);
        let gone = ferry_tests::wait_for(Duration::from_secs(15), || {
            let s = ferry_tests::api_get(&api, "/shares");
            (s.as_array().map(Vec::len) == Some(0)).then_some(())
        });
        assert!(
            gone.is_some(),
            "boot {boot}: the share stayed after the domain stopped: {}\nferry log:\n{}",
            ferry_tests::api_get(&api, "/shares"),
            ferry.log_tail()
        );
    }
}
