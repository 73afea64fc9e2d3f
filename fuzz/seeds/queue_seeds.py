#!/usr/bin/env python3
"""Writes seeds for the queue_chains fuzz target (fuzz/seeds/queue_chains/): guest-memory
images holding well-formed rings, as a guest driver lays them out, for the fuzzer to mutate.

Each seed is one settings byte, then a 64 KiB image at guest address 0: the descriptor table
at 0, avail rings at 0x1000 and 0x1800, used rings at 0x3000 and 0x4000 (as the target
expects). Run it from anywhere: python3 fuzz/seeds/queue_seeds.py
"""
import os
import struct

MEM = 0x10000
NEXT, WRITE, INDIRECT = 1, 2, 4
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "queue_chains")


def image():
    return bytearray(MEM)


def desc(m, table, i, addr, length, flags=0, nxt=0):
    struct.pack_into("<QIHH", m, table + 16 * i, addr, length, flags, nxt)


def avail(m, at, heads):
    struct.pack_into("<HH", m, at, 0, len(heads))
    for k, h in enumerate(heads):
        struct.pack_into("<H", m, at + 4 + 2 * k, h)


def fuse(opcode, unique, nodeid, body):
    return struct.pack("<IIQQIIII", 40 + len(body), opcode, unique, nodeid, 0, 0, 0, 0) + body


def settings(net, size_exp, event_idx=False, mrg=False):
    return bytes([int(net) | ((size_exp - 1) << 1) | (0x10 if event_idx else 0) | (0x20 if mrg else 0)])


def write(name, s, m):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(s + bytes(m))


def main():
    os.makedirs(OUT, exist_ok=True)
    # fs: GETATTR of the root, a readable header and a writable reply buffer.
    m = image()
    req = fuse(3, 2, 1, struct.pack("<IIQ", 0, 0, 0))
    m[0x8000:0x8000 + len(req)] = req
    desc(m, 0, 0, 0x8000, len(req), NEXT, 1)
    desc(m, 0, 1, 0x9000, 4096, WRITE)
    avail(m, 0x1000, [0])
    write("fs-getattr", settings(False, 4), m)
    # fs: LOOKUP "f" then READ through an indirect table, with EVENT_IDX.
    m = image()
    lookup = fuse(1, 3, 1, b"f\0")
    m[0x8000:0x8000 + len(lookup)] = lookup
    desc(m, 0, 0, 0x8000, len(lookup), NEXT, 1)
    desc(m, 0, 1, 0x9000, 256, WRITE)
    read = fuse(15, 4, 2, struct.pack("<QQIIQII", 0, 0, 4096, 0, 0, 0, 0))
    m[0xA000:0xA000 + len(read)] = read
    desc(m, 0x5000, 0, 0xA000, len(read), NEXT, 1)
    desc(m, 0x5000, 1, 0xB000, 40, WRITE | NEXT, 2)
    desc(m, 0x5000, 2, 0xC000, 4096, WRITE)
    desc(m, 0, 2, 0x5000, 48, INDIRECT)
    avail(m, 0x1000, [0, 2])
    write("fs-lookup-read-indirect", settings(False, 4, event_idx=True), m)
    # net: an ARP request for the gateway on TX, two RX buffers for the answer.
    m = image()
    arp = (b"\xff" * 6 + bytes.fromhex("525400123456") + b"\x08\x06"
           + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + bytes.fromhex("525400123456")
           + bytes([192, 168, 127, 2]) + b"\0" * 6 + bytes([192, 168, 127, 1]))
    frame = bytes(12) + arp
    m[0x8000:0x8000 + len(frame)] = frame
    desc(m, 0, 0, 0x8000, len(frame))
    desc(m, 0, 2, 0xA000, 2048, WRITE)
    desc(m, 0, 3, 0xB000, 2048, WRITE)
    avail(m, 0x1000, [0])
    avail(m, 0x1800, [2, 3])
    write("net-arp", settings(True, 4), m)
    write("net-arp-mrg-event-idx", settings(True, 4, event_idx=True, mrg=True), m)


if __name__ == "__main__":
    main()
