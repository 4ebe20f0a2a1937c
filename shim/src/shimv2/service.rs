//! The shim's Task service: containerd's calls translated onto the pod's sandbox (one
//! microVM) and its agent. State is the tasks of this pod and their processes.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use containerd_shim_protos::api::{self, Empty, Status};
use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_sync::{create_task, Task as TaskService};
use nix::sys::signal::Signal;
use serde_json::Value;
use ttrpc::{Code, TtrpcContext};

use super::events::{to_timestamp, Event, Publisher};
use super::io::{Paths, Relay};
use super::{rootfs, Args, CONTAINER_TYPE_ANNOTATION};
use crate::agent_client::{AgentClient, ProcessExit};
use crate::cli::monitor;
use crate::cli::runc::bundle;
use crate::config::Config;
use crate::sandbox::{Sandbox, SandboxSpec};

/// Where the shim's sandboxes live, under the run root.
const SANDBOX_DIR: &str = "pods";

/// The pod's microVM.
struct Pod {
    sandbox: Sandbox,
    agent: AgentClient,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Created,
    Running,
    Stopped { status: u32, at: SystemTime },
}

/// One process: a container's init (exec id "") or an exec.
struct Proc {
    exec_id: String,
    io: Paths,
    /// An exec's OCI process (JSON), until it starts.
    spec: Vec<u8>,
    pid: Mutex<u32>,
    phase: Mutex<Phase>,
    changed: Condvar,
    /// Held while the process is being started.
    starting: Mutex<()>,
    relay: Mutex<Option<Relay>>,
    listeners: Mutex<Option<monitor::Listeners>>,
}

impl Proc {
    fn new(exec_id: &str, io: Paths, spec: Vec<u8>) -> Proc {
        Proc {
            exec_id: exec_id.to_string(),
            io,
            spec,
            pid: Mutex::new(0),
            phase: Mutex::new(Phase::Created),
            changed: Condvar::new(),
            starting: Mutex::new(()),
            relay: Mutex::new(None),
            listeners: Mutex::new(None),
        }
    }

    fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    fn pid(&self) -> u32 {
        *lock(&self.pid)
    }

    /// Records the end of the process and wakes its waiters.
    fn finish(&self, status: u32) -> SystemTime {
        let at = SystemTime::now();
        *lock(&self.phase) = Phase::Stopped { status, at };
        lock(&self.listeners).take();
        self.changed.notify_all();
        at
    }

    fn wait(&self) -> (u32, SystemTime) {
        let mut p = lock(&self.phase);
        loop {
            if let Phase::Stopped { status, at } = *p {
                return (status, at);
            }
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Task {
    id: String,
    bundle: PathBuf,
    /// The rootfs containerd's mounts were made at (to unmount on delete).
    rootfs_mounted: Option<PathBuf>,
    /// Binds into the pod's share made for this container.
    binds: Vec<PathBuf>,
    raw_spec: Value,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    paused: Mutex<bool>,
}

impl Task {
    fn process(&self, exec_id: &str) -> ttrpc::Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found(format!("no exec {exec_id:?} in container {:?}", self.id)))
    }
}

pub struct Shim {
    namespace: String,
    group: String,
    config: Config,
    publisher: Publisher,
    /// Held while the VM boots and containers are added or removed (share binds).
    pod: Mutex<Option<Pod>>,
    /// The pod's agent and VMM pid, readable without waiting for `pod`.
    agent: Mutex<Option<AgentClient>>,
    vmm_pid: AtomicU32,
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    /// Creates under way: the VM stays, and the shim does not exit, while any runs.
    creating: AtomicUsize,
    /// Shutdown has begun: no new containers.
    closing: AtomicBool,
    socket: PathBuf,
    exit: Mutex<std::sync::mpsc::Sender<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn not_found(msg: impl Into<String>) -> ttrpc::Error {
    status(Code::NOT_FOUND, msg)
}

fn failed(e: anyhow::Error) -> ttrpc::Error {
    tracing::warn!("{e:#}");
    status(Code::UNKNOWN, format!("{e:#}"))
}

fn precondition(msg: impl Into<String>) -> ttrpc::Error {
    status(Code::FAILED_PRECONDITION, msg)
}

/// The sandbox directory name of pod `group` in `namespace` (short: socket paths in it).
fn sandbox_name(namespace: &str, group: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{namespace}/{group}").as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the sandbox of pod `group` in `namespace` lives.
pub fn sandbox_dir(config: &Config, namespace: &str, group: &str) -> PathBuf {
    sandbox_config(config)
        .run_root
        .join(sandbox_name(namespace, group))
}

fn sandbox_config(config: &Config) -> Config {
    let mut c = config.clone();
    c.run_root = config.run_root.join(SANDBOX_DIR);
    c
}

/// Removes what a shim that died left of pod `group`.
pub fn clean_stale_sandbox(namespace: &str, group: &str) {
    let Ok(config) = Config::load(None) else {
        return;
    };
    crate::sandbox::remove_stale(&sandbox_dir(&config, namespace, group));
}

impl Shim {
    fn task(&self, id: &str) -> ttrpc::Result<Arc<Task>> {
        lock(&self.tasks)
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("container {id:?} does not exist in this shim")))
    }

