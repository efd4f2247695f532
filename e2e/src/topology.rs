//! The local network the end-to-end tests run on: nodes and pods as network
//! namespaces, wired like a small Kubernetes cluster, plus processes started
//! inside them.
//!
//! ```text
//!                    bridge netns: br0 (L2 only)
//!          n1 |            n2 |              ext |
//!   node1 eth0 172.30.0.11   node2 eth0 172.30.0.12   external eth0 172.30.0.200
//!   cni0 10.244.1.1/24       cni0 10.244.2.1/24
//!    |vp2      |vp3           |vp2
//!   pod eth0   pod eth0      pod eth0
//!   10.244.1.2 10.244.1.3    10.244.2.2
//! ```
//!
//! Each node routes the pod CIDR of every other node via that node's IP, as a
//! CNI with host routes would; the external host (outside the mesh) has the
//! same routes, so pods reach it and it sees their real addresses. Traffic
//! between pods of one node crosses the node's `cni0` bridge.
//!
//! Every name starts with a run prefix `e2e-<pid>-<n>` so parallel test
//! processes never collide and [`cleanup_stale`] can tell leftovers of dead
//! runs. Interface names are short and fixed: they only need to be unique
//! inside their own namespace. Dropping a [`Topology`] kills its processes and
//! removes every namespace (and so every veth) and temporary file it made,
//! also when the test panicked.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::capture::{Capture, CaptureError};
use crate::netns::{self, HasNetns, Netns, NetnsError};

/// Start of every namespace and temporary directory name a topology creates.
pub const RUN_PREFIX: &str = "e2e-";
/// Node IPs are `172.30.0.(10 + index)/24`.
pub const NODE_NET: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 0);
/// The external host's address on the node network.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 200);
/// Default bound for [`Topology::exec`].
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound for [`Topology::wait_for_tcp`].
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(20);

const MAX_NODES: usize = 100;
const MAX_PODS_PER_NODE: u8 = 250;
const MAX_NAME_LEN: usize = 40;
/// How long a process gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// How much of each log file [`Topology::dump_logs`] shows.
const LOG_TAIL: usize = 16 * 1024;

static RUN_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Errors of building and driving a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Capture(#[from] Box<CaptureError>),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid name {0:?}: use 1-40 characters of a-z, 0-9 and '-'")]
    InvalidName(String),
    #[error("name {0:?} is used twice")]
    DuplicateName(String),
    #[error("no node named {0:?}")]
    UnknownNode(String),
    #[error("too many {0}")]
    TooMany(&'static str),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("`{command}` in {netns} exited with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}")]
    Failed {
        command: String,
        netns: String,
        status: String,
        stdout: String,
        stderr: String,
    },
}

impl TopologyError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TopologyError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A node: a namespace with an uplink (`eth0`) to the shared bridge and a
/// bridge `cni0` holding its pods' gateway address.
#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    index: u8,
    ip: Ipv4Addr,
    pod_cidr: Ipv4Net,
    netns: Netns,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// 1-based position in the order nodes were declared.
    pub fn index(&self) -> u8 {
        self.index
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    /// `10.244.<index>.0/24`.
    pub fn pod_cidr(&self) -> Ipv4Net {
        self.pod_cidr
    }
    /// The pods' default gateway, held by the node's `cni0`.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        gateway_of(self.pod_cidr)
    }
    /// The node's uplink interface inside its own namespace.
    pub fn uplink(&self) -> &'static str {
        "eth0"
    }
    /// The node's port on the shared bridge, inside [`Topology::bridge`]: a
    /// capture there sees everything the node sends and receives.
    pub fn bridge_port(&self) -> String {
        format!("n{}", self.index)
    }
    pub fn netns_name(&self) -> &str {
        self.netns.name()
    }
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }
}

impl HasNetns for Node {
    fn netns(&self) -> &Netns {
        &self.netns
    }
}

