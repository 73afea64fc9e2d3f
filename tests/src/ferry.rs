//! Running `ferry serve` as a child process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use crate::{tail, wait_for};

static BUILD: Once = Once::new();

/// The `ferry` binary of this build (target/<profile>/ferry, beside the test's deps folder).
///
/// `cargo test -p ferry-tests` does not rebuild other packages' binaries, so under cargo the
/// first call builds `ferry` once, and a test never runs against a stale binary.
pub fn ferry_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let bin = dir.join("ferry");
    if let Some(cargo) = std::env::var_os("CARGO") {
        BUILD.call_once(|| {
            let mut c = Command::new(cargo);
            c.args(["build", "--quiet", "-p", "ferry"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                c.arg("--release");
            }
            let status = c.status().expect("run cargo build -p ferry");
            assert!(status.success(), "cargo build -p ferry failed");
        });
    }
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build -p ferry` (make test does)",
        bin.display()
    );
    bin
}

/// A command running `bin` inside namespace `netns` and as `user`, when given.
pub fn wrapped(netns: Option<&str>, user: Option<&str>, bin: &Path) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]);
            c
        }
        None => Command::new("env"),
    };
    if let Some(u) = user {
        c.args([
            "setpriv",
            &format!("--reuid={u}"),
            // nogroup on Debian; numeric so any distribution has it.
            "--regid=65534",
            "--clear-groups",
        ]);
    }
    c.arg(bin);
    c
}

/// The environment variables ferry reads its proxy setting from.
pub const PROXY_ENV: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "FERRY_PROXY_PASSWORD",
    "ALL_PROXY",
];

/// Whether process `pid` runs the ferry binary.
fn is_ferry(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|e| e.file_name().is_some_and(|n| n == "ferry"))
}

/// A running `ferry serve`; stopped with SIGTERM on drop.
pub struct FerryProcess {
    child: Child,
    log: PathBuf,
}

impl FerryProcess {
    /// Starts `ferry serve ARGS` with its log in `dir/ferry.log`, and waits until every path in
    /// `sockets` exists.
    pub fn serve(dir: &Path, args: &[String], sockets: &[PathBuf]) -> Self {
        Self::serve_in(None, dir, args, sockets)
    }

    /// As [`serve`](Self::serve), inside network namespace `netns` when given: the way every
    /// test whose guest opens connections must run it.
    pub fn serve_in(netns: Option<&str>, dir: &Path, args: &[String], sockets: &[PathBuf]) -> Self {
        Self::serve_as(netns, None, &ferry_bin(), dir, args, sockets)
    }

    /// As [`serve_in`](Self::serve_in), running binary `bin` as `user` (through `setpriv`)
    /// when given: how the unprivileged tests run it.
    pub fn serve_as(
        netns: Option<&str>,
        user: Option<&str>,
        bin: &Path,
        dir: &Path,
        args: &[String],
        sockets: &[PathBuf],
    ) -> Self {
        let mut cmd = wrapped(netns, user, bin);
        if user.is_some() {
            // Its private folder goes where that user may write.
            cmd.env("TMPDIR", dir);
        }
        cmd.arg("serve").args(args);
        // `FERRY_TEST_SANDBOX=namespace make test` runs the suites in another sandbox mode
        // (where a test does not choose its own).
        if let Ok(mode) = std::env::var("FERRY_TEST_SANDBOX") {
            if !args.iter().any(|a| a == "--sandbox") {
                cmd.args(["--sandbox", &mode]);
            }
        }
        Self::start(cmd, dir, sockets)
    }

    /// Starts `cmd` (a `ferry serve` command line, possibly behind a launcher such as
    /// `systemd-socket-activate`) with its log in `dir/ferry.log`, and waits until every path
    /// in `sockets` exists.
    pub fn start(mut cmd: Command, dir: &Path, sockets: &[PathBuf]) -> Self {
        let log = dir.join("ferry.log");
        let err = File::create(&log).expect("create the ferry log");
        // Ferry takes the host's proxy setting from its environment: a test's ferry must not
        // take the one of the machine the tests run on.
        // (A test that sets one on `cmd` keeps it.)
        let set: Vec<std::ffi::OsString> = cmd.get_envs().map(|(k, _)| k.to_owned()).collect();
        for v in PROXY_ENV.iter().filter(|v| !set.iter().any(|k| k == *v)) {
            cmd.env_remove(v);
        }
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start ferry serve");
        let mut p = FerryProcess { child, log };
        let ready = wait_for(Duration::from_secs(10), || {
            sockets.iter().all(|s| s.exists()).then_some(())
        });
        if ready.is_none() {
            let status = p.child.try_wait().ok().flatten();
            panic!(
                "ferry serve did not create its sockets within 10 s (exit status {status:?}); log:\n{}",
                p.log_text()
            );
        }
        p
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The id of the process that serves: with `--sandbox namespace` the child the started
    /// process forked (it holds the files and sockets; the started one only supervises it),
    /// else the started process itself.
    pub fn serving_pid(&self) -> u32 {
        let pid = self.pid();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let mut it = children.split_whitespace().filter_map(|c| c.parse().ok());
        match (it.next(), it.next()) {
            (Some(child), None) if crate::ferry::is_ferry(child) => child,
            _ => pid,
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        tail(&self.log_text(), 40)
    }

    /// Each of the serving process's threads: name, state, where in the kernel it waits
    /// and (as root) its kernel stack. For a failure's message when a guest hangs.
    pub fn threads(&self) -> String {
        let pid = self.serving_pid();
        let mut out = String::new();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            let p = t.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            let stat = read("stat");
            // The state follows the parenthesised name, which may hold spaces.
            let state = stat.rsplit(") ").next().and_then(|r| r.split(' ').next());
            out += &format!(
                "{} {} {} wchan={}\n",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                state.unwrap_or("?"),
                read("wchan")
            );
            for line in read("stack").lines().take(8) {
                out += &format!("    {line}\n");
            }
        }
        // Where each thread is in ferry's own code, when gdb is at hand (CI installs it).
        let bt = std::process::Command::new("timeout")
            .args(["30", "gdb", "-p", &pid.to_string(), "-batch", "-nx"])
            .args(["-ex", "thread apply all bt 10"])
            .stdin(std::process::Stdio::null())
            .output();
        if let Ok(o) = bt {
            let text = String::from_utf8_lossy(&o.stdout);
            for line in text.lines() {
                if line.starts_with("Thread ") || line.starts_with('#') {
                    // A frame's function and place; its arguments are noise here.
                    let short: String = line.chars().take(180).collect();
                    out += &format!("{short}\n");
                }
            }
        }
        out
    }

    /// Kills it with SIGKILL, as a crash or the OOM killer would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for it to exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill has no memory effects; the child is ours and not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = wait_for(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten()
        });
        match status {
            Some(s) => s.code(),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                None
            }
        }
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        if self.is_running() {
            self.terminate();
        }
    }
}

/// The `/stats` entry of the share `tag` (`ferry ctl --json stats`).
pub fn share_stats(api: &Path, tag: &str) -> serde_json::Value {
    let out = ferry_ctl(api, &["--json", "stats"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    stats["fs"]
        .as_array()
        .and_then(|a| a.iter().find(|f| f["tag"] == tag))
        .cloned()
        .unwrap_or_else(|| panic!("no share {tag} in {stats}"))
}

/// Runs `ferry ctl --api-socket API ARGS...` and returns what it did.
pub fn ferry_ctl(api: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(ferry_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run ferry ctl")
}