    fn agent(&self) -> ttrpc::Result<AgentClient> {
        lock(&self.agent)
            .clone()
            .ok_or_else(|| precondition("the pod's VM is not running"))
    }

    /// Whether the VMM runs: our child, so its pid stays ours (a zombie) until reaped.
    fn vm_alive(&self) -> bool {
        let pid = self.vmm_pid.load(Ordering::Relaxed);
        pid != 0
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
                .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
    }

    /// Tears the pod's VM down (taken out of `pod`).
    fn stop_vm(&self, pod: Pod) {
        *lock(&self.agent) = None;
        self.vmm_pid.store(0, Ordering::Relaxed);
        pod.sandbox.shutdown();
    }

    /// Whether the pod has no container left, nor one being created (besides `own`).
    fn empty(&self, own: usize) -> bool {
        lock(&self.tasks).is_empty() && self.creating.load(Ordering::SeqCst) <= own
    }

    /// Boots the pod's VM, sized for `spec` (the pod's first container).
    fn boot(&self, spec: &oci_spec::runtime::Spec) -> Result<Pod> {
        let (vcpus, memory_mib) = pod_size(spec, &self.config);
        let config = sandbox_config(&self.config);
        let name = sandbox_name(&self.namespace, &self.group);
        let mut sandbox = Sandbox::replacing_stale(
            &config,
            SandboxSpec {
                id: name,
                vcpus,
                memory_mib,
            },
        )?;
        // Later containers' binds must reach virtiofsd's mount namespace.
        sandbox.share_propagates()?;
        sandbox.boot()?;
        let agent = sandbox.agent()?.clone();
        *lock(&self.agent) = Some(agent.clone());
        self.vmm_pid
            .store(sandbox.vmm_pid().unwrap_or(0), Ordering::Relaxed);
        Ok(Pod { sandbox, agent })
    }

