//! The inbound end of HBONE: one HTTP/2 connection, many `CONNECT`s.
//!
//! The ztunnel's 15008 listener accepts a TCP connection, completes mutual
//! TLS, and calls [`serve_connection`] with the TLS stream and a handler that
//! knows the peer's identity. Malformed requests are answered here; every
//! well-formed `CONNECT` goes to the handler on its own task, which decides
//! (policy, upstream dial) and then either [`Responder::accept`]s the tunnel
//! or [`Responder::reject`]s it with a status.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::stream::H2Stream;
use super::{
    clamp_frame_size, clamp_send_buffer, Authority, ConnectRequest, HboneError, Keepalive,
    DEFAULT_CONNECTION_WINDOW, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE, DEFAULT_SEND_BUFFER, DEFAULT_STREAM_WINDOW,
};

/// HTTP/2 settings and behaviour of an HBONE server connection.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Receive window of each stream.
    pub stream_window: u32,
    /// Receive window of the connection.
    pub connection_window: u32,
    /// Largest frame payload the peer may send.
    pub max_frame_size: u32,
    /// Streams a client may have open at once; more are refused with
    /// REFUSED_STREAM, which the client may retry elsewhere.
    pub max_concurrent_streams: u32,
    /// Unsent data one stream may queue inside h2.
    pub send_buffer: usize,
    /// Largest header block accepted.
    pub max_header_list_size: u32,
    /// Ping interval; `None` disables keepalive.
    pub keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// Accept `hostname:port` authorities (a gateway terminating the outer
    /// tunnel of double HBONE). Otherwise only `ip:port` is valid.
    pub accept_hostname_authority: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_concurrent_streams: 1000,
            send_buffer: DEFAULT_SEND_BUFFER,
            max_header_list_size: 64 * 1024,
            keepalive_interval: Some(DEFAULT_KEEPALIVE_INTERVAL),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            accept_hostname_authority: false,
        }
    }
}

/// The handler's way to answer one `CONNECT`. Dropping it unanswered sends
/// 500, so a handler bug cannot leave a client waiting.
pub struct Responder {
    send: Option<SendResponse<Bytes>>,
    recv: Option<RecvStream>,
}

impl Responder {
    /// Answers with an error status and ends the stream. A status that is
    /// not 4xx/5xx would tell the client the tunnel is up, so it is sent as
    /// 500 instead.
    pub fn reject(mut self, status: StatusCode) {
        let status = if status.is_client_error() || status.is_server_error() {
            status
        } else {
            warn!(%status, "HBONE reject with a non-error status; sending 500");
            StatusCode::INTERNAL_SERVER_ERROR
        };
        if let Some(send) = self.send.take() {
            respond_error(send, status);
        }
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let (Some(mut send), Some(recv)) = (self.send.take(), self.recv.take()) else {
            return Err(HboneError::NoConnection);
        };
        let send = send.send_response(status_only(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, recv))
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(send) = self.send.take() {
            warn!("HBONE handler dropped a CONNECT without answering; sending 500");
            respond_error(send, StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("answered", &self.send.is_none())
            .finish()
    }
}

fn status_only(status: StatusCode) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    resp
}

fn respond_error(mut send: SendResponse<Bytes>, status: StatusCode) {
    if let Err(e) = send.send_response(status_only(status), true) {
        debug!(error = %e, %status, "could not send HBONE error response");
    }
}

/// Why a request is answered 400 without reaching the handler.
fn validate(req: &Request<RecvStream>, cfg: &ServerConfig) -> Result<Authority, &'static str> {
    if req.method() != Method::CONNECT {
        return Err("method is not CONNECT");
    }
    if req.extensions().get::<h2::ext::Protocol>().is_some() {
        return Err("extended CONNECT is not HBONE");
    }
    let Some(authority) = req.uri().authority() else {
        return Err("missing :authority");
    };
    match Authority::parse(authority.as_str()) {
        Ok(a @ Authority::Addr(_)) => Ok(a),
        Ok(a @ Authority::Host { .. }) if cfg.accept_hostname_authority => Ok(a),
        Ok(Authority::Host { .. }) => Err(":authority is a hostname, want ip:port"),
        Err(_) => Err(":authority is not ip:port"),
    }
}

/// Serves HBONE on one established (usually TLS) connection until the peer
/// goes away, or until `shutdown` resolves and the streams open at that
/// moment have finished. On shutdown the peer gets a GOAWAY, so its pool
/// opens a new connection for new requests while existing tunnels run on.
///
/// The future may be dropped to close the connection at once (a drain
/// deadline); that aborts the streams still open.
pub async fn serve_connection<IO, H, F>(
    io: IO,
    cfg: &ServerConfig,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(ConnectRequest, Responder) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let handshake = h2::server::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(clamp_frame_size(cfg.max_frame_size))
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .max_send_buffer_size(clamp_send_buffer(cfg.send_buffer))
        .max_header_list_size(cfg.max_header_list_size)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::select! {
        conn = handshake => conn?,
        () = &mut shutdown => return Ok(()),
    };
    let mut keepalive = Keepalive::new(
        conn.ping_pong(),
        cfg.keepalive_interval,
        cfg.keepalive_timeout,
    );
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                None => return Ok(()),
                Some(Ok((req, respond))) => dispatch(req, respond, cfg, &handler),
                Some(Err(e)) => return Err(e.into()),
            },
            () = &mut shutdown, if !draining => {
                debug!("HBONE connection draining: sending GOAWAY");
                draining = true;
                conn.graceful_shutdown();
            }
            res = keepalive.step() => {
                if let Err(e) = res {
                    warn!(error = %e, "HBONE client stopped answering pings; closing");
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    return Err(e);
                }
            }
        }
    }
}

fn dispatch<H, F>(
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    cfg: &ServerConfig,
    handler: &H,
) where
    H: Fn(ConnectRequest, Responder) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let authority = match validate(&req, cfg) {
        Ok(a) => a,
        Err(why) => {
            debug!(method = %req.method(), uri = %req.uri(), why, "HBONE request rejected with 400");
            respond_error(respond, StatusCode::BAD_REQUEST);
            return;
        }
    };
    let (parts, body) = req.into_parts();
    let request = ConnectRequest {
        authority,
        headers: parts.headers,
    };
    let responder = Responder {
        send: Some(respond),
        recv: Some(body),
    };
    tokio::spawn(handler.clone()(request, responder));
}
