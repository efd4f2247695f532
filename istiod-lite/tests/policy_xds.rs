//! Security policies from the config folder reach a real delta xDS client:
//! an AuthorizationPolicy file becomes an `istio.security.Authorization`
//! resource and shows up in the selected workload's
//! `authorization_policies`; editing and deleting the file updates and
//! withdraws both, over the same stream as the Workload API.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use istiod_lite::dirsource::DirSource;
use istiod_lite::push::{self, SharedTranslator};
use istiod_lite::translate::{MeshConfig, Translator};
use mesh_core::proto::security::{Action, Authorization, Scope};
use mesh_core::proto::workload::{address, Address, Workload};
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_core::xds::client::{ClientConfig, Handler, Subscription, Upsert, XdsClient};
use mesh_core::xds::server::{ResourceStore, XdsServer};
use prost::Message;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};

const WAIT: Duration = Duration::from_secs(15);
const UID: &str = "Kubernetes//Pod/demo/web-1";
const STRICT: &str = "istio-system/istio_converted_static_strict";

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: demo
  labels:
    app: web
spec:
  nodeName: node1
  serviceAccountName: web
  containers:
  - name: app
status:
  phase: Running
  podIP: 10.244.1.5
  conditions:
  - type: Ready
    status: "True"
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"#;

fn policy(app: &str) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-web
  namespace: demo
spec:
  selector:
    matchLabels:
      app: {app}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/curl"]
    to:
    - operation:
        ports: ["8080"]
"#
    )
}

/// What the client holds, decoded.
#[derive(Default)]
struct View {
    workloads: Mutex<HashMap<String, Workload>>,
    policies: Mutex<HashMap<String, Authorization>>,
}

impl Handler for View {
    fn apply(
        &self,
        type_url: &str,
        upserts: Vec<Upsert>,
        removes: Vec<String>,
    ) -> Result<(), String> {
        match type_url {
            ADDRESS_TYPE_URL => {
                let mut w = self.workloads.lock().map_err(|e| e.to_string())?;
                for (name, _, any) in upserts {
                    let a = Address::decode(any.value.as_ref()).map_err(|e| e.to_string())?;
                    if let Some(address::Type::Workload(wl)) = a.r#type {
                        w.insert(name, wl);
                    }
                }
                for n in removes {
                    w.remove(&n);
                }
            }
            AUTHORIZATION_TYPE_URL => {
                let mut p = self.policies.lock().map_err(|e| e.to_string())?;
                for (name, _, any) in upserts {
                    let a = Authorization::decode(any.value.as_ref()).map_err(|e| e.to_string())?;
                    if format!("{}/{}", a.namespace, a.name) != name {
                        return Err(format!("{name} carries {}/{}", a.namespace, a.name));
                    }
                    p.insert(name, a);
                }
                for n in removes {
                    p.remove(&n);
                }
            }
            other => return Err(format!("unexpected type {other}")),
        }
        Ok(())
    }
}

impl View {
    fn listed(&self) -> Option<Vec<String>> {
        let w = self.workloads.lock().ok()?;
        w.get(UID).map(|w| w.authorization_policies.clone())
    }

    fn policy(&self, name: &str) -> Option<Authorization> {
        self.policies.lock().ok()?.get(name).cloned()
    }

    async fn until(&self, what: &str, f: impl Fn(&View) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !f(self) {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; workload lists {:?}, policies {:?}",
                    self.listed(),
                    self.policies
                        .lock()
                        .map(|p| p.keys().cloned().collect::<Vec<_>>())
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    Ok(std::fs::write(dir.join(name), text)?)
}

#[tokio::test]
async fn policies_from_files_reach_the_xds_client() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write(tmp.path(), "00-cluster.yaml", CLUSTER)?;
    write(tmp.path(), "10-policy.yaml", &policy("web"))?;

    let (trigger, drain) = mesh_core::drain::new();
    let store = ResourceStore::new();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (_flush_tx, flush_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(DirSource::new(tmp.path().to_path_buf()).run(tx, drain.clone()));
    tokio::spawn(push::run(
        rx,
        flush_rx,
        SharedTranslator::new(Translator::new(MeshConfig::default())),
        store.clone(),
        drain.clone(),
    ));

    let incoming = TcpIncoming::bind("127.0.0.1:0".parse()?)?;
    let addr = incoming.local_addr()?;
    let svc = XdsServer::new(store).into_service();
    tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
    let mut cfg =
        ClientConfig::new("ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local")
            .subscribe(ADDRESS_TYPE_URL, Subscription::wildcard())
            .subscribe(AUTHORIZATION_TYPE_URL, Subscription::wildcard());
    cfg.backoff_initial = Duration::from_millis(20);
    let view = Arc::new(View::default());
    let client = XdsClient::new(channel, cfg, view.clone());
    let client_task = tokio::spawn(client.run());

    // The policy arrives, and the workload names it next to the mesh-wide
    // STRICT PeerAuthentication's policy.
    view.until("the policy and the workload naming it", |v| {
        v.policy("demo/allow-web").is_some()
            && v.listed() == Some(vec!["demo/allow-web".into(), STRICT.into()])
    })
    .await?;
    let p = view.policy("demo/allow-web").unwrap();
    assert_eq!(p.scope, Scope::WorkloadSelector as i32);
    assert_eq!(p.action, Action::Allow as i32);
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].clauses.len(), 2);
    assert_eq!(p.rules[0].clauses[1].matches[0].destination_ports, [8080]);
    let strict = view.policy(STRICT).expect("the shared STRICT policy");
    assert_eq!(strict.action, Action::Deny as i32);

    // The selector moves away from the pod: the workload stops naming it.
    write(tmp.path(), "10-policy.yaml", &policy("other"))?;
    view.until("the workload to drop the policy", |v| {
        v.listed() == Some(vec![STRICT.into()]) && v.policy("demo/allow-web").is_some()
    })
    .await?;

    // Back, then the file is deleted: the resource is removed too.
    write(tmp.path(), "10-policy.yaml", &policy("web"))?;
    view.until("the workload to name it again", |v| {
        v.listed() == Some(vec!["demo/allow-web".into(), STRICT.into()])
    })
    .await?;
    std::fs::remove_file(tmp.path().join("10-policy.yaml"))?;
    view.until("the policy to be removed", |v| {
        v.policy("demo/allow-web").is_none() && v.listed() == Some(vec![STRICT.into()])
    })
    .await?;

    client_task.abort();
    drop(drain);
    trigger.drain(WAIT).await;
    Ok(())
}
