//! Bytes from a control API client into the API's HTTP parser (`ferry-http`), as the server
//! reads them: the whole input, and every prefix a slow client's reads would show first.
//!
//! What must hold: no panic; a request is decided by its own bytes (parsing exactly the bytes
//! it took gives the same request; no shorter prefix is a request, which would make the
//! server and the client split the stream differently), never takes more bytes than it was
//! given, and has a body within the limit; and input the parser still waits on is never more
//! than a head and a body (what the server buffers per connection is bounded).

#![no_main]

use ferry_http::{parse, Parsed, MAX_BODY, MAX_HEAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Parsed::Request(req, used) = &whole {
        assert!(*used <= data.len());
        assert!(req.body.len() <= MAX_BODY);
        assert!(!req.method.is_empty());
        match parse(&data[..*used]) {
            Parsed::Request(again, n) => assert!(n == *used && again == *req),
            other => panic!(
                "the request's own bytes parse otherwise: {:?}",
                name(&other)
            ),
        }
        // Every shorter prefix is partial or refused, never a request.
        for cut in [*used / 2, used.saturating_sub(1)] {
            if cut < *used {
                assert!(
                    !matches!(parse(&data[..cut]), Parsed::Request(..)),
                    "cut {cut}"
                );
            }
        }
    }
    if let Parsed::Partial { .. } = whole {
        assert!(data.len() <= MAX_HEAD + MAX_BODY);
    }
});

fn name(p: &Parsed) -> &'static str {
    match p {
        Parsed::Partial { .. } => "partial",
        Parsed::Request(..) => "a request",
        Parsed::Refused(_) => "refused",
    }
}
