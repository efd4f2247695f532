//! The CA against a real Kubernetes API server: tokens come from the
//! TokenRequest API, the CA judges them with TokenReview, and pod placement
//! comes from Pods bound to (kubelet-less) Nodes. The CA runs in-process
//! over TLS; callers are the raw gRPC client (to see status codes) and
//! mesh-core's `CaClient` (what ztunnel uses).
//!
//! Needs the API server binaries (`scripts/kube-build.sh`); not root.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::controlplane::delete_namespace;
use e2e::kube::{create_or_get, KubeCluster};
use futures::StreamExt;
use istiod_lite::ca::{CaService, CaServiceConfig, NodeLookup, TokenReviewAuthenticator};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ServiceAccount};
use kube::api::{Api, ObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use mesh_core::ca::{generate_csr, CertificateAuthority};
use mesh_core::ca_client::{CaClient, TokenSource, IMPERSONATED_IDENTITY};
use mesh_core::certs::CertificateProvider;
use mesh_core::grpc;
use mesh_core::identity::Identity;
use mesh_core::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_core::proto::ca::IstioCertificateRequest;
use mesh_core::tls::WorkloadCertificate;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};
use tonic::Code;

const TD: &str = "cluster.local";

static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn unique(what: &str) -> String {
    format!(
        "ca-{}-{}-{what}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Pod placement from a watch of every Pod, the shape the control plane's
/// own lookup has.
struct PodNodes(Store<Pod>);

impl PodNodes {
    fn node_of(pod: &Pod) -> Option<&str> {
        pod.spec.as_ref()?.node_name.as_deref()
    }
}

impl NodeLookup for PodNodes {
    fn pod_node(&self, namespace: &str, name: &str) -> Option<String> {
        let pod = self.0.get(&ObjectRef::new(name).within(namespace))?;
        Self::node_of(&pod).map(str::to_string)
    }

    fn identity_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        self.0.state().iter().any(|p| {
            let sa = p
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            p.metadata.namespace.as_deref() == Some(namespace)
                && sa == service_account
                && Self::node_of(p) == Some(node)
        })
    }
}

async fn watch_pods(client: kube::Client) -> Arc<PodNodes> {
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<Pod>::all(client), watcher::Config::default()),
    )
    .applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    Arc::new(PodNodes(reader))
}

