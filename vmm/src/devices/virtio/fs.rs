//! virtio-fs as a vhost-user frontend: the queues are served by virtiofsd, which maps
//! guest memory through the memfd we pass it; the VMM only sets the device up, hands over
//! the kick eventfds (KVM ioeventfds, so a kick never reaches us) and turns virtiofsd's
//! call eventfds into virtio-mmio interrupts.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{expect_queues, ActivateError, Interrupt, VirtioDevice, DEVICE_ID_FS};
use crate::devices::thread::{DeviceThread, Running};
use crate::memory::GuestMemory;

/// Longest tag (virtio-fs config space holds 36 bytes, NUL-padded).
pub const MAX_TAG: usize = 36;
/// One high-priority queue and one request queue.
const QUEUE_SIZES: [u16; 2] = [1024, 1024];
/// Virtio feature bits passed through from the backend to the guest: indirect
/// descriptors and event index (the rest is the transport's, or not ours to offer).
const PASSED_FEATURES: u64 = (1 << 28) | (1 << 29);

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("tag {0:?} must be 1 to {MAX_TAG} bytes")]
    Tag(String),
    #[error("cannot connect to the vhost-user backend at {path} (is virtiofsd running there?): {source}")]
    Connect { path: String, source: vhost::Error },
    #[error("vhost-user backend at {path}: {source}")]
    Backend { path: String, source: vhost::Error },
}

pub struct VhostUserFs {
    socket: PathBuf,
    frontend: Frontend,
    config: Vec<u8>,
    backend_features: u64,
    protocol_features: bool,
    /// While active: the interrupt relay (declared before the thread: dropped first).
    relay: Option<Running>,
    /// Talks to the backend and relays its interrupts, off the vCPU threads.
    thread: DeviceThread,
    on_gone: Arc<dyn Fn() + Send + Sync>,
}

/// How long one vhost-user exchange may take.
const BACKEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn set_socket_timeouts(fd: std::os::fd::RawFd, limit: std::time::Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt reads a timeval of the size we pass.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl VhostUserFs {
    /// Connects to the backend now (so a missing virtiofsd fails the VM before it boots)
    /// and learns what it offers.
    /// `on_gone` runs (on the device thread) if the backend hangs up while the device is
    /// live: the guest's file system is gone, so the VM should end.
    pub fn new(
        tag: &str,
        socket: &Path,
        on_gone: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > MAX_TAG {
            return Err(FsError::Tag(tag.into()));
        }
        let backend = |source| FsError::Backend {
            path: socket.display().to_string(),
            source,
        };
        let mut frontend =
            Frontend::connect(socket, QUEUE_SIZES.len() as u64).map_err(|source| {
                FsError::Connect {
                    path: socket.display().to_string(),
                    source,
                }
            })?;
        // A backend that stops answering fails the call instead of hanging the VMM.
        set_socket_timeouts(frontend.as_raw_fd(), BACKEND_TIMEOUT)
            .map_err(|e| backend(vhost::Error::IOError(e)))?;
        frontend.set_owner().map_err(backend)?;
        let backend_features = frontend.get_features().map_err(backend)?;
        let protocol_features =
            backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol_features {
            let offered = frontend.get_protocol_features().map_err(backend)?;
            frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::MQ)
                .map_err(backend)?;
        }
        let mut config = vec![0u8; MAX_TAG + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[MAX_TAG..].copy_from_slice(&1u32.to_le_bytes()); // num_request_queues
        Ok(Self {
            socket: socket.to_owned(),
            frontend,
            config,
            backend_features,
            protocol_features,
            relay: None,
            thread: DeviceThread::spawn("virtio-fs")
                .map_err(|e| backend(vhost::Error::IOError(e)))?,
            on_gone: Arc::from(on_gone),
        })
    }
}

/// Hands guest memory and the vrings to the backend (on the device thread).
fn setup_backend(
    frontend: &mut Frontend,
    protocol_features: bool,
    features: u64,
    mem: &GuestMemory,
    queues: &[(Queue, EventFd)],
    calls: &[EventFd],
) -> Result<(), vhost::Error> {
    let protocol = if protocol_features {
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    } else {
        0
    };
    frontend.set_features(features | protocol)?;
    let regions = mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<Vec<_>, _>>()?;
    frontend.set_mem_table(&regions)?;
    let host = |addr: u64| -> Result<u64, vhost::Error> {
        mem.get_host_address(GuestAddress(addr))
            .map(|p| p as u64)
            .map_err(|_| vhost::Error::InvalidGuestMemory)
    };
    for (index, ((queue, kick), call)) in queues.iter().zip(calls).enumerate() {
        if !queue.ready() {
            continue; // the driver did not set this one up
        }
        frontend.set_vring_num(index, queue.size())?;
        frontend.set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table())?,
                used_ring_addr: host(queue.used_ring())?,
                avail_ring_addr: host(queue.avail_ring())?,
                log_addr: None,
            },
        )?;
        frontend.set_vring_base(index, 0)?;
        frontend.set_vring_call(index, call)?;
        frontend.set_vring_kick(index, kick)?;
        if protocol_features {
            frontend.set_vring_enable(index, true)?;
        }
    }
    Ok(())
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        DEVICE_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.backend_features & PASSED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data)
    }

    fn activate(
        &mut self,
        features: u64,
        mem: GuestMemory,
        queues: Vec<(Queue, EventFd)>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queues: [_; QUEUE_SIZES.len()] = expect_queues(queues)?;
        let calls = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()?;
        let mut frontend = self.frontend.clone();
        let protocol_features = self.protocol_features;
        let backend_calls = calls
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        self.thread.run(move || {
            setup_backend(
                &mut frontend,
                protocol_features,
                features,
                &mem,
                &queues,
                &backend_calls,
            )
        })??;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let epoll = Epoll::new()?;
        // Token 0: stop; 1: the backend hung up; 2..: call eventfds.
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            self.frontend.as_raw_fd(),
            EpollEvent::new(EventSet::HANG_UP | EventSet::READ_HANG_UP, 1),
        )?;
        for (i, call) in calls.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 2 + i as u64),
            )?;
        }
        let socket = self.socket.clone();
        let on_gone = self.on_gone.clone();
        self.relay = Some(self.thread.start(stop, move || {
            if !relay_calls(epoll, calls, interrupt, socket) {
                on_gone();
            }
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.relay = None;
        // GET_VRING_BASE stops each ring in the backend.
        let frontend = self.frontend.clone();
        let stopped = self.thread.run(move || {
            for index in 0..QUEUE_SIZES.len() {
                if let Err(e) = frontend.get_vring_base(index) {
                    tracing::warn!("virtio-fs: stopping ring {index} in the backend: {e}");
                }
            }
        });
        if let Err(e) = stopped {
            tracing::warn!("virtio-fs: {e}");
        }
    }
}

/// Turns the backend's "used ring moved" eventfds into our interrupt. A backend that
/// hangs up ends the relay (and, through `on_gone`, the VM).
/// Returns false when the backend hung up, true when told to stop.
fn relay_calls(
    epoll: Epoll,
    calls: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    socket: PathBuf,
) -> bool {
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio-fs: epoll: {e}");
                return false;
            }
        };
        for event in &events[..n] {
            match event.data() {
                0 => return true,
                1 => {
                    tracing::error!(
                        "virtio-fs: the backend at {} hung up; the file system is gone",
                        socket.display()
                    );
                    return false;
                }
                token => {
                    if let Some(call) = calls.get((token - 2) as usize) {
                        let _ = call.read();
                        interrupt.signal_used();
                    }
                }
            }
        }
    }
}
