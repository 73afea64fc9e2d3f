#!/usr/bin/env python3
"""One backend, one step, by hand: for profiling, not for the tables (`make bench` makes those).

  bench/one.py net KIND MODE [--secs N] [--warm] [--irq] [--ferry BIN] [--after S] [--run 'CMD']
      KIND ferry|passt|slirp, MODE g2h|h2g|udp: one iperf3 run from the guest to the host's
      loopback (or back), in the bench's namespace; MODE rr|crr: the probe's 1-byte
      request/response over one connection, or a connection each, against the bench's echo
      server. Prints the rate, and the CPU of the backend and of QEMU's main-loop thread
      over the transfer.
  bench/one.py fs KIND [--reps N] [--ferry BIN] [--fio 'ARGS' | --meta] [--run 'CMD']
      KIND ferry|virtiofsd: N fio runs (default: 1 MiB sequential write) in one boot, or with
      --meta N rounds of the bench's metadata steps (10k files; untar, find, du).

FERRY_SHARE_OPTS in the environment is appended to Ferry's share (FERRY_SHARE_OPTS=,poll=0).

--run starts CMD (after --after seconds, for net) while the step runs; {pid} is the backend's
pid and {qpid} QEMU's. Examples:
  bench/one.py net ferry g2h --run 'perf record -g -o /tmp/p -p {pid} -- sleep 5'
  bench/one.py net passt g2h --run 'timeout 4 strace -c -p {qpid}'
  bench/one.py net ferry h2g --ferry /tmp/ferry-old      # A/B against another build
Needs root and what `make bench` installs; run it on a quiet machine.
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def net(b, a):
    if a.mode in ("rr", "crr"):
        step = 'echo "BENCH r $(/tmp/probe %s $H %d %d)"' % (a.mode, bench.ECHO_PORT, a.secs)
    else:
        extra = {"g2h": "", "h2g": "-R", "udp": "-u -b 0 -l 1400"}[a.mode]
        step = 'echo "BENCH r $(iperf3 -c $H -p 5201 -t %d %s -f m 2>&1 | grep receiver | tail -1)"' \
            % (a.secs, extra)
    # The probe comes through fw_cfg, slowly under TCG: fetched before the measured window.
    script = bench.Bench.GUEST_PIN + r"""
