//! Loading the kernel and initramfs and writing the Linux zero page, e820 map and command
//! line: the state the kernel's 64-bit entry expects.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Address as _, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::*;
use crate::memory::{ram_ranges, GuestMemory};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_MAX_ENTRIES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open the kernel {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load the kernel {path} (it must be an x86_64 ELF vmlinux, loaded at or above 1 MiB): {source}")]
    LoadKernel {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("cannot read the initramfs {path}: {source}")]
    ReadInitramfs {
        path: String,
        source: std::io::Error,
    },
    #[error("the initramfs ({size} bytes) does not fit in guest memory above the kernel: give the VM more memory")]
    InitramfsTooBig { size: u64 },
    #[error("the command line ({len} bytes with its NUL) is longer than {max} bytes")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("writing boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What the boot vCPU needs from loading.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// The kernel's 64-bit entry point.
    pub entry: GuestAddress,
}

/// Loads the kernel (and initramfs), writes the command line and the zero page.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.display().to_string(),
        source,
    })?;
    let loaded =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::LoadKernel {
                path: kernel.display().to_string(),
                source,
            }
        })?;
    let mut params = boot_params::default();
    if let Some(path) = initramfs {
        let (addr, size) = load_initramfs(mem, path, loaded.kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    write_cmdline(mem, cmdline)?;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    let e820 = e820_map(mem_size(mem));
    for (slot, &(addr, size, r#type)) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry { addr, size, r#type };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;
    Ok(BootInfo {
        entry: loaded.kernel_load,
    })
}

fn mem_size(mem: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| r.len()).sum()
}

/// The end (exclusive) of RAM below the MMIO gap.
fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// The e820 map for `size` bytes of RAM: low RAM below the EBDA, the EBDA to 1 MiB
/// reserved, RAM from 1 MiB, and RAM above 4 GiB when there is more.
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let entry = |addr: u64, size: u64, r#type: u32| (addr, size, r#type);
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (base, len) in ram_ranges(size) {
        let start = base.raw_value().max(HIMEM_START);
        let end = base.raw_value() + len;
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    debug_assert!(map.len() <= E820_MAX_ENTRIES);
    map
}

/// Puts the initramfs at the top of low RAM, page aligned, above the kernel.
fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitramfs {
        path: path.display().to_string(),
        source,
    })?;
    let size = data.len() as u64;
    let top = low_ram_end(mem_size(mem));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end && *a >= HIMEM_START)
        .ok_or(BootError::InitramfsTooBig { size })?;
    mem.write_slice(&data, GuestAddress(addr))?;
    Ok((addr, size))
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    let max = crate::config::MAX_CMDLINE + 1;
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len() + 1,
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        let big = e820_map(6 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].0 + big[2].1, MMIO_GAP_START);
        assert_eq!(
            big[3],
            (FIRST_ADDR_PAST_32BITS, (6 << 30) - MMIO_GAP_START, E820_RAM)
        );
    }

    #[test]
    fn a_non_elf_kernel_is_refused_by_name() {
        let (mem, _) = crate::memory::create(32 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("hull-vmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bogus = dir.join("vmlinux");
        std::fs::write(&bogus, b"not an elf at all").unwrap();
        let err = load(&mem, &bogus, None, "").unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err}");
        assert!(err.to_string().contains("vmlinux"), "{err}");
    }

    #[test]
    fn an_initramfs_too_big_for_memory_is_refused() {
        let (mem, _) = crate::memory::create(16 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("hull-vmm-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("initramfs");
        std::fs::write(&big, vec![0u8; 17 << 20]).unwrap();
        let err = load_initramfs(&mem, &big, HIMEM_START).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(err, BootError::InitramfsTooBig { .. }), "{err}");
    }
}
