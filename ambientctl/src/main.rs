//! `ambientctl`: the mesh's command-line tool, with `istioctl`'s verbs where
//! they exist. Today: `local` (the local mesh: up, down, status, exec).

#![forbid(unsafe_code)]

mod local;

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
    };
    std::process::exit(match code {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    });
}
