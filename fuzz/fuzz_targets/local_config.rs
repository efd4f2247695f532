//! Fuzz target: the local state file (YAML or JSON).
//! The body is `local_config` in mesh-core/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../mesh-core/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::local_config(data));
