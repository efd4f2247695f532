//! Bidirectional byte pump between the two legs of a proxied connection.
//!
//! Every proxied connection ends here: the captured TCP connection on one
//! side, an HBONE tunnel (or the destination pod's socket) on the other.
//! Buffers start small, because most connections carry little, and grow
//! when reads keep filling them, so bulk transfers run with few large
//! writes (which, over HBONE, become few large DATA frames). A side that
//! reaches EOF is half-closed on the other side (TCP FIN, HTTP/2
//! END_STREAM) while the opposite direction runs on.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Byte counters updated while the copy runs, so metrics and connection
/// dumps see live totals rather than a figure at close.
#[derive(Debug, Default)]
pub struct Counters {
    a_to_b: AtomicU64,
    b_to_a: AtomicU64,
}

impl Counters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes written to `b` so far.
    pub fn a_to_b(&self) -> u64 {
        self.a_to_b.load(Ordering::Relaxed)
    }

    /// Bytes written to `a` so far.
    pub fn b_to_a(&self) -> u64 {
        self.b_to_a.load(Ordering::Relaxed)
    }
}

/// How the per-direction buffer is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferPolicy {
    /// Size each direction starts with.
    pub initial: usize,
    /// Size it may grow to.
    pub max: usize,
    /// Reads that fill the buffer before it doubles.
    pub grow_after: u32,
}

impl Default for BufferPolicy {
    fn default() -> Self {
        BufferPolicy {
            initial: 16 * 1024,
            max: 256 * 1024,
            grow_after: 4,
        }
    }
}

impl BufferPolicy {
    /// A fixed buffer of `size` bytes (no growth).
    pub fn fixed(size: usize) -> Self {
        BufferPolicy {
            initial: size,
            max: size,
            grow_after: u32::MAX,
        }
    }
}

/// Copies `a -> b` and `b -> a` until both directions reached EOF and were
/// shut down. Returns the bytes written in each direction.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy_bidirectional_with(a, b, &Counters::default()).await
}

/// [`copy_bidirectional`] that also adds to `counters` as bytes are
/// written.
pub async fn copy_bidirectional_with<A, B>(
    a: &mut A,
    b: &mut B,
    counters: &Counters,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy_bidirectional_with_policy(a, b, counters, BufferPolicy::default()).await
}

