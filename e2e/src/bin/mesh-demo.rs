//! `mesh-demo`: brings up the local two-node mesh on its control plane and
//! walks through what it does, section by section: the Kubernetes objects
//! (nodes, pods, a service in a namespace labelled for ambient) and how
//! istiod-lite turns them into the Workload API the ztunnels receive over
//! delta xDS and the certificates its CA issues them; the topology; a
//! request from an enrolled client pod on n1 to a service VIP whose only
//! endpoint runs on n2 (captured in-pod by n1's ztunnel, carried over HBONE
//! to n2's ztunnel, handed to the server from the client's own address); the
//! ztunnel's view of the cluster; the Istio metrics both ztunnels recorded; a
//! Service changed through the API reaching the ztunnels while they run;
//! traffic to a host outside the mesh (passed through); a non-mesh pod
//! calling into the mesh; and packet captures on the node links showing what
//! is and is not readable there.
//!
//! Then it keeps the mesh up until Ctrl-C and prints how to poke at it; with
//! `--once` it tears down right after the walk-through. Everything (network
//! namespaces, processes, temporary files, the run's Kubernetes namespaces
//! and the API server it started) is removed on exit, Ctrl-C included. Needs
//! root and the API server binaries; run it through `scripts/demo.sh`.

use e2e::interrupt::Interrupt;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine as _;
use clap::Parser;
use e2e::capture;
use e2e::mesh::{Mesh, MeshSpec};
use serde_json::Value;

const VIP: [u8; 4] = [10, 96, 0, 10];
const SERVICE: &str = "web";
const APP_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
const HBONE_PORT: u16 = node_agent::rules::HBONE_PORT;
/// Bound on waiting for a metric or log line that follows a connection.
const SETTLE: Duration = Duration::from_secs(10);
/// The port the live-change section adds to the service.
const EXTRA_PORT: u16 = 8081;
/// The label that puts a namespace (or, set to `none`, takes a pod) in or
/// out of the ambient mesh.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

#[derive(Parser)]
#[command(
    name = "mesh-demo",
    about = "Bring up a local two-node mesh and walk through it"
)]
struct Args {
    /// Tear everything down right after the walk-through instead of waiting
    /// for Ctrl-C.
    #[arg(long)]
    once: bool,
}

fn main() -> anyhow::Result<()> {
    let interrupt = Interrupt::install("mesh-demo: tearing the mesh down")
        .context("installing signal handlers")?;
    let args = Args::parse();
    if !e2e::is_root() {
        bail!("mesh-demo needs root (it creates network namespaces); run scripts/demo.sh");
    }
    let spec = MeshSpec::default()
        .node("n1")
        .node("n2")
        .mesh_pod("n1", "client", "sleep")
        .mesh_pod("n2", "server", "web")
        .plain_pod("n1", "outsider")
        .external()
        .service(SERVICE, VIP, &[(SERVICE_PORT, APP_PORT)], &["server"])
        .with_control_plane()
        // Plain log files: the demo shows lines of them.
        .ztunnel_env("NO_COLOR", "1");
    println!(
        "Starting a Kubernetes API server and istiod-lite, two nodes, three pods, an external\n\
         host and a ztunnel per node..."
    );
    let mesh = Mesh::start(spec).context("starting the mesh")?;
    let demo = Demo {
        mesh: &mesh,
        interrupt: &interrupt,
        marker: format!("demo-marker-{}", std::process::id()),
    };
    let result = demo.run(args.once);
    if result.is_err() && !interrupt.raised() {
        eprintln!("{}", mesh.ztunnel_logs());
        if let Some(cp) = &mesh.cp {
            eprintln!("--- istiod-lite ---\n{}", cp.logs());
        }
    }
    println!("Removing namespaces, processes and files...");
    drop(mesh);
    println!("Done.");
    // Ctrl-C is how the demo is meant to end, also halfway through.
    if interrupt.raised() {
        return Ok(());
    }
    result
}

struct Demo<'a> {
    mesh: &'a Mesh,
    interrupt: &'a Interrupt,
    /// A string sent with the meshed request and the plaintext request, then
    /// looked for in the captures.
    marker: String,
}

/// What a `mesh-app http-get` printed.
struct Reply {
    code: i32,
    status: String,
    body: Value,
    raw: String,
}

