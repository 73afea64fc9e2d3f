#!/usr/bin/env python3
"""Test hosts for the network tests, run inside a test network namespace.

    testhosts.py ADDR [--echo PORT]... [--dns PORT NAME=IP...]

--echo PORT   a UDP echo server on ADDR:PORT
--echo-late PORT MS    a UDP echo server answering each datagram MS milliseconds late
--dns PORT    a DNS server on ADDR:PORT answering A queries for the NAME=IP pairs that follow,
              NXDOMAIN for other names
--tcp-blob PORT SIZE   a TCP server sending SIZE bytes of the pattern (i*7+3)&255, then closing
--tcp-sha PORT SIZE    a TCP server reading SIZE bytes, answering their sha256 (hex), closing
--tcp-hold PORT        a TCP server that keeps each connection open until the peer closes it
--tcp-echo PORT        a TCP echo server
--http PORT DIR        an HTTP server for the files in DIR; POST or PUT answers the sha256
                       of the body
--http-unix PATH DIR   an HTTP server for the files in DIR on the UNIX socket PATH (ADDR unused)
--tls-front PORT HOST TOPORT CERT KEY
                       TLS in front of the TCP server HOST:TOPORT (as stunnel is), with the
                       certificate and key the test made: an https:// proxy from squid
--fake-proxy PORT      an upstream proxy stand-in: answers CONNECT with 200 and then echoes;
                       answers any other request with 200 and the body
                       "upstream saw: REQUEST-LINE" (what it was sent, unchanged)

Prints "ready" once every socket is bound. Runs until killed. Only ever answers; it never
sends anything unprompted.
"""
import hashlib
import select
import socket
import struct
import sys
import threading


def pattern(size):
    block = bytes(((i * 7 + 3) & 255) for i in range(256 * 1024))
    out = bytearray()
    while len(out) < size:
        out += block
    return bytes(out[:size])


