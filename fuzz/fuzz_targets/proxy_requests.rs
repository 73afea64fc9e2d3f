//! Request heads into the gateway HTTP proxy's parser and the heads it would send on;
//! the same bytes as an intercepted head, a response head and a TLS ClientHello.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((through, direct)) = ferry_net::proxy::fuzzing::request_head(data) {
        // What goes on is itself one request head.
        for head in [through, direct] {
            assert!(head.ends_with(b"\r\n\r\n"), "{head:?}");
        }
    }
    if let Some(head) = ferry_net::proxy::fuzzing::intercepted_head(data) {
        assert!(head.ends_with(b"\r\n\r\n"), "{head:?}");
    }
    if let Some(head) = ferry_net::proxy::fuzzing::response_head(data) {
        assert!(head.ends_with(b"\r\n\r\n"), "{head:?}");
    }
    if let Some(name) = ferry_net::proxy::fuzzing::client_hello(data) {
        assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
    }
});
