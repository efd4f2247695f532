//! Fuzz target: one manifest file of istiod-lite's config folder through
//! its parser and the Workload API translation.
//! The body is `istiod_dir` in istiod-lite/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../istiod-lite/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::istiod_dir(data));
