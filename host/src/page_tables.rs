//! Page tables (ABI sections 3 and 4): the Guest's own below the top level,
//! ours at the top.
//!
//! The CPU walks the Guest's PDPTs, PDs and PTs directly; the Host never
//! writes them. But the top level, the page CR3 names, is always one of
//! ours: were it the Guest's, a Guest could store a slot 511 of its own
//! after NEW_PGTABLE checked it (its own "Host" IDT, and its next trap would
//! run its code at CPL 0), or fill an upper-half slot. So, as lguest's shadow
//! page directories did, NEW_PGTABLE copies entries 0-255 of the Guest's PML4
//! into a *shadow root*, a read-only Host page whose slot 511 is the Host's
//! and whose 256-510 stay empty; SET_PGD re-reads one entry. A plain store
//! into the Guest's PML4 changes nothing until then.
//!
//! We keep [`SHADOW_ROOTS`] of them, each remembering whose PML4 it copies,
//! so a Guest switching between address spaces reloads a ready root.
//!
//! One wrinkle, from KVMs that shadow page tables in software: once such a
//! KVM has used a page as a page table, it never sees a later write by us
//! (only by the Guest's own code), whatever we flush. A root never loaded
//! before is fine; one that was needs its memslot dropped and re-added,
//! which makes the KVM forget what it knew. [`Switch::recycle`] says when.
//! (On VT-x or AMD-V with two-dimensional paging a plain write and a CR3
//! load would do; the recycle costs little there and keeps one path.)

use crate::host_pages::HostTables;
use crate::memory::{GuestMemory, SHADOW_ROOTS};
use lguest_abi::{FIRST_UPPER_PML4_SLOT, HOST_PML4_SLOT, PAGE_SIZE};

/// Sudden Death reasons for the two hypercalls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgtableError {
    #[error("NEW_PGTABLE: PML4 {0:#x} is not page-aligned")]
    Unaligned(u64),
    #[error("NEW_PGTABLE: PML4 {0:#x} is outside guest memory")]
    Outside(u64),
    #[error("NEW_PGTABLE: slot 511 of PML4 {pml4:#x} is {found:#x}, not the Host's {host:#x}")]
    Slot511 { pml4: u64, found: u64, host: u64 },
    #[error("NEW_PGTABLE: upper-half slot {slot} of PML4 {pml4:#x} is not empty")]
    UpperHalf { pml4: u64, slot: usize },
    #[error("SET_PGD: PML4 {pml4:#x} is not the loaded one ({loaded:#x})")]
    NotLoaded { pml4: u64, loaded: u64 },
    #[error("SET_PGD: index {0} is the Host's half")]
    HostIndex(u64),
}

/// What the vCPU must do after a NEW_PGTABLE or SET_PGD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// The physical address to load as CR3 (with a TLB flush).
    pub cr3: u64,
    /// This shadow root changed after the KVM had used it: drop and re-add
    /// its memslot before loading it.
    pub recycle: Option<usize>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Root {
    /// The Guest PML4 this root copies.
    guest: Option<u64>,
    /// Loaded as CR3 since it was last written fresh (or recycled).
    used: bool,
}

/// The Host's top-level pages and whose PML4 each one copies.
#[derive(Debug)]
pub struct ShadowRoots {
    roots: [Root; SHADOW_ROOTS],
    /// The root now loaded; `None` while the Guest runs on the initial tables.
    current: Option<usize>,
    /// Round-robin victim for a PML4 we have no root for.
    next: usize,
    init_pml4: u64,
    host_pml4e: u64,
}

impl ShadowRoots {
    /// Sets up every root with the Host's slot 511 (entries 256-510 stay 0,
    /// as the memory came zeroed).
    pub fn new(mem: &GuestMemory, tables: &HostTables) -> ShadowRoots {
        for i in 0..SHADOW_ROOTS {
            mem.write_shadow(i, HOST_PML4_SLOT, tables.host_pml4e);
        }
        ShadowRoots {
            roots: [Root::default(); SHADOW_ROOTS],
            current: None,
            next: 0,
            init_pml4: tables.init_pml4,
            host_pml4e: tables.host_pml4e,
        }
    }

    /// The Guest PML4 now loaded (the initial tables' address on them).
    pub fn loaded(&self) -> u64 {
        self.current
            .and_then(|i| self.roots[i].guest)
            .unwrap_or(self.init_pml4)
    }

