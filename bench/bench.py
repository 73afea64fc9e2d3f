#!/usr/bin/env python3
"""`make bench`: Ferry side by side with the tools a user would pick instead, in one run.

Net: Ferry (vhost-user) vs QEMU user net (libslirp) vs passt (-netdev stream).
FS:  Ferry vs virtiofsd (same cache policy, cache=auto, and the same features: xattrs and
     FUSE_HANDLE_KILLPRIV_V2 on, as Ferry serves by default), with the host's own filesystem
     as the ceiling; and four fio jobs at once, with and without each server's pool of four
     threads (Ferry's threads=4, virtiofsd's --thread-pool-size=4).

Every backend runs the same guest image under the same QEMU with the same settings. Runs are
interleaved, ROUNDS of each, and the median is reported. Each round starts the order one
backend later (A B C, B C A, C A B, ...), so no backend always runs first or after the same
neighbour, and the host's dirty pages are written back before each file-system run. Everything runs in a
network namespace made here (loopback plus a dummy link that goes nowhere): the iperf3 and echo
servers are on its loopback, so no packet leaves the machine.

Benchmarks are not tests: this measures and writes tables; it asserts no speed.

  bench/bench.py [--quick] [--rounds N] [--out DIR] [--only net|fs] [--net-kinds K,..]
                 [--fs-kinds K,..]

Writes DIR/YYYY-MM-DD-HHMM.md and .png (and latest.md, latest.png). Needs root, qemu-system-x86,
iperf3, fio, passt, gnuplot and virtiofsd (`make bench` installs them), a release build of
ferry and the guest image.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.path.join(ROOT, "target", "release", "ferry")
KERNEL = os.path.join(ROOT, "guest-image", "out", "vmlinuz")
INITRD = os.path.join(ROOT, "guest-image", "out", "initramfs.cpio.gz")
NS = "ferry-bench-%d" % os.getpid()
MEM = 512
# The guest's vCPUs, and where its virtio interrupts and the benchmark's programs run (see
# Bench.GUEST_PINS): "split" (interrupts on vCPU 0, programs on vCPU 1) for the net steps,
# "same" (both on vCPU 1) for the fs steps. FERRY_BENCH_SMP and FERRY_BENCH_PIN (split, same
# or none: where the guest puts them) override them for experiments; the tables use these.
SMP = int(os.environ.get("FERRY_BENCH_SMP", "2"))
NET_PIN = os.environ.get("FERRY_BENCH_PIN", "split" if SMP > 1 else "none")
FS_PIN = os.environ.get("FERRY_BENCH_PIN", "same" if SMP > 1 else "none")
GUEST_MAC = "02:46:52:59:00:02"
# The guest's CPU. Under TCG, QEMU runs `rep movsb` one byte per loop iteration, so a guest
# kernel that sees ERMS or FSRM (as `-cpu max` shows it) copies every byte between socket or
# page cache and user space at a few hundred MiB/s, and that copy, the same for every backend,
# caps each transfer: the tables measured TCG, not the backends (docs/performance.md, "The
# guest's copy under TCG"). Without the two flags the kernel copies eight bytes per iteration,
# as a KVM guest's copy is cheap next to the backend's work. Under KVM the CPU is left whole.
# FERRY_BENCH_CPU overrides it for experiments.
ACCEL = os.environ.get("FERRY_ACCEL", "tcg")
CPU = os.environ.get("FERRY_BENCH_CPU", "max,erms=off,fsrm=off" if ACCEL == "tcg" else "max")
# The host side of the benchmark, in the namespace: iperf3 and the rr/crr echo server.
IPERF_PORT, ECHO_PORT = 5201, 7007
# The iperf3 server on the host's ::1, for the IPv6 rows, and the address each backend gives
# the host's ::1 in the guest: Ferry's IPv6 host alias, libslirp's host (fec0::2), passt's
# gateway (the namespace's IPv6 default router, which passt maps to the host).
IPERF6_PORT = 5202
HOST6 = {"ferry": "fd46:6572:7279::fe", "ferry-mq": "fd46:6572:7279::fe", "ferry-audit": "fd46:6572:7279::fe", "slirp": "fec0::2",
         "passt": "fd00:18:250::fe"}
# Published ports: host 15201 -> guest 5201 (iperf3 server in the guest).
PUB_PORT = 15201
# The proxy rows (Ferry only: the anchors have no gateway proxy): a server on the host's
# loopback that sends a blob to each connection, fetched straight through the NAT and
# through a CONNECT tunnel of the gateway's proxy.
BLOB_PORT = 7010


# The tiny guest boots in about 3 s under TCG. Once in a while (seen here once, in a full
# run: both vCPUs spinning, the kernel silent after SeaBIOS, no virtio queue set up) it
# does not boot at all; such a boot is killed after this long and tried again.
BOOT_SECS = 120
BOOT_TRIES = 3


class BootHang(Exception):
    """The guest did not reach its script within BOOT_SECS."""


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def in_ns(cmd):
    return ["ip", "netns", "exec", NS] + cmd


def virtiofsd_bin():
    for c in [shutil.which("virtiofsd"), os.path.expanduser("~/.cargo/bin/virtiofsd"),
              "/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]:
        if c and os.path.exists(c):
            return c
    return None


class Proc:
    """A backend process whose CPU time and peak RSS are read from /proc. With `main_thread`,
    only the process's main thread is counted: QEMU's main loop, where QEMU's own network
    backends run and where it copies frames between guest memory and a `-netdev stream`
    socket, apart from its vCPU threads."""

    def __init__(self, pid, main_thread=False):
        self.pid = pid
        self.stat = "/proc/%d/task/%d/stat" % (pid, pid) if main_thread else "/proc/%d/stat" % pid

    def cpu(self):
        try:
            with open(self.stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return 0.0

    def peak_rss_mib(self):
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


def wait_path(path, secs=10):
    end = time.time() + secs
    while time.time() < end:
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise RuntimeError("%s did not appear within %d s" % (path, secs))


def pid_of(pattern):
    out = subprocess.run(["pgrep", "-n", "-f", pattern], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out.strip() else None


class Bench:
    def __init__(self, args):
        self.quick = args.quick
        self.rounds = args.rounds
        # What one measurement runs for: iperf3 by bytes in quick mode (its -t is whole
        # seconds), probe rr/crr and fio by time.
        self.iperf = "n16M" if args.quick else "t6"
        self.rr_secs = "0.5" if args.quick else "6"
        self.fio_time = "500ms" if args.quick else "6s"
        self.size_mib = 8 if args.quick else 256
        self.files = 300 if args.quick else 10000
        self.tree_files = 300 if args.quick else 5000
        self.w = tempfile.mkdtemp(prefix="ferry-bench-")
        self.children = []
        self.results = {}  # (suite, metric, backend) -> [values]
        self.cost = {}     # (suite, backend) -> [(cpu_s, gb, peak_mib)]

    # ---------- setup ----------

    def setup(self):
        for p, what in [(FERRY, "cargo build --release -p ferry"), (KERNEL, "make guest-image")]:
            if not os.path.exists(p):
                sys.exit("bench: %s is missing; run `%s` first (make bench does)" % (p, what))
        self.probe = os.path.join(self.w, "probe")
        sh("gcc -O2 -static -o %s %s/tests/probe/probe.c" % (self.probe, ROOT))
        sh("ip netns add %s" % NS)
        sh("ip -n %s link set lo up" % NS)
        # passt takes its addresses and gateway from the interface with the default route; a
        # veth pair with both ends in the namespace gives it one that leads nowhere.
        sh("ip -n %s link add bench0 type veth peer name bench1" % NS)
        sh("ip -n %s addr add 198.18.250.1/24 dev bench0" % NS)
        sh("ip -n %s link set bench0 up" % NS)
        sh("ip -n %s link set bench1 up" % NS)
        sh("ip -n %s route add default via 198.18.250.254" % NS)
        # The same for IPv6: passt takes its prefix and gateway from here too.
        sh("ip -n %s addr add fd00:18:250::1/64 dev bench0 nodad" % NS)
        sh("ip -n %s -6 route add default via fd00:18:250::fe" % NS)
        self.spawn(in_ns(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT)]))
        self.spawn(in_ns(["iperf3", "-s", "-B", "::1", "-p", str(IPERF6_PORT)]))
        self.spawn(in_ns([self.probe, "tcpecho", str(ECHO_PORT)]))
        self.spawn(in_ns([self.probe, "blobserve", str(BLOB_PORT), "64" if self.quick else "512"]))
        time.sleep(0.5)

    def spawn(self, cmd, **kw):
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, **kw)
        self.children.append(p)
        return p

    def teardown(self):
        for p in self.children:
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass
        subprocess.run(["pkill", "-f", self.w])
        subprocess.run(["ip", "netns", "del", NS])
        shutil.rmtree(self.w, ignore_errors=True)

    def record(self, suite, metric, backend, value):
        if value is not None:
            self.results.setdefault((suite, metric, backend), []).append(value)

    # ---------- the guest ----------

    def qemu(self, tag, script, append_extra, dev_args):
        """Starts QEMU (in the namespace) with the tiny guest; returns (Popen, console path)."""
        path = os.path.join(self.w, "%s.sh" % tag)
        with open(path, "w") as f:
            f.write(script)
        console = os.path.join(self.w, "%s.console" % tag)
        cmd = in_ns([
            "qemu-system-x86_64", "-machine", "q35,accel=%s" % ACCEL,
            "-cpu", CPU, "-smp", str(SMP), "-m", "%dM" % MEM, "-nographic", "-nodefaults",
            "-serial", "stdio", "-no-reboot",
            "-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % MEM,
            "-numa", "node,memdev=mem", "-kernel", KERNEL, "-initrd", INITRD,
            "-append", "console=ttyS0 quiet panic=-1 ferry.noshell " + append_extra,
            "-fw_cfg", "name=opt/ferry/run,file=%s" % path,
            "-fw_cfg", "name=opt/ferry/probe,file=%s" % self.probe,
        ] + dev_args)
        out = open(console, "w")
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.children.append(p)
        return p, console

    @staticmethod
    def cpu_at_marks(console, qemu, meter, marks, secs=600):
        """Follows the console until the last of `marks` appears, calling `meter` (which reads
        CPU times) as each appears (within 20 ms); returns {mark: what meter returned}."""
        seen = {}
        end = time.time() + secs
        while time.time() < end and len(seen) < len(marks):
            with open(console, errors="replace") as f:
                text = f.read()
            for m in marks:
                if m not in seen and m in text:
                    seen[m] = meter()
            if qemu.poll() is not None:
                break
            time.sleep(0.02)
        return seen

    @staticmethod
    def booted(console, qemu):
        """Whether the guest reached its script (it prints BENCH-BOOTED) within BOOT_SECS."""
        end = time.time() + BOOT_SECS
        while time.time() < end:
            with open(console, errors="replace") as f:
                if "BENCH-BOOTED" in f.read():
                    return True
            if qemu.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def attempt(self, run, kind):
        """run(kind), booting again when the guest hangs before its script starts."""
        for i in range(BOOT_TRIES):
            try:
                return run(kind)
            except BootHang as e:
                log("bench: %s (try %d of %d)%s" % (e, i + 1, BOOT_TRIES,
                                                     "; booting again" if i + 1 < BOOT_TRIES else ""))
        raise RuntimeError("the guest hung while booting %d times in a row; is the machine "
                           "overloaded?" % BOOT_TRIES)

    @staticmethod
    def wait_console(console, needle, qemu, secs=600):
        end = time.time() + secs
        while time.time() < end:
            with open(console, errors="replace") as f:
                text = f.read()
            if needle in text:
                return text
            if qemu.poll() is not None:
                break
            time.sleep(0.2)
        with open(console, errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError("the guest did not print %s; console tail:\n%s" % (needle, tail))

    # ---------- net ----------

    # The guest has two vCPUs, and under TCG it is the bottleneck: when the program moving the
    # data runs on the vCPU that takes the NIC's receive interrupts, the two share one CPU and
    # host-to-guest TCP runs at about half speed. Where the guest put them was a coin toss
    # that differed between backends (Ferry's INTx line lands on vCPU 0, the MSI-X RX vector
    # of QEMU's own virtio-net on vCPU 1), and it made Ferry's h2g rows bimodal. Every
    # backend gets the same placement: the NIC's interrupts on vCPU 0, the programs on vCPU 1
    # (the script's shell is pinned, and what it starts inherits that).
    #
    # The fs steps are the other way round: each request waits for its reply, and with the
    # interrupt on the other vCPU every reply costs a cross-vCPU wake-up, which under TCG made
    # the metadata steps a third slower for both backends (docs/performance.md). Their
    # interrupts and programs share vCPU 1.
    GUEST_PINS = {"split": r"""
