//! `mesh-cni`: the chained CNI plugin binary. The container runtime runs it
//! while setting up a pod's network, before the pod's processes start;
//! stdout carries the CNI result, logs go to stderr.

use std::io::{Read, Write};

use cni_plugin::{ErrorResult, ProcessEnv, CODE_DECODE};

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_CNI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut stdin = Vec::new();
    let (status, out) = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => cni_plugin::run(&ProcessEnv, &stdin),
        Err(e) => {
            let result = ErrorResult {
                cni_version: "1.0.0".to_string(),
                code: CODE_DECODE,
                msg: format!("reading the network configuration from stdin: {e}"),
                details: String::new(),
            };
            (1, result.to_json())
        }
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(&out).and_then(|()| stdout.flush()) {
        tracing::error!("writing the result to stdout: {e}");
        std::process::exit(1);
    }
    std::process::exit(status);
}
