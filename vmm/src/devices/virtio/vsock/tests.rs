//! The vsock device against guest memory written by the test: a guest-side driver puts
//! rx buffers and tx packets on split queues, real Unix sockets stand for the host.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::testing::*;

const GUEST_CID: u64 = 42;
const RX_RING: u64 = 0x10_0000;
const TX_RING: u64 = 0x20_0000;
const EV_RING: u64 = 0x30_0000;
const RX_BUFS: u64 = 0x40_0000;
const TX_BUFS: u64 = 0x80_0000;
const RX_BUF_LEN: u32 = 4096 + HEADER_LEN as u32;
const SIZE: u16 = 32;

struct Guest {
    dir: PathBuf,
    device: Vsock,
    rx: GuestQueue,
    tx: GuestQueue,
    kicks: [EventFd; 3],
    irq: Arc<Interrupt>,
    next_tx: u64,
    rx_heads: HashMap<u16, u64>,
}

impl Guest {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hull-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = test_memory();
        let mut device = Vsock::new(GUEST_CID, &dir.join("v.sock")).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let kicks = [0, 1, 2].map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let queues = [RX_RING, TX_RING, EV_RING]
            .iter()
            .zip(&kicks)
            .map(|(base, kick)| (device_queue(*base, SIZE), kick.try_clone().unwrap()))
            .collect();
        let mut guest = Self {
            dir,
            rx: GuestQueue::new(&mem, RX_RING, SIZE),
            tx: GuestQueue::new(&mem, TX_RING, SIZE),
            kicks,
            irq: irq.clone(),
            next_tx: TX_BUFS,
            rx_heads: HashMap::new(),
            device: {
                device
                    .activate(super::super::VIRTIO_F_VERSION_1, mem.clone(), queues, irq)
                    .unwrap();
                device
            },
        };
        for i in 0..8 {
            guest.give_rx_buffer(i);
        }
        guest
    }

    fn mem(&self) -> &GuestMemory {
        self.rx.memory()
    }

    fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    /// An rx buffer as Linux posts it: a header descriptor and a 4 KiB payload one.
    fn give_rx_buffer(&mut self, slot: u64) {
        let addr = RX_BUFS + slot * 0x2000;
        let head = self.rx.add(&[
            (addr, HEADER_LEN as u32, true),
            (
                addr + HEADER_LEN as u64,
                RX_BUF_LEN - HEADER_LEN as u32,
                true,
            ),
        ]);
        self.rx_heads.insert(head, addr);
        self.kicks[0].write(1).unwrap();
    }

    fn header(&self, op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Puts one packet (header and payload in one descriptor) on tx and kicks.
    fn send(&mut self, header: Header, payload: &[u8]) {
        let addr = self.next_tx;
        self.next_tx += 0x1_0000;
        self.mem()
            .write_slice(&header.bytes(), GuestAddress(addr))
            .unwrap();
        self.mem()
            .write_slice(payload, GuestAddress(addr + HEADER_LEN as u64))
            .unwrap();
        self.tx
            .add(&[(addr, (HEADER_LEN + payload.len()) as u32, false)]);
        self.kicks[1].write(1).unwrap();
    }

    /// Waits for the next rx packet; returns it with its payload, and reposts the buffer.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((id, len)) = self.rx.used() {
                let addr = self.rx_heads[&(id as u16)];
                let mut raw = [0u8; HEADER_LEN];
                self.mem().read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let header = Header::parse(&raw);
                assert_eq!(len as usize, HEADER_LEN + header.len as usize);
                let mut payload = vec![0u8; header.len as usize];
                self.mem()
                    .read_slice(&mut payload, GuestAddress(addr + HEADER_LEN as u64))
                    .unwrap();
                self.give_rx_buffer((addr - RX_BUFS) / 0x2000);
                assert_ne!(self.irq.status() & 1, 0, "used-ring interrupt raised");
                return (header, payload);
            }
            assert!(Instant::now() < deadline, "no rx packet within 5 s");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Asserts no rx packet arrives for a while.
    fn quiet(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(self.rx.used(), None);
    }

    /// Waits until the device has returned every tx buffer.
    fn tx_done(&mut self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = 0;
        while seen < count {
            if let Some((_, len)) = self.tx.used() {
                assert_eq!(len, 0);
                seen += 1;
            }
            assert!(Instant::now() < deadline, "tx buffers not returned");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.device.reset();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_exact_timeout(stream: &mut UnixStream, len: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn headers_round_trip() {
    let h = Header {
        src_cid: 1,
        dst_cid: 2,
        src_port: 3,
        dst_port: 4,
        len: 5,
        kind: 6,
        op: 7,
        flags: 8,
        buf_alloc: 9,
        fwd_cnt: 10,
    };
    assert_eq!(Header::parse(&h.bytes()), h);
}

#[test]
fn connect_lines_are_parsed_strictly() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    for bad in [
        &b"CONNECT"[..],
        b"CONNECT ",
        b"CONNECT -1",
        b"CONNECT 99999999999",
        b"connect 5",
        b"CONNECT 5 6",
    ] {
        assert_eq!(parse_connect(bad), None, "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn guest_connects_to_a_host_port_and_bytes_flow_both_ways() {
    let mut g = Guest::new("g2h");
    let listener = UnixListener::bind(format!("{}_1234", g.uds().display())).unwrap();
    g.send(g.header(OP_REQUEST, 5000, 1234, 0), b"");
    let (resp, _) = g.recv();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (OP_RESPONSE, 1234, 5000)
    );
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));
    let (mut host, _) = listener.accept().unwrap();
    g.send(g.header(OP_RW, 5000, 1234, 5), b"hello");
    assert_eq!(read_exact_timeout(&mut host, 5), b"hello");
    host.write_all(b"world").unwrap();
    let (data, payload) = g.recv();
    assert_eq!((data.op, data.len), (OP_RW, 5));
    assert_eq!(payload, b"world");
    assert_eq!(data.buf_alloc, BUF_ALLOC);
    // The host half-closes: the guest hears the host will send no more, and can still
    // send (a terminal's output after its stdin ended).
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (shut, _) = g.recv();
    assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    g.send(g.header(OP_RW, 5000, 1234, 4), b"tail");
    assert_eq!(read_exact_timeout(&mut host, 4), b"tail");
    // The guest closes: the host sees EOF; the connection is reset.
    let mut close = g.header(OP_SHUTDOWN, 5000, 1234, 0);
    close.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(close, b"");
    assert_eq!(g.recv().0.op, OP_RST);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    g.quiet();
}

#[test]
fn bytes_sent_before_the_guest_closes_all_reach_the_host() {
    let mut g = Guest::new("close-flush");
    let listener = UnixListener::bind(format!("{}_88", g.uds().display())).unwrap();
    g.send(g.header(OP_REQUEST, 8000, 88, 0), b"");
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    // More than the host socket buffers while nobody reads, within our credit.
    let chunk: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
    for _ in 0..3 {
        g.send(g.header(OP_RW, 8000, 88, MAX_PAYLOAD), &chunk);
        g.tx_done(1);
    }
    let mut close = g.header(OP_SHUTDOWN, 8000, 88, 0);
    close.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(close, b"");
    g.tx_done(1);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 3 * MAX_PAYLOAD as usize, "bytes lost at close");
    assert!(all
        .chunks(MAX_PAYLOAD as usize)
        .all(|c| c == chunk.as_slice()));
    // Reset once delivered (credit updates may come first).
    loop {
        let (h, _) = g.recv();
        if h.op == OP_RST {
            break;
        }
        assert_eq!(h.op, OP_CREDIT_UPDATE);
    }
}