    fn create_task(&self, req: &api::CreateTaskRequest) -> Result<(Arc<Task>, u32)> {
        if !req.checkpoint.is_empty() {
            bail!("restoring from a checkpoint is not supported by hull");
        }
        let paths = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        paths.check()?;
        let bundle_dir = PathBuf::from(&req.bundle);
        let rootfs_dir = bundle_dir.join("rootfs");
        let rootfs_mounted = if req.rootfs.is_empty() {
            None
        } else {
            std::fs::create_dir_all(&rootfs_dir)
                .with_context(|| format!("creating {}", rootfs_dir.display()))?;
            rootfs::mount_all(&req.rootfs, &rootfs_dir)?;
            Some(rootfs_dir.clone())
        };
        let r = self.create_in_pod(req, &bundle_dir, &paths);
        match r {
            Ok((binds, raw_spec, pid, listeners, relay)) => {
                let init = Arc::new(Proc::new("", paths, Vec::new()));
                *lock(&init.pid) = pid;
                *lock(&init.relay) = Some(relay);
                *lock(&init.listeners) = Some(listeners);
                let task = Arc::new(Task {
                    id: req.id.clone(),
                    bundle: bundle_dir,
                    rootfs_mounted,
                    binds,
                    raw_spec,
                    init,
                    execs: Mutex::new(HashMap::new()),
                    paused: Mutex::new(false),
                });
                Ok((task, pid))
            }
            Err(e) => {
                if let Some(r) = &rootfs_mounted {
                    rootfs::unmount(r);
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn create_in_pod(
        &self,
        req: &api::CreateTaskRequest,
        bundle_dir: &Path,
        paths: &Paths,
    ) -> Result<(Vec<PathBuf>, Value, u32, monitor::Listeners, Relay)> {
        let b = bundle::load(bundle_dir)?;
        if b.spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false)
            != req.terminal
        {
            bail!("the request's terminal and the spec's process.terminal disagree");
        }
        let mut guest = bundle::guest_spec(&b, &req.id)?;
        private_uts(&mut guest.spec);
        let mut pod = lock(&self.pod);
        let kind = b
            .spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(CONTAINER_TYPE_ANNOTATION).cloned());
        if pod.is_none() {
            if kind.as_deref() == Some("container") {
                tracing::info!(
                    "the pod's sandbox container is not here; booting for {}",
                    req.id
                );
            }
            *pod = Some(self.boot(&b.spec)?);
        }
        let Some(p) = pod.as_mut() else {
            bail!("the pod's VM is not running");
        };
        let mut binds = Vec::new();
        let bound = (|| {
            for bind in &guest.binds {
                binds.push(p.sandbox.bind_into_share(&bind.host, &bind.rel)?);
            }
            let creating = json_state(&req.id, "creating", 0, bundle_dir, &b.raw);
            crate::cli::runc::hooks::run(
                &b.raw,
                crate::cli::runc::hooks::Kind::Prestart,
                &creating,
            )?;
            crate::cli::runc::hooks::run(
                &b.raw,
                crate::cli::runc::hooks::Kind::CreateRuntime,
                &creating,
            )?;
            let mut listeners = monitor::listen(
                p.sandbox.vsock(),
                hull_protocol::FIRST_STDIO_PORT,
                guest.terminal,
                !paths.stdin.is_empty(),
            )?;
            let pid = p.agent.create_container(
                &req.id,
                serde_json::to_vec(&guest.spec)?,
                listeners.stdio.clone(),
            )?;
            let streams = listeners.accept().and_then(|s| Relay::start(paths, s));
            match streams {
                Ok(relay) => anyhow::Ok((pid, listeners, relay)),
                Err(e) => {
                    let _ = p.agent.signal(&req.id, "", Signal::SIGKILL as i32);
                    let _ = p.agent.remove_container(&req.id);
                    Err(e)
                }
            }
        })();
        match bound {
            Ok((pid, listeners, relay)) => Ok((binds, b.raw, pid, listeners, relay)),
            Err(e) => {
                for t in binds.iter().rev() {
                    p.sandbox.unbind(t);
                }
                if self.empty(1) {
                    // The VM was for this container alone.
                    if let Some(p) = pod.take() {
                        self.stop_vm(p);
                    }
                }
                Err(e)
            }
        }
    }

    /// Waits for `proc_` to end in the background, then records and publishes its exit.
    fn watch(self: &Arc<Self>, task: Arc<Task>, proc_: Arc<Proc>, agent: AgentClient) {
        let shim = self.clone();
        std::thread::spawn(move || {
            let exit = monitor::wait_exit(&agent, &task.id, &proc_.exec_id, || shim.vm_alive());
            if let Some(r) = lock(&proc_.relay).as_ref() {
                r.drain(Duration::from_secs(5));
            }
            let code = match exit {
                ProcessExit::Code(c) => c as u32,
                ProcessExit::Signal(s) => 128 + s,
            };
            let _started = lock(&proc_.starting);
            if matches!(proc_.phase(), Phase::Stopped { .. }) {
                // Ended already (its container was deleted): reported then.
                return;
            }
            let at = proc_.finish(code);
            let mut e = TaskExit::new();
            e.container_id = task.id.clone();
            e.id = if proc_.exec_id.is_empty() {
                task.id.clone()
            } else {
                proc_.exec_id.clone()
            };
            e.pid = proc_.pid();
            e.exit_status = code;
            e.exited_at = MessageField::some(to_timestamp(at));
            shim.publisher.publish(Event::Exit(e));
        });
    }

    /// Reports the container's OOM kills (the guest's memory.events) while it runs.
    fn watch_oom(self: &Arc<Self>, task: Arc<Task>, agent: AgentClient) {
        let shim = self.clone();
        std::thread::spawn(move || {
            let ooms = |agent: &AgentClient| {
                agent
                    .stats(&task.id)
                    .ok()
                    .and_then(|s| s.get("memory.events.oom_kill").copied())
                    .unwrap_or(0)
            };
            let mut seen = ooms(&agent);
            while task.init.phase() == Phase::Running {
                std::thread::sleep(Duration::from_millis(500));
                let now = ooms(&agent);
                if now > seen {
                    let mut e = TaskOOM::new();
                    e.container_id = task.id.clone();
                    shim.publisher.publish(Event::Oom(e));
                    seen = now;
                }
            }
        });
    }

    fn start_exec(&self, task: &Task, p: &Proc, agent: &AgentClient) -> Result<()> {
        let vsock = {
            let pod = lock(&self.pod);
            let p = pod.as_ref().context("the pod's VM is not running")?;
            crate::vsock::HybridVsock::new(p.sandbox.vsock().uds())
        };
        let mut listeners = monitor::listen(
            &vsock,
            hull_protocol::FIRST_STDIO_PORT,
            p.io.terminal,
            !p.io.stdin.is_empty(),
        )?;
        let pid = agent.exec(
            &task.id,
            &p.exec_id,
            p.spec.clone(),
            listeners.stdio.clone(),
        )?;
        *lock(&p.pid) = pid;
        let relay = listeners.accept().and_then(|s| Relay::start(&p.io, s));
        match relay {
            Ok(r) => {
                *lock(&p.relay) = Some(r);
                *lock(&p.listeners) = Some(listeners);
                Ok(())
            }
            Err(e) => {
                let _ = agent.signal(&task.id, &p.exec_id, Signal::SIGKILL as i32);
                Err(e)
            }
        }
    }

    /// Removes the container from the pod; the VM goes with the pod's last container.
    fn remove(&self, task: &Task) {
        let vm = {
            let mut pod = lock(&self.pod);
            if let Some(p) = pod.as_mut() {
                if let Err(e) = p.agent.remove_container(&task.id) {
                    tracing::debug!("removing {} in the guest: {e}", task.id);
                }
                for t in task.binds.iter().rev() {
                    p.sandbox.unbind(t);
                }
            }
            lock(&self.tasks).remove(&task.id);
            if self.empty(0) {
                pod.take()
            } else {
                None
            }
        };
        if let Some(r) = &task.rootfs_mounted {
            rootfs::unmount(r);
        }
        if let Some(p) = vm {
            self.stop_vm(p);
        }
        let state = json_state(&task.id, "stopped", 0, &task.bundle, &task.raw_spec);
        crate::cli::runc::hooks::run_or_warn(
            &task.raw_spec,
            crate::cli::runc::hooks::Kind::Poststop,
            &state,
        );
    }
}

/// CRI names a host-network pod's containers after the node but gives them no UTS
/// namespace (the host's). In a VM "the host's" would be the pod VM's, shared by all its
/// containers: each gets a UTS namespace of its own with that name instead.
fn private_uts(spec: &mut Value) {
    let named = spec["hostname"].as_str().is_some_and(|h| !h.is_empty());
    let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() else {
        return;
    };
    if named && !namespaces.iter().any(|n| n["type"] == "uts") {
        namespaces.push(serde_json::json!({"type": "uts"}));
    }
}

/// The pod's VM size: from the sandbox container's resources, raised to the pod's
/// limits where CRI passes them (containerd 1.7's `io.kubernetes.cri.sandbox-*`
/// annotations: the sum of the pod's container limits). A VM cannot grow later.
fn pod_size(spec: &oci_spec::runtime::Spec, config: &Config) -> (u32, u64) {
    let (vcpus, memory_mib) = bundle::vm_size(spec, config);
    let annotations = spec.annotations().clone().unwrap_or_default();
    let number = |k: &str| {
        annotations
            .get(&format!("io.kubernetes.cri.sandbox-{k}"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|v| *v > 0)
    };
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let pod_vcpus = match (number("cpu-quota"), number("cpu-period")) {
        (Some(q), p) => q.div_ceil(p.unwrap_or(100_000)).min(u64::from(host_cpus)) as u32,
        _ => 0,
    };
    let pod_memory = number("memory")
        .map(|b| b.div_ceil(1 << 20).saturating_add(bundle::VM_OVERHEAD_MIB))
        .unwrap_or(0);
    (vcpus.max(pod_vcpus), memory_mib.max(pod_memory))
}

/// The runtime spec's state, as hooks read it.
fn json_state(id: &str, status: &str, pid: u32, bundle: &Path, spec: &Value) -> Value {
    serde_json::json!({
        "ociVersion": spec["ociVersion"],
        "id": id,
        "status": status,
        "pid": pid,
        "bundle": bundle,
        "annotations": spec["annotations"].as_object().cloned().unwrap_or_default(),
    })
}

fn metrics(v: &HashMap<String, u64>) -> Metrics {
    let get = |k: &str| v.get(k).copied().unwrap_or(0);
    let mut m = Metrics::new();
    let mut pids = PidsStat::new();
    pids.current = get("pids.current");
    pids.limit = get("pids.max");
    m.pids = MessageField::some(pids);
    let mut cpu = CPUStat::new();
    cpu.usage_usec = get("cpu.stat.usage_usec");
    cpu.user_usec = get("cpu.stat.user_usec");
    cpu.system_usec = get("cpu.stat.system_usec");
    cpu.nr_periods = get("cpu.stat.nr_periods");
    cpu.nr_throttled = get("cpu.stat.nr_throttled");
    cpu.throttled_usec = get("cpu.stat.throttled_usec");
    m.cpu = MessageField::some(cpu);
    let mut mem = MemoryStat::new();
    mem.usage = get("memory.current");
    mem.usage_limit = v.get("memory.max").copied().unwrap_or(u64::MAX);
    mem.swap_usage = get("memory.swap.current");
    mem.swap_limit = v.get("memory.swap.max").copied().unwrap_or(u64::MAX);
    mem.anon = get("memory.stat.anon");
    mem.file = get("memory.stat.file");
    mem.kernel_stack = get("memory.stat.kernel_stack");
    mem.slab = get("memory.stat.slab");
    mem.sock = get("memory.stat.sock");
    mem.shmem = get("memory.stat.shmem");
    mem.file_mapped = get("memory.stat.file_mapped");
    mem.pgfault = get("memory.stat.pgfault");
    mem.pgmajfault = get("memory.stat.pgmajfault");
    m.memory = MessageField::some(mem);
    let mut ev = MemoryEvents::new();
    ev.low = get("memory.events.low");
    ev.high = get("memory.events.high");
    ev.max = get("memory.events.max");
    ev.oom = get("memory.events.oom");
    ev.oom_kill = get("memory.events.oom_kill");
    m.memory_events = MessageField::some(ev);
    m
}

fn phase_status(p: Phase, paused: bool) -> Status {
    match p {
        Phase::Created => Status::CREATED,
        Phase::Running if paused => Status::PAUSED,
        Phase::Running => Status::RUNNING,
        Phase::Stopped { .. } => Status::STOPPED,
    }
}

/// The Task service, over an `Arc<Shim>` (exit watchers hold the shim too).
pub struct Service(Arc<Shim>);

impl TaskService for Service {
    fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> ttrpc::Result<api::StateResponse> {
        let task = self.0.task(&req.id)?;
        let p = task.process(&req.exec_id)?;
        let mut r = api::StateResponse::new();
        r.id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.bundle = task.bundle.display().to_string();
        r.pid = p.pid();
        let phase = p.phase();
        r.status = phase_status(phase, *lock(&task.paused)).into();
        r.stdin = p.io.stdin.clone();
        r.stdout = p.io.stdout.clone();
        r.stderr = p.io.stderr.clone();
        r.terminal = p.io.terminal;
        if let Phase::Stopped { status, at } = phase {
            r.exit_status = status;
            r.exited_at = MessageField::some(to_timestamp(at));
        }
        Ok(r)
    }

    fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        if self.0.closing.load(Ordering::SeqCst) {
            return Err(precondition("this shim is shutting down"));
        }
        if lock(&self.0.tasks).contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {:?} already exists", req.id),
            ));
        }
        self.0.creating.fetch_add(1, Ordering::SeqCst);
        let created = self.0.create_task(&req).and_then(|(task, pid)| {
            let mut tasks = lock(&self.0.tasks);
            if tasks.contains_key(&req.id) {
                drop(tasks);
                self.0.remove(&task);
                bail!("container {:?} already exists", req.id);
            }
            tasks.insert(req.id.clone(), task.clone());
            Ok((task, pid))
        });
        self.0.creating.fetch_sub(1, Ordering::SeqCst);
        let (task, pid) = created.map_err(failed)?;
        // From now on: a created init that is killed before start ends too.
        if let Ok(agent) = self.0.agent() {
            self.0.watch(task.clone(), task.init.clone(), agent);
        }
        let mut e = TaskCreate::new();
        e.container_id = req.id.clone();
        e.bundle = req.bundle.clone();
        e.rootfs = req.rootfs.clone();
        let mut io = TaskIO::new();
        io.stdin = req.stdin.clone();
        io.stdout = req.stdout.clone();
        io.stderr = req.stderr.clone();
        io.terminal = req.terminal;
        e.io = MessageField::some(io);
        e.pid = pid;
        self.0.publisher.publish(Event::Create(e));
        let mut r = api::CreateTaskResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> ttrpc::Result<api::StartResponse> {
        let task = self.0.task(&req.id)?;
        let p = task.process(&req.exec_id)?;
        if p.phase() != Phase::Created {
            return Err(precondition(format!(
                "process {:?} of {:?} was started already",
                req.exec_id, req.id
            )));
        }
        let agent = self.0.agent()?;
        if req.exec_id.is_empty() {
            // The exit watcher waits for this, so that TaskStart precedes TaskExit.
            let _starting = lock(&p.starting);
            agent
                .start_container(&req.id)
                .map_err(|e| failed(e.into()))?;
            {
                let mut phase = lock(&p.phase);
                if *phase == Phase::Created {
                    *phase = Phase::Running;
                }
            }
            let state = json_state(&req.id, "running", p.pid(), &task.bundle, &task.raw_spec);
            crate::cli::runc::hooks::run_or_warn(
                &task.raw_spec,
                crate::cli::runc::hooks::Kind::Poststart,
                &state,
            );
            self.0.watch_oom(task.clone(), agent);
            let mut e = TaskStart::new();
            e.container_id = req.id.clone();
            e.pid = p.pid();
            self.0.publisher.publish(Event::Start(e));
        } else {
            if let Err(e) = self.0.start_exec(&task, &p, &agent) {
                // It never ran: whoever waits for it learns so (as runc's shim, 255).
                p.finish(255);
                return Err(failed(e));
            }
            *lock(&p.phase) = Phase::Running;
            let mut e = TaskExecStarted::new();
            e.container_id = req.id.clone();
            e.exec_id = req.exec_id.clone();
            e.pid = p.pid();
            self.0.publisher.publish(Event::ExecStarted(e));
            self.0.watch(task.clone(), p.clone(), agent);
        }
        let mut r = api::StartResponse::new();
        r.pid = p.pid();
        Ok(r)
    }

    fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        let task = self.0.task(&req.id)?;
        let p = task.process(&req.exec_id)?;
        let (status, at) = match p.phase() {
            Phase::Stopped { status, at } => (status, at),
            Phase::Created if !req.exec_id.is_empty() => (0, p.finish(0)),
            Phase::Created => {
                // Never started: it ends here, as runc's delete of a created container.
                if let Ok(agent) = self.0.agent() {
                    let _ = agent.signal(&req.id, "", Signal::SIGKILL as i32);
                }
                (128 + Signal::SIGKILL as u32, SystemTime::now())
            }
            Phase::Running => {
                return Err(precondition(format!(
                    "process {:?} of {:?} is running: kill it first",
                    req.exec_id, req.id
                )))
            }
        };
        if req.exec_id.is_empty() {
            let running = lock(&task.execs)
                .values()
                .any(|e| e.phase() == Phase::Running);
            if running {
                if let Ok(agent) = self.0.agent() {
                    let _ = agent.signal_all(&req.id, Signal::SIGKILL as i32);
                }
            }
            self.0.remove(&task);
            // Waiters on execs that never started (or whose VM is gone) are released.
            for e in lock(&task.execs).values() {
                if !matches!(e.phase(), Phase::Stopped { .. }) {
                    e.finish(128 + Signal::SIGKILL as u32);
                }
            }
            if !matches!(p.phase(), Phase::Stopped { .. }) {
                p.finish(status);
            }
            let mut e = TaskDelete::new();
            e.container_id = req.id.clone();
            e.id = req.id.clone();
            e.pid = p.pid();
            e.exit_status = status;
            e.exited_at = MessageField::some(to_timestamp(at));
            self.0.publisher.publish(Event::Delete(e));
        } else {
            lock(&task.execs).remove(&req.exec_id);
        }
        let mut r = api::DeleteResponse::new();
        r.pid = p.pid();
        r.exit_status = status;
        r.exited_at = MessageField::some(to_timestamp(at));
        Ok(r)
    }

    fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> ttrpc::Result<api::PidsResponse> {
        self.0.task(&req.id)?;
        let procs = self
            .0
            .agent()?
            .processes(&req.id)
            .map_err(|e| failed(e.into()))?;
        let mut r = api::PidsResponse::new();
        for (pid, _) in procs {
            let mut info = containerd_shim_protos::types::task::ProcessInfo::new();
            info.pid = pid;
            r.processes.push(info);
        }
        Ok(r)
    }

    fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<Empty> {
        self.pause_or_resume(&req.id, true)
    }

    fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        self.pause_or_resume(&req.id, false)
    }

    fn checkpoint(&self, _: &TtrpcContext, _: api::CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by hull (the container runs in a microVM)",
        ))
    }

    fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        let task = self.0.task(&req.id)?;
        let p = task.process(&req.exec_id)?;
        match p.phase() {
            Phase::Stopped { .. } if !req.all => {
                return Err(not_found(format!(
                    "process {:?} of {:?} has already finished",
                    req.exec_id, req.id
                )))
            }
            Phase::Created if !req.exec_id.is_empty() => {
                return Err(precondition(format!(
                    "exec {:?} of {:?} has not started",
                    req.exec_id, req.id
                )))
            }
            _ => {}
        }
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("bad signal {}", req.signal)))?;
        let agent = self.0.agent()?;
        let r = if req.all {
            agent.signal_all(&req.id, signal)
        } else {
            agent.signal(&req.id, &req.exec_id, signal)
        };
        r.map_err(|e| failed(e.into()))?;
        Ok(Empty::new())
    }

    fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<Empty> {
        let task = self.0.task(&req.id)?;
        if req.exec_id.is_empty() || req.exec_id.len() > 1024 {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "an exec needs an id (at most 1024 bytes)",
            ));
        }
        if task.init.phase() != Phase::Running {
            return Err(precondition(format!(
                "container {:?} is not running",
                req.id
            )));
        }
        let paths = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        paths.check().map_err(failed)?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let process: Value = serde_json::from_slice(&spec).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("the exec's process spec is not JSON: {e}"),
            )
        })?;
        if process["terminal"].as_bool().unwrap_or(false) != req.terminal {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "the exec's terminal and its process.terminal disagree",
            ));
        }
        {
            let mut execs = lock(&task.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} already exists", req.exec_id),
                ));
            }
            execs.insert(
                req.exec_id.clone(),
                Arc::new(Proc::new(&req.exec_id, paths, spec)),
            );
        }
        let mut e = TaskExecAdded::new();
        e.container_id = req.id.clone();
        e.exec_id = req.exec_id.clone();
        self.0.publisher.publish(Event::ExecAdded(e));
        Ok(Empty::new())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> ttrpc::Result<Empty> {
        let task = self.0.task(&req.id)?;
        task.process(&req.exec_id)?;
        let (rows, cols) = (
            u16::try_from(req.height).unwrap_or(u16::MAX),
            u16::try_from(req.width).unwrap_or(u16::MAX),
        );
        self.0
            .agent()?
            .resize_pty(&req.id, &req.exec_id, rows, cols)
            .map_err(|e| failed(e.into()))?;
        Ok(Empty::new())
    }

    fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<Empty> {
        let task = self.0.task(&req.id)?;
        let p = task.process(&req.exec_id)?;
        if req.stdin {
            if let Some(r) = lock(&p.relay).as_mut() {
                r.close_stdin(p.io.terminal);
            }
            if p.io.terminal {
                let _ = self.0.agent()?.close_stdin(&req.id, &req.exec_id);
            }
        }
        Ok(Empty::new())
    }

    fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> ttrpc::Result<Empty> {
        self.0.task(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("the resources are not OCI LinuxResources JSON: {e}"),
            )
        })?;
        self.0
            .agent()?
            .update(&req.id, resources)
            .map_err(|e| failed(e.into()))?;
        Ok(Empty::new())
    }

    fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> ttrpc::Result<api::WaitResponse> {
        let task = self.0.task(&req.id)?;
        let p = task.process(&req.exec_id)?;
        let (status, at) = p.wait();
        let mut r = api::WaitResponse::new();
        r.exit_status = status;
        r.exited_at = MessageField::some(to_timestamp(at));
        Ok(r)
    }

    fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> ttrpc::Result<api::StatsResponse> {
        self.0.task(&req.id)?;
        let v = self
            .0
            .agent()?
            .stats(&req.id)
            .map_err(|e| failed(e.into()))?;
        let m = metrics(&v);
        let mut any = Any::new();
        any.type_url = "io.containerd.cgroups.v2.Metrics".into();
        any.value = m.write_to_bytes().map_err(|e| failed(e.into()))?;
        let mut r = api::StatsResponse::new();
        r.stats = MessageField::some(any);
        Ok(r)
    }

    fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let mut r = api::ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.task_pid = lock(&self.0.tasks)
            .get(&req.id)
            .map(|t| t.init.pid())
            .unwrap_or_default();
        r.version = "2".into();
        Ok(r)
    }

    fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> ttrpc::Result<Empty> {
        // The pod's shim stays while any of its containers does (or is being created).
        if self.0.empty(0) {
            // From here on, `start` of a new container finds no shim and starts its own.
            self.0.closing.store(true, Ordering::SeqCst);
            let _ = std::fs::remove_file(&self.0.socket);
            let _ = lock(&self.0.exit).send(());
        }
        Ok(Empty::new())
    }
}

