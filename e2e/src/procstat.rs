//! Small helpers the benchmark binaries share: a process's CPU time from
//! `/proc`, and `NAME=VALUE` flags.

#![forbid(unsafe_code)]

use std::fs;

/// utime + stime of a process (all its threads), in clock ticks; 0 if it
/// is gone.
pub fn process_jiffies(pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name is in parentheses and may contain spaces: count
    // fields after the last ')'; utime and stime are fields 14 and 15, the
    // 12th and 13th after it.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

/// Parses a `NAME=VALUE` command-line value (an environment override).
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_flags_and_own_cpu_time() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("nothing").is_err());
        // Burn a little CPU so the count cannot stay at zero.
        let mut x = 0u64;
        while process_jiffies(std::process::id()) == 0 {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert!(process_jiffies(u32::MAX) == 0, "{x}");
    }
}
