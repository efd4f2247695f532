//! Stable-Rust smoke run of the fuzz target for the CNI plugin's input.
//!
//! The network configuration on the plugin's stdin is written by whoever
//! installs CNI configuration on the node and extended by every plugin
//! before this one in the chain (`prevResult`); the plugin runs on it while
//! a pod's network is set up. Whatever the bytes, the plugin must answer
//! with a result or a well-formed CNI error and never crash (a crash would
//! leave the runtime without a reason). `cni_config` is the body of the
//! cargo-fuzz target (fuzz/ includes this file); here it runs over a
//! hand-written seed corpus and a few thousand deterministic mutations of
//! it (the harness is mesh-core/tests/support/corpus.rs).
//!
//! `MESH_FUZZ_SEEDS=<dir>` writes the seed corpus to `<dir>/cni_config/`
//! for the fuzzer to start from.

use cni_plugin::config::{version_hint, NetConf};
use cni_plugin::{run, Env, ErrorResult, VERSION_OUTPUT};
use serde_json::Value;

#[path = "../../mesh-core/tests/support/corpus.rs"]
mod corpus;
pub use corpus::{dump_seeds, mutate, run_corpus};

/// The agent socket of the seeds: never there, so a pod that reaches the
/// agent step fails closed without touching anything on the machine.
const FUZZ_SOCKET: &str = "/nonexistent/mesh-cni-fuzz/agent.sock";

