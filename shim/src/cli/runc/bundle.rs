//! An engine's bundle turned into what the guest needs: the rootfs and every host bind
//! source reach the guest through the sandbox's virtio-fs share, so the spec's paths are
//! rewritten to the share; host namespace paths mean nothing in the VM; the VM is sized
//! from the spec's resources.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::config::Config;

/// Memory the guest kernel and agent need on top of the container's limit.
pub const VM_OVERHEAD_MIB: u64 = 128;

/// A bundle as read from disk: the raw spec (kept as JSON so that fields the host does
/// not know still reach the guest) and its checked form.
pub struct Bundle {
    pub dir: PathBuf,
    pub raw: Value,
    pub spec: oci_spec::runtime::Spec,
    pub rootfs: PathBuf,
}

/// A host path the guest must see: bind `host` at `shared/<rel>`.
#[derive(Debug, PartialEq)]
pub struct ShareBind {
    pub host: PathBuf,
    pub rel: PathBuf,
}

/// The spec for the agent and the binds that make its paths real.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Value,
    pub binds: Vec<ShareBind>,
    pub terminal: bool,
}

pub fn load(dir: &Path) -> Result<Bundle> {
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("bundle {} does not exist", dir.display()))?;
    let path = dir.join("config.json");
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "reading {}: the bundle must hold the OCI config.json",
            path.display()
        )
    })?;
    let raw: Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let spec: oci_spec::runtime::Spec = serde_json::from_value(raw.clone())
        .with_context(|| format!("{} is not a valid OCI runtime spec", path.display()))?;
    let version = spec.version();
    if !["1.0.", "1.1.", "1.2.", "1.3."]
        .iter()
        .any(|v| version.starts_with(v))
    {
        bail!("ociVersion {version:?} is not supported: Hull takes 1.0.x to 1.3.x");
    }
    let process = spec
        .process()
        .as_ref()
        .context("config.json has no process: give process.args")?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        bail!("config.json's process.args is empty: give the command to run");
    }
    let root = spec
        .root()
        .as_ref()
        .context("config.json has no root: give root.path")?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        dir.join(root.path())
    };
    if !rootfs.is_dir() {
        bail!("rootfs {} is not a directory", rootfs.display());
    }
    Ok(Bundle {
        dir,
        raw,
        spec,
        rootfs,
    })
}

fn is_bind(m: &Value) -> bool {
    m["type"] == "bind"
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Rewrites the spec for the guest. `cid` names the container's subtree in the share.
pub fn guest_spec(b: &Bundle, cid: &str) -> Result<GuestSpec> {
    let mut spec = b.raw.clone();
    let mut binds = vec![ShareBind {
        host: b.rootfs.clone(),
        rel: Path::new(cid).join("rootfs"),
    }];
    spec["root"]["path"] = json!(format!("{cid}/rootfs"));
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        for (i, m) in mounts.iter_mut().enumerate() {
            if !is_bind(m) {
                continue;
            }
            if m["destination"] == "/dev/shm" {
                // The engine's shm is a host tmpfs; the guest makes its own.
                *m = json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                    "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]});
                continue;
            }
            let source = m["source"]
                .as_str()
                .with_context(|| format!("bind mount on {} has no source", m["destination"]))?;
            let host = if Path::new(source).is_absolute() {
                PathBuf::from(source)
            } else {
                b.dir.join(source)
            };
            if !host.exists() {
                bail!(
                    "bind mount source {} (for {}) does not exist",
                    host.display(),
                    m["destination"].as_str().unwrap_or("?")
                );
            }
            let rel = Path::new(cid).join("mounts").join(i.to_string());
            m["source"] = json!(Path::new(hull_protocol::GUEST_SHARE_DIR)
                .join(&rel)
                .display()
                .to_string());
            binds.push(ShareBind { host, rel });
        }
    }
    if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
        for ns in namespaces.iter_mut() {
            if let Some(obj) = ns.as_object_mut() {
                if let Some(path) = obj.remove("path") {
                    tracing::info!(
                        "the container gets a new {} namespace in its VM; host namespace {path} is not joined",
                        obj.get("type").and_then(|t| t.as_str()).unwrap_or("?")
                    );
                }
            }
        }
    }
    for (label, value) in [
        (
            "process.apparmorProfile",
            &spec["process"]["apparmorProfile"],
        ),
        ("process.selinuxLabel", &spec["process"]["selinuxLabel"]),
        ("linux.mountLabel", &spec["linux"]["mountLabel"]),
    ] {
        if let Some(v) = value.as_str().filter(|v| !v.is_empty()) {
            // The guest kernel has no LSM: the VM is the container's boundary. Engines set
            // these whenever the host has AppArmor or SELinux, so this is not an error.
            tracing::warn!(
                "{label} {v:?} is not applied: Hull's guest kernel has no AppArmor or SELinux"
            );
        }
    }
    inherit_rlimits(&mut spec["process"]);
    // The guest's hooks are told the bundle, as host ones are (see the agent's init).
    if !spec["annotations"].is_object() {
        spec["annotations"] = json!({});
    }
    spec["annotations"]["io.github.hull.bundle"] = json!(b.dir.display().to_string());
    let terminal = spec["process"]["terminal"].as_bool().unwrap_or(false);
    Ok(GuestSpec {
        spec,
        binds,
        terminal,
    })
}

