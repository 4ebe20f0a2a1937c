//! The agent API through the host library, on a real microVM: exec into a running
//! container, signals, exit status of both.

use std::io::Read;
use std::path::Path;

use hull_protocol::agent::Stdio;
use hull_shim::agent_client::ProcessExit;
use hull_shim::config::Config;
use hull_shim::sandbox::{Sandbox, SandboxSpec};
use hull_shim::user::ResolvedUser;
use hull_tests::busybox;

fn collect(l: std::os::unix::net::UnixListener) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("stdio stream");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

#[test]
fn exec_joins_a_running_container_and_reports_its_own_exit() {
    let config = Config::load(None).expect("config");
    let id = format!("api-{}", std::process::id());
    let mut sb = Sandbox::new(
        &config,
        SandboxSpec {
            id,
            vcpus: 1,
            memory_mib: 256,
        },
    )
    .expect("sandbox");
    let rootfs = busybox().join("rootfs");
    sb.bind_into_share(&rootfs, Path::new("c1/rootfs"))
        .expect("bind");
    sb.boot().expect("boot");
    let agent = sb.agent().unwrap().clone();
    let user = ResolvedUser {
        uid: 0,
        gid: 0,
        additional_gids: vec![],
        home: "/root".into(),
    };
    let args = vec![
        "sh".to_string(),
        "-c".to_string(),
        "echo init-started; sleep 60".to_string(),
    ];
    let env = vec!["PATH=/bin:/usr/bin".to_string()];
    let spec = hull_shim::spec::default_spec(
        "c1/rootfs",
        "exec-test",
        &hull_shim::spec::ProcessSpec {
            args: &args,
            env: &env,
            cwd: "/",
            user: &user,
            terminal: false,
        },
    );
    let (port, l) = sb.listen_port().unwrap();
    let init_out = collect(l);
    let mut stdio = Stdio::new();
    stdio.stdout_port = port;
    agent
        .create_container("c1", serde_json::to_vec(&spec).unwrap(), stdio)
        .expect("create");
    agent.start_container("c1").expect("start");

    // An exec sees the container's pid namespace, hostname and rootfs.
    let mut process = spec["process"].clone();
    process["args"] = serde_json::json!([
        "sh",
        "-c",
        "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; exit 3"
    ]);
    let (port, l) = sb.listen_port().unwrap();
    let exec_out = collect(l);
    let mut stdio = Stdio::new();
    stdio.stdout_port = port;
    agent
        .exec("c1", "e1", serde_json::to_vec(&process).unwrap(), stdio)
        .expect("exec");
    assert_eq!(
        agent.wait("c1", "e1").expect("wait exec"),
        ProcessExit::Code(3)
    );
    assert_eq!(exec_out.join().unwrap(), "exec-test\nsleep 60 \n");

    // An exec of a missing command fails clearly; the container keeps running.
    process["args"] = serde_json::json!(["no-such-command"]);
    let err = agent
        .exec(
            "c1",
            "e2",
            serde_json::to_vec(&process).unwrap(),
            Stdio::new(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("no-such-command"), "{err}");

    // SIGKILL from outside the namespace ends the init: reported as the signal.
    agent.signal("c1", "", 9).expect("signal");
    assert_eq!(
        agent.wait("c1", "").expect("wait init"),
        ProcessExit::Signal(9)
    );
    assert_eq!(init_out.join().unwrap(), "init-started\n");
    agent.remove_container("c1").expect("remove");
    let dir = sb.dir().to_path_buf();
    sb.shutdown();
    assert!(!dir.exists(), "{} was left behind", dir.display());
}
