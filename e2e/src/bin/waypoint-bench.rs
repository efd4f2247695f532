//! `waypoint-bench`: what a waypoint costs on the request path. On one local
//! mesh (two nodes) it sets up three namespaces with the same client (node1)
//! and fortio echo server (node2) behind a Service, and drives HTTP/1.1 load
//! from the client pod to the service VIP:
//!
//! - direct: a namespace outside the mesh (plain service routing);
//! - ztunnel: an ambient namespace, so the connection goes client ->
//!   node1's ztunnel -> HBONE -> node2's ztunnel -> server;
//! - waypoint: an ambient namespace with a waypoint enrolled, so ztunnel
//!   sends it to the waypoint over HBONE, which parses the HTTP and sends
//!   every request on over HBONE to the server.
//!
//! Figures per mode: closed-loop requests/s on 16 connections; at a fixed
//! 1,000 requests/s on 4 connections, the p50/p90/p99 latency, the waypoint
//! process's CPU (cores, from its utime + stime over the run) and resident
//! memory, and the two ztunnels' CPU. Ratios are against direct in the same
//! run. The load comes from this binary's `client` subcommand, run inside
//! the client pod's network namespace (see `bench/http_load.rs`).
//!
//! Needs root. Run it through `scripts/bench.sh --waypoint`, which builds
//! release binaries and points `MESH_BIN_DIR` at them.

#![forbid(unsafe_code)]

#[path = "../bench/http_load.rs"]
mod http_load;

use std::fs;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args as ClapArgs, Parser, Subcommand};
use e2e::interrupt::Interrupt;
use e2e::local::{LocalMesh, LocalMeshSpec};
use e2e::procstat::{parse_env, process_jiffies};
use serde_json::{json, Value};

use http_load::{LoadReport, LoadSpec};

/// The issue's bounds for the waypoint at the fixed rate.
const CPU_TARGET_CORES: f64 = 0.06;
const RSS_TARGET_MB: f64 = 20.0;
const CLIENT_NODE: &str = "node1";
const SERVER_NODE: &str = "node2";
const SERVER_PORT: u16 = 8080;

#[derive(Parser)]
#[command(
    name = "waypoint-bench",
    about = "HTTP through a waypoint vs ztunnel only vs direct on the local mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// The load generator (run inside the client pod); prints one JSON
    /// report.
    Client(ClientArgs),
}

