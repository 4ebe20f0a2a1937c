//! The OCI runtime spec `hull do` gives a container: `runc spec`'s defaults (capabilities,
//! namespaces, mounts, masked and read-only paths, rlimits, no_new_privs, no devices
//! beyond the default ones), with the rootfs
//! writable and the process taken from the image and the command line.

use serde_json::{json, Value};

use crate::user::ResolvedUser;

/// `runc spec`'s capability set.
pub const DEFAULT_CAPS: [&str; 3] = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

pub struct ProcessSpec<'a> {
    pub args: &'a [String],
    pub env: &'a [String],
    pub cwd: &'a str,
    pub user: &'a ResolvedUser,
    pub terminal: bool,
}

/// The spec; `root_path` is relative to the share's mount point in the guest.
pub fn default_spec(root_path: &str, hostname: &str, p: &ProcessSpec) -> Value {
    let caps = json!(DEFAULT_CAPS);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": p.terminal,
            "user": {"uid": p.user.uid, "gid": p.user.gid, "additionalGids": p.user.additional_gids},
            "args": p.args,
            "env": p.env,
            "cwd": p.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": root_path, "readonly": false},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            "resources": {"devices": [{"allow": false, "access": "rwm"}]}
        }
    })
}

/// The container's environment: the image's, then `-e` overrides, plus PATH, HOME and
/// (for a terminal) TERM where neither gave them.
pub fn environment(
    image_env: &[String],
    overrides: &[String],
    home: &str,
    terminal: bool,
) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    for e in image_env.iter().chain(overrides) {
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let has = |env: &[String], k: &str| env.iter().any(|e| e.split('=').next() == Some(k));
    if !has(&env, "PATH") {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={home}"));
    }
    if terminal && !has(&env, "TERM") {
        env.push("TERM=xterm".into());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_image_env_and_defaults_fill_gaps() {
        let env = environment(
            &["A=1".into(), "B=2".into()],
            &["A=3".into()],
            "/root",
            true,
        );
        assert_eq!(
            env,
            vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "B=2",
                "A=3",
                "HOME=/root",
                "TERM=xterm"
            ]
        );
    }

    #[test]
    fn spec_parses_as_oci() {
        let user = ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: "/".into(),
        };
        let p = ProcessSpec {
            args: &["sh".into()],
            env: &[],
            cwd: "/",
            user: &user,
            terminal: false,
        };
        let v = default_spec("c/rootfs", "hull", &p);
        let spec: oci_spec::runtime::Spec = serde_json::from_value(v).unwrap();
        assert_eq!(
            spec.root().as_ref().unwrap().path().to_str(),
            Some("c/rootfs")
        );
    }
}
