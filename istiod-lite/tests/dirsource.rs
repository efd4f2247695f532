//! A folder of manifests drives the translator: initial load, edits, broken
//! files and deletions, through `scan` and through the polling `run` loop.

use std::path::Path;
use std::time::Duration;

use istiod_lite::dirsource::{DirError, DirSource};
use istiod_lite::translate::{Event, MeshConfig, Translator};
use mesh_core::proto::workload::{address, TunnelProtocol, Workload};

const NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
"#;

fn pod(name: &str, ip: &str, extra_label: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  labels:
    app: web
    {extra_label}
spec:
  nodeName: node1
  serviceAccountName: web
  containers:
  - name: app
    ports:
    - name: http
      containerPort: 8080
status:
  phase: Running
  podIP: {ip}
  conditions:
  - type: Ready
    status: "True"
"#
    )
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  clusterIP: 10.96.0.20
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: http
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: web
  namespace: demo
spec: {}
"#;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn workload<'a>(t: &'a Translator, name: &str) -> Option<&'a Workload> {
    match &t
        .resources()
        .get(&format!("Kubernetes//Pod/demo/{name}"))?
        .r#type
    {
        Some(address::Type::Workload(w)) => Some(w),
        _ => None,
    }
}

fn feed(t: &mut Translator, events: Vec<Event>) -> istiod_lite::translate::Changes {
    for e in events {
        t.apply(e);
    }
    t.take_changes()
}

#[test]
fn folder_edits_become_deltas() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write(dir, "00-namespace.yaml", NAMESPACE);
    let pods = format!(
        "{}---{}",
        pod("web-1", "10.244.1.5", ""),
        pod("web-2", "10.244.1.6", "")
    );
    write(dir, "10-pods.yaml", &pods);
    write(dir, "20-service.yml", SERVICE);
    write(dir, "README.md", "not a manifest");

    let mut src = DirSource::new(dir.to_path_buf());
    let mut t = Translator::new(MeshConfig::default());
    let c = feed(&mut t, src.scan()?);
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    let names: Vec<&str> = c.upserts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Kubernetes//Pod/demo/web-1",
            "Kubernetes//Pod/demo/web-2",
            "demo/web.demo.svc.cluster.local"
        ]
    );
    let w = workload(&t, "web-1").unwrap();
    assert_eq!(w.tunnel_protocol, TunnelProtocol::Hbone as i32);
    assert_eq!(w.addresses, [vec![10, 244, 1, 5]]);
    let ports = &w.services["demo/web.demo.svc.cluster.local"].ports;
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));

    // Nothing changed on disk: nothing to report.
    assert!(src.scan()?.is_empty());

    // web-2 opts out of the mesh.
    let pods = format!(
        "{}---{}",
        pod("web-1", "10.244.1.5", ""),
        pod("web-2", "10.244.1.6", "istio.io/dataplane-mode: none")
    );
    write(dir, "10-pods.yaml", &pods);
    let events = src.scan()?;
    assert_eq!(events.len(), 1, "only web-2 changed");
    let c = feed(&mut t, events);
    assert_eq!(c.upserts.len(), 1);
    assert_eq!(c.upserts[0].0, "Kubernetes//Pod/demo/web-2");
    assert_eq!(
        workload(&t, "web-2").unwrap().tunnel_protocol,
        TunnelProtocol::None as i32
    );

    // A broken edit keeps what the file held and says where it broke.
    write(
        dir,
        "10-pods.yaml",
        &format!("{}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web-3\n  namespace: demo\nspec:\n  containers: 7\n", pod("web-1", "10.244.1.5", "")),
    );
    assert!(src.scan()?.is_empty());
    assert!(workload(&t, "web-2").is_some());
    let [err] = src.errors() else {
        panic!("{:?}", src.errors())
    };
    assert!(err.path().ends_with("10-pods.yaml"));
    let msg = err.full_message();
    assert!(msg.contains("10-pods.yaml"), "{msg}");
    assert!(msg.contains("document 2"), "{msg}");
    assert!(msg.contains("spec.containers"), "{msg}");
    assert!(matches!(err, DirError::Field { .. }));
    // Still broken on the next poll: still kept, still reported.
    assert!(src.scan()?.is_empty());
    assert_eq!(src.errors().len(), 1);

    // Fixed, with web-2 gone from the file: web-2 is deleted.
    write(dir, "10-pods.yaml", &pod("web-1", "10.244.1.5", ""));
    let c = feed(&mut t, src.scan()?);
    assert!(src.errors().is_empty());
    assert!(c.upserts.is_empty());
    assert_eq!(c.removes, ["Kubernetes//Pod/demo/web-2"]);

    // Removing the service file deletes the service and the endpoint entry.
    std::fs::remove_file(dir.join("20-service.yml"))?;
    let events = src.scan()?;
    assert!(matches!(
        events.as_slice(),
        [Event::ServiceDeleted { namespace, name }] if namespace == "demo" && name == "web"
    ));
    let c = feed(&mut t, events);
    assert_eq!(c.removes, ["demo/web.demo.svc.cluster.local"]);
    assert!(workload(&t, "web-1").unwrap().services.is_empty());

    // Removing the namespace file un-enrolls the pod.
    std::fs::remove_file(dir.join("00-namespace.yaml"))?;
    let c = feed(&mut t, src.scan()?);
    assert_eq!(c.upserts.len(), 1);
    assert_eq!(
        workload(&t, "web-1").unwrap().tunnel_protocol,
        TunnelProtocol::None as i32
    );
    Ok(())
}

#[test]
fn a_file_broken_from_the_start_loads_nothing_but_others_do() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    write(tmp.path(), "a.yaml", "kind: Pod\nmetadata: {name: x}\n");
    write(
        tmp.path(),
        "b.json",
        r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}}"#,
    );
    let mut src = DirSource::new(tmp.path().to_path_buf());
    let events = src.scan()?;
    assert!(matches!(events.as_slice(), [Event::Namespace(_)]));
    let [err] = src.errors() else {
        panic!("{:?}", src.errors())
    };
    assert!(matches!(err, DirError::MissingKind { .. }));
    assert!(err.full_message().contains("a.yaml"));
    Ok(())
}

#[test]
fn missing_folder_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut src = DirSource::new(tmp.path().join("absent"));
    assert!(matches!(src.scan(), Err(DirError::ReadDir { .. })));
}

#[tokio::test]
async fn run_polls_until_drained() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    write(tmp.path(), "ns.yaml", NAMESPACE);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (trigger, watch) = mesh_core::drain::new();
    let task = tokio::spawn(DirSource::new(tmp.path().to_path_buf()).run(tx, watch));
    let wait = Duration::from_secs(10);

    let first = tokio::time::timeout(wait, rx.recv()).await?.unwrap();
    assert!(matches!(first.as_slice(), [Event::Namespace(_)]));

    write(tmp.path(), "pod.yaml", &pod("web-1", "10.244.1.5", ""));
    let second = tokio::time::timeout(wait, rx.recv()).await?.unwrap();
    assert!(matches!(second.as_slice(), [Event::Pod(_)]));

    trigger.drain(wait).await;
    tokio::time::timeout(wait, task).await??;
    // The loop dropped its sender when it stopped.
    assert!(rx.recv().await.is_none());
    Ok(())
}
