//! Mutual TLS between workloads over real TCP on 127.0.0.1, the CA that
//! issues their certificates, plug-in CA files, and the certificate manager.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_core::ca::{generate_csr, CertificateAuthority};
use mesh_core::certs::{
    CertError, CertificateManager, CertificateProvider, LocalCaProvider, RotationConfig,
};
use mesh_core::identity::Identity;
use mesh_core::tls::{self, peer_identity, WorkloadCertificate};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TD: &str = "cluster.local";
/// Bound on every network wait, so a broken handshake fails instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

fn issue(ca: &CertificateAuthority, id: &Identity) -> WorkloadCertificate {
    issue_with_roots(ca, id, &ca.root_pem())
}

fn issue_with_roots(ca: &CertificateAuthority, id: &Identity, roots: &str) -> WorkloadCertificate {
    let (csr, key) = generate_csr(id).unwrap();
    let chain = ca.sign_csr(&csr, id, Duration::from_secs(3600)).unwrap();
    WorkloadCertificate::from_pem(&chain.concat(), &key, roots).unwrap()
}

struct Outcome {
    /// What the server saw: the client's identity, or the accept error.
    server: Result<Option<Identity>, String>,
    /// What the client saw: the server's identity and ALPN, or the error.
    client: Result<(Option<Identity>, Option<Vec<u8>>), String>,
}

/// One connection: the server accepts and writes a byte, the client
/// connects (by IP, as HBONE does) and reads it.
async fn handshake(
    server_cfg: Arc<rustls::ServerConfig>,
    client_cfg: Arc<ClientConfig>,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server_cfg);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1);
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        // Hold the connection until the client is done reading.
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
        Ok::<_, String>(peer)
    });

    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let connector = TlsConnector::from(client_cfg);
        let mut tls = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let result = (
            peer_identity(conn),
            conn.alpn_protocol().map(|p| p.to_vec()),
        );
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(result)
    };
    let client = tokio::time::timeout(WAIT, client)
        .await
        .unwrap_or_else(|_| Err("client timed out".into()));
    let server = match tokio::time::timeout(WAIT, server).await {
        Ok(joined) => joined.unwrap(),
        Err(_) => Err("server timed out".into()),
    };
    Outcome { server, client }
}

#[tokio::test]
async fn handshake_succeeds_and_both_sides_see_the_peer() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let (client_id, server_id) = (id("default", "sleep"), id("default", "httpbin"));
    let client_cert = issue(&ca, &client_id);
    let server_cert = issue(&ca, &server_id);

    // The server is one of several acceptable identities (e.g. the workload
    // or its waypoint).
    let expected = [id("default", "waypoint"), server_id.clone()];
    let out = handshake(
        tls::server_config(&server_cert).unwrap(),
        tls::client_config(&client_cert, &expected).unwrap(),
    )
    .await;
    let (seen_server, alpn) = out.client.expect("client handshake");
    assert_eq!(seen_server, Some(server_id));
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(out.server.expect("server handshake"), Some(client_id));
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let client_cert = issue(&ca, &id("default", "sleep"));
    let server_cert = issue(&ca, &id("default", "impostor"));
    let out = handshake(
        tls::server_config(&server_cert).unwrap(),
        tls::client_config(&client_cert, &[id("default", "httpbin")]).unwrap(),
    )
    .await;
    let err = out.client.expect_err("client must refuse");
    assert!(
        err.contains("spiffe://cluster.local/ns/default/sa/impostor")
            && err.contains("spiffe://cluster.local/ns/default/sa/httpbin"),
        "error should name what it got and what it expected: {err}"
    );
    assert!(out.server.is_err());
}

/// Accepts any server certificate: lets a test client reach the server's
/// client-certificate checks without presenting a certificate itself.
#[derive(Debug)]
struct AcceptAnyServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[tokio::test]
async fn server_refuses_a_client_without_a_certificate() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let server_cert = issue(&ca, &id("default", "httpbin"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(
            provider.signature_verification_algorithms,
        )))
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];

    let out = handshake(tls::server_config(&server_cert).unwrap(), Arc::new(client)).await;
    let err = out.server.expect_err("server must refuse");
    assert!(err.contains("no certificates"), "{err}");
    assert!(out.client.is_err());
}

#[tokio::test]
async fn server_refuses_a_client_from_another_root() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let foreign_ca = CertificateAuthority::generate(TD).unwrap();
    let server_id = id("default", "httpbin");
    let server_cert = issue(&ca, &server_id);
    // The client trusts both roots, so it accepts the server and the refusal
    // can only come from the server's side.
    let both_roots = format!("{}{}", ca.root_pem(), foreign_ca.root_pem());
    let client_cert = issue_with_roots(&foreign_ca, &id("default", "sleep"), &both_roots);

    let out = handshake(
        tls::server_config(&server_cert).unwrap(),
        tls::client_config(&client_cert, &[server_id]).unwrap(),
    )
    .await;
    let err = out.server.expect_err("server must refuse");
    // Both roots are named after the trust domain, so webpki finds a
    // candidate issuer by name and then the signature fails to verify.
    assert!(
        err.contains("invalid peer certificate")
            && (err.contains("BadSignature") || err.contains("UnknownIssuer")),
        "{err}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn server_refuses_a_client_of_another_trust_domain() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let server_id = id("default", "httpbin");
    let server_cert = issue(&ca, &server_id);
    let foreigner = Identity::new("other.domain", "default", "sleep");
    let client_cert = issue(&ca, &foreigner);

    let out = handshake(
        tls::server_config(&server_cert).unwrap(),
        tls::client_config(&client_cert, &[server_id]).unwrap(),
    )
    .await;
    let err = out.server.expect_err("server must refuse");
    assert!(
        err.contains("spiffe://other.domain/ns/default/sa/sleep") && err.contains(TD),
        "{err}"
    );
    assert!(out.client.is_err());
}

