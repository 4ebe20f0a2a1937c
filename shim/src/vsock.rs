//! The host side of hybrid vsock (Firecracker's convention, also spoken by
//! vhost-device-vsock): guest port P is reached by connecting to the backend's Unix socket
//! and writing `CONNECT P\n` (answer: `OK <host port>\n`); a guest connection to host port P
//! arrives on the Unix socket `<uds>_P`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct HybridVsock {
    uds: PathBuf,
}

impl HybridVsock {
    pub fn new(uds: &Path) -> HybridVsock {
        HybridVsock {
            uds: uds.to_path_buf(),
        }
    }

    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// The Unix socket path where guest connections to host `port` arrive.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.uds.as_os_str().to_owned();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    /// Listens for guest connections to host `port`.
    pub fn listen(&self, port: u32) -> std::io::Result<UnixListener> {
        let path = self.port_path(port);
        let _ = std::fs::remove_file(&path);
        UnixListener::bind(&path)
    }

    /// Connects to guest `port`.
    pub fn connect(&self, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
        let mut s = UnixStream::connect(&self.uds)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())?;
        // Read the answer a byte at a time: nothing after its newline belongs to us.
        let mut line = Vec::with_capacity(16);
        let mut byte = [0u8; 1];
        while line.len() < 32 {
            if s.read(&mut byte)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("guest vsock port {port} refused the connection"),
                ));
            }
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        if !line.starts_with(b"OK ") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "unexpected answer to CONNECT {port}: {:?}",
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        s.set_read_timeout(None)?;
        Ok(s)
    }
}
