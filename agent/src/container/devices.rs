//! The devices cgroup on cgroup v2: the spec's `linux.resources.devices` rules (plus the
//! devices runc always allows) compiled into a BPF_PROG_TYPE_CGROUP_DEVICE program and
//! attached to the container's cgroup, as runc does.
//!
//! Semantics (runc's): a rule for all devices with all access (`a *:* rwm`) resets the
//! default to its verdict and drops the rules before it; otherwise the last rule that
//! matches a request (type, major, minor, and every requested access bit among its own)
//! decides, and the default decides when none does. The default is to deny: with no
//! rules, only runc's always-allowed devices (runc's emulator starts from deny on cgroup v2).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

// include/uapi/linux/bpf.h
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// One rule after parsing: `None` is a wildcard.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub allow: bool,
    pub typ: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

fn rule(
    allow: bool,
    typ: Option<u32>,
    major: Option<u32>,
    minor: Option<u32>,
    access: u32,
) -> Rule {
    Rule {
        allow,
        typ,
        major,
        minor,
        access,
    }
}

/// What runc appends to every container's rules: mknod of anything, and the devices every
/// container gets (null, zero, full, random, urandom, tty, console, ptmx, pts, tun).
fn always_allowed() -> Vec<Rule> {
    let c = Some(DEV_CHAR);
    let mut v = vec![
        rule(true, c, None, None, ACC_MKNOD),
        rule(true, Some(DEV_BLOCK), None, None, ACC_MKNOD),
    ];
    for (major, minor) in [
        (1, 3),
        (1, 8),
        (1, 7),
        (5, 0),
        (1, 5),
        (1, 9),
        (5, 1),
        (5, 2),
        (10, 200),
    ] {
        v.push(rule(true, c, Some(major), Some(minor), ACC_ALL));
    }
    v.push(rule(true, c, Some(136), None, ACC_ALL));
    v
}

fn parse(d: &LinuxDeviceCgroup) -> Result<Rule> {
    let typ = match d.typ().unwrap_or(LinuxDeviceType::A) {
        LinuxDeviceType::A => None,
        LinuxDeviceType::B => Some(DEV_BLOCK),
        LinuxDeviceType::C | LinuxDeviceType::U => Some(DEV_CHAR),
        LinuxDeviceType::P => {
            bail!("device rule {d}: type p (FIFO) is not a device the cgroup controls")
        }
    };
    let number = |n: Option<i64>, what: &str| -> Result<Option<u32>> {
        match n {
            None | Some(-1) => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| anyhow::anyhow!("device rule {d}: {what} {v} is out of range")),
        }
    };
    let mut access = 0;
    for ch in d.access().as_deref().unwrap_or("rwm").chars() {
        access |= match ch {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            'm' => ACC_MKNOD,
            other => bail!("device rule {d}: access {other:?} is not one of r, w, m"),
        };
    }
    if access == 0 {
        access = ACC_ALL;
    }
    Ok(rule(
        d.allow(),
        typ,
        number(d.major(), "major")?,
        number(d.minor(), "minor")?,
        access,
    ))
}

/// The default verdict and the rules that can override it, in order.
pub fn effective(spec: &[LinuxDeviceCgroup]) -> Result<(bool, Vec<Rule>)> {
    let mut default = false;
    let mut rules = Vec::new();
    let parsed = spec.iter().map(parse).collect::<Result<Vec<_>>>()?;
    for r in parsed.into_iter().chain(always_allowed()) {
        if r.typ.is_none() && r.major.is_none() && r.minor.is_none() && r.access == ACC_ALL {
            default = r.allow;
            rules.clear();
        } else {
            rules.push(r);
        }
    }
    Ok((default, rules))
}

/// One eBPF instruction (struct bpf_insn).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

const LDX_W: u8 = 0x61;
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const AND64_K: u8 = 0x57;
const RSH64_K: u8 = 0x77;
const JNE_K: u8 = 0x55;
const EXIT: u8 = 0x95;

/// The program: r3 = device type, r4 = requested access, r5 = major, r6 = minor; rules
/// checked last to first; the first that matches returns its verdict.
fn program(default: bool, rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(MOV64_X, 3, 2, 0, 0),
        insn(AND64_K, 3, 0, 0, 0xffff),
        insn(MOV64_X, 4, 2, 0, 0),
        insn(RSH64_K, 4, 0, 0, 16),
        insn(LDX_W, 5, 1, 4, 0),
        insn(LDX_W, 6, 1, 8, 0),
    ];
    for r in rules.iter().rev() {
        // Each jump skips to the end of this rule's block; offsets are patched below.
        let mut block: Vec<Insn> = Vec::new();
        let mut jumps = Vec::new();
        if let Some(t) = r.typ {
            jumps.push(block.len());
            block.push(insn(JNE_K, 3, 0, 0, t as i32));
        }
        if r.access != ACC_ALL {
            block.push(insn(MOV64_X, 7, 4, 0, 0));
            block.push(insn(AND64_K, 7, 0, 0, (!r.access & ACC_ALL) as i32));
            jumps.push(block.len());
            block.push(insn(JNE_K, 7, 0, 0, 0));
        }
        if let Some(m) = r.major {
            jumps.push(block.len());
            block.push(insn(JNE_K, 5, 0, 0, m as i32));
        }
        if let Some(m) = r.minor {
            jumps.push(block.len());
            block.push(insn(JNE_K, 6, 0, 0, m as i32));
        }
        block.push(insn(MOV64_K, 0, 0, 0, r.allow as i32));
        block.push(insn(EXIT, 0, 0, 0, 0));
        let len = block.len();
        for j in jumps {
            block[j].off = (len - j - 1) as i16;
        }
        p.extend(block);
    }
    p.push(insn(MOV64_K, 0, 0, 0, default as i32));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// union bpf_attr as BPF_PROG_LOAD reads it (zero tail up to the size passed).
