//! Fuzz target: a DNS query to the local mesh's cluster DNS server.
//! The body is `cluster_dns` in e2e/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../e2e/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::cluster_dns(data));
