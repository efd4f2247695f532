//! `mesh-bench`: what the mesh costs on the data path. It builds the two-node
//! topology once and measures the same traffic twice, client pod on node n1
//! to server pod on node n2:
//!
//! - direct: two pods outside the mesh, no capture rules, plain routing;
//! - mesh: two enrolled pods, so the client's connection is captured in-pod
//!   by n1's ztunnel, carried over HBONE (mutual TLS, HTTP/2 CONNECT on
//!   15008) to n2's ztunnel and handed to the server from the client's own
//!   address.
//!
//! Figures: single- and multi-stream throughput, 64-byte request/response
//! latency on one connection (as scheduled, and with the whole path pinned
//! to one CPU, see [`Pinned`]), and the rate of new connections each
//! echoing one byte. Every figure comes from `mesh-app bench` run inside the pods;
//! this binary only drives them and compares. Each figure is the median of a
//! few rounds, and direct and mesh runs alternate, so a burst of other load
//! on the machine hits both sides of a ratio alike. It also samples CPU time (of
//! the whole machine, each ztunnel and the server) around every
//! measurement, because client, server and both ztunnels share the same
//! cores and that is usually what bounds the mesh figures.
//!
//! Needs root. Run it through `scripts/bench.sh`, which builds release
//! binaries and points `MESH_BIN_DIR` at them.

use e2e::interrupt::Interrupt;
use std::collections::BTreeMap;
use std::fs;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use e2e::mesh::{Mesh, MeshSpec};
use e2e::procstat::{parse_env, process_jiffies};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use serde_json::{json, Value};

const SINK_PORT: u16 = 5001;
const RR_PORT: u16 = 5002;
const VIP: [u8; 4] = [10, 96, 0, 20];
const SERVICE: &str = "bench";

/// The goals the mesh is held to, as a share of the direct figure.
const THROUGHPUT_TARGET: f64 = 0.5;
const LATENCY_TARGET: f64 = 4.0;
/// Background load (% of all CPUs) above which the table carries a warning.
const BUSY_WARNING: f64 = 10.0;

#[derive(Parser)]
#[command(
    name = "mesh-bench",
    about = "Compare pod-to-pod traffic across nodes with and without the mesh"
)]
struct Args {
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds of every measurement; the table shows the median.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Parallel connections of the multi-stream throughput run.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Request/response exchanges measured on the one connection.
    #[arg(long, default_value_t = 20_000)]
    rr_count: usize,
    /// Request and response size of the latency run, in bytes.
    #[arg(long, default_value_t = 64)]
    rr_size: usize,
    /// Seconds of the connection-rate run.
    #[arg(long, default_value_t = 3.0)]
    cps_seconds: f64,
    /// Connections the connection-rate client keeps in flight.
    #[arg(long, default_value_t = 1)]
    cps_concurrency: usize,
    /// Where the mesh client connects: the server pod's IP or the service VIP
    /// in front of it.
    #[arg(long, value_enum, default_value_t = Dest::Pod)]
    dest: Dest,
    /// ztunnel's log filter. At `info` it logs every connection, which the
    /// connection-rate figure then includes.
    #[arg(long, default_value = "warn")]
    ztunnel_log: String,
    /// Extra environment for both ztunnels, `NAME=VALUE` (repeatable), e.g.
    /// `TOKIO_WORKER_THREADS=1` to try a smaller runtime.
    #[arg(long = "ztunnel-env", value_parser = parse_env)]
    ztunnel_env: Vec<(String, String)>,
    /// Print one JSON document (figures, ratios, CPU, raw client output)
    /// instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dest {
    Pod,
    Vip,
}

/// One side of the comparison.
struct Mode {
    name: &'static str,
    client: &'static str,
    server: &'static str,
}

const DIRECT: Mode = Mode {
    name: "direct",
    client: "direct-client",
    server: "direct-server",
};
const MESH: Mode = Mode {
    name: "mesh",
    client: "mesh-client",
    server: "mesh-server",
};

/// One line of the result table.
struct Figure {
    key: &'static str,
    label: String,
    unit: &'static str,
    higher_is_better: bool,
    /// The bound on mesh/direct, if the project sets one.
    target: Option<f64>,
}

