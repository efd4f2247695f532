//! The built `mesh-cni` binary run as a container runtime runs it (env +
//! stdin, result on stdout), against an in-process node agent on a unix
//! socket that records what it is told and answers as each test says.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cni_plugin::protocol::PodEvent;
use cni_plugin::ErrorResult;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::UnixListener;

/// What the fake agent answers: status and body, or nothing ever.
#[derive(Clone)]
enum Reply {
    With(StatusCode, &'static str),
    Never,
}

/// One request the agent received.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: BTreeMap<String, String>,
    event: PodEvent,
}

struct FakeAgent {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl FakeAgent {
    /// An agent answering `reply(path)` to every request.
    fn start(reply: fn(&str) -> Reply) -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("pluginevent.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = {
            let _g = rt.enter();
            UnixListener::bind(&socket).unwrap()
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let record = record.clone();
                        async move { Ok::<_, Infallible>(serve(req, reply, &record).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeAgent {
            socket,
            seen,
            _rt: rt,
            _dir: dir,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    req: Request<Incoming>,
    reply: fn(&str) -> Reply,
    record: &Mutex<Vec<Seen>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let event: PodEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(Full::new(Bytes::from(format!("bad event: {e}"))))
                .unwrap()
        }
    };
    record.lock().unwrap().push(Seen {
        path: path.clone(),
        headers,
        event,
    });
    match reply(&path) {
        Reply::With(status, body) => Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap(),
        Reply::Never => std::future::pending().await,
    }
}

const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=4f1c-77;K8S_POD_INFRA_CONTAINER_ID=c0ffee";

fn prev() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": "/var/run/netns/cni-42"}],
        "ips": [
            {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0},
            {"address": "fd00::7/64", "interface": 0}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn conf(socket: &Path, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
        "agentSocket": socket, "prevResult": prev(), "somethingElse": [1]
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

struct Outcome {
    status: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        assert_eq!(self.status, 0, "{}", self.describe());
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.describe()))
    }

    fn empty(&self) {
        assert_eq!(self.status, 0, "{}", self.describe());
        assert!(self.stdout.is_empty(), "{}", self.describe());
    }

    fn error(&self, code: u32) -> ErrorResult {
        assert_eq!(self.status, 1, "{}", self.describe());
        let e: ErrorResult = serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", self.describe()));
        assert_eq!(e.code, code, "{}", self.describe());
        e
    }

    fn describe(&self) -> String {
        format!(
            "exit {}\nstdout: {}\nstderr: {}",
            self.status,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        )
    }
}

/// Runs the binary with the environment a runtime gives it.
fn plugin(command: &str, cni_args: Option<&str>, conf: &Value) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", "/var/run/netns/cni-42")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("MESH_CNI_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(a) = cni_args {
        cmd.env("CNI_ARGS", a);
    }
    let mut child = cmd.spawn().expect("start mesh-cni");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(conf.to_string().as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    Outcome {
        status: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn captured(_: &str) -> Reply {
    Reply::With(StatusCode::OK, r#"{"captured": true}"#)
}

#[test]
fn captured_add_returns_prev_result_and_describes_the_pod() {
    let agent = FakeAgent::start(captured);
    let out = plugin("ADD", Some(POD_ARGS), &conf(&agent.socket, json!({})));
    assert_eq!(out.json(), prev());
    let seen = agent.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/cmdadd");
    assert_eq!(
        seen[0].headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        seen[0].event,
        PodEvent {
            container_id: "c0ffee".into(),
            netns: "/var/run/netns/cni-42".into(),
            ifname: "eth0".into(),
            pod_name: "web-0".into(),
            pod_namespace: "shop".into(),
            pod_uid: "4f1c-77".into(),
            pod_ips: vec!["10.244.1.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        }
    );
}

#[test]
fn pod_outside_the_mesh_passes_through() {
    let agent = FakeAgent::start(|_| Reply::With(StatusCode::OK, r#"{"captured":false}"#));
    let out = plugin("ADD", Some(POD_ARGS), &conf(&agent.socket, json!({})));
    assert_eq!(out.json(), prev());
    assert_eq!(agent.seen().len(), 1);
}

#[test]
fn agent_failure_is_try_again_later_naming_pod_and_reason() {
    let agent = FakeAgent::start(|_| {
        Reply::With(
            StatusCode::SERVICE_UNAVAILABLE,
            "ztunnel has not connected to this node agent yet\n",
        )
    });
    let out = plugin("ADD", Some(POD_ARGS), &conf(&agent.socket, json!({})));
    let e = out.error(11);
    assert!(e.msg.contains("shop/web-0"), "{e:?}");
    assert!(
        e.msg
            .contains("ztunnel has not connected to this node agent yet"),
        "{e:?}"
    );
    assert!(e.msg.contains("503"), "{e:?}");
}

#[test]
fn malformed_agent_reply_is_try_again_later() {
    let agent = FakeAgent::start(|_| Reply::With(StatusCode::OK, "yes"));
    let out = plugin("ADD", Some(POD_ARGS), &conf(&agent.socket, json!({})));
    let e = out.error(11);
    assert!(e.msg.contains("malformed"), "{e:?}");
}

#[test]
fn agent_absent_without_kubeconfig_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing at the path, and a socket file nobody listens on.
    let missing = dir.path().join("missing.sock");
    let refused = dir.path().join("refused.sock");
    drop(std::os::unix::net::UnixListener::bind(&refused).unwrap());
    for socket in [missing, refused] {
        let out = plugin("ADD", Some(POD_ARGS), &conf(&socket, json!({})));
        let e = out.error(11);
        assert!(e.msg.contains("node agent unreachable"), "{e:?}");
        assert!(e.msg.contains("kubeconfig"), "{e:?}");
        assert!(e.details.contains(&socket.display().to_string()), "{e:?}");
    }
}

#[test]
fn hung_agent_times_out_and_fails_closed() {
    let agent = FakeAgent::start(|_| Reply::Never);
    let out = plugin(
        "ADD",
        Some(POD_ARGS),
        &conf(&agent.socket, json!({"agentTimeoutSeconds": 1})),
    );
    let e = out.error(11);
    assert!(e.details.contains("did not answer"), "{e:?}");
    assert_eq!(agent.seen().len(), 1);
}

#[test]
fn excluded_and_non_pod_sandboxes_never_reach_the_agent() {
    let agent = FakeAgent::start(|_| Reply::With(StatusCode::INTERNAL_SERVER_ERROR, "no"));
    let sys = POD_ARGS.replace("=shop", "=kube-system");
    let c = conf(&agent.socket, json!({}));
    assert_eq!(plugin("ADD", Some(&sys), &c).json(), prev());
    assert_eq!(plugin("ADD", None, &c).json(), prev());
    let shop_excluded = conf(&agent.socket, json!({"excludeNamespaces": ["shop"]}));
    assert_eq!(plugin("ADD", Some(POD_ARGS), &shop_excluded).json(), prev());
    plugin("CHECK", Some(&sys), &c).empty();
    assert!(agent.seen().is_empty(), "{:?}", agent.seen());
}

#[test]
fn del_is_best_effort() {
    let dir = tempfile::tempdir().unwrap();
    let absent = conf(&dir.path().join("missing.sock"), json!({}));
    let out = plugin("DEL", Some(POD_ARGS), &absent);
    out.empty();
    assert!(
        out.stderr.contains("torn down anyway"),
        "{}",
        out.describe()
    );

    let failing = FakeAgent::start(|_| Reply::With(StatusCode::INTERNAL_SERVER_ERROR, "boom"));
    plugin("DEL", Some(POD_ARGS), &conf(&failing.socket, json!({}))).empty();

    let agent = FakeAgent::start(|_| Reply::With(StatusCode::OK, ""));
    plugin("DEL", Some(POD_ARGS), &conf(&agent.socket, json!({}))).empty();
    let seen = agent.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/cmddel");
    assert_eq!(seen[0].event.pod_name, "web-0");
}

#[test]
fn check_asks_the_agent() {
    let agent = FakeAgent::start(|path| match path {
        "/cmdcheck" => Reply::With(StatusCode::OK, "{}"),
        _ => Reply::With(StatusCode::NOT_FOUND, "unexpected"),
    });
    plugin("CHECK", Some(POD_ARGS), &conf(&agent.socket, json!({}))).empty();
    let seen = agent.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/cmdcheck");

    let broken = FakeAgent::start(|_| {
        Reply::With(
            StatusCode::INTERNAL_SERVER_ERROR,
            "redirection rules missing in the pod",
        )
    });
    let e = plugin("CHECK", Some(POD_ARGS), &conf(&broken.socket, json!({}))).error(11);
    assert!(e.msg.contains("redirection rules missing"), "{e:?}");
    assert!(e.msg.contains("shop/web-0"), "{e:?}");

    let dir = tempfile::tempdir().unwrap();
    let absent = conf(&dir.path().join("missing.sock"), json!({}));
    plugin("CHECK", Some(POD_ARGS), &absent).error(11);
}

#[test]
fn version_and_bad_input_from_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let c = conf(&dir.path().join("x.sock"), json!({}));
    let out = plugin("VERSION", None, &c);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
    );
    let e = plugin("BOGUS", None, &c).error(4);
    assert!(e.msg.contains("CNI_COMMAND"), "{e:?}");
    let e = plugin("ADD", None, &json!([1])).error(7);
    assert!(e.msg.contains("object"), "{e:?}");
}
