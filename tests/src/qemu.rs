//! Booting the tiny guest under QEMU with Ferry's devices attached.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::checks::{parse_checks, parse_done, GuestOutcome};
use crate::tail;

/// The guest kernel and initramfs that `make guest-image` builds.
pub fn guest_image() -> (PathBuf, PathBuf) {
    let dir = std::env::var_os("FERRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-image/out"));
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    assert!(
        kernel.is_file() && initrd.is_file(),
        "the guest image is missing in {}: build it with `make guest-image` (make test does)",
        dir.display()
    );
    (kernel, initrd)
}

/// The QEMU binary the guest tests run: `FERRY_QEMU` when set (the CI runs a subset of the
/// suites on QEMU 10 this way, see scripts/install-qemu10.sh), else the system's.
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("FERRY_QEMU")
        .filter(|q| !q.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// The major version of [`qemu_binary`] (7 for Debian 12's, 10 for its backports').
pub fn qemu_major() -> u32 {
    static MAJOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAJOR.get_or_init(read_qemu_major)
}

fn read_qemu_major() -> u32 {
    let out = Command::new(qemu_binary())
        .arg("--version")
        .output()
        .expect("run qemu-system-x86_64 --version (apt-get install qemu-system-x86)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("version ")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(0)
}

/// What to boot.
#[derive(Clone, Debug, Default)]
pub struct GuestSpec {
    /// The shell script the guest runs (through fw_cfg); it should print FERRY-CHECK lines.
    pub script: String,
    /// The vhost-user net socket to attach, if any.
    pub net_socket: Option<PathBuf>,
    /// The MAC and MTU QEMU gives the NIC (QEMU does not read them from the backend).
    pub mac: Option<String>,
    /// MTU for QEMU's `host_mtu`.
    pub mtu: Option<u16>,
    /// virtio-fs devices: (tag, socket).
    pub shares: Vec<(String, PathBuf)>,
    /// Tags of `shares` the guest's init leaves unmounted, for the script to mount when it
    /// wants (the device is there from boot, its FUSE session starts at the mount).
    pub unmounted: Vec<String>,
    /// Skip DHCP in the guest.
    pub no_dhcp: bool,
    /// Guest memory in MiB (default 512).
    pub memory_mib: u32,
    /// Room for memory plugged in later (`-m …,slots=2,maxmem=`, in MiB; 0: none).
    pub max_memory_mib: u32,
    /// Queue pairs on the NIC (`queues=` on the netdev, `mq=on`); 0 or 1: one, the default.
    pub queue_pairs: u16,
    /// How QEMU's net chardev meets ferry: connect once (the default), connect again after
    /// ferry goes away, or listen for ferry to connect.
    pub net_link: NetLink,
    /// More on the guest kernel's command line (`security=selinux`).
    pub kernel_args: String,
    /// Request queues on each virtio-fs device (QEMU's `num-request-queues`); 0 or 1: one,
    /// the default.
    pub fs_request_queues: u16,
    /// Virtual CPUs (default 2).
    pub cpus: u16,
    /// More properties for the NIC's `-device` (`,guest_csum=off`), as a user would add them.
    pub nic_options: String,
    /// A reboot in the guest restarts it in the same QEMU, as for a user's VM (the devices
    /// stay connected), rather than end QEMU (`-no-reboot`, the default here).
    pub reboots: bool,
}

/// How QEMU's vhost-user net chardev meets the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetLink {
    /// QEMU connects to ferry's socket, once.
    #[default]
    Connect,
    /// QEMU connects, and again every second after the connection ends (`reconnect=`).
    Reconnect,
    /// QEMU listens (`server=on`); ferry connects (`--net-client`).
    Listen,
}

/// A running QEMU; killed on drop.
pub struct Qemu {
    child: Child,
    console: PathBuf,
    /// QEMU's QMP socket (`hmp` sends monitor commands through it).
    qmp: PathBuf,
    /// How to boot it again, once, if QEMU dies of [`QEMU_BOOT_BUG`] before the guest runs.
    again: Option<(PathBuf, GuestSpec)>,
}

/// QEMU 10.0's TCG aborts now and then while a guest kernel sets up a PCI device's MSI-X table
/// (`msix_table_mmio_write: Assertion ... failed`), before the guest runs anything of ours:
/// a bug of QEMU's that no backend can cause or avoid (ferry has no part in the table's
/// MMIO). Seen once in some thirty CI runs; the boot is tried again, once, and said so.
pub const QEMU_BOOT_BUG: &str = "msix_table_mmio_write: Assertion";

impl Qemu {
    /// Boots the guest described by `spec`; files go in `dir` (the console in
    /// `dir/console-N.log`, N counting boots).
    pub fn boot(dir: &Path, spec: &GuestSpec) -> Self {
        let (kernel, initrd) = guest_image();
        let n = (0..)
            .find(|i| !dir.join(format!("console-{i}.log")).exists())
            .unwrap_or(0);
        let console = dir.join(format!("console-{n}.log"));
        let script = dir.join(format!("guest-{n}.sh"));
        let qmp = dir.join(format!("qmp-{n}.sock"));
        std::fs::write(&script, &spec.script).expect("write the guest script");
        let mem = if spec.memory_mib == 0 {
            512
        } else {
            spec.memory_mib
        };
        let accel = std::env::var("FERRY_ACCEL").unwrap_or_else(|_| "tcg".into());
        let tags: Vec<&str> = spec
            .shares
            .iter()
            .map(|(t, _)| t.as_str())
            .filter(|t| !spec.unmounted.iter().any(|u| u == t))
            .collect();
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 ferry.noshell ferry.fs={}",
            tags.join(",")
        );
        if spec.no_dhcp || spec.net_socket.is_none() {
            append.push_str(" ferry.net=off");
        }
        if !spec.kernel_args.is_empty() {
            append.push(' ');
            append.push_str(&spec.kernel_args);
        }
        let mut c = Command::new(qemu_binary());
        c.args(["-machine", &format!("q35,accel={accel}")])
            .args(["-cpu", "max", "-smp", &spec.cpus.max(2).to_string()])
            .args([
                "-m",
                &if spec.max_memory_mib > mem {
                    format!("{mem}M,slots=2,maxmem={}M", spec.max_memory_mib)
                } else {
                    format!("{mem}M")
                },
            ])
            .args(["-nographic", "-nodefaults", "-serial", "stdio"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(if spec.reboots {
                None
            } else {
                Some("-no-reboot")
            })
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            ])
            .args(["-numa", "node,memdev=mem"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .arg("-fw_cfg")
            .arg(format!("name=opt/ferry/run,file={}", script.display()));
        if let Some(sock) = &spec.net_socket {
            // romfile= skips the iPXE option ROM: nothing network-boots, and it costs boot time.
            let mut dev = "virtio-net-pci,netdev=net0,romfile=".to_string();
            if accel == "tcg" && qemu_major() < 8 {
                // QEMU 7.2 under TCG segfaults setting up MSI-X notifiers for a vhost-user NIC
                // (msix_set_vector_notifiers); legacy INTx works.
                dev.push_str(",vectors=0");
            }
            if let Some(mac) = &spec.mac {
                dev.push_str(&format!(",mac={mac}"));
            }
            dev.push_str(&spec.nic_options);
            let mut netdev = "vhost-user,id=net0,chardev=n0".to_string();
            if spec.queue_pairs > 1 {
                // As libvirt does for <driver queues='N'/>: the pairs on the netdev, and the
                // feature (and a vector per queue, plus config and control) on the device.
                netdev.push_str(&format!(",queues={}", spec.queue_pairs));
                dev.push_str(",mq=on");
                if !dev.contains("vectors=") {
                    dev.push_str(&format!(",vectors={}", 2 * spec.queue_pairs + 2));
                }
            }
            if let Some(mtu) = spec.mtu {
                dev.push_str(&format!(",host_mtu={mtu}"));
            }
            let mut chardev = format!("socket,id=n0,path={}", sock.display());
            match spec.net_link {
                NetLink::Connect => {}
                // QEMU 9.2 renamed reconnect (seconds) to reconnect-ms.
                NetLink::Reconnect if qemu_major() >= 10 => chardev.push_str(",reconnect-ms=1000"),
                NetLink::Reconnect => chardev.push_str(",reconnect=1"),
                NetLink::Listen => chardev.push_str(",server=on,wait=off"),
            }
            c.args(["-chardev", &chardev])
                .args(["-netdev", &netdev])
                .args(["-device", &dev]);
        }
        for (i, (tag, sock)) in spec.shares.iter().enumerate() {
            let mut dev = format!("vhost-user-fs-pci,chardev=f{i},tag={tag}");
            if spec.fs_request_queues > 1 {
                dev.push_str(&format!(",num-request-queues={}", spec.fs_request_queues));
            }
            c.args([
                "-chardev",
                &format!("socket,id=f{i},path={}", sock.display()),
            ])
            .args(["-device", &dev]);
        }
        let out = File::create(&console).expect("create the console log");
        let err = out.try_clone().expect("clone the console log");
        let child = c
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start qemu-system-x86_64 (apt-get install qemu-system-x86)");
        Qemu {
            child,
            console,
            qmp,
            again: Some((dir.to_path_buf(), spec.clone())),
        }
    }

    /// Whether QEMU died of [`QEMU_BOOT_BUG`] before the guest started its script, and was
    /// booted again (once per `Qemu`).
    fn booted_again(&mut self) -> bool {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            return false;
        }
        let console = self.console();
        if !console.contains(QEMU_BOOT_BUG) || console.contains("FERRY-") {
            return false;
        }
        let Some((dir, spec)) = self.again.take() else {
            return false;
        };
        eprintln!(
            "QEMU aborted in its MSI-X table emulation before the guest ran (a QEMU bug, {}): booting again",
            self.console.display()
        );
        *self = Qemu::boot(&dir, &spec);
        self.again = None;
        true
    }

    /// Runs the human monitor command `cmd` (`stop`, `cont`, `info status`) through QMP, as
    /// libvirt's `qemu-monitor-command --hmp` does; returns its output.
    pub fn hmp(&self, cmd: &str) -> Result<String, String> {
        use std::io::{BufRead, BufReader, Write};
        let sock = std::os::unix::net::UnixStream::connect(&self.qmp)
            .map_err(|e| format!("connect to QEMU's QMP socket {}: {e}", self.qmp.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(sock.try_clone().map_err(|e| e.to_string())?);
        let mut w = sock;
        // Replies are one JSON object a line; events may come between them.
        let mut reply = |what: &str| -> Result<serde_json::Value, String> {
            loop {
                let mut line = String::new();
                if reader
                    .read_line(&mut line)
                    .map_err(|e| format!("{what}: {e}"))?
                    == 0
                {
                    return Err(format!("{what}: QMP closed"));
                }
                let v: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| format!("{what}: {e}: {line}"))?;
                if v.get("return").is_some() || v.get("error").is_some() || v.get("QMP").is_some() {
                    return Ok(v);
                }
            }
        };
        reply("QMP greeting")?;
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .map_err(|e| e.to_string())?;
        reply("qmp_capabilities")?;
        let req = serde_json::json!({
            "execute": "human-monitor-command",
            "arguments": { "command-line": cmd },
        });
        w.write_all(format!("{req}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let v = reply(cmd)?;
        match v.get("return") {
            Some(r) => Ok(r.as_str().unwrap_or_default().to_string()),
            None => Err(format!("{cmd}: {v}")),
        }
    }

    /// The console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Waits until the console contains `needle`; `Err` with the console's tail otherwise.
    pub fn wait_console(&mut self, needle: &str, deadline: Duration) -> Result<(), String> {
        let found = crate::wait_for(deadline, || {
            let found = self.console().contains(needle).then_some(());
            if found.is_none() {
                self.booted_again();
            }
            found
        });
        found.ok_or_else(|| {
            format!(
                "the guest did not print {needle:?} within {deadline:?}; console tail:\n{}",
                tail(&self.console(), 60)
            )
        })
    }

    /// Waits for `FERRY-DONE` and returns what the guest reported, or `Err` with the console's
    /// tail when the deadline passes or QEMU exits first.
    pub fn wait_done(&mut self, deadline: Duration) -> Result<GuestOutcome, String> {
        let end = Instant::now() + deadline;
        loop {
            let console = self.console();
            if let Some(rc) = parse_done(&console) {
                // Let QEMU power off by itself; it has nothing left to do.
                let _ = crate::wait_for(Duration::from_secs(10), || {
                    self.child.try_wait().ok().flatten()
                });
                return Ok(GuestOutcome {
                    rc,
                    checks: parse_checks(&console),
                    console,
                });
            }
            if self.booted_again() {
                continue;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "QEMU exited ({status}) before the guest printed FERRY-DONE; console tail:\n{}",
                    tail(&self.console(), 60)
                ));
            }
            if Instant::now() >= end {
                return Err(format!(
                    "the guest did not print FERRY-DONE within {deadline:?}; console tail:\n{}",
                    tail(&console, 60)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills QEMU at once, as a crash or `kill -9` would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}
