//! One cgroup v2 directory per container, `/sys/fs/cgroup/hull/<id>`: the OCI
//! `linux.resources` limits, the freezer (pause/resume), the process list, kill-all and
//! counters. The spec's `cgroupsPath` names a host cgroup and means nothing in the guest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::LinuxResources;

const ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "hull";

pub struct Cgroup {
    dir: PathBuf,
}

/// Makes `/sys/fs/cgroup/hull` and lets its children use every controller.
fn ensure_parent() -> Result<PathBuf> {
    let parent = Path::new(ROOT).join(PARENT);
    if !parent.is_dir() {
        std::fs::create_dir(&parent)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let enabled =
        std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
    if enabled.trim().is_empty() {
        let controllers =
            std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
        let enable: Vec<String> = controllers
            .split_whitespace()
            .map(|c| format!("+{c}"))
            .collect();
        if !enable.is_empty() {
            std::fs::write(parent.join("cgroup.subtree_control"), enable.join(" "))
                .context("enabling controllers for containers")?;
        }
    }
    Ok(parent)
}

/// runc's conversion of cgroup v1 cpu.shares (2..262144) to v2 cpu.weight (1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// The cgroup files and values `resources` asks for, in the order they are written.
pub fn resource_writes(r: &LinuxResources) -> Result<Vec<(String, String)>> {
    let mut w: Vec<(String, String)> = Vec::new();
    let limit = |v: i64| {
        if v < 0 {
            "max".to_string()
        } else {
            v.to_string()
        }
    };
    if let Some(m) = r.memory() {
        if let Some(l) = m.limit() {
            w.push(("memory.max".into(), limit(l)));
        }
        if let Some(res) = m.reservation() {
            w.push(("memory.low".into(), limit(res)));
        }
        // 0 means unset (as runc reads it).
        if let Some(swap) = m.swap().filter(|s| *s != 0) {
            // OCI's swap is memory+swap (v1 memsw); v2 limits swap alone.
            let v2 = match (swap, m.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => {
                    if s < l {
                        bail!("memory.swap ({s}) must not be below memory.limit ({l})");
                    }
                    (s - l).to_string()
                }
                (s, _) => s.to_string(),
            };
            w.push(("memory.swap.max".into(), v2));
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares() {
            let weight = shares_to_weight(shares);
            if weight > 0 {
                w.push(("cpu.weight".into(), weight.to_string()));
            }
        }
        if c.quota().is_some() || c.period().is_some() {
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            let period = c.period().unwrap_or(100_000);
            w.push(("cpu.max".into(), format!("{quota} {period}")));
        }
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.cpus".into(), cpus.to_string()));
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.mems".into(), mems.to_string()));
        }
    }
    if let Some(p) = r.pids() {
        let l = p.limit();
        w.push((
            "pids.max".into(),
            if l <= 0 { "max".into() } else { l.to_string() },
        ));
    }
    if let Some(unified) = r.unified() {
        let mut keys: Vec<_> = unified.iter().collect();
        keys.sort();
        for (k, v) in keys {
            if k.is_empty() || k.contains('/') || k.starts_with('.') || !k.contains('.') {
                bail!("linux.resources.unified key {k:?} is not a cgroup file name");
            }
            w.push((k.clone(), v.clone()));
        }
    }
    Ok(w)
}

/// Files that may be missing from the guest kernel without that being the user's error:
/// the VM has no swap, so a swap limit is already met.
fn optional(file: &str) -> bool {
    file == "memory.swap.max"
}

impl Cgroup {
    /// Creates the container's cgroup and applies its limits.
    pub fn create(id: &str, resources: Option<&LinuxResources>) -> Result<Cgroup> {
        let dir = ensure_parent()?.join(id);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        let cg = Cgroup { dir };
        // Devices are filtered even without rules (runc's always-allowed ones pass).
        let applied = resources.map_or(Ok(()), |r| cg.apply(r)).and_then(|()| {
            let rules = resources.and_then(|r| r.devices().as_deref());
            super::devices::apply(&cg.dir, rules.unwrap_or_default())
        });
        if let Err(e) = applied {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    pub fn apply(&self, r: &LinuxResources) -> Result<()> {
        for (file, value) in resource_writes(r)? {
            let path = self.dir.join(&file);
            if !path.exists() && optional(&file) {
                continue;
            }
            std::fs::write(&path, &value)
                .with_context(|| format!("setting cgroup {file} to {value}"))?;
        }
        Ok(())
    }

    pub fn add(&self, pid: i32) -> Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving pid {pid} into the container's cgroup"))
    }

    pub fn pids(&self) -> Result<Vec<i32>> {
        let text = std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .context("reading the container's cgroup.procs")?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Freezes (or thaws) the cgroup and waits until the kernel says it is done.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let want = if frozen { "1" } else { "0" };
        std::fs::write(self.dir.join("cgroup.freeze"), want).context("writing cgroup.freeze")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = std::fs::read_to_string(self.dir.join("cgroup.events"))
                .context("reading cgroup.events")?;
            if events.lines().any(|l| l == format!("frozen {want}")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the container did not {} in 10 s",
                    if frozen { "freeze" } else { "thaw" }
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn frozen(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.freeze"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Counters from memory.*, cpu.stat, pids.*, keyed as the protocol documents.
    pub fn stats(&self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for file in [
            "memory.current",
            "memory.max",
            "memory.swap.current",
            "pids.current",
            "pids.max",
        ] {
            if let Ok(v) = std::fs::read_to_string(self.dir.join(file)) {
                if let Ok(n) = v.trim().parse() {
                    out.insert(file.to_string(), n);
                }
            }
        }
        for file in ["memory.stat", "cpu.stat", "memory.events"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(file)) {
                for line in text.lines() {
                    if let Some((k, v)) = line.split_once(' ') {
                        if let Ok(n) = v.trim().parse() {
                            out.insert(format!("{file}.{k}"), n);
                        }
                    }
                }
            }
        }
        out
    }

    /// Signals every process in the cgroup.
    pub fn signal_all(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        for pid in self.pids()? {
            // A process may exit between the read and the kill.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
        Ok(())
    }

    /// Removes the (empty) cgroup; a frozen one is thawed first so its dying processes go.
    pub fn remove(&self) {
        if self.frozen() {
            let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Err(e) = std::fs::remove_dir(&self.dir) {
            if e.kind() == std::io::ErrorKind::NotFound {
                return;
            }
            if Instant::now() > deadline {
                eprintln!("hull-agent: removing {}: {e}", self.dir.display());
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl std::fmt::Debug for Cgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cgroup({})", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn oci_resources_become_cgroup_v2_files() {
        let w = resource_writes(&resources(
            r#"{"memory":{"limit":67108864,"swap":134217728,"reservation":-1},
                "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0"},
                "pids":{"limit":64},"unified":{"memory.high":"50000000"}}"#,
        ))
        .unwrap();
        let get = |k: &str| w.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("67108864"));
        assert_eq!(get("memory.swap.max"), Some("67108864"));
        assert_eq!(get("memory.low"), Some("max"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0"));
        assert_eq!(get("pids.max"), Some("64"));
        assert_eq!(get("memory.high"), Some("50000000"));
    }

    #[test]
    fn unlimited_and_bad_values() {
        let w = resource_writes(&resources(
            r#"{"memory":{"limit":-1,"swap":-1},"cpu":{"quota":-1},"pids":{"limit":0}}"#,
        ))
        .unwrap();
        assert!(w.contains(&("memory.max".into(), "max".into())));
        assert!(w.contains(&("memory.swap.max".into(), "max".into())));
        assert!(w.contains(&("cpu.max".into(), "max 100000".into())));
        assert!(w.contains(&("pids.max".into(), "max".into())));
        assert!(resource_writes(&resources(r#"{"unified":{"../x":"1"}}"#)).is_err());
        assert!(resource_writes(&resources(r#"{"memory":{"limit":100,"swap":50}}"#)).is_err());
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }
}
