//! The node agent of the ambient mesh, one per node (the CNI DaemonSet in
//! Kubernetes). It sits between the CNI plugin's ADD/DEL of a pod and the
//! node's ztunnel: it installs the in-pod capture rules ([`rules`]) that send
//! the pod's TCP traffic to ztunnel's in-pod listeners, and hands the pod's
//! network namespace to ztunnel over ZDS ([`ztunnel`]), and keeps checking
//! that no enrolled pod has lost its rules ([`repair`]).

#![forbid(unsafe_code)]

pub mod repair;
pub mod rules;
pub mod ztunnel;

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// Runs a short configuration command (`nft`, `ip`) to completion with
/// `stdin` fed to it (or none), capturing stdout and stderr.
pub fn run_with_stdin(cmd: &mut Command, stdin: Option<&[u8]>) -> std::io::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    match stdin {
        None => cmd.stdin(Stdio::null()).output(),
        Some(input) => {
            cmd.stdin(Stdio::piped());
            let mut child = cmd.spawn()?;
            if let Some(mut pipe) = child.stdin.take() {
                pipe.write_all(input)?;
            }
            child.wait_with_output()
        }
    }
}
