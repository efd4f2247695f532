//! Fuzz target: the `:authority`, `forwarded`, `baggage` and `traceparent`
//! values of an HBONE CONNECT.
//! The body is `hbone_headers` in mesh-core/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../mesh-core/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::hbone_headers(data));
