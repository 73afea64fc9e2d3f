//! POSIX conformance measured with a suite no one here wrote: pjdfstest (the Rust port,
//! `cargo install pjdfstest`, which `scripts/install-deps.sh` does) runs as root inside the
//! guest, as it runs on virtiofsd. On a default share (ownership emulated), with and without
//! `posixacl`, only the device-node tests fail (ferry refuses device nodes in such a share on
//! purpose), each with EPERM; on a `devices` share and a `devices,trusted` one, none does. The share's folder is searchable by
//! other users, as pjdfstest's unprivileged subtests need on any server. The binary comes from
//! the host through the tools share: the guest image does not grow.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use ferry_tests::pjdfstest::{config, forgive_etxtbsy, parse, pjdfstest, Run};
use ferry_tests::{host_program, tools_share, FerryProcess, GuestSpec, Qemu};

const DEADLINE: Duration = Duration::from_secs(600);

/// Runs pjdfstest in the guest on a share of a fresh folder with `options` (`,`-led, or
/// empty); returns its result and ferry's log.
fn run_pjdfstest(options: &str) -> (Run, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tools = tools_share(d);
    let pjd = host_program(&tools.dir, "pjdfstest", &pjdfstest());
    // `nobody` is in the guest image; the script adds `tests`.
    std::fs::write(
        tools.dir.join("pjdfstest.toml"),
        config(&[("nobody", "nobody"), ("tests", "tests")]),
    )
    .unwrap();
    // The ETXTBSY tests copy `sleep` into the share and run the copy: busybox's applet would
    // exit at once under a name it does not know, and the test would race it. The host's
    // coreutils one runs with the guest's C library (the same Debian release).
    std::fs::create_dir(tools.dir.join("bin")).unwrap();
    std::fs::copy("/usr/bin/sleep", tools.dir.join("bin/sleep")).unwrap();
    // Searchable by the users pjdfstest switches to.
    let data = d.join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_sock = d.join("data.sock");
    let ferry = FerryProcess::serve(
        d,
        &[
            "--share".into(),
            tools.share.clone(),
            "--share".into(),
            format!(
                "tag=data,dir={},socket={}{options}",
                data.display(),
                data_sock.display()
            ),
        ],
        &[tools.socket.clone(), data_sock.clone()],
    );
    let script = format!(
        r#"
echo 'tests:x:1001:1001:tests:/:/bin/false' >> /etc/passwd
echo 'tests:x:1001:' >> /etc/group
# In a folder of the share, as the suite is usually run (at a mount's root its long-path
# tests overflow computing their lengths).
mkdir -m 755 /mnt/data/work && cd /mnt/data/work
export PATH=/mnt/tools/bin:$PATH
NO_COLOR=1 {pjd} -c /mnt/tools/pjdfstest.toml -p /mnt/data/work > /mnt/tools/data.out 2>&1
echo "FERRY-CHECK pjdfstest-ran ok rc=$?"
# open::etxtbsy again (see `forgive_etxtbsy`).
for i in 1 2 3; do
	NO_COLOR=1 {pjd} -c /mnt/tools/pjdfstest.toml -p /mnt/data/work open::etxtbsy >> /mnt/tools/etxtbsy.out 2>&1
done
"#
    );
    let mut qemu = Qemu::boot(
        d,
        &GuestSpec {
            script,
            shares: vec![
                ("tools".into(), tools.socket.clone()),
                ("data".into(), data_sock.clone()),
            ],
            ..Default::default()
        },
    );
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(1, &format!("ferry log:\n{}", ferry.log_tail()));
    let read = |s: &str| std::fs::read_to_string(tools.dir.join(format!("{s}.out"))).unwrap();

    let mut run = parse(&read("data"));
    forgive_etxtbsy(&mut run, &read("etxtbsy"));
    (run, ferry.log_text())
}

/// A default share, and one with `posixacl` (where the guest's kernel sends create modes
/// unmasked and ferry applies the umask: see `fs/src/passthrough/acl.rs`).
#[test]
fn pjdfstest_in_the_guest_fails_only_device_nodes_on_a_default_share() {
    for options in ["", ",posixacl"] {
        let (data_run, _) = run_pjdfstest(options);
        let not_devices: Vec<_> = data_run
            .failed
            .iter()
            .filter(|(name, _)| !(name.ends_with("::char") || name.ends_with("::block")))
            .collect();
        assert!(
            not_devices.is_empty(),
            "pjdfstest failures other than device nodes on a share with '{options}': {not_devices:#?}"
        );
        // Refused as ferry refuses them: EPERM (or an assertion that mknod of a device worked).
        let other_errors: Vec<_> = data_run
            .failed
            .iter()
            .filter(|(_, why)| !(why.contains("EPERM") || why.contains("mknod(")))
            .collect();
        assert!(other_errors.is_empty(), "{other_errors:#?}");
        assert!(
            !data_run.failed.is_empty() && data_run.passed > 250,
            "fewer tests ran than pjdfstest has: {} passed",
            data_run.passed
        );
        eprintln!(
            "pjdfstest: share with '{options}' {} passed, {} failed (device nodes)",
            data_run.passed,
            data_run.failed.len()
        );
    }
}

/// A share for a container's root file system (`devices`), and one that also passes owners
/// through (`devices,trusted`): no failures at all, as on virtiofsd and on the host's ext4.
#[test]
fn pjdfstest_in_the_guest_passes_on_devices_shares() {
    for options in [",devices", ",devices,trusted"] {
        let (run, log) = run_pjdfstest(options);
        assert!(
            run.failed.is_empty(),
            "pjdfstest failures on a share with {options}: {:#?}\nferry log:\n{}",
            run.failed,
            ferry_tests::tail(&log, 40)
        );
        assert!(
            run.passed > 350,
            "fewer tests ran than pjdfstest has on a share with {options}: {} passed",
            run.passed
        );
        eprintln!("pjdfstest: share with {options}: {} passed", run.passed);
    }
}