#[test]
fn a_guest_flooding_bogus_packets_without_rx_buffers_is_throttled() {
    let mut g = Guest::new("flood");
    // The harness posted 8 rx buffers; every bogus packet wants an RST back. Past the
    // backlog the device leaves tx alone instead of queueing more.
    let mut sent = 0;
    let mut returned = 0;
    while sent < MAX_CONTROL + 64 {
        for _ in 0..16 {
            let mut bogus = g.header(OP_RW, 9000 + sent as u32, 1, 0);
            bogus.kind = 9;
            g.send(bogus, b"");
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
        while g.tx.used().is_some() {
            returned += 1;
        }
        // Never more than the ring holds outstanding: stop once the device stopped.
        if sent - returned >= 16 {
            break;
        }
        g.next_tx = TX_BUFS;
    }
    assert!(
        returned <= MAX_CONTROL + 8 + 16,
        "{returned} packets taken while throttled"
    );
    assert!(
        sent - returned >= 16,
        "the device kept taking packets: {returned} of {sent}"
    );
    // Rx buffers given back: the RSTs flow again.
    for _ in 0..4 {
        assert_eq!(g.recv().0.op, OP_RST);
    }
}

#[test]
fn host_connects_with_a_connect_line_and_gets_ok_once_the_guest_accepts() {
    let mut g = Guest::new("h2g");
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 52\nearly").unwrap();
    let (req, _) = g.recv();
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid),
        (OP_REQUEST, 52, GUEST_CID)
    );
    let host_port = req.src_port;
    let mut resp = g.header(OP_RESPONSE, 52, host_port, 0);
    resp.buf_alloc = 64 * 1024;
    g.send(resp, b"");
    let ok = format!("OK {host_port}\n");
    assert_eq!(read_exact_timeout(&mut host, ok.len()), ok.as_bytes());
    // Bytes the host sent right after its CONNECT line reach the guest.
    let (data, payload) = g.recv();
    assert_eq!((data.op, payload.as_slice()), (OP_RW, &b"early"[..]));
    g.send(g.header(OP_RW, 52, host_port, 3), b"pong");
    assert_eq!(read_exact_timeout(&mut host, 3), b"pon");
}

