//! Command-line arguments, as clap parses them. Validation lives in `config`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Ferry: one host process that serves a VM's network (virtio-net) and file sharing (virtio-fs)
/// as vhost-user devices.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the devices on UNIX sockets until SIGTERM or SIGINT; QEMU or cloud-hypervisor
    /// attaches to them, and may disconnect and reconnect at will.
    Serve(Box<ServeArgs>),
    /// Serve the devices and boot the tiny guest under QEMU with them attached.
    Run(RunArgs),
    /// Serve DIR through the host's FUSE at MOUNTPOINT: the same file server the guest gets,
    /// for inspection and tests. Runs until SIGTERM or SIGINT, or until MOUNTPOINT is unmounted.
    Mount(MountArgs),
    /// Talk to a running ferry through its control API (--api-socket): list, publish and
    /// unpublish ports, set the proxy's upstream, change the rules, show counters.
    Ctl(CtlArgs),
    /// The privileged-port helper: run it as root so that an unprivileged ferry can publish
    /// host ports below net.ipv4.ip_unprivileged_port_start.
    Portd(PortdArgs),
    /// A virtiofsd-compatible front end for libvirt's <binary>: takes virtiofsd's options
    /// (-o source=DIR,… or --shared-dir DIR …, --fd=N), hands the share to the running
    /// `ferry serve` and stays until SIGTERM, when it removes it. `ferry virtiofsd --help`
    /// lists what it takes.
    #[command(disable_help_flag = true)]
    Virtiofsd(VirtiofsdArgs),
    /// Write the man pages (man) or a shell's completions (bash, zsh, fish) into DIR; for
    /// packagers.
    #[command(hide = true)]
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// man, bash, zsh or fish.
    pub what: String,
    /// Where the files go.
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct VirtiofsdArgs {
    /// virtiofsd's arguments, either syntax.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control API socket of the ferry to talk to.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,

    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Whether ferry answers, and whether a guest is attached.
    Health,
    /// The published ports and their counters.
    Ports,
    /// Publish a host port to a guest port: [tcp|udp/][BIND_IP:]HOST_PORT:GUEST_PORT (or a
    /// range onto a range, 8000-8010:9000-9010; a list, 3000,3001; exclusions, ~3002).
    Publish {
        /// What to publish.
        #[arg(value_name = "SPEC")]
        spec: String,
    },
    /// Unpublish a port: [tcp|udp/][BIND_IP:]HOST_PORT[:GUEST_PORT] (or a range or list of
    /// host ports, 8000-8010).
    Unpublish {
        /// What to unpublish.
        #[arg(value_name = "SPEC")]
        spec: String,
    },
    /// Net and fs counters, and the open flows.
    Stats,
    /// Follow the audit log's events as they happen (flows opened and closed, refusals,
    /// ports, the guest, proxy requests, file changes), one JSON object per line, until
    /// interrupted.
    Events {
        /// Stop after N events.
        #[arg(long, value_name = "N")]
        count: Option<usize>,
    },
    /// Capture the guest's link as it runs, in the libpcap format on stdout: `ferry ctl pcap
    /// --count 20 | tcpdump -r -`. Frames both ways, optionally of one protocol, address and
    /// port, until --count frames or --bytes bytes (256 MiB unless given) or interrupted.
    Pcap {
        /// Stop after N frames.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after N bytes of capture.
        #[arg(long, value_name = "N")]
        bytes: Option<u64>,
        /// Only tcp, udp, icmp or icmpv6.
        #[arg(long, value_name = "tcp|udp|icmp|icmpv6")]
        proto: Option<String>,
        /// Only frames to or from ADDR.
        #[arg(long, value_name = "ADDR")]
        host: Option<String>,
        /// Only TCP or UDP frames with this port at either end.
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        /// Keep at most N bytes of each frame [default: 65535].
        #[arg(long, value_name = "N")]
        snaplen: Option<u32>,
    },
    /// The NAT's flows, live, as `conntrack -L` lists the kernel's: both sides, ferry's host
    /// socket (fd and addresses, as `ss -tnpe` shows them), bytes each way, age, idle time and
    /// rule.
    Flows {
        /// Only tcp, udp or icmp flows.
        #[arg(long, value_name = "tcp|udp|icmp")]
        proto: Option<String>,
        /// Only flows with this port at either end.
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        /// Only flows whose remote (or ferry's peer) is in ADDR[/LEN].
        #[arg(long, value_name = "ADDR[/LEN]")]
        remote: Option<String>,
    },
    /// The rules for the guest's flows and published ports' clients with their counters, or
    /// add or delete one, or set the counters to 0.
    Rules {
        /// `add SPEC [--at N]`, `delete ID` or `zero`; nothing to list them.
        #[command(subcommand)]
        change: Option<RuleChange>,
    },
    /// The names the gateway's DNS answers from records set at run time (A and AAAA, before
    /// the hosts file and the upstream servers), or add or delete one.
    Dns {
        /// `add NAME ADDR` or `delete NAME`; nothing to list them.
        #[command(subcommand)]
        change: Option<DnsChange>,
    },
    /// The forwarded UNIX sockets (host socket to guest TCP port, --forward-socket) with
    /// their counters, or add or remove one.
    Sockets {
        /// `add HOST_PATH=GUEST_PORT[,mode=OCTAL][,group=GROUP]` or `remove HOST_PATH`;
        /// nothing to list them.
        #[command(subcommand)]
        change: Option<SocketChange>,
    },
    /// Show the HTTP(S) proxy on the gateway's port 3128, or set or clear its upstream.
    Proxy {
        /// `set URL` to send requests through the proxy at URL (http://[USER@]HOST:PORT, or https://...), `clear`
        /// to connect to servers directly; nothing to show where it stands.
        #[command(subcommand)]
        change: Option<ProxyChange>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DnsChange {
    /// Add ADDR (IPv4: an A record; IPv6: AAAA) to NAME; a name may have several.
    Add {
        /// The name, such as db.myapp.test.
        #[arg(value_name = "NAME")]
        name: String,
        /// Its address.
        #[arg(value_name = "ADDR")]
        addr: std::net::IpAddr,
    },
    /// Delete NAME's record, every address of it.
    #[command(alias = "del")]
    Delete {
        /// The name.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SocketChange {
    /// Forward a new host socket to a guest port (mode 0600 unless mode= says otherwise).
    Add {
        /// What to forward.
        #[arg(value_name = "HOST_PATH=GUEST_PORT[,mode=OCTAL][,group=GROUP]")]
        spec: String,
    },
    /// Stop forwarding a socket and remove its file; connections already open stay.
    #[command(alias = "rm", alias = "delete")]
    Remove {
        /// The socket's path.
        #[arg(value_name = "HOST_PATH")]
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum RuleChange {
    /// Add a rule: allow|reject|drop[,dir=out|in][,proto=tcp|udp|icmp][,to=ADDR[/LEN]][,from=ADDR[/LEN]][,port=N[-M]].
    /// Outbound rules (the default) match what the guest connects to; inbound ones (dir=in)
    /// match the clients of published ports (from=) and the published host port (port=).
    Add {
        /// The rule.
        #[arg(value_name = "SPEC")]
        spec: String,
        /// Where to put it, from 1 (the first checked); past the end is last [default: last].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
        at: Option<u64>,
    },
    /// Delete the rule with this id (the ID column of `ferry ctl rules`).
    #[command(alias = "del")]
    Delete {
        /// The rule's id.
        #[arg(value_name = "ID")]
        id: u64,
    },
    /// Set every rule's counters to 0, the default policies' too (as `iptables -Z`).
    Zero,
}

#[derive(Debug, Subcommand)]
pub enum ProxyChange {
    /// Send requests and tunnels through the proxy at URL (http://[USER@]HOST:PORT, or https://...).
    Set {
        /// The upstream proxy.
        #[arg(value_name = "URL")]
        url: String,
    },
    /// Connect to servers directly.
    Clear,
    /// Choose proxies with this PAC file (a path, or an http:// URL) from now on; `none` to
    /// stop.
    Pac {
        /// The PAC file or URL, or none.
        #[arg(value_name = "FILE|URL|none")]
        location: String,
    },
    /// Turn transparent mode on or off: the guest's TCP to ports 80 and 443 through the proxy.
    Transparent {
        /// on or off.
        #[arg(value_name = "on|off", value_parser = ["on", "off"])]
        mode: String,
    },
    /// Reach these servers directly whatever the upstream (NO_PROXY syntax; "" for none).
    Bypass {
        /// The list, e.g. "localhost,.corp.example,10.0.0.0/8".
        #[arg(value_name = "LIST")]
        list: String,
    },
}

#[derive(Debug, Args)]
pub struct PortdArgs {
    /// Listen on this UNIX socket [default: /run/ferry/portd.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// A user (name or uid) whose ferry may ask for ports (repeatable; at least one).
    #[arg(long, value_name = "UID")]
    pub allow_uid: Vec<String>,

    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Read options from a TOML file. Its keys are the long option names (net-socket, subnet,
    /// mtu, guest-mac, dns-upstream, proxy-upstream, api-socket, default-bind, pcap, sandbox, seccomp,
    /// socket-group; share, runtime-shares,
    /// publish and rule as arrays). Options given
    /// on the command line override scalars from the file and add to its lists.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,

    /// Serve a virtio-net device over vhost-user on this UNIX socket. A socket systemd hands
    /// over (LISTEN_FDS) that is bound to this path is served as it is.
    #[arg(long, value_name = "PATH")]
    pub net_socket: Option<PathBuf>,

    /// Connect to the frontend's socket at PATH for the virtio-net device (QEMU's chardev
    /// `server=on`, libvirt's `<source mode='server'>`) instead of listening, and connect again
    /// whenever the connection ends, so a running VM gets its NIC back when ferry restarts.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["net_socket", "fd"])]
    pub net_client: Option<PathBuf>,

    /// Serve the virtio-net device on this already-listening UNIX socket, inherited from the
    /// launcher (vhost-user's backend convention); instead of --net-socket.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,

    /// Let shares be added under DIR while ferry runs, through the control API (`ferry
    /// virtiofsd`, as libvirt starts it, does this); repeatable. The sandbox admits DIR from
    /// the start, since it cannot widen later.
    #[arg(long, value_name = "DIR")]
    pub runtime_shares: Vec<PathBuf>,

    /// Give the sockets ferry binds to this group, with mode 0660, so its members' QEMU can
    /// connect (as virtiofsd's --socket-group).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Print this backend's vhost-user capabilities as JSON ({"type":"net","features":[]})
    /// and exit, as vhost-user's backend conventions ask.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Serve DIR as a virtio-fs device with this tag on this UNIX socket (repeatable).
    /// Options: readonly (every write fails with EROFS), cache=never|metadata|auto|always
    /// (default auto), writeback (the guest caches writes), noxattr (extended attributes
    /// off, as virtiofsd without --xattr), trusted (owners, groups and set-id bits the guest
    /// sets reach the host files, as for a container's root file system; without it host
    /// files keep the share owner's ids and no set-id bits, and the guest's are kept in the
    /// user.containers.override_stat attribute it is shown), uidmap=GUEST:HOST[:COUNT] and
    /// gidmap= (ids the guest names differently: uidmap=0:1000 shows the host's 1000 as the
    /// guest's root; given again, each adds a range, as uidmap=0:1000,uidmap=1:100000:65536
    /// for a rootless engine's subordinate ids). fd=N instead of socket= serves a listening
    /// socket inherited from the launcher; client connects to socket= (the frontend listens
    /// there) and again after each disconnect, as --net-client; devices lets the guest make
    /// device nodes, for a container's root file system (needs root; off by default, since a
    /// device node in a shared folder opens the host's device); xattrmap=GUEST:HOST renames
    /// the guest's attributes under one prefix to the host's under another, as
    /// xattrmap=security.:user.virtiofs.security. for a guest that labels its files (SELinux)
    /// without privileges on the host (given again, each adds a rule); posixacl turns POSIX
    /// ACLs on (the guest's kernel enforces them; they are kept on the host files, named ids
    /// renamed by uidmap and gidmap); seclabel sets the label the guest's LSM (SELinux) gives
    /// each file and folder it makes as it is made, under the name xattrmap gives it (needs
    /// an xattrmap rule for security.); threads=N answers the share's requests on a pool of N
    /// threads, side by side (virtiofsd's --thread-pool-size; default 0, one at a time on
    /// the queue's thread); poll=US (default 200, the cap of KVM's halt polling; 0 for never) lets
    /// the queue's worker watch the ring for the guest's next request for up to US µs after
    /// a small request's reply instead of sleeping until the guest's kick, adapting below it
    /// to how soon requests come (faster metadata storms and small reads and writes; a CPU
    /// busy while it watches; with threads=N the worker answers small reads of cached data
    /// and small buffered writes to local file systems itself, and watches after those).
    #[arg(long, value_name = "tag=TAG,dir=DIR,socket=PATH[,OPTION]...")]
    pub share: Vec<String>,

    /// Publish a host port to a guest port (repeatable); tcp and the default bind address
    /// unless given. Ranges, lists and exclusions: 8000-8010:9000-9010, 3000,3001, ~8005.
    #[arg(long, value_name = "[tcp|udp/][BIND_IP:]HOST_PORT:GUEST_PORT")]
    pub publish: Vec<String>,

    /// A rule (repeatable; checked in order, the first match decides, flows no rule matches
    /// are allowed): ACTION is allow, reject or drop; the keys are dir=out|in,
    /// proto=tcp|udp|icmp, to=ADDR[/LEN] or from=ADDR[/LEN], and port=N[-M]. Outbound rules (the default) match the guest's flows by destination
    /// (to=, port=); inbound ones (dir=in) the clients of published ports (from=, and port=
    /// the host port). `reject` answers with RST (or ICMP port unreachable), `drop` says
    /// nothing. `ferry ctl rules` shows their counters.
    #[arg(long, value_name = "ACTION[,KEY=VALUE]...")]
    pub rule: Vec<String>,

    /// A host UNIX socket whose connections go to a guest TCP port (repeatable), such as the
    /// container engine's API: --forward-socket /run/myapp/docker.sock=2375. The socket has
    /// mode 0600 unless mode= says otherwise, and group= gives it to a group. `ferry ctl
    /// sockets` adds and removes them while ferry runs.
    #[arg(long, value_name = "HOST_PATH=GUEST_PORT[,mode=OCTAL][,group=GROUP]")]
    pub forward_socket: Vec<String>,

    /// A virtual address and port in the guest's network served by a host UNIX socket or
    /// TCP address (repeatable), as QEMU's guestfwd: --guest-forward
    /// 192.168.127.100:22=unix:/run/user/1000/ssh-agent.sock. Other ports of the address
    /// refuse connections.
    #[arg(long, value_name = "ADDR:PORT=unix:PATH|tcp:HOST:PORT")]
    pub guest_forward: Vec<String>,

    /// Write the audit log here: one JSON object per line for each flow opened, closed or
    /// refused, port published, guest attached, proxy request and (with a share's
    /// audit=files) file change; FILE (appended, mode 0600), - for stderr, or unix:PATH for a
    /// collector's datagram socket. A sink that stalls loses events (counted in /stats),
    /// never traffic. Schema: docs/audit.md.
    #[arg(long, value_name = "FILE|-|unix:PATH")]
    pub audit_log: Option<String>,

    /// Most audit events waiting for a slow sink; past it, new ones are dropped and counted
    /// in /stats [default: 8192].
    #[arg(long, value_name = "EVENTS")]
    pub audit_queue: Option<usize>,

    /// The address published ports bind to when the spec names none [default: 0.0.0.0, which
    /// takes IPv6 clients too where the host has IPv6].
    #[arg(long, value_name = "IP")]
    pub default_bind: Option<String>,

    /// Serve the control API (HTTP/1.1 + JSON) on this UNIX socket, mode 0600.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Ask the `ferry portd` helper listening here for host ports below
    /// net.ipv4.ip_unprivileged_port_start when this process may not bind them
    /// [default: /run/ferry/portd.sock].
    #[arg(long, value_name = "PATH")]
    pub portd_socket: Option<PathBuf>,

    /// The guest subnet: gateway .1, guest .2, host alias .254 (last before broadcast)
    /// [default: 192.168.127.0/24].
    #[arg(long, value_name = "CIDR")]
    pub subnet: Option<String>,

    /// The guest's IPv6 /64: gateway ::1, host alias ::fe (reaches the host's ::1); the guest
    /// builds its address by SLAAC, or takes one from DHCPv6 if set up to. `off` turns IPv6
    /// off [default: fd46:6572:7279::/64, a unique local prefix: never routed outside, so
    /// guests keep preferring IPv4 where both exist].
    #[arg(long, value_name = "CIDR|off")]
    pub subnet6: Option<String>,

    /// The link MTU given to the guest [default: 65520].
    #[arg(long, value_name = "N")]
    pub mtu: Option<u32>,

    /// Most TCP connections the guest may have open through the NAT; past it, new ones are
    /// refused with RST and a line in the log [default: 16384].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// The guest NIC's MAC, pinned: frames from any other MAC are not learned from, and the
    /// device offers this one in its config space [default: learned from the guest's frames;
    /// 02:46:52:59:00:02 until then].
    #[arg(long, value_name = "MAC")]
    pub guest_mac: Option<String>,

    /// The DNS servers to forward guest queries to, in order, as IP or IP:PORT, comma
    /// separated; the next is asked when one refuses or stays silent for 1.5 s [default: the
    /// nameservers of --resolv-conf, re-read when it changes].
    #[arg(long, value_name = "ADDR[,ADDR...]")]
    pub dns_upstream: Option<String>,

    /// The hosts file whose names the gateway's DNS answers before it asks upstream (loopback
    /// addresses become the host alias), re-read when it changes [default: /etc/hosts].
    #[arg(long, value_name = "PATH")]
    pub hosts_file: Option<PathBuf>,

    /// Split DNS (repeatable): names under SUFFIX go to SERVER (IP or IP:PORT) and to no other
    /// server, such as a VPN's internal zone: --dns-zone corp.example=10.8.0.53.
    #[arg(long, value_name = "SUFFIX=SERVER")]
    pub dns_zone: Vec<String>,

    /// The resolv.conf whose nameservers DNS goes to, looked at every 2 s and re-read when it
    /// changes (a VPN or another network replaces it) [default: /etc/resolv.conf].
    #[arg(long, value_name = "PATH")]
    pub resolv_conf: Option<PathBuf>,

    /// The proxy that the HTTP(S) proxy on the gateway's port 3128 sends its requests and
    /// tunnels through, as http://[USER@]HOST:PORT (https:// for TLS to it), or `none`
    /// [default: ferry's HTTP_PROXY
    /// and HTTPS_PROXY, else none: it connects to servers itself]. `ferry ctl proxy` changes
    /// it while ferry runs.
    #[arg(long, value_name = "URL")]
    pub proxy_upstream: Option<String>,

    /// Servers the proxy reaches directly though an upstream is set, in NO_PROXY's syntax:
    /// names (each with its subdomains), *, addresses and networks, each with an optional
    /// :PORT, separated by commas [default: ferry's NO_PROXY with the environment's upstream].
    #[arg(long, value_name = "LIST")]
    pub proxy_bypass: Option<String>,

    /// A file (mode 0600) whose first line is the password of the user in --proxy-upstream,
    /// which ferry answers the upstream's NTLM or Basic challenge with (Negotiate uses the Kerberos ticket cache or KRB5_CLIENT_KTNAME instead) [default: the environment's
    /// FERRY_PROXY_PASSWORD]. Never give it on the command line.
    #[arg(long, value_name = "FILE")]
    pub proxy_credentials: Option<PathBuf>,

    /// Transparent mode: the guest's TCP to ports 80 and 443 that would go out directly goes
    /// through the proxy instead (port 80 as HTTP, 443 as a CONNECT to the name in the TLS
    /// ClientHello; nothing is decrypted), so a guest with no proxy settings works behind
    /// the upstream. Rules apply first. `ferry ctl proxy transparent on|off` changes it.
    #[arg(long)]
    pub proxy_transparent: bool,

    /// A PAC file (a path, or an http:// URL fetched at start) whose FindProxyForURL(url,
    /// host) chooses the proxies per request, in order, falling back past one that cannot be
    /// reached; the user in --proxy-upstream is who ferry authenticates as to them.
    /// `ferry ctl proxy pac` changes it.
    #[arg(long, value_name = "FILE|URL")]
    pub proxy_pac: Option<String>,

    /// Capture every frame to and from the guest into FILE (libpcap format, for tcpdump -r
    /// or Wireshark; mode 0600, emptied if it exists), across reconnects.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,

    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// `--sandbox` and `--seccomp`, for `ferry serve`, `ferry run` (its devices; QEMU is never in
/// the sandbox), `ferry mount` (the thread that serves the mount) and `ferry portd`.
#[derive(Debug, Args, Default)]
pub struct SandboxArgs {
    /// Confine file access with Landlock to what the process serves (its shares, its sockets,
    /// the system files name resolution reads), and as root keep only the capabilities it
    /// needs (landlock); besides, run in new namespaces with a root holding only those paths
    /// (namespace, ferry serve only); or neither (none) [default: landlock].
    #[arg(long, value_name = "landlock|namespace|none")]
    pub sandbox: Option<String>,

    /// The system call filter: refuse calls ferry never makes and stop with a message naming
    /// the call (kill), allow them but log them to the kernel log (log), or no filter (none)
    /// [default: kill].
    #[arg(long, value_name = "kill|log|none")]
    pub seccomp: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Share this host directory with the guest (repeatable); the guest mounts the first at
    /// /mnt/share0, the next at /mnt/share1, and so on.
    #[arg(long, value_name = "DIR")]
    pub share: Vec<PathBuf>,

    /// Publish a host port to a guest port (repeatable), as for `ferry serve`.
    #[arg(long, value_name = "SPEC")]
    pub publish: Vec<String>,

    /// A rule for the guest's flows or published ports' clients (repeatable), as for
    /// `ferry serve`.
    #[arg(long, value_name = "SPEC")]
    pub rule: Vec<String>,

    /// Capture every frame to and from the guest into FILE (libpcap), as for `ferry serve`.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,

    #[command(flatten)]
    pub sandbox: SandboxArgs,

    /// A shell script the guest runs after boot; it powers off when the script ends. Without
    /// it, the guest gives a shell on the console.
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,

    /// The guest kernel [default: guest-image/out/vmlinuz].
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,

    /// The guest initramfs [default: guest-image/out/initramfs.cpio.gz].
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub memory: u32,

    /// Extra arguments passed to qemu-system-x86_64 as they are.
    #[arg(last = true, value_name = "QEMU-ARGS")]
    pub qemu_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The host directory to serve.
    #[arg(long, value_name = "DIR")]
    pub share: PathBuf,

    /// Where to mount it: an existing directory.
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,

    /// Answer every write with EROFS.
    #[arg(long)]
    pub readonly: bool,

    /// How long the kernel may cache attributes and data: never, metadata, auto or always.
    #[arg(long, value_name = "POLICY", default_value = "auto")]
    pub cache: String,

    /// Let every user use the mount, the kernel checking their permissions against what it
    /// shows (allow_other,default_permissions), as a guest's kernel does. Without it only the
    /// mounting user may. Needs root, or user_allow_other in /etc/fuse.conf.
    #[arg(long)]
    pub allow_other: bool,

    #[command(flatten)]
    pub sandbox: SandboxArgs,
}
