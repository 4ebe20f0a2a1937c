//! virtio-blk against a real file, with requests written into guest memory by the test.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::testing::*;

const RING: u64 = 0x10_0000;
const BUFS: u64 = 0x40_0000;
const SIZE: u16 = 64;

struct Guest {
    _disk: TempDisk,
    path: PathBuf,
    device: Block,
    queue: GuestQueue,
    kick: EventFd,
    next: u64,
}

impl Guest {
    fn new(name: &str, sectors: u64, read_only: bool) -> Self {
        let path = std::env::temp_dir().join(format!("hull-blk-{name}-{}.img", std::process::id()));
        let data: Vec<u8> = (0..sectors * SECTOR).map(|i| (i / SECTOR) as u8).collect();
        std::fs::write(&path, data).unwrap();
        let disk = TempDisk(path.clone());
        let mem = test_memory();
        let mut device = Block::new(&path, read_only).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        device
            .activate(
                0,
                mem.clone(),
                vec![(device_queue(RING, SIZE), kick.try_clone().unwrap())],
                irq,
            )
            .unwrap();
        Self {
            _disk: disk,
            path,
            device,
            queue: GuestQueue::new(&mem, RING, SIZE),
            kick,
            next: BUFS,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next;
        self.next += (len + 0xfff) & !0xfff;
        at
    }

    fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let at = self.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.queue
            .memory()
            .write_slice(&h, GuestAddress(at))
            .unwrap();
        at
    }

    /// Submits a chain and waits for it: (used length, status byte at `status`).
    fn submit(&mut self, chain: &[(u64, u32, bool)], status: Option<u64>) -> (u32, Option<u8>) {
        if let Some(s) = status {
            self.queue
                .memory()
                .write_obj(0xffu8, GuestAddress(s))
                .unwrap();
        }
        self.queue.add(chain);
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((_, len)) = self.queue.used() {
                let st =
                    status.map(|s| self.queue.memory().read_obj::<u8>(GuestAddress(s)).unwrap());
                return (len, st);
            }
            assert!(Instant::now() < deadline, "request not completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn read(&mut self, sector: u64, sectors: u64) -> (u8, Vec<u8>) {
        let h = self.header(T_IN, sector);
        let data = self.alloc(sectors * SECTOR);
        let st = self.alloc(1);
        let (len, status) = self.submit(
            &[
                (h, 16, false),
                (data, (sectors * SECTOR) as u32, true),
                (st, 1, true),
            ],
            Some(st),
        );
        let mut buf = vec![0u8; (sectors * SECTOR) as usize];
        self.queue
            .memory()
            .read_slice(&mut buf, GuestAddress(data))
            .unwrap();
        if status == Some(S_OK) {
            assert_eq!(len as u64, sectors * SECTOR + 1);
        }
        (status.unwrap(), buf)
    }

    fn write(&mut self, sector: u64, bytes: &[u8]) -> u8 {
        let h = self.header(T_OUT, sector);
        let data = self.alloc(bytes.len() as u64);
        self.queue
            .memory()
            .write_slice(bytes, GuestAddress(data))
            .unwrap();
        let st = self.alloc(1);
        self.submit(
            &[
                (h, 16, false),
                (data, bytes.len() as u32, false),
                (st, 1, true),
            ],
            Some(st),
        )
        .1
        .unwrap()
    }
}

#[test]
fn reads_writes_flushes_and_names_itself() {
    let mut g = Guest::new("rw", 16, false);
    let mut cfg = [0u8; 8];
    g.device.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 16, "capacity in sectors");
    assert_eq!(g.device.features() & VIRTIO_BLK_F_RO, 0);
    let (status, data) = g.read(3, 2);
    assert_eq!(status, S_OK);
    assert!(data[..512].iter().all(|b| *b == 3) && data[512..].iter().all(|b| *b == 4));
    assert_eq!(g.write(5, &[0xab; 1024]), S_OK);
    let h = g.header(T_FLUSH, 0);
    let st = g.alloc(1);
    assert_eq!(
        g.submit(&[(h, 16, false), (st, 1, true)], Some(st)).1,
        Some(S_OK)
    );
    let on_disk = std::fs::read(&g.path).unwrap();
    assert!(on_disk[5 * 512..7 * 512].iter().all(|b| *b == 0xab));
    assert!(on_disk[7 * 512..8 * 512].iter().all(|b| *b == 7));
    let h = g.header(T_GET_ID, 0);
    let id = g.alloc(20);
    let st = g.alloc(1);
    let (len, status) = g.submit(&[(h, 16, false), (id, 20, true), (st, 1, true)], Some(st));
    assert_eq!((len, status), (21, Some(S_OK)));
    let mut name = [0u8; 20];
    g.queue
        .memory()
        .read_slice(&mut name, GuestAddress(id))
        .unwrap();
    assert!(String::from_utf8_lossy(&name).starts_with("hull-blk-rw-"));
}

#[test]
fn bad_requests_fail_without_touching_the_disk() {
    let mut g = Guest::new("bad", 8, false);
    let before = std::fs::read(&g.path).unwrap();
    // Past the end, straddling the end, a sector number that overflows.
    assert_eq!(g.read(8, 1).0, S_IOERR);
    assert_eq!(g.write(7, &[1; 1024]), S_IOERR);
    assert_eq!(g.write(u64::MAX / 512 + 5, &[1; 512]), S_IOERR);
    // Not a whole number of sectors.
    assert_eq!(g.write(0, &[1; 100]), S_IOERR);
    // An unknown request type.
    let h = g.header(77, 0);
    let st = g.alloc(1);
    assert_eq!(
        g.submit(&[(h, 16, false), (st, 1, true)], Some(st)).1,
        Some(S_UNSUPP)
    );
    // A header cut short.
    let h = g.header(T_IN, 0);
    let st = g.alloc(1);
    assert_eq!(
        g.submit(&[(h, 8, false), (st, 1, true)], Some(st)).1,
        Some(S_IOERR)
    );
    // No writable byte for the status: returned unused.
    let h = g.header(T_OUT, 0);
    let data = g.alloc(512);
    assert_eq!(g.submit(&[(h, 16, false), (data, 512, false)], None).0, 0);
    // Buffers outside guest memory.
    let h = g.header(T_IN, 0);
    assert_eq!(
        g.submit(
            &[
                (h, 16, false),
                (0xfff0_0000, 512, true),
                (0xfff0_1000, 1, true)
            ],
            None
        )
        .0,
        0
    );
    // A descriptor loop.
    g.queue.write_desc(40, BUFS, 16, VRING_DESC_F_NEXT, 40);
    g.queue.publish(40);
    g.kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.queue.used().is_none() {
        assert!(Instant::now() < deadline, "looping chain not returned");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(std::fs::read(&g.path).unwrap(), before, "the disk changed");
    // Still serving.
    assert_eq!(g.read(0, 1).0, S_OK);
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let mut g = Guest::new("ro", 4, true);
    assert_ne!(g.device.features() & VIRTIO_BLK_F_RO, 0);
    let before = std::fs::read(&g.path).unwrap();
    assert_eq!(g.write(1, &[9; 512]), S_IOERR);
    assert_eq!(g.read(1, 1), (S_OK, vec![1; 512]));
    assert_eq!(std::fs::read(&g.path).unwrap(), before);
}

#[test]
fn a_missing_image_is_named() {
    let err = Block::new(Path::new("/nonexistent/disk.img"), false)
        .err()
        .unwrap();
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
}
