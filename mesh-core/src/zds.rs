//! ZDS: how the node agent hands pods' network namespaces to ztunnel.
//!
//! Sits before any traffic flows: the node agent (the CNI side) owns a unix
//! `SOCK_SEQPACKET` listener; ztunnel connects, says [`ZdsHello`], and then
//! receives one `WorkloadRequest` per message — an `AddWorkload` carrying the
//! pod's network-namespace descriptor as `SCM_RIGHTS`, `DelWorkload`,
//! `KeepWorkload`, and `SnapshotSent` after the full set of current pods — and
//! answers each with a `WorkloadResponse { ack }` whose error is empty on
//! success. ztunnel then opens its listeners inside the namespace.
//!
//! Both ends live here so the protocol has one implementation.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::proto::zds::{
    workload_request, workload_response, Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent,
    Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};

/// Default path of the node agent's socket.
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/ztunnel.sock";

// ZDS messages are a few hundred bytes; this leaves ample room while still
// detecting a peer that sends something absurd (MSG_TRUNC).
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("zds socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("zds i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("zds peer closed the connection")]
    Closed,
    #[error("zds message truncated (larger than {MAX_MESSAGE} bytes)")]
    Truncated,
    #[error("zds message could not be decoded: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("zds protocol violation: {0}")]
    Protocol(String),
    #[error("ztunnel refused workload {uid}: {error}")]
    Nack { uid: String, error: String },
}

impl ZdsError {
    fn protocol(msg: impl Into<String>) -> Self {
        ZdsError::Protocol(msg.into())
    }
}

