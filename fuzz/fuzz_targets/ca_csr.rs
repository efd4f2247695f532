//! Fuzz target: a caller's CSR through `csr_identities` and
//! `CertificateAuthority::sign_csr` (first byte: DER or PEM text).
//! The body is `ca_csr` in mesh-core/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../mesh-core/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::ca_csr(data));
