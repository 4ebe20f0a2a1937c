//! The host side of `linux.cgroupsPath`: the monitor joins the engine's cgroup in every
//! mounted hierarchy (cgroup v1 controllers and the v2 tree, hybrid hosts included) before
//! it starts the VM, so the VMM, virtiofsd and the vsock back end are accounted where the
//! engine looks. Limits are not set on the host: the VM is sized from them and the guest
//! enforces them on the container.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Turns an OCI cgroupsPath into a path relative to each hierarchy's root. With
/// `systemd` (runc's --systemd-cgroup), the form `slice:prefix:name` becomes
/// `/<slices>/<prefix>-<name>.scope`, as runc's systemd driver lays it out.
pub fn relative_path(cgroups_path: &str, id: &str, systemd: bool) -> Result<PathBuf> {
    let parts: Vec<&str> = if systemd {
        cgroups_path.split(':').collect()
    } else {
        vec![cgroups_path]
    };
    let rel = match parts.as_slice() {
        [""] => PathBuf::from(id),
        [plain] if !systemd => PathBuf::from(plain.trim_start_matches('/')),
        [slice, prefix, name] => {
            let mut p = PathBuf::new();
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            // "a-b-c.slice" lives in "a.slice/a-b.slice/a-b-c.slice"; "-.slice" is the root.
            let stem = slice.trim_end_matches(".slice");
            if stem != "-" {
                let pieces: Vec<&str> = stem.split('-').collect();
                for i in 1..=pieces.len() {
                    p.push(format!("{}.slice", pieces[..i].join("-")));
                }
            }
            let unit = if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            p.push(unit);
            p
        }
        _ => bail!(
            "linux.cgroupsPath {cgroups_path:?}: with --systemd-cgroup give slice:prefix:name"
        ),
    };
    if rel
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!("linux.cgroupsPath {cgroups_path:?} must not contain '..'");
    }
    Ok(rel)
}

/// Mount points of the cgroup hierarchies (v1 and v2), from /proc/self/mountinfo.
fn hierarchies() -> Vec<(PathBuf, bool)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            let mnt = pre.split(' ').nth(4)?;
            match fstype {
                "cgroup" => Some((PathBuf::from(mnt), false)),
                "cgroup2" => Some((PathBuf::from(mnt), true)),
                _ => None,
            }
        })
        .collect()
}

/// v1 cpuset cgroups start empty and refuse tasks until cpus and mems are set: copy them
/// down from the nearest ancestor that has them.
fn fill_cpuset(dir: &Path, root: &Path) {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let path = dir.join(file);
        if std::fs::read_to_string(&path).is_ok_and(|v| !v.trim().is_empty()) {
            continue;
        }
        let mut chain = Vec::new();
        let mut d = dir.to_path_buf();
        while d.starts_with(root) && d != root {
            chain.push(d.clone());
            d = match d.parent() {
                Some(p) => p.to_path_buf(),
                None => break,
            };
        }
        let mut value = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        for d in chain.iter().rev() {
            let current = std::fs::read_to_string(d.join(file)).unwrap_or_default();
            if current.trim().is_empty() {
                let _ = std::fs::write(d.join(file), value.trim());
            } else {
                value = current;
            }
        }
    }
}

/// The cgroups this process joined: (hierarchy root, leaf) pairs.
pub struct Joined(Vec<(PathBuf, PathBuf)>);

impl Joined {
    /// The leaf directories (delete removes them once the container's processes are gone).
    pub fn leaves(&self) -> Vec<PathBuf> {
        self.0.iter().map(|(_, leaf)| leaf.clone()).collect()
    }

    /// Moves this process back out and removes the leaves: for a create that failed.
    pub fn undo(self) {
        leave_and_remove(&self.leaves());
    }
}

/// Moves this process from each of `leaves` to its hierarchy's root, then removes the
/// leaves (for a foreground `run` that ends, or a create that failed).
pub fn leave_and_remove(leaves: &[PathBuf]) {
    let me = std::process::id().to_string();
    let roots = hierarchies();
    for leaf in leaves.iter().rev() {
        let root = roots
            .iter()
            .map(|(r, _)| r)
            .filter(|r| leaf.starts_with(r))
            .max_by_key(|r| r.as_os_str().len());
        if let Some(root) = root {
            let _ = std::fs::write(root.join("cgroup.procs"), &me);
        }
        let _ = std::fs::remove_dir(leaf);
    }
}

/// Moves this process into `rel` in every hierarchy.
pub fn join(rel: &Path) -> Result<Joined> {
    let me = std::process::id().to_string();
    let mut joined = Joined(Vec::new());
    for (root, v2) in hierarchies() {
        let dir = root.join(rel);
        let result = std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating cgroup {}", dir.display()))
            .and_then(|()| {
                if !v2 && root.to_string_lossy().contains("cpuset") {
                    fill_cpuset(&dir, &root);
                }
                std::fs::write(dir.join("cgroup.procs"), &me)
                    .with_context(|| format!("joining cgroup {}", dir.display()))
            });
        joined.0.push((root, dir));
        if let Err(e) = result {
            joined.undo();
            return Err(e);
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_paths_as_runc_reads_them() {
        let rel = |p: &str, systemd: bool| relative_path(p, "abc", systemd).unwrap();
        assert_eq!(
            rel("/libpod_parent/libpod-abc", false),
            PathBuf::from("libpod_parent/libpod-abc")
        );
        assert_eq!(rel("", false), PathBuf::from("abc"));
        assert_eq!(rel("/a:b", false), PathBuf::from("a:b"));
        assert_eq!(
            rel("machine-x.slice:libpod:abc", true),
            PathBuf::from("machine.slice/machine-x.slice/libpod-abc.scope")
        );
        assert_eq!(
            rel("system.slice:docker:abc", true),
            PathBuf::from("system.slice/docker-abc.scope")
        );
        assert_eq!(rel("-.slice:x:abc", true), PathBuf::from("x-abc.scope"));
        assert!(relative_path("/a/../../etc", "x", false).is_err());
        assert!(relative_path("a:b", "x", true).is_err());
    }
}
