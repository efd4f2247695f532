//! The agent's own endpoints, off the traffic path: Prometheus `/metrics`
//! (enrolled pods, plugin events, rule repairs) and the kubelet's `/readyz`
//! probe, which only turns 200 once the agent can actually decide about and
//! capture a new pod (Kubernetes watches synced, plugin socket listening).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::drain;
use mesh_core::readiness::Ready;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::repair::{RepairLabels, RepairMetrics};

/// Errors of the metrics and readiness endpoints.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("listening on {addr} for {what}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Labels of the plugin event counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `add`, `check` or `del`.
    pub event: String,
    /// `captured`, `not_captured`, `ok` or `error`.
    pub result: String,
}

/// Every metric of the agent.
#[derive(Clone)]
pub struct Metrics {
    /// Pods whose traffic is captured now.
    pub enrolled: Gauge,
    /// Plugin events served.
    pub events: Family<EventLabels, Counter>,
    /// Rule repairs (Istio's `istio_cni_repair_pods_*`).
    pub repair: RepairMetrics,
    registry: Arc<Registry>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let enrolled = Gauge::default();
        registry.register(
            "istio_cni_ambient_enrolled_pods",
            "Pods on this node whose traffic is captured and handed to ztunnel",
            enrolled.clone(),
        );
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "istio_cni_plugin_events",
            "CNI plugin events served by the node agent",
            events.clone(),
        );
        let repair = RepairMetrics::register(&mut registry);
        // Present (at 0) from the start, so a dashboard sees no repairs
        // rather than no data.
        for kind in ["rules", "ztunnel"] {
            let l = RepairLabels {
                r#type: kind.into(),
            };
            let _ = repair.repaired.get_or_create(&l);
            let _ = repair.failed.get_or_create(&l);
        }
        Metrics {
            enrolled,
            events,
            repair,
            registry: Arc::new(registry),
        }
    }

    pub fn count_event(&self, event: &str, result: &str) {
        self.events
            .get_or_create(&EventLabels {
                event: event.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer of `GET /readyz`: 200, or 503 naming what is still pending.
pub fn readiness_response(ready: &Ready) -> (StatusCode, String) {
    let pending = ready.pending();
    if pending.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", pending.join(", ")),
        )
    }
}

/// What the two admin listeners serve.
#[derive(Clone)]
enum Endpoint {
    Metrics(Metrics),
    Ready(Ready),
}

fn answer(endpoint: &Endpoint, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match (endpoint, req.uri().path()) {
        (Endpoint::Metrics(m), "/metrics") => {
            let mut r = text(StatusCode::OK, m.encode());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (Endpoint::Ready(ready), "/readyz") => {
            let (status, body) = readiness_response(ready);
            text(status, body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Binds `addr` for `/metrics`; serves until drained. Returns the bound
/// address (for a port-0 test address) and the serving task.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    drain: drain::Watch,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    serve(addr, "metrics", Endpoint::Metrics(metrics), drain).await
}

/// Binds `addr` for `/readyz`; serves until drained.
pub async fn serve_readiness(
    addr: SocketAddr,
    ready: Ready,
    drain: drain::Watch,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    serve(addr, "readiness", Endpoint::Ready(ready), drain).await
}

async fn serve(
    addr: SocketAddr,
    what: &'static str,
    endpoint: Endpoint,
    drain: drain::Watch,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    let bind = |source| MetricsError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind)?;
    let local = listener.local_addr().map_err(bind)?;
    tracing::info!(%local, "serving {what}");
    let task = tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a {what} connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = drain.signaled() => return,
            };
            let endpoint = endpoint.clone();
            // Probes and scrapes are short; they are not waited for on drain.
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = answer(&endpoint, &req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names() {
        let m = Metrics::new();
        m.enrolled.set(2);
        m.count_event("add", "captured");
        let text = m.encode();
        assert!(text.contains("istio_cni_ambient_enrolled_pods 2"), "{text}");
        assert!(
            text.contains("istio_cni_plugin_events_total{event=\"add\",result=\"captured\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("istio_cni_repair_pods_repaired_total{type=\"rules\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn readiness_names_what_is_pending() {
        let ready = Ready::new();
        let guard = ready.register_task("kubernetes watches");
        let (status, body) = readiness_response(&ready);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("kubernetes watches"), "{body}");
        drop(guard);
        assert_eq!(readiness_response(&ready).0, StatusCode::OK);
    }
}
