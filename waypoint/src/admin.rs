//! The waypoint's own endpoints, off the traffic path: `/config_dump` and
//! Envoy's text `/stats` on the admin port (localhost only), Prometheus
//! `/metrics` on 15020 and `/healthz/ready` on 15021, each a tiny HTTP/1.1
//! server.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_core::certs::CertificateManager;
use mesh_core::drain;
use mesh_core::readiness::Ready;

use crate::cluster::Clusters;
use crate::metrics::{ClusterStats, Metrics};
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
    pub clusters: std::sync::Arc<Clusters>,
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
            (Endpoint::Admin, "/stats") if !wants_prometheus(req.uri().query()) => {
                match self.envoy_stats(req.uri().query()) {
                    Ok(body) => text(StatusCode::OK, body, "text/plain; charset=UTF-8"),
                    Err(e) => text(
                        StatusCode::BAD_REQUEST,
                        format!("invalid filter: {e}\n"),
                        "text/plain",
                    ),
                }
            }
            (Endpoint::Stats | Endpoint::Admin, "/metrics" | "/stats/prometheus" | "/stats") => {
                text(
                    StatusCode::OK,
                    self.metrics.encode(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            }
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

/// `format=prometheus` asks `/stats` for the Prometheus form, as on Envoy.
fn wants_prometheus(query: Option<&str>) -> bool {
    query_param(query, "format") == Some("prometheus")
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Undoes `%XX` escapes (and `+`) of a query value.
fn percent_decode(v: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl AdminState {
    /// Envoy's text statistics of every cluster the configuration defines
    /// (each service port, alone and per subset), one `name: value` a line;
    /// `filter=<regex>` keeps the matching lines, as Envoy's does.
    fn envoy_stats(&self, query: Option<&str>) -> Result<String, regex::Error> {
        let filter = query_param(query, "filter")
            .map(|f| regex::Regex::new(&percent_decode(f)))
            .transpose()?;
        let mut all = String::new();
        let zero = ClusterStats::default();
        for (svc, routes) in self.state.services_with_routes() {
            let mut subsets: Vec<&str> = vec![""];
            if let Some(r) = &routes {
                let mut names: Vec<&str> = r.subsets.keys().map(String::as_str).collect();
                names.sort_unstable();
                subsets.extend(names);
            }
            for port in svc.ports.keys() {
                for subset in &subsets {
                    let name = crate::cluster::cluster_name(&svc.hostname, subset, *port);
                    let stats = self.clusters.stats(&svc.hostname, subset, *port);
                    stats.as_ref().unwrap_or(&zero).envoy_text(&name, &mut all);
                }
            }
        }
        Ok(match filter {
            None => all,
            Some(re) => all
                .lines()
                .filter(|l| re.is_match(l))
                .flat_map(|l| [l, "\n"])
                .collect(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values() {
        assert_eq!(
            percent_decode("httpbin.*pending%7Coverflow+x"),
            "httpbin.*pending|overflow x"
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert!(wants_prometheus(Some("a=1&format=prometheus")));
        assert_eq!(query_param(Some("filter=abc"), "filter"), Some("abc"));
        assert_eq!(query_param(None, "filter"), None);
    }
}