/// [`copy_bidirectional_with`] with explicit buffer sizing.
pub async fn copy_bidirectional_with_policy<A, B>(
    a: &mut A,
    b: &mut B,
    counters: &Counters,
    policy: BufferPolicy,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Direction::new(policy);
    let mut ba = Direction::new(policy);
    let (mut ab_done, mut ba_done) = (false, false);
    poll_fn(|cx| {
        if !ab_done {
            if let Poll::Ready(r) =
                ab.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b), &counters.a_to_b)
            {
                r?;
                ab_done = true;
            }
        }
        if !ba_done {
            if let Poll::Ready(r) =
                ba.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a), &counters.b_to_a)
            {
                r?;
                ba_done = true;
            }
        }
        if ab_done && ba_done {
            Poll::Ready(Ok((ab.total, ba.total)))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One direction: bytes `buf[pos..cap]` are read but not yet written.
struct Direction {
    buf: Vec<u8>,
    pos: usize,
    cap: usize,
    max: usize,
    grow_after: u32,
    /// Reads in a row that left the buffer full.
    full_reads: u32,
    read_done: bool,
    need_flush: bool,
    total: u64,
}

impl Direction {
    fn new(policy: BufferPolicy) -> Self {
        let initial = policy.initial.max(1);
        Direction {
            buf: vec![0; initial],
            pos: 0,
            cap: 0,
            max: policy.max.max(initial),
            grow_after: policy.grow_after.max(1),
            full_reads: 0,
            read_done: false,
            need_flush: false,
            total: 0,
        }
    }

    /// Called with the buffer empty, so resizing moves no data.
    fn maybe_grow(&mut self) {
        if self.full_reads >= self.grow_after && self.buf.len() < self.max {
            let size = (self.buf.len() * 2).min(self.max);
            self.buf.resize(size, 0);
            self.full_reads = 0;
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &AtomicU64,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap {
                self.pos = 0;
                self.cap = 0;
                self.maybe_grow();
            }
            // Read into free space even while data waits to be written, so
            // the next write is as large as possible.
            let mut read_pending = false;
            if !self.read_done && self.cap < self.buf.len() {
                let mut rb = ReadBuf::new(&mut self.buf[self.cap..]);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.cap += n;
                            if self.cap == self.buf.len() {
                                self.full_reads = self.full_reads.saturating_add(1);
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        read_pending = true;
                        // The source went quiet with nothing queued: this is
                        // not a bulk stream (yet).
                        if self.pos == self.cap {
                            self.full_reads = 0;
                        }
                    }
                }
            }

            if self.pos < self.cap {
                match writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.cap])
                {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "write returned 0 bytes",
                        )))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.total += n as u64;
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Keep reading only while there is room and the
                        // reader has something; else wait for either.
                        if read_pending || self.read_done || self.cap == self.buf.len() {
                            return Poll::Pending;
                        }
                    }
                }
                continue;
            }

            if self.read_done {
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
            if read_pending {
                // Nothing more to send for now: push out what a buffering
                // writer (TLS) still holds.
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut client, mut a) = tokio::io::duplex(4096);
        let (mut b, mut server) = tokio::io::duplex(4096);
        let counters = std::sync::Arc::new(Counters::new());
        let c2 = counters.clone();
        let pump = tokio::spawn(async move { copy_bidirectional_with(&mut a, &mut b, &c2).await });

        let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            // The client's EOF arrived, and the server can still answer.
            server.write_all(&down2).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(&up2).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got_down = Vec::new();
        client.read_to_end(&mut got_down).await.unwrap();

        assert_eq!(server_task.await.unwrap(), up);
        assert_eq!(got_down, down);
        let (ab, ba) = pump.await.unwrap().unwrap();
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
        assert_eq!(counters.a_to_b(), ab);
        assert_eq!(counters.b_to_a(), ba);
    }

    #[test]
    fn buffer_grows_only_after_repeated_full_reads() {
        let mut d = Direction::new(BufferPolicy {
            initial: 16,
            max: 64,
            grow_after: 2,
        });
        d.full_reads = 1;
        d.maybe_grow();
        assert_eq!(d.buf.len(), 16);
        d.full_reads = 2;
        d.maybe_grow();
        assert_eq!(d.buf.len(), 32);
        d.full_reads = 5;
        d.maybe_grow();
        d.full_reads = 5;
        d.maybe_grow();
        assert_eq!(d.buf.len(), 64);
        let fixed = Direction::new(BufferPolicy::fixed(8));
        assert_eq!((fixed.buf.len(), fixed.max), (8, 8));
    }

    #[tokio::test]
    async fn grows_under_bulk_load() {
        let (mut src, mut a) = tokio::io::duplex(1 << 20);
        let (mut b, mut sink) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            src.write_all(&vec![7u8; 4 << 20]).await.unwrap();
            src.shutdown().await.unwrap();
            src
        });
        let reader = tokio::spawn(async move {
            let mut n = 0u64;
            let mut buf = vec![0; 1 << 16];
            loop {
                let r = sink.read(&mut buf).await.unwrap();
                if r == 0 {
                    break n;
                }
                n += r as u64;
            }
        });
        let mut ab = Direction::new(BufferPolicy::default());
        let counter = AtomicU64::new(0);
        poll_fn(|cx| ab.poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b), &counter))
            .await
            .unwrap();
        assert_eq!(reader.await.unwrap(), 4 << 20);
        drop(writer.await.unwrap());
        assert!(
            ab.buf.len() > BufferPolicy::default().initial,
            "buffer stayed at {}",
            ab.buf.len()
        );
    }
}
