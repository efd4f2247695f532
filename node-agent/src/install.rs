//! Putting the plugin into the node's CNI chain: the container runtime only
//! calls `mesh-cni` for a new pod (so that capture is in place before the
//! pod's processes start) if the binary is in the runtime's plugin directory
//! and the node's network configuration lists it. The agent copies the
//! binary atomically and appends its entry to the `plugins` of the first
//! `*.conflist` (by name), keeping everything else. The primary network
//! plugin may write that file after us (or rewrite it), so the agent keeps
//! checking it for as long as it runs.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{CniInstall, PLUGIN_TYPE};

/// Errors of installing into the CNI directories.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a network configuration list: {reason}")]
    Conflist { path: PathBuf, reason: String },
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What our entry in the chain says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEntry {
    pub agent_socket: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub exclude_namespaces: Vec<String>,
}

impl PluginEntry {
    /// The entry as the plugin's network configuration keys spell it.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), PLUGIN_TYPE.into());
        m.insert(
            "agentSocket".into(),
            self.agent_socket.display().to_string().into(),
        );
        if let Some(k) = &self.kubeconfig {
            m.insert("kubeconfig".into(), k.display().to_string().into());
        }
        m.insert(
            "excludeNamespaces".into(),
            self.exclude_namespaces.clone().into(),
        );
        Value::Object(m)
    }
}

/// Copies the plugin binary into `bin_dir` as [`PLUGIN_TYPE`], through a
/// temporary file and a rename, so the runtime never runs a half-written
/// binary.
pub fn install_binary(source: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(bin_dir).map_err(io("creating", bin_dir))?;
    std::fs::copy(source, &tmp).map_err(io("copying the plugin binary from", source))?;
    let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(io("making executable", &tmp))
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io("syncing", &tmp))
        })
        .and_then(|()| std::fs::rename(&tmp, &target).map_err(io("renaming into", &target)));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done.map(|()| target)
}

/// The first `*.conflist` of `dir` by name, if any (what the runtime uses).
pub fn find_conflist(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist") && p.is_file())
        .collect();
    names.sort();
    Ok(names.into_iter().next())
}

