//! The container runtime's side of CNI for the local kubelet: reading a
//! node's network configuration list and running its plugins per the CNI
//! 1.0 spec, the way containerd or CRI-O does before a pod's first process
//! starts.
//!
//! `ADD` runs the plugins in order, each getting the previous plugin's result
//! as `prevResult`; `CHECK` runs them in order and `DEL` in reverse, both with
//! the cached `ADD` result as `prevResult`. The loopback interface is its own
//! single-plugin network, set up first (as runtimes do). Plugins run inside
//! the node's network namespace, the runtime's "host" namespace, so the
//! bridge plugin's `cni0` and its veth ends land on the node.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::netns::Netns;

/// Errors of setting up or tearing down a pod's network.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no network configuration (*.conflist) in {0}")]
    NoConfig(PathBuf),
    #[error("network configuration {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("plugin type {0:?} not found in CNI_PATH {1}")]
    PluginNotFound(String, String),
    #[error("running plugin {plugin}: {source}")]
    Spawn {
        plugin: String,
        #[source]
        source: std::io::Error,
    },
    /// The plugin's own error result, as the spec defines it.
    #[error("plugin {plugin} failed {command}: code {code}: {msg}{details}")]
    Plugin {
        plugin: String,
        command: &'static str,
        code: u64,
        msg: String,
        details: String,
    },
    #[error("plugin {plugin} {command} printed no valid result: {reason}")]
    BadResult {
        plugin: String,
        command: &'static str,
        reason: String,
    },
    #[error("plugin {plugin} did not finish {command} within {after:?}")]
    Timeout {
        plugin: String,
        command: &'static str,
        after: Duration,
    },
}

/// The network configuration list of one node, and where its plugins are.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The node's `/etc/cni/net.d`.
    pub conf_dir: PathBuf,
    /// Colon-separated directories searched for plugin binaries.
    pub cni_path: String,
    /// The node namespace the plugins run in.
    pub node: Netns,
}

/// Identity of one pod sandbox, passed to every plugin.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub container_id: String,
    pub netns_path: PathBuf,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

impl Sandbox {
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.pod_namespace, self.pod_name, self.container_id, self.pod_uid
        )
    }
}

/// A plugin gets at most this long per call; the mesh plugin itself bounds
/// its wait for the node agent below this.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

impl NetworkConfig {
    /// The first `*.conflist` by name, as runtimes pick it, re-read on every
    /// call so that changes (the node agent adding the mesh plugin) apply to
    /// the next pod.
    pub fn load(&self) -> Result<(PathBuf, Value), CniError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|_| CniError::NoConfig(self.conf_dir.clone()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
            .collect();
        files.sort();
        let path = files
            .into_iter()
            .next()
            .ok_or_else(|| CniError::NoConfig(self.conf_dir.clone()))?;
        let bad = |reason: String| CniError::BadConfig {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let list: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if !list.get("plugins").is_some_and(Value::is_array) {
            return Err(bad("no `plugins` list".into()));
        }
        if !list.get("name").is_some_and(Value::is_string) {
            return Err(bad("no `name`".into()));
        }
        Ok((path, list))
    }

    /// Sets up the pod's network: loopback, then the configured chain.
    /// Returns the chain's final result (the runtime's cached result, needed
    /// for `CHECK` and `DEL`). On failure, whatever was set up is torn down
    /// again before the error is returned, as runtimes do.
    pub fn add(&self, sb: &Sandbox) -> Result<Value, CniError> {
        self.loopback(sb)?;
        let (_, list) = self.load()?;
        let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
        let mut prev: Option<Value> = None;
        for (i, plugin) in plugins.iter().enumerate() {
            let conf = plugin_conf(&list, plugin, prev.as_ref());
            match self.exec("ADD", &conf, sb) {
                Ok(Some(result)) => prev = Some(result),
                Ok(None) => {
                    return Err(CniError::BadResult {
                        plugin: plugin_type(plugin),
                        command: "ADD",
                        reason: "empty output".into(),
                    })
                }
                Err(e) => {
                    // Undo the plugins that succeeded, newest first.
                    for done in plugins[..i].iter().rev() {
                        let conf = plugin_conf(&list, done, prev.as_ref());
                        if let Err(undo) = self.exec("DEL", &conf, sb) {
                            tracing::warn!(error = %undo, "cleanup after a failed ADD");
                        }
                    }
                    return Err(e);
                }
            }
        }
        prev.ok_or_else(|| CniError::BadConfig {
            path: self.conf_dir.clone(),
            reason: "empty plugin list".into(),
        })
    }

    /// `CHECK` every plugin of the chain against the cached result.
    pub fn check(&self, sb: &Sandbox, cached: &Value) -> Result<(), CniError> {
        let (_, list) = self.load()?;
        for plugin in list["plugins"].as_array().into_iter().flatten() {
            self.exec("CHECK", &plugin_conf(&list, plugin, Some(cached)), sb)?;
        }
        Ok(())
    }

    /// `DEL` the chain in reverse order, then loopback. Every plugin is
    /// called even when an earlier one fails (DEL must release what it
    /// can); the first error is returned.
    pub fn del(&self, sb: &Sandbox, cached: Option<&Value>) -> Result<(), CniError> {
        let mut first = None;
        match self.load() {
            Ok((_, list)) => {
                for plugin in list["plugins"].as_array().into_iter().flatten().rev() {
                    if let Err(e) = self.exec("DEL", &plugin_conf(&list, plugin, cached), sb) {
                        first.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn loopback(&self, sb: &Sandbox) -> Result<(), CniError> {
        let conf = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
        self.exec("ADD", &conf, sb).map(|_| ())
    }

    fn find_plugin(&self, ty: &str) -> Result<PathBuf, CniError> {
        // A type is a file name, never a path.
        if ty.is_empty() || ty.contains('/') {
            return Err(CniError::PluginNotFound(ty.into(), self.cni_path.clone()));
        }
        self.cni_path
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(ty))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::PluginNotFound(ty.into(), self.cni_path.clone()))
    }

    /// Runs one plugin with the spec's environment and `conf` on stdin;
    /// returns its result (`None` for commands that print nothing).
    fn exec(
        &self,
        command: &'static str,
        conf: &Value,
        sb: &Sandbox,
    ) -> Result<Option<Value>, CniError> {
        let ty = plugin_type(conf);
        let bin = self.find_plugin(&ty)?;
        let mut cmd = self.node.command(&bin);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sb.container_id)
            .env("CNI_NETNS", &sb.netns_path)
            .env("CNI_IFNAME", &sb.ifname)
            .env("CNI_ARGS", sb.cni_args())
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let stdin = serde_json::to_vec(conf).expect("a JSON value serializes");
        let out = run_bounded(cmd, &stdin, PLUGIN_TIMEOUT).map_err(|e| match e {
            RunError::Io(source) => CniError::Spawn {
                plugin: ty.clone(),
                source,
            },
            RunError::Timeout => CniError::Timeout {
                plugin: ty.clone(),
                command,
                after: PLUGIN_TIMEOUT,
            },
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            // The spec's error result: {"code", "msg", "details"} on stdout.
            let err: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let details = err["details"].as_str().unwrap_or_default();
            return Err(CniError::Plugin {
                plugin: ty,
                command,
                code: err["code"].as_u64().unwrap_or(999),
                msg: err["msg"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("exit {}; stderr: {stderr}", out.status)),
                details: if details.is_empty() {
                    String::new()
                } else {
                    format!(" ({details})")
                },
            });
        }
        if command != "ADD" {
            return Ok(None);
        }
        if stdout.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(stdout.trim())
            .map(Some)
            .map_err(|e| CniError::BadResult {
                plugin: ty,
                command,
                reason: e.to_string(),
            })
    }
}

/// The first IPv4 address of a result, without its prefix length.
pub fn result_ipv4(result: &Value) -> Option<std::net::Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let addr = ip["address"].as_str()?;
        addr.split('/').next()?.parse().ok()
    })
}

fn plugin_type(conf: &Value) -> String {
    conf["type"].as_str().unwrap_or_default().to_string()
}

/// One plugin's stdin: its own keys plus the list's `cniVersion` and `name`
/// and, when given, `prevResult`.
fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
    let mut conf = plugin.clone();
    if let Some(obj) = conf.as_object_mut() {
        obj.insert(
            "cniVersion".into(),
            list.get("cniVersion").cloned().unwrap_or(json!("1.0.0")),
        );
        obj.insert("name".into(), list["name"].clone());
        match prev {
            Some(p) => {
                obj.insert("prevResult".into(), p.clone());
            }
            None => {
                obj.remove("prevResult");
            }
        }
    }
    conf
}