fn figures(args: &Args) -> Vec<Figure> {
    vec![
        Figure {
            key: "throughput_1",
            label: "throughput, 1 stream".into(),
            unit: "Gbit/s",
            higher_is_better: true,
            target: Some(THROUGHPUT_TARGET),
        },
        Figure {
            key: "throughput_n",
            label: format!("throughput, {} streams", args.streams),
            unit: "Gbit/s",
            higher_is_better: true,
            target: Some(THROUGHPUT_TARGET),
        },
        Figure {
            key: "rr_p50",
            label: format!("{} B req/resp latency p50", args.rr_size),
            unit: "us",
            higher_is_better: false,
            target: Some(LATENCY_TARGET),
        },
        Figure {
            key: "rr_p99",
            label: format!("{} B req/resp latency p99", args.rr_size),
            unit: "us",
            higher_is_better: false,
            target: Some(LATENCY_TARGET),
        },
        Figure {
            key: "rr1_p50",
            label: format!("{} B req/resp p50, one CPU", args.rr_size),
            unit: "us",
            higher_is_better: false,
            target: Some(LATENCY_TARGET),
        },
        Figure {
            key: "rr1_p99",
            label: format!("{} B req/resp p99, one CPU", args.rr_size),
            unit: "us",
            higher_is_better: false,
            target: Some(LATENCY_TARGET),
        },
        Figure {
            key: "cps",
            label: format!("new conn + 1 B echo (x{})", args.cps_concurrency),
            unit: "conn/s",
            higher_is_better: true,
            target: None,
        },
    ]
}

#[derive(Clone, Copy)]
enum Step {
    Throughput1,
    ThroughputN,
    Rr,
    RrOneCpu,
    Cps,
}

/// Everything one mode produced, every repetition of every figure.
#[derive(Default)]
struct ModeResult {
    samples: BTreeMap<&'static str, Vec<f64>>,
    cpu: BTreeMap<&'static str, Vec<CpuUse>>,
    raw: BTreeMap<&'static str, Vec<Value>>,
}

impl ModeResult {
    fn record(&mut self, key: &'static str, value: f64) {
        self.samples.entry(key).or_default().push(value);
    }

    /// Keeps a client's output and the CPU use while it ran.
    fn run(&mut self, key: &'static str, raw: Value, cpu: CpuUse) {
        self.raw.entry(key).or_default().push(raw);
        self.cpu.entry(key).or_default().push(cpu);
    }

    /// The median over repetitions: one disturbed run does not move it.
    fn value(&self, key: &str) -> Option<f64> {
        median(self.samples.get(key)?.clone())
    }

