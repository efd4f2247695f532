//! Table-driven tests of [`crate::run`] over environment and stdin; the
//! cases that reach a node agent live in cni-plugin/tests/plugin.rs.

use serde_json::{json, Value};

use super::*;

struct TestEnv(Vec<(&'static str, String)>);

impl Env for TestEnv {
    fn var(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }
}

const NO_AGENT: &str = "/nonexistent/mesh-cni-test/agent.sock";

/// A full ADD environment for `namespace/web-0`, `command` swapped in,
/// minus the variables in `drop`.
fn env(command: &str, cni_args: Option<&str>, drop: &[&str]) -> TestEnv {
    let mut v = vec![
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", "c0ffee".to_string()),
        ("CNI_NETNS", "/var/run/netns/cni-1".to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
    ];
    if let Some(a) = cni_args {
        v.push(("CNI_ARGS", a.to_string()));
    }
    v.retain(|(k, _)| !drop.contains(k));
    TestEnv(v)
}

fn pod_args(namespace: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-0;K8S_POD_UID=1234")
}

fn prev() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": "/var/run/netns/cni-1"}],
        "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"]}
    })
}

fn conf(extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
        "agentSocket": NO_AGENT, "prevResult": prev()
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c.to_string().into_bytes()
}

enum Want {
    /// Exit 0 with this JSON on stdout.
    Json(Value),
    /// Exit 0, nothing on stdout.
    Empty,
    /// Exit 1, an error result with this code whose msg contains the text.
    Error(u32, &'static str),
}

fn check_case(name: &str, env: &TestEnv, stdin: &[u8], want: &Want) {
    let (status, out) = run(env, stdin);
    match want {
        Want::Json(v) => {
            assert_eq!(status, 0, "{name}: {}", String::from_utf8_lossy(&out));
            let got: Value = serde_json::from_slice(&out).expect(name);
            assert_eq!(&got, v, "{name}");
        }
        Want::Empty => {
            assert_eq!(status, 0, "{name}: {}", String::from_utf8_lossy(&out));
            assert!(out.is_empty(), "{name}: {}", String::from_utf8_lossy(&out));
        }
        Want::Error(code, needle) => {
            assert_eq!(status, 1, "{name}");
            let e: ErrorResult = serde_json::from_slice(&out)
                .unwrap_or_else(|e| panic!("{name}: {e}: {}", String::from_utf8_lossy(&out)));
            assert_eq!(e.code, *code, "{name}: {e:?}");
            assert!(e.msg.contains(needle), "{name}: {e:?}");
            assert!(config::SUPPORTED_VERSIONS.contains(&e.cni_version.as_str()));
        }
    }
}

#[test]
fn version_ignores_everything_else() {
    for stdin in [&b""[..], b"{", br#"{"cniVersion":"0.3.1"}"#] {
        let (status, out) = run(&TestEnv(vec![("CNI_COMMAND", "VERSION".into())]), stdin);
        assert_eq!(status, 0);
        assert_eq!(out, VERSION_OUTPUT.as_bytes());
    }
    let v: Value = serde_json::from_str(VERSION_OUTPUT).unwrap();
    assert_eq!(
        v,
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
    );
}

#[test]
fn environment_and_config_cases() {
    let pod = pod_args("shop");
    let sys = pod_args("kube-system");
    let cases: Vec<(&str, TestEnv, Vec<u8>, Want)> = vec![
        (
            "missing CNI_COMMAND",
            env("", None, &["CNI_COMMAND"]),
            conf(json!({})),
            Want::Error(4, "CNI_COMMAND"),
        ),
        (
            "unknown CNI_COMMAND",
            env("GC", None, &[]),
            conf(json!({})),
            Want::Error(4, "CNI_COMMAND=\"GC\""),
        ),
        (
            "ADD without CNI_NETNS",
            env("ADD", None, &["CNI_NETNS"]),
            conf(json!({})),
            Want::Error(4, "CNI_NETNS"),
        ),
        (
            "ADD without CNI_CONTAINERID",
            env("ADD", None, &["CNI_CONTAINERID"]),
            conf(json!({})),
            Want::Error(4, "CNI_CONTAINERID"),
        ),
        (
            "CHECK without CNI_IFNAME",
            env("CHECK", None, &["CNI_IFNAME"]),
            conf(json!({})),
            Want::Error(4, "CNI_IFNAME"),
        ),
        (
            "DEL without CNI_PATH",
            env("DEL", None, &["CNI_PATH"]),
            conf(json!({})),
            Want::Error(4, "CNI_PATH"),
        ),
        (
            "malformed CNI_ARGS",
            env("ADD", Some("K8S_POD_NAME"), &[]),
            conf(json!({})),
            Want::Error(4, "CNI_ARGS"),
        ),
        (
            "bad JSON",
            env("ADD", Some(&pod), &[]),
            b"{\"cniVersion\": \"1.0.0\", ".to_vec(),
            Want::Error(6, "not valid JSON"),
        ),
        (
            "empty stdin",
            env("DEL", Some(&pod), &[]),
            Vec::new(),
            Want::Error(6, "not valid JSON"),
        ),
        (
            "wrong field type",
            env("ADD", Some(&pod), &[]),
            conf(json!({"excludeNamespaces": "kube-system"})),
            Want::Error(7, "excludeNamespaces"),
        ),
        (
            "bad pod IP",
            env("ADD", None, &[]),
            conf(json!({"prevResult": {"ips": [{"address": "10.0.0.300/24"}]}})),
            Want::Error(7, "prevResult.ips[0].address"),
        ),
        (
            "unsupported version",
            env("ADD", None, &[]),
            conf(json!({"cniVersion": "0.2.0"})),
            Want::Error(1, "0.2.0"),
        ),
        (
            "CHECK on 0.3.1",
            env("CHECK", Some(&sys), &[]),
            conf(json!({"cniVersion": "0.3.1"})),
            Want::Error(1, "CHECK"),
        ),
        (
            "ADD, not a pod",
            env("ADD", None, &[]),
            conf(json!({})),
            Want::Json(prev()),
        ),
        (
            "ADD, half a pod",
            env("ADD", Some("K8S_POD_NAME=web-0"), &[]),
            conf(json!({})),
            Want::Json(prev()),
        ),
        (
            "ADD, kube-system excluded by default",
            env("ADD", Some(&sys), &[]),
            conf(json!({})),
            Want::Json(prev()),
        ),
        (
            "ADD, configured exclusion",
            env("ADD", Some(&pod), &[]),
            conf(json!({"excludeNamespaces": ["shop"]})),
            Want::Json(prev()),
        ),
        (
            "ADD, first in chain",
            env("ADD", None, &[]),
            conf(json!({"prevResult": null, "cniVersion": "0.4.0"})),
            Want::Json(json!({"cniVersion": "0.4.0"})),
        ),
        (
            "ADD, agent absent, no kubeconfig",
            env("ADD", Some(&pod), &[]),
            conf(json!({})),
            Want::Error(11, "without a kubeconfig"),
        ),
        (
            "ADD, kube-system no longer excluded",
            env("ADD", Some(&sys), &[]),
            conf(json!({"excludeNamespaces": []})),
            Want::Error(11, "kube-system/web-0"),
        ),
        (
            "ADD, agent absent, unreadable kubeconfig",
            env("ADD", Some(&pod), &[]),
            conf(json!({"kubeconfig": "/nonexistent/kubeconfig"})),
            Want::Error(11, "/nonexistent/kubeconfig"),
        ),
        (
            "CHECK, excluded",
            env("CHECK", Some(&sys), &[]),
            conf(json!({})),
            Want::Empty,
        ),
        (
            "CHECK, agent absent, no kubeconfig",
            env("CHECK", Some(&pod), &[]),
            conf(json!({})),
            Want::Error(11, "shop/web-0"),
        ),
        (
            "DEL, agent absent",
            env("DEL", Some(&pod), &["CNI_NETNS"]),
            conf(json!({"prevResult": null})),
            Want::Empty,
        ),
        (
            "DEL, not a pod",
            env("DEL", None, &[]),
            conf(json!({})),
            Want::Empty,
        ),
    ];
    for (name, env, stdin, want) in &cases {
        check_case(name, env, stdin, want);
    }
}

#[test]
fn passthrough_keeps_every_field() {
    // Fields this plugin has never heard of, in the order another plugin
    // wrote them, come back with the same meaning.
    let prev = json!({
        "cniVersion": "1.0.0",
        "zeta": {"nested": [1, 2.5, null, true, "x"]},
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/a", "mtu": 1450}],
        "ips": [{"address": "fd00::7/64", "interface": 0}, {"address": "10.0.0.7/8"}],
        "alpha": "\u{1F600} \"quoted\" \\ \n"
    });
    let stdin = format!(
        r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","prevResult":{prev},"unknown":[{{}}]}}"#
    );
    let (status, out) = run(&env("ADD", None, &[]), stdin.as_bytes());
    assert_eq!(status, 0, "{}", String::from_utf8_lossy(&out));
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(got, prev);
}

#[test]
fn error_results_echo_the_config_version() {
    let (status, out) = run(
        &env(
            "ADD",
            Some("K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop"),
            &[],
        ),
        &conf(json!({"cniVersion": "0.4.0"})),
    );
    assert_eq!(status, 1);
    let e: ErrorResult = serde_json::from_slice(&out).unwrap();
    assert_eq!(e.cni_version, "0.4.0");
    assert_eq!(e.code, CODE_TRY_AGAIN_LATER);
    assert!(e.details.contains(NO_AGENT), "{e:?}");
}
