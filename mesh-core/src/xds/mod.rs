//! Delta xDS (delta ADS over gRPC): how the control plane's view of the mesh
//! reaches every ztunnel before any pod traffic is routed.
//!
//! [`server`] is the control-plane half: a versioned [`server::ResourceStore`]
//! and a tonic service that streams only what changed to each connected node.
//! [`client`] is the data-plane half: it subscribes, hands each response to
//! a [`client::Handler`], ACKs or NACKs, and reconnects with the versions it
//! already holds so a control-plane restart does not resend everything.

pub mod client;
pub mod server;

/// Resource name meaning "every resource of this type".
pub const WILDCARD: &str = "*";