/// Bounded wait until the watch has seen `namespace/name` on `node`.
async fn wait_placed(nodes: &PodNodes, namespace: &str, name: &str, node: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.pod_node(namespace, name).as_deref() != Some(node) {
        if Instant::now() > deadline {
            bail!("pod {namespace}/{name} never showed up on {node}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A Pod of `sa` bound to `node`; it stays Pending (no kubelet). It mounts
/// no token, so the API server does not insist on the account's token
/// Secret existing yet (which would race the token controller).
async fn create_pending_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    node: &str,
    sa: &str,
) -> Result<Pod> {
    let meta = |n: &str| ObjectMeta {
        name: Some(n.to_string()),
        namespace: Some(namespace.to_string()),
        ..Default::default()
    };
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    create_or_get(
        &sas,
        sa,
        &ServiceAccount {
            metadata: meta(sa),
            ..Default::default()
        },
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = Pod {
        metadata: meta(name),
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            service_account_name: Some(sa.to_string()),
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "app".into(),
                image: Some("mesh-app".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    create_or_get(&pods, name, &pod).await
}

struct RunningCa {
    channel: Channel,
    _server: tokio::task::JoinHandle<()>,
}

/// The CA service over TLS on loopback, judging tokens with TokenReview.
async fn start_ca(
    kube: &KubeCluster,
    nodes: Arc<PodNodes>,
    impersonators: Vec<Identity>,
) -> Result<RunningCa> {
    let ca = Arc::new(CertificateAuthority::generate(TD)?);
    let authn = TokenReviewAuthenticator::new(kube.client().await?, Vec::new(), TD.into());
    let mut cfg = CaServiceConfig::new(TD);
    cfg.impersonators = impersonators;
    let svc = CaService::new(ca.clone(), Arc::new(authn), nodes, cfg);
    let (chain, key) = ca.issue_server_cert(
        &["localhost".into()],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        Duration::from_secs(3600),
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let incoming = grpc::tls_incoming(listener, grpc::server_tls(&chain, &key)?);
    let server = tokio::spawn(async move {
        if let Err(e) = Server::builder()
            .add_service(svc.into_service())
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("CA server stopped: {e}");
        }
    });
    let channel = grpc::channel(
        &format!("https://127.0.0.1:{port}"),
        grpc::client_tls(&ca.root_pem())?,
    )?;
    Ok(RunningCa {
        channel,
        _server: server,
    })
}

/// One CreateCertificate call with `token`, a CSR for `csr_for`, and
/// `impersonate` in the metadata; on success the identity granted.
async fn ask(
    ca: &RunningCa,
    token: &str,
    csr_for: &Identity,
    impersonate: Option<&Identity>,
) -> Result<Identity, tonic::Status> {
    let (csr, key) = generate_csr(csr_for).expect("csr");
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
        validity_duration: 3600,
        metadata,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| tonic::Status::internal("token not ASCII"))?,
    );
    let resp = IstioCertificateServiceClient::new(ca.channel.clone())
        .create_certificate(req)
        .await?
        .into_inner();
    let root = resp
        .cert_chain
        .last()
        .ok_or_else(|| tonic::Status::internal("empty chain"))?;
    let cert = WorkloadCertificate::from_pem(&resp.cert_chain.concat(), &key, root)
        .map_err(|e| tonic::Status::internal(format!("unusable certificate: {e}")))?;
    Ok(cert.identity().clone())
}

fn expect_code(what: &str, got: Result<Identity, tonic::Status>, code: Code) -> Result<()> {
    match got {
        Err(s) if s.code() == code => Ok(()),
        other => bail!("{what}: wanted {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn service_account_gets_only_its_own_identity() -> Result<()> {
    let kube = KubeCluster::shared().await?;
    let client = kube.client().await?;
    let ns = unique("own");
    kube.create_namespace(&ns, &[]).await?;
    let nodes = watch_pods(client.clone()).await;
    let ca = start_ca(kube, nodes, Vec::new()).await?;

    let x = Identity::new(TD, &ns, "x");
    let y = Identity::new(TD, &ns, "y");
    let token_x = kube
        .service_account_token(&ns, "x", "istio-ca", None)
        .await?;
    kube.service_account_token(&ns, "y", "istio-ca", None)
        .await?;
    let wrong_audience = kube.service_account_token(&ns, "x", "vault", None).await?;

    assert_eq!(ask(&ca, &token_x, &x, None).await?, x);
    expect_code(
        "x asking for y",
        ask(&ca, &token_x, &y, Some(&y)).await,
        Code::PermissionDenied,
    )?;
    expect_code(
        "x's token, CSR for y",
        ask(&ca, &token_x, &y, None).await,
        Code::InvalidArgument,
    )?;
    expect_code(
        "garbage token",
        ask(&ca, "not-a-token", &x, None).await,
        Code::Unauthenticated,
    )?;
    expect_code(
        "token for another audience",
        ask(&ca, &wrong_audience, &x, None).await,
        Code::Unauthenticated,
    )?;
    // Tampering with a valid token's signature: its first character (all
    // six bits are signature; the last one's low bits are padding that
    // decoders may ignore).
    let sig_at = token_x.rfind('.').context("token has no signature")? + 1;
    let mut tampered = token_x.clone();
    let first = tampered[sig_at..]
        .chars()
        .next()
        .context("empty signature")?;
    tampered.replace_range(sig_at..sig_at + 1, if first == 'A' { "g" } else { "A" });
    expect_code(
        "tampered token",
        ask(&ca, &tampered, &x, None).await,
        Code::Unauthenticated,
    )?;

    // Still serving, and through the client ztunnel uses.
    let client_x = CaClient::new(
        ca.channel.clone(),
        TokenSource::Static(token_x.clone()),
        "Kubernetes".into(),
        Duration::from_secs(3600),
        Some(x.clone()),
    );
    assert_eq!(client_x.fetch(&x).await?.identity(), &x);
    assert!(client_x.fetch(&y).await.is_err());

    // A burst of CSRs with one token: the first reviews, the rest hit the
    // cache. Printed, not asserted.
    let started = Instant::now();
    for _ in 0..50 {
        client_x.fetch(&x).await?;
    }
    eprintln!(
        "50 CSRs with one token (TokenReview cached): {:?} each",
        started.elapsed() / 50
    );

    delete_namespace(&client, &ns).await?;
    Ok(())
}

#[tokio::test]
async fn ztunnel_impersonates_only_pods_on_its_node() -> Result<()> {
    let kube = KubeCluster::shared().await?;
    let client = kube.client().await?;
    let sys = unique("sys");
    let app = unique("app");
    let node1 = unique("node1");
    let node2 = unique("node2");
    for ns in [&sys, &app] {
        kube.create_namespace(ns, &[]).await?;
    }
    kube.create_node(&node1).await?;
    kube.create_node(&node2).await?;
    let nodes = watch_pods(client.clone()).await;

    let pods = [
        (&sys, "ztunnel-1", &node1, "ztunnel"),
        (&app, "a-1", &node1, "a"),
        (&app, "b-1", &node2, "b"),
    ];
    for (ns, name, node, sa) in pods {
        create_pending_pod(&client, ns, name, node, sa).await?;
    }
    for (ns, name, node, _) in pods {
        wait_placed(&nodes, ns, name, node).await?;
    }

    let zt = Identity::new(TD, &sys, "ztunnel");
    let a = Identity::new(TD, &app, "a");
    let b = Identity::new(TD, &app, "b");
    let ca = start_ca(kube, nodes, vec![zt.clone()]).await?;

    let bound = kube
        .service_account_token(&sys, "ztunnel", "istio-ca", Some("ztunnel-1"))
        .await?;
    let unbound = kube
        .service_account_token(&sys, "ztunnel", "istio-ca", None)
        .await?;
    let token_a = kube
        .service_account_token(&app, "a", "istio-ca", Some("a-1"))
        .await?;

    assert_eq!(ask(&ca, &bound, &zt, None).await?, zt);
    assert_eq!(ask(&ca, &bound, &a, Some(&a)).await?, a, "pod on node1");
    match ask(&ca, &bound, &b, Some(&b)).await {
        Err(s) if s.code() == Code::PermissionDenied => {
            for word in [zt.to_string(), node1.clone(), b.to_string()] {
                assert!(
                    s.message().contains(&word),
                    "{:?} lacks {word}",
                    s.message()
                );
            }
        }
        other => bail!("pod on node2: wanted PermissionDenied, got {other:?}"),
    }
    expect_code(
        "unbound ztunnel token",
        ask(&ca, &unbound, &a, Some(&a)).await,
        Code::PermissionDenied,
    )?;
    expect_code(
        "a pod-bound app token is no impersonator",
        ask(&ca, &token_a, &b, Some(&b)).await,
        Code::PermissionDenied,
    )?;
    assert_eq!(ask(&ca, &token_a, &a, None).await?, a);

    // ztunnel's client: own identity without metadata, pods by impersonation.
    let zclient = CaClient::new(
        ca.channel.clone(),
        TokenSource::Static(bound),
        "Kubernetes".into(),
        Duration::from_secs(3600),
        Some(zt.clone()),
    );
    assert_eq!(zclient.fetch(&zt).await?.identity(), &zt);
    assert_eq!(zclient.fetch(&a).await?.identity(), &a);
    assert!(zclient.fetch(&b).await.is_err());

    delete_namespace(&client, &sys).await?;
    delete_namespace(&client, &app).await?;
    Ok(())
}
