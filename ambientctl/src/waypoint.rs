//! `ambientctl waypoint apply|generate|list|delete|status`: istioctl's
//! waypoint verbs. A waypoint is a Gateway API `Gateway` of class
//! `istio-waypoint` with one HBONE listener on 15008; istiod-lite sees it
//! and provisions the proxy (Deployment, Service, ServiceAccount), then
//! marks the Gateway `Programmed`. `--enroll-namespace` labels the
//! namespace `istio.io/use-waypoint=<name>`, which makes ztunnel send the
//! namespace's service traffic through the waypoint. Off the traffic path:
//! this only writes and reads API objects.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use crate::kubeclient::{self, KubeError, LocalMesh};
use crate::label::{AMBIENT, DATAPLANE_MODE};

/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Istio's default waypoint name.
pub const DEFAULT_NAME: &str = "waypoint";
/// Which traffic the waypoint handles.
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// What a namespace, service or pod carries to use a waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const REVISION: &str = "istio.io/rev";
const FIELD_MANAGER: &str = "ambientctl";
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("{0}")]
    Kube(#[from] KubeError),
    #[error(
        "missing Kubernetes Gateway CRDs need to be installed before applying a waypoint: {0}"
    )]
    NoCrds(#[source] kube::Error),
    #[error("invalid name provided for waypoint, 'none' is a reserved value")]
    ReservedName,
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("namespace: {0} not found")]
    NoNamespace(String),
    #[error("timed out while waiting for waypoint {namespace}/{name}{last}")]
    Timeout {
        namespace: String,
        name: String,
        /// The last error seen while polling, if any (`: <error>`).
        last: String,
    },
    #[error("cannot specify waypoint names when deleting all waypoints")]
    NamesWithAll,
    #[error("must specify a waypoint name or delete all using --all")]
    NothingToDelete,
    #[error("invalid timeout {0:?}: expected seconds or a duration like 90s, 2m")]
    BadTimeout(String),
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

#[derive(Args)]
pub struct WaypointArgs {
    /// Kubernetes configuration file (default: KUBECONFIG, else the local
    /// mesh when it runs, else ~/.kube/config or in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Namespace (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Name of the waypoint (default `waypoint`).
    #[arg(long, global = true)]
    name: Option<String>,
    #[command(subcommand)]
    command: WaypointCommand,
}

#[derive(Subcommand)]
enum WaypointCommand {
    /// Create or update a waypoint (a Gateway of class istio-waypoint).
    Apply {
        /// Label the namespace `istio.io/use-waypoint=<name>`.
        #[arg(long)]
        enroll_namespace: bool,
        /// Replace the waypoint the namespace already uses.
        #[arg(long)]
        overwrite: bool,
        /// Which traffic the waypoint handles.
        #[arg(long = "for", default_value = "service",
              value_parser = ["service", "workload", "all", "none"])]
        for_: String,
        /// The revision to label the waypoint with.
        #[arg(short = 'r', long)]
        revision: Option<String>,
        /// Wait until the waypoint is programmed.
        #[arg(short = 'w', long)]
        wait: bool,
        /// How long --wait waits (seconds, or 90s / 2m; istioctl's default).
        #[arg(long, visible_alias = "waypoint-timeout", default_value = "90")]
        timeout: String,
    },
    /// Print the waypoint's Gateway as YAML instead of applying it.
    Generate {
        /// Which traffic the waypoint handles.
        #[arg(long = "for", default_value = "service",
              value_parser = ["service", "workload", "all", "none"])]
        for_: String,
        /// The revision to label the waypoint with.
        #[arg(short = 'r', long)]
        revision: Option<String>,
    },
    /// List the waypoints.
    List {
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Delete waypoints by name, or all of a namespace.
    Delete {
        /// The waypoints.
        names: Vec<String>,
        /// Every waypoint of the namespace.
        #[arg(long)]
        all: bool,
    },
    /// Show the conditions of waypoints.
    Status {
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
}

/// The Gateway API `Gateway` resource (v1).
pub fn gateway_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "Gateway",
    ))
}

