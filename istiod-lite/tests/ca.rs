//! The CA service end to end in one process: real TLS (mesh-core's gRPC
//! transport), real CSRs, a table of callers with fixed identities and pod
//! placements, and mesh-core's `CaClient` on the other side.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use istiod_lite::ca::{
    AuthError, Authenticator, CaService, CaServiceConfig, Caller, NodeLookup, PodRef,
};
use mesh_core::ca::{generate_csr, CertificateAuthority};
use mesh_core::ca_client::{CaClient, TokenSource, IMPERSONATED_IDENTITY};
use mesh_core::certs::{CertError, CertificateManager, CertificateProvider, RotationConfig};
use mesh_core::grpc;
use mesh_core::identity::Identity;
use mesh_core::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_core::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_core::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_core::tls::WorkloadCertificate;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};
use tonic::Code;

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

fn ztunnel() -> Identity {
    id("istio-system", "ztunnel")
}

struct FakeAuthn(HashMap<&'static str, Caller>);

#[derive(Debug, thiserror::Error)]
#[error("review backend down")]
struct Down;

impl Authenticator for FakeAuthn {
    fn authenticate(&self, token: &str) -> BoxFuture<'static, Result<Caller, AuthError>> {
        let r = self
            .0
            .get(token)
            .cloned()
            .ok_or_else(|| AuthError::Rejected("unknown token".into()));
        Box::pin(async move { r })
    }
}

struct FakeNodes {
    pods: HashMap<(&'static str, &'static str), &'static str>,
    identities: HashSet<(&'static str, &'static str, &'static str)>,
}

impl NodeLookup for FakeNodes {
    fn pod_node(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods
            .iter()
            .find(|((ns, n), _)| *ns == namespace && *n == name)
            .map(|(_, node)| node.to_string())
    }

    fn identity_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        self.identities
            .iter()
            .any(|(ns, sa, n)| *ns == namespace && *sa == service_account && *n == node)
    }
}

fn pod(ns: &str, name: &str) -> Option<PodRef> {
    Some(PodRef {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    })
}

fn callers() -> FakeAuthn {
    FakeAuthn(HashMap::from([
        (
            "tok-sleep",
            Caller {
                identity: id("default", "sleep"),
                pod: None,
            },
        ),
        (
            "tok-zt-node1",
            Caller {
                identity: ztunnel(),
                pod: pod("istio-system", "ztunnel-n1"),
            },
        ),
        (
            "tok-zt-unbound",
            Caller {
                identity: ztunnel(),
                pod: None,
            },
        ),
        (
            "tok-zt-lost",
            Caller {
                identity: ztunnel(),
                pod: pod("istio-system", "ztunnel-gone"),
            },
        ),
    ]))
}

fn nodes() -> FakeNodes {
    FakeNodes {
        pods: HashMap::from([(("istio-system", "ztunnel-n1"), "node1")]),
        identities: HashSet::from([
            ("default", "sleep", "node1"),
            ("istio-system", "ztunnel", "node1"),
            ("default", "web", "node2"),
        ]),
    }
}

struct Served {
    endpoint_ip: String,
    endpoint_dns: String,
    root_pem: String,
    _server: tokio::task::JoinHandle<()>,
}

impl Served {
    fn channel(&self, endpoint: &str) -> Channel {
        grpc::channel(endpoint, grpc::client_tls(&self.root_pem).unwrap()).unwrap()
    }
}

