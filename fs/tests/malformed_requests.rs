//! Hostile input: many thousands of random and half-valid requests against `PassthroughFs`
//! behind the server. Every one must be answered (or refused) without a panic or a hang.

use std::mem::size_of;

use ferry_fs::abi::{opcode, InHeader};
use ferry_fs::membuf::{ReplyBuf, RequestBuf};
use ferry_fs::passthrough::Config;
use ferry_fs::{PassthroughFs, Server};
use vm_memory::ByteValued;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn random_requests_never_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("f"), b"some data").unwrap();
    let server = Server::new(PassthroughFs::new(dir.path(), Config::default()).unwrap());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Names that exist, so that some requests get past LOOKUP into deeper code.
    let names: [&[u8]; 6] = [b"f\0", b"d\0", b"..\0", b".\0", b"new\0", b"d\0f\0"];
    let mut answered = 0u32;
    for i in 0..60_000u32 {
        let op = match rng.below(60) as u32 {
            // SETLKW on a lock some other random request holds would wait for ever, and a
            // random FALLOCATE could reserve real disk space.
            opcode::SETLKW => opcode::SETLK,
            opcode::FALLOCATE => opcode::LSEEK,
            o => o,
        };
        // Half the bodies have the size of some argument struct, so decoding gets further.
        let body_len = if rng.below(2) == 0 {
            [0, 8, 16, 24, 32, 40, 48, 56, 88][rng.below(9) as usize]
        } else {
            rng.below(200) as usize
        };
        // Small values make handles, sizes and offsets that exist more likely.
        let small = rng.below(2) == 0;
        let mut body: Vec<u8> = (0..body_len)
            .map(|_| {
                if small {
                    rng.below(4) as u8
                } else {
                    rng.next() as u8
                }
            })
            .collect();
        if rng.below(2) == 0 {
            // A plausible tail: a real name after random fixed-size arguments.
            body.extend_from_slice(names[rng.below(names.len() as u64) as usize]);
        }
        let nodeid = match rng.below(5) {
            0 => 0,
            1 => 1,
            2 => 2,
            3 => rng.below(64),
            _ => rng.next(),
        };
        let total = size_of::<InHeader>() + body.len();
        let len = if rng.below(8) == 0 {
            rng.next() as u32
        } else {
            total as u32
        };
        let hdr = InHeader {
            len,
            opcode: op,
            unique: u64::from(i),
            nodeid,
            uid: if rng.below(2) == 0 { 0 } else { 1000 },
            gid: 0,
            pid: 1,
            ..Default::default()
        };
        let mut req = hdr.as_slice().to_vec();
        req.extend_from_slice(&body);
        if rng.below(16) == 0 {
            req.truncate(rng.below(req.len() as u64) as usize);
        }
        let room = match rng.below(4) {
            0 => rng.below(32) as usize,
            1 => 16,
            _ => 8192,
        };
        let reply = ReplyBuf::new(room);
        match server.handle_message(RequestBuf::new(req), reply.clone()) {
            // A reply, when there is one, is whole: its length field says what was written.
            Ok(n) if n >= 16 => {
                let bytes = reply.bytes(n);
                if bytes[4..8] == [0; 4] {
                    answered += 1;
                }
                let said = u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize;
                assert_eq!(said, n, "request {i} (op {op}): reply length field");
            }
            Ok(_) | Err(_) => {}
        }
    }
    // Enough of them were valid to reach the file system, not just the decoder.
    assert!(answered > 1000, "only {answered} requests succeeded");
    assert!(server.stats().malformed() > 0);
    assert!(server.stats().errors() > 0);
}
