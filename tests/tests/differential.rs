//! The same bundle under `runc run` and under `hull run`, compared: for each variant a
//! probe script prints what a container can see of the spec (ids, capabilities,
//! no_new_privs, seccomp, rlimits, umask, mounts, cgroup limits, hostname, cwd, sysctls,
//! what a denied syscall returns) and ends as the variant says; both runs must print the
//! same and end the same way. Every hull run boots a real microVM.
//!
//! Differences a VM cannot avoid are normalized away in one place, `normalize`, each with
//! its reason. Everything else fails the test.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use hull_tests::{hull_bin, rootfs_copy, TempDir};
use serde_json::{json, Value};

/// Prints what the container sees, one `== section` at a time.
const PROBE: &str = r#"
echo "== id"; id
echo "== status"; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp|Umask):' /proc/self/status
echo "== ulimit"; ulimit -a
echo "== oom_score_adj"; cat /proc/self/oom_score_adj
echo "== hostname"; hostname
echo "== cwd"; pwd
echo "== env"; env | sort
echo "== mounts"; cat /proc/self/mountinfo
echo "== cgroup"
c=/sys/fs/cgroup
first() { for f in "$@"; do [ -r "$f" ] && { cat "$f"; return; }; done; echo none; }
echo "memory $(first $c/memory.max $c/memory/memory.limit_in_bytes)"
echo "pids $(first $c/pids.max $c/pids/pids.max)"
if [ -r $c/cpu.max ]; then echo "cpu $(cat $c/cpu.max)"; else echo "cpu $(first $c/cpu,cpuacct/cpu.cfs_quota_us $c/cpu/cpu.cfs_quota_us) $(first $c/cpu,cpuacct/cpu.cfs_period_us $c/cpu/cpu.cfs_period_us)"; fi
echo "== masked"; for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug; do [ -e $p ] && { [ -s $p ] && echo "$p readable" || echo "$p empty"; }; done
echo "== readonly"; (echo 1 > /proc/sys/kernel/printk) 2>&1
echo "== write-rootfs"; (touch /probe-file && echo wrote && rm /probe-file) 2>&1
echo "== extra"; [ -n "$EXTRA" ] && eval "$EXTRA" 2>&1
echo "== end"
eval "$END"
"#;

/// One container run: what it printed and how it ended.
#[derive(Debug)]
struct Outcome {
    stdout: String,
    /// Not compared (runc's error messages are its own); shown when runs differ.
    stderr: String,
    code: Option<i32>,
    signal: Option<i32>,
}

fn outcome(o: Output) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    Outcome {
        stdout: normalize(&String::from_utf8_lossy(&o.stdout)),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        code: o.status.code(),
        signal: o.status.signal(),
    }
}

/// The differences a VM cannot avoid, each dropped or rewritten with its reason.
fn normalize(out: &str) -> String {
    let mut section = "";
    let mut lines = Vec::new();
    for line in out.lines() {
        if let Some(s) = line.strip_prefix("== ") {
            section = match s {
                "mounts" => "mounts",
                "cgroup" => "cgroup",
                _ => "",
            };
            lines.push(line.to_string());
            continue;
        }
        if section == "cgroup" {
            lines.push(cgroup_line(line));
            continue;
        }
        if section == "mounts" {
            if let Some(m) = mount_line(line) {
                lines.push(m);
            }
            continue;
        }
        lines.push(line.to_string());
    }
    lines.join("\n")
}