/// Serves `svc` over TLS with a certificate from `ca` for localhost and
/// 127.0.0.1.
async fn serve<T: IstioCertificateService>(
    ca: &CertificateAuthority,
    svc: IstioCertificateServiceServer<T>,
) -> Served {
    let (chain, key) = ca
        .issue_server_cert(
            &["localhost".into()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Duration::from_secs(3600),
        )
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = grpc::tls_incoming(listener, grpc::server_tls(&chain, &key).unwrap());
    let server = tokio::spawn(async move {
        Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    Served {
        endpoint_ip: format!("https://127.0.0.1:{port}"),
        endpoint_dns: format!("https://localhost:{port}"),
        root_pem: ca.root_pem(),
        _server: server,
    }
}

fn mesh_ca() -> (Arc<CertificateAuthority>, CaServiceConfig) {
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let mut cfg = CaServiceConfig::new(TD);
    cfg.max_ttl = Duration::from_secs(48 * 3600);
    (ca, cfg)
}

enum Csr {
    For(Identity),
    Garbage,
}

fn request(
    token: Option<&str>,
    csr: &Csr,
    impersonate: Option<&str>,
    validity: i64,
) -> (tonic::Request<IstioCertificateRequest>, Option<String>) {
    let (csr, key) = match csr {
        Csr::For(who) => {
            let (c, k) = generate_csr(who).unwrap();
            (c, Some(k))
        }
        Csr::Garbage => (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            None,
        ),
    };
    let metadata = impersonate.map(|who| pbjson_types::Struct {
        fields: HashMap::from([(
            IMPERSONATED_IDENTITY.to_string(),
            pbjson_types::Value {
                kind: Some(pbjson_types::value::Kind::StringValue(who.to_string())),
            },
        )]),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: validity,
        metadata,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    (req, key)
}

fn leaf_lifetime(cert: &WorkloadCertificate) -> Duration {
    cert.not_after().duration_since(cert.not_before()).unwrap()
}

fn verify(resp: &IstioCertificateResponse, key: &str, root: &str) -> WorkloadCertificate {
    let chain = &resp.cert_chain;
    assert_eq!(chain.last().unwrap(), root, "root last");
    WorkloadCertificate::from_pem(&chain.concat(), key, root).unwrap()
}

#[tokio::test]
async fn authorization_table() {
    let (ca, cfg) = mesh_ca();
    let svc = CaService::new(ca.clone(), Arc::new(callers()), Arc::new(nodes()), cfg);
    let served = serve(&ca, svc.into_service()).await;
    let mut client = IstioCertificateServiceClient::new(served.channel(&served.endpoint_ip));

    let sleep = id("default", "sleep");
    let web = id("default", "web");
    let sleep_uri = sleep.to_string();
    let web_uri = web.to_string();
    let zt_uri = ztunnel().to_string();
    let foreign = Identity::new("other.local", "default", "sleep").to_string();

    struct Case<'a> {
        name: &'a str,
        token: Option<&'a str>,
        csr: Csr,
        impersonate: Option<&'a str>,
        want: Result<Identity, (Code, Vec<&'a str>)>,
    }
    let cases = vec![
        Case {
            name: "own identity",
            token: Some("tok-sleep"),
            csr: Csr::For(sleep.clone()),
            impersonate: None,
            want: Ok(sleep.clone()),
        },
        Case {
            name: "own identity named in metadata",
            token: Some("tok-sleep"),
            csr: Csr::For(sleep.clone()),
            impersonate: Some(&sleep_uri),
            want: Ok(sleep.clone()),
        },
        Case {
            name: "ztunnel's own identity",
            token: Some("tok-zt-node1"),
            csr: Csr::For(ztunnel()),
            impersonate: None,
            want: Ok(ztunnel()),
        },
        Case {
            name: "impersonation of a pod on the caller's node",
            token: Some("tok-zt-node1"),
            csr: Csr::For(sleep.clone()),
            impersonate: Some(&sleep_uri),
            want: Ok(sleep.clone()),
        },
        Case {
            name: "impersonation of a pod on another node",
            token: Some("tok-zt-node1"),
            csr: Csr::For(web.clone()),
            impersonate: Some(&web_uri),
            want: Err((Code::PermissionDenied, vec![&zt_uri, "node1", &web_uri])),
        },
        Case {
            name: "impersonation by a non-impersonator",
            token: Some("tok-sleep"),
            csr: Csr::For(web.clone()),
            impersonate: Some(&web_uri),
            want: Err((Code::PermissionDenied, vec![&sleep_uri, &web_uri])),
        },
        Case {
            name: "impersonation with an unbound token",
            token: Some("tok-zt-unbound"),
            csr: Csr::For(sleep.clone()),
            impersonate: Some(&sleep_uri),
            want: Err((Code::PermissionDenied, vec!["pod-bound"])),
        },
        Case {
            name: "impersonation from a pod of unknown placement",
            token: Some("tok-zt-lost"),
            csr: Csr::For(sleep.clone()),
            impersonate: Some(&sleep_uri),
            want: Err((Code::PermissionDenied, vec!["ztunnel-gone"])),
        },
        Case {
            name: "impersonation across trust domains",
            token: Some("tok-zt-node1"),
            csr: Csr::Garbage,
            impersonate: Some(&foreign),
            want: Err((Code::PermissionDenied, vec!["other.local"])),
        },
        Case {
            name: "malformed impersonation value",
            token: Some("tok-zt-node1"),
            csr: Csr::For(sleep.clone()),
            impersonate: Some("not-spiffe"),
            want: Err((Code::InvalidArgument, vec!["not-spiffe"])),
        },
        Case {
            name: "no token",
            token: None,
            csr: Csr::For(sleep.clone()),
            impersonate: None,
            want: Err((Code::Unauthenticated, vec![])),
        },
        Case {
            name: "unknown token",
            token: Some("tok-nobody"),
            csr: Csr::For(sleep.clone()),
            impersonate: None,
            want: Err((Code::Unauthenticated, vec!["unknown token"])),
        },
        Case {
            name: "CSR names another identity",
            token: Some("tok-sleep"),
            csr: Csr::For(web.clone()),
            impersonate: None,
            want: Err((Code::InvalidArgument, vec![&web_uri])),
        },
        Case {
            name: "CSR for the ztunnel while impersonating",
            token: Some("tok-zt-node1"),
            csr: Csr::For(ztunnel()),
            impersonate: Some(&sleep_uri),
            want: Err((Code::InvalidArgument, vec![&zt_uri])),
        },
        Case {
            name: "garbage CSR",
            token: Some("tok-sleep"),
            csr: Csr::Garbage,
            impersonate: None,
            want: Err((Code::InvalidArgument, vec!["CSR"])),
        },
    ];

    for case in cases {
        let (req, key) = request(case.token, &case.csr, case.impersonate, 3600);
        let got = client.create_certificate(req).await;
        match (&case.want, got) {
            (Ok(want), Ok(resp)) => {
                let cert = verify(resp.get_ref(), key.as_deref().unwrap(), &served.root_pem);
                assert_eq!(cert.identity(), want, "{}", case.name);
            }
            (Err((code, words)), Err(status)) => {
                assert_eq!(status.code(), *code, "{}: {status:?}", case.name);
                for w in words {
                    assert!(
                        status.message().contains(w),
                        "{}: {:?} does not mention {w}",
                        case.name,
                        status.message()
                    );
                }
            }
            (want, got) => panic!("{}: wanted {want:?}, got {got:?}", case.name),
        }
        // Whatever happened, the next caller is served.
        let (req, key) = request(Some("tok-sleep"), &Csr::For(sleep.clone()), None, 0);
        let resp = client
            .create_certificate(req)
            .await
            .unwrap_or_else(|s| panic!("after {}: {s:?}", case.name));
        verify(resp.get_ref(), &key.unwrap(), &served.root_pem);
    }
}

#[tokio::test]
async fn lifetimes_default_and_clamp() {
    let (ca, cfg) = mesh_ca();
    let svc = CaService::new(ca.clone(), Arc::new(callers()), Arc::new(nodes()), cfg);
    let served = serve(&ca, svc.into_service()).await;
    let mut client = IstioCertificateServiceClient::new(served.channel(&served.endpoint_dns));
    let sleep = id("default", "sleep");
    let hour = Duration::from_secs(3600);
    // Lifetimes include up to a minute of backdating.
    for (validity, want) in [
        (0, 24 * hour),
        (-5, 24 * hour),
        (3600, hour),
        (1000 * 24 * 3600, 48 * hour),
        (i64::MAX, 48 * hour),
    ] {
        let (req, key) = request(Some("tok-sleep"), &Csr::For(sleep.clone()), None, validity);
        let resp = client.create_certificate(req).await.unwrap();
        let cert = verify(resp.get_ref(), &key.unwrap(), &served.root_pem);
        let life = leaf_lifetime(&cert);
        assert!(
            life >= want && life <= want + Duration::from_secs(60),
            "validity {validity}: lifetime {life:?}, want {want:?}"
        );
    }
}

#[tokio::test]
async fn ca_client_through_the_certificate_manager() {
    let (ca, cfg) = mesh_ca();
    let svc = CaService::new(ca.clone(), Arc::new(callers()), Arc::new(nodes()), cfg);
    let served = serve(&ca, svc.into_service()).await;
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "tok-zt-node1\n").unwrap();
    let client = CaClient::new(
        served.channel(&served.endpoint_dns),
        TokenSource::File(token_file.clone()),
        "Kubernetes".into(),
        Duration::from_secs(3600),
        Some(ztunnel()),
    );
    let fast = RotationConfig {
        refresh_at_fraction: 0.5,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    };
    let mgr = CertificateManager::new(Arc::new(client.clone()), fast);

    let sleep = id("default", "sleep");
    let cert = mgr.get(&sleep).await.unwrap();
    assert_eq!(cert.identity(), &sleep);
    assert_eq!(cert.roots_pem(), ca.root_pem());
    let own = mgr.get(&ztunnel()).await.unwrap();
    assert_eq!(own.identity(), &ztunnel());

    // A pod on another node: the CA refuses and the manager reports it.
    let web = id("default", "web");
    let err = mgr.get(&web).await.unwrap_err();
    assert!(matches!(err, CertError::Fetch(_)), "{err:?}");
    let dump = mgr.dump();
    let web_state = &dump
        .iter()
        .find(|d| d.identity == web.to_string())
        .unwrap()
        .state;
    assert!(
        web_state.contains("on node node1 may not request"),
        "{web_state}"
    );

    // The token file is re-read: a rotated (here: revoked) token is used.
    std::fs::write(&token_file, "tok-nobody").unwrap();
    let err = client.fetch(&sleep).await.unwrap_err();
    let text = format!("{:?}", err);
    assert!(text.contains("Unauthenticated"), "{text}");
}

/// A CA that signs whatever it is asked for as one fixed identity.
struct WrongSan {
    ca: Arc<CertificateAuthority>,
    as_identity: Identity,
}

#[tonic::async_trait]
impl IstioCertificateService for WrongSan {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let chain = self
            .ca
            .sign_csr(
                &request.get_ref().csr,
                &self.as_identity,
                Duration::from_secs(3600),
            )
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

#[tokio::test]
async fn client_rejects_a_certificate_for_another_identity() {
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let wrong = id("default", "intruder");
    let served = serve(
        &ca,
        IstioCertificateServiceServer::new(WrongSan {
            ca: ca.clone(),
            as_identity: wrong.clone(),
        }),
    )
    .await;
    let client = CaClient::new(
        served.channel(&served.endpoint_ip),
        TokenSource::Static("t".into()),
        "Kubernetes".into(),
        Duration::from_secs(3600),
        None,
    );
    let sleep = id("default", "sleep");
    match client.fetch(&sleep).await {
        Err(CertError::IdentityMismatch { requested, got }) => {
            assert_eq!(*requested, sleep);
            assert_eq!(*got, wrong);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn untrusted_server_is_refused_by_the_client() {
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let (mca, cfg) = mesh_ca();
    let svc = CaService::new(mca, Arc::new(callers()), Arc::new(nodes()), cfg);
    let served = serve(&ca, svc.into_service()).await;
    let stranger = CertificateAuthority::generate(TD).unwrap();
    let channel = grpc::channel(
        &served.endpoint_ip,
        grpc::client_tls(&stranger.root_pem()).unwrap(),
    )
    .unwrap();
    let client = CaClient::new(
        channel,
        TokenSource::Static("tok-sleep".into()),
        "Kubernetes".into(),
        Duration::from_secs(3600),
        Some(id("default", "sleep")),
    );
    let err = client.fetch(&id("default", "sleep")).await.unwrap_err();
    assert!(matches!(err, CertError::Fetch(_)), "{err:?}");
}

#[tokio::test]
async fn review_outage_is_unavailable() {
    struct Broken;
    impl Authenticator for Broken {
        fn authenticate(&self, _: &str) -> BoxFuture<'static, Result<Caller, AuthError>> {
            Box::pin(async { Err(AuthError::Review(kube::Error::Service(Box::new(Down)))) })
        }
    }
    let (ca, cfg) = mesh_ca();
    let svc = CaService::new(ca.clone(), Arc::new(Broken), Arc::new(nodes()), cfg);
    let served = serve(&ca, svc.into_service()).await;
    let mut client = IstioCertificateServiceClient::new(served.channel(&served.endpoint_ip));
    let (req, _) = request(Some("x"), &Csr::For(id("default", "sleep")), None, 0);
    let status = client.create_certificate(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
}
