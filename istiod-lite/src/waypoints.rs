//! Waypoint provisioning: for every Gateway API `Gateway` of class
//! `istio-waypoint`, istiod-lite creates the waypoint proxy itself — a
//! ServiceAccount, a Deployment and a ClusterIP Service, all named after the
//! Gateway and owned by it — and reports the Gateway's status (address,
//! `Accepted`, `Programmed`, listener status), as Istio's gateway
//! deployment controller does.
//!
//! Off the traffic path: it makes the waypoint exist. ztunnel learns to send
//! traffic through it from the translator (the `istio.io/use-waypoint`
//! label and the Gateway's address), and the waypoint gets its own config
//! over xDS from `XDS_ADDRESS`. Only runs against a Kubernetes API server.
//!
//! Deleting the Gateway deletes the objects through Kubernetes' garbage
//! collector (their `ownerReferences`), so there is no finalizer here.
//! `Programmed` follows Istio: it turns true once the Service has a
//! ClusterIP, not when the Deployment has an available replica.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, Service,
    ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectMeta};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use mesh_core::drain;
use serde::Serialize;
use serde_json::{json, Value};

/// The GatewayClass whose Gateways are waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label carrying the Gateway's name on every generated object (Gateway
/// API's convention; also the Deployment's and Service's selector).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Istio's own spelling of the same label.
pub const ISTIO_GATEWAY_NAME_LABEL: &str = "istio.io/gateway-name";
/// Istio marks what its waypoint controller manages with this label.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// Its value for waypoints.
pub const MANAGED_VALUE: &str = "istio.io-mesh-controller";
/// Default waypoint image.
pub const DEFAULT_IMAGE: &str = "ghcr.io/ambient-mesh/waypoint:0.1.0";
/// HBONE port of the waypoint (its only listener).
pub const HBONE_PORT: i32 = 15008;
/// The listener protocol a waypoint serves.
pub const HBONE_PROTOCOL: &str = "HBONE";
const FIELD_MANAGER: &str = "istiod-lite";
/// How long to wait before looking at a Gateway whose Service has no
/// ClusterIP yet, or whose CRD is not installed.
const RETRY: Duration = Duration::from_secs(2);
const CRD_RETRY: Duration = Duration::from_secs(10);

/// Errors provisioning one waypoint.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    /// The API server refused a write or read.
    #[error("{what} for gateway {namespace}/{name}: {source}")]
    Api {
        /// What was being done.
        what: &'static str,
        /// The Gateway's namespace.
        namespace: String,
        /// The Gateway's name.
        name: String,
        /// Why.
        #[source]
        source: Box<kube::Error>,
    },
    /// The Gateway lacks a name, namespace or uid (never from the API server).
    #[error("gateway without {0}")]
    Incomplete(&'static str),
}

/// What every waypoint gets that does not come from its Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointSettings {
    /// Container image (`WAYPOINT_IMAGE`).
    pub image: String,
    /// Where the waypoint gets xDS and certificates (`WAYPOINT_XDS_ADDRESS`).
    pub xds_address: String,
    /// Trust domain of the mesh.
    pub trust_domain: String,
    /// This cluster's id.
    pub cluster_id: String,
}

/// The parts of a Gateway provisioning needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRef {
    /// Name (also of every generated object).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// uid, for owner references.
    pub uid: String,
    /// `metadata.generation`, for `observedGeneration`.
    pub generation: Option<i64>,
    /// Labels propagated to the generated objects: the Gateway's own and
    /// `spec.infrastructure.labels`, as Istio does.
    pub labels: BTreeMap<String, String>,
}

/// The Gateway API `Gateway` resource (v1), for the dynamic API.
pub fn gateway_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "Gateway",
    ))
}

/// Labels that must not travel from the Gateway to the waypoint's own
/// objects: they would enroll the waypoint in a mesh path it serves.
const NOT_PROPAGATED: [&str; 2] = ["istio.io/use-waypoint", "istio.io/dataplane-mode"];

