//! The `node-agent` binary as the DaemonSet runs it, up to where it needs an
//! API server: configuration errors, the CNI install, `/readyz` saying what
//! it waits for, `/metrics`, and a clean stop on SIGTERM that removes the
//! install when asked to. The API server is unreachable here, so the agent
//! stays unready; the real-cluster behaviour is covered by the e2e suite.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_node-agent");

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One plain HTTP/1.0 GET: status code and body.
fn get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((status, body))
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(v) = f() {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {what}")
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn conflist() -> Value {
    json!({"cniVersion": "1.0.0", "name": "podnet",
           "plugins": [{"type": "bridge", "bridge": "cni0"}]})
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

#[test]
fn missing_node_name_is_a_startup_error() -> Result<()> {
    let out = Command::new(BIN).env_clear().output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NODE_NAME"), "{err}");
    Ok(())
}

#[test]
fn installs_reports_unready_and_stops_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    // An API server that is never there.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\n\
         clusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: t}}]\n\
         contexts: [{name: x, context: {cluster: c, user: u}}]\n\
         current-context: x\n",
    )?;
    let (bin_dir, net_dir) = (dir.path().join("bin"), dir.path().join("net.d"));
    std::fs::create_dir_all(&net_dir)?;
    let list = net_dir.join("10-podnet.conflist");
    std::fs::write(&list, conflist().to_string())?;
    let source = dir.path().join("mesh-cni-build");
    std::fs::write(&source, b"plugin")?;
    let (ready_port, metrics_port) = (free_port()?, free_port()?);
    let socket = dir.path().join("plugin.sock");

    let child = Command::new(BIN)
        .env_clear()
        .env("NODE_NAME", "node-a")
        .env("KUBECONFIG", &kubeconfig)
        .env("PLUGIN_EVENT_SOCKET", &socket)
        .env("ZTUNNEL_SOCKET", dir.path().join("ztunnel.sock"))
        .env("READINESS_ADDR", format!("127.0.0.1:{ready_port}"))
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("CNI_BIN_DIR", &bin_dir)
        .env("CNI_NET_DIR", &net_dir)
        .env("CNI_PLUGIN_SOURCE", &source)
        .env("CNI_POLL_INTERVAL", "50ms")
        .env("UNINSTALL_CNI_ON_EXIT", "true")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut agent = Agent(child);

    let (status, body) = eventually("/readyz", || get(ready_port, "/readyz").ok())?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("kubernetes watches synced"), "{body}");
    let (status, body) = eventually("/metrics", || get(metrics_port, "/metrics").ok())?;
    assert_eq!(status, 200);
    assert!(body.contains("istio_cni_ambient_enrolled_pods 0"), "{body}");

    assert_eq!(std::fs::read(bin_dir.join("mesh-cni"))?, b"plugin");
    let entry = eventually("the conflist entry", || {
        let doc = read_json(&list)?;
        let last = doc["plugins"].as_array()?.last()?.clone();
        (last["type"] == "mesh-cni").then_some(last)
    })?;
    assert_eq!(
        entry,
        json!({"type": "mesh-cni", "agentSocket": socket, "kubeconfig": kubeconfig,
               "excludeNamespaces": ["kube-system"]})
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = eventually("the agent to exit", || agent.0.try_wait().ok().flatten())?;
    let mut stderr = String::new();
    if let Some(mut e) = agent.0.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    // UNINSTALL_CNI_ON_EXIT: the chain and the plugin directory as before.
    assert_eq!(read_json(&list), Some(conflist()));
    assert!(!bin_dir.join("mesh-cni").exists());
    Ok(())
}
