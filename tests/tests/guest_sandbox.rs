//! The namespace sandbox (`--sandbox namespace`), from inside the guest: ferry as root and as
//! an unprivileged user (`nobody`, in a user namespace of its own) serves the guest its lease,
//! DNS, a test host, the host alias and a share, from a root that holds only what it serves;
//! and a folder the host moves out of the share while the guest is in it is out of reach.
//!
//! Ferry runs in a test namespace with no route out; the "outside" is a test host on a veth
//! link (`tests/servers/testhosts.py`). Nothing leaves the namespaces the test made.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use ferry_tests::{
    api_get, ferry_bin, tools_share, wait_for, FerryProcess, GuestSpec, Qemu, TestHost, TestNet,
};

const DEADLINE: Duration = Duration::from_secs(180);
const SECRET: &str = "host data the guest must not read";

fn script(remote: &str) -> String {
    format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
D=/mnt/data
check lease "$(ip -4 -o addr show eth0 | grep -c ' 192.168.127.2/24')" 1
check dns-host-alias "$(nslookup host.ferry.internal 2>&1 | grep -c 'Address.*192.168.127.254')" 1
check dns-upstream "$(nslookup remote.test 2>&1 | grep -c 'Address.*{remote}')" 1
check tcp-test-host "$(nc {remote} 7000 | wc -c)" 65536
check tcp-host-alias "$(nc 192.168.127.254 7001 | wc -c)" 4096
check ping "$(ping -c 1 -W 3 {remote} 2>&1 | grep -c 'bytes from')" 1
echo "from the guest" > $D/written
check write-read "$(cat $D/written)" "from the guest"
# The host moves d out of the share while the guest is in it, then puts a file in it.
mkdir $D/d && cd $D/d && echo before > kept && touch $D/want-move
i=0; while [ ! -e /mnt/tools/moved ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
check moved-out-read "$(cat secret 2>/dev/null | grep -c 'host data')" 0
check moved-out-write "$(echo x > new 2>/dev/null && echo written || echo refused)" refused
cd /
check share-still-works "$(echo after > $D/after && cat $D/after)" after
"#
    )
}

/// Serves the guest with `--sandbox namespace` as `user` (root when `None`) and checks it from
/// inside and from the host.
fn serve_the_guest_in_namespaces(user: Option<&str>) {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let _test_host = TestHost::start(
        &net.remote,
        &[
            &remote,
            "--tcp-blob",
            "7000",
            "65536",
            "--dns",
            "53",
            &format!("remote.test={remote}"),
        ],
    );
    // A server on the loopback of ferry's namespace: the host alias's way in.
    let _host_server = TestHost::start(&net.inner, &["127.0.0.1", "--tcp-blob", "7001", "4096"]);
    net.allow_ping_sockets();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let outside = d.join("outside");
    std::fs::create_dir(&data).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let t = tools_share(d);
    if user.is_some() {
        // nobody binds its sockets in `d`, writes the share and reads the tools.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for p in [d, &data, &outside] {
            std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
        }
    }
    let sock = d.join("net.sock");
    let api = d.join("api.sock");
    let data_sock = d.join("data.sock");
    let args = [
        "--sandbox".to_string(),
        "namespace".into(),
        "--net-socket".into(),
        sock.display().to_string(),
        "--api-socket".into(),
        api.display().to_string(),
        "--dns-upstream".into(),
        format!("{remote}:53"),
        "--share".into(),
        t.share.clone(),
        "--share".into(),
        format!(
            "tag=data,dir={},socket={}",
            data.display(),
            data_sock.display()
        ),
    ];
    let sockets = [
        sock.clone(),
        api.clone(),
        t.socket.clone(),
        data_sock.clone(),
    ];
    let ferry = FerryProcess::serve_as(Some(&net.inner), user, &ferry_bin(), d, &args, &sockets);
    let log = ferry.log_text();
    assert!(
        log.contains("sandbox: namespaces entered"),
        "ferry did not enter its namespaces:\n{log}"
    );

    // What the serving process sees: its own PID namespace, and a root with only what it
    // serves.
    let pid = api_get(&api, "/health")["pid"]
        .as_u64()
        .expect("the API gives the serving pid") as u32;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or("");
    assert!(
        nspid.split_whitespace().last() == Some("1"),
        "ferry is not PID 1 of a PID namespace of its own: {nspid}"
    );
    let root = format!("/proc/{pid}/root");
    for hidden in ["root", "home", "var", "sbin", "boot"] {
        assert!(
            !Path::new(&root).join(hidden).exists(),
            "/{hidden} is in ferry's root"
        );
    }
    assert!(Path::new(&root)
        .join(data.strip_prefix("/").unwrap())
        .is_dir());

    let mut qemu = Qemu::boot(
        d,
        &GuestSpec {
            script: script(&remote),
            net_socket: Some(sock.clone()),
            shares: vec![
                ("tools".into(), t.socket.clone()),
                ("data".into(), data_sock.clone()),
            ],
            ..Default::default()
        },
    );
    wait_for(DEADLINE, || data.join("want-move").exists().then_some(()))
        .unwrap_or_else(|| panic!("the guest never asked for the move:\n{}", qemu.console()));
    std::fs::rename(data.join("d"), outside.join("d")).unwrap();
    std::fs::write(outside.join("d/secret"), SECRET).unwrap();
    std::fs::write(t.dir.join("moved"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(10, &format!("ferry log:\n{}", ferry.log_tail()));
    assert_eq!(
        std::fs::read_to_string(data.join("written")).unwrap(),
        "from the guest\n"
    );
    assert!(
        !outside.join("d/new").exists(),
        "the guest wrote into a folder moved out of the share"
    );
    assert!(
        !ferry.log_text().contains("refused system call"),
        "{}",
        ferry.log_tail()
    );
}

#[test]
fn the_namespace_sandbox_serves_the_guest_as_root() {
    serve_the_guest_in_namespaces(None);
}

#[test]
fn the_namespace_sandbox_serves_the_guest_as_an_unprivileged_user() {
    serve_the_guest_in_namespaces(Some("nobody"));
}
