//! The legacy PC devices a Linux guest uses: a 16550 UART (COM1) and the i8042's CPU
//! reset line. Both are vm-superio models behind our bus.

use std::io::Write;

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// An eventfd as vm-superio's interrupt / reset trigger.
pub struct EventTrigger(pub EventFd);

impl Trigger for EventTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1: output to `W`, its interrupt an irqfd.
pub struct SerialPort<W: Write + Send> {
    uart: Serial<EventTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> SerialPort<W> {
    pub fn new(interrupt: EventFd, out: W) -> Self {
        Self {
            uart: Serial::new(EventTrigger(interrupt), out),
        }
    }

    /// Queues host input for the guest to read (as much as the FIFO takes).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl<W: Write + Send> BusDevice for SerialPort<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(offset, *byte) {
                tracing::warn!("serial write: {e:?}");
            }
        }
    }
}

/// The i8042 at ports 0x60-0x64: its only job here is the CPU reset (0xFE to port 0x64)
/// that ends the VM.
pub struct ResetPort {
    i8042: I8042Device<EventTrigger>,
}

impl ResetPort {
    pub fn new(reset: EventFd) -> Self {
        Self {
            i8042: I8042Device::new(EventTrigger(reset)),
        }
    }
}

impl BusDevice for ResetPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.i8042.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.i8042.write(offset, *byte) {
                tracing::warn!("i8042 write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_writes_bytes_out_and_reads_input_back() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), sink.clone());
        for b in b"hi\n" {
            port.write(0, std::slice::from_ref(b));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Enable the "data available" interrupt, queue input: the guest is interrupted
        // and reads the byte back from the receive buffer.
        port.write(1, &[0x01]);
        assert_eq!(port.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        port.read(0, &mut rbr);
        assert_eq!(&rbr, b"x");
        // Wide or far accesses are refused without touching the UART.
        let mut wide = [0u8; 2];
        port.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        port.write(0x1_0000, b"z");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn i8042_reset_command_fires_the_reset_event() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = ResetPort::new(reset.try_clone().unwrap());
        port.write(4, &[0x20]); // read command byte: not a reset
        assert!(reset.read().is_err(), "no reset yet");
        port.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