    fn cpu(&self, key: &str) -> Option<CpuUse> {
        let runs = self.cpu.get(key)?;
        let field = |f: fn(&CpuUse) -> f64| median(runs.iter().map(f).collect());
        Some(CpuUse {
            machine: field(|c| c.machine)?,
            ztunnel_n1: field(|c| c.ztunnel_n1)?,
            ztunnel_n2: field(|c| c.ztunnel_n2)?,
            server: field(|c| c.server)?,
        })
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// CPU use over one measurement.
#[derive(Clone, Copy, Debug)]
struct CpuUse {
    /// Busy share of the whole machine, 0-100.
    machine: f64,
    /// Each as a share of one core, 0-100 per core used.
    ztunnel_n1: f64,
    ztunnel_n2: f64,
    server: f64,
}

impl CpuUse {
    fn json(&self) -> Value {
        json!({
            "machine_busy_pct": round1(self.machine),
            "ztunnel_n1_pct_of_core": round1(self.ztunnel_n1),
            "ztunnel_n2_pct_of_core": round1(self.ztunnel_n2),
            "server_pct_of_core": round1(self.server),
        })
    }
}

/// Jiffy counters read from `/proc`.
struct CpuSample {
    total: u64,
    busy: u64,
    cpus: usize,
    procs: Vec<u64>,
}

impl CpuSample {
    fn take(pids: &[u32]) -> CpuSample {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let mut total = 0;
        let mut busy = 0;
        if let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) {
            // user nice system idle iowait irq softirq steal (guest time is
            // already inside user).
            let fields: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .take(8)
                .filter_map(|f| f.parse().ok())
                .collect();
            total = fields.iter().sum();
            let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
            busy = total.saturating_sub(idle);
        }
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count()
            .max(1);
        let procs = pids.iter().map(|pid| process_jiffies(*pid)).collect();
        CpuSample {
            total,
            busy,
            cpus,
            procs,
        }
    }

    fn since(&self, before: &CpuSample) -> CpuUse {
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        let per_core = total / self.cpus as f64;
        let share = |i: usize| {
            let now = self.procs.get(i).copied().unwrap_or(0);
            let then = before.procs.get(i).copied().unwrap_or(0);
            100.0 * now.saturating_sub(then) as f64 / per_core
        };
        CpuUse {
            machine: 100.0 * self.busy.saturating_sub(before.busy) as f64 / total,
            ztunnel_n1: share(0),
            ztunnel_n2: share(1),
            server: share(2),
        }
    }
}

/// Threads pinned to the first CPU; their former affinity comes back on
/// drop. Request/response latency on a small VM depends mostly on whether
/// the processes of the path wake each other on the same CPU or across CPUs
/// (an idle virtual CPU takes tens of microseconds to wake), a placement the
/// scheduler decides differently from run to run; on one CPU the figure
/// shows what the path itself costs.
struct Pinned(Vec<(Pid, CpuSet)>);

impl Pinned {
    /// Every thread of `pids`, and the calling thread (so processes it
    /// starts inherit the pinning).
    fn to_first_cpu(pids: &[u32]) -> anyhow::Result<Pinned> {
        let mut tids = vec![Pid::from_raw(0)];
        for pid in pids.iter().filter(|p| **p != 0) {
            let tasks = fs::read_dir(format!("/proc/{pid}/task"))
                .with_context(|| format!("listing threads of {pid}"))?;
            tids.extend(
                tasks
                    .filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i32>().ok())
                    .map(Pid::from_raw),
            );
        }
        let mut first = CpuSet::new();
        first.set(0).context("CPU set")?;
        let mut pinned = Pinned(Vec::new());
        for tid in tids {
            // A thread may end between listing and pinning.
            let Ok(before) = sched_getaffinity(tid) else {
                continue;
            };
            if sched_setaffinity(tid, &first).is_ok() {
                pinned.0.push((tid, before));
            }
        }
        Ok(pinned)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for (tid, before) in &self.0 {
            let _ = sched_setaffinity(*tid, before);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let interrupt =
        Interrupt::install("mesh-bench: stopping after the current step and cleaning up")
            .context("installing signal handlers")?;
    let args = Args::parse();
    if !e2e::is_root() {
        bail!("mesh-bench needs root (it creates network namespaces); run scripts/bench.sh");
    }
    if [
        args.streams,
        args.repeat,
        args.rr_count,
        args.rr_size,
        args.cps_concurrency,
    ]
    .contains(&0)
    {
        bail!(
            "--streams, --repeat, --rr-count, --rr-size and --cps-concurrency must be at least 1"
        );
    }
    let spec = MeshSpec::default()
        .node("n1")
        .node("n2")
        .mesh_pod("n1", MESH.client, "bench-client")
        .mesh_pod("n2", MESH.server, "bench-server")
        .plain_pod("n1", DIRECT.client)
        .plain_pod("n2", DIRECT.server)
        .service(
            SERVICE,
            VIP,
            &[(SINK_PORT, SINK_PORT), (RR_PORT, RR_PORT)],
            &[MESH.server],
        )
        .ztunnel_env("RUST_LOG", &args.ztunnel_log);
    let spec = args
        .ztunnel_env
        .iter()
        .fold(spec, |spec, (k, v)| spec.ztunnel_env(k, v));
    eprintln!("mesh-bench: starting two nodes, four pods and two ztunnels");
    let mesh = Mesh::start(spec).context("starting the mesh")?;
    let bench = Bench {
        mesh: &mesh,
        args: &args,
        interrupt: &interrupt,
    };
    let outcome = bench.run();
    if outcome.is_err() && !interrupt.raised() {
        eprintln!("{}", mesh.ztunnel_logs());
    }
    let (direct, meshed, background) = outcome?;
    if args.json {
        let report = report_json(&mesh, &args, &direct, &meshed, background);
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&mesh, &args, &direct, &meshed, background);
    }
    eprintln!("mesh-bench: cleaning up");
    Ok(())
}

struct Bench<'a> {
    mesh: &'a Mesh,
    args: &'a Args,
    interrupt: &'a Interrupt,
}