/// A pod: a namespace with `lo` and `eth0` (a veth whose peer sits on its
/// node's `cni0`), default route via the node.
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    node: String,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    node_port: String,
    netns: Netns,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn node_name(&self) -> &str {
        &self.node
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
    /// `ip:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
    /// The pod's veth peer inside its node's namespace.
    pub fn node_port(&self) -> &str {
        &self.node_port
    }
    pub fn netns_name(&self) -> &str {
        self.netns.name()
    }
    /// `/var/run/netns/NAME`.
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }
}

impl HasNetns for Pod {
    fn netns(&self) -> &Netns {
        &self.netns
    }
}

/// A host on the node network but outside the mesh.
#[derive(Debug, Clone)]
pub struct ExternalHost {
    ip: Ipv4Addr,
    netns: Netns,
}

impl ExternalHost {
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
    /// Its port on the shared bridge, inside [`Topology::bridge`].
    pub fn bridge_port(&self) -> &'static str {
        "ext"
    }
    pub fn netns_name(&self) -> &str {
        self.netns.name()
    }
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }
}

impl HasNetns for ExternalHost {
    fn netns(&self) -> &Netns {
        &self.netns
    }
}

/// Declares nodes, pods and the external host; [`TopologyBuilder::build`]
/// creates them.
#[derive(Debug, Default, Clone)]
pub struct TopologyBuilder {
    nodes: Vec<String>,
    pods: Vec<(String, String)>,
    external: bool,
}

impl TopologyBuilder {
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.to_string());
        self
    }

    /// A pod on `node`; pods get addresses in declaration order.
    pub fn pod(mut self, node: &str, name: &str) -> Self {
        self.pods.push((node.to_string(), name.to_string()));
        self
    }

    /// Adds the host outside the mesh ([`Topology::external`]).
    pub fn external(mut self) -> Self {
        self.external = true;
        self
    }

    /// Creates everything. On error, whatever was already created is removed.
    pub fn build(self) -> Result<Topology, TopologyError> {
        if let Err(e) = cleanup_stale() {
            tracing::warn!(error = %e, "could not remove leftovers of earlier runs");
        }
        if self.nodes.len() > MAX_NODES {
            return Err(TopologyError::TooMany("nodes"));
        }
        let mut seen = HashSet::new();
        for name in self.nodes.iter().chain(self.pods.iter().map(|(_, p)| p)) {
            check_name(name)?;
            if !seen.insert(name.as_str()) {
                return Err(TopologyError::DuplicateName(name.clone()));
            }
        }
        if let Some((node, _)) = self.pods.iter().find(|(n, _)| !self.nodes.contains(n)) {
            return Err(TopologyError::UnknownNode(node.clone()));
        }

        let prefix = format!(
            "{RUN_PREFIX}{}-{}",
            std::process::id(),
            RUN_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .map_err(|e| TopologyError::io("creating the run's temporary directory", e))?;
        let mut topo = Topology {
            bridge: Netns::from_name(&format!("{prefix}-br")),
            prefix,
            dir,
            namespaces: Vec::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
            external: None,
            next_host: Vec::new(),
            procs: Mutex::new(Vec::new()),
            seq: AtomicUsize::new(0),
            exec_timeout: DEFAULT_EXEC_TIMEOUT,
        };
        let bridge = topo.new_netns("br")?;
        bridge.ip_batch(&["link add br0 type bridge".into(), "link set br0 up".into()])?;
        topo.bridge = bridge;

        for name in &self.nodes {
            topo.create_node(name)?;
        }
        topo.create_node_routes()?;
        if self.external {
            topo.create_external()?;
        }
        for (node, name) in &self.pods {
            topo.add_pod(node, name)?;
        }
        tracing::debug!(prefix = %topo.prefix, "topology ready");
        Ok(topo)
    }
}

