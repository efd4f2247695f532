//! HTTPRoute status against a real API server: a v1.20 control plane of
//! its own (scripts/kube-up.sh), the Gateway API CRDs from
//! manifests/crds/gateway-api.yaml, and the status writer running
//! in-process. A route attached to a Service is Accepted; its ResolvedRefs
//! names a missing backend until that Service is created; a route whose
//! parent Service does not exist is not accepted; and an unchanged route is
//! not rewritten.
//!
//! Skipped (passes with a note) when not root or when the cached Kubernetes
//! binaries are missing.

use std::time::Duration;

use anyhow::{Context, Result};
use istiod_lite::routestatus;
use istiod_lite::translate::MeshConfig;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DynamicObject, PostParams};
use kube::Api;
use serde_json::{json, Value};

mod common;

use common::{create_namespace, eventually, install_crds, skip_reason, Cluster};

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "bookinfo"},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 9080}]},
    }))
    .expect("service object")
}

fn route(name: &str, parent: &str, backends: &[&str]) -> DynamicObject {
    let refs: Vec<Value> = backends
        .iter()
        .map(|b| json!({"name": b, "port": 9080}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "bookinfo"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 9080}],
            "rules": [{"backendRefs": refs}],
        },
    }))
    .expect("route object")
}

/// Our condition `type_` of the first parent, when written.
fn condition(r: &DynamicObject, type_: &str) -> Option<Value> {
    r.data
        .pointer("/status/parents/0/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_route_status_on_a_real_api_server() -> Result<()> {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let cluster = Cluster::start("httproute")?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    create_namespace(&client, "bookinfo").await?;
    let svcs = Api::<Service>::namespaced(client.clone(), "bookinfo");
    for s in ["reviews", "reviews-v1"] {
        svcs.create(&PostParams::default(), &service(s)).await?;
    }

    let (trigger, watch) = mesh_core::drain::new();
    let writer = tokio::spawn(routestatus::run(
        client.clone(),
        MeshConfig::default(),
        watch,
    ));

    let routes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "bookinfo",
        &routestatus::http_route_resource(),
    );
    let created = routes
        .create(
            &PostParams::default(),
            &route("reviews", "reviews", &["reviews-v1", "reviews-v2"]),
        )
        .await?;

    // Accepted, with the missing backend named.
    let r = eventually("Accepted=True, ResolvedRefs=False", || {
        let routes = routes.clone();
        async move {
            let r = routes.get("reviews").await.ok()?;
            let a = condition(&r, "Accepted")?;
            let rr = condition(&r, "ResolvedRefs")?;
            (a["status"] == "True" && rr["status"] == "False").then_some(r)
        }
    })
    .await?;
    let parent = &r.data["status"]["parents"][0];
    assert_eq!(parent["controllerName"], "istio.io/gateway-controller");
    assert_eq!(parent["parentRef"]["name"], "reviews");
    let a = condition(&r, "Accepted").context("Accepted")?;
    assert_eq!(a["reason"], "Accepted");
    assert_eq!(a["observedGeneration"], json!(created.metadata.generation));
    let rr = condition(&r, "ResolvedRefs").context("ResolvedRefs")?;
    assert_eq!(rr["reason"], "BackendNotFound");
    assert!(
        rr["message"]
            .as_str()
            .unwrap_or("")
            .contains("Service bookinfo/reviews-v2"),
        "{rr}"
    );

    // The backend appears: ResolvedRefs turns True; Accepted keeps its time.
    svcs.create(&PostParams::default(), &service("reviews-v2"))
        .await?;
    let r = eventually("ResolvedRefs=True", || {
        let routes = routes.clone();
        async move {
            let r = routes.get("reviews").await.ok()?;
            (condition(&r, "ResolvedRefs")?["status"] == "True").then_some(r)
        }
    })
    .await?;
    assert_eq!(
        condition(&r, "ResolvedRefs").context("ResolvedRefs")?["reason"],
        "ResolvedRefs"
    );
    assert_eq!(
        condition(&r, "Accepted").context("Accepted")?["lastTransitionTime"],
        a["lastTransitionTime"]
    );

    // Nothing changes: nothing is written (the resourceVersion holds),
    // even when an unrelated Service makes every route be looked at again.
    let version = r.metadata.resource_version.clone();
    svcs.create(&PostParams::default(), &service("unrelated"))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = routes.get("reviews").await?;
    assert_eq!(again.metadata.resource_version, version, "status rewritten");

    // A parent Service that does not exist.
    routes
        .create(
            &PostParams::default(),
            &route("orphan", "nope", &["reviews-v1"]),
        )
        .await?;
    let a = eventually("Accepted=False", || {
        let routes = routes.clone();
        async move {
            let r = routes.get("orphan").await.ok()?;
            let a = condition(&r, "Accepted")?;
            (a["status"] == "False").then_some(a)
        }
    })
    .await?;
    assert_eq!(a["reason"], "NoMatchingParent");

    let _ = trigger.drain(Duration::from_secs(2)).await;
    writer.abort();
    drop(cluster);
    Ok(())
}