impl Bench<'_> {
    /// Both modes' results and the machine's busy share (0-100) while
    /// nothing of the benchmark ran.
    fn run(&self) -> anyhow::Result<(ModeResult, ModeResult, f64)> {
        let mut servers = BTreeMap::new();
        for mode in [&DIRECT, &MESH] {
            let pod = self.mesh.topo.pod(mode.server);
            let sink = self.mesh.spawn_app(
                pod,
                &format!("sink-{}", mode.name),
                &["bench", "sink", "--port", &SINK_PORT.to_string()],
            )?;
            let rr = self.mesh.spawn_app(
                pod,
                &format!("rr-{}", mode.name),
                &["bench", "rr-server", "--port", &RR_PORT.to_string()],
            )?;
            self.mesh.topo.wait_for_tcp(pod, pod.addr(SINK_PORT))?;
            self.mesh.topo.wait_for_tcp(pod, pod.addr(RR_PORT))?;
            servers.insert(mode.name, (sink.pid(), rr.pid()));
        }
        // Whatever else runs on the machine competes for the same cores.
        let before = CpuSample::take(&[]);
        std::thread::sleep(std::time::Duration::from_secs(1));
        let background = CpuSample::take(&[]).since(&before).machine;
        eprintln!("mesh-bench: background load {background:.0}% of all CPUs");
        let mut results = [ModeResult::default(), ModeResult::default()];
        let modes = [&DIRECT, &MESH];
        for mode in modes {
            eprintln!(
                "mesh-bench: [{}] {} -> {} ({})",
                mode.name,
                mode.client,
                mode.server,
                self.dest_ip(mode)
            );
            // Warm-up: certificates, the HBONE connection pool, ARP.
            let rr = format!("{}:{RR_PORT}", self.dest_ip(mode));
            self.client(mode, &["bench", "rr-client", &rr, "--count", "200"])?;
        }
        // Direct and mesh run back to back for every figure, so a change in
        // background load hits both sides of a ratio alike.
        for round in 1..=self.args.repeat {
            if self.args.repeat > 1 {
                eprintln!("mesh-bench: round {round} of {}", self.args.repeat);
            }
            for step in [
                Step::Throughput1,
                Step::ThroughputN,
                Step::Rr,
                Step::RrOneCpu,
                Step::Cps,
            ] {
                for (mode, out) in modes.iter().zip(results.iter_mut()) {
                    self.interrupt.check()?;
                    self.step(step, mode, servers[mode.name], out)?;
                }
            }
        }
        let [direct, meshed] = results;
        Ok((direct, meshed, background))
    }

    fn dest_ip(&self, mode: &Mode) -> String {
        if mode.name == MESH.name && self.args.dest == Dest::Vip {
            std::net::Ipv4Addr::from(VIP).to_string()
        } else {
            self.mesh.topo.pod(mode.server).ip().to_string()
        }
    }

    fn step(
        &self,
        step: Step,
        mode: &Mode,
        (sink_pid, rr_pid): (u32, u32),
        out: &mut ModeResult,
    ) -> anyhow::Result<()> {
        let args = self.args;
        let ip = self.dest_ip(mode);
        let sink = format!("{ip}:{SINK_PORT}");
        let rr = format!("{ip}:{RR_PORT}");
        let secs = args.seconds.to_string();
        let name = mode.name;
        match step {
            Step::Throughput1 | Step::ThroughputN => {
                let (key, streams) = match step {
                    Step::Throughput1 => ("throughput_1", 1),
                    _ => ("throughput_n", args.streams),
                };
                let streams = streams.to_string();
                let (v, cpu) = self.timed(
                    mode,
                    sink_pid,
                    &[
                        "bench",
                        "source",
                        &sink,
                        "--seconds",
                        &secs,
                        "--streams",
                        &streams,
                    ],
                )?;
                let gbit = number(&v, "gbit_per_s")?;
                eprintln!("mesh-bench: [{name}] {key}: {gbit:.2} Gbit/s");
                out.record(key, gbit);
                out.run(key, v, cpu);
            }
            Step::Rr | Step::RrOneCpu => {
                let one_cpu = matches!(step, Step::RrOneCpu);
                let (key, p50_key, p99_key) = if one_cpu {
                    ("rr_one_cpu", "rr1_p50", "rr1_p99")
                } else {
                    ("rr", "rr_p50", "rr_p99")
                };
                let (count, size) = (args.rr_count.to_string(), args.rr_size.to_string());
                let cmd = [
                    "bench",
                    "rr-client",
                    &rr,
                    "--count",
                    &count,
                    "--size",
                    &size,
                ];
                let (v, cpu) = if one_cpu {
                    // Everything on the path, and this thread (whose
                    // affinity the client inherits), on the first CPU.
                    let mut pids = self.ztunnel_pids();
                    pids.push(rr_pid);
                    let _pinned = Pinned::to_first_cpu(&pids)?;
                    self.timed(mode, rr_pid, &cmd)?
                } else {
                    self.timed(mode, rr_pid, &cmd)?
                };
                let (p50, p99) = (number(&v, "p50_us")?, number(&v, "p99_us")?);
                eprintln!("mesh-bench: [{name}] {key}: p50 {p50:.1} us, p99 {p99:.1} us");
                out.record(p50_key, p50);
                out.record(p99_key, p99);
                out.run(key, v, cpu);
            }
            Step::Cps => {
                let (secs, conc) = (
                    args.cps_seconds.to_string(),
                    args.cps_concurrency.to_string(),
                );
                let (v, cpu) = self.timed(
                    mode,
                    rr_pid,
                    &[
                        "bench",
                        "cps-client",
                        &rr,
                        "--seconds",
                        &secs,
                        "--concurrency",
                        &conc,
                    ],
                )?;
                let cps = number(&v, "per_second")?;
                let errors = v["errors"].as_u64().unwrap_or(0);
                eprintln!("mesh-bench: [{name}] cps: {cps:.0} conn/s ({errors} errors)");
                out.record("cps", cps);
                out.run("cps", v, cpu);
            }
        }
        Ok(())
    }

    fn ztunnel_pids(&self) -> Vec<u32> {
        ["n1", "n2"]
            .iter()
            .map(|n| self.mesh.ztunnel(n).map(|p| p.pid()).unwrap_or(0))
            .collect()
    }

    /// Runs a client while sampling CPU around it.
    fn timed(&self, mode: &Mode, server_pid: u32, cmd: &[&str]) -> anyhow::Result<(Value, CpuUse)> {
        let mut pids = self.ztunnel_pids();
        pids.push(server_pid);
        let before = CpuSample::take(&pids);
        let v = self.client(mode, cmd)?;
        let cpu = CpuSample::take(&pids).since(&before);
        Ok((v, cpu))
    }

    /// Runs `mesh-app <cmd>` in the mode's client pod; its last JSON line.
    fn client(&self, mode: &Mode, cmd: &[&str]) -> anyhow::Result<Value> {
        let out = self.mesh.app(self.mesh.topo.pod(mode.client), cmd)?;
        if !out.success() {
            bail!(
                "`mesh-app {}` in {} failed ({}):\n{}{}",
                cmd.join(" "),
                mode.client,
                out.status,
                out.stdout,
                out.stderr
            );
        }
        let line = out
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| {
                format!("no JSON from `mesh-app {}`: {}", cmd.join(" "), out.stdout)
            })?;
        let v: Value = serde_json::from_str(line).with_context(|| format!("parsing {line}"))?;
        if v["bench"] == "cps" && v["connections"].as_u64() == Some(0) {
            bail!("no connection succeeded: {}", v["last_error"]);
        }
        Ok(v)
    }
}

