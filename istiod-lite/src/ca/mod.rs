//! The mesh CA's gRPC face, `istio.v1.auth.IstioCertificateService`: every
//! ztunnel sends it one CSR per local identity at start and again at each
//! rotation, and the certificates it signs are what HBONE peers verify.
//!
//! Authorization is the point of this module. A caller gets its own
//! identity; a node proxy (ztunnel) may also get the identity of a pod, but
//! only one that runs on the proxy's own node, judged from its pod-bound
//! token and the cluster's pod placement ([`NodeLookup`]). A compromised
//! node can therefore mint certificates only for workloads already on it.

mod authn;
mod root;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_core::ca::{csr_identities, CaError, CertificateAuthority, DEFAULT_MAX_WORKLOAD_TTL};
use mesh_core::ca_client::{CLUSTER_ID_HEADER, IMPERSONATED_IDENTITY};
use mesh_core::identity::Identity;
use mesh_core::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_core::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument};

pub use authn::{
    caller_from_review, AuthError, Authenticator, Caller, PodRef, TokenReviewAuthenticator,
    DEFAULT_AUDIENCE, DEFAULT_REVIEW_CACHE_TTL,
};
pub use root::{load_or_create_root, RootError, RootSource, DEFAULT_ROOT_SECRET};

/// Default workload certificate lifetime (Istio's).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where pods run, as far as the CA needs to know.
pub trait NodeLookup: Send + Sync + 'static {
    /// The node the pod `namespace/name` is scheduled on, if known.
    fn pod_node(&self, namespace: &str, name: &str) -> Option<String>;
    /// Whether some pod running as `namespace`/`service_account` is on `node`.
    fn identity_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool;
}

/// The signing CA, replaceable while serving (e.g. when plug-in files
/// change). Clones share the slot.
#[derive(Clone)]
pub struct CaHandle(Arc<RwLock<Arc<CertificateAuthority>>>);

impl std::fmt::Debug for CaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CaHandle").field(&self.current()).finish()
    }
}

impl CaHandle {
    pub fn new(ca: Arc<CertificateAuthority>) -> Self {
        CaHandle(Arc::new(RwLock::new(ca)))
    }

    pub fn current(&self) -> Arc<CertificateAuthority> {
        // A poisoned lock still holds a whole Arc: replacing it is one store.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, ca: Arc<CertificateAuthority>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = ca;
    }
}

impl From<CertificateAuthority> for CaHandle {
    fn from(ca: CertificateAuthority) -> Self {
        CaHandle::new(Arc::new(ca))
    }
}

impl From<Arc<CertificateAuthority>> for CaHandle {
    fn from(ca: Arc<CertificateAuthority>) -> Self {
        CaHandle::new(ca)
    }
}

#[derive(Debug, Clone)]
pub struct CaServiceConfig {
    /// Lifetime when the request names none (`validity_duration <= 0`).
    pub default_ttl: Duration,
    /// Longer requests are shortened to this (and to the CA's own cap).
    pub max_ttl: Duration,
    pub trust_domain: String,
    /// Identities allowed to ask for the identities of pods on their node.
    pub impersonators: Vec<Identity>,
}

impl CaServiceConfig {
    /// Istio's defaults for `trust_domain`: 24 h certificates, at most 90
    /// days, and the ztunnel service account as the only impersonator.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        let trust_domain = trust_domain.into();
        CaServiceConfig {
            default_ttl: DEFAULT_WORKLOAD_TTL,
            max_ttl: DEFAULT_MAX_WORKLOAD_TTL,
            impersonators: vec![Identity::new(
                trust_domain.as_str(),
                "istio-system",
                "ztunnel",
            )],
            trust_domain,
        }
    }
}

impl Default for CaServiceConfig {
    fn default() -> Self {
        CaServiceConfig::new("cluster.local")
    }
}

/// The `IstioCertificateService` implementation.
#[derive(Clone)]
pub struct CaService {
    ca: CaHandle,
    authn: Arc<dyn Authenticator>,
    nodes: Arc<dyn NodeLookup>,
    cfg: Arc<CaServiceConfig>,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("ca", &self.ca)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn bearer_token(metadata: &MetadataMap) -> Result<String, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("no authorization header"))?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| Status::unauthenticated("the authorization header is not a bearer token"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(Status::unauthenticated(
            "the authorization header is not a bearer token",
        ));
    }
    Ok(token.to_string())
}

/// The `ImpersonatedIdentity` the request names, if any.
fn impersonated(req: &IstioCertificateRequest) -> Result<Option<Identity>, Status> {
    use pbjson_types::value::Kind;
    let Some(value) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(Kind::StringValue(s)) => s.parse().map(Some).map_err(|e| {
            Status::invalid_argument(format!("{IMPERSONATED_IDENTITY} {s:?} is invalid: {e}"))
        }),
        Some(Kind::NullValue(_)) | None => Ok(None),
        Some(_) => Err(Status::invalid_argument(format!(
            "{IMPERSONATED_IDENTITY} must be a string"
        ))),
    }
}

fn ca_error_status(err: CaError) -> Status {
    match err {
        CaError::Pem { .. }
        | CaError::Missing(_)
        | CaError::Parse { .. }
        | CaError::CsrSignature
        | CaError::CsrKeyAlgorithm(_) => Status::invalid_argument(format!("malformed CSR: {err}")),
        other => {
            warn!(error = %other, "signing failed");
            Status::internal("signing the certificate failed")
        }
    }
}

impl CaService {
    pub fn new(
        ca: impl Into<CaHandle>,
        authn: Arc<dyn Authenticator>,
        nodes: Arc<dyn NodeLookup>,
        cfg: CaServiceConfig,
    ) -> Self {
        CaService {
            ca: ca.into(),
            authn,
            nodes,
            cfg: Arc::new(cfg),
        }
    }