impl GatewayRef {
    /// Reads what is needed from a Gateway object.
    pub fn from_object(o: &DynamicObject) -> Result<GatewayRef, WaypointError> {
        let mut labels: BTreeMap<String, String> = o.labels().clone();
        if let Some(infra) = o
            .data
            .pointer("/spec/infrastructure/labels")
            .and_then(Value::as_object)
        {
            for (k, v) in infra {
                if let Some(v) = v.as_str() {
                    labels.insert(k.clone(), v.to_string());
                }
            }
        }
        labels.retain(|k, _| !NOT_PROPAGATED.contains(&k.as_str()));
        Ok(GatewayRef {
            name: o
                .metadata
                .name
                .clone()
                .ok_or(WaypointError::Incomplete("name"))?,
            namespace: o
                .metadata
                .namespace
                .clone()
                .ok_or(WaypointError::Incomplete("namespace"))?,
            uid: o
                .metadata
                .uid
                .clone()
                .ok_or(WaypointError::Incomplete("uid"))?,
            generation: o.metadata.generation,
            labels,
        })
    }

    fn owner_reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: "gateway.networking.k8s.io/v1".into(),
            kind: "Gateway".into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: Some(true),
            // Not set: blocking the owner's deletion needs `update` on
            // `gateways/finalizers` where that admission check is on.
            block_owner_deletion: None,
        }
    }

    /// Labels of every generated object.
    fn object_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.insert(GATEWAY_NAME_LABEL.into(), self.name.clone());
        l.insert(ISTIO_GATEWAY_NAME_LABEL.into(), self.name.clone());
        l.insert(MANAGED_LABEL.into(), MANAGED_VALUE.into());
        l
    }

    fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.object_labels()),
            owner_references: Some(vec![self.owner_reference()]),
            ..Default::default()
        }
    }

    fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), self.name.clone())])
    }
}

