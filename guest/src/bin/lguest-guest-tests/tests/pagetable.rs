//! Page tables (ABI section 9): our own, loaded with NEW_PGTABLE, and the
//! Host told about every change with SET_PGD, SET_PTE or FLUSH_TLB.

use lguest_abi::hcall as nr;
use lguest_guest::cell::GuestCell;
use lguest_guest::hcall::hcall;

use super::interrupts::{check_not_present, probe_read};
use super::TestResult;
use crate::pagetable;

/*
 * pgtable: our own page tables, and telling the Host about changes.
 */

#[repr(C, align(4096))]
struct Page([u64; 512]);

static PAGE_A: GuestCell<Page> = GuestCell::new(Page([0; 512]));
static PAGE_B: GuestCell<Page> = GuestCell::new(Page([0; 512]));

fn word0(page: &GuestCell<Page>) -> *mut u64 {
    page.as_ptr().cast()
}

pub fn test_pgtable() -> TestResult {
    if let Err(why) = pagetable::build() {
        fail!("{why}");
    }
    // SAFETY: the tables map all our memory where the Host's did; the alias
    // window isn't hooked in yet.
    unsafe { pagetable::load() };

    const A: u64 = 0xA11A_5A11_A5A1_1A5A;
    const B: u64 = 0xB0B0_B0B0_0B0B_0B0B;
    let alias = pagetable::alias_addr(0);
    let alias_ptr = alias as *mut u64;
    // SAFETY: our own statics, through their identity addresses.
    unsafe {
        word0(&PAGE_A).write_volatile(0);
        word0(&PAGE_B).write_volatile(B);
    }

    // The window is not in the PML4 yet: reading it faults.
    let (_, rec) = probe_read(alias);
    check_not_present("alias before SET_PGD", &rec, alias)?;

    // Hook it in (SET_PGD) and map page A (SET_PTE).
    pagetable::hook_alias();
    // SAFETY: the alias maps PAGE_A, which no Rust reference points into.
    unsafe { pagetable::set_alias_pte(0, PAGE_A.as_ptr() as u64 | pagetable::PAGE_FLAGS, true) };
    // SAFETY: the alias is mapped to PAGE_A.
    unsafe { alias_ptr.write_volatile(A) };
    // SAFETY: our own static.
    let through_identity = unsafe { word0(&PAGE_A).read_volatile() };
    check!(
        through_identity == A,
        "wrote {A:#x} through the alias {alias:#x}, page A reads {through_identity:#x}"
    );

    // Remap to page B: SET_PTE must leave no stale translation.
    // SAFETY: as above, for PAGE_B.
    unsafe { pagetable::set_alias_pte(0, PAGE_B.as_ptr() as u64 | pagetable::PAGE_FLAGS, true) };
    // SAFETY: the alias is mapped to PAGE_B.
    let through_alias = unsafe { alias_ptr.read_volatile() };
    check!(
        through_alias == B,
        "after SET_PTE to page B the alias reads {through_alias:#x}, expected {B:#x}"
    );

    // Back to A, told only by FLUSH_TLB.
    // SAFETY: as above.
    unsafe {
        pagetable::set_alias_pte(0, PAGE_A.as_ptr() as u64 | pagetable::PAGE_FLAGS, false);
        hcall(nr::FLUSH_TLB, 0, 0, 0, 0);
    }
    // SAFETY: the alias is mapped to PAGE_A.
    let through_alias = unsafe { alias_ptr.read_volatile() };
    check!(
        through_alias == A,
        "after FLUSH_TLB back to page A the alias reads {through_alias:#x}, expected {A:#x}"
    );

    // Unmapped again: it faults, no stale translation.
    // SAFETY: unmapping only affects the alias.
    unsafe { pagetable::set_alias_pte(0, 0, true) };
    let (_, rec) = probe_read(alias);
    check_not_present("alias after SET_PTE unmapped it", &rec, alias)?;

    // Our tables stay loaded for the rest of the run.
    Ok(())
}