/// The waypoint Gateway, as istioctl writes it.
pub fn gateway(
    namespace: &str,
    name: &str,
    for_: &str,
    revision: Option<&str>,
) -> Result<Value, WaypointError> {
    if name == "none" {
        return Err(WaypointError::ReservedName);
    }
    let mut labels = serde_json::Map::new();
    labels.insert(WAYPOINT_FOR.into(), for_.into());
    if let Some(r) = revision {
        labels.insert(REVISION.into(), r.into());
    }
    Ok(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }))
}

/// Parses `--timeout`: seconds, or a number with `s`, `m` or `h`.
pub fn parse_timeout(s: &str) -> Result<Duration, WaypointError> {
    let bad = || WaypointError::BadTimeout(s.to_string());
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(n * mult))
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> WaypointError {
    let what = what.into();
    move |source| WaypointError::Api { what, source }
}

fn gateways(client: &kube::Client, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &gateway_resource()),
        None => Api::all_with(client.clone(), &gateway_resource()),
    }
}

fn is_waypoint(g: &DynamicObject) -> bool {
    g.data
        .pointer("/spec/gatewayClassName")
        .and_then(Value::as_str)
        == Some(WAYPOINT_CLASS)
}

/// The condition `type_` of a Gateway, if reported.
fn condition<'a>(g: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    g.data
        .pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
}

fn is_programmed(g: &DynamicObject) -> bool {
    condition(g, "Programmed")
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True")
}

/// Creates or updates the waypoint Gateway (server-side apply).
pub async fn apply(client: &kube::Client, gw: &Value) -> Result<(), WaypointError> {
    let ns = gw["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = gw["metadata"]["name"].as_str().unwrap_or(DEFAULT_NAME);
    gateways(client, Some(ns))
        .patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(gw))
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 404 => WaypointError::NoCrds(e),
            _ => WaypointError::Api {
                what: format!("applying waypoint {ns}/{name}"),
                source: e,
            },
        })?;
    Ok(())
}

/// Polls the Gateway every `poll` until it is `Programmed=True`.
pub async fn wait_programmed(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<(), WaypointError> {
    let api = gateways(client, Some(namespace));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match api.get(name).await {
            Ok(g) if is_programmed(&g) => return Ok(()),
            Ok(_) => String::new(),
            Err(e) => format!(": {e}"),
        };
        if tokio::time::Instant::now() + poll > deadline {
            return Err(WaypointError::Timeout {
                namespace: namespace.into(),
                name: name.into(),
                last,
            });
        }
        tokio::time::sleep(poll).await;
    }
}

/// The labels of a namespace; istioctl's error when it does not exist.
pub async fn namespace_labels(
    client: &kube::Client,
    namespace: &str,
) -> Result<BTreeMap<String, String>, WaypointError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = api
        .get_opt(namespace)
        .await
        .map_err(api_err(format!("failed to get namespace {namespace}")))?
        .ok_or_else(|| WaypointError::NoNamespace(namespace.into()))?;
    Ok(ns.labels().clone())
}

/// Before `apply --enroll-namespace`: whether to go on, and what to tell
/// the user (as istioctl: a namespace already using another waypoint needs
/// `--overwrite`; one not in ambient mode gets a hint).
pub fn enroll_check(
    labels: &BTreeMap<String, String>,
    namespace: &str,
    name: &str,
    overwrite: bool,
) -> (bool, Option<String>) {
    let current = labels.get(USE_WAYPOINT).filter(|v| !v.is_empty());
    if !overwrite && current.is_some_and(|c| c != name) {
        return (false, Some(format!("Warning: namespace ({namespace}) already has an enrolled Waypoint. Consider adding the `--overwrite` flag to your apply command.")));
    }
    if labels.get(DATAPLANE_MODE).map(String::as_str) != Some(AMBIENT) {
        return (true, Some(format!("Warning: namespace is not enrolled in ambient. Consider running\t`kubectl label namespace {namespace} {DATAPLANE_MODE}={AMBIENT}`")));
    }
    (true, None)
}

/// Labels the namespace `istio.io/use-waypoint=<name>`.
pub async fn enroll_namespace(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(), WaypointError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = json!({"metadata": {"labels": {USE_WAYPOINT: name}}});
    api.patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 404 => WaypointError::NoNamespace(namespace.into()),
            _ => WaypointError::Api {
                what: format!("failed to update namespace {namespace}"),
                source: e,
            },
        })?;
    Ok(())
}

