//! The Intel MultiProcessor table: how a guest without ACPI finds its other vCPUs, the
//! IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS};
use crate::memory::GuestMemory;

const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_NMI: u8 = 1;
const MP_IRQ_SRC_EXTINT: u8 = 3;

/// Byte that makes `bytes` sum to zero (mod 256) when stored in their checksum field.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table's bytes for `vcpus` processors (the floating pointer is built separately).
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus; // the first APIC id after the processors
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        entries.push(MP_PROCESSOR);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend(CPU_STEPPING.to_le_bytes());
        entries.extend((CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend([0u8; 8]);
    }
    entries.extend([MP_BUS, 0]);
    entries.extend(*b"ISA   ");
    entries.extend([MP_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS as u8 {
        // type, irq type, flags (conforming), source bus, source irq, IOAPIC, pin
        entries.extend([MP_INTSRC, MP_IRQ_SRC_INT, 0, 0, 0, pin, ioapic_id, pin]);
    }
    entries.extend([MP_LINTSRC, MP_IRQ_SRC_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([MP_LINTSRC, MP_IRQ_SRC_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = vcpus as u16 + 3 + IOAPIC_PINS as u16 + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend(*b"PCMP");
    table.extend(((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend(*b"HULL    ");
    table.extend(*b"HULL-VMM    ");
    table.extend(0u32.to_le_bytes()); // no OEM table
    table.extend(0u16.to_le_bytes());
    table.extend(entry_count.to_le_bytes());
    table.extend(APIC_ADDR.to_le_bytes());
    table.extend(0u32.to_le_bytes());
    table.extend(entries);
    table[7] = checksum(&table);
    table
}

/// Writes the floating pointer at the start of the EBDA and the table right after it
/// (the e820 map reserves the EBDA up to 1 MiB).
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), vm_memory::GuestMemoryError> {
    let table_addr = EBDA_START + 16;
    let mut pointer = Vec::with_capacity(16);
    pointer.extend(*b"_MP_");
    pointer.extend((table_addr as u32).to_le_bytes());
    pointer.extend([1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, revision, checksum, features
    pointer[10] = checksum(&pointer);
    mem.write_slice(&pointer, GuestAddress(EBDA_START))?;
    mem.write_slice(&config_table(vcpus), GuestAddress(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn pointer_and_table_checksum_to_zero_and_list_every_cpu() {
        let (mem, _) = crate::memory::create(16 << 20).unwrap();
        write(&mem, 3).unwrap();
        let mut pointer = [0u8; 16];
        mem.read_slice(&mut pointer, GuestAddress(EBDA_START))
            .unwrap();
        assert_eq!(&pointer[..4], b"_MP_");
        assert_eq!(sum(&pointer), 0);
        let table_addr = u32::from_le_bytes(pointer[4..8].try_into().unwrap()) as u64;
        let mut header = [0u8; 44];
        mem.read_slice(&mut header, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(&header[..4], b"PCMP");
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 3 + 3 + 24 + 2);
        // Three processor entries, the first one the boot processor.
        assert_eq!(&table[44..48], &[MP_PROCESSOR, 0, APIC_VERSION, 3]);
        assert_eq!(&table[64..68], &[MP_PROCESSOR, 1, APIC_VERSION, 1]);
        assert_eq!(&table[84..88], &[MP_PROCESSOR, 2, APIC_VERSION, 1]);
        // The whole table stays in the reserved area below 1 MiB.
        assert!(table_addr + (len as u64) < super::super::layout::HIMEM_START);
        let big = config_table(crate::config::MAX_VCPUS);
        assert!(EBDA_START + 16 + (big.len() as u64) < super::super::layout::HIMEM_START);
    }
}
