//! `hull` driven as runc is: the runtime spec's lifecycle, runc's error cases, the monitor
//! process that stands for the container (compared with what runc gives for the same
//! bundle), exec, the console socket, pause/resume/update/events, host cgroups. Every
//! container boots a real microVM.

use std::fs::File;
use std::io::{BufRead, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use hull_tests::{
    assert_container_gone, become_subreaper, bundle, eventually, hull_bin, processes_naming,
    read_pid, wait_pid, TempDir,
};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use serde_json::{json, Value};

/// `hull --root ROOT ARGS`, stdio captured.
fn hull(root: &Path, args: &[&str]) -> Output {
    Command::new(hull_bin())
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running hull")
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = hull(root, args);
    assert!(
        out.status.success(),
        "hull {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a failing command; returns its stderr.
fn fails(root: &Path, args: &[&str]) -> String {
    let out = hull(root, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "hull {args:?} should fail: {out:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn state(root: &Path, id: &str) -> Value {
    serde_json::from_str(&ok(root, &["state", id])).expect("state is JSON")
}

/// `hull create` with the container's stdout/stderr going to files in `dir`; returns
/// the monitor's pid from the pid file.
fn create(root: &Path, dir: &Path, id: &str) -> i32 {
    let pid_file = dir.join(format!("{id}.pid"));
    let status = Command::new(hull_bin())
        .arg("--root")
        .arg(root)
        .args(["create", "--bundle"])
        .arg(dir)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(File::create(dir.join(format!("{id}.out"))).unwrap())
        .stderr(File::create(dir.join(format!("{id}.err"))).unwrap())
        .status()
        .expect("running hull create");
    assert!(status.success(), "hull create {id}");
    read_pid(&pid_file)
}

fn args(spec: &mut Value, a: &[&str]) {
    spec["process"]["args"] = json!(a);
}

#[test]
fn lifecycle_follows_the_runtime_spec() {
    become_subreaper();
    let dir = TempDir::new("cli-life");
    let root = dir.path().join("state");
    let b = bundle(&dir, |s| {
        args(s, &["sh", "-c", "echo out; echo err >&2; exec sleep 60"])
    });
    let pid = create(&root, &b, "life");
    let st = state(&root, "life");
    assert_eq!(st["status"], "created");
    assert_eq!(st["pid"], pid);
    assert_eq!(st["id"], "life");
    assert_eq!(st["bundle"], b.display().to_string());
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    ok(&root, &["start", "life"]);
    assert_eq!(state(&root, "life")["status"], "running");
    assert!(eventually(10, || std::fs::read_to_string(
        b.join("life.out")
    )
    .unwrap_or_default()
        == "out\n"));
    assert!(eventually(10, || std::fs::read_to_string(
        b.join("life.err")
    )
    .unwrap_or_default()
        == "err\n"));
    let list = ok(&root, &["list", "--format", "json"]);
    assert!(list.contains("\"life\""), "{list}");
    let pids: Vec<u32> =
        serde_json::from_str(&ok(&root, &["ps", "--format", "json", "life"])).expect("ps json");
    assert_eq!(pids.len(), 1, "{pids:?}");

    ok(&root, &["kill", "life", "KILL"]);
    assert_eq!(
        wait_pid(pid),
        WaitStatus::Signaled(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL, false)
    );
    let st = state(&root, "life");
    assert_eq!(
        (st["status"].as_str(), st["pid"].as_i64()),
        (Some("stopped"), Some(0))
    );
    ok(&root, &["delete", "life"]);
    assert!(fails(&root, &["state", "life"]).contains("does not exist"));
    assert_container_gone(&root, "life");
}

#[test]
fn runc_errors_name_what_is_wrong_and_leave_nothing() {
    become_subreaper();
    let dir = TempDir::new("cli-errors");
    let root = dir.path().join("state");
    for cmd in [
        vec!["state", "nope"],
        vec!["start", "nope"],
        vec!["kill", "nope"],
        vec!["delete", "nope"],
        vec!["exec", "nope", "true"],
        vec!["pause", "nope"],
    ] {
        let err = fails(&root, &cmd);
        assert!(err.contains("does not exist"), "{cmd:?}: {err}");
    }
    // A bundle without config.json.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = fails(
        &root,
        &["create", "--bundle", empty.to_str().unwrap(), "bad"],
    );
    assert!(err.contains("config.json"), "{err}");
    assert_container_gone(&root, "bad");
    // A command the image does not have fails create, as with runc.
    let b = bundle(&dir, |s| args(s, &["no-such-command"]));
    let err = fails(&root, &["create", "--bundle", b.to_str().unwrap(), "nocmd"]);
    assert!(err.contains("executable file not found"), "{err}");
    assert_container_gone(&root, "nocmd");
    // A bind mount whose source is missing.
    let b2dir = TempDir::new("cli-errors-bind");
    let b2 = bundle(&b2dir, |s| {
        args(s, &["true"]);
        s["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}));
    });
    let err = fails(
        &root,
        &["create", "--bundle", b2.to_str().unwrap(), "nobind"],
    );
    assert!(err.contains("/no/such/dir"), "{err}");
    assert_container_gone(&root, "nobind");
    // A directory in the root that is not a container is not touched by delete.
    std::fs::create_dir_all(root.join("junk/keep")).unwrap();
    assert!(fails(&root, &["delete", "junk"]).contains("does not exist"));
    assert!(root.join("junk/keep").is_dir());
    ok(&root, &["delete", "--force", "never-was"]);
    // A bad signal and a bad flag.
    assert!(fails(&root, &["create", "--bogus", "x"]).contains("unknown flag --bogus"));

    // Double create, double start, delete while running.
    let b3dir = TempDir::new("cli-errors-run");
    let b3 = bundle(&b3dir, |s| args(s, &["sleep", "60"]));
    let pid = create(&root, &b3, "twice");
    let err = fails(
        &root,
        &["create", "--bundle", b3.to_str().unwrap(), "twice"],
    );
    assert!(err.contains("already exists"), "{err}");
    ok(&root, &["start", "twice"]);
    assert!(fails(&root, &["start", "twice"]).contains("already running"));
    assert!(fails(&root, &["kill", "twice", "NOSIG"]).contains("unknown signal"));
    assert!(fails(&root, &["delete", "twice"]).contains("not stopped"));
    ok(&root, &["delete", "--force", "twice"]);
    wait_pid(pid);
    assert_container_gone(&root, "twice");
}

/// Runs `bundle` under runc (create, start, then `then`) and returns how its init ended.
fn runc_status(b: &Path, id: &str, then: &[&str]) -> WaitStatus {
    let root = b.join("runc-state");
    let pid_file = b.join("runc.pid");
    let run = |a: &[&str]| {
        let st = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("running runc");
        assert!(st.success(), "runc {a:?}");
    };
    run(&[
        "create",
        "--bundle",
        b.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        id,
    ]);
    let pid: i32 = read_pid(&pid_file);
    run(&["start", id]);
    if !then.is_empty() {
        let mut a = then.to_vec();
        a.insert(1, id);
        run(&a);
    }
    let status = wait_pid(pid);
    run(&["delete", "--force", id]);
    status
}

fn hull_status(root: &Path, b: &Path, id: &str, then: &[&str]) -> WaitStatus {
    let pid = create(root, b, id);
    ok(root, &["start", id]);
    if !then.is_empty() {
        let mut a = then.to_vec();
        a.insert(1, id);
        ok(root, &a);
    }
    let status = wait_pid(pid);
    ok(root, &["delete", id]);
    assert_container_gone(root, id);
    status
}

/// The pid of a WaitStatus, made equal so statuses of different processes compare.
fn normalized(s: WaitStatus) -> String {
    match s {
        WaitStatus::Exited(_, c) => format!("exited {c}"),
        WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
        other => format!("{other:?}"),
    }
}

#[test]
fn the_monitor_ends_as_runcs_container_process_does() {
    become_subreaper();
    let dir = TempDir::new("cli-mirror");
    let root = dir.path().join("state");
    let cases: [(&[&str], &[&str], &str); 2] = [
        (&["sh", "-c", "exit 3"], &[], "exited 3"),
        (&["sleep", "60"], &["kill", "KILL"], "killed by SIGKILL"),
    ];
    for (i, (cmd, then, want)) in cases.iter().enumerate() {
        let bdir = TempDir::new(&format!("cli-mirror-{i}"));
        let b = bundle(&bdir, |s| args(s, cmd));
        let id = format!("mirror{i}");
        let runc = normalized(runc_status(&b, &id, then));
        let ours = normalized(hull_status(&root, &b, &id, then));
        assert_eq!((ours.as_str(), runc.as_str()), (*want, *want), "{cmd:?}");
    }
}

/// `hull exec --detach --pid-file PID_FILE ARGS`, with null stdio (a detached process
/// keeps what it is given, as with runc); returns the pid from the file.
fn exec_detached(root: &Path, pid_file: &Path, args: &[&str]) -> i32 {
    let st = Command::new(hull_bin())
        .arg("--root")
        .arg(root)
        .args(["exec", "--detach", "--pid-file"])
        .arg(pid_file)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "hull exec --detach {args:?}");
    read_pid(pid_file)
}

#[test]
fn exec_runs_in_the_container_attached_and_detached() {
    become_subreaper();
    let dir = TempDir::new("cli-exec");
    let root = dir.path().join("state");
    let b = bundle(&dir, |s| {
        args(s, &["sleep", "60"]);
        s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]});
    });
    let pid = create(&root, &b, "ex");
    ok(&root, &["start", "ex"]);

    // The container's seccomp profile holds for exec'd processes too.
    let out = hull(
        &root,
        &[
            "exec",
            "ex",
            "sh",
            "-c",
            "mkdir /tmp/d 2>&1; grep ^Seccomp: /proc/self/status",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "mkdir: can't create directory '/tmp/d': Permission denied\nSeccomp:\t2\n"
    );

    let out = hull(
        &root,
        &[
            "exec",
            "-e",
            "X=42",
            "--cwd",
            "/tmp",
            "ex",
            "sh",
            "-c",
            "echo $X $(pwd); exit 4",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42 /tmp\n");
    let out = hull(&root, &["exec", "--user", "1000:10", "ex", "id"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "uid=1000(hull) gid=10(wheel)\n"
    );

    // Detached, from a process file, as conmon and containerd's shim call it.
    let process = json!({"args": ["sh", "-c", "sleep 3; exit 6"], "cwd": "/", "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/bin:/usr/bin"], "terminal": false});
    let pfile = dir.path().join("process.json");
    std::fs::write(&pfile, process.to_string()).unwrap();
    let epid_file = dir.path().join("exec.pid");
    let epid = exec_detached(
        &root,
        &epid_file,
        &["--process", pfile.to_str().unwrap(), "ex"],
    );
    let pids: Vec<u32> =
        serde_json::from_str(&ok(&root, &["ps", "--format", "json", "ex"])).unwrap();
    assert!(pids.len() >= 2, "{pids:?}");
    assert_eq!(normalized(wait_pid(epid)), "exited 6");

    // An engine SIGKILLs the process standing for an exec (containerd's shim does): the
    // exec'd process in the guest goes with it.
    let epid = exec_detached(&root, &epid_file, &["ex", "sleep", "100"]);
    let count = || {
        serde_json::from_str::<Vec<u32>>(&ok(&root, &["ps", "--format", "json", "ex"]))
            .unwrap()
            .len()
    };
    assert_eq!(count(), 2);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(epid), Signal::SIGKILL).unwrap();
    wait_pid(epid);
    assert!(
        eventually(10, || count() == 1),
        "the exec outlived its monitor"
    );

    ok(&root, &["delete", "--force", "ex"]);
    wait_pid(pid);
    assert!(fails(&root, &["exec", "ex", "true"]).contains("does not exist"));
    assert_container_gone(&root, "ex");
}

/// Receives the pty master `hull` sends to a console socket.
fn receive_master(listener: &UnixListener) -> OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let (conn, _) = listener.accept().expect("accepting the console connection");
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .expect("recvmsg");
    for c in msg.cmsgs() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just gave us this descriptor.
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no descriptor came with the console message");
}

#[test]
fn a_terminal_goes_through_the_console_socket() {
    become_subreaper();
    let dir = TempDir::new("cli-tty");
    let root = dir.path().join("state");
    let b = bundle(&dir, |s| {
        args(s, &["sh", "-c", "tty; stty size; exit 3"]);
        s["process"]["terminal"] = json!(true);
    });
    let sock = dir.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let pid_file = dir.path().join("tty.pid");
    let mut create = Command::new(hull_bin())
        .arg("--root")
        .arg(&root)
        .args([
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "--console-socket",
        ])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("tty")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let master = receive_master(&listener);
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 99,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from memory we own.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
    assert!(create.wait().unwrap().success());
    let pid: i32 = read_pid(&pid_file);
    ok(&root, &["start", "tty"]);
    let mut out = Vec::new();
    let _ = File::from(master).read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    assert!(out.contains("33 99"), "{out:?}");
    assert_eq!(normalized(wait_pid(pid)), "exited 3");
    ok(&root, &["delete", "tty"]);
    assert_container_gone(&root, "tty");
}

#[test]
fn pause_resume_update_and_events() {
    become_subreaper();
    let dir = TempDir::new("cli-pause");
    let root = dir.path().join("state");
    let b = bundle(&dir, |s| {
        args(s, &["sleep", "60"]);
        s["linux"]["resources"] = json!({"memory": {"limit": 100 << 20}, "pids": {"limit": 30}});
    });
    let pid = create(&root, &b, "pz");
    ok(&root, &["start", "pz"]);
    let read = |file: &str| {
        let out = hull(
            &root,
            &["exec", "pz", "cat", &format!("/sys/fs/cgroup/{file}")],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(read("memory.max"), (100u64 << 20).to_string());
    assert_eq!(read("pids.max"), "30");

    ok(&root, &["pause", "pz"]);
    assert_eq!(state(&root, "pz")["status"], "paused");
    assert!(fails(&root, &["exec", "pz", "true"]).contains("paused"));
    assert!(fails(&root, &["pause", "pz"]).contains("not running"));
    ok(&root, &["resume", "pz"]);
    assert_eq!(state(&root, "pz")["status"], "running");

    ok(
        &root,
        &["update", "--memory", "64m", "--pids-limit", "20", "pz"],
    );
    assert_eq!(read("memory.max"), (64u64 << 20).to_string());
    assert_eq!(read("pids.max"), "20");
    let res = dir.path().join("res.json");
    std::fs::write(&res, r#"{"cpu": {"quota": 50000, "period": 100000}}"#).unwrap();
    ok(
        &root,
        &["update", "--resources", res.to_str().unwrap(), "pz"],
    );
    assert_eq!(read("cpu.max"), "50000 100000");
    let ev: Value = serde_json::from_str(&ok(&root, &["events", "--stats", "pz"])).unwrap();
    assert_eq!(ev["type"], "stats");
    assert_eq!(ev["data"]["memory"]["usage"]["limit"], 64u64 << 20);
    assert!(ev["data"]["pids"]["current"].as_u64().unwrap() >= 1, "{ev}");

    // An OOM kill in the container (64m limit, a 100m buffer) streams an `oom` event.
    let mut events = Command::new(hull_bin())
        .arg("--root")
        .arg(&root)
        .args(["events", "--interval", "1s", "pz"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(events.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains(r#""type":"stats""#), "{first}");
    let out = hull(
        &root,
        &[
            "exec",
            "pz",
            "sh",
            "-c",
            "dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null; echo $?",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "137\n");
    let oom = lines
        .map_while(Result::ok)
        .take(20)
        .find(|l| l.contains(r#""type":"oom""#));
    let _ = events.kill();
    let _ = events.wait();
    assert_eq!(oom.as_deref(), Some(r#"{"id":"pz","type":"oom"}"#));

    ok(&root, &["kill", "--all", "pz", "KILL"]);
    assert_eq!(normalized(wait_pid(pid)), "killed by SIGKILL");
    ok(&root, &["delete", "pz"]);
    assert_container_gone(&root, "pz");
}

#[test]
fn the_vm_runs_in_the_engines_host_cgroup() {
    become_subreaper();
    let dir = TempDir::new("cli-cgroup");
    let root = dir.path().join("state");
    let id = format!("cg{}", std::process::id());
    let b = bundle(&dir, |s| {
        args(s, &["sleep", "60"]);
        s["linux"]["cgroupsPath"] = json!(format!("/hull-test/{id}"));
    });
    let pid = create(&root, &b, &id);
    let st: Value =
        serde_json::from_slice(&std::fs::read(root.join(&id).join("state.json")).unwrap()).unwrap();
    let dirs: Vec<PathBuf> = st["host_cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect();
    assert!(!dirs.is_empty());
    for d in &dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
        let procs: Vec<i32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
        assert!(
            procs.contains(&pid),
            "the monitor is not in {}",
            d.display()
        );
        assert!(
            procs.len() >= 3,
            "the VM and helpers are not in {}: {procs:?}",
            d.display()
        );
    }
    ok(&root, &["delete", "--force", &id]);
    wait_pid(pid);
    for d in &dirs {
        assert!(!d.exists(), "{} was left behind", d.display());
        let _ = std::fs::remove_dir(d.parent().unwrap());
    }
    assert_container_gone(&root, &id);
}

/// Pids whose command line names `dir` (the VM and helpers of a sandbox).
fn processes_in(dir: &Path) -> Vec<i32> {
    processes_naming(&format!("{}/", dir.display()))
}

#[test]
fn a_dead_vmm_or_monitor_reads_as_stopped_and_delete_cleans_up() {
    become_subreaper();
    let dir = TempDir::new("cli-crash");
    let root = dir.path().join("state");
    let b = bundle(&dir, |s| args(s, &["sleep", "60"]));

    // The VMM dies: the container counts as killed, the monitor says so and cleans up.
    let pid = create(&root, &b, "vmmdies");
    ok(&root, &["start", "vmmdies"]);
    let sandbox = hull_tests::sandbox_dir(&root, "vmmdies");
    let qemu: Vec<i32> = processes_in(&sandbox)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("qemu"))
        })
        .collect();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu[0]), Signal::SIGKILL).unwrap();
    assert_eq!(normalized(wait_pid(pid)), "killed by SIGKILL");
    assert_eq!(state(&root, "vmmdies")["status"], "stopped");
    ok(&root, &["delete", "vmmdies"]);
    assert_container_gone(&root, "vmmdies");

    // The monitor dies: the container reads as stopped and delete removes what it left.
    let pid = create(&root, &b, "mondies");
    ok(&root, &["start", "mondies"]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    wait_pid(pid);
    assert_eq!(state(&root, "mondies")["status"], "stopped");
    ok(&root, &["delete", "mondies"]);
    // With the monitor dead, virtiofsd's sandbox child was re-parented to this process
    // (a subreaper, as engines are); reap it as they would.
    reap_zombies_named("virtiofsd");
    assert!(eventually(5, || processes_in(&hull_tests::sandbox_dir(
        &root, "mondies"
    ))
    .is_empty()));
    assert_container_gone(&root, "mondies");
}

/// Reaps this process's zombie children whose command is `comm`.
fn reap_zombies_named(comm: &str) {
    let me = std::process::id().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split(' ').collect();
        let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if fields.first() == Some(&"Z")
            && fields.get(1) == Some(&me.as_str())
            && name.trim() == comm
        {
            wait_pid(pid);
        }
    }
}

/// Hooks that write the state they were given to `out/<name>.json` (host side) or, for
/// startContainer (which runs in the container), to the container's /tmp.
fn add_hooks(spec: &mut Value, out: &Path) {
    let host = |name: &str| json!([{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}/{name}.json", out.display())]}]);
    spec["hooks"] = json!({
        "prestart": host("prestart"),
        "createRuntime": host("createRuntime"),
        "poststart": host("poststart"),
        "poststop": host("poststop"),
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "cat > /tmp/startContainer.json"],
            "env": ["HOOK=1"], "timeout": 10}],
    });
}

/// What each hook saw, in lifecycle order: its status, whether pid was the --pid-file
/// pid (0 for poststop), and whether id and bundle were right.
fn hook_summary(out: &Path, rootfs: &Path, id: &str, bundle: &Path, pid: i32) -> String {
    let mut s = String::new();
    for (name, dir) in [
        ("prestart", out),
        ("createRuntime", out),
        ("startContainer", &rootfs.join("tmp")),
        ("poststart", out),
        ("poststop", out),
    ] {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{name}.json"))) else {
            s += &format!("{name}: not run\n");
            continue;
        };
        let v: Value = serde_json::from_str(&text).expect("hook state is JSON");
        let pid_seen = match v["pid"].as_i64() {
            Some(0) => "0".to_string(),
            Some(p) if p == pid as i64 => "the container's".to_string(),
            other => format!("{other:?}"),
        };
        s += &format!(
            "{name}: {} pid {pid_seen} id {} bundle {}\n",
            v["status"],
            v["id"] == id,
            v["bundle"] == bundle.to_str().unwrap()
        );
    }
    s
}

#[test]
fn hooks_run_when_runcs_do_and_see_the_same_state() {
    become_subreaper();
    let dir = TempDir::new("cli-hooks");
    let mut summaries = Vec::new();
    for runtime in ["runc", "hull"] {
        let sub = TempDir::new(&format!("cli-hooks-{runtime}"));
        let out = dir.path().join(runtime);
        std::fs::create_dir_all(&out).unwrap();
        let b = bundle(&sub, |s| {
            args(s, &["sh", "-c", "sleep 30"]);
            s["root"]["readonly"] = json!(false);
            add_hooks(s, &out);
        });
        let root = sub.path().join("state");
        let pid_file = sub.path().join("pid");
        let program = if runtime == "runc" {
            PathBuf::from("runc")
        } else {
            hull_bin()
        };
        // The container keeps the stdio it was given: files, not pipes to wait on.
        let log = sub.path().join("calls.log");
        let call = |a: &[&str]| {
            let status = Command::new(&program)
                .arg("--root")
                .arg(&root)
                .args(a)
                .stdin(Stdio::null())
                .stdout(File::create(&log).unwrap())
                .stderr(File::create(&log).unwrap())
                .status()
                .unwrap();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(status.success(), "{runtime} {a:?}: {text}");
        };
        call(&[
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "hk",
        ]);
        let pid = read_pid(&pid_file);
        // Debian 12's runc 1.1 runs poststart hooks during create (fixed in runc 1.2);
        // the runtime spec, and hull, run them after start.
        if runtime == "hull" {
            assert!(!out.join("poststart.json").exists());
        }
        call(&["start", "hk"]);
        assert!(eventually(10, || b
            .join("rootfs/tmp/startContainer.json")
            .exists()));
        call(&["kill", "hk", "KILL"]);
        wait_pid(pid);
        call(&["delete", "hk"]);
        summaries.push(hook_summary(&out, &b.join("rootfs"), "hk", &b, pid));
    }
    let without_poststart = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("poststart"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        without_poststart(&summaries[0]),
        without_poststart(&summaries[1]),
        "runc's hooks (left) and hull's (right)"
    );
    assert!(
        summaries[1].contains("poststart: \"running\" pid the container's id true bundle true")
            && summaries[1].contains("poststop: \"stopped\""),
        "{}",
        summaries[1]
    );
}

#[test]
fn a_failing_hook_fails_its_step_and_leaves_nothing() {
    become_subreaper();
    let dir = TempDir::new("cli-hook-fail");
    let root = dir.path().join("state");
    let b = bundle(&dir, |s| {
        args(s, &["true"]);
        s["hooks"] = json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no GPU here >&2; exit 3"]}]});
    });
    let err = fails(&root, &["create", "--bundle", b.to_str().unwrap(), "bad"]);
    assert!(
        err.contains("createRuntime hook /bin/sh failed") && err.contains("no GPU here"),
        "{err}"
    );
    assert_container_gone(&root, "bad");

    // In the guest: a startContainer hook that times out fails start.
    let dir = TempDir::new("cli-hook-slow");
    let b = bundle(&dir, |s| {
        args(s, &["true"]);
        s["hooks"] = json!({"startContainer": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}],
            "createContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "cat > /tmp/created.json"]}]});
    });
    let pid = create(&root, &b, "slow");
    let created: Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("rootfs/tmp/created.json")).unwrap())
            .unwrap();
    assert_eq!(
        (created["status"].as_str(), created["id"].as_str()),
        (Some("creating"), Some("slow"))
    );
    let err = fails(&root, &["start", "slow"]);
    assert!(
        err.contains("startContainer hook /bin/sleep did not finish within its timeout (1 s)"),
        "{err}"
    );
    wait_pid(pid);
    ok(&root, &["delete", "slow"]);
    assert_container_gone(&root, "slow");
}

/// Debian 12's runc (1.1) has no time namespaces, so this one is not compared with runc.
#[test]
fn a_time_namespace_shifts_the_containers_clocks() {
    become_subreaper();
    let dir = TempDir::new("cli-timens");
    let root = dir.path().join("state");
    let b = bundle(&dir, |s| {
        // The init itself reads the clock (a shell builtin), not only its children.
        args(
            s,
            &[
                "sh",
                "-c",
                "read up rest < /proc/uptime; echo ${up%.*}; sleep 30",
            ],
        );
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "time"}));
        s["linux"]["timeOffsets"] = json!({"boottime": {"secs": 864000, "nanosecs": 0}});
    });
    let pid = create(&root, &b, "tns");
    ok(&root, &["start", "tns"]);
    let uptime = |text: &str| text.trim().parse::<u64>().unwrap_or(0);
    assert!(eventually(10, || uptime(
        &std::fs::read_to_string(b.join("tns.out")).unwrap_or_default()
    ) >= 864000));
    // An exec'd process joins the container's time namespace.
    let out = ok(&root, &["exec", "tns", "cut", "-d.", "-f1", "/proc/uptime"]);
    assert!(uptime(&out) >= 864000, "{out}");
    ok(&root, &["kill", "tns", "KILL"]);
    wait_pid(pid);
    ok(&root, &["delete", "tns"]);

    // Offsets without the namespace are refused, and nothing is left.
    let bad = TempDir::new("cli-timens-bad");
    let b = bundle(&bad, |s| {
        s["linux"]["timeOffsets"] = json!({"monotonic": {"secs": 5}});
    });
    let err = fails(&root, &["create", "--bundle", b.to_str().unwrap(), "tbad"]);
    assert!(err.contains("asks for no time namespace"), "{err}");
    assert_container_gone(&root, "tbad");
}

#[test]
fn exec_joins_the_user_namespace_and_maps_are_required() {
    become_subreaper();
    let dir = TempDir::new("cli-userns");
    let root = dir.path().join("state");
    let userns = |s: &mut Value| {
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "user"}));
    };
    let b = bundle(&dir, |s| {
        args(s, &["sleep", "30"]);
        userns(s);
        let map = json!([{"containerID": 0, "hostID": 200000, "size": 1000}]);
        s["linux"]["uidMappings"] = map.clone();
        s["linux"]["gidMappings"] = map;
    });
    let pid = create(&root, &b, "uns");
    ok(&root, &["start", "uns"]);
    let out = ok(
        &root,
        &["exec", "uns", "sh", "-c", "id -u; cat /proc/self/uid_map"],
    );
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words, ["0", "0", "200000", "1000"], "{out}");
    ok(&root, &["kill", "uns", "KILL"]);
    wait_pid(pid);
    ok(&root, &["delete", "uns"]);

    let bad = TempDir::new("cli-userns-bad");
    let b = bundle(&bad, userns);
    let err = fails(&root, &["create", "--bundle", b.to_str().unwrap(), "ubad"]);
    assert!(err.contains("gives no uidMappings/gidMappings"), "{err}");
    assert_container_gone(&root, "ubad");
}

/// Debian 12's runc (1.1) accepts and ignores domainname and personality (runc 1.2 applies
/// them), so these follow the runtime spec rather than that runc.
#[test]
fn domainname_and_personality_are_applied() {
    let dir = TempDir::new("cli-persona");
    let root = dir.path().join("state");
    let b = bundle(&dir, |s| {
        args(
            s,
            &["sh", "-c", "cat /proc/sys/kernel/domainname; uname -m"],
        );
        s["domainname"] = json!("probe.example");
        s["linux"]["personality"] = json!({"domain": "LINUX32"});
    });
    let out = hull(&root, &["run", "--bundle", b.to_str().unwrap(), "pers"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "probe.example\ni686\n",
        "{out:?}"
    );
    assert_container_gone(&root, "pers");
}
