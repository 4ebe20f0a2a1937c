//! The runc commands, each a thin step on the container's state and its guest agent.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use sha2::Digest;

use super::bundle::{self, Bundle};
use super::hooks::{self, Kind};
use super::host_cgroup;
use super::state::{self, process_alive, process_start, State, Status, Store};
use super::{flag, parse_flags, Flag, Global, Parsed};
use crate::agent_client::{AgentClient, ProcessExit};
use crate::cli::monitor::{self, Console, Io};
use crate::sandbox::{mounts_under, Sandbox, SandboxSpec};
use crate::vsock::HybridVsock;

pub fn dispatch(g: &Global, cmd: &str, args: &[String]) -> Result<i32> {
    match cmd {
        "create" => create(g, args),
        "run" => run(g, args),
        "start" => start(g, args),
        "state" => state_cmd(g, args),
        "kill" => kill(g, args),
        "delete" => delete(g, args),
        "exec" => exec(g, args),
        "ps" => ps(g, args),
        "list" => list(g, args),
        "pause" => pause(g, args, true),
        "resume" => pause(g, args, false),
        "update" => update(g, args),
        "events" => events(g, args),
        "features" => features(args),
        "spec" => spec(args),
        other => bail!("unknown command {other:?}"),
    }
}

const CREATE_FLAGS: &[Flag] = &[
    flag(&["bundle", "b"], true),
    flag(&["pid-file"], true),
    flag(&["console-socket"], true),
    flag(&["preserve-fds"], true),
    flag(&["no-pivot"], false),
    flag(&["no-new-keyring"], false),
    // run only:
    flag(&["detach", "d"], false),
    flag(&["keep"], false),
    flag(&["no-subreaper"], false),
];

fn store(g: &Global, p: &Parsed, cmd: &str) -> Result<Store> {
    Store::new(&g.root, p.id(cmd)?)
}

/// Loads an existing container's state.
fn existing(g: &Global, p: &Parsed, cmd: &str) -> Result<(Store, State)> {
    let s = store(g, p, cmd)?;
    let state = s.load()?;
    Ok((s, state))
}

fn write_pid_file(path: Option<&str>, pid: i32) -> Result<()> {
    if let Some(path) = path {
        state::write_atomic(Path::new(path), pid.to_string().as_bytes())
            .with_context(|| format!("writing the pid file {path}"))?;
    }
    Ok(())
}

/// The bundle and where the terminal goes, checked before anything is made.
fn prepare(p: &Parsed, foreground: bool) -> Result<(Bundle, Console)> {
    if let Some(n) = p.get("preserve-fds") {
        if n.parse::<u32>()
            .map_err(|_| anyhow::anyhow!("--preserve-fds {n:?} is not a number"))?
            > 0
        {
            bail!("--preserve-fds: file descriptors cannot be passed into a microVM");
        }
    }
    let dir = p
        .get("bundle")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let b = bundle::load(&dir)?;
    let terminal = b
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let console = match (terminal, p.get("console-socket")) {
        (true, Some(s)) => Console::Socket(PathBuf::from(s)),
        (true, None) if foreground => Console::Inherit,
        (true, None) => bail!(
            "process.terminal is true but no --console-socket was given: a detached container needs one"
        ),
        (false, _) => Console::Pipes,
    };
    Ok((b, console))
}

