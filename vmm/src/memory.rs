//! Guest memory: one memfd, mapped shared (so a vhost-user backend such as virtiofsd can
//! map the same pages), split around the 32-bit MMIO gap.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::layout::{FIRST_ADDR_PAST_32BITS, MMIO_GAP_START};

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd_create): {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Size { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
}

/// The guest-physical ranges for `size` bytes of RAM: below the MMIO gap, and the rest
/// from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(FIRST_ADDR_PAST_32BITS), size - MMIO_GAP_START),
        ]
    }
}

/// Creates `size` bytes of guest RAM backed by one sealed memfd. Returns the memory and
/// the file (kept to hand to vhost-user backends).
pub fn create(size: u64) -> Result<(GuestMemory, std::sync::Arc<File>), MemoryError> {
    let name = c"hull-guest-ram";
    // SAFETY: memfd_create takes a valid NUL-terminated name and flags; it returns a new
    // fd or -1, checked below.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nothing else.
    let file = std::sync::Arc::new(unsafe { File::from_raw_fd(fd) });
    file.set_len(size)
        .map_err(|source| MemoryError::Size { size, source })?;
    // The guest's RAM never changes size: sealing it keeps anyone holding the fd (a
    // vhost-user backend) from truncating it under the VMM, which would SIGBUS us.
    // SAFETY: F_ADD_SEALS on our own memfd with valid seal flags.
    let sealed = unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if sealed < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    let mut offset = 0;
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(size) {
        let region = GuestRegionMmap::from_range(
            base,
            len as usize,
            Some(FileOffset::from_arc(file.clone(), offset)),
        )
        .map_err(MemoryError::Map)?;
        regions.push(region);
        offset += len;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.into()))?;
    Ok((memory, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (
                GuestAddress(FIRST_ADDR_PAST_32BITS),
                (4 << 30) - MMIO_GAP_START
            )
        );
    }

    #[test]
    fn memory_is_shared_through_the_memfd() {
        use std::os::unix::fs::FileExt;
        let (mem, file) = create(16 << 20).unwrap();
        mem.write_obj(0xfeed_u32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xfeed);
        assert_eq!(mem.last_addr(), GuestAddress((16 << 20) - 1));
        // Sealed: nobody can shrink it under us.
        assert!(file.set_len(4096).is_err());
    }
}
