//! The test harness: start `ferry serve` and QEMU with the tiny guest, read the guest's
//! `FERRY-CHECK` lines from its serial console, and clean everything up on drop.
//!
//! Each test gets its own temporary folder for sockets, logs and the console, so tests can run
//! in parallel. QEMU uses TCG unless `FERRY_ACCEL` says otherwise (for example `kvm`).

mod checks;
mod ferry;
pub mod libvirt;
mod netns;
pub mod pjdfstest;
mod qemu;
pub mod xattr;

pub use checks::{parse_checks, Check, GuestOutcome};
pub use ferry::{ferry_bin, ferry_ctl, share_stats, wrapped, FerryProcess, PROXY_ENV};
pub use netns::{clients, FarSide, TestHost, TestNet};
pub use qemu::{guest_image, qemu_binary, qemu_major, GuestSpec, NetLink, Qemu, QEMU_BOOT_BUG};

use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns `Some`, or `None` after `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET PATH` on a control API socket (through curl), as JSON; `Null` if it does not answer.
pub fn api_get(api: &std::path::Path, path: &str) -> serde_json::Value {
    let out = std::process::Command::new("curl")
        .args(["-s", "-m", "5", "--unix-socket"])
        .arg(api)
        .arg(format!("http://ferry{path}"))
        .output()
        .expect("run curl (apt-get install curl)");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The static guest-side probe (xattrs, renameat2, SEEK_DATA/SEEK_HOLE, flock, fcntl locks,
/// UDP) built from `probe/probe.c`; guest tests copy it into a share and run it there.
pub fn probe() -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(env!("OUT_DIR"), "/probe"))
}

/// The probe's share for a guest test: `dir/tools` holding the probe (the guest mounts it at
/// /mnt/tools), its socket, and the `--share` value that serves it.
pub struct Tools {
    /// The host folder.
    pub dir: std::path::PathBuf,
    /// The vhost-user socket.
    pub socket: std::path::PathBuf,
    /// `tag=tools,dir=...,socket=...`.
    pub share: String,
}

/// Makes the probe's share in `dir`, with the host's curl beside the probe.
pub fn tools_share(dir: &std::path::Path) -> Tools {
    let tools = dir.join("tools");
    std::fs::create_dir(&tools).expect("create the tools folder");
    std::fs::copy(probe(), tools.join("probe")).expect("copy the probe into the tools share");
    host_curl(&tools);
    let socket = dir.join("tools.sock");
    let share = format!(
        "tag=tools,dir={},socket={}",
        tools.display(),
        socket.display()
    );
    Tools {
        dir: tools,
        socket,
        share,
    }
}

/// How a guest script runs curl: the host's, from the tools share (see [`host_curl`]).
pub const CURL: &str =
    "/mnt/tools/curl/ld-linux-x86-64.so.2 --library-path /mnt/tools/curl /mnt/tools/curl/curl";

/// Copies the host's curl, the shared libraries it needs and their loader into
/// `tools/curl` (the guest image has no curl: busybox wget never sends https:// through a
/// proxy, and the image must stay small enough for a 256 MiB guest), and returns the
/// command that runs it in the guest, where `tools` is mounted at /mnt/tools ([`CURL`]).
pub fn host_curl(tools: &std::path::Path) -> String {
    let cmd = host_program(tools, "curl", std::path::Path::new("/usr/bin/curl"));
    assert_eq!(cmd, CURL, "curl's loader has another name here");
    cmd
}

/// Copies host program `binary`, the shared libraries `ldd` names for it and their loader into
/// `tools/NAME`, and returns the command that runs it in the guest, where `tools` is mounted
/// at /mnt/tools: the guest image stays small, and the program finds the libraries it was
/// built against.
pub fn host_program(tools: &std::path::Path, name: &str, binary: &std::path::Path) -> String {
    let dir = tools.join(name);
    std::fs::create_dir_all(&dir).expect("create a program's folder in the tools share");
    let ldd = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .expect("run ldd");
    let mut loader = None;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let lib = std::path::Path::new(path)
            .file_name()
            .expect("a library file name");
        std::fs::copy(path, dir.join(lib)).expect("copy one of a program's libraries");
        if lib.to_string_lossy().starts_with("ld-linux") {
            loader = Some(lib.to_string_lossy().into_owned());
        }
    }
    std::fs::copy(binary, dir.join(name)).expect("copy a program into the tools share");
    let loader = loader.expect("ldd names the program's loader");
    format!("/mnt/tools/{name}/{loader} --library-path /mnt/tools/{name} /mnt/tools/{name}/{name}")
}

/// A guest test's setup: `ferry serve` in namespace `ns` with a net device, the control API
/// and the probe's share (and `args` besides), and the guest booted on them with `script`.
pub struct ServedGuest {
    /// The ferry process.
    pub ferry: FerryProcess,
    /// The guest.
    pub qemu: Qemu,
    /// The probe's share (its folder is where the test writes `go-N` step files).
    pub tools: Tools,
    /// The control API's socket.
    pub api: std::path::PathBuf,
}

/// Starts ferry in `ns` serving `dir/net.sock`, `dir/api.sock` and the tools share plus
/// `args`, waits for `sockets` too, and boots the guest with `script` and `shares` (the tools
/// share comes first).
pub fn serve_and_boot(
    ns: &str,
    dir: &std::path::Path,
    script: String,
    args: &[String],
    sockets: &[std::path::PathBuf],
    shares: Vec<(String, std::path::PathBuf)>,
) -> ServedGuest {
    let spec = GuestSpec {
        script,
        shares,
        ..Default::default()
    };
    serve_and_boot_spec(ns, dir, spec, args, sockets)
}

/// [`serve_and_boot`] with a guest of its own description (`spec.shares` after the tools
/// share; its net socket is ferry's).
pub fn serve_and_boot_spec(
    ns: &str,
    dir: &std::path::Path,
    mut spec: GuestSpec,
    args: &[String],
    sockets: &[std::path::PathBuf],
) -> ServedGuest {
    let sock = dir.join("net.sock");
    let api = dir.join("api.sock");
    let tools = tools_share(dir);
    let mut all_args = vec![
        "--net-socket".to_string(),
        sock.display().to_string(),
        "--api-socket".into(),
        api.display().to_string(),
        "--share".into(),
        tools.share.clone(),
    ];
    all_args.extend_from_slice(args);
    let mut all_sockets = vec![sock.clone(), tools.socket.clone(), api.clone()];
    all_sockets.extend_from_slice(sockets);
    let ferry = FerryProcess::serve_in(Some(ns), dir, &all_args, &all_sockets);
    spec.shares
        .insert(0, ("tools".to_string(), tools.socket.clone()));
    spec.net_socket = Some(sock);
    let qemu = Qemu::boot(dir, &spec);
    ServedGuest {
        ferry,
        qemu,
        tools,
        api,
    }
}

/// A tmpfs of `mib` MiB mounted at `at` (made if missing) for a test; unmounted on drop.
/// Needs root.
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    /// Mounts it.
    pub fn mount(at: &std::path::Path, mib: u32) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "ferry-test"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mount a {mib} MiB tmpfs at {} (needs root)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
