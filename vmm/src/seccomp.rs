//! Seccomp filters, one per kind of thread, installed by each thread before the guest
//! runs: a vCPU thread may run KVM_RUN and touch eventfds; a device thread may serve its
//! sockets; the main thread may wait and tear down. Nothing may exec, open files, or
//! start threads once filtered (device threads are started before the guest runs).
//!
//! A syscall outside the filter raises SIGSYS; the handler names it on stderr and the
//! VMM exits with status 1.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Main,
    Vcpu,
    Device,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind:?} seccomp filter: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind:?} seccomp filter: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

/// Whether filters are installed (`--no-seccomp` turns them off, for debugging only).
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

pub fn disable() {
    ENABLED.store(false, std::sync::atomic::Ordering::Relaxed);
}

const KVM_RUN: u64 = 0xae80;
const FIONBIO: u64 = 0x5421;

/// Syscalls every thread needs: memory, locks, signals, its own exit, logging.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
];

fn plain(list: &[i64]) -> impl Iterator<Item = (i64, Vec<SeccompRule>)> + '_ {
    list.iter().map(|s| (*s, Vec::new()))
}

/// `syscall(arg_index == value)` only.
fn arg_eq(arg_index: u8, value: u64) -> Vec<SeccompRule> {
    let condition =
        SeccompCondition::new(arg_index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            .and_then(|c| SeccompRule::new(vec![c]));
    // Both constructors only reject an arg_index over 5.
    condition.map(|r| vec![r]).unwrap_or_default()
}

fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = plain(COMMON).collect();
    // malloc grows a thread's arena with mprotect(PROT_READ|PROT_WRITE); never PROT_EXEC.
    rules.insert(
        libc::SYS_mprotect,
        arg_eq(2, (libc::PROT_READ | libc::PROT_WRITE) as u64),
    );
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(libc::SYS_ioctl, arg_eq(1, KVM_RUN));
            // The benchmark hook's CPU time reading.
            rules.extend(plain(&[libc::SYS_getrusage]));
        }
        ThreadKind::Device => {
            rules.extend(plain(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_accept4,
                libc::SYS_connect,
                libc::SYS_shutdown,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_recvmsg,
                libc::SYS_sendmsg,
                libc::SYS_readv,
                // virtio-blk's positioned I/O and flush.
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_fdatasync,
            ]));
            // Unix sockets only (guest connections to host ports).
            rules.insert(libc::SYS_socket, arg_eq(0, libc::AF_UNIX as u64));
            // set_nonblocking().
            rules.insert(libc::SYS_ioctl, arg_eq(1, FIONBIO));
        }
        ThreadKind::Main => {
            rules.extend(plain(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_tgkill,
                libc::SYS_nanosleep,
                libc::SYS_clock_nanosleep,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_sendmsg,
                libc::SYS_recvmsg,
                libc::SYS_statx,
                libc::SYS_newfstatat,
            ]));
        }
    }
    rules
}

/// Makes every thread allocate from the main malloc arena. glibc grows and shrinks a
/// thread's own arena with calls no filter should allow (shrinking opens
/// /proc/sys/vm/overcommit_memory); the main arena grows with brk and mmap.
pub fn single_malloc_arena() {
    // SAFETY: mallopt only sets a malloc tunable; called before filtered threads start.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Compiles the filter for `kind` (exposed for tests).
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules(kind),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build { kind, source })?;
    BpfProgram::try_from(filter).map_err(|source| SeccompError::Build { kind, source })
}

/// Installs the filter for `kind` on the calling thread (unless disabled).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !ENABLED.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    let program = program(kind)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { kind, source })
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // For SIGSYS, siginfo's union holds { void *call_addr; int syscall; unsigned arch; }
    // right after the three leading ints and their padding: the syscall is at byte 24.
    // SAFETY: the kernel passes a valid siginfo_t for the signal being handled, and it is
    // larger than 28 bytes.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut msg =
        *b"hull-vmm: seccomp blocked syscall 000 (a bug: report it; --no-seccomp to debug)\n";
    let digits = [(nr / 100) % 10, (nr / 10) % 10, nr % 10];
    for (slot, d) in msg[34..37].iter_mut().zip(digits) {
        *slot = b'0' + d.unsigned_abs() as u8;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), msg.len());
        libc::_exit(1);
    }
}

/// Makes a blocked syscall fail loudly instead of killing the process silently.
pub fn install_sigsys_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Device] {
            assert!(!program(kind).unwrap().is_empty());
        }
    }

    #[test]
    fn a_filtered_thread_cannot_open_files() {
        install_sigsys_handler().unwrap();
        // A child process: the SIGSYS handler exits it with 1 and names the syscall.
        // SAFETY: fork in a test; the child only installs a filter and calls open.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let _ = install(ThreadKind::Device);
            let _ = std::fs::File::open("/etc/hostname");
            // SAFETY: leaving the forked child without running the test harness.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 1, "open was not blocked");
    }
}
