//! `ferry serve`'s command line: every option documented, every bad value refused with exit
//! code 2 and a sentence that names the option.

use std::process::Command;

use ferry_tests::ferry_bin;

fn serve(args: &[&str]) -> (i32, String) {
    let out = Command::new(ferry_bin())
        .arg("serve")
        .args(args)
        .output()
        .expect("run ferry");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_documents_every_option() {
    let out = Command::new(ferry_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--config",
        "--net-socket",
        "--share",
        "--publish",
        "--default-bind",
        "--api-socket",
        "--subnet",
        "--mtu",
        "--max-connections",
        "--audit-log",
        "--audit-queue",
        "--dns-upstream",
        "--pcap",
        "--sandbox",
        "--seccomp",
    ] {
        let line = help
            .lines()
            .position(|l| l.trim_start().starts_with(opt))
            .unwrap_or_else(|| panic!("{opt} missing from --help:\n{help}"));
        // The line after the option's name is its description.
        let doc = help.lines().nth(line + 1).unwrap_or("").trim();
        assert!(doc.len() > 10, "{opt} has no description:\n{help}");
    }
    assert!(help.contains("192.168.127.0/24") && help.contains("65520"));
}

#[test]
fn bad_values_exit_2_naming_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let sock = format!("{d}/net.sock");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--net-socket".into(),
                sock.clone(),
                "--subnet".into(),
                "300.1.1.0/24".into(),
            ],
            "--subnet 300.1.1.0/24: not an IPv4 subnet",
        ),
        (
            vec![
                "--share".into(),
                format!("tag=a,dir={d}/missing,socket={d}/fs.sock"),
            ],
            "does not exist",
        ),
        (
            vec![
                "--net-socket".into(),
                sock.clone(),
                "--audit-queue".into(),
                "4".into(),
            ],
            "--audit-queue 4: give between 16 and 1048576 events",
        ),
        (
            vec![
                "--net-socket".into(),
                format!("{d}/no/such/folder/net.sock"),
            ],
            "--net-socket",
        ),
        (
            vec![
                "--net-socket".into(),
                sock.clone(),
                "--mtu".into(),
                "20".into(),
            ],
            "--mtu 20",
        ),
        (
            vec![
                "--net-socket".into(),
                sock.clone(),
                "--publish".into(),
                "80".into(),
            ],
            "--publish 80",
        ),
        (
            vec![
                "--net-socket".into(),
                sock.clone(),
                "--mtu".into(),
                "lots".into(),
            ],
            "--mtu",
        ),
        (
            vec![
                "--net-socket".into(),
                sock.clone(),
                "--sandbox".into(),
                "chroot".into(),
            ],
            "--sandbox chroot",
        ),
        (
            vec![
                "--net-socket".into(),
                sock.clone(),
                "--seccomp".into(),
                "trap".into(),
            ],
            "--seccomp trap",
        ),
        (
            vec![
                "--share".into(),
                format!("tag=a,dir={d},socket={d}/fs.sock"),
                "--pcap".into(),
                format!("{d}/c.pcap"),
            ],
            "--pcap",
        ),
        (
            vec![
                "--net-socket".into(),
                sock.clone(),
                "--pcap".into(),
                format!("{d}/no/such/c.pcap"),
            ],
            "--pcap",
        ),
        (vec![], "nothing to serve"),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = serve(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        // The first line is the whole sentence (clap adds a pointer to --help after its own).
        let first = err.lines().next().unwrap_or("");
        assert!(
            first.contains(want),
            "{args:?}: expected {want:?} in {err:?}"
        );
    }
    assert!(!std::path::Path::new(&sock).exists());
}

#[test]
fn sigterm_and_sigint_remove_the_sockets() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("net.sock");
        let fs = dir.path().join("fs.sock");
        let mut child = Command::new(ferry_bin())
            .arg("serve")
            .arg("--net-socket")
            .arg(&net)
            .arg("--share")
            .arg(format!(
                "tag=t,dir={},socket={}",
                dir.path().display(),
                fs.display()
            ))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ferry_tests::wait_for(std::time::Duration::from_secs(10), || {
            (net.exists() && fs.exists()).then_some(())
        })
        .expect("sockets appear");
        // SAFETY: kill has no memory effects; the child is ours.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "signal {sig}");
        assert!(!net.exists() && !fs.exists(), "signal {sig} left sockets");
    }
}

/// What `/proc/PID/task/*/status` says of each thread's sandbox: (name, NoNewPrivs, Seccomp,
/// CapEff, Seccomp_filters).
fn thread_sandboxes(pid: u32) -> Vec<(String, String, String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        out.push((
            field("Name:"),
            field("NoNewPrivs:"),
            field("Seccomp:"),
            field("CapEff:"),
            field("Seccomp_filters:"),
        ));
    }
    out
}

#[test]
fn every_thread_runs_in_the_sandbox_unless_told_otherwise() {
    for off in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("net.sock");
        let fs = dir.path().join("fs.sock");
        let api = dir.path().join("api.sock");
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        // A PAC file, whose engine runs on a thread of its own.
        let pac = dir.path().join("proxy.pac");
        std::fs::write(&pac, "function FindProxyForURL(u, h) { return 'DIRECT'; }").unwrap();
        let mut cmd = Command::new(ferry_bin());
        cmd.arg("serve")
            .arg("--proxy-pac")
            .arg(&pac)
            .arg("--net-socket")
            .arg(&net)
            .arg("--api-socket")
            .arg(&api)
            .arg("--share")
            .arg(format!(
                "tag=t,dir={},socket={}",
                share.display(),
                fs.display()
            ))
            .stderr(std::process::Stdio::piped());
        if off {
            cmd.args(["--sandbox", "none", "--seccomp", "none"]);
        }
        let child = cmd.spawn().unwrap();
        ferry_tests::wait_for(std::time::Duration::from_secs(10), || {
            (net.exists() && fs.exists() && api.exists()).then_some(())
        })
        .expect("sockets appear");
        let threads = thread_sandboxes(child.id());
        // SAFETY: kill has no memory effects; the child is ours.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{log}");
        assert!(!net.exists() && !fs.exists() && !api.exists(), "{log}");
        // The main thread, the devices' threads, the ports and proxy threads (PAC's among
        // them) and the API's.
        assert!(threads.len() >= 4, "{threads:?}");
        assert!(threads.iter().any(|t| t.0 == "ferry-pac"), "{threads:?}");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        for (name, nnp, seccomp, caps, filters) in &threads {
            // The process's two filters; the device threads narrow theirs with a third.
            let want = match name.as_str() {
                "net" | "fs-t" if !off => "3",
                _ if !off => "2",
                _ => "0",
            };
            assert_eq!(filters, want, "{name}: {threads:?}");
            if off {
                assert_eq!(seccomp, "0", "{name}: {threads:?}");
            } else {
                // Mode 2: a filter. No new privileges: Landlock and seccomp need it.
                assert_eq!(
                    (nnp.as_str(), seccomp.as_str()),
                    ("1", "2"),
                    "{name}: {threads:?}"
                );
                if root {
                    // CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, SETGID, SETUID,
                    // NET_BIND_SERVICE, SETFCAP: nothing else of root's.
                    assert_eq!(caps, "00000000800004df", "{name}: {threads:?}");
                }
            }
        }
        if off {
            assert!(log.contains("sandbox: off"), "{log}");
        } else {
            assert!(log.contains("Landlock confines file access"), "{log}");
            assert!(log.contains("seccomp allows"), "{log}");
        }
    }
}
