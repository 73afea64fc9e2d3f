//! Validated configuration: command-line arguments (and the TOML file) turned into something
//! that can be served. Every check that can fail on user input happens here, before anything
//! is bound or spawned, and each failure is one sentence that names the option.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ferry_net::ports::SocketSpec;
use ferry_net::proxy::{Bypass, Secret, Settings as ProxySettings, Upstream};
use ferry_net::rules::{RuleSpec, MAX_RULES};
use ferry_net::stack::DnsSource;
use ferry_net::{NetConfig, PortSpec, Subnet, DEFAULT_MTU, DEFAULT_SUBNET, DEFAULT_SUBNET6};
use serde::Deserialize;

use crate::cli::{RunArgs, SandboxArgs, ServeArgs};
use crate::sandbox::SandboxConfig;

mod share;
use share::{check_share, parse_share, FileShare};
pub(crate) use share::{parse_id_maps, parse_xattr_map};
pub use share::{ShareConfig, DEFAULT_POLL_US, MAX_POLL_US, MAX_THREADS};

/// The longest virtio-fs tag (the config space holds 36 bytes).
const MAX_TAG_LEN: usize = ferry_devices::vhu_fs::MAX_TAG_LEN;
/// The longest path a UNIX socket address holds.
const MAX_SOCKET_PATH: usize = 107;

/// Why ferry stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option has a bad or missing value. Exit code 2, as for clap's own errors.
    #[error("{0}")]
    Usage(String),
    /// Something failed while running. Exit code 1.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) => ExitCode::from(2),
            Error::Runtime(_) => ExitCode::from(1),
        }
    }
}

/// Crate result type.
pub type Result<T> = std::result::Result<T, Error>;

/// The proxy settings ferry's environment gives (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`),
/// as the host's own setting when no `--proxy-upstream` is given; an unusable value is
/// warned about and left out, since it is the host's, not a mistake in ferry's options.
pub fn proxy_from_env() -> ProxySettings {
    match ProxySettings::from_env() {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            log::warn!("proxy: ignoring {e}; give --proxy-upstream to choose the upstream instead");
            ProxySettings::default()
        }
    }
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// What `ferry serve` serves.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The virtio-net socket, if a net device is served.
    pub net_socket: Option<PathBuf>,
    /// Connect to `net_socket` (the frontend listens) instead of listening on it.
    pub net_client: bool,
    /// The network plan.
    pub net: NetConfig,
    /// virtio-fs shares.
    pub shares: Vec<ShareConfig>,
    /// Where the DNS servers queries are forwarded to come from: `--dns-upstream`, or the
    /// resolv.conf (`--resolv-conf`, /etc/resolv.conf by default), followed as it changes.
    pub dns: DnsSource,
    /// The hosts file the gateway's DNS answers from (`--hosts-file`, /etc/hosts by default).
    pub hosts_file: PathBuf,
    /// Split DNS: (suffix, its server), from `--dns-zone`.
    pub dns_zones: Vec<(String, SocketAddr)>,
    /// Where the gateway's HTTP(S) proxy sends requests: `--proxy-upstream` and
    /// `--proxy-bypass`, or else ferry's environment (`HTTP_PROXY`, `HTTPS_PROXY`,
    /// `NO_PROXY`).
    pub proxy: ProxySettings,
    /// The upstream proxy's password (`--proxy-credentials FILE` or `FERRY_PROXY_PASSWORD`).
    pub proxy_secret: Option<Secret>,
    /// Transparent mode (`--proxy-transparent`): guest TCP to ports 80 and 443 goes through
    /// the proxy.
    pub proxy_transparent: bool,
    /// The PAC file (`--proxy-pac`), read.
    pub proxy_pac: Option<ferry_net::proxy::pac::PacSource>,
    /// Ports published from the start.
    pub publish: Vec<PortSpec>,
    /// Rules for the guest's flows and published ports' clients, in order.
    pub rules: Vec<RuleSpec>,
    /// The bind address of specs that name none (also for the API's).
    pub default_bind: IpAddr,
    /// The control API's socket.
    pub api_socket: Option<PathBuf>,
    /// Where `ferry portd` listens, for ports this process may not bind.
    pub portd_socket: PathBuf,
    /// `--pcap`: where to capture the guest's frames.
    pub pcap: Option<PathBuf>,
    /// The sandbox the devices run in.
    pub sandbox: SandboxConfig,
    /// Listening sockets a launcher handed over (`--fd`, `fd=`, systemd), by the path each is
    /// bound to: these are served as they are, not bound (see listen.rs).
    pub handed: HashMap<PathBuf, RawFd>,
    /// `--socket-group`: the group the sockets ferry binds are given to, with mode 0660.
    pub socket_group: Option<libc::gid_t>,
    /// `--runtime-shares`: folders shares may be added under while running.
    pub runtime_shares: Vec<PathBuf>,
    /// `--forward-socket`: host UNIX sockets whose clients go to guest ports.
    pub forward_sockets: Vec<SocketSpec>,
    /// `--audit-log`: where the audit log goes (None: only `/events` followers see events).
    pub audit_log: Option<ferry_audit::Sink>,
    /// `--audit-queue`: events waiting for the sink at most.
    pub audit_queue: usize,
}