for i in $(grep virtio /proc/interrupts | cut -d: -f1); do echo 1 > /proc/irq/$i/smp_affinity; done
taskset -p -c 1 $$ > /dev/null
""", "same": r"""
for i in $(grep virtio /proc/interrupts | cut -d: -f1); do echo 2 > /proc/irq/$i/smp_affinity; done
taskset -p -c 1 $$ > /dev/null
""", "none": ""}
    GUEST_PIN = GUEST_PINS[NET_PIN]

    NET_GUEST = "echo BENCH-BOOTED\n" + GUEST_PIN + r"""
cat /sys/firmware/qemu_fw_cfg/by_name/opt/ferry/probe/raw > /tmp/probe; chmod +x /tmp/probe
H=$(tr ' ' '\n' < /proc/cmdline | grep '^bench.host=' | cut -d= -f2)
T=$(tr ' ' '\n' < /proc/cmdline | grep '^bench.secs=' | cut -d= -f2)
L=$(tr ' ' '\n' < /proc/cmdline | grep '^bench.iperf=' | cut -d= -f2)
case $L in t*) A="-t ${L#t}";; *) A="-n ${L#n}";; esac
echo BENCH-AT bulk-start
echo "BENCH g2h $(iperf3 -c $H -p 5201 $A -f m 2>&1 | grep receiver | tail -1)"
echo BENCH-AT g2h-done
echo "BENCH h2g $(iperf3 -c $H -p 5201 $A -f m -R 2>&1 | grep receiver | tail -1)"
echo BENCH-AT h2g-done
echo "BENCH udp $(iperf3 -c $H -p 5201 -u -b 0 -l 1400 $A -f m 2>&1 | grep receiver | tail -1)"
echo BENCH-AT bulk-end
echo "BENCH $(/tmp/probe rr $H 7007 $T)"
echo "BENCH $(/tmp/probe crr $H 7007 $T)"
# IPv6: the same single streams to the host's ::1 through the backend's IPv6 host address,
# with the same placement as the IPv4 ones (unpinned, they were bimodal as those had been).
H6=$(tr ' ' '\n' < /proc/cmdline | grep '^bench.host6=' | cut -d= -f2)
echo "BENCH g2h6 $(iperf3 -6 -c $H6 -p 5202 $A -f m 2>&1 | grep receiver | tail -1)"
echo "BENCH h2g6 $(iperf3 -6 -c $H6 -p 5202 -R $A -f m 2>&1 | grep receiver | tail -1)"
# The gateway proxy (Ferry only): the same blob straight through the NAT, then through a
# CONNECT tunnel of the gateway's proxy, to the host's loopback; bytes and seconds of each.
if grep -q 'bench.proxy=1' /proc/cmdline; then
  echo "BENCH proxy_direct $(/tmp/probe fetch $H 7010)"
  echo "BENCH proxy_tunnel $(/tmp/probe fetch 127.0.0.1 7010 192.168.127.1 3128)"
