//! virtio-net on a tap device, without offloads: the guest's 12-byte virtio-net header is
//! stripped on transmit and a zero header is put in front of each received frame, so
//! no guest-written offload metadata ever reaches the host kernel.
//!
//! The tap is opened while the VM is built, optionally inside a network namespace (the
//! engine's pod namespace: the tap lives there, the VMM stays where it is).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    expect_queues, read_config_bytes, ActivateError, Interrupt, VirtioDevice, DEVICE_ID_NET,
};
use crate::devices::thread::{DeviceThread, Running};
use crate::memory::GuestMemory;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame accepted from the guest or the tap (no GSO: an MTU-sized frame, with
/// room for jumbo frames).
pub const MAX_FRAME: usize = 9216 + 18;
const QUEUE_SIZE: u16 = 256;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap name {0:?} must be 1 to 15 bytes")]
    Name(String),
    #[error("cannot enter the network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open tap {name} (/dev/net/tun, needs CAP_NET_ADMIN): {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
}

/// Opens (creating if needed) tap `name` in the current network namespace.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    let tap_err = |source| NetError::Tap {
        name: name.into(),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetError::Name(name.into()));
    }
    // SAFETY: open(2) with a NUL-terminated literal path; the fd is checked below.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(tap_err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    // struct ifreq: the name, then (in the union) the flags as a short.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes) we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc < 0 {
        return Err(tap_err(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Opens tap `name` inside the network namespace at `netns` (from a short-lived thread
/// that enters it, so the VMM's own threads stay in theirs).
pub fn open_tap_in(name: &str, netns: Option<&Path>) -> Result<File, NetError> {
    let Some(netns) = netns else {
        return open_tap(name);
    };
    let ns = File::open(netns).map_err(|source| NetError::Netns {
        path: netns.display().to_string(),
        source,
    })?;
    let name = name.to_string();
    let path = netns.display().to_string();
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_raw_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            NetError::Netns {
                path,
                source: e.into(),
            }
        })?;
        open_tap(&name)
    })
    .join()
    .unwrap_or_else(|_| {
        Err(NetError::Netns {
            path: netns.display().to_string(),
            source: std::io::Error::other("the thread opening the tap panicked"),
        })
    })
}

pub struct Net {
    tap: Arc<File>,
    name: String,
    config: [u8; 6],
    /// The running frame loop (declared before the thread: dropped first).
    worker: Option<Running>,
    thread: DeviceThread,
}