/// A short, stable name for the container's sandbox directory (Unix socket paths in it
/// must stay under 108 bytes whatever the id and root are).
pub fn sandbox_name(store_dir: &Path) -> String {
    let digest = sha2::Sha256::digest(store_dir.as_os_str().as_encoded_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the CLI's sandboxes live, under the configured run root.
pub fn sandbox_root(run_root: &Path) -> PathBuf {
    run_root.join("vm")
}

/// A booted VM with the container created in it (its init waiting for start).
struct Booted {
    sandbox: Sandbox,
    agent: AgentClient,
    io: Io,
}

/// Runs in the monitor: boots the VM, creates the container, records its state.
fn boot_container(g: &Global, store: &Store, b: &Bundle, console: &Console) -> Result<Booted> {
    let cid = store.id.clone();
    let guest = bundle::guest_spec(b, &cid)?;
    let (vcpus, memory_mib) = bundle::vm_size(&b.spec, &g.config);
    let mut config = g.config.clone();
    config.run_root = sandbox_root(&g.config.run_root);
    // A sandbox of an earlier container with this id that was not cleaned up (its state
    // is gone, or create could not have made the state directory): stale.
    let name = sandbox_name(&store.dir);
    let mut sandbox = Sandbox::replacing_stale(
        &config,
        SandboxSpec {
            id: name,
            vcpus,
            memory_mib,
        },
    )?;
    for bind in &guest.binds {
        sandbox.bind_into_share(&bind.host, &bind.rel)?;
    }
    let listeners = monitor::listen(
        sandbox.vsock(),
        hull_protocol::FIRST_STDIO_PORT,
        guest.terminal,
        true,
    )?;
    // Joined before the VM starts, so the VMM and helpers land there too.
    let cgroups_path = b
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone());
    let joined = match cgroups_path {
        Some(p) => Some(host_cgroup::join(&host_cgroup::relative_path(
            &p.to_string_lossy(),
            &cid,
            g.systemd_cgroup,
        )?)?),
        None => None,
    };
    let me = std::process::id() as i32;
    let annotations = b.spec.annotations().clone().unwrap_or_default();
    let started = (|| {
        sandbox.boot()?;
        let creating = oci_state(&cid, Status::Creating, me, &b.dir, &annotations);
        hooks::run(&b.raw, Kind::Prestart, &creating)?;
        hooks::run(&b.raw, Kind::CreateRuntime, &creating)?;
        let agent = sandbox.agent()?.clone();
        agent.create_container(
            &cid,
            serde_json::to_vec(&guest.spec)?,
            listeners.stdio.clone(),
        )?;
        let io = Io::connect(listeners, console)?;
        if let Some((rows, cols)) = io.size() {
            let _ = agent.resize_pty(&cid, "", rows, cols);
        }
        anyhow::Ok((agent, io))
    })();
    let (agent, io) = match started {
        Ok(x) => x,
        Err(e) => {
            drop(sandbox);
            if let Some(j) = joined {
                j.undo();
            }
            return Err(e);
        }
    };
    let state = State {
        id: cid,
        bundle: b.dir.clone(),
        rootfs: b.rootfs.clone(),
        created: state::rfc3339_now(),
        status: Status::Created,
        pid: me,
        pid_start: process_start(me).map(|(s, _)| s).unwrap_or_default(),
        sandbox_dir: sandbox.dir().to_path_buf(),
        host_cgroups: joined.as_ref().map(|j| j.leaves()).unwrap_or_default(),
        annotations,
    };
    if let Err(e) = store.save(&state) {
        drop(sandbox);
        if let Some(j) = joined {
            j.undo();
        }
        return Err(e);
    }
    Ok(Booted { sandbox, agent, io })
}

/// Runs in the monitor once the container exists: relays, waits, records the exit,
/// tears the VM down.
fn serve_init(store: &Store, booted: Booted) -> ProcessExit {
    let Booted {
        mut sandbox,
        agent,
        io,
    } = booted;
    monitor::forward_signals(agent.clone(), store.id.clone(), String::new(), io.size_fd());
    let exit = monitor::wait_exit(&agent, &store.id, "", || !sandbox.vmm_exited());
    tracing::debug!("container {} exited: {exit:?}", store.id);
    io.drain(Duration::from_secs(5));
    drop(io);
    tracing::debug!("output drained");
    if let Err(e) = store.record_exit(exit) {
        tracing::error!("recording the exit: {e:#}");
    }
    sandbox.shutdown();
    tracing::debug!("sandbox removed");
    exit
}

/// Forks the container's monitor; returns its pid once the container is created.
fn spawn_init_monitor(
    g: &Global,
    store: &Store,
    b: &Bundle,
    console: &Console,
    lock: &state::Lock,
) -> Result<i32> {
    let lock_fd = lock.raw_fd();
    monitor::fork_monitor(|report| {
        // The caller holds the lock until it returns; this copy must not keep it.
        let _ = nix::unistd::close(lock_fd);
        let booted = monitor::block_signals().and_then(|()| boot_container(g, store, b, console));
        match booted {
            Err(e) => {
                report.fail(&e);
                1
            }
            Ok(booted) => {
                report.ok();
                monitor::exit_like(serve_init(store, booted))
            }
        }
    })
}

/// Makes the container's directory and copies the spec there.
fn new_container(g: &Global, p: &Parsed, b: &Bundle) -> Result<(Store, state::Lock)> {
    let s = store(g, p, "create")?;
    let lock = s.create_dir()?;
    if let Err(e) = std::fs::copy(b.dir.join("config.json"), s.dir.join("config.json")) {
        let _ = std::fs::remove_dir_all(&s.dir);
        return Err(e).context("copying config.json");
    }
    Ok((s, lock))
}

fn create(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags("create", args, CREATE_FLAGS)?;
    let (b, console) = prepare(&p, false)?;
    let (s, lock) = new_container(g, &p, &b)?;
    match spawn_init_monitor(g, &s, &b, &console, &lock) {
        Ok(pid) => {
            write_pid_file(p.get("pid-file"), pid).map_err(|e| abort(&s, e))?;
            Ok(0)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&s.dir);
            Err(e)
        }
    }
}

