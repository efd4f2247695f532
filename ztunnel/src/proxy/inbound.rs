//! Inbound HBONE (15008): tunnels from other ztunnels to this pod.
//!
//! The connection is mutual TLS with the pod's own identity; the client's
//! identity comes from its certificate. Each CONNECT must name this pod's
//! address (the address the client dialled); the application is then reached
//! from inside the pod, with the client's own source address where the in-pod
//! routing allows it.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::drain;
use mesh_core::hbone::server::Responder;
use mesh_core::hbone::ConnectRequest;
use mesh_core::identity::Identity;
use mesh_core::tls;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::{Pod, ProxyError, ProxyInputs};
use crate::metrics::{ConnectionRecorder, Reporter, SecurityPolicy, TcpLabels};

pub async fn handle(
    pi: &Arc<ProxyInputs>,
    pod: &Arc<Pod>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: &drain::Watch,
) {
    let span = tracing::info_span!("inbound", src.addr = %peer, dst.workload = %pod.name);
    async move {
        if let Err(e) = serve(pi, pod, stream, peer, drain).await {
            tracing::info!(error = %e, "inbound hbone connection ended with error");
        }
    }
    .instrument(span)
    .await
}

async fn serve(
    pi: &Arc<ProxyInputs>,
    pod: &Arc<Pod>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: &drain::Watch,
) -> Result<(), ProxyError> {
    // With TPROXY the local address is the one the client dialled.
    let local = stream.local_addr()?;
    let cert = pi
        .certs
        .get(&pod.identity)
        .await
        .map_err(|source| ProxyError::Certificate {
            identity: pod.identity.to_string(),
            source,
        })?;
    let cfg = pod.server_tls(&cert)?;
    let tls = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await?;
    let client_id = tls::peer_identity(tls.get_ref().1);
    tracing::debug!(src.identity = %display_identity(&client_id), "mTLS established");
    let handler = {
        let pi = pi.clone();
        let pod = pod.clone();
        move |req: ConnectRequest, responder: Responder| {
            let pi = pi.clone();
            let pod = pod.clone();
            let client_id = client_id.clone();
            async move { stream_request(pi, pod, req, responder, local, peer, client_id).await }
        }
    };
    mesh_core::hbone::server::serve_connection(tls, &pi.hbone_server, handler, drain.signaled())
        .await?;
    Ok(())
}

async fn stream_request(
    pi: Arc<ProxyInputs>,
    pod: Arc<Pod>,
    req: ConnectRequest,
    responder: Responder,
    local: SocketAddr,
    peer: SocketAddr,
    client_id: Option<Identity>,
) {
    let Some(target) = req.authority.socket_addr() else {
        responder.reject(StatusCode::BAD_REQUEST);
        return;
    };
    if target.ip() != local.ip() {
        tracing::warn!(authority = %target, dialled = %local.ip(), "CONNECT authority is not this pod's address");
        responder.reject(StatusCode::BAD_REQUEST);
        return;
    }
    let dst_wl = pi
        .state
        .wait_for_workload(&pod.uid, super::LOCAL_WORKLOAD_WAIT)
        .await;
    let src_wl = pi.state.workload_by_ip(&pod.network(&pi), peer.ip());
    let service = dst_wl
        .as_ref()
        .and_then(|w| pi.state.service_for_target(w, target.port()));
    let labels = TcpLabels::new(
        Reporter::destination,
        src_wl.as_deref(),
        client_id.as_ref().map(|i| i.to_string()),
        dst_wl.as_deref(),
        service.as_deref(),
        SecurityPolicy::mutual_tls,
    );
    let mut app = match super::connect_upstream(&pi, &pod, target, Some(peer.ip())).await {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(error = %e, app = %target, "application refused the connection");
            let mut labels = labels;
            labels.response_flags = "UF".into();
            drop(ConnectionRecorder::start(pi.metrics.clone(), labels));
            responder.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let mut tunnel = match responder.accept() {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(error = %e, "client went away before the tunnel was up");
            return;
        }
    };
    let rec = ConnectionRecorder::start(pi.metrics.clone(), labels);
    match rec.copy(&mut tunnel, &mut app).await {
        Ok((recv, sent)) => {
            tracing::info!(
                src.identity = %display_identity(&client_id),
                dst.addr = %target,
                bytes_recv = recv,
                bytes_sent = sent,
                "connection complete"
            );
        }
        Err(e) => tracing::debug!(error = %e, "inbound copy ended with error"),
    }
}

fn display_identity(id: &Option<Identity>) -> String {
    id.as_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "unknown".into())
}