#[test]
fn ca_signs_the_identity_it_is_told_not_the_one_requested() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let caller = id("default", "sleep");

    let (csr, key) = generate_csr(&caller).unwrap();
    let chain = ca
        .sign_csr(&csr, &caller, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain.last().unwrap(), &ca.root_pem(), "root last");
    let cert = WorkloadCertificate::from_pem(&chain.concat(), &key, &ca.root_pem()).unwrap();
    assert_eq!(cert.identity(), &caller);

    // A CSR asking for someone else's identity still gets the caller's.
    let (greedy_csr, greedy_key) = generate_csr(&id("istio-system", "istiod")).unwrap();
    let chain = ca
        .sign_csr(&greedy_csr, &caller, Duration::from_secs(3600))
        .unwrap();
    let cert = WorkloadCertificate::from_pem(&chain.concat(), &greedy_key, &ca.root_pem()).unwrap();
    assert_eq!(cert.identity(), &caller);
}

#[tokio::test]
async fn plug_in_ca_files_with_an_intermediate() {
    let root = CertificateAuthority::generate(TD).unwrap();
    let intermediate = root
        .issue_intermediate(TD, Duration::from_secs(24 * 3600))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    intermediate.write_dir(dir.path()).unwrap();

    let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    for name in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
        assert!(dir.path().join(name).exists(), "{name}");
    }

    let loaded = CertificateAuthority::load_dir(dir.path()).unwrap();
    assert_eq!(loaded.root_pem(), root.root_pem());
    let caller = id("default", "sleep");
    let (csr, key) = generate_csr(&caller).unwrap();
    let chain = loaded
        .sign_csr(&csr, &caller, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain[1], intermediate.ca_cert_pem());
    assert_eq!(chain[2], root.root_pem());
    let client_cert =
        WorkloadCertificate::from_pem(&chain.concat(), &key, &root.root_pem()).unwrap();
    assert_eq!(
        client_cert.chain().len(),
        2,
        "leaf and intermediate are sent"
    );

    // A server issued directly by the root and a client issued by the
    // intermediate trust each other through the shared root.
    let server_id = id("default", "httpbin");
    let server_cert = issue(&root, &server_id);
    let out = handshake(
        tls::server_config(&server_cert).unwrap(),
        tls::client_config(&client_cert, std::slice::from_ref(&server_id)).unwrap(),
    )
    .await;
    assert_eq!(out.client.expect("client").0, Some(server_id));
    assert_eq!(out.server.expect("server"), Some(caller));

    // A self-signed CA needs only ca-cert.pem and ca-key.pem.
    let dir = tempfile::tempdir().unwrap();
    root.write_dir(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("root-cert.pem")).unwrap();
    std::fs::remove_file(dir.path().join("cert-chain.pem")).unwrap();
    let loaded = CertificateAuthority::load_dir(dir.path()).unwrap();
    assert_eq!(loaded.root_pem(), root.root_pem());
    assert_eq!(loaded.ca_cert_pem(), root.root_pem());
}

#[tokio::test]
async fn manager_rotates_a_short_lived_certificate() {
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let provider = Arc::new(LocalCaProvider::new(ca, Duration::from_secs(3)));
    let mgr = CertificateManager::new(
        provider,
        RotationConfig {
            initial_backoff: Duration::from_millis(100),
            ..RotationConfig::default()
        },
    );
    let me = id("default", "sleep");
    let first = mgr.get(&me).await.unwrap();

    let mut rotated = None;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = mgr.get(&me).await.unwrap();
        if now.serial() != first.serial() {
            rotated = Some(now);
            break;
        }
    }
    let rotated = rotated.expect("certificate was not rotated");
    assert_eq!(rotated.identity(), &me);
    assert!(rotated.not_after() > first.not_after());
    let dump = mgr.dump();
    assert_eq!(dump.len(), 1);
    assert_eq!(dump[0].state, "Available");
    assert_eq!(dump[0].identity, me.to_string());
}

struct Counting {
    inner: LocalCaProvider,
    calls: Arc<AtomicUsize>,
}

impl CertificateProvider for Counting {
    fn fetch(&self, id: &Identity) -> BoxFuture<'static, Result<WorkloadCertificate, CertError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fetch = self.inner.fetch(id);
        Box::pin(async move {
            // Slow enough that every caller arrives while it is in flight.
            tokio::time::sleep(Duration::from_millis(300)).await;
            fetch.await
        })
    }
}

#[tokio::test]
async fn concurrent_gets_share_one_fetch() {
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = Arc::new(Counting {
        inner: LocalCaProvider::new(ca, Duration::from_secs(3600)),
        calls: calls.clone(),
    });
    let mgr = CertificateManager::new(provider, RotationConfig::default());
    let me = id("default", "sleep");

    let gets = (0..32).map(|_| {
        let mgr = mgr.clone();
        let me = me.clone();
        tokio::spawn(async move { mgr.get(&me).await })
    });
    let certs: Vec<Arc<WorkloadCertificate>> = futures::future::join_all(gets)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));

    // A second identity is a separate fetch.
    mgr.get(&id("default", "other")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