fn run(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags("run", args, CREATE_FLAGS)?;
    let detach = p.is_set("detach");
    let (b, console) = prepare(&p, !detach)?;
    let (s, lock) = new_container(g, &p, &b)?;
    if detach {
        let pid = match spawn_init_monitor(g, &s, &b, &console, &lock) {
            Ok(pid) => pid,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&s.dir);
                return Err(e);
            }
        };
        let started = s.load().and_then(|mut state| {
            s.agent(&state)?.start_container(&s.id)?;
            state.status = Status::Running;
            s.save(&state)?;
            hooks::run_or_warn(&b.raw, Kind::Poststart, &state_json(&s, &state));
            write_pid_file(p.get("pid-file"), pid)
        });
        return started.map(|()| 0).map_err(|e| abort(&s, e));
    }
    // In the foreground this process is the monitor.
    monitor::block_signals()?;
    let booted = match boot_container(g, &s, &b, &console) {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&s.dir);
            return Err(e);
        }
    };
    let started = write_pid_file(p.get("pid-file"), std::process::id() as i32)
        .and_then(|()| Ok(booted.agent.start_container(&s.id)?));
    if let Err(e) = started {
        eprintln!("hull: {e:#}");
        // The init never runs: end it, and the wait below returns.
        let _ = booted.agent.signal(&s.id, "", Signal::SIGKILL as i32);
    } else if let Ok(mut state) = s.load() {
        state.status = Status::Running;
        let _ = s.save(&state);
        hooks::run_or_warn(&b.raw, Kind::Poststart, &state_json(&s, &state));
    }
    drop(lock);
    let exit = serve_init(&s, booted);
    if !p.is_set("keep") {
        if let Ok(state) = s.load() {
            host_cgroup::leave_and_remove(&state.host_cgroups);
            hooks::run_or_warn(&b.raw, Kind::Poststop, &poststop_state(&s, &state));
        }
        let _ = std::fs::remove_dir_all(&s.dir);
    }
    monitor::exit_like(exit)
}

fn start(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags("start", args, &[])?;
    let s = store(g, &p, "start")?;
    let _lock = s.lock()?;
    let mut state = s.load()?;
    match s.status(&state) {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped"),
        _ => bail!("cannot start an already running container"),
    }
    let agent = s.agent(&state)?;
    if let Some((rows, cols)) = monitor::terminal_size_of(state.pid) {
        // Without a terminal in the container there is nothing to size (the monitor's pty
        // was the caller's own).
        if let Err(e) = agent.resize_pty(&s.id, "", rows, cols) {
            tracing::debug!("not sizing the terminal: {e}");
        }
    }
    agent.start_container(&s.id)?;
    state.status = Status::Running;
    s.save(&state)?;
    // The container runs: a bundle that cannot be read now costs its hooks, not the start.
    match s.config() {
        Ok(config) => hooks::run_or_warn(&config, Kind::Poststart, &state_json(&s, &state)),
        Err(e) => tracing::warn!("poststart hooks not run: {e:#}"),
    }
    Ok(0)
}

fn state_json(s: &Store, state: &State) -> Value {
    let status = s.status(state);
    let pid = if status == Status::Stopped {
        0
    } else {
        state.pid
    };
    let mut v = oci_state(&state.id, status, pid, &state.bundle, &state.annotations);
    v["rootfs"] = json!(state.rootfs);
    v["created"] = json!(state.created);
    v["owner"] = json!("");
    v
}

/// What poststop hooks are told, as runc tells them: stopped, and no pid (the caller may
/// be the monitor itself, still alive).
fn poststop_state(s: &Store, state: &State) -> Value {
    let mut v = state_json(s, state);
    v["status"] = json!("stopped");
    if let Some(o) = v.as_object_mut() {
        o.remove("pid");
    }
    v
}

