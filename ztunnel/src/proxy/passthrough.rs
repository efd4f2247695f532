//! Inbound plaintext (15006): connections from clients outside the mesh.
//!
//! The in-pod rules TPROXY every inbound TCP connection that is not HBONE to
//! this listener, so the local address is what the client dialled. It is
//! forwarded to the application with the client's own source address.
//! (PeerAuthentication decides later whether plaintext is allowed at all.)
//!
//! Every connection is authorized first, as from a peer without identity:
//! rules on principals or namespaces cannot match it. A denied connection
//! is reset before the application is dialled.

use std::net::SocketAddr;
use std::sync::Arc;

#[cfg(test)]
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::{reset, Pod, ProxyInputs};
use crate::connections::{ConnProtocol, ConnectionInfo, Direction};
use crate::metrics::{ConnectionRecorder, Reporter, SecurityPolicy, TcpLabels, RESPONSE_FLAG_DENY};
use crate::rbac;

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
        // Registered before the decision, so a policy change landing after
        // the decision read the state is always followed by a re-check.
        let tracked = pi.connections.register(ConnectionInfo {
            pod: format!("{}/{}", pod.namespace, pod.name),
            pod_namespace: pod.namespace.clone(),
            pod_uid: pod.uid.clone(),
            direction: Direction::Inbound,
            protocol: ConnProtocol::Tcp,
            local,
            remote: peer,
            remote_target: local,
            src_identity: None,
            dst_identity: None,
        });
        let conn = rbac::Connection { src_identity: None, src: peer, dst: local };
        if super::authorize_inbound(pi, pod, dst_wl.as_deref(), &conn, &labels).is_err() {
            return reset(stream);
        }
        let mut app = match super::connect_upstream(pi, pod, local, Some(peer.ip())).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(error = %e, app = %local, "application refused the connection");
                return reset(stream);
            }
        };
        let mut rec = ConnectionRecorder::start(pi.metrics.clone(), labels);
        let copied = tokio::select! {
            // Checked first: a connection closed by a policy change while
            // the application was dialled must not move a byte.
            biased;
            // A policy change no longer allows it (logged by the registry).
            _ = tracked.closed() => None,
            r = rec.copy(&mut stream, &mut app) => Some(r),
        };
        let Some(copied) = copied else {
            rec.set_response_flags(RESPONSE_FLAG_DENY);
            return reset(stream);
        };
        match copied {
            Ok((recv, sent)) => {
                tracing::info!(dst.addr = %local, bytes_recv = recv, bytes_sent = sent, "connection complete (plaintext)");
            }
            Err(e) => tracing::debug!(error = %e, "plaintext copy ended with error"),
        }
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::test_support::{denied_count, deny_all, setup};
    use crate::state::Delta;

    #[tokio::test]
    async fn a_denied_plaintext_connection_is_reset_and_counted_with_deny() {
        let (pi, pod) = setup();
        pi.state.apply_delta(Delta {
            policies: vec![deny_all("deny-all")],
            ..Default::default()
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = l.accept().await.unwrap();
        handle(&pi, &pod, stream, peer).await;
        let mut buf = [0u8; 8];
        let r = client.read(&mut buf).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert_eq!(denied_count(&pi), 1);
        assert!(pi.connections.is_empty());
    }

    #[tokio::test]
    async fn a_policy_change_resets_an_open_plaintext_connection() {
        let (pi, pod) = setup();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = l.accept().await.unwrap();
        let proxy = {
            let (pi, pod) = (pi.clone(), pod.clone());
            tokio::spawn(async move { handle(&pi, &pod, stream, peer).await })
        };
        // Allowed: the proxy dials the application (the same listener).
        let (mut app, _) = l.accept().await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        app.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(pi.connections.len(), 1);
        let dump = pi.connections.dump();
        assert_eq!(dump["connections"][0]["protocol"], "TCP");
        assert_eq!(dump["connections"][0]["pod"], "ns1/server");

        pi.state.apply_delta(Delta {
            policies: vec![deny_all("deny-all")],
            ..Default::default()
        });
        assert_eq!(pi.connections.revalidate(&pi.state), 1);
        tokio::time::timeout(Duration::from_secs(5), proxy)
            .await
            .expect("proxy task ends")
            .unwrap();
        let r = client.read(&mut buf).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert!(pi.connections.is_empty());
        assert_eq!(denied_count(&pi), 1);
    }
}
