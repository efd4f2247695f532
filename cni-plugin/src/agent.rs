//! The plugin's side of the node agent protocol (see [`crate::protocol`]):
//! one HTTP/1.1 request over the agent's unix socket per invocation, while
//! the runtime waits to start the pod.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::protocol::{
    AddReply, PodEvent, ADD_PATH, CHECK_PATH, DEL_PATH, MAX_ERROR_TEXT, MAX_REPLY_BYTES,
};

/// Errors of talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the node agent at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node agent at {socket} did not answer within {after:?}")]
    Timeout { socket: PathBuf, after: Duration },
    #[error("exchange with the node agent at {socket} failed: {source}")]
    Exchange {
        socket: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The agent answered, with a failure.
    #[error("node agent answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
    /// The agent answered 200 with a body that is not the protocol's.
    #[error("node agent sent a malformed reply: {0}")]
    Reply(#[source] serde_json::Error),
}

impl AgentError {
    /// The agent is not there to ask (not running, not listening, hung,
    /// or gone mid-request), as opposed to having answered.
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            AgentError::Connect { .. } | AgentError::Timeout { .. } | AgentError::Exchange { .. }
        )
    }
}

/// How to reach the agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    /// `timeout` bounds each whole request, connect to last reply byte.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        AgentClient {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST /cmdadd`: whether the agent captured the pod.
    pub async fn add(&self, ev: &PodEvent) -> Result<AddReply, AgentError> {
        let body = self.post(ADD_PATH, ev).await?;
        serde_json::from_slice(&body).map_err(AgentError::Reply)
    }

    /// `POST /cmdcheck`.
    pub async fn check(&self, ev: &PodEvent) -> Result<(), AgentError> {
        self.post(CHECK_PATH, ev).await.map(drop)
    }

    /// `POST /cmddel`.
    pub async fn del(&self, ev: &PodEvent) -> Result<(), AgentError> {
        self.post(DEL_PATH, ev).await.map(drop)
    }

    /// One request; the 200 reply's body, or the failure.
    async fn post(&self, path: &str, ev: &PodEvent) -> Result<Bytes, AgentError> {
        match tokio::time::timeout(self.timeout, self.exchange(path, ev)).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout {
                socket: self.socket.clone(),
                after: self.timeout,
            }),
        }
    }

    async fn exchange(&self, path: &str, ev: &PodEvent) -> Result<Bytes, AgentError> {
        let exchange = |source: Box<dyn std::error::Error + Send + Sync>| AgentError::Exchange {
            socket: self.socket.clone(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| AgentError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| exchange(e.into()))?;
        // The connection needs its own task to make progress while this one
        // waits for the reply; one request per connection, so it is stopped
        // once the reply is in.
        let driver = tokio::spawn(conn);
        let json = serde_json::to_vec(ev).map_err(|e| exchange(e.into()))?;
        let req = Request::post(path)
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| exchange(e.into()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| exchange(e.into()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
            .map_err(exchange)?
            .to_bytes();
        drop(sender);
        driver.abort();
        if status == StatusCode::OK {
            Ok(body)
        } else {
            Err(AgentError::Refused {
                status,
                message: error_text(&body),
            })
        }
    }
}

/// The agent's failure text, trimmed and cut to [`MAX_ERROR_TEXT`] bytes
/// (on a character boundary).
fn error_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(no reason given)".to_string();
    }
    let mut end = text.len().min(MAX_ERROR_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}...", &text[..end])
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts() {
        assert_eq!(error_text(b"  boom \n"), "boom");
        assert_eq!(error_text(b""), "(no reason given)");
        let long = "é".repeat(MAX_ERROR_TEXT);
        let cut = error_text(long.as_bytes());
        assert!(cut.ends_with("...") && cut.len() <= MAX_ERROR_TEXT + 3);
        assert_eq!(error_text(b"\xff ok"), "\u{fffd} ok");
    }

    #[tokio::test]
    async fn missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let c = AgentClient::new(dir.path().join("none.sock"), Duration::from_secs(5));
        let ev = PodEvent {
            container_id: "c".into(),
            netns: String::new(),
            ifname: "eth0".into(),
            pod_name: "p".into(),
            pod_namespace: "n".into(),
            pod_uid: String::new(),
            pod_ips: vec![],
        };
        let e = c.add(&ev).await.unwrap_err();
        assert!(e.unreachable(), "{e}");
        assert!(e.to_string().contains("none.sock"), "{e}");
    }
}
