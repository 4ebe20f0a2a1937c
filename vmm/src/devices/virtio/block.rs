//! virtio-blk on a host file: read, write, flush and get-id, served on the device thread
//! with positioned reads and writes. Every request is checked against the disk's size
//! and the chain's shape; a bad one completes with an error status (or, when it has no
//! room for a status, is returned unused), never touching the file.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    expect_queues, read_config_bytes, ActivateError, Interrupt, VirtioDevice, DEVICE_ID_BLOCK,
};
use crate::devices::thread::{DeviceThread, Running};
use crate::memory::GuestMemory;

pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Requests are moved through a buffer of this size, whatever their length.
const CHUNK: usize = 1 << 20;

pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
const ID_LEN: usize = 20;

#[derive(Debug, thiserror::Error)]
#[error("cannot open the disk image {path}: {source}")]
pub struct BlockError {
    pub path: String,
    pub source: std::io::Error,
}

pub struct Block {
    disk: Arc<File>,
    read_only: bool,
    /// Capacity in sectors; a trailing partial sector is not exposed.
    sectors: u64,
    id: [u8; ID_LEN],
    config: [u8; 8],
    /// The running request loop (declared before the thread: dropped first).
    worker: Option<Running>,
    thread: DeviceThread,
}

impl Block {
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let err = |source| BlockError {
            path: path.display().to_string(),
            source,
        };
        let disk = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let size = disk.metadata().map_err(err)?.len();
        let sectors = size / SECTOR;
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (slot, b) in id.iter_mut().zip(name.bytes()) {
            *slot = b;
        }
        Ok(Self {
            disk: Arc::new(disk),
            read_only,
            sectors,
            id,
            config: sectors.to_le_bytes(),
            worker: None,
            thread: DeviceThread::spawn("virtio-blk").map_err(err)?,
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
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
        let [(queue, kick)] = expect_queues(queues)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        let mut disk = Disk {
            file: self.disk.clone(),
            read_only: self.read_only,
            sectors: self.sectors,
            id: self.id,
        };
        self.worker = Some(self.thread.start(stop, move || {
            let mut queue = queue;
            let mut events = [EpollEvent::default(); 2];
            'serve: loop {
                // Requests queued before DRIVER_OK are served at once.
                if disk.process(&mem, &mut queue) {
                    interrupt.signal_used();
                }
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio-blk: epoll: {e}");
                        break;
                    }
                };
                for event in &events[..n] {
                    if event.data() == 0 {
                        break 'serve;
                    }
                    let _ = kick.read();
                }
            }
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

/// What the worker needs of the device.
struct Disk {
    file: Arc<File>,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_LEN],
}

impl Disk {
    /// Serves every available request; returns whether any completed.
    fn process(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match (chain.clone().reader(mem), chain.writer(mem)) {
                (Ok(mut reader), Ok(mut writer)) => self.request(&mut reader, &mut writer),
                _ => {
                    tracing::warn!("virtio-blk: a request chain outside guest memory: dropped");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("virtio-blk: returning a request: {e:?}");
            }
            used = true;
        }
        used
    }

    /// One request: its header from the readable part, data in either direction, and
    /// the status byte as the last writable byte. Returns the bytes written to the guest.
    fn request(
        &mut self,
        reader: &mut virtio_queue::Reader<'_, ()>,
        writer: &mut virtio_queue::Writer<'_, ()>,
    ) -> u32 {
        let writable = writer.available_bytes();
        if writable == 0 {
            tracing::warn!("virtio-blk: a request with no status byte: dropped");
            return 0;
        }
        // The status is the chain's last writable byte; data goes before it.
        let Ok(mut status_writer) = writer.split_at(writable - 1) else {
            return 0;
        };
        let (status, data_len) = self.execute(reader, writer);
        if status_writer.write_all(&[status]).is_err() {
            return 0;
        }
        (data_len + 1) as u32
    }

    fn execute(
        &mut self,
        reader: &mut virtio_queue::Reader<'_, ()>,
        writer: &mut virtio_queue::Writer<'_, ()>,
    ) -> (u8, usize) {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        match kind {
            T_IN => {
                let len = writer.available_bytes();
                let Some(offset) = self.check_range(sector, len) else {
                    return (S_IOERR, 0);
                };
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    if self
                        .file
                        .read_exact_at(&mut buf[..n], offset + done as u64)
                        .is_err()
                        || writer.write_all(&buf[..n]).is_err()
                    {
                        return (S_IOERR, done);
                    }
                    done += n;
                }
                (S_OK, len)
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                let len = reader.available_bytes();
                let Some(offset) = self.check_range(sector, len) else {
                    return (S_IOERR, 0);
                };
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    if reader.read_exact(&mut buf[..n]).is_err()
                        || self
                            .file
                            .write_all_at(&buf[..n], offset + done as u64)
                            .is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    done += n;
                }
                (S_OK, 0)
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_LEN);
                if writer.write_all(&self.id[..n]).is_err() {
                    return (S_IOERR, 0);
                }
                (S_OK, n)
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// The byte offset of a transfer of `len` bytes at `sector`, if it is whole sectors
    /// inside the disk.
    fn check_range(&self, sector: u64, len: usize) -> Option<u64> {
        if len as u64 % SECTOR != 0 {
            return None;
        }
        let end = sector.checked_add(len as u64 / SECTOR)?;
        (end <= self.sectors).then(|| sector * SECTOR)
    }
}

/// A disk for tests: its path removed on drop.
#[cfg(test)]
pub struct TempDisk(pub std::path::PathBuf);

#[cfg(test)]
impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests;
