//! Bad input to `hull do`: one clear error line, exit 125 (as `docker run` for its own
//! failures), and nothing left behind (hull_do asserts: no process, mount, socket or
//! directory of the run).

use hull_tests::{busybox, hull_do, hull_do_with, Run, TempDir};

fn one_clear_line(r: &Run, expect: &str) {
    assert_eq!(r.code(), 125, "stderr: {}", r.stderr());
    let err = r.stderr();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    assert!(lines[0].starts_with("hull: "), "{err}");
    assert!(lines[0].contains(expect), "want {expect:?} in: {err}");
}

#[test]
fn a_missing_image_is_named() {
    let r = hull_do(&["/nonexistent/image", "true"]);
    one_clear_line(&r, "image /nonexistent/image does not exist");
}

#[test]
fn a_malformed_layout_is_named() {
    let dir = TempDir::new("malformed");
    std::fs::write(
        dir.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("index.json"), "{ not json").unwrap();
    let r = hull_do(&[dir.path().to_str().unwrap(), "true"]);
    one_clear_line(&r, "index.json");
}

#[test]
fn an_unknown_user_is_named() {
    let rootfs = busybox().join("rootfs");
    let r = hull_do(&["--user", "nosuchuser", rootfs.to_str().unwrap(), "true"]);
    one_clear_line(&r, "user \"nosuchuser\" not found");
}

#[test]
fn an_empty_command_is_refused() {
    let rootfs = busybox().join("rootfs");
    let r = hull_do(&[rootfs.to_str().unwrap()]);
    one_clear_line(&r, "no command to run");
    let r = hull_do(&[rootfs.to_str().unwrap(), ""]);
    one_clear_line(&r, "no command to run");
}

#[test]
fn a_missing_kernel_is_named_with_what_to_do() {
    let dir = TempDir::new("nokernel");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "kernel = \"/nonexistent/vmlinux\"\n").unwrap();
    let rootfs = busybox().join("rootfs");
    let r = hull_do_with(
        &["--config", config.to_str().unwrap()],
        &[rootfs.to_str().unwrap(), "true"],
        None,
    );
    one_clear_line(
        &r,
        "guest kernel /nonexistent/vmlinux not found: run the README's set-up",
    );
}

#[test]
fn unknown_options_are_named() {
    let r = hull_do(&["--frobnicate", "img"]);
    assert_eq!(r.code(), 125);
    assert!(
        r.stderr().starts_with("hull: unknown option --frobnicate"),
        "{}",
        r.stderr()
    );
}

#[test]
fn a_bad_seccomp_option_or_profile_is_named() {
    let rootfs = busybox().join("rootfs");
    let rootfs = rootfs.to_str().unwrap();
    let r = hull_do(&["--security-opt", "apparmor=x", rootfs, "true"]);
    one_clear_line(&r, "--security-opt \"apparmor=x\" is not supported");
    let r = hull_do(&["--security-opt", "seccomp=/no/such.json", rootfs, "true"]);
    one_clear_line(&r, "reading the seccomp profile /no/such.json");
    let dir = TempDir::new("bad-profile");
    let bad = dir.path().join("p.json");
    std::fs::write(&bad, r#"{"defaultAction": "SCMP_ACT_SOMETIMES"}"#).unwrap();
    let opt = format!("seccomp={}", bad.display());
    let r = hull_do(&["--security-opt", &opt, rootfs, "true"]);
    one_clear_line(&r, "is not an OCI linux.seccomp object");
    // Valid OCI, refused by the guest: the VM is up by then, and must go.
    std::fs::write(&bad, r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#).unwrap();
    let r = hull_do(&["--security-opt", &opt, rootfs, "true"]);
    one_clear_line(&r, "SCMP_ACT_NOTIFY");
}
