//! A process's stdio between containerd's FIFOs (or `file://` logs) and the guest's vsock
//! streams. Each stream has its own thread: a slow or gone reader stalls only its own
//! process's output, never another container's.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::cli::monitor::Streams;

/// The stdio containerd asked for (paths as it gives them; empty means none).
#[derive(Clone, Debug, Default)]
pub struct Paths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl Paths {
    /// Refuses what Hull cannot relay (containerd's `binary://` loggers).
    pub fn check(&self) -> Result<()> {
        for p in [&self.stdin, &self.stdout, &self.stderr] {
            if p.starts_with("binary://") {
                bail!("stdio {p}: binary:// loggers are not supported by hull yet; use FIFOs or file://");
            }
        }
        Ok(())
    }
}

/// Where a path from containerd is: a FIFO path, or `file://` (append to a log file).
fn local(p: &str) -> Option<(PathBuf, bool)> {
    if p.is_empty() {
        return None;
    }
    match p.strip_prefix("file://") {
        Some(f) => Some((PathBuf::from(f), true)),
        None => Some((PathBuf::from(p.strip_prefix("fifo://").unwrap_or(p)), false)),
    }
}

fn open_out(p: &str) -> Option<File> {
    let (path, file) = local(p)?;
    let r = if file {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        OpenOptions::new().create(true).append(true).open(&path)
    } else {
        // Read-write: never blocks, and the FIFO keeps a reader (ours, unused) when
        // containerd's goes (a restart), so output waits for it instead of being lost.
        OpenOptions::new().read(true).write(true).open(&path)
    };
    r.map_err(|e| tracing::warn!("opening {}: {e}", path.display()))
        .ok()
}

fn copy(mut from: impl Read, mut to: Option<File>) {
    let mut buf = [0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // A reader that went away: keep draining, so the guest never stalls.
                if let Some(f) = &mut to {
                    if f.write_all(&buf[..n]).is_err() {
                        to = None;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
}

/// The running relays of one process.
pub struct Relay {
    done: Receiver<()>,
    outputs: usize,
    stdin: Option<UnixStream>,
}

impl Relay {
    pub fn start(paths: &Paths, streams: Streams) -> Result<Relay> {
        let (tx, done) = channel();
        let mut outputs = 0;
        let mut output = |stream: UnixStream, path: String, name: &str, tx: Sender<()>| {
            outputs += 1;
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    copy(&stream, open_out(&path));
                    let _ = tx.send(());
                })
                .map(drop)
        };
        let mut stdin = None;
        let input = |stream: UnixStream, path: String| -> std::io::Result<()> {
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || {
                    let Some((p, _)) = local(&path) else { return };
                    // Blocks until containerd opens the writing end.
                    match File::open(&p) {
                        Ok(f) => {
                            let _ = std::io::copy(&mut &f, &mut &stream);
                        }
                        Err(e) => tracing::warn!("opening {}: {e}", p.display()),
                    }
                    // EOF for the guest process.
                    let _ = stream.shutdown(Shutdown::Write);
                })
                .map(drop)
        };
        if let Some(tty) = streams.tty {
            if !paths.stdin.is_empty() {
                let w = tty.try_clone()?;
                stdin = Some(w.try_clone()?);
                input(w, paths.stdin.clone())?;
            }
            output(tty, paths.stdout.clone(), "tty-out", tx.clone())?;
        } else {
            if let Some(s) = streams.stdin {
                stdin = Some(s.try_clone()?);
                input(s, paths.stdin.clone())?;
            }
            if let Some(s) = streams.stdout {
                output(s, paths.stdout.clone(), "stdout", tx.clone())?;
            }
            if let Some(s) = streams.stderr {
                output(s, paths.stderr.clone(), "stderr", tx.clone())?;
            }
        }
        Ok(Relay {
            done,
            outputs,
            stdin,
        })
    }

    /// containerd's CloseIO: the process's stdin ends (for a pipe; a terminal's input is
    /// closed by the agent).
    pub fn close_stdin(&mut self, terminal: bool) {
        if let Some(s) = self.stdin.take() {
            if !terminal {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }

    /// Waits (at most `timeout`) until the guest has closed every output stream.
    pub fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for _ in 0..self.outputs {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                tracing::warn!("the guest kept an output stream open; not waiting longer");
                return;
            }
        }
    }
}
