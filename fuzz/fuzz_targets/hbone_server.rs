//! Fuzz target: the HBONE server fed arbitrary bytes as the client side of its
//! HTTP/2 connection (first byte: handler behaviour).
//! The body is `hbone_server` in mesh-core/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../mesh-core/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

use std::sync::OnceLock;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    smoke::hbone_server(RUNTIME.get_or_init(smoke::runtime), data);
});