enum RunError {
    Io(std::io::Error),
    Timeout,
}

fn run_bounded(
    mut cmd: Command,
    stdin: &[u8],
    limit: Duration,
) -> Result<std::process::Output, RunError> {
    use std::io::Write;
    let mut child = cmd.spawn().map_err(RunError::Io)?;
    if let Some(mut pipe) = child.stdin.take() {
        // A plugin that exits without reading its stdin is not an error here;
        // its exit status says what happened.
        let _ = pipe.write_all(stdin);
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r.map_err(RunError::Io),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(RunError::Timeout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_conf_carries_list_fields_and_prev_result() {
        let list = json!({"cniVersion": "1.0.0", "name": "net", "plugins": []});
        let plugin = json!({"type": "mesh-cni", "agentSocket": "/s", "prevResult": {"stale": 1}});
        let c = plugin_conf(&list, &plugin, None);
        assert_eq!(c["name"], "net");
        assert_eq!(c["cniVersion"], "1.0.0");
        assert!(c.get("prevResult").is_none(), "{c}");
        let prev = json!({"ips": [{"address": "10.244.1.5/24"}]});
        let c = plugin_conf(&list, &plugin, Some(&prev));
        assert_eq!(c["prevResult"], prev);
        assert_eq!(c["agentSocket"], "/s");
        assert_eq!(result_ipv4(&prev), Some("10.244.1.5".parse().unwrap()));
    }

    #[test]
    fn load_picks_first_conflist_and_rejects_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = NetworkConfig {
            conf_dir: dir.path().into(),
            cni_path: "/nonexistent".into(),
            node: Netns::from_name("unused"),
        };
        assert!(matches!(cfg.load(), Err(CniError::NoConfig(_))));
        std::fs::write(
            dir.path().join("20-b.conflist"),
            r#"{"name":"b","plugins":[]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("10-a.conflist"), r#"{"name":"a"}"#).unwrap();
        std::fs::write(dir.path().join("05-x.conf"), "not a list").unwrap();
        let err = cfg.load().unwrap_err().to_string();
        assert!(
            err.contains("10-a.conflist") && err.contains("plugins"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("10-a.conflist")).unwrap();
        assert_eq!(cfg.load().unwrap().1["name"], "b");
        assert!(matches!(
            cfg.find_plugin("../bridge"),
            Err(CniError::PluginNotFound(..))
        ));
    }
}