impl Net {
    pub fn new(tap: &str, netns: Option<&PathBuf>, mac: [u8; 6]) -> Result<Self, NetError> {
        let file = open_tap_in(tap, netns.map(PathBuf::as_path))?;
        Ok(Self {
            tap: Arc::new(file),
            name: tap.into(),
            config: mac,
            worker: None,
            thread: DeviceThread::spawn("virtio-net").map_err(|source| NetError::Tap {
                name: tap.into(),
                source,
            })?,
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn activate(
        &mut self,
        _features: u64,
        mem: GuestMemory,
        queues: Vec<(Queue, EventFd)>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let [(rx, rx_kick), (tx, tx_kick)] = expect_queues(queues)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (stop.as_raw_fd(), TOKEN_STOP),
            (rx_kick.as_raw_fd(), TOKEN_RX),
            (tx_kick.as_raw_fd(), TOKEN_TX),
            (self.tap.as_raw_fd(), TOKEN_TAP),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let worker = NetWorker {
            tap: self.tap.clone(),
            name: self.name.clone(),
            mem,
            rx,
            tx,
            interrupt,
            epoll,
            kicks: [rx_kick, tx_kick],
            pending: None,
            tap_armed: true,
            tap_dead: false,
            buf: vec![0u8; NET_HDR_LEN + MAX_FRAME],
            used: false,
        };
        self.worker = Some(self.thread.start(stop, move || worker.run())?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_TAP: u64 = 3;

struct NetWorker {
    tap: Arc<File>,
    name: String,
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    epoll: Epoll,
    kicks: [EventFd; 2],
    /// A frame read from the tap that found no rx buffer yet (length in `buf`).
    pending: Option<usize>,
    /// Whether the tap is watched for frames (not while one is pending).
    tap_armed: bool,
    /// The tap failed for good.
    tap_dead: bool,
    buf: Vec<u8>,
    used: bool,
}

impl NetWorker {
    fn run(mut self) {
        let mut events = [EpollEvent::default(); 4];
        self.transmit();
        self.receive();
        loop {
            if std::mem::take(&mut self.used) {
                self.interrupt.signal_used();
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: epoll: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return,
                    TOKEN_RX => {
                        let _ = self.kicks[0].read();
                        self.receive();
                    }
                    TOKEN_TX => {
                        let _ = self.kicks[1].read();
                        self.transmit();
                    }
                    _ => self.receive(),
                }
            }
        }
    }

    /// Guest frames to the tap: the header is checked for length and dropped.
    fn transmit(&mut self) {
        let mem = self.mem.clone();
        while let Some(chain) = self.tx.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match chain.reader(&mem) {
                Ok(mut reader) => {
                    let total = reader.available_bytes();
                    if total < NET_HDR_LEN || total - NET_HDR_LEN > MAX_FRAME {
                        tracing::debug!("virtio-net: dropped a {total}-byte tx buffer");
                    } else {
                        let frame = &mut self.buf[..total];
                        if reader.read_exact(frame).is_ok() {
                            // A full tap queue drops the frame, as a wire would.
                            let _ = (&*self.tap).write(&frame[NET_HDR_LEN..]);
                        }
                    }
                }
                Err(e) => tracing::warn!("virtio-net: bad tx chain: {e:?}"),
            }
            if let Err(e) = self.tx.add_used(&mem, head, 0) {
                tracing::warn!("virtio-net: returning a tx buffer: {e:?}");
            }
            self.used = true;
        }
    }

    /// Tap frames to the guest's rx buffers, one frame per buffer.
    fn receive(&mut self) {
        if self.tap_dead {
            return;
        }
        let mem = self.mem.clone();
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match (&*self.tap).read(&mut self.buf[NET_HDR_LEN..]) {
                    Ok(n) => NET_HDR_LEN + n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // The tap is gone (deleted, or its namespace torn down): it would
                        // report an error forever. Stop watching it; the link is down.
                        tracing::warn!("virtio-net: tap {} failed ({e}); link down", self.name);
                        self.tap_dead = true;
                        self.arm_tap(false);
                        return;
                    }
                },
            };
            let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                // No buffer: keep the frame, stop watching the tap until the guest kicks.
                self.pending = Some(len);
                self.arm_tap(false);
                return;
            };
            let head = chain.head_index();
            // num_buffers (the header's last field) is 1; the rest stays zero.
            self.buf[..NET_HDR_LEN].fill(0);
            self.buf[10] = 1;
            let written = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= len => w
                    .write_all(&self.buf[..len])
                    .map(|_| len as u32)
                    .unwrap_or(0),
                Ok(_) => {
                    tracing::debug!("virtio-net: an rx buffer too small for a {len}-byte frame");
                    0
                }
                Err(e) => {
                    tracing::warn!("virtio-net: bad rx chain: {e:?}");
                    0
                }
            };
            if let Err(e) = self.rx.add_used(&mem, head, written) {
                tracing::warn!("virtio-net: returning an rx buffer: {e:?}");
            }
            self.used = true;
        }
        self.arm_tap(true);
    }

    fn arm_tap(&mut self, on: bool) {
        if self.tap_armed == on || (on && self.tap_dead) {
            return;
        }
        self.tap_armed = on;
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        let event = EpollEvent::new(EventSet::IN, TOKEN_TAP);
        if let Err(e) = self.epoll.ctl(op, self.tap.as_raw_fd(), event) {
            tracing::warn!("virtio-net: watching tap {}: {e}", self.name);
        }
    }
}

/// Parses `02:00:00:00:00:01`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests;
