#!/usr/bin/env python3
"""The soak: `make soak` (not in CI). One `ferry run` with the tiny guest under load on every
path at once for a set time (30 minutes by default), and three host-side phases on top of it,
while ferry's RSS, open descriptors, CPU and flows are sampled every second.

  soak.py [--minutes M] [--out DIR]

Load, all the time: the guest fetches over TCP from a host server through the NAT (host
alias) and through the gateway's HTTP proxy, exchanges UDP with a host echo, resolves names on
the gateway, and churns a file tree in its share; host clients fetch from the guest's httpd and
echo UDP through published ports. Phases, each once, spread over the run:
  scan   a connect to every one of the 65,535 ports of the namespace's loopback (100 of them
         published to the guest);
  churn  10,000 connections through a published port, each closed at once;
  many   the guest holds 10,000 connections to a host echo server at once.
Pass: after each phase the descriptors ferry holds outside open flows (each flow holds its
host socket; a UDP flow lives 60 s after its last datagram) are back within 16 of where they
were before it, and its RSS within 64 MiB, within 30 s; no connection through a published port is refused;
the guest's 10,000 connections all succeed; ferry logs no error.

Writes DIR/soak-STAMP.csv (the samples), .md (the summary) and .png (the chart, with
gnuplot). Exits 1 when a criterion fails. Everything runs in a network namespace of its own;
nothing leaves it.
"""
import argparse
import asyncio
import ctypes
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.path.join(ROOT, "target/release/ferry")
NS = "ferry-soak"
PUBLISHED_SCAN = range(20000, 20100)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)


def in_ns(cmd):
    return ["ip", "netns", "exec", NS] + cmd


def enter_ns():
    """Moves the calling thread into the soak's network namespace (Python 3.11 has no
    os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/run/netns/" + NS, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            sys.exit("soak: cannot enter namespace %s: %s" % (NS, os.strerror(ctypes.get_errno())))
    finally:
        os.close(fd)


GUEST = r"""
ulimit -n 30000
S=/mnt/share0; P=$S/probe
mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=64k count=16 2>/dev/null && httpd -p 80 -h /www
$P udpecho 7 &
$P tcpecho 9001 >/dev/null &
loop() { while [ ! -e $S/stop ]; do "$@" >/dev/null 2>&1; done; }
loop wget -q -O /dev/null http://192.168.127.254:18080/blob &
loop env http_proxy=http://192.168.127.1:3128 wget -q -O /dev/null http://127.0.0.1:18080/small &
loop $P udp 192.168.127.254 18007 1400 &
loop nslookup host.ferry.internal &
( i=0; while [ ! -e $S/stop ]; do d=$S/churn/d$((i % 50)); mkdir -p $d; echo $i > $d/f$i; mv $d/f$i $d/g$i; rm -f $d/g$i; i=$((i+1)); done ) &
echo SOAK-READY
while [ ! -e $S/stop ]; do
    if [ -e $S/want-many ]; then rm -f $S/want-many; $P tcpmany 192.168.127.254 18009 10000 > $S/many.out 2>&1; fi
    sleep 1
