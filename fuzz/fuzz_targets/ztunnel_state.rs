//! Fuzz target: Workload API resources (protobuf) through ztunnel's state
//! conversion, replacement and lookups.
//! The body is `ztunnel_state` in ztunnel/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../ztunnel/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::ztunnel_state(data));
