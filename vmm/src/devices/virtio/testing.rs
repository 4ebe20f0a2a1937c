//! Test helpers: guest memory, register access, and a guest-side split virtqueue driver
//! that writes descriptor chains (well-formed or not) the way a driver would.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::mmio::{MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

pub fn test_memory() -> GuestMemory {
    crate::memory::create(16 << 20).unwrap().0
}

pub fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

pub fn negotiate(t: &mut MmioTransport) {
    write32(t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write32(t, 0x024, 1);
    write32(t, 0x020, 1); // VERSION_1
    write32(
        t,
        0x070,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_ne!(read32(t, 0x070) & STATUS_FEATURES_OK, 0);
}

/// Ring addresses for a queue of `size` at `base`: descriptors, avail, used.
pub fn layout(base: u64, size: u16) -> (u64, u64, u64) {
    let desc = base;
    let avail = desc + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 0xfff) & !0xfff;
    (desc, avail, used)
}

pub fn setup_queue(t: &mut MmioTransport, index: u32, size: u16, base: u64) {
    let (desc, avail, used) = layout(base, size);
    write32(t, 0x030, index);
    write32(t, 0x038, u32::from(size));
    for (reg, addr) in [(0x080, desc), (0x090, avail), (0x0a0, used)] {
        write32(t, reg, addr as u32);
        write32(t, reg + 4, (addr >> 32) as u32);
    }
    write32(t, 0x044, 1);
}

/// A device-side queue, ready, over the rings a [`GuestQueue`] at `base` writes.
pub fn device_queue(base: u64, size: u16) -> Queue {
    let (desc, avail, used) = layout(base, size);
    let mut q = Queue::new(size).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_ready(true);
    q
}

/// The driver side of a split virtqueue.
pub struct GuestQueue {
    mem: GuestMemory,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl GuestQueue {
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let (desc, avail, used) = layout(base, size);
        Self {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes descriptor `index` as is (for malformed chains).
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(index);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes `head` available to the device.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Adds a chain of (address, length, device-writable) buffers; returns its head.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let flags = if writable { VRING_DESC_F_WRITE } else { 0 }
                | if last { 0 } else { VRING_DESC_F_NEXT };
            self.write_desc(index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// The next used element (id, len), if the device returned one.
    pub fn used(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let elem = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((
            self.mem.read_obj(GuestAddress(elem)).unwrap(),
            self.mem.read_obj(GuestAddress(elem + 4)).unwrap(),
        ))
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }
}