/// runc's container inherits every rlimit the spec does not set from runc's caller; the
/// guest's defaults are another machine's, so the caller's own values go into the spec.
fn inherit_rlimits(process: &mut Value) {
    const RLIMITS: [(&str, libc::__rlimit_resource_t); 16] = [
        ("RLIMIT_CPU", libc::RLIMIT_CPU),
        ("RLIMIT_FSIZE", libc::RLIMIT_FSIZE),
        ("RLIMIT_DATA", libc::RLIMIT_DATA),
        ("RLIMIT_STACK", libc::RLIMIT_STACK),
        ("RLIMIT_CORE", libc::RLIMIT_CORE),
        ("RLIMIT_RSS", libc::RLIMIT_RSS),
        ("RLIMIT_NPROC", libc::RLIMIT_NPROC),
        ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE),
        ("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK),
        ("RLIMIT_AS", libc::RLIMIT_AS),
        ("RLIMIT_LOCKS", libc::RLIMIT_LOCKS),
        ("RLIMIT_SIGPENDING", libc::RLIMIT_SIGPENDING),
        ("RLIMIT_MSGQUEUE", libc::RLIMIT_MSGQUEUE),
        ("RLIMIT_NICE", libc::RLIMIT_NICE),
        ("RLIMIT_RTPRIO", libc::RLIMIT_RTPRIO),
        ("RLIMIT_RTTIME", libc::RLIMIT_RTTIME),
    ];
    let Some(process) = process.as_object_mut() else {
        return;
    };
    let list = process.entry("rlimits").or_insert_with(|| json!([]));
    let Some(list) = list.as_array_mut() else {
        return;
    };
    for (name, resource) in RLIMITS {
        if list.iter().any(|r| r["type"] == name) {
            continue;
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into memory we own.
        if unsafe { libc::getrlimit(resource, &mut limit) } == 0 {
            list.push(json!({"type": name, "soft": limit.rlim_cur, "hard": limit.rlim_max}));
        }
    }
}

/// vCPUs and memory (MiB) of the VM: from the CPU quota and the memory limit, never less
/// than the configured defaults.
pub fn vm_size(spec: &oci_spec::runtime::Spec, config: &Config) -> (u32, u64) {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let vcpus = resources
        .and_then(|r| r.cpu().as_ref())
        .and_then(|c| match (c.quota(), c.period()) {
            (Some(q), p) if q > 0 => {
                let p = p.unwrap_or(100_000).max(1);
                Some(((q as u64).div_ceil(p)) as u32)
            }
            _ => None,
        })
        .unwrap_or(config.default_vcpus)
        // A cpuset names guest CPUs: the VM must have them.
        .max(
            resources
                .and_then(|r| r.cpu().as_ref())
                .and_then(|c| c.cpus().as_deref().and_then(highest_cpu))
                .map_or(0, |h| h + 1),
        )
        .clamp(1, host_cpus.max(config.default_vcpus));
    let memory = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20) + VM_OVERHEAD_MIB)
        .unwrap_or(0)
        .max(config.default_memory_mib);
    (vcpus, memory)
}