    /*H:450 NEW_PGTABLE: check the Guest's PML4 as ABI section 4 says, then
     * find (or take) a shadow root for it and copy its lower half in. A root
     * already holding the same entries is loaded as it is, without a copy.
     * NEW_PGTABLE of the initial tables goes back to them: they are ours. */
    pub fn new_pgtable(&mut self, mem: &GuestMemory, pml4: u64) -> Result<Switch, PgtableError> {
        if pml4 == self.init_pml4 {
            self.current = None;
            return Ok(Switch {
                cr3: self.init_pml4,
                recycle: None,
            });
        }
        if !pml4.is_multiple_of(PAGE_SIZE) {
            return Err(PgtableError::Unaligned(pml4));
        }
        mem.check(pml4, PAGE_SIZE)
            .map_err(|_| PgtableError::Outside(pml4))?;
        let mut entries = [0u64; 512];
        for (i, e) in entries.iter_mut().enumerate() {
            *e = mem.read_u64(pml4 + i as u64 * 8).expect("checked");
        }
        if entries[HOST_PML4_SLOT] != self.host_pml4e {
            return Err(PgtableError::Slot511 {
                pml4,
                found: entries[HOST_PML4_SLOT],
                host: self.host_pml4e,
            });
        }
        if let Some(slot) = (FIRST_UPPER_PML4_SLOT..HOST_PML4_SLOT).find(|&s| entries[s] != 0) {
            return Err(PgtableError::UpperHalf { pml4, slot });
        }

        let i = match self.roots.iter().position(|r| r.guest == Some(pml4)) {
            Some(i) => i,
            None => self.victim(),
        };
        self.roots[i].guest = Some(pml4);
        let mut changed = false;
        for (index, &entry) in entries[..FIRST_UPPER_PML4_SLOT].iter().enumerate() {
            if mem.read_shadow(i, index) != entry {
                mem.write_shadow(i, index, entry);
                changed = true;
            }
        }
        self.current = Some(i);
        Ok(self.load(mem, i, changed))
    }

    /*H:460 SET_PGD: the Guest changed entry `index` of its loaded PML4. */
    pub fn set_pgd(
        &mut self,
        mem: &GuestMemory,
        pml4: u64,
        index: u64,
    ) -> Result<Switch, PgtableError> {
        let loaded = self.loaded();
        if pml4 != loaded {
            return Err(PgtableError::NotLoaded { pml4, loaded });
        }
        if index >= FIRST_UPPER_PML4_SLOT as u64 {
            return Err(PgtableError::HostIndex(index));
        }
        let Some(i) = self.current else {
            // The initial tables are ours: nothing of the Guest's to read.
            return Ok(Switch {
                cr3: self.init_pml4,
                recycle: None,
            });
        };
        let index = index as usize;
        // NEW_PGTABLE checked the whole page lies in Guest memory.
        let entry = mem.read_u64(pml4 + index as u64 * 8).expect("checked");
        let changed = mem.read_shadow(i, index) != entry;
        if changed {
            mem.write_shadow(i, index, entry);
        }
        Ok(self.load(mem, i, changed))
    }

    fn load(&mut self, mem: &GuestMemory, i: usize, changed: bool) -> Switch {
        let root = &mut self.roots[i];
        let recycle = (changed && root.used).then_some(i);
        root.used = true;
        Switch {
            cr3: mem.layout.shadow_root(i),
            recycle,
        }
    }

