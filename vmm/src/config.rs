//! The VM description `hull-vmm --config F` reads (JSON), and its validation.
//!
//! Every field is checked here, before anything is created, so that a bad config is
//! one clear error naming the field and nothing is left behind.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Most vCPUs a VM may have (the MP table and our APIC ids stay below 255).
pub const MAX_VCPUS: u8 = 64;
/// Smallest guest memory that still holds the boot structures and a kernel.
pub const MIN_MEMORY_MIB: u32 = 16;
/// Largest guest memory accepted (a sanity bound, not a limit of the layout).
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Longest kernel command line (Linux x86's COMMAND_LINE_SIZE is 2048, with its NUL).
pub const MAX_CMDLINE: usize = 2047;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs.
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The kernel: an uncompressed ELF (vmlinux), entered through its 64-bit entry.
    pub kernel: PathBuf,
    /// An initramfs (cpio), loaded at the top of low memory.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// The kernel command line; `virtio_mmio.device=` entries are appended by the VMM.
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub serial: SerialConfig,
    /// A virtio-vsock device with Firecracker's hybrid (Unix socket) host side.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs devices, each served by a vhost-user backend (virtiofsd).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// virtio-blk devices on host files.
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    /// virtio-net devices on taps.
    #[serde(default)]
    pub net: Vec<NetConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap's name (created if it does not exist; needs CAP_NET_ADMIN).
    pub tap: String,
    /// The guest's MAC address, `02:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// A network namespace (a /proc/PID/ns/net or bind-mounted path) to open the tap in.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// The disk image (raw); its size rounded down to 512-byte sectors is the disk.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The mount tag the guest uses (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// virtiofsd's vhost-user socket (virtiofsd must be listening there).
    pub socket: PathBuf,
}

/// Most virtio-mmio devices (one IRQ line each, 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 16;

fn one() -> u8 {
    1
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Where the guest's COM1 output goes: a file path (created or appended), or `-`
    /// for the VMM's stdout. Absent: discarded.
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// Feed the VMM's stdin to COM1 (never in CI: it has no stdin).
    #[serde(default)]
    pub stdin: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more: 0-2 are reserved).
    pub cid: u64,
    /// The host Unix socket: host-initiated connections come in here (`CONNECT <port>\n`),
    /// guest connections to host port P go to `<uds>_<P>`.
    pub uds: PathBuf,
}

/// A config field that is wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the VM config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VM config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

impl VmConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: VmConfig =
            serde_json::from_slice(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field that can be checked before the VM is built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("{} is out of range: give 1 to {MAX_VCPUS}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} MiB is out of range: give {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        readable_file("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            readable_file("initramfs", initramfs)?;
        }
        if self.cmdline.len() > MAX_CMDLINE / 2 {
            return Err(invalid(
                "cmdline",
                format!(
                    "{} bytes is too long: keep it under {} (the VMM appends device entries)",
                    self.cmdline.len(),
                    MAX_CMDLINE / 2
                ),
            ));
        }
        if let Some(bad) = self
            .cmdline
            .chars()
            .find(|c| !c.is_ascii() || (c.is_ascii_control() && *c != ' '))
        {
            return Err(invalid(
                "cmdline",
                format!("contains {bad:?}: only printable ASCII is allowed"),
            ));
        }
        if self.serial.stdin && self.serial.output.is_none() {
            return Err(invalid(
                "serial.stdin",
                "input without output makes no console: set serial.output too",
            ));
        }
        if let Some(vsock) = &self.vsock {
            if vsock.cid < 3 || vsock.cid > u64::from(u32::MAX) {
                return Err(invalid(
                    "vsock.cid",
                    format!("{} is reserved or too large: give 3 to 2^32-1", vsock.cid),
                ));
            }
            // sun_path holds 108 bytes; `_<port>` adds up to 11.
            if vsock.uds.as_os_str().len() > 95 {
                return Err(invalid(
                    "vsock.uds",
                    format!(
                        "{} is too long for a Unix socket path (with `_<port>` appended): keep it under 96 bytes",
                        vsock.uds.display()
                    ),
                ));
            }
            match vsock.uds.parent() {
                Some(dir) if dir.as_os_str().is_empty() || dir.is_dir() => {}
                _ => {
                    return Err(invalid(
                        "vsock.uds",
                        format!("the directory of {} does not exist", vsock.uds.display()),
                    ))
                }
            }
        }
        let mut tags = std::collections::HashSet::new();
        for fs in &self.fs {
            if fs.tag.is_empty() || fs.tag.len() > 36 || !tags.insert(&fs.tag) {
                return Err(invalid(
                    "fs.tag",
                    format!("{:?} must be 1 to 36 bytes and unique", fs.tag),
                ));
            }
            use std::os::unix::fs::FileTypeExt;
            match std::fs::metadata(&fs.socket) {
                Ok(m) if m.file_type().is_socket() => {}
                _ => {
                    return Err(invalid(
                        "fs.socket",
                        format!(
                            "{} is not a socket: start virtiofsd with --socket-path there first",
                            fs.socket.display()
                        ),
                    ))
                }
            }
        }
        for block in &self.block {
            readable_file("block.path", &block.path)?;
        }
        for net in &self.net {
            if net.tap.is_empty() || net.tap.len() > 15 || net.tap.contains('/') {
                return Err(invalid(
                    "net.tap",
                    format!("{:?} is not an interface name (1 to 15 bytes)", net.tap),
                ));
            }
            if crate::devices::virtio::net::parse_mac(&net.mac).is_none() {
                return Err(invalid(
                    "net.mac",
                    format!("{:?} is not a MAC address like 02:00:00:00:00:01", net.mac),
                ));
            }
        }
        let devices =
            self.fs.len() + self.block.len() + self.net.len() + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "fs",
                format!("at most {MAX_VIRTIO_DEVICES} virtio devices"),
            ));
        }
        Ok(())
    }
}

