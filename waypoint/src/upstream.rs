//! The waypoint's outbound hop: a pooled HBONE `CONNECT` to the chosen
//! endpoint pod's 15008 with the waypoint's own certificate, expecting the
//! pod's SPIFFE identity, and an HTTP connection (or a TCP byte stream)
//! carried inside that tunnel. HTTP connections are kept alive and reused
//! through the cluster's pool ([`crate::cluster`]), so a request normally
//! costs no new tunnel.

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

use crate::cluster::{Checkout, Cluster, ConnKey, Lease, Overflow, Sender};
use crate::state::Endpoint;

/// Times a request is moved to another connection when a pooled one turns
/// out to be closed before the request was written to it.
const MAX_STALE_CONNECTIONS: usize = 3;

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
    #[error("circuit breaker: {0}")]
    Overflow(#[from] Overflow),
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

    /// Sends one request to `ep` over a pooled connection of `cluster`
    /// (dialling a tunnel when none is free and the circuit breakers allow
    /// it), speaking `version` (HTTP/2 when the client spoke it, so gRPC
    /// keeps its trailers). The lease must live until the response body
    /// has been read; then the connection goes back to the pool.
    pub async fn send(
        &self,
        cluster: &Arc<Cluster>,
        ep: &Endpoint,
        tunnel: TunnelInfo<'_>,
        mut req: Request<crate::http::Body>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let dst = SocketAddr::new(ep.ip, ep.port);
        let http = |source| UpstreamError::Http { dst, source };
        let key = ConnKey {
            dst,
            identity: ep.workload.identity(),
            src: tunnel.src.ip(),
            http2: req.version() == Version::HTTP_2,
        };
        // Idle connections found closed are simply dropped (each leaves the
        // pool, so this ends); a request handed back unsent is moved on at
        // most a few times.
        let mut unsent = 0;
        loop {
            let permit = match cluster.checkout(&key).await? {
                Checkout::Reuse(mut conn) => {
                    let sent = match &mut conn.sender {
                        Sender::H1(s) => {
                            if s.ready().await.is_err() {
                                continue;
                            }
                            s.try_send_request(req).await
                        }
                        Sender::H2(s) => s.try_send_request(req).await,
                    };
                    match sent {
                        Ok(resp) => return Ok((resp, Lease::new(cluster.clone(), key, conn))),
                        Err(mut e) => match e.take_message() {
                            // Never written: the connection was going away.
                            Some(r) => {
                                tracing::debug!(error = %e.error(), "pooled upstream connection closed; using another");
                                unsent += 1;
                                if unsent >= MAX_STALE_CONNECTIONS {
                                    return Err(UpstreamError::Connect {
                                        dst,
                                        source: HboneError::NoConnection,
                                    });
                                }
                                req = r;
                                continue;
                            }
                            None => return Err(http(e.into_error())),
                        },
                    }
                }
                Checkout::Dial(permit) => permit,
            };
            let mut headers = HeaderMap::new();
            if let Ok(v) = hbone::headers::forwarded(tunnel.src, tunnel.host) {
                headers.insert(http::header::FORWARDED, v);
            }
            let stream = self.tunnel(ep, headers).await?;
            let io = TokioIo::new(stream);
            let crate::cluster::DialPermit { token, pending } = permit;
            let sender = if key.http2 {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(http)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                    }
                    drop(token);
                });
                Sender::H2(sender)
            } else {
                let (sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(http)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
                    }
                    drop(token);
                });
                Sender::H1(sender)
            };
            // Connected: the request is no longer pending.
            drop(pending);
            let mut conn = cluster.register(&key, sender);
            let resp = match &mut conn.sender {
                Sender::H1(s) => s.send_request(req).await,
                Sender::H2(s) => s.send_request(req).await,
            }
            .map_err(http)?;
            return Ok((resp, Lease::new(cluster.clone(), key, conn)));
        }
    }
}

/// What the tunnel of a new upstream connection carries: the original
/// client and the service it addressed (the `Forwarded` header).
#[derive(Debug, Clone, Copy)]
pub struct TunnelInfo<'a> {
    pub src: SocketAddr,
    pub host: Option<&'a str>,
}

/// A pool with the mesh's HBONE defaults.
pub fn new_pool() -> Pool<PoolKey> {
    Pool::new(hbone::PoolConfig::default())
}

/// Shared handle used by the proxy.
pub type SharedConnector = Arc<Connector>;
