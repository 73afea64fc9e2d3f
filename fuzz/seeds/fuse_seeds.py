#!/usr/bin/env python3
"""Seeds for the fuse_requests fuzz target: request sequences as a guest kernel sends them.

  fuse_seeds.py OUT_DIR

The target serves a folder holding a file `f` and a folder `d`, and has answered INIT; node
ids count from 2 and file handles from 1 in the order the requests below make them.
"""
import hashlib
import os
import struct
import sys

OP = dict(LOOKUP=1, FORGET=2, GETATTR=3, SETATTR=4, READLINK=5, SYMLINK=6, MKNOD=8, MKDIR=9,
          UNLINK=10, RMDIR=11, RENAME=12, LINK=13, OPEN=14, READ=15, WRITE=16, STATFS=17,
          RELEASE=18, FSYNC=20, SETXATTR=21, GETXATTR=22, LISTXATTR=23, REMOVEXATTR=24,
          FLUSH=25, OPENDIR=27, READDIR=28, RELEASEDIR=29, GETLK=31, SETLK=32, ACCESS=34,
          CREATE=35, BATCH_FORGET=42, FALLOCATE=43, READDIRPLUS=44, RENAME2=45, LSEEK=46,
          COPY_FILE_RANGE=47)
unique = 0


def msg(op, node, body=b"", uid=0, gid=0):
    global unique
    unique += 1
    hdr = struct.pack("<IIQQIIII", 40 + len(body), OP[op], unique, node, uid, gid, 1, 0)
    return hdr + body


def name(s):
    return s.encode() + b"\0"


def rw(fh, off, size):
    return struct.pack("<QQIIQII", fh, off, size, 0, 0, 0, 0)


def setattr(valid, mode=0, uid=0, gid=0, size=0):
    return struct.pack("<IIQQQQQQIIIIIIII", valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0,
                       uid, gid, 0)


SEEDS = {
    "read": [msg("LOOKUP", 1, name("f")), msg("GETATTR", 2, struct.pack("<IIQ", 0, 0, 0)),
             msg("OPEN", 2, struct.pack("<II", 0, 0)), msg("READ", 2, rw(1, 0, 4096)),
             msg("FLUSH", 2, struct.pack("<QIIQ", 1, 0, 0, 0)),
             msg("RELEASE", 2, struct.pack("<QIIQ", 1, 0, 0, 0)), msg("FORGET", 2, struct.pack("<Q", 1))],
    "create-write": [msg("CREATE", 1, struct.pack("<IIII", 0o2, 0o100644, 0o22, 0) + name("n")),
                     msg("WRITE", 2, rw(1, 0, 5) + b"hello"),
                     msg("SETATTR", 2, setattr(1 | 2 | 4, mode=0o4755, uid=999, gid=999)),
                     msg("FSYNC", 2, struct.pack("<QII", 1, 0, 0)),
                     msg("LSEEK", 2, struct.pack("<QQII", 1, 0, 3, 0)),
                     msg("FALLOCATE", 2, struct.pack("<QQQII", 1, 0, 8192, 0, 0)),
                     msg("RELEASE", 2, struct.pack("<QIIQ", 1, 0, 0, 0))],
    "dirs": [msg("MKDIR", 1, struct.pack("<II", 0o755, 0o22) + name("sub")),
             msg("OPENDIR", 1, struct.pack("<II", 0, 0)), msg("READDIRPLUS", 1, rw(1, 0, 4096)),
             msg("READDIR", 1, rw(1, 0, 4096)), msg("RELEASEDIR", 1, struct.pack("<QIIQ", 1, 0, 0, 0)),
             msg("RENAME2", 1, struct.pack("<QII", 1, 1, 0) + name("sub") + name("sub2")),
             msg("RMDIR", 1, name("sub2")),
             msg("SYMLINK", 1, name("l") + name("../../etc/passwd")), msg("READLINK", 3),
             msg("UNLINK", 1, name("l"))],
    "xattr-locks": [msg("LOOKUP", 1, name("f")),
                    msg("SETXATTR", 2, struct.pack("<II", 4, 0) + name("user.x") + b"blue"),
                    msg("GETXATTR", 2, struct.pack("<II", 64, 0) + name("user.x")),
                    msg("LISTXATTR", 2, struct.pack("<II", 0, 0)),
                    msg("REMOVEXATTR", 2, name("user.x")),
                    msg("OPEN", 2, struct.pack("<II", 2, 0)),
                    msg("SETLK", 2, struct.pack("<QQQQIIII", 1, 7, 0, 100, 1, 42, 0, 0)),
                    msg("GETLK", 2, struct.pack("<QQQQIIII", 1, 8, 0, 100, 1, 43, 0, 0)),
                    msg("ACCESS", 2, struct.pack("<II", 4, 0), uid=1000, gid=1000),
                    msg("STATFS", 1)],
}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for key, msgs in SEEDS.items():
        blob = b"".join(msgs)
        with open(os.path.join(out, key), "wb") as f:
            f.write(blob)
    print("%d seeds in %s" % (len(SEEDS), out))


if __name__ == "__main__":
    main()
