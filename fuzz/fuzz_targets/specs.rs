//! What users and clients type: port specs, rule specs, proxy upstreams, bypass lists, PAC
//! answers, id maps, cache
//! policies, a resolv.conf, and DNS queries as the gateway's DNS server parses and answers
//! them. A spec that parses prints back to one that parses the same.

#![no_main]

use ferry_net::rules::RuleSpec;
use ferry_net::{NetConfig, PortSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(p) = s.parse::<PortSpec>() {
            let again: PortSpec = p.to_string().parse().expect("a printed port spec parses");
            assert_eq!(again, p);
        }
        if let Ok(r) = s.parse::<RuleSpec>() {
            let again: RuleSpec = r.to_string().parse().expect("a printed rule parses");
            assert_eq!(again.to_string(), r.to_string());
        }
        let _ = s.parse::<ferry_net::proxy::Upstream>();
        if let Ok(b) = s.parse::<ferry_net::proxy::Bypass>() {
            let _ = b.matches(s, 80);
        }
        let _ = ferry_net::proxy::pac::parse_answer(s);
        let _ = s.parse::<ferry_fs::CachePolicy>();
        let _ = ferry_fs::IdMap::parse(s);
        let _ = ferry_net::dns::upstream_from_resolv_conf(s);
    }
    let cfg = NetConfig::default();
    let _ = ferry_net::dns::parse_query(data);
    let _ = ferry_net::dns::answer(&cfg, data, true);
    let _ = ferry_net::dns::answer(&cfg, data, false);
    let _ = ferry_net::dhcp::reply(&cfg, data);
});
