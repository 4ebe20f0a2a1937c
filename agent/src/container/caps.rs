//! Capabilities: the five sets of the OCI process, applied as runc applies them.

use anyhow::{bail, Result};
use hull_protocol::CAPABILITIES;
use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};

fn number(cap: &Capability) -> Result<u32> {
    let name = serde_json::to_value(cap)?;
    let name = name.as_str().unwrap_or_default();
    match CAPABILITIES.iter().position(|n| *n == name) {
        Some(i) => Ok(i as u32),
        None => bail!("capability {name} is not known to the guest kernel"),
    }
}

fn mask(set: Option<&Capabilities>) -> Result<u64> {
    let mut bits = 0u64;
    for cap in set.into_iter().flatten() {
        bits |= 1 << number(cap)?;
    }
    Ok(bits)
}

/// The sets as bit masks.
pub struct Sets {
    bounding: u64,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    ambient: u64,
}

impl Sets {
    pub fn from_spec(caps: Option<&LinuxCapabilities>) -> Result<Sets> {
        let Some(c) = caps else {
            return Ok(Sets {
                bounding: 0,
                effective: 0,
                permitted: 0,
                inheritable: 0,
                ambient: 0,
            });
        };
        Ok(Sets {
            bounding: mask(c.bounding().as_ref())?,
            effective: mask(c.effective().as_ref())?,
            permitted: mask(c.permitted().as_ref())?,
            inheritable: mask(c.inheritable().as_ref())?,
            ambient: mask(c.ambient().as_ref())?,
        })
    }

    /// Drops every capability outside the bounding set (needs CAP_SETPCAP: do it first).
    pub fn apply_bounding(&self) -> Result<()> {
        for cap in 0..CAPABILITIES.len() as u64 {
            if self.bounding & (1 << cap) == 0 {
                // SAFETY: prctl with integer arguments only.
                let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
                if rc != 0 {
                    bail!(
                        "dropping {} from the bounding set: {}",
                        CAPABILITIES[cap as usize],
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
        Ok(())
    }

    /// Sets effective, permitted and inheritable, then raises the ambient ones.
    pub fn apply(&self) -> Result<()> {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let data = [
            Data {
                effective: self.effective as u32,
                permitted: self.permitted as u32,
                inheritable: self.inheritable as u32,
            },
            Data {
                effective: (self.effective >> 32) as u32,
                permitted: (self.permitted >> 32) as u32,
                inheritable: (self.inheritable >> 32) as u32,
            },
        ];
        // SAFETY: header and data are laid out as the kernel's v3 structures and outlive the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
        if rc != 0 {
            bail!("capset: {}", std::io::Error::last_os_error());
        }
        // As runc: an ambient capability the inheritable set lacks cannot be raised; that
        // is not an error (the kernel says EPERM), the capability just is not ambient.
        for cap in 0..CAPABILITIES.len() as u64 {
            if self.ambient & (1 << cap) != 0 && self.inheritable & (1 << cap) != 0 {
                // SAFETY: prctl with integer arguments only.
                let rc = unsafe {
                    libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0)
                };
                if rc != 0 {
                    bail!(
                        "raising ambient {}: {}",
                        CAPABILITIES[cap as usize],
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
        Ok(())
    }
}