/// The runtime spec's state of a container (what `state` prints and hooks read).
fn oci_state(
    id: &str,
    status: Status,
    pid: i32,
    bundle: &Path,
    annotations: &std::collections::HashMap<String, String>,
) -> Value {
    json!({
        "ociVersion": "1.2.0",
        "id": id,
        "pid": pid,
        "status": status.as_str(),
        "bundle": bundle,
        "annotations": annotations,
    })
}

fn state_cmd(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags("state", args, &[])?;
    let (s, state) = existing(g, &p, "state")?;
    println!("{}", serde_json::to_string_pretty(&state_json(&s, &state))?);
    Ok(0)
}

/// A signal by name (`TERM`, `SIGTERM`, any case) or number.
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("signal {n} is out of range (1-64)");
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| anyhow::anyhow!("unknown signal {s:?}: give a name like TERM or a number"))
}

fn kill(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags("kill", args, &[flag(&["all", "a"], false)])?;
    let (s, state) = existing(g, &p, "kill")?;
    let sig = parse_signal(p.args.get(1).map(|s| s.as_str()).unwrap_or("SIGTERM"))?;
    let agent = running_agent_of(&s, &state)?;
    if p.is_set("all") {
        agent.signal_all(&s.id, sig)?;
    } else {
        agent.signal(&s.id, "", sig)?;
    }
    Ok(0)
}

/// Removes what a dead monitor left: its VMM and helpers, mounts, the sandbox directory.
fn clean_sandbox(state: &State) {
    crate::sandbox::remove_stale(&state.sandbox_dir);
}

/// Kills what is left of a container (its init, then its monitor and VM if they do not
/// go), cleans up the sandbox and host cgroups, and removes its state directory.
fn destroy(s: &Store, state: Option<&State>) -> Result<()> {
    let spec = s.config().ok();
    if let Some(state) = state {
        if s.status(state) != Status::Stopped {
            // The monitor sees the init die, tears the VM down and exits.
            if let Ok(agent) = s.agent(state) {
                let _ = agent.signal(&s.id, "", Signal::SIGKILL as i32);
            }
        }
        let gone = |st: &State| !process_alive(st.pid, st.pid_start);
        if !wait_until(Duration::from_secs(10), || gone(state)) {
            tracing::warn!("the monitor {} did not exit; killing it", state.pid);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(state.pid), Signal::SIGKILL);
        }
        clean_sandbox(state);
        for cg in state.host_cgroups.iter().rev() {
            // A killed VMM may take a moment to leave its cgroup.
            wait_until(Duration::from_secs(5), || {
                matches!(std::fs::remove_dir(cg), Ok(())) || !cg.exists()
            });
        }
    }
    if let (Some(spec), Some(state)) = (&spec, state) {
        hooks::run_or_warn(spec, Kind::Poststop, &poststop_state(s, state));
    }
    // Never delete through a mount.
    if !mounts_under(&s.dir).is_empty() {
        bail!(
            "not removing {}: something is mounted there",
            s.dir.display()
        );
    }
    std::fs::remove_dir_all(&s.dir).with_context(|| format!("removing {}", s.dir.display()))
}

/// Polls `done` every 10 ms until it says yes or `limit` passes; returns its last answer.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

/// After a failure once the monitor runs: take the container down again.
fn abort(s: &Store, e: anyhow::Error) -> anyhow::Error {
    let state = s.load().ok();
    if let Some(st) = &state {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(st.pid), Signal::SIGKILL);
    }
    if let Err(e2) = destroy(s, state.as_ref()) {
        tracing::error!("cleaning up after a failed create: {e2:#}");
    }
    e
}

fn delete(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags("delete", args, &[flag(&["force", "f"], false)])?;
    let force = p.is_set("force");
    let s = store(g, &p, "delete")?;
    if !s.exists() {
        if force {
            // As runc: forcing the delete of what is not there is not an error.
            return Ok(0);
        }
        bail!("container {:?} does not exist", s.id);
    }
    let _lock = s.lock()?;
    let state = s.load().ok();
    if let Some(state) = &state {
        let status = s.status(state);
        if !matches!(status, Status::Stopped | Status::Created) && !force {
            bail!(
                "cannot delete container {} that is not stopped: {}",
                s.id,
                status.as_str()
            );
        }
    }
    destroy(&s, state.as_ref())?;
    Ok(0)
}

