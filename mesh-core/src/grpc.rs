//! gRPC over TLS configurations the mesh builds itself, for the control-plane
//! links (ztunnel → CA, ztunnel → xDS): never on the data path.
//!
//! tonic's own TLS features stay off so that one rustls version and one
//! crypto provider serve the whole process. The server side turns a
//! listener into a stream of already-handshaken connections for
//! `Server::serve_with_incoming`; the client side gives tonic a connector
//! that dials TCP and runs the rustls handshake itself.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::debug;

use crate::tls::ALPN_H2;

/// How long a client gets to finish its TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for TCP connect plus handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to pick them up.
const ACCEPT_BACKLOG: usize = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors), so that a
/// persistent failure does not spin a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("invalid gRPC endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// PEM input that holds no usable certificate or key.
    #[error(transparent)]
    Pem(Box<crate::tls::TlsError>),
    #[error("root certificate rejected")]
    InvalidRoot(#[source] rustls::Error),
    #[error("building the TLS configuration failed")]
    Tls(#[from] rustls::Error),
}

impl From<crate::tls::TlsError> for GrpcError {
    fn from(e: crate::tls::TlsError) -> Self {
        // Boxed: TlsError is large and would bloat every gRPC result.
        GrpcError::Pem(Box::new(e))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, GrpcError> {
    Ok(crate::tls::certs_from_pem(what, pem)?)
}

/// A server configuration presenting `chain_pem` (leaf first) with
/// `key_pem`; ALPN `h2`, clients are not asked for certificates (callers
/// authenticate with bearer tokens instead).
pub fn server_tls(chain_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, GrpcError> {
    let chain = certs("server certificate chain", chain_pem)?;
    let key = crate::tls::key_from_pem("server private key", key_pem)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration that trusts only the certificates in `root_pem`
/// and checks the server's name against them (standard WebPKI rules); ALPN
/// `h2`.
pub fn client_tls(root_pem: &str) -> Result<Arc<ClientConfig>, GrpcError> {
    let mut roots = RootCertStore::empty();
    for cert in certs("root certificates", root_pem)? {
        roots.add(cert).map_err(GrpcError::InvalidRoot)?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// A server-side TLS connection, handshake done.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    local: Option<SocketAddr>,
    remote: SocketAddr,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl TlsConn {
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The rustls connection state (negotiated ALPN, peer certificates...).
    pub fn tls(&self) -> &rustls::ServerConnection {
        self.stream.get_ref().1
    }
}

/// The same info as a plain TCP stream, so that `Request::remote_addr`
/// works in handlers.
impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.remote),
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepted, handshaken connections. Dropping it stops accepting and closes
/// the listener.
struct TlsIncoming {
    rx: mpsc::Receiver<io::Result<TlsConn>>,
    acceptor: JoinHandle<()>,
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Connections accepted on `listener`, each after a TLS handshake with
/// `cfg`. Every handshake runs in its own task with a deadline, so a slow
/// or hostile client holds up nobody else; failed handshakes are logged and
/// skipped. Failed `accept` calls are passed on as errors (tonic logs and
/// continues). Must be called within a Tokio runtime.
pub fn tls_incoming(
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let acceptor = tokio::spawn(accept_loop(listener, TlsAcceptor::from(cfg), tx));
    TlsIncoming { rx, acceptor }
}

/// Handshakes in progress at once; beyond this, accepting waits, so a
/// flood of clients that never finish TLS cannot grow memory without bound.
const MAX_HANDSHAKES: usize = 1024;

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<io::Result<TlsConn>>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().ok();
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(permit);
            match handshake {
                Ok(Ok(stream)) => {
                    let conn = TlsConn {
                        stream,
                        local,
                        remote,
                    };
                    // A closed channel means the server stopped; the
                    // connection just goes away.
                    let _ = tx.send(Ok(conn)).await;
                }
                Ok(Err(e)) => debug!(%remote, error = %e, "gRPC TLS handshake failed"),
                Err(_) => debug!(%remote, "gRPC TLS handshake timed out"),
            }
        });
    }
}

/// Where a client channel dials: taken from the endpoint once, because the
/// URI tonic hands the connector is that same endpoint.
#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

fn parse_endpoint(endpoint: &str) -> Result<(Uri, Target), GrpcError> {
    let invalid = |reason: &str| GrpcError::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri =
        endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| GrpcError::InvalidEndpoint {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
    if uri.scheme_str() != Some("https") {
        return Err(invalid("the scheme must be https"));
    }
    let host = uri.host().ok_or_else(|| invalid("no host"))?;
    // IPv6 literals come bracketed in URIs but not in socket addresses or
    // certificate names.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_string();
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| invalid("the host is neither a DNS name nor an IP address"))?;
    let port = uri.port_u16().unwrap_or(443);
    Ok((
        uri,
        Target {
            host,
            port,
            server_name,
        },
    ))
}

async fn connect(
    target: Target,
    tls: TlsConnector,
) -> io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
    tcp.set_nodelay(true)?;
    let stream = tls.connect(target.server_name, tcp).await?;
    Ok(TokioIo::new(stream))
}

/// A channel to `endpoint` (`https://host:port`, port 443 if omitted) that
/// connects on first use and reconnects after failures. The server's
/// certificate must be valid for `host` (DNS name or IP) under `tls`'s roots.
/// Must be called within a Tokio runtime.
pub fn channel(endpoint: &str, tls: Arc<ClientConfig>) -> Result<Channel, GrpcError> {
    let (uri, target) = parse_endpoint(endpoint)?;
    let connector = TlsConnector::from(tls);
    let make = tower::service_fn(move |_: Uri| {
        let fut: Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(connect(target.clone(), connector.clone()));
        fut
    });
    let endpoint = Endpoint::from(uri).connect_timeout(CONNECT_TIMEOUT);
    Ok(endpoint.connect_with_connector_lazy(make))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;
    use futures::StreamExt;
    use std::net::{IpAddr, Ipv4Addr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn endpoints() {
        let (_, t) = parse_endpoint("https://istiod.istio-system.svc:15012").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port),
            ("istiod.istio-system.svc", 15012)
        );
        assert!(matches!(t.server_name, ServerName::DnsName(_)));
        let (_, t) = parse_endpoint("https://[::1]:15012").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 15012));
        assert!(matches!(t.server_name, ServerName::IpAddress(_)));
        let (_, t) = parse_endpoint("https://10.0.0.1").unwrap();
        assert_eq!(t.port, 443);
        for bad in ["http://a:1", "a:1", "https://", "not a uri"] {
            assert!(
                matches!(parse_endpoint(bad), Err(GrpcError::InvalidEndpoint { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_bad_pem() {
        assert!(matches!(
            server_tls("", ""),
            Err(GrpcError::Pem(e)) if matches!(*e, crate::tls::TlsError::NoCertificate(_))
        ));
        assert!(matches!(
            client_tls("junk"),
            Err(GrpcError::Pem(e)) if matches!(*e, crate::tls::TlsError::NoCertificate(_))
        ));
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        assert!(matches!(
            server_tls(&ca.root_pem(), ""),
            Err(GrpcError::Pem(e)) if matches!(*e, crate::tls::TlsError::NoPrivateKey)
        ));
    }

    /// A client that never finishes its handshake must not hold up the
    /// next one, and a failed handshake must not end the stream.
    #[tokio::test]
    async fn handshakes_do_not_block_each_other() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (chain, key) = ca
            .issue_server_cert(
                &[],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                Duration::from_secs(3600),
            )
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(tls_incoming(listener, server_tls(&chain, &key).unwrap()));

        // Stalled: TCP only.
        let _stalled = TcpStream::connect(addr).await.unwrap();
        // Garbage: fails its handshake.
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        // A proper client.
        let client = TlsConnector::from(client_tls(&ca.root_pem()).unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let (client_side, server_side) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(client.connect(name, tcp), incoming.next())
        })
        .await
        .expect("the good client was held up");
        let mut client_side = client_side.unwrap();
        let mut server_side = server_side.unwrap().unwrap();
        assert_eq!(server_side.tls().alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            server_side.connect_info().remote_addr,
            Some(client_side.get_ref().0.local_addr().unwrap())
        );
        client_side.write_all(b"ping").await.unwrap();
        client_side.flush().await.unwrap();
        let mut buf = [0u8; 4];
        server_side.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn client_checks_the_server_name() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (chain, key) = ca
            .issue_server_cert(&["istiod.example".into()], &[], Duration::from_secs(3600))
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(tls_incoming(listener, server_tls(&chain, &key).unwrap()));
        tokio::spawn(async move { while incoming.next().await.is_some() {} });
        let client = TlsConnector::from(client_tls(&ca.root_pem()).unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        // The certificate names istiod.example, not 127.0.0.1.
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        assert!(client.connect(name, tcp).await.is_err());
    }
}
