//! Device threads: started while the VM is built (before seccomp filters forbid starting
//! threads), they run what a device hands them when the driver activates it (its event
//! loop, or a vhost-user exchange) off the vCPU threads.

use std::sync::mpsc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, ThreadKind};

type Job = Box<dyn FnOnce() + Send>;

pub struct DeviceThread {
    jobs: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl DeviceThread {
    pub fn spawn(name: &str) -> std::io::Result<Self> {
        // A syscall the filter lacks then names itself instead of killing silently.
        seccomp::install_sigsys_handler()?;
        seccomp::single_malloc_arena();
        let (jobs, queue) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(e) = seccomp::install(ThreadKind::Device) {
                    tracing::error!("{e}");
                    return;
                }
                for job in queue {
                    job();
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            handle: Some(handle),
        })
    }

    /// Queues `job` on the thread.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(Box::new(job)).ok())
            .ok_or_else(|| std::io::Error::other("the device thread is gone"))
    }

    /// Starts a long-running job (a device's event loop) that returns once `stop`, which
    /// it must watch, becomes readable. Dropping the handle stops it and waits.
    pub fn start(
        &self,
        stop: EventFd,
        job: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Running> {
        let (ended, has_ended) = mpsc::channel();
        self.submit(move || {
            job();
            let _ = ended.send(());
        })?;
        Ok(Running {
            stop,
            ended: has_ended,
        })
    }

    /// Runs `job` on the thread and waits for its result.
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let (tx, rx) = mpsc::channel();
        self.submit(move || {
            let _ = tx.send(job());
        })?;
        rx.recv()
            .map_err(|_| std::io::Error::other("the device thread ended before answering"))
    }
}

/// A job [`DeviceThread::start`]ed: dropping it tells the job to stop and waits until it
/// has (a device's handle must be dropped before its thread).
pub struct Running {
    stop: EventFd,
    ended: mpsc::Receiver<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        let _ = self.ended.recv();
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("a device thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_in_order_and_returns_results() {
        let t = DeviceThread::spawn("test-device").unwrap();
        let (tx, rx) = mpsc::channel();
        t.submit(move || tx.send(1).unwrap()).unwrap();
        assert_eq!(t.run(|| 2 + 2).unwrap(), 4);
        assert_eq!(rx.recv().unwrap(), 1);
        assert_eq!(
            t.run(|| std::thread::current().name().map(String::from))
                .unwrap()
                .as_deref(),
            Some("test-device")
        );
    }
}
