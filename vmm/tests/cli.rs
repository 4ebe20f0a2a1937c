//! hull-vmm's command line: bad arguments and configs are refused with exit status 2, a
//! message naming what is wrong, and nothing started.

use std::process::Command;

mod common;
use common::*;

fn run(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = Command::new(vmm_binary()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_or_unknown_arguments_print_usage() {
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--config is required") && err.contains("usage:"),
        "{err}"
    );
    let (code, err) = run(&["--frobnicate".as_ref()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--frobnicate"), "{err}");
}

#[test]
fn bad_configs_name_the_field() {
    let dir = TestDir::new("cli");
    let cases: &[(serde_json::Value, &str)] = &[
        (
            serde_json::json!({"memory_mib": 128}),
            "missing field `kernel`",
        ),
        (
            serde_json::json!({"memory_mib": 1, "kernel": kernel()}),
            "memory_mib",
        ),
        (
            serde_json::json!({"memory_mib": 64, "vcpus": 0, "kernel": kernel()}),
            "vcpus",
        ),
        (
            serde_json::json!({"memory_mib": 64, "kernel": "/nonexistent/vmlinux"}),
            "/nonexistent/vmlinux",
        ),
        (
            serde_json::json!({"memory_mib": 64, "kernel": kernel(), "vsock": {"cid": 1, "uds": "/tmp/x"}}),
            "vsock.cid",
        ),
        (
            serde_json::json!({"memory_mib": 64, "kernel": kernel(), "disks": []}),
            "disks",
        ),
    ];
    for (json, expected) in cases {
        let path = dir.path("vm.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let (code, err) = run(&["--config".as_ref(), path.as_os_str()]);
        assert_eq!(code, Some(2), "{json}: {err}");
        assert!(
            err.contains(expected),
            "{json}: expected {expected:?} in {err}"
        );
    }
    let (code, err) = run(&["--config".as_ref(), dir.path("absent.json").as_os_str()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("absent.json"), "{err}");
}

#[test]
fn a_kernel_that_is_not_an_elf_fails_before_the_guest_runs() {
    let dir = TestDir::new("cli-kernel");
    let bogus = dir.path("vmlinux");
    std::fs::write(&bogus, b"MZ not a kernel").unwrap();
    let config = dir.config(&VmSpec {
        kernel: bogus,
        ..Default::default()
    });
    let (code, err) = run(&["--config".as_ref(), config.as_os_str()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot load the kernel") && err.contains("vmlinux"),
        "{err}"
    );
}