/// A fixed environment.
struct Fixed(&'static [(&'static str, &'static str)]);

impl Env for Fixed {
    fn var(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

macro_rules! env {
    ($cmd:literal, $args:expr) => {
        Fixed(&[
            ("CNI_COMMAND", $cmd),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/var/run/netns/fuzz"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", $args),
        ])
    };
}

const NO_POD: &str = "IgnoreUnknown=1";
const SHOP_POD: &str = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=1";
const SYSTEM_POD: &str = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns-0";

#[derive(Clone, Copy, PartialEq)]
enum Cmd {
    Add,
    Check,
    Del,
}

/// What the plugin must answer for `conf` with this command and pod.
enum Want {
    Passthrough,
    Empty,
    Code(u32),
}

fn want(conf: &NetConf, cmd: Cmd, namespace: Option<&str>) -> Option<Want> {
    if cmd == Cmd::Check && !conf.allows_check() {
        return Some(Want::Code(1));
    }
    let done = match cmd {
        Cmd::Add => Want::Passthrough,
        Cmd::Check | Cmd::Del => Want::Empty,
    };
    let Some(ns) = namespace else {
        return Some(done);
    };
    if cmd != Cmd::Del && conf.excluded(ns) {
        return Some(done);
    }
    // Reaches the agent: only where nothing can answer, and nothing else
    // to ask (a mutated config may point anywhere on this machine).
    if conf.agent_socket.as_os_str() != FUZZ_SOCKET || conf.kubeconfig.is_some() {
        return None;
    }
    Some(match cmd {
        Cmd::Del => Want::Empty,
        _ => Want::Code(11),
    })
}

/// The bytes as the network configuration on stdin, for every command.
pub fn cni_config(data: &[u8]) {
    let version = run(&Fixed(&[("CNI_COMMAND", "VERSION")]), data);
    assert_eq!(version, (0, VERSION_OUTPUT.as_bytes().to_vec()));

    let parsed = NetConf::parse(data);
    let runs: [(Cmd, Fixed, Option<&str>); 7] = [
        (Cmd::Add, env!("ADD", NO_POD), None),
        (Cmd::Add, env!("ADD", SYSTEM_POD), Some("kube-system")),
        (Cmd::Add, env!("ADD", SHOP_POD), Some("shop")),
        (Cmd::Check, env!("CHECK", SYSTEM_POD), Some("kube-system")),
        (Cmd::Check, env!("CHECK", SHOP_POD), Some("shop")),
        (Cmd::Del, env!("DEL", NO_POD), None),
        (Cmd::Del, env!("DEL", SHOP_POD), Some("shop")),
    ];
    for (cmd, env, namespace) in runs {
        let want = match &parsed {
            Err(e) => {
                let _ = e.to_string();
                Want::Code(e.code())
            }
            Ok(conf) => match want(conf, cmd, namespace) {
                Some(w) => w,
                None => continue,
            },
        };
        let (status, out) = run(&env, data);
        let shown = || String::from_utf8_lossy(&out).into_owned();
        match want {
            Want::Passthrough => {
                assert_eq!(status, 0, "{}", shown());
                let got: Value = serde_json::from_slice(&out).expect("result is JSON");
                let conf = parsed.as_ref().expect("passthrough needs a config");
                assert_eq!(got, conf.passthrough());
            }
            Want::Empty => assert_eq!((status, out.as_slice()), (0, &b""[..]), "{}", shown()),
            Want::Code(code) => {
                assert_eq!(status, 1, "{}", shown());
                let e: ErrorResult = serde_json::from_slice(&out).expect("error result is JSON");
                assert_eq!(e.code, code, "{e:?}");
                assert_eq!(e.cni_version, version_hint(data));
                assert!(!e.msg.is_empty());
            }
        }
    }
}

pub fn seeds_cni_config() -> Vec<Vec<u8>> {
    let s = FUZZ_SOCKET;
    let prev_v1 = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"0a:58:0a:f4:01:07","sandbox":"/var/run/netns/fuzz"}],"ips":[{"address":"10.244.1.7/24","gateway":"10.244.1.1","interface":0},{"address":"fd00::7/64","interface":0}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{"nameservers":["10.96.0.10"],"search":["svc.cluster.local"]}}"#;
    let prev_v03 = r#"{"cniVersion":"0.3.1","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.1.0.2/16","gateway":"10.1.0.1"}]}"#;
    [
        format!(r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"mesh-cni","agentSocket":"{s}","prevResult":{prev_v1}}}"#),
        format!(r#"{{"cniVersion":"0.3.1","name":"k8s","type":"mesh-cni","agentSocket":"{s}","prevResult":{prev_v03}}}"#),
        format!(r#"{{"cniVersion":"0.4.0","name":"k8s","type":"mesh-cni","agentSocket":"{s}","agentTimeoutSeconds":2,"excludeNamespaces":["shop","istio-system"],"kubeconfig":"","prevResult":{prev_v1}}}"#),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":"{s}","excludeNamespaces":[],"capabilities":{{"portMappings":true}},"runtimeConfig":{{"portMappings":[]}},"args":{{"cni":{{"x":1}}}}}}"#),
        format!(r#"{{"type":"mesh-cni","name":"n","agentSocket":"{s}","cniVersion":"1.0.0","prevResult":null}}"#),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":"{s}","prevResult":{{"ips":[{{"address":"10.0.0.1"}},{{"address":"::1/128"}}]}}}}"#),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":"{s}","prevResult":{{"ips":[{{"address":"10.0.0.300/24"}}]}}}}"#),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":"{s}","agentTimeoutSeconds":0}}"#),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":"{s}","agentTimeoutSeconds":18446744073709551615}}"#),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":"{s}","excludeNamespaces":"kube-system"}}"#),
        format!(r#"{{"cniVersion":"2.0.0","name":"n","type":"mesh-cni","agentSocket":"{s}"}}"#),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":"{s}","prevResult":[]}}"#),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","agentSocket":"{s}"}}"#),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":"{s}","name":"dup"}}"#),
        r#"{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":""}"#.to_string(),
        r#"{"cniVersion":"1.0.0","#.to_string(),
        "[1,2,3]".to_string(),
        "null".to_string(),
        String::new(),
        "\u{feff}{}".to_string(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

pub fn dict_cni_config() -> Vec<&'static [u8]> {
    vec![
        b"\"cniVersion\":",
        b"\"prevResult\":",
        b"\"ips\":[",
        b"{\"address\":\"",
        b"\"excludeNamespaces\":[\"shop\"]",
        b"\"kube-system\"",
        b"\"agentTimeoutSeconds\":",
        b"\"kubeconfig\":\"\"",
        b"\"0.3.1\"",
        b"\"0.4.0\"",
        b"\"1.0.0\"",
        b"/24",
        b"::",
        b"null",
        b"true",
        b"[]",
        b"{}",
        b"\\u0000",
        b"\\ud800",
        b"1e999",
        b"-0",
        b"\"",
        b",",
        b":",
    ]
}

#[test]
fn smoke_cni_config() {
    let seeds = seeds_cni_config();
    // The seeds mean what they were written to mean.
    for i in [0, 1, 2, 3, 4, 5, 13] {
        NetConf::parse(&seeds[i]).unwrap_or_else(|e| panic!("seed {i}: {e}"));
    }
    for (i, code) in [
        (6, 7),
        (7, 7),
        (8, 7),
        (9, 7),
        (10, 1),
        (11, 7),
        (12, 7),
        (14, 7),
        (15, 6),
        (16, 7),
        (17, 7),
        (18, 6),
        (19, 6),
    ] {
        let e = NetConf::parse(&seeds[i]).expect_err(&format!("seed {i}"));
        assert_eq!(e.code(), code, "seed {i}: {e}");
    }
    let conf = NetConf::parse(&seeds[0]).unwrap();
    assert_eq!(conf.pod_ips.len(), 2);
    // A repeated key: the last one wins, as for every JSON reader of ours.
    assert_eq!(NetConf::parse(&seeds[13]).unwrap().name, "dup");
    dump_seeds("cni_config", &seeds);
    run_corpus("cni_config", &seeds, &dict_cni_config(), 20_000, cni_config);
}
