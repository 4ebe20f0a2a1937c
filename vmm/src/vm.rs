//! Building a VM from its config and running it until the guest or a signal ends it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{boot, cpu, layout, mptable};
use crate::config::VmConfig;
use crate::devices::bus::{lock, Bus};
use crate::devices::legacy::{ResetPort, SerialPort};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::fs::{FsError, VhostUserFs};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::memory::{self, GuestMemory};
use crate::seccomp::{self, ThreadKind};
use crate::vcpu::{install_kick_handler, ExitLatch, ExitReason, VcpuContext, VcpuThread};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM refused to {what}: {source}")]
    KvmOp {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("writing the MP table: {0}")]
    MpTable(vm_memory::GuestMemoryError),
    #[error("cannot open the serial output {path}: {source}")]
    SerialOutput {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot create the vsock socket {path}: {source}")]
    Vsock {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::Overlap),
}

fn kvm_op(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmOp { what, source }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

type ConsolePort = SerialPort<Box<dyn Write + Send>>;

/// A VM, built and ready to run.
pub struct Vm {
    config: VmConfig,
    // Kept open for the VM's lifetime (the vCPU fds hold the VM, this documents it).
    _kvm: Kvm,
    _vm: VmFd,
    _memory: GuestMemory,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    ctx: VcpuContext,
    serial: Arc<Mutex<ConsolePort>>,
    reset: EventFd,
    signals: SignalFd,
}

/// Puts a virtio device on the MMIO bus at `base`: its interrupt an irqfd on `irq`, its
/// queue notifications KVM ioeventfds (so a kick costs no exit to the VMM).
fn add_virtio_device(
    vm: &VmFd,
    mem: &GuestMemory,
    mmio: &mut Bus,
    device: Box<dyn VirtioDevice>,
    base: u64,
    irq: u32,
) -> Result<(), VmError> {
    let irq_evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(io("creating a virtio interrupt"))?;
    vm.register_irqfd(&irq_evt, irq)
        .map_err(kvm_op("register a virtio interrupt"))?;
    let interrupt = Arc::new(Interrupt::new(irq_evt));
    let transport =
        MmioTransport::new(device, mem.clone(), interrupt).map_err(io("creating virtio queues"))?;
    for (index, event) in transport.queue_events().iter().enumerate() {
        vm.register_ioevent(
            event,
            &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
            index as u32,
        )
        .map_err(kvm_op("register a virtio queue notification"))?;
    }
    mmio.insert(
        Arc::new(Mutex::new(transport)),
        base,
        layout::VIRTIO_MMIO_SIZE,
    )?;
    Ok(())
}

/// Called right before the boot vCPU's first KVM_RUN (benchmarks hook in here).
pub type FirstRunHook = Box<dyn FnOnce() + Send>;

impl Vm {
    /// Creates the VM: memory, irqchip, devices, kernel, vCPUs. Nothing runs yet.
    ///
    /// SIGTERM and SIGINT are blocked in the calling thread (and so in the vCPU threads
    /// it will start) and read through a signalfd by [`Vm::run`].
    pub fn build(config: VmConfig) -> Result<Self, VmError> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGINT);
        mask.thread_block()
            .map_err(|e| io("blocking SIGTERM")(e.into()))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|e| io("creating a signalfd")(e.into()))?;
        install_kick_handler().map_err(io("installing the vCPU kick handler"))?;
        seccomp::single_malloc_arena();
        seccomp::install_sigsys_handler().map_err(io("installing the SIGSYS handler"))?;

        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm = kvm.create_vm().map_err(kvm_op("create a VM"))?;
        vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_op("set the TSS address"))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_op("set the identity map address"))?;
        vm.create_irq_chip()
            .map_err(kvm_op("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(kvm_op("create the in-kernel PIT"))?;

        let size = u64::from(config.memory_mib) << 20;
        let (mem, _file) = memory::create(size)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| io("mapping guest memory")(std::io::Error::other(e)))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`,
            // which the Vm keeps until after every vCPU has stopped.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_op("register guest memory"))?;
        }

        let exit = Arc::new(ExitLatch::new().map_err(io("creating the exit event"))?);
        let reset = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(io("creating the reset event"))?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(io("creating the serial interrupt"))?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(kvm_op("register the serial interrupt"))?;
        let serial = Arc::new(Mutex::new(SerialPort::new(
            serial_irq,
            serial_output(&config)?,
        )));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), 0x3f8, 8)?;
        pio.insert(
            Arc::new(Mutex::new(ResetPort::new(
                reset.try_clone().map_err(io("cloning the reset event"))?,
            ))),
            0x60,
            5,
        )?;
        let mut mmio = Bus::new();
        let mut cmdline = config.cmdline.clone();
        let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
        if let Some(vsock) = &config.vsock {
            let device = Vsock::new(vsock.cid, &vsock.uds).map_err(|source| VmError::Vsock {
                path: vsock.uds.display().to_string(),
                source,
            })?;
            virtio.push(Box::new(device));
        }
        for fs in &config.fs {
            let exit = exit.clone();
            let socket = fs.socket.display().to_string();
            let gone = move || {
                exit.set(ExitReason::Error(format!(
                    "the virtio-fs backend at {socket} hung up: the guest lost its file system"
                )))
            };
            virtio.push(Box::new(VhostUserFs::new(
                &fs.tag,
                &fs.socket,
                Box::new(gone),
            )?));
        }
        for disk in &config.block {
            virtio.push(Box::new(Block::new(&disk.path, disk.read_only)?));
        }
        for net in &config.net {
            // Validated with the config.
            let mac = crate::devices::virtio::net::parse_mac(&net.mac).unwrap_or_default();
            virtio.push(Box::new(Net::new(&net.tap, net.netns.as_ref(), mac)?));
        }
        for (i, device) in virtio.into_iter().enumerate() {
            let base = layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE;
            let irq = layout::VIRTIO_IRQ_BASE + i as u32;
            add_virtio_device(&vm, &mem, &mut mmio, device, base, irq)?;
            cmdline.push_str(&format!(
                " virtio_mmio.device={}K@{base:#x}:{irq}",
                layout::VIRTIO_MMIO_SIZE >> 10
            ));
        }

        let info = boot::load(&mem, &config.kernel, config.initramfs.as_deref(), &cmdline)?;
        mptable::write(&mem, config.vcpus).map_err(VmError::MpTable)?;
        cpu::write_boot_tables(&mem)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_op("report its supported CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        for index in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_op("create a vCPU"))?;
            cpu::setup_vcpu(&vcpu, &supported, index, config.vcpus)?;
            if index == 0 {
                cpu::setup_boot_vcpu(&vcpu, info.entry)?;
            }
            vcpus.push(vcpu);
        }

        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            stop: Arc::new(AtomicBool::new(false)),
            exit,
        };
        Ok(Self {
            config,
            _kvm: kvm,
            _vm: vm,
            _memory: mem,
            vcpus,
            ctx,
            serial,
            reset,
            signals,
        })
    }

    /// Runs the guest until it resets, crashes, or the VMM gets SIGTERM/SIGINT; stops
    /// every vCPU thread before returning.
    pub fn run(mut self, mut first_run: Option<FirstRunHook>) -> Result<ExitReason, VmError> {
        let epoll = Epoll::new().map_err(io("creating an epoll"))?;
        const EXIT: u64 = 0;
        const RESET: u64 = 1;
        const SIGNAL: u64 = 2;
        const STDIN: u64 = 3;
        let watch = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        watch(self.ctx.exit.event().as_raw_fd(), EXIT).map_err(io("watching the exit event"))?;
        watch(self.reset.as_raw_fd(), RESET).map_err(io("watching the reset event"))?;
        watch(self.signals.as_raw_fd(), SIGNAL).map_err(io("watching signals"))?;
        if self.config.serial.stdin {
            // A regular file or /dev/null cannot be watched (EPERM): no console input then.
            if let Err(e) = watch(libc::STDIN_FILENO, STDIN) {
                tracing::warn!("serial input from stdin: {e}; the console takes no input");
            }
        }

        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, vcpu) in self.vcpus.drain(..).enumerate() {
            let hook = if index == 0 { first_run.take() } else { None };
            match VcpuThread::spawn(index as u8, vcpu, self.ctx.clone(), hook) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.ctx.exit.set(ExitReason::Error(format!(
                        "starting vCPU thread {index}: {e}"
                    )));
                    break;
                }
            }
        }

        // Every thread is started: from here the main thread only waits and tears down.
        if let Err(e) = seccomp::install(ThreadKind::Main) {
            self.ctx.exit.set(ExitReason::Error(e.to_string()));
        }
        let mut events = vec![EpollEvent::default(); 8];
        let reason = 'outer: loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break ExitReason::Error(format!("waiting for events: {e}")),
            };
            for event in &events[..n] {
                match event.data() {
                    EXIT => {
                        if let Some(reason) = self.ctx.exit.take() {
                            break 'outer reason;
                        }
                        let _ = self.ctx.exit.event().read();
                    }
                    RESET => {
                        let _ = self.reset.read();
                        break 'outer ExitReason::Reset;
                    }
                    SIGNAL => {
                        if let Ok(Some(info)) = self.signals.read_signal() {
                            break 'outer ExitReason::Signal(info.ssi_signo as i32);
                        }
                    }
                    STDIN => {
                        let mut buf = [0u8; 64];
                        // SAFETY: reading into a local buffer of its own length.
                        let n = unsafe {
                            libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len())
                        };
                        let interrupted = n < 0
                            && std::io::Error::last_os_error().kind()
                                == std::io::ErrorKind::Interrupted;
                        if interrupted {
                            continue;
                        }
                        if n <= 0 {
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                libc::STDIN_FILENO,
                                EpollEvent::default(),
                            );
                        } else {
                            lock(&self.serial).enqueue_input(&buf[..n as usize]);
                        }
                    }
                    _ => {}
                }
            }
        };
        self.ctx.stop.store(true, Ordering::Release);
        for t in threads {
            t.stop_and_join();
        }
        lock(&self.serial).flush();
        Ok(reason)
    }
}

fn serial_output(config: &VmConfig) -> Result<Box<dyn Write + Send>, VmError> {
    match &config.serial.output {
        None => Ok(Box::new(std::io::sink())),
        Some(p) if p.as_os_str() == "-" => Ok(Box::new(std::io::stdout())),
        Some(p) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmError::SerialOutput {
                    path: p.display().to_string(),
                    source,
                })?;
            Ok(Box::new(file))
        }
    }
}
