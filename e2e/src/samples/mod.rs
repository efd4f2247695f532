//! The built-in sample apps of the local mesh. The local kubelet maps a
//! container image to one of them ([`app_for_image`]) and runs the
//! `sample-app` binary with the arguments [`SampleApp::argv`] gives, inside
//! the pod's network namespace; from there the apps are ordinary workloads
//! at both ends of the mesh's traffic. They reproduce what users observe of
//! the real images (Bookinfo, httpbin, fortio, tcp-echo, helloworld,
//! podinfo): ports, paths, JSON shapes, timeouts, retries and the headers
//! they propagate, so Istio's documented outcomes hold.
//!
//! Configuration comes from the container's environment, as for the
//! originals (`HOSTNAME`, `CLUSTER_NAME`, `DETAILS_HOSTNAME`,
//! `REVIEWS_SERVICE_PORT`, `PORT`, ...), plus [`images::PORT_ENV`] to move
//! any app to another (or a free) port.

#![forbid(unsafe_code)]

mod bookinfo;
mod demo;
mod fortio;
pub mod http;
mod httpbin;
pub mod images;
mod productpage;
mod tcpecho;

pub use images::{
    app_for_image, builtin_command, sample_app_argv, DetailsVersion, HelloWorldVersion,
    HttpbinFlavor, ReviewsVersion, SampleApp, BINARY, PORT_ENV,
};

/// Errors that end a sample app.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("usage: {0}")]
    Usage(String),
    #[error(transparent)]
    UnknownApp(#[from] images::UnknownApp),
    #[error("{0} is a tool image: the container's own command runs instead")]
    ToolImage(&'static str),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error(transparent)]
    Fetch(#[from] http::FetchError),
}

/// Runs `sample-app <app> [args...]` (`argv` without the program name) to
/// completion and returns the process exit code. Servers run until the
/// process is signalled; fortio's client commands return.
pub async fn run(argv: &[String]) -> Result<u8, SampleError> {
    let (spec, args) = argv.split_first().ok_or_else(|| {
        SampleError::Usage(format!(
            "{BINARY} <app> [args...]; apps: {}",
            images::ALL_APPS
                .iter()
                .map(SampleApp::name)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let app: SampleApp = spec.parse()?;
    match app {
        SampleApp::ProductPage => productpage::run(args).await.map(|()| 0),
        SampleApp::Details { version } => bookinfo::run_details(version, args).await.map(|()| 0),
        SampleApp::Ratings => bookinfo::run_ratings(args).await.map(|()| 0),
        SampleApp::Reviews { version } => bookinfo::run_reviews(version, args).await.map(|()| 0),
        SampleApp::Httpbin { flavor } => httpbin::run(flavor, args).await.map(|()| 0),
        SampleApp::Curl => Err(SampleError::ToolImage("curl")),
        SampleApp::Fortio => fortio::run(args).await,
        SampleApp::TcpEcho => tcpecho::run(args).await.map(|()| 0),
        SampleApp::HelloWorld { version } => demo::run_helloworld(version, args).await.map(|()| 0),
        SampleApp::Podinfo => demo::run_podinfo(args).await.map(|()| 0),
    }
}

/// The pod's name as the apps report it (`HOSTNAME`, which the kubelet sets
/// to the pod name as a container runtime does).
pub(crate) fn hostname() -> String {
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("POD_NAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            // The UTS name, which a container runtime sets to the pod name.
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_string())
}

/// The last argument that is a port number: the Bookinfo images are started
/// as `python productpage.py 9080`, `ruby details.rb 9080`, ...
pub(crate) fn positional_port(args: &[String]) -> Option<u16> {
    args.iter().rev().find_map(|a| a.parse().ok())
}
