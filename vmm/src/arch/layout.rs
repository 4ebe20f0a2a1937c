//! The guest-physical memory map (the same shape Firecracker uses).

/// GDT (4 entries) and an empty IDT right after it.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack of the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, four page directories (4 GiB in 2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Start of the EBDA: the MP table lives here; RAM below it is e820 usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where "high" memory begins: kernels load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit hole for MMIO devices (virtio-mmio, IOAPIC, LAPIC): RAM resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// virtio-mmio devices: one 4 KiB window each from here.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// KVM's TSS and identity-map pages (Intel needs them set before vCPUs exist).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// IOAPIC and LAPIC MMIO bases (for the MP table).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Legacy IRQ lines: COM1 and the first virtio-mmio device (one line each from here).
pub const SERIAL_IRQ: u32 = 4;
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u32 = 24;
