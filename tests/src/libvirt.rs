//! Booting the tiny guest the way libvirt users do: a libvirt daemon from Debian's packages,
//! a domain defined from XML, `virsh start` and `virsh destroy`.
//!
//! The daemon is a private one: `libvirtd` in session mode (`qemu:///session`), run as `nobody`
//! with its home, runtime and config folders inside the test's folder, so a test neither needs
//! nor touches the machine's system daemon and several tests can run at once. Its QEMU runs
//! as `nobody` too, which is how libvirt's system daemon runs QEMU as `libvirt-qemu`: ferry
//! (root) gives its sockets to that user's group with `--socket-group`. libvirt picks the NIC's
//! MAC; the guest's script reaches it through libvirt's own `<sysinfo type='fwcfg'>`.
//!
//! [`Libvirt::start_system_9`] runs Debian 12's own libvirt 9.0 instead (unpacked under
//! /opt/ferry/libvirt-9 by scripts/install-libvirt.sh, beside the installed 11.3): 9.0 has no
//! virtiofs in session mode, so it runs as the system daemon, as root, in a mount namespace of
//! its own where /etc/libvirt, /run/libvirt and /var/{lib,cache,log}/libvirt are the test's
//! folders; virsh reaches it through its socket's path.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::checks::{parse_checks, parse_done, GuestOutcome};
use crate::{guest_image, qemu_major, tail, wait_for};

/// The user (and group) the daemon and its QEMU run as: nobody and nogroup on Debian.
pub const LIBVIRT_ID: u32 = 65534;

/// A private libvirt daemon; killed, with every domain it started, on drop.
pub struct Libvirt {
    dir: PathBuf,
    daemon: Child,
    /// virsh's connection URI.
    uri: String,
    /// The daemon runs as [`LIBVIRT_ID`] (session mode), not as root.
    session: bool,
}

/// Where scripts/install-libvirt.sh unpacks libvirt 9.0.
pub const LIBVIRT_9: &str = "/opt/ferry/libvirt-9";

