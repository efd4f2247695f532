//! Fuzz target: delta xDS responses (Workload API addresses and
//! authorizations) through ztunnel's `StateHandler`, then lookups.
//! The body is `ztunnel_xds` in ztunnel/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../ztunnel/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::ztunnel_xds(data));