/// The waypoint's ServiceAccount (its SPIFFE identity is
/// `ns/<namespace>/sa/<gateway name>`, as in Istio).
pub fn service_account(gw: &GatewayRef) -> ServiceAccount {
    ServiceAccount {
        metadata: gw.meta(),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// The waypoint's Deployment: one `istio-proxy` container, mounted like
/// ztunnel's (the `istio-ca` token and the root ConfigMap), never captured
/// itself (`istio.io/dataplane-mode: none`).
pub fn deployment(gw: &GatewayRef, settings: &WaypointSettings) -> Deployment {
    let mut pod_labels = gw.object_labels();
    pod_labels.insert("istio.io/dataplane-mode".into(), "none".into());
    pod_labels.insert("sidecar.istio.io/inject".into(), "false".into());
    pod_labels.insert("service.istio.io/canonical-name".into(), gw.name.clone());
    let root = "/var/run/secrets/istio/root-cert.pem";
    let env = vec![
        value_env("XDS_ADDRESS", &settings.xds_address),
        value_env("CA_ADDRESS", &settings.xds_address),
        value_env("XDS_ROOT_CA", root),
        value_env("CA_ROOT_CA", root),
        value_env("AUTH_TOKEN_PATH", "/var/run/secrets/tokens/istio-token"),
        value_env("TRUST_DOMAIN", &settings.trust_domain),
        value_env("CLUSTER_ID", &settings.cluster_id),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("INSTANCE_IP", "status.podIP"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ];
    let container = Container {
        name: "istio-proxy".into(),
        image: Some(settings.image.clone()),
        env: Some(env),
        ports: Some(vec![
            port("mesh", HBONE_PORT),
            port("metrics", 15020),
            port("status-port", 15021),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(15021),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "istio-token".into(),
                mount_path: "/var/run/secrets/tokens".into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "istiod-ca-cert".into(),
                mount_path: "/var/run/secrets/istio".into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let volumes = vec![
        Volume {
            name: "istio-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "istio-token".into(),
                        audience: Some("istio-ca".into()),
                        expiration_seconds: Some(43200),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "istiod-ca-cert".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: crate::rootcm::ROOT_CONFIGMAP.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    Deployment {
        metadata: gw.meta(),
        spec: Some(DeploymentSpec {
            // Replicas left out: a user (or an HPA) may scale the waypoint
            // without this controller scaling it back.
            selector: LabelSelector {
                match_labels: Some(gw.selector()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(gw.name.clone()),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The waypoint's Service: a ClusterIP on HBONE 15008, the address the
/// Gateway reports and ztunnel sends captured traffic to.
pub fn service(gw: &GatewayRef) -> Service {
    Service {
        metadata: gw.meta(),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(gw.selector()),
            ports: Some(vec![ServicePort {
                name: Some("mesh".into()),
                port: HBONE_PORT,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(HBONE_PORT)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One listener's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerCheck {
    /// The listener's name.
    pub name: String,
    /// Why it is refused, if it is: (reason, message).
    pub refused: Option<(&'static str, String)>,
}

/// Checks the listeners of a waypoint Gateway: a waypoint serves HBONE on
/// 15008 and nothing else.
pub fn check_listeners(spec: &Value) -> Vec<ListenerCheck> {
    let listeners = spec
        .get("listeners")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    listeners
        .iter()
        .map(|l| {
            let name = l.get("name").and_then(Value::as_str).unwrap_or("").to_string();
            let protocol = l.get("protocol").and_then(Value::as_str).unwrap_or("");
            let port = l.get("port").and_then(Value::as_i64).unwrap_or(0);
            let refused = if protocol != HBONE_PROTOCOL {
                Some((
                    "UnsupportedProtocol",
                    format!("listener {name:?}: protocol {protocol:?} is not supported by waypoints (only {HBONE_PROTOCOL} on port {HBONE_PORT})"),
                ))
            } else if port != i64::from(HBONE_PORT) {
                Some((
                    "PortUnavailable",
                    format!("listener {name:?}: {HBONE_PROTOCOL} must be on port {HBONE_PORT}, not {port}"),
                ))
            } else {
                None
            };
            ListenerCheck { name, refused }
        })
        .collect()
}

/// One Gateway API status condition; the transition time is kept from
/// `previous` while the status stays the same.
pub(crate) fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: &[Value],
    now: &str,
) -> Value {
    let status = if ok { "True" } else { "False" };
    // The transition time changes only when the status does.
    let since = previous
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
        .filter(|c| c.get("status").and_then(Value::as_str) == Some(status))
        .and_then(|c| c.get("lastTransitionTime").and_then(Value::as_str))
        .unwrap_or(now);
    let mut c = json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = g.into();
    }
    c
}

fn conditions_of(v: Option<&Value>) -> Vec<Value> {
    v.and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The Gateway's `status`: `addresses`, `conditions` and `listeners`,
/// given the listener checks and the Service's ClusterIP (if assigned).
/// `previous` is the current status, to keep transition times; `now` is
/// an RFC 3339 time.
pub fn gateway_status(
    gw: &GatewayRef,
    checks: &[ListenerCheck],
    cluster_ip: Option<&str>,
    previous: Option<&Value>,
    now: &str,
) -> Value {
    let prev = conditions_of(previous);
    let g = gw.generation;
    let refused: Vec<&str> = checks
        .iter()
        .filter_map(|c| c.refused.as_ref().map(|(_, m)| m.as_str()))
        .collect();
    let accepted = refused.is_empty() && !checks.is_empty();
    let accepted_cond = if accepted {
        condition(
            "Accepted",
            true,
            "Accepted",
            "Resource accepted",
            g,
            &prev,
            now,
        )
    } else if checks.is_empty() {
        condition(
            "Accepted",
            false,
            "ListenersNotValid",
            "no listeners",
            g,
            &prev,
            now,
        )
    } else {
        condition(
            "Accepted",
            false,
            "ListenersNotValid",
            &refused.join("; "),
            g,
            &prev,
            now,
        )
    };
    let host = format!("{}.{}.svc", gw.name, gw.namespace);
    let programmed = match (accepted, cluster_ip) {
        (false, _) => condition(
            "Programmed",
            false,
            "Invalid",
            "Resource not accepted",
            g,
            &prev,
            now,
        ),
        (true, Some(_)) => condition(
            "Programmed",
            true,
            "Programmed",
            &format!("Resource programmed, assigned to service(s) {host}:{HBONE_PORT}"),
            g,
            &prev,
            now,
        ),
        (true, None) => condition(
            "Programmed",
            false,
            "AddressNotAssigned",
            &format!("Service {host} has no cluster IP yet"),
            g,
            &prev,
            now,
        ),
    };
    let prev_listeners = previous
        .and_then(|s| s.get("listeners"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let listeners: Vec<Value> = checks
        .iter()
        .map(|c| {
            let before = prev_listeners
                .iter()
                .find(|l| l.get("name").and_then(Value::as_str) == Some(c.name.as_str()));
            let prev = conditions_of(before);
            let conds = match &c.refused {
                Some((reason, msg)) => vec![
                    condition("Accepted", false, reason, msg, g, &prev, now),
                    condition("Programmed", false, "Invalid", msg, g, &prev, now),
                    condition(
                        "ResolvedRefs",
                        true,
                        "ResolvedRefs",
                        "No errors found",
                        g,
                        &prev,
                        now,
                    ),
                ],
                None => vec![
                    condition(
                        "Accepted",
                        true,
                        "Accepted",
                        "No errors found",
                        g,
                        &prev,
                        now,
                    ),
                    condition(
                        "Programmed",
                        cluster_ip.is_some(),
                        if cluster_ip.is_some() {
                            "Programmed"
                        } else {
                            "Pending"
                        },
                        if cluster_ip.is_some() {
                            "No errors found"
                        } else {
                            "Waiting for the Service's cluster IP"
                        },
                        g,
                        &prev,
                        now,
                    ),
                    condition(
                        "ResolvedRefs",
                        true,
                        "ResolvedRefs",
                        "No errors found",
                        g,
                        &prev,
                        now,
                    ),
                ],
            };
            json!({
                "name": c.name,
                "supportedKinds": [],
                "attachedRoutes": 0,
                "conditions": conds,
            })
        })
        .collect();
    let addresses: Vec<Value> = cluster_ip
        .filter(|_| accepted)
        .map(|ip| vec![json!({"type": "IPAddress", "value": ip})])
        .unwrap_or_default();
    json!({
        "addresses": addresses,
        "conditions": [accepted_cond, programmed],
        "listeners": listeners,
    })
}

/// Whether a Gateway object is a waypoint.
pub fn is_waypoint(o: &DynamicObject) -> bool {
    o.data
        .pointer("/spec/gatewayClassName")
        .and_then(Value::as_str)
        == Some(WAYPOINT_CLASS)
}

/// A server-side apply body for a typed object (apply needs its
/// apiVersion and kind in the body).
fn apply_body<K: Resource<DynamicType = ()> + Serialize>(obj: &K) -> Value {
    let mut body = serde_json::to_value(obj).unwrap_or_default();
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    body
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

struct Ctx {
    client: Client,
    settings: WaypointSettings,
}

async fn apply<K>(
    client: &Client,
    gw: &GatewayRef,
    obj: &K,
    what: &'static str,
) -> Result<K, WaypointError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), &gw.namespace);
    api.patch(
        &gw.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&apply_body(obj)),
    )
    .await
    .map_err(|source| WaypointError::Api {
        what,
        namespace: gw.namespace.clone(),
        name: gw.name.clone(),
        source: Box::new(source),
    })
}

/// Provisions one waypoint and writes its Gateway's status. Returns
/// whether the Service has its ClusterIP (the Gateway is programmed).
pub async fn provision(
    client: &Client,
    settings: &WaypointSettings,
    obj: &DynamicObject,
) -> Result<bool, WaypointError> {
    let gw = GatewayRef::from_object(obj)?;
    let checks = check_listeners(obj.data.get("spec").unwrap_or(&Value::Null));
    let accepted = !checks.is_empty() && checks.iter().all(|c| c.refused.is_none());
    let mut cluster_ip = None;
    if accepted {
        apply(
            client,
            &gw,
            &service_account(&gw),
            "applying the ServiceAccount",
        )
        .await?;
        apply(
            client,
            &gw,
            &deployment(&gw, settings),
            "applying the Deployment",
        )
        .await?;
        let svc = apply(client, &gw, &service(&gw), "applying the Service").await?;
        cluster_ip = svc
            .spec
            .and_then(|s| s.cluster_ip)
            .filter(|ip| !ip.is_empty() && ip != "None");
    }
    let status = gateway_status(
        &gw,
        &checks,
        cluster_ip.as_deref(),
        obj.data.get("status"),
        &now_rfc3339(),
    );
    if obj.data.get("status") != Some(&status) {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &gw.namespace, &gateway_resource());
        let body = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": gw.name, "namespace": gw.namespace},
            "status": status,
        });
        api.patch_status(
            &gw.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| WaypointError::Api {
            what: "writing the status",
            namespace: gw.namespace.clone(),
            name: gw.name.clone(),
            source: Box::new(source),
        })?;
    }
    Ok(cluster_ip.is_some() || !accepted)
}

async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, WaypointError> {
    if !is_waypoint(&obj) || obj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let done = provision(&ctx.client, &ctx.settings, &obj).await?;
    tracing::debug!(gateway = %obj.name_any(), namespace = ?obj.namespace(), done, "waypoint reconciled");
    Ok(if done {
        Action::await_change()
    } else {
        Action::requeue(RETRY)
    })
}

fn error_policy(obj: Arc<DynamicObject>, err: &WaypointError, _: Arc<Ctx>) -> Action {
    tracing::warn!(gateway = %obj.name_any(), error = %err, "waypoint not provisioned; retrying");
    Action::requeue(RETRY * 5)
}

/// Keeps every waypoint Gateway provisioned until drained. While the
/// Gateway API CRDs are missing it checks again every few seconds.
pub async fn run(client: Client, settings: WaypointSettings, drain: drain::Watch) {
    let ar = gateway_resource();
    let gateways: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    loop {
        match gateways.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(e) => tracing::debug!(error = %e, "Gateway API not available yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(CRD_RETRY) => {}
            _ = drain.signaled() => return,
        }
    }
    tracing::info!("provisioning waypoints");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        settings,
    });
    let mut stream = Box::pin(
        Controller::new_with(gateways, watcher::Config::default(), ar)
            .owns(
                Api::<Deployment>::all(client.clone()),
                watcher::Config::default(),
            )
            .owns(Api::<Service>::all(client), watcher::Config::default())
            .run(reconcile, error_policy, ctx),
    );
    loop {
        tokio::select! {
            r = stream.next() => match r {
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "waypoint controller"),
                None => return,
            },
            _ = drain.signaled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(spec: Value, labels: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "bookinfo", "uid": "u-1",
                "generation": 3, "labels": labels},
            "spec": spec,
        }))
        .unwrap()
    }

    fn hbone_spec() -> Value {
        json!({"gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]})
    }

    fn settings() -> WaypointSettings {
        WaypointSettings {
            image: DEFAULT_IMAGE.into(),
            xds_address: "https://istiod.istio-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        }
    }

    fn gw_ref() -> GatewayRef {
        let o = gateway(
            json!({"gatewayClassName": "istio-waypoint", "listeners": [],
                "infrastructure": {"labels": {"team": "a"}}}),
            json!({"istio.io/waypoint-for": "service", "istio.io/use-waypoint": "x"}),
        );
        GatewayRef::from_object(&o).unwrap()
    }

    #[test]
    fn reads_the_gateway() {
        let g = gw_ref();
        assert_eq!(
            (g.name.as_str(), g.namespace.as_str()),
            ("waypoint", "bookinfo")
        );
        assert_eq!(g.generation, Some(3));
        assert_eq!(g.labels["istio.io/waypoint-for"], "service");
        assert_eq!(g.labels["team"], "a");
        assert!(!g.labels.contains_key("istio.io/use-waypoint"));
        assert!(is_waypoint(&gateway(hbone_spec(), json!({}))));
        assert!(!is_waypoint(&gateway(
            json!({"gatewayClassName": "istio", "listeners": []}),
            json!({})
        )));
    }

    /// Every generated object: its name, namespace, labels and owner.
    #[test]
    fn objects_are_named_labelled_and_owned() {
        let g = gw_ref();
        let metas = [
            ("ServiceAccount", service_account(&g).metadata),
            ("Deployment", deployment(&g, &settings()).metadata),
            ("Service", service(&g).metadata),
        ];
        for (kind, m) in metas {
            assert_eq!(m.name.as_deref(), Some("waypoint"), "{kind}");
            assert_eq!(m.namespace.as_deref(), Some("bookinfo"), "{kind}");
            let l = m.labels.unwrap();
            assert_eq!(l[GATEWAY_NAME_LABEL], "waypoint", "{kind}");
            assert_eq!(l[ISTIO_GATEWAY_NAME_LABEL], "waypoint", "{kind}");
            assert_eq!(l[MANAGED_LABEL], MANAGED_VALUE, "{kind}");
            assert!(m.annotations.is_none(), "{kind}");
            let o = &m.owner_references.unwrap()[0];
            assert_eq!(
                (
                    o.api_version.as_str(),
                    o.kind.as_str(),
                    o.name.as_str(),
                    o.uid.as_str()
                ),
                ("gateway.networking.k8s.io/v1", "Gateway", "waypoint", "u-1"),
                "{kind}"
            );
            assert_eq!(o.controller, Some(true), "{kind}");
        }
        let body = apply_body(&service(&g));
        assert_eq!(
            (body["apiVersion"].as_str(), body["kind"].as_str()),
            (Some("v1"), Some("Service"))
        );
    }

    #[test]
    fn deployment_shape() {
        let g = gw_ref();
        let d = deployment(&g, &settings());
        let spec = d.spec.unwrap();
        assert!(spec.replicas.is_none());
        assert_eq!(
            spec.selector.match_labels.unwrap(),
            BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), "waypoint".to_string())])
        );
        let tpl_labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(tpl_labels["istio.io/dataplane-mode"], "none");
        assert_eq!(tpl_labels[GATEWAY_NAME_LABEL], "waypoint");
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
        assert_eq!(pod.containers.len(), 1);
        let c = &pod.containers[0];
        assert_eq!(c.name, "istio-proxy");
        assert_eq!(c.image.as_deref(), Some(DEFAULT_IMAGE));
        assert!(c.args.is_none() && c.command.is_none());
        let ports: Vec<(Option<&str>, i32)> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("mesh"), 15008),
                (Some("metrics"), 15020),
                (Some("status-port"), 15021)
            ]
        );
        let probe = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(probe.port, IntOrString::Int(15021));
        let env: BTreeMap<&str, &EnvVar> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e))
            .collect();
        assert_eq!(
            env["XDS_ADDRESS"].value.as_deref(),
            Some("https://istiod.istio-system.svc:15012")
        );
        for (name, path) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("INSTANCE_IP", "status.podIP"),
            ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ] {
            let f = env[name]
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap();
            assert_eq!(f.field_path, path, "{name}");
        }
        let mounts: Vec<(&str, &str)> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("istio-token", "/var/run/secrets/tokens"),
                ("istiod-ca-cert", "/var/run/secrets/istio")
            ]
        );
        let vols = pod.volumes.unwrap();
        let token = vols[0]
            .projected
            .as_ref()
            .unwrap()
            .sources
            .as_ref()
            .unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(
            (token.path.as_str(), token.audience.as_deref()),
            ("istio-token", Some("istio-ca"))
        );
        assert_eq!(
            vols[1].config_map.as_ref().unwrap().name,
            "istio-ca-root-cert"
        );
    }

    #[test]
    fn service_shape() {
        let s = service(&gw_ref()).spec.unwrap();
        assert_eq!(s.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(s.selector.unwrap()[GATEWAY_NAME_LABEL], "waypoint");
        let p = &s.ports.unwrap()[0];
        assert_eq!((p.name.as_deref(), p.port), (Some("mesh"), 15008));
    }

    #[test]
    fn listener_checks() {
        let ok = check_listeners(&hbone_spec());
        assert_eq!(
            ok,
            [ListenerCheck {
                name: "mesh".into(),
                refused: None
            }]
        );
        let bad = check_listeners(&json!({"listeners": [
            {"name": "http", "port": 80, "protocol": "HTTP"},
            {"name": "mesh", "port": 15009, "protocol": "HBONE"},
        ]}));
        assert_eq!(bad[0].refused.as_ref().unwrap().0, "UnsupportedProtocol");
        assert_eq!(bad[1].refused.as_ref().unwrap().0, "PortUnavailable");
    }

    fn cond<'a>(s: &'a Value, t: &str) -> &'a Value {
        s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap()
    }

    #[test]
    fn status_follows_the_service_address() {
        let g = gw_ref();
        let checks = check_listeners(&hbone_spec());
        let t0 = "2026-01-01T00:00:00Z";
        let pending = gateway_status(&g, &checks, None, None, t0);
        assert_eq!(cond(&pending, "Accepted")["status"], "True");
        assert_eq!(cond(&pending, "Accepted")["observedGeneration"], 3);
        assert_eq!(cond(&pending, "Programmed")["status"], "False");
        assert_eq!(cond(&pending, "Programmed")["reason"], "AddressNotAssigned");
        assert_eq!(pending["addresses"], json!([]));
        let t1 = "2026-01-01T00:00:05Z";
        let done = gateway_status(&g, &checks, Some("10.96.0.20"), Some(&pending), t1);
        assert_eq!(
            done["addresses"],
            json!([{"type": "IPAddress", "value": "10.96.0.20"}])
        );
        assert_eq!(cond(&done, "Programmed")["status"], "True");
        assert_eq!(cond(&done, "Programmed")["reason"], "Programmed");
        assert_eq!(cond(&done, "Programmed")["lastTransitionTime"], t1);
        // Unchanged conditions keep their transition time.
        assert_eq!(cond(&done, "Accepted")["lastTransitionTime"], t0);
        let l = &done["listeners"][0];
        assert_eq!(l["name"], "mesh");
        assert_eq!(l["attachedRoutes"], 0);
        assert_eq!(cond(l, "Programmed")["status"], "True");
        // The same inputs give the same status: no write loop.
        let again = gateway_status(
            &g,
            &checks,
            Some("10.96.0.20"),
            Some(&done),
            "2026-01-02T00:00:00Z",
        );
        assert_eq!(again, done);
    }

    #[test]
    fn invalid_listeners_are_not_accepted() {
        let g = gw_ref();
        let checks = check_listeners(
            &json!({"listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}),
        );
        let s = gateway_status(&g, &checks, None, None, "2026-01-01T00:00:00Z");
        let a = cond(&s, "Accepted");
        assert_eq!(
            (a["status"].as_str(), a["reason"].as_str()),
            (Some("False"), Some("ListenersNotValid"))
        );
        assert!(a["message"].as_str().unwrap().contains("\"HTTP\""), "{a}");
        assert_eq!(cond(&s, "Programmed")["status"], "False");
        assert_eq!(
            cond(&s["listeners"][0], "Accepted")["reason"],
            "UnsupportedProtocol"
        );
    }
}
