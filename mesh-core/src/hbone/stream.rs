//! One HBONE tunnel as a byte stream.
//!
//! Both ends of a hop get an [`H2Stream`] once the `CONNECT` is answered
//! with 200: the client from [`super::client::Pool::connect`], the server
//! from [`super::server::Responder::accept`]. The proxy then copies bytes
//! between it and the plain TCP connection on its side.
//!
//! Flow control is what makes this more than a wrapper: receive capacity is
//! handed back to the peer only as the reader consumes bytes (so a slow
//! reader slows the sender instead of growing a buffer), and writes only
//! hand h2 as much as the peer's window allows (so a slow peer blocks the
//! writer instead of queueing without bound).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::client::Lease;
use super::h2_to_io;

/// Cap on a single capacity request, so one large `write` does not claim
/// the whole connection window from sibling streams.
const MAX_RESERVE: usize = 1024 * 1024;

/// A `CONNECT` tunnel: `AsyncRead + AsyncWrite` over an HTTP/2 stream.
///
/// `shutdown` sends END_STREAM (a half close; reading goes on). Dropping
/// the stream before `shutdown` resets it with CANCEL, the HTTP/2 analogue
/// of a TCP RST.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The unread rest of the last DATA frame. Kept as `Bytes` so it is
    /// copied exactly once, into the caller's buffer.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    /// The client pool's claim on the connection; declared last so it is
    /// released after the stream itself is gone.
    _lease: Option<Lease>,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            _lease: None,
        }
    }

    pub(crate) fn with_lease(mut self, lease: Lease) -> Self {
        self._lease = Some(lease);
        self
    }

    /// The HTTP/2 stream id, for logs.
    pub fn stream_id(&self) -> u32 {
        self.send.stream_id().as_u32()
    }

    /// Error for a write that found the stream no longer open for sending.
    fn send_closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => reset_error(reason),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"),
        }
    }
}

fn reset_error(reason: Reason) -> io::Error {
    let kind = if reason == Reason::NO_ERROR || reason == Reason::CANCEL {
        io::ErrorKind::BrokenPipe
    } else {
        io::ErrorKind::ConnectionReset
    };
    io::Error::new(kind, format!("HBONE stream reset by peer: {reason}"))
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Only now is the peer allowed to send these bytes again.
                // This fails only once the stream is closed and h2 has
                // reclaimed the window itself; the bytes are still good.
                if let Err(e) = this.recv.flow_control().release_capacity(n) {
                    tracing::trace!(error = %e, "releasing capacity on a closed HBONE stream");
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(e)) => {
                    // RST_STREAM(NO_ERROR) means the peer is done and needs
                    // nothing more from us (RFC 9113 section 8.1): an end,
                    // not a failure.
                    if e.reason() == Some(Reason::NO_ERROR) && e.is_remote() {
                        this.read_eof = true;
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(h2_to_io(e)));
                }
                None => {
                    this.read_eof = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of HBONE stream",
            )));
        }
        // Two passes at most: use capacity already assigned, else request
        // some and wait for it.
        for _ in 0..2 {
            let capacity = this.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                return match this
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(_) => Poll::Ready(Err(this.send_closed_error(cx))),
                };
            }
            this.send.reserve_capacity(buf.len().min(MAX_RESERVE));
            match this.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_to_io(e))),
                Poll::Ready(None) => return Poll::Ready(Err(this.send_closed_error(cx))),
                Poll::Pending => {
                    // A peer reset does not always wake the capacity waiter.
                    return match this.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => Poll::Ready(Err(reset_error(reason))),
                        Poll::Ready(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
        // Capacity was announced but vanished again (a SETTINGS change
        // raced us); come back once more is assigned.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes queued frames out on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        // Give back capacity we reserved but will not use.
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => match this.send.poll_reset(cx) {
                Poll::Ready(Ok(Reason::NO_ERROR)) => Poll::Ready(Ok(())),
                Poll::Ready(Ok(reason)) => Poll::Ready(Err(reset_error(reason))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
                Poll::Pending => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "HBONE stream closed",
                ))),
            },
        }
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if !self.write_closed {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.stream_id())
            .field("pending", &self.pending.len())
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}
