//! vCPU threads: run KVM_RUN, hand port and MMIO exits to the buses, report how the guest
//! ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::Bus;

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (Linux `reboot`, `poweroff` with
    /// `reboot=k`, a panic with `panic=N`).
    Reset,
    /// The guest powered off or halted its last vCPU.
    Poweroff,
    /// The guest crashed: a triple fault, a failed VM entry, an emulation failure.
    Crash(String),
    /// The VMM stopped on a signal (SIGTERM, SIGINT).
    Signal(i32),
    /// The VMM failed while running the guest.
    Error(String),
}

impl ExitReason {
    /// The VMM's exit status for this ending (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::Poweroff => 0,
            ExitReason::Error(_) => 1,
            ExitReason::Crash(_) => 3,
            ExitReason::Signal(_) => 4,
        }
    }
}

/// The first reason to end the VM wins; it also wakes the main thread.
pub struct ExitLatch {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

impl ExitLatch {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    pub fn set(&self, reason: ExitReason) {
        let mut slot = crate::devices::bus::lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
        }
        let _ = self.event.write(1);
    }

    pub fn take(&self) -> Option<ExitReason> {
        crate::devices::bus::lock(&self.reason).take()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop: Arc<AtomicBool>,
    pub exit: Arc<ExitLatch>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for the signal that knocks vCPU threads out of KVM_RUN.
/// Without it that signal would kill the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Starts vCPU `index`; `on_first_run` is called once, right before its first KVM_RUN.
    pub fn spawn(
        index: u8,
        vcpu: VcpuFd,
        ctx: VcpuContext,
        on_first_run: Option<Box<dyn FnOnce() + Send>>,
    ) -> std::io::Result<Self> {
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run(index, vcpu, ctx, on_first_run))?;
        Ok(Self { handle })
    }

    /// Knocks the thread out of KVM_RUN until it sees `stop` (set by the caller) and
    /// ends. A kick can land just before KVM_RUN is entered, so it is repeated.
    pub fn stop_and_join(self) {
        for _ in 0..2000 {
            if self.handle.is_finished() {
                break;
            }
            if self.handle.kill(SIGRTMIN()).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if !self.handle.is_finished() {
            // Stuck outside KVM_RUN (a device call that never returns): leave it; the
            // process exit ends it.
            tracing::error!("a vCPU thread did not stop within 2 s; not waiting for it");
            return;
        }
        if self.handle.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

fn run(
    index: u8,
    mut vcpu: VcpuFd,
    ctx: VcpuContext,
    mut on_first_run: Option<Box<dyn FnOnce() + Send>>,
) {
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
        ctx.exit.set(ExitReason::Error(e.to_string()));
        return;
    }
    while !ctx.stop.load(Ordering::Acquire) {
        if let Some(first) = on_first_run.take() {
            first();
        }
        let ending = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    tracing::debug!("vcpu{index}: MMIO read of {addr:#x}: no device");
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    tracing::debug!("vcpu{index}: MMIO write to {addr:#x}: no device");
                }
                None
            }
            Ok(VcpuExit::Hlt) => Some(ExitReason::Poweroff),
            Ok(VcpuExit::Shutdown) => Some(ExitReason::Crash(format!(
                "vCPU {index} triple-faulted (KVM_EXIT_SHUTDOWN)"
            ))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Crash(format!(
                "VM entry failed on vCPU {index} (hardware reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => Some(ExitReason::Crash(format!(
                "KVM internal error on vCPU {index} (instruction emulation failed)"
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                    ExitReason::Crash(format!("vCPU {index}: the guest reported a crash"))
                }
                _ => ExitReason::Poweroff,
            }),
            Ok(other) => Some(ExitReason::Crash(format!(
                "vCPU {index}: unexpected KVM exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(ExitReason::Error(format!("KVM_RUN on vCPU {index}: {e}"))),
        };
        if let Some(reason) = ending {
            tracing::debug!("vcpu{index}: {reason:?}");
            ctx.exit.set(reason);
            break;
        }
    }
}
