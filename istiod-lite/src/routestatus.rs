//! HTTPRoute status: for every `parentRefs` entry a Service or waypoint
//! Gateway, istiod-lite writes `status.parents[]` with `Accepted` and
//! `ResolvedRefs`, as Istio's gateway controller does for mesh routes.
//!
//! Off the traffic path: what waypoints do comes from the translator
//! (`translate/httproute.rs`); this tells the route's author whether it
//! attached and whether its backends exist. Only runs against a Kubernetes
//! API server. Entries of other controllers (parents that are Gateways of
//! another class) are kept as they are. The status is written only when it
//! differs from what is there, and a condition's `lastTransitionTime`
//! changes only with its status, so an unchanged route costs no write.
//! Routes are looked at again when any Service or Gateway changes (a
//! parent or a backend may have appeared) and every [`RECHECK`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use mesh_core::drain;
use serde_json::{json, Value};

use crate::translate::httproute::{
    backend_refs, parents, validate_http_route, ParentKind, CONTROLLER_NAME,
};
use crate::translate::{MeshConfig, PolicyObject};
use crate::waypoints::{condition, WAYPOINT_CLASS};

const FIELD_MANAGER: &str = "istiod-lite";
/// How often every route is looked at again (a safety net for missed
/// watch events).
const RECHECK: Duration = Duration::from_secs(30);
const CRD_RETRY: Duration = Duration::from_secs(10);

/// Errors writing one route's status.
#[derive(Debug, thiserror::Error)]
pub enum RouteStatusError {
    /// The API server refused a read or the write.
    #[error("{what} for HTTPRoute {namespace}/{name}: {source}")]
    Api {
        /// What was being done.
        what: &'static str,
        /// The route's namespace.
        namespace: String,
        /// The route's name.
        name: String,
        /// Why.
        #[source]
        source: Box<kube::Error>,
    },
}

/// The Gateway API `HTTPRoute` resource (v1), for the dynamic API.
pub fn http_route_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
    ))
}

/// What is known about a Gateway a route names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayState {
    /// No such Gateway.
    Missing,
    /// A waypoint (class `istio-waypoint`): ours to report on.
    Waypoint,
    /// Another class: another controller's business.
    Other,
}

/// What the status depends on besides the route itself.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// Services that exist, by (namespace, name).
    pub services: BTreeMap<(String, String), bool>,
    /// Gateways named by the route, by (namespace, name).
    pub gateways: BTreeMap<(String, String), GatewayState>,
}

