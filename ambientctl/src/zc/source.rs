//! Where `ambientctl zc` gets a ztunnel's admin JSON from. ztunnel's admin
//! port (15000) listens on localhost only, so it is reached from inside:
//! in the local mesh by a socket opened in the node's network namespace
//! (the node's ztunnel shares it), on a cluster by a port-forward through
//! the API server into the ztunnel pod, or from a saved file.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use super::http::{self, HttpError, Response};
use super::ZcError;

/// ztunnel's admin port.
pub const ADMIN_PORT: u16 = 15000;

/// A ztunnel's admin endpoint. `fetch` returns the body of a 200 response.
pub trait AdminSource {
    /// The ztunnel's name, for messages (`ztunnel-node1`, a pod name, a file).
    fn ztunnel(&self) -> &str;
    fn fetch(&self, path: &str) -> Result<Vec<u8>, ZcError>;
}

/// Turns a non-200 response into the error the user sees.
fn body_of(ztunnel: &str, path: &str, r: Response) -> Result<Vec<u8>, ZcError> {
    match r.status {
        200 => Ok(r.body),
        404 => Err(ZcError::NotServed {
            ztunnel: ztunnel.to_string(),
            path: path.to_string(),
        }),
        status => Err(ZcError::Status {
            ztunnel: ztunnel.to_string(),
            path: path.to_string(),
            status,
            body: String::from_utf8_lossy(&r.body)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        }),
    }
}

/// A saved dump (`-f`): every path reads the same file.
pub struct FileSource {
    pub path: PathBuf,
    name: String,
}

impl FileSource {
    pub fn new(path: PathBuf) -> FileSource {
        FileSource {
            name: path.display().to_string(),
            path,
        }
    }
}

impl AdminSource for FileSource {
    fn ztunnel(&self) -> &str {
        &self.name
    }
    fn fetch(&self, _path: &str) -> Result<Vec<u8>, ZcError> {
        std::fs::read(&self.path).map_err(|source| ZcError::File {
            path: self.path.clone(),
            source,
        })
    }
}

#[derive(Debug)]
/// The admin port over plain TCP, optionally from inside a network
/// namespace (a local-mesh node).
pub struct TcpSource {
    pub ztunnel: String,
    /// The node, for the hint in "cannot reach" errors.
    pub node: Option<String>,
    pub addr: SocketAddr,
    pub netns: Option<String>,
    pub timeout: Duration,
}

enum Failure {
    Connect(std::io::Error),
    Http(HttpError),
}

/// Short words for the usual connect failures; the OS text otherwise.
pub(crate) fn connect_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        TimedOut | WouldBlock => "timed out".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        _ => e.to_string(),
    }
}

impl TcpSource {
    fn get(addr: SocketAddr, timeout: Duration, path: String) -> Result<Response, Failure> {
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(Failure::Connect)?;
        s.set_read_timeout(Some(timeout * 5))
            .and_then(|_| s.set_write_timeout(Some(timeout)))
            .map_err(|e| Failure::Http(e.into()))?;
        http::get_blocking(&mut s, &path).map_err(Failure::Http)
    }
}

impl AdminSource for TcpSource {
    fn ztunnel(&self) -> &str {
        &self.ztunnel
    }

    fn fetch(&self, path: &str) -> Result<Vec<u8>, ZcError> {
        let (addr, timeout, p) = (self.addr, self.timeout, path.to_string());
        let result = match &self.netns {
            Some(ns) => e2e::netns::Netns::from_name(ns)
                .run_in(move || Self::get(addr, timeout, p))
                .map_err(|source| ZcError::Netns {
                    netns: ns.clone(),
                    reason: source.to_string(),
                })?,
            None => Self::get(addr, timeout, p),
        };
        match result {
            Ok(r) => body_of(&self.ztunnel, path, r),
            Err(Failure::Connect(e)) => Err(ZcError::Unreachable {
                ztunnel: self.ztunnel.clone(),
                port: addr.port(),
                reason: connect_reason(&e),
                hint: self
                    .node
                    .as_ref()
                    .map(|n| format!(" (is ztunnel running on {n}?)"))
                    .unwrap_or_default(),
            }),
            Err(Failure::Http(source)) => Err(ZcError::Http {
                ztunnel: self.ztunnel.clone(),
                path: path.to_string(),
                source,
            }),
        }
    }
}

/// The admin port of a ztunnel pod, port-forwarded through the API server.
pub struct KubeSource {
    pub client: kube::Client,
    pub rt: tokio::runtime::Handle,
    pub pod: String,
    pub namespace: String,
    pub node: Option<String>,
    pub timeout: Duration,
}

impl AdminSource for KubeSource {
    fn ztunnel(&self) -> &str {
        &self.pod
    }

    fn fetch(&self, path: &str) -> Result<Vec<u8>, ZcError> {
        let unreachable = |reason: String| ZcError::Unreachable {
            ztunnel: format!("{}.{}", self.pod, self.namespace),
            port: ADMIN_PORT,
            reason,
            hint: self
                .node
                .as_ref()
                .map(|n| format!(" (is ztunnel running on {n}?)"))
                .unwrap_or_default(),
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let work = async {
            let mut pf = pods
                .portforward(&self.pod, &[ADMIN_PORT])
                .await
                .map_err(|e| unreachable(format!("port-forward: {e}")))?;
            let mut stream = pf
                .take_stream(ADMIN_PORT)
                .ok_or_else(|| unreachable("port-forward gave no stream".into()))?;
            let errors = pf.take_error(ADMIN_PORT);
            let get = http::get_async(&mut stream, path);
            // The API server reports a refused connection inside the pod on
            // the error channel while the data stream just ends.
            let result = match errors {
                Some(errors) => {
                    tokio::pin!(get);
                    tokio::pin!(errors);
                    tokio::select! {
                        r = &mut get => r,
                        Some(msg) = &mut errors => {
                            return Err(unreachable(msg.trim().to_string()));
                        }
                    }
                }
                None => get.await,
            };
            drop(stream);
            pf.abort();
            result.map_err(|source| ZcError::Http {
                ztunnel: self.pod.clone(),
                path: path.to_string(),
                source,
            })
        };
        let r = self.rt.block_on(async {
            tokio::time::timeout(self.timeout, work)
                .await
                .unwrap_or_else(|_| Err(unreachable("timed out".into())))
        })?;
        body_of(&self.pod, path, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_ztunnel_is_a_one_line_error() {
        // A port nothing listens on: bind, learn it, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let src = TcpSource {
            ztunnel: "ztunnel-node1".into(),
            node: Some("node1".into()),
            addr,
            netns: None,
            timeout: Duration::from_secs(2),
        };
        let err = src.fetch("/config_dump").unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "cannot reach ztunnel ztunnel-node1 admin port {}: connection refused (is ztunnel running on node1?)",
                addr.port()
            )
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn status_codes_become_errors() {
        let ok = Response {
            status: 200,
            body: b"{}".to_vec(),
        };
        assert_eq!(body_of("z", "/config_dump", ok).unwrap(), b"{}");
        let missing = Response {
            status: 404,
            body: b"not found\n".to_vec(),
        };
        assert_eq!(
            body_of("z", "/debug/connections", missing)
                .unwrap_err()
                .to_string(),
            "ztunnel z does not serve /debug/connections (a ztunnel without this endpoint)"
        );
        let bad = Response {
            status: 503,
            body: b"not ready: xds\nmore".to_vec(),
        };
        assert_eq!(
            body_of("z", "/config_dump", bad).unwrap_err().to_string(),
            "ztunnel z answered /config_dump with HTTP 503: not ready: xds"
        );
    }
}
