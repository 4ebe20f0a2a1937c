//! PID 1 duty: reap every child, and keep the exit of the ones the agent started.
//!
//! SIGCHLD is blocked in every thread (the mask is set before any thread exists, and
//! threads inherit it); one thread waits for it and reaps with `waitpid(-1)`. Processes the
//! agent started are registered *while holding the table lock across their creation*, so
//! an exit is never reaped before its pid is known. Orphans reparented to PID 1 are reaped
//! and dropped.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Default)]
struct Table {
    /// Tracked pids: `None` while running, `Some` once reaped.
    procs: HashMap<i32, Option<Exit>>,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);
static EXITED: Condvar = Condvar::new();

/// Blocks SIGCHLD in the calling thread; call before any thread is spawned.
pub fn block_sigchld() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
}

/// Starts the reaping thread.
pub fn start() -> std::io::Result<()> {
    *lock() = Some(Table::default());
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(reap_forever)
        .map(|_| ())
}

fn lock() -> std::sync::MutexGuard<'static, Option<Table>> {
    // A panic elsewhere must not stop PID 1 from reaping: take the table even if poisoned.
    TABLE.lock().unwrap_or_else(|p| p.into_inner())
}

fn reap_forever() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    let timeout = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    loop {
        // The timeout is a safety net only: a SIGCHLD that merged with another still
        // leaves its child to the waitpid loop below.
        // SAFETY: `set` and `timeout` are valid for the call; a null siginfo is allowed.
        unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => record(pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    record(pid.as_raw(), Exit::Signal(sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

fn record(pid: i32, exit: Exit) {
    let mut guard = lock();
    if let Some(table) = guard.as_mut() {
        if let Some(slot) = table.procs.get_mut(&pid) {
            *slot = Some(exit);
            EXITED.notify_all();
        }
    }
}

/// Runs `spawn` (which creates a child and returns its pid) with the table locked, and
/// tracks the new pid.
pub fn spawn_tracked<E>(spawn: impl FnOnce() -> Result<i32, E>) -> Result<i32, E> {
    let mut guard = lock();
    let pid = spawn()?;
    if let Some(table) = guard.as_mut() {
        table.procs.insert(pid, None);
    }
    Ok(pid)
}

/// Tracks `pid`, a child that cannot exit before it is told to (an exec'd process).
pub fn track(pid: i32) {
    if let Some(table) = lock().as_mut() {
        table.procs.entry(pid).or_insert(None);
    }
}

/// Waits until tracked `pid` has exited. `None`: not tracked.
pub fn wait(pid: i32) -> Option<Exit> {
    let mut guard = lock();
    loop {
        match guard.as_ref()?.procs.get(&pid)? {
            Some(exit) => return Some(*exit),
            None => {
                guard = EXITED
                    .wait_timeout(guard, Duration::from_secs(5))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        }
    }
}

/// The exit of tracked `pid` if it has exited.
pub fn try_exit(pid: i32) -> Option<Exit> {
    lock().as_ref()?.procs.get(&pid).copied().flatten()
}

/// Signals tracked `pid` if it has not exited; under the table's lock, so the pid cannot
/// have been reaped and reused meanwhile. Returns whether it was signalled.
pub fn kill_if_running(pid: i32, sig: Signal) -> bool {
    let guard = lock();
    let running = matches!(guard.as_ref().and_then(|t| t.procs.get(&pid)), Some(None));
    running && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok()
}

/// Stops tracking `pid`.
pub fn forget(pid: i32) {
    if let Some(table) = lock().as_mut() {
        table.procs.remove(&pid);
    }
}
