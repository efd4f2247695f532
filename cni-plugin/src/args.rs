//! The `CNI_*` environment of one plugin invocation.
//!
//! The container runtime runs the plugin when it sets up (ADD), verifies
//! (CHECK) or tears down (DEL) a pod's network, before the pod's processes
//! start and after they stop; everything it says about the pod arrives in
//! these variables, the network configuration on stdin (see
//! [`crate::config`]). Read through [`Env`] so tests hand in their own.

use mesh_core::env::Env;

/// What the runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    /// The spelling in `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        }
    }
}

/// A variable that is missing or does not parse; CNI error code 4.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("{0} is not set")]
    Missing(&'static str),
    #[error("CNI_COMMAND={0:?} is not one of ADD, DEL, CHECK, VERSION")]
    UnknownCommand(String),
    #[error("CNI_ARGS: {pair:?} is not KEY=VALUE")]
    MalformedPair { pair: String },
    #[error("CNI_ARGS: {key}={value:?} is not a valid Kubernetes name")]
    BadName { key: &'static str, value: String },
}

/// `CNI_ARGS` keys the runtime sets for a Kubernetes pod.
pub const K8S_POD_NAME: &str = "K8S_POD_NAME";
pub const K8S_POD_NAMESPACE: &str = "K8S_POD_NAMESPACE";
pub const K8S_POD_UID: &str = "K8S_POD_UID";

/// The pod a sandbox belongs to, from `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub name: String,
    pub namespace: String,
    /// Empty when the runtime did not say.
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the environment says for ADD, DEL and CHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniArgs {
    pub command: Command,
    pub container_id: String,
    /// Path of the sandbox's network namespace; may be empty on DEL (the
    /// namespace can already be gone).
    pub netns: String,
    pub ifname: String,
    pub path: String,
    /// `None` when the sandbox is not a Kubernetes pod (no `K8S_POD_*`).
    pub pod: Option<PodRef>,
}

/// `CNI_COMMAND` alone: VERSION needs nothing else.
pub fn command(env: &dyn Env) -> Result<Command, ArgsError> {
    let v = env
        .var("CNI_COMMAND")
        .ok_or(ArgsError::Missing("CNI_COMMAND"))?;
    match v.as_str() {
        "ADD" => Ok(Command::Add),
        "DEL" => Ok(Command::Del),
        "CHECK" => Ok(Command::Check),
        "VERSION" => Ok(Command::Version),
        _ => Err(ArgsError::UnknownCommand(v)),
    }
}

impl CniArgs {
    /// Reads the variables `command` needs; the spec lets DEL come without
    /// a network namespace.
    pub fn from_env(env: &dyn Env, command: Command) -> Result<Self, ArgsError> {
        let need = |name: &'static str| env.var(name).ok_or(ArgsError::Missing(name));
        let container_id = need("CNI_CONTAINERID")?;
        let netns = match command {
            Command::Del => env.var("CNI_NETNS").unwrap_or_default(),
            _ => need("CNI_NETNS")?,
        };
        let ifname = need("CNI_IFNAME")?;
        let path = need("CNI_PATH")?;
        let pod = match env.var("CNI_ARGS") {
            Some(a) => pod_from_cni_args(&a)?,
            None => None,
        };
        Ok(CniArgs {
            command,
            container_id,
            netns,
            ifname,
            path,
            pod,
        })
    }
}

/// `K8S_POD_NAME=a;K8S_POD_NAMESPACE=b;K8S_POD_UID=c;IgnoreUnknown=1`:
/// the pod when both name and namespace are there, `None` otherwise (the
/// runtime is setting up something that is not a pod). Other keys are
/// ignored.
pub fn pod_from_cni_args(s: &str) -> Result<Option<PodRef>, ArgsError> {
    let (mut name, mut namespace, mut uid) = (None, None, None);
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ArgsError::MalformedPair {
                pair: pair.to_string(),
            })?;
        match k {
            K8S_POD_NAME => name = Some(v),
            K8S_POD_NAMESPACE => namespace = Some(v),
            K8S_POD_UID => uid = Some(v),
            _ => {}
        }
    }
    let (Some(name), Some(namespace)) = (
        name.filter(|v| !v.is_empty()),
        namespace.filter(|v| !v.is_empty()),
    ) else {
        return Ok(None);
    };
    // The names end up in API paths and in the agent's keys.
    for (key, value) in [(K8S_POD_NAME, name), (K8S_POD_NAMESPACE, namespace)] {
        if !is_dns_subdomain(value) {
            return Err(ArgsError::BadName {
                key,
                value: value.to_string(),
            });
        }
    }
    let uid = uid.unwrap_or_default();
    if !uid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ArgsError::BadName {
            key: K8S_POD_UID,
            value: uid.to_string(),
        });
    }
    Ok(Some(PodRef {
        name: name.to_string(),
        namespace: namespace.to_string(),
        uid: uid.to_string(),
    }))
}

/// RFC 1123 subdomain: what Kubernetes allows for pod and namespace names.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_cases() {
        let pod = |n: &str, ns: &str, uid: &str| {
            Some(PodRef {
                name: n.into(),
                namespace: ns.into(),
                uid: uid.into(),
            })
        };
        let cases: &[(&str, Option<PodRef>)] = &[
            (
                "K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop;K8S_POD_UID=1-2-3",
                pod("web-0", "shop", "1-2-3"),
            ),
            (
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_INFRA_CONTAINER_ID=x;",
                pod("b", "a", ""),
            ),
            ("K8S_POD_NAME=b", None),
            ("K8S_POD_NAME=b;K8S_POD_NAMESPACE=", None),
            ("", None),
            ("IgnoreUnknown=1", None),
        ];
        for (input, want) in cases {
            assert_eq!(&pod_from_cni_args(input).unwrap(), want, "{input:?}");
        }
    }

    #[test]
    fn bad_cni_args_name_the_problem() {
        for (input, needle) in [
            ("K8S_POD_NAME", "\"K8S_POD_NAME\" is not KEY=VALUE"),
            (
                "K8S_POD_NAME=a/b;K8S_POD_NAMESPACE=c",
                "K8S_POD_NAME=\"a/b\"",
            ),
            (
                "K8S_POD_NAME=a;K8S_POD_NAMESPACE=C",
                "K8S_POD_NAMESPACE=\"C\"",
            ),
            (
                "K8S_POD_NAME=a;K8S_POD_NAMESPACE=c;K8S_POD_UID=x/y",
                "K8S_POD_UID",
            ),
        ] {
            let e = pod_from_cni_args(input).unwrap_err().to_string();
            assert!(e.contains(needle), "{input:?}: {e}");
        }
    }

    #[test]
    fn dns_subdomains() {
        for ok in ["a", "a-b", "a.b", "0", &"a".repeat(63)] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a..b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }
}
