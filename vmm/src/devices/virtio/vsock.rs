//! virtio-vsock with Firecracker's hybrid host side: every vsock port on the host is a
//! Unix socket, so the host needs no vhost-vsock module.
//!
//! - Host to guest: connect to `uds`, write `CONNECT <port>\n`; once the guest accepts,
//!   the VMM answers `OK <host port>\n` and the stream carries the connection's bytes.
//! - Guest to host: a guest connection to CID 2 port P is connected to `<uds>_P`.
//!
//! One device thread (started with the VM) runs an epoll loop over the queues' notify events, the
//! listener and every connection's stream. Everything from the guest is checked: a
//! malformed descriptor chain is returned unused, a packet with a bad header or for an
//! unknown connection is answered with RST, and a guest that overruns the credit it was
//! given loses that connection.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    expect_queues, read_config_bytes, ActivateError, Interrupt, VirtioDevice, DEVICE_ID_VSOCK,
};
use crate::devices::thread::{DeviceThread, Running};
use crate::memory::GuestMemory;

pub const HOST_CID: u64 = 2;
pub const HEADER_LEN: usize = 44;
/// Largest payload accepted in one packet (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// The receive buffer each connection advertises to the guest (bytes in flight towards a
/// host stream that has not taken them yet).
pub const BUF_ALLOC: u32 = 256 * 1024;
const MAX_CONNECTIONS: usize = 1024;
const MAX_PENDING_HOST: usize = 64;
const MAX_CONNECT_LINE: usize = 32;
/// How often a listener paused by a failed accept is tried again.
const LISTENER_RETRY: std::time::Duration = std::time::Duration::from_millis(200);
/// How long a host connection waits for the guest to accept it before it is refused
/// (short in unit tests, which wait for it).
const CONNECT_TIMEOUT: std::time::Duration = if cfg!(test) {
    std::time::Duration::from_millis(300)
} else {
    std::time::Duration::from_secs(10)
};
/// Most control packets waiting for rx buffers; past it the tx queue is left alone until
/// the guest gives rx buffers back (so a guest cannot grow the backlog without bound).
const MAX_CONTROL: usize = 2 * QUEUE_SIZE as usize;
const QUEUE_SIZE: u16 = 256;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// The virtio-vsock device model.
pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    config: [u8; 8],
    listener: Option<UnixListener>,
    /// The running connection loop (declared before the thread: dropped first).
    worker: Option<Running>,
    thread: DeviceThread,
}

impl Vsock {
    /// Binds the host socket `uds` now, so host connections queue up before the guest's
    /// driver is ready. A stale socket at that path is replaced; anything else there is
    /// an error.
    pub fn new(cid: u64, uds: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(uds) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", uds.display()),
                ));
            }
            std::fs::remove_file(uds)?;
        }
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            cid,
            uds: uds.to_owned(),
            config: cid.to_le_bytes(),
            listener: Some(listener),
            worker: None,
            thread: DeviceThread::spawn("vsock")?,
        })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        let _ = std::fs::remove_file(&self.uds);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
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
        let [(rx, rx_evt), (tx, tx_evt), (_, ev_evt)] = expect_queues(queues)?;
        if self.worker.is_some() {
            return Err(std::io::Error::other("the vsock device is already running").into());
        }
        // The worker gets its own handle: ours stays for the next activation whatever
        // happens to this one.
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the vsock listener is gone"))?
            .try_clone()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let worker = Worker::new(
            mem,
            rx,
            tx,
            interrupt,
            [rx_evt, tx_evt, ev_evt, stop.try_clone()?],
            self.cid,
            self.uds.clone(),
            listener,
        )?;
        self.worker = Some(self.thread.start(stop, move || worker.run())?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    host_port: u32,
    guest_port: u32,
}

