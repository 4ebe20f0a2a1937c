//! The monitor: the host process whose pid engines get from `--pid-file`. It stands for
//! a process in the guest (the container's init, or an exec'd one): it holds the stdio the
//! engine gave (pipes, or a pty whose master went to `--console-socket`), relays it over
//! vsock, forwards signals sent to it, and exits as the guest process did (the same code,
//! or killed by the same signal), so conmon and containerd's shim, which reap it as
//! subreapers, see what runc would have given them. The init's monitor also owns the VM:
//! its helpers die with it.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hull_protocol::agent::Stdio;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::agent_client::{AgentClient, ProcessExit};
use crate::cli::stdio::{self, RawMode};
use crate::vsock::HybridVsock;

/// Where a process's terminal goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Console {
    /// No terminal: stdin/stdout/stderr are relayed to ours.
    Pipes,
    /// A new pty whose master is sent to this socket (runc's --console-socket).
    Socket(PathBuf),
    /// Our own terminal (a foreground `run` or `exec -t`).
    Inherit,
}

/// Signals a monitor passes on to its guest process.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

pub fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set
}

/// Blocks the forwarded signals in this thread (do it before any thread starts).
pub fn block_signals() -> Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&forwarded_set()), None)
        .context("blocking signals")
}

enum Role {
    In,
    Out,
    Err,
    Tty,
}

/// Host vsock listeners for one process's stdio.
pub struct Listeners {
    pub stdio: Stdio,
    /// Whether our stdin goes to the process (else it gets /dev/null, or for a terminal
    /// no input).
    stdin: bool,
    listeners: Vec<(Role, UnixListener)>,
    paths: Vec<PathBuf>,
}

