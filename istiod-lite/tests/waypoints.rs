//! Waypoint provisioning against a real API server: a v1.20 control plane
//! of its own (scripts/kube-up.sh), the Gateway API CRDs from
//! manifests/crds/gateway-api.yaml, and the controller running in-process.
//! A waypoint Gateway gets its ServiceAccount, Deployment and Service, owned
//! by it, and turns Programmed with the Service's ClusterIP as its address;
//! an invalid one is not accepted; deleting the Gateway lets the garbage
//! collector remove what it owned.
//!
//! Skipped (passes with a note) when not root or when the cached Kubernetes
//! binaries are missing. No kubelet runs, so the Deployment never becomes
//! available; Programmed does not depend on it.

use std::time::Duration;

use anyhow::{Context, Result};
use istiod_lite::waypoints::{self, WaypointSettings, GATEWAY_NAME_LABEL};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::Api;
use serde_json::{json, Value};

mod common;

use common::{create_namespace, eventually, eventually_within, install_crds, skip_reason, Cluster};

fn gateway(name: &str, protocol: &str, port: u16) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "bookinfo",
            "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": port, "protocol": protocol}]},
    }))
    .expect("gateway object")
}

fn condition(gw: &DynamicObject, type_: &str) -> Option<Value> {
    gw.data
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_waypoints_on_a_real_api_server() -> Result<()> {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let cluster = Cluster::start("waypoints")?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    create_namespace(&client, "bookinfo").await?;

    let (trigger, watch) = mesh_core::drain::new();
    let settings = WaypointSettings {
        image: waypoints::DEFAULT_IMAGE.into(),
        xds_address: "https://istiod.istio-system.svc:15012".into(),
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    };
    let controller = tokio::spawn(waypoints::run(client.clone(), settings, watch));

    let gws: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "bookinfo", &waypoints::gateway_resource());
    let created = gws
        .create(&PostParams::default(), &gateway("waypoint", "HBONE", 15008))
        .await?;
    let uid = created.metadata.uid.clone().context("uid")?;

    // Programmed, with the Service's ClusterIP as the address.
    let programmed = eventually("Programmed=True", || {
        let gws = gws.clone();
        async move {
            let g = gws.get("waypoint").await.ok()?;
            (condition(&g, "Programmed")?["status"] == "True").then_some(g)
        }
    })
    .await?;
    let svc = Api::<Service>::namespaced(client.clone(), "bookinfo")
        .get("waypoint")
        .await?;
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .context("cluster IP")?;
    assert_eq!(
        programmed.data["status"]["addresses"],
        json!([{"type": "IPAddress", "value": ip}])
    );
    let accepted = condition(&programmed, "Accepted").context("Accepted")?;
    assert_eq!(accepted["status"], "True");
    assert_eq!(
        accepted["observedGeneration"],
        json!(created.metadata.generation)
    );
    assert_eq!(programmed.data["status"]["listeners"][0]["name"], "mesh");

    // The three objects exist, labelled and owned by the Gateway.
    let dep = Api::<Deployment>::namespaced(client.clone(), "bookinfo")
        .get("waypoint")
        .await?;
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), "bookinfo")
        .get("waypoint")
        .await?;
    for (kind, meta) in [
        ("Deployment", &dep.metadata),
        ("Service", &svc.metadata),
        ("ServiceAccount", &sa.metadata),
    ] {
        let owner = &meta.owner_references.as_ref().context("owner")?[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("Gateway", uid.as_str(), Some(true)),
            "{kind}"
        );
        assert_eq!(
            meta.labels.as_ref().context("labels")?[GATEWAY_NAME_LABEL],
            "waypoint",
            "{kind}"
        );
        let managers: Vec<_> = meta
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|m| m.manager.as_deref())
            .collect();
        assert!(managers.contains(&"istiod-lite"), "{kind}: {managers:?}");
    }
    let pod = dep.spec.context("spec")?.template;
    assert_eq!(
        pod.metadata.context("template")?.labels.context("labels")?["istio.io/dataplane-mode"],
        "none"
    );

    // A listener a waypoint cannot serve: not accepted, nothing provisioned.
    gws.create(&PostParams::default(), &gateway("broken", "HTTP", 80))
        .await?;
    let refused = eventually("Accepted=False", || {
        let gws = gws.clone();
        async move {
            let g = gws.get("broken").await.ok()?;
            let c = condition(&g, "Accepted")?;
            (c["status"] == "False").then_some(c)
        }
    })
    .await?;
    assert_eq!(refused["reason"], "ListenersNotValid");
    assert!(
        refused["message"].as_str().unwrap_or("").contains("HTTP"),
        "{refused}"
    );
    assert!(Api::<Deployment>::namespaced(client.clone(), "bookinfo")
        .get_opt("broken")
        .await?
        .is_none());

    // Deleting the Gateway: the garbage collector removes what it owned.
    gws.delete("waypoint", &DeleteParams::default()).await?;
    let t = std::time::Instant::now();
    eventually_within(
        "the Service garbage-collected",
        Duration::from_secs(120),
        || {
            let api = Api::<Service>::namespaced(client.clone(), "bookinfo");
            async move {
                match api.get_opt("waypoint").await {
                    Ok(None) => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await?;
    eprintln!("garbage-collected after {:?}", t.elapsed());

    let _ = trigger.drain(Duration::from_secs(2)).await;
    controller.abort();
    drop(cluster);
    Ok(())
}
