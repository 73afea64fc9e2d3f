//! Test networks: network namespaces made by the test, so that nothing the NAT opens can
//! reach the machine's real network.
//!
//! A [`TestNet`] has two namespaces joined by a veth pair: `inner`, where `ferry serve` runs
//! (it has no route anywhere else, not even a default route), and `remote`, which plays the
//! outside world with test servers. Addresses come from 198.18.0.0/15, the range reserved for
//! network tests. Everything is deleted on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The MTU of the link between `remote` and the far side ([`TestNet::add_far_side`]).
pub const FAR_MTU: &str = "1400";

/// Two namespaces and a link between them.
pub struct TestNet {
    /// Where ferry runs.
    pub inner: String,
    /// The "outside": test servers listen here.
    pub remote: String,
    /// The inner side's address on the link.
    pub inner_addr: String,
    /// The remote side's address on the link (reach test servers here).
    pub remote_addr: String,
    /// The inner side's IPv6 address on the link.
    pub inner_addr6: String,
    /// The remote side's IPv6 address on the link: test servers given it are IPv6-only.
    pub remote_addr6: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (apt-get install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A veth pair between two namespaces, each end (namespace, device, IPv4 address in a /24,
/// IPv6 address in a /64) addressed and up, with the namespace's loopback.
fn link(a: (&str, &str, &str, &str), b: (&str, &str, &str, &str)) -> Result<(), String> {
    ip(&[
        "link", "add", a.1, "netns", a.0, "type", "veth", "peer", "name", b.1, "netns", b.0,
    ])?;
    for (ns, dev, addr, addr6) in [a, b] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
        // No duplicate address detection: the link is the test's own, and the address is
        // usable at once.
        let addr6 = format!("{addr6}/64");
        ip(&["-n", ns, "addr", "add", &addr6, "dev", dev, "nodad"])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

impl TestNet {
    /// Makes the namespaces and the link. Needs root (CAP_NET_ADMIN).
    pub fn new() -> Result<Self, String> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        // The third octet keeps concurrent test nets on separate links.
        let octet = (std::process::id() * 8 + n) % 250 + 1;
        let net = TestNet {
            inner: format!("ferry-in-{id}"),
            remote: format!("ferry-rm-{id}"),
            inner_addr: format!("198.18.{octet}.1"),
            remote_addr: format!("198.18.{octet}.2"),
            inner_addr6: format!("fd00:18:{octet}::1"),
            remote_addr6: format!("fd00:18:{octet}::2"),
        };
        let (va, vb) = (format!("fi{id}"), format!("fr{id}"));
        ip(&["netns", "add", &net.inner])?;
        ip(&["netns", "add", &net.remote])?;
        link(
            (&net.inner, &va, &net.inner_addr, &net.inner_addr6),
            (&net.remote, &vb, &net.remote_addr, &net.remote_addr6),
        )?;
        Ok(net)
    }

    /// Another IPv4 address for the remote side (`.N` of its link), for a second test host.
    pub fn add_remote_addr(&self, n: u8) -> String {
        let base = self.remote_addr.rsplit_once('.').map_or("", |(b, _)| b);
        let addr = format!("{base}.{n}");
        let dev = ip_output(&["-n", &self.remote, "-o", "link", "show", "type", "veth"])
            .split(':')
            .nth(1)
            .map(|d| d.trim().split('@').next().unwrap_or("").to_string())
            .unwrap_or_default();
        ip(&[
            "-n",
            &self.remote,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &dev,
        ])
        .expect("add an address to the remote side");
        addr
    }

    /// Allows ping sockets in ferry's namespace (a new namespace keeps them off, and it has
    /// its own sysctl), so ferry sends the guest's pings for real.
    pub fn allow_ping_sockets(&self) {
        let ok = Self::command(&self.inner, "sysctl")
            .args(["-qw", "net.ipv4.ping_group_range=0 2147483647"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot allow ping sockets in the test namespace");
    }

    /// A third namespace behind `remote`, which becomes a router between it and `inner`
    /// (forwarding on, ICMP errors not rate-limited): a host one hop further, for tests of
    /// what routers on the way say (traceroute, path MTU discovery: the far link's MTU is
    /// [`FAR_MTU`], less than the rest). Its addresses are in 198.19.N.0/24 and
    /// fd00:19:N::/64, routed from `inner` through `remote`.
    pub fn add_far_side(&self) -> Result<FarSide, String> {
        let id = self.remote.trim_start_matches("ferry-rm-");
        let octet = self.remote_addr.split('.').nth(2).unwrap_or("1");
        let far = FarSide {
            ns: format!("ferry-far-{id}"),
            router: format!("198.19.{octet}.1"),
            router6: format!("fd00:19:{octet}::1"),
            addr: format!("198.19.{octet}.2"),
            addr6: format!("fd00:19:{octet}::2"),
        };
        let (va, vb) = (format!("fx{id}"), format!("ff{id}"));
        ip(&["netns", "add", &far.ns])?;
        link(
            (&self.remote, &va, &far.router, &far.router6),
            (&far.ns, &vb, &far.addr, &far.addr6),
        )?;
        for (ns, dev) in [(&self.remote, &va), (&far.ns, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "mtu", FAR_MTU])?;
        }
        ip(&["-n", &far.ns, "route", "add", "default", "via", &far.router])?;
        ip(&[
            "-n",
            &far.ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &far.router6,
        ])?;
        let (net, net6) = (
            format!("198.19.{octet}.0/24"),
            format!("fd00:19:{octet}::/64"),
        );
        ip(&[
            "-n",
            &self.inner,
            "route",
            "add",
            &net,
            "via",
            &self.remote_addr,
        ])?;
        ip(&[
            "-n",
            &self.inner,
            "-6",
            "route",
            "add",
            &net6,
            "via",
            &self.remote_addr6,
        ])?;
        let sysctl = |ns: &str, setting: &str| -> Result<(), String> {
            let ok = Self::command(ns, "sysctl")
                .args(["-qw", setting])
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(())
                .ok_or_else(|| format!("sysctl {setting} failed in namespace {ns}"))
        };
        sysctl(&self.remote, "net.ipv4.ip_forward=1")?;
        sysctl(&self.remote, "net.ipv6.conf.all.forwarding=1")?;
        for ns in [&self.remote, &far.ns] {
            sysctl(ns, "net.ipv4.icmp_ratelimit=0")?;
            sysctl(ns, "net.ipv6.icmp.ratelimit=0")?;
        }
        Ok(far)
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and so the pair.
        let _ = ip(&["netns", "del", &self.inner]);
        let _ = ip(&["netns", "del", &self.remote]);
    }
}

/// A namespace one router beyond a [`TestNet`]'s `remote` ([`TestNet::add_far_side`]),
/// deleted on drop.
pub struct FarSide {
    /// The namespace: test servers one hop further listen here.
    pub ns: String,
    /// The router's (`remote`'s) addresses on the far link.
    pub router: String,
    pub router6: String,
    /// The far side's addresses.
    pub addr: String,
    pub addr6: String,
}

impl Drop for FarSide {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// A test-host process (`tests/servers/testhosts.py`) in a test namespace, killed on drop.
pub struct TestHost(std::process::Child);

impl TestHost {
    /// Starts `testhosts.py ARGS` in namespace `ns` and waits until it has bound its sockets.
    pub fn start(ns: &str, args: &[&str]) -> Self {
        use std::io::BufRead;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/testhosts.py");
        let mut child = TestNet::command(ns, "python3")
            .arg(script)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the test host (python3)");
        let mut line = String::new();
        let out = child.stdout.take().expect("piped stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("read from the test host");
        assert_eq!(line.trim(), "ready", "the test host did not start");
        TestHost(child)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `tests/servers/clients.py ARGS` in namespace `ns`; returns what it printed, trimmed.
pub fn clients(ns: &str, args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/clients.py");
    let out = TestNet::command(ns, "python3")
        .arg(script)
        .args(args)
        .output()
        .expect("run the test clients (python3)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
