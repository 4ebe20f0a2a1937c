//! containerd 1.6 from Debian, started by each test with its own root, state and socket,
//! running containers through its stock runc shim pointed at `hull`
//! (`ctr run --runc-binary`). Every container is a real microVM.

use std::process::{Command, Stdio};

use hull_tests::containerd::{hull, out, runc_root, Containerd, IMAGE};
use hull_tests::{assert_container_gone, eventually};

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
