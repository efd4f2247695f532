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