impl ServeConfig {
    /// Whether ferry binds `path` itself (and removes it on exit): not a socket handed over,
    /// nor one a frontend listens on.
    pub fn binds(&self, path: &Path) -> bool {
        let client = (self.net_client && self.net_socket.as_deref() == Some(path))
            || self.shares.iter().any(|s| s.client && s.socket == path);
        !client && !self.handed.contains_key(path)
    }
}

/// Where `ferry portd` listens unless told otherwise.
pub const DEFAULT_PORTD_SOCKET: &str = "/run/ferry/portd.sock";
/// The hosts file the gateway's DNS answers from.
pub const DEFAULT_HOSTS_FILE: &str = "/etc/hosts";
/// The resolv.conf whose nameservers DNS goes to, unless `--dns-upstream` names them.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// The TOML file's shape: the long option names as keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    net_socket: Option<PathBuf>,
    #[serde(default)]
    share: Vec<FileShare>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    rule: Vec<String>,
    #[serde(default)]
    dns_zone: Vec<String>,
    default_bind: Option<String>,
    api_socket: Option<PathBuf>,
    portd_socket: Option<PathBuf>,
    subnet: Option<String>,
    subnet6: Option<String>,
    mtu: Option<u32>,
    max_connections: Option<usize>,
    guest_mac: Option<String>,
    dns_upstream: Option<String>,
    resolv_conf: Option<PathBuf>,
    hosts_file: Option<PathBuf>,
    proxy_upstream: Option<String>,
    proxy_bypass: Option<String>,
    proxy_credentials: Option<PathBuf>,
    proxy_transparent: Option<bool>,
    proxy_pac: Option<String>,
    pcap: Option<PathBuf>,
    sandbox: Option<String>,
    seccomp: Option<String>,
    socket_group: Option<String>,
    #[serde(default)]
    runtime_shares: Vec<PathBuf>,
    audit_log: Option<String>,
    audit_queue: Option<usize>,
    #[serde(default)]
    forward_socket: Vec<String>,
    #[serde(default)]
    guest_forward: Vec<String>,
}

fn load_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        usage(format!(
            "--config {}: cannot read it ({e}); check the path",
            path.display()
        ))
    })?;
    toml::from_str(&text).map_err(|e| {
        usage(format!(
            "--config {}: {}; fix the file",
            path.display(),
            e.message()
        ))
    })
}

