//! The waypoint's own endpoints, off the traffic path: `/config_dump` on
//! the admin port (localhost only), Prometheus `/metrics` on 15020 and
//! `/healthz/ready` on 15021, each a tiny HTTP/1.1 server.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_core::certs::CertificateManager;
use mesh_core::drain;
use mesh_core::readiness::Ready;

use crate::metrics::Metrics;
use crate::state::State;

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Admin,
    Stats,
    Readiness,
}

#[derive(Clone)]
pub struct AdminState {
    pub state: State,
    pub certs: CertificateManager,
    pub metrics: Metrics,
    pub ready: Ready,
}

fn text(status: StatusCode, body: impl Into<Bytes>, ctype: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    r
}

impl AdminState {
    fn respond(&self, which: Endpoint, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match (which, req.uri().path()) {
            (Endpoint::Admin, "/config_dump") => {
                let mut dump = self.state.dump();
                dump["certificates"] = serde_json::to_value(self.certs.dump()).unwrap_or_default();
                text(
                    StatusCode::OK,
                    serde_json::to_string_pretty(&dump).unwrap_or_default(),
                    "application/json",
                )
            }
            (Endpoint::Stats | Endpoint::Admin, "/metrics" | "/stats/prometheus") => text(
                StatusCode::OK,
                self.metrics.encode(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            (Endpoint::Readiness | Endpoint::Admin, "/healthz/ready") => {
                if self.ready.is_ready() {
                    text(StatusCode::OK, "ready\n", "text/plain")
                } else {
                    let pending = self.ready.pending().join(", ");
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {pending}\n"),
                        "text/plain",
                    )
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
        }
    }
}

/// Serves one endpoint until the drain starts.
pub async fn serve(
    listener: tokio::net::TcpListener,
    which: Endpoint,
    st: AdminState,
    drain: drain::Watch,
) {
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, ?which, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = drain.signaled() => return,
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