impl Libvirt {
    /// Starts `libvirtd` in session mode as [`LIBVIRT_ID`], with its state under `dir/libvirt`
    /// (`dir` must be traversable by that user).
    pub fn start(dir: &Path) -> Result<Self, String> {
        let dir = dir.join("libvirt");
        for sub in ["home", "run"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
        }
        chown_tree(&dir);
        let log = std::fs::File::create(dir.join("libvirtd.log")).map_err(|e| e.to_string())?;
        let daemon = as_libvirt_user(&dir, "libvirtd")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot start libvirtd ({e}): apt-get install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients")
            })?;
        let mut lv = Libvirt {
            dir,
            daemon,
            uri: "qemu:///session".into(),
            session: true,
        };
        let sock = lv.dir.join("run/libvirt/libvirt-sock");
        if wait_for(Duration::from_secs(20), || sock.exists().then_some(())).is_none() {
            let status = lv.daemon.try_wait().ok().flatten();
            return Err(format!(
                "libvirtd did not open {} within 20 s (exit status {status:?}); its log:\n{}",
                sock.display(),
                lv.daemon_log()
            ));
        }
        Ok(lv)
    }

    /// Starts libvirt 9.0's daemon in system mode, as root, in a mount namespace where libvirt's
    /// folders are under `dir/libvirt` (see the module's doc). QEMU runs as root, with no
    /// security driver; logs go to files, not virtlogd.
    pub fn start_system_9(dir: &Path) -> Result<Self, String> {
        let prefix = Path::new(LIBVIRT_9);
        let daemon_bin = prefix.join("usr/sbin/libvirtd");
        if !daemon_bin.exists() {
            return Err(format!(
                "{} is missing: run scripts/install-libvirt.sh (make test does)",
                daemon_bin.display()
            ));
        }
        let dir = dir.join("libvirt");
        let mounts = ["etc", "run", "lib", "cache", "log"];
        for sub in mounts {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
        }
        std::fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nsecurity_driver = \"none\"\nstdio_handler = \"file\"\ncgroup_controllers = [ ]\n",
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("etc/libvirtd.conf"), "").map_err(|e| e.to_string())?;
        let targets = [
            "/etc/libvirt",
            "/run/libvirt",
            "/var/lib/libvirt",
            "/var/cache/libvirt",
            "/var/log/libvirt",
        ];
        let mut script = String::new();
        for (sub, target) in mounts.iter().zip(targets) {
            // The mount point must exist; an empty folder outside the namespace costs nothing.
            std::fs::create_dir_all(target).map_err(|e| e.to_string())?;
            script.push_str(&format!(
                "mount --bind {} {target} && ",
                dir.join(sub).display()
            ));
        }
        let lib = prefix.join("usr/lib/x86_64-linux-gnu");
        script.push_str(&format!(
            "exec env LD_LIBRARY_PATH={} LIBVIRT_DRIVER_DIR={} {}",
            lib.display(),
            lib.join("libvirt/connection-driver").display(),
            daemon_bin.display()
        ));
        let log = std::fs::File::create(dir.join("libvirtd.log")).map_err(|e| e.to_string())?;
        let daemon = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start libvirtd 9.0 ({e})"))?;
        let sock = dir.join("run/libvirt-sock");
        let mut lv = Libvirt {
            uri: format!("qemu:///system?socket={}", sock.display()),
            dir,
            daemon,
            session: false,
        };
        if wait_for(Duration::from_secs(20), || sock.exists().then_some(())).is_none() {
            let status = lv.daemon.try_wait().ok().flatten();
            return Err(format!(
                "libvirtd 9.0 did not open {} within 20 s (exit status {status:?}); its log:\n{}",
                sock.display(),
                lv.daemon_log()
            ));
        }
        Ok(lv)
    }

    /// Runs `virsh -c URI ARGS`; its stdout, or `Err` with what it said.
    pub fn virsh(&self, args: &[&str]) -> Result<String, String> {
        self.virsh_within(None, args)
    }

    /// [`Self::virsh`], killed after `limit` seconds when one is given (for commands that
    /// talk to a QEMU that may be stuck).
    fn virsh_within(&self, limit: Option<u32>, args: &[&str]) -> Result<String, String> {
        let (program, pre) = match limit {
            Some(secs) => ("timeout", vec![secs.to_string(), "virsh".to_string()]),
            None => ("virsh", vec![]),
        };
        let mut cmd = if self.session {
            as_libvirt_user(&self.dir, program)
        } else {
            Command::new(program)
        };
        let out: Output = cmd
            .args(pre)
            .args(["-c", &self.uri])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run virsh ({e}): apt-get install libvirt-clients"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "virsh {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }

    /// Defines the domain from `xml` (written to `dir/NAME.xml` for the record).
    pub fn define(&self, name: &str, xml: &str) -> Result<(), String> {
        let path = self.dir.join(format!("{name}.xml"));
        std::fs::write(&path, xml).map_err(|e| e.to_string())?;
        if self.session {
            chown_tree(&path);
        }
        self.virsh(&["define", path.to_str().unwrap()]).map(|_| ())
    }

    /// The folder for the daemon's per-user config (`$XDG_CONFIG_HOME`): vhost-user
    /// descriptors go in `qemu/vhost-user/` under it.
    pub fn config_home(&self) -> PathBuf {
        self.dir.join("home/.config")
    }

    /// Gives `path` (and what is under it) to the daemon's user.
    pub fn give(&self, path: &Path) {
        chown_tree(path);
    }

    /// The daemon's log.
    pub fn daemon_log(&self) -> String {
        tail(
            &std::fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default(),
            30,
        )
    }

    /// What QEMU says of a domain whose guest went quiet: its run state and, for each
    /// virtio device in `devices` (their `id`s), the device's status and each vhost
    /// queue's indexes: whether the guest set the device up, queued requests, and whether
    /// the backend answered them. For a failure's message.
    pub fn virtio_state(&self, name: &str, devices: &[(&str, u16)]) -> String {
        let hmp = |cmd: &str| {
            self.virsh_within(Some(15), &["qemu-monitor-command", name, "--hmp", cmd])
                .map_err(|e| e + "\n")
        };
        let mut out = match hmp("info status") {
            Ok(s) => s,
            Err(e) => return e,
        };
        let hmp = |cmd: &str| hmp(cmd).unwrap_or_else(|e| e);
        for (id, queues) in devices {
            let path = format!("/machine/peripheral/{id}/virtio-backend");
            out += &format!("-- {id}: {}", hmp(&format!("info virtio-status {path}")));
            for q in 0..*queues {
                out += &hmp(&format!("info virtio-vhost-queue-status {path} {q}"));
            }
        }
        out
    }

    /// QEMU's log for domain `name` (libvirt's command line for it and what QEMU said).
    pub fn qemu_log(&self, name: &str) -> String {
        let p = if self.session {
            self.dir
                .join(format!("home/.cache/libvirt/qemu/log/{name}.log"))
        } else {
            self.dir.join(format!("log/qemu/{name}.log"))
        };
        tail(&std::fs::read_to_string(p).unwrap_or_default(), 30)
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // QEMU outlives libvirtd, so the domains go first; then the daemon and the log daemon
        // it started.
        if let Ok(names) = self.virsh(&["list", "--name"]) {
            for n in names.lines().filter(|n| !n.trim().is_empty()) {
                let _ = self.virsh(&["destroy", n.trim()]);
            }
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("run/libvirt/virtlogd.pid")) {
            if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                // SAFETY: kill has no memory effects; the pid is the log daemon this test's
                // libvirtd started, under its own user.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
}

/// `program` as [`LIBVIRT_ID`], with its home and XDG folders under `dir`.
fn as_libvirt_user(dir: &Path, program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={LIBVIRT_ID}"),
        &format!("--regid={LIBVIRT_ID}"),
        "--clear-groups",
        "env",
    ])
    .arg(format!("HOME={}", dir.join("home").display()))
    .arg(format!("XDG_RUNTIME_DIR={}", dir.join("run").display()))
    .arg(format!(
        "XDG_CONFIG_HOME={}",
        dir.join("home/.config").display()
    ))
    .arg(format!(
        "XDG_CACHE_HOME={}",
        dir.join("home/.cache").display()
    ))
    .arg(program);
    c
}

