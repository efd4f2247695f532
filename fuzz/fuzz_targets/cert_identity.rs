//! Fuzz target: the URI SAN of a peer certificate's DER (`identity_from_cert`).
//! The body is `cert_identity` in mesh-core/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../mesh-core/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::cert_identity(data));
