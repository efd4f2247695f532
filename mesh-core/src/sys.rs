//! The syscalls of mesh-core that need `unsafe`: taking ownership of file
//! descriptors the kernel hands us (an accepted socket, a descriptor received
//! with `SCM_RIGHTS`). Everything else in the crate is safe code.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Take ownership of a descriptor just returned by the kernel to this process.
///
/// Only call with a descriptor that a successful `accept4(2)` or an
/// `SCM_RIGHTS` control message has just installed in this process's table,
/// and that nothing else owns.
pub(crate) fn own_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller passes a descriptor freshly installed by the kernel
    // (accept4 result or SCM_RIGHTS payload); no other object refers to it, so
    // wrapping it gives it exactly one owner, which closes it on drop.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Register an owned socket with the tokio reactor.
pub(crate) fn async_fd(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the descriptor is moved into the AsyncFd, which owns it until it
    // is dropped; nothing else can close it, and `OwnedFd::as_raw_fd` always
    // returns the same descriptor, so it stays valid for the registration's
    // whole life.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| e.into_parts().1)
}