#[test]
fn a_host_that_half_closes_before_the_guest_accepts_still_connects() {
    let mut g = Guest::new("early-eof");
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 62\nrequest").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap(); // as socat does at stdin EOF
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    g.send(g.header(OP_RESPONSE, 62, req.src_port, 0), b"");
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(read_exact_timeout(&mut host, ok.len()), ok.as_bytes());
    let (data, payload) = g.recv();
    assert_eq!((data.op, payload.as_slice()), (OP_RW, &b"request"[..]));
    assert_eq!(g.recv().0.op, OP_SHUTDOWN, "then the host's end of stream");
    g.send(g.header(OP_RW, 62, req.src_port, 5), b"reply");
    assert_eq!(read_exact_timeout(&mut host, 5), b"reply");
}

#[test]
fn a_host_connection_the_guest_never_answers_is_closed() {
    let mut g = Guest::new("no-answer");
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 61\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    // No RESPONSE: after the timeout the host's stream ends and the guest hears RST.
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    let (rst, _) = g.recv();
    assert_eq!(
        (rst.op, rst.dst_port, rst.src_port),
        (OP_RST, 61, req.src_port)
    );
}

#[test]
fn refused_and_malformed_connections_get_rst() {
    let mut g = Guest::new("rst");
    // Nobody listens on host port 7.
    g.send(g.header(OP_REQUEST, 5001, 7, 0), b"");
    assert_eq!(g.recv().0.op, OP_RST);
    // Data for a connection that does not exist.
    g.send(g.header(OP_RW, 5002, 8, 1), b"x");
    assert_eq!(g.recv().0.op, OP_RST);
    // A datagram type we do not do.
    let mut dgram = g.header(OP_REQUEST, 5003, 9, 0);
    dgram.kind = 3;
    g.send(dgram, b"");
    assert_eq!(g.recv().0.op, OP_RST);
    // A packet claiming another source CID is dropped without an answer.
    let mut spoofed = g.header(OP_REQUEST, 5004, 10, 0);
    spoofed.src_cid = 7;
    g.send(spoofed, b"");
    g.tx_done(4);
    g.quiet();
    // A bad CONNECT line closes the host's stream; nothing reaches the guest.
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"HELLO 5\n").unwrap();
    let mut buf = [0u8; 1];
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    g.quiet();
}

