//! The boot state of each vCPU: CPUID, MSRs, LAPIC, and for the boot vCPU the long-mode
//! registers, GDT and identity page tables the kernel's 64-bit entry expects.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM refused the vCPU's {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
    #[error("writing boot page tables or GDT: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

// CR0, CR4 and EFER bits.
const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT descriptor from its access/flags word, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM segment register that loading `entry` from GDT slot `index` would give.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = (((entry >> 48) & 0xf) << 16 | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes the GDT, an empty IDT, and identity page tables for the first 4 GiB.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), CpuError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    // Present + writable; in the page directories also PS (2 MiB pages).
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
    for d in 0..PD_COUNT {
        let pd = PD_ADDR + d * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPT_ADDR + d * 8))?;
        for i in 0..512u64 {
            let frame = ((d * 512 + i) << 21) | 0x83;
            mem.write_obj(frame, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// Long mode, paging on, flat segments: the state of the Linux 64-bit boot protocol.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let gdt = boot_gdt();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("registers"))?;
    Ok(())
}

/// State every vCPU needs: CPUID, FPU, MSRs, LAPIC.
pub fn setup_vcpu(vcpu: &VcpuFd, supported: &CpuId, index: u8, count: u8) -> Result<(), CpuError> {
    let cpuid = filter_cpuid(supported, index, count);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("CPUID"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))?;
    setup_msrs(vcpu)?;
    setup_lapic(vcpu)?;
    Ok(())
}

fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// LINT0 as ExtINT (the PIC's output), LINT1 as NMI: what a BIOS leaves behind.
fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    for (offset, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(reg.iter()) {
            *b = *r as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (r, b) in reg.iter_mut().zip(value.to_le_bytes()) {
            *r = b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))?;
    Ok(())
}

/// KVM's supported CPUID, made true for this vCPU: its APIC id and the VM's topology (one
/// socket, one thread per core), the hypervisor bit, and no PMU.
pub fn filter_cpuid(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let (id, n) = (u32::from(index), u32::from(count));
    // Bits needed to number `count` cores.
    let core_bits = 32 - (n.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((n & 0xff) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if n > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                // Cores per package - 1, in eax[31:26]; one thread shares each cache
                // below the last level.
                e.eax = (e.eax & 0x03ff_ffff) | ((n - 1) << 26);
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & !0x03ff_c000) | ((sharing & 0xfff) << 14);
            }
            0xa => {
                // No performance monitoring: counters would leak host activity.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = n;
                        e.ecx = (2 << 8) | 1;
                    }
                    other => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = other;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let gdt = boot_gdt();
        let code = segment_from_gdt(gdt[1], 1);
        assert_eq!((code.selector, code.l, code.db, code.present), (8, 1, 0, 1));
        assert_eq!(
            (code.base, code.limit, code.type_, code.s),
            (0, 0xffff_ffff, 0xb, 1)
        );
        let data = segment_from_gdt(gdt[2], 2);
        assert_eq!((data.selector, data.l, data.db, data.type_), (16, 0, 1, 3));
        let tss = segment_from_gdt(gdt[3], 3);
        assert_eq!((tss.selector, tss.s, tss.type_), (24, 0, 0xb));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        // Base and limit survive the scrambled encoding.
        let odd = segment_from_gdt(gdt_entry(0x4093, 0x1234_5678, 0xabcde), 5);
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let (mem, _) = crate::memory::create(16 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        // Walk 0xd000_0000 (a virtio-mmio window) and 0x0100_0000 (the kernel).
        for va in [0xd000_0000u64, 0x0100_0000, 0xffff_ffff] {
            let pdpte: u64 = mem
                .read_obj(GuestAddress(PDPT_ADDR + ((va >> 30) & 511) * 8))
                .unwrap();
            assert_eq!(pdpte & 1, 1);
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x81, 0x81, "present 2 MiB page");
            assert_eq!(
                (pde & !0x1f_ffff) | (va & 0x1f_ffff),
                va & !0xfff | (va & 0xfff)
            );
        }
    }

    #[test]
    fn cpuid_names_each_vcpu_and_hides_the_pmu() {
        let entry = |function, index, eax| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx: 0xdead_beef,
            ..Default::default()
        };
        let supported = CpuId::from_entries(&[
            entry(1, 0, 0),
            entry(0xa, 0, 0x0703_0105),
            entry(0xb, 0, 0),
            entry(0xb, 1, 0),
        ])
        .unwrap();
        let cpuid = filter_cpuid(&supported, 3, 4);
        let s = cpuid.as_slice();
        assert_eq!(s[0].ebx >> 24, 3, "initial APIC id");
        assert_eq!((s[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(s[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(s[1].eax, 0, "no PMU");
        assert_eq!((s[2].edx, s[2].ebx), (3, 1));
        assert_eq!((s[3].edx, s[3].ebx, s[3].eax), (3, 4, 2));
    }
}