#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _tail: [u64; 6],
}

/// union bpf_attr as BPF_PROG_ATTACH reads it.
#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _pad: u32,
}

fn load(prog: &[Insn]) -> Result<OwnedFd> {
    // Without a verifier log first (the common case); with one only to explain a refusal.
    load_with_log(prog, &mut []).or_else(|_| {
        let mut log = vec![0u8; 64 * 1024];
        let err = load_with_log(prog, &mut log).err();
        let text = String::from_utf8_lossy(&log);
        let text = text.trim_end_matches('\0').trim();
        match err {
            Some(e) => bail!("loading the device cgroup program: {e}: {text}"),
            None => bail!("loading the device cgroup program failed once, then not: retry"),
        }
    })
}

fn load_with_log(prog: &[Insn], log: &mut [u8]) -> std::io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let mut attr = LoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: u32::from(!log.is_empty()),
        log_size: log.len() as u32,
        log_buf: if log.is_empty() {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    attr.prog_name[..7].copy_from_slice(b"devices");
    // SAFETY: bpf(BPF_PROG_LOAD) reads the attr, the instructions and the license, and
    // writes at most log_size bytes into `log`; all live across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut LoadAttr,
            std::mem::size_of::<LoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Compiles the rules and attaches the program to the cgroup directory `dir`.
pub fn apply(dir: &Path, spec: &[LinuxDeviceCgroup]) -> Result<()> {
    let (default, rules) = effective(spec)?;
    let prog = program(default, &rules);
    let fd = load(&prog)?;
    let cgroup = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let attr = AttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    // SAFETY: bpf(BPF_PROG_ATTACH) reads the attr, which lives across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const AttachAttr,
            std::mem::size_of::<AttachAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("attaching the device cgroup program");
    }
    // The cgroup holds the program now; our descriptor can go.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(json: &str) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_str(json).unwrap()
    }

    /// What the program answers, evaluated the way the kernel runs it.
    fn verdict(p: &[Insn], typ: u32, access: u32, major: u32, minor: u32) -> bool {
        let mut r = [0u64; 11];
        let ctx = [(access << 16) | typ, major, minor];
        let mut pc = 0;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_W => r[dst] = ctx[i.off as usize / 4] as u64,
                MOV64_X => r[dst] = r[src],
                MOV64_K => r[dst] = i.imm as u64,
                AND64_K => r[dst] &= i.imm as u64,
                RSH64_K => r[dst] >>= i.imm,
                JNE_K => {
                    if r[dst] != i.imm as u64 {
                        pc += i.off as usize
                    }
                }
                EXIT => return r[0] == 1,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn deny_all_then_runcs_defaults() {
        let (default, list) = effective(&rules(r#"[{"allow": false, "access": "rwm"}]"#)).unwrap();
        assert!(!default);
        let p = program(default, &list);
        assert!(verdict(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 1, 3)); // /dev/null
        assert!(verdict(&p, DEV_CHAR, ACC_READ, 136, 7)); // a pts
        assert!(verdict(&p, DEV_CHAR, ACC_MKNOD, 1, 11)); // mknod anything
        assert!(!verdict(&p, DEV_CHAR, ACC_WRITE, 1, 11)); // but not open /dev/kmsg
        assert!(!verdict(&p, DEV_BLOCK, ACC_READ, 254, 0));
    }

    #[test]
    fn later_rules_win_and_access_must_be_covered() {
        let spec = rules(
            r#"[{"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "w"},
                {"allow": true, "type": "b", "major": 254, "access": "r"},
                {"allow": false, "type": "b", "major": 254, "minor": 1, "access": "r"}]"#,
        );
        let (default, list) = effective(&spec).unwrap();
        let p = program(default, &list);
        assert!(verdict(&p, DEV_CHAR, ACC_WRITE, 1, 11));
        assert!(!verdict(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 1, 11));
        assert!(verdict(&p, DEV_BLOCK, ACC_READ, 254, 0));
        assert!(!verdict(&p, DEV_BLOCK, ACC_READ, 254, 1));
        assert!(!verdict(&p, DEV_BLOCK, ACC_WRITE, 254, 0));
    }

    #[test]
    fn no_rules_allow_runcs_defaults_only_and_allow_all_allows_everything() {
        let (default, list) = effective(&rules("[]")).unwrap();
        let p = program(default, &list);
        assert!(!verdict(&p, DEV_BLOCK, ACC_READ, 8, 0));
        assert!(verdict(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 1, 3));
        let spec = r#"[{"allow": false}, {"allow": true, "access": "rwm"}]"#;
        let (default, list) = effective(&rules(spec)).unwrap();
        assert!(default, "{spec}");
        assert!(verdict(&program(default, &list), DEV_BLOCK, ACC_ALL, 8, 0));
    }

    #[test]
    fn bad_rules_are_named() {
        let err = |j: &str| format!("{:#}", effective(&rules(j)).unwrap_err());
        assert!(
            err(r#"[{"allow": true, "type": "c", "major": 1, "access": "x"}]"#).contains("access")
        );
        assert!(err(r#"[{"allow": true, "type": "c", "major": 99999999999}]"#).contains("major"));
    }
}