/// The route's `status`, given what exists. `previous` is the current
/// status (its transition times and other controllers' entries are kept);
/// `now` is an RFC 3339 time.
pub fn route_status(
    route: &PolicyObject,
    generation: Option<i64>,
    world: &World,
    cfg: &MeshConfig,
    previous: Option<&Value>,
    now: &str,
) -> Value {
    let prev_parents: Vec<Value> = previous
        .and_then(|s| s.get("parents"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out: Vec<Value> = prev_parents
        .iter()
        .filter(|p| p.get("controllerName").and_then(Value::as_str) != Some(CONTROLLER_NAME))
        .cloned()
        .collect();
    let mut ignored = Vec::new();
    let parents = parents(&route.spec, &route.namespace, &mut ignored).unwrap_or_default();
    let invalid = validate_http_route(route, cfg).err().map(|e| e.to_string());
    let backends = backend_refs(&route.spec, &route.namespace, cfg);
    let mut unresolved = Vec::new();
    let mut bad_kind = Vec::new();
    for b in &backends {
        match &b.service {
            None => bad_kind.push(b.label.clone()),
            Some(k) if !world.services.get(k).copied().unwrap_or(false) => {
                unresolved.push(b.label.clone())
            }
            Some(_) => {}
        }
    }
    for p in &parents {
        let missing = match p.kind {
            ParentKind::Service => !world.services.get(&p.key).copied().unwrap_or(false),
            ParentKind::Gateway => match world.gateways.get(&p.key) {
                Some(GatewayState::Waypoint) => false,
                Some(GatewayState::Other) => continue,
                Some(GatewayState::Missing) | None => true,
            },
        };
        let before = prev_parents.iter().find(|e| {
            e.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME)
                && e.get("parentRef") == Some(&p.raw)
        });
        let prev: Vec<Value> = before
            .and_then(|e| e.get("conditions"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let kind = match p.kind {
            ParentKind::Service => "Service",
            ParentKind::Gateway => "Gateway",
        };
        let accepted = match (&invalid, missing) {
            (Some(e), _) => condition(
                "Accepted",
                false,
                "UnsupportedValue",
                e,
                generation,
                &prev,
                now,
            ),
            (None, true) => condition(
                "Accepted",
                false,
                "NoMatchingParent",
                &format!("{kind} {}/{} not found", p.key.0, p.key.1),
                generation,
                &prev,
                now,
            ),
            (None, false) => condition(
                "Accepted",
                true,
                "Accepted",
                "Route was valid",
                generation,
                &prev,
                now,
            ),
        };
        let resolved = if !bad_kind.is_empty() {
            condition(
                "ResolvedRefs",
                false,
                "InvalidKind",
                &format!("unsupported backend kind: {}", bad_kind.join(", ")),
                generation,
                &prev,
                now,
            )
        } else if !unresolved.is_empty() {
            condition(
                "ResolvedRefs",
                false,
                "BackendNotFound",
                &format!("backend not found: {}", unresolved.join(", ")),
                generation,
                &prev,
                now,
            )
        } else {
            condition(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "All references resolved",
                generation,
                &prev,
                now,
            )
        };
        out.push(json!({
            "parentRef": p.raw,
            "controllerName": CONTROLLER_NAME,
            "conditions": [accepted, resolved],
        }));
    }
    let mut status = previous.cloned().unwrap_or_else(|| json!({}));
    if !status.is_object() {
        status = json!({});
    }
    status["parents"] = Value::Array(out);
    status
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

struct Ctx {
    client: Client,
    cfg: MeshConfig,
}

/// Looks up the Services and Gateways a route refers to.
async fn world_of(
    client: &Client,
    route: &PolicyObject,
    cfg: &MeshConfig,
) -> Result<World, kube::Error> {
    let mut world = World::default();
    let mut ignored = Vec::new();
    let parents = parents(&route.spec, &route.namespace, &mut ignored).unwrap_or_default();
    let mut services: Vec<(String, String)> = backend_refs(&route.spec, &route.namespace, cfg)
        .into_iter()
        .filter_map(|b| b.service)
        .collect();
    let gw_ar = crate::waypoints::gateway_resource();
    for p in &parents {
        match p.kind {
            ParentKind::Service => services.push(p.key.clone()),
            ParentKind::Gateway => {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), &p.key.0, &gw_ar);
                let state = match api.get_opt(&p.key.1).await? {
                    None => GatewayState::Missing,
                    Some(g)
                        if g.data
                            .pointer("/spec/gatewayClassName")
                            .and_then(Value::as_str)
                            == Some(WAYPOINT_CLASS) =>
                    {
                        GatewayState::Waypoint
                    }
                    Some(_) => GatewayState::Other,
                };
                world.gateways.insert(p.key.clone(), state);
            }
        }
    }
    for key in services {
        if world.services.contains_key(&key) {
            continue;
        }
        let api: Api<Service> = Api::namespaced(client.clone(), &key.0);
        let exists = api.get_opt(&key.1).await?.is_some();
        world.services.insert(key, exists);
    }
    Ok(world)
}

async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, RouteStatusError> {
    if obj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = obj.data.get("spec").cloned().unwrap_or_default();
    let Some(route) = PolicyObject::new(&obj.metadata, spec) else {
        return Ok(Action::await_change());
    };
    let err = |what: &'static str| {
        let (namespace, name) = (route.namespace.clone(), route.name.clone());
        move |source: kube::Error| RouteStatusError::Api {
            what,
            namespace,
            name,
            source: Box::new(source),
        }
    };
    let world = world_of(&ctx.client, &route, &ctx.cfg)
        .await
        .map_err(err("looking up parents and backends"))?;
    let previous = obj.data.get("status");
    let status = route_status(
        &route,
        obj.metadata.generation,
        &world,
        &ctx.cfg,
        previous,
        &now_rfc3339(),
    );
    if previous != Some(&status) {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &route.namespace, &http_route_resource());
        let body = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": route.name, "namespace": route.namespace},
            "status": status,
        });
        api.patch_status(
            &route.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(err("writing the status"))?;
        tracing::debug!(route = %obj.name_any(), "HTTPRoute status written");
    }
    Ok(Action::requeue(RECHECK))
}