impl Service {
    fn pause_or_resume(&self, id: &str, pause: bool) -> ttrpc::Result<Empty> {
        let task = self.0.task(id)?;
        if task.init.phase() != Phase::Running {
            return Err(precondition(format!("container {id:?} is not running")));
        }
        self.0
            .agent()?
            .pause(id, pause)
            .map_err(|e| failed(e.into()))?;
        *lock(&task.paused) = pause;
        if pause {
            let mut e = TaskPaused::new();
            e.container_id = id.to_string();
            self.0.publisher.publish(Event::Paused(e));
        } else {
            let mut e = TaskResumed::new();
            e.container_id = id.to_string();
            self.0.publisher.publish(Event::Resumed(e));
        }
        Ok(Empty::new())
    }
}

/// Runs the shim: serves the Task service on its socket until containerd shuts it down.
pub fn serve(a: &Args) -> Result<()> {
    super::check(a)?;
    let socket = std::env::var_os("HULL_SHIM_SOCKET")
        .map(PathBuf::from)
        .context("HULL_SHIM_SOCKET is not set: containerd starts the shim through `start`")?;
    let group = std::env::var("HULL_SHIM_GROUP").unwrap_or_else(|_| a.id.clone());
    // Out of containerd's process group and session: its signals are not ours.
    let _ = nix::unistd::setsid();
    init_logging(a.debug);
    let config = Config::load(None).context("loading the hull config")?;
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").unwrap_or_else(|_| format!("{}.ttrpc", a.address));
    let (tx, rx) = std::sync::mpsc::channel();
    let shim = Arc::new(Shim {
        namespace: a.namespace.clone(),
        group,
        config,
        publisher: Publisher::new(ttrpc_address, a.namespace.clone()),
        pod: Mutex::new(None),
        agent: Mutex::new(None),
        vmm_pid: AtomicU32::new(0),
        tasks: Mutex::new(HashMap::new()),
        creating: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
        socket: socket.clone(),
        exit: Mutex::new(tx),
    });
    let mut methods = create_task(Arc::new(Service(shim.clone())));
    // containerd 1.6 and 1.7 call the Task service as containerd.task.v2 (2.x as v3);
    // the messages are the same: a second set of handlers under the v2 names.
    let v2: Vec<_> = create_task(Arc::new(Service(shim.clone())))
        .into_iter()
        .map(|(k, h)| (k.replace(".task.v3.", ".task.v2."), h))
        .collect();
    methods.extend(v2);
    let _ = std::fs::remove_file(&socket);
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .with_context(|| format!("listening on {}", socket.display()))?
        .set_thread_count_max(64)
        .register_service(methods);
    server.start().context("starting the ttrpc server")?;
    let _ = rx.recv();
    shim.publisher.flush(Duration::from_secs(5));
    // Let the Shutdown reply go out; handlers still blocked (a Wait on a process of a
    // container already deleted) end with the process.
    std::thread::sleep(Duration::from_millis(20));
    std::process::exit(0)
}

