//! Configuration read from the environment, shared by the mesh's binaries.
//!
//! Every binary reads its settings once at start through the [`Env`] trait,
//! so tests can hand in their own variables without touching the process
//! environment, and every binary spells durations the same way.

use std::time::Duration;

/// A source of environment variables.
pub trait Env {
    /// The value of `key`; `None` when unset or empty.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, key: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

/// `30`, `30s`, `500ms`, `5m`, `24h`, `90d`.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, "s"),
    };
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// A variable that is set but does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?}: {reason}")]
pub struct EnvError {
    /// The variable.
    pub name: &'static str,
    /// Its value as found.
    pub value: String,
    /// What was expected.
    pub reason: String,
}

/// `name` parsed as `T`, or `default` when unset.
pub fn parse_var<T: std::str::FromStr>(
    env: &dyn Env,
    name: &'static str,
    default: T,
) -> Result<T, EnvError>
where
    T::Err: std::fmt::Display,
{
    match env.var(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e: T::Err| EnvError {
            name,
            reason: e.to_string(),
            value: v,
        }),
    }
}

/// `name` as a duration (see [`parse_duration`]), or `default` when unset.
pub fn duration_var(
    env: &dyn Env,
    name: &'static str,
    default: Duration,
) -> Result<Duration, EnvError> {
    match env.var(name) {
        None => Ok(default),
        Some(v) => parse_duration(&v).ok_or_else(|| EnvError {
            name,
            value: v,
            reason: "expected seconds (`30`) or a duration (`500ms`, `30s`, `5m`, `24h`, `90d`)"
                .into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (s, want) in [
            ("30", Some(30_000)),
            ("30s", Some(30_000)),
            ("500ms", Some(500)),
            ("5m", Some(300_000)),
            ("24h", Some(86_400_000)),
            ("2d", Some(172_800_000)),
            ("1.5s", Some(1_500)),
            ("", None),
            ("5x", None),
            ("-1", None),
            ("s", None),
        ] {
            assert_eq!(
                parse_duration(s).map(|d| d.as_millis() as u64),
                want,
                "{s:?}"
            );
        }
    }
}
