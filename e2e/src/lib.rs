//! End-to-end harness of the mesh: a local network of nodes and pods built
//! from Linux network namespaces ([`topology`]), the in-pod capture rules the
//! CNI installs ([`rules`]), packet captures on the wires between them
//! ([`capture`]) and the test application that plays client and server
//! ([`app`], binary `mesh-app`). Everything needs root; nothing touches the
//! host's own network namespace.

pub mod app;
pub mod capture;
pub mod controlplane;
pub mod interrupt;
pub mod kube;
pub mod mesh;
pub mod netns;
pub mod rules;
pub mod topology;

pub use capture::Capture;
pub use netns::{HasNetns, Netns};
pub use topology::{ExecOutput, ExternalHost, Node, Pod, Process, Topology, TopologyBuilder};

/// Whether the process may create network namespaces. Tests that need them
/// print why and return early when this is false.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}