/// Listens on free host ports from `first` on (a port in use by another process of the
/// same sandbox is skipped: bind fails on its socket file).
pub fn listen(vsock: &HybridVsock, first: u32, terminal: bool, stdin: bool) -> Result<Listeners> {
    let roles = match (terminal, stdin) {
        (true, _) => vec![Role::Tty],
        (false, true) => vec![Role::In, Role::Out, Role::Err],
        (false, false) => vec![Role::Out, Role::Err],
    };
    let mut l = Listeners {
        stdio: Stdio {
            terminal,
            ..Default::default()
        },
        stdin,
        listeners: Vec::new(),
        paths: Vec::new(),
    };
    let mut port = first;
    for role in roles {
        let listener = loop {
            if port > first + 4096 {
                bail!("no free vsock port for stdio near {first}");
            }
            let path = vsock.port_path(port);
            match UnixListener::bind(&path) {
                Ok(s) => {
                    l.paths.push(path);
                    break s;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => port += 1,
                Err(e) => {
                    return Err(e).with_context(|| format!("listening on {}", path.display()))
                }
            }
        };
        match role {
            Role::In => l.stdio.stdin_port = port,
            Role::Out | Role::Tty => l.stdio.stdout_port = port,
            Role::Err => l.stdio.stderr_port = port,
        }
        l.listeners.push((role, listener));
        port += 1;
    }
    Ok(l)
}

/// The accepted stdio streams of one process, for a relay other than this process's own
/// stdio (the containerd shim's FIFOs).
#[derive(Default)]
pub struct Streams {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<UnixStream>,
    pub stderr: Option<UnixStream>,
    pub tty: Option<UnixStream>,
}

impl Listeners {
    /// Accepts the agent's stdio connections (it made them during create/exec). The
    /// listening sockets stay until `self` is dropped.
    pub fn accept(&mut self) -> Result<Streams> {
        let mut s = Streams::default();
        for (role, listener) in std::mem::take(&mut self.listeners) {
            let stream = stdio::accept(&listener).context("accepting a stdio stream")?;
            match role {
                Role::In => s.stdin = Some(stream),
                Role::Out => s.stdout = Some(stream),
                Role::Err => s.stderr = Some(stream),
                Role::Tty => s.tty = Some(stream),
            }
        }
        Ok(s)
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The relays of one process's stdio.
pub struct Io {
    done: Receiver<()>,
    outputs: usize,
    /// Where the window size is read from on SIGWINCH.
    size_fd: Option<RawFd>,
    _slave: Option<OwnedFd>,
    _raw: Option<RawMode>,
    _listeners: Listeners,
}

fn dup_file(fd: RawFd) -> Result<std::fs::File> {
    let new = nix::unistd::dup(fd).context("dup")?;
    // SAFETY: dup just returned this descriptor; the File owns it from here.
    Ok(unsafe { std::fs::File::from_raw_fd(new) })
}

/// Points fds 0-2 at /dev/null.
fn release_stdio() -> Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    for fd in 0..3 {
        nix::unistd::dup2(null.as_raw_fd(), fd).context("redirecting stdio to /dev/null")?;
    }
    Ok(())
}

/// Sends `master` to the engine's console socket, as runc does (the message is the pty's
/// name, the descriptor rides along as SCM_RIGHTS).
fn send_console(socket: &Path, master: RawFd, name: &str) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to console socket {}", socket.display()))?;
    let fds = [master];
    sendmsg::<()>(
        s.as_raw_fd(),
        &[std::io::IoSlice::new(name.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map(|_| ())
    .with_context(|| format!("sending the pty to {}", socket.display()))?;
    Ok(())
}

impl Io {
    /// Accepts the agent's stdio connections (it made them during create/exec) and starts
    /// relaying.
    pub fn connect(mut l: Listeners, console: &Console) -> Result<Io> {
        let (tx, done) = channel();
        let mut outputs = 0;
        let mut size_fd = None;
        let mut slave_keep = None;
        let mut raw = None;
        let listeners = std::mem::take(&mut l.listeners);
        let mut pump =
            |from: Box<dyn Read + Send>, to: Box<dyn std::io::Write + Send>, name, output| {
                let tx = tx.clone();
                let h = stdio::pump(from, to, name);
                if output {
                    outputs += 1;
                    std::thread::spawn(move || {
                        let _ = h.join();
                        let _ = tx.send(());
                    });
                }
            };
        for (role, listener) in listeners {
            let stream = stdio::accept(&listener).context("accepting a stdio stream")?;
            match role {
                Role::Out => pump(
                    Box::new(stream),
                    Box::new(std::io::stdout()),
                    "stdout",
                    true,
                ),
                Role::Err => pump(
                    Box::new(stream),
                    Box::new(std::io::stderr()),
                    "stderr",
                    true,
                ),
                // EOF of our stdin closes the stream: the guest process sees EOF.
                Role::In => pump(Box::new(std::io::stdin()), Box::new(stream), "stdin", false),
                Role::Tty => match console {
                    Console::Socket(path) => {
                        let pty = nix::pty::openpty(None, None).context("opening a pty")?;
                        // SAFETY: openpty returned these descriptors and nothing else owns them.
                        let (master, slave) = unsafe {
                            (
                                OwnedFd::from_raw_fd(pty.master),
                                OwnedFd::from_raw_fd(pty.slave),
                            )
                        };
                        // The guest's pty does the line discipline; ours passes bytes.
                        if let Ok(mut t) = nix::sys::termios::tcgetattr(slave.as_raw_fd()) {
                            nix::sys::termios::cfmakeraw(&mut t);
                            let _ = nix::sys::termios::tcsetattr(
                                slave.as_raw_fd(),
                                nix::sys::termios::SetArg::TCSANOW,
                                &t,
                            );
                        }
                        let name =
                            std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))
                                .map(|p| p.display().to_string())
                                .unwrap_or_default();
                        send_console(path, master.as_raw_fd(), &name)?;
                        drop(master);
                        // The terminal is the process's stdio now. Like runc's init, let go
                        // of the caller's: engines read those pipes until EOF.
                        release_stdio()?;
                        // As the session leader, the pty's size changes reach us as SIGWINCH.
                        // SAFETY: TIOCSCTTY takes an int argument; the fd is ours.
                        unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
                        let to_guest = stream.try_clone().context("cloning the tty stream")?;
                        pump(
                            Box::new(dup_file(slave.as_raw_fd())?),
                            Box::new(to_guest),
                            "tty-in",
                            false,
                        );
                        pump(
                            Box::new(stream),
                            Box::new(dup_file(slave.as_raw_fd())?),
                            "tty-out",
                            true,
                        );
                        size_fd = Some(slave.as_raw_fd());
                        slave_keep = Some(slave);
                    }
                    Console::Inherit | Console::Pipes => {
                        let on_tty = nix::unistd::isatty(0).unwrap_or(false);
                        if l.stdin {
                            let to_guest = stream.try_clone().context("cloning the tty stream")?;
                            pump(
                                Box::new(std::io::stdin()),
                                Box::new(to_guest),
                                "tty-in",
                                false,
                            );
                            if on_tty {
                                raw = Some(RawMode::enter());
                            }
                        }
                        pump(
                            Box::new(stream),
                            Box::new(std::io::stdout()),
                            "tty-out",
                            true,
                        );
                        if on_tty {
                            size_fd = Some(0);
                        }
                    }
                },
            }
        }
        Ok(Io {
            done,
            outputs,
            size_fd,
            _slave: slave_keep,
            _raw: raw,
            _listeners: l,
        })
    }

    /// The terminal size to give the guest, if there is a terminal.
    pub fn size(&self) -> Option<(u16, u16)> {
        winsize(self.size_fd?)
    }

    /// Where SIGWINCH should read the size from.
    pub fn size_fd(&self) -> Option<RawFd> {
        self.size_fd
    }

    /// Waits (at most `timeout`) until the guest has closed every output stream.
    pub fn drain(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        for _ in 0..self.outputs {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if self.done.recv_timeout(left).is_err() {
                tracing::warn!("the guest kept an output stream open; not waiting longer");
                return;
            }
        }
    }
}

/// Passes signals sent to this process on to the guest process; SIGWINCH resizes its
/// terminal. The signals must be blocked in every thread (`block_signals`).
pub fn forward_signals(agent: AgentClient, cid: String, exec_id: String, size_fd: Option<RawFd>) {
    let set = forwarded_set();
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else { continue };
            if sig == Signal::SIGWINCH {
                if let Some((rows, cols)) = size_fd.and_then(winsize) {
                    let _ = agent.resize_pty(&cid, &exec_id, rows, cols);
                }
                continue;
            }
            if let Err(e) = agent.signal(&cid, &exec_id, sig as i32) {
                tracing::warn!("forwarding {sig}: {e}");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot forward signals: {e}");
    }
}

/// The size of the terminal a monitor relays (its pty, found among its descriptors), if it
/// relays one and the engine has sized it. Lets `start` hand the size to the guest before
/// the process runs, as runc's shared pty would have it, instead of racing SIGWINCH.
pub fn terminal_size_of(monitor: i32) -> Option<(u16, u16)> {
    let fds = std::fs::read_dir(format!("/proc/{monitor}/fd")).ok()?;
    let pty = fds.flatten().find_map(|e| {
        let target = std::fs::read_link(e.path()).ok()?;
        target.starts_with("/dev/pts/").then_some(target)
    })?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY)
        .open(pty)
        .ok()?;
    winsize(f.as_raw_fd())
}

fn winsize(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into memory we own.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Waits for the guest process to end. `alive` is polled meanwhile: when it says the VM
/// (or whatever the process depends on) is gone, the process counts as SIGKILLed.
pub fn wait_exit(
    agent: &AgentClient,
    cid: &str,
    exec_id: &str,
    mut alive: impl FnMut() -> bool,
) -> ProcessExit {
    let (tx, rx) = channel();
    {
        let (agent, cid, exec_id) = (agent.clone(), cid.to_string(), exec_id.to_string());
        std::thread::spawn(move || {
            let _ = tx.send(agent.wait(&cid, &exec_id));
        });
    }
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(exit)) => return exit,
            Ok(Err(e)) => {
                tracing::warn!("waiting for the container process: {e}");
                return ProcessExit::Signal(Signal::SIGKILL as u32);
            }
            Err(RecvTimeoutError::Disconnected) => {
                return ProcessExit::Signal(Signal::SIGKILL as u32)
            }
            Err(RecvTimeoutError::Timeout) => {
                if !alive() {
                    tracing::warn!("the VM is gone: the container process counts as killed");
                    return ProcessExit::Signal(Signal::SIGKILL as u32);
                }
            }
        }
    }
}