struct Conn {
    stream: UnixStream,
    /// The guest accepted (or opened) it; until then a host-initiated one waits.
    established: bool,
    /// When a host-initiated connection asked the guest (until it answers).
    asked_at: Option<std::time::Instant>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest handed to the host stream.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest bytes the host stream has not taken yet (bounded by BUF_ALLOC).
    to_host: Vec<u8>,
    /// Bytes at the head of `to_host` that are ours (the `OK` line), not guest data.
    not_forwarded: usize,
    /// The guest shut both directions: deliver `to_host`, then reset.
    closing: bool,
    /// Host bytes read before the guest accepted (after the CONNECT line).
    to_guest: Vec<u8>,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    host_eof: bool,
    /// The epoll interest now registered for the stream (empty: not registered).
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, established: bool, peer: Option<&Header>) -> Self {
        Self {
            stream,
            established,
            asked_at: (!established).then(std::time::Instant::now),
            peer_buf_alloc: peer.map_or(0, |h| h.buf_alloc),
            peer_fwd_cnt: peer.map_or(0, |h| h.fwd_cnt),
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_host: Vec::new(),
            not_forwarded: 0,
            closing: false,
            to_guest: Vec::new(),
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_eof: false,
            interest: EventSet::empty(),
        }
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

enum Slot {
    /// A host connection that has not sent its `CONNECT <port>\n` line yet.
    Pending(UnixStream, Vec<u8>),
    Conn(ConnKey),
}

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_EVENT: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const TOKEN_FD_BASE: u64 = 16;

struct Worker {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    events: [EventFd; 4],
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Conn>,
    slots: HashMap<RawFd, Slot>,
    /// Packets without payload for the guest: (connection, op, flags).
    control: VecDeque<(ConnKey, u16, u32)>,
    /// Connections whose stream may have bytes for the guest.
    ready: VecDeque<ConnKey>,
    next_host_port: u32,
    used: bool,
    scratch: Vec<u8>,
    /// The tx queue was left with packets in it because `control` was full.
    tx_stalled: bool,
    /// The listener is out of epoll (accept failed, e.g. out of fds) until a
    /// connection closes.
    listener_paused: bool,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    fn new(
        mem: GuestMemory,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<Interrupt>,
        events: [EventFd; 4],
        cid: u64,
        uds: PathBuf,
        listener: UnixListener,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (token, fd) in [
            (TOKEN_RX, events[0].as_raw_fd()),
            (TOKEN_TX, events[1].as_raw_fd()),
            (TOKEN_EVENT, events[2].as_raw_fd()),
            (TOKEN_STOP, events[3].as_raw_fd()),
            (TOKEN_LISTENER, listener.as_raw_fd()),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Self {
            mem,
            rx,
            tx,
            interrupt,
            events,
            cid,
            uds,
            listener,
            epoll,
            conns: HashMap::new(),
            slots: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            next_host_port: 1 << 30,
            used: false,
            scratch: vec![0; MAX_PAYLOAD as usize],
            tx_stalled: false,
            listener_paused: false,
        })
    }

    /// The event loop, until told to stop (the device may start again after a driver
    /// reset, with a fresh worker).
    fn run(mut self) {
        // Buffers or packets the driver queued before DRIVER_OK.
        self.process_tx();
        self.flush_rx();
        self.notify();
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let timeout = self.expire_requests();
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll failed: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let set = EventSet::from_bits_truncate(event.events());
                match event.data() {
                    TOKEN_STOP => return,
                    TOKEN_RX => {
                        let _ = self.events[0].read();
                    }
                    TOKEN_TX => {
                        let _ = self.events[1].read();
                        self.process_tx();
                    }
                    TOKEN_EVENT => {
                        let _ = self.events[2].read();
                    }
                    TOKEN_LISTENER => self.accept(),
                    token => self.stream_event((token - TOKEN_FD_BASE) as RawFd, set),
                }
            }
            self.flush_rx();
            if self.tx_stalled {
                self.process_tx();
                self.flush_rx();
            }
            self.notify();
        }
    }

    /// Refuses host connections the guest has not answered in time; returns how long
    /// epoll may wait before the next one expires (-1: none pending).
    fn expire_requests(&mut self) -> i32 {
        let now = std::time::Instant::now();
        let mut expired = Vec::new();
        let mut next: Option<std::time::Duration> = None;
        for (key, conn) in &self.conns {
            if let Some(at) = conn.asked_at.filter(|_| !conn.established) {
                match (at + CONNECT_TIMEOUT).checked_duration_since(now) {
                    Some(left) if !left.is_zero() => {
                        next = Some(next.map_or(left, |n| n.min(left)));
                    }
                    _ => expired.push(*key),
                }
            }
        }
        for key in expired {
            tracing::debug!(
                "vsock: guest did not answer a connection to port {}",
                key.guest_port
            );
            self.reset_conn(key);
        }
        if !self.control.is_empty() {
            self.flush_rx();
            self.notify();
        }
        if self.listener_paused {
            // Try accepting again every so often (the fds or memory may be back).
            self.resume_listener();
            next = Some(next.map_or(LISTENER_RETRY, |n| n.min(LISTENER_RETRY)));
        }
        next.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32 + 1)
    }

    fn notify(&mut self) {
        if std::mem::take(&mut self.used) {
            self.interrupt.signal_used();
        }
    }

    fn watch(&self, fd: RawFd, op: ControlOperation, set: EventSet) {
        let event = EpollEvent::new(set, TOKEN_FD_BASE + fd as u64);
        if let Err(e) = self.epoll.ctl(op, fd, event) {
            tracing::warn!("vsock: epoll_ctl on fd {fd}: {e}");
        }
    }

    /// Registers exactly `want` for a connection's stream.
    fn set_interest(&mut self, key: ConnKey, want: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.interest == want {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let op = match (conn.interest.is_empty(), want.is_empty()) {
            (true, _) => ControlOperation::Add,
            (false, true) => ControlOperation::Delete,
            (false, false) => ControlOperation::Modify,
        };
        conn.interest = want;
        self.watch(fd, op, want);
    }

    /// What a connection's stream should be watched for now: readable when its bytes
    /// could go to the guest (and it is not already queued to be read), writable when
    /// guest bytes are waiting; a connection waiting for the guest's answer is watched
    /// for hang-up only.
    fn rearm(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.established
            && !conn.to_guest.is_empty()
            && conn.peer_credit() > 0
            && !self.ready.contains(&key)
        {
            // Early host bytes are ours already: no readiness event will announce them.
            self.ready.push_back(key);
        }
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let mut want = EventSet::empty();
        let can_read = conn.established
            && !conn.host_eof
            && !conn.guest_shut_rcv
            && conn.peer_credit() > 0
            && !self.ready.contains(&key);
        if !conn.established {
            // Bytes (or a half-close) the host sends early wait in the socket; only a
            // full hang-up matters now.
            want |= EventSet::HANG_UP;
        } else if can_read && !conn.closing {
            want |= EventSet::IN;
        }
        if !conn.to_host.is_empty() {
            want |= EventSet::OUT;
        }
        self.set_interest(key, want);
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let pending = self
                        .slots
                        .values()
                        .filter(|s| matches!(s, Slot::Pending(..)))
                        .count();
                    if pending >= MAX_PENDING_HOST || stream.set_nonblocking(true).is_err() {
                        tracing::warn!("vsock: too many host connections waiting to CONNECT");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.watch(fd, ControlOperation::Add, EventSet::IN);
                    self.slots.insert(fd, Slot::Pending(stream, Vec::new()));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds, most likely: stop watching until a connection closes,
                    // rather than spin on a listener that stays readable.
                    tracing::warn!("vsock: accept on {}: {e}; paused", self.uds.display());
                    self.watch(
                        self.listener.as_raw_fd(),
                        ControlOperation::Delete,
                        EventSet::empty(),
                    );
                    self.listener_paused = true;
                    return;
                }
            }
        }
    }

    fn stream_event(&mut self, fd: RawFd, set: EventSet) {
        match self.slots.get(&fd) {
            Some(Slot::Pending(..)) => self.read_connect_line(fd),
            Some(Slot::Conn(key)) => {
                let key = *key;
                let Some(conn) = self.conns.get(&key) else {
                    return;
                };
                if !conn.established {
                    // The host gave up before the guest answered.
                    if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                        self.reset_conn(key);
                    }
                    return;
                }
                let broken = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
                if set.contains(EventSet::OUT) || (broken && !conn.to_host.is_empty()) {
                    // On a hang-up the write fails and resets the connection.
                    self.write_to_host(key);
                }
                let Some(conn) = self.conns.get(&key) else {
                    return;
                };
                if broken && conn.host_eof {
                    // Nothing more can come from or go to the host: a level-triggered
                    // hang-up would otherwise fire forever.
                    self.reset_conn(key);
                    return;
                }
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
                    && !self.ready.contains(&key)
                {
                    self.ready.push_back(key);
                }
                self.rearm(key);
            }
            None => {}
        }
    }

    /// Reads a pending host connection's `CONNECT <port>\n` and asks the guest.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(Slot::Pending(stream, line)) = self.slots.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let n = match stream.read(&mut buf) {
            Ok(0) => 0,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => 0,
        };
        line.extend_from_slice(&buf[..n]);
        let newline = line.iter().position(|b| *b == b'\n');
        let port = newline.and_then(|i| parse_connect(&line[..i]));
        if n != 0 && newline.is_none() && line.len() < MAX_CONNECT_LINE {
            return; // more to come
        }
        let Some(Slot::Pending(stream, line)) = self.slots.remove(&fd) else {
            return;
        };
        self.watch(fd, ControlOperation::Delete, EventSet::empty());
        self.resume_listener();
        let (Some(port), Some(newline)) = (port, newline) else {
            tracing::warn!("vsock: host connection without a valid `CONNECT <port>` line: closed");
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: too many connections; refused host connection to port {port}");
            return;
        }
        let key = ConnKey {
            host_port: self.allocate_host_port(),
            guest_port: port,
        };
        let mut conn = Conn::new(stream, false, None);
        conn.to_guest = line[newline + 1..].to_vec();
        self.conns.insert(key, conn);
        self.slots.insert(fd, Slot::Conn(key));
        self.control.push_back((key, OP_REQUEST, 0));
        self.rearm(key);
    }

    fn allocate_host_port(&mut self) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self.next_host_port.wrapping_add(1).max(1 << 30);
            if !self.conns.keys().any(|k| k.host_port == port) {
                return port;
            }
        }
    }

    /// Takes every packet the guest queued on tx.
    fn process_tx(&mut self) {
        self.tx_stalled = false;
        loop {
            if self.replies_pending() >= MAX_CONTROL {
                self.tx_stalled = true;
                return;
            }
            let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) else {
                return;
            };
            let head = chain.head_index();
            let packet = chain
                .reader(&self.mem)
                .map_err(|e| format!("bad descriptor chain: {e:?}"))
                .and_then(|mut reader| read_packet(&mut reader, &mut self.scratch));
            if let Err(e) = self.tx.add_used(&self.mem, head, 0) {
                tracing::warn!("vsock: returning a tx buffer: {e:?}");
            }
            self.used = true;
            match packet {
                Ok((header, len)) => self.handle_packet(header, len),
                Err(why) => tracing::debug!("vsock: dropped a malformed tx packet: {why}"),
            }
        }
    }

    fn handle_packet(&mut self, h: Header, len: usize) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                "vsock: dropped a packet from cid {} to cid {} (guest is {}, host is {HOST_CID})",
                h.src_cid,
                h.dst_cid,
                self.cid
            );
            return;
        }
        let key = ConnKey {
            host_port: h.dst_port,
            guest_port: h.src_port,
        };
        if h.kind != TYPE_STREAM {
            if h.op != OP_RST {
                self.control.push_back((key, OP_RST, 0));
            }
            return;
        }
        if h.op == OP_REQUEST {
            self.connect_to_host(key, &h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.control.push_back((key, OP_RST, 0));
            }
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if !conn.established => {
                conn.established = true;
                conn.asked_at = None;
                let ok = format!("OK {}\n", key.host_port);
                // A few bytes on a fresh stream, queued behind nothing and not counted
                // as forwarded guest data.
                conn.to_host.extend_from_slice(ok.as_bytes());
                conn.not_forwarded += ok.len();
                // The host may have sent bytes while it waited.
                if !self.ready.contains(&key) {
                    self.ready.push_back(key);
                }
                self.write_to_host(key);
            }
            OP_RW if conn.established && !conn.guest_shut_send => {
                if conn.to_host.len() - conn.not_forwarded + len > BUF_ALLOC as usize {
                    tracing::debug!(
                        "vsock: guest overran its credit on port {}: reset",
                        key.guest_port
                    );
                    self.reset_conn(key);
                    return;
                }
                conn.to_host.extend_from_slice(&self.scratch[..len]);
                self.write_to_host(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.queue_credit_update(key),
            OP_SHUTDOWN if conn.established => {
                conn.guest_shut_send |= h.flags & SHUTDOWN_SEND != 0;
                conn.guest_shut_rcv |= h.flags & SHUTDOWN_RCV != 0;
                if conn.guest_shut_send && conn.guest_shut_rcv {
                    if conn.to_host.is_empty() {
                        self.reset_conn(key);
                        return;
                    }
                    // Deliver what the guest sent before closing; reset after.
                    conn.closing = true;
                }
                if conn.guest_shut_send && conn.to_host.is_empty() {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            OP_RST => {
                self.remove_conn(key);
                return;
            }
            _ => {
                self.reset_conn(key);
                return;
            }
        }
        self.rearm(key);
    }

    /// The guest opens a connection to host port `key.host_port`: `<uds>_<port>`.
    fn connect_to_host(&mut self, key: ConnKey, h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.control.push_back((key, OP_RST, 0));
            return;
        }
        let path = format!("{}_{}", self.uds.display(), key.host_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let fd = stream.as_raw_fd();
                self.conns.insert(key, Conn::new(stream, true, Some(h)));
                self.slots.insert(fd, Slot::Conn(key));
                self.control.push_back((key, OP_RESPONSE, 0));
                self.rearm(key);
            }
            Err(e) => {
                tracing::debug!("vsock: guest connection to {path}: {e}");
                self.control.push_back((key, OP_RST, 0));
            }
        }
    }

    /// Writes what the host stream takes of the guest's bytes; counts them as forwarded.
    fn write_to_host(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        while !conn.to_host.is_empty() {
            match conn.stream.write(&conn.to_host) {
                Ok(0) => break,
                Ok(n) => {
                    conn.to_host.drain(..n);
                    let ours = n.min(conn.not_forwarded);
                    conn.not_forwarded -= ours;
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.reset_conn(key);
                    return;
                }
            }
        }
        if conn.to_host.is_empty() && conn.closing {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            self.reset_conn(key);
            return;
        }
        if conn.to_host.is_empty() && conn.guest_shut_send {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
        if conn.fwd_cnt.wrapping_sub(conn.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
            self.queue_credit_update(key);
        }
        self.rearm(key);
    }

    /// Control packets that answer the guest's own packets. Only these hold tx back:
    /// host-initiated requests must not (Linux stops refilling rx while its own replies
    /// are stuck, so counting them could stall both sides); they are bounded by the
    /// connection limits instead.
    fn replies_pending(&self) -> usize {
        self.control
            .iter()
            .filter(|(_, op, _)| *op != OP_REQUEST && *op != OP_CREDIT_REQUEST)
            .count()
    }

    /// Queues one credit update for `key` (not another while one waits).
    fn queue_credit_update(&mut self, key: ConnKey) {
        if !self.control.contains(&(key, OP_CREDIT_UPDATE, 0)) {
            self.control.push_back((key, OP_CREDIT_UPDATE, 0));
        }
    }

    fn resume_listener(&mut self) {
        if std::mem::take(&mut self.listener_paused) {
            self.watch(
                self.listener.as_raw_fd(),
                ControlOperation::Add,
                EventSet::IN,
            );
        }
    }

    fn remove_conn(&mut self, key: ConnKey) {
        self.set_interest(key, EventSet::empty());
        if let Some(conn) = self.conns.remove(&key) {
            self.slots.remove(&conn.stream.as_raw_fd());
        }
        self.ready.retain(|k| *k != key);
        self.resume_listener();
    }

    /// Drops the connection and tells the guest.
    fn reset_conn(&mut self, key: ConnKey) {
        self.remove_conn(key);
        self.control.push_back((key, OP_RST, 0));
    }

    fn header_for(&mut self, key: ConnKey, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                conn.fwd_cnt
            }
            None => 0,
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Fills the guest's rx buffers: control packets first, then bytes from streams.
    fn flush_rx(&mut self) {
        // A handle of our own (an Arc clone), so chains do not borrow `self`.
        let mem = self.mem.clone();
        while !self.control.is_empty() || !self.ready.is_empty() {
            let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                return; // starved: the guest's rx notify brings us back
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&mem) {
                Ok(w) if w.available_bytes() >= HEADER_LEN => w,
                other => {
                    tracing::debug!(
                        "vsock: unusable rx buffer ({}): returned empty",
                        other.map_or("bad descriptor chain".into(), |w| format!(
                            "{} bytes",
                            w.available_bytes()
                        ))
                    );
                    self.add_rx_used(head, 0);
                    continue;
                }
            };
            let room = (writer.available_bytes() - HEADER_LEN).min(MAX_PAYLOAD as usize);
            if room == 0 && self.control.is_empty() {
                // A buffer that holds a header only cannot carry data: keep it for a
                // control packet and stop here.
                let next = self.rx.next_avail().wrapping_sub(1);
                self.rx.set_next_avail(next);
                return;
            }
            let packet = match self.control.pop_front() {
                Some((key, op, flags)) => Some((self.header_for(key, op, flags, 0), 0)),
                None => self.next_data_packet(room),
            };
            let Some((header, len)) = packet else {
                // Nothing to send after all: give the buffer back for next time.
                let next = self.rx.next_avail().wrapping_sub(1);
                self.rx.set_next_avail(next);
                continue;
            };
            let written = writer
                .write_all(&header.bytes())
                .and_then(|_| writer.write_all(&self.scratch[..len]));
            if let Err(e) = written {
                tracing::warn!("vsock: writing an rx packet: {e}");
            }
            self.add_rx_used(head, (HEADER_LEN + len) as u32);
        }
    }

    fn add_rx_used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.rx.add_used(&self.mem, head, len) {
            tracing::warn!("vsock: returning an rx buffer: {e:?}");
        }
        self.used = true;
    }

    /// Reads the next ready connection's bytes (up to `room` and its credit) into
    /// `scratch`; returns the packet to send, or None when no connection had any.
    fn next_data_packet(&mut self, room: usize) -> Option<(Header, usize)> {
        while let Some(key) = self.ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if !conn.established || conn.guest_shut_rcv || conn.host_eof {
                self.rearm(key);
                continue;
            }
            let credit = conn.peer_credit() as usize;
            if credit == 0 {
                // Wait for the guest's credit update (its packets rearm the stream).
                self.control.push_back((key, OP_CREDIT_REQUEST, 0));
                self.rearm(key);
                continue;
            }
            let want = room.min(credit);
            let read = if !conn.to_guest.is_empty() {
                let n = want.min(conn.to_guest.len());
                self.scratch[..n].copy_from_slice(&conn.to_guest[..n]);
                conn.to_guest.drain(..n);
                Ok(n)
            } else {
                conn.stream.read(&mut self.scratch[..want])
            };
            match read {
                Ok(0) => {
                    // The host will send no more; the guest may still send (half-close).
                    conn.host_eof = true;
                    if conn.guest_shut_send && conn.to_host.is_empty() {
                        self.remove_conn(key);
                        return Some((self.header_for(key, OP_RST, 0, 0), 0));
                    }
                    let header = self.header_for(key, OP_SHUTDOWN, SHUTDOWN_SEND, 0);
                    self.rearm(key);
                    return Some((header, 0));
                }
                Ok(n) => {
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    // Maybe more: stay queued; rearm leaves EPOLLIN off meanwhile.
                    self.ready.push_back(key);
                    self.rearm(key);
                    return Some((self.header_for(key, OP_RW, 0, n as u32), n));
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    self.rearm(key);
                }
                Err(_) => {
                    self.remove_conn(key);
                    return Some((self.header_for(key, OP_RST, 0, 0), 0));
                }
            }
        }
        None
    }
}

