//! Running one OCI hook, as the runtime spec says: `path` with `args` (argv[0] included)
//! and exactly `env`, the container's state JSON on stdin, killed after `timeout`
//! seconds. Host-side hooks (prestart, createRuntime, poststart, poststop) run this in
//! the shim, container hooks (createContainer, startContainer) in the guest agent.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the hook to completion. The error names the hook and says what went wrong
/// (with the start of what it wrote to stderr).
pub fn run(
    path: &str,
    args: &[String],
    env: &[String],
    timeout: Option<i64>,
    state: &[u8],
) -> Result<(), String> {
    if let Some(t) = timeout.filter(|t| *t <= 0) {
        return Err(format!("hook {path}: timeout {t} must be positive"));
    }
    let mut cmd = Command::new(path);
    if let Some((first, rest)) = args.split_first() {
        cmd.arg0(first).args(rest);
    }
    cmd.env_clear();
    for e in env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("hook {path}: cannot run it: {e}"))?;
    // Read stderr on the side, so that a chatty hook cannot block on a full pipe.
    let stderr = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = (&mut s).take(4096).read_to_end(&mut text);
            // Drain the rest unread.
            let _ = std::io::copy(&mut s, &mut std::io::sink());
            String::from_utf8_lossy(&text).trim().to_string()
        })
    });
    if let Some(mut stdin) = child.stdin.take() {
        // Written aside, so a hook that never reads its stdin still meets its timeout.
        let state = state.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&state);
        });
    }
    // A timeout too large to add is no timeout.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(Duration::from_secs(t as u64)));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("hook {path}: waiting for it: {e}")),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "hook {path} did not finish within its timeout ({} s)",
                timeout.unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let text = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if status.success() {
        Ok(())
    } else if text.is_empty() {
        Err(format!("hook {path} failed ({status})"))
    } else {
        Err(format!("hook {path} failed ({status}): {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::run;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn state_on_stdin_env_exactly_as_given() {
        let dir = std::env::temp_dir().join(format!("hull-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let script = format!(
            "cat > {}; echo \"$A|$HOME\" >> {}",
            out.display(),
            out.display()
        );
        run(
            "/bin/sh",
            &sh(&script),
            &["A=1".into()],
            Some(5),
            b"{\"id\":\"x\"}",
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"id\":\"x\"}1|\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failures_and_timeouts_are_named() {
        let e = run("/bin/sh", &sh("echo broken >&2; exit 3"), &[], None, b"").unwrap_err();
        assert!(e.contains("/bin/sh failed") && e.contains("broken"), "{e}");
        let e = run("/bin/sh", &sh("sleep 10"), &[], Some(1), b"").unwrap_err();
        assert!(e.contains("timeout (1 s)"), "{e}");
        let e = run("/no/such/hook", &[], &[], None, b"").unwrap_err();
        assert!(e.contains("/no/such/hook: cannot run it"), "{e}");
        let e = run("/bin/true", &[], &[], Some(0), b"").unwrap_err();
        assert!(e.contains("must be positive"), "{e}");
    }
}