/// Ends this process as the guest process ended: the same exit code, or death by the same
/// signal (without a core dump).
pub fn exit_like(exit: ProcessExit) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if let ProcessExit::Signal(s @ 1..=64) = exit {
        let sig = s as libc::c_int;
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
        // SAFETY: plain libc calls on a signal number (real-time ones included, which nix's
        // Signal cannot name): default disposition, unblock it, raise it. No memory of ours
        // is touched.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::process::exit(exit_status(exit))
}

fn exit_status(exit: ProcessExit) -> i32 {
    exit.shell_status().clamp(0, 255)
}

/// The write end of the pipe a forked monitor reports on.
pub struct Reporter(OwnedFd);

impl Reporter {
    pub fn ok(self) {
        let _ = nix::unistd::write(self.0.as_raw_fd(), b"ok");
    }

    pub fn fail(self, e: &anyhow::Error) {
        let _ = nix::unistd::write(self.0.as_raw_fd(), format!("{e:#}").as_bytes());
    }
}

/// Forks a monitor in its own session. The child runs `child` (which reports through the
/// `Reporter` once the guest process exists, then keeps serving) and exits with what it
/// returns. The parent gets the child's pid once it reported success, or its error.
pub fn fork_monitor(child: impl FnOnce(Reporter) -> i32) -> Result<i32> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    // SAFETY: pipe2 just returned these descriptors and nothing else owns them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(r), OwnedFd::from_raw_fd(w)) };
    // SAFETY: `hull` has started no threads yet (the commands fork before anything else
    // runs), so the child is a faithful copy and may allocate.
    match unsafe { nix::unistd::fork() }.context("forking the monitor")? {
        nix::unistd::ForkResult::Child => {
            drop(r);
            let _ = nix::unistd::setsid();
            // A panic must not unwind into the parent's frames (and their destructors).
            let code =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child(Reporter(w))))
                    .unwrap_or(101);
            std::process::exit(code)
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut msg = Vec::new();
            let _ = std::fs::File::from(r).read_to_end(&mut msg);
            if msg == b"ok" {
                return Ok(child.as_raw());
            }
            let _ = nix::sys::wait::waitpid(child, None);
            if msg.is_empty() {
                bail!("the monitor process died before the container was ready");
            }
            bail!("{}", String::from_utf8_lossy(&msg))
        }
    }
}
