//! The spec's seccomp profile, compiled to a classic BPF program with libseccomp's (and so
//! runc's) semantics, and installed with seccomp(2).
//!
//! Semantics: the filter checks the architecture (x86_64 only: the guest kernel has
//! neither IA32 nor x32 emulation, so other ABIs cannot reach it; a foreign arch value
//! kills the process), then looks the call up. A call's rules are tried in the spec's
//! order; the first whose conditions all hold decides; a rule without conditions always
//! holds. Conditions compare the full 64-bit argument (unsigned), as libseccomp does on a
//! 64-bit ABI. As in runc, a rule that compares one argument twice becomes one rule per
//! condition (libseccomp cannot AND those), and calls the guest kernel does not know are
//! skipped.

use anyhow::{bail, Result};
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// x32 system calls have this bit set in their number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
/// The largest errno a filter may return (the kernel's MAX_ERRNO).
const MAX_ERRNO: u32 = 4095;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const ALU_AND_K: u16 = 0x54;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGT_K: u16 = 0x25;
const JMP_JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;

// struct seccomp_data offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
fn off_arg_lo(i: usize) -> u32 {
    16 + 8 * i as u32
}
fn off_arg_hi(i: usize) -> u32 {
    off_arg_lo(i) + 4
}

/// The kernel's limit on a filter's length.
const BPF_MAXINSNS: usize = 4096;

/// A compiled filter and the flags to install it with.
#[derive(Debug)]
pub struct Program {
    pub filter: Vec<libc::sock_filter>,
    pub flags: libc::c_ulong,
}

impl Program {
    /// Installs the filter on this thread (and, with TSYNC, the others).
    pub fn install(&self) -> Result<()> {
        let prog = libc::sock_fprog {
            len: self.filter.len() as u16,
            filter: self.filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads the sock_fprog and the
        // instructions it points at, which live across the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .map_err(|e| anyhow::anyhow!("installing the seccomp filter: {e}"));
        }
        Ok(())
    }
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<u32> {
    let data = |default: u32| -> Result<u32> {
        let v = errno.unwrap_or(default);
        if v > MAX_ERRNO {
            bail!("seccomp errnoRet {v} is out of range: give 0 to {MAX_ERRNO}");
        }
        Ok(v)
    };
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | data(libc::EPERM as u32)?,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | data(libc::EPERM as u32)?,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActNotify => bail!(
            "seccomp action SCMP_ACT_NOTIFY (a user-space notifier) is not supported by hull yet; \
             use another action"
        ),
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Next,
    Label(usize),
}

#[derive(Debug)]
enum Op {
    Stmt {
        code: u16,
        k: u32,
    },
    Jump {
        code: u16,
        k: u32,
        t: Target,
        f: Target,
    },
    Label(usize),
}

/// Emits instructions with symbolic, forward-only jump targets; `assemble` lays them out,
/// turning conditional jumps whose targets are beyond reach (255) into a jump over two
/// unconditional ones.
#[derive(Default)]
struct Asm {
    ops: Vec<Op>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels += 1;
        self.labels - 1
    }
    fn place(&mut self, l: usize) {
        self.ops.push(Op::Label(l));
    }
    fn load(&mut self, offset: u32) {
        self.ops.push(Op::Stmt {
            code: LD_W_ABS,
            k: offset,
        });
    }
    fn and(&mut self, k: u32) {
        self.ops.push(Op::Stmt { code: ALU_AND_K, k });
    }
    fn ret(&mut self, k: u32) {
        self.ops.push(Op::Stmt { code: RET_K, k });
    }
    fn jump(&mut self, code: u16, k: u32, t: Target, f: Target) {
        self.ops.push(Op::Jump { code, k, t, f });
    }