/// Reads one tx packet: its header and `len` payload bytes into `buf`.
fn read_packet(
    reader: &mut virtio_queue::Reader<'_, ()>,
    buf: &mut [u8],
) -> Result<(Header, usize), String> {
    let mut raw = [0u8; HEADER_LEN];
    if reader.available_bytes() < HEADER_LEN {
        return Err(format!(
            "{} bytes is shorter than a header",
            reader.available_bytes()
        ));
    }
    reader
        .read_exact(&mut raw)
        .map_err(|e| format!("reading the header: {e}"))?;
    let header = Header::parse(&raw);
    let len = header.len as usize;
    if header.len > MAX_PAYLOAD || len > buf.len() {
        return Err(format!(
            "payload of {} bytes is over {MAX_PAYLOAD}",
            header.len
        ));
    }
    if len > reader.available_bytes() {
        return Err(format!(
            "header says {len} payload bytes, the chain holds {}",
            reader.available_bytes()
        ));
    }
    reader
        .read_exact(&mut buf[..len])
        .map_err(|e| format!("reading the payload: {e}"))?;
    Ok((header, len))
}

/// `CONNECT <port>` (without its newline) to the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects to a Unix socket without blocking (a full backlog is an error, not a wait).
fn connect_nonblocking(path: &str) -> std::io::Result<UnixStream> {
    let addr = nix::sys::socket::UnixAddr::new(path).map_err(std::io::Error::from)?;
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_NONBLOCK | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)?;
    // SAFETY: `socket` just returned this fd and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::sys::socket::connect(owned.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests;