done
wait
"""


class Ferry:
    """The `ferry run` process: its samples."""

    def __init__(self, pid):
        self.pid = pid

    def sample(self):
        rss = 0
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) / 1024
            fds = len(os.listdir("/proc/%d/fd" % self.pid))
            with open("/proc/%d/stat" % self.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return None
        return rss, fds, cpu


def api_flows(api):
    """(TCP flows, UDP flows with a host socket of their own) from `/stats`: a published UDP
    port's clients are flows that share the port's one socket."""
    out = subprocess.run(["curl", "-s", "-m", "5", "--unix-socket", api, "http://ferry/stats"],
                         capture_output=True, text=True).stdout
    try:
        import json
        net = json.loads(out)["net"]
        shared = sum(1 for f in net.get("flows", [])
                     if f.get("proto") == "udp" and f.get("direction") == "in")
        return net.get("tcp_flows", 0), net.get("udp_flows", 0) - shared
    except Exception:
        return 0, 0


async def scan(ports):
    """Connects to every port in `ports` on the loopback (1000 at a time); returns the open ones."""
    sem = asyncio.Semaphore(1000)
    open_ports = []

    async def one(p):
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", p), 2)
                open_ports.append(p)
                w.close()
            except Exception:
                pass

    await asyncio.gather(*(one(p) for p in ports))
    return sorted(open_ports)


class Soak:
    def __init__(self, minutes, out):
        self.minutes = minutes
        self.out = out
        self.w = tempfile.mkdtemp(prefix="ferry-soak-")
        self.share = os.path.join(self.w, "share")
        os.makedirs(self.share)
        self.children = []
        self.samples = []  # (t, rss_mib, fds, cpu_s, tcp_flows, udp_flows)
        self.phases = []   # (name, start_t, end_t, recovered_s or None, detail)
        self.failures = []
        self.stop = threading.Event()

    def spawn(self, cmd, **kw):
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **kw)
        self.children.append(p)
        return p

    def setup(self):
        for p, what in [(FERRY, "cargo build --release -p ferry")]:
            if not os.path.exists(p):
                sys.exit("soak: %s is missing; run `%s` first (make soak does)" % (p, what))
        sh("gcc -O2 -static -o %s/probe %s/tests/probe/probe.c" % (self.share, ROOT))
        subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)
        sh("ip netns add %s && ip -n %s link set lo up" % (NS, NS))
        sh("ip netns exec %s sysctl -qw net.ipv4.ping_group_range='0 2147483647'" % NS)
        www = os.path.join(self.w, "www")
        os.makedirs(www)
        with open(os.path.join(www, "blob"), "wb") as f:
            f.write(os.urandom(1 << 20))
        with open(os.path.join(www, "small"), "w") as f:
            f.write("small\n")
        devnull = subprocess.DEVNULL
        self.spawn(in_ns(["python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                          www, "18080"]), stdout=devnull, stderr=devnull)
        hosts = os.path.join(ROOT, "tests/servers/testhosts.py")
        self.spawn(in_ns(["python3", hosts, "127.0.0.1", "--echo", "18007", "--tcp-echo",
                          "18009"]), stdout=devnull, stderr=devnull)
        script = os.path.join(self.w, "guest.sh")
        with open(script, "w") as f:
            f.write(GUEST)
        publish = ["--publish", "8080:80", "--publish", "udp/5300:7", "--publish", "9001:9001"]
        for p in PUBLISHED_SCAN:
            publish += ["--publish", "127.0.0.1:%d:80" % p]
        self.console = os.path.join(self.w, "console.log")
        self.ferry_log = os.path.join(self.w, "ferry.log")
        env = dict(os.environ, TMPDIR=self.w, RUST_LOG="warn")
        self.run = self.spawn(in_ns([FERRY, "run", "--share", self.share, "--script", script,
                                     "--memory", "1024"] + publish),
                              stdout=open(self.console, "w"), stderr=open(self.ferry_log, "w"),
                              env=env)
        end = time.time() + 180
        while time.time() < end:
            with open(self.console, errors="replace") as f:
                if "SOAK-READY" in f.read():
                    break
            if self.run.poll() is not None:
                sys.exit("soak: ferry run ended early:\n" + open(self.ferry_log).read()[-3000:])
            time.sleep(0.5)
        else:
            sys.exit("soak: the guest did not start its load within 180 s")
        pids = subprocess.run(["pgrep", "-f", "^%s run" % FERRY], capture_output=True,
                              text=True).stdout.split()
        self.ferry = Ferry(int(pids[0]))
        self.api = glob.glob(os.path.join(self.w, "ferry-run-*/api.sock"))[0]

    def sampler(self):
        t0 = self.t0
        while not self.stop.is_set():
            s = self.ferry.sample()
            if s:
                tcp, udp = api_flows(self.api)
                self.samples.append((time.time() - t0,) + s + (tcp, udp))
            time.sleep(1)

    def host_load(self):
        """Host clients of the guest's published ports, all the time, from ferry's namespace
        (this thread enters it: setns moves only the calling thread)."""
        enter_ns()
        refused = []
        fetched = echoed = 0
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", 8080), timeout=10) as s:
                    s.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
                    got = 0
                    while True:
                        b = s.recv(65536)
                        if not b:
                            break
                        got += len(b)
                    fetched += got > 1 << 20
            except ConnectionRefusedError:
                refused.append(time.time() - self.t0)
            except OSError:
                pass
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(2)
                try:
                    u.sendto(b"x" * 1000, ("127.0.0.1", 5300))
                    echoed += len(u.recvfrom(2000)[0]) == 1000
                except OSError:
                    pass
        self.host_fetched, self.host_echoed = fetched, echoed
        self.host_refused = refused

    def spare_fds(self):
        """(RSS MiB, descriptors that no open flow holds): what must come back after a burst.
        The steady load keeps flows open (a UDP flow lives 60 s after its last datagram), each
        with its host socket but a published UDP port's clients; those are not a leak."""
        s = self.ferry.sample()
        if not s:
            return None
        tcp, udp = api_flows(self.api)
        return s[0], s[1] - tcp - udp

    def settle(self, name, before, started, detail):
        """Waits up to 30 s for the descriptors no flow holds, and RSS, to come back."""
        t_end = time.time() - self.t0
        end = time.time() + 30
        recovered = None
        while time.time() < end:
            s = self.spare_fds()
            if s and s[1] <= before[1] + 16 and s[0] <= before[0] + 64:
                recovered = time.time() - self.t0 - t_end
                break
            time.sleep(0.5)
        if recovered is None:
            s = self.spare_fds() or (0, 0)
            self.failures.append("%s: 30 s after it, ferry holds %d descriptors outside flows and "
                                 "%.0f MiB (before: %d, %.0f MiB)" % (name, s[1], s[0], before[1], before[0]))
        self.phases.append((name, started, t_end, recovered, detail))

    def phase_scan(self):
        before, t = self.spare_fds(), time.time() - self.t0
        open_ports = in_ns_python_scan()
        missing = [p for p in PUBLISHED_SCAN if p not in open_ports]
        if missing:
            self.failures.append("scan: published ports %s did not answer" % missing[:10])
        self.settle("scan", before, t, "%d ports open of 65,535" % len(open_ports))

    def phase_churn(self):
        before, t = self.spare_fds(), time.time() - self.t0
        out = subprocess.run(in_ns(["python3", os.path.join(ROOT, "tests/servers/clients.py"),
                                    "churn", "127.0.0.1", "9001", "10000"]),
                             capture_output=True, text=True).stdout.strip()
        if out != "10000 done, 0 errors":
            self.failures.append("churn: %s" % out)
        self.settle("churn", before, t, out)

    def phase_many(self):
        before, t = self.spare_fds(), time.time() - self.t0
        result = os.path.join(self.share, "many.out")
        if os.path.exists(result):
            os.remove(result)
        open(os.path.join(self.share, "want-many"), "w").close()
        end = time.time() + 300
        out = ""
        while time.time() < end:
            if os.path.exists(result):
                with open(result) as f:
                    out = f.read().strip()
                if out:
                    break
            time.sleep(1)
        if out != "10000 of 10000":
            self.failures.append("many: the guest's 10,000 connections: %r" % out)
        self.settle("many", before, t, out)

    def go(self):
        self.setup()
        self.t0 = time.time()
        threading.Thread(target=self.sampler, daemon=True).start()
        load = threading.Thread(target=self.host_load, daemon=True)
        load.start()
        total = self.minutes * 60
        plan = [(0.15, self.phase_scan), (0.45, self.phase_churn), (0.75, self.phase_many)]
        for at, phase in plan:
            wait = self.t0 + at * total - time.time()
            if wait > 0:
                time.sleep(wait)
            log("soak: %s at %.0f s" % (phase.__name__[6:], time.time() - self.t0))
            phase()
        wait = self.t0 + total - time.time()
        if wait > 0:
            time.sleep(wait)
        open(os.path.join(self.share, "stop"), "w").close()
        self.stop.set()
        load.join(timeout=30)
        refused = getattr(self, "host_refused", [])
        if refused:
            during = {n: sum(1 for t in refused if a <= t <= b + 30) for n, a, b, _, _ in self.phases}
            self.failures.append("published port 8080 refused %d connections (%s; %d outside)"
                                 % (len(refused), ", ".join("%d in or just after %s" % (c, n)
                                                            for n, c in during.items()),
                                    len(refused) - sum(during.values())))
        fetched, echoed = getattr(self, "host_fetched", 0), getattr(self, "host_echoed", 0)
        self.host_line = ("host clients through published ports: %d fetches of 1 MiB (8080), "
                          "%d UDP echoes (5300)" % (fetched, echoed))
        if fetched == 0 or echoed == 0:
            self.failures.append("the host clients of published ports got nothing through: "
                                 + self.host_line)
        with open(self.ferry_log, errors="replace") as f:
            errors = [l for l in f if " ERROR " in l]
        if errors:
            self.failures.append("ferry logged %d errors, the first: %s" % (len(errors), errors[0].strip()))
        self.report()

    def report(self):
        os.makedirs(self.out, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d-%H%M")
        base = os.path.join(self.out, "soak-" + stamp)
        with open(base + ".csv", "w") as f:
            f.write("seconds,rss_mib,fds,cpu_s,tcp_flows,udp_flows\n")
            for s in self.samples:
                f.write("%.0f,%.1f,%d,%.2f,%d,%d\n" % s)
        rss = [s[1] for s in self.samples] or [0]
        fds = [s[2] for s in self.samples] or [0]
        cpu = self.samples[-1][3] if self.samples else 0
        lines = ["# Soak %s" % stamp, "",
                 "`python3 bench/soak.py --minutes %d`: ferry run with the tiny guest under TCG, "
                 "load on every path, samples every second (`%s`)." % (self.minutes, os.path.basename(base) + ".csv"),
                 "", "![chart](%s)" % (os.path.basename(base) + ".png"), "",
                 "| phase | from (s) | to (s) | back to baseline after (s) | result |",
                 "|---|---|---|---|---|"]
        for name, a, b, rec, detail in self.phases:
            lines.append("| %s | %.0f | %.0f | %s | %s |" % (
                name, a, b, "%.1f" % rec if rec is not None else "not within 30", detail))
        lines += ["", "RSS %.0f–%.0f MiB, descriptors %d–%d, CPU %.0f s over %.0f s." % (
            min(rss), max(rss), min(fds), max(fds), cpu, self.minutes * 60),
                  "", getattr(self, "host_line", "") + ".", "",
                  "**%s**" % ("PASS" if not self.failures else "FAIL: " + "; ".join(self.failures))]
        with open(base + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        if shutil.which("gnuplot"):
            marks = "".join("set arrow from %.0f, graph 0 to %.0f, graph 1 nohead lc rgb 'gray'; "
                            "set label '%s' at %.0f, graph 0.95; " % (a, a, n, a)
                            for n, a, _, _, _ in self.phases)
            gp = ("set terminal png size 1100,500; set output '%s.png'; set datafile separator ',';"
                  "set key top left; set xlabel 'seconds'; set ylabel 'MiB, descriptors';"
                  "set y2label 'flows'; set y2tics; %s"
                  "plot '%s.csv' every ::1 using 1:2 with lines title 'RSS (MiB)',"
                  " '' every ::1 using 1:3 with lines title 'descriptors',"
                  " '' every ::1 using 1:5 axes x1y2 with lines title 'TCP flows'") % (base, marks, base)
            subprocess.run(["gnuplot", "-e", gp])
        log("\n".join(lines))
        return not self.failures

    def teardown(self):
        open(os.path.join(self.share, "stop"), "w").close()
        for p in self.children:
            try:
                p.terminate()
                p.wait(timeout=10)
            except Exception:
                p.kill()
        subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.w, ignore_errors=True)


def in_ns_python_scan():
    """The scan, run inside the namespace (a child python, so this process stays outside)."""
    code = ("import asyncio,resource,sys; sys.path.insert(0,%r); from soak import scan; "
            "h=resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            "resource.setrlimit(resource.RLIMIT_NOFILE,(h,h)); "
            "print(' '.join(map(str, asyncio.run(scan(range(1, 65536))))))" % os.path.dirname(__file__))
    out = subprocess.run(in_ns(["python3", "-c", code]), capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/soak"))
    a = ap.parse_args()
    s = Soak(a.minutes, a.out)
    try:
        s.go()
    finally:
        s.teardown()
    sys.exit(1 if s.failures else 0)


if __name__ == "__main__":
    main()