/// A running topology; see the module documentation for its shape.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    dir: tempfile::TempDir,
    /// Everything created, in creation order; removed in reverse.
    namespaces: Vec<Netns>,
    bridge: Netns,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    external: Option<ExternalHost>,
    /// Next free host octet of each node's pod CIDR, by node position.
    next_host: Vec<u8>,
    procs: Mutex<Vec<Process>>,
    seq: AtomicUsize,
    exec_timeout: Duration,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// `e2e-<pid>-<n>`: the start of every namespace name of this run.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The run's temporary directory (process logs, captures). Removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespace holding the shared bridge `br0`.
    pub fn bridge(&self) -> &Netns {
        &self.bridge
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Every namespace this topology created.
    pub fn namespaces(&self) -> &[Netns] {
        &self.namespaces
    }

    /// # Panics
    /// If there is no node of that name (a mistake in the test).
    pub fn node(&self, name: &str) -> &Node {
        self.try_node(name)
            .unwrap_or_else(|| panic!("topology has no node named {name:?}"))
    }

    pub fn try_node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// # Panics
    /// If there is no pod of that name (a mistake in the test).
    pub fn pod(&self, name: &str) -> &Pod {
        self.try_pod(name)
            .unwrap_or_else(|| panic!("topology has no pod named {name:?}"))
    }

    pub fn try_pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// # Panics
    /// If the topology was built without [`TopologyBuilder::external`].
    pub fn external(&self) -> &ExternalHost {
        self.try_external()
            .expect("topology was built without an external host")
    }

    pub fn try_external(&self) -> Option<&ExternalHost> {
        self.external.as_ref()
    }

    /// Changes the bound of [`Topology::exec`] (default 60 s).
    pub fn set_exec_timeout(&mut self, timeout: Duration) {
        self.exec_timeout = timeout;
    }

    /// Adds a pod to a node of a running topology.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<Pod, TopologyError> {
        check_name(name)?;
        if self.try_pod(name).is_some() || self.try_node(name).is_some() {
            return Err(TopologyError::DuplicateName(name.to_string()));
        }
        let pos = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .ok_or_else(|| TopologyError::UnknownNode(node.to_string()))?;
        let host = self.next_host[pos];
        if host > MAX_PODS_PER_NODE + 1 {
            return Err(TopologyError::TooMany("pods on one node"));
        }
        let node = self.nodes[pos].clone();
        let octets = node.pod_cidr.network().octets();
        let ip = Ipv4Addr::new(octets[0], octets[1], octets[2], host);
        let gateway = node.pod_gateway();
        let node_port = format!("vp{host}");

        let ns = self.new_netns(&format!("p-{name}"))?;
        configure_endpoint_sysctls(&ns, false)?;
        node.netns.ip(&[
            "link",
            "add",
            &node_port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        node.netns.ip_batch(&[
            format!("link set {node_port} master cni0"),
            format!("link set {node_port} up"),
        ])?;
        disable_ipv6(&ns, "eth0")?;
        ns.ip_batch(&[
            format!("addr add {ip}/{} dev eth0", node.pod_cidr.prefix_len()),
            "link set eth0 up".into(),
            format!("route add default via {gateway} dev eth0"),
        ])?;
        // A veth moved in from another namespace starts with that namespace's
        // defaults; make reverse-path filtering explicit for it too.
        ns.set_sysctl("net.ipv4.conf.eth0.rp_filter", "0")?;
        self.next_host[pos] = host + 1;
        let pod = Pod {
            name: name.to_string(),
            node: node.name.clone(),
            ip,
            gateway,
            node_port,
            netns: ns,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Runs `args` (program first) inside `ns` to completion, bounded by the
    /// exec timeout; stdout and stderr are also kept in the run directory.
    /// A non-zero exit is not an error here: look at [`ExecOutput::status`].
    pub fn exec<S: AsRef<OsStr>>(
        &self,
        ns: &impl HasNetns,
        args: &[S],
    ) -> Result<ExecOutput, TopologyError> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| TopologyError::io("exec", std::io::ErrorKind::InvalidInput.into()))?;
        let mut cmd = Command::new(program);
        cmd.args(rest);
        self.exec_command(ns, cmd)
    }

    /// Like [`Topology::exec`], for a prepared command (its program, arguments,
    /// environment and working directory are kept).
    pub fn exec_command(
        &self,
        ns: &impl HasNetns,
        cmd: Command,
    ) -> Result<ExecOutput, TopologyError> {
        let label = format!("exec-{}", program_label(&cmd));
        let process = self.start(Some(ns.netns()), &label, &cmd)?;
        let status = match process.wait_timeout(self.exec_timeout)? {
            Some(status) => status,
            None => {
                let _ = process.kill();
                return Err(TopologyError::Timeout {
                    what: format!(
                        "{} in {} (stdout: {}; stderr: {})",
                        describe(&cmd),
                        ns.netns().name(),
                        tail(&process.stdout(), 2048),
                        tail(&process.stderr(), 2048)
                    ),
                    after: self.exec_timeout,
                });
            }
        };
        Ok(ExecOutput {
            command: describe(&cmd),
            netns: ns.netns().name().to_string(),
            status,
            stdout: process.stdout(),
            stderr: process.stderr(),
        })
    }

    /// Starts `cmd` inside `ns` in the background. The process is tracked:
    /// dropping the topology stops it (SIGTERM, then SIGKILL).
    pub fn spawn(&self, ns: &impl HasNetns, cmd: Command) -> Result<Process, TopologyError> {
        let label = program_label(&cmd);
        self.spawn_named(ns, &label, cmd)
    }

    /// Like [`Topology::spawn`], with a label used in log file names and
    /// [`Topology::dump_logs`].
    pub fn spawn_named(
        &self,
        ns: &impl HasNetns,
        label: &str,
        cmd: Command,
    ) -> Result<Process, TopologyError> {
        let process = self.start(Some(ns.netns()), label, &cmd)?;
        self.lock_procs().push(process.clone());
        Ok(process)
    }

    /// Starts `cmd` on the host itself (the root network namespace), tracked
    /// like the others: for control-plane processes that talk to services
    /// on the host's loopback (the Kubernetes API server).
    pub fn spawn_host(&self, label: &str, cmd: Command) -> Result<Process, TopologyError> {
        let process = self.start(None, label, &cmd)?;
        self.lock_procs().push(process.clone());
        Ok(process)
    }

    /// Polls until a TCP connection to `addr` from inside `ns` succeeds,
    /// within [`DEFAULT_WAIT_TIMEOUT`].
    pub fn wait_for_tcp(&self, ns: &impl HasNetns, addr: SocketAddr) -> Result<(), TopologyError> {
        wait_for_tcp(ns.netns(), addr, DEFAULT_WAIT_TIMEOUT)
    }

    /// Starts `tcpdump` on `iface` inside `ns` with a pcap filter (may be
    /// empty); see [`Capture`].
    pub fn capture(
        &self,
        ns: &impl HasNetns,
        iface: &str,
        filter: &str,
    ) -> Result<Capture, TopologyError> {
        Capture::start(self, ns, iface, filter).map_err(|e| TopologyError::Capture(Box::new(e)))
    }

    /// The processes started with [`Topology::spawn`], in start order.
    pub fn processes(&self) -> Vec<Process> {
        self.lock_procs().clone()
    }

    /// Every spawned process with its state and the tail of its output, for
    /// a failing test's log. Printed automatically when a test panics while
    /// the topology is alive.
    pub fn dump_logs(&self) -> String {
        let mut out = format!("==== topology {} ({})\n", self.prefix, self.dir().display());
        for p in self.lock_procs().iter() {
            let state = match p.try_wait() {
                Ok(Some(status)) => status.to_string(),
                Ok(None) => "running".to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            let _ = writeln!(
                out,
                "---- {} (pid {}, netns {}): {state}",
                p.label(),
                p.pid(),
                p.netns_name()
            );
            for (what, text) in [("stdout", p.stdout()), ("stderr", p.stderr())] {
                if !text.is_empty() {
                    let _ = writeln!(out, "[{what}]\n{}", tail(&text, LOG_TAIL));
                }
            }
        }
        out
    }

    /// Writes [`Topology::dump_logs`] to the test's stderr.
    pub fn print_logs(&self) {
        eprintln!("{}", self.dump_logs());
    }

    /// A fresh file path in the run directory.
    pub fn temp_path(&self, label: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir().join(format!("{n:03}-{}", sanitize(label)))
    }

    fn start(
        &self,
        ns: Option<&Netns>,
        label: &str,
        cmd: &Command,
    ) -> Result<Process, TopologyError> {
        let base = self.temp_path(label);
        let stdout_path = base.with_extension("out");
        let stderr_path = base.with_extension("err");
        let stdout = fs::File::create(&stdout_path)
            .map_err(|e| TopologyError::io(format!("creating {}", stdout_path.display()), e))?;
        let stderr = fs::File::create(&stderr_path)
            .map_err(|e| TopologyError::io(format!("creating {}", stderr_path.display()), e))?;
        let mut wrapped = match ns {
            Some(ns) => in_netns(ns, cmd),
            None => copy_command(cmd),
        };
        wrapped
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group, so stopping it also stops its children.
            .process_group(0);
        let child = wrapped
            .spawn()
            .map_err(|e| TopologyError::io(format!("starting {}", describe(cmd)), e))?;
        let netns = ns.map(|n| n.name()).unwrap_or("host");
        tracing::debug!(label, pid = child.id(), netns, "started");
        Ok(Process {
            inner: Arc::new(ProcessInner {
                label: label.to_string(),
                netns: netns.to_string(),
                pid: child.id(),
                child: Mutex::new(child),
                stdout: stdout_path,
                stderr: stderr_path,
            }),
        })
    }

    fn lock_procs(&self) -> MutexGuard<'_, Vec<Process>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_netns(&mut self, suffix: &str) -> Result<Netns, TopologyError> {
        let ns = Netns::create(&format!("{}-{suffix}", self.prefix))?;
        self.namespaces.push(ns.clone());
        Ok(ns)
    }

    fn create_node(&mut self, name: &str) -> Result<(), TopologyError> {
        let index =
            u8::try_from(self.nodes.len() + 1).map_err(|_| TopologyError::TooMany("nodes"))?;
        let ip = node_ip(index);
        let pod_cidr = pod_cidr(index);
        let ns = self.new_netns(&format!("n-{name}"))?;
        configure_endpoint_sysctls(&ns, true)?;
        let port = format!("n{index}");
        self.bridge.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.bridge.ip_batch(&[
            format!("link set {port} master br0"),
            format!("link set {port} up"),
        ])?;
        disable_ipv6(&ns, "eth0")?;
        ns.ip_batch(&[
            format!("addr add {ip}/24 dev eth0"),
            "link set eth0 up".into(),
            // A fixed address: a bridge otherwise takes the lowest address
            // of its ports and changes it as pods come and go, which CNI
            // CHECK (rightly) reports as a changed interface.
            format!(
                "link add cni0 address 0a:58:0a:f4:{:02x}:01 type bridge",
                index
            ),
            format!(
                "addr add {}/{} dev cni0",
                gateway_of(pod_cidr),
                pod_cidr.prefix_len()
            ),
            "link set cni0 up".into(),
        ])?;
        disable_ipv6(&ns, "cni0")?;
        ns.set_sysctl("net.ipv4.conf.eth0.rp_filter", "0")?;
        ns.set_sysctl("net.ipv4.conf.cni0.rp_filter", "0")?;
        self.nodes.push(Node {
            name: name.to_string(),
            index,
            ip,
            pod_cidr,
            netns: ns,
        });
        self.next_host.push(2);
        Ok(())
    }

    fn create_node_routes(&self) -> Result<(), TopologyError> {
        for node in &self.nodes {
            let routes: Vec<String> = self
                .nodes
                .iter()
                .filter(|other| other.index != node.index)
                .map(|other| format!("route add {} via {}", other.pod_cidr, other.ip))
                .collect();
            node.netns.ip_batch(&routes)?;
        }
        Ok(())
    }

    fn create_external(&mut self) -> Result<(), TopologyError> {
        let ns = self.new_netns("ext")?;
        configure_endpoint_sysctls(&ns, false)?;
        self.bridge.ip(&[
            "link",
            "add",
            "ext",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.bridge
            .ip_batch(&["link set ext master br0".into(), "link set ext up".into()])?;
        disable_ipv6(&ns, "eth0")?;
        let mut lines = vec![
            format!("addr add {EXTERNAL_IP}/24 dev eth0"),
            "link set eth0 up".into(),
        ];
        lines.extend(
            self.nodes
                .iter()
                .map(|n| format!("route add {} via {}", n.pod_cidr, n.ip)),
        );
        ns.ip_batch(&lines)?;
        self.external = Some(ExternalHost {
            ip: EXTERNAL_IP,
            netns: ns,
        });
        Ok(())
    }

    fn stop_processes(&self) {
        let procs = std::mem::take(&mut *self.lock_procs());
        // Signal everything first so the grace periods overlap.
        for p in &procs {
            p.signal_group(Signal::SIGTERM);
        }
        let deadline = Instant::now() + TERM_GRACE;
        for p in &procs {
            let left = deadline.saturating_duration_since(Instant::now());
            if !matches!(p.wait_timeout(left), Ok(Some(_))) {
                let _ = p.kill();
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        self.stop_processes();
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ns.delete() {
                eprintln!("e2e: could not remove network namespace {}: {e}", ns.name());
            }
        }
    }
}

/// What a finished [`Topology::exec`] produced.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub command: String,
    pub netns: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code, `None` if a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// `Ok(self)` on exit code 0, otherwise an error with both outputs.
    pub fn ok(self) -> Result<ExecOutput, TopologyError> {
        if self.success() {
            Ok(self)
        } else {
            Err(TopologyError::Failed {
                command: self.command,
                netns: self.netns,
                status: self.status.to_string(),
                stdout: self.stdout,
                stderr: self.stderr,
            })
        }
    }
}

/// A background process inside a namespace. Clones share the process; it is
/// stopped when the [`Topology`] drops, or earlier with [`Process::kill`].
#[derive(Debug, Clone)]
pub struct Process {
    inner: Arc<ProcessInner>,
}

#[derive(Debug)]
struct ProcessInner {
    label: String,
    netns: String,
    pid: u32,
    child: Mutex<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    pub fn label(&self) -> &str {
        &self.inner.label
    }

    pub fn netns_name(&self) -> &str {
        &self.inner.netns
    }

    pub fn stdout_path(&self) -> &Path {
        &self.inner.stdout
    }

    pub fn stderr_path(&self) -> &Path {
        &self.inner.stderr
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.inner.stdout)
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.inner.stderr)
    }

    /// The exit status if it has exited (reaping it), `None` if running.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, TopologyError> {
        self.child()
            .try_wait()
            .map_err(|e| TopologyError::io(format!("waiting for {}", self.label()), e))
    }

    pub fn is_running(&self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, TopologyError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the process alone (not its group) if it still runs.
    pub fn signal(&self, signal: Signal) -> Result<(), TopologyError> {
        // Holding the lock while signalling: the pid cannot be reaped (and
        // reused) in between.
        let mut child = self.child();
        if let Ok(None) = child.try_wait() {
            kill(Pid::from_raw(self.inner.pid as i32), signal)
                .map_err(|e| TopologyError::io(format!("signalling {}", self.label()), e.into()))?;
        }
        Ok(())
    }

    /// SIGTERM to its process group, SIGKILL if it has not exited after a
    /// grace period; returns the exit status.
    pub fn kill(&self) -> Result<ExitStatus, TopologyError> {
        self.signal_group(Signal::SIGTERM);
        if let Some(status) = self.wait_timeout(TERM_GRACE)? {
            return Ok(status);
        }
        self.signal_group(Signal::SIGKILL);
        self.child()
            .wait()
            .map_err(|e| TopologyError::io(format!("waiting for {}", self.label()), e))
    }

    fn signal_group(&self, signal: Signal) {
        let mut child = self.child();
        if let Ok(None) = child.try_wait() {
            // The group may have no members left besides an exiting leader.
            let _ = kill(Pid::from_raw(-(self.inner.pid as i32)), signal);
        }
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.inner.child.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Polls until a TCP connection to `addr` from inside `ns` succeeds, or
/// `timeout` passes.
pub fn wait_for_tcp(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<(), TopologyError> {
    let connected = ns.run_in(move || {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let attempt = left.min(Duration::from_millis(500));
            if TcpStream::connect_timeout(&addr, attempt).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25).min(left));
        }
    })?;
    if connected {
        Ok(())
    } else {
        Err(TopologyError::Timeout {
            what: format!("a TCP listener on {addr} (from {})", ns.name()),
            after: timeout,
        })
    }
}

/// Removes namespaces and temporary directories left by runs whose process
/// no longer exists (a killed test binary never ran its `Drop`). Returns the
/// names removed.
pub fn cleanup_stale() -> Result<Vec<String>, TopologyError> {
    let mut removed = Vec::new();
    let mut stale: Vec<String> = netns::list()?
        .into_iter()
        .filter(|name| owner_pid(name).is_some_and(|pid| !pid_alive(pid)))
        .collect();
    // Pods before nodes before the bridge: the reverse of creation.
    stale.sort_by_key(|name| stale_rank(name));
    for name in stale {
        let ns = Netns::from_name(&name);
        match ns.delete() {
            Ok(()) => removed.push(name),
            // Another test process cleaning up at the same time got it first.
            Err(_) if !ns.exists() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let tmp = std::env::temp_dir();
    if let Ok(entries) = fs::read_dir(&tmp) {
        for entry in entries.filter_map(|e| e.ok()) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && owner_pid(&name).is_some_and(|pid| !pid_alive(pid)) {
                let path = entry.path();
                match fs::remove_dir_all(&path) {
                    Ok(()) => removed.push(path.display().to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(TopologyError::io(format!("removing {}", path.display()), e))
                    }
                }
            }
        }
    }
    Ok(removed)
}

/// Namespace names of this machine that start with the run prefix of a
/// process that is still alive or not; used by cleanup checks.
pub fn namespaces_with_prefix(prefix: &str) -> Result<Vec<String>, TopologyError> {
    Ok(netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect())
}

fn stale_rank(name: &str) -> u8 {
    if name.contains("-p-") {
        0
    } else if name.ends_with("-br") {
        2
    } else {
        1
    }
}

/// The pid encoded in a run name `e2e-<pid>-...`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(RUN_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// A zombie counts as dead: a killed test binary may linger unreaped for a
/// while, and its namespaces are just as abandoned.
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !matches!(process_state(&stat), Some('Z' | 'X'))
}

/// The state letter of a `/proc/<pid>/stat` line; the command name before
/// it is in parentheses and may itself contain spaces and parentheses.
fn process_state(stat: &str) -> Option<char> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

fn node_ip(index: u8) -> Ipv4Addr {
    let o = NODE_NET.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 10 + index)
}

