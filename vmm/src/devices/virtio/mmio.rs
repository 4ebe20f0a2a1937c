//! The virtio-mmio transport (virtio 1.2 §4.2, version 2 register layout).
//!
//! Lives on the MMIO bus and is driven by vCPU threads. Queue notifications normally
//! arrive as KVM ioeventfds on the same eventfds [`MmioTransport::queue_events`] hands
//! out; a write that reaches us (no ioeventfd) is forwarded to them.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4c4c_5548; // "HULL"

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Offset of the queue notify register (where ioeventfds are registered).
pub const NOTIFY_OFFSET: u64 = 0x50;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| std::io::Error::other(format!("{e:?}")))?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// One notify eventfd per queue (for KVM ioeventfds, with the queue index as datamatch).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may change only while features are negotiated and the device is
    /// not yet live.
    fn queue_config_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_select {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            // Shared memory regions: none. Length and base read as all ones ("no such
            // region"); zero would describe a region at address 0.
            0x0b0..=0x0bc => u32::MAX,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x014 => self.device_features_select = value,
            0x020 => {
                if self.status & (STATUS_FEATURES_OK | STATUS_FAILED) == 0 {
                    match self.driver_features_select {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        _ => {}
                    }
                }
            }
            0x024 => self.driver_features_select = value,
            0x030 => self.queue_select = value,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                if !self.queue_config_allowed() {
                    tracing::debug!(
                        "virtio-mmio: queue register {offset:#x} written in status {:#x}: ignored",
                        self.status
                    );
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    return;
                };
                match offset {
                    0x038 => q.set_size(value.try_into().unwrap_or(0)),
                    0x044 => q.set_ready(value == 1),
                    0x080 => q.set_desc_table_address(Some(value), None),
                    0x084 => q.set_desc_table_address(None, Some(value)),
                    0x090 => q.set_avail_ring_address(Some(value), None),
                    0x094 => q.set_avail_ring_address(None, Some(value)),
                    0x0a0 => q.set_used_ring_address(Some(value), None),
                    _ => q.set_used_ring_address(None, Some(value)),
                }
            }
            NOTIFY_OFFSET => match self.queue_events.get(value as usize) {
                Some(event) => {
                    let _ = event.write(1);
                }
                None => tracing::debug!("virtio-mmio: notify of queue {value} that does not exist"),
            },
            0x064 => self.interrupt.ack(value),
            0x070 => self.write_status(value),
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            tracing::debug!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {value:#x}) without a reset",
                self.status
            );
            return;
        }
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // Not set: the driver reads the status back and gives up.
                tracing::debug!(
                    "virtio-mmio: driver features {:#x} not a subset of {offered:#x} with VERSION_1",
                    self.driver_features
                );
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        if self.status & STATUS_FEATURES_OK == 0 || !valid {
            tracing::warn!("virtio-mmio: DRIVER_OK with unnegotiated features or an invalid queue");
            self.needs_reset();
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (q, event) in self.queues.iter().zip(&self.queue_events) {
            let (Ok(event), Ok(queue)) = (event.try_clone(), Queue::try_from(q.state())) else {
                self.needs_reset();
                return;
            };
            queues.push((queue, event));
        }
        match self.device.activate(
            self.driver_features,
            self.mem.clone(),
            queues,
            self.interrupt.clone(),
        ) {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::error!(
                    "virtio device {} failed to start: {e}",
                    self.device.device_type()
                );
                // Undo what part of it did start (a vhost-user backend's rings).
                self.device.reset();
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt.signal(INT_CONFIG);
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.interrupt.ack(u32::MAX);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_register(offset).to_le_bytes(),
            Ok(word) => *word = [0xff; 4],
            Err(_) => {
                tracing::debug!("virtio-mmio: non-32-bit register read at {offset:#x}");
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            tracing::debug!("virtio-mmio: config write at {offset:#x} ignored (read-only config)");
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(word)),
            _ => tracing::debug!("virtio-mmio: non-32-bit register write at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use std::sync::Mutex;

    struct Fake {
        activated: Arc<Mutex<Option<usize>>>,
        resets: Arc<Mutex<u32>>,
    }
    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data)
        }
        fn activate(
            &mut self,
            _features: u64,
            _mem: GuestMemory,
            queues: Vec<(Queue, EventFd)>,
            _interrupt: Arc<Interrupt>,
        ) -> Result<(), super::super::ActivateError> {
            *self.activated.lock().unwrap() = Some(queues.len());
            Ok(())
        }
        fn reset(&mut self) {
            *self.resets.lock().unwrap() += 1;
        }
    }

    type Activated = Arc<Mutex<Option<usize>>>;
    type Resets = Arc<Mutex<u32>>;

    fn transport() -> (MmioTransport, Activated, Resets, GuestMemory) {
        let mem = test_memory();
        let activated = Arc::new(Mutex::new(None));
        let resets = Arc::new(Mutex::new(0));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(
            Box::new(Fake {
                activated: activated.clone(),
                resets: resets.clone(),
            }),
            mem.clone(),
            interrupt,
        )
        .unwrap();
        (t, activated, resets, mem)
    }

    #[test]
    fn identifies_itself_and_its_features() {
        let (mut t, ..) = transport();
        assert_eq!(read32(&mut t, 0x000), MAGIC);
        assert_eq!(read32(&mut t, 0x004), 2);
        assert_eq!(read32(&mut t, 0x008), 42);
        assert_eq!(read32(&mut t, 0x0b0), u32::MAX, "no shared memory region");
        assert_eq!(read32(&mut t, 0x010), 1 << 3);
        write32(&mut t, 0x014, 1);
        assert_eq!(read32(&mut t, 0x010), 1, "VERSION_1 in the high word");
        write32(&mut t, 0x030, 1);
        assert_eq!(read32(&mut t, 0x034), 8);
        write32(&mut t, 0x030, 7);
        assert_eq!(read32(&mut t, 0x034), 0, "no such queue");
        let mut cfg = [0u8; 2];
        t.read(0x106, &mut cfg);
        assert_eq!(cfg, [7, 8]);
        let mut past = [0u8; 4];
        t.read(0x106, &mut past);
        assert_eq!(past, [0xff; 4], "config read past the end");
        // Misaligned or narrow register accesses are ignored.
        let mut narrow = [0u8; 2];
        t.read(0x000, &mut narrow);
        assert_eq!(narrow, [0, 0]);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let (mut t, activated, ..) = transport();
        write32(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write32(&mut t, 0x020, 1 << 3);
        write32(
            &mut t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(read32(&mut t, 0x070) & STATUS_FEATURES_OK, 0);
        // Features the device never offered are refused too.
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1 | 2);
        write32(
            &mut t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(read32(&mut t, 0x070) & STATUS_FEATURES_OK, 0);
        assert!(activated.lock().unwrap().is_none());
    }

    #[test]
    fn a_driver_brings_it_up_and_resets_it() {
        let (mut t, activated, resets, _mem) = transport();
        // Queue registers are ignored before FEATURES_OK.
        write32(&mut t, 0x038, 4);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x10_000);
        setup_queue(&mut t, 1, 8, 0x20_000);
        write32(
            &mut t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(*activated.lock().unwrap(), Some(2));
        assert_eq!(read32(&mut t, 0x070) & STATUS_NEEDS_RESET, 0);
        // A notify write reaches that queue's event.
        write32(&mut t, NOTIFY_OFFSET, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        write32(&mut t, NOTIFY_OFFSET, 9); // no such queue: ignored
                                           // Queue registers are frozen once live.
        write32(&mut t, 0x030, 0);
        write32(&mut t, 0x038, 2);
        assert_eq!(t.queues[0].size(), 16);
        write32(&mut t, 0x070, 0);
        assert_eq!(*resets.lock().unwrap(), 1);
        assert_eq!(read32(&mut t, 0x070), 0);
        assert!(!t.queues[0].ready());
    }

    #[test]
    fn a_queue_outside_guest_memory_needs_reset_instead_of_starting() {
        let (mut t, activated, ..) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0xffff_0000);
        write32(
            &mut t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(activated.lock().unwrap().is_none());
        assert_ne!(read32(&mut t, 0x070) & STATUS_NEEDS_RESET, 0);
        assert_ne!(read32(&mut t, 0x060) & INT_CONFIG, 0);
    }
}
