//! The host's client of the guest agent (ttrpc over hybrid vsock).

use std::os::fd::IntoRawFd;
use std::time::Duration;

use hull_protocol::agent::{
    ContainerRequest, CreateContainerRequest, Empty, ExecProcessRequest, ProcessRequest,
    ResizePtyRequest, SignalProcessRequest, Stdio, UpdateContainerRequest,
};
use hull_protocol::agent_ttrpc;
use thiserror::Error;

use crate::vsock::HybridVsock;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot reach the guest agent: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Call(String),
}

/// How a process ended, as the agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    Code(i32),
    Signal(u32),
}

impl ProcessExit {
    /// The status a shell (and `docker run`) gives: the code, or 128 + signal.
    pub fn shell_status(self) -> i32 {
        match self {
            ProcessExit::Code(c) => c,
            ProcessExit::Signal(s) => 128 + s as i32,
        }
    }
}

#[derive(Clone)]
pub struct AgentClient {
    inner: agent_ttrpc::AgentClient,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn ctx(timeout: Option<Duration>) -> ttrpc::context::Context {
    match timeout {
        Some(t) => ttrpc::context::with_timeout(t.as_nanos() as i64),
        None => ttrpc::context::Context::default(),
    }
}

fn container(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.to_string(),
        ..Default::default()
    }
}

fn call_error(call: &str, e: ttrpc::Error) -> AgentError {
    match e {
        ttrpc::Error::RpcStatus(s) => AgentError::Call(s.message().to_string()),
        other => AgentError::Call(format!("agent {call} call failed: {other:?}")),
    }
}

impl AgentClient {
    pub fn connect(vsock: &HybridVsock) -> Result<AgentClient, AgentError> {
        let stream = vsock
            .connect(hull_protocol::AGENT_PORT, Duration::from_secs(10))
            .map_err(AgentError::Connect)?;
        let client = ttrpc::Client::new(stream.into_raw_fd())
            .map_err(|e| AgentError::Connect(std::io::Error::other(format!("{e:?}"))))?;
        Ok(AgentClient {
            inner: agent_ttrpc::AgentClient::new(client),
        })
    }

    pub fn create_container(
        &self,
        id: &str,
        spec: Vec<u8>,
        stdio: Stdio,
    ) -> Result<u32, AgentError> {
        let req = CreateContainerRequest {
            container_id: id.to_string(),
            oci_spec: spec,
            stdio: protobuf::MessageField::some(stdio),
            ..Default::default()
        };
        self.inner
            .create_container(ctx(Some(CALL_TIMEOUT)), &req)
            .map(|r| r.pid)
            .map_err(|e| call_error("create", e))
    }

    pub fn start_container(&self, id: &str) -> Result<(), AgentError> {
        self.inner
            .start_container(ctx(Some(CALL_TIMEOUT)), &container(id))
            .map(|_| ())
            .map_err(|e| call_error("start", e))
    }

    /// Starts `process` (the OCI process object, JSON) in running container `id`; returns
    /// its guest pid.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: Stdio,
    ) -> Result<u32, AgentError> {
        let req = ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            process,
            stdio: protobuf::MessageField::some(stdio),
            ..Default::default()
        };
        self.inner
            .exec_process(ctx(Some(CALL_TIMEOUT)), &req)
            .map(|r| r.pid)
            .map_err(|e| call_error("exec", e))
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> Result<(), AgentError> {
        self.signal_process(id, exec_id, signal, false)
    }

    /// Signals every process of container `id` (runc kill --all).
    pub fn signal_all(&self, id: &str, signal: i32) -> Result<(), AgentError> {
        self.signal_process(id, "", signal, true)
    }

    fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal: signal as u32,
            all,
            ..Default::default()
        };
        self.inner
            .signal_process(ctx(Some(CALL_TIMEOUT)), &req)
            .map(|_| ())
            .map_err(|e| call_error("signal", e))
    }

    /// Blocks until the process exits.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<ProcessExit, AgentError> {
        let req = ProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        let r = self
            .inner
            .wait_process(ctx(None), &req)
            .map_err(|e| call_error("wait", e))?;
        // The guest's word: only what a process can really end with is believed.
        match (r.signal, r.exit_code) {
            (0, c) if (0..=255).contains(&c) => Ok(ProcessExit::Code(c)),
            (s @ 1..=64, _) => Ok(ProcessExit::Signal(s)),
            (s, c) => Err(AgentError::Call(format!(
                "the agent reported an impossible exit (code {c}, signal {s})"
            ))),
        }
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = ProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.inner
            .close_stdin(ctx(Some(CALL_TIMEOUT)), &req)
            .map(|_| ())
            .map_err(|e| call_error("close-stdin", e))
    }

    pub fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), AgentError> {
        let req = ResizePtyRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            rows: rows.into(),
            cols: cols.into(),
            ..Default::default()
        };
        self.inner
            .resize_pty(ctx(Some(CALL_TIMEOUT)), &req)
            .map(|_| ())
            .map_err(|e| call_error("resize", e))
    }

    pub fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        self.inner
            .remove_container(ctx(Some(CALL_TIMEOUT)), &container(id))
            .map(|_| ())
            .map_err(|e| call_error("remove", e))
    }

    /// The container's processes: guest pid and command line.
    pub fn processes(&self, id: &str) -> Result<Vec<(u32, String)>, AgentError> {
        let r = self
            .inner
            .list_processes(ctx(Some(CALL_TIMEOUT)), &container(id))
            .map_err(|e| call_error("ps", e))?;
        Ok(r.processes.into_iter().map(|p| (p.pid, p.cmd)).collect())
    }

    /// Freezes (`true`) or thaws the container.
    pub fn pause(&self, id: &str, paused: bool) -> Result<(), AgentError> {
        let c = ctx(Some(CALL_TIMEOUT));
        let r = if paused {
            self.inner.pause_container(c, &container(id))
        } else {
            self.inner.resume_container(c, &container(id))
        };
        r.map(|_| ())
            .map_err(|e| call_error(if paused { "pause" } else { "resume" }, e))
    }

    /// Applies `resources` (OCI `linux.resources`, JSON) to the container's cgroup.
    pub fn update(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError> {
        let req = UpdateContainerRequest {
            container_id: id.to_string(),
            resources,
            ..Default::default()
        };
        self.inner
            .update_container(ctx(Some(CALL_TIMEOUT)), &req)
            .map(|_| ())
            .map_err(|e| call_error("update", e))
    }

    /// The container's cgroup counters (see StatsResponse in agent.proto).
    pub fn stats(&self, id: &str) -> Result<std::collections::HashMap<String, u64>, AgentError> {
        self.inner
            .stats_container(ctx(Some(CALL_TIMEOUT)), &container(id))
            .map(|r| r.values)
            .map_err(|e| call_error("stats", e))
    }

    /// Asks the guest to power off; it may go before it answers.
    pub fn shutdown(&self) {
        let _ = self
            .inner
            .shutdown(ctx(Some(Duration::from_secs(5))), &Empty::new());
    }
}
