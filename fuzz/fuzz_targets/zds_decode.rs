//! Fuzz target: ZDS messages as prost decodes them (`WorkloadRequest`,
//! `WorkloadResponse`, `ZdsHello`, `WorkloadInfo`).
//! The body is `zds_decode` in mesh-core/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../mesh-core/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::zds_decode(data));
