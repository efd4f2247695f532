//! Fuzz target: the network configuration on the CNI plugin's stdin
//! through `cni_plugin::run` for VERSION, ADD, CHECK and DEL.
//! The body is `cni_config` in cni-plugin/tests/fuzz_smoke.rs.

#![no_main]

#[path = "../../cni-plugin/tests/fuzz_smoke.rs"]
#[allow(dead_code, unused_imports)]
mod smoke;

libfuzzer_sys::fuzz_target!(|data: &[u8]| smoke::cni_config(data));
