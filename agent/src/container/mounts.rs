//! OCI mounts inside the container's rootfs, before pivot_root.

use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount};

/// Mount flags, propagation flags and fs-specific data from OCI mount options.
#[derive(Debug, PartialEq)]
pub struct Options {
    pub flags: MsFlags,
    pub propagation: MsFlags,
    pub data: Vec<String>,
}

pub fn parse_options(options: &[String]) -> Options {
    let mut o = Options {
        flags: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
    };
    for opt in options {
        let (set, clear, prop) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty(), MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty(), MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty(), MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty(), MsFlags::empty()),
            "rbind" => (
                MsFlags::MS_BIND | MsFlags::MS_REC,
                MsFlags::empty(),
                MsFlags::empty(),
            ),
            "private" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_PRIVATE),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SHARED),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SLAVE),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
            ),
            "unbindable" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_UNBINDABLE),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            ),
            _ => {
                o.data.push(opt.clone());
                continue;
            }
        };
        o.flags = (o.flags | set) & !clear;
        o.propagation |= prop;
    }
    o
}

/// `root` joined with `path` (an absolute path inside the container), with every symlink
/// on the way resolved inside `root`, so that a rootfs symlink cannot point a mount outside.
pub fn secure_join(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = path
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.components().next() {
            None | Some(Component::RootDir) | Some(Component::CurDir) => continue,
            Some(Component::ParentDir) => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = root.join(&resolved).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 255 {
                    bail!(
                        "too many symlinks resolving {} in the rootfs",
                        path.display()
                    );
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                pending.extend(
                    target
                        .components()
                        .rev()
                        .map(|c| PathBuf::from(c.as_os_str())),
                );
            }
            _ => resolved.push(&part),
        }
    }
    Ok(root.join(resolved))
}

/// Mounts one OCI mount under `rootfs`.
pub fn mount_one(rootfs: &Path, m: &Mount) -> Result<()> {
    let dest = secure_join(rootfs, m.destination())?;
    let opts = parse_options(m.options().as_deref().unwrap_or_default());
    let mut fstype = m.typ().clone().unwrap_or_default();
    let source = m.source().clone();
    let is_bind = opts.flags.contains(MsFlags::MS_BIND) || fstype == "bind";

    if is_bind {
        let src = source.as_ref().with_context(|| {
            format!("bind mount on {} has no source", m.destination().display())
        })?;
        let meta = std::fs::metadata(src).with_context(|| {
            format!(
                "bind mount source {} (for {})",
                src.display(),
                m.destination().display()
            )
        })?;
        create_mountpoint(&dest, meta.is_dir())?;
        let bind = opts.flags & (MsFlags::MS_BIND | MsFlags::MS_REC) | MsFlags::MS_BIND;
        mount(Some(src), &dest, None::<&str>, bind, None::<&str>).with_context(|| {
            format!(
                "bind mounting {} on {}",
                src.display(),
                m.destination().display()
            )
        })?;
        let rest = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !rest.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rest,
                None::<&str>,
            )
            .with_context(|| format!("remounting {} with {:?}", m.destination().display(), rest))?;
        }
    } else {
        // The guest has cgroup v2 only; runc does the same on a v2 host.
        if fstype == "cgroup" {
            fstype = "cgroup2".to_string();
        }
        create_mountpoint(&dest, true)?;
        let data = opts.data.join(",");
        let data = (!data.is_empty()).then_some(data);
        let src = source.unwrap_or_else(|| PathBuf::from(&fstype));
        mount(
            Some(&src),
            &dest,
            Some(fstype.as_str()),
            opts.flags,
            data.as_deref(),
        )
        .with_context(|| {
            format!(
                "mounting {fstype} on {} (options {:?})",
                m.destination().display(),
                m.options()
            )
        })?;
    }
    if !opts.propagation.is_empty() {
        mount(
            None::<&str>,
            &dest,
            None::<&str>,
            opts.propagation,
            None::<&str>,
        )
        .with_context(|| format!("setting propagation of {}", m.destination().display()))?;
    }
    Ok(())
}

