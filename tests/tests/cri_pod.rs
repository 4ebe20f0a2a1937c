//! Kubernetes' path: containerd 1.6's CRI plugin (the kubelet's API), with a RuntimeClass
//! handler `hull` of runtime type `io.containerd.hull.v2`, driven by a small CRI client.
//! A pod's containers run in the pod's one microVM.

use std::path::Path;

use hull_tests::containerd::Containerd;
use hull_tests::{assert_no_trace, eventually, processes_naming};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

fn client(rt: &tokio::runtime::Runtime, socket: &Path) -> RuntimeServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = rt
        .block_on(
            Endpoint::try_from("http://[::]")
                .expect("an endpoint")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(socket).await?,
                        ))
                    }
                })),
        )
        .expect("connecting to containerd's CRI");
    RuntimeServiceClient::new(channel)
}

/// Host network: the test needs no CNI plugins (pod networking is not Hull's yet).
fn namespaces() -> Option<NamespaceOption> {
    Some(NamespaceOption {
        network: NamespaceMode::Node as i32,
        ..Default::default()
    })
}

fn container(name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: "localhost/busybox:latest".into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: namespaces(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn a_cri_pod_runs_its_containers_in_one_vm() {
    let c = Containerd::start_with_cri("cri");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut cri = client(&rt, c.socket());
    let uid = format!("uid{}", std::process::id());
    let logs = c.state_dir().join("pod-logs");
    std::fs::create_dir_all(&logs).expect("creating the pod's log directory");
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "hullpod".into(),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "hullpod".into(),
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: namespaces(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = rt
        .block_on(cri.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: "hull".into(),
        }))
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.diagnostics()))
        .into_inner()
        .pod_sandbox_id;
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        let id = rt
            .block_on(cri.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container(name, &["sleep", "1000"])),
                sandbox_config: Some(pod_config.clone()),
            }))
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", c.diagnostics()))
            .into_inner()
            .container_id;
        rt.block_on(cri.start_container(StartContainerRequest {
            container_id: id.clone(),
        }))
        .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", c.diagnostics()));
        ids.push(id);
    }
    let probe = |cri: &mut RuntimeServiceClient<Channel>, id: &str| {
        let r = rt
            .block_on(
                cri.exec_sync(ExecSyncRequest {
                    container_id: id.into(),
                    cmd: [
                        "sh",
                        "-c",
                        "cat /proc/sys/kernel/random/boot_id; readlink /proc/self/ns/mnt; exit 3",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                    timeout: 60,
                }),
            )
            .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", c.diagnostics()))
            .into_inner();
        assert_eq!(r.exit_code, 3, "{r:?}");
        String::from_utf8_lossy(&r.stdout).into_owned()
    };
    let (a, b) = (probe(&mut cri, &ids[0]), probe(&mut cri, &ids[1]));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[0], b[0], "the pod's containers run in different VMs");
    assert_ne!(a[1], b[1], "the pod's containers share a mount namespace");
    let status = rt
        .block_on(cri.container_status(ContainerStatusRequest {
            container_id: ids[0].clone(),
            verbose: false,
        }))
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("a status");
    assert_eq!(
        status.state,
        ContainerState::ContainerRunning as i32,
        "{status:?}"
    );
    // One shim, one VM for the pod.
    let address = format!("-address {}", c.socket().display());
    let shims = processes_naming(&address);
    assert_eq!(shims.len(), 1, "shims: {shims:?}\n{}", c.diagnostics());
    for id in &ids {
        rt.block_on(cri.stop_container(StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        }))
        .expect("StopContainer");
        rt.block_on(cri.remove_container(RemoveContainerRequest {
            container_id: id.clone(),
        }))
        .expect("RemoveContainer");
    }
    rt.block_on(cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    }))
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", c.diagnostics()));
    rt.block_on(cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    }))
    .expect("RemovePodSandbox");
    assert!(
        eventually(20, || processes_naming(&address).is_empty()),
        "the pod's shim outlived the pod\n{}",
        c.diagnostics()
    );
    let sandbox =
        hull_shim::shimv2::sandbox_dir(&hull_shim::config::Config::default(), "k8s.io", &pod);
    assert!(!sandbox.exists(), "{} was left behind", sandbox.display());
    assert_no_trace(&sandbox.display().to_string());
}