#[derive(ClapArgs)]
struct BenchArgs {
    /// Measured seconds of each run (closed loop and fixed rate, per mode).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured seconds before each run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Connections of the closed-loop run.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests/s of the fixed-rate run.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Connections of the fixed-rate run.
    #[arg(long, default_value_t = 4)]
    rate_connections: usize,
    /// Worker threads of the load generator (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// `RUST_LOG` for the waypoint (set on its Deployment after it is
    /// provisioned), e.g. `warn` to leave out the per-request access log;
    /// by default it runs as provisioned.
    #[arg(long)]
    waypoint_log: Option<String>,
    /// Extra environment for the waypoint, `NAME=VALUE` (repeatable), set
    /// on its Deployment like `--waypoint-log`, e.g.
    /// `TOKIO_WORKER_THREADS=1` to try a one-thread runtime.
    #[arg(long = "waypoint-env", value_parser = parse_env)]
    waypoint_env: Vec<(String, String)>,
    /// Where the mesh keeps its state (removed at the end).
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(ClapArgs)]
struct ClientArgs {
    /// Address to connect to (the service VIP and port).
    #[arg(long)]
    addr: SocketAddr,
    /// `Host` header.
    #[arg(long)]
    host: String,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Requests/s over all connections; closed loop when absent.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// One side of the comparison: a namespace and how it joins the mesh.
struct Mode {
    name: &'static str,
    namespace: &'static str,
    ambient: bool,
    waypoint: bool,
}

const MODES: [Mode; 3] = [
    Mode {
        name: "direct",
        namespace: "wb-direct",
        ambient: false,
        waypoint: false,
    },
    Mode {
        name: "ztunnel",
        namespace: "wb-ztunnel",
        ambient: true,
        waypoint: false,
    },
    Mode {
        name: "waypoint",
        namespace: "wb-waypoint",
        ambient: true,
        waypoint: true,
    },
];

/// Everything one mode produced.
struct ModeResult {
    closed: LoadReport,
    fixed: LoadReport,
    waypoint: Option<WaypointUse>,
    ztunnel_cores: f64,
    /// Busy share of all CPUs (every process, ours or not) during the
    /// closed-loop and the fixed-rate run.
    machine_busy_closed: f64,
    machine_busy_fixed: f64,
}

/// The waypoint process over the fixed-rate run.
struct WaypointUse {
    pod: String,
    node: String,
    cores: f64,
    rss_mb: f64,
    peak_rss_mb: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Client(c)) = cli.command {
        let report = http_load::run(LoadSpec {
            addr: c.addr,
            host: c.host,
            path: c.path,
            connections: c.connections,
            duration: Duration::from_secs_f64(c.seconds),
            warmup: Duration::from_secs_f64(c.warmup),
            rate: c.rate,
            threads: c.threads,
        })?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if !e2e::is_root() {
        bail!("waypoint-bench needs root (network namespaces); run it through scripts/bench.sh --waypoint");
    }
    let interrupt =
        Interrupt::install("waypoint-bench: stopping after the current step and cleaning up")?;
    bench(&cli.bench, &interrupt)
}

fn bench(args: &BenchArgs, interrupt: &Interrupt) -> anyhow::Result<()> {
    let state_dir = args.state_dir.clone().unwrap_or_else(|| {
        std::path::PathBuf::from(format!(
            "/var/run/ambient-mesh/waypoint-bench-{}",
            std::process::id()
        ))
    });
    progress(args, "starting the local mesh (2 nodes)");
    let mut mesh = LocalMesh::start(LocalMeshSpec {
        nodes: vec![CLIENT_NODE.into(), SERVER_NODE.into()],
        state_dir,
    })?;
    // A run is warm-up + measurement plus the client's start; leave room.
    mesh.topo
        .set_exec_timeout(Duration::from_secs_f64(60.0 + args.seconds + args.warmup));
    for m in &MODES {
        mesh.apply(&manifest(m))
            .with_context(|| format!("applying the {} namespace", m.name))?;
    }
    progress(args, "enrolling a waypoint in wb-waypoint");
    waypoint_apply(&mesh, MODES[2].namespace)?;
    let waypoint_env = waypoint_env(args);
    if !waypoint_env.is_empty() {
        progress(
            args,
            &format!("restarting the waypoint with {}", waypoint_env.join(" ")),
        );
        set_waypoint_env(&mesh, MODES[2].namespace, &waypoint_env)?;
    }
    for m in &MODES {
        mesh.wait_pods_ready(m.namespace, Duration::from_secs(180))?;
    }
    interrupt.check()?;

    let mut results = Vec::new();
    for m in &MODES {
        progress(args, &format!("{}: checking the path", m.name));
        let target = Target::find(&mesh, m)?;
        target.wait_path(&mesh, m, args)?;
        interrupt.check()?;
        progress(
            args,
            &format!("{}: closed loop, {} connections", m.name, args.connections),
        );
        let before = CpuSample::take(&[]);
        let closed = target.load(&mesh, args, args.connections, None)?;
        let machine_busy_closed = CpuSample::take(&[]).busy_since(&before);
        interrupt.check()?;
        progress(
            args,
            &format!(
                "{}: {} requests/s on {} connections",
                m.name, args.rate, args.rate_connections
            ),
        );
        let zt_pids: Vec<u32> = mesh
            .nodes
            .iter()
            .filter_map(|n| n.ztunnel().map(|p| p.pid()))
            .collect();
        let mut pids = zt_pids.clone();
        pids.extend(target.waypoint_pid);
        let before = CpuSample::take(&pids);
        let fixed = target.load(&mesh, args, args.rate_connections, Some(args.rate))?;
        let after = CpuSample::take(&pids);
        let cores = after.cores_since(&before);
        let machine_busy_fixed = after.busy_since(&before);
        let ztunnel_cores = cores[..zt_pids.len()].iter().sum();
        let waypoint = match (target.waypoint_pid, &target.waypoint_pod) {
            (Some(pid), Some((pod, node))) => {
                let (rss_mb, peak_rss_mb) = memory_mb(pid);
                Some(WaypointUse {
                    pod: pod.clone(),
                    node: node.clone(),
                    cores: cores[zt_pids.len()],
                    rss_mb,
                    peak_rss_mb,
                })
            }
            _ => None,
        };
        results.push(ModeResult {
            closed,
            fixed,
            waypoint,
            ztunnel_cores,
            machine_busy_closed,
            machine_busy_fixed,
        });
        interrupt.check()?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(args, &results))?
        );
    } else {
        print_table(args, &results);
    }
    drop(mesh);
    Ok(())
}

