//! The container's root filesystem as containerd hands it over: mounts (an overlay from
//! the snapshotter, or a bind) to make at `<bundle>/rootfs`, as runc's shim makes them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use containerd_shim_protos::api::Mount;
use nix::mount::MsFlags;

/// Splits fstab-style options into mount flags and the data string the filesystem gets.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "suid" | "dev" | "exec" | "defaults" => continue,
            _ => {
                data.push(o.as_str());
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    (flags, data.join(","))
}

/// Mounts `mounts` at `target`, in order. With none, `target` is the rootfs already.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        let (flags, data) = parse_options(&m.options);
        if data.len() > 4000 {
            bail!(
                "rootfs mount {i}: options are {} bytes, over a page",
                data.len()
            );
        }
        let typ =
            (!m.type_.is_empty() && !flags.contains(MsFlags::MS_BIND)).then_some(m.type_.as_str());
        let r = nix::mount::mount(
            Some(m.source.as_str()),
            target,
            typ,
            flags & !MsFlags::MS_RDONLY,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .and_then(|()| {
            // A bind ignores MS_RDONLY until remounted.
            if flags.contains(MsFlags::MS_BIND | MsFlags::MS_RDONLY) {
                nix::mount::mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
            } else if flags.contains(MsFlags::MS_RDONLY) {
                nix::mount::mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            // This one may be half made (mounted, not remounted read-only).
            unmount(target);
            return Err(e).with_context(|| {
                format!(
                    "mounting the rootfs ({} {} on {})",
                    m.type_,
                    m.source,
                    target.display()
                )
            });
        }
    }
    Ok(())
}

/// Unmounts whatever is mounted at `target` (all layers).
pub fn unmount(target: &Path) {
    while crate::sandbox::mounts_under(target)
        .iter()
        .any(|p| p == target)
    {
        if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
            tracing::error!("unmounting {}: {e}", target.display());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let o: Vec<String> = ["ro", "nosuid", "lowerdir=/a:/b", "upperdir=/u", "rw"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (f, d) = parse_options(&o);
        assert_eq!(f, MsFlags::MS_NOSUID);
        assert_eq!(d, "lowerdir=/a:/b,upperdir=/u");
        let (f, d) = parse_options(&["rbind".to_string(), "ro".into()]);
        assert_eq!(f, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY);
        assert!(d.is_empty());
    }
}
