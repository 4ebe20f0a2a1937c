//! Podman (and conmon) from Debian driving `hull` as its OCI runtime: `podman --runtime
//! <hull>` with a locally built image, private storage and `--pull=never`. Every container
//! is a real microVM.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use hull_tests::{assert_container_gone, busybox, hull_bin, TempDir};

const IMAGE: &str = "localhost/hull-busybox:latest";

struct Podman {
    base: PathBuf,
}

/// Private storage and configuration for these tests, with the busybox image loaded.
fn podman_env() -> &'static Podman {
    static ENV: OnceLock<Podman> = OnceLock::new();
    ENV.get_or_init(|| {
        let base = PathBuf::from("/var/tmp/hull-podman-test");
        std::fs::create_dir_all(&base).unwrap();
        // What Podman needs on these hosts (cgroup v1, no systemd journal); nproc is set
        // so that runc and crun can run the same containers for comparison.
        std::fs::write(
            base.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        let p = Podman { base };
        let out = p.run(&[
            "load",
            "-i",
            busybox().join("busybox-oci.tar").to_str().unwrap(),
        ]);
        assert!(out.status.success(), "podman load: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let loaded = text
            .lines()
            .find_map(|l| l.split_once("Loaded image")?.1.split_once(": "))
            .map(|(_, name)| name.trim().to_string())
            .unwrap_or_else(|| panic!("no image name in podman load's output: {text}"));
        let out = p.run(&["tag", &loaded, IMAGE]);
        assert!(out.status.success(), "podman tag: {out:?}");
        p
    })
}

impl Podman {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg("120")
            .arg("podman")
            .arg("--root")
            .arg(self.base.join("storage"))
            .arg("--runroot")
            .arg("/run/hull-podman-test")
            .arg("--runtime")
            .arg(hull_bin())
            .args(args)
            .env("CONTAINERS_CONF", self.base.join("containers.conf"))
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running podman")
    }

    /// `podman run -d --name NAME` of `cmd`; returns the container id.
    fn run_detached(&self, name: &str, cmd: &[&str]) -> String {
        let mut args = vec![
            "run",
            "-d",
            "--pull=never",
            "--network",
            "none",
            "--name",
            name,
            IMAGE,
        ];
        args.extend_from_slice(cmd);
        let o = self.run(&args);
        assert!(o.status.success(), "{o:?}");
        out(&o).trim().to_string()
    }
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `podman run --rm` of `cmd` with `opts`; checks that the container left nothing.
fn podman_run(dir: &TempDir, opts: &[&str], cmd: &[&str]) -> Output {
    let p = podman_env();
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cidfile = dir.path().join(format!("cid-{n}"));
    let _ = std::fs::remove_file(&cidfile);
    let mut args = vec![
        "run",
        "--rm",
        "--pull=never",
        "--network",
        "none",
        "--cidfile",
        cidfile.to_str().unwrap(),
    ];
    args.extend_from_slice(opts);
    args.push(IMAGE);
    args.extend_from_slice(cmd);
    let o = p.run(&args);
    let cid = std::fs::read_to_string(&cidfile).unwrap_or_default();
    if !cid.is_empty() {
        assert_gone(&cid);
    }
    o
}

fn assert_gone(cid: &str) {
    // Podman passes no --root: hull's default.
    let root = hull_shim::cli::runc::default_root(&hull_shim::config::Config::default());
    assert_container_gone(&root, cid);
    let cg = Path::new("/sys/fs/cgroup/memory/libpod_parent").join(format!("libpod-{cid}"));
    assert!(!cg.exists(), "{} was left behind", cg.display());
}

#[test]
fn podman_run_gives_output_and_exit_codes() {
    let dir = TempDir::new("podman-run");
    let o = podman_run(&dir, &[], &["sh", "-c", "echo out; echo err >&2"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(out(&o), "out\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("err"), "{o:?}");
    let o = podman_run(&dir, &[], &["sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    let o = podman_run(&dir, &[], &["no-such-command"]);
    assert_eq!(o.status.code(), Some(127), "{o:?}");
    // Podman's default seccomp profile is in force; `--security-opt seccomp=unconfined`
    // takes it away.
    let probe = ["grep", "^Seccomp:", "/proc/self/status"];
    let o = podman_run(&dir, &[], &probe);
    assert_eq!(out(&o), "Seccomp:\t2\n", "{o:?}");
    let o = podman_run(&dir, &["--security-opt", "seccomp=unconfined"], &probe);
    assert_eq!(out(&o), "Seccomp:\t0\n", "{o:?}");
}

#[test]
fn podman_run_options_reach_the_container() {
    let dir = TempDir::new("podman-opts");
    let vol = dir.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("in"), "from the host\n").unwrap();
    let bind = format!("{}:/data", vol.display());
    let o = podman_run(
        &dir,
        &["-v", &bind, "-e", "FOO=bar"],
        &["sh", "-c", "cat /data/in; echo $FOO; echo back > /data/out"],
    );
    assert_eq!(out(&o), "from the host\nbar\n", "{o:?}");
    assert_eq!(std::fs::read_to_string(vol.join("out")).unwrap(), "back\n");

    let o = podman_run(&dir, &["--user", "1000:10"], &["id"]);
    assert_eq!(
        out(&o),
        "uid=1000(hull) gid=10(wheel) groups=10(wheel)\n",
        "{o:?}"
    );

    let o = podman_run(
        &dir,
        &["--memory", "64m", "--cpus", "1"],
        &["cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max"],
    );
    assert_eq!(out(&o), "67108864\n100000 100000\n", "{o:?}");
}

#[test]
fn podman_exec_logs_stop_and_kill() {
    let p = podman_env();
    let name = format!("hull-life-{}", std::process::id());
    let cid = p.run_detached(
        &name,
        &[
            "sh",
            "-c",
            "echo started; trap 'echo stopping; exit 5' TERM; while true; do sleep 0.2; done",
        ],
    );
    let o = p.run(&["exec", &name, "sh", "-c", "echo in-exec; exit 4"]);
    assert_eq!(
        (o.status.code(), out(&o).as_str()),
        (Some(4), "in-exec\n"),
        "{o:?}"
    );
    let o = p.run(&["stop", "-t", "10", &name]);
    assert!(o.status.success(), "{o:?}");
    let o = p.run(&["inspect", "--format", "{{.State.ExitCode}}", &name]);
    assert_eq!(out(&o).trim(), "5", "{o:?}");
    let o = p.run(&["logs", &name]);
    assert_eq!(out(&o), "started\nstopping\n", "{o:?}");
    assert!(p.run(&["rm", &name]).status.success());
    assert_gone(&cid);

    let cid = p.run_detached(&name, &["sleep", "100"]);
    let o = p.run(&["kill", &name]);
    assert!(o.status.success(), "{o:?}");
    let o = p.run(&["wait", &name]);
    assert_eq!(out(&o).trim(), "137", "{o:?}");
    assert!(p.run(&["rm", &name]).status.success());
    assert_gone(&cid);
}

#[test]
fn podman_run_it_gives_a_terminal() {
    let p = podman_env();
    let dir = TempDir::new("podman-tty");
    let cidfile = dir.path().join("cid");
    let podman = p
        .command(&[])
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    let inner = format!(
        "stty rows 30 cols 100; CONTAINERS_CONF={} timeout --foreground {} run -it --rm --pull=never --network none --cidfile {} {IMAGE} sh",
        p.base.join("containers.conf").display(),
        podman.join(" "),
        cidfile.display()
    );
    let mut child = Command::new("script")
        // The shell CI has (script runs $SHELL); timeout stays in the foreground so the
        // engine may set the terminal raw without SIGTTOU stopping it.
        .env("SHELL", "/bin/sh")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running script");
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input
            .write_all(b"tty; stty size; echo typed-$((6*7))\nexit 9\n")
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let text = out(&o);
    assert_eq!(o.status.code(), Some(9), "{text}");
    assert!(text.contains("typed-42"), "{text}");
    assert!(text.contains("/dev/pts/0"), "{text}");
    assert!(text.contains("30 100"), "{text}");
    let cid = std::fs::read_to_string(&cidfile).unwrap();
    assert_gone(&cid);
}
