//! `ambientctl zc` (`ztunnel-config`): a ztunnel's view of the mesh, as
//! `istioctl ztunnel-config` shows it — the workloads, services, policies
//! and certificates it holds (its admin `/config_dump` on port 15000) and
//! the connections it proxies (`/debug/connections`). This is how a user
//! checks what the data plane on one node was told and is doing, without
//! reading ztunnel's logs.

mod dump;
pub(crate) mod http;
mod render;
mod source;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;

use crate::kubeclient::{self, KubeError, LocalMesh, Target};
pub use dump::{ConfigDump, Connections, DumpError};
pub use render::{Filter, Format, Part, RenderError};
pub(crate) use source::connect_reason;
pub use source::{AdminSource, FileSource, KubeSource, TcpSource, ADMIN_PORT};

#[derive(Debug, thiserror::Error)]
pub enum ZcError {
    #[error("cannot reach ztunnel {ztunnel} admin port {port}: {reason}{hint}")]
    Unreachable {
        ztunnel: String,
        port: u16,
        reason: String,
        hint: String,
    },
    #[error("ztunnel {ztunnel} does not serve {path} (a ztunnel without this endpoint)")]
    NotServed { ztunnel: String, path: String },
    #[error("ztunnel {ztunnel} answered {path} with HTTP {status}: {body}")]
    Status {
        ztunnel: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("reading {path} from ztunnel {ztunnel}: {source}")]
    Http {
        ztunnel: String,
        path: String,
        #[source]
        source: http::HttpError,
    },
    #[error("ztunnel {ztunnel} sent an unreadable {path}: {source}")]
    Dump {
        ztunnel: String,
        path: String,
        #[source]
        source: DumpError,
    },
    #[error("reading {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {netns} (needs root): {reason}")]
    Netns { netns: String, reason: String },
    #[error("no ztunnel pod found in namespace {namespace} (label app=ztunnel)")]
    NoZtunnel { namespace: String },
    #[error("ztunnel pod {name} not found in namespace {namespace} (ztunnels: {found})")]
    NoSuchZtunnel {
        name: String,
        namespace: String,
        found: String,
    },
    #[error("no ztunnel pod on node {node} in namespace {namespace} (ztunnels: {found})")]
    NoZtunnelOnNode {
        node: String,
        namespace: String,
        found: String,
    },
    #[error("no ztunnel {name} in the local mesh (ztunnels: {found})")]
    NoLocalZtunnel { name: String, found: String },
    #[error(
        "the local mesh has no record of node {node}'s network namespace (is it still starting?)"
    )]
    NoLocalNetns { node: String },
    #[error("{0}")]
    Kube(#[from] KubeError),
    #[error("listing ztunnel pods in namespace {namespace}: {source}")]
    ListPods {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Render(#[from] RenderError),
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

#[derive(Args)]
pub struct ZcArgs {
    /// Namespace where the ztunnels run.
    #[arg(short, long, global = true, default_value = "istio-system")]
    namespace: String,
    /// Inspect the ztunnel on this node.
    #[arg(long, global = true)]
    node: Option<String>,
    /// Kubernetes configuration file (default: KUBECONFIG, else the local
    /// mesh when it runs, else ~/.kube/config or in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Output format: table (istioctl's `short`), json or yaml.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Format,
    /// Read a saved config dump (or connections) JSON file instead of
    /// asking a ztunnel.
    #[arg(short = 'f', long, global = true)]
    file: Option<PathBuf>,
    /// Only show workloads (and services, policies, certificates,
    /// connections) of this namespace.
    #[arg(
        long = "workloads-namespace",
        visible_alias = "workload-namespace",
        global = true,
        value_name = "NAMESPACE"
    )]
    workloads_namespace: Option<String>,
    #[command(subcommand)]
    command: ZcCommand,
}

/// Which ztunnel to ask.
#[derive(Args)]
struct Which {
    /// The ztunnel pod, `<pod>[.<namespace>]` (in the local mesh
    /// `ztunnel-<node>`); default: the one on --node, else the first.
    #[arg(value_name = "ZTUNNEL")]
    ztunnel: Option<String>,
}

#[derive(Subcommand)]
enum ZcCommand {
    /// Workloads the ztunnel knows.
    #[command(visible_aliases = ["workloads", "w"])]
    Workload {
        #[command(flatten)]
        which: Which,
        /// Only the workload with this IP.
        #[arg(long)]
        address: Option<String>,
        /// Only workloads running on this node.
        #[arg(long)]
        workload_node: Option<String>,
    },
    /// Services the ztunnel knows, with healthy/total endpoints.
    #[command(visible_aliases = ["services", "svc", "s"])]
    Service {
        #[command(flatten)]
        which: Which,
    },
    /// Authorization policies the ztunnel enforces.
    #[command(visible_aliases = ["policies", "p"])]
    Policy {
        #[command(flatten)]
        which: Which,
    },
    /// Workload certificates the ztunnel holds.
    #[command(visible_aliases = ["certificates", "certs", "cert", "secret"])]
    Certificate {
        #[command(flatten)]
        which: Which,
    },
    /// Connections the ztunnel proxies now.
    #[command(visible_aliases = ["connection", "conn"])]
    Connections {
        #[command(flatten)]
        which: Which,
        /// Only inbound or outbound connections.
        #[arg(long, value_parser = ["inbound", "outbound"])]
        direction: Option<String>,
        /// Show addresses as they are, without naming services and pods.
        #[arg(long)]
        raw: bool,
    },
    /// Services, workloads, policies and certificates.
    All {
        #[command(flatten)]
        which: Which,
    },
}

/// How long to wait for a ztunnel's admin answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Picks the local-mesh node a ztunnel name or `--node` designates.
fn local_source(
    mesh: &LocalMesh,
    name: Option<&str>,
    node: Option<&str>,
) -> Result<TcpSource, ZcError> {
    let found = || {
        mesh.nodes
            .iter()
            .map(|n| format!("ztunnel-{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let node = match (name, node) {
        (Some(name), _) => {
            // `ztunnel-node1`, `ztunnel-node1.istio-system`, or a node name.
            let base = name.split('.').next().unwrap_or(name);
            let n = base.strip_prefix("ztunnel-").unwrap_or(base);
            if !mesh.nodes.iter().any(|x| x == n) {
                return Err(ZcError::NoLocalZtunnel {
                    name: name.to_string(),
                    found: found(),
                });
            }
            n.to_string()
        }
        (None, Some(node)) => {
            if !mesh.nodes.iter().any(|x| x == node) {
                return Err(ZcError::NoLocalZtunnel {
                    name: format!("on node {node}"),
                    found: found(),
                });
            }
            node.to_string()
        }
        (None, None) => mesh.nodes.first().cloned().ok_or(ZcError::NoLocalZtunnel {
            name: "(any)".into(),
            found: "none".into(),
        })?,
    };
    let netns = mesh
        .node_netns(&node)
        .ok_or_else(|| ZcError::NoLocalNetns { node: node.clone() })?;
    Ok(TcpSource {
        ztunnel: format!("ztunnel-{node}"),
        addr: ([127, 0, 0, 1], ADMIN_PORT).into(),
        netns: Some(netns),
        node: Some(node),
        timeout: TIMEOUT,
    })
}

/// Picks the ztunnel pod: by name, else by node, else the first ready one.
async fn kube_source(
    client: kube::Client,
    rt: tokio::runtime::Handle,
    namespace: &str,
    name: Option<&str>,
    node: Option<&str>,
) -> Result<KubeSource, ZcError> {
    // `<pod>.<namespace>` as istioctl accepts it.
    let (name, namespace) = match name.and_then(|n| n.split_once('.')) {
        Some((n, ns)) => (Some(n), ns.to_string()),
        None => (name, namespace.to_string()),
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let mut list = pods
        .list(&ListParams::default().labels("app=ztunnel"))
        .await
        .map_err(|source| ZcError::ListPods {
            namespace: namespace.clone(),
            source,
        })?
        .items;
    list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    if list.is_empty() {
        return Err(ZcError::NoZtunnel { namespace });
    }
    let pod_name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
    let pod_node = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.clone());
    let found = || {
        list.iter()
            .map(|p| format!("{} on {}", pod_name(p), pod_node(p).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = match (name, node) {
        (Some(name), _) => {
            list.iter()
                .find(|p| pod_name(p) == name)
                .ok_or_else(|| ZcError::NoSuchZtunnel {
                    name: name.to_string(),
                    namespace: namespace.clone(),
                    found: found(),
                })?
        }
        (None, Some(node)) => list
            .iter()
            .find(|p| pod_node(p).as_deref() == Some(node))
            .ok_or_else(|| ZcError::NoZtunnelOnNode {
                node: node.to_string(),
                namespace: namespace.clone(),
                found: found(),
            })?,
        (None, None) => list
            .iter()
            .find(|p| kubeclient::pod_ready(p))
            .unwrap_or(&list[0]),
    };
    Ok(KubeSource {
        client,
        rt,
        pod: pod_name(chosen),
        node: pod_node(chosen),
        namespace,
        timeout: TIMEOUT,
    })
}

/// Fetches and parses the config dump.
pub fn config_dump(src: &dyn AdminSource) -> Result<ConfigDump, ZcError> {
    let bytes = src.fetch("/config_dump")?;
    ConfigDump::parse(&bytes).map_err(|source| ZcError::Dump {
        ztunnel: src.ztunnel().to_string(),
        path: "/config_dump".into(),
        source,
    })
}

/// Fetches and parses the connection list.
pub fn connections(src: &dyn AdminSource) -> Result<Connections, ZcError> {
    let bytes = src.fetch("/debug/connections")?;
    Connections::parse(&bytes).map_err(|source| ZcError::Dump {
        ztunnel: src.ztunnel().to_string(),
        path: "/debug/connections".into(),
        source,
    })
}

/// The text a subcommand prints for a source: the testable core of `run`.
pub fn output(
    src: &dyn AdminSource,
    part: Option<Part>,
    filter: &Filter,
    format: Format,
    raw: bool,
) -> Result<String, ZcError> {
    let now = time::OffsetDateTime::now_utc();
    let Some(part) = part else {
        let conns = connections(src)?;
        return Ok(match format {
            Format::Table => {
                // Names for addresses come from the config dump; without it
                // the addresses are shown as they are.
                let dump = if raw { None } else { config_dump(src).ok() };
                render::connection_table(&conns.connections, dump.as_ref(), filter)
            }
            _ => render::encode(
                &render::select_connections(&conns.connections, filter),
                format,
            )?,
        });
    };
    let dump = config_dump(src)?;
    Ok(match (format, part) {
        (Format::Table, Part::Workloads) => render::workload_table(&dump, filter),
        (Format::Table, Part::Services) => render::service_table(&dump, filter),
        (Format::Table, Part::Policies) => render::policy_table(&dump, filter),
        (Format::Table, Part::Certificates) => render::certificate_table(&dump, filter, now),
        (Format::Table, Part::All) => render::all_tables(&dump, filter, now),
        (format, part) => render::encode(&render::select(&dump, part, filter), format)?,
    })
}

pub fn run(args: ZcArgs) -> Result<i32, ZcError> {
    let mut filter = Filter {
        namespace: args.workloads_namespace.clone(),
        ..Filter::default()
    };
    let mut raw = false;
    let (which, part) = match args.command {
        ZcCommand::Workload {
            which,
            address,
            workload_node,
        } => {
            filter.address = address;
            filter.node = workload_node;
            (which, Some(Part::Workloads))
        }
        ZcCommand::Service { which } => (which, Some(Part::Services)),
        ZcCommand::Policy { which } => (which, Some(Part::Policies)),
        ZcCommand::Certificate { which } => (which, Some(Part::Certificates)),
        ZcCommand::All { which } => (which, Some(Part::All)),
        ZcCommand::Connections {
            which,
            direction,
            raw: r,
        } => {
            filter.direction = direction;
            raw = r;
            (which, None)
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ZcError::Runtime)?;
    let src: Box<dyn AdminSource> = if let Some(file) = args.file {
        Box::new(FileSource::new(file))
    } else {
        let local = LocalMesh::detect(&kubeclient::state_dir());
        let target = kubeclient::target(args.kubeconfig.as_deref(), local.as_ref());
        match (&target, &local) {
            (Target::Local(_), Some(mesh)) => Box::new(local_source(
                mesh,
                which.ztunnel.as_deref(),
                args.node.as_deref(),
            )?),
            _ => {
                let handle = rt.handle().clone();
                Box::new(rt.block_on(async {
                    let client = kubeclient::client(&target).await?;
                    kube_source(
                        client,
                        handle.clone(),
                        &args.namespace,
                        which.ztunnel.as_deref(),
                        args.node.as_deref(),
                    )
                    .await
                })?)
            }
        }
    };
    tracing::debug!(ztunnel = src.ztunnel(), "reading ztunnel admin state");
    let text = output(src.as_ref(), part, &filter, args.output, raw)?;
    print!("{text}");
    Ok(0)
}

#[cfg(test)]
mod tests;
