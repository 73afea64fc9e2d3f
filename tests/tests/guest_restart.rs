//! Guest end-to-end: ferry killed with SIGKILL under a running guest and started again. Within
//! 5 s the guest's next fetch from the host alias works, and so does a published port's
//! client. Two ways to get there: ferry listens and QEMU's chardev reconnects (`reconnect=`),
//! and QEMU listens (`server=on`) while ferry connects as a client (`--net-client`) and
//! connects again when it starts anew.
//!
//! What the guest loses: its open connections through the NAT (their host sockets died with
//! the old process; the new one answers their next segment with RST) and frames in flight.
//! It keeps its address (ferry learns it again from its frames) and its published ports' server.
//!
//! Ferry runs in a test namespace with no route out; the host's loopback is that namespace's.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::{FerryProcess, GuestSpec, NetLink, Qemu, TestHost, TestNet};

const PAGE: &str = "served across a restart";

fn script() -> String {
    format!(
        r#"
mkdir -p /www && echo '{PAGE}' > /www/index.html && httpd -p 80 -h /www
i=0
while [ $i -lt 400 ]; do
  # A fetch in flight when ferry dies waits out its TCP retransmissions: each fetch gets a
  # second, so the next one starts soon after ferry is back.
  if [ "$(timeout 1 wget -q -O - http://host.ferry.internal:8089/page.txt 2>/dev/null)" = "{PAGE}" ]; then
    echo "FERRY-FETCH ok $(cut -d' ' -f1 /proc/uptime)"
  else
    echo "FERRY-FETCH fail $(cut -d' ' -f1 /proc/uptime) carrier=$(cat /sys/class/net/eth0/carrier) irqs: $(grep virtio /proc/interrupts | tr -s ' ' | cut -d' ' -f2-4,7- | tr '\n' ';')"
  fi
  sleep 0.2
  i=$((i+1))
done
"#
    )
}

fn start_ferry(net: &TestNet, dir: &Path, log_dir: &str, link: NetLink) -> FerryProcess {
    let logs = dir.join(log_dir);
    std::fs::create_dir_all(&logs).unwrap();
    let sock = dir.join("net.sock");
    let args = vec![
        if link == NetLink::Listen {
            "--net-client".to_string()
        } else {
            "--net-socket".to_string()
        },
        sock.display().to_string(),
        "--publish".into(),
        "127.0.0.1:8080:80".into(),
        "--dns-upstream".into(),
        "127.0.0.1:1".into(),
        // For the failure message: what crossed the device after the restart.
        "--api-socket".into(),
        logs.join("api.sock").display().to_string(),
    ];
    // As a client there is no socket of ferry's to wait for.
    let wait: Vec<_> = if link == NetLink::Listen {
        vec![]
    } else {
        vec![sock]
    };
    FerryProcess::serve_in(Some(&net.inner), &logs, &args, &wait)
}

/// Polls until `f` holds; the time it took, or None past `limit`.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    ferry_tests::wait_for(limit, || f().then_some(())).map(|_| t0.elapsed())
}

/// A test network with a web server on its loopback (`page.txt`, and 4 MiB in `big`), and a
/// guest running `script` served by a first ferry (its logs in `run-0`), both linked as `link`
/// says, once the guest's first fetch worked.
struct Setup {
    net: TestNet,
    dir: tempfile::TempDir,
    qemu: Qemu,
    ferry: FerryProcess,
    _web: TestHost,
}

fn boot(link: NetLink, script: String) -> Setup {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web");
    std::fs::create_dir(&web).unwrap();
    std::fs::write(web.join("page.txt"), format!("{PAGE}\n")).unwrap();
    std::fs::write(web.join("big"), vec![7u8; 4 << 20]).unwrap();
    let web = TestHost::start(
        &net.inner,
        &["127.0.0.1", "--http", "8089", web.to_str().unwrap()],
    );
    let spec = GuestSpec {
        script,
        net_socket: Some(dir.path().join("net.sock")),
        memory_mib: 256,
        net_link: link,
        ..Default::default()
    };
    // QEMU listening must be there first; QEMU connecting needs ferry's socket first.
    let (mut qemu, ferry) = if link == NetLink::Listen {
        let q = Qemu::boot(dir.path(), &spec);
        let sock = dir.path().join("net.sock");
        ferry_tests::wait_for(Duration::from_secs(10), || sock.exists().then_some(()))
            .expect("QEMU's listening socket");
        (q, start_ferry(&net, dir.path(), "run-0", link))
    } else {
        let f = start_ferry(&net, dir.path(), "run-0", link);
        (Qemu::boot(dir.path(), &spec), f)
    };
    if let Err(e) = qemu.wait_console("FERRY-FETCH ok", Duration::from_secs(120)) {
        panic!("before the restart: {e}\nferry log:\n{}", ferry.log_tail());
    }
    Setup {
        net,
        dir,
        qemu,
        ferry,
        _web: web,
    }
}

/// How long after `mark` (a console length) the guest's next fetch worked, within 5 s.
fn fetch_back(qemu: &Qemu, mark: usize) -> Option<Duration> {
    within(Duration::from_secs(5), || {
        qemu.console()
            .get(mark..)
            .is_some_and(|c| c.contains("FERRY-FETCH ok"))
    })
}

