//! Shared scaffolding for the integration tests: where the built `hull` and the test
//! image are, running `hull do`, and checking that a run left nothing behind.
//!
//! The tests boot real microVMs (QEMU microvm with our guest kernel and agent), so they
//! need the README's set-up (`scripts/setup.sh`, which `scripts/test.sh` runs first).

pub mod containerd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `hull` binary under test: `$HULL_BIN`, else the workspace's release build.
pub fn hull_bin() -> PathBuf {
    if let Ok(p) = std::env::var("HULL_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/hull");
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh (it builds it)",
        p.display()
    );
    p
}

/// The busybox image the set-up builds: `rootfs/`, `oci/`, `busybox-oci.tar`.
pub fn busybox() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("HULL_IMAGE_DIR").unwrap_or_else(|_| "/var/lib/hull/images/busybox".into()),
    );
    assert!(
        p.join("rootfs/bin/busybox").exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

pub fn run_root() -> PathBuf {
    PathBuf::from("/run/hull")
}

/// A scratch directory for one test, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("hull-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a test directory");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private, writable copy of the busybox rootfs.
pub fn rootfs_copy(dir: &TempDir) -> PathBuf {
    let dest = dir.path().join("rootfs");
    let ok = Command::new("cp")
        .args(["-a"])
        .arg(busybox().join("rootfs"))
        .arg(&dest)
        .status()
        .expect("running cp")
        .success();
    assert!(ok, "copying the busybox rootfs");
    dest
}

/// The result of one `hull do`, with the pid the run had (sandbox ids contain it).
pub struct Run {
    pub pid: u32,
    pub output: Output,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

/// Runs `hull [global] do ARGS`, feeding `stdin` if given, and asserts it left nothing.
pub fn hull_do_with(global: &[&str], args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut cmd = Command::new(hull_bin());
    cmd.args(global)
        .arg("do")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("starting hull");
    let pid = child.id();
    if let Some(input) = stdin {
        let mut s = child.stdin.take().expect("stdin");
        s.write_all(input).expect("writing stdin");
    }
    let output = child.wait_with_output().expect("waiting for hull");
    assert_nothing_left(pid);
    Run { pid, output }
}

pub fn hull_do(args: &[&str]) -> Run {
    hull_do_with(&[], args, None)
}

/// No sandbox directory, process, mount or socket of the `hull do` run with `pid` remains.
pub fn assert_nothing_left(pid: u32) {
    let prefix = format!("do-{pid}-");
    if let Ok(entries) = std::fs::read_dir(run_root()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(&prefix),
                "sandbox directory {} was left behind",
                e.path().display()
            );
        }
    }
    assert_no_trace(&format!("{}/{prefix}", run_root().display()));
}

/// No mount, Unix socket or process (by its command line) mentions `path`.
pub fn assert_no_trace(path: &str) {
    for (what, table) in [
        ("a mount", "/proc/self/mountinfo"),
        ("a socket", "/proc/net/unix"),
    ] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        assert!(!text.contains(path), "{what} under {path} was left behind");
    }
    if let Some(pid) = processes_naming(path).first() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        panic!(
            "process {pid} was left behind: {}",
            String::from_utf8_lossy(&cmdline).replace('\0', " ")
        );
    }
}

/// Pids whose command line contains `needle`.
pub fn processes_naming(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("reading /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            })
        })
        .collect()
}

/// A pid from a pid file (runc's format: the number alone).
pub fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .expect("the pid file")
        .trim()
        .parse()
        .expect("a pid")
}

/// The sandbox directory `hull` gives container `id` under state root `root`.
pub fn sandbox_dir(root: &Path, id: &str) -> PathBuf {
    hull_shim::cli::runc::sandbox_dir(&hull_shim::config::Config::default(), root, id)
}

/// Checks that container `id` under `root` left nothing: state, sandbox, processes,
/// mounts, sockets.
pub fn assert_container_gone(root: &Path, id: &str) {
    assert!(
        !root.join(id).exists(),
        "the state of {id} is still in {}",
        root.display()
    );
    let sandbox = sandbox_dir(root, id);
    assert!(!sandbox.exists(), "{} was left behind", sandbox.display());
    assert_no_trace(&sandbox.display().to_string());
}

/// A bundle in `dir`: a copy of the busybox rootfs and `hull spec`'s config.json with
/// no terminal, changed by `edit`.
pub fn bundle(dir: &TempDir, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    rootfs_copy(dir);
    let out = Command::new(hull_bin())
        .args(["spec", "--bundle"])
        .arg(dir.path())
        .output()
        .expect("running hull spec");
    assert!(out.status.success(), "hull spec: {out:?}");
    let path = dir.path().join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("reading config.json"))
            .expect("config.json is JSON");
    spec["process"]["terminal"] = serde_json::json!(false);
    edit(&mut spec);
    std::fs::write(&path, spec.to_string()).expect("writing config.json");
    dir.path().to_path_buf()
}

/// Makes this (test) process the reaper of orphans, so that the monitors `hull create`
/// leaves (and the container inits `runc create` leaves) can be waited for.
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
}

/// Waits for `pid` (a child or an orphan re-parented to us) and says how it ended.
pub fn wait_pid(pid: i32) -> nix::sys::wait::WaitStatus {
    nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).expect("waitpid")
}

/// Polls `cond` every 20 ms for up to `secs` seconds.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    cond()
}
