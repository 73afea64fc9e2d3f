//! Starting the devices: bind every socket first (so a mistake is reported before anything
//! runs), then give each device its own thread in this one process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread;

use ferry_devices::{serve_connections, Endpoint, NetServices, VhostUserNetBackend};
use ferry_net::ports::{Ports, PrivilegedBinder};
use ferry_net::proxy::Proxy;
use ferry_net::rules::Rules;
use log::{error, info};

use crate::config::{Error, Result, ServeConfig};
use crate::listen::listener;
use crate::runtime_dir::RuntimeDir;
use crate::sandbox::{confine_thread, Role, SeccompMode};
use crate::signals;

/// Exit code a failing device thread leaves for `main`.
pub static FAILURE: AtomicU8 = AtomicU8::new(0);

/// The running devices.
pub struct Devices {
    sockets: Vec<PathBuf>,
    private: PathBuf,
    /// Holds `private`'s lock (see `runtime_dir`).
    _private_lock: RuntimeDir,
    /// The control API, when asked for; dropped (and its socket removed) at shutdown.
    api: Option<crate::api::Api>,
    /// Published ports; their host sockets close when this goes.
    ports: Option<Arc<Ports>>,
    /// The audit log, flushed at shutdown.
    audit: Option<ferry_audit::Audit>,
}

/// A folder only this process can enter, for the daemons' private sockets.
fn private_dir() -> Result<RuntimeDir> {
    RuntimeDir::create("ferry-").map_err(Error::Runtime)
}

/// Raises the open-file limit: to the kernel's maximum (fs.nr_open) when allowed, else to the
/// hard limit. Nodes of a share and guest connections each take a descriptor.
fn raise_fd_limit() {
    let nr_open: libc::rlim_t = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    // SAFETY: rlimit is plain data; getrlimit/setrlimit only read and write it.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return;
        }
        let max = libc::rlimit {
            rlim_cur: nr_open.max(r.rlim_max),
            rlim_max: nr_open.max(r.rlim_max),
        };
        // Raising the hard limit needs CAP_SYS_RESOURCE; without it, take the hard limit.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &max) != 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                log::warn!("cannot raise the open-file limit to {}", r.rlim_max);
            }
        }
    }
}

