//! `ambientctl local ...`: the local mesh's lifecycle. `up` starts a
//! supervisor process (`local serve`, in a session of its own) that owns
//! every component and namespace, and returns once it reports ready; `down`
//! signals it and waits until it has removed everything; `status` and
//! `exec` read what it and its kubelets record in the state directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use e2e::local::{LocalMesh, LocalMeshSpec};
use serde::{Deserialize, Serialize};

const DEFAULT_STATE_DIR: &str = "/var/run/ambient-mesh/local";

#[derive(Args)]
pub struct LocalArgs {
    /// Where the local mesh keeps its state (removed by `down`).
    #[arg(long, global = true, env = "AMBIENT_LOCAL_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: LocalCommand,
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Start the local mesh and wait until it is ready.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=20))]
        nodes: u8,
        /// How long to wait for it to become ready, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Stop the local mesh and remove everything it made.
    Down,
    /// Show whether the local mesh runs, its nodes and how to reach it.
    Status,
    /// Run a command inside a pod's network namespace, as `kubectl exec`.
    Exec {
        /// The pod's name.
        pod: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Accepted for `kubectl exec` compatibility; a pod's containers
        /// share its namespace.
        #[arg(short, long)]
        container: Option<String>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The supervisor `up` starts (not meant to be run by hand).
    #[command(hide = true)]
    Serve {
        #[arg(long, default_value_t = 2)]
        nodes: u8,
    },
}

/// What the supervisor writes once the mesh is ready.
#[derive(Serialize, Deserialize)]
struct ReadyInfo {
    pid: u32,
    kubeconfig: PathBuf,
    nodes: Vec<String>,
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("supervisor.pid")
}
fn ready_file(dir: &Path) -> PathBuf {
    dir.join("ready.json")
}
fn failed_file(dir: &Path) -> PathBuf {
    dir.join("failed.txt")
}
/// The supervisor's log lives next to the state directory so that it
/// survives a failed start for the user to read; `down` removes it.
fn log_file(dir: &Path) -> PathBuf {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("local");
    dir.with_file_name(format!("{name}.log"))
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

fn running_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    alive(pid).then_some(pid)
}

pub fn run(args: LocalArgs) -> Result<i32> {
    let dir = args.state_dir;
    match args.command {
        LocalCommand::Up { nodes, timeout } => up(&dir, nodes, Duration::from_secs(timeout)),
        LocalCommand::Down => down(&dir),
        LocalCommand::Status => status(&dir),
        LocalCommand::Exec {
            pod,
            namespace,
            container: _,
            command,
        } => exec(&dir, &namespace, &pod, &command),
        LocalCommand::Serve { nodes } => serve(&dir, nodes),
    }
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the local mesh creates network namespaces and nftables rules: run as root");
    }
    Ok(())
}

