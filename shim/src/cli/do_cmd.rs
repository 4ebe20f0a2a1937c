//! `hull do [OPTIONS] IMAGE [--] [CMD...]`: run one command in a container in its own
//! microVM, wire its stdio through, return its exit status; remove everything after.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::monitor::{self, Console, Io};
use crate::agent_client::ProcessExit;
use crate::config::Config;
use crate::image::{self, ImageConfig, ImageKind};
use crate::sandbox::{Sandbox, SandboxSpec};
use crate::spec::{self, ProcessSpec};
use crate::user;
use anyhow::{bail, Context, Result};

pub const USAGE: &str =
    "usage: hull do [-e K=V]... [-w DIR] [--user U] [--cpus N] [--memory M] [-i] [-t]
               [--security-opt seccomp=unconfined|FILE] IMAGE [--] [CMD...]

Runs CMD in a container made from IMAGE, inside its own microVM, and exits with its status
(126/127 when CMD cannot be run, 128+N when a signal killed it). IMAGE is a rootfs
directory or an OCI image layout (a directory or a .tar of one).

  -e, --env K=V       set an environment variable (repeatable)
  -w, --workdir DIR   working directory in the container
  -u, --user U        NAME, UID, NAME:GROUP or UID:GID from the image's /etc/passwd
      --cpus N        vCPUs of the VM
  -m, --memory M      memory of the VM (e.g. 512m, 1g; default from the config)
  -i, --interactive   pass stdin through
  -t, --tty           give the container a terminal
      --security-opt seccomp=unconfined|FILE
                      run without a seccomp filter, or with FILE (an OCI linux.seccomp
                      object) instead of the default profile (Docker's policy, no vsock)
      --timings FILE  write the phase timings (JSON) to FILE";

#[derive(Debug, Default)]
pub struct DoOptions {
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub interactive: bool,
    pub tty: bool,
    pub timings: Option<PathBuf>,
    pub seccomp: Seccomp,
    pub image: PathBuf,
    pub cmd: Vec<String>,
}

/// Which seccomp filter the container gets.
#[derive(Debug, Default, PartialEq)]
pub enum Seccomp {
    #[default]
    Default,
    Unconfined,
    Profile(PathBuf),
}

impl Seccomp {
    /// The spec's `linux.seccomp`, if any.
    fn spec(&self) -> Result<Option<serde_json::Value>> {
        match self {
            Seccomp::Default => Ok(Some(crate::seccomp_profile::default_profile())),
            Seccomp::Unconfined => Ok(None),
            Seccomp::Profile(path) => {
                let text = std::fs::read(path)
                    .with_context(|| format!("reading the seccomp profile {}", path.display()))?;
                let v: serde_json::Value = serde_json::from_slice(&text).with_context(|| {
                    format!("the seccomp profile {} is not JSON", path.display())
                })?;
                serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(v.clone()).with_context(
                    || {
                        format!(
                            "the seccomp profile {} is not an OCI linux.seccomp object \
                             (defaultAction, syscalls[].names/action/args)",
                            path.display()
                        )
                    },
                )?;
                Ok(Some(v))
            }
        }
    }
}

fn parse_memory(s: &str) -> Result<u64> {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = match lower.trim_end_matches('b').chars().last() {
        Some('k') => (
            &lower[..lower.trim_end_matches('b').len() - 1],
            1.0 / 1024.0,
        ),
        Some('m') => (&lower[..lower.trim_end_matches('b').len() - 1], 1.0),
        Some('g') => (&lower[..lower.trim_end_matches('b').len() - 1], 1024.0),
        _ => (lower.as_str(), 1.0 / (1024.0 * 1024.0)),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--memory {s:?} is not a size: use e.g. 512m or 1g"))?;
    let mib = (n * mult).ceil() as u64;
    if mib < 64 {
        bail!("--memory {s} is too small: a sandbox needs at least 64m");
    }
    Ok(mib)
}

pub fn parse_args(args: &[String]) -> Result<DoOptions> {
    let mut o = DoOptions::default();
    let mut it = args.iter().peekable();
    let value =
        |it: &mut std::iter::Peekable<std::slice::Iter<String>>, flag: &str| -> Result<String> {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
    let mut image = None;
    while let Some(a) = it.next() {
        if image.is_some() {
            if a != "--" || !o.cmd.is_empty() {
                o.cmd.push(a.clone());
            }
            continue;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let take = |it: &mut std::iter::Peekable<std::slice::Iter<String>>| match inline.clone() {
            Some(v) => Ok(v),
            None => value(it, flag),
        };
        match flag {
            "-e" | "--env" => o.env.push(take(&mut it)?),
            "-w" | "--workdir" => o.workdir = Some(take(&mut it)?),
            "-u" | "--user" => o.user = Some(take(&mut it)?),
            "--cpus" => {
                let v = take(&mut it)?;
                let n: f64 = v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--cpus {v:?} is not a number"))?;
                if !(n > 0.0 && n <= 64.0) {
                    bail!("--cpus {v} is out of range: give 1 to 64");
                }
                o.cpus = Some(n.ceil() as u32);
            }
            "-m" | "--memory" => o.memory_mib = Some(parse_memory(&take(&mut it)?)?),
            "-i" | "--interactive" => o.interactive = true,
            "-t" | "--tty" => o.tty = true,
            "-it" | "-ti" => {
                o.interactive = true;
                o.tty = true;
            }
            "--timings" => o.timings = Some(PathBuf::from(take(&mut it)?)),
            "--security-opt" => {
                let v = take(&mut it)?;
                o.seccomp = match v.split_once('=') {
                    Some(("seccomp", "unconfined")) => Seccomp::Unconfined,
                    Some(("seccomp", file)) if !file.is_empty() => {
                        Seccomp::Profile(PathBuf::from(file))
                    }
                    _ => bail!(
                        "--security-opt {v:?} is not supported: give seccomp=unconfined or \
                         seccomp=FILE"
                    ),
                };
            }
            "-h" | "--help" => bail!("{USAGE}"),
            "--" => bail!("give IMAGE before --\n{USAGE}"),
            f if f.starts_with('-') && f.len() > 1 => bail!("unknown option {f}\n{USAGE}"),
            _ => image = Some(PathBuf::from(a)),
        }
    }
    o.image = image.with_context(|| format!("no IMAGE given\n{USAGE}"))?;
    for e in &o.env {
        if !e.contains('=') || e.starts_with('=') {
            bail!("-e {e:?} is not K=V");
        }
    }
    Ok(o)
}

fn unique_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("do-{}-{:08x}", std::process::id(), nanos)
}

/// The container's command: CMD from the command line replaces the image's Cmd.
fn command(o: &DoOptions, cfg: &ImageConfig) -> Result<Vec<String>> {
    let cmd = if o.cmd.is_empty() { &cfg.cmd } else { &o.cmd };
    let full: Vec<String> = cfg.entrypoint.iter().chain(cmd).cloned().collect();
    if full.is_empty() || full[0].is_empty() {
        bail!("no command to run: give one after the image (hull do IMAGE -- CMD), or use an image with Cmd or Entrypoint");
    }
    Ok(full)
}

#[derive(Default, serde::Serialize)]
struct Timings {
    prepare_ms: f64,
    vmm_started_ms: f64,
    agent_ready_ms: f64,
    container_created_ms: f64,
    container_started_ms: f64,
    exited_ms: f64,
    cleaned_up_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `hull do`; returns the exit status to exit with.
pub fn run(config: &Config, o: DoOptions) -> Result<i32> {
    let t0 = Instant::now();
    let mut timings = Timings::default();
    // Signals for the container are handled by one thread, so block them everywhere first.
    monitor::block_signals()?;

    let kind = image::detect(&o.image)?;
    let seccomp = o.seccomp.spec()?;
    // A command line that cannot work fails before anything is made.
    if kind == ImageKind::RootfsDir && o.cmd.is_empty() {
        command(&o, &ImageConfig::default())?;
    }
    let id = unique_id();
    let cid = "c0";
    let mut sandbox = Sandbox::new(
        config,
        SandboxSpec {
            id: id.clone(),
            vcpus: o.cpus.unwrap_or(config.default_vcpus),
            memory_mib: o.memory_mib.unwrap_or(config.default_memory_mib),
        },
    )?;
    let rel_rootfs = Path::new(cid).join("rootfs");
    let (rootfs, image_config) = match kind {
        ImageKind::RootfsDir => {
            let abs = std::fs::canonicalize(&o.image)
                .with_context(|| format!("resolving {}", o.image.display()))?;
            (
                sandbox.bind_into_share(&abs, &rel_rootfs)?,
                ImageConfig::default(),
            )
        }
        ImageKind::OciLayoutDir | ImageKind::OciLayoutTar => {
            let rootfs = sandbox.shared_dir().join(&rel_rootfs);
            let scratch = sandbox.dir().join("scratch");
            std::fs::create_dir_all(&rootfs)?;
            std::fs::create_dir_all(&scratch)?;
            let cfg = image::unpack(&o.image, kind, &scratch, &rootfs)?;
            let _ = std::fs::remove_dir_all(&scratch);
            (rootfs, cfg)
        }
    };
    let args = command(&o, &image_config)?;
    let user_spec = o
        .user
        .clone()
        .or_else(|| image_config.user.clone())
        .unwrap_or_default();
    let user = user::resolve(&rootfs, &user_spec)?;
    let env = spec::environment(&image_config.env, &o.env, &user.home, o.tty);
    let cwd = o
        .workdir
        .clone()
        .or_else(|| image_config.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') {
        bail!("working directory {cwd:?} must be an absolute path");
    }
    let mut oci = spec::default_spec(
        &rel_rootfs.display().to_string(),
        "hull",
        &ProcessSpec {
            args: &args,
            env: &env,
            cwd: &cwd,
            user: &user,
            terminal: o.tty,
        },
    );
    if let Some(profile) = seccomp {
        oci["linux"]["seccomp"] = profile;
    }
    timings.prepare_ms = ms(t0.elapsed());

    sandbox.boot()?;
    timings.vmm_started_ms = ms(sandbox.times.vmm_started) + timings.prepare_ms;
    timings.agent_ready_ms = ms(sandbox.times.agent_ready) + timings.prepare_ms;
    tracing::info!("{}", sandbox.describe_backend());

    let agent = sandbox.agent()?.clone();
    let listeners = monitor::listen(
        sandbox.vsock(),
        hull_protocol::FIRST_STDIO_PORT,
        o.tty,
        o.interactive,
    )?;
    let spec_bytes = serde_json::to_vec(&oci)?;
    if let Err(e) = agent.create_container(cid, spec_bytes, listeners.stdio.clone()) {
        // As `docker run`: a command that is not there is 127, not a runtime failure.
        if e.to_string().contains("executable file not found") {
            eprintln!("hull: {e}");
            return Ok(127);
        }
        return Err(e.into());
    }
    timings.container_created_ms = ms(t0.elapsed());

    let console = if o.tty {
        Console::Inherit
    } else {
        Console::Pipes
    };
    let io = Io::connect(listeners, &console)?;
    if let Some((rows, cols)) = io.size() {
        let _ = agent.resize_pty(cid, "", rows, cols);
    }
    monitor::forward_signals(agent.clone(), cid.to_string(), String::new(), io.size_fd());

    let start_error = agent.start_container(cid).err();
    timings.container_started_ms = ms(t0.elapsed());
    let exit = monitor::wait_exit(&agent, cid, "", || !sandbox.vmm_exited());
    timings.exited_ms = ms(t0.elapsed());
    io.drain(Duration::from_secs(5));
    drop(io);
    if let Some(e) = start_error {
        let _ = std::io::stdout().flush();
        eprintln!("hull: {e}");
    }
    let ooms = agent
        .stats(cid)
        .ok()
        .and_then(|s| s.get("memory.events.oom_kill").copied())
        .unwrap_or(0);
    if ooms > 0 {
        let _ = std::io::stdout().flush();
        eprintln!(
            "hull: out of memory: the kernel's OOM killer ended {ooms} process(es) of the \
             container; give the VM more memory with --memory"
        );
    }
    let _ = agent.remove_container(cid);
    sandbox.shutdown();
    timings.cleaned_up_ms = ms(t0.elapsed());
    if let Some(path) = &o.timings {
        std::fs::write(path, serde_json::to_vec_pretty(&timings)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(match exit {
        ProcessExit::Code(c) => c,
        s @ ProcessExit::Signal(_) => s.shell_status(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_stop_at_the_image() {
        let o = parse_args(&args(&[
            "-e",
            "A=1",
            "--user=hull",
            "-it",
            "img",
            "sh",
            "-c",
            "echo -e",
        ]))
        .unwrap();
        assert_eq!(o.env, vec!["A=1"]);
        assert_eq!(o.user.as_deref(), Some("hull"));
        assert!(o.interactive && o.tty);
        assert_eq!(o.image, PathBuf::from("img"));
        assert_eq!(o.cmd, vec!["sh", "-c", "echo -e"]);
        let o = parse_args(&args(&["img", "--", "ls", "--", "-l"])).unwrap();
        assert_eq!(o.cmd, vec!["ls", "--", "-l"]);
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        assert!(parse_args(&args(&["--bogus", "img"]))
            .unwrap_err()
            .to_string()
            .starts_with("unknown option --bogus"));
        assert!(parse_args(&args(&[]))
            .unwrap_err()
            .to_string()
            .starts_with("no IMAGE given"));
        assert!(parse_args(&args(&["-m", "1k", "img"]))
            .unwrap_err()
            .to_string()
            .contains("too small"));
        assert_eq!(
            parse_args(&args(&["-m", "1g", "img"])).unwrap().memory_mib,
            Some(1024)
        );
        assert_eq!(
            parse_args(&args(&["--memory=512m", "img"]))
                .unwrap()
                .memory_mib,
            Some(512)
        );
    }
}