def family(addr):
    """The address family of `addr`: test hosts listen on IPv4 or IPv6 addresses."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def serve_tcp(addr, port, handler):
    srv = socket.socket(family(addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1024)

    def loop():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def blob_handler(size):
    data = pattern(size)

    def handle(conn):
        try:
            conn.sendall(data)
        finally:
            conn.close()

    return handle


def sha_handler(size):
    def handle(conn):
        h, left = hashlib.sha256(), size
        try:
            while left > 0:
                chunk = conn.recv(min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            conn.sendall((h.hexdigest() + "\n").encode())
        finally:
            conn.close()

    return handle


def dns_answer(query, names):
    if len(query) < 12:
        return None
    qid, flags, qd = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qd != 1:
        return None
    pos, labels = 12, []
    while pos < len(query) and query[pos] != 0:
        n = query[pos]
        labels.append(query[pos + 1:pos + 1 + n].decode("ascii", "replace").lower())
        pos += 1 + n
    end = pos + 5
    if end > len(query):
        return None
    qtype = struct.unpack("!H", query[pos + 1:pos + 3])[0]
    name = ".".join(labels)
    ips = names.get(name)
    rd = flags & 0x0100
    if ips is None:
        return struct.pack("!HHHHHH", qid, 0x8080 | rd | 3, 1, 0, 0, 0) + query[12:end]
    # A names the IPv4 addresses given, AAAA the IPv6 ones.
    answers = b""
    count = 0
    for ip in ips:
        if qtype == 1 and ":" not in ip:
            answers += struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(ip)
        elif qtype == 28 and ":" in ip:
            answers += struct.pack("!HHHIH", 0xC00C, 28, 1, 60, 16)
            answers += socket.inet_pton(socket.AF_INET6, ip)
        else:
            continue
        count += 1
    return struct.pack("!HHHHHH", qid, 0x8480 | rd, 1, count, 0, 0) + query[12:end] + answers


def echo_handler(conn):
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
    finally:
        conn.close()


def hold_handler(conn):
    try:
        while conn.recv(65536):
            pass
    finally:
        conn.close()


def fake_proxy_handler(conn):
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(65536)
            if not data:
                return
            head += data
        head, rest = head.split(b"\r\n\r\n", 1)
        line = head.split(b"\r\n", 1)[0]
        if line.upper().startswith(b"CONNECT "):
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n" + rest)
            echo_handler(conn)
            return
        body = b"upstream saw: " + line + b"\n"
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    finally:
        conn.close()


def file_handler(directory):
    """The handler of --http and --https: the files in `directory` for GET and HEAD, and for
    POST or PUT the sha256 (hex) of the body it was sent (an upload's check)."""
    import functools
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            left = int(self.headers.get("Content-Length", "0"))
            h = hashlib.sha256()
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            body = h.hexdigest().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_POST

    return functools.partial(Handler, directory=directory)


def serve_http(addr, port, directory):
    import http.server

    class Server(http.server.ThreadingHTTPServer):
        address_family = family(addr)

    srv = Server((addr, port), file_handler(directory))
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def serve_https(addr, port, directory, cert, key):
    """serve_http behind TLS, with the certificate and key the test made."""
    import http.server
    import ssl

    class Server(http.server.ThreadingHTTPServer):
        address_family = family(addr)

    srv = Server((addr, port), file_handler(directory))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def serve_tls_front(addr, port, host, to_port, cert, key):
    """Takes TLS on addr:port and relays the plaintext to host:to_port, both ways."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def handle(conn):
        # One thread, both directions: an SSL socket is not for two threads at once.
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        back = socket.create_connection((host, to_port))
        try:
            while True:
                ready, _, _ = select.select([tls, back], [], [])
                if tls in ready:
                    data = tls.recv(65536)
                    while data and tls.pending():
                        data += tls.recv(tls.pending())
                    if not data:
                        break
                    back.sendall(data)
                if back in ready:
                    data = back.recv(65536)
                    if not data:
                        break
                    tls.sendall(data)
        except (ssl.SSLError, OSError):
            pass
        finally:
            back.close()
            tls.close()

    serve_tcp(addr, port, handle)


def serve_http_unix(path, directory):
    import functools
    import http.server
    import os
    import socketserver

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def address_string(self):
            return "unix"

    class Server(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True

    if os.path.exists(path):
        os.unlink(path)
    srv = Server(path, functools.partial(Quiet, directory=directory))
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def main():
    addr, args = sys.argv[1], sys.argv[2:]
    echo, dns, late = [], [], []
    names = {}
    i = 0
    while i < len(args):
        if args[i] == "--echo":
            echo.append(int(args[i + 1]))
            i += 2
        elif args[i] == "--echo-late":
            late.append((int(args[i + 1]), int(args[i + 2])))
            i += 3
        elif args[i] == "--dns":
            dns.append(int(args[i + 1]))
            i += 2
            while i < len(args) and "=" in args[i]:
                k, v = args[i].split("=", 1)
                names.setdefault(k.lower(), []).append(v)
                i += 1
        elif args[i] == "--tcp-echo":
            serve_tcp(addr, int(args[i + 1]), echo_handler)
            i += 2
        elif args[i] == "--fake-proxy":
            serve_tcp(addr, int(args[i + 1]), fake_proxy_handler)
            i += 2
        elif args[i] == "--tcp-hold":
            serve_tcp(addr, int(args[i + 1]), hold_handler)
            i += 2
        elif args[i] == "--http":
            serve_http(addr, int(args[i + 1]), args[i + 2])
            i += 3
        elif args[i] == "--https":
            serve_https(addr, int(args[i + 1]), args[i + 2], args[i + 3], args[i + 4])
            i += 5
        elif args[i] == "--tls-front":
            serve_tls_front(addr, int(args[i + 1]), args[i + 2], int(args[i + 3]), args[i + 4], args[i + 5])
            i += 6
        elif args[i] == "--http-unix":
            serve_http_unix(args[i + 1], args[i + 2])
            i += 3
        elif args[i] in ("--tcp-blob", "--tcp-sha"):
            port, size = int(args[i + 1]), int(args[i + 2])
            handler = blob_handler(size) if args[i] == "--tcp-blob" else sha_handler(size)
            serve_tcp(addr, port, handler)
            i += 3
        else:
            sys.exit("testhosts: unknown argument " + args[i])
    socks = {}
    for port in echo:
        s = socket.socket(family(addr), socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((addr, port))
        socks[s] = "echo"
    for port, ms in late:
        s = socket.socket(family(addr), socket.SOCK_DGRAM)
        s.bind((addr, port))

        def echo_late(s=s, ms=ms):
            while True:
                data, peer = s.recvfrom(65535)
                threading.Timer(ms / 1000, s.sendto, (data, peer)).start()

        threading.Thread(target=echo_late, daemon=True).start()
    for port in dns:
        s = socket.socket(family(addr), socket.SOCK_DGRAM)
        s.bind((addr, port))
        socks[s] = "dns"

        def dns_tcp(conn, names=names):
            # Length-prefixed queries and answers, as long as the client sends.
            try:
                while True:
                    head = conn.recv(2)
                    if len(head) < 2:
                        break
                    (n,) = struct.unpack("!H", head)
                    q = b""
                    while len(q) < n:
                        chunk = conn.recv(n - len(q))
                        if not chunk:
                            return
                        q += chunk
                    a = dns_answer(q, names)
                    if a is None:
                        break
                    conn.sendall(struct.pack("!H", len(a)) + a)
            finally:
                conn.close()

        serve_tcp(addr, port, dns_tcp)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(list(socks), [], [])
        for s in ready:
            data, peer = s.recvfrom(65535)
            reply = data if socks[s] == "echo" else dns_answer(data, names)
            if reply is not None:
                s.sendto(reply, peer)


if __name__ == "__main__":
    main()