    fn assemble(&self) -> Result<Vec<libc::sock_filter>> {
        let mut long = vec![false; self.ops.len()];
        loop {
            let (pos, at) = self.layout(&long);
            let mut changed = false;
            for (i, op) in self.ops.iter().enumerate() {
                if let Op::Jump { t, f, .. } = op {
                    if !long[i] {
                        let reach = |x: &Target| match x {
                            Target::Next => 0,
                            Target::Label(l) => at[*l] - pos[i] - 1,
                        };
                        if reach(t) > 255 || reach(f) > 255 {
                            long[i] = true;
                            changed = true;
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let (pos, at) = self.layout(&long);
        let mut out = Vec::new();
        let insn = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
        for (i, op) in self.ops.iter().enumerate() {
            let dist = |x: &Target, from: usize| match x {
                Target::Next => 0,
                Target::Label(l) => at[*l] - from - 1,
            };
            match op {
                Op::Stmt { code, k } => out.push(insn(*code, 0, 0, *k)),
                Op::Label(_) => {}
                Op::Jump { code, k, t, f } if !long[i] => out.push(insn(
                    *code,
                    dist(t, pos[i]) as u8,
                    dist(f, pos[i]) as u8,
                    *k,
                )),
                Op::Jump { code, k, t, f } => {
                    // jcond k → (ja t) : (ja f); a Next target is the op after the three.
                    out.push(insn(*code, 0, 1, *k));
                    let after = pos[i] + 3;
                    let far = |x: &Target| match x {
                        Target::Next => after,
                        Target::Label(l) => at[*l],
                    };
                    out.push(insn(JMP_JA, 0, 0, (far(t) - (pos[i] + 1) - 1) as u32));
                    out.push(insn(JMP_JA, 0, 0, (far(f) - (pos[i] + 2) - 1) as u32));
                }
            }
        }
        if out.len() > BPF_MAXINSNS {
            bail!(
                "the seccomp profile compiles to {} instructions; the kernel takes at most {BPF_MAXINSNS}",
                out.len()
            );
        }
        Ok(out)
    }

    /// Each op's position and each label's, for the given jump sizes.
    fn layout(&self, long: &[bool]) -> (Vec<usize>, Vec<usize>) {
        let mut pos = Vec::with_capacity(self.ops.len());
        let mut at = vec![0; self.labels];
        let mut p = 0;
        for (i, op) in self.ops.iter().enumerate() {
            pos.push(p);
            p += match op {
                Op::Label(l) => {
                    at[*l] = p;
                    0
                }
                Op::Jump { .. } if long[i] => 3,
                _ => 1,
            };
        }
        (pos, at)
    }

    /// Jumps to `fail` unless the condition holds; falls through when it does.
    fn condition(&mut self, c: &LinuxSeccompArg, fail: usize) -> Result<()> {
        let i = c.index();
        if i > 5 {
            bail!("seccomp argument index {i} is out of range: system calls have 6 (0-5)");
        }
        let (v, fail) = (c.value(), Target::Label(fail));
        let (hi, lo) = ((v >> 32) as u32, v as u32);
        let next = Target::Next;
        match c.op() {
            LinuxSeccompOperator::ScmpCmpMaskedEq => {
                let want = c.value_two().unwrap_or(0);
                self.load(off_arg_hi(i));
                self.and(hi);
                self.jump(JMP_JEQ_K, (want >> 32) as u32, next, fail);
                self.load(off_arg_lo(i));
                self.and(lo);
                self.jump(JMP_JEQ_K, want as u32, next, fail);
            }
            LinuxSeccompOperator::ScmpCmpEq => {
                self.load(off_arg_hi(i));
                self.jump(JMP_JEQ_K, hi, next, fail);
                self.load(off_arg_lo(i));
                self.jump(JMP_JEQ_K, lo, next, fail);
            }
            LinuxSeccompOperator::ScmpCmpNe => {
                let ok = self.label();
                self.load(off_arg_hi(i));
                self.jump(JMP_JEQ_K, hi, next, Target::Label(ok));
                self.load(off_arg_lo(i));
                self.jump(JMP_JEQ_K, lo, fail, next);
                self.place(ok);
            }
            op @ (LinuxSeccompOperator::ScmpCmpGt | LinuxSeccompOperator::ScmpCmpGe) => {
                let ok = self.label();
                let low = if op == LinuxSeccompOperator::ScmpCmpGt {
                    JMP_JGT_K
                } else {
                    JMP_JGE_K
                };
                self.load(off_arg_hi(i));
                self.jump(JMP_JGT_K, hi, Target::Label(ok), next);
                self.jump(JMP_JEQ_K, hi, next, fail);
                self.load(off_arg_lo(i));
                self.jump(low, lo, Target::Label(ok), fail);
                self.place(ok);
            }
            op @ (LinuxSeccompOperator::ScmpCmpLt | LinuxSeccompOperator::ScmpCmpLe) => {
                // The negation of GE / GT.
                let ok = self.label();
                let low = if op == LinuxSeccompOperator::ScmpCmpLt {
                    JMP_JGE_K
                } else {
                    JMP_JGT_K
                };
                self.load(off_arg_hi(i));
                self.jump(JMP_JGT_K, hi, fail, next);
                self.jump(JMP_JEQ_K, hi, next, Target::Label(ok));
                self.load(off_arg_lo(i));
                self.jump(low, lo, fail, Target::Label(ok));
                self.place(ok);
            }
        }
        Ok(())
    }
}

/// One rule: all of `conditions` hold → `action`.
struct Rule<'a> {
    conditions: Vec<&'a LinuxSeccompArg>,
    action: u32,
}

/// Compiles the profile. Errors name what in the profile is wrong.
pub fn compile(s: &LinuxSeccomp) -> Result<Program> {
    let default = action(s.default_action(), s.default_errno_ret())?;
    let mut flags: libc::c_ulong = 0;
    for f in s.flags().as_deref().unwrap_or_default() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // The container's process is single-threaded when the filter goes in.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
            // Only meaningful with a notifier (the kernel refuses it without
            // NEW_LISTENER), and notifiers are refused below: nothing to set.
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 0,
        };
    }
    if s.listener_path().is_some() {
        bail!("seccomp listenerPath (a user-space notifier) is not supported by hull yet");
    }

    // Rules per call number, in the spec's order.
    let mut calls: std::collections::BTreeMap<u32, Vec<Rule>> = Default::default();
    for sc in s.syscalls().as_deref().unwrap_or_default() {
        let act = action(sc.action(), sc.errno_ret())?;
        let args: Vec<&LinuxSeccompArg> = sc.args().as_deref().unwrap_or_default().iter().collect();
        let mut seen = std::collections::HashSet::new();
        let repeated = args.iter().any(|a| !seen.insert(a.index()));
        let rules: Vec<Vec<&LinuxSeccompArg>> = if repeated {
            args.iter().map(|a| vec![*a]).collect()
        } else {
            vec![args]
        };
        for name in sc.names() {
            // Unknown to the guest kernel: nothing can make that call (runc skips it too).
            let Some(nr) = hull_protocol::syscalls::number(name) else {
                continue;
            };
            let list = calls.entry(nr).or_default();
            for conditions in &rules {
                list.push(Rule {
                    conditions: conditions.clone(),
                    action: act,
                });
            }
        }
    }

    let mut a = Asm::default();
    let bad_arch = a.label();
    let default_label = a.label();
    a.load(OFF_ARCH);
    a.jump(
        JMP_JEQ_K,
        AUDIT_ARCH_X86_64,
        Target::Next,
        Target::Label(bad_arch),
    );
    a.load(OFF_NR);
    a.jump(
        JMP_JGE_K,
        X32_SYSCALL_BIT,
        Target::Label(default_label),
        Target::Next,
    );
    // Calls whose first rule is unconditional jump straight to a shared return.
    let mut returns: Vec<(u32, usize)> = Vec::new();
    let mut blocks: Vec<(usize, &Vec<Rule>)> = Vec::new();
    for (nr, rules) in &calls {
        let target = if rules[0].conditions.is_empty() {
            let act = rules[0].action;
            match returns.iter().find(|(k, _)| *k == act) {
                Some((_, l)) => *l,
                None => {
                    let l = a.label();
                    returns.push((act, l));
                    l
                }
            }
        } else {
            let l = a.label();
            blocks.push((l, rules));
            l
        };
        a.jump(JMP_JEQ_K, *nr, Target::Label(target), Target::Next);
    }
    a.place(default_label);
    a.ret(default);
    a.place(bad_arch);
    a.ret(RET_KILL_PROCESS);
    for (act, l) in &returns {
        a.place(*l);
        a.ret(*act);
    }
    for (l, rules) in blocks {
        a.place(l);
        for rule in rules {
            if rule.conditions.is_empty() {
                a.ret(rule.action);
                break;
            }
            let next_rule = a.label();
            for c in &rule.conditions {
                a.condition(c, next_rule)?;
            }
            a.ret(rule.action);
            a.place(next_rule);
        }
        a.ret(default);
    }
    Ok(Program {
        filter: a.assemble()?,
        flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program over a seccomp_data, as the kernel would.
    fn run(prog: &[libc::sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let ins = prog[pc];
            pc += 1;
            match ins.code {
                LD_W_ABS => {
                    let o = ins.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                ALU_AND_K => acc &= ins.k,
                JMP_JA => pc += ins.k as usize,
                RET_K => return ins.k,
                code => {
                    let taken = match code {
                        JMP_JEQ_K => acc == ins.k,
                        JMP_JGT_K => acc > ins.k,
                        JMP_JGE_K => acc >= ins.k,
                        _ => panic!("unexpected opcode {code:#x}"),
                    };
                    pc += if taken { ins.jt } else { ins.jf } as usize;
                }
            }
        }
    }

    fn profile(json: &str) -> Program {
        compile(&serde_json::from_str(json).unwrap()).unwrap()
    }

    const X86: u32 = AUDIT_ARCH_X86_64;

    #[test]
    fn default_and_listed_actions() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,"syscalls":[
                {"names":["read","write"],"action":"SCMP_ACT_ALLOW"},
                {"names":["mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13},
                {"names":["no_such_call"],"action":"SCMP_ACT_ALLOW"}]}"#,
        );
        assert_eq!(run(&p.filter, 0, X86, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p.filter, 1, X86, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p.filter, 258, X86, [0; 6]), RET_ERRNO | 13);
        assert_eq!(run(&p.filter, 2, X86, [0; 6]), RET_ERRNO | 38);
        // Another ABI, and x32 numbers.
        assert_eq!(run(&p.filter, 0, 0x4000_0003, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(run(&p.filter, 0x4000_0000, X86, [0; 6]), RET_ERRNO | 38);
    }

    #[test]
    fn argument_comparisons_are_64_bit_and_unsigned() {
        let rule = |op: &str, v: u64| {
            profile(&format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["personality"],
                  "action":"SCMP_ACT_ERRNO","args":[{{"index":1,"value":{v},"op":"{op}"}}]}}]}}"#
            ))
        };
        let nr = 135;
        type Holds = fn(u64, u64) -> bool;
        let cases: [(&str, Holds); 6] = [
            ("SCMP_CMP_EQ", |a, v| a == v),
            ("SCMP_CMP_NE", |a, v| a != v),
            ("SCMP_CMP_LT", |a, v| a < v),
            ("SCMP_CMP_LE", |a, v| a <= v),
            ("SCMP_CMP_GT", |a, v| a > v),
            ("SCMP_CMP_GE", |a, v| a >= v),
        ];
        let values = [0, 1, 0xffff_ffff, 0x1_0000_0000, 0x1_0000_0001, u64::MAX];
        for (op, holds) in cases {
            for v in values {
                let p = rule(op, v);
                for a in values {
                    let want = if holds(a, v) {
                        RET_ERRNO | 1
                    } else {
                        RET_ALLOW
                    };
                    assert_eq!(
                        run(&p.filter, nr, X86, [0, a, 0, 0, 0, 0]),
                        want,
                        "{op} arg {a:#x} value {v:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn masked_eq_and_rule_order() {
        // clone without namespace flags allowed, with them denied (Docker's shape).
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["clone"],"action":"SCMP_ACT_ALLOW",
                 "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW",
                 "args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"},{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                {"names":["personality"],"action":"SCMP_ACT_TRAP"}]}"#,
        );
        assert_eq!(run(&p.filter, 56, X86, [0x11, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(
            run(&p.filter, 56, X86, [0x1000_0000, 0, 0, 0, 0, 0]),
            RET_ERRNO | 1
        );
        // Two conditions on one argument: either may hold (runc's splitting).
        assert_eq!(run(&p.filter, 135, X86, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p.filter, 135, X86, [8, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&p.filter, 135, X86, [9, 0, 0, 0, 0, 0]), RET_TRAP);
    }

    #[test]
    fn long_programs_reach_far_targets() {
        // Every call, each with a condition: jumps span far more than 255 instructions.
        let names: Vec<String> = hull_protocol::syscalls::X86_64
            .iter()
            .map(|(n, _)| format!("{n:?}"))
            .collect();
        let p = profile(&format!(
            r#"{{"defaultAction":"SCMP_ACT_KILL_PROCESS","syscalls":[{{"names":[{}],
              "action":"SCMP_ACT_ERRNO","errnoRet":5,"args":[{{"index":2,"value":7,"op":"SCMP_CMP_EQ"}}]}}]}}"#,
            names.join(",")
        ));
        assert!(p.filter.len() > 1000);
        for (_, nr) in hull_protocol::syscalls::X86_64 {
            assert_eq!(run(&p.filter, *nr, X86, [0, 0, 7, 0, 0, 0]), RET_ERRNO | 5);
            assert_eq!(
                run(&p.filter, *nr, X86, [0, 0, 8, 0, 0, 0]),
                RET_KILL_PROCESS
            );
        }
    }

    #[test]
    fn bad_profiles_are_refused_with_reasons() {
        let err = |json: &str| {
            format!(
                "{:#}",
                compile(&serde_json::from_str(json).unwrap()).unwrap_err()
            )
        };
        assert!(
            err(r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":70000}"#)
                .contains("errnoRet 70000")
        );
        assert!(err(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#).contains("SCMP_ACT_NOTIFY"));
        assert!(err(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO",
                "args":[{"index":6,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#
        )
        .contains("index 6"));
    }
}
