//! What PID 1 does: mount the guest's filesystems, serve the agent API, power off.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use hull_protocol::{GUEST_SHARE_DIR, HOST_READY_PORT, READY_LINE, SHARE_TAG};
use nix::mount::{mount, MsFlags};

use crate::{reaper, service, vsock};

pub fn run_as_init() -> ExitCode {
    if !Path::new(SWITCHED_MARKER).exists() {
        // Returns only on failure.
        let e = switch_root_off_initramfs();
        eprintln!("hull-agent: fatal: leaving the initramfs: {e:#}");
        power_off();
    }
    if let Err(e) = boot() {
        eprintln!("hull-agent: fatal: {e:#}");
    }
    power_off()
}

/// Present in the root the agent switched to.
const SWITCHED_MARKER: &str = "/.hull-root";

/// pivot_root cannot move away from the initramfs (the kernel's rootfs is no ordinary
/// mount), and containers need pivot_root. So, as switch_root does: copy /init onto a
/// tmpfs, move that tmpfs over /, chroot into it and exec /init again from there.
fn switch_root_off_initramfs() -> anyhow::Error {
    let run = || -> Result<std::convert::Infallible> {
        let new = Path::new("/newroot");
        std::fs::create_dir_all(new).context("creating /newroot")?;
        mount(
            Some("tmpfs"),
            new,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        )
        .context("mounting a tmpfs on /newroot")?;
        std::fs::copy("/init", new.join("init")).context("copying /init")?;
        std::fs::write(new.join(&SWITCHED_MARKER[1..]), b"").context("writing the marker")?;
        // The initramfs copy would only hold memory.
        let _ = std::fs::remove_file("/init");
        nix::unistd::chdir(new).context("chdir /newroot")?;
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .context("moving /newroot over /")?;
        nix::unistd::chroot(".").context("chroot")?;
        nix::unistd::chdir("/").context("chdir /")?;
        let init = std::ffi::CString::new("/init")?;
        Err(nix::unistd::execv(&init, &[&init]).map(|_| ()).unwrap_err())
            .context("exec /init in the new root")
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn boot() -> Result<()> {
    mount_basics()?;
    redirect_stdio_to_console();
    reaper::block_sigchld().context("blocking SIGCHLD")?;
    reaper::start().context("starting the reaper thread")?;
    let share = Path::new(GUEST_SHARE_DIR);
    std::fs::create_dir_all(share).with_context(|| format!("creating {}", share.display()))?;
    mount(
        Some(SHARE_TAG),
        share,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting virtio-fs tag {SHARE_TAG} on {}", share.display()))?;

    let shutdown = service::serve().context("serving the agent API")?;
    let mut ready = vsock::connect_host(HOST_READY_PORT)
        .map(std::fs::File::from)
        .context("telling the host the agent is ready")?;
    ready
        .write_all(READY_LINE.as_bytes())
        .context("writing the ready line")?;
    // The ready connection stays open while the agent lives: the host sees it close when
    // the guest goes away.
    shutdown.wait();
    // The host stops the VM as soon as it has the Shutdown answer. Resetting at once could
    // lose that answer in flight (and the host would wait for the slow reset instead), so
    // reset only if the host has not stopped the VM after a grace period.
    std::thread::sleep(std::time::Duration::from_secs(2));
    drop(ready);
    Ok(())
}

fn mount_basics() -> Result<()> {
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let table: [(&str, &str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", "proc", nosuid_noexec_nodev, None),
        ("sysfs", "/sys", "sysfs", nosuid_noexec_nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("ptmxmode=0666,mode=0620"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            nosuid_noexec_nodev,
            Some("mode=1777"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_noexec_nodev,
            None,
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (source, target, fstype, flags, data) in table {
        std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
        mount(Some(source), target, Some(fstype), flags, data)
            .with_context(|| format!("mounting {fstype} on {target}"))?;
    }
    // Let containers' cgroups use every controller the kernel has.
    if let Ok(controllers) = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        let enable: Vec<String> = controllers
            .split_whitespace()
            .map(|c| format!("+{c}"))
            .collect();
        let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" "));
    }
    Ok(())
}

/// The kernel starts /init with no stdio when the initramfs has no /dev/console; once
/// devtmpfs is mounted, the console is there.
fn redirect_stdio_to_console() {
    if let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            let _ = nix::unistd::dup2(console.as_raw_fd(), fd);
        }
    }
}

/// PID 1 must never exit: sync and reset the machine (the VMM exits on reset).
fn power_off() -> ! {
    nix::unistd::sync();
    loop {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