fi
# Last, so the placement above holds for the rest: four streams at once, from both vCPUs, what several queue pairs can spread (ferry-mq).
taskset -p -c 0-1 $$ > /dev/null
echo "BENCH g2h_p4 $(iperf3 -c $H -p 5201 -P 4 $A -f m 2>&1 | grep SUM | grep receiver | tail -1)"
echo "BENCH h2g_p4 $(iperf3 -c $H -p 5201 -P 4 -R $A -f m 2>&1 | grep SUM | grep receiver | tail -1)"
(iperf3 -s -1 -p 5201 > /dev/null 2>&1; iperf3 -s -1 -p 5201 > /dev/null 2>&1) &
sleep 0.3
echo BENCH-PUBLISH-READY
wait
"""

    def net_backend(self, kind):
        """Starts one net backend; returns (qemu device args, host alias, backend Proc, stop)."""
        if kind in ("ferry", "ferry-mq", "ferry-audit"):
            sock = os.path.join(self.w, "net.sock")
            log_f = open(os.path.join(self.w, "ferry-net.log"), "w")
            # ferry-audit: the audit log to a file, a follower of GET /events and a scrape of
            # GET /metrics every second, all running through the whole guest run.
            api = os.path.join(self.w, "api.sock")
            audit = ["--audit-log", os.path.join(self.w, "audit.jsonl"), "--api-socket", api] \
                if kind == "ferry-audit" else []
            p = subprocess.Popen(in_ns([FERRY, "serve", "--net-socket", sock, "--dns-upstream",
                                        "127.0.0.1:1", "--publish",
                                        "127.0.0.1:%d:5201" % PUB_PORT] + audit),
                                 stdout=subprocess.DEVNULL, stderr=log_f)
            self.children.append(p)
            wait_path(sock)
            observers = []
            if kind == "ferry-audit":
                wait_path(api)
                observers.append(subprocess.Popen([FERRY, "ctl", "--api-socket", api, "events"],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                observers.append(subprocess.Popen(
                    ["sh", "-c", "while curl -s -o /dev/null --unix-socket %s http://f/metrics; "
                     "do sleep 1; done" % api], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                self.children.extend(observers)
            pid = pid_of("^%s serve --net-socket %s" % (FERRY, sock))
            tcg = ACCEL == "tcg"
            # ferry-mq: two queue pairs, as libvirt's <driver queues='2'/> asks for them.
            pairs = 2 if kind == "ferry-mq" else 1
            vectors = ",vectors=0" if tcg else (",vectors=%d" % (2 * pairs + 2) if pairs > 1 else "")
            mq = ",mq=on" if pairs > 1 else ""
            dev = ["-chardev", "socket,id=n0,path=%s" % sock,
                   "-netdev", "vhost-user,id=net0,chardev=n0,queues=%d" % pairs,
                   "-device", "virtio-net-pci,netdev=net0,romfile=,mac=%s%s%s" % (GUEST_MAC, vectors, mq)]

            def stop():
                for o in observers:
                    o.kill()
                    o.wait(timeout=5)
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)
            return dev, "192.168.127.254", Proc(pid), stop
        if kind == "slirp":
            dev = ["-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:%d-:5201" % PUB_PORT,
                   "-device", "virtio-net-pci,netdev=n0,romfile=,mac=%s" % GUEST_MAC]
            return dev, "10.0.2.2", None, lambda: None
        if kind == "passt":
            # passt drops to user nobody before it makes its socket: give it a folder it may use.
            pdir = os.path.join(self.w, "passt")
            os.makedirs(pdir, exist_ok=True)
            os.chmod(self.w, 0o755)
            os.chmod(pdir, 0o777)
            sock = os.path.join(pdir, "passt.sock")
            pidfile = os.path.join(pdir, "passt.pid")
            for f in (sock, pidfile):
                if os.path.exists(f):
                    os.unlink(f)
            p = subprocess.Popen(in_ns(["passt", "-f", "-q", "-s", sock, "-P", pidfile,
                                        "-t", "%d:5201" % PUB_PORT, "-u", "none"]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.children.append(p)
            wait_path(sock)
            wait_path(pidfile)
            time.sleep(0.2)
            with open(pidfile) as f:
                pid = int(f.read().strip())
            dev = ["-netdev", "stream,id=n0,server=off,addr.type=unix,addr.path=%s" % sock,
                   "-device", "virtio-net-pci,netdev=n0,romfile=,mac=%s" % GUEST_MAC]

            def stop():
                p.kill()
                p.wait(timeout=10)
            # passt maps the gateway's address to the host's loopback.
            return dev, "198.18.250.254", Proc(pid), stop
        raise ValueError(kind)

    @staticmethod
    def iperf_line(line):
        """(Mbit/s, MBytes) from an iperf3 summary line."""
        m = re.search(r"([\d.]+)\s+([KMG])Bytes\s+([\d.]+)\s+([KMG])bits/sec", line or "")
        if not m:
            return None, 0.0
        size = float(m.group(1)) * {"K": 1 / 1024, "M": 1, "G": 1024}[m.group(2)]
        rate = float(m.group(3)) * {"K": 1e-3, "M": 1, "G": 1e3}[m.group(4)]
        return rate, size

    def run_net(self, kind):
        dev, host, proc, stop = self.net_backend(kind)
        qemu, console = self.qemu("net-%s" % kind, self.NET_GUEST,
                                  "bench.host=%s bench.host6=%s bench.secs=%s bench.iperf=%s bench.proxy=%d"
                                  % (host, HOST6[kind], self.rr_secs, self.iperf,
                                     kind.startswith("ferry")), dev)
        if not self.booted(console, qemu):
            qemu.kill()
            qemu.wait()
            stop()
            raise BootHang("the guest (net, %s) did not boot within %d s" % (kind, BOOT_SECS))
        qpid = pid_of("opt/ferry/run,file=%s/net-%s.sh" % (self.w, kind)) or qemu.pid
        if kind == "slirp":
            proc = Proc(qpid)
        # Two meters: the backend process alone, and the device's whole host-side cost, which
        # adds QEMU's main loop (passt's copies to and from guest memory happen there, libslirp
        # runs there, and it injects the interrupts Ferry signals). For slirp the backend is
        # all of QEMU, vCPUs included, so its device cost is the main loop alone.
        qmain = Proc(qpid, main_thread=True)

        def meter():
            own = proc.cpu() if proc else 0.0
            return own, qmain.cpu() + (own if kind != "slirp" else 0.0)
        cpu0 = meter()[0]
        steps = ("bulk-start", "g2h-done", "h2g-done", "bulk-end")
        marks = self.cpu_at_marks(console, qemu, meter, ["BENCH-AT " + m for m in steps])
        at = {m: marks.get("BENCH-AT " + m) for m in steps}
        bulk_cpu = (at["bulk-end"] or (0.0, 0.0))[0] - (at["bulk-start"] or (0.0, 0.0))[0]
        # The CPU during each transfer: the marks the guest prints around them.
        xfer_cpu = {metric: (at[b][0] - at[a][0], at[b][1] - at[a][1]) for metric, a, b in (
            ("g2h", "bulk-start", "g2h-done"), ("h2g", "g2h-done", "h2g-done"),
            ("udp", "h2g-done", "bulk-end")) if at[a] is not None and at[b] is not None}
        text = self.wait_console(console, "BENCH-PUBLISH-READY", qemu)
        moved_mib = 0.0
        lines = dict(l.split(" ", 2)[1:3] for l in text.splitlines()
                     if l.startswith("BENCH ") and len(l.split(" ", 2)) == 3)

        def record_cpu(metric, own, device, size):
            if size > 0:
                self.record("cpu", metric, kind, own / (size / 1024))
                self.record("devcpu", metric, kind, device / (size / 1024))
        for metric in ("g2h", "h2g", "udp"):
            rate, size = self.iperf_line(lines.get(metric))
            self.record("net", metric, kind, rate)
            moved_mib += size
            if metric in xfer_cpu:
                record_cpu(metric, *xfer_cpu[metric], size)
        for metric in ("g2h_p4", "h2g_p4", "g2h6", "h2g6"):
            rate, size = self.iperf_line(lines.get(metric))
            self.record("net", metric, kind, rate)
            moved_mib += size
        for metric in ("proxy_direct", "proxy_tunnel"):
            got = lines.get(metric, "").split()
            if len(got) == 2 and float(got[1]) > 0 and float(got[0]) > 0:
                self.record("net", metric, kind, float(got[0]) / float(got[1]) / (1 << 20))
                moved_mib += float(got[0]) / (1 << 20)
        rr = lines.get("rr", "").split()
        self.record("net", "rr", kind, float(rr[1]) if len(rr) == 2 else None)
        crr = lines.get("crr", "").split()
        self.record("net", "crr", kind, float(crr[1]) if len(crr) == 2 else None)
        # Through the published port: host client -> guest iperf3 server, then reversed.
        pub_cpu0 = meter()[0]
        for metric, extra in (("pub_h2g", []), ("pub_g2h", ["-R"])):
            own0, dev0_x = meter()
            out = ""
            for _ in range(20):
                amount = ["-t", self.iperf[1:]] if self.iperf[0] == "t" else ["-n", self.iperf[1:]]
                r = subprocess.run(in_ns(["iperf3", "-c", "127.0.0.1", "-p", str(PUB_PORT),
                                          "-f", "m"] + amount + extra),
                                   capture_output=True, text=True)
                out = r.stdout
                if "receiver" in out:
                    break
                time.sleep(0.2)
            line = [l for l in out.splitlines() if "receiver" in l]
            rate, size = self.iperf_line(line[-1] if line else None)
            self.record("net", metric, kind, rate)
            moved_mib += size
            own1, dev1_x = meter()
            record_cpu(metric, own1 - own0, dev1_x - dev0_x, size)
        own1 = meter()[0]
        bulk_cpu += own1 - pub_cpu0
        peak = proc.peak_rss_mib() if proc else 0.0
        self.cost.setdefault(("net", kind), []).append((own1 - cpu0, moved_mib / 1024, peak, bulk_cpu))
        qemu.kill()
        qemu.wait()
        stop()

    # ---------- fs ----------

    FS_GUEST = "echo BENCH-BOOTED\n" + GUEST_PINS[FS_PIN] + r"""
