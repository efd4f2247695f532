//! How a data-plane binary (ztunnel, the waypoint) reaches the control
//! plane: where its mesh state (delta xDS or a local file) and its
//! certificates (the mesh CA or local plug-in CA files) come from, read from
//! the same environment variables in both, and the clients built from that.
//! Used once at start-up, before any traffic.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::ca::CertificateAuthority;
use crate::ca_client::{CaClient, TokenSource};
use crate::certs::{CertificateProvider, LocalCaProvider};
use crate::env::Env;

/// Default projected token path, as Istio's DaemonSets and waypoints mount it.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";
/// Default root of the control plane's serving certificate (the
/// `istio-ca-root-cert` ConfigMap, mounted).
pub const DEFAULT_ROOT_CA: &str = "/var/run/secrets/istio/root-cert.pem";

/// Why the control plane's settings or clients cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// A variable is set to something unusable.
    #[error("{name}={value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    /// None of the variables that name a source is set.
    #[error("{0} must be set")]
    Missing(&'static str),
    #[error("loading the CA from {dir}: {source}")]
    Ca {
        dir: String,
        #[source]
        source: Box<crate::ca::CaError>,
    },
    #[error("reading the control plane's root certificate {path}: {source}")]
    RootCa {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control plane endpoint {address}: {source}")]
    Grpc {
        address: String,
        #[source]
        source: crate::grpc::GrpcError,
    },
}

/// How to reach a control-plane endpoint (xDS or CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane {
    /// `https://host:port`.
    pub address: String,
    /// PEM root that the endpoint's serving certificate chains to.
    pub root_ca: PathBuf,
    /// Bearer token file (a projected ServiceAccount token, audience
    /// `istio-ca`); re-read on every use because it rotates.
    pub token_path: PathBuf,
}

/// Where certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Sign in-process with a CA whose plug-in files (`ca-cert.pem`,
    /// `ca-key.pem`, `root-cert.pem`, optional `cert-chain.pem`) are in this
    /// directory. Every proxy given the same files trusts the others.
    LocalDir(PathBuf),
    /// Ask the mesh CA (`IstioCertificateService`).
    ControlPlane(ControlPlane),
}

/// Where the mesh's state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XdsSource {
    /// A YAML file of resources, reloaded on change.
    LocalFile(PathBuf),
    /// Delta xDS from the control plane.
    ControlPlane(ControlPlane),
}

/// The state and certificate sources from `XDS_ADDRESS` / `LOCAL_XDS_PATH`,
/// `CA_ADDRESS` (default: the xDS address) / `LOCAL_CA_DIR`, `XDS_ROOT_CA`,
/// `CA_ROOT_CA`, `AUTH_TOKEN_PATH`. A local path wins over an address.
pub fn sources_from_env(env: &dyn Env) -> Result<(XdsSource, CaSource), ControlPlaneError> {
    let token_path = PathBuf::from(
        env.var("AUTH_TOKEN_PATH")
            .unwrap_or_else(|| DEFAULT_TOKEN_PATH.into()),
    );
    let xds = match (env.var("XDS_ADDRESS"), env.var("LOCAL_XDS_PATH")) {
        (_, Some(path)) => XdsSource::LocalFile(PathBuf::from(path)),
        (Some(address), None) => XdsSource::ControlPlane(ControlPlane {
            address: https("XDS_ADDRESS", address)?,
            root_ca: PathBuf::from(
                env.var("XDS_ROOT_CA")
                    .unwrap_or_else(|| DEFAULT_ROOT_CA.into()),
            ),
            token_path: token_path.clone(),
        }),
        (None, None) => return Err(ControlPlaneError::Missing("XDS_ADDRESS or LOCAL_XDS_PATH")),
    };
    let ca = match (
        env.var("LOCAL_CA_DIR"),
        env.var("CA_ADDRESS").or(env.var("XDS_ADDRESS")),
    ) {
        (Some(dir), _) => CaSource::LocalDir(PathBuf::from(dir)),
        (None, Some(address)) => CaSource::ControlPlane(ControlPlane {
            address: https("CA_ADDRESS", address)?,
            root_ca: PathBuf::from(
                env.var("CA_ROOT_CA")
                    .or(env.var("XDS_ROOT_CA"))
                    .unwrap_or_else(|| DEFAULT_ROOT_CA.into()),
            ),
            token_path,
        }),
        (None, None) => {
            return Err(ControlPlaneError::Missing(
                "CA_ADDRESS, XDS_ADDRESS or LOCAL_CA_DIR",
            ))
        }
    };
    Ok((xds, ca))
}

