//! Fuzz target: one message from the node agent to a real `ZdsClient` over
//! SOCK_SEQPACKET (first byte: attach a descriptor).
//! The body is `zds_client` in mesh-core/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../mesh-core/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

use std::sync::OnceLock;

static HARNESS: OnceLock<smoke::ZdsHarness> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    smoke::zds_client(HARNESS.get_or_init(smoke::ZdsHarness::new), data);
});
