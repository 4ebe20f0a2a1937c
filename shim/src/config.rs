//! Where Hull finds its guest kernel, initramfs and helper programs.
//!
//! Read once from `/etc/hull/config.toml` (or the file given with `--config`), with
//! defaults that are right after the README's set-up. The file is a flat list of
//! `key = "value"` (strings) or `key = 123` (integers) lines; `#` starts a comment.

use std::path::{Path, PathBuf};

use thiserror::Error;

pub const DEFAULT_CONFIG: &str = "/etc/hull/config.toml";

#[derive(Debug, Clone)]
pub struct Config {
    /// Guest kernel (vmlinux ELF with a PVH entry).
    pub kernel: PathBuf,
    /// Initramfs whose /init is hull-agent.
    pub initramfs: PathBuf,
    pub qemu: PathBuf,
    /// `auto` (hull-vmm where /dev/kvm has hardware virtualization, else QEMU),
    /// `hull-vmm` or `qemu`.
    pub hypervisor: String,
    /// Hull's own VMM.
    pub hull_vmm: PathBuf,
    pub virtiofsd: PathBuf,
    pub vhost_vsock: PathBuf,
    /// Where sandboxes live: `<run_root>/<id>/`.
    pub run_root: PathBuf,
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
    pub default_memory_mib: u64,
    pub default_vcpus: u32,
    /// How long to wait for the agent to say it is ready.
    pub boot_timeout_secs: u64,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Syntax {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

/// hull-vmm beside this program (where the build and the install put it), else from PATH.
fn default_hull_vmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.canonicalize().ok())
        .and_then(|exe| exe.parent().map(|d| d.join("hull-vmm")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("hull-vmm"))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kernel: PathBuf::from("/var/lib/hull/vmlinux"),
            initramfs: PathBuf::from("/var/lib/hull/initramfs.cpio"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            hypervisor: "auto".to_string(),
            hull_vmm: default_hull_vmm(),
            virtiofsd: PathBuf::from("virtiofsd"),
            vhost_vsock: PathBuf::from("vhost-device-vsock"),
            run_root: PathBuf::from("/run/hull"),
            accel: "auto".to_string(),
            default_memory_mib: 256,
            default_vcpus: 1,
            boot_timeout_secs: 60,
        }
    }
}

impl Config {
    /// Loads `path`; a missing default file means the defaults, a missing named file is an error.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Config::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        for (i, raw) in text.lines().enumerate() {
            let err = |msg: String| ConfigError::Syntax {
                path: path.to_path_buf(),
                line: i + 1,
                msg,
            };
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| err(format!("expected `key = value`, got {raw:?}")))?;
            let (key, value) = (key.trim(), value.trim());
            let string = || -> Result<String, ConfigError> {
                value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .map(str::to_string)
                    .ok_or_else(|| err(format!("{key} takes a quoted string")))
            };
            let number = || -> Result<u64, ConfigError> {
                value
                    .parse()
                    .map_err(|_| err(format!("{key} takes a whole number")))
            };
            match key {
                "kernel" => c.kernel = string()?.into(),
                "initramfs" => c.initramfs = string()?.into(),
                "qemu" => c.qemu = string()?.into(),
                "hull_vmm" => c.hull_vmm = string()?.into(),
                "hypervisor" => {
                    let h = string()?;
                    if !["auto", "hull-vmm", "qemu"].contains(&h.as_str()) {
                        return Err(err(format!(
                            "hypervisor must be \"auto\", \"hull-vmm\" or \"qemu\", not {h:?}"
                        )));
                    }
                    c.hypervisor = h;
                }
                "virtiofsd" => c.virtiofsd = string()?.into(),
                "vhost_vsock" => c.vhost_vsock = string()?.into(),
                "run_root" => c.run_root = string()?.into(),
                "accel" => {
                    let a = string()?;
                    if !["auto", "kvm", "tcg"].contains(&a.as_str()) {
                        return Err(err(format!(
                            "accel must be \"auto\", \"kvm\" or \"tcg\", not {a:?}"
                        )));
                    }
                    c.accel = a;
                }
                "memory_mib" => c.default_memory_mib = number()?,
                "vcpus" => c.default_vcpus = number()? as u32,
                "boot_timeout_secs" => c.boot_timeout_secs = number()?,
                other => return Err(err(format!("unknown key {other:?}"))),
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strings_numbers_and_comments() {
        let c = Config::parse(
            "# hull\nkernel = \"/k\" # the kernel\nmemory_mib = 512\naccel = \"tcg\"\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.default_memory_mib, 512);
        assert_eq!(c.accel, "tcg");
    }

    #[test]
    fn rejects_unknown_keys_with_line_numbers() {
        let e =
            Config::parse("kernel = \"/k\"\nkernal = \"/x\"\n", Path::new("c.toml")).unwrap_err();
        assert_eq!(e.to_string(), "c.toml:2: unknown key \"kernal\"");
    }
}
