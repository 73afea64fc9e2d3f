//! `ferry run`: serve the devices and boot the tiny guest under QEMU with them attached.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::Ordering;

use log::info;

use crate::config::{Error, Result, RunConfig, ServeConfig, ShareConfig};
use crate::devices::{mac_string, Devices, FAILURE};
use crate::signals;

/// QEMU's accelerator: TCG unless `FERRY_ACCEL` names another (for example kvm).
fn accel() -> String {
    std::env::var("FERRY_ACCEL").unwrap_or_else(|_| "tcg".to_string())
}

/// The major version `qemu-system-x86_64 --version` names, or None when it cannot be read.
fn qemu_major() -> Option<u32> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    major_of_version(&String::from_utf8_lossy(&out.stdout))
}

/// "QEMU emulator version 7.2.22 (Debian ...)" → 7.
fn major_of_version(text: &str) -> Option<u32> {
    text.split("version ")
        .nth(1)?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Boots the guest and returns QEMU's exit code.
pub fn run(cfg: RunConfig) -> Result<ExitCode> {
    signals::block_termination()
        .map_err(|e| Error::Runtime(format!("cannot block termination signals: {e}")))?;
    let runtime = crate::runtime_dir::RuntimeDir::create("ferry-run-").map_err(Error::Runtime)?;
    let dir = runtime.path().to_path_buf();
    let shares: Vec<ShareConfig> = cfg
        .shares
        .iter()
        .enumerate()
        .map(|(i, d)| ShareConfig {
            tag: format!("share{i}"),
            dir: d.clone(),
            socket: dir.join(format!("fs{i}.sock")),
            readonly: false,
            cache: Default::default(),
            writeback: false,
            noxattr: false,
            trusted: false,
            client: false,
            devices: false,
            audit_files: false,
            uidmap: Default::default(),
            gidmap: Default::default(),
            xattrmap: Default::default(),
            posixacl: false,
            seclabel: false,
            threads: 0,
            poll_us: crate::config::DEFAULT_POLL_US,
        })
        .collect();
    let serve = ServeConfig {
        net_socket: Some(dir.join("net.sock")),
        net_client: false,
        net: Default::default(),
        shares,
        dns: ferry_net::stack::DnsSource::ResolvConf(crate::config::DEFAULT_RESOLV_CONF.into()),
        hosts_file: crate::config::DEFAULT_HOSTS_FILE.into(),
        dns_zones: vec![],
        proxy: crate::config::proxy_from_env(),
        proxy_secret: None,
        proxy_transparent: false,
        proxy_pac: None,
        publish: cfg.publish.clone(),
        rules: cfg.rules.clone(),
        default_bind: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        api_socket: Some(dir.join("api.sock")),
        portd_socket: crate::config::DEFAULT_PORTD_SOCKET.into(),
        pcap: cfg.pcap.clone(),
        sandbox: crate::sandbox::SandboxConfig {
            scope_signals: false,
            ..cfg.sandbox
        },
        handed: Default::default(),
        socket_group: None,
        runtime_shares: vec![],
        forward_sockets: vec![],
        audit_log: None,
        audit_queue: ferry_audit::QUEUE_EVENTS,
    };
    // The devices start on a thread of their own, which enters the sandbox (and passes it to
    // the threads it starts): this thread stays outside it, to start QEMU.
    let devices = {
        let serve = serve.clone();
        std::thread::Builder::new()
            .name("start".into())
            .spawn(move || Devices::start(&serve))
            .map_err(|e| Error::Runtime(format!("cannot start the devices' thread: {e}")))?
            .join()
            .map_err(|_| Error::Runtime("the devices' thread panicked while starting".into()))??
    };
    let mut qemu = qemu_command(&cfg, &serve);
    // SAFETY: the closure only calls pthread_sigmask, which is async-signal-safe.
    unsafe {
        qemu.pre_exec(signals::unblock_termination);
    }
    info!(
        "starting QEMU (accel {}); the guest's console follows",
        accel()
    );
    let mut child = qemu.spawn().map_err(|e| {
        Error::Runtime(format!(
            "cannot start qemu-system-x86_64: {e}; install it with `apt-get install qemu-system-x86`"
        ))
    })?;
    let pid = child.id() as libc::pid_t;
    std::thread::spawn(move || {
        if signals::wait_termination().is_ok() {
            // SAFETY: kill has no memory effects; at worst the pid is already gone.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    });
    let status = child
        .wait()
        .map_err(|e| Error::Runtime(format!("cannot wait for QEMU: {e}")))?;
    devices.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    info!("QEMU exited: {status}");
    if FAILURE.load(Ordering::SeqCst) != 0 {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

fn qemu_command(cfg: &RunConfig, serve: &ServeConfig) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    let tags: Vec<&str> = serve.shares.iter().map(|s| s.tag.as_str()).collect();
    let mut append = format!("console=ttyS0 quiet panic=-1 ferry.fs={}", tags.join(","));
    if cfg.script.is_some() {
        append.push_str(" ferry.noshell");
    }
    c.args(["-machine", &format!("q35,accel={}", accel())])
        .args(["-cpu", "max", "-smp", "2", "-nographic", "-no-reboot"])
        .args(["-m", &format!("{}M", cfg.memory)])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={}M,share=on", cfg.memory),
        ])
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .args(["-append", &append]);
    if let Some(net) = &serve.net_socket {
        // QEMU 7.2 takes the MAC and MTU from its own options (it reads a vhost-user net
        // backend's config space only for vDPA), so pass Ferry's. Under TCG QEMU 7 segfaults
        // setting up MSI-X notifiers for a vhost-user NIC, so it gets legacy INTx
        // (vectors=0), as a QEMU whose version cannot be read does; QEMU 8 and later keep
        // MSI-X, whose interrupts cost the guest less.
        let old_qemu = qemu_major().is_none_or(|m| m < 8);
        let vectors = if accel() == "tcg" && old_qemu {
            ",vectors=0"
        } else {
            ""
        };
        c.args(["-chardev", &chardev("n0", net)])
            .args(["-netdev", "vhost-user,id=net0,chardev=n0"])
            .args([
                "-device",
                &format!(
                    "virtio-net-pci,netdev=net0,romfile=,mac={},host_mtu={}{vectors}",
                    mac_string(&serve.net.guest_mac),
                    serve.net.mtu
                ),
            ]);
    }
    for (i, s) in serve.shares.iter().enumerate() {
        let id = format!("f{i}");
        c.args(["-chardev", &chardev(&id, &s.socket)]).args([
            "-device",
            &format!("vhost-user-fs-pci,chardev={id},tag={}", s.tag),
        ]);
    }
    if let Some(script) = &cfg.script {
        c.arg("-fw_cfg")
            .arg(format!("name=opt/ferry/run,file={}", script.display()));
    }
    c.args(&cfg.qemu_args);
    c
}

fn chardev(id: &str, path: &Path) -> String {
    format!("socket,id={id},path={}", path.display())
}

#[cfg(test)]
mod tests {
    use super::major_of_version;

    #[test]
    fn the_major_version_is_read_from_qemus_banner() {
        let debian = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                      Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(major_of_version(debian), Some(7));
        assert_eq!(
            major_of_version("QEMU emulator version 10.0.2 (v10.0.2)\n"),
            Some(10)
        );
        assert_eq!(major_of_version("qemu: command not found"), None);
        assert_eq!(major_of_version(""), None);
    }
}
