//! containerd 1.6 from Debian, started by each test with its own root, state and socket,
//! running containers through Hull's own shim v2 (`--runtime io.containerd.hull.v2`,
//! `containerd-shim-hull-v2` on containerd's PATH). Every pod is a real microVM.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hull_tests::containerd::{out, Containerd, IMAGE};
use hull_tests::{assert_no_trace, eventually, processes_naming};

const RUNTIME: &str = "io.containerd.hull.v2";

/// What a running container's shim is made of, to check later that it is all gone.
struct ShimTrace {
    pid: i32,
    socket: String,
    pod_dir: PathBuf,
}

fn shim_trace(c: &Containerd, id: &str) -> ShimTrace {
    let bundle = c.bundle_dir(id);
    let pid: i32 = std::fs::read_to_string(bundle.join("shim.pid"))
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no shim.pid in {}\n{}", bundle.display(), c.diagnostics()));
    let socket = std::fs::read_to_string(bundle.join("address"))
        .expect("the shim's address file")
        .trim()
        .trim_start_matches("unix://")
        .to_string();
    // virtiofsd, the shim's child, names the pod's share.
    let pod_dir = processes_naming("--shared-dir=")
        .into_iter()
        .filter(|p| parent_of(*p) == Some(pid))
        .find_map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            String::from_utf8_lossy(&cmd)
                .split('\0')
                .find_map(|a| a.strip_prefix("--shared-dir="))
                .map(|s| Path::new(s).parent().map(Path::to_path_buf))?
        })
        .unwrap_or_else(|| panic!("no virtiofsd under shim {pid}\n{}", c.diagnostics()));
    ShimTrace {
        pid,
        socket,
        pod_dir,
    }
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    // A zombie has ended: containerd reaps its shims when it gets to it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

fn assert_all_gone(c: &Containerd, t: &ShimTrace) {
    assert!(
        eventually(20, || !alive(t.pid)),
        "shim {} is still running\n{}",
        t.pid,
        c.diagnostics()
    );
    assert!(
        !t.pod_dir.exists(),
        "{} was left behind",
        t.pod_dir.display()
    );
    assert!(
        !Path::new(&t.socket).exists(),
        "socket {} was left behind",
        t.socket
    );
    assert_no_trace(&t.pod_dir.display().to_string());
    assert_no_trace(&t.socket);
}

fn run_args<'a>(extra: &[&'a str], id: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "--runtime", RUNTIME];
    a.extend_from_slice(extra);
    a.push(IMAGE);
    a.push(id);
    a.extend_from_slice(cmd);
    a
}

