//! Address-range dispatch for port I/O and MMIO exits.
//!
//! The bus is built before any vCPU runs and never changes afterwards, so lookups need no
//! lock; each device has its own.

use std::sync::{Arc, Mutex};

/// A device that answers reads and writes at offsets inside its range.
pub trait BusDevice: Send {
    /// Fills `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes what the guest wrote at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device over `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), Overlap> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Overlap { base, len })?;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// The device holding `addr` and the offset of `addr` in it, if the whole access
    /// (`len` bytes) falls inside one device.
    fn find(&self, addr: u64, len: usize) -> Option<(&Arc<Mutex<dyn BusDevice>>, u64)> {
        let i = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[i];
        let offset = addr - r.base;
        (offset.checked_add(len as u64)? <= r.len).then_some((&r.device, offset))
    }

    /// Dispatches a read; returns false (and fills `data` with ones, as an open bus
    /// reads) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if a vCPU thread panicked while holding it: device state is plain
/// registers, and the VM is being torn down in that case anyway.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let a = Arc::new(Mutex::new(Echo(vec![])));
        let b = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 5).unwrap();
        assert!(bus.insert(a.clone(), 0x3fc, 8).is_err());
        assert!(bus.insert(a.clone(), 0x3f0, 9).is_err());
        assert!(bus.insert(a.clone(), 0x10, 0).is_err());
        assert!(bus.insert(a.clone(), u64::MAX, 2).is_err());
        let mut byte = [0u8; 1];
        assert!(bus.read(0x3fa, &mut byte));
        assert_eq!(byte, [2]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().unwrap().0, vec![(4, vec![0xfe])]);
        // Nothing there: reads float high, writes vanish.
        assert!(!bus.read(0x80, &mut byte));
        assert_eq!(byte, [0xff]);
        assert!(!bus.write(0x3f7, &[1]));
        // An access running past the end of a device matches nothing.
        let mut word = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut word));
        assert_eq!(word, [0xff; 4]);
    }
}
