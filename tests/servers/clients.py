#!/usr/bin/env python3
"""Host-side clients for the published-port tests, run inside a test namespace.

  clients.py udp HOST PORT MSG       send MSG, print the reply (or "timeout")
  clients.py peer HOST PORT          connect, print the line the server sends (or the error)
  clients.py range HOST FIRST LAST   one such client per port of the range; prints "GOT of N"
  clients.py many HOST PORT N [SECS] N clients at once, each reads its line (SECS to connect and
                                     read, default 60); prints "OK of N"
                                     and then each distinct line prefix (the part before ':')
  clients.py probe HOST PORT         connect and read: prints "data", "reset", "refused",
                                     "closed" or "timeout", then the seconds it took
  clients.py churn HOST PORT N       N connections one after another, each closed at once;
                                     prints "N done, E errors"
  clients.py stall HOST PORT PATH S  asks for PATH over HTTP and reads nothing for S seconds
  clients.py resetmid HOST PORT PATH N  asks for PATH, reads N bytes, then resets the
                                     connection; prints "read N"
"""
import socket
import struct
import sys
import threading
import time


def read_line(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def peer(host, port, timeout=30):
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return read_line(s)
    except OSError as e:
        return "error: %s" % (e.__class__.__name__)


def main():
    cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if cmd == "udp":
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        msg = sys.argv[4].encode()
        for _ in range(5):
            s.sendto(msg, (host, port))
            try:
                data, _ = s.recvfrom(65536)
                print(data.decode(errors="replace"))
                return
            except socket.timeout:
                continue
        print("timeout")
    elif cmd == "peer":
        print(peer(host, port))
    elif cmd == "range":
        # range HOST FIRST LAST: one client per port; prints how many got their line.
        last = int(sys.argv[4])
        got = sum(1 for p in range(port, last + 1) if not peer(host, p, 10).startswith("error"))
        print("%d of %d" % (got, last - port + 1))
    elif cmd in ("stall", "resetmid"):
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(("GET %s HTTP/1.0\r\n\r\n" % sys.argv[4]).encode())
        if cmd == "stall":
            time.sleep(float(sys.argv[5]))
            return
        want, got = int(sys.argv[5]), 0
        while got < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        print("read %d" % got)
    elif cmd == "churn":
        n, errors, kinds = int(sys.argv[4]), 0, set()
        for _ in range(n):
            try:
                socket.create_connection((host, port), timeout=10).close()
            except OSError as e:
                errors += 1
                kinds.add(e.__class__.__name__)
        print("%d done, %d errors" % (n, errors) + "".join(" " + k for k in sorted(kinds)))
    elif cmd == "many":
        n = int(sys.argv[4])
        timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 60
        results = [None] * n
        start = threading.Barrier(n)

        def one(i):
            start.wait()
            results[i] = peer(host, port, timeout=timeout)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for r in results if r and not r.startswith("error")]
        print("%d of %d" % (len(ok), n))
        for prefix in sorted({r.split(":")[0] for r in results if r}):
            print(prefix)
    elif cmd == "probe":
        t0 = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                s.settimeout(10)
                data = s.recv(1)
                what = "data" if data else "closed"
        except ConnectionResetError:
            what = "reset"
        except ConnectionRefusedError:
            what = "refused"
        except socket.timeout:
            what = "timeout"
        print("%s %.2f" % (what, time.monotonic() - t0))
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
