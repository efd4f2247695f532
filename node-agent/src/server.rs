//! The agent's side of the plugin-event protocol (see
//! `cni-plugin/src/protocol.rs`): HTTP/1.1 over a unix socket. The CNI
//! plugin calls it while the runtime sets up a pod, before the pod's
//! processes start, and waits for the answer: `/cmdadd` answers
//! `{"captured": bool}` only once an enrolled pod's traffic is redirected
//! and ztunnel listens in it; any failure is a non-200 with a text reason,
//! which the plugin turns into CNI error 11 (the runtime retries).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cni_plugin::protocol::{PodEvent, ADD_PATH, CHECK_PATH, DEL_PATH};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::drain;
use tokio::net::UnixListener;
use tokio_util::task::TaskTracker;

use crate::agent::{Agent, AgentError};

/// Largest request body read (a pod event is a few hundred bytes).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Errors of setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the plugin socket, replacing a stale one from an earlier run and
/// creating its directory.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let io = |action, source| ServerError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing the stale socket", e)),
    }
    UnixListener::bind(path).map_err(|e| io("listening on", e))
}

fn reply(status: StatusCode, body: impl Into<Bytes>, json: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let ct = if json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ct),
    );
    r
}

fn failure(e: &AgentError) -> Response<Full<Bytes>> {
    let status = match e {
        AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
        e if e.unavailable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    // The whole chain of causes: the runtime shows only this text.
    let mut text = crate::agent::chain(e);
    text.push('\n');
    reply(status, text, false)
}

/// One request of the plugin.
pub async fn handle(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "only POST\n", false);
    }
    let path = req.uri().path().to_string();
    if ![ADD_PATH, CHECK_PATH, DEL_PATH].contains(&path.as_str()) {
        return reply(
            StatusCode::NOT_FOUND,
            format!("unknown path {path}\n"),
            false,
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}\n"),
                false,
            )
        }
    };
    let ev: PodEvent = match serde_json::from_slice(&body) {
        Ok(ev) => ev,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                format!("the body is not a pod event: {e}\n"),
                false,
            )
        }
    };
    let result = match path.as_str() {
        ADD_PATH => agent.cni_add(&ev).await.map(|r| {
            // A struct of one bool always serializes.
            serde_json::to_vec(&r).unwrap_or_default()
        }),
        CHECK_PATH => agent.cni_check(&ev).await.map(|()| b"{}".to_vec()),
        _ => agent.cni_del(&ev).await.map(|()| b"{}".to_vec()),
    };
    match result {
        Ok(body) => reply(StatusCode::OK, body, true),
        Err(e) => {
            tracing::warn!(path, pod = %format!("{}/{}", ev.pod_namespace, ev.pod_name), error = %crate::agent::chain(&e), "plugin event failed");
            failure(&e)
        }
    }
}

/// Serves plugin events on `listener` until the drain starts, then stops
/// accepting and returns once every request in flight was answered.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>, drain: drain::Watch) {
    let tracker = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a plugin connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.signaled() => break,
        };
        let agent = agent.clone();
        let drain = drain.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(handle(agent, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "plugin connection ended");
                    }
                    return;
                }
                _ = drain.signaled() => conn.as_mut().graceful_shutdown(),
            }
            // Finishes the request in flight, then closes.
            let _ = conn.await;
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}