cat /sys/firmware/qemu_fw_cfg/by_name/opt/ferry/probe/raw > /tmp/probe; chmod +x /tmp/probe
H=$(tr ' ' '\n' < /proc/cmdline | grep '^bench.host=' | cut -d= -f2)
%s
echo BENCH-AT start
grep -E 'CPU0|virtio' /proc/interrupts | sed 's/^/BENCH-IRQ before /'; grep '^cpu' /proc/stat | sed 's/^/BENCH-IRQ before /'
%s
echo BENCH-AT end
grep -E 'virtio' /proc/interrupts | sed 's/^/BENCH-IRQ after /'; grep '^cpu' /proc/stat | sed 's/^/BENCH-IRQ after /'
sleep 3600
""" % ("iperf3 -c $H -p 5201 -t %d > /dev/null 2>&1" % a.secs if a.warm else "", step)
    dev, host, proc, stop = b.net_backend(a.kind)
    qemu, console = b.qemu("one", script, "bench.host=%s" % host, dev)
    qpid = bench.pid_of("opt/ferry/run,file=%s/one.sh" % b.w) or qemu.pid
    proc = proc or bench.Proc(qpid)
    qmain = bench.Proc(qpid, main_thread=True)

    def meter():
        return proc.cpu(), qmain.cpu()
    at = b.cpu_at_marks(console, qemu, meter, ["BENCH-AT start"])
    side = None
    if a.run:
        time.sleep(a.after)
        side = subprocess.Popen(a.run.format(pid=proc.pid, qpid=qpid), shell=True)
    at.update(b.cpu_at_marks(console, qemu, meter, ["BENCH-AT end"]))
    if side:
        side.wait()
    with open(console, errors="replace") as f:
        text = f.read().splitlines()
    line = [l for l in text if l.startswith("BENCH r")]
    start, end = at.get("BENCH-AT start"), at.get("BENCH-AT end")
    if a.mode in ("rr", "crr"):
        # The probe prints "rr N USEC" or "crr N PER_SECOND".
        fields = line[-1].split() if line else []
        if len(fields) != 5 or not start or not end:
            sys.exit("one: the exchange did not finish; console in %s" % console)
        unit = "µs per transaction" if a.mode == "rr" else "connections/s"
        print("%s %s: %s %s; %s done; backend %.2f s CPU, QEMU main loop %.2f s"
              % (a.kind, a.mode, fields[4], unit, fields[3], end[0] - start[0], end[1] - start[1]))
    else:
        rate, size = b.iperf_line(line[-1] if line else None)
        if rate is None or not start or not end:
            sys.exit("one: the transfer did not finish; console in %s" % console)
        gib = size / 1024
        print("%s %s: %.0f Mbit/s, %.0f MiB; backend %.2f s CPU (%.2f s/GiB), QEMU main loop "
              "%.2f s (%.2f s/GiB)" % (a.kind, a.mode, rate, size, end[0] - start[0],
                                       (end[0] - start[0]) / gib, end[1] - start[1],
                                       (end[1] - start[1]) / gib))
    if a.irq:
        print("\n".join(l[len("BENCH-IRQ "):] for l in text if l.startswith("BENCH-IRQ ")))
    qemu.kill()
    qemu.wait()
    stop()
    if a.kind == "ferry":
        with open(os.path.join(b.w, "ferry-net.log")) as f:
            # Ferry's counters, logged as the frontend left.
            print("".join(l for l in f if "the guest has sent" in l).strip())


def fs(b, a):
    drop = "drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }\n"
    if a.meta:
        b.FS_STEPS = drop + b.FS_META_STEPS * a.reps
        b.tar = b.make_tree_tar()
    else:
        # parse_fs reads the read side of a job whose name says "read", else the write side.
        which = "read" if "--rw=read" in a.fio or "--rw=randread" in a.fio else "write"
        b.FS_STEPS = drop + "".join(
            'echo "BENCH-FIO %s%d $(fio --output-format=json %s 2>/dev/null | tr -d \'\\n\')"\n'
            'drop\n' % (which, i, a.fio) for i in range(a.reps)) + "rm -f $D/big\n"
        b.tar = os.path.join(b.w, "empty.tar")
        open(b.tar, "w").close()
    side = subprocess.Popen(a.run, shell=True) if a.run else None
    b.run_fs(a.kind)
    if side:
        side.wait()
    if a.meta:
        for (suite, metric, _), v in sorted(b.results.items()):
            unit = "s" if metric in ("untar", "find", "du") else "files/s"
            print("%s %s: %s %s" % (a.kind, metric, " ".join("%.3g" % x for x in v), unit))
        print("%s: %.1f s of backend CPU in the whole boot" % (a.kind, b.cost[("fs", a.kind)][-1][0]))
        return
    vals = [round(v[0], 1) for (suite, _, _), v in sorted(b.results.items()) if suite == "fs"]
    cpu, gib, peak, _ = b.cost[("fs", a.kind)][-1]
    print("%s: MiB/s per run %s; %.2f s CPU per GiB, peak RSS %.0f MiB"
          % (a.kind, vals, cpu / gib if gib else 0, peak))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="suite", required=True)
    n = sub.add_parser("net")
    n.add_argument("kind", choices=["ferry", "passt", "slirp"])
    n.add_argument("mode", choices=["g2h", "h2g", "udp", "rr", "crr"])
    n.add_argument("--secs", type=int, default=10)
    n.add_argument("--after", type=float, default=3.0)
    n.add_argument("--warm", action="store_true",
                   help="a guest-to-host transfer first, in the same boot (as the bench does)")
    n.add_argument("--irq", action="store_true",
                   help="print the guest's virtio interrupt counts before and after the transfer")
    f = sub.add_parser("fs")
    f.add_argument("kind", choices=["ferry", "virtiofsd"])
    f.add_argument("--reps", type=int, default=3)
    f.add_argument("--meta", action="store_true",
                   help="the bench's metadata steps (files, untar, find, du) instead of fio")
    f.add_argument("--fio", default="--name=w --directory=$D --filename=big --rw=write --bs=1M "
                   "--size=256M --ioengine=psync --end_fsync=1")
    for p in (n, f):
        p.add_argument("--ferry", default=bench.FERRY)
        p.add_argument("--run", default="")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("one: run as root (it makes a network namespace and drops caches)")
    bench.FERRY = a.ferry

    class Opts:
        quick = False
        rounds = 1
    b = bench.Bench(Opts)
    b.setup()
    try:
        (net if a.suite == "net" else fs)(b, a)
    finally:
        b.teardown()


if __name__ == "__main__":
    main()