fn error_policy(obj: Arc<DynamicObject>, err: &RouteStatusError, _: Arc<Ctx>) -> Action {
    tracing::warn!(route = %obj.name_any(), error = %err, "HTTPRoute status not written; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Keeps every HTTPRoute's status current until drained. While the
/// Gateway API CRDs are missing it checks again every few seconds.
pub async fn run(client: Client, cfg: MeshConfig, drain: drain::Watch) {
    let ar = http_route_resource();
    let routes: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    loop {
        match routes.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(e) => tracing::debug!(error = %e, "HTTPRoute API not available yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(CRD_RETRY) => {}
            _ = drain.signaled() => return,
        }
    }
    tracing::info!("writing HTTPRoute status");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cfg,
    });
    // Any Service or Gateway change may create or remove a parent or a
    // backend.
    let services = watcher::watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
    .filter_map(|r| futures::future::ready(r.ok().map(|_| ())));
    let gateways = watcher::watcher(
        Api::<DynamicObject>::all_with(client, &crate::waypoints::gateway_resource()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
    .filter_map(|r| futures::future::ready(r.ok().map(|_| ())));
    let changes = futures::stream::select(services, gateways);
    let mut stream = Box::pin(
        Controller::new_with(routes, watcher::Config::default(), ar)
            .with_config(controller::Config::default().debounce(Duration::from_millis(500)))
            .reconcile_all_on(changes)
            .run(reconcile, error_policy, ctx),
    );
    loop {
        tokio::select! {
            r = stream.next() => match r {
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "HTTPRoute status controller"),
                None => return,
            },
            _ = drain.signaled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(spec: Value) -> PolicyObject {
        PolicyObject {
            namespace: "bookinfo".into(),
            name: "r".into(),
            annotations: BTreeMap::new(),
            creation_timestamp: None,
            spec,
        }
    }

    fn key(ns: &str, n: &str) -> (String, String) {
        (ns.into(), n.into())
    }

    fn cond<'a>(parent: &'a Value, t: &str) -> &'a Value {
        parent["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap()
    }

    fn world() -> World {
        World {
            services: BTreeMap::from([
                (key("bookinfo", "reviews"), true),
                (key("bookinfo", "reviews-v1"), true),
                (key("bookinfo", "gone"), false),
            ]),
            gateways: BTreeMap::from([
                (key("bookinfo", "waypoint"), GatewayState::Waypoint),
                (key("bookinfo", "ingress"), GatewayState::Other),
                (key("bookinfo", "nope"), GatewayState::Missing),
            ]),
        }
    }

    #[test]
    fn good_and_bad_parents_and_backends() {
        let cfg = MeshConfig::default();
        let r = route(json!({
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "reviews"},
                {"group": "", "kind": "Service", "name": "missing"},
                {"name": "waypoint"},
                {"name": "nope"},
                {"name": "ingress"},
            ],
            "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 9080}, {"name": "gone", "port": 9080}]}]
        }));
        let t0 = "2026-01-01T00:00:00Z";
        let s = route_status(&r, Some(4), &world(), &cfg, None, t0);
        let parents = s["parents"].as_array().unwrap();
        // The other class's Gateway is not ours to report on.
        assert_eq!(parents.len(), 4, "{s}");
        for p in parents {
            assert_eq!(p["controllerName"], CONTROLLER_NAME);
            let rr = cond(p, "ResolvedRefs");
            assert_eq!(
                (rr["status"].as_str(), rr["reason"].as_str()),
                (Some("False"), Some("BackendNotFound"))
            );
            assert!(
                rr["message"]
                    .as_str()
                    .unwrap()
                    .contains("Service bookinfo/gone"),
                "{rr}"
            );
            assert_eq!(rr["observedGeneration"], 4);
        }
        let accepted: Vec<(&str, &str)> = parents
            .iter()
            .map(|p| {
                let a = cond(p, "Accepted");
                (a["status"].as_str().unwrap(), a["reason"].as_str().unwrap())
            })
            .collect();
        assert_eq!(
            accepted,
            [
                ("True", "Accepted"),
                ("False", "NoMatchingParent"),
                ("True", "Accepted"),
                ("False", "NoMatchingParent")
            ]
        );
        assert_eq!(parents[1]["parentRef"]["name"], "missing");
        assert!(cond(&parents[3], "Accepted")["message"]
            .as_str()
            .unwrap()
            .contains("Gateway bookinfo/nope"));
    }

    #[test]
    fn transition_times_move_only_with_status_and_others_are_kept() {
        let cfg = MeshConfig::default();
        let r = route(json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
            "rules": [{"backendRefs": [{"name": "reviews-v2", "port": 9080}]}]
        }));
        let other = json!({"parentRef": {"name": "ingress"}, "controllerName": "example.com/other", "conditions": []});
        let prev = json!({"parents": [other.clone()]});
        let t0 = "2026-01-01T00:00:00Z";
        let s0 = route_status(&r, Some(1), &world(), &cfg, Some(&prev), t0);
        assert_eq!(s0["parents"][0], other);
        assert_eq!(cond(&s0["parents"][1], "ResolvedRefs")["status"], "False");
        // Same inputs later: identical, so nothing is written.
        let again = route_status(
            &r,
            Some(1),
            &world(),
            &cfg,
            Some(&s0),
            "2026-01-01T00:01:00Z",
        );
        assert_eq!(again, s0);
        // The backend appears: ResolvedRefs turns True at t1, Accepted keeps t0.
        let mut w = world();
        w.services.insert(key("bookinfo", "reviews-v2"), true);
        let t1 = "2026-01-01T00:02:00Z";
        let s1 = route_status(&r, Some(1), &w, &cfg, Some(&s0), t1);
        let p = &s1["parents"][1];
        assert_eq!(cond(p, "ResolvedRefs")["status"], "True");
        assert_eq!(cond(p, "ResolvedRefs")["lastTransitionTime"], t1);
        assert_eq!(cond(p, "Accepted")["lastTransitionTime"], t0);
    }

    #[test]
    fn invalid_route_is_not_accepted() {
        let cfg = MeshConfig::default();
        let r = route(json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
            "rules": [{"matches": [{"path": {"type": "Bogus", "value": "/"}}]}]
        }));
        let s = route_status(&r, None, &world(), &cfg, None, "2026-01-01T00:00:00Z");
        let a = cond(&s["parents"][0], "Accepted");
        assert_eq!(
            (a["status"].as_str(), a["reason"].as_str()),
            (Some("False"), Some("UnsupportedValue"))
        );
        assert!(
            a["message"]
                .as_str()
                .unwrap()
                .contains("spec.rules[0].matches[0].path.type"),
            "{a}"
        );
        assert_eq!(cond(&s["parents"][0], "ResolvedRefs")["status"], "True");
    }
}
