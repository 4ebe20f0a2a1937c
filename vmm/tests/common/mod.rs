//! Shared by hull-vmm's integration tests: a scratch directory, a VM config, and the VMM
//! process with its console.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn kernel() -> PathBuf {
    PathBuf::from(std::env::var_os("HULL_KERNEL").unwrap_or("/var/lib/hull/vmlinux".into()))
}

/// Why a full Linux guest cannot boot here, if it cannot.
pub fn no_hardware_virtualization() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    (!has).then(|| {
        "this CPU has no vmx/svm (KVM here is PVM, which cannot boot a stock Linux guest); \
         the early boot test covers this machine"
            .to_string()
    })
}

pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hull-vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn console(&self) -> PathBuf {
        self.0.join("console.log")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes vm.json for `spec` (serial to console.log) and returns its path.
    pub fn config(&self, spec: &VmSpec) -> PathBuf {
        let mut json = serde_json::json!({
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "kernel": spec.kernel,
            "cmdline": spec.cmdline,
            "serial": {"output": self.console()},
        });
        if let Some(i) = &spec.initramfs {
            json["initramfs"] = serde_json::json!(i);
        }
        if let Some(extra) = &spec.extra {
            for (k, v) in extra.as_object().unwrap() {
                json[k] = v.clone();
            }
        }
        let path = self.0.join("vm.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
        path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct VmSpec {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// More top-level config fields (devices).
    pub extra: Option<serde_json::Value>,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            kernel: kernel(),
            initramfs: None,
            cmdline: String::new(),
            memory_mib: 128,
            vcpus: 1,
            extra: None,
        }
    }
}

pub fn vmm_binary() -> &'static str {
    env!("CARGO_BIN_EXE_hull-vmm")
}

/// A running hull-vmm; killed on drop if still there.
pub struct Vmm {
    pub child: Child,
}

impl Vmm {
    pub fn start(config: &Path) -> Self {
        let child = Command::new(vmm_binary())
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting hull-vmm");
        Self { child }
    }

    fn read(console: &Path) -> String {
        String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned()
    }

    /// Polls the console file until `done` holds; fails the test (showing the console)
    /// if the VMM exits first or `limit` passes.
    pub fn wait_console(
        &mut self,
        console: &Path,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let text = Self::read(console);
            if done(&text) {
                return text;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let text = Self::read(console);
                if done(&text) {
                    return text;
                }
                panic!(
                    "hull-vmm exited ({status}) before the console showed what was expected; \
                     stderr: {}\nconsole:\n{text}",
                    self.stderr()
                );
            }
            assert!(
                start.elapsed() < limit,
                "console did not show what was expected within {limit:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the VMM to exit by itself; returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("hull-vmm did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit code (it must exit within 10 s).
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait(Duration::from_secs(10))
    }

    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