fn is_ours(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn plugins_of<'a>(doc: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>, InstallError> {
    let bad = |reason: &str| InstallError::Conflist {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object"))?;
    obj.get_mut("plugins")
        .ok_or_else(|| bad("no `plugins` list"))?
        .as_array_mut()
        .ok_or_else(|| bad("`plugins` is not a list"))
}

/// `text` with our entry last in `plugins` (replacing any earlier entry of
/// ours), or `None` when it already is exactly that.
pub fn with_entry(
    text: &str,
    entry: &PluginEntry,
    path: &Path,
) -> Result<Option<String>, InstallError> {
    let mut doc: Value = serde_json::from_str(text).map_err(|e| InstallError::Conflist {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let want = entry.to_json();
    let plugins = plugins_of(&mut doc, path)?;
    let ours = plugins.iter().filter(|p| is_ours(p)).count();
    if ours == 1 && plugins.last() == Some(&want) {
        return Ok(None);
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(want);
    Ok(Some(pretty(&doc)))
}

/// `text` without our entry, or `None` when it has none.
pub fn without_entry(text: &str, path: &Path) -> Result<Option<String>, InstallError> {
    let mut doc: Value = serde_json::from_str(text).map_err(|e| InstallError::Conflist {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let plugins = plugins_of(&mut doc, path)?;
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(None);
    }
    Ok(Some(pretty(&doc)))
}

fn pretty(doc: &Value) -> String {
    // A Value parsed from JSON always serializes.
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_default();
    s.push('\n');
    s
}

/// Replaces `path` by `text` through a temporary file in the same directory
/// and a rename: the runtime reads either the old or the new file.
fn write_atomically(path: &Path, text: &str) -> Result<(), InstallError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    // The temporary name does not end in `.conflist`, so the runtime never
    // picks it up.
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let mode = std::fs::metadata(path).map(|m| m.permissions()).ok();
    let done = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            if let Some(mode) = mode {
                f.set_permissions(mode)?;
            }
            f.sync_all()
        })
        .map_err(io("writing", &tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io("renaming into", path)));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// What one pass over the configuration directory did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// No `*.conflist` yet.
    NoConflist,
    /// The entry was already in place.
    Unchanged(PathBuf),
    /// The file was rewritten with our entry.
    Written(PathBuf),
}

/// Makes sure the first conflist of `net_dir` ends with our entry.
pub fn apply(net_dir: &Path, entry: &PluginEntry) -> Result<Applied, InstallError> {
    let Some(path) = find_conflist(net_dir)? else {
        return Ok(Applied::NoConflist);
    };
    let text = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
    match with_entry(&text, entry, &path)? {
        None => Ok(Applied::Unchanged(path)),
        Some(new) => {
            write_atomically(&path, &new)?;
            Ok(Applied::Written(path))
        }
    }
}

/// Removes our entry from the first conflist of `net_dir` (if there is one
/// and it holds our entry). Returns the file changed.
pub fn remove(net_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let Some(path) = find_conflist(net_dir)? else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
    match without_entry(&text, &path)? {
        None => Ok(None),
        Some(new) => {
            write_atomically(&path, &new)?;
            Ok(Some(path))
        }
    }
}

/// Keeps our entry in the chain until `stop` resolves: polls `net_dir`
/// every `install.poll_interval`, waiting for the first conflist and
/// re-adding the entry whenever someone rewrote the file without it.
pub async fn keep_installed(
    install: CniInstall,
    entry: PluginEntry,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut waiting_logged = false;
    let mut last_error: Option<String> = None;
    loop {
        let (dir, e) = (install.net_dir.clone(), entry.clone());
        let result = tokio::task::spawn_blocking(move || apply(&dir, &e)).await;
        match result {
            Ok(Ok(Applied::NoConflist)) => {
                if !waiting_logged {
                    tracing::info!(dir = %install.net_dir.display(), "no *.conflist yet; waiting for the primary network plugin");
                    waiting_logged = true;
                }
            }
            Ok(Ok(Applied::Written(path))) => {
                tracing::info!(conflist = %path.display(), "added {PLUGIN_TYPE} to the CNI chain");
                last_error = None;
            }
            Ok(Ok(Applied::Unchanged(_))) => last_error = None,
            Ok(Err(e)) => {
                let text = e.to_string();
                // Once per distinct failure, not once per poll.
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::error!(error = %text, "cannot add {PLUGIN_TYPE} to the CNI chain");
                    last_error = Some(text);
                }
            }
            Err(e) => tracing::error!(error = %e, "CNI configuration task failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(install.poll_interval) => {}
            _ = &mut stop => return,
        }
    }
}

/// Undoes the install: our entry and our binary (for `UNINSTALL_CNI_ON_EXIT`).
pub fn uninstall(install: &CniInstall) -> Result<(), InstallError> {
    if let Some(path) = remove(&install.net_dir)? {
        tracing::info!(conflist = %path.display(), "removed {PLUGIN_TYPE} from the CNI chain");
    }
    let bin = install.bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&bin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", &bin)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn entry() -> PluginEntry {
        PluginEntry {
            agent_socket: "/run/a.sock".into(),
            kubeconfig: Some("/etc/k".into()),
            exclude_namespaces: vec!["kube-system".into()],
        }
    }

    fn conflist() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "podnet",
            "extra": {"kept": true},
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    fn read(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn entry_json() {
        assert_eq!(
            entry().to_json(),
            json!({"type": "mesh-cni", "agentSocket": "/run/a.sock", "kubeconfig": "/etc/k",
                   "excludeNamespaces": ["kube-system"]})
        );
        let mut e = entry();
        e.kubeconfig = None;
        assert!(e.to_json().get("kubeconfig").is_none());
    }

    #[test]
    fn apply_appends_once_and_preserves_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-podnet.conflist");
        std::fs::write(&path, conflist().to_string()).unwrap();
        // Not conflists: left alone, even when they sort first.
        std::fs::write(dir.path().join("05-other.conf"), "{}").unwrap();
        std::fs::write(dir.path().join("99-last.conflist"), conflist().to_string()).unwrap();

        assert_eq!(
            apply(dir.path(), &entry()).unwrap(),
            Applied::Written(path.clone())
        );
        let mut want = conflist();
        want["plugins"]
            .as_array_mut()
            .unwrap()
            .push(entry().to_json());
        assert_eq!(read(&path), want);
        assert_eq!(read(&dir.path().join("99-last.conflist")), conflist());

        // Idempotent: nothing rewritten.
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(
            apply(dir.path(), &entry()).unwrap(),
            Applied::Unchanged(path.clone())
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );

        // A changed entry replaces the old one, still last.
        let mut changed = entry();
        changed.kubeconfig = None;
        apply(dir.path(), &changed).unwrap();
        let plugins = read(&path)["plugins"].as_array().unwrap().clone();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2], changed.to_json());

        // No temporary files left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");

        assert_eq!(remove(dir.path()).unwrap(), Some(path.clone()));
        assert_eq!(read(&path), conflist());
        assert_eq!(remove(dir.path()).unwrap(), None);
    }

    #[test]
    fn our_entry_moves_to_the_end() {
        let mut doc = conflist();
        doc["plugins"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"type": "mesh-cni", "agentSocket": "/old"}));
        let out = with_entry(&doc.to_string(), &entry(), Path::new("x"))
            .unwrap()
            .unwrap();
        let out: Value = serde_json::from_str(&out).unwrap();
        let types: Vec<&str> = out["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "mesh-cni"]);
    }

    #[test]
    fn malformed_conflists_are_errors_naming_the_file() {
        for text in ["not json", "[]", r#"{"plugins": 3}"#, r#"{"name": "x"}"#] {
            let e = with_entry(text, &entry(), Path::new("/etc/cni/net.d/a.conflist")).unwrap_err();
            assert!(e.to_string().contains("a.conflist"), "{e}");
        }
    }

    #[test]
    fn binary_is_copied_executable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src-bin");
        std::fs::write(&src, b"#!/bin/sh\n").unwrap();
        let bin = dir.path().join("bin");
        let target = install_binary(&src, &bin).unwrap();
        assert_eq!(target, bin.join("mesh-cni"));
        assert_eq!(std::fs::read(&target).unwrap(), b"#!/bin/sh\n");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        // Again over the existing file.
        install_binary(&src, &bin).unwrap();
        assert_eq!(std::fs::read_dir(&bin).unwrap().count(), 1);
        let e = install_binary(&dir.path().join("absent"), &bin).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
    }

    #[tokio::test]
    async fn keep_installed_waits_for_a_conflist_and_restores_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("net.d");
        let install = CniInstall {
            bin_dir: dir.path().join("bin"),
            net_dir: net.clone(),
            plugin_source: dir.path().join("unused"),
            uninstall_on_exit: false,
            poll_interval: Duration::from_millis(20),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(keep_installed(install.clone(), entry(), async move {
            let _ = stop_rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The directory did not even exist: nothing was created.
        assert!(!net.exists());
        std::fs::create_dir_all(&net).unwrap();
        let path = net.join("10-podnet.conflist");
        std::fs::write(&path, conflist().to_string()).unwrap();
        let has_entry = |path: &Path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|v| {
                    v["plugins"].as_array().unwrap().last() == Some(&entry().to_json())
                })
        };
        for _ in 0..200 {
            if has_entry(&path) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(has_entry(&path));
        // The primary plugin rewrites its file: the entry comes back.
        std::fs::write(&path, conflist().to_string()).unwrap();
        for _ in 0..200 {
            if has_entry(&path) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(has_entry(&path));
        stop_tx.send(()).unwrap();
        task.await.unwrap();
        uninstall(&install).unwrap();
        assert_eq!(read(&path), conflist());
    }
}