#[test]
fn ctr_run_through_the_hull_shim() {
    let c = Containerd::start("hrun");
    let id = format!("hrun{}", std::process::id());
    let o = c.ctr(&run_args(
        &["--rm"],
        &id,
        &["sh", "-c", "echo hi; echo err >&2; exit 5"],
    ));
    assert_eq!(
        (o.status.code(), out(&o).as_str()),
        (Some(5), "hi\n"),
        "{o:?}\n{}",
        c.diagnostics()
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("err"), "{o:?}");
    // stdin reaches the container.
    let child = Command::new("timeout")
        .arg("120")
        .arg("ctr")
        .args(c.ctr_args())
        .args(run_args(
            &["--rm"],
            &format!("{id}b"),
            &["sh", "-c", "read x; echo got $x"],
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running ctr");
    use std::io::Write;
    let mut child = child;
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(out(&o), "got abc\n", "{o:?}\n{}", c.diagnostics());
    let address = format!("-address {}", c.socket().display());
    assert!(
        eventually(20, || processes_naming(&address).iter().all(|p| !alive(*p))),
        "a shim outlived its container\n{}",
        c.diagnostics()
    );
}

#[test]
fn ctr_run_t_gives_a_terminal_through_the_hull_shim() {
    let c = Containerd::start("htty");
    let id = format!("htty{}", std::process::id());
    let inner = format!(
        "stty rows 21 cols 71; timeout --foreground 60 ctr {} run -t --rm --runtime {RUNTIME} {IMAGE} {id} sh -c 'tty; i=0; while [ \"$(stty size)\" != \"21 71\" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; stty size; exit 6'",
        c.ctr_args().join(" "),
    );
    let o = Command::new("script")
        .env("SHELL", "/bin/sh")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("running script");
    let text = out(&o);
    assert_eq!(o.status.code(), Some(6), "{text}\n{}", c.diagnostics());
    assert!(
        text.contains("/dev/pts/0") && text.contains("21 71"),
        "{text}"
    );
}

#[test]
fn ctr_task_exec_ps_metrics_pause_kill_and_cleanup() {
    let c = Containerd::start("htask");
    let id = format!("htask{}", std::process::id());
    let o = c.ctr(&run_args(&["-d"], &id, &["sleep", "100"]));
    assert!(o.status.success(), "{o:?}\n{}", c.diagnostics());
    assert_eq!(c.task_status(&id), "RUNNING");
    let trace = shim_trace(&c, &id);
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
        "{o:?}\n{}",
        c.diagnostics()
    );
    let o = c.ctr(&["task", "ps", &id]);
    assert_eq!(out(&o).lines().count(), 2, "{o:?}");
    let o = c.ctr(&["task", "metrics", &id]);
    let text = out(&o);
    assert!(
        o.status.success() && text.contains("pids.current") && text.contains("memory.usage"),
        "{o:?}"
    );
    assert!(c.ctr(&["task", "pause", &id]).status.success());
    assert_eq!(c.task_status(&id), "PAUSED");
    assert!(c.ctr(&["task", "resume", &id]).status.success());
    assert_eq!(c.task_status(&id), "RUNNING");
    // A program the image lacks fails the exec, named.
    let o = c.ctr(&["task", "exec", "--exec-id", "e2", &id, "/no/such/program"]);
    assert!(!o.status.success(), "{o:?}");
    assert!(c.ctr(&["task", "kill", "-s", "KILL", &id]).status.success());
    assert!(eventually(20, || c.task_status(&id) == "STOPPED"));
    assert!(c.ctr(&["task", "delete", &id]).status.success());
    assert!(c.ctr(&["containers", "rm", &id]).status.success());
    assert_all_gone(&c, &trace);
}

#[test]
fn a_killed_vmm_is_reported_as_the_tasks_exit() {
    let c = Containerd::start("hvmm");
    let id = format!("hvmm{}", std::process::id());
    let o = c.ctr(&run_args(&["-d"], &id, &["sleep", "100"]));
    assert!(o.status.success(), "{o:?}\n{}", c.diagnostics());
    let trace = shim_trace(&c, &id);
    let vmm = processes_naming("qemu-system")
        .into_iter()
        .find(|p| parent_of(*p) == Some(trace.pid))
        .unwrap_or_else(|| panic!("no VMM under the shim\n{}", c.diagnostics()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        eventually(30, || c.task_status(&id) == "STOPPED"),
        "{}",
        c.diagnostics()
    );
    let o = c.ctr(&["task", "delete", &id]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("137") || o.stdout.is_empty());
    assert!(c.ctr(&["containers", "rm", &id]).status.success());
    assert_all_gone(&c, &trace);
}

#[test]
fn a_pods_containers_share_one_vm() {
    let c = Containerd::start("hpod");
    let pod = format!("hpod{}", std::process::id());
    let app = format!("{pod}app");
    let sandbox_ann = format!("io.kubernetes.cri.sandbox-id={pod}");
    let o = c.ctr(&run_args(
        &[
            "-d",
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            &sandbox_ann,
        ],
        &pod,
        &["sleep", "100"],
    ));
    assert!(o.status.success(), "{o:?}\n{}", c.diagnostics());
    let trace = shim_trace(&c, &pod);
    let o = c.ctr(&run_args(
        &[
            "-d",
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            &sandbox_ann,
        ],
        &app,
        &["sleep", "100"],
    ));
    assert!(o.status.success(), "{o:?}\n{}", c.diagnostics());
    assert_eq!(
        shim_trace(&c, &app).pid,
        trace.pid,
        "the pod's second container got its own shim"
    );
    let probe = |id: &str| {
        let o = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "probe",
            id,
            "sh",
            "-c",
            "cat /proc/sys/kernel/random/boot_id; readlink /proc/self/ns/mnt; hostname",
        ]);
        assert!(o.status.success(), "{o:?}\n{}", c.diagnostics());
        out(&o)
    };
    let (a, b) = (probe(&pod), probe(&app));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!(a[0], b[0], "the containers run in different VMs");
    assert_ne!(a[1], b[1], "the containers share a mount namespace");
    for id in [&app, &pod] {
        assert!(c.ctr(&["task", "kill", "-s", "KILL", id]).status.success());
        assert!(eventually(20, || c.task_status(id) == "STOPPED"));
        assert!(c.ctr(&["task", "delete", id]).status.success());
        assert!(c.ctr(&["containers", "rm", id]).status.success());
    }
    assert_all_gone(&c, &trace);
}