/// The highest CPU number in a cpuset list such as "0-2,5".
fn highest_cpu(list: &str) -> Option<u32> {
    list.split(',')
        .filter_map(|part| part.trim().rsplit('-').next()?.trim().parse::<u32>().ok())
        .max()
        .filter(|n| *n < 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(dir: &Path, spec: Value) -> Bundle {
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        load(dir).unwrap()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hull-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn paths_move_into_the_share() {
        let d = tmp("share");
        std::fs::create_dir_all(d.join("vol")).unwrap();
        std::fs::write(d.join("hosts"), "127.0.0.1 x\n").unwrap();
        let b = bundle(
            &d,
            json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/", "terminal": true},
                "mounts": [
                    {"destination": "/proc", "type": "proc", "source": "proc"},
                    {"destination": "/data", "type": "bind", "source": d.join("vol"), "options": ["rbind", "ro"]},
                    {"destination": "/etc/hosts", "type": "none", "source": "hosts", "options": ["bind"]},
                    {"destination": "/dev/shm", "type": "bind", "source": "/nonexistent", "options": ["bind"]}],
                "linux": {"namespaces": [{"type": "network", "path": "/run/netns/x"}, {"type": "mount"}]}}),
        );
        let g = guest_spec(&b, "c1").unwrap();
        assert!(g.terminal);
        assert_eq!(g.spec["root"]["path"], "c1/rootfs");
        assert_eq!(g.spec["mounts"][1]["source"], "/run/hull/share/c1/mounts/1");
        assert_eq!(g.spec["mounts"][2]["source"], "/run/hull/share/c1/mounts/2");
        assert_eq!(g.spec["mounts"][3]["type"], "tmpfs");
        assert_eq!(g.spec["linux"]["namespaces"][0], json!({"type": "network"}));
        assert_eq!(g.binds.len(), 3);
        assert_eq!(g.binds[0].host, d.join("rootfs"));
        assert_eq!(g.binds[2].host, d.join("hosts"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_bundles_say_what_is_wrong() {
        let d = tmp("bad");
        std::fs::create_dir_all(&d).unwrap();
        assert!(load(&d).err().unwrap().to_string().contains("config.json"));
        std::fs::write(d.join("config.json"), r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#).unwrap();
        assert!(load(&d)
            .err()
            .unwrap()
            .to_string()
            .contains("is not a directory"));
        let b = bundle(
            &d,
            json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
                "mounts": [{"destination": "/x", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}]}),
        );
        assert!(guest_spec(&b, "c")
            .unwrap_err()
            .to_string()
            .contains("/no/such/dir"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_vm_is_sized_from_the_resources() {
        let spec: oci_spec::runtime::Spec = serde_json::from_value(json!({"ociVersion": "1.0.2",
            "linux": {"resources": {"memory": {"limit": 536870912}, "cpu": {"quota": 50000, "period": 100000}}}}))
        .unwrap();
        let config = Config::default();
        assert_eq!(vm_size(&spec, &config), (1, 512 + VM_OVERHEAD_MIB));
        let none: oci_spec::runtime::Spec =
            serde_json::from_value(json!({"ociVersion": "1.0.2"})).unwrap();
        assert_eq!(vm_size(&none, &config), (1, config.default_memory_mib));
        assert_eq!(highest_cpu("0-2,5"), Some(5));
        assert_eq!(highest_cpu("1"), Some(1));
        assert_eq!(highest_cpu("x"), None);
    }
}