#[test]
fn malformed_descriptor_chains_are_returned_and_the_device_keeps_working() {
    let mut g = Guest::new("malformed");
    let mem = g.mem().clone();
    // Shorter than a header.
    g.tx.add(&[(TX_BUFS, 10, false)]);
    // Header promises more payload than the chain holds.
    mem.write_slice(
        &g.header(OP_RW, 1, 2, 100).bytes(),
        GuestAddress(TX_BUFS + 0x100),
    )
    .unwrap();
    g.tx.add(&[(TX_BUFS + 0x100, HEADER_LEN as u32 + 4, false)]);
    // Payload over the maximum.
    mem.write_slice(
        &g.header(OP_RW, 1, 2, MAX_PAYLOAD + 1).bytes(),
        GuestAddress(TX_BUFS + 0x200),
    )
    .unwrap();
    g.tx.add(&[(TX_BUFS + 0x200, HEADER_LEN as u32, false)]);
    // Wrong direction: a device-writable descriptor where the device must read.
    g.tx.add(&[(TX_BUFS + 0x300, HEADER_LEN as u32, true)]);
    // Outside guest memory.
    g.tx.add(&[(0xfff0_0000, HEADER_LEN as u32, false)]);
    // Length wrapping past the end of the address space.
    g.tx.add(&[(u64::MAX - 8, HEADER_LEN as u32, false)]);
    // A loop: descriptor 20 points at itself.
    g.tx.write_desc(20, TX_BUFS + 0x400, 8, VRING_DESC_F_NEXT, 20);
    g.tx.publish(20);
    // A next index past the table.
    g.tx.write_desc(21, TX_BUFS + 0x500, 8, VRING_DESC_F_NEXT, 999);
    g.tx.publish(21);
    g.kicks[1].write(1).unwrap();
    g.tx_done(8);
    g.quiet();
    // Still answering.
    let mut g2 = g;
    let listener = UnixListener::bind(format!("{}_99", g2.uds().display())).unwrap();
    g2.send(g2.header(OP_REQUEST, 6000, 99, 0), b"");
    let (resp, _) = g2.recv();
    assert_eq!(resp.op, OP_RESPONSE);
    drop(listener);
}

#[test]
fn a_guest_overrunning_its_credit_loses_the_connection() {
    let mut g = Guest::new("credit");
    let listener = UnixListener::bind(format!("{}_77", g.uds().display())).unwrap();
    g.send(g.header(OP_REQUEST, 7000, 77, 0), b"");
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (_host, _) = listener.accept().unwrap(); // never reads
    let chunk = vec![7u8; MAX_PAYLOAD as usize];
    let mut sent = 0;
    let mut reset = false;
    for _ in 0..(2 * BUF_ALLOC / MAX_PAYLOAD + 4) {
        g.send(g.header(OP_RW, 7000, 77, MAX_PAYLOAD), &chunk);
        sent += 1;
        g.tx_done(1);
        if let Some((id, _)) = g.rx.used() {
            let addr = g.rx_heads[&(id as u16)];
            let mut raw = [0u8; HEADER_LEN];
            g.mem().read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = Header::parse(&raw);
            if h.op == OP_RST {
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "no RST after {sent} packets of {MAX_PAYLOAD} bytes");
}

#[test]
fn the_host_socket_is_removed_when_the_device_goes() {
    let g = Guest::new("cleanup");
    let uds = g.uds();
    assert!(uds.exists());
    let dir = g.dir.clone();
    drop(g);
    assert!(!uds.exists());
    assert!(!dir.exists());
    // A path that holds something other than a socket is not clobbered.
    let file = std::env::temp_dir().join(format!("hull-vsock-file-{}", std::process::id()));
    std::fs::write(&file, b"data").unwrap();
    let err = Vsock::new(3, &file).err().expect("refused");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    std::fs::remove_file(&file).unwrap();
}
