//! istiod-lite's listeners: one TLS gRPC port (istiod's 15012) carrying
//! both delta xDS and the CA, and a plain HTTP port with `/ready`.
//!
//! Both xDS and the CA authenticate callers with the same bearer token (a
//! ServiceAccount token reviewed by the API server), so a ztunnel needs one
//! credential for everything it asks of the control plane.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh_core::drain;
use mesh_core::readiness::Ready;
use mesh_core::xds::server::StreamAuthenticator;
use tonic::Status;

use crate::ca::Authenticator;

/// Errors of the listeners.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// xDS stream authentication with the CA's authenticator: a stream must
/// carry `authorization: Bearer <token>` that the API server vouches for.
pub struct TokenStreamAuth(pub Arc<dyn Authenticator>);

impl StreamAuthenticator for TokenStreamAuth {
    fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> BoxFuture<'static, Result<String, Status>> {
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| t.trim().to_string());
        let authn = self.0.clone();
        Box::pin(async move {
            let Some(token) = token else {
                return Err(Status::unauthenticated("xds: no bearer token"));
            };
            match authn.authenticate(&token).await {
                Ok(caller) => Ok(caller.identity.to_string()),
                Err(crate::ca::AuthError::Rejected(why)) => {
                    Err(Status::unauthenticated(format!("xds: {why}")))
                }
                Err(e) => Err(Status::unavailable(format!("xds: {e}"))),
            }
        })
    }
}

/// Serves `GET /ready` (200 once every start-up task is done, else 503
/// naming what is pending) until drained.
pub async fn serve_http(listener: tokio::net::TcpListener, ready: Ready, drain: drain::Watch) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};

    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    continue;
                }
            },
            _ = drain.signaled() => return,
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let ready = ready.clone();
                async move {
                    let (code, body) = match req.uri().path() {
                        "/ready" if ready.is_ready() => (StatusCode::OK, "ready\n".to_string()),
                        "/ready" => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {}\n", ready.pending().join(", ")),
                        ),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = code;
                    Ok::<_, Infallible>(r)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}