fn up(dir: &Path, nodes: u8, timeout: Duration) -> Result<i32> {
    require_root()?;
    if let Some(pid) = running_pid(dir) {
        println!(
            "local mesh already running (supervisor pid {pid}); `ambientctl local status` shows it"
        );
        return Ok(0);
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = log_file(dir);
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locating ambientctl")?;
    // `setsid`: the supervisor outlives this command and the terminal.
    let child = Command::new("setsid")
        .arg(exe)
        .arg("local")
        .arg("--state-dir")
        .arg(dir)
        .arg("serve")
        .arg("--nodes")
        .arg(nodes.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the local mesh supervisor (needs `setsid` from util-linux)")?;
    let pid = child.id();
    eprintln!(
        "starting the local mesh ({nodes} nodes); log: {}",
        log_path.display()
    );
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read(ready_file(dir)) {
            let info: ReadyInfo = serde_json::from_slice(&text).context("reading ready.json")?;
            print_ready(&info);
            return Ok(0);
        }
        if let Ok(msg) = std::fs::read_to_string(failed_file(dir)) {
            bail!(
                "the local mesh did not start: {msg}\n(log: {})",
                log_path.display()
            );
        }
        if !alive(pid) && std::fs::read(ready_file(dir)).is_err() {
            bail!(
                "the local mesh supervisor exited before it was ready; last log lines:\n{}",
                tail(&log_path, 40)
            );
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            bail!(
                "the local mesh was not ready within {timeout:?}; stopping it. Last log lines:\n{}",
                tail(&log_path, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn print_ready(info: &ReadyInfo) {
    println!(
        "local mesh is up: nodes {}; istiod-lite in istio-system; ztunnel and the node agent on every node",
        info.nodes.join(", ")
    );
    println!();
    println!("Point kubectl at it:");
    println!("  export KUBECONFIG={}", info.kubeconfig.display());
    println!("  kubectl get nodes");
    println!();
    println!("Enroll a namespace in ambient mode:");
    println!("  kubectl label namespace default istio.io/dataplane-mode=ambient");
    println!("Run a command in a pod:");
    println!("  ambientctl local exec <pod> -n <namespace> -- curl -s http://productpage:9080/productpage");
    println!("Stop it and remove everything:");
    println!("  ambientctl local down");
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn serve(dir: &Path, nodes: u8) -> Result<i32> {
    require_root()?;
    let interrupt = e2e::interrupt::Interrupt::install("stopping the local mesh")?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(pid_file(dir), std::process::id().to_string())?;
    let spec = LocalMeshSpec {
        nodes: (1..=nodes).map(|i| format!("node{i}")).collect(),
        state_dir: dir.to_path_buf(),
    };
    let mesh = match LocalMesh::start(spec) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::write(failed_file(dir), format!("{e:#}"));
            eprintln!("local mesh failed to start: {e:#}");
            return Ok(1);
        }
    };
    let info = ReadyInfo {
        pid: std::process::id(),
        kubeconfig: mesh.kubeconfig().to_path_buf(),
        nodes: mesh.spec.nodes.clone(),
    };
    std::fs::write(ready_file(dir), serde_json::to_vec_pretty(&info)?)?;
    eprintln!("local mesh ready");
    while !interrupt.raised() {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("stopping the local mesh");
    drop(mesh);
    let _ = std::fs::remove_dir_all(dir);
    eprintln!("local mesh stopped");
    Ok(0)
}

fn down(dir: &Path) -> Result<i32> {
    require_root()?;
    let Some(pid) = running_pid(dir) else {
        // Leftovers of a supervisor that was killed: namespaces of dead runs.
        let removed = e2e::topology::cleanup_stale().unwrap_or_default();
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_file(log_file(dir));
        if removed.is_empty() {
            println!("local mesh is not running");
        } else {
            println!(
                "local mesh was not running; removed {} leftover namespaces",
                removed.len()
            );
        }
        return Ok(0);
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .context("signalling the supervisor")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("the local mesh supervisor (pid {pid}) did not stop within 120s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(log_file(dir));
    println!("local mesh is down");
    Ok(0)
}

fn status(dir: &Path) -> Result<i32> {
    let Some(pid) = running_pid(dir) else {
        println!("local mesh is not running");
        return Ok(3);
    };
    let Ok(text) = std::fs::read(ready_file(dir)) else {
        println!("local mesh is starting (supervisor pid {pid})");
        return Ok(0);
    };
    let info: ReadyInfo = serde_json::from_slice(&text)?;
    println!(
        "local mesh is running (supervisor pid {pid}, state {})",
        dir.display()
    );
    println!("KUBECONFIG={}", info.kubeconfig.display());
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&info.kubeconfig)
        .args(["get", "nodes", "-o", "wide"])
        .output()
        .context("running kubectl")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&info.kubeconfig)
        .args(["get", "pods", "-A", "-o", "wide"])
        .output()
        .context("running kubectl")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(0)
}

fn exec(dir: &Path, namespace: &str, pod: &str, command: &[String]) -> Result<i32> {
    require_root()?;
    if running_pid(dir).is_none() {
        bail!("local mesh is not running (start it with `ambientctl local up`)");
    }
    let rec = e2e::local::find_pod_record(dir, namespace, pod).with_context(|| {
        format!("pod {namespace}/{pod} is not running in the local mesh (see `kubectl get pods -n {namespace}`)")
    })?;
    // Tools the sample images ship that are built in here (fortio).
    let argv: Vec<String> = match e2e::samples::builtin_command(command) {
        Some(args) => std::iter::once(e2e::app::binary("sample-app")?.display().to_string())
            .chain(args)
            .collect(),
        None => command.to_vec(),
    };
    let status = Command::new("ip")
        .args(["netns", "exec", &rec.netns])
        .args(&argv)
        .env("HOSTNAME", &rec.name)
        .status()
        .with_context(|| format!("running {:?} in pod {namespace}/{pod}", command[0]))?;
    Ok(status.code().unwrap_or(128 + 9))
}