impl Demo<'_> {
    fn run(&self, once: bool) -> anyhow::Result<()> {
        let t = &self.mesh.topo;
        self.mesh.spawn_app(
            t.pod("server"),
            "http-server",
            &[
                "http-server",
                "--port",
                &APP_PORT.to_string(),
                "--name",
                "server",
            ],
        )?;
        self.mesh.spawn_app(
            t.external(),
            "http-external",
            &[
                "http-server",
                "--port",
                &APP_PORT.to_string(),
                "--name",
                "external",
            ],
        )?;
        t.wait_for_tcp(t.pod("server"), t.pod("server").addr(APP_PORT))?;
        t.wait_for_tcp(t.external(), t.external().addr(APP_PORT))?;

        self.control_plane()?;
        self.interrupt.check()?;
        self.topology();
        self.interrupt.check()?;
        let hbone_pcap = self.hbone_request()?;
        self.interrupt.check()?;
        self.ztunnel_view()?;
        self.interrupt.check()?;
        self.metrics()?;
        self.interrupt.check()?;
        self.live_change()?;
        self.interrupt.check()?;
        let plain_pcap = self.passthrough()?;
        self.interrupt.check()?;
        self.non_mesh_client()?;
        self.interrupt.check()?;
        self.on_the_wire(&hbone_pcap, &plain_pcap)?;
        self.interrupt.check()?;
        if once {
            return Ok(());
        }
        self.wait_for_ctrl_c()
    }

    // ------------------------------------------------------------ sections

    fn control_plane(&self) -> anyhow::Result<()> {
        let cp = self.mesh.control_plane();
        let ns = self.mesh.namespace.as_str();
        heading("1. The control plane");
        println!(
            "A Kubernetes API server (etcd, kube-apiserver, controller manager and scheduler on\n\
             loopback) holds the cluster as a user of Istio sees it. No kubelet runs: the demo\n\
             plays it, registering the nodes and reporting each pod Running and Ready with its\n\
             IP (no node or container status is reported, hence Unknown and 0/1 below).\n"
        );
        self.kubectl(&["get", "nodes"])?;
        self.kubectl(&["get", "namespace", ns, "-L", DATAPLANE_MODE])?;
        self.kubectl(&["get", "pods", "-n", ns, "-o", "wide"])?;
        self.kubectl(&["get", "svc", "-n", ns])?;
        let opted_out: Vec<&str> = self
            .mesh
            .spec
            .plain_pods
            .iter()
            .map(|(_, p)| p.as_str())
            .collect();
        println!(
            "The namespace's label {DATAPLANE_MODE}=ambient enrolls its pods; {} opts out with\n\
             the pod label {DATAPLANE_MODE}=none.\n",
            list(&opted_out)
        );

        let istiod = cp
            .process()
            .map(|p| format!("pid {}", p.pid()))
            .unwrap_or_else(|| "not running".into());
        let xds = e2e::controlplane::xds_address();
        println!(
            "istiod-lite ({istiod}) watches Namespaces, Pods and Services, translates them into\n\
             Workload API resources (a Workload per pod, a Service per Service) and pushes them\n\
             over delta xDS; its CA signs the ztunnels' workload certificates. Both over TLS on\n\
             {xds}, which the nodes reach.\n"
        );
        let mut rows = vec![row(&[
            "ZTUNNEL",
            "XDS SOURCE",
            "CA SOURCE",
            "WORKLOADS",
            "SERVICES",
        ])];
        let mut dumps = Vec::new();
        for n in self.mesh.topo.nodes() {
            let dump = self.mesh.config_dump(n.name())?;
            let source = dump["config"]["xdsSource"]["address"].as_str();
            if source != Some(xds.as_str()) {
                bail!(
                    "ztunnel on {} does not take its configuration from istiod-lite: {}",
                    n.name(),
                    dump["config"]["xdsSource"]
                );
            }
            let count = |k: &str| dump[k].as_array().map_or(0, Vec::len).to_string();
            rows.push(vec![
                n.name().to_string(),
                text(&dump["config"]["xdsSource"]["address"]),
                text(&dump["config"]["caSource"]["address"]),
                count("workloads"),
                count("services"),
            ]);
            dumps.push((n.name().to_string(), dump));
        }
        print_table(&rows);
        println!("(from each ztunnel's /config_dump: config.xdsSource and what it holds)");

        println!("\nistiod-lite's CA root, {}:", cp.root_cert.display());
        let root = std::fs::read_to_string(&cp.root_cert)
            .with_context(|| format!("reading {}", cp.root_cert.display()))?;
        let root_file = cp.root_cert.display().to_string();
        self.openssl(&[
            "x509", "-in", &root_file, "-noout", "-subject", "-serial", "-enddate",
        ]);
        println!(
            "\nWorkload certificates the ztunnels hold, from their /config_dump (serials in hex,\n\
             as openssl prints them):\n"
        );
        let mut leaf_files = Vec::new();
        for (node, dump) in &dumps {
            for c in dump["certificates"].as_array().into_iter().flatten() {
                let identity = text(&c["identity"]);
                if c["state"] != "Available" {
                    bail!("{node}: certificate of {identity} is {}", c["state"]);
                }
                let roots: Vec<String> = c["rootCerts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(pem_of)
                    .collect();
                if roots.len() != 1 || roots[0].trim() != root.trim() {
                    bail!("{node}: the root of {identity}'s certificate is not istiod-lite's");
                }
                let leaf = &c["certChain"][0];
                let root_details = &c["rootCerts"][0];
                println!("{node}  {identity}");
                println!(
                    "      leaf  serial={}  notBefore={}  notAfter={}",
                    serial_hex(&leaf["serialNumber"]),
                    text(&leaf["validFrom"]),
                    text(&leaf["expirationTime"])
                );
                println!(
                    "      root  serial={}  notAfter={}  = istiod-lite's root (same PEM)",
                    serial_hex(&root_details["serialNumber"]),
                    text(&root_details["expirationTime"])
                );
                // The leaf and any intermediates, for openssl to verify.
                let chain: Vec<String> = c["certChain"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(pem_of)
                    .collect();
                if let Some((leaf_pem, intermediates)) = chain.split_first() {
                    let sa = identity.rsplit('/').next().unwrap_or("workload");
                    let leaf_path = self.mesh.topo.temp_path(&format!("{node}-{sa}.pem"));
                    std::fs::write(&leaf_path, leaf_pem)?;
                    let chain_path = if intermediates.is_empty() {
                        None
                    } else {
                        let p = self.mesh.topo.temp_path(&format!("{node}-{sa}-chain.pem"));
                        std::fs::write(&p, intermediates.concat())?;
                        Some(p)
                    };
                    leaf_files.push((leaf_path, chain_path));
                }
            }
        }
        // One openssl run for leaves signed by the root itself; one each
        // for those that come with intermediates.
        let (direct, chained): (Vec<_>, Vec<_>) =
            leaf_files.into_iter().partition(|(_, c)| c.is_none());
        let direct: Vec<String> = direct
            .iter()
            .map(|(l, _)| l.display().to_string())
            .collect();
        let mut runs: Vec<Vec<String>> = Vec::new();
        if !direct.is_empty() {
            runs.push(direct);
        }
        for (leaf, chain) in &chained {
            let chain = chain.as_ref().map(|p| p.display().to_string());
            runs.push(
                ["-untrusted".to_string()]
                    .into_iter()
                    .chain(chain)
                    .chain([leaf.display().to_string()])
                    .collect(),
            );
        }
        for extra in &runs {
            let mut args = vec!["verify", "-CAfile", root_file.as_str()];
            args.extend(extra.iter().map(String::as_str));
            println!();
            self.openssl(&args);
        }
        Ok(())
    }

    fn topology(&self) {
        let t = &self.mesh.topo;
        let spec = &self.mesh.spec;
        heading("2. Topology");
        println!(
            "Every node, pod and host is a network namespace; nodes meet on one L2 bridge. The\n\
             pods are those of Kubernetes namespace {}.\n",
            self.mesh.namespace
        );
        let mut rows = vec![row(&["NODE", "ADDRESS", "POD CIDR", "ZTUNNEL", "NETNS"])];
        for n in t.nodes() {
            let z = self
                .mesh
                .ztunnel(n.name())
                .map(|p| format!("running, pid {}", p.pid()))
                .unwrap_or_else(|| "-".into());
            rows.push(row(&[
                n.name(),
                &n.ip().to_string(),
                &n.pod_cidr().to_string(),
                &z,
                n.netns_name(),
            ]));
        }
        print_table(&rows);
        println!();
        let mut rows = vec![row(&[
            "POD",
            "NODE",
            "ADDRESS",
            "IN MESH",
            "SERVICE ACCOUNT",
            "NETNS",
        ])];
        for p in t.pods() {
            let sa = spec
                .mesh_pods
                .iter()
                .find(|(_, name, _)| name == p.name())
                .map(|(_, _, sa)| sa.as_str());
            let enrolled = if sa.is_some() {
                "yes (in-pod rules, ztunnel)"
            } else {
                "no"
            };
            rows.push(row(&[
                p.name(),
                p.node_name(),
                &p.ip().to_string(),
                enrolled,
                sa.unwrap_or("-"),
                p.netns_name(),
            ]));
        }
        print_table(&rows);
        println!();
        let mut rows = vec![row(&["SERVICE", "VIP", "PORTS", "ENDPOINTS"])];
        for s in &spec.services {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|(sp, tp)| format!("{sp}->{tp}"))
                .collect();
            rows.push(row(&[
                &s.name,
                &s.vip.to_string(),
                &ports.join(","),
                &s.endpoints.join(","),
            ]));
        }
        print_table(&rows);
        println!(
            "\nExternal host (outside the cluster): {} on the node network, serving HTTP on {APP_PORT}.",
            t.external().ip()
        );
    }

    /// The client calls the service VIP; returns the capture taken on n2's
    /// link meanwhile.
    fn hbone_request(&self) -> anyhow::Result<Vec<u8>> {
        let t = &self.mesh.topo;
        heading("3. client (n1) -> service VIP -> server (n2), over HBONE");
        let url = format!("http://{}/{}", vip(), self.marker);
        println!(
            "The client pod calls the VIP in plain HTTP. Its in-pod rules send the connection to\n\
             n1's ztunnel, which picks the endpoint (server, on n2) and opens an HTTP/2 CONNECT\n\
             stream to {}:15008 over mutual TLS; n2's ztunnel hands it to the server.\n",
            t.pod("server").ip()
        );
        let cap = t.capture(t.bridge(), &t.node("n2").bridge_port(), "tcp")?;
        let header = format!("x-demo-marker: {}", self.marker);
        let reply = self.get("client", &url, &["-H", &header])?;
        let pcap = cap.stop()?;
        self.show_reply(&reply);
        if reply.code != 0 {
            bail!("the request failed (exit {}): {}", reply.code, reply.raw);
        }
        let client_ip = t.pod("client").ip().to_string();
        println!(
            "\nAnswered by {} on n2; it saw the client as {} ({}): ztunnel on n2 connected\n\
             from the client's own address, so the application sees who really called.",
            reply.body["server"].as_str().unwrap_or("?"),
            reply.body["client_ip"].as_str().unwrap_or("?"),
            if reply.body["client_ip"] == client_ip.as_str() {
                "the client pod's IP"
            } else {
                "NOT the client pod's IP"
            }
        );
        self.show_logs(&[("n1", "connection complete"), ("n2", "connection complete")]);
        Ok(pcap)
    }

    fn ztunnel_view(&self) -> anyhow::Result<()> {
        heading("4. What ztunnel on n1 knows (/config_dump, as istioctl ztunnel-config shows it)");
        let dump = self.mesh.config_dump("n1")?;
        println!("$ istioctl ztunnel-config workload   # equivalent\n");
        let mut rows = vec![row(&[
            "NAMESPACE",
            "POD NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL",
        ])];
        for w in dump["workloads"].as_array().into_iter().flatten() {
            let ips: Vec<&str> = w["workloadIps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            rows.push(vec![
                text(&w["namespace"]),
                text(&w["name"]),
                ips.join(","),
                text(&w["node"]),
                waypoint(&w["waypoint"]),
                protocol(&w["protocol"]),
            ]);
        }
        print_table(&rows);
        println!("\n$ istioctl ztunnel-config service   # equivalent\n");
        let mut rows = vec![row(&[
            "NAMESPACE",
            "SERVICE NAME",
            "SERVICE VIP",
            "WAYPOINT",
            "ENDPOINTS",
        ])];
        for s in dump["services"].as_array().into_iter().flatten() {
            let vips: Vec<String> = s["vips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                // `<network>/<ip>`: the column shows the address.
                .map(|v| v.rsplit('/').next().unwrap_or(v).to_string())
                .collect();
            let endpoints: Vec<&Value> = s["endpoints"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
                .collect();
            let healthy = endpoints
                .iter()
                .filter(|e| e["status"] == "Healthy")
                .count();
            rows.push(vec![
                text(&s["namespace"]),
                text(&s["name"]),
                vips.join(","),
                waypoint(&s["waypoint"]),
                format!("{healthy}/{}", endpoints.len()),
            ]);
        }
        print_table(&rows);
        let held: Vec<&String> = dump["workloadState"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
            .collect();
        let certs: Vec<&str> = dump["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["identity"].as_str())
            .collect();
        println!(
            "\nPods whose network namespace this ztunnel listens in: {}",
            list(&held)
        );
        println!("Certificates it holds for them: {}", list(&certs));
        Ok(())
    }

    fn metrics(&self) -> anyhow::Result<()> {
        heading("5. Istio metrics for that connection (:15020/metrics)");
        let service = format!("destination_service=\"{}\"", self.mesh.hostname(SERVICE));
        let src = self.wait_metric("n1", &["reporter=\"source\"", &service])?;
        let dst = self.wait_metric(
            "n2",
            &[
                "reporter=\"destination\"",
                "destination_workload=\"server\"",
            ],
        )?;
        println!("ztunnel on n1, as the client's side (reporter=source):");
        for l in &src {
            println!("  {}", abridge(l));
        }
        println!("ztunnel on n2, as the server's side (reporter=destination):");
        for l in &dst {
            println!("  {}", abridge(l));
        }
        println!(
            "\n(labels abridged; the full lines have Istio's whole label set. n2's ztunnel knows\n\
             the client's identity from its TLS certificate: source_principal above.)"
        );
        Ok(())
    }

    /// Adds a port to the service through the API server and watches the
    /// ztunnels pick it up, then uses it.
    fn live_change(&self) -> anyhow::Result<()> {
        let ns = self.mesh.namespace.as_str();
        heading("6. A live change: a new Service port through the API");
        println!(
            "Nothing is restarted: the API server tells istiod-lite, which pushes a delta with the\n\
             changed Service (and the Workloads behind it) to both ztunnels.\n"
        );
        let host = self.mesh.hostname(SERVICE);
        let nodes: Vec<String> = self
            .mesh
            .topo
            .nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        let mut before = Vec::new();
        for n in &nodes {
            before.push(self.service_ports(n, &host)?);
        }
        let patch = serde_json::json!([{
            "op": "add",
            "path": "/spec/ports/-",
            "value": {"name": format!("tcp-{EXTRA_PORT}"), "port": EXTRA_PORT, "targetPort": APP_PORT},
        }])
        .to_string();
        let started = Instant::now();
        self.kubectl(&[
            "patch", "svc", SERVICE, "-n", ns, "--type", "json", "-p", &patch,
        ])?;
        let want = format!("{EXTRA_PORT}->{APP_PORT}");
        // Both ztunnels are watched together, so each one's time is its own.
        let mut seen: Vec<Option<(String, Duration)>> = vec![None; nodes.len()];
        let deadline = Instant::now() + SETTLE;
        while seen.iter().any(Option::is_none) {
            for (n, slot) in nodes.iter().zip(seen.iter_mut()) {
                if slot.is_some() {
                    continue;
                }
                let ports = self.service_ports(n, &host)?;
                if ports.split(", ").any(|p| p == want) {
                    *slot = Some((ports, started.elapsed()));
                } else if Instant::now() > deadline {
                    bail!(
                        "ztunnel on {n} still has {host} ports {ports} {SETTLE:?} after the patch"
                    );
                }
            }
            self.interrupt.check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("ztunnel /config_dump, services[{host}].ports:");
        for ((n, old), new) in nodes.iter().zip(&before).zip(seen.into_iter().flatten()) {
            println!("  {n} before: {old}");
            println!(
                "  {n} after:  {}   (seen {:.2}s after kubectl patch was started)",
                new.0,
                new.1.as_secs_f64()
            );
        }
        println!("\nAnd the client uses the new port right away:\n");
        let url = format!("http://{}:{EXTRA_PORT}/live", vip());
        let reply = self.get("client", &url, &[])?;
        self.show_reply(&reply);
        if reply.code != 0 {
            bail!(
                "the request to the new port failed (exit {}): {}",
                reply.code,
                reply.raw
            );
        }
        Ok(())
    }

    /// The client calls the external host; returns the capture of the
    /// external host's link.
    fn passthrough(&self) -> anyhow::Result<Vec<u8>> {
        let t = &self.mesh.topo;
        let ext = t.external();
        heading("7. client (n1) -> a host outside the mesh: passthrough");
        println!(
            "{} is not a workload ztunnel knows, so n1's ztunnel forwards the captured\n\
             connection as it is: plain TCP, from the client's address.\n",
            ext.ip()
        );
        let cap = t.capture(t.bridge(), ext.bridge_port(), "tcp")?;
        let url = format!("http://{}:{APP_PORT}/{}", ext.ip(), self.marker);
        let header = format!("x-demo-marker: {}", self.marker);
        let reply = self.get("client", &url, &["-H", &header])?;
        let pcap = cap.stop()?;
        self.show_reply(&reply);
        if reply.code != 0 {
            bail!(
                "the passthrough request failed (exit {}): {}",
                reply.code,
                reply.raw
            );
        }
        let lines = self.wait_metric(
            "n1",
            &[
                "reporter=\"source\"",
                "connection_security_policy=\"none\"",
                "destination_workload=\"unknown\"",
            ],
        )?;
        println!("\nztunnel on n1 counts it as a connection that is not mutual TLS:");
        for l in &lines {
            println!("  {}", abridge(l));
        }
        self.show_logs(&[("n1", "passthrough")]);
        Ok(pcap)
    }

    fn non_mesh_client(&self) -> anyhow::Result<()> {
        let t = &self.mesh.topo;
        let server = t.pod("server");
        heading("8. outsider (n1, not in the mesh) -> server (n2)");
        println!(
            "A pod outside the mesh has no ztunnel of its own: it sends plain TCP. The server's\n\
             in-pod rules hand it to n2's ztunnel (port 15006), which delivers it to the server.\n"
        );
        let url = format!("http://{}:{APP_PORT}/from-outside", server.ip());
        let reply = self.get("outsider", &url, &[])?;
        self.show_reply(&reply);
        if reply.code != 0 {
            bail!("the request failed (exit {}): {}", reply.code, reply.raw);
        }
        let lines = self.wait_metric(
            "n2",
            &[
                "reporter=\"destination\"",
                "connection_security_policy=\"none\"",
                "destination_workload=\"server\"",
            ],
        )?;
        println!("\nztunnel on n2 counts it as plaintext (connection_security_policy=none):");
        for l in &lines {
            println!("  {}", abridge(l));
        }
        Ok(())
    }

    fn on_the_wire(&self, hbone: &[u8], plain: &[u8]) -> anyhow::Result<()> {
        let t = &self.mesh.topo;
        heading("9. On the wire");
        println!(
            "Both requests carried the marker {:?} in the URL and a header.\n",
            self.marker
        );
        println!("Capture on n2's link to the bridge during the HBONE request (section 3):");
        let frames = capture::packets(hbone)?;
        println!("  {} TCP packets; flows:", frames.len());
        for line in flows(&frames) {
            println!("    {line}");
        }
        let seen = capture::contains(hbone, self.marker.as_bytes());
        let only_hbone = frames
            .iter()
            .filter_map(|f| tcp_of(f))
            .all(|(_, sport, _, dport, _)| sport == HBONE_PORT || dport == HBONE_PORT);
        println!(
            "  marker visible in clear: {}",
            match (seen, only_hbone) {
                (true, _) => "YES (unexpected: the tunnel should be encrypted)",
                (false, true) =>
                    "no; every packet on the node link was to or from port 15008 (TLS)",
                (false, false) => "no",
            }
        );
        println!(
            "\nCapture on the external host's link ({}) during the passthrough request (section 7):",
            t.external().ip()
        );
        let frames = capture::packets(plain)?;
        println!("  {} TCP packets; flows:", frames.len());
        for line in flows(&frames) {
            println!("    {line}");
        }
        let seen = capture::contains(plain, self.marker.as_bytes());
        println!(
            "  marker visible in clear: {}",
            if seen {
                "yes"
            } else {
                "no (unexpected for plain HTTP)"
            }
        );
        for text in [
            format!("GET /{} HTTP/1.1", self.marker),
            format!("x-demo-marker: {}", self.marker),
        ] {
            if capture::contains(plain, text.as_bytes()) {
                println!("    readable in the captured bytes: {text:?}");
            }
        }
        Ok(())
    }

    fn wait_for_ctrl_c(&self) -> anyhow::Result<()> {
        let t = &self.mesh.topo;
        heading("The mesh is up");
        let app = e2e::app::mesh_app()?;
        let app = app.display();
        let client = t.pod("client").netns_name();
        let n1 = t.node("n1").netns_name();
        let cp = self.mesh.control_plane();
        let ns = &self.mesh.namespace;
        println!("Try, as root, in another terminal:\n");
        println!("  # the cluster, as kubectl sees it");
        println!("  export KUBECONFIG={}", cp.kube.kubeconfig().display());
        println!("  kubectl get pods -A");
        println!("  kubectl get pods,svc -n {ns} -o wide");
        println!("  # a shell inside the client pod (enrolled, on n1)");
        println!("  ip netns exec {client} bash");
        println!("  # the service through the mesh, from the client pod");
        println!(
            "  ip netns exec {client} {app} http-get http://{}/hello",
            vip()
        );
        println!("  ip netns exec {client} curl -s http://{}/hello", vip());
        println!("  # the client pod's capture rules");
        println!(
            "  ip netns exec {client} nft list table inet {}",
            node_agent::rules::TABLE
        );
        println!("  # ztunnel's admin and metrics endpoints, inside node n1");
        println!("  ip netns exec {n1} curl -s localhost:15000/config_dump");
        println!("  ip netns exec {n1} curl -s localhost:15020/metrics | grep istio_");
        println!("\nOther namespaces:");
        for p in t.pods() {
            println!("  pod {:<9} {}", p.name(), p.netns_name());
        }
        for n in t.nodes() {
            println!("  node {:<8} {}", n.name(), n.netns_name());
        }
        println!("  external       {}", t.external().netns_name());
        println!("\nLogs (tail -f them):");
        for n in t.nodes() {
            if let Some(z) = self.mesh.ztunnel(n.name()) {
                println!(
                    "  {}: {}  (stderr: {})",
                    n.name(),
                    z.stdout_path().display(),
                    z.stderr_path().display()
                );
            }
        }
        if let Some(p) = cp.process() {
            println!(
                "  istiod-lite: {}  (stderr: {})",
                p.stdout_path().display(),
                p.stderr_path().display()
            );
        }
        println!(
            "  kube-apiserver and friends: {}",
            cp.kube.dir().join("logs").display()
        );
        println!("\nPress Ctrl-C to stop; everything above is removed on exit.");
        while !self.interrupt.raised() {
            for n in t.nodes() {
                if let Some(z) = self.mesh.ztunnel(n.name()) {
                    if !z.is_running() {
                        bail!(
                            "ztunnel on {} exited:\n{}{}",
                            n.name(),
                            z.stdout(),
                            z.stderr()
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    // ------------------------------------------------------------ helpers

    /// Runs kubectl against the demo's API server, showing the command and
    /// what it printed.
    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("$ kubectl {}", shell_words(args));
        let out = self.mesh.control_plane().kube.kubectl(args)?;
        print!("{out}");
        if !out.is_empty() && !out.ends_with('\n') {
            println!();
        }
        println!();
        Ok(out)
    }

    /// Runs openssl, showing the command and its output; a missing or
    /// failing openssl is shown, not fatal (the checks above it are done in
    /// the demo itself).
    fn openssl(&self, args: &[&str]) {
        println!("$ openssl {}", shell_words(args));
        match std::process::Command::new("openssl").args(args).output() {
            Ok(out) => {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                for l in text.lines() {
                    println!("{l}");
                }
            }
            Err(e) => println!("(openssl not available: {e})"),
        }
    }

    /// The ports of a service in a node's ztunnel, `80->8080, ...`.
    fn service_ports(&self, node: &str, hostname: &str) -> anyhow::Result<String> {
        let dump = self.mesh.config_dump(node)?;
        let svc = dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["hostname"] == hostname)
            .with_context(|| format!("ztunnel on {node} does not know {hostname}"))?;
        let mut ports: Vec<(u64, String)> = svc["ports"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(sp, tp)| (sp.parse().unwrap_or(0), format!("{sp}->{}", text(tp))))
            .collect();
        ports.sort();
        let ports: Vec<String> = ports.into_iter().map(|(_, p)| p).collect();
        Ok(list(&ports))
    }

    fn get(&self, pod: &str, url: &str, extra: &[&str]) -> anyhow::Result<Reply> {
        let mut args = vec!["http-get", url, "-m", "10"];
        args.extend_from_slice(extra);
        let pod_ns = self.mesh.topo.pod(pod);
        println!(
            "$ ip netns exec {} mesh-app {}",
            pod_ns.netns_name(),
            shell_words(&args)
        );
        let out = self.mesh.app(pod_ns, &args)?;
        let status = out.stdout.lines().next().unwrap_or("").to_string();
        let body = out
            .stdout
            .find('{')
            .and_then(|i| serde_json::from_str(out.stdout[i..].trim()).ok())
            .unwrap_or(Value::Null);
        Ok(Reply {
            code: out.code().unwrap_or(-1),
            status,
            body,
            raw: format!("{}{}", out.stdout, out.stderr),
        })
    }

    fn show_reply(&self, reply: &Reply) {
        println!("{}", reply.status);
        if reply.body.is_null() {
            println!("{}", reply.raw.trim_end());
            return;
        }
        let b = &reply.body;
        let mut shown = serde_json::Map::new();
        for key in ["server", "client_ip", "local", "path"] {
            shown.insert(key.into(), b[key].clone());
        }
        if let Some(m) = b["headers"].get("x-demo-marker") {
            shown.insert("headers[x-demo-marker]".into(), m.clone());
        }
        let pretty = serde_json::to_string_pretty(&Value::Object(shown)).unwrap_or_default();
        println!("{pretty}");
        println!("(response body, abridged)");
    }

    /// Polls a node's metrics until lines of `istio_tcp_connections_opened_total`
    /// with all of `labels` show up (bounded).
    fn wait_metric(&self, node: &str, labels: &[&str]) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let text = self.mesh.metrics(node)?;
            let lines: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
                .filter(|l| labels.iter().all(|want| l.contains(want)))
                .map(String::from)
                .collect();
            if !lines.is_empty() {
                return Ok(lines);
            }
            if Instant::now() > deadline {
                bail!("no istio_tcp_connections_opened_total with {labels:?} on {node}:\n{text}");
            }
            self.interrupt.check()?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Shows the newest log line of each node's ztunnel containing the
    /// given text; such lines follow a connection's end, so wait for them.
    fn show_logs(&self, wanted: &[(&str, &str)]) {
        println!("\nztunnel log lines for it:");
        for (node, needle) in wanted {
            let deadline = Instant::now() + SETTLE;
            let line = loop {
                let logs = self
                    .mesh
                    .ztunnel(node)
                    .map(|z| z.stdout() + &z.stderr())
                    .unwrap_or_default();
                let found = logs
                    .lines()
                    .rev()
                    .find(|l| l.contains(needle))
                    .map(strip_ansi);
                if found.is_some() || Instant::now() > deadline || self.interrupt.raised() {
                    break found;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            println!(
                "  {node}: {}",
                line.unwrap_or_else(|| format!("(no line with {needle:?} yet)"))
            );
        }
    }
}

// ------------------------------------------------------------ formatting

fn vip() -> Ipv4Addr {
    Ipv4Addr::from(VIP)
}

fn heading(title: &str) {
    println!("\n{}\n{title}\n{}", "=".repeat(78), "=".repeat(78));
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Left-aligned columns, as kubectl and istioctl print them.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn waypoint(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::String(s) if s.is_empty() => "None".into(),
        other => text(other),
    }
}

/// The dump says `NONE` for workloads reached in plain TCP; istioctl shows
/// that as TCP.
fn protocol(v: &Value) -> String {
    match v.as_str() {
        Some("NONE") | Some("") | None => "TCP".into(),
        Some(p) => p.to_string(),
    }
}

/// A serial number the dump gives in decimal, in hex the way `openssl x509
/// -serial` prints it (upper case, whole bytes).
fn serial_hex(v: &Value) -> String {
    v.as_str()
        .and_then(decimal_to_hex)
        .unwrap_or_else(|| text(v))
}

/// Base conversion of an arbitrarily long decimal string by repeated
/// division; `None` when it is not all digits.
fn decimal_to_hex(dec: &str) -> Option<String> {
    let mut digits: Vec<u32> = dec.chars().map(|c| c.to_digit(10)).collect::<Option<_>>()?;
    if digits.is_empty() {
        return None;
    }
    let mut hex = Vec::new();
    while digits.iter().any(|&d| d != 0) {
        let mut rem = 0;
        for d in digits.iter_mut() {
            let cur = rem * 10 + *d;
            *d = cur / 16;
            rem = cur % 16;
        }
        hex.push(char::from_digit(rem, 16)?.to_ascii_uppercase());
    }
    if hex.is_empty() {
        hex.push('0');
    }
    if hex.len() % 2 == 1 {
        hex.push('0');
    }
    Some(hex.iter().rev().collect())
}

/// The PEM text of a certificate as the dump holds it (base64 of the PEM).
fn pem_of(details: &Value) -> Option<String> {
    let b64 = details["pem"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    String::from_utf8(bytes).ok()
}

fn list<S: AsRef<str>>(items: &[S]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items
            .iter()
            .map(|s| s.as_ref())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=".contains(c))
            {
                a.to_string()
            } else {
                format!("'{a}'")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Labels of a metric line worth reading, in this order.
const SHOWN_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_principal",
    "destination_workload",
    "destination_service",
    "destination_principal",
    "connection_security_policy",
];

/// `name{a="1",b="2",...} value` with only [`SHOWN_LABELS`].
fn abridge(line: &str) -> String {
    let Some((name, rest)) = line.split_once('{') else {
        return line.to_string();
    };
    let Some((labels, value)) = rest.rsplit_once('}') else {
        return line.to_string();
    };
    let parsed = parse_labels(labels);
    let shown: Vec<String> = SHOWN_LABELS
        .iter()
        .filter_map(|k| parsed.get(*k).map(|v| format!("{k}=\"{v}\"")))
        .collect();
    format!("{name}{{{}}}{value}", shown.join(","))
}

/// `a="1",b="x\"y"` into a map (values kept escaped).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    value.push(c);
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences end with a letter.
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One TCP flow of a capture: the endpoint with the lower port is called the
/// server side.
fn flows(frames: &[&[u8]]) -> Vec<String> {
    let mut seen: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    for f in frames {
        let Some((src, sport, dst, dport, payload)) = tcp_of(f) else {
            continue;
        };
        let a = format!("{src}:{sport}");
        let b = format!("{dst}:{dport}");
        let key = if sport < dport { (b, a) } else { (a, b) };
        let e = seen.entry(key).or_default();
        e.0 += 1;
        e.1 += payload;
    }
    let mut lines: Vec<String> = seen
        .iter()
        .map(|((client, server), (n, bytes))| {
            format!("{client} <-> {server}: {n} packets, {bytes} payload bytes")
        })
        .collect();
    if lines.is_empty() {
        lines.push("(none)".into());
    }
    lines
}

/// (source, source port, destination, destination port, payload length) of
/// an Ethernet/IPv4/TCP frame.
fn tcp_of(frame: &[u8]) -> Option<(Ipv4Addr, u16, Ipv4Addr, u16, usize)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != 0x0800 {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 6 || ihl < 20 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let addr = |at: usize| -> Option<Ipv4Addr> {
        let b = ip.get(at..at + 4)?;
        Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    };
    let tcp = ip.get(ihl..)?;
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let data_offset = usize::from(*tcp.get(12)? >> 4) * 4;
    let payload = total.saturating_sub(ihl + data_offset);
    Some((addr(12)?, sport, addr(16)?, dport, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abridges_metric_lines() {
        let line = r#"istio_tcp_connections_opened_total{reporter="source",request_protocol="tcp",source_workload="client",destination_service="web.default.svc.cluster.local",connection_security_policy="mutual_tls"} 3"#;
        assert_eq!(
            abridge(line),
            r#"istio_tcp_connections_opened_total{reporter="source",source_workload="client",destination_service="web.default.svc.cluster.local",connection_security_policy="mutual_tls"} 3"#
        );
        assert_eq!(abridge("no_labels 1"), "no_labels 1");
    }

    #[test]
    fn label_values_may_hold_quotes_and_commas() {
        let labels = parse_labels(r#"a="x\"y,z",b="",c="3""#);
        assert_eq!(labels["a"], r#"x\"y,z"#);
        assert_eq!(labels["b"], "");
        assert_eq!(labels["c"], "3");
    }

    fn frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 20 + payload) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 5 << 4;
        f.extend_from_slice(&tcp);
        f.extend(std::iter::repeat_n(b'x', payload));
        f
    }

    #[test]
    fn groups_packets_into_flows() {
        let a = frame([10, 244, 1, 2], 40000, [10, 244, 2, 2], 15008, 100);
        let b = frame([10, 244, 2, 2], 15008, [10, 244, 1, 2], 40000, 0);
        let frames: Vec<&[u8]> = vec![&a, &b, &a[..20]];
        assert_eq!(
            flows(&frames),
            ["10.244.1.2:40000 <-> 10.244.2.2:15008: 2 packets, 100 payload bytes"]
        );
        assert_eq!(flows(&[]), ["(none)"]);
    }

    #[test]
    fn serials_read_like_openssl() {
        assert_eq!(decimal_to_hex("255").as_deref(), Some("FF"));
        assert_eq!(decimal_to_hex("4096").as_deref(), Some("1000"));
        assert_eq!(decimal_to_hex("0").as_deref(), Some("00"));
        assert_eq!(
            decimal_to_hex("31000797106398451924587640818413261000").as_deref(),
            Some("1752894DE306CCA05990F41EFBDAD0C8")
        );
        assert_eq!(decimal_to_hex("12a"), None);
        assert_eq!(serial_hex(&Value::Null), "-");
    }

    #[test]
    fn strips_terminal_colours() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "2026  INFO x"
        );
    }

    #[test]
    fn dump_columns_read_like_istioctl() {
        assert_eq!(protocol(&Value::String("NONE".into())), "TCP");
        assert_eq!(protocol(&Value::String("HBONE".into())), "HBONE");
        assert_eq!(waypoint(&Value::Null), "None");
        assert_eq!(
            shell_words(&["http-get", "x-demo: a b"]),
            "http-get 'x-demo: a b'"
        );
    }
}