/// cgroup v1 spells "no limit" as a huge number or -1 where v2 says `max` (this host's
/// runc containers see v1, the guest v2).
fn cgroup_line(line: &str) -> String {
    line.split(' ')
        .map(|w| match w.parse::<i64>() {
            Ok(-1) => "max",
            Ok(n) if n >= 0x7fff_ffff_ffff_f000 => "max",
            _ => w,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A mountinfo line reduced to mount point, per-mount options and file system type.
/// Dropped: mount ids and device numbers (per boot); the root's source and type (runc
/// binds a host directory, the guest sees it through virtio-fs); super-block options of
/// the root (host and guest file systems differ); everything under /sys/fs/cgroup (this
/// host runs cgroup v1 beside v2, so runc mounts v1 hierarchies there; the guest has only
/// v2 — the limits are compared by value in `== cgroup` instead).
fn mount_line(line: &str) -> Option<String> {
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split_whitespace().collect();
    let r: Vec<&str> = right.split_whitespace().collect();
    let (point, opts) = (*l.get(4)?, *l.get(5)?);
    let (fstype, superopts) = (*r.first()?, r.get(2).copied().unwrap_or(""));
    if point.starts_with("/sys/fs/cgroup") {
        return None;
    }
    if point == "/" {
        return Some(format!("/ {opts}"));
    }
    // In a user namespace device nodes are bound from the machine's /dev: its mount
    // options and size are the machine's, not the container's.
    if fstype == "devtmpfs" {
        return Some(format!("{point} (a device bound from the machine's /dev)"));
    }
    // Host directories reach the guest through virtio-fs: a bind of one shows virtiofs
    // there and the host's file system under runc.
    let (fstype, superopts) = match fstype {
        "virtiofs" | "ext4" | "xfs" | "btrfs" | "overlay" => ("host-fs", ""),
        _ => (fstype, superopts),
    };
    // The guest kernel has no ACPI (a microVM has no firmware tables), so runc's default
    // mask of /proc/acpi has nothing to cover there.
    if point == "/proc/acpi" {
        return None;
    }
    Some(format!("{point} {opts} {fstype} {superopts}"))
}

/// A bundle for `runtime` in `dir`: runc's default spec, the probe as the process, then
/// the variant's edit.
fn make_bundle(dir: &TempDir, edit: &dyn Fn(&mut Value)) {
    rootfs_copy(dir);
    let o = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(dir.path())
        .output()
        .expect("running runc spec");
    assert!(o.status.success(), "runc spec: {o:?}");
    let path = dir.path().join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["sh", "-c", PROBE]);
    edit(&mut spec);
    std::fs::write(&path, spec.to_string()).unwrap();
}

fn run(program: &Path, root: &Path, bundle: &Path, id: &str) -> Outcome {
    let o = Command::new(program)
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .output()
        .expect("running the runtime");
    outcome(o)
}

/// Runs the variant under runc and under hull and compares.
fn differential(name: &str, edit: impl Fn(&mut Value)) {
    let runc_dir = TempDir::new(&format!("diff-runc-{name}"));
    let hull_dir = TempDir::new(&format!("diff-hull-{name}"));
    make_bundle(&runc_dir, &edit);
    make_bundle(&hull_dir, &edit);
    let id = format!("diff-{name}-{}", std::process::id());
    let runc = run(
        Path::new("runc"),
        &runc_dir.path().join("state"),
        runc_dir.path(),
        &id,
    );
    let hull = run(
        &hull_bin(),
        &hull_dir.path().join("state"),
        hull_dir.path(),
        &id,
    );
    for d in HOST_DIRS.with(|dirs| std::mem::take(&mut *dirs.borrow_mut())) {
        let _ = std::fs::remove_dir_all(d);
    }
    if (&runc.stdout, runc.code, runc.signal) != (&hull.stdout, hull.code, hull.signal) {
        let diff = line_diff(&runc.stdout, &hull.stdout);
        panic!(
            "{name}: runc and hull differ\nrunc ended {:?}/{:?}, hull {:?}/{:?}\n{diff}\
             runc's stderr: {}\nhull's stderr: {}",
            runc.code, runc.signal, hull.code, hull.signal, runc.stderr, hull.stderr
        );
    }
}

/// A line diff (longest common subsequence): lines only runc printed as `runc> `, only
/// hull printed as `hull> `, with the section each is in.
fn line_diff(runc: &str, hull: &str) -> String {
    let r: Vec<&str> = runc.lines().collect();
    let h: Vec<&str> = hull.lines().collect();
    let mut lcs = vec![vec![0usize; h.len() + 1]; r.len() + 1];
    for i in (0..r.len()).rev() {
        for j in (0..h.len()).rev() {
            lcs[i][j] = if r[i] == h[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out, mut section) = (0, 0, String::new(), "");
    let mut shown = String::new();
    let mut emit = |out: &mut String, section: &str, who: &str, l: &str| {
        if shown != section {
            *out += &format!("{section}\n");
            shown = section.to_string();
        }
        *out += &format!("{who}> {l}\n");
    };
    while i < r.len() || j < h.len() {
        if i < r.len() && j < h.len() && r[i] == h[j] {
            if r[i].starts_with("== ") {
                section = r[i];
            }
            i += 1;
            j += 1;
        } else if j < h.len() && (i == r.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            emit(&mut out, section, "hull", h[j]);
            j += 1;
        } else {
            emit(&mut out, section, "runc", r[i]);
            i += 1;
        }
    }
    out
}

fn env(spec: &mut Value, key: &str, value: &str) {
    spec["process"]["env"]
        .as_array_mut()
        .expect("runc's spec has env")
        .push(json!(format!("{key}={value}")));
}

fn extra(spec: &mut Value, script: &str) {
    env(spec, "EXTRA", script);
}

fn end(spec: &mut Value, script: &str) {
    env(spec, "END", script);
}

macro_rules! variants {
    ($($name:ident => $edit:expr;)*) => {
        $(
            #[test]
            fn $name() {
                differential(stringify!($name), $edit);
            }
        )*
    };
}

/// The capabilities in this process's bounding set: runc cannot grant others (this build
/// machine's sandbox lacks CAP_SYS_RESOURCE), while the guest could.
fn host_caps() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    hull_protocol::CAPABILITIES
        .iter()
        .enumerate()
        .filter(|(i, _)| bnd & (1 << i) != 0)
        .map(|(_, c)| *c)
        .collect()
}

fn caps(spec: &mut Value, sets: &[&str], names: &[&str]) {
    for set in sets {
        spec["process"]["capabilities"][*set] = json!(names);
    }
}

fn user(spec: &mut Value, uid: u32, gid: u32) {
    spec["process"]["user"]["uid"] = json!(uid);
    spec["process"]["user"]["gid"] = json!(gid);
}

fn add_mount(spec: &mut Value, m: Value) {
    spec["mounts"]
        .as_array_mut()
        .expect("runc's spec has mounts")
        .push(m);
}

thread_local! {
    /// The host directories this test's variant made (each test runs on its own thread).
    static HOST_DIRS: std::cell::RefCell<Vec<std::path::PathBuf>> = Default::default();
}

/// A host directory to bind into the container, with a file and a script in it. Lives as
/// long as the test process (the bundle copies cannot share a TempDir).
fn host_dir(name: &str) -> String {
    let d = std::env::temp_dir().join(format!("hull-diff-src-{name}-{}", std::process::id()));
    HOST_DIRS.with(|dirs| dirs.borrow_mut().push(d.clone()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("file"), "from the host\n").unwrap();
    std::fs::write(d.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    d.display().to_string()
}

/// mknod /dev/kmsg's twin, then open it for writing (no CAP_SYSLOG needed), and /dev/null.
const TRY_DEVICE: &str = "mknod /dev/k c 1 11 && echo made; (exec 3>/dev/k) 2>&1 && echo open-ok; (exec 3>/dev/null) && echo null-ok";

/// Who owns what the container sees, its maps, and whether root can write the rootfs.
const USERNS_PROBE: &str = "cat /proc/self/uid_map /proc/self/gid_map; ls -ln /bin/busybox | awk '{print $3, $4}'; touch /tmp/x 2>&1; echo x > /dev/null && echo dev-null-ok";

/// Container ids 0-65535 on 100000-165535 outside.
fn with_user_namespace(spec: &mut Value) {
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    let map = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    spec["linux"]["uidMappings"] = map.clone();
    spec["linux"]["gidMappings"] = map;
}

const TRY_MOUNT: &str = "cat /data/file; /data/run.sh; (echo x > /data/new && echo wrote-new && rm /data/new) 2>&1; ls /data";

variants! {
    default_spec => |_| {};
    exit_code => |s| end(s, "exit 42");
    exit_false => |s| end(s, "exec false");
    child_killed_by_signal => |s| end(s, "sh -c 'kill -SEGV $$'; echo status=$?");
    missing_command_in_shell => |s| end(s, "exec /no/such/thing");
    missing_command => |s| s["process"]["args"] = json!(["/no/such/thing"]);
    caps_dropped => |s| caps(s, &["bounding", "effective", "permitted"], &["CAP_CHOWN"]);
    caps_none => |s| caps(s, &["bounding", "effective", "permitted"], &[]);
    caps_all_the_host_allows => |s| caps(s, &["bounding", "effective", "permitted"], &host_caps());
    caps_ambient_for_a_user => |s| {
        user(s, 1000, 1000);
        caps(s, &["bounding", "effective", "permitted", "inheritable", "ambient"], &["CAP_NET_BIND_SERVICE", "CAP_KILL"]);
    };
    user_1000 => |s| user(s, 1000, 1000);
    user_without_passwd_entry => |s| user(s, 4242, 4343);
    user_with_groups => |s| {
        user(s, 1000, 1000);
        s["process"]["user"]["additionalGids"] = json!([10, 20, 3000]);
    };
    umask_077 => |s| {
        s["process"]["user"]["umask"] = json!(0o077);
        extra(s, "umask; touch /tmp/f; ls -l /tmp/f | cut -c1-10");
    };
    rlimits => |s| s["process"]["rlimits"] = json!([
        {"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200},
        {"type": "RLIMIT_NPROC", "soft": 77, "hard": 88},
        {"type": "RLIMIT_CORE", "soft": 0, "hard": 0},
        {"type": "RLIMIT_STACK", "soft": 1048576, "hard": 2097152},
        {"type": "RLIMIT_MEMLOCK", "soft": 65536, "hard": 65536},
    ]);
    writable_rootfs => |s| s["root"]["readonly"] = json!(false);
    masked_file_and_dir => |s| {
        s["linux"]["maskedPaths"].as_array_mut().unwrap().extend([json!("/etc/group"), json!("/home")]);
        extra(s, "wc -c < /etc/group; ls -a /home; (touch /home/x) 2>&1");
    };
    readonly_extra_path => |s| {
        s["root"]["readonly"] = json!(false);
        s["linux"]["readonlyPaths"].as_array_mut().unwrap().push(json!("/home"));
        extra(s, "(touch /home/x) 2>&1; touch /tmp/y && echo tmp-writable");
    };
    no_masks => |s| {
        s["linux"]["maskedPaths"] = json!([]);
        s["linux"]["readonlyPaths"] = json!([]);
    };
    no_new_privileges => |s| s["process"]["noNewPrivileges"] = json!(true);
    new_privileges_allowed => |s| s["process"]["noNewPrivileges"] = json!(false);
    hostname => |s| s["hostname"] = json!("probe-host");
    cwd_tmp => |s| s["process"]["cwd"] = json!("/tmp");
    cwd_missing_is_created => |s| s["process"]["cwd"] = json!("/var/new/dir");
    env_set => |s| {
        env(s, "HOME", "/elsewhere");
        env(s, "PROBE_VALUE", "a b=c");
    };
    oom_score_adj => |s| {
        s["process"]["oomScoreAdj"] = json!(500);
        extra(s, "cat /proc/self/oom_score_adj");
    };
    memory_limit => |s| s["linux"]["resources"]["memory"] = json!({"limit": 67108864});
    pids_limit => |s| s["linux"]["resources"]["pids"] = json!({"limit": 20});
    cpu_quota => |s| s["linux"]["resources"]["cpu"] = json!({"quota": 50000, "period": 100000});
    tmpfs_with_options => |s| {
        add_mount(s, json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "noexec", "nodev", "size=1m", "mode=700"]}));
        extra(s, "ls -ld /scratch | cut -c1-10");
    };
    bind_read_only => |s| {
        add_mount(s, json!({"destination": "/data", "type": "bind", "source": host_dir("ro"),
            "options": ["rbind", "ro"]}));
        extra(s, TRY_MOUNT);
    };
    bind_noexec_nodev_nosuid => |s| {
        add_mount(s, json!({"destination": "/data", "type": "bind", "source": host_dir("noexec"),
            "options": ["bind", "rw", "noexec", "nodev", "nosuid"]}));
        extra(s, TRY_MOUNT);
    };
    sysctls => |s| {
        s["linux"]["sysctl"] = json!({"kernel.shmmax": "1234567", "net.ipv4.ip_unprivileged_port_start": "80"});
        extra(s, "cat /proc/sys/kernel/shmmax /proc/sys/net/ipv4/ip_unprivileged_port_start");
    };
    seccomp_errno_for_mkdir => |s| {
        s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]});
        extra(s, "mkdir /tmp/denied; ls /tmp");
    };
    seccomp_allowlist_with_default_errno => |s| {
        s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": all_syscalls_but(&["chmod", "fchmodat", "fchmod", "fchmodat2", "sethostname"]),
                "action": "SCMP_ACT_ALLOW"}]});
        extra(s, "touch /tmp/f; chmod 600 /tmp/f; hostname other; ls -l /tmp/f | cut -c1-10");
    };
    seccomp_argument_rules => |s| {
        s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22,
             "args": [{"index": 1, "value": 10, "op": "SCMP_CMP_EQ"}]},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 34,
             "args": [{"index": 1, "value": 12, "op": "SCMP_CMP_GE"}, {"index": 0, "value": 0, "op": "SCMP_CMP_GT"}]},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
             "args": [{"index": 1, "value": 4294967295u64, "valueTwo": 1, "op": "SCMP_CMP_MASKED_EQ"}]}]});
        extra(s, "trap '' HUP USR1 USR2 TERM; for sig in HUP USR1 USR2 TERM 0; do kill -$sig 1 && echo $sig-sent; done");
    };
    seccomp_kill_process => |s| {
        s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL_PROCESS"}]});
        extra(s, "sh -c 'mkdir /tmp/k'; echo status=$?");
    };
    seccomp_for_a_user_without_no_new_privs => |s| {
        user(s, 1000, 1000);
        s["process"]["noNewPrivileges"] = json!(false);
        s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 30}]});
        extra(s, "mkdir /tmp/denied");
    };
    seccomp_for_a_user_with_no_new_privs => |s| {
        user(s, 1000, 1000);
        s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 30}]});
        extra(s, "mkdir /tmp/denied");
    };
    devices_default_deny => |s| {
        caps(s, &["bounding", "effective", "permitted"], &["CAP_MKNOD", "CAP_KILL"]);
        extra(s, TRY_DEVICE);
    };
    devices_allow_one => |s| {
        caps(s, &["bounding", "effective", "permitted"], &["CAP_MKNOD", "CAP_KILL"]);
        s["linux"]["resources"]["devices"].as_array_mut().unwrap().push(
            json!({"allow": true, "type": "c", "major": 1, "minor": 11, "access": "w"}));
        extra(s, TRY_DEVICE);
    };
    devices_allow_all => |s| {
        caps(s, &["bounding", "effective", "permitted"], &["CAP_MKNOD", "CAP_KILL"]);
        s["linux"]["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
        extra(s, TRY_DEVICE);
    };
    memory_limit_oom_kill => |s| {
        s["linux"]["resources"]["memory"] = json!({"limit": 33554432});
        extra(s, "dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; echo dd=$?");
    };
    user_namespace => |s| {
        with_user_namespace(s);
        extra(s, USERNS_PROBE);
    };
    user_namespace_with_a_user => |s| {
        with_user_namespace(s);
        user(s, 1000, 1000);
        extra(s, USERNS_PROBE);
    };
}

/// Every system call name the guest kernel knows but `except`.
fn all_syscalls_but(except: &[&str]) -> Vec<&'static str> {
    hull_protocol::syscalls::X86_64
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !except.contains(n))
        .collect()
}