const EXEC_FLAGS: &[Flag] = &[
    flag(&["console-socket"], true),
    flag(&["cwd"], true),
    flag(&["env", "e"], true),
    flag(&["tty", "t"], false),
    flag(&["user", "u"], true),
    flag(&["additional-gids", "g"], true),
    flag(&["process", "p"], true),
    flag(&["detach", "d"], false),
    flag(&["pid-file"], true),
    flag(&["process-label"], true),
    flag(&["apparmor"], true),
    flag(&["no-new-privs"], false),
    flag(&["cap", "c"], true),
    flag(&["preserve-fds"], true),
    flag(&["ignore-paused"], false),
    flag(&["cgroup"], true),
    flag(&["no-subreaper"], false),
];

/// The exec'd process: `--process FILE`, or the container's process with the command
/// line's changes (as runc builds it).
fn exec_process(s: &Store, p: &Parsed) -> Result<Value> {
    if let Some(file) = p.get("process") {
        let text = std::fs::read(file).with_context(|| format!("reading --process {file}"))?;
        let v: Value = serde_json::from_slice(&text)
            .with_context(|| format!("--process {file} is not JSON"))?;
        serde_json::from_value::<oci_spec::runtime::Process>(v.clone())
            .with_context(|| format!("--process {file} is not an OCI process"))?;
        return Ok(v);
    }
    let cmd = &p.args[1..];
    if cmd.is_empty() {
        bail!("exec: give the command to run after the container id, or --process FILE");
    }
    let mut proc_ = s.config()?["process"].clone();
    proc_["args"] = json!(cmd);
    proc_["terminal"] = json!(p.is_set("tty"));
    if let Some(cwd) = p.get("cwd") {
        proc_["cwd"] = json!(cwd);
    }
    let mut env: Vec<Value> = proc_["env"].as_array().cloned().unwrap_or_default();
    for e in p.all("env") {
        if !e.contains('=') {
            bail!("--env {e:?} is not KEY=VALUE");
        }
        env.push(json!(e));
    }
    proc_["env"] = json!(env);
    if let Some(user) = p.get("user") {
        let bad = || anyhow::anyhow!("--user {user:?}: give UID[:GID], numeric");
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user, None),
        };
        let uid: u32 = uid.parse().map_err(|_| bad())?;
        proc_["user"]["uid"] = json!(uid);
        // As runc: without a group, the spec's gid stays.
        if let Some(gid) = gid {
            let gid: u32 = gid.parse().map_err(|_| bad())?;
            proc_["user"]["gid"] = json!(gid);
        }
    }
    let gids: Vec<u32> = p
        .all("additional-gids")
        .iter()
        .map(|g| {
            g.parse()
                .map_err(|_| anyhow::anyhow!("--additional-gids {g:?} is not a number"))
        })
        .collect::<Result<_>>()?;
    if !gids.is_empty() {
        proc_["user"]["additionalGids"] = json!(gids);
    }
    for cap in p.all("cap") {
        for set in ["bounding", "effective", "permitted"] {
            let list = proc_["capabilities"][set].as_array_mut();
            match list {
                Some(l) => l.push(json!(cap)),
                None => proc_["capabilities"][set] = json!([cap]),
            }
        }
    }
    if p.is_set("no-new-privs") {
        proc_["noNewPrivileges"] = json!(true);
    }
    Ok(proc_)
}

struct Exec {
    agent: AgentClient,
    exec_id: String,
    io: Io,
}

fn start_exec(s: &Store, state: &State, process: &Value, console: &Console) -> Result<Exec> {
    let agent = s.agent(state)?;
    let vsock = HybridVsock::new(&state.sandbox_dir.join("vsock.sock"));
    let me = std::process::id();
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    let listeners = monitor::listen(&vsock, 3000 + (me % 8192) * 4, terminal, true)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let exec_id = format!("exec-{me}-{nanos:08x}");
    agent.exec(
        &s.id,
        &exec_id,
        serde_json::to_vec(process)?,
        listeners.stdio.clone(),
    )?;
    let io = match Io::connect(listeners, console) {
        Ok(io) => io,
        Err(e) => {
            // Nobody would wait for it.
            let _ = agent.signal(&s.id, &exec_id, Signal::SIGKILL as i32);
            return Err(e);
        }
    };
    if let Some((rows, cols)) = io.size() {
        let _ = agent.resize_pty(&s.id, &exec_id, rows, cols);
    }
    Ok(Exec { agent, exec_id, io })
}

fn serve_exec(s: &Store, state: &State, x: Exec) -> ProcessExit {
    monitor::forward_signals(
        x.agent.clone(),
        s.id.clone(),
        x.exec_id.clone(),
        x.io.size_fd(),
    );
    let exit = monitor::wait_exit(&x.agent, &s.id, &x.exec_id, || {
        process_alive(state.pid, state.pid_start) && s.exit().is_none()
    });
    x.io.drain(Duration::from_secs(5));
    exit
}

