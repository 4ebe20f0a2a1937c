//! containerd 1.6 from Debian, started by a test with its own root, state and socket,
//! and `ctr` against it. Hull's shim is on its PATH (`containerd-shim-hull-v2`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::{busybox, eventually, hull_bin};

/// The `containerd-shim-hull-v2` binary beside `hull`.
pub fn shim_bin() -> PathBuf {
    hull_bin().with_file_name("containerd-shim-hull-v2")
}

pub const IMAGE: &str = "localhost/busybox:latest";
pub const NAMESPACE: &str = "hull-test";

pub struct Containerd {
    child: Child,
    state: PathBuf,
    socket: PathBuf,
    /// Where `ctr` works: `hull-test`, or CRI's `k8s.io`.
    namespace: &'static str,
}

impl Containerd {
    /// containerd with its CRI plugin off: `ctr` in namespace `hull-test`.
    pub fn start(name: &str) -> Containerd {
        Containerd::start_config(name, false)
    }

    /// containerd with its CRI plugin on (the kubelet's API, on the same socket), a
    /// RuntimeClass handler `hull` for Hull's shim, the project's busybox and pause images
    /// in CRI's namespace `k8s.io`, and no CNI plugins (pods use the host network).
    pub fn start_with_cri(name: &str) -> Containerd {
        Containerd::start_config(name, true)
    }

    fn start_config(name: &str, cri: bool) -> Containerd {
        let root = PathBuf::from(format!("/var/tmp/hull-containerd-test/{name}"));
        let state = PathBuf::from(format!("/run/hull-ctd-{name}"));
        // What an earlier, interrupted run left (a rootfs its shim mounted in a bundle).
        for m in hull_shim::sandbox::mounts_under(&state).iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let socket = state.join("containerd.sock");
        let config = state.join("config.toml");
        let plugins = if cri {
            let cni = state.join("cni");
            format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
                 \x20 sandbox_image = \"localhost/pause:latest\"\n\
                 \x20 stream_server_address = \"127.0.0.1\"\n\
                 \x20 stream_server_port = \"0\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                 \x20 default_runtime_name = \"hull\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.hull]\n\
                 \x20 runtime_type = \"io.containerd.hull.v2\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
                 \x20 bin_dir = \"{}/bin\"\n\
                 \x20 conf_dir = \"{}/conf\"\n",
                cni.display(),
                cni.display()
            )
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string()
        };
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 [grpc]\n  address = \"{}\"\n{plugins}",
                root.display(),
                state.display(),
                socket.display()
            ),
        )
        .unwrap();
        // containerd finds `containerd-shim-hull-v2` on its PATH.
        let bin = state.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(shim_bin(), bin.join("containerd-shim-hull-v2")).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .env("PATH", path)
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
            namespace: if cri { "k8s.io" } else { NAMESPACE },
        };
        assert!(
            eventually(30, || c.ctr(&["version"]).status.success()),
            "containerd did not come up"
        );
        let images: &[(&str, &str)] = if cri {
            &[
                ("busybox-oci.tar", "localhost/busybox"),
                ("pause-oci.tar", "localhost/pause"),
            ]
        } else {
            &[("busybox-oci.tar", "localhost/busybox")]
        };
        for (file, name) in images {
            let tar = busybox().join(file);
            let o = c.ctr(&[
                "images",
                "import",
                "--base-name",
                name,
                tar.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "ctr images import: {o:?}");
        }
        c
    }

    pub fn ctr_args(&self) -> Vec<String> {
        vec![
            "-a".into(),
            self.socket.display().to_string(),
            "-n".into(),
            self.namespace.into(),
        ]
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
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
    pub fn diagnostics(&self) -> String {
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
            .join(self.namespace);
        for e in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            let log = e.path().join("log.json");
            d += &format!("--- {}\n{}\n", log.display(), tail(&log, 40));
        }
        let vms = ["vm", "pods"].map(|d| crate::run_root().join(d));
        for e in vms.iter().flat_map(std::fs::read_dir).flatten().flatten() {
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

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where containerd keeps container `id`'s bundle (the shim writes `address` and
    /// `shim.pid` there).
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state
            .join("io.containerd.runtime.v2.task")
            .join(self.namespace)
            .join(id)
    }

    pub fn task_status(&self, id: &str) -> String {
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
pub fn runc_root() -> PathBuf {
    Path::new("/run/containerd/runc").join(NAMESPACE)
}

pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn hull() -> String {
    hull_bin().display().to_string()
}
