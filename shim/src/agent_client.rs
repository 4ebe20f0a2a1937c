//! The host's client of the guest agent (ttrpc over hybrid vsock).

use std::os::fd::IntoRawFd;
use std::time::Duration;

use hull_protocol::agent::{
    ContainerRequest, CreateContainerRequest, Empty, ExecProcessRequest, ProcessRequest,
    ResizePtyRequest, SignalProcessRequest, Stdio,
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
        let req = ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        self.inner
            .start_container(ctx(Some(CALL_TIMEOUT)), &req)
            .map(|_| ())
            .map_err(|e| call_error("start", e))
    }

    /// Starts `process` (the OCI process object, JSON) in running container `id`.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: Stdio,
    ) -> Result<(), AgentError> {
        let req = ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            process,
            stdio: protobuf::MessageField::some(stdio),
            ..Default::default()
        };
        self.inner
            .exec_process(ctx(Some(CALL_TIMEOUT)), &req)
            .map(|_| ())
            .map_err(|e| call_error("exec", e))
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal: signal as u32,
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
        Ok(if r.signal != 0 {
            ProcessExit::Signal(r.signal)
        } else {
            ProcessExit::Code(r.exit_code)
        })
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
        let req = ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        self.inner
            .remove_container(ctx(Some(CALL_TIMEOUT)), &req)
            .map(|_| ())
            .map_err(|e| call_error("remove", e))
    }

    /// Asks the guest to power off; it may go before it answers.
    pub fn shutdown(&self) {
        let _ = self
            .inner
            .shutdown(ctx(Some(Duration::from_secs(5))), &Empty::new());
    }
}
