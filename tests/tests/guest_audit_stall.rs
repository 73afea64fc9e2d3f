//! A stalled audit sink costs events, never traffic: the guest's connections and a download
//! run as fast while nobody reads the audit log as while someone does.
//!
//! The audit log goes to a FIFO whose pipe the test shrinks to one page, with
//! `--audit-queue 64`, so a few hundred events fill both. The guest runs the same work twice
//! (60 short HTTP fetches, each a flow opened and closed, and a 16 MB download from a test
//! host): once while the test reads the FIFO, once while it reads nothing for 5 s. The
//! stalled run must take no longer than the first beyond noise, and finish inside the
//! stall; `/stats` must count the events the sink lost (emitted = written + dropped); once
//! the test reads again, the sink carries on with the guest's next connection (to another
//! port, so that it cannot be mistaken for one of the stall's).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::{api_get, serve_and_boot, ServedGuest, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(180);
const STALL: Duration = Duration::from_secs(5);

fn script(remote: &str) -> String {
    format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
step() {{ echo "FERRY-STEP $1"; i=0; while [ ! -e /mnt/tools/go-$1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; }}
work() {{
  n=0; i=0
  while [ $i -lt 60 ]; do
    wget -q -O /dev/null http://{remote}:8080/small && n=$((n+1)); i=$((i+1))
  done
  check "fetches-$1" "$n" 60
  check "download-$1" "$(wget -q -O - http://{remote}:8080/big | wc -c)" 16777216
}}
step 1
work read
step 2
work stalled
step 3
wget -q -O /dev/null http://{remote}:8081/small
step 4
"#
    )
}

/// The test's end of the FIFO: a thread reads it into `lines` unless `paused`.
struct Reader {
    lines: Arc<Mutex<String>>,
    paused: Arc<AtomicBool>,
}

impl Reader {
    fn start(mut fifo: std::fs::File) -> Self {
        let lines = Arc::new(Mutex::new(String::new()));
        let paused = Arc::new(AtomicBool::new(false));
        let (l, p) = (lines.clone(), paused.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            loop {
                if p.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                match fifo.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => l
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => return,
                }
            }
        });
        Reader { lines, paused }
    }
}

#[test]
fn a_stalled_audit_sink_loses_events_not_traffic() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("small"), b"small\n").unwrap();
    std::fs::write(www.join("big"), vec![7u8; 16 << 20]).unwrap();
    let http = |port: &str| {
        TestHost::start(
            &net.remote,
            &[&net.remote_addr, "--http", port, &www.display().to_string()],
        )
    };
    let (_http, _after) = (http("8080"), http("8081"));

    // The FIFO, opened for reading first (without waiting for a writer) so that ferry's
    // open for writing does not wait either; its pipe shrunk to one page.
    let fifo = dir.path().join("audit.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    // SAFETY: an fcntl on a descriptor this function owns.
    let size = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(size >= 4096, "F_SETPIPE_SZ");

    let ServedGuest {
        ferry,
        mut qemu,
        tools: t,
        api,
    } = serve_and_boot(
        &net.inner,
        dir.path(),
        script(&net.remote_addr),
        &[
            "--audit-log".into(),
            fifo.display().to_string(),
            "--audit-queue".into(),
            "64".into(),
        ],
        &[],
        vec![],
    );
    let reader = Reader::start(reader);
    let fail = |e: String| -> ! { panic!("{e}\nferry log:\n{}", ferry.log_tail()) };
    // Lets the guest past step `n`; how long it took to reach the next.
    let step = |qemu: &mut ferry_tests::Qemu, n: u32, limit: Duration| -> Duration {
        let t0 = Instant::now();
        std::fs::write(t.dir.join(format!("go-{n}")), b"").unwrap();
        if let Err(e) = qemu.wait_console(&format!("FERRY-STEP {}", n + 1), limit) {
            fail(e);
        }
        t0.elapsed()
    };
    if let Err(e) = qemu.wait_console("FERRY-STEP 1", DEADLINE) {
        fail(e);
    }
    let audit = || api_get(&api, "/stats")["audit"].clone();

    // The work while the sink is read.
    let read = step(&mut qemu, 1, DEADLINE);
    assert_eq!(
        audit()["dropped"],
        0,
        "the sink was read: nothing lost ({})",
        audit()
    );

    // The same work while nobody reads, for at least STALL.
    reader.paused.store(true, Ordering::Relaxed);
    let stall = Instant::now();
    // (Traffic that waited for the sink would wait for the stall's end, which never comes
    // while the test waits: a short limit makes that a quick failure.)
    let stalled = step(&mut qemu, 2, STALL * 4);
    let inside = stall.elapsed() < STALL;
    std::thread::sleep(STALL.saturating_sub(stall.elapsed()));
    let during = audit();
    reader.paused.store(false, Ordering::Relaxed);
    eprintln!("the work took {read:?} with the sink read, {stalled:?} with it stalled; {during}");
    assert!(
        during["dropped"].as_u64().unwrap_or(0) > 0,
        "a stalled sink with a 64-event queue lost nothing? {during}"
    );
    assert!(
        stalled < read * 3 / 2 + Duration::from_secs(1),
        "the guest's work took {stalled:?} while the sink stalled, {read:?} while it was read"
    );
    assert!(
        inside,
        "the guest's work outlasted the {STALL:?} stall ({stalled:?})"
    );

    // Read again: the guest's next connection (to another port) reaches the log.
    step(&mut qemu, 3, DEADLINE);
    let mut last = String::new();
    let logged = ferry_tests::wait_for(Duration::from_secs(10), || {
        let text = reader.lines.lock().unwrap().clone();
        last = ferry_tests::tail(&text, 3);
        text.lines()
            .any(|l| l.contains("\"flow_close\"") && l.contains(":8081\""))
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "the sink did not carry on after the stall; its last lines: {last}"
    );
    let after = audit();
    assert_eq!(
        after["events"].as_u64(),
        Some(after["written"].as_u64().unwrap() + after["dropped"].as_u64().unwrap()),
        "every event written or counted as dropped: {after}"
    );
    std::fs::write(t.dir.join("go-4"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(4, &format!("ferry log:\n{}", ferry.log_tail()));
}