fn progress(args: &BenchArgs, what: &str) {
    if !args.json {
        eprintln!("-- {what}");
    }
}

/// The namespace of a mode: ServiceAccounts, the fortio echo server on the
/// server node behind Service `server`, and an idle client pod on the
/// client node (the load generator runs in its network namespace). An
/// ambient namespace carries the label from the start, so its pods are
/// captured when they are created.
fn manifest(m: &Mode) -> String {
    let ns = m.namespace;
    let labels = if m.ambient {
        "\n  labels:\n    istio.io/dataplane-mode: ambient"
    } else {
        ""
    };
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {ns}{labels}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: server
  namespace: {ns}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: client
  namespace: {ns}
---
apiVersion: v1
kind: Service
metadata:
  name: server
  namespace: {ns}
  labels:
    app: server
spec:
  selector:
    app: server
  ports:
  - name: http
    port: {SERVER_PORT}
    targetPort: {SERVER_PORT}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: server
  namespace: {ns}
spec:
  replicas: 1
  selector:
    matchLabels:
      app: server
  template:
    metadata:
      labels:
        app: server
    spec:
      nodeName: {SERVER_NODE}
      serviceAccountName: server
      terminationGracePeriodSeconds: 0
      containers:
      - name: fortio
        image: fortio/fortio:latest_release
        args: ["server"]
        ports:
        - containerPort: {SERVER_PORT}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: client
  namespace: {ns}
spec:
  replicas: 1
  selector:
    matchLabels:
      app: client
  template:
    metadata:
      labels:
        app: client
    spec:
      nodeName: {CLIENT_NODE}
      serviceAccountName: client
      terminationGracePeriodSeconds: 0
      containers:
      - name: client
        image: curlimages/curl
        command: ["/bin/sleep", "infinity"]
"#
    )
}

