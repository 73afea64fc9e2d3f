#!/usr/bin/env python3
"""Seeds for the guest_frames fuzz target from a capture of real guest traffic.

  pcap_to_seeds.py CAPTURE.pcap OUT_DIR

Takes the frames the guest sent (its MAC is the source of the first frame), and writes one
input per frame plus one per run of 16, in the target's format: each frame preceded by its
length as two little-endian bytes. `ferry run --pcap FILE` makes such a capture.
"""
import hashlib
import os
import struct
import sys


def frames(path):
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic != 0xA1B2C3D4:
        sys.exit("%s: not a little-endian libpcap file" % path)
    off = 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from("<IIII", data, off)
        off += 16
        yield data[off : off + incl]
        off += incl


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    all_frames = list(frames(src))
    guest = all_frames[0][6:12]
    from_guest = [f for f in all_frames if f[6:12] == guest and len(f) <= 0xFFFF]
    inputs = [[f] for f in from_guest]
    inputs += [from_guest[i : i + 16] for i in range(0, len(from_guest), 16)]
    for group in inputs:
        blob = b"".join(struct.pack("<H", len(f)) + f for f in group)
        name = hashlib.sha1(blob).hexdigest()
        with open(os.path.join(out, name), "wb") as f:
            f.write(blob)
    print("%d frames from the guest, %d inputs in %s" % (len(from_guest), len(inputs), out))


if __name__ == "__main__":
    main()
