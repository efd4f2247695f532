//! ztunnel's own HTTP endpoints, outside the data path.
//!
//! - admin (127.0.0.1:15000): `/config_dump`, the JSON `istioctl
//!   ztunnel-config` reads; `/debug/connections`, the open connections
//!   (`{"connections":[{pod, direction, protocol, local, remote,
//!   remoteTarget, srcIdentity, dstIdentity}]}`); `/healthz/ready`,
//!   `/metrics` for convenience;
//! - stats (15020): Prometheus `/metrics`;
//! - readiness (15021): `/healthz/ready`, 200 once the first configuration,
//!   the pod snapshot and the listeners are in place, 503 with what is
//!   pending otherwise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_core::certs::CertificateManager;
use mesh_core::drain;
use mesh_core::readiness::Ready;

use crate::config::{CaSource, Config, XdsSource};
use crate::connections::ConnectionRegistry;
use crate::inpod::PodRegistry;
use crate::metrics::Metrics;
use crate::state::ProxyState;

/// Everything the endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub cfg: Arc<Config>,
    pub state: ProxyState,
    pub certs: CertificateManager,
    pub pods: PodRegistry,
    pub metrics: Arc<Metrics>,
    pub ready: Ready,
    pub connections: ConnectionRegistry,
}

#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Admin,
    Stats,
    Readiness,
}

impl AdminState {
    pub fn config_dump(&self) -> serde_json::Value {
        let (workloads, services, policies) = self.state.dump();
        let c = &self.cfg;
        serde_json::json!({
            "workloads": workloads,
            "services": services,
            "policies": policies,
            "certificates": self.certs.dump(),
            "workloadState": self.pods.snapshot(),
            "config": {
                "xdsSource": match &c.xds {
                    XdsSource::LocalFile(p) => serde_json::json!({"localFile": p}),
                    XdsSource::ControlPlane(cp) => serde_json::json!({"address": cp.address}),
                },
                "caSource": match &c.ca {
                    CaSource::LocalDir(p) => serde_json::json!({"localDir": p}),
                    CaSource::ControlPlane(cp) => serde_json::json!({"address": cp.address}),
                },
                "xdsNodeId": c.node_id,
                "inpodUds": c.inpod_uds,
                "trustDomain": c.trust_domain,
                "clusterId": c.cluster_id,
                "network": c.network,
                "nodeName": c.node_name,
                "adminAddr": c.admin_addr.to_string(),
                "statsAddr": c.stats_addr.to_string(),
                "readinessAddr": c.readiness_addr.to_string(),
                "drainTimeoutSeconds": c.drain_timeout.as_secs_f64(),
                "poolMaxStreamsPerConnection": c.pool_max_streams,
                "poolIdleTimeoutSeconds": c.pool_idle_timeout.as_secs_f64(),
            },
            "version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn respond(&self, which: Endpoint, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |code: StatusCode, body: String, ctype: &'static str| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = code;
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(ctype),
            );
            r
        };
        if req.method() != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET\n".into(),
                "text/plain",
            );
        }
        match (which, req.uri().path()) {
            (Endpoint::Admin, "/config_dump") => {
                let body = serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default();
                text(StatusCode::OK, body, "application/json")
            }
            (Endpoint::Admin, "/debug/connections") => {
                let body =
                    serde_json::to_string_pretty(&self.connections.dump()).unwrap_or_default();
                text(StatusCode::OK, body, "application/json")
            }
            (_, "/healthz/ready") => {
                if self.ready.is_ready() {
                    text(StatusCode::OK, "ready\n".into(), "text/plain")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", self.ready.pending().join(", ")),
                        "text/plain",
                    )
                }
            }
            (Endpoint::Stats | Endpoint::Admin, "/metrics" | "/stats/prometheus") => text(
                StatusCode::OK,
                self.metrics.encode(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            (Endpoint::Admin, "/") => text(
                StatusCode::OK,
                "/config_dump\n/debug/connections\n/healthz/ready\n/metrics\n".into(),
                "text/plain",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
        }
    }
}

/// Serve one endpoint until the drain starts.
pub async fn serve(
    listener: tokio::net::TcpListener,
    which: Endpoint,
    st: AdminState,
    drain: drain::Watch,
) {
    loop {
        let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, ?which, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.signaled() => return,
        };
        let st = st.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = st.respond(which, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}