/// `waypoint generate`'s YAML. Like istioctl, the namespace is left out
/// unless one was given.
pub fn generate(
    namespace: Option<&str>,
    name: &str,
    for_: &str,
    revision: Option<&str>,
) -> Result<String, WaypointError> {
    let mut gw = gateway(namespace.unwrap_or("default"), name, for_, revision)?;
    if namespace.is_none() {
        if let Some(m) = gw["metadata"].as_object_mut() {
            m.remove("namespace");
        }
    }
    Ok(serde_yaml::to_string(&gw).unwrap_or_default())
}

pub fn applied_message(namespace: &str, name: &str) -> String {
    format!("waypoint {namespace}/{name} applied")
}

pub fn ready_message(namespace: &str, name: &str) -> String {
    format!("waypoint {namespace}/{name} is ready!")
}

pub fn enrolled_message(namespace: &str, name: &str) -> String {
    format!("namespace {namespace} labeled with \"{USE_WAYPOINT}: {name}\"")
}

/// Lays rows out as Go's tabwriter does for istioctl (padding 5, the
/// last column unpadded).
pub fn table(rows: &[Vec<String>]) -> String {
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
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 < r.len() {
                line.push_str(&format!("{c:<w$}", w = widths[i] + 5));
            } else {
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Waypoints among `gws`, sorted by namespace then name.
fn waypoints(mut gws: Vec<DynamicObject>) -> Vec<DynamicObject> {
    gws.retain(is_waypoint);
    gws.sort_by_key(|g| (g.namespace(), g.name_any()));
    gws
}

/// `waypoint list`'s table (istioctl's columns).
pub fn list_table(gws: Vec<DynamicObject>, all_namespaces: bool) -> String {
    let gws = waypoints(gws);
    if gws.is_empty() {
        return "No waypoints found.\n".into();
    }
    let mut rows = vec![];
    let header = ["NAME", "REVISION", "TRAFFIC TYPE", "PROGRAMMED"];
    let mut h: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    if all_namespaces {
        h.insert(0, "NAMESPACE".into());
    }
    rows.push(h);
    for g in &gws {
        let labels = g.labels();
        let rev = labels
            .get(REVISION)
            .cloned()
            .unwrap_or_else(|| "default".into());
        let traffic = labels
            .get(WAYPOINT_FOR)
            .cloned()
            .unwrap_or_else(|| "none".into());
        let programmed = condition(g, "Programmed")
            .and_then(|c| c.get("status"))
            .and_then(Value::as_str)
            .unwrap_or("False")
            .to_string();
        let mut r = vec![g.name_any(), rev, traffic, programmed];
        if all_namespaces {
            r.insert(0, g.namespace().unwrap_or_default());
        }
        rows.push(r);
    }
    table(&rows)
}

/// `waypoint status`'s table: one row per condition of each waypoint.
pub fn status_table(gws: Vec<DynamicObject>, all_namespaces: bool) -> String {
    let gws = waypoints(gws);
    if gws.is_empty() {
        return "No waypoints found.\n".into();
    }
    let mut h: Vec<String> = ["NAME", "STATUS", "TYPE", "REASON", "MESSAGE"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if all_namespaces {
        h.insert(0, "NAMESPACE".into());
    }
    let mut rows = vec![h];
    let field = |c: &Value, k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    for g in &gws {
        let conds = g
            .data
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let conds = if conds.is_empty() {
            // Nothing reported yet: istiod-lite has not seen it.
            vec![
                json!({"type": "Programmed", "status": "Unknown", "reason": "Pending",
                "message": "Waiting for controller"}),
            ]
        } else {
            conds
        };
        for c in &conds {
            let mut r = vec![
                g.name_any(),
                field(c, "status"),
                field(c, "type"),
                field(c, "reason"),
                field(c, "message"),
            ];
            if all_namespaces {
                r.insert(0, g.namespace().unwrap_or_default());
            }
            rows.push(r);
        }
    }
    table(&rows)
}

async fn list_gateways(
    client: &kube::Client,
    namespace: Option<&str>,
) -> Result<Vec<DynamicObject>, WaypointError> {
    Ok(gateways(client, namespace)
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing gateways"))?
        .items)
}

/// Deletes waypoints (`names`, or every waypoint of the namespace when
/// empty) and returns the lines to print.
pub async fn delete(
    client: &kube::Client,
    namespace: &str,
    names: &[String],
) -> Result<Vec<String>, WaypointError> {
    let existing: Vec<String> = waypoints(list_gateways(client, Some(namespace)).await?)
        .iter()
        .map(|g| g.name_any())
        .collect();
    let mut out = vec![];
    let targets: Vec<String> = if names.is_empty() {
        existing.clone()
    } else {
        names.to_vec()
    };
    let api = gateways(client, Some(namespace));
    for name in targets {
        if !existing.contains(&name) {
            out.push(format!("waypoint {namespace}/{name} not found"));
            continue;
        }
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => out.push(format!("waypoint {namespace}/{name} deleted")),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                out.push(format!("waypoint {namespace}/{name} not found"))
            }
            Err(e) => return Err(api_err(format!("deleting waypoint {namespace}/{name}"))(e)),
        }
    }
    Ok(out)
}

async fn run_async(args: WaypointArgs) -> Result<i32, WaypointError> {
    let local = LocalMesh::detect(&kubeclient::state_dir());
    let target = kubeclient::target(args.kubeconfig.as_deref(), local.as_ref());
    let client = kubeclient::client(&target).await?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let name = args.name.clone().unwrap_or_else(|| DEFAULT_NAME.into());
    match args.command {
        WaypointCommand::Apply {
            enroll_namespace: enroll,
            overwrite,
            for_,
            revision,
            wait,
            timeout,
        } => {
            let timeout = parse_timeout(&timeout)?;
            let gw = gateway(&ns, &name, &for_, revision.as_deref())?;
            // Also tells a missing namespace apart from missing CRDs (both
            // make the apply below a 404).
            let labels = namespace_labels(&client, &ns).await?;
            if enroll {
                let (proceed, note) = enroll_check(&labels, &ns, &name, overwrite);
                if let Some(note) = note {
                    println!("{note}");
                }
                if !proceed {
                    return Ok(0);
                }
            }
            apply(&client, &gw).await?;
            println!("{}", applied_message(&ns, &name));
            if wait {
                wait_programmed(&client, &ns, &name, timeout, POLL).await?;
                println!("{}", ready_message(&ns, &name));
            }
            if enroll {
                enroll_namespace(&client, &ns, &name).await?;
                println!("{}", enrolled_message(&ns, &name));
            }
        }
        WaypointCommand::Generate { for_, revision } => {
            print!(
                "{}",
                generate(args.namespace.as_deref(), &name, &for_, revision.as_deref())?
            );
        }
        WaypointCommand::List { all_namespaces } => {
            let gws = list_gateways(&client, (!all_namespaces).then_some(ns.as_str())).await?;
            print!("{}", list_table(gws, all_namespaces));
        }
        WaypointCommand::Delete { names, all } => {
            let names = match (all, names.is_empty()) {
                (true, false) => return Err(WaypointError::NamesWithAll),
                (false, true) => return Err(WaypointError::NothingToDelete),
                _ => names,
            };
            for line in delete(&client, &ns, &names).await? {
                println!("{line}");
            }
        }
        WaypointCommand::Status { all_namespaces } => {
            let mut gws = list_gateways(&client, (!all_namespaces).then_some(ns.as_str())).await?;
            if let Some(n) = &args.name {
                gws.retain(|g| &g.name_any() == n);
            }
            print!("{}", status_table(gws, all_namespaces));
        }
    }
    Ok(0)
}

pub fn run(args: WaypointArgs) -> Result<i32, WaypointError> {
    if let WaypointCommand::Generate { for_, revision } = &args.command {
        // No cluster needed to print it.
        let name = args.name.as_deref().unwrap_or(DEFAULT_NAME);
        print!(
            "{}",
            generate(args.namespace.as_deref(), name, for_, revision.as_deref())?
        );
        return Ok(0);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WaypointError::Runtime)?;
    rt.block_on(run_async(args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeclient::mock::{self, list, route};

    const GWS: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/bookinfo/gateways";

    fn gw(ns: &str, name: &str, class: &str, labels: Value, programmed: Option<&str>) -> Value {
        let mut g = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"gatewayClassName": class, "listeners": []},
        });
        if let Some(p) = programmed {
            g["status"] = json!({"conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "Resource accepted"},
                {"type": "Programmed", "status": p, "reason": if p == "True" { "Programmed" } else { "AddressNotAssigned" },
                 "message": "m"},
            ]});
        }
        g
    }

    fn objs(v: Vec<Value>) -> Vec<DynamicObject> {
        v.into_iter()
            .map(|o| serde_json::from_value(o).unwrap())
            .collect()
    }

    #[test]
    fn the_gateway_istioctl_writes() {
        let g = gateway("bookinfo", "waypoint", "service", None).unwrap();
        assert_eq!(
            g,
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "bookinfo",
                    "labels": {"istio.io/waypoint-for": "service"}},
                "spec": {"gatewayClassName": "istio-waypoint",
                    "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
            })
        );
        let g = gateway("x", "w", "workload", Some("canary")).unwrap();
        assert_eq!(g["metadata"]["labels"]["istio.io/rev"], "canary");
        assert_eq!(g["metadata"]["labels"][WAYPOINT_FOR], "workload");
        assert_eq!(
            gateway("x", "none", "service", None)
                .unwrap_err()
                .to_string(),
            "invalid name provided for waypoint, 'none' is a reserved value"
        );
        let y = generate(None, "waypoint", "service", None).unwrap();
        assert!(!y.contains("namespace"), "{y}");
        assert!(y.contains("gatewayClassName: istio-waypoint"), "{y}");
    }

    #[test]
    fn messages() {
        assert_eq!(
            applied_message("bookinfo", "waypoint"),
            "waypoint bookinfo/waypoint applied"
        );
        assert_eq!(
            ready_message("bookinfo", "waypoint"),
            "waypoint bookinfo/waypoint is ready!"
        );
        assert_eq!(
            enrolled_message("bookinfo", "waypoint"),
            "namespace bookinfo labeled with \"istio.io/use-waypoint: waypoint\""
        );
        assert_eq!(parse_timeout("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_timeout("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_timeout("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_timeout("soon").is_err());
        assert!(parse_timeout("5d").is_err());
    }

    #[test]
    fn enrollment_checks() {
        let l = |v: &[(&str, &str)]| -> BTreeMap<String, String> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ambient = l(&[(DATAPLANE_MODE, AMBIENT)]);
        assert_eq!(enroll_check(&ambient, "b", "waypoint", false), (true, None));
        let other = l(&[(DATAPLANE_MODE, AMBIENT), (USE_WAYPOINT, "old")]);
        let (go, note) = enroll_check(&other, "b", "waypoint", false);
        assert!(!go);
        assert!(note.unwrap().contains("--overwrite"));
        assert_eq!(enroll_check(&other, "b", "waypoint", true), (true, None));
        assert_eq!(enroll_check(&other, "b", "old", false), (true, None));
        let (go, note) = enroll_check(&l(&[]), "b", "waypoint", false);
        assert!(go);
        assert!(note
            .unwrap()
            .contains("kubectl label namespace b istio.io/dataplane-mode=ambient"));
    }

    #[test]
    fn list_and_status_tables() {
        let gws = objs(vec![
            gw(
                "b",
                "waypoint",
                WAYPOINT_CLASS,
                json!({WAYPOINT_FOR: "service"}),
                Some("True"),
            ),
            gw(
                "a",
                "reviews-wp",
                WAYPOINT_CLASS,
                json!({WAYPOINT_FOR: "workload", "istio.io/rev": "canary"}),
                Some("False"),
            ),
            gw("a", "ingress", "istio", json!({}), Some("True")),
            gw("a", "fresh", WAYPOINT_CLASS, json!({}), None),
        ]);
        assert_eq!(
            list_table(gws.clone(), false),
            "NAME           REVISION     TRAFFIC TYPE     PROGRAMMED\n\
             fresh          default      none             False\n\
             reviews-wp     canary       workload         False\n\
             waypoint       default      service          True\n"
        );
        let all = list_table(gws.clone(), true);
        assert!(all.starts_with("NAMESPACE     NAME"), "{all}");
        assert!(all.contains("\nb             waypoint "), "{all}");
        assert_eq!(list_table(vec![], false), "No waypoints found.\n");
        let st = status_table(gws[..1].to_vec(), false);
        assert_eq!(
            st,
            "NAME         STATUS     TYPE           REASON         MESSAGE\n\
             waypoint     True       Accepted       Accepted       Resource accepted\n\
             waypoint     True       Programmed     Programmed     m\n"
        );
        let pending = status_table(gws[3..].to_vec(), true);
        assert!(pending.contains("Unknown"), "{pending}");
    }

    #[tokio::test]
    async fn applies_and_enrolls() {
        let g = gw("bookinfo", "waypoint", WAYPOINT_CLASS, json!({}), None);
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "bookinfo", "labels": {USE_WAYPOINT: "old"}}});
        let (client, seen) = mock::client(vec![
            route("PATCH", &format!("{GWS}/waypoint?"), 201, g),
            route("PATCH", "/api/v1/namespaces/bookinfo?", 200, ns.clone()),
            route("GET", "/api/v1/namespaces/bookinfo", 200, ns),
        ]);
        let body = gateway("bookinfo", "waypoint", "service", None).unwrap();
        apply(&client, &body).await.unwrap();
        let labels = namespace_labels(&client, "bookinfo").await.unwrap();
        assert_eq!(labels[USE_WAYPOINT], "old");
        enroll_namespace(&client, "bookinfo", "waypoint")
            .await
            .unwrap();
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            [
                format!(
                    "PATCH {GWS}/waypoint?&fieldManager=ambientctl application/apply-patch+yaml"
                ),
                "GET /api/v1/namespaces/bookinfo".to_string(),
                "PATCH /api/v1/namespaces/bookinfo? application/merge-patch+json".to_string(),
            ]
        );
        let e = namespace_labels(&client, "nope").await.unwrap_err();
        assert_eq!(e.to_string(), "namespace: nope not found");
        // The Gateway CRDs are missing: the API server has no such path.
        let e = apply(&client, &gateway("other", "w", "service", None).unwrap())
            .await
            .unwrap_err();
        assert!(
            e.to_string().starts_with(
                "missing Kubernetes Gateway CRDs need to be installed before applying a waypoint"
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn waits_for_programmed() {
        let ready = gw(
            "bookinfo",
            "waypoint",
            WAYPOINT_CLASS,
            json!({}),
            Some("True"),
        );
        let pending = gw("bookinfo", "slow", WAYPOINT_CLASS, json!({}), Some("False"));
        let (client, _) = mock::client(vec![
            route("GET", &format!("{GWS}/waypoint"), 200, ready),
            route("GET", &format!("{GWS}/slow"), 200, pending),
        ]);
        let ms = Duration::from_millis;
        wait_programmed(&client, "bookinfo", "waypoint", ms(50), ms(10))
            .await
            .unwrap();
        let e = wait_programmed(&client, "bookinfo", "slow", ms(50), ms(10))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "timed out while waiting for waypoint bookinfo/slow"
        );
        let e = wait_programmed(&client, "bookinfo", "gone", ms(20), ms(10))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("timed out while waiting for waypoint bookinfo/gone: "),
            "{e}"
        );
    }

    #[tokio::test]
    async fn deletes_waypoints_only() {
        let gws = list(
            "GatewayList",
            vec![
                gw("bookinfo", "waypoint", WAYPOINT_CLASS, json!({}), None),
                gw("bookinfo", "second", WAYPOINT_CLASS, json!({}), None),
                gw("bookinfo", "ingress", "istio", json!({}), None),
            ],
        );
        let ok = json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
        let (client, seen) = mock::client(vec![
            route("GET", &format!("{GWS}?"), 200, gws),
            route("DELETE", &format!("{GWS}/waypoint"), 200, ok.clone()),
            route("DELETE", &format!("{GWS}/second"), 200, ok),
        ]);
        let out = delete(&client, "bookinfo", &["waypoint".into(), "ingress".into()])
            .await
            .unwrap();
        assert_eq!(
            out,
            [
                "waypoint bookinfo/waypoint deleted",
                "waypoint bookinfo/ingress not found"
            ]
        );
        seen.lock().unwrap().clear();
        let out = delete(&client, "bookinfo", &[]).await.unwrap();
        assert_eq!(
            out,
            [
                "waypoint bookinfo/second deleted",
                "waypoint bookinfo/waypoint deleted"
            ]
        );
        assert_eq!(
            seen.lock()
                .unwrap()
                .iter()
                .filter(|r| r.starts_with("DELETE"))
                .count(),
            2
        );
    }
}
