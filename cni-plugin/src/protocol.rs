//! The wire protocol between the CNI plugin and the node agent.
//!
//! The plugin runs once per pod sandbox, before the pod's processes start;
//! the node agent runs for as long as the node does, sets up redirection
//! inside the pod's network namespace and hands that namespace to ztunnel.
//! The plugin tells the agent about each pod with HTTP/1.1 over a unix
//! socket (default [`DEFAULT_AGENT_SOCKET`]); the agent side serves these
//! paths:
//!
//! | request | body | success | failure |
//! |---|---|---|---|
//! | `POST /cmdadd` | [`PodEvent`] | 200, [`AddReply`] | non-200, text |
//! | `POST /cmdcheck` | [`PodEvent`] | 200, any body | non-200, text |
//! | `POST /cmddel` | [`PodEvent`] | 200, any body | non-200, text |
//!
//! Requests carry `Host: localhost` and `Content-Type: application/json`.
//! A failure body is a human-readable reason (UTF-8 text; the plugin shows
//! at most [`MAX_ERROR_TEXT`] bytes of it to the runtime). Replies larger
//! than [`MAX_REPLY_BYTES`] are refused.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Where the agent listens unless the network configuration says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/istio-cni/pluginevent.sock";

/// A pod's network is set up; the agent captures it if it is enrolled.
pub const ADD_PATH: &str = "/cmdadd";
/// The runtime checks a running pod; the agent confirms the capture it
/// expects is in place.
pub const CHECK_PATH: &str = "/cmdcheck";
/// A pod's network is torn down; the agent forgets it.
pub const DEL_PATH: &str = "/cmddel";

/// Largest reply body the plugin reads.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Largest part of a failure text the plugin passes on.
pub const MAX_ERROR_TEXT: usize = 1024;

/// One pod sandbox, as every request describes it (JSON, camelCase).
///
/// ```json
/// {"containerId": "8d1c...", "netns": "/var/run/netns/cni-1234",
///  "ifname": "eth0", "podName": "web-0", "podNamespace": "shop",
///  "podUid": "6f1e...", "podIps": ["10.244.1.7", "fd00::7"]}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEvent {
    /// `CNI_CONTAINERID`: the sandbox.
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's network namespace; empty on a DEL
    /// whose namespace is already gone.
    pub netns: String,
    /// `CNI_IFNAME`: the pod's interface (usually `eth0`).
    pub ifname: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: String,
    /// `K8S_POD_UID` from `CNI_ARGS`; empty when the runtime did not set it.
    #[serde(default)]
    pub pod_uid: String,
    /// The addresses of `prevResult.ips[]` without prefix length; empty
    /// when there was no `prevResult` (always possible on DEL).
    #[serde(default)]
    pub pod_ips: Vec<IpAddr>,
}

/// The agent's answer to a successful `/cmdadd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddReply {
    /// `true`: the pod is in the mesh and its traffic is now redirected to
    /// ztunnel. `false`: the pod is not in the mesh; nothing was done.
    pub captured: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_field_names() {
        let ev = PodEvent {
            container_id: "c".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            pod_name: "p".into(),
            pod_namespace: "ns".into(),
            pod_uid: "u".into(),
            pod_ips: vec!["10.0.0.1".parse().unwrap()],
        };
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "containerId": "c", "netns": "/var/run/netns/x", "ifname": "eth0",
                "podName": "p", "podNamespace": "ns", "podUid": "u", "podIps": ["10.0.0.1"]
            })
        );
        assert_eq!(serde_json::from_value::<PodEvent>(v).unwrap(), ev);
        let reply: AddReply = serde_json::from_str(r#"{"captured": true, "extra": 1}"#).unwrap();
        assert!(reply.captured);
    }
}
