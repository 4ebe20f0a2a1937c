//! containerd 1.6 from Debian, started by each test with its own root, state and socket,
//! running containers through its stock runc shim pointed at `hull`
//! (`ctr run --runc-binary`). Every container is a real microVM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use hull_tests::{assert_container_gone, busybox, eventually, hull_bin};

const IMAGE: &str = "localhost/busybox:latest";
const NAMESPACE: &str = "hull-test";

struct Containerd {
    child: Child,
    state: PathBuf,
    socket: PathBuf,
}

impl Containerd {
    fn start(name: &str) -> Containerd {
        let root = PathBuf::from(format!("/var/tmp/hull-containerd-test/{name}"));
        let state = PathBuf::from(format!("/run/hull-ctd-{name}"));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let socket = state.join("containerd.sock");
        let config = state.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n",
                root.display(),
                state.display(),
                socket.display()
            ),
        )
        .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.join("containerd.log")).unwrap())
            .spawn()
            .expect("starting containerd (the README's set-up installs it)");
        let c = Containerd {
            child,
            state,
            socket,
        };
        assert!(
            eventually(30, || c.ctr(&["version"]).status.success()),
            "containerd did not come up"
        );
        let tar = busybox().join("busybox-oci.tar");
        let o = c.ctr(&[
            "images",
            "import",
            "--base-name",
            "localhost/busybox",
            tar.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "ctr images import: {o:?}");
        c
    }

    fn ctr_args(&self) -> Vec<String> {
        vec![
            "-a".into(),
            self.socket.display().to_string(),
            "-n".into(),
            NAMESPACE.into(),
        ]
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("120")
            .arg("ctr")
            .args(self.ctr_args())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr")
    }

    /// What to look at when a test fails: containerd's log, the shim's hull logs, the
    /// guest consoles of live sandboxes, and the processes involved.
    fn diagnostics(&self) -> String {
        let tail = |p: &Path, n: usize| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("loading plugin"))
                .collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let mut d = format!(
            "--- containerd.log\n{}\n",
            tail(&self.state.join("containerd.log"), 40)
        );
        let tasks = self
            .state
            .join("io.containerd.runtime.v2.task")
            .join(NAMESPACE);
        for e in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            let log = e.path().join("log.json");
            d += &format!("--- {}\n{}\n", log.display(), tail(&log, 40));
        }
        let vms = hull_tests::run_root().join("vm");
        for e in std::fs::read_dir(vms).into_iter().flatten().flatten() {
            let log = e.path().join("console.log");
            d += &format!("--- {}\n{}\n", log.display(), tail(&log, 20));
        }
        let ps = Command::new("ps")
            .args(["-eo", "pid,ppid,stat,etimes,args"])
            .output()
            .map(|o| out(&o))
            .unwrap_or_default();
        d += "--- processes\n";
        for l in ps.lines().filter(|l| {
            ["hull", "qemu", "virtiofsd", "vhost-device", "ctr", "shim"]
                .iter()
                .any(|n| l.contains(n))
        }) {
            d += l;
            d += "\n";
        }
        d
    }

    fn task_status(&self, id: &str) -> String {
        let o = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_string()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Where containerd's runc shim keeps runtime state for our namespace (its `--root`).
fn runc_root() -> PathBuf {
    Path::new("/run/containerd/runc").join(NAMESPACE)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn hull() -> String {
    hull_bin().display().to_string()
}

#[test]
fn ctr_run_through_the_runc_shim() {
    let c = Containerd::start("run");
    let id = format!("run{}", std::process::id());
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runc-binary",
        &hull(),
        IMAGE,
        &id,
        "sh",
        "-c",
        "echo hi; exit 5",
    ]);
    assert_eq!(
        (o.status.code(), out(&o).as_str()),
        (Some(5), "hi\n"),
        "{o:?}"
    );
    assert_container_gone(&runc_root(), &id);
}

#[test]
fn ctr_task_exec_ps_pause_and_kill() {
    let c = Containerd::start("task");
    let id = format!("task{}", std::process::id());
    let o = c.ctr(&[
        "run",
        "-d",
        "--runc-binary",
        &hull(),
        IMAGE,
        &id,
        "sleep",
        "100",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(c.task_status(&id), "RUNNING");
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo exec; exit 2",
    ]);
    assert_eq!(
        (o.status.code(), out(&o).as_str()),
        (Some(2), "exec\n"),
        "{o:?}"
    );
    let o = c.ctr(&["task", "ps", &id]);
    assert_eq!(out(&o).lines().count(), 2, "{o:?}");
    assert!(c.ctr(&["task", "pause", &id]).status.success());
    assert_eq!(c.task_status(&id), "PAUSED");
    assert!(c.ctr(&["task", "resume", &id]).status.success());
    assert_eq!(c.task_status(&id), "RUNNING");
    assert!(c.ctr(&["task", "kill", "-s", "KILL", &id]).status.success());
    assert!(eventually(20, || c.task_status(&id) == "STOPPED"));
    assert!(c.ctr(&["task", "delete", &id]).status.success());
    assert!(c.ctr(&["containers", "rm", &id]).status.success());
    assert_container_gone(&runc_root(), &id);
}

/// ctr sizes the terminal only after the task started (as it does with runc), so the
/// process waits a while for the size to arrive instead of racing it.
const WAIT_FOR_SIZE: &str =
    "i=0; while [ \"$(stty size 2>/dev/null)\" != \"20 70\" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done";

#[test]
fn ctr_run_t_gives_a_terminal() {
    let c = Containerd::start("tty");
    let id = format!("tty{}", std::process::id());
    let inner = format!(
        "stty rows 20 cols 70; timeout --foreground 60 ctr {} run -t --rm --runc-binary {} {IMAGE} {id} sh -c 'tty; {WAIT_FOR_SIZE}; stty size; exit 6'",
        c.ctr_args().join(" "),
        hull()
    );
    let o = Command::new("script")
        // The shell CI has (script runs $SHELL); timeout stays in the foreground so the
        // engine may set the terminal raw without SIGTTOU stopping it.
        .env("SHELL", "/bin/sh")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("running script");
    let text = out(&o);
    assert_eq!(o.status.code(), Some(6), "{text}\n{}", c.diagnostics());
    assert!(
        text.contains("/dev/pts/0") && text.contains("20 70"),
        "{text}"
    );
    assert_container_gone(&runc_root(), &id);
}
