//! Guest virtual to physical, by walking the Guest's page tables the way the
//! CPU would for a ring-3 access. The Host only ever reads them.

use crate::memory::GuestMemory;
use lguest_abi::{pte, RESERVE_MEM};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Translates `va` through the PML4 at `cr3`, as ring 3 would access it:
/// every level must be present and user, and writable for a write. Page
/// tables may live in Guest memory or (the initial ones) in Host pages; the
/// result lies in Guest memory, or there is none: the Guest writes its own
/// entries, and one may name a Host page or no memory at all.
pub fn translate(mem: &GuestMemory, cr3: u64, va: u64, access: Access) -> Option<u64> {
    walk(mem, cr3, va, access).filter(|&pa| mem.check(pa, 1).is_ok())
}

fn walk(mem: &GuestMemory, cr3: u64, va: u64, access: Access) -> Option<u64> {
    if va >= RESERVE_MEM {
        return None;
    }
    let mut table = cr3 & pte::ADDR_MASK;
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let entry = mem.read_table_u64(table + ((va >> shift) & 511) * 8)?;
        let need = pte::PRESENT
            | pte::USER
            | if access == Access::Write {
                pte::WRITABLE
            } else {
                0
            };
        if entry & need != need {
            return None;
        }
        let addr = entry & pte::ADDR_MASK;
        // A large page at the PDPT (1 GiB) or PD (2 MiB) level ends the walk.
        if (level == 1 || level == 2) && entry & pte::HUGE != 0 {
            let size = 1u64 << shift;
            return Some((addr & !(size - 1)) + (va & (size - 1)));
        }
        table = addr;
    }
    Some(table + (va & 0xFFF))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_pages;

    #[test]
    fn walks_initial_and_guest_built_tables() {
        let mem_bytes = 4u64 << 20;
        let (mem, t) = host_pages::test_guest(mem_bytes);
        assert_eq!(
            translate(&mem, t.init_pml4, 0x12345, Access::Write),
            Some(0x12345)
        );
        assert_eq!(
            translate(&mem, t.init_pml4, mem_bytes + 0x1000 * 2, Access::Read),
            None
        );
        assert_eq!(translate(&mem, t.init_pml4, t.idt_base, Access::Read), None);

        // A Guest PML4 at 0x10000 mapping va 0x4000_0000_0000 read-only to 0x3000.
        let user = pte::PRESENT | pte::USER;
        mem.write_u64(0x10000, 0x11000 | user | pte::WRITABLE)
            .unwrap(); // slot 0
        mem.write_u64(0x10000 + 128 * 8, 0x11000 | user | pte::WRITABLE)
            .unwrap(); // slot 128
        mem.write_u64(0x11000, 0x12000 | user | pte::WRITABLE)
            .unwrap();
        mem.write_u64(0x12000, 0x13000 | user | pte::WRITABLE)
            .unwrap();
        mem.write_u64(0x13000, 0x3000 | user).unwrap();
        let va = 0x4000_0000_0000;
        assert_eq!(translate(&mem, 0x10000, va + 5, Access::Read), Some(0x3005));
        assert_eq!(translate(&mem, 0x10000, va, Access::Write), None);
    }

    /// Found by the `checks` fuzz target: a Guest's entries may point
    /// anywhere, and the walk used to hand back whatever they named. One
    /// entry at 0 that is its own PDPT with a 1 GiB page maps the Host's
    /// pages and everything past pfn_limit; none of it may come out.
    #[test]
    fn a_walk_never_ends_outside_guest_memory() {
        let (mem, _) = host_pages::test_guest(1 << 20);
        mem.write_u64(0, pte::PRESENT | pte::USER | pte::WRITABLE | pte::HUGE)
            .unwrap();
        assert_eq!(translate(&mem, 0, 0x1234, Access::Write), Some(0x1234));
        let host = mem.layout.host_base();
        assert_eq!(translate(&mem, 0, host, Access::Read), None, "a Host page");
        assert_eq!(translate(&mem, 0, host - 1, Access::Read), Some(host - 1));
        assert_eq!(
            translate(&mem, 0, 0x80_0000, Access::Read),
            None,
            "no memory"
        );
    }
}