cat /sys/firmware/qemu_fw_cfg/by_name/opt/ferry/probe/raw > /tmp/probe; chmod +x /tmp/probe
D=/mnt/bench; S=$(tr ' ' '\n' < /proc/cmdline | grep '^bench.mib=' | cut -d= -f2)
T=$(tr ' ' '\n' < /proc/cmdline | grep '^bench.secs=' | cut -d= -f2)
N=$(tr ' ' '\n' < /proc/cmdline | grep '^bench.files=' | cut -d= -f2)
. /mnt/bench/steps.sh
echo BENCH-FS-DONE
# Stay up: the host reads the backend's counters, then stops QEMU.
sleep 3600
"""

    # The same steps, in the guest and on the host: DIR, PROBE, DROP set by the caller.
    FS_STEPS = r"""
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
fio_json() { fio --output-format=json "$@" 2>/dev/null | tr -d '\n'; }
echo "BENCH-FIO seqwrite $(fio_json --name=seqwrite --directory=$D --filename=big --rw=write --bs=1M --size=${S}M --ioengine=psync --end_fsync=1)"
drop
echo "BENCH-FIO seqread $(fio_json --name=seqread --directory=$D --filename=big --rw=read --bs=1M --size=${S}M --ioengine=psync)"
drop
echo "BENCH-FIO randread $(fio_json --name=randread --directory=$D --filename=big --rw=randread --bs=4k --size=${S}M --ioengine=psync --runtime=$T --time_based)"
echo "BENCH-FIO randwrite $(fio_json --name=randwrite --directory=$D --filename=big --rw=randwrite --bs=4k --size=${S}M --ioengine=psync --runtime=$T --time_based --end_fsync=1)"
drop
t0=$($P now -); cat $D/big > /dev/null; t1=$($P now -); cat $D/big > /dev/null; t2=$($P now -)
echo "BENCH twice $t0 $t1 $t2"
rm -f $D/big
"""
    # The metadata steps: create, stat and unlink N files; untar, find and du a tree.
    FS_META_STEPS = r"""
