//! Relaying a container's stdio between this process and the sandbox's vsock streams.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;
use std::time::Duration;

/// Accepts the agent's connection on `listener` (it connected during create).
pub fn accept(listener: &UnixListener) -> std::io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    for _ in 0..2000 {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the agent did not connect a stdio stream",
    ))
}

/// Copies `from` into `to` until EOF on `from`, flushing as it goes.
pub fn pump(
    mut from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
    name: &str,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let mut buf = [0u8; 32 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).and_then(|_| to.flush()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        })
        .expect("spawning a stdio relay thread")
}

/// Puts the terminal on fd 0 in raw mode until dropped.
pub struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    pub fn enter() -> RawMode {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let Ok(saved) = tcgetattr(0) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(0, SetArg::TCSANOW, &raw);
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(0, nix::sys::termios::SetArg::TCSANOW, saved);
        }
    }
}
