//! `containerd-shim-hull-v2`: containerd's shim v2 for Hull (runtime type
//! `io.containerd.hull.v2`). One shim process per pod (or lone container) owns the pod's
//! microVM; the Task service (ttrpc) is a thin translation onto the sandbox and the guest
//! agent. containerd runs the binary three ways: `start` (spawn the shim, or find the
//! pod's, and print its address), the shim itself (no action), and `delete` (clean up
//! after a shim that is gone).

mod events;
mod io;
mod rootfs;
mod service;

pub use service::sandbox_dir;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::Message;
use nix::sys::socket::sockopt::PeerCredentials;
use sha2::Digest;

/// Annotations by which CRI marks the containers of one pod (containerd 1.6 and 1.7).
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// Where shim sockets live (short paths: Unix socket names stay under 108 bytes).
const SOCKET_DIR: &str = "/run/hull/shim";

/// What containerd passes on the command line (Go `flag` syntax: `-name value`).
#[derive(Debug, Default)]
pub struct Args {
    pub namespace: String,
    pub address: String,
    pub id: String,
    pub bundle: Option<PathBuf>,
    pub debug: bool,
    pub action: Option<String>,
}

pub fn parse_args(args: &[String]) -> Result<Args> {
    let mut a = Args::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            if a.action.is_some() {
                bail!("unexpected argument {arg:?}");
            }
            a.action = Some(arg.clone());
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if matches!(name, "debug" | "v" | "version") {
            match name {
                "debug" => a.debug = inline.as_deref() != Some("false"),
                _ => a.action = Some("version".into()),
            }
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .with_context(|| format!("-{name} needs a value"))?,
        };
        match name {
            "namespace" => a.namespace = value,
            "address" => a.address = value,
            "id" => a.id = value,
            "bundle" => a.bundle = Some(PathBuf::from(value)),
            // Known to containerd's shims; Hull publishes over ttrpc instead.
            "publish-binary" | "socket" | "runtime-root" | "systemd-cgroup" => {}
            other => bail!("unknown flag -{other}"),
        }
    }
    Ok(a)
}

/// The entry point of `containerd-shim-hull-v2`; returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let a = match parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("containerd-shim-hull-v2: {e:#}");
            return 2;
        }
    };
    let result = match a.action.as_deref() {
        Some("version") => {
            println!("containerd-shim-hull-v2 {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("start") => start(&a),
        Some("delete") => delete(&a),
        None => service::serve(&a),
        Some(other) => Err(anyhow::anyhow!(
            "unknown action {other:?}: containerd runs this shim with start, delete or none"
        )),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("containerd-shim-hull-v2: {e:#}");
            1
        }
    }
}

fn check(a: &Args) -> Result<()> {
    if a.namespace.is_empty() || a.id.is_empty() {
        bail!("-namespace and -id are required (containerd passes them)");
    }
    Ok(())
}

/// The pod a bundle's container belongs to: its CRI sandbox id, else its own id.
fn group_of(bundle: &Path, id: &str) -> String {
    let spec: Option<serde_json::Value> = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok());
    spec.as_ref()
        .and_then(|s| s["annotations"][SANDBOX_ID_ANNOTATION].as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(id)
        .to_string()
}

/// The shim socket of pod `group` in `namespace` of the containerd at `address`.
pub fn socket_path(address: &str, namespace: &str, group: &str) -> PathBuf {
    let digest = sha2::Sha256::digest(format!("{address}/{namespace}/{group}").as_bytes());
    let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SOCKET_DIR).join(name)
}

/// `start`: containerd runs it in the bundle directory. Prints the address of the shim
/// that will serve this container: the pod's, if it runs already, else a new one.
fn start(a: &Args) -> Result<()> {
    check(a)?;
    let bundle = std::env::current_dir().context("the bundle (working directory)")?;
    let group = group_of(&bundle, &a.id);
    let socket = socket_path(&a.address, &a.namespace, &group);
    let address = format!("unix://{}", socket.display());
    if let Ok(s) = UnixStream::connect(&socket) {
        // The pod's shim serves this container too.
        std::fs::write(bundle.join("address"), &address).context("writing the address file")?;
        let peer = nix::sys::socket::getsockopt(s.as_raw_fd(), PeerCredentials)
            .context("asking the pod's shim for its pid")?;
        std::fs::write(bundle.join("shim.pid"), peer.pid().to_string())
            .context("writing shim.pid")?;
        println!("{address}");
        return Ok(());
    }
    let _ = std::fs::remove_file(&socket);
    std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("creating {SOCKET_DIR}"))?;
    let exe = std::env::current_exe().context("finding this program")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "-namespace",
        &a.namespace,
        "-id",
        &a.id,
        "-address",
        &a.address,
    ])
    .args(a.debug.then_some("-debug"))
    .env("HULL_SHIM_SOCKET", &socket)
    .env("HULL_SHIM_GROUP", &group)
    .current_dir(&bundle)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().context("starting the shim")?;
    // Ready when its socket answers, or failed when it exits first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if UnixStream::connect(&socket).is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the shim exited ({status}) before it listened on {}",
                socket.display()
            );
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the shim did not listen on {} within 10 s",
                socket.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::fs::write(bundle.join("address"), &address).context("writing the address file")?;
    std::fs::write(bundle.join("shim.pid"), child.id().to_string()).context("writing shim.pid")?;
    println!("{address}");
    Ok(())
}

/// `delete`: containerd runs it when the shim is gone (crashed, killed) to clean up what
/// it left of container `id`, and reads a DeleteResponse from stdout.
fn delete(a: &Args) -> Result<()> {
    check(a)?;
    let bundle = match &a.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir().context("the bundle (working directory)")?,
    };
    rootfs::unmount(&bundle.join("rootfs"));
    let group = group_of(&bundle, &a.id);
    let socket = socket_path(&a.address, &a.namespace, &group);
    // containerd runs `delete` whenever a shim connection closes; a pod's shim that still
    // answers owns its sandbox.
    if group == a.id && UnixStream::connect(&socket).is_err() {
        service::clean_stale_sandbox(&a.namespace, &group);
        let _ = std::fs::remove_file(&socket);
    }
    let mut r = DeleteResponse::new();
    // As containerd's own shims report a container whose shim died: killed.
    r.exit_status = 128 + libc::SIGKILL as u32;
    r.exited_at = protobuf::MessageField::some(events::now());
    let bytes = r.write_to_bytes().context("encoding the DeleteResponse")?;
    std::io::stdout()
        .write_all(&bytes)
        .context("writing the DeleteResponse")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_containerds_flags() {
        let args: Vec<String> = [
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "abc",
            "-debug",
            "start",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let a = parse_args(&args).unwrap();
        assert_eq!(
            (
                a.namespace.as_str(),
                a.id.as_str(),
                a.debug,
                a.action.as_deref()
            ),
            ("k8s.io", "abc", true, Some("start"))
        );
        let a = parse_args(&["-id=x".to_string(), "-bundle=/b".into(), "delete".into()]).unwrap();
        assert_eq!((a.id.as_str(), a.bundle), ("x", Some(PathBuf::from("/b"))));
        assert!(parse_args(&["-bogus".to_string(), "1".into()]).is_err());
        assert!(parse_args(&["-id".to_string()]).is_err());
    }

    #[test]
    fn a_pods_containers_share_one_socket() {
        let a = socket_path("/c.sock", "ns", "pod1");
        assert_eq!(a, socket_path("/c.sock", "ns", "pod1"));
        assert_ne!(a, socket_path("/c.sock", "ns2", "pod1"));
        assert!(a.as_os_str().len() < 100);
    }
}