fn chown_tree(p: &Path) {
    let _ = Command::new("chown")
        .args(["-R", &format!("{LIBVIRT_ID}:{LIBVIRT_ID}")])
        .arg(p)
        .status();
}

/// How a domain's virtio-fs device is served.
pub enum DomainFs<'a> {
    /// By a ferry that runs already, on this socket (`<source socket=…>`).
    Socket(&'a Path),
    /// By a file server libvirt starts (`<binary path=…>`) for this folder.
    Binary {
        /// The program libvirt runs, as it would virtiofsd.
        binary: &'a Path,
        /// The folder.
        dir: &'a Path,
    },
}

/// What a domain holds: the tiny guest, a vhost-user NIC on `net_socket` (when given) with the
/// MAC libvirt chooses, and virtio-fs `tag`.
pub struct Domain<'a> {
    /// The domain's name.
    pub name: &'a str,
    /// The guest's script, handed over through fw_cfg.
    pub script: &'a Path,
    /// The serial console's file.
    pub console: &'a Path,
    /// Ferry's net socket (None: no NIC).
    pub net_socket: Option<&'a Path>,
    /// The virtio-fs device.
    pub fs: DomainFs<'a>,
    /// The tag the guest mounts.
    pub tag: &'a str,
    /// The QEMU binary (`<emulator>`); None: libvirt's default.
    pub emulator: Option<PathBuf>,
    /// Queue pairs on the NIC (`<driver queues='N'/>`); 0 or 1: libvirt's default, one.
    pub queues: u16,
}

impl Domain<'_> {
    /// The domain XML, as docs/libvirt.md documents it.
    pub fn xml(&self) -> String {
        let (kernel, initrd) = guest_image();
        let emulator = self
            .emulator
            .as_ref()
            .map(|e| format!("<emulator>{}</emulator>", e.display()))
            .unwrap_or_default();
        // QEMU 7.2 under TCG crashes setting up MSI-X notifiers for a vhost-user NIC; libvirt's
        // own way to pass a device property it does not model is <qemu:override>.
        let vectors = if qemu_major() < 8 && self.net_socket.is_some() {
            r#"<qemu:override>
    <qemu:device alias='ua-net0'>
      <qemu:frontend><qemu:property name='vectors' type='unsigned' value='0'/></qemu:frontend>
    </qemu:device>
  </qemu:override>"#
        } else {
            ""
        };
        let driver = if self.queues > 1 {
            format!("<driver queues='{}'/>", self.queues)
        } else {
            String::new()
        };
        let interface = match self.net_socket {
            Some(net) => format!(
                r#"<interface type='vhostuser'>
      <source type='unix' path='{net}' mode='client'/>
      <model type='virtio'/>
      {driver}
      <alias name='ua-net0'/>
    </interface>"#,
                net = net.display()
            ),
            None => String::new(),
        };
        let fs = match &self.fs {
            DomainFs::Socket(sock) => format!(
                r#"<filesystem type='mount'>
      <driver type='virtiofs' queue='1024'/>
      <source socket='{}'/>
      <target dir='{}'/>
    </filesystem>"#,
                sock.display(),
                self.tag
            ),
            DomainFs::Binary { binary, dir } => format!(
                r#"<filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs' queue='1024'/>
      <binary path='{}'/>
      <source dir='{}'/>
      <target dir='{}'/>
    </filesystem>"#,
                binary.display(),
                dir.display(),
                self.tag
            ),
        };
        let net_off = if self.net_socket.is_none() {
            " ferry.net=off"
        } else {
            ""
        };
        format!(
            r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 ferry.noshell ferry.fs={tag}{net_off}</cmdline>
  </os>
  <sysinfo type='fwcfg'><entry name='opt/ferry/run' file='{script}'/></sysinfo>
  <features><acpi/><apic/></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    {emulator}
    {interface}
    {fs}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  {vectors}
</domain>
"#,
            name = self.name,
            kernel = kernel.display(),
            initrd = initrd.display(),
            tag = self.tag,
            script = self.script.display(),
            console = self.console.display(),
        )
    }
}

/// Waits for `FERRY-DONE` on the console file libvirt's QEMU writes.
pub fn wait_console_done(console: &Path, deadline: Duration) -> Result<GuestOutcome, String> {
    let read = || String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned();
    match wait_for(deadline, || parse_done(&read())) {
        Some(rc) => {
            let console = read();
            Ok(GuestOutcome {
                rc,
                checks: parse_checks(&console),
                console,
            })
        }
        None => Err(format!(
            "the guest did not print FERRY-DONE within {deadline:?}; console tail:\n{}",
            tail(&read(), 60)
        )),
    }
}
