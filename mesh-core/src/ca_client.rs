//! The ztunnel's side of the CA exchange: a [`CertificateProvider`] that
//! sends a CSR to the control plane's `IstioCertificateService` and checks
//! what comes back before any HBONE connection presents it.
//!
//! The ztunnel authenticates with its own service-account token and asks for
//! the identities of the pods on its node by naming them in the
//! `ImpersonatedIdentity` metadata; the CA decides whether that is allowed.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tracing::debug;

use crate::ca::generate_csr;
use crate::certs::{CertError, CertificateProvider};
use crate::identity::Identity;
use crate::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::ca::IstioCertificateRequest;
use crate::tls::{pem_encode, WorkloadCertificate};

/// Metadata key naming the identity a node proxy asks for on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Header carrying the caller's cluster.
pub const CLUSTER_ID_HEADER: &str = "clusterid";
/// How long one CreateCertificate call may take, connect included.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("reading the token {}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the token {} is empty", .0.display())]
    EmptyToken(PathBuf),
    #[error("the {0} header value is not valid ASCII metadata")]
    InvalidHeader(&'static str),
    #[error("CreateCertificate failed")]
    Rpc(#[from] tonic::Status),
    #[error("CreateCertificate did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the CA answered with an empty certificate chain")]
    EmptyChain,
    #[error("invalid PEM in the CA's certificate chain")]
    Pem(#[source] rustls::pki_types::pem::Error),
}

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A projected service-account token; read on every call because the
    /// kubelet rotates it.
    File(PathBuf),
    Static(String),
}

impl TokenSource {
    async fn token(&self) -> Result<String, CaClientError> {
        match self {
            TokenSource::Static(t) => Ok(t.trim().to_string()),
            TokenSource::File(path) => {
                let t = tokio::fs::read_to_string(path).await.map_err(|source| {
                    CaClientError::Token {
                        path: path.clone(),
                        source,
                    }
                })?;
                let t = t.trim();
                if t.is_empty() {
                    return Err(CaClientError::EmptyToken(path.clone()));
                }
                Ok(t.to_string())
            }
        }
    }
}

/// Fetches workload certificates from the mesh CA over gRPC.
#[derive(Clone)]
pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    token: TokenSource,
    cluster_id: String,
    ttl: Duration,
    own_identity: Option<Identity>,
    call_timeout: Duration,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("cluster_id", &self.cluster_id)
            .field("ttl", &self.ttl)
            .field("own_identity", &self.own_identity)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// `own_identity` is the identity the token stands for; certificates for
    /// any other identity (or all, when it is unknown) are requested with
    /// `ImpersonatedIdentity`.
    pub fn new(
        channel: Channel,
        token: TokenSource,
        cluster_id: String,
        ttl: Duration,
        own_identity: Option<Identity>,
    ) -> Self {
        CaClient {
            client: IstioCertificateServiceClient::new(channel),
            token,
            cluster_id,
            ttl,
            own_identity,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// Overrides [`DEFAULT_CALL_TIMEOUT`].
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    fn request(
        &self,
        id: &Identity,
        csr: String,
        token: &str,
    ) -> Result<tonic::Request<IstioCertificateRequest>, CaClientError> {
        let metadata = if self.own_identity.as_ref() != Some(id) {
            let mut fields = HashMap::new();
            fields.insert(
                IMPERSONATED_IDENTITY.to_string(),
                pbjson_types::Value {
                    kind: Some(pbjson_types::value::Kind::StringValue(id.to_string())),
                },
            );
            Some(pbjson_types::Struct { fields })
        } else {
            None
        };
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        let auth = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| CaClientError::InvalidHeader("authorization"))?;
        let cluster = MetadataValue::try_from(self.cluster_id.as_str())
            .map_err(|_| CaClientError::InvalidHeader(CLUSTER_ID_HEADER))?;
        req.metadata_mut().insert("authorization", auth);
        req.metadata_mut().insert(CLUSTER_ID_HEADER, cluster);
        Ok(req)
    }
}

/// Splits the CA's answer into (chain, root). Entries may each hold several
/// PEM blocks; the last certificate overall is the root.
fn split_chain(
    chain: &[String],
) -> Result<(Vec<CertificateDer<'static>>, CertificateDer<'static>), CaClientError> {
    let mut certs = Vec::new();
    for entry in chain {
        for cert in CertificateDer::pem_slice_iter(entry.as_bytes()) {
            certs.push(cert.map_err(CaClientError::Pem)?);
        }
    }
    let root = certs.pop().ok_or(CaClientError::EmptyChain)?;
    if certs.is_empty() {
        // A bare root is not a leaf certificate.
        return Err(CaClientError::EmptyChain);
    }
    Ok((certs, root))
}

impl CertificateProvider for CaClient {
    fn fetch(&self, id: &Identity) -> BoxFuture<'static, Result<WorkloadCertificate, CertError>> {
        let this = self.clone();
        let id = id.clone();
        Box::pin(async move {
            let (csr, key) = generate_csr(&id)?;
            let token = this.token.token().await.map_err(CertError::fetch)?;
            let req = this.request(&id, csr, &token).map_err(CertError::fetch)?;
            let mut client = this.client.clone();
            let resp = tokio::time::timeout(this.call_timeout, client.create_certificate(req))
                .await
                .map_err(|_| CertError::fetch(CaClientError::Timeout(this.call_timeout)))?
                .map_err(|s| CertError::fetch(CaClientError::Rpc(s)))?
                .into_inner();
            let (chain, root) = split_chain(&resp.cert_chain).map_err(CertError::fetch)?;
            let chain_pem: String = chain.iter().map(|c| pem_encode("CERTIFICATE", c)).collect();
            let cert =
                WorkloadCertificate::from_pem(&chain_pem, &key, &pem_encode("CERTIFICATE", &root))?;
            if cert.identity() != &id {
                return Err(CertError::IdentityMismatch {
                    requested: Box::new(id),
                    got: Box::new(cert.identity().clone()),
                });
            }
            debug!(identity = %id, serial = cert.serial(), "certificate received from the CA");
            Ok(cert)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;

    #[test]
    fn chain_split_takes_the_last_certificate_as_root() {
        let root = CertificateAuthority::generate("cluster.local").unwrap();
        let inter = root
            .issue_intermediate("cluster.local", Duration::from_secs(3600))
            .unwrap();
        let id = Identity::new("cluster.local", "a", "b");
        let (csr, _) = generate_csr(&id).unwrap();
        let signed = inter.sign_csr(&csr, &id, Duration::from_secs(60)).unwrap();
        assert_eq!(signed.len(), 3);
        let (chain, r) = split_chain(&signed).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(r, root.roots()[0]);
        // The same certificates packed into one entry.
        let (chain2, r2) = split_chain(&[signed.concat()]).unwrap();
        assert_eq!((chain2, r2), (chain, r));

        assert!(matches!(split_chain(&[]), Err(CaClientError::EmptyChain)));
        assert!(matches!(
            split_chain(&[root.root_pem()]),
            Err(CaClientError::EmptyChain)
        ));
        assert!(matches!(
            split_chain(&["-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n".into()]),
            Err(CaClientError::Pem(_))
        ));
    }

    #[tokio::test]
    async fn token_file_is_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "one\n").unwrap();
        let src = TokenSource::File(path.clone());
        assert_eq!(src.token().await.unwrap(), "one");
        std::fs::write(&path, "two").unwrap();
        assert_eq!(src.token().await.unwrap(), "two");
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(
            src.token().await,
            Err(CaClientError::EmptyToken(_))
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            src.token().await,
            Err(CaClientError::Token { .. })
        ));
    }

    #[tokio::test]
    async fn request_headers_and_impersonation() {
        let channel = crate::grpc::channel(
            "https://127.0.0.1:1",
            crate::grpc::client_tls(
                &CertificateAuthority::generate("cluster.local")
                    .unwrap()
                    .root_pem(),
            )
            .unwrap(),
        )
        .unwrap();
        let own = Identity::new("cluster.local", "istio-system", "ztunnel");
        let other = Identity::new("cluster.local", "a", "b");
        let client = CaClient::new(
            channel,
            TokenSource::Static("tok".into()),
            "Kubernetes".into(),
            Duration::from_secs(3600),
            Some(own.clone()),
        );
        let req = client.request(&own, "csr".into(), "tok").unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer tok");
        assert_eq!(req.metadata().get("clusterid").unwrap(), "Kubernetes");
        assert_eq!(req.get_ref().validity_duration, 3600);
        assert!(req.get_ref().metadata.is_none());

        let req = client.request(&other, "csr".into(), "tok").unwrap();
        let meta = req.get_ref().metadata.as_ref().unwrap();
        assert_eq!(
            meta.fields.get(IMPERSONATED_IDENTITY).unwrap().kind,
            Some(pbjson_types::value::Kind::StringValue(other.to_string()))
        );
        assert!(matches!(
            client.request(&own, "csr".into(), "bad\ntoken"),
            Err(CaClientError::InvalidHeader("authorization"))
        ));
    }
}
