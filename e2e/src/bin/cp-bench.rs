//! `cp-bench`: what the control plane costs at cluster scale. It builds a
//! synthetic cluster (by default 10,000 pods behind 1,000 services in 10
//! ambient namespaces over 50 nodes) and reports:
//!
//! - full translation: every object through istiod-lite's translator, cold;
//! - change propagation, in-process: one pod changed at the translator's
//!   input until a delta xDS client (over real gRPC on loopback) applied
//!   it, p50/p99 — what istiod-lite adds on top of its source;
//! - change propagation, end to end: the same through a running istiod-lite
//!   process reading a config directory (includes the directory's 250 ms
//!   poll) and TLS;
//! - RSS of that istiod-lite, and of a ztunnel holding the whole state.
//!
//! Needs the `istiod-lite` and `ztunnel` binaries (`scripts/bench.sh
//! --control-plane` builds release ones and runs this).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use istiod_lite::translate::{Event, MeshConfig, Translator};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use mesh_core::proto::workload::{self as pb, address::Type};
use mesh_core::proto::ADDRESS_TYPE_URL;
use mesh_core::xds::client::{ClientConfig, Handler, Subscription, Upsert, XdsClient};
use mesh_core::xds::server::{ResourceStore, XdsServer};
use prost::Message;
use serde_json::json;
use tokio::sync::watch;

#[derive(Parser)]
#[command(about = "Control-plane scale benchmark (translation, push latency, memory)")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Changes timed for each latency figure.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn labels(kv: &[(&str, String)]) -> Option<BTreeMap<String, String>> {
    Some(kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
}

struct Cluster {
    namespaces: Vec<Namespace>,
    services: Vec<Service>,
    pods: Vec<Pod>,
}

