//! `ambientctl`: the mesh's command-line tool, with `istioctl`'s verbs where
//! they exist: `local` (the local mesh: up, down, status, exec), `zc` /
//! `ztunnel-config` (a ztunnel's view), `label namespace` (enrollment),
//! `waypoint` (apply, list, delete, status of waypoints) and `precheck` (is
//! the cluster or local mesh ready for the mesh).

#![forbid(unsafe_code)]

mod kubeclient;
mod label;
mod local;
mod precheck;
mod waypoint;
mod zc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ambientctl",
    version,
    about = "Control and inspect the ambient mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The local mesh: a real Kubernetes control plane, nodes and pods as
    /// network namespaces, istiod-lite, ztunnel and the node agent per node.
    Local(local::LocalArgs),
    /// Inspect a ztunnel: its workloads, services, policies, certificates
    /// and connections (istioctl's `ztunnel-config`).
    #[command(name = "zc", visible_alias = "ztunnel-config")]
    Zc(zc::ZcArgs),
    /// Add or remove labels that enroll objects in the mesh.
    Label(label::LabelArgs),
    /// Check that the cluster (or the local mesh) is ready for the mesh.
    Precheck(precheck::PrecheckArgs),
    /// Manage waypoints: the L7 proxies of a namespace or service
    /// (Gateways of class istio-waypoint).
    Waypoint(waypoint::WaypointArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Local(args) => local::run(args),
        // These errors are one-line messages that already name their
        // cause; printing the source chain again would repeat it.
        Command::Zc(args) => zc::run(args).map_err(|e| anyhow::anyhow!("{e}")),
        Command::Label(args) => label::run(args).map_err(|e| anyhow::anyhow!("{e}")),
        Command::Precheck(args) => precheck::run(args).map_err(|e| anyhow::anyhow!("{e}")),
        Command::Waypoint(args) => waypoint::run(args).map_err(|e| anyhow::anyhow!("{e}")),
    };
    std::process::exit(match code {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parses(args: &[&str]) -> bool {
        Cli::try_parse_from(std::iter::once("ambientctl").chain(args.iter().copied())).is_ok()
    }

    /// The istioctl spellings users already type.
    #[test]
    fn command_line_surface() {
        assert!(parses(&["zc", "workload", "ztunnel-node1"]));
        assert!(parses(&[
            "ztunnel-config",
            "workloads",
            "ztunnel-abc.istio-system",
            "-o",
            "json"
        ]));
        assert!(parses(&[
            "zc",
            "w",
            "--workloads-namespace",
            "bookinfo",
            "--address",
            "10.0.0.1"
        ]));
        assert!(parses(&[
            "zc",
            "-n",
            "kube-system",
            "service",
            "--workload-namespace",
            "x"
        ]));
        assert!(parses(&["zc", "svc", "--node", "node2", "-o", "yaml"]));
        assert!(parses(&["zc", "policy", "-o", "short"]));
        assert!(parses(&["zc", "certificate", "--kubeconfig", "/k"]));
        assert!(parses(&[
            "zc",
            "connections",
            "--direction",
            "inbound",
            "--raw"
        ]));
        assert!(parses(&["zc", "all", "-f", "dump.json"]));
        assert!(!parses(&["zc", "connections", "--direction", "sideways"]));
        assert!(!parses(&["zc", "workload", "-o", "wide"]));
        assert!(parses(&["label", "namespace", "bookinfo"]));
        assert!(parses(&["label", "ns", "bookinfo", "--remove"]));
        assert!(parses(&["precheck"]));
        assert!(parses(&["precheck", "-i", "mesh-system"]));
        assert!(parses(&["waypoint", "apply"]));
        assert!(parses(&[
            "waypoint",
            "apply",
            "-n",
            "bookinfo",
            "--name",
            "reviews-wp",
            "--enroll-namespace",
            "--for",
            "workload",
            "--wait",
            "--timeout",
            "30"
        ]));
        assert!(parses(&[
            "waypoint",
            "apply",
            "-w",
            "--waypoint-timeout",
            "2m"
        ]));
        assert!(!parses(&["waypoint", "apply", "--for", "everything"]));
        assert!(parses(&["waypoint", "generate", "--for", "all"]));
        assert!(parses(&["waypoint", "list", "-A"]));
        assert!(parses(&["waypoint", "list", "-n", "bookinfo"]));
        assert!(parses(&["waypoint", "delete", "a", "b", "-n", "x"]));
        assert!(parses(&["waypoint", "delete", "--all"]));
        assert!(parses(&[
            "waypoint", "status", "--name", "waypoint", "-n", "x"
        ]));
    }
}
