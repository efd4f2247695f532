//! ztunnel's syscalls: entering a pod's network namespace to create sockets
//! there, and the socket options of transparent proxying.
//!
//! In in-pod mode every socket ztunnel uses for a pod — its listeners on
//! 15001/15006/15008 and its outbound connections — lives in the pod's
//! network namespace. A socket belongs to the namespace it was created in, so
//! only `socket(2)` itself runs inside: the calling thread enters the pod's
//! namespace, creates the socket and returns to ztunnel's own namespace at
//! once. Everything else (bind, connect, I/O) then happens anywhere.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};

/// The mark on every socket ztunnel creates in a pod, so the in-pod redirect
/// rules let its own traffic through.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// A handle on a network namespace plus the namespace to return to.
#[derive(Debug, Clone)]
pub struct Netns {
    target: Arc<OwnedFd>,
    home: Arc<OwnedFd>,
    inode: u64,
}

impl Netns {
    /// `target` is a network-namespace descriptor (e.g. received over ZDS);
    /// `home` is this process's own network namespace.
    pub fn new(target: OwnedFd, home: Arc<OwnedFd>) -> io::Result<Self> {
        let st = nix::sys::stat::fstat(target.as_fd()).map_err(io::Error::from)?;
        Ok(Netns {
            target: Arc::new(target),
            home,
            inode: st.st_ino,
        })
    }

    /// The namespace's inode, which identifies it (as `ip netns identify` does).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Open this thread's current network namespace, to return to later.
    pub fn current() -> io::Result<OwnedFd> {
        let f = std::fs::File::open("/proc/thread-self/ns/net")?;
        Ok(OwnedFd::from(f))
    }

    /// Run `f` with the calling thread inside the target namespace.
    ///
    /// `f` must be short and must not await: only the calling OS thread moves.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        setns(self.target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(e) = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stranded in a pod's namespace would silently
            // send other pods' traffic from the wrong place: stop instead.
            tracing::error!(error = %e, "cannot return to ztunnel's network namespace; aborting");
            std::process::abort();
        }
        out
    }

    /// A TCP socket created inside the namespace, marked so the pod's
    /// redirect rules skip it.
    pub fn tcp_socket(&self, addr: &SocketAddr) -> io::Result<Socket> {
        let domain = Domain::for_address(*addr);
        let sock = self.run(|| Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP)))?;
        sock.set_mark(ZTUNNEL_MARK)?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        Ok(sock)
    }

    /// A listener inside the namespace on `addr`; `transparent` lets it take
    /// TPROXY'd connections for any local or foreign address.
    pub fn listener(
        &self,
        addr: SocketAddr,
        transparent: bool,
    ) -> io::Result<tokio::net::TcpListener> {
        let sock = self.tcp_socket(&addr)?;
        sock.set_reuse_address(true)?;
        if transparent {
            sock.set_ip_transparent_v4(true)?;
        }
        sock.bind(&addr.into())?;
        sock.listen(1024)?;
        tokio::net::TcpListener::from_std(sock.into())
    }

    /// Connect from inside the namespace. With `source`, the socket is bound
    /// transparently to that (foreign) address so the application sees the
    /// real client; if the kernel refuses the bind, it falls back to the
    /// pod's own address.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        source: Option<std::net::IpAddr>,
    ) -> io::Result<tokio::net::TcpStream> {
        let mut sock = self.tcp_socket(&dst)?;
        if let Some(src) = source {
            // IP_BIND_ADDRESS_NO_PORT defers choosing the local port to
            // connect(), which can reuse ports across destinations; without
            // it every bind searches the whole port range for one free for
            // all destinations, which gets slow as TIME_WAIT piles up.
            let bound = sock
                .set_ip_transparent_v4(true)
                .and_then(|_| {
                    nix::sys::socket::setsockopt(
                        &sock,
                        nix::sys::socket::sockopt::IpBindAddressNoPort,
                        &true,
                    )
                    .map_err(io::Error::from)
                })
                .and_then(|_| sock.bind(&SocketAddr::new(src, 0).into()));
            if let Err(e) = bound {
                tracing::debug!(error = %e, %src, "transparent source bind refused; using the pod's own address");
                sock = self.tcp_socket(&dst)?;
            }
        }
        let std: std::net::TcpStream = sock.into();
        let tsock = tokio::net::TcpSocket::from_std_stream(std);
        tsock.connect(dst).await
    }
}

/// The destination a REDIRECTed connection was originally sent to.
pub fn original_dst(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    let fd: BorrowedFd<'_> = stream.as_fd();
    let sock = socket2::SockRef::from(&fd);
    let _ = fd.as_raw_fd();
    let addr = sock.original_dst_v4()?;
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}