fn readable_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(invalid(
            field,
            format!("{} is not a regular file", path.display()),
        )),
        Err(e) => Err(invalid(field, format!("{}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory_mib: 128,
            kernel: PathBuf::from("/proc/self/exe"),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            serial: SerialConfig::default(),
            vsock: None,
            fs: Vec::new(),
            block: Vec::new(),
            net: Vec::new(),
        }
    }

    fn field_of(config: &VmConfig) -> &'static str {
        match config.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn a_good_config_passes() {
        base().validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut c = base();
        c.vcpus = 0;
        assert_eq!(field_of(&c), "vcpus");
        let mut c = base();
        c.memory_mib = 4;
        assert_eq!(field_of(&c), "memory_mib");
        let mut c = base();
        c.kernel = PathBuf::from("/nonexistent/vmlinux");
        assert_eq!(field_of(&c), "kernel");
        let mut c = base();
        c.initramfs = Some(PathBuf::from("/"));
        assert_eq!(field_of(&c), "initramfs");
        let mut c = base();
        c.cmdline = "a\nb".into();
        assert_eq!(field_of(&c), "cmdline");
        let mut c = base();
        c.cmdline = "x".repeat(MAX_CMDLINE);
        assert_eq!(field_of(&c), "cmdline");
        let mut c = base();
        c.vsock = Some(VsockConfig {
            cid: 2,
            uds: PathBuf::from("/tmp/v.sock"),
        });
        assert_eq!(field_of(&c), "vsock.cid");
        let mut c = base();
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds: PathBuf::from("/nonexistent/dir/v.sock"),
        });
        assert_eq!(field_of(&c), "vsock.uds");
        let mut c = base();
        c.fs = vec![FsConfig {
            tag: "x".repeat(37),
            socket: PathBuf::from("/tmp"),
        }];
        assert_eq!(field_of(&c), "fs.tag");
        let mut c = base();
        c.fs = vec![FsConfig {
            tag: "share".into(),
            socket: PathBuf::from("/tmp"),
        }];
        assert_eq!(field_of(&c), "fs.socket");
        let mut c = base();
        c.net = vec![NetConfig {
            tap: "tap0".into(),
            mac: "02:00:00:00:00".into(),
            netns: None,
        }];
        assert_eq!(field_of(&c), "net.mac");
        c.net[0].tap = "a/b".into();
        assert_eq!(field_of(&c), "net.tap");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            serde_json::from_str::<VmConfig>(r#"{"memory_mib": 64, "kernel": "/k", "vcpu": 2}"#)
                .unwrap_err();
        assert!(err.to_string().contains("vcpu"), "{err}");
    }
}
