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

use ferry_tests::libvirt::{wait_console_done, Domain, Libvirt, LIBVIRT_ID};
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
        net_socket: &net_sock,
        fs_socket: &fs_sock,
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
