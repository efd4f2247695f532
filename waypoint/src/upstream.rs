//! The waypoint's outbound hop: a pooled HBONE `CONNECT` to the chosen
//! endpoint pod's 15008 with the waypoint's own certificate, expecting the
//! pod's SPIFFE identity, and one HTTP exchange (or a TCP byte stream)
//! carried inside that tunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::certs::CertificateManager;
use mesh_core::hbone::{self, ConnectRequest, H2Stream, HboneError, Pool};
use mesh_core::identity::Identity;
use mesh_core::tls;

use crate::state::Endpoint;

/// Connections are shared per destination address and expected identity;
/// the source identity is always the waypoint's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub dst: SocketAddr,
    pub identity: Identity,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("waypoint certificate: {0}")]
    Certificate(#[from] mesh_core::certs::CertError),
    #[error("HBONE to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: HboneError,
    },
    #[error("HTTP to {dst}: {source}")]
    Http {
        dst: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// The tunnel or the TCP/TLS connection under it could not be set up
    /// (Envoy's `connect-failure`, response flag `UF`).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::Certificate(_)
        )
    }
}

/// Dials HBONE tunnels to endpoints.
#[derive(Clone)]
pub struct Connector {
    pub pool: Pool<PoolKey>,
    pub certs: CertificateManager,
    pub identity: Identity,
    pub hbone_port: u16,
    pub connect_timeout: Duration,
}

impl Connector {
    /// A `CONNECT` tunnel to `ep`, carrying `headers` (forwarded,
    /// traceparent, ...).
    pub async fn tunnel(
        &self,
        ep: &Endpoint,
        headers: HeaderMap,
    ) -> Result<H2Stream, UpstreamError> {
        let cert = self.certs.get(&self.identity).await?;
        let expected = vec![ep.workload.identity()];
        let hbone_addr = SocketAddr::new(ep.ip, self.hbone_port);
        let key = PoolKey {
            dst: hbone_addr,
            identity: expected[0].clone(),
        };
        let timeout = self.connect_timeout;
        let dial = move || async move {
            let io = |e: std::io::Error| HboneError::Io(e);
            let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(hbone_addr))
                .await
                .map_err(|_| {
                    io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    ))
                })?
                .map_err(io)?;
            let _ = tcp.set_nodelay(true);
            let cfg =
                tls::client_config(&cert, &expected).map_err(|e| io(std::io::Error::other(e)))?;
            let name = rustls::pki_types::ServerName::IpAddress(hbone_addr.ip().into());
            let tls = tokio::time::timeout(
                timeout,
                tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
            )
            .await
            .map_err(|_| {
                io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ))
            })?
            .map_err(io)?;
            Ok::<_, HboneError>(tls)
        };
        let target = SocketAddr::new(ep.ip, ep.port);
        let req = ConnectRequest::new(target).with_headers(headers);
        self.pool
            .connect(&key, dial, req)
            .await
            .map_err(|source| UpstreamError::Connect {
                dst: target,
                source,
            })
    }

    /// Sends one request to `ep` over a fresh tunnel, speaking `version`
    /// (HTTP/2 when the client spoke it, so gRPC keeps its trailers).
    pub async fn send(
        &self,
        ep: &Endpoint,
        tunnel_headers: HeaderMap,
        req: Request<crate::http::Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let dst = SocketAddr::new(ep.ip, ep.port);
        let stream = self.tunnel(ep, tunnel_headers).await?;
        let io = TokioIo::new(stream);
        let http = |source| UpstreamError::Http { dst, source };
        if req.version() == Version::HTTP_2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(http)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            sender.send_request(req).await.map_err(http)
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(http)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
                }
            });
            sender.send_request(req).await.map_err(http)
        }
    }
}

/// A pool with the mesh's HBONE defaults.
pub fn new_pool() -> Pool<PoolKey> {
    Pool::new(hbone::PoolConfig::default())
}

/// Shared handle used by the proxy.
pub type SharedConnector = Arc<Connector>;