fn number(v: &Value, key: &str) -> anyhow::Result<f64> {
    v[key]
        .as_f64()
        .with_context(|| format!("no number {key:?} in {v}"))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// mesh/direct, and whether it meets the target.
fn ratio(f: &Figure, direct: &ModeResult, meshed: &ModeResult) -> Option<(f64, Option<bool>)> {
    let d = direct.value(f.key)?;
    let m = meshed.value(f.key)?;
    if d <= 0.0 {
        return None;
    }
    let r = m / d;
    let met = f
        .target
        .map(|t| if f.higher_is_better { r >= t } else { r <= t });
    Some((r, met))
}

fn target_text(f: &Figure) -> String {
    match f.target {
        Some(t) if f.higher_is_better => format!(">= {t:.2}"),
        Some(t) => format!("<= {t:.2}"),
        None => "-".into(),
    }
}

fn print_table(
    mesh: &Mesh,
    args: &Args,
    direct: &ModeResult,
    meshed: &ModeResult,
    background: f64,
) {
    let t = &mesh.topo;
    let cpus = CpuSample::take(&[]).cpus;
    println!();
    let mesh_dest = match args.dest {
        Dest::Pod => format!("{} {}", MESH.server, t.pod(MESH.server).ip()),
        Dest::Vip => format!(
            "service VIP {} ({})",
            std::net::Ipv4Addr::from(VIP),
            MESH.server
        ),
    };
    println!(
        "mesh:   {} {} (n1) -> {mesh_dest} (n2), through both ztunnels over HBONE",
        MESH.client,
        t.pod(MESH.client).ip(),
    );
    println!(
        "direct: {} {} (n1) -> {} {} (n2), pods not enrolled",
        DIRECT.client,
        t.pod(DIRECT.client).ip(),
        DIRECT.server,
        t.pod(DIRECT.server).ip(),
    );
    println!(
        "{cpus} CPUs shared by client, server and both ztunnels; median of {} rounds; throughput runs {} s, rr {} exchanges, cps {} s; ztunnel log level {}{}",
        args.repeat,
        args.seconds,
        args.rr_count,
        args.cps_seconds,
        args.ztunnel_log,
        args.ztunnel_env
            .iter()
            .map(|(k, v)| format!(", {k}={v}"))
            .collect::<String>()
    );
    if background >= BUSY_WARNING {
        println!(
            "WARNING: the machine was {background:.0}% busy before the benchmark started; other load skews every figure"
        );
    } else {
        println!("background load before the benchmark: {background:.0}% of all CPUs");
    }
    println!();
    println!(
        "{:<32} {:>12} {:>12} {:>8}  {:>12}  {:>9}  verdict",
        "measurement", "direct", "mesh", "unit", "mesh/direct", "target"
    );
    for f in figures(args) {
        let d = direct.value(f.key);
        let m = meshed.value(f.key);
        let fmt = |v: Option<f64>| match v {
            Some(v) if f.unit == "Gbit/s" => format!("{v:.2}"),
            Some(v) if f.unit == "us" => format!("{v:.1}"),
            Some(v) => format!("{v:.0}"),
            None => "-".into(),
        };
        let (r, verdict) = match ratio(&f, direct, meshed) {
            Some((r, met)) => (
                format!("{r:.2} {}", if f.higher_is_better { "(^)" } else { "(v)" }),
                match met {
                    Some(true) => "ok",
                    Some(false) => "MISS",
                    None => "",
                },
            ),
            None => ("-".into(), ""),
        };
        println!(
            "{:<32} {:>12} {:>12} {:>8}  {:>12}  {:>9}  {}",
            f.label,
            fmt(d),
            fmt(m),
            f.unit,
            r,
            target_text(&f),
            verdict
        );
    }
    println!();
    println!("ratio = mesh/direct. (^) higher is better (throughput, connections/s: 0.50 = half the direct figure);");
    println!("(v) lower is better (latency: 4.0 = four times the direct latency).");
    println!();
    println!("CPU during each mesh measurement, median over rounds (machine: busy share of all {cpus} CPUs;");
    println!("others: % of one core; the client's share is the rest of the machine's):");
    println!(
        "{:<14} {:>9} {:>12} {:>12} {:>9}   {:>16}",
        "run", "machine", "ztunnel n1", "ztunnel n2", "server", "direct: machine"
    );
    for key in ["throughput_1", "throughput_n", "rr", "rr_one_cpu", "cps"] {
        let (Some(c), d) = (meshed.cpu(key), direct.cpu(key)) else {
            continue;
        };
        println!(
            "{:<14} {:>8.0}% {:>11.0}% {:>11.0}% {:>8.0}%   {:>15.0}%",
            key,
            c.machine,
            c.ztunnel_n1,
            c.ztunnel_n2,
            c.server,
            d.map(|d| d.machine).unwrap_or(0.0)
        );
    }
}

fn report_json(
    mesh: &Mesh,
    args: &Args,
    direct: &ModeResult,
    meshed: &ModeResult,
    background: f64,
) -> Value {
    let t = &mesh.topo;
    let mode_json = |r: &ModeResult| {
        json!({
            "figures": r.samples.keys().filter_map(|k| Some((k.to_string(), json!(round3(r.value(k)?))))).collect::<serde_json::Map<_, _>>(),
            "samples": r.samples.iter().map(|(k, v)| (k.to_string(), json!(v.iter().map(|x| round3(*x)).collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
            "cpu": r.cpu.keys().filter_map(|k| Some((k.to_string(), r.cpu(k)?.json()))).collect::<serde_json::Map<_, _>>(),
            "raw": r.raw.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        })
    };
    let ratios: serde_json::Map<String, Value> = figures(args)
        .iter()
        .filter_map(|f| {
            let (r, met) = ratio(f, direct, meshed)?;
            Some((
                f.key.to_string(),
                json!({
                    "label": f.label,
                    "unit": f.unit,
                    "mesh_over_direct": round3(r),
                    "higher_is_better": f.higher_is_better,
                    "target": f.target,
                    "met": met,
                }),
            ))
        })
        .collect();
    json!({
        "setup": {
            "cpus": CpuSample::take(&[]).cpus,
            "background_load_pct": round1(background),
            "rounds": args.repeat,
            "throughput_seconds": args.seconds,
            "streams": args.streams,
            "rr_count": args.rr_count,
            "rr_size": args.rr_size,
            "cps_seconds": args.cps_seconds,
            "cps_concurrency": args.cps_concurrency,
            "ztunnel_log": args.ztunnel_log,
            "ztunnel_env": args.ztunnel_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "direct": {"client": t.pod(DIRECT.client).ip().to_string(), "server": t.pod(DIRECT.server).ip().to_string()},
            "mesh": {
                "client": t.pod(MESH.client).ip().to_string(),
                "server": t.pod(MESH.server).ip().to_string(),
                "dest": match args.dest { Dest::Pod => t.pod(MESH.server).ip().to_string(), Dest::Vip => std::net::Ipv4Addr::from(VIP).to_string() },
            },
        },
        "direct": mode_json(direct),
        "mesh": mode_json(meshed),
        "ratios": ratios,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn ratios_against_targets() {
        let mut direct = ModeResult::default();
        let mut meshed = ModeResult::default();
        direct.record("throughput_1", 10.0);
        meshed.record("throughput_1", 6.0);
        direct.record("rr_p50", 10.0);
        meshed.record("rr_p50", 50.0);
        let args = Args::parse_from(["mesh-bench"]);
        let all = figures(&args);
        let tput = all.iter().find(|f| f.key == "throughput_1").unwrap();
        assert_eq!(ratio(tput, &direct, &meshed), Some((0.6, Some(true))));
        let rr = all.iter().find(|f| f.key == "rr_p50").unwrap();
        assert_eq!(ratio(rr, &direct, &meshed), Some((5.0, Some(false))));
        let missing = all.iter().find(|f| f.key == "cps").unwrap();
        assert_eq!(ratio(missing, &direct, &meshed), None);
    }

    #[test]
    fn cpu_shares_from_counters() {
        let before = CpuSample {
            total: 1000,
            busy: 400,
            cpus: 2,
            procs: vec![100, 0, 10],
        };
        let after = CpuSample {
            total: 1200,
            busy: 550,
            cpus: 2,
            procs: vec![150, 0, 10],
        };
        let u = after.since(&before);
        assert_eq!(u.machine, 75.0);
        // 50 jiffies of the 100 one core had: half a core.
        assert_eq!(u.ztunnel_n1, 50.0);
        assert_eq!(u.ztunnel_n2, 0.0);
    }
}
