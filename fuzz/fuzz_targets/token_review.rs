//! Fuzz target: a TokenReview status (JSON) through the CA's caller mapping.
//! The body is `token_review` in istiod-lite/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../istiod-lite/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::token_review(data));
