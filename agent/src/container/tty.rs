//! A container's terminal: the pty master (opened by the container init inside the
//! container's devpts) relayed to one host vsock stream, both ways.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};

pub struct Relay {
    master: Arc<File>,
    output: Mutex<Option<JoinHandle<()>>>,
}

fn copy(mut from: &File, mut to: &File) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            // EIO on the master: every holder of the slave has closed it.
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

impl Relay {
    pub fn start(master: OwnedFd, stream: OwnedFd) -> Result<Relay> {
        let master = Arc::new(File::from(master));
        let stream = Arc::new(File::from(stream));
        let (m, s) = (master.clone(), stream.clone());
        std::thread::Builder::new()
            .name("tty-in".into())
            .spawn(move || copy(&s, &m))
            .context("starting the terminal input relay")?;
        let (m, s) = (master.clone(), stream);
        let output = std::thread::Builder::new()
            .name("tty-out".into())
            .spawn(move || {
                copy(&m, &s);
                let _ = nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            })
            .context("starting the terminal output relay")?;
        Ok(Relay {
            master,
            output: Mutex::new(Some(output)),
        })
    }

    /// Waits until everything the container wrote to its terminal has been sent.
    pub fn drain(&self) {
        if let Some(handle) = self.output.lock().ok().and_then(|mut o| o.take()) {
            let _ = handle.join();
        }
    }

    pub fn send_eof(&self) -> Result<()> {
        (&*self.master)
            .write_all(&[4])
            .context("sending EOF to the terminal")
    }

    pub fn resize(&self, rows: u32, cols: u32) -> Result<()> {
        let size = libc::winsize {
            ws_row: u16::try_from(rows).map_err(|_| anyhow!("{rows} rows is too many"))?,
            ws_col: u16::try_from(cols).map_err(|_| anyhow!("{cols} columns is too many"))?,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize that lives across the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("resizing the terminal");
        }
        Ok(())
    }
}
