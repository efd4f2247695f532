//! `sample-app <app> [args...]`: the process the local kubelet starts for a
//! container whose image is a built-in sample (Bookinfo, httpbin, fortio,
//! tcp-echo, helloworld, podinfo), inside the pod's network namespace. The
//! app reads its configuration from the container's environment; SIGTERM
//! (the kubelet stopping the pod) ends it with status 0.

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sample-app: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("sample-app: cannot watch SIGTERM: {e}");
                    return 1;
                }
            };
        tokio::select! {
            result = e2e::samples::run(&argv) => match result {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("sample-app: {e}");
                    1
                }
            },
            _ = term.recv() => 0,
            _ = tokio::signal::ctrl_c() => 0,
        }
    });
    // Detached connection tasks must not hold the exit back.
    runtime.shutdown_background();
    ExitCode::from(code)
}
