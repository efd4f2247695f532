//! Deterministic mutation of seed corpora, shared by the stable fuzz smoke
//! tests (`mesh-core/tests/fuzz_smoke.rs`, `ztunnel/tests/fuzz_smoke.rs`) and,
//! through them, the libFuzzer targets in `fuzz/`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mutants are cut to this size, as the fuzz targets' inputs are.
pub const MAX_INPUT: usize = 32 * 1024;

/// One mutant: a random seed with one to four random edits (bit flips,
/// interesting bytes, insertions, deletions, copies, splices from other
/// seeds, dictionary tokens, truncation).
pub fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>], dict: &[&[u8]]) -> Vec<u8> {
    const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, b'0', b'9', b'%'];
    let mut v = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..=4) {
        let len = v.len();
        let at = rng.random_range(0..=len);
        match rng.random_range(0..9) {
            0 if len > 0 => v[at.min(len - 1)] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => {
                v[at.min(len - 1)] = if rng.random_bool(0.5) {
                    INTERESTING[rng.random_range(0..INTERESTING.len())]
                } else {
                    rng.random()
                }
            }
            2 => {
                let n = rng.random_range(1..=4);
                let fresh: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(at..at, fresh);
            }
            3 if at < len => {
                let end = rng.random_range(at..=len.min(at + 16));
                v.drain(at..end);
            }
            4 if len > 0 => {
                let start = rng.random_range(0..len);
                let end = rng.random_range(start..=len.min(start + 64));
                let chunk = v[start..end].to_vec();
                v.splice(at..at, chunk);
            }
            5 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let start = rng.random_range(0..other.len());
                    let end = rng.random_range(start..=other.len());
                    v.splice(at..at, other[start..end].iter().copied());
                }
            }
            6 if !dict.is_empty() => {
                let token = dict[rng.random_range(0..dict.len())];
                v.splice(at..at, token.iter().copied());
            }
            7 if !dict.is_empty() => {
                let token = dict[rng.random_range(0..dict.len())];
                let end = (at + token.len()).min(len);
                v.splice(at..end, token.iter().copied());
            }
            8 => v.truncate(at),
            _ => {}
        }
    }
    v.truncate(MAX_INPUT);
    v
}

/// With `MESH_FUZZ_SEEDS=<dir>` set, writes `seeds` to `<dir>/<target>/`
/// as the fuzzer's starting corpus.
pub fn dump_seeds(target: &str, seeds: &[Vec<u8>]) {
    let Some(dir) = std::env::var_os("MESH_FUZZ_SEEDS") else {
        return;
    };
    let dir = PathBuf::from(dir).join(target);
    std::fs::create_dir_all(&dir).expect("create seed dir");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s).expect("write seed");
    }
}

/// Runs `body` over the seeds, then over `mutants` mutations of them.
/// A panic is reported with the input that caused it.
pub fn run_corpus(
    target: &str,
    seeds: &[Vec<u8>],
    dict: &[&[u8]],
    mutants: usize,
    mut body: impl FnMut(&[u8]),
) {
    // A fixed seed per target: the same inputs on every run.
    let salt = target
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));
    let mut rng = StdRng::seed_from_u64(0x5eed ^ salt);
    let inputs = seeds
        .iter()
        .cloned()
        .chain((0..mutants).map(|_| mutate(&mut rng, seeds, dict)));
    for (i, input) in inputs.enumerate() {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| body(&input))) {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "{target}: input #{i} panicked: {msg}\ninput: \"{}\"",
                input.escape_ascii()
            );
        }
    }
}