/// For a failure's message: what crossed the device of run `run` (its `/stats`), the
/// console's tail and ferry's log.
fn what_ferry_saw(dir: &Path, run: usize, qemu: &Qemu, ferry: &FerryProcess) -> String {
    format!(
        "stats: {}\nconsole:\n{}\nferry log:\n{}",
        ferry_tests::api_get(&dir.join(format!("run-{run}/api.sock")), "/stats")["net"],
        ferry_tests::tail(&qemu.console(), 30),
        ferry.log_tail()
    )
}

fn restart_under_a_running_guest(link: NetLink) {
    let Setup {
        net,
        dir,
        qemu,
        mut ferry,
        _web,
    } = boot(link, script());
    let curl = |ns: &str| {
        TestNet::command(ns, "curl")
            .args(["-s", "-m", "2", "http://127.0.0.1:8080/"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == PAGE)
            .unwrap_or(false)
    };
    assert!(curl(&net.inner), "the published port before the restart");

    // Its private folder (sockets, the namespace sandbox's root) outlives a SIGKILL; the next
    // ferry removes it.
    let private = std::env::temp_dir().join(format!("ferry-{}", ferry.pid()));
    assert!(private.is_dir(), "{} while ferry runs", private.display());
    ferry.kill();
    std::thread::sleep(Duration::from_secs(1));
    let mark = qemu.console().len();
    let ferry = start_ferry(&net, dir.path(), "run-1", link);
    // (The old socket file may still stand when `start_ferry` returns: wait for the new one.)
    assert!(
        within(Duration::from_secs(5), || !private.exists()).is_some(),
        "the killed ferry's {} is still there\n{}",
        private.display(),
        ferry.log_tail()
    );
    // Both at once: the published port's client from the host, while the guest fetches.
    let (fetched, published) = std::thread::scope(|s| {
        let p = s.spawn(|| within(Duration::from_secs(5), || curl(&net.inner)));
        let f = fetch_back(&qemu, mark);
        (f, p.join().unwrap())
    });
    assert!(
        fetched.is_some() && published.is_some(),
        "{link:?}: after the restart, guest fetch {fetched:?}, published port {published:?} (limit 5 s)\n{}",
        what_ferry_saw(dir.path(), 1, &qemu, &ferry)
    );
    eprintln!(
        "{link:?}: guest fetch back after {:?}, published port after {:?}",
        fetched.unwrap(),
        published.unwrap()
    );
}

// These two failed once each in four CI runs, and the ten-restart runs below about once in
// 100 restarts here: after the restart the guest sent a few frames (ARP) and then answered
// none of the frames delivered to it. /stats showed why: the RX ring's used index stood past
// the guest's `used_event`, and the guest's RX interrupt count had stopped. The process that
// died had filled the used ring without interrupting, or the new one's interrupt was dropped
// while QEMU wired its notifiers, and with EVENT_IDX no later crossing asked for one. Fixed
// in `devices/src/lost_interrupts.rs` (one interrupt per ring at the start of a connection,
// and one for a ring filled with none for 100 ms).
#[test]
fn qemu_reconnects_to_a_restarted_ferry() {
    restart_under_a_running_guest(NetLink::Reconnect);
}

#[test]
fn a_restarted_ferry_reconnects_to_a_listening_qemu() {
    restart_under_a_running_guest(NetLink::Listen);
}

/// Ten restarts in one boot, at different points of the guest's traffic: a 4 MiB download
/// runs in a loop beside the fetches, so some kills land while the device polls the guest's
/// queues with its kicks off, and the new process must find the queues as the old one left
/// them. Each restart must be served within 5 s.
fn restarted_again_and_again(link: NetLink) {
    let script = format!(
        "(while true; do timeout 5 wget -q -O /dev/null http://host.ferry.internal:8089/big; done) &\n{}",
        script().replace("-lt 400", "-lt 2000")
    );
    let Setup {
        net,
        dir,
        qemu,
        mut ferry,
        _web,
    } = boot(link, script);
    // How long the guest runs unserved before the next ferry starts.
    let pauses = [0, 300, 1000, 50, 2000, 700, 0, 1500, 100, 500];
    for (i, pause) in pauses.iter().enumerate() {
        // Let the download get going again before the next kill.
        std::thread::sleep(Duration::from_millis(1500 + 137 * i as u64));
        ferry.kill();
        std::thread::sleep(Duration::from_millis(*pause));
        let mark = qemu.console().len();
        ferry = start_ferry(&net, dir.path(), &format!("run-{}", i + 1), link);
        let fetched = fetch_back(&qemu, mark);
        assert!(
            fetched.is_some(),
            "{link:?}: restart {} (after {pause} ms unserved): no fetch within 5 s\n{}",
            i + 1,
            what_ferry_saw(dir.path(), i + 1, &qemu, &ferry)
        );
        eprintln!(
            "{link:?}: restart {} served after {:?}",
            i + 1,
            fetched.unwrap()
        );
    }
}

#[test]
#[ignore = "a stress run of ten restarts; run with --ignored"]
fn qemu_reconnects_again_and_again() {
    restarted_again_and_again(NetLink::Reconnect);
}

#[test]
#[ignore = "a stress run of ten restarts; run with --ignored"]
fn a_listening_qemu_is_served_again_and_again() {
    restarted_again_and_again(NetLink::Listen);
}
