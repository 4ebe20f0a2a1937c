//! What `hull` keeps about a container between runc-style calls: `<root>/<id>/` holds
//! `state.json` (written by create, start, pause, resume under the lock), `config.json`
//! (the spec as the bundle gave it), `exit.json` (written once by the monitor when the
//! container's init has ended) and `lock` (flock, serializes calls on one container).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::agent_client::{AgentClient, ProcessExit};
use crate::vsock::HybridVsock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Only while `create` runs (what prestart and createRuntime hooks are told).
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339, UTC.
    pub created: String,
    pub status: Status,
    /// The monitor: the host process that stands for the container's init.
    pub pid: i32,
    /// Its start time (/proc/PID/stat field 22), so a reused pid is not mistaken for it.
    pub pid_start: u64,
    /// The sandbox directory (VM sockets, share).
    pub sandbox_dir: PathBuf,
    /// Host cgroup directories made for the container (removed by delete).
    #[serde(default)]
    pub host_cgroups: Vec<PathBuf>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// How the container's init ended, as the monitor recorded it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: i32,
    pub signal: u32,
}

impl From<ProcessExit> for ExitRecord {
    fn from(e: ProcessExit) -> Self {
        ExitRecord {
            exit_code: e.shell_status(),
            signal: match e {
                ProcessExit::Code(_) => 0,
                ProcessExit::Signal(s) => s,
            },
        }
    }
}

/// One container's directory under `--root`.
pub struct Store {
    pub dir: PathBuf,
    pub id: String,
}

/// An exclusive flock on the container's `lock` file, released on drop.
pub struct Lock(File);

impl Lock {
    /// For a forked child, which must close its copy.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// runc's rule for ids: letters, digits, and `_ + - .`; not `.` or `..`.
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b));
    if !ok {
        bail!("invalid container id {id:?}: use letters, digits, '_', '+', '-' and '.'");
    }
    Ok(())
}

impl Store {
    pub fn new(root: &Path, id: &str) -> Result<Store> {
        check_id(id)?;
        Ok(Store {
            dir: root.join(id),
            id: id.to_string(),
        })
    }

    pub fn exists(&self) -> bool {
        self.dir.join("state.json").is_file() || self.dir.join("lock").is_file()
    }

    /// Makes the directory of a new container; fails if the id is taken.
    pub fn create_dir(&self) -> Result<Lock> {
        if let Some(root) = self.dir.parent() {
            std::fs::create_dir_all(root)
                .with_context(|| format!("creating {}", root.display()))?;
        }
        match std::fs::create_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container with id {:?} already exists", self.id)
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", self.dir.display())),
        }
        self.lock()
    }

    pub fn lock(&self) -> Result<Lock> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))
            .with_context(|| format!("container {:?} does not exist", self.id))?;
        nix::fcntl::flock(f.as_raw_fd(), nix::fcntl::FlockArg::LockExclusive)
            .context("locking the container's state")?;
        Ok(Lock(f))
    }

    /// Loads the state, or says the container does not exist.
    pub fn load(&self) -> Result<State> {
        let path = self.dir.join("state.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("container {:?} does not exist", self.id)
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn save(&self, state: &State) -> Result<()> {
        write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_vec_pretty(state)?,
        )
    }

    pub fn record_exit(&self, exit: ProcessExit) -> Result<()> {
        let rec: ExitRecord = exit.into();
        write_atomic(&self.dir.join("exit.json"), &serde_json::to_vec(&rec)?)
    }

    pub fn exit(&self) -> Option<ExitRecord> {
        let text = std::fs::read(self.dir.join("exit.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The status as it is now: stopped once the init has exited or its monitor is gone.
    pub fn status(&self, state: &State) -> Status {
        if self.exit().is_some() || !process_alive(state.pid, state.pid_start) {
            Status::Stopped
        } else {
            state.status
        }
    }

    /// A client of the container's guest agent.
    pub fn agent(&self, state: &State) -> Result<AgentClient> {
        let vsock = HybridVsock::new(&state.sandbox_dir.join("vsock.sock"));
        AgentClient::connect(&vsock).with_context(|| format!("container {:?}", self.id))
    }

    /// The bundle's config.json as create saw it (kept as JSON: fields the host does not
    /// know still reach the guest).
    pub fn config(&self) -> Result<serde_json::Value> {
        let path = self.dir.join("config.json");
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot), and whether the
/// process is a zombie.
pub fn process_start(pid: i32) -> Option<(u64, bool)> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let state = *fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state == "Z" || state == "X"))
}

pub fn process_alive(pid: i32, start: u64) -> bool {
    matches!(process_start(pid), Some((s, false)) if s == start)
}

/// Now, as RFC 3339 UTC with nanoseconds (what runc's state shows).
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_nanos())
}

pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_795_000_000, 5), "2026-11-18T11:06:40.000000005Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn ids() {
        assert!(check_id("abc-1.2_x+y").is_ok());
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_process_is_alive_and_others_are_not() {
        let me = std::process::id() as i32;
        let (start, zombie) = process_start(me).unwrap();
        assert!(!zombie);
        assert!(process_alive(me, start));
        assert!(!process_alive(me, start + 1));
        assert!(!process_alive(0, 0));
    }
}