#[test]
fn a_missing_program_is_named_and_leaves_nothing() {
    let c = Containerd::start("hbad");
    let id = format!("hbad{}", std::process::id());
    let o = c.ctr(&run_args(&["--rm"], &id, &["/no/such/program"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/no/such/program"),
        "{o:?}\n{}",
        c.diagnostics()
    );
    let address = format!("-address {}", c.socket().display());
    assert!(
        eventually(20, || processes_naming(&address).iter().all(|p| !alive(*p))),
        "the shim outlived a failed create\n{}",
        c.diagnostics()
    );
    let pod = hull_shim::shimv2::sandbox_dir(
        &hull_shim::config::Config::default(),
        hull_tests::containerd::NAMESPACE,
        &id,
    );
    assert!(!pod.exists(), "{} was left behind", pod.display());
    assert_no_trace(&pod.display().to_string());
    assert_no_trace(&c.bundle_dir(&id).display().to_string());
}

#[test]
fn an_oom_kill_is_published_as_a_task_oom_event() {
    let c = Containerd::start("hoom");
    let id = format!("hoom{}", std::process::id());
    let o = c.ctr(&run_args(
        &["-d", "--memory-limit", "67108864"],
        &id,
        &["sleep", "100"],
    ));
    assert!(o.status.success(), "{o:?}\n{}", c.diagnostics());
    let trace = shim_trace(&c, &id);
    let log = c.state_dir().join("events.log");
    let mut events = Command::new("ctr")
        .args(c.ctr_args())
        .arg("events")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("running ctr events");
    // A 100 MiB buffer in a 64 MiB container: the guest's OOM killer ends dd.
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "hog",
        &id,
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null; echo $?",
    ]);
    assert_eq!(out(&o), "137\n", "{o:?}\n{}", c.diagnostics());
    let seen = eventually(20, || {
        std::fs::read_to_string(&log).is_ok_and(|t| {
            t.lines()
                .any(|l| l.contains("/tasks/oom") && l.contains(id.as_str()))
        })
    });
    let _ = events.kill();
    let _ = events.wait();
    assert!(
        seen,
        "no /tasks/oom event for {id}:\n{}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        c.diagnostics()
    );
    assert!(c.ctr(&["task", "kill", "-s", "KILL", &id]).status.success());
    assert!(eventually(20, || c.task_status(&id) == "STOPPED"));
    assert!(c.ctr(&["task", "delete", &id]).status.success());
    assert!(c.ctr(&["containers", "rm", &id]).status.success());
    assert_all_gone(&c, &trace);
}