/// The folder `path` is in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Checks that a capture file can be made at `path`.
fn check_pcap_path(path: &Path) -> Result<()> {
    let parent = parent_dir(path);
    if !parent.is_dir() || path.is_dir() {
        return Err(usage(format!(
            "--pcap {}: the folder {} does not exist or the path is a folder; give a file path in an existing folder",
            path.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// Checks that a UNIX socket can be created at `path`.
fn check_socket_path(option: &str, path: &Path) -> Result<()> {
    let shown = path.display();
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(usage(format!(
            "{option} {shown}: the path is longer than the {MAX_SOCKET_PATH} bytes a UNIX socket address holds; use a shorter one"
        )));
    }
    let parent = parent_dir(path);
    if !parent.is_dir() {
        return Err(usage(format!(
            "{option} {shown}: the folder {} does not exist; create it or choose another path",
            parent.display()
        )));
    }
    if path.is_dir() {
        return Err(usage(format!(
            "{option} {shown}: that is a directory; give a file path for the socket"
        )));
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff` as six bytes.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn parse_dns_upstream(s: &str) -> Result<SocketAddr> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| {
            usage(format!(
                "--dns-upstream {s}: not an IP address or IP:PORT; for example 10.0.0.53 or 10.0.0.53:5353 (several: 10.0.0.53,10.0.0.54)"
            ))
        })
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = Error;

    fn try_from(args: ServeArgs) -> Result<Self> {
        let file = match &args.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let subnet_s = args
            .subnet
            .or(file.subnet)
            .unwrap_or_else(|| DEFAULT_SUBNET.to_string());
        let subnet: Subnet = subnet_s.parse().map_err(|e| usage(format!("{e}")))?;
        let mtu = args.mtu.or(file.mtu).unwrap_or(u32::from(DEFAULT_MTU));
        let mut net = NetConfig::new(subnet, mtu).map_err(|e| usage(e.to_string()))?;
        net.subnet6 = match args.subnet6.or(file.subnet6).as_deref() {
            Some("off") => None,
            Some(s) => Some(s.parse().map_err(|e| usage(format!("{e}")))?),
            None => Some(DEFAULT_SUBNET6.parse().map_err(|e| usage(format!("{e}")))?),
        };
        if let Some(n) = args.max_connections.or(file.max_connections) {
            if n == 0 {
                return Err(usage(
                    "--max-connections 0: the guest could open no connection; give at least 1",
                ));
            }
            net.max_connections = n;
        }
        if let Some(m) = args.guest_mac.or(file.guest_mac) {
            net.guest_mac = parse_mac(&m).ok_or_else(|| {
                usage(format!(
                    "--guest-mac {m}: not a MAC; give six hex bytes such as 52:54:00:12:34:56"
                ))
            })?;
            if net.guest_mac[0] & 1 != 0 {
                return Err(usage(format!(
                    "--guest-mac {m}: a multicast address cannot be a NIC's; clear the lowest bit of the first byte"
                )));
            }
            net.guest_mac_pinned = true;
        }

        // Sockets handed over by systemd first: fds 3 and up are theirs until adopted.
        let mut handed = crate::listen::from_systemd()?;
        let net_client = args.net_client.is_some();
        let mut net_socket = args.net_client.or(args.net_socket).or(file.net_socket);
        if let Some(fd) = args.fd {
            let path = crate::listen::adopt(&format!("--fd {fd}"), fd)?;
            if let Some(p) = net_socket.as_ref().filter(|p| **p != path) {
                return Err(usage(format!(
                    "--fd {fd} is bound to {}, not to --net-socket {}; give one of the two",
                    path.display(),
                    p.display()
                )));
            }
            handed.insert(path.clone(), fd);
            net_socket = Some(path);
        }
        if let Some(p) = net_socket
            .as_ref()
            .filter(|p| !handed.contains_key(*p) && !net_client)
        {
            check_socket_path("--net-socket", p)?;
        }

        let mut shares = Vec::new();
        for s in file.share {
            shares.push(ShareConfig::try_from(s)?);
        }
        for spec in &args.share {
            shares.push(parse_share(spec, &mut handed)?);
        }
        let mut tags = HashSet::new();
        let mut sockets: HashSet<&Path> = net_socket.iter().map(|p| p.as_path()).collect();
        for s in &shares {
            check_share(s, &handed)?;
            if !tags.insert(s.tag.as_str()) {
                return Err(usage(format!(
                    "--share tag={}: the tag is used twice; give each share its own tag",
                    s.tag
                )));
            }
            if !sockets.insert(&s.socket) {
                return Err(usage(format!(
                    "--share tag={}: socket {} is already used by another device; give each device its own socket",
                    s.tag,
                    s.socket.display()
                )));
            }
        }
        let runtime_wanted = !args.runtime_shares.is_empty() || !file.runtime_shares.is_empty();
        if net_socket.is_none() && shares.is_empty() && !runtime_wanted {
            return Err(usage(
                "nothing to serve: give --net-socket PATH, --share tag=TAG,dir=DIR,socket=PATH, or --runtime-shares DIR with --api-socket PATH",
            ));
        }

        let default_bind = match args.default_bind.or(file.default_bind) {
            Some(s) => s.parse::<IpAddr>().map_err(|_| {
                usage(format!(
                    "--default-bind {s}: not an IP address; for example 127.0.0.1"
                ))
            })?,
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let mut publish = Vec::new();
        for spec in file.publish.iter().chain(&args.publish) {
            publish.extend(
                PortSpec::parse_many_with_default(spec, default_bind)
                    .map_err(|e| usage(e.to_string()))?,
            );
        }
        let mut rules = Vec::new();
        for spec in &file.rule {
            rules.push(spec.parse::<RuleSpec>().map_err(|e| {
                usage(format!(
                    "--config {}: {e}",
                    args.config.as_deref().unwrap_or(Path::new("")).display()
                ))
            })?);
        }
        for spec in &args.rule {
            rules.push(
                spec.parse::<RuleSpec>()
                    .map_err(|e| usage(format!("--{e}")))?,
            );
        }
        if rules.len() > MAX_RULES {
            return Err(usage(format!(
                "--rule: {} rules given, more than the {MAX_RULES} allowed; merge some",
                rules.len()
            )));
        }
        if let (Some(r), None) = (rules.first(), &net_socket) {
            return Err(usage(format!(
                "--rule {r}: rules apply to the guest's network; give --net-socket PATH too"
            )));
        }
        let api_socket = args.api_socket.or(file.api_socket);
        if let Some(p) = &api_socket {
            check_socket_path("--api-socket", p)?;
        }
        let dns = match args.dns_upstream.or(file.dns_upstream) {
            Some(s) => DnsSource::Servers(
                s.split(',')
                    .map(|a| parse_dns_upstream(a.trim()))
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => DnsSource::ResolvConf(
                args.resolv_conf
                    .or(file.resolv_conf)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_RESOLV_CONF)),
            ),
        };

        let proxy_upstream = args.proxy_upstream.or(file.proxy_upstream);
        if let (Some(u), None) = (&proxy_upstream, &net_socket) {
            return Err(usage(format!(
                "--proxy-upstream {u}: the proxy serves the guest's network; give --net-socket PATH too"
            )));
        }
        let mut proxy = match proxy_upstream.as_deref() {
            Some("none") => ProxySettings::default(),
            Some(s) => ProxySettings::with_upstream(Some(
                s.parse::<Upstream>()
                    .map_err(|e| usage(format!("--proxy-upstream: {e}")))?,
            )),
            None => proxy_from_env(),
        };
        if let Some(b) = args.proxy_bypass.or(file.proxy_bypass) {
            proxy.bypass = b
                .parse::<Bypass>()
                .map_err(|e| usage(format!("--proxy-bypass: {e}")))?;
        }
        // The file is read now, before the sandbox; its script starts with the devices, on
        // a sandboxed thread.
        let proxy_pac = match args.proxy_pac.or(file.proxy_pac) {
            Some(spec) => Some(
                ferry_net::proxy::pac::PacSource::read(&spec)
                    .map_err(|e| usage(format!("--proxy-pac: {e}")))?,
            ),
            None => None,
        };
        let proxy_secret =
            Secret::load(args.proxy_credentials.or(file.proxy_credentials).as_deref())
                .map_err(|e| usage(format!("--proxy-credentials: {e}")))?;

        if let (Some(p), None) = (publish.first(), &net_socket) {
            return Err(usage(format!(
                "--publish {p}: published ports go to the guest's network; give --net-socket PATH too"
            )));
        }
        let portd_socket = args
            .portd_socket
            .or(file.portd_socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PORTD_SOCKET));
        // Only its length: the helper's folder exists only where the helper runs, and it is
        // asked for only when a port needs it.
        if portd_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(usage(format!(
                "--portd-socket {}: the path is longer than the {MAX_SOCKET_PATH} bytes a UNIX socket address holds; use a shorter one",
                portd_socket.display()
            )));
        }

        let pcap = args.pcap.or(file.pcap);
        if let Some(p) = &pcap {
            if net_socket.is_none() {
                return Err(usage(format!(
                    "--pcap {}: the capture records the guest's network; give --net-socket PATH too",
                    p.display()
                )));
            }
            check_pcap_path(p)?;
        }
        // A handed-over socket no device names would be left unserved without a word.
        let named: HashSet<&Path> = net_socket
            .iter()
            .map(|p| p.as_path())
            .chain(shares.iter().map(|s| s.socket.as_path()))
            .collect();
        if let Some(p) = handed.keys().find(|p| !named.contains(p.as_path())) {
            return Err(usage(format!(
                "a socket handed over by the launcher is bound to {}, which no device names; give it as --net-socket or a share's socket=",
                p.display()
            )));
        }
        let mut runtime_shares = file.runtime_shares;
        runtime_shares.extend(args.runtime_shares);
        for d in &runtime_shares {
            if !d.is_dir() {
                return Err(usage(format!(
                    "--runtime-shares {}: not a folder; create it or name another",
                    d.display()
                )));
            }
        }
        if !runtime_shares.is_empty() && api_socket.is_none() {
            return Err(usage(
                "--runtime-shares: shares are added through the control API; give --api-socket PATH too",
            ));
        }
        let socket_group = args
            .socket_group
            .or(file.socket_group)
            .map(|g| crate::listen::parse_group("--socket-group", &g).map_err(usage))
            .transpose()?;
        let forward_sockets = forwards(&file.forward_socket, &args.forward_socket)?;
        let audit_log = args.audit_log.or(file.audit_log);
        let audit_queue = args
            .audit_queue
            .or(file.audit_queue)
            .unwrap_or(ferry_audit::QUEUE_EVENTS);
        if !ferry_audit::QUEUE_RANGE.contains(&audit_queue) {
            return Err(usage(format!(
                "--audit-queue {audit_queue}: give between {} and {} events",
                ferry_audit::QUEUE_RANGE.start(),
                ferry_audit::QUEUE_RANGE.end()
            )));
        }
        if let (Some(s), None, None) = (
            shares.iter().find(|s| s.audit_files),
            &audit_log,
            &api_socket,
        ) {
            return Err(usage(format!(
                "--share tag={}: audit=files sends file events to the audit log; give --audit-log FILE (or --api-socket PATH to follow them with `ferry ctl events`)",
                s.tag
            )));
        }
        if let (Some(f), None) = (forward_sockets.first(), &net_socket) {
            return Err(usage(format!(
                "--forward-socket {f}: the socket's clients go to the guest's network; give --net-socket PATH too"
            )));
        }
        for g in file.guest_forward.iter().chain(&args.guest_forward) {
            net.guest_forwards.push(
                g.parse()
                    .map_err(|e| usage(format!("--guest-forward {e}")))?,
            );
        }
        ferry_net::guest_forward::check(&net, &net.guest_forwards).map_err(usage)?;
        if let (Some(f), None) = (net.guest_forwards.first(), &net_socket) {
            return Err(usage(format!(
                "--guest-forward {f}: the address is on the guest's network; give --net-socket PATH too"
            )));
        }
        let sandbox = SandboxConfig::from_args(&SandboxArgs {
            sandbox: args.sandbox.sandbox.or(file.sandbox),
            seccomp: args.sandbox.seccomp.or(file.seccomp),
        })
        .map_err(usage)?;

        let mut dns_zones = Vec::new();
        for z in file.dns_zone.iter().chain(&args.dns_zone) {
            let bad = || {
                usage(format!(
                    "--dns-zone {z}: expected SUFFIX=SERVER, a DNS name and an IP or IP:PORT, for example corp.example=10.8.0.53"
                ))
            };
            let (suffix, server) = z.split_once('=').ok_or_else(bad)?;
            let suffix = ferry_net::names::normalize(suffix).ok_or_else(bad)?;
            let server = parse_dns_upstream(server.trim()).map_err(|_| bad())?;
            dns_zones.push((suffix, server));
        }
        let hosts_file = args
            .hosts_file
            .or(file.hosts_file)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_HOSTS_FILE));
        Ok(ServeConfig {
            net_socket,
            net_client,
            net,
            shares,
            dns,
            hosts_file,
            dns_zones,
            proxy,
            proxy_secret,
            proxy_pac,
            proxy_transparent: args.proxy_transparent || file.proxy_transparent.unwrap_or(false),
            publish,
            rules,
            default_bind,
            api_socket,
            portd_socket,
            pcap,
            sandbox,
            handed,
            socket_group,
            runtime_shares,
            forward_sockets,
            audit_log: audit_log
                .map(|s| s.parse::<ferry_audit::Sink>())
                .transpose()
                .map_err(usage)?,
            audit_queue,
        })
    }
}

/// The `--forward-socket` specs of the file and the command line, checked: each path once,
/// no two on one path.
fn forwards(file: &[String], args: &[String]) -> Result<Vec<SocketSpec>> {
    let mut out: Vec<SocketSpec> = Vec::new();
    for s in file.iter().chain(args) {
        let spec = SocketSpec::parse(s, |g| crate::listen::parse_group("group=", g))
            .map_err(|e| usage(format!("--forward-socket {e}")))?;
        if out.iter().any(|o| o.path == spec.path) {
            return Err(usage(format!(
                "--forward-socket {s}: {} is forwarded twice; give each socket once",
                spec.path.display()
            )));
        }
        if spec.path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(usage(format!(
                "--forward-socket {s}: the path is longer than the {MAX_SOCKET_PATH} bytes a UNIX socket address holds; use a shorter one"
            )));
        }
        out.push(spec);
    }
    Ok(out)
}

/// What `ferry run` runs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The host directories to share.
    pub shares: Vec<PathBuf>,
    /// The guest's script.
    pub script: Option<PathBuf>,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// Guest memory in MiB.
    pub memory: u32,
    /// Extra QEMU arguments.
    pub qemu_args: Vec<String>,
    /// Ports published to the guest.
    pub publish: Vec<PortSpec>,
    /// Rules for the guest's flows and published ports' clients.
    pub rules: Vec<RuleSpec>,
    /// Where to capture the guest's frames.
    pub pcap: Option<PathBuf>,
    /// The devices' sandbox.
    pub sandbox: SandboxConfig,
}

/// Where `make guest-image` puts the guest: beside the binary's workspace, or as configured.
fn guest_image_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_GUEST_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-image/out"))
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = Error;

    fn try_from(a: RunArgs) -> Result<Self> {
        let publish = a
            .publish
            .iter()
            .map(|p| p.parse::<PortSpec>().map_err(|e| usage(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let rules = a
            .rule
            .iter()
            .map(|r| r.parse::<RuleSpec>().map_err(|e| usage(format!("--{e}"))))
            .collect::<Result<Vec<_>>>()?;
        if let Some(p) = &a.pcap {
            check_pcap_path(p)?;
        }
        for d in &a.share {
            if !d.is_dir() {
                return Err(usage(format!(
                    "--share {}: not an existing directory; create it or share another one",
                    d.display()
                )));
            }
        }
        let guest = guest_image_dir();
        let find = |opt: &str, given: Option<PathBuf>, name: &str| -> Result<PathBuf> {
            let p = given.unwrap_or_else(|| guest.join(name));
            if p.is_file() {
                Ok(p)
            } else {
                Err(usage(format!(
                    "{opt} {}: no such file; build the guest with `make guest-image` or pass {opt}",
                    p.display()
                )))
            }
        };
        if let Some(s) = &a.script {
            if !s.is_file() {
                return Err(usage(format!(
                    "--script {}: no such file; check the path",
                    s.display()
                )));
            }
        }
        if !(64..=65536).contains(&a.memory) {
            return Err(usage(format!(
                "--memory {}: give between 64 and 65536 MiB",
                a.memory
            )));
        }
        Ok(RunConfig {
            kernel: find("--kernel", a.kernel, "vmlinuz")?,
            initrd: find("--initrd", a.initrd, "initramfs.cpio.gz")?,
            shares: a.share,
            script: a.script,
            memory: a.memory,
            qemu_args: a.qemu_args,
            publish,
            rules,
            pcap: a.pcap,
            sandbox: SandboxConfig::from_args(&a.sandbox)
                .and_then(|s| {
                    s.without_namespace(
                        "ferry run",
                        "QEMU, which it starts, must stay outside them",
                    )
                })
                .map_err(usage)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_fs::{CachePolicy, IdMaps};

    fn args() -> ServeArgs {
        ServeArgs {
            config: None,
            net_socket: None,
            net_client: None,
            fd: None,
            socket_group: None,
            runtime_shares: vec![],
            print_capabilities: false,
            share: vec![],
            publish: vec![],
            forward_socket: vec![],
            guest_forward: vec![],
            audit_log: None,
            audit_queue: None,
            rule: vec![],
            default_bind: None,
            api_socket: None,
            portd_socket: None,
            subnet: None,
            subnet6: None,
            mtu: None,
            max_connections: None,
            guest_mac: None,
            dns_upstream: None,
            resolv_conf: None,
            hosts_file: None,
            dns_zone: vec![],
            proxy_upstream: None,
            proxy_bypass: None,
            proxy_credentials: None,
            proxy_transparent: false,
            proxy_pac: None,
            pcap: None,
            sandbox: Default::default(),
        }
    }

    fn err(a: ServeArgs) -> String {
        match ServeConfig::try_from(a) {
            Err(Error::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.net_socket = Some(dir.path().join("net.sock"));
        let c = ServeConfig::try_from(a).unwrap();
        assert_eq!(c.net, NetConfig::default());
        assert_eq!(c.dns, DnsSource::ResolvConf(DEFAULT_RESOLV_CONF.into()));
    }

    #[test]
    fn share_spec_parses_all_parts() {
        let s = parse_share(
            "tag=t,dir=/tmp,socket=/tmp/s,readonly,cache=never",
            &mut HashMap::new(),
        )
        .unwrap();
        assert_eq!(s.tag, "t");
        assert!(s.readonly);
        assert_eq!(s.cache, CachePolicy::Never);
        assert!(parse_share("tag=t,dir=/tmp", &mut HashMap::new())
            .unwrap_err()
            .to_string()
            .contains("socket="));
        assert!(
            parse_share("tag=t,dir=/tmp,socket=/s,color=red", &mut HashMap::new())
                .unwrap_err()
                .to_string()
                .contains("unknown part 'color=red'")
        );
        let s = parse_share(
            "tag=t,dir=/tmp,socket=/s,uidmap=0:1000,gidmap=0:100:5",
            &mut HashMap::new(),
        )
        .unwrap();
        let text = |m: &IdMaps| m.ranges().iter().map(|r| r.to_string()).collect::<Vec<_>>();
        assert_eq!(text(&s.uidmap), ["0:1000:1"]);
        assert_eq!(text(&s.gidmap), ["0:100:5"]);
        // Given again, a key adds a range; ranges that overlap are refused.
        let s = parse_share(
            "tag=t,dir=/tmp,socket=/s,uidmap=0:1000,uidmap=1:100000:65536",
            &mut HashMap::new(),
        )
        .unwrap();
        assert_eq!(text(&s.uidmap), ["0:1000:1", "1:100000:65536"]);
        assert!(text(&s.gidmap).is_empty());
        let e = parse_share(
            "tag=t,dir=/tmp,socket=/s,gidmap=0:100:5,gidmap=4:200",
            &mut HashMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--share tag=t,dir=/tmp,socket=/s,gidmap=0:100:5,gidmap=4:200: gidmap: 0:100:5 and 4:200:1 both map guest ids 4 to 4; give ranges that do not overlap"),
            "{e}"
        );
        let e = parse_share("tag=t,dir=/tmp,socket=/s,uidmap=1000", &mut HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "uidmap=1000: expected GUEST:HOST or GUEST:HOST:COUNT; for example uidmap=0:1000"
            ),
            "{e}"
        );
    }

    #[test]
    fn share_poll_defaults_and_takes_microseconds() {
        let spec = |extra: &str| {
            parse_share(
                &format!("tag=t,dir=/tmp,socket=/s{extra}"),
                &mut HashMap::new(),
            )
        };
        assert_eq!(spec("").unwrap().poll_us, DEFAULT_POLL_US);
        assert_eq!(spec(",poll=0").unwrap().poll_us, 0);
        assert_eq!(spec(",poll=200").unwrap().poll_us, 200);
        let e = spec(",poll=fast").unwrap_err().to_string();
        assert!(e.contains("poll=fast: not a number of microseconds"), "{e}");
        let s = spec(",poll=20000").unwrap();
        let e = share::check_share(&s, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("poll=20000: the worker watches for at most 10000 µs"),
            "{e}"
        );
    }

    #[test]
    fn share_xattrmap_rules_parse_and_bad_ones_say_what_to_give() {
        let s = parse_share(
            "tag=t,dir=/tmp,socket=/s,xattrmap=security.:user.virtiofs.security.",
            &mut HashMap::new(),
        )
        .unwrap();
        assert_eq!(
            s.xattrmap.to_host(b"security.selinux"),
            ferry_fs::passthrough::HostName::Mapped(b"user.virtiofs.security.selinux".to_vec())
        );
        let e = parse_share(
            "tag=t,dir=/tmp,socket=/s,xattrmap=security.:trusted.x.",
            &mut HashMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("the host prefix must start with user."), "{e}");
        let s = parse_share(
            "tag=t,dir=/tmp,socket=/s,noxattr,xattrmap=security.:user.v.",
            &mut HashMap::new(),
        )
        .unwrap();
        let e = check_share(&s, &HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("leave one of them out"), "{e}");
        let s = parse_share(
            "tag=t,dir=/tmp,socket=/s,noxattr,posixacl",
            &mut HashMap::new(),
        )
        .unwrap();
        assert!(s.posixacl);
        let e = check_share(&s, &HashMap::new()).unwrap_err().to_string();
        assert!(
            e.contains("posixacl keeps ACLs in extended attributes"),
            "{e}"
        );
        let s = parse_share("tag=t,dir=/tmp,socket=/s,seclabel", &mut HashMap::new()).unwrap();
        let e = check_share(&s, &HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("add xattrmap=security.:user."), "{e}");
        let s = parse_share(
            "tag=t,dir=/tmp,socket=/s,seclabel,xattrmap=security.:user.virtiofs.security.",
            &mut HashMap::new(),
        )
        .unwrap();
        assert!(s.seclabel);
        check_share(&s, &HashMap::new()).unwrap();
    }

    #[test]
    fn bad_values_name_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("n.sock");
        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.subnet = Some("300.1.1.0/24".into());
        assert!(err(a).starts_with("--subnet 300.1.1.0/24"));

        let mut a = args();
        a.net_socket = Some("/nonexistent/dir/n.sock".into());
        assert!(err(a).contains("folder /nonexistent/dir does not exist"));

        let mut a = args();
        a.share = vec![format!("tag=t,dir=/nonexistent,socket={}", sock.display())];
        assert!(err(a).contains("dir /nonexistent does not exist"));

        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.mtu = Some(10);
        assert!(err(a).starts_with("--mtu 10"));

        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.dns_upstream = Some("resolver".into());
        assert!(err(a).starts_with("--dns-upstream resolver"));

        // Forwarding: each needs the net device, and says what is wrong with a spec.
        let mut a = args();
        a.share = vec![format!("tag=t,dir=/tmp,socket={}", sock.display())];
        a.forward_socket = vec!["/run/x/docker.sock=2375".into()];
        assert!(err(a).contains("give --net-socket PATH too"));
        let mut a = args();
        a.share = vec![format!("tag=t,dir=/tmp,socket={}", sock.display())];
        a.guest_forward = vec!["192.168.127.100:22=unix:/run/agent.sock".into()];
        assert!(err(a).contains("give --net-socket PATH too"));
        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.forward_socket = vec!["/run/x/a.sock=22".into(), "/run/x/a.sock=23".into()];
        assert!(err(a).contains("forwarded twice"));
        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.forward_socket = vec!["/run/x/a.sock=22,group=no-such-group-here".into()];
        assert!(err(a).contains("no such group"));
        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.guest_forward = vec!["192.168.127.1:53=tcp:127.0.0.1:53".into()];
        assert!(err(a).contains("the gateway's"));
        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.forward_socket = vec!["/run/x/d.sock=2375,mode=0660,group=0".into()];
        a.guest_forward = vec!["10.9.9.9:22=unix:/run/agent.sock".into()];
        let c = ServeConfig::try_from(a).unwrap();
        assert_eq!(
            c.forward_sockets[0].to_string(),
            "/run/x/d.sock=2375,mode=0660,group=0"
        );
        assert_eq!(c.net.guest_forwards.len(), 1);

        for bad in ["corp.example", "corp.example=server", "-bad=10.0.0.1"] {
            let mut a = args();
            a.net_socket = Some(sock.clone());
            a.dns_zone = vec![bad.into()];
            assert!(err(a).starts_with(&format!("--dns-zone {bad}: expected SUFFIX=SERVER")));
        }
        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.dns_zone = vec!["Corp.Example.=10.8.0.53".into()];
        a.dns_upstream = Some("10.0.0.53, [2001:db8::53]:5353".into());
        let c = ServeConfig::try_from(a).unwrap();
        assert_eq!(
            c.dns_zones,
            vec![("corp.example".into(), "10.8.0.53:53".parse().unwrap())]
        );
        assert_eq!(
            c.dns,
            DnsSource::Servers(vec![
                "10.0.0.53:53".parse().unwrap(),
                "[2001:db8::53]:5353".parse().unwrap()
            ])
        );

        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.proxy_upstream = Some("socks5://proxy:3128".into());
        assert!(err(a).starts_with("--proxy-upstream: bad upstream proxy \"socks5://proxy:3128\""));

        let mut a = args();
        a.share = vec![format!("tag=t,dir=/tmp,socket={}", sock.display())];
        a.proxy_upstream = Some("http://proxy:3128".into());
        assert!(err(a).contains("give --net-socket PATH too"));

        let mut a = args();
        a.net_socket = Some(sock.clone());
        a.rule = vec!["reject,proto=tcp,to=10.0.0.1/8".into()];
        let e = err(a);
        assert!(
            e.starts_with("--rule reject,proto=tcp,to=10.0.0.1/8: to=10.0.0.1/8: host bits are set; use 10.0.0.0/8"),
            "{e}"
        );

        let mut a = args();
        a.share = vec![format!("tag=t,dir=/tmp,socket={}", sock.display())];
        a.rule = vec!["drop".into()];
        assert!(err(a).contains("give --net-socket PATH too"));

        assert!(err(args()).starts_with("nothing to serve"));
    }

    #[test]
    fn rules_come_from_the_file_then_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let file = dir.path().join("ferry.toml");
        std::fs::write(
            &file,
            format!("net-socket = \"{d}/net.sock\"\nrule = [\"reject,proto=tcp,to=10.0.0.0/8\"]\n"),
        )
        .unwrap();
        let mut a = args();
        a.config = Some(file);
        a.rule = vec!["drop,proto=udp,port=53".into()];
        let c = ServeConfig::try_from(a).unwrap();
        let shown: Vec<String> = c.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            ["reject,proto=tcp,to=10.0.0.0/8", "drop,proto=udp,port=53"]
        );
    }

    #[test]
    fn duplicate_tags_and_sockets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let mut a = args();
        a.share = vec![
            format!("tag=a,dir={d},socket={d}/1.sock"),
            format!("tag=a,dir={d},socket={d}/2.sock"),
        ];
        assert!(err(a).contains("used twice"));
        let mut a = args();
        a.net_socket = Some(dir.path().join("1.sock"));
        a.share = vec![format!("tag=a,dir={d},socket={d}/1.sock")];
        assert!(err(a).contains("already used"));
    }

    #[test]
    fn guest_mac_pins_one_or_says_what_it_takes() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.net_socket = Some(dir.path().join("n.sock"));
        a.guest_mac = Some("52:54:00:AB:cd:01".into());
        let c = ServeConfig::try_from(a).unwrap();
        assert_eq!(c.net.guest_mac, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]);
        assert!(c.net.guest_mac_pinned);
        for (bad, says) in [
            ("52:54:00:ab:cd", "not a MAC"),
            ("52:54:00:ab:cd:01:02", "not a MAC"),
            ("52-54-00-ab-cd-01", "not a MAC"),
            ("52:54:00:ab:cd:0g", "not a MAC"),
            ("01:00:5e:00:00:01", "multicast"),
        ] {
            let mut a = args();
            a.net_socket = Some(dir.path().join("n.sock"));
            a.guest_mac = Some(bad.into());
            let e = err(a);
            assert!(e.contains(says), "{bad}: {e}");
        }
        let mut a = args();
        a.net_socket = Some(dir.path().join("n.sock"));
        assert!(!ServeConfig::try_from(a).unwrap().net.guest_mac_pinned);
    }

    #[test]
    fn toml_file_is_read_and_overridden() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let file = dir.path().join("ferry.toml");
        std::fs::write(
            &file,
            format!(
                "net-socket = \"{d}/n.sock\"\nsubnet = \"10.9.0.0/24\"\nmtu = 1500\n\
                 [[share]]\ntag = \"src\"\ndir = \"{d}\"\nsocket = \"{d}/fs.sock\"\nreadonly = true\n"
            ),
        )
        .unwrap();
        let mut a = args();
        a.config = Some(file.clone());
        a.mtu = Some(9000);
        let c = ServeConfig::try_from(a).unwrap();
        assert_eq!(c.net.subnet.to_string(), "10.9.0.0/24");
        assert_eq!(c.net.mtu, 9000);
        assert_eq!(c.shares.len(), 1);
        assert!(c.shares[0].readonly);

        std::fs::write(&file, "colour = 1\n").unwrap();
        let mut a = args();
        a.config = Some(file);
        assert!(err(a).contains("unknown field"));
    }

    #[test]
    fn toml_id_maps_are_one_range_or_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let file = dir.path().join("ferry.toml");
        let share = |maps: &str| {
            format!("[[share]]\ntag = \"s\"\ndir = \"{d}\"\nsocket = \"{d}/fs.sock\"\n{maps}\n")
        };
        let load = |maps: &str| {
            std::fs::write(&file, share(maps)).unwrap();
            let mut a = args();
            a.config = Some(file.clone());
            ServeConfig::try_from(a).map(|c| {
                let s = &c.shares[0];
                let text = |m: &IdMaps| m.ranges().iter().map(|r| r.to_string()).collect();
                (text(&s.uidmap), text(&s.gidmap))
            })
        };
        let (u, g): (Vec<String>, Vec<String>) =
            load("uidmap = [\"0:1000\", \"1:100000:65536\"]\ngidmap = \"0:100\"").unwrap();
        assert_eq!(u, ["0:1000:1", "1:100000:65536"]);
        assert_eq!(g, ["0:100:1"]);
        let e = load("gidmap = 5").unwrap_err().to_string();
        assert!(
            e.contains("uidmap and gidmap take a range \"GUEST:HOST[:COUNT]\" or a list of them"),
            "{e}"
        );
        let e = load("uidmap = [\"0:1000:10\", \"9:2000\"]")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--share tag=s: uidmap: 0:1000:10 and 9:2000:1 both map guest ids 9 to 9"),
            "{e}"
        );
    }
}
