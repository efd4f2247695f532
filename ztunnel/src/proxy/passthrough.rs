//! Inbound plaintext (15006): connections from clients outside the mesh.
//!
//! The in-pod rules TPROXY every inbound TCP connection that is not HBONE to
//! this listener, so the local address is what the client dialled. It is
//! forwarded to the application with the client's own source address.
//! (PeerAuthentication decides later whether plaintext is allowed at all.)

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;

use super::{reset, Pod, ProxyInputs};
use crate::metrics::{ConnectionRecorder, Reporter, SecurityPolicy, TcpLabels};

pub async fn handle(
    pi: &Arc<ProxyInputs>,
    pod: &Arc<Pod>,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let span = tracing::info_span!("inbound_plaintext", src.addr = %peer, dst.workload = %pod.name);
    async move {
        let local = match stream.local_addr() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "no local address");
                return reset(stream);
            }
        };
        let network = pod.network(pi);
        let dst_wl = pi
            .state
            .wait_for_workload(&pod.uid, super::LOCAL_WORKLOAD_WAIT)
            .await;
        // Only this pod's own addresses are served here; anything else was
        // captured by mistake and must not be forwarded blindly.
        if let Some(w) = &dst_wl {
            if !w.ips.contains(&local.ip()) {
                tracing::warn!(dst.addr = %local, "plaintext connection to an address this pod does not own");
                return reset(stream);
            }
        }
        let src_wl = pi.state.workload_by_ip(&network, peer.ip());
        let labels = TcpLabels::new(Reporter::destination, src_wl.as_deref(), None, dst_wl.as_deref(), None, SecurityPolicy::none);
        let mut app = match super::connect_upstream(pi, pod, local, Some(peer.ip())).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(error = %e, app = %local, "application refused the connection");
                return reset(stream);
            }
        };
        let rec = ConnectionRecorder::start(pi.metrics.clone(), labels);
        match rec.copy(&mut stream, &mut app).await {
            Ok((recv, sent)) => {
                tracing::info!(dst.addr = %local, bytes_recv = recv, bytes_sent = sent, "connection complete (plaintext)");
            }
            Err(e) => tracing::debug!(error = %e, "plaintext copy ended with error"),
        }
    }
    .instrument(span)
    .await
}