impl Devices {
    /// Enters the sandbox (on the calling thread, so every device thread started here inherits
    /// it), binds every socket and starts one thread per device.
    pub fn start(cfg: &ServeConfig) -> Result<Self> {
        raise_fd_limit();
        let private_lock = private_dir()?;
        let private = private_lock.path().to_path_buf();
        // Opened before the sandbox, which allows no file outside the shares; emptied once the
        // sockets are bound. The snap length is the longest frame the device takes (a VLAN
        // tag included).
        let mut capture = match &cfg.pcap {
            Some(p) => Some(
                ferry_net::pcap::Capture::open(p, u32::from(cfg.net.mtu) + 18).map_err(|e| {
                    let _ = std::fs::remove_dir_all(&private);
                    Error::Runtime(format!(
                        "--pcap {}: cannot create it ({e}); check that its folder is writable",
                        p.display()
                    ))
                })?,
            ),
            None => None,
        };
        // The audit log's file too; its thread starts inside the sandbox. Without
        // --audit-log, events still reach `/events` followers.
        let audit_out = match &cfg.audit_log {
            Some(sink) => Some(ferry_audit::Audit::open(sink).map_err(|e| {
                let _ = std::fs::remove_dir_all(&private);
                Error::Runtime(e)
            })?),
            None => cfg
                .api_socket
                .as_ref()
                .and_then(|_| ferry_audit::Audit::open(&ferry_audit::Sink::None).ok()),
        };
        let mut paths = crate::sandbox::Paths::for_serve(cfg, &private);
        if let Err(e) = crate::sandbox::enter_serving(cfg.sandbox, &mut paths, &private) {
            let _ = std::fs::remove_dir_all(&private);
            return Err(e);
        }
        let audit = match audit_out.map(|o| o.start(cfg.audit_queue)).transpose() {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&private);
                return Err(Error::Runtime(e));
            }
        };
        let mut sockets = Vec::new();
        let mut net = None;
        let mut handed = cfg.handed.clone();
        if let Some(path) = &cfg.net_socket {
            let endpoint = if cfg.net_client {
                Endpoint::Connect(path.clone())
            } else {
                let (listener, bound) = listener(path, &mut handed, cfg.socket_group)?;
                if bound {
                    sockets.push(path.clone());
                }
                Endpoint::Listen(listener)
            };
            net = Some((endpoint, path.clone()));
        }
        let mut fs = Vec::new();
        let mut ports = None;
        let mut proxy = None;
        let mut rules = None;
        let mut net_backend = None;
        let mut dns_names = None;
        for share in &cfg.shares {
            let pfs = crate::shares::Shares::open(share).map_err(|e| {
                Error::Runtime(format!(
                    "--share tag={}: cannot open {}: {e}",
                    share.tag,
                    share.dir.display()
                ))
            })?;
            let endpoint = if share.client {
                Endpoint::Connect(share.socket.clone())
            } else {
                match listener(&share.socket, &mut handed, cfg.socket_group) {
                    Ok((l, bound)) => {
                        if bound {
                            sockets.push(share.socket.clone());
                        }
                        Endpoint::Listen(l)
                    }
                    Err(e) => {
                        remove_sockets(&sockets);
                        return Err(e);
                    }
                }
            };
            fs.push((endpoint, share.clone(), pfs));
        }

        if let Some((endpoint, path)) = net {
            let portd = cfg.portd_socket.clone();
            let binder: PrivilegedBinder =
                Box::new(move |spec| crate::portd::request(&portd, spec));
            let p = Ports::new(cfg.net.guest(), Some(binder))
                .map_err(|e| Error::Runtime(format!("cannot set up published ports: {e}")))?;
            if let Some(a) = &audit {
                p.set_audit(a.clone());
            }
            for spec in &cfg.publish {
                if let Err(e) = p.publish(*spec) {
                    remove_sockets(&sockets);
                    return Err(Error::Runtime(format!("{e}\nhint: {}", e.hint())));
                }
            }
            for spec in &cfg.forward_sockets {
                if let Err(e) = p.forward_socket(spec.clone()) {
                    p.close_sockets();
                    remove_sockets(&sockets);
                    return Err(Error::Runtime(format!("--forward-socket {spec}: {e}")));
                }
            }
            ports = Some(p.clone());
            let r = Arc::new(Rules::with_host_alias(
                &cfg.rules,
                Some(cfg.net.host_alias()),
            ));
            if !cfg.rules.is_empty() {
                info!(
                    "net: {} rules: {}",
                    cfg.rules.len(),
                    cfg.rules
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            rules = Some(r.clone());
            let mut settings = cfg.proxy.clone();
            if let Some(src) = &cfg.proxy_pac {
                let pac = ferry_net::proxy::pac::Pac::start(src).map_err(|e| {
                    remove_sockets(&sockets);
                    Error::Runtime(format!("--proxy-pac: {e}"))
                })?;
                settings.pac = Some(Arc::new(pac));
            }
            let px = Proxy::new(settings, cfg.proxy_secret.clone(), Some(r.clone())).map_err(|e| {
                remove_sockets(&sockets);
                Error::Runtime(format!(
                    "cannot start the HTTP proxy's thread: {e}; check the process and thread limits (ulimit -u)"
                ))
            })?;
            let show = |u: &Option<ferry_net::proxy::Upstream>| {
                u.as_ref()
                    .map_or_else(|| "none, servers directly".to_string(), |u| u.to_string())
            };
            info!(
                "net: HTTP(S) proxy on {}:{} (upstream: {}; for https: {}; bypass: {:?}; PAC: {}; password: {})",
                cfg.net.gateway(),
                ferry_net::proxy::PORT,
                show(&cfg.proxy.http),
                show(&cfg.proxy.https),
                cfg.proxy.bypass.to_string(),
                cfg.proxy_pac.as_ref().map_or("none", |p| p.name.as_str()),
                if cfg.proxy_secret.is_some() { "held" } else { "none" }
            );
            if let Some(a) = &audit {
                px.set_audit(a.clone());
            }
            if cfg.proxy_transparent {
                info!("net: transparent mode: the guest's TCP to ports 80 and 443 goes through the proxy");
                px.set_transparent(true);
            }
            proxy = Some(px.clone());
            let names = Arc::new(ferry_net::names::Names::new(Some(cfg.hosts_file.clone())));
            dns_names = Some(names.clone());
            let services = NetServices {
                ports: Some(p),
                proxy: Some(px),
                rules: Some(r),
                dns: Some(cfg.dns.clone()),
                names: Some(names.clone()),
                dns_zones: cfg.dns_zones.clone(),
                audit: audit.clone(),
                live_captures: Default::default(),
            };
            let backend = VhostUserNetBackend::with_services(cfg.net.clone(), None, services)
                .map_err(|e| Error::Runtime(format!("cannot set up the net device: {e}")))?;
            if let Some(mut c) = capture.take() {
                if let Err(e) = c.begin() {
                    remove_sockets(&sockets);
                    return Err(Error::Runtime(format!(
                        "--pcap {}: cannot write it ({e}); check the disk",
                        cfg.pcap
                            .as_deref()
                            .unwrap_or(std::path::Path::new(""))
                            .display()
                    )));
                }
                backend.set_capture(c);
            }
            net_backend = Some(backend.clone());
            info!(
                "net: serving virtio-net {} {} (guest {} mac {}, gateway {}, mtu {}, dns upstream {})",
                if cfg.net_client { "as a client of" } else { "on" },
                path.display(),
                cfg.net.guest(),
                mac_string(&cfg.net.guest_mac),
                cfg.net.gateway(),
                cfg.net.mtu,
                match &cfg.dns {
                    ferry_net::stack::DnsSource::Servers(s) => s
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    ferry_net::stack::DnsSource::ResolvConf(p) =>
                        format!("the nameservers of {}", p.display()),
                }
            );
            let inner = private.join("net.sock");
            spawn(
                "net",
                Some((Role::Network, cfg.sandbox.seccomp)),
                move || {
                    let b = backend.clone();
                    let b2 = backend.clone();
                    let on_connect = move |d: &vhost_user_backend::VhostUserDaemon<_>| {
                        b2.frontend_attached();
                        // The stack's timer and host sockets wake the worker that serves the queues.
                        let Some(h) = d.get_epoll_handlers().into_iter().next() else {
                            return;
                        };
                        for (fd, token) in [
                            (b2.timer_fd(), ferry_devices::vhu_net::TIMER_EVENT),
                            (b2.host_fd(), ferry_devices::vhu_net::HOST_EVENT),
                        ] {
                            if let Err(e) = h.register_listener(
                                fd,
                                vmm_sys_util::epoll::EventSet::IN,
                                u64::from(token),
                            ) {
                                error!("net: cannot watch the stack's events: {e}");
                            }
                        }
                    };
                    let pairs = ferry_devices::vhu_net::MAX_QUEUE_PAIRS as u16;
                    serve_connections(
                        "net",
                        endpoint,
                        inner,
                        backend,
                        Some(pairs),
                        on_connect,
                        move || b.frontend_gone(),
                    )
                },
            )?;
        }
        let shares = Arc::new(crate::shares::Shares::new(
            private.clone(),
            &cfg.runtime_shares,
            cfg.sandbox,
            audit.clone(),
        ));
        for (endpoint, share, pfs) in fs {
            if let Err(e) = shares.start(endpoint, &share, pfs, false) {
                remove_sockets(&sockets);
                return Err(e);
            }
        }
        let api = match &cfg.api_socket {
            Some(path) => {
                let control = crate::api::Control {
                    ports: ports.clone(),
                    default_bind: cfg.default_bind,
                    net: net_backend,
                    proxy,
                    rules,
                    names: dns_names,
                    shares,
                    started: std::time::Instant::now(),
                    audit: audit.clone(),
                };
                match crate::api::start(path, control) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        remove_sockets(&sockets);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        Ok(Devices {
            sockets,
            private,
            _private_lock: private_lock,
            api,
            ports,
            audit,
        })
    }

    /// Removes the sockets; the process is about to exit.
    pub fn shutdown(self) {
        drop(self.api);
        if let Some(p) = self.ports {
            p.close_sockets();
        }
        if let Some(a) = self.audit {
            a.stop();
        }
        remove_sockets(&self.sockets);
        let _ = std::fs::remove_dir_all(&self.private);
    }
}

fn remove_sockets(sockets: &[PathBuf]) {
    for s in sockets {
        if let Err(e) = std::fs::remove_file(s) {
            if e.kind() != std::io::ErrorKind::NotFound {
                error!("cannot remove socket {}: {e}", s.display());
            }
        }
    }
}

/// Starts device thread `name` running `f`, narrowed to `role` under the seccomp mode given.
/// A failure stops ferry.
pub(crate) fn spawn<F>(name: &str, role: Option<(Role, SeccompMode)>, f: F) -> Result<()>
where
    F: FnOnce() -> std::result::Result<(), ferry_devices::Error> + Send + 'static,
{
    let n = name.to_string();
    thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some((role, mode)) = role {
                if let Err(e) = confine_thread(role, mode) {
                    error!("{n}: {e}");
                    FAILURE.store(1, Ordering::SeqCst);
                    signals::request_termination();
                    return;
                }
            }
            if let Err(e) = f() {
                error!("{n}: {e}; stopping");
                FAILURE.store(1, Ordering::SeqCst);
                signals::request_termination();
            }
        })
        .map(|_| ())
        .map_err(|e| Error::Runtime(format!("cannot start the {name} thread: {e}")))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