/// `ambientctl waypoint apply --enroll-namespace --wait`, as a user would.
fn waypoint_apply(mesh: &LocalMesh, namespace: &str) -> anyhow::Result<()> {
    let out = Command::new(e2e::app::binary("ambientctl")?)
        .args([
            "waypoint",
            "apply",
            "-n",
            namespace,
            "--enroll-namespace",
            "--wait",
            "--kubeconfig",
        ])
        .arg(mesh.kubeconfig())
        .output()
        .context("running ambientctl")?;
    if !out.status.success() {
        bail!(
            "ambientctl waypoint apply failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Every `NAME=VALUE` the waypoint gets on top of what was provisioned.
fn waypoint_env(args: &BenchArgs) -> Vec<String> {
    args.waypoint_log
        .iter()
        .map(|f| format!("RUST_LOG={f}"))
        .chain(args.waypoint_env.iter().map(|(k, v)| format!("{k}={v}")))
        .collect()
}

/// Adds variables to the provisioned waypoint Deployment and waits until
/// the restarted pod is the only one left. istiod-lite applies the
/// Deployment server-side under its own field manager, and the env list
/// merges by name, so the added variable stays.
fn set_waypoint_env(mesh: &LocalMesh, namespace: &str, env: &[String]) -> anyhow::Result<()> {
    let mut argv = vec!["set", "env", "-n", namespace, "deployment/waypoint"];
    argv.extend(env.iter().map(String::as_str));
    mesh.kubectl(&argv)?;
    mesh.kubectl(&[
        "rollout",
        "status",
        "-n",
        namespace,
        "deployment/waypoint",
        "--timeout=120s",
    ])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods = mesh.kubectl(&[
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            "gateway.networking.k8s.io/gateway-name=waypoint",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
        ])?;
        if pods.lines().filter(|l| !l.trim().is_empty()).count() == 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("old waypoint pods still there after 60s:\n{pods}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Where a mode's load goes and who measures it.
struct Target {
    namespace: String,
    client_pod: String,
    vip: SocketAddr,
    host: String,
    /// The waypoint's pod and node, and its process.
    waypoint_pod: Option<(String, String)>,
    waypoint_pid: Option<u32>,
}

impl Target {
    fn find(mesh: &LocalMesh, m: &Mode) -> anyhow::Result<Target> {
        let ns = m.namespace;
        let first_pod = |selector: &str| -> anyhow::Result<String> {
            let name = mesh.kubectl(&[
                "get",
                "pods",
                "-n",
                ns,
                "-l",
                selector,
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ])?;
            let name = name.trim().to_string();
            if name.is_empty() {
                bail!("no pod {selector} in {ns}");
            }
            Ok(name)
        };
        let client_pod = first_pod("app=client")?;
        let ip = mesh.kubectl(&[
            "get",
            "service",
            "server",
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?;
        let vip = SocketAddr::new(
            ip.trim()
                .parse()
                .with_context(|| format!("ClusterIP of {ns}/server: {ip:?}"))?,
            SERVER_PORT,
        );
        let (waypoint_pod, waypoint_pid) = if m.waypoint {
            let pod = first_pod("gateway.networking.k8s.io/gateway-name=waypoint")?;
            let rec = mesh
                .pod_record(ns, &pod)
                .with_context(|| format!("no record of the waypoint pod {ns}/{pod}"))?;
            let pid = rec
                .containers
                .iter()
                .map(|(_, pid)| *pid)
                .find(|pid| *pid != 0)
                .with_context(|| format!("the waypoint pod {ns}/{pod} has no process"))?;
            (Some((pod, rec.node)), Some(pid))
        } else {
            (None, None)
        };
        Ok(Target {
            namespace: ns.to_string(),
            client_pod,
            vip,
            host: format!("server.{ns}.svc.cluster.local:{SERVER_PORT}"),
            waypoint_pod,
            waypoint_pid,
        })
    }

    /// Runs the load generator in the client pod and reads its report.
    fn load(
        &self,
        mesh: &LocalMesh,
        args: &BenchArgs,
        connections: usize,
        rate: Option<f64>,
    ) -> anyhow::Result<LoadReport> {
        self.run_client(
            mesh,
            connections,
            args.seconds,
            args.warmup,
            rate,
            args.client_threads,
        )
    }

    fn run_client(
        &self,
        mesh: &LocalMesh,
        connections: usize,
        seconds: f64,
        warmup: f64,
        rate: Option<f64>,
        threads: usize,
    ) -> anyhow::Result<LoadReport> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut argv: Vec<String> = vec![
            exe.display().to_string(),
            "client".into(),
            "--addr".into(),
            self.vip.to_string(),
            "--host".into(),
            self.host.clone(),
            "--connections".into(),
            connections.to_string(),
            "--seconds".into(),
            seconds.to_string(),
            "--warmup".into(),
            warmup.to_string(),
            "--threads".into(),
            threads.to_string(),
        ];
        if let Some(r) = rate {
            argv.extend(["--rate".into(), r.to_string()]);
        }
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = mesh.exec(&self.namespace, &self.client_pod, &argv)?;
        if !out.success() {
            bail!(
                "load generator in {}/{} failed:\n{}{}",
                self.namespace,
                self.client_pod,
                out.stdout,
                out.stderr
            );
        }
        let line = out
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("no report from the load generator: {}", out.stdout))?;
        Ok(serde_json::from_str(line)?)
    }

    /// Until a short load succeeds without errors and, in the mesh modes,
    /// the traffic shows where it should: in the client node's ztunnel
    /// metrics, and for the waypoint mode in the waypoint's
    /// `istio_requests_total{reporter="waypoint"}` for this service.
    fn wait_path(&self, mesh: &LocalMesh, m: &Mode, args: &BenchArgs) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let probe = self.run_client(mesh, 1, 0.3, 0.0, None, 1);
            let ok = matches!(&probe, Ok(r) if r.requests > 0 && r.errors == 0);
            let captured = !m.ambient
                || mesh
                    .ztunnel_get(CLIENT_NODE, 15020, "/metrics")
                    .is_some_and(|(_, body)| body.contains(self.namespace.as_str()));
            let via_waypoint = !m.waypoint || self.waypoint_saw_requests(mesh);
            if ok && captured && via_waypoint {
                return Ok(());
            }
            if Instant::now() > deadline {
                let probe = match probe {
                    Ok(r) => format!(
                        "{} requests, {} errors, last error {:?}",
                        r.requests, r.errors, r.last_error
                    ),
                    Err(e) => format!("{e:#}"),
                };
                bail!(
                    "{}: path not working after 90s (probe: {probe}; captured by ztunnel: {captured}; through the waypoint: {via_waypoint})",
                    m.name
                );
            }
            if !args.json {
                tracing::info!(
                    mode = m.name,
                    ok,
                    captured,
                    via_waypoint,
                    "path not ready yet"
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn waypoint_saw_requests(&self, mesh: &LocalMesh) -> bool {
        let Some((pod, _)) = &self.waypoint_pod else {
            return false;
        };
        let metrics = mesh
            .exec(
                &self.namespace,
                pod,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "5",
                    "http://127.0.0.1:15020/metrics",
                ],
            )
            .map(|o| o.stdout)
            .unwrap_or_default();
        let service = format!("server.{}", self.namespace);
        metrics.lines().any(|l| {
            l.starts_with("istio_requests_total")
                && l.contains("reporter=\"waypoint\"")
                && l.contains(&service)
        })
    }
}

/// Jiffies of the whole machine and of some processes, to turn process CPU
/// time into cores: (process jiffies / machine jiffies) * CPUs. Both count
/// in the same unit, so the kernel's tick rate cancels out.
struct CpuSample {
    total: u64,
    /// `total` less idle and iowait.
    busy: u64,
    cpus: usize,
    procs: Vec<u64>,
}

impl CpuSample {
    fn take(pids: &[u32]) -> CpuSample {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        // user nice system idle iowait irq softirq steal (guest time is
        // already inside user).
        let fields: Vec<u64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .take(8)
                    .filter_map(|f| f.parse::<u64>().ok())
                    .collect()
            })
            .unwrap_or_default();
        let total: u64 = fields.iter().sum();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count()
            .max(1);
        CpuSample {
            total,
            busy: total.saturating_sub(idle),
            cpus,
            procs: pids.iter().map(|p| process_jiffies(*p)).collect(),
        }
    }

    /// Percent of all CPUs busy between `before` and now.
    fn busy_since(&self, before: &CpuSample) -> f64 {
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        100.0 * self.busy.saturating_sub(before.busy) as f64 / total
    }

    /// Cores each process used between `before` and now.
    fn cores_since(&self, before: &CpuSample) -> Vec<f64> {
        let per_cpu = (self.total.saturating_sub(before.total) as f64 / self.cpus as f64).max(1.0);
        self.procs
            .iter()
            .zip(&before.procs)
            .map(|(now, then)| now.saturating_sub(*then) as f64 / per_cpu)
            .collect()
    }
}

/// VmRSS and VmHWM (peak) of a process, in MB (10^6 bytes).
fn memory_mb(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") * 1024.0 / 1e6, kb("VmHWM:") * 1024.0 / 1e6)
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

fn report_json(r: &LoadReport) -> Value {
    json!({
        "connections": r.connections,
        "target_rps": r.target_rps,
        "seconds": round(r.seconds, 3),
        "requests": r.requests,
        "errors": r.errors,
        "last_error": r.last_error,
        "rps": round(r.rps, 1),
        "p50_ms": round(r.p50_ms, 3),
        "p90_ms": round(r.p90_ms, 3),
        "p99_ms": round(r.p99_ms, 3),
        "max_ms": round(r.max_ms, 3),
        "held_back": r.held_back,
    })
}

fn to_json(args: &BenchArgs, results: &[ModeResult]) -> Value {
    let direct = &results[0];
    let modes: Vec<Value> = MODES
        .iter()
        .zip(results)
        .map(|(m, r)| {
            let lat = |f: fn(&LoadReport) -> f64| {
                ratio(f(&r.fixed), f(&direct.fixed)).map(|v| round(v, 3))
            };
            json!({
                "mode": m.name,
                "namespace": m.namespace,
                "closed_loop": report_json(&r.closed),
                "fixed_rate": report_json(&r.fixed),
                "ratio_vs_direct": {
                    "rps": ratio(r.closed.rps, direct.closed.rps).map(|v| round(v, 3)),
                    "p50": lat(|x| x.p50_ms),
                    "p90": lat(|x| x.p90_ms),
                    "p99": lat(|x| x.p99_ms),
                },
                "ztunnels_cpu_cores": round(r.ztunnel_cores, 4),
                "machine_busy_pct": {
                    "closed_loop": round(r.machine_busy_closed, 1),
                    "fixed_rate": round(r.machine_busy_fixed, 1),
                },
                "waypoint": r.waypoint.as_ref().map(|w| json!({
                    "pod": w.pod,
                    "node": w.node,
                    "cpu_cores": round(w.cores, 4),
                    "rss_mb": round(w.rss_mb, 1),
                    "peak_rss_mb": round(w.peak_rss_mb, 1),
                    "meets_target": w.cores <= CPU_TARGET_CORES && w.rss_mb <= RSS_TARGET_MB,
                })),
            })
        })
        .collect();
    json!({
        "seconds": args.seconds,
        "warmup": args.warmup,
        "closed_loop_connections": args.connections,
        "fixed_rate_rps": args.rate,
        "fixed_rate_connections": args.rate_connections,
        "client_threads": args.client_threads,
        "waypoint_env": waypoint_env(args),
        "target": {"waypoint_cpu_cores": CPU_TARGET_CORES, "waypoint_rss_mb": RSS_TARGET_MB},
        "modes": modes,
    })
}

fn print_table(args: &BenchArgs, results: &[ModeResult]) {
    let direct = &results[0];
    println!();
    println!(
        "{:<10}{:>12}{:>7}  {:<28}{:>9}{:>14}{:>14}{:>14}",
        "mode",
        format!("rps({}c)", args.connections),
        "ratio",
        format!("p50/p90/p99 @{}rps (ms)", args.rate),
        "p99 x",
        "waypoint cpu",
        "waypoint rss",
        "ztunnels cpu",
    );
    for (m, r) in MODES.iter().zip(results) {
        let f = &r.fixed;
        let fmt_ratio = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let (cpu, rss) = match &r.waypoint {
            Some(w) => (
                format!("{:.3} cores", w.cores),
                format!("{:.1} MB", w.rss_mb),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<10}{:>12.0}{:>7}  {:<28}{:>9}{:>14}{:>14}{:>14}",
            m.name,
            r.closed.rps,
            fmt_ratio(ratio(r.closed.rps, direct.closed.rps)),
            format!("{:.2}/{:.2}/{:.2}", f.p50_ms, f.p90_ms, f.p99_ms),
            fmt_ratio(ratio(f.p99_ms, direct.fixed.p99_ms)),
            cpu,
            rss,
            format!("{:.3} cores", r.ztunnel_cores),
        );
    }
    println!();
    for (m, r) in MODES.iter().zip(results) {
        for (what, rep) in [("closed loop", &r.closed), ("fixed rate", &r.fixed)] {
            if rep.errors > 0 {
                println!(
                    "warning: {} {what}: {} errors (last: {})",
                    m.name,
                    rep.errors,
                    rep.last_error.as_deref().unwrap_or("-")
                );
            }
        }
        if r.fixed.target_rps.is_some_and(|t| r.fixed.rps < 0.95 * t) {
            println!(
                "warning: {} reached only {:.0} of {} requests/s",
                m.name, r.fixed.rps, args.rate
            );
        }
    }
    println!(
        "machine CPU busy (all processes, {} CPUs) closed loop / fixed rate: {}",
        CpuSample::take(&[]).cpus,
        MODES
            .iter()
            .zip(results)
            .map(|(m, r)| format!(
                "{} {:.0}%/{:.0}%",
                m.name, r.machine_busy_closed, r.machine_busy_fixed
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(w) = results.last().and_then(|r| r.waypoint.as_ref()) {
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!(
            "waypoint {} on {}: target <= {CPU_TARGET_CORES} cores {} ({:.3}), <= {RSS_TARGET_MB} MB {} ({:.1} MB, peak {:.1} MB)",
            w.pod,
            w.node,
            verdict(w.cores <= CPU_TARGET_CORES),
            w.cores,
            verdict(w.rss_mb <= RSS_TARGET_MB),
            w.rss_mb,
            w.peak_rss_mb,
        );
    }
    println!(
        "client on {CLIENT_NODE}, server on {SERVER_NODE}; {}s measured after {}s warm-up per run; waypoint environment {}; ratios against direct in this run",
        args.seconds,
        args.warmup,
        match waypoint_env(args) {
            e if e.is_empty() => "as provisioned".to_string(),
            e => format!("+ {}", e.join(" ")),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        // Our own process: utime + stime parse and only grow.
        let a = process_jiffies(std::process::id());
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(process_jiffies(std::process::id()) >= a);
        assert_eq!(process_jiffies(u32::MAX), 0);
    }

    #[test]
    fn waypoint_env_takes_name_value_pairs() {
        assert_eq!(
            parse_env("TOKIO_WORKER_THREADS=1"),
            Ok(("TOKIO_WORKER_THREADS".into(), "1".into()))
        );
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("novalue").is_err());
        assert!(parse_env("=x").is_err());
    }

    #[test]
    fn own_memory_is_read() {
        let (rss, peak) = memory_mb(std::process::id());
        assert!(rss > 0.0 && peak >= rss, "{rss} {peak}");
    }

    #[test]
    fn manifests_label_only_the_mesh_namespaces() {
        assert!(!manifest(&MODES[0]).contains("dataplane-mode"));
        for m in &MODES[1..] {
            let y = manifest(m);
            assert!(y.contains("istio.io/dataplane-mode: ambient"), "{y}");
            for doc in serde_yaml::Deserializer::from_str(&y) {
                use serde::Deserialize;
                serde_yaml::Value::deserialize(doc).unwrap();
            }
        }
    }
}