fn pod_cidr(index: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, index, 0), 24).expect("24 is a valid prefix length")
}

fn gateway_of(cidr: Ipv4Net) -> Ipv4Addr {
    let o = cidr.network().octets();
    Ipv4Addr::new(o[0], o[1], o[2], 1)
}

fn check_name(name: &str) -> Result<(), TopologyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TopologyError::InvalidName(name.to_string()))
    }
}

/// Namespace-local sysctls for a node (`forward`) or an endpoint. New
/// namespaces copy the host's IPv4 settings, so set what we rely on
/// explicitly: forwarding only on nodes; no reverse-path filter, because
/// transparent proxying makes sockets answer for addresses that are not the
/// interface's own; IPv6 off on new interfaces (keeps captures quiet; `lo`
/// keeps `::1`); TIME_WAIT reuse for outgoing connections.
fn configure_endpoint_sysctls(ns: &Netns, forward: bool) -> Result<(), TopologyError> {
    let forward = if forward { "1" } else { "0" };
    for (key, value) in [
        ("net.ipv4.ip_forward", forward),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.lo.rp_filter", "0"),
        ("net.ipv6.conf.default.disable_ipv6", "1"),
        // Connection-rate benchmarks open tens of thousands of connections
        // to one address; without reuse, TIME_WAIT exhausts the ports.
        ("net.ipv4.tcp_tw_reuse", "1"),
    ] {
        ns.set_sysctl(key, value)?;
    }
    Ok(())
}

