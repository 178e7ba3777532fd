//! Segments (ABI section 1): the Guest's GDT entries 10-31.
//!
//! The GDT is a Host page the Guest cannot write; LOAD_GDT and
//! LOAD_GDT_ENTRY copy the Guest's descriptors into it, made safe to run
//! with, as lguest's segments.c did.

use crate::host_pages::GDT_PAGE;
use crate::memory::GuestMemory;
use lguest_abi::{GDT_ENTRIES, GDT_FIRST_GUEST_ENTRY};

/// Sudden Death reasons of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("LOAD_GDT: {0} entries, at most {GDT_ENTRIES}")]
    Count(u64),
    #[error("LOAD_GDT: descriptor table at {0:#x} is outside guest memory")]
    Outside(u64),
    #[error("{call}: system descriptor {desc:#x} in GDT entry {index}")]
    System {
        call: &'static str,
        desc: u64,
        index: usize,
    },
    #[error("LOAD_GDT_ENTRY: bad index {0}")]
    Index(u64),
}

/// What a Guest GDT entry becomes: present descriptors get DPL 3 (the Guest
/// runs in ring 3) and Accessed (the CPU can't set it in our read-only GDT);
/// a present system descriptor (a TSS, a gate) is refused.
pub fn guest_descriptor(desc: u64) -> Option<u64> {
    const PRESENT: u64 = 1 << 47;
    const S: u64 = 1 << 44;
    const DPL3: u64 = 3 << 45;
    const ACCESSED: u64 = 1 << 40;
    match (desc & PRESENT != 0, desc & S != 0) {
        (false, _) => Some(desc),
        (true, false) => None,
        (true, true) => Some(desc | DPL3 | ACCESSED),
    }
}

fn set_entry(
    mem: &GuestMemory,
    index: usize,
    desc: u64,
    call: &'static str,
) -> Result<(), SegmentError> {
    let desc = guest_descriptor(desc).ok_or(SegmentError::System { call, desc, index })?;
    mem.write_host_u64(GDT_PAGE, index as u64 * 8, desc);
    Ok(())
}

/// LOAD_GDT: entries 10..count-1 from the table at `addr`, the rest of the
/// Guest's entries cleared; 0-9 are the Host's and skipped.
pub fn load_gdt(mem: &GuestMemory, addr: u64, count: u64) -> Result<(), SegmentError> {
    if count > GDT_ENTRIES as u64 {
        return Err(SegmentError::Count(count));
    }
    mem.check(addr, count * 8)
        .map_err(|_| SegmentError::Outside(addr))?;
    for i in GDT_FIRST_GUEST_ENTRY..GDT_ENTRIES {
        let desc = if (i as u64) < count {
            mem.read_u64(addr + i as u64 * 8).expect("checked")
        } else {
            0
        };
        set_entry(mem, i, desc, "LOAD_GDT")?;
    }
    Ok(())
}

/// LOAD_GDT_ENTRY: one Guest entry.
pub fn load_gdt_entry(mem: &GuestMemory, index: u64, desc: u64) -> Result<(), SegmentError> {
    if !(GDT_FIRST_GUEST_ENTRY as u64..GDT_ENTRIES as u64).contains(&index) {
        return Err(SegmentError::Index(index));
    }
    set_entry(mem, index as usize, desc, "LOAD_GDT_ENTRY")
}

#[cfg(test)]
mod tests {
    use super::guest_descriptor;

    #[test]
    fn gdt_entries_become_ring_3_and_accessed() {
        // A ring-0 flat data descriptor comes out DPL 3, Accessed.
        assert_eq!(
            guest_descriptor(0x00CF_9200_0000_FFFF),
            Some(0x00CF_F300_0000_FFFF)
        );
        // Not present: stored as it is.
        assert_eq!(
            guest_descriptor(0x0000_1200_0000_FFFF),
            Some(0x0000_1200_0000_FFFF)
        );
        // A present 64-bit TSS (type 9, S clear) is refused.
        assert_eq!(guest_descriptor(0x0000_8900_0000_0067), None);
    }
}
