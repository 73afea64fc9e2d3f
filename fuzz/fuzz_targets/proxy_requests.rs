//! Request heads into the gateway HTTP proxy's parser and the heads it would send on.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((through, direct)) = ferry_net::proxy::fuzzing::request_head(data) {
        // What goes on is itself one request head.
        for head in [through, direct] {
            assert!(head.ends_with(b"\r\n\r\n"), "{head:?}");
        }
    }
});
