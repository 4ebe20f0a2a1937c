//! virtio-net against a real tap: frames the guest queues come out of the interface (seen
//! by a packet socket), frames sent on the interface land in the guest's rx buffers.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::testing::*;

const RX_RING: u64 = 0x10_0000;
const TX_RING: u64 = 0x20_0000;
const RX_BUFS: u64 = 0x40_0000;
const TX_BUFS: u64 = 0x80_0000;
const SIZE: u16 = 32;
const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental

struct Guest {
    name: String,
    _device: Net,
    rx: GuestQueue,
    tx: GuestQueue,
    kicks: [EventFd; 2],
    packet: File,
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend([0x02, 0, 0, 0, 0, 0x42]);
    f.extend(ETHERTYPE.to_be_bytes());
    f.extend(payload);
    f
}

impl Guest {
    fn new(tag: &str) -> Self {
        let name = format!("hull{tag}{}", std::process::id() % 10_000);
        let mem = test_memory();
        let mut device = Net::new(&name, None, [2, 0, 0, 0, 0, 1]).unwrap();
        // Quiet interface: no IPv6 autoconfiguration chatter.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let up = std::process::Command::new("ip")
            .args(["link", "set", &name, "up"])
            .status()
            .unwrap();
        assert!(up.success());
        let kicks = [0, 1].map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        device
            .activate(
                0,
                mem.clone(),
                vec![
                    (device_queue(RX_RING, SIZE), kicks[0].try_clone().unwrap()),
                    (device_queue(TX_RING, SIZE), kicks[1].try_clone().unwrap()),
                ],
                irq,
            )
            .unwrap();
        Self {
            packet: packet_socket(&name),
            name,
            _device: device,
            rx: GuestQueue::new(&mem, RX_RING, SIZE),
            tx: GuestQueue::new(&mem, TX_RING, SIZE),
            kicks,
        }
    }

    fn mem(&self) -> GuestMemory {
        self.rx.memory().clone()
    }

    fn transmit(&mut self, bytes: &[u8], at: u64) {
        self.mem().write_slice(bytes, GuestAddress(at)).unwrap();
        self.tx.add(&[(at, bytes.len() as u32, false)]);
        self.kicks[1].write(1).unwrap();
    }
}

/// A raw packet socket bound to the interface (sees frames the interface receives and
/// sends them out of it).
fn packet_socket(name: &str) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(index, 0);
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2); checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(fd >= 0);
    // SAFETY: an all-zero sockaddr_ll is valid; we fill the fields bind needs.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: bind with a sockaddr_ll of its own size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: fd is ours.
    let file = unsafe { File::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a timeval of its own size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    file
}

#[test]
fn guest_frames_leave_through_the_tap_without_their_header() {
    let mut g = Guest::new("t");
    let f = frame(b"hello from the guest");
    let mut with_header = vec![0u8; NET_HDR_LEN];
    with_header.extend(&f);
    g.transmit(&with_header, TX_BUFS);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = (&g.packet)
            .read(&mut buf)
            .expect("no frame on the interface");
        if buf[12..14] == ETHERTYPE.to_be_bytes() {
            assert_eq!(&buf[..n], &f[..], "on {}", g.name);
            break;
        }
        assert!(Instant::now() < deadline);
    }
    // The buffer comes back right after the frame went out (a race with the read above).
    loop {
        if let Some((_, len)) = g.tx.used() {
            assert_eq!(len, 0);
            break;
        }
        assert!(Instant::now() < deadline, "tx buffer not returned");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn tap_frames_fill_rx_buffers_with_a_zero_header() {
    let mut g = Guest::new("r");
    for i in 0..4u64 {
        g.rx.add(&[(RX_BUFS + i * 0x1000, 2048, true)]);
    }
    g.kicks[0].write(1).unwrap();
    let f = frame(b"hello from the host");
    (&g.packet).write_all(&f).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((id, len)) = g.rx.used() {
            let at = RX_BUFS + u64::from(id) * 0x1000;
            let mut got = vec![0u8; len as usize];
            g.mem().read_slice(&mut got, GuestAddress(at)).unwrap();
            if got.len() > NET_HDR_LEN + 14
                && got[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == ETHERTYPE.to_be_bytes()
            {
                assert_eq!(&got[..NET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
                assert_eq!(&got[NET_HDR_LEN..], &f[..]);
                break;
            }
            g.rx.add(&[(at, 2048, true)]);
            g.kicks[0].write(1).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the frame never reached the guest"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn malformed_buffers_are_returned_and_the_device_keeps_working() {
    let mut g = Guest::new("m");
    // Shorter than the header; longer than any frame; outside guest memory.
    g.transmit(&[0u8; 5], TX_BUFS);
    g.tx.add(&[(TX_BUFS, (NET_HDR_LEN + MAX_FRAME + 1) as u32, false)]);
    g.tx.add(&[(0xfff0_0000, 64, false)]);
    g.kicks[1].write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut returned = 0;
    while returned < 3 {
        if g.tx.used().is_some() {
            returned += 1;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    // An rx buffer too small for a frame is returned empty.
    g.rx.add(&[(RX_BUFS, 16, true)]);
    g.kicks[0].write(1).unwrap();
    (&g.packet).write_all(&frame(&[7; 100])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((_, len)) = g.rx.used() {
            assert_eq!(len, 0);
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    // A good frame still goes out.
    let mut ok = vec![0u8; NET_HDR_LEN];
    ok.extend(frame(b"still here"));
    g.transmit(&ok, TX_BUFS + 0x4000);
    let mut buf = [0u8; 2048];
    loop {
        let n = (&g.packet)
            .read(&mut buf)
            .expect("no frame after the malformed ones");
        if buf[12..14] == ETHERTYPE.to_be_bytes() && buf[14..n].ends_with(b"still here") {
            break;
        }
    }
}

#[test]
fn macs_and_tap_names_are_checked() {
    assert_eq!(
        parse_mac("02:00:0a:ff:00:01"),
        Some([2, 0, 0xa, 0xff, 0, 1])
    );
    for bad in [
        "02:00:0a:ff:00",
        "02:00:0a:ff:00:01:02",
        "2:00:0a:ff:00:01",
        "zz:00:0a:ff:00:01",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad}");
    }
    assert!(matches!(
        open_tap("this-name-is-too-long"),
        Err(NetError::Name(_))
    ));
    assert!(matches!(
        open_tap_in("t0", Some(Path::new("/nonexistent/ns"))),
        Err(NetError::Netns { .. })
    ));
}
