//! Two small demo servers of multicluster and canary tasks: Istio's
//! helloworld (`/hello` on 5000, naming version and pod, so responses show
//! which cluster or version answered) and podinfo (9898, JSON naming the
//! pod).

use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::json;

use super::http::{self as h, Handler, Req, Resp};
use super::images::HelloWorldVersion;
use super::{hostname, SampleError};

struct HelloWorld {
    version: String,
    instance: String,
}

impl Handler for HelloWorld {
    async fn handle(&self, req: Req) -> Resp {
        match (req.method, req.uri.path()) {
            (Method::GET, "/hello") => h::respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                format!(
                    "Hello version: {}, instance: {}\n",
                    self.version, self.instance
                ),
            ),
            (Method::GET, "/health") => h::respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                "Helloworld is healthy",
            ),
            _ => h::not_found(),
        }
    }
}

pub(crate) async fn run_helloworld(
    version: HelloWorldVersion,
    _args: &[String],
) -> Result<(), SampleError> {
    let default = match version {
        HelloWorldVersion::V1 => "v1",
        HelloWorldVersion::V2 => "v2",
    };
    // The images bake SERVICE_VERSION in; a manifest may override it.
    let version = std::env::var("SERVICE_VERSION").unwrap_or_else(|_| default.to_string());
    let listener = h::bind(h::listen_port(None, 5000)).await?;
    h::serve(
        listener,
        Arc::new(HelloWorld {
            version,
            instance: hostname(),
        }),
    )
    .await
}

struct Podinfo {
    hostname: String,
    message: String,
    color: String,
}

/// The podinfo release whose responses these mimic.
const PODINFO_VERSION: &str = "6.7.1";

impl Handler for Podinfo {
    async fn handle(&self, req: Req) -> Resp {
        let body = match (req.method.clone(), req.uri.path()) {
            (Method::GET, "/") | (Method::GET, "/api/info") => json!({
                "hostname": self.hostname,
                "version": PODINFO_VERSION,
                "revision": "",
                "color": self.color,
                "logo": "https://raw.githubusercontent.com/stefanprodan/podinfo/gh-pages/cuddle_clap.gif",
                "message": self.message,
                "goos": "linux",
                "goarch": std::env::consts::ARCH,
                "runtime": "go1.23",
                "num_goroutine": "8",
                "num_cpu": std::thread::available_parallelism().map_or(1, |n| n.get()).to_string(),
            }),
            (Method::GET, "/healthz") | (Method::GET, "/readyz") => json!({ "status": "OK" }),
            (Method::GET, "/version") => json!({ "commit": "", "version": PODINFO_VERSION }),
            (Method::GET, "/headers") => {
                let mut map = serde_json::Map::new();
                for name in req.headers.keys() {
                    let values: Vec<String> = req
                        .headers
                        .get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect();
                    map.insert(h::canonical_header(name.as_str()), json!(values));
                }
                serde_json::Value::Object(map)
            }
            _ => return h::not_found(),
        };
        h::json(
            StatusCode::OK,
            serde_json::to_string_pretty(&body).unwrap_or_default(),
        )
    }
}

/// podinfo's `--port=9898` / `--port 9898` flag (its manifests pass it in
/// the container command).
fn port_flag(args: &[String]) -> Option<u16> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if let Some(v) = arg.strip_prefix("--port=") {
            return v.parse().ok();
        }
        if arg == "--port" {
            return it.next().and_then(|v| v.parse().ok());
        }
    }
    None
}

pub(crate) async fn run_podinfo(args: &[String]) -> Result<(), SampleError> {
    let listener = h::bind(h::listen_port(
        port_flag(args).or_else(|| h::env_port("PODINFO_PORT")),
        9898,
    ))
    .await?;
    let podinfo = Podinfo {
        hostname: hostname(),
        message: std::env::var("PODINFO_UI_MESSAGE")
            .unwrap_or_else(|_| format!("greetings from podinfo v{PODINFO_VERSION}")),
        color: std::env::var("PODINFO_UI_COLOR").unwrap_or_else(|_| "#34577c".to_string()),
    };
    h::serve(listener, Arc::new(podinfo)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podinfo_port_flag() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(port_flag(&s(&["--port=9898", "--level=info"])), Some(9898));
        assert_eq!(port_flag(&s(&["--port", "1234"])), Some(1234));
        assert_eq!(port_flag(&s(&["--grpc-port=9999"])), None);
    }
}