fn exec(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags("exec", args, EXEC_FLAGS)?;
    let (s, state) = existing(g, &p, "exec")?;
    match s.status(&state) {
        Status::Stopped => bail!("cannot exec in a stopped container"),
        Status::Paused if !p.is_set("ignore-paused") => {
            bail!("cannot exec in a paused container (use --ignore-paused to override)")
        }
        _ => {}
    }
    if let Some(n) = p.get("preserve-fds") {
        if n != "0" {
            bail!("--preserve-fds: file descriptors cannot be passed into a microVM");
        }
    }
    let process = exec_process(&s, &p)?;
    let detach = p.is_set("detach");
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    let console = match (terminal, p.get("console-socket")) {
        (true, Some(sock)) => Console::Socket(PathBuf::from(sock)),
        (true, None) if !detach => Console::Inherit,
        (true, None) => bail!("exec --detach with a terminal needs --console-socket"),
        (false, _) => Console::Pipes,
    };
    if detach {
        let pid = monitor::fork_monitor(|report| {
            let started =
                monitor::block_signals().and_then(|()| start_exec(&s, &state, &process, &console));
            match started {
                Err(e) => {
                    report.fail(&e);
                    1
                }
                Ok(x) => {
                    report.ok();
                    monitor::exit_like(serve_exec(&s, &state, x))
                }
            }
        })?;
        write_pid_file(p.get("pid-file"), pid)?;
        return Ok(0);
    }
    monitor::block_signals()?;
    let x = start_exec(&s, &state, &process, &console)?;
    write_pid_file(p.get("pid-file"), std::process::id() as i32)?;
    monitor::exit_like(serve_exec(&s, &state, x))
}

fn running_agent(g: &Global, p: &Parsed, cmd: &str) -> Result<(Store, State, AgentClient)> {
    let (s, state) = existing(g, p, cmd)?;
    let agent = running_agent_of(&s, &state)?;
    Ok((s, state, agent))
}

/// The agent of a container that has not stopped.
fn running_agent_of(s: &Store, state: &State) -> Result<AgentClient> {
    if s.status(state) == Status::Stopped {
        bail!("container not running");
    }
    s.agent(state)
}

fn ps(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags("ps", args, &[flag(&["format", "f"], true)])?;
    let (s, state) = existing(g, &p, "ps")?;
    let procs = if s.status(&state) == Status::Stopped {
        Vec::new()
    } else {
        s.agent(&state)?.processes(&s.id)?
    };
    match p.get("format").unwrap_or("table") {
        "json" => println!(
            "{}",
            serde_json::to_string(&procs.iter().map(|(pid, _)| *pid).collect::<Vec<_>>())?
        ),
        "table" => {
            println!("{:>7} CMD", "PID");
            for (pid, cmd) in procs {
                println!("{pid:>7} {cmd}");
            }
        }
        other => bail!("ps: unknown --format {other:?}: use table or json"),
    }
    Ok(0)
}

fn list(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags(
        "list",
        args,
        &[flag(&["format", "f"], true), flag(&["quiet", "q"], false)],
    )?;
    let mut rows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&g.root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(s) = Store::new(&g.root, &name) else {
                continue;
            };
            if let Ok(state) = s.load() {
                rows.push(state_json(&s, &state));
            }
        }
    }
    rows.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    if p.is_set("quiet") {
        for r in &rows {
            println!("{}", r["id"].as_str().unwrap_or_default());
        }
        return Ok(0);
    }
    match p.get("format").unwrap_or("table") {
        "json" => println!("{}", Value::Array(rows)),
        "table" => {
            println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
            for r in &rows {
                println!(
                    "{}\t{}\t{}\t{}\t{}\troot",
                    r["id"].as_str().unwrap_or_default(),
                    r["pid"],
                    r["status"].as_str().unwrap_or_default(),
                    r["bundle"].as_str().unwrap_or_default(),
                    r["created"].as_str().unwrap_or_default()
                );
            }
        }
        other => bail!("list: unknown --format {other:?}: use table or json"),
    }
    Ok(0)
}