fn https(name: &'static str, address: String) -> Result<String, ControlPlaneError> {
    if address.starts_with("https://") {
        Ok(address)
    } else {
        Err(ControlPlaneError::Invalid {
            name,
            value: address,
            reason: "expected https://host:port".into(),
        })
    }
}

/// A gRPC channel to a control-plane endpoint, verified against its root.
pub fn channel(cp: &ControlPlane) -> Result<tonic::transport::Channel, ControlPlaneError> {
    let root =
        std::fs::read_to_string(&cp.root_ca).map_err(|source| ControlPlaneError::RootCa {
            path: cp.root_ca.display().to_string(),
            source,
        })?;
    let grpc = |source| ControlPlaneError::Grpc {
        address: cp.address.clone(),
        source,
    };
    let tls = crate::grpc::client_tls(&root).map_err(grpc)?;
    crate::grpc::channel(&cp.address, tls).map_err(grpc)
}

/// The certificate provider for `ca`: the local CA's files, or the mesh
/// CA authenticated with the proxy's own token (never impersonating: the
/// caller asks for identities its token entitles it to).
pub fn certificate_provider(
    ca: &CaSource,
    cluster_id: &str,
    cert_ttl: Duration,
) -> Result<Arc<dyn CertificateProvider>, ControlPlaneError> {
    Ok(match ca {
        CaSource::LocalDir(dir) => {
            let ca =
                CertificateAuthority::load_dir(dir).map_err(|source| ControlPlaneError::Ca {
                    dir: dir.display().to_string(),
                    source: Box::new(source),
                })?;
            Arc::new(LocalCaProvider::new(Arc::new(ca), cert_ttl))
        }
        CaSource::ControlPlane(cp) => Arc::new(CaClient::new(
            channel(cp)?,
            TokenSource::File(cp.token_path.clone()),
            cluster_id.to_string(),
            cert_ttl,
            None,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_win_and_addresses_must_be_https() {
        let (xds, ca) = sources_from_env(&[
            ("XDS_ADDRESS", "https://istiod:15012"),
            ("LOCAL_CA_DIR", "/ca"),
        ])
        .unwrap();
        assert!(
            matches!(xds, XdsSource::ControlPlane(c) if c.root_ca.as_path() == std::path::Path::new(DEFAULT_ROOT_CA))
        );
        assert_eq!(ca, CaSource::LocalDir("/ca".into()));
        let (_, ca) = sources_from_env(&[
            ("LOCAL_XDS_PATH", "/x.yaml"),
            ("XDS_ADDRESS", "https://istiod:15012"),
            ("XDS_ROOT_CA", "/root.pem"),
        ])
        .unwrap();
        assert!(
            matches!(ca, CaSource::ControlPlane(c) if c.root_ca.as_path() == std::path::Path::new("/root.pem"))
        );
        let err = sources_from_env(&[("XDS_ADDRESS", "istiod:15012")]).unwrap_err();
        assert!(err.to_string().contains("XDS_ADDRESS"), "{err}");
        let err = sources_from_env(&[("LOCAL_XDS_PATH", "/x.yaml")]).unwrap_err();
        assert!(matches!(err, ControlPlaneError::Missing(_)), "{err}");
    }
}
