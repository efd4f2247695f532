//! Fuzz target: SPIFFE ids as text, and the parts given to `Identity::try_new`.
//! The body is `identity` in mesh-core/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../mesh-core/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::identity(data));