    /// The slot holding the signing CA, for replacing it while serving.
    pub fn ca(&self) -> &CaHandle {
        &self.ca
    }

    /// The tonic service to add to a `tonic::transport::Server`.
    pub fn into_service(self) -> IstioCertificateServiceServer<CaService> {
        IstioCertificateServiceServer::new(self)
    }

    /// Decides which identity `caller` gets for a request naming `requested`.
    fn authorize(&self, caller: &Caller, requested: Option<Identity>) -> Result<Identity, Status> {
        let requested = match requested {
            None => return Ok(caller.identity.clone()),
            Some(r) if r == caller.identity => return Ok(r),
            Some(r) => r,
        };
        if !self.cfg.impersonators.contains(&caller.identity) {
            return Err(Status::permission_denied(format!(
                "{} may not request certificates for other identities ({requested})",
                caller.identity
            )));
        }
        if requested.trust_domain() != self.cfg.trust_domain {
            return Err(Status::permission_denied(format!(
                "{requested} is not in trust domain {}",
                self.cfg.trust_domain
            )));
        }
        let pod = caller.pod.as_ref().ok_or_else(|| {
            Status::permission_denied(format!(
                "{} may request {requested} only with a pod-bound token",
                caller.identity
            ))
        })?;
        let node = self
            .nodes
            .pod_node(&pod.namespace, &pod.name)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "{} (pod {}/{}): the pod's node is unknown, so {requested} cannot be checked",
                    caller.identity, pod.namespace, pod.name
                ))
            })?;
        if !self
            .nodes
            .identity_on_node(requested.namespace(), requested.service_account(), &node)
        {
            return Err(Status::permission_denied(format!(
                "{} on node {node} may not request {requested}: no pod with that identity runs on {node}",
                caller.identity
            )));
        }
        Ok(requested)
    }

    async fn create(
        &self,
        metadata: &MetadataMap,
        req: IstioCertificateRequest,
    ) -> Result<Vec<String>, Status> {
        let span = tracing::Span::current();
        let token = bearer_token(metadata)?;
        let caller = self.authn.authenticate(&token).await.map_err(|e| match e {
            AuthError::Rejected(why) => Status::unauthenticated(why),
            AuthError::Review(source) => {
                warn!(error = %source, "token review failed");
                Status::unavailable("the token could not be reviewed")
            }
        })?;
        span.record("caller", tracing::field::display(&caller.identity));
        if let Some(pod) = &caller.pod {
            span.record("pod", format!("{}/{}", pod.namespace, pod.name));
        }
        let requested = impersonated(&req)?;
        let identity = self.authorize(&caller, requested)?;
        span.record("identity", tracing::field::display(&identity));

        let asked = csr_identities(&req.csr).map_err(ca_error_status)?;
        if let Some(other) = asked
            .iter()
            .find(|uri| uri.parse::<Identity>().ok().as_ref() != Some(&identity))
        {
            return Err(Status::invalid_argument(format!(
                "the CSR asks for {other}, but the caller may only get {identity}"
            )));
        }

        let ca = self.ca.current();
        let max = self.cfg.max_ttl.min(ca.max_ttl());
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs),
            _ => self.cfg.default_ttl,
        }
        .min(max);
        let chain = ca
            .sign_csr(&req.csr, &identity, ttl)
            .map_err(ca_error_status)?;
        info!(ttl_s = ttl.as_secs(), "certificate granted");
        Ok(chain)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer: Option<SocketAddr> = request.remote_addr();
        let cluster = request
            .metadata()
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let span = info_span!(
            "csr",
            peer = ?peer,
            cluster = %cluster,
            caller = tracing::field::Empty,
            pod = tracing::field::Empty,
            identity = tracing::field::Empty,
        );
        let (metadata, _, req) = request.into_parts();
        let result = self.create(&metadata, req).instrument(span.clone()).await;
        match result {
            Ok(cert_chain) => Ok(Response::new(IstioCertificateResponse { cert_chain })),
            Err(status) => {
                span.in_scope(|| {
                    warn!(code = ?status.code(), reason = status.message(), "certificate refused")
                });
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn req_with(meta: Option<pbjson_types::Value>) -> IstioCertificateRequest {
        IstioCertificateRequest {
            metadata: meta.map(|v| pbjson_types::Struct {
                fields: HashMap::from([(IMPERSONATED_IDENTITY.to_string(), v)]),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn impersonation_metadata() {
        use pbjson_types::value::Kind;
        let s = |v: &str| {
            Some(pbjson_types::Value {
                kind: Some(Kind::StringValue(v.into())),
            })
        };
        assert_eq!(impersonated(&req_with(None)).unwrap(), None);
        assert_eq!(impersonated(&req_with(s(""))).unwrap(), None);
        assert_eq!(
            impersonated(&req_with(s("spiffe://td/ns/a/sa/b"))).unwrap(),
            Some(Identity::new("td", "a", "b"))
        );
        assert_eq!(
            impersonated(&req_with(s("nope"))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let num = Some(pbjson_types::Value {
            kind: Some(Kind::NumberValue(1.0)),
        });
        assert_eq!(
            impersonated(&req_with(num)).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn bearer_tokens() {
        let with = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("authorization", v.parse().unwrap());
            m
        };
        assert_eq!(bearer_token(&with("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(&with("bearer  abc ")).unwrap(), "abc");
        for bad in ["Basic abc", "Bearer", "Bearer  ", "abc"] {
            assert_eq!(
                bearer_token(&with(bad)).unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{bad}"
            );
        }
        assert_eq!(
            bearer_token(&MetadataMap::new()).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