mkdir -p $D/meta; echo "BENCH $($P files $D/meta $N)"; rmdir $D/meta
rm -rf $D/tree; mkdir $D/tree
t0=$($P now -); tar xf $D/tree.tar -C $D/tree; sync; t1=$($P now -)
drop
t2=$($P now -); find $D/tree | wc -l > /dev/null; t3=$($P now -); du -s $D/tree > /dev/null; t4=$($P now -)
echo "BENCH tree $t0 $t1 $t2 $t3 $t4"
rm -rf $D/tree
"""
    FS_STEPS += FS_META_STEPS
    # Four jobs at once on four files (what a share's pool is for): random reads, random
    # writes, and a mix that syncs every 16 writes. The pool kinds run only these.
    FS_PAR_STEPS = r"""
par() { n=$1; shift; fio_json --name=$n --directory=$D --filename_format='par.$jobnum' --numjobs=4 --group_reporting --bs=4k --size=$((S / 4 + 1))M --ioengine=psync --runtime=$T --time_based "$@"; }
fio_json() { fio --output-format=json "$@" 2>/dev/null | tr -d '\n'; }
echo "BENCH-FIO par_randread $(par par_randread --rw=randread)"
echo "BENCH-FIO par_randwrite $(par par_randwrite --rw=randwrite --end_fsync=1)"
echo "BENCH-FIO par_mix $(par par_mix --rw=randrw --rwmixread=50 --fsync=16)"
rm -f $D/par.*
"""
    FS_STEPS += FS_PAR_STEPS
    # The pool kinds: Ferry with `threads=4`, virtiofsd with `--thread-pool-size=4`.
    POOL_KINDS = ("ferry-pool", "virtiofsd-pool")

    def make_tree_tar(self):
        """A source-like tree of small files (deterministic), as a tarball."""
        tree = os.path.join(self.w, "tree-src")
        for i in range(self.tree_files):
            d = os.path.join(tree, "pkg%02d" % (i % 50), "mod%02d" % (i % 7))
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "f%05d.c" % i), "w") as f:
                f.write(("/* file %d */\nint f%d(void) { return %d; }\n" % (i, i, i)) * (1 + i % 40))
        tar = os.path.join(self.w, "tree.tar")
        sh("tar cf %s -C %s ." % (tar, tree))
        shutil.rmtree(tree)
        return tar

    def fs_dir(self, kind):
        d = os.path.join(self.w, "share-%s" % kind)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        shutil.copy(self.tar, os.path.join(d, "tree.tar"))
        steps = self.FS_PAR_STEPS if kind in self.POOL_KINDS else self.FS_STEPS
        with open(os.path.join(d, "steps.sh"), "w") as f:
            f.write("P=/tmp/probe\n" + steps)
        return d

    def parse_fs(self, text, kind, elapsed_note=None):
        moved_mib = 0.0
        for line in text.splitlines():
            if line.startswith("BENCH-FIO "):
                _, name, js = line.split(" ", 2)
                try:
                    job = json.loads(js)["jobs"][0]
                except (ValueError, KeyError, IndexError):
                    continue
                sides = [job["read"], job["write"]] if name == "par_mix" else \
                    [job["read"] if "read" in name else job["write"]]
                self.record("fs", name, kind, sum(x["bw_bytes"] for x in sides) / 2**20)
                moved_mib += sum(x["io_bytes"] for x in sides) / 2**20
            elif line.startswith("BENCH twice "):
                t = [float(x) for x in line.split()[2:5]]
                self.record("fs", "read_cold", kind, self.size_mib / max(t[1] - t[0], 1e-6))
                self.record("fs", "read_warm", kind, self.size_mib / max(t[2] - t[1], 1e-6))
                moved_mib += 2 * self.size_mib
            elif line.startswith("BENCH files "):
                f = line.split()
                n = int(f[2])
                for metric, secs in zip(("create", "stat", "unlink"), f[3:6]):
                    self.record("fs", metric, kind, n / max(float(secs), 1e-6))
            elif line.startswith("BENCH tree "):
                t = [float(x) for x in line.split()[2:7]]
                self.record("fs", "untar", kind, t[1] - t[0])
                self.record("fs", "find", kind, t[3] - t[2])
                self.record("fs", "du", kind, t[4] - t[3])
        return moved_mib

    def run_fs(self, kind):
        d = self.fs_dir(kind)
        # The run before this one left dirty pages; their writeback belongs to it, not here.
        os.sync()
        if kind == "native":
            r = subprocess.run(["sh", "-c", "D=%s; S=%d; T=%s; N=%d; P=%s\n%s" % (
                d, self.size_mib, self.fio_time, self.files, self.probe, self.FS_STEPS)],
                capture_output=True, text=True)
            self.parse_fs(r.stdout, kind)
            return
        sock = os.path.join(self.w, "fs-%s.sock" % kind)
        if os.path.exists(sock):
            os.unlink(sock)
        log_f = open(os.path.join(self.w, "%s-fs.log" % kind), "w")
        if kind in ("ferry", "ferry-pool"):
            pool = ",threads=4" if kind == "ferry-pool" else ""
            # More share options for an A/B by hand (bench/one.py), as FERRY_SHARE_OPTS=,poll=0.
            pool += os.environ.get("FERRY_SHARE_OPTS", "")
            cmd = [FERRY, "serve", "--share", "tag=bench,dir=%s,socket=%s,cache=auto%s" % (d, sock, pool)]
        else:
            # Ferry serves xattrs and negotiates KILLPRIV_V2 by default; virtiofsd does neither
            # unless asked. Without xattrs the guest skips one GETXATTR per newly written file.
            cmd = [virtiofsd_bin(), "--socket-path", sock, "--shared-dir", d, "--cache", "auto",
                   "--xattr", "--killpriv-v2",
                   "--sandbox", "none"]
            if kind == "virtiofsd-pool":
                cmd += ["--thread-pool-size", "4"]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_f)
        self.children.append(p)
        wait_path(sock)
        proc = Proc(p.pid)
        cpu0 = proc.cpu()
        dev = ["-chardev", "socket,id=f0,path=%s" % sock,
               "-device", "vhost-user-fs-pci,chardev=f0,tag=bench"]
        qemu, console = self.qemu("fs-%s" % kind, self.FS_GUEST,
                                  "ferry.net=off ferry.fs=bench bench.mib=%d bench.secs=%s bench.files=%d"
                                  % (self.size_mib, self.fio_time, self.files), dev)
        if not self.booted(console, qemu):
            qemu.kill()
            qemu.wait()
            p.kill()
            p.wait()
            raise BootHang("the guest (fs, %s) did not boot within %d s" % (kind, BOOT_SECS))
        text = self.wait_console(console, "BENCH-FS-DONE", qemu)
        moved = self.parse_fs(text, kind)
        self.cost.setdefault(("fs", kind), []).append(
            (proc.cpu() - cpu0, moved / 1024, proc.peak_rss_mib(), None))
        qemu.kill()
        qemu.wait()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()

    def idle_rss(self):
        """Ferry's RSS with both devices served and nothing attached."""
        d = os.path.join(self.w, "idle")
        os.makedirs(d, exist_ok=True)
        sock, fsock = os.path.join(self.w, "idle-net.sock"), os.path.join(self.w, "idle-fs.sock")
        p = subprocess.Popen(in_ns([FERRY, "serve", "--net-socket", sock, "--dns-upstream",
                                    "127.0.0.1:1", "--share",
                                    "tag=idle,dir=%s,socket=%s" % (d, fsock)]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.children.append(p)
        wait_path(fsock)
        time.sleep(1)
        pid = pid_of("^%s serve --net-socket %s" % (FERRY, sock))
        rss = 0.0
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
        return rss

    # ---------- report ----------

    NET_ROWS = [
        ("g2h", "TCP guest→host (iperf3 to host loopback via host alias), Mbit/s", True),
        ("h2g", "TCP host→guest (iperf3 -R, host alias), Mbit/s", True),
        ("pub_h2g", "TCP host→guest through the published port, Mbit/s", True),
        ("pub_g2h", "TCP guest→host through the published port (-R), Mbit/s", True),
        ("udp", "UDP guest→host, 1400-byte datagrams, received Mbit/s", True),
        ("g2h_p4", "TCP guest→host, 4 streams (iperf3 -P 4), Mbit/s", True),
        ("h2g_p4", "TCP host→guest, 4 streams (iperf3 -P 4 -R), Mbit/s", True),
        ("g2h6", "TCP guest→host over IPv6 (to the host's ::1), Mbit/s", True),
        ("h2g6", "TCP host→guest over IPv6 (-R, the host's ::1), Mbit/s", True),
        ("rr", "TCP_RR 1-byte request/response, µs per transaction", False),
        ("crr", "TCP_CRR connect+1-byte RR+close, connections/s", True),
    ]
    FS_ROWS = [
        ("seqwrite", "fio 1 MiB sequential write, MiB/s", True),
        ("seqread", "fio 1 MiB sequential read (cold), MiB/s", True),
        ("randread", "fio 4 KiB random read (psync), MiB/s", True),
        ("randwrite", "fio 4 KiB random write (psync), MiB/s", True),
        ("create", "create small files, files/s", True),
        ("stat", "stat small files, files/s", True),
        ("unlink", "unlink small files, files/s", True),
        ("untar", "untar a source tree, s", False),
        ("find", "find over it (cold), s", False),
        ("du", "du over it, s", False),
        ("read_cold", "read a large file, first time, MiB/s", True),
        ("read_warm", "read it again (page cache), MiB/s", True),
    ]

    FS_PAR_ROWS = [
        ("par_randread", "fio 4 jobs, 4 KiB random read, 4 files, MiB/s", True),
        ("par_randwrite", "fio 4 jobs, 4 KiB random write, 4 files, MiB/s", True),
        ("par_mix", "fio 4 jobs, random read/write, fsync every 16 writes, MiB/s", True),
    ]

    def cost_lists(self, suite, k):
        """CPU s per GiB of backend k by round: (whole run, bulk transfers only)."""
        runs = self.cost.get((suite, k), [])
        return ([c / g for c, g, _, _ in runs if g > 0],
                [b / g for _, g, _, b in runs if g > 0 and b is not None])

    def med(self, suite, metric, backend):
        v = self.results.get((suite, metric, backend))
        return statistics.median(v) if v else None

    @staticmethod
    def fmt(v):
        if v is None:
            return "n/a"
        return "%.0f" % v if abs(v) >= 100 else ("%.1f" % v if abs(v) >= 10 else "%.3g" % v)

    def ratio(self, suite, metric, a, b, higher):
        va, vb = self.med(suite, metric, a), self.med(suite, metric, b)
        if not va or not vb:
            return None
        return va / vb if higher else vb / va

    def report(self, out_dir, idle_rss, started, net_kinds, fs_kinds):
        stamp = started.strftime("%Y-%m-%d-%H%M")
        os.makedirs(out_dir, exist_ok=True)
        md = os.path.join(out_dir, "%s%s.md" % (stamp, "-quick" if self.quick else ""))
        png = md[:-3] + ".png"
        qemu_v = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                text=True).stdout.splitlines()[0]
        passt_v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "passt"],
                                 capture_output=True, text=True).stdout
        vfsd = virtiofsd_bin()
        vfsd_v = subprocess.run([vfsd, "--version"], capture_output=True, text=True).stdout.strip() if vfsd else "missing"
        L = []
        L.append("# Ferry benchmark, %s%s\n" % (started.strftime("%Y-%m-%d %H:%M UTC"),
                                                " (quick mode: small sizes, smoke check only)" if self.quick else ""))
        L.append("`make bench%s` on %s; %d interleaved rounds per backend (the order rotates each round), medians. "
                 "Guest: the tiny guest (%d vCPUs, %d MiB) under QEMU %s with accel=%s and `-cpu %s`; virtio "
                 "interrupts and programs placed %s for net, %s for fs (bench.py, GUEST_PINS). "
                 "Ratios are Ferry/anchor with higher = Ferry better (for times and latency the "
                 "inverse is taken). Benchmarks are not tests: nothing here is asserted.\n"
                 % (" QUICK=1" if self.quick else "", os.uname().nodename, self.rounds, SMP, MEM,
                    qemu_v.split("version")[-1].strip(), ACCEL, CPU,
                    NET_PIN, FS_PIN))
        L.append("Anchors: QEMU user net (libslirp, built into QEMU), passt %s (`-netdev stream`), "
                 "%s (`--cache auto --xattr --killpriv-v2 --sandbox none`: the cache policy and "
                 "features of Ferry's default share, `cache=auto` with xattrs).\n" % (passt_v, vfsd_v))
        sections = (
            ("Net", "net", net_kinds, self.NET_ROWS, ("slirp", "QEMU user net", "user net"),
             ("passt", "passt", "passt")),
            ("FS", "fs", fs_kinds, self.FS_ROWS, ("virtiofsd", "virtiofsd", "virtiofsd"),
             ("native", "host native (ceiling)", "native")),
        )
        for title, suite, kinds, rows, (a, a_col, a_ratio), (b, b_col, b_ratio) in sections:
            if not kinds:
                continue
            L.append("## %s\n" % title)
            L.append("| metric | Ferry | %s | %s | Ferry/%s | Ferry/%s |" % (a_col, b_col, a_ratio, b_ratio))
            L.append("|---|---|---|---|---|---|")
            for metric, label, higher in rows:
                r1 = self.ratio(suite, metric, "ferry", a, higher)
                r2 = self.ratio(suite, metric, "ferry", b, higher)
                L.append("| %s | %s | %s | %s | %s | %s |" % (
                    label, self.fmt(self.med(suite, metric, "ferry")),
                    self.fmt(self.med(suite, metric, a)), self.fmt(self.med(suite, metric, b)),
                    "%.2fx" % r1 if r1 else "n/a", "%.2fx" % r2 if r2 else "n/a"))
            L.append("")
        if all(k in fs_kinds for k in self.POOL_KINDS):
            L.append("## FS, four jobs at once\n")
            L.append("Four fio jobs on four files: without a pool each server answers one request "
                     "at a time; Ferry's `threads=4` and virtiofsd's `--thread-pool-size=4` answer "
                     "four at once. The first ratio is the goal's (Ferry's pool against "
                     "virtiofsd's), the second the pool's gain over Ferry without it.\n")
            L.append("| metric | Ferry | Ferry, threads=4 | virtiofsd | virtiofsd, pool of 4 | "
                     "pool: Ferry/virtiofsd | Ferry: pool/none |")
            L.append("|---|---|---|---|---|---|---|")
            for metric, label, higher in self.FS_PAR_ROWS:
                r1 = self.ratio("fs", metric, "ferry-pool", "virtiofsd-pool", higher)
                r2 = self.ratio("fs", metric, "ferry-pool", "ferry", higher)
                L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                    label, self.fmt(self.med("fs", metric, "ferry")),
                    self.fmt(self.med("fs", metric, "ferry-pool")),
                    self.fmt(self.med("fs", metric, "virtiofsd")),
                    self.fmt(self.med("fs", metric, "virtiofsd-pool")),
                    "%.2fx" % r1 if r1 else "n/a", "%.2fx" % r2 if r2 else "n/a"))
            L.append("")
        if "ferry-mq" in net_kinds:
            L.append("## Ferry with two queue pairs\n")
            L.append("The same guest with `queues=2` (libvirt's `<driver queues='2'/>`): the "
                     "four-stream rows against one queue pair. Under TCG both pairs' interrupts "
                     "share the one INTx line QEMU 7.2 needs here.\n")
            L.append("| metric | Ferry, 1 pair | Ferry, 2 pairs | 2 pairs / 1 |")
            L.append("|---|---|---|---|")
            for metric, label, higher in self.NET_ROWS:
                if not metric.endswith("_p4"):
                    continue
                r = self.ratio("net", metric, "ferry-mq", "ferry", higher)
                L.append("| %s | %s | %s | %s |" % (
                    label, self.fmt(self.med("net", metric, "ferry")),
                    self.fmt(self.med("net", metric, "ferry-mq")), "%.2fx" % r if r else "n/a"))
            L.append("")
        if "ferry-audit" in net_kinds:
            L.append("## The audit log, events and metrics\n")
            L.append("The same runs with `--audit-log FILE`, a `ferry ctl events` follower and a "
                     "`GET /metrics` scrape every second (\"audit on\"), against plain Ferry: host "
                     "CPU seconds of the ferry process per GiB moved, bulk transfers only, and "
                     "throughput. The goal is under 5% more CPU per GiB.\n")
            L.append("| transfer | Ferry, CPU s/GiB | audit on, CPU s/GiB | extra CPU |")
            L.append("|---|---|---|---|")
            for metric, label, _ in self.NET_ROWS:
                a, b = self.med("cpu", metric, "ferry"), self.med("cpu", metric, "ferry-audit")
                if a is None or b is None:
                    continue
                L.append("| %s | %s | %s | %+.1f%% |" % (label, self.fmt(a), self.fmt(b),
                                                        100.0 * (b - a) / a if a else 0.0))
            # The goal's figure: all bulk transfers together; and the whole run, whose RR and
            # CRR runs open a flow (two events) per connection and move next to no bytes.
            plain, audited = self.cost_lists("net", "ferry"), self.cost_lists("net", "ferry-audit")
            for i, label in ((1, "**all bulk transfers** (the goal's figure)"),
                             (0, "whole run (boot, RR and CRR included)")):
                if plain[i] and audited[i]:
                    a, b = statistics.median(plain[i]), statistics.median(audited[i])
                    L.append("| %s | %s | %s | %+.1f%% |" % (label, self.fmt(a), self.fmt(b),
                                                            100.0 * (b - a) / a))
            L.append("")
        if "ferry" in net_kinds:
            L.append("## The gateway proxy\n")
            L.append("A blob from a server on the host's loopback, fetched by the probe in the guest "
                     "straight through the NAT (to the host alias) and through a CONNECT tunnel of "
                     "the proxy on the gateway's port 3128 (`probe fetch`), in the same runs, MiB/s. "
                     "The goal is a tunnel at least 0.9x the direct path. (A thousand tunnels held "
                     "at once is a test: `tests/tests/guest_proxy_upstream.rs`.)\n")
            L.append("| path | Ferry, MiB/s | tunnel / direct |")
            L.append("|---|---|---|")
            d, t = self.med("net", "proxy_direct", "ferry"), self.med("net", "proxy_tunnel", "ferry")
            L.append("| straight through the NAT | %s | |" % self.fmt(d))
            L.append("| CONNECT tunnel through the proxy | %s | %s |" % (
                self.fmt(t), "%.2fx" % (t / d) if d else "n/a"))
            L.append("")
        L.append("## Cost\n")
        L.append("Host CPU seconds (utime+stime) of the backend process per GiB moved through it, "
                 "and its peak RSS (VmHWM). *Whole run* counts everything from the backend's start "
                 "to the guest's end: boot, DHCP, and the RR and CRR runs, which move next to no "
                 "bytes. *Bulk only* counts the CPU spent while the iperf3 runs (TCP both ways, "
                 "UDP, and the published port) moved those bytes, read when the guest prints its "
                 "markers (within 20 ms). For QEMU user net the backend is QEMU itself, so its "
                 "figure includes emulating the guest under TCG: it is not comparable, and shown "
                 "only for completeness. For passt, the copies between guest memory and its "
                 "socket are QEMU's work, not passt's; Ferry does that work itself.\n")
        L.append("| backend | CPU s per GiB, whole run | CPU s per GiB, bulk only | peak RSS MiB |")
        L.append("|---|---|---|---|")
        names = {"ferry": "Ferry", "ferry-mq": "Ferry, 2 queue pairs",
                 "ferry-audit": "Ferry with audit log, events and metrics",
                 "slirp": "QEMU user net (QEMU itself)", "passt": "passt", "virtiofsd": "virtiofsd",
                 "ferry-pool": "Ferry, threads=4 (four-job runs only)",
                 "virtiofsd-pool": "virtiofsd, pool of 4 (four-job runs only)"}
        for suite, kinds in (("net", net_kinds), ("fs", [k for k in fs_kinds if k != "native"])):
            for k in kinds:
                runs = self.cost.get((suite, k), [])
                per, bulk = self.cost_lists(suite, k)
                peak = max([p for _, _, p, _ in runs] or [0])
                self.results[("cost", suite, k)] = per
                if bulk:
                    self.results[("cost-bulk", suite, k)] = bulk
                L.append("| %s %s | %s | %s | %s |" % (
                    suite, names[k], self.fmt(statistics.median(per)) if per else "n/a",
                    self.fmt(statistics.median(bulk)) if bulk else ("n/a" if suite == "net" else ""),
                    self.fmt(peak) if peak else "n/a"))
        L.append("| idle `ferry serve` (net + one share, nothing attached) | | | %.1f |" % idle_rss)
        L.append("")
        if "ferry" in net_kinds and "passt" in net_kinds:
            L.append("The bulk figure by transfer (CPU s per GiB; each transfer moves a different "
                     "share of the bytes, and small datagrams cost more per byte than 64 KiB "
                     "segments, so the totals above depend on the mix). The ratio is passt's "
                     "CPU over Ferry's: higher = Ferry cheaper.\n")
            L.append("| transfer | Ferry | passt | Ferry/passt |")
            L.append("|---|---|---|---|")
            for metric, label, _ in self.NET_ROWS:
                a, b = self.med("cpu", metric, "ferry"), self.med("cpu", metric, "passt")
                if a is None and b is None:
                    continue
                L.append("| %s | %s | %s | %s |" % (
                    label.rsplit(",", 1)[0], self.fmt(a), self.fmt(b),
                    "%.2fx" % (b / a) if a and b else "(too short to time)"))
            L.append("")
            L.append("The same transfers, counting the device's whole host-side cost: the backend "
                     "plus QEMU's main-loop thread (not its vCPU threads). That thread copies "
                     "frames between guest memory and passt's socket, runs libslirp, and injects "
                     "the interrupts that Ferry signals through eventfds. This is the like-for-like "
                     "figure: each column counts the same work, wherever it runs.\n")
            L.append("| transfer | Ferry + QEMU main loop | passt + QEMU main loop | QEMU user net "
                     "(main loop) | Ferry/passt | Ferry/user net |")
            L.append("|---|---|---|---|---|---|")
            for metric, label, _ in self.NET_ROWS:
                a, b, c = (self.med("devcpu", metric, k) for k in ("ferry", "passt", "slirp"))
                if a is None and b is None:
                    continue
                L.append("| %s | %s | %s | %s | %s | %s |" % (
                    label.rsplit(",", 1)[0], self.fmt(a), self.fmt(b), self.fmt(c),
                    "%.2fx" % (b / a) if a and b else "(too short to time)",
                    "%.2fx" % (c / a) if a and c else "(too short to time)"))
            L.append("")
        L.append("Raw values per round: `%s`.\n" % os.path.basename(md[:-3] + ".json"))
        text = "\n".join(L) + "\n"
        with open(md, "w") as f:
            f.write(text)
        with open(md[:-3] + ".json", "w") as f:
            json.dump({"%s/%s/%s" % k: v for k, v in self.results.items()}, f, indent=1)
        self.chart(png, net_kinds, fs_kinds)
        for src, name in ((md, "latest.md"), (png, "latest.png")):
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out_dir, name))
        return md, text

    def chart(self, png, net_kinds, fs_kinds):
        """Bars of Ferry/anchor ratios (1.0 = parity), with gnuplot."""
        rows = []
        for metric, label, higher in self.NET_ROWS:
            if net_kinds:
                rows.append(("net " + metric, self.ratio("net", metric, "ferry", "slirp", higher) or 0,
                             self.ratio("net", metric, "ferry", "passt", higher) or 0))
        for metric, label, higher in self.FS_ROWS:
            if fs_kinds:
                rows.append(("fs " + metric, self.ratio("fs", metric, "ferry", "virtiofsd", higher) or 0,
                             self.ratio("fs", metric, "ferry", "native", higher) or 0))
        dat = png[:-4] + ".dat"
        with open(dat, "w") as f:
            for name, a, b in rows:
                f.write('"%s" %.3f %.3f\n' % (name, a, b))
        gp = """set terminal pngcairo size 1200,600 noenhanced
set output '%s'
set title 'Ferry / anchor (higher is better for Ferry; 1.0 = parity)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set xtics rotate by -45 font ',9'
set yrange [0:*]
set grid ytics
set arrow from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 2 lc rgb 'black'
plot '%s' using 2:xtic(1) title 'net: vs QEMU user net / fs: vs virtiofsd', '' using 3 title 'net: vs passt / fs: vs host native'
""" % (png, dat)
        r = subprocess.run(["gnuplot"], input=gp, text=True, capture_output=True)
        if r.returncode != 0:
            log("bench: gnuplot failed (no chart): %s" % r.stderr.strip())
        os.unlink(dat)


