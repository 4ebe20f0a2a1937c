//! Connections from the guest to the host over AF_VSOCK.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// The host's context id.
const HOST_CID: u32 = 2;

/// Opens a stream to the host's vsock `port`; on the host it arrives at the Unix socket
/// `<vsock uds>_<port>` (hybrid vsock).
pub fn connect_host(port: u32) -> std::io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: `socket` just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(HOST_CID, port),
    )
    .map_err(|e| {
        std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("connecting to host vsock port {port}: {e}"),
        )
    })?;
    Ok(fd)
}