/// Logs to the `log` FIFO containerd reads in the bundle directory (the working
/// directory), else nowhere.
fn init_logging(debug: bool) {
    let level = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::new(format!("hull_shim={level}"));
    let log = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log");
    if let Ok(f) = log {
        // Blocking from here: a full FIFO should slow logging, not drop it.
        let _ = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        );
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(Mutex::new(f))
            .try_init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_sized_from_cris_sandbox_annotations() {
        let config = Config::default();
        let spec = |ann: serde_json::Value| -> oci_spec::runtime::Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2", "annotations": ann,
                "process": {"args": ["pause"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "root": {"path": "rootfs"}
            }))
            .unwrap()
        };
        let (v, m) = pod_size(&spec(serde_json::json!({})), &config);
        assert_eq!((v, m), (config.default_vcpus, config.default_memory_mib));
        let (_, m) = pod_size(
            &spec(serde_json::json!({"io.kubernetes.cri.sandbox-memory": "1073741824"})),
            &config,
        );
        assert_eq!(m, 1024 + bundle::VM_OVERHEAD_MIB);
        let (v, _) = pod_size(
            &spec(serde_json::json!({
                "io.kubernetes.cri.sandbox-cpu-quota": "50000",
                "io.kubernetes.cri.sandbox-cpu-period": "100000",
                "io.kubernetes.cri.sandbox-memory": "garbage"})),
            &config,
        );
        assert_eq!(v, 1);
        assert!(
            pod_size(
                &spec(serde_json::json!({"io.kubernetes.cri.sandbox-cpu-quota": "99999999999"})),
                &config
            )
            .0 <= std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
                .max(config.default_vcpus)
        );
    }
}
