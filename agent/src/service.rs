//! The ttrpc face of the agent: a thin translation onto `container::Manager`.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use hull_protocol::agent::{
    ContainerRequest, CreateContainerRequest, CreateContainerResponse, Empty, ExecProcessRequest,
    ExecProcessResponse, ListProcessesResponse, ProcessInfo, ProcessRequest, ResizePtyRequest,
    SignalProcessRequest, StatsResponse, UpdateContainerRequest, VersionResponse,
    WaitProcessResponse,
};
use hull_protocol::agent_ttrpc::{create_agent, Agent};
use hull_protocol::{AGENT_PORT, PROTOCOL_VERSION};
use ttrpc::{Code, Status, TtrpcContext};

use crate::container::{Manager, StdioPorts};
use crate::reaper::Exit;

struct Service {
    manager: Manager,
    shutdown: Mutex<Sender<()>>,
}

/// Keeps the server alive until the host asks the agent to shut down.
pub struct Running {
    _server: ttrpc::Server,
    shutdown: Receiver<()>,
}

impl Running {
    pub fn wait(&self) {
        let _ = self.shutdown.recv();
    }
}

/// Listens on the agent's vsock port and serves the API on its own threads.
pub fn serve() -> Result<Running> {
    let (tx, rx) = channel();
    let service = Arc::new(Service {
        manager: Manager::default(),
        shutdown: Mutex::new(tx),
    });
    let mut server = ttrpc::Server::new()
        .bind(&format!("vsock://-1:{AGENT_PORT}"))
        .with_context(|| format!("listening on vsock port {AGENT_PORT}"))?
        .register_service(create_agent(service));
    server.start().context("starting the ttrpc server")?;
    Ok(Running {
        _server: server,
        shutdown: rx,
    })
}

fn failed(e: anyhow::Error) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::UNKNOWN, format!("{e:#}")))
}

fn stdio_ports(stdio: Option<&hull_protocol::agent::Stdio>) -> StdioPorts {
    stdio
        .map(|s| StdioPorts {
            stdin: s.stdin_port,
            stdout: s.stdout_port,
            stderr: s.stderr_port,
            terminal: s.terminal,
        })
        .unwrap_or_default()
}

impl Agent for Service {
    fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let pid = self
            .manager
            .create(
                &req.container_id,
                &req.oci_spec,
                stdio_ports(req.stdio.as_ref()),
            )
            .map_err(failed)?;
        Ok(CreateContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn start_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.manager.start(&req.container_id).map_err(failed)?;
        Ok(Empty::new())
    }

    fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let pid = self
            .manager
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.process,
                stdio_ports(req.stdio.as_ref()),
            )
            .map_err(failed)?;
        Ok(ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.manager
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .map_err(failed)?;
        Ok(Empty::new())
    }

    fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let exit = self
            .manager
            .wait(&req.container_id, &req.exec_id)
            .map_err(failed)?;
        let (exit_code, signal) = match exit {
            Exit::Code(c) => (c, 0),
            Exit::Signal(s) => (0, s as u32),
        };
        Ok(WaitProcessResponse {
            exit_code,
            signal,
            ..Default::default()
        })
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.manager
            .close_stdin(&req.container_id, &req.exec_id)
            .map_err(failed)?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.manager
            .resize_pty(&req.container_id, &req.exec_id, req.rows, req.cols)
            .map_err(failed)?;
        Ok(Empty::new())
    }

    fn remove_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.manager.remove(&req.container_id).map_err(failed)?;
        Ok(Empty::new())
    }

    fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let processes = self
            .manager
            .processes(&req.container_id)
            .map_err(failed)?
            .into_iter()
            .map(|(pid, cmd)| ProcessInfo {
                pid: pid as u32,
                cmd,
                ..Default::default()
            })
            .collect();
        Ok(ListProcessesResponse {
            processes,
            ..Default::default()
        })
    }

    fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.manager
            .pause(&req.container_id, true)
            .map_err(failed)?;
        Ok(Empty::new())
    }

    fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.manager
            .pause(&req.container_id, false)
            .map_err(failed)?;
        Ok(Empty::new())
    }

    fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.manager
            .update(&req.container_id, &req.resources)
            .map_err(failed)?;
        Ok(Empty::new())
    }

    fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsResponse> {
        let values = self.manager.stats(&req.container_id).map_err(failed)?;
        Ok(StatsResponse {
            values,
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        self.manager.remove_all();
        // The host may kill the VM as soon as this call is answered.
        nix::unistd::sync();
        let _ = self
            .shutdown
            .lock()
            .map_err(|_| Status::default())
            .map(|tx| tx.send(()));
        Ok(Empty::new())
    }

    fn version(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        })
    }
}