fn create_mountpoint(dest: &Path, dir: bool) -> Result<()> {
    if dir {
        std::fs::create_dir_all(dest)
            .with_context(|| format!("creating mount point {}", dest.display()))
    } else {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if !dest.exists() {
            std::fs::File::create(dest)
                .with_context(|| format!("creating mount point {}", dest.display()))?;
        }
        Ok(())
    }
}

/// The device nodes every container gets (as runc), then the spec's own.
pub fn create_devices(rootfs: &Path, extra: &[LinuxDevice]) -> Result<()> {
    // runc's order (it shows in mountinfo when they are bind mounts).
    let defaults: [(&str, u64, u64); 6] = [
        ("null", 1, 3),
        ("random", 1, 8),
        ("full", 1, 7),
        ("tty", 5, 0),
        ("zero", 1, 5),
        ("urandom", 1, 9),
    ];
    let dev = rootfs.join("dev");
    for (name, major, minor) in defaults {
        let guest = Path::new("/dev").join(name);
        make_node(
            &dev.join(name),
            &guest,
            SFlag::S_IFCHR,
            major,
            minor,
            0o666,
            0,
            0,
        )?;
    }
    for d in extra {
        let kind = match d.typ() {
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            _ => SFlag::S_IFCHR,
        };
        let path = secure_join(rootfs, d.path())?;
        make_node(
            &path,
            d.path(),
            kind,
            d.major() as u64,
            d.minor() as u64,
            d.file_mode().unwrap_or(0o666),
            d.uid().unwrap_or(0),
            d.gid().unwrap_or(0),
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = dev.join(link);
        if std::fs::symlink_metadata(&path).is_err() {
            symlink(target, &path).with_context(|| format!("creating /dev/{link}"))?;
        }
    }
    Ok(())
}

/// Makes the device node `path`; in a user namespace, where mknod is not allowed, binds
/// the guest's own node `guest` there instead (as runc binds the host's).
#[allow(clippy::too_many_arguments)]
fn make_node(
    path: &Path,
    guest: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<()> {
    let _ = std::fs::remove_file(path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let made = mknod(
        path,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    );
    if made == Err(nix::errno::Errno::EPERM) && in_user_namespace() {
        std::fs::File::create(path)
            .with_context(|| format!("creating {} to bind a device on", path.display()))?;
        return mount(
            Some(guest),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("binding device {} on {}", guest.display(), path.display()));
    }
    made.with_context(|| format!("creating device {}", path.display()))?;
    // mknod honours the umask; set the mode the spec asked for.
    nix::sys::stat::fchmodat(
        None,
        path,
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )?;
    nix::unistd::chown(path, Some(uid.into()), Some(gid.into()))?;
    Ok(())
}

/// Whether this process is in a user namespace other than the guest's first one.
pub fn in_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = parse_options(&[
            "nosuid".into(),
            "ro".into(),
            "rbind".into(),
            "rprivate".into(),
            "mode=755".into(),
            "size=65536k".into(),
        ]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC
        );
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(
            o.data,
            vec!["mode=755".to_string(), "size=65536k".to_string()]
        );
        let o = parse_options(&["ro".into(), "rw".into()]);
        assert!(o.flags.is_empty());
    }

    #[test]
    fn secure_join_keeps_symlinks_inside_the_root() {
        let root = std::env::temp_dir().join(format!("hull-securejoin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a")).unwrap();
        symlink("/etc", root.join("a/abs")).unwrap();
        symlink("../../../..", root.join("a/up")).unwrap();
        assert_eq!(
            secure_join(&root, Path::new("/a/abs/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(&root, Path::new("/a/up/x")).unwrap(),
            root.join("x")
        );
        assert_eq!(
            secure_join(&root, Path::new("/../../x")).unwrap(),
            root.join("x")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