fn pause(g: &Global, args: &[String], paused: bool) -> Result<i32> {
    let cmd = if paused { "pause" } else { "resume" };
    let p = parse_flags(cmd, args, &[])?;
    let s = store(g, &p, cmd)?;
    let _lock = s.lock()?;
    let mut state = s.load()?;
    match (paused, s.status(&state)) {
        (true, Status::Running) | (false, Status::Paused) => {}
        (true, _) => bail!("container not running"),
        (false, _) => bail!("container not paused"),
    }
    s.agent(&state)?.pause(&s.id, paused)?;
    state.status = if paused {
        Status::Paused
    } else {
        Status::Running
    };
    s.save(&state)?;
    Ok(0)
}

/// A size in bytes: a number with an optional k/m/g (binary) suffix; -1 is unlimited.
fn parse_bytes(s: &str) -> Result<i64> {
    let lower = s.trim().to_ascii_lowercase();
    let t = lower.trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: i64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a size: use bytes or e.g. 64m"))?;
    if n < 0 {
        return Ok(-1);
    }
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("{s:?} is too large"))
}

const UPDATE_FLAGS: &[Flag] = &[
    flag(&["resources", "r"], true),
    flag(&["memory", "m"], true),
    flag(&["memory-reservation"], true),
    flag(&["memory-swap"], true),
    flag(&["kernel-memory"], true),
    flag(&["kernel-memory-tcp"], true),
    flag(&["cpu-period"], true),
    flag(&["cpu-quota"], true),
    flag(&["cpu-share"], true),
    flag(&["cpu-rt-period"], true),
    flag(&["cpu-rt-runtime"], true),
    flag(&["cpuset-cpus"], true),
    flag(&["cpuset-mems"], true),
    flag(&["pids-limit"], true),
    flag(&["blkio-weight"], true),
    flag(&["l3-cache-schema"], true),
    flag(&["mem-bw-schema"], true),
];

fn update(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags("update", args, UPDATE_FLAGS)?;
    let (s, _state, agent) = running_agent(g, &p, "update")?;
    let mut r: Value = match p.get("resources") {
        Some("-") => {
            let mut text = Vec::new();
            std::io::stdin().read_to_end(&mut text)?;
            serde_json::from_slice(&text).context("--resources -: stdin is not JSON")?
        }
        Some(file) => serde_json::from_slice(
            &std::fs::read(file).with_context(|| format!("reading --resources {file}"))?,
        )
        .with_context(|| format!("--resources {file} is not JSON"))?,
        None => json!({}),
    };
    if !r.is_object() {
        bail!("--resources must be a JSON object (OCI linux.resources)");
    }
    for key in ["memory", "cpu", "pids"] {
        if !r[key].is_null() && !r[key].is_object() {
            bail!("--resources: {key} must be an object");
        }
    }
    let num = |flag: &str, v: &str| -> Result<i64> {
        v.parse()
            .map_err(|_| anyhow::anyhow!("--{flag} {v:?} is not a number"))
    };
    for (flag, path) in [
        ("memory", ["memory", "limit"]),
        ("memory-reservation", ["memory", "reservation"]),
        ("memory-swap", ["memory", "swap"]),
    ] {
        if let Some(v) = p.get(flag) {
            r[path[0]][path[1]] = json!(parse_bytes(v)?);
        }
    }
    for (flag, path) in [
        ("cpu-period", ["cpu", "period"]),
        ("cpu-quota", ["cpu", "quota"]),
        ("cpu-share", ["cpu", "shares"]),
        ("pids-limit", ["pids", "limit"]),
    ] {
        if let Some(v) = p.get(flag) {
            r[path[0]][path[1]] = json!(num(flag, v)?);
        }
    }
    for (flag, key) in [("cpuset-cpus", "cpus"), ("cpuset-mems", "mems")] {
        if let Some(v) = p.get(flag) {
            r["cpu"][key] = json!(v);
        }
    }
    for unsupported in [
        "kernel-memory",
        "kernel-memory-tcp",
        "cpu-rt-period",
        "cpu-rt-runtime",
        "blkio-weight",
        "l3-cache-schema",
        "mem-bw-schema",
    ] {
        if p.get(unsupported).is_some() {
            bail!("update --{unsupported} is not supported by Hull's guest");
        }
    }
    serde_json::from_value::<oci_spec::runtime::LinuxResources>(r.clone())
        .context("the resources are not valid OCI linux.resources")?;
    agent.update(&s.id, serde_json::to_vec(&r)?)?;
    Ok(0)
}