fn errno(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// One connected SEQPACKET socket; each send/recv is one whole message.
#[derive(Debug)]
pub struct ZdsConn {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsConn {
    fn new(fd: OwnedFd) -> Result<Self, ZdsError> {
        Ok(Self {
            fd: crate::sys::async_fd(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    /// Connect to the agent's socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        let wrap = |source| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        };
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| wrap(errno(e)))?;
        let addr = UnixAddr::new(path).map_err(|e| wrap(errno(e)))?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINPROGRESS) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(wrap(errno(e))),
        }
        let conn = Self::new(fd)?;
        // A unix connect either completes at once or fails; wait for
        // writability to be sure the socket is usable.
        let guard = conn.fd.writable().await?;
        drop(guard);
        Ok(conn)
    }

    /// Send one message, optionally with one descriptor attached.
    pub async fn send<M: Message>(
        &self,
        msg: &M,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ZdsError> {
        let buf = msg.encode_to_vec();
        let raw = fd.map(|f| [f.as_raw_fd()]);
        loop {
            let mut guard = self.fd.writable().await?;
            let res = guard.try_io(|inner| {
                let iov = [IoSlice::new(&buf)];
                let cmsgs: Vec<ControlMessage<'_>> = match &raw {
                    Some(fds) => vec![ControlMessage::ScmRights(fds)],
                    None => vec![],
                };
                socket::sendmsg::<()>(
                    inner.get_ref().as_raw_fd(),
                    &iov,
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(errno)
            });
            match res {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Err(ZdsError::Closed)
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receive one message and the descriptors that came with it.
    pub async fn recv<M: Message + Default>(&self) -> Result<(M, Vec<OwnedFd>), ZdsError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|inner| {
                let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = socket::recvmsg::<()>(
                    inner.get_ref().as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(errno)?;
                let mut fds = Vec::new();
                let cmsgs = msg.cmsgs().map_err(errno)?;
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        fds.extend(received.into_iter().map(crate::sys::own_received_fd));
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                Ok((msg.bytes, fds, truncated))
            });
            match res {
                Ok(Ok((0, _, _))) => return Err(ZdsError::Closed),
                Ok(Ok((_, _, true))) => return Err(ZdsError::Truncated),
                Ok(Ok((n, fds, false))) => {
                    let m = M::decode(&buf[..n])?;
                    return Ok((m, fds));
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The node agent's listening socket.
#[derive(Debug)]
pub struct ZdsListener {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsListener {
    /// Bind (replacing a stale socket file) and listen at `path`.
    pub fn bind(path: &Path) -> Result<Self, ZdsError> {
        let wrap = |source| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        };
        if path.exists() {
            std::fs::remove_file(path).map_err(wrap)?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(wrap)?;
        }
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| wrap(errno(e)))?;
        let addr = UnixAddr::new(path).map_err(|e| wrap(errno(e)))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| wrap(errno(e)))?;
        socket::listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| wrap(errno(e)))?;
        Ok(Self {
            fd: crate::sys::async_fd(fd, Interest::READABLE)?,
        })
    }

    pub async fn accept(&self) -> Result<ZdsConn, ZdsError> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|inner| {
                socket::accept4(
                    inner.get_ref().as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(errno)
            });
            match res {
                Ok(Ok(raw)) => return ZdsConn::new(crate::sys::own_received_fd(raw)),
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }
}

/// What ztunnel is asked to do.
#[derive(Debug)]
pub enum WorkloadEvent {
    /// Start proxying for this pod, whose network namespace is `netns`.
    Add {
        uid: String,
        info: Option<WorkloadInfo>,
        netns: OwnedFd,
    },
    /// The pod is still there (sent in a snapshot in place of an Add when the
    /// agent knows ztunnel already has it).
    Keep { uid: String },
    /// Stop proxying for this pod.
    Del { uid: String },
    /// Every current pod has been sent; drop those not mentioned since the
    /// connection started.
    SnapshotSent,
}

/// The ztunnel side of ZDS.
#[derive(Debug)]
pub struct ZdsClient {
    conn: ZdsConn,
}

impl ZdsClient {
    /// Connect and say hello.
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        let conn = ZdsConn::connect(path).await?;
        conn.send(
            &ZdsHello {
                version: Version::V1 as i32,
            },
            None,
        )
        .await?;
        Ok(Self { conn })
    }

    /// The next request from the agent. A malformed request is answered with a
    /// NACK here and skipped, so the caller only sees valid events; it must
    /// answer each one it gets with [`ZdsClient::ack`].
    pub async fn next(&self) -> Result<WorkloadEvent, ZdsError> {
        loop {
            let (req, mut fds): (WorkloadRequest, _) = self.conn.recv().await?;
            match Self::event(req, &mut fds) {
                Ok(ev) => return Ok(ev),
                Err(msg) => {
                    tracing::warn!(error = %msg, "rejecting malformed zds request");
                    self.ack(Err(msg)).await?;
                }
            }
        }
    }

    fn event(req: WorkloadRequest, fds: &mut Vec<OwnedFd>) -> Result<WorkloadEvent, String> {
        let payload = req
            .payload
            .ok_or_else(|| "request has no payload".to_string())?;
        let want_fd = matches!(payload, workload_request::Payload::Add(_));
        if want_fd && fds.len() != 1 {
            return Err(format!(
                "AddWorkload must carry exactly one descriptor, got {}",
                fds.len()
            ));
        }
        if !want_fd && !fds.is_empty() {
            return Err("only AddWorkload may carry a descriptor".into());
        }
        Ok(match payload {
            workload_request::Payload::Add(AddWorkload { uid, workload_info }) => {
                if uid.is_empty() {
                    return Err("AddWorkload without uid".into());
                }
                WorkloadEvent::Add {
                    uid,
                    info: workload_info,
                    netns: fds.remove(0),
                }
            }
            workload_request::Payload::Keep(KeepWorkload { uid }) => WorkloadEvent::Keep { uid },
            workload_request::Payload::Del(DelWorkload { uid }) => WorkloadEvent::Del { uid },
            workload_request::Payload::SnapshotSent(SnapshotSent {}) => WorkloadEvent::SnapshotSent,
        })
    }

    /// Answer the last request: `Ok` acks, `Err` carries the reason back.
    pub async fn ack(&self, result: Result<(), String>) -> Result<(), ZdsError> {
        let resp = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: result.err().unwrap_or_default(),
            })),
        };
        self.conn.send(&resp, None).await
    }
}

/// The node agent's side of one ztunnel connection.
#[derive(Debug)]
pub struct ZdsAgentConn {
    conn: ZdsConn,
}

impl ZdsAgentConn {
    /// Accept a ztunnel and read its hello.
    pub async fn accept(listener: &ZdsListener) -> Result<Self, ZdsError> {
        let conn = listener.accept().await?;
        let (hello, fds): (ZdsHello, _) = conn.recv().await?;
        if !fds.is_empty() {
            return Err(ZdsError::protocol("hello carried a descriptor"));
        }
        if hello.version != Version::V1 as i32 {
            return Err(ZdsError::protocol(format!(
                "unsupported zds version {}",
                hello.version
            )));
        }
        Ok(Self { conn })
    }

    /// Hand a pod to ztunnel; returns once ztunnel acknowledged it.
    pub async fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: BorrowedFd<'_>,
    ) -> Result<(), ZdsError> {
        let req = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: uid.to_string(),
                workload_info: Some(info),
            })),
        };
        self.conn.send(&req, Some(netns.as_fd())).await?;
        self.wait_ack(uid).await
    }

    pub async fn keep(&self, uid: &str) -> Result<(), ZdsError> {
        self.request(
            uid,
            workload_request::Payload::Keep(KeepWorkload {
                uid: uid.to_string(),
            }),
        )
        .await
    }

    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        self.request(
            uid,
            workload_request::Payload::Del(DelWorkload {
                uid: uid.to_string(),
            }),
        )
        .await
    }

    pub async fn snapshot_sent(&self) -> Result<(), ZdsError> {
        self.request("", workload_request::Payload::SnapshotSent(SnapshotSent {}))
            .await
    }

    async fn request(&self, uid: &str, payload: workload_request::Payload) -> Result<(), ZdsError> {
        let req = WorkloadRequest {
            payload: Some(payload),
        };
        self.conn.send(&req, None).await?;
        self.wait_ack(uid).await
    }

    async fn wait_ack(&self, uid: &str) -> Result<(), ZdsError> {
        let (resp, fds): (WorkloadResponse, _) = self.conn.recv().await?;
        if !fds.is_empty() {
            return Err(ZdsError::protocol("response carried a descriptor"));
        }
        match resp.payload {
            Some(workload_response::Payload::Ack(Ack { error })) if error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(Ack { error })) => Err(ZdsError::Nack {
                uid: uid.to_string(),
                error,
            }),
            None => Err(ZdsError::protocol("response without ack")),
        }
    }

    /// Raw access for tests that must send malformed requests.
    pub fn raw(&self) -> &ZdsConn {
        &self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
        }
    }

    #[tokio::test]
    async fn add_del_snapshot_round_trip_with_fd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zds.sock");
        let listener = ZdsListener::bind(&path).unwrap();
        let agent = tokio::spawn(async move {
            let conn = ZdsAgentConn::accept(&listener).await.unwrap();
            let file = std::fs::File::open("/proc/self/ns/net").unwrap();
            conn.add("uid-1", info("a"), file.as_fd()).await.unwrap();
            conn.snapshot_sent().await.unwrap();
            let nack = conn.add("uid-2", info("b"), file.as_fd()).await;
            assert!(matches!(nack, Err(ZdsError::Nack { ref error, .. }) if error == "no"));
            conn.del("uid-1").await.unwrap();
            // An Add without a descriptor is refused by the client itself.
            let req = WorkloadRequest {
                payload: Some(workload_request::Payload::Add(AddWorkload {
                    uid: "uid-3".into(),
                    workload_info: None,
                })),
            };
            conn.raw().send(&req, None).await.unwrap();
            assert!(matches!(
                conn.wait_ack("uid-3").await,
                Err(ZdsError::Nack { .. })
            ));
            conn.keep("uid-1").await.unwrap();
        });
        let client = ZdsClient::connect(&path).await.unwrap();
        match client.next().await.unwrap() {
            WorkloadEvent::Add { uid, info, netns } => {
                assert_eq!(uid, "uid-1");
                assert_eq!(info.unwrap().name, "a");
                // The received descriptor is a network namespace of ours.
                let got =
                    std::fs::read_link(format!("/proc/self/fd/{}", netns.as_raw_fd())).unwrap();
                assert!(got.to_string_lossy().starts_with("net:["), "{got:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
        client.ack(Ok(())).await.unwrap();
        assert!(matches!(
            client.next().await.unwrap(),
            WorkloadEvent::SnapshotSent
        ));
        client.ack(Ok(())).await.unwrap();
        assert!(matches!(
            client.next().await.unwrap(),
            WorkloadEvent::Add { .. }
        ));
        client.ack(Err("no".into())).await.unwrap();
        assert!(
            matches!(client.next().await.unwrap(), WorkloadEvent::Del { uid } if uid == "uid-1")
        );
        client.ack(Ok(())).await.unwrap();
        // uid-3 was rejected inside next(); the following event is the Keep.
        assert!(matches!(
            client.next().await.unwrap(),
            WorkloadEvent::Keep { .. }
        ));
        client.ack(Ok(())).await.unwrap();
        agent.await.unwrap();
        assert!(matches!(client.next().await, Err(ZdsError::Closed)));
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zds.sock");
        let listener = ZdsListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let conn = listener.accept().await.unwrap();
            let (_hello, _): (ZdsHello, _) = conn.recv().await.unwrap();
            // Field 1 (add) declared length-delimited with a bogus length.
            let bytes = [0x0a, 0xff, 0xff, 0xff, 0x0f];
            let sent = socket::send(
                conn.fd.get_ref().as_raw_fd(),
                &bytes,
                MsgFlags::MSG_NOSIGNAL,
            );
            assert!(sent.is_ok());
            conn
        });
        let client = ZdsClient::connect(&path).await.unwrap();
        let _conn = server.await.unwrap();
        assert!(matches!(client.next().await, Err(ZdsError::Decode(_))));
    }
}