    /// A root for a PML4 we have none for: never the loaded one.
    fn victim(&mut self) -> usize {
        let mut i = self.next;
        if Some(i) == self.current {
            i = (i + 1) % SHADOW_ROOTS;
        }
        self.next = (i + 1) % SHADOW_ROOTS;
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_pages;

    fn setup() -> (GuestMemory, HostTables) {
        host_pages::test_guest(4 << 20)
    }

    fn guest_pml4(mem: &GuestMemory, t: &HostTables, at: u64, slot0: u64) {
        mem.write_u64(at, slot0).unwrap();
        mem.write_u64(at + 511 * 8, t.host_pml4e).unwrap();
    }

    #[test]
    fn stores_take_effect_only_at_set_pgd_or_new_pgtable() {
        let (mem, t) = setup();
        let mut roots = ShadowRoots::new(&mem, &t);
        guest_pml4(&mem, &t, 0x10000, 0x11007);
        let s = roots.new_pgtable(&mem, 0x10000).unwrap();
        assert_eq!(s.recycle, None, "a fresh root needs no recycle");
        assert_eq!(mem.read_table_u64(s.cr3), Some(0x11007));
        assert_eq!(mem.read_table_u64(s.cr3 + 511 * 8), Some(t.host_pml4e));

        // A store into the Guest's page: nothing yet.
        mem.write_u64(0x10000 + 5 * 8, 0x12007).unwrap();
        mem.write_u64(0x10000 + 511 * 8, 0x13007).unwrap();
        assert_eq!(mem.read_table_u64(s.cr3 + 5 * 8), Some(0));
        // SET_PGD of slot 5: now, and the root was used, so recycle it.
        let s2 = roots.set_pgd(&mem, 0x10000, 5).unwrap();
        assert_eq!((s2.cr3, s2.recycle), (s.cr3, Some(0)));
        assert_eq!(mem.read_table_u64(s.cr3 + 5 * 8), Some(0x12007));
        // Slot 511 of the root stays the Host's whatever the Guest stored.
        assert_eq!(mem.read_table_u64(s.cr3 + 511 * 8), Some(t.host_pml4e));
        // An unchanged SET_PGD needs no recycle.
        assert_eq!(roots.set_pgd(&mem, 0x10000, 5).unwrap().recycle, None);
    }

    #[test]
    fn set_pgd_rules() {
        let (mem, t) = setup();
        let mut roots = ShadowRoots::new(&mem, &t);
        guest_pml4(&mem, &t, 0x10000, 0x11007);
        roots.new_pgtable(&mem, 0x10000).unwrap();
        assert!(matches!(
            roots.set_pgd(&mem, 0x20000, 0),
            Err(PgtableError::NotLoaded { .. })
        ));
        assert_eq!(
            roots.set_pgd(&mem, 0x10000, 256),
            Err(PgtableError::HostIndex(256))
        );
        // Back to the initial tables, which are ours: SET_PGD names them.
        let s = roots.new_pgtable(&mem, t.init_pml4).unwrap();
        assert_eq!(s.cr3, t.init_pml4);
        assert_eq!(
            roots.set_pgd(&mem, t.init_pml4, 3).unwrap().cr3,
            t.init_pml4
        );
    }

    #[test]
    fn new_pgtable_checks_the_upper_half() {
        let (mem, t) = setup();
        let mut roots = ShadowRoots::new(&mem, &t);
        guest_pml4(&mem, &t, 0x10000, 0x11007);
        mem.write_u64(0x10000 + 300 * 8, 0x11007).unwrap();
        assert_eq!(
            roots.new_pgtable(&mem, 0x10000),
            Err(PgtableError::UpperHalf {
                pml4: 0x10000,
                slot: 300
            })
        );
        mem.write_u64(0x10000 + 300 * 8, 0).unwrap();
        mem.write_u64(0x10000 + 511 * 8, 0).unwrap();
        assert!(matches!(
            roots.new_pgtable(&mem, 0x10000),
            Err(PgtableError::Slot511 { .. })
        ));
        assert_eq!(
            roots.new_pgtable(&mem, 0x10008),
            Err(PgtableError::Unaligned(0x10008))
        );
        let outside = mem.layout.guest_limit();
        assert_eq!(
            roots.new_pgtable(&mem, outside),
            Err(PgtableError::Outside(outside))
        );
    }

    #[test]
    fn roots_are_cached_per_pml4_and_recycled_only_when_changed() {
        let (mem, t) = setup();
        let mut roots = ShadowRoots::new(&mem, &t);
        let pml4s: Vec<u64> = (0..SHADOW_ROOTS as u64 + 1)
            .map(|i| 0x10000 + i * 0x1000)
            .collect();
        for (i, &p) in pml4s.iter().enumerate() {
            guest_pml4(&mem, &t, p, 0x80007 + i as u64 * 0x1000);
        }
        let a = roots.new_pgtable(&mem, pml4s[0]).unwrap();
        let b = roots.new_pgtable(&mem, pml4s[1]).unwrap();
        assert_ne!(a.cr3, b.cr3);
        // Back to A, unchanged: same root, no copy, no recycle.
        assert_eq!(roots.new_pgtable(&mem, pml4s[0]).unwrap(), a);
        // More PML4s than roots: a used root is taken over and recycled,
        // never the loaded one.
        let mut recycled = 0;
        for &p in &pml4s[2..] {
            let s = roots.new_pgtable(&mem, p).unwrap();
            recycled += usize::from(s.recycle.is_some());
            assert_eq!(mem.read_table_u64(s.cr3), mem.read_u64(p).ok());
        }
        assert!(recycled >= 1);
        assert_eq!(roots.loaded(), pml4s[SHADOW_ROOTS]);
    }
}