/// runc's `events` stats object, from the guest cgroup's counters.
fn stats_json(id: &str, v: &std::collections::HashMap<String, u64>) -> Value {
    let get = |k: &str| v.get(k).copied().unwrap_or(0);
    json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {"usage": {
                "total": get("cpu.stat.usage_usec").saturating_mul(1000),
                "user": get("cpu.stat.user_usec").saturating_mul(1000),
                "kernel": get("cpu.stat.system_usec").saturating_mul(1000)}},
            "memory": {
                "usage": {"usage": get("memory.current"),
                          "limit": v.get("memory.max").copied().unwrap_or(u64::MAX)},
                "swap": {"usage": get("memory.swap.current")},
                "raw": v.iter().filter(|(k, _)| k.starts_with("memory.stat."))
                    .map(|(k, n)| (k.trim_start_matches("memory.stat.").to_string(), json!(n)))
                    .collect::<serde_json::Map<String, Value>>()},
            "pids": {"current": get("pids.current"), "limit": get("pids.max")},
        }
    })
}

fn events(g: &Global, args: &[String]) -> Result<i32> {
    let p = parse_flags(
        "events",
        args,
        &[flag(&["stats"], false), flag(&["interval"], true)],
    )?;
    let interval = match p.get("interval") {
        Some(v) => v
            .trim_end_matches('s')
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--interval {v:?}: give seconds, e.g. 5s"))?,
        None => Duration::from_secs(5),
    };
    let (s, state, agent) = running_agent(g, &p, "events")?;
    let ooms = |stats: &std::collections::HashMap<String, u64>| {
        stats.get("memory.events.oom_kill").copied().unwrap_or(0)
    };
    let stats = agent.stats(&s.id)?;
    println!("{}", stats_json(&s.id, &stats));
    if p.is_set("stats") {
        return Ok(0);
    }
    // As runc: an `oom` event for each OOM kill from now on, stats every interval.
    let mut seen = ooms(&stats);
    let mut next_stats = Instant::now().checked_add(interval);
    loop {
        std::thread::sleep(Duration::from_millis(200).min(interval));
        if s.status(&state) == Status::Stopped {
            return Ok(0);
        }
        let stats = match agent.stats(&s.id) {
            Ok(stats) => stats,
            // The container went between the two calls.
            Err(_) if s.status(&state) == Status::Stopped => return Ok(0),
            Err(e) => return Err(anyhow::Error::new(e).context("reading the container's stats")),
        };
        let now = ooms(&stats);
        if now > seen {
            println!("{}", json!({"type": "oom", "id": s.id}));
            seen = now;
        }
        if next_stats.is_some_and(|t| Instant::now() >= t) {
            println!("{}", stats_json(&s.id, &stats));
            next_stats = next_stats.and_then(|t| t.checked_add(interval));
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

fn features(args: &[String]) -> Result<i32> {
    parse_flags("features", args, &[])?;
    let f = json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.3.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer",
            "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "suid", "nodev", "dev",
            "noexec", "exec", "sync", "async", "dirsync", "remount", "mand", "nomand",
            "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime",
            "strictatime", "nostrictatime", "private", "rprivate", "shared", "rshared",
            "slave", "rslave", "unbindable", "runbindable"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "time", "uts"],
            "capabilities": hull_protocol::CAPABILITIES.as_slice(),
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                    "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                    "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86_64"],
                "knownFlags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                    "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"],
                "supportedFlags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                    "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {"io.github.hull.microvm": "true"}
    });
    println!("{}", serde_json::to_string_pretty(&f)?);
    Ok(0)
}

fn spec(args: &[String]) -> Result<i32> {
    let p = parse_flags(
        "spec",
        args,
        &[flag(&["bundle", "b"], true), flag(&["rootless"], false)],
    )?;
    let dir = PathBuf::from(p.get("bundle").unwrap_or("."));
    let path = dir.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let user = crate::user::ResolvedUser {
        uid: 0,
        gid: 0,
        additional_gids: Vec::new(),
        home: "/root".into(),
    };
    let env = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "TERM=xterm".to_string(),
    ];
    let mut v = crate::spec::default_spec(
        "rootfs",
        "hull",
        &crate::spec::ProcessSpec {
            args: &["sh".to_string()],
            env: &env,
            cwd: "/",
            user: &user,
            terminal: true,
        },
    );
    v["root"]["readonly"] = json!(true);
    std::fs::write(&path, serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), 10);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("99").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64m").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("-1").unwrap(), -1);
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn sandbox_names_are_short_and_stable() {
        let a = sandbox_name(Path::new("/run/hull/abc"));
        assert_eq!(a.len(), 16);
        assert_eq!(a, sandbox_name(Path::new("/run/hull/abc")));
        assert_ne!(a, sandbox_name(Path::new("/run/hull/abd")));
    }
}