fn pod(ns: &str, name: &str, svc: usize, node: usize, ip: [u8; 4], version: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: labels(&[("app", format!("svc-{svc}")), ("version", version.into())]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(format!("node-{node}")),
            service_account_name: Some(format!("sa-{svc}")),
            containers: vec![Container {
                name: "app".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(std::net::Ipv4Addr::from(ip).to_string()),
            pod_ips: Some(vec![PodIP {
                ip: std::net::Ipv4Addr::from(ip).to_string(),
            }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn cluster(a: &Args) -> Cluster {
    let namespaces = (0..a.namespaces)
        .map(|i| Namespace {
            metadata: ObjectMeta {
                name: Some(format!("bench-{i}")),
                labels: labels(&[("istio.io/dataplane-mode", "ambient".into())]),
                ..Default::default()
            },
            ..Default::default()
        })
        .collect();
    let services = (0..a.services)
        .map(|i| Service {
            metadata: ObjectMeta {
                name: Some(format!("svc-{i}")),
                namespace: Some(format!("bench-{}", i % a.namespaces)),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!("10.96.{}.{}", i / 250, i % 250 + 1)),
                selector: labels(&[("app", format!("svc-{i}"))]),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::String("http".into())),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let pods = (0..a.pods)
        .map(|i| {
            let svc = i % a.services;
            let ip = 0x0af4_0000u32 + i as u32 + 2;
            pod(
                &format!("bench-{}", svc % a.namespaces),
                &format!("pod-{i}"),
                svc,
                i % a.nodes,
                ip.to_be_bytes(),
                "v1",
            )
        })
        .collect();
    Cluster {
        namespaces,
        services,
        pods,
    }
}

fn events(c: &Cluster) -> Vec<Event> {
    c.namespaces
        .iter()
        .cloned()
        .map(Event::Namespace)
        .chain(c.services.iter().cloned().map(Event::Service))
        .chain(c.pods.iter().cloned().map(Event::Pod))
        .collect()
}

/// Records when each workload's canonical revision changes.
#[derive(Default)]
struct Watcher {
    revisions: Mutex<BTreeMap<String, String>>,
    changed: Mutex<Option<watch::Sender<u64>>>,
    count: Mutex<usize>,
}

impl Handler for Watcher {
    fn apply(
        &self,
        type_url: &str,
        upserts: Vec<Upsert>,
        removes: Vec<String>,
    ) -> Result<(), String> {
        if type_url != ADDRESS_TYPE_URL {
            return Ok(());
        }
        let mut revs = self.revisions.lock().unwrap();
        for (name, _, any) in upserts {
            let a = pb::Address::decode(any.value.as_ref()).map_err(|e| e.to_string())?;
            if let Some(Type::Workload(w)) = a.r#type {
                revs.insert(name, w.canonical_revision);
            }
        }
        for r in removes {
            revs.remove(&r);
        }
        *self.count.lock().unwrap() = revs.len();
        if let Some(tx) = &*self.changed.lock().unwrap() {
            tx.send_modify(|n| *n += 1);
        }
        Ok(())
    }
}

impl Watcher {
    fn new() -> (Arc<Self>, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        let w = Arc::new(Watcher::default());
        *w.changed.lock().unwrap() = Some(tx);
        (w, rx)
    }

    async fn wait(&self, rx: &mut watch::Receiver<u64>, uid: &str, rev: &str) -> Result<()> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if self.revisions.lock().unwrap().get(uid).map(String::as_str) == Some(rev) {
                    return;
                }
                let _ = rx.changed().await;
            }
        })
        .await
        .with_context(|| format!("{uid} never reached revision {rev}"))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_yaml(path: &Path, docs: impl Iterator<Item = serde_json::Value>) -> Result<()> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&d)?);
    }
    // Write-then-rename, so the poller never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, out)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

fn with_kind<T: serde::Serialize>(o: &T, kind: &str) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(o)?;
    v["apiVersion"] = json!("v1");
    v["kind"] = json!(kind);
    Ok(v)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let c = cluster(&a);
    let mut report = serde_json::Map::new();
    report.insert(
        "size".into(),
        json!({"pods": a.pods, "services": a.services, "namespaces": a.namespaces, "nodes": a.nodes}),
    );

    // 1. Full translation, cold.
    let evs = events(&c);
    let t0 = Instant::now();
    let mut tr = Translator::new(MeshConfig::default());
    for e in evs {
        tr.apply(e);
    }
    let full = tr.take_changes();
    let full_time = t0.elapsed();
    let (wl, svc) = tr.counts();
    if wl != a.pods || svc != a.services {
        bail!("translation produced {wl} workloads and {svc} services");
    }
    report.insert("full_translation_ms".into(), json!(ms(full_time)));

    // 2. In-process: translator -> store -> gRPC -> client.
    let store = ResourceStore::new();
    istiod_lite::push::publish(&store, full)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let svc_impl = XdsServer::new(store.clone()).into_service();
    tokio::spawn(async move {
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        tonic::transport::Server::builder()
            .add_service(svc_impl)
            .serve_with_incoming(incoming)
            .await
    });
    let translator = istiod_lite::push::SharedTranslator::new(tr);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (_trigger, drain) = mesh_core::drain::new();
    // No flush requests here: the bench waits on the client instead.
    let (_, flush) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(istiod_lite::push::run(
        rx,
        flush,
        translator,
        store.clone(),
        drain,
    ));
    let (w, mut changed) = Watcher::new();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();
    let client = XdsClient::new(
        channel,
        ClientConfig::new("bench~0.0.0.0~bench.bench~bench.svc.cluster.local")
            .subscribe(ADDRESS_TYPE_URL, Subscription::wildcard()),
        w.clone(),
    );
    let mut ready = client.handle().ready();
    tokio::spawn(client.run());
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r)).await??;
    report.insert("initial_push_in_process_ms".into(), json!(ms(t0.elapsed())));
    let mut lat = Vec::new();
    for i in 0..a.changes {
        let n = (i * 7919) % a.pods;
        let p = &c.pods[n];
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let rev = format!("r{i}");
        let mut changed_pod = p.clone();
        changed_pod
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("version".into(), rev.clone());
        let uid = format!("Kubernetes//Pod/{ns}/pod-{n}");
        let t = Instant::now();
        tx.send(vec![Event::Pod(changed_pod)])?;
        w.wait(&mut changed, &uid, &rev).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    report.insert(
        "change_in_process_ms".into(),
        json!({"p50": ms(percentile(&lat, 0.5)), "p99": ms(percentile(&lat, 0.99)), "max": ms(*lat.last().unwrap_or(&Duration::ZERO))}),
    );

    // 3. End to end through an istiod-lite process reading a directory.
    let dir = tempfile::tempdir()?;
    let cfg_dir = dir.path().join("config");
    std::fs::create_dir_all(&cfg_dir)?;
    write_yaml(
        &cfg_dir.join("namespaces.yaml"),
        c.namespaces
            .iter()
            .map(|n| with_kind(n, "Namespace"))
            .collect::<Result<Vec<_>>>()?
            .into_iter(),
    )?;
    write_yaml(
        &cfg_dir.join("services.yaml"),
        c.services
            .iter()
            .map(|s| with_kind(s, "Service"))
            .collect::<Result<Vec<_>>>()?
            .into_iter(),
    )?;
    // Pods grouped by service: a change rewrites a file of ten pods.
    let mut by_svc: BTreeMap<usize, Vec<&Pod>> = BTreeMap::new();
    for (i, p) in c.pods.iter().enumerate() {
        by_svc.entry(i % a.services).or_default().push(p);
    }
    for (s, pods) in &by_svc {
        write_yaml(
            &cfg_dir.join(format!("pods-{s:04}.yaml")),
            pods.iter()
                .map(|p| with_kind(*p, "Pod"))
                .collect::<Result<Vec<_>>>()?
                .into_iter(),
        )?;
    }
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let root = dir.path().join("root-cert.pem");
    let istiod = Proc(
        Command::new(e2e::app::binary("istiod-lite")?)
            .env("CONFIG_DIR", &cfg_dir)
            .env("CA_DIR", dir.path().join("ca"))
            .env("GRPC_ADDR", grpc.to_string())
            .env("HTTP_ADDR", http.to_string())
            .env("ROOT_CERT_OUT", &root)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting istiod-lite")?,
    );
    let t0 = Instant::now();
    while http_get(http, "/ready").map(|r| r.0) != Some(200) {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("istiod-lite not ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report.insert("istiod_ready_ms".into(), json!(ms(t0.elapsed())));
    let root_pem = std::fs::read_to_string(&root)?;
    let (w2, mut changed2) = Watcher::new();
    let client = XdsClient::new(
        mesh_core::grpc::channel(
            &format!("https://{grpc}"),
            mesh_core::grpc::client_tls(&root_pem)?,
        )?,
        ClientConfig::new("bench~0.0.0.0~bench2.bench~bench.svc.cluster.local")
            .subscribe(ADDRESS_TYPE_URL, Subscription::wildcard()),
        w2.clone(),
    );
    let mut ready = client.handle().ready();
    tokio::spawn(client.run());
    tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r)).await??;
    let changes = a.changes.min(40);
    let mut lat = Vec::new();
    for i in 0..changes {
        let s = (i * 37) % a.services;
        let pods = &by_svc[&s];
        let p = pods[0];
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let rev = format!("f{i}");
        let mut docs = Vec::new();
        for (k, q) in pods.iter().enumerate() {
            let mut q = (*q).clone();
            if k == 0 {
                q.metadata
                    .labels
                    .get_or_insert_with(Default::default)
                    .insert("version".into(), rev.clone());
            }
            docs.push(with_kind(&q, "Pod")?);
        }
        let uid = format!("Kubernetes//Pod/{ns}/{name}");
        let t = Instant::now();
        write_yaml(&cfg_dir.join(format!("pods-{s:04}.yaml")), docs.into_iter())?;
        w2.wait(&mut changed2, &uid, &rev).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    report.insert(
        "change_through_directory_ms".into(),
        json!({"p50": ms(percentile(&lat, 0.5)), "p99": ms(percentile(&lat, 0.99)), "poll_interval_ms": 250}),
    );
    report.insert("istiod_rss_mib".into(), json!(rss_mib(istiod.0.id())?));

    // 4. A ztunnel holding the whole state.
    std::fs::write(dir.path().join("token"), "unused-without-kubernetes")?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let ztunnel = Proc(
        Command::new(e2e::app::binary("ztunnel")?)
            .env("XDS_ADDRESS", format!("https://{grpc}"))
            .env("XDS_ROOT_CA", &root)
            .env("AUTH_TOKEN_PATH", dir.path().join("token"))
            .env("NODE_NAME", "bench-node-without-pods")
            .env("INPOD_UDS", dir.path().join("absent.sock"))
            .env("ADMIN_ADDR", admin.to_string())
            .env("STATS_ADDR", format!("127.0.0.1:{}", free_port()?))
            .env("READINESS_ADDR", format!("127.0.0.1:{}", free_port()?))
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .spawn()
            .context("starting ztunnel")?,
    );
    let t0 = Instant::now();
    loop {
        if let Some((200, body)) = http_get(admin, "/config_dump") {
            let dump: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let n = dump["workloads"].as_array().map(Vec::len).unwrap_or(0);
            if n == a.pods {
                break;
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("ztunnel never held all {} workloads", a.pods);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let allocator caches from the config dump settle before sampling.
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.insert("ztunnel_rss_mib".into(), json!(rss_mib(ztunnel.0.id())?));
    drop(ztunnel);
    drop(istiod);

    let r = serde_json::Value::Object(report);
    if a.json {
        println!("{r}");
        return Ok(());
    }
    println!(
        "control plane at {} pods / {} services / {} namespaces / {} nodes",
        a.pods, a.services, a.namespaces, a.nodes
    );
    println!(
        "  full translation (cold)              {:>9.2} ms",
        r["full_translation_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  initial push to one client           {:>9.2} ms",
        r["initial_push_in_process_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  one pod change -> client applied     p50 {:>7.2} ms  p99 {:>7.2} ms  (translator input to client, in-process, {} changes)",
        r["change_in_process_ms"]["p50"].as_f64().unwrap_or(0.0),
        r["change_in_process_ms"]["p99"].as_f64().unwrap_or(0.0),
        a.changes
    );
    println!(
        "  one pod change -> client applied     p50 {:>7.2} ms  p99 {:>7.2} ms  (file write to client, through istiod-lite + TLS, 250 ms poll, {changes} changes)",
        r["change_through_directory_ms"]["p50"].as_f64().unwrap_or(0.0),
        r["change_through_directory_ms"]["p99"].as_f64().unwrap_or(0.0),
    );
    println!(
        "  istiod-lite ready (reads the folder) {:>9.2} ms",
        r["istiod_ready_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  istiod-lite RSS                      {:>9.1} MiB",
        r["istiod_rss_mib"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  ztunnel RSS holding the full state   {:>9.1} MiB",
        r["ztunnel_rss_mib"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}