def rotated(kinds, r):
    """The order of round r: each round starts one backend later than the one before."""
    if not kinds:
        return kinds
    r %= len(kinds)
    return kinds[r:] + kinds[:r]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, short runs (under 5 minutes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--only", choices=["net", "fs"])
    ap.add_argument("--net-kinds", help="comma-separated net backends to run (default: all), "
                    "e.g. ferry,ferry-audit")
    ap.add_argument("--fs-kinds", help="comma-separated fs backends to run (default: all), "
                    "e.g. ferry,ferry-pool,virtiofsd,virtiofsd-pool")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it makes a network namespace and drops caches)")
    if not virtiofsd_bin():
        sys.exit("bench: virtiofsd is missing; `cargo install virtiofsd --locked` (make bench does)")
    for tool in ("qemu-system-x86_64", "iperf3", "fio", "passt", "gnuplot", "gcc"):
        if not shutil.which(tool):
            sys.exit("bench: %s is missing; run scripts/install-deps.sh --bench (make bench does)" % tool)
    b = Bench(args)
    # A SIGTERM ends the run through the `finally` below, which removes the namespace and
    # stops what the run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.datetime.now(datetime.timezone.utc)
    net_kinds = [] if args.only == "fs" else ["ferry", "slirp", "passt", "ferry-mq"]
    # The audit log's cost is measured in full runs; quick runs (CI's smoke check) skip it.
    if net_kinds and not args.quick:
        net_kinds.append("ferry-audit")
    if args.net_kinds:
        net_kinds = args.net_kinds.split(",")
    fs_kinds = [] if args.only == "net" else ["ferry", "virtiofsd", "native", "ferry-pool",
                                              "virtiofsd-pool"]
    if args.fs_kinds:
        fs_kinds = args.fs_kinds.split(",")
    t0 = time.time()
    try:
        b.setup()
        b.tar = b.make_tree_tar()
        for r in range(args.rounds):
            for k in rotated(net_kinds, r):
                log("bench: round %d/%d net %s (%.0f s so far)" % (r + 1, args.rounds, k, time.time() - t0))
                b.attempt(b.run_net, k)
            for k in rotated(fs_kinds, r):
                log("bench: round %d/%d fs %s (%.0f s so far)" % (r + 1, args.rounds, k, time.time() - t0))
                b.attempt(b.run_fs, k)
        idle = b.idle_rss()
        md, text = b.report(args.out, idle, started, net_kinds, fs_kinds)
    finally:
        b.teardown()
    print(text)
    log("bench: wrote %s (%.0f s)" % (md, time.time() - t0))
    missing = [l for l in text.splitlines() if l.startswith("|") and "n/a" in l.split("|")[2:5]]
    if missing:
        log("bench: some cells have no number:\n" + "\n".join(missing))
        sys.exit(1)


if __name__ == "__main__":
    main()
