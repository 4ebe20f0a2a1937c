//! virtio devices over the MMIO transport (virtio 1.x, transport version 2 only).

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub mod testing;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const DEVICE_ID_NET: u32 = 1;
pub const DEVICE_ID_BLOCK: u32 = 2;
pub const DEVICE_ID_VSOCK: u32 = 19;
pub const DEVICE_ID_FS: u32 = 26;

/// `InterruptStatus` bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the status bits the driver reads and acknowledges, and the
/// irqfd that raises its IRQ line.
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver that used rings moved.
    pub fn signal_used(&self) {
        self.signal(INT_USED_RING);
    }

    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("raising a virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn irq(&self) -> &EventFd {
        &self.irq
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("vhost-user backend: {0}")]
    VhostUser(#[from] vhost::Error),
    #[error("the driver set up {got} queues, the device needs {want}")]
    Queues { got: usize, want: usize },
}

/// What a device model gives the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Largest size of each queue; their number is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Reads device config space at `offset` (bytes past the config are all ones).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts the device with the features the driver accepted and the queues it set up,
    /// each with its notify event.
    fn activate(
        &mut self,
        features: u64,
        mem: GuestMemory,
        queues: Vec<(virtio_queue::Queue, EventFd)>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops the device after a driver reset; it may be activated again.
    fn reset(&mut self);
}

/// The queues a device was activated with, as the `N` it needs.
pub fn expect_queues<const N: usize>(
    queues: Vec<(virtio_queue::Queue, EventFd)>,
) -> Result<[(virtio_queue::Queue, EventFd); N], ActivateError> {
    let got = queues.len();
    queues
        .try_into()
        .map_err(|_| ActivateError::Queues { got, want: N })
}

/// Copies `config` bytes at `offset` into `data`; out of range reads as all ones.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0xff);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = start
        .checked_add(data.len())
        .and_then(|end| config.get(start..end))
    {
        data.copy_from_slice(src);
    }
}
