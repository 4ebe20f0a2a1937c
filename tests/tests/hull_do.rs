//! `hull do` end to end: real microVMs (QEMU microvm, TCG on hosts without vmx/svm) with
//! Hull's guest kernel, agent, virtiofsd and vhost-device-vsock.

use std::process::Command;

use hull_tests::{busybox, hull_do, hull_do_with, rootfs_copy, TempDir};

fn rootfs() -> String {
    busybox().join("rootfs").display().to_string()
}

#[test]
fn echo_and_exit_codes_come_back_as_docker_run_gives_them() {
    let r = hull_do(&[&rootfs(), "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(
        (r.code(), r.stdout().as_str(), r.stderr().as_str()),
        (7, "out\n", "err\n")
    );
    let r = hull_do(&[&rootfs(), "true"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let r = hull_do(&[&rootfs(), "--", "no-such-command", "x"]);
    assert_eq!(r.code(), 127);
    assert!(r.stderr().contains("no-such-command"), "{}", r.stderr());
    let r = hull_do(&[&rootfs(), "/etc/passwd"]);
    assert_eq!(r.code(), 126, "{}", r.stderr());
}

#[test]
fn a_process_killed_by_a_signal_exits_128_plus_the_signal() {
    let dir = TempDir::new("signal");
    let root = rootfs_copy(&dir);
    build_static(
        &dir,
        "int main(void) { *(volatile int *)0 = 1; return 0; }\n",
        &root.join("segv"),
    );
    let r = hull_do(&[root.to_str().unwrap(), "/segv"]);
    assert_eq!(r.code(), 128 + 11, "{}", r.stderr());
}

#[test]
fn stdin_is_piped_through_with_dash_i() {
    let r = hull_do_with(
        &[],
        &["-i", &rootfs(), "sh", "-c", "tr a-z A-Z; echo done"],
        Some(b"hello\nworld\n"),
    );
    assert_eq!(r.stdout(), "HELLO\nWORLD\ndone\n", "{}", r.stderr());
    // Without -i the container's stdin is empty.
    let r = hull_do_with(&[], &[&rootfs(), "cat"], Some(b"ignored"));
    assert_eq!((r.code(), r.stdout().as_str()), (0, ""));
}

#[test]
fn env_cwd_and_user_are_honoured() {
    let r = hull_do(&[
        "-e",
        "FOO=bar baz",
        "-w",
        "/tmp",
        "--user",
        "hull",
        &rootfs(),
        "sh",
        "-c",
        "echo \"$FOO\"; pwd; id -u; id -g; id -G; echo $HOME",
    ]);
    assert_eq!(
        r.stdout(),
        "bar baz\n/tmp\n1000\n1000\n1000 10\n/home/hull\n",
        "{}",
        r.stderr()
    );
    let r = hull_do(&["--user", "4242:4343", &rootfs(), "sh", "-c", "id -u; id -g"]);
    assert_eq!(r.stdout(), "4242\n4343\n", "{}", r.stderr());
}

#[test]
fn the_guest_kernel_is_ours_not_the_hosts() {
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    let r = hull_do(&[&rootfs(), "uname", "-r"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_ne!(r.stdout(), host);
    assert!(
        r.stdout().starts_with("6.1."),
        "guest kernel {}",
        r.stdout()
    );
}

#[test]
fn the_rootfs_is_the_one_given_and_writes_land_in_it() {
    let dir = TempDir::new("rootfs");
    let root = rootfs_copy(&dir);
    std::fs::write(root.join("marker"), "from the host\n").unwrap();
    let r = hull_do(&[
        root.to_str().unwrap(),
        "sh",
        "-c",
        "cat /marker; echo from the guest > /written",
    ]);
    assert_eq!(r.stdout(), "from the host\n", "{}", r.stderr());
    assert_eq!(
        std::fs::read_to_string(root.join("written")).unwrap(),
        "from the guest\n"
    );
    // The host's copy of the image was not touched.
    assert!(!busybox().join("rootfs/written").exists());
}

#[test]
fn oci_layouts_run_as_directory_and_as_tar() {
    for image in ["oci", "busybox-oci.tar"] {
        let path = busybox().join(image);
        let r = hull_do(&[
            path.to_str().unwrap(),
            "sh",
            "-c",
            "echo $PATH; ls /bin/busybox",
        ]);
        assert_eq!(r.code(), 0, "{image}: {}", r.stderr());
        assert_eq!(
            r.stdout(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/bin/busybox\n"
        );
    }
}

#[test]
fn the_container_cannot_see_host_processes_or_mounts() {
    let r = hull_do(&[
        &rootfs(),
        "sh",
        "-c",
        "echo $$; ls /proc | grep -c '^[0-9]'; cat /proc/self/mountinfo",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let out = r.stdout();
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("1"),
        "the container's shell is not PID 1: {out}"
    );
    let procs: u32 = lines.next().unwrap().parse().unwrap();
    assert!(procs <= 3, "the container sees {procs} processes");
    let mountinfo: Vec<&str> = lines.collect();
    for host_path in [
        "/run/hull",
        "/work",
        "/var/lib/hull",
        "/sys/fs/cgroup/memory",
    ] {
        assert!(
            !mountinfo.iter().any(|l| l.contains(host_path)),
            "host mount {host_path} visible: {out}"
        );
    }
    assert!(
        mountinfo.len() < 20,
        "{} mounts visible: {out}",
        mountinfo.len()
    );
}

#[test]
fn default_capabilities_equal_runcs() {
    let dir = TempDir::new("caps");
    let bundle = dir.path();
    let root = rootfs_copy(&dir);
    assert!(Command::new("runc")
        .arg("spec")
        .current_dir(bundle)
        .status()
        .unwrap()
        .success());
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["grep", "^Cap", "/proc/self/status"]);
    std::fs::write(&config, spec.to_string()).unwrap();
    let id = format!("hull-caps-{}", std::process::id());
    let runc = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(&id)
        .output()
        .unwrap();
    assert!(
        runc.status.success(),
        "runc run: {}",
        String::from_utf8_lossy(&runc.stderr)
    );
    let r = hull_do(&[root.to_str().unwrap(), "grep", "^Cap", "/proc/self/status"]);
    assert_eq!(
        r.stdout(),
        String::from_utf8_lossy(&runc.stdout),
        "{}",
        r.stderr()
    );
}

#[test]
fn a_terminal_is_a_pty_inside_the_container() {
    let r = hull_do(&["-t", &rootfs(), "sh", "-c", "tty; echo $TERM"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.stdout(), "/dev/pts/0\r\nxterm\r\n");
}

#[test]
fn two_hull_do_at_once_both_work() {
    let a = std::thread::spawn(|| hull_do(&[&rootfs(), "sh", "-c", "sleep 1; echo a"]));
    let b = std::thread::spawn(|| hull_do(&[&rootfs(), "sh", "-c", "sleep 1; echo b"]));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!(
        (a.code(), a.stdout().as_str()),
        (0, "a\n"),
        "{}",
        a.stderr()
    );
    assert_eq!(
        (b.code(), b.stdout().as_str()),
        (0, "b\n"),
        "{}",
        b.stderr()
    );
}

/// A static probe in the rootfs that tries calls the default profile keeps out and prints
/// what each returned.
fn seccomp_probe(dir: &TempDir) -> std::path::PathBuf {
    let root = rootfs_copy(dir);
    build_static(
        dir,
        r#"#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
static void show(const char *what, long rc) {
    printf("%s %s\n", what, rc < 0 ? strerror(errno) : "ok");
}
int main(void) {
    show("vsock", socket(40 /* AF_VSOCK */, SOCK_STREAM, 0));
    show("unix", socket(AF_UNIX, SOCK_STREAM, 0));
    show("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0));
    show("unshare-user", syscall(SYS_unshare, 0x10000000 /* CLONE_NEWUSER */));
    show("personality-query", syscall(SYS_personality, 0xffffffffUL));
    show("personality-odd", syscall(SYS_personality, 0x0400000UL /* ADDR_NO_RANDOMIZE */));
    return 0;
}
"#,
        &root.join("probe"),
    );
    root
}

/// Compiles C `source` into a static binary at `out` (a probe for the container).
fn build_static(dir: &TempDir, source: &str, out: &std::path::Path) {
    let src = dir.path().join("probe.c");
    std::fs::write(&src, source).unwrap();
    let ok = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(out)
        .arg(&src)
        .status()
        .expect("gcc")
        .success();
    assert!(ok, "building {}", out.display());
}

#[test]
fn the_default_seccomp_profile_keeps_out_what_namespaces_do_not_isolate() {
    let dir = TempDir::new("seccomp-default");
    let root = seccomp_probe(&dir);
    let root = root.to_str().unwrap();
    let r = hull_do(&[root, "/probe"]);
    assert_eq!(
        (r.code(), r.stdout().as_str()),
        (
            0,
            "vsock Operation not permitted\nunix ok\nkeyctl Operation not permitted\n\
             unshare-user Operation not permitted\npersonality-query ok\n\
             personality-odd Operation not permitted\n"
        ),
        "{}",
        r.stderr()
    );
    let r = hull_do(&[root, "grep", "^Seccomp:", "/proc/self/status"]);
    assert_eq!(r.stdout(), "Seccomp:\t2\n");
    // Unconfined: the same calls reach the kernel.
    let r = hull_do(&["--security-opt", "seccomp=unconfined", root, "/probe"]);
    let out = r.stdout();
    assert!(
        out.contains("vsock ok") && out.contains("unshare-user ok"),
        "{out}"
    );
    let r = hull_do(&[
        "--security-opt=seccomp=unconfined",
        root,
        "grep",
        "^Seccomp:",
        "/proc/self/status",
    ]);
    assert_eq!(r.stdout(), "Seccomp:\t0\n");
}

#[test]
fn a_seccomp_profile_file_replaces_the_default() {
    let dir = TempDir::new("seccomp-file");
    let profile = dir.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}"#,
    )
    .unwrap();
    let opt = format!("seccomp={}", profile.display());
    let r = hull_do(&[
        "--security-opt",
        &opt,
        &rootfs(),
        "sh",
        "-c",
        "mkdir /tmp/x 2>&1; unshare -U true && echo userns-ok",
    ]);
    assert_eq!(
        r.stdout(),
        "mkdir: can't create directory '/tmp/x': Permission denied\nuserns-ok\n",
        "{}",
        r.stderr()
    );
}

#[test]
fn an_oom_kill_is_reported_as_such() {
    // 110 MiB touched in a 128 MiB VM: the guest kernel's OOM killer ends dd.
    let r = hull_do(&[
        "--memory",
        "128m",
        &rootfs(),
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/null bs=110M count=1 2>/dev/null; echo dd=$?",
    ]);
    assert_eq!((r.code(), r.stdout().as_str()), (0, "dd=137\n"));
    assert!(
        r.stderr().contains("hull: out of memory") && r.stderr().contains("--memory"),
        "{}",
        r.stderr()
    );
    let r = hull_do(&[&rootfs(), "true"]);
    assert_eq!(r.stderr(), "");
}
