//! End-to-end harness of the mesh: a local network of nodes and pods built
//! from Linux network namespaces ([`topology`]), a running mesh on it whose
//! node agent parts (in-pod capture rules, ZDS) come from `node-agent`
//! ([`mesh`]), packet captures on the wires between them
//! ([`capture`]) and the test application that plays client and server
//! ([`app`], binary `mesh-app`). Everything needs root; nothing touches the
//! host's own network namespace.

pub mod app;
pub mod capture;
pub mod clusterdns;
pub mod controlplane;
pub mod interrupt;
pub mod kube;
pub mod local;
pub mod mesh;
pub mod netns;
pub mod procstat;
pub mod samples;
pub mod svcproxy;
pub mod topology;

pub use capture::Capture;
pub use netns::{HasNetns, Netns};
pub use topology::{ExecOutput, ExternalHost, Node, Pod, Process, Topology, TopologyBuilder};

// The harness's namespaces are what the node agent's rules configure.
impl node_agent::rules::PodNetns for Netns {
    fn netns_path(&self) -> std::path::PathBuf {
        self.path()
    }
}

impl node_agent::rules::PodNetns for Pod {
    fn netns_path(&self) -> std::path::PathBuf {
        self.netns().path()
    }
}

impl node_agent::rules::PodNetns for Node {
    fn netns_path(&self) -> std::path::PathBuf {
        self.netns().path()
    }
}

impl node_agent::rules::PodNetns for ExternalHost {
    fn netns_path(&self) -> std::path::PathBuf {
        self.netns().path()
    }
}

/// Whether the process may create network namespaces. Tests that need them
/// print why and return early when this is false.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}
