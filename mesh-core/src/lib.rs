//! mesh-core: the library every deployable binary of the mesh links.
//!
//! It holds what both ends of a hop must agree on: the Workload API and ZDS
//! protos, SPIFFE identities, the mutual-TLS configuration, the CA's signing
//! code, HBONE (HTTP/2 CONNECT) client and server, and the process-wide drain
//! and readiness mechanisms.

pub mod ca;
pub mod ca_client;
pub mod certs;
pub mod controlplane;
pub mod copy;
pub mod drain;
pub mod env;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod proto;
pub mod readiness;
mod sys;
pub mod tls;
pub mod xds;
pub mod zds;