fn disable_ipv6(ns: &Netns, iface: &str) -> Result<(), TopologyError> {
    ns.set_sysctl(&format!("net.ipv6.conf.{iface}.disable_ipv6"), "1")
        .map_err(Into::into)
}

/// `ip netns exec NAME <cmd>`, keeping the command's environment and
/// working directory.
fn in_netns(ns: &Netns, cmd: &Command) -> Command {
    let mut wrapped = ns.command(cmd.get_program());
    copy_into(&mut wrapped, cmd);
    wrapped
}

/// A fresh `Command` equal to `cmd` (`Command` is not `Clone`).
fn copy_command(cmd: &Command) -> Command {
    let mut c = Command::new(cmd.get_program());
    copy_into(&mut c, cmd);
    c
}

fn copy_into(wrapped: &mut Command, cmd: &Command) {
    wrapped.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn program_label(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program())
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "process".into());
    // `mesh-app http-server` reads better than `mesh-app` alone.
    match cmd.get_args().next() {
        Some(sub) if !sub.to_string_lossy().starts_with('-') => {
            format!("{program}-{}", sub.to_string_lossy())
        }
        _ => program,
    }
}

fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect()
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_encode_the_owner_pid() {
        assert_eq!(owner_pid("e2e-4242-0-n-node1"), Some(4242));
        assert_eq!(owner_pid("e2e-4242-3-br"), Some(4242));
        assert_eq!(owner_pid("e2e-x-3-br"), None);
        assert_eq!(owner_pid("other-4242-0"), None);
        assert_eq!(owner_pid("e2e-4242"), None);
    }

    #[test]
    fn process_state_skips_odd_command_names() {
        assert_eq!(process_state("42 (a) b) Z 1 42"), Some('Z'));
        assert_eq!(process_state("42 (topology) S 1"), Some('S'));
        assert_eq!(process_state("garbage"), None);
        assert!(pid_alive(std::process::id()));
    }

    #[test]
    fn addresses_follow_the_node_index() {
        assert_eq!(node_ip(1), Ipv4Addr::new(172, 30, 0, 11));
        assert_eq!(pod_cidr(2).to_string(), "10.244.2.0/24");
        assert_eq!(gateway_of(pod_cidr(2)), Ipv4Addr::new(10, 244, 2, 1));
    }

    #[test]
    fn names_are_validated() {
        assert!(check_name("node-1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("Node").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"a".repeat(41)).is_err());
    }

    #[test]
    fn stale_namespaces_go_pods_first() {
        let mut names = vec!["e2e-1-0-br", "e2e-1-0-n-a", "e2e-1-0-p-x"];
        names.sort_by_key(|n| stale_rank(n));
        assert_eq!(names, ["e2e-1-0-p-x", "e2e-1-0-n-a", "e2e-1-0-br"]);
    }

    #[test]
    fn labels_name_the_subcommand() {
        let mut cmd = Command::new("/x/mesh-app");
        cmd.args(["http-server", "--port", "80"]);
        assert_eq!(program_label(&cmd), "mesh-app-http-server");
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", "eth0"]);
        assert_eq!(program_label(&cmd), "tcpdump");
        assert_eq!(sanitize("a b/c"), "a_b_c");
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 3), "ab");
        assert_eq!(tail("aé", 1), "");
    }
}
