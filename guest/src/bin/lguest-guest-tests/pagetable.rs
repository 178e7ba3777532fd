//! Our own page tables.
//!
//! The Host boots us on page tables of its own, and we may keep them, but a
//! real kernel builds its own, and the Host must follow it: NEW_PGTABLE loads
//! a PML4 of ours, SET_PGD and SET_PTE tell the Host we changed an entry (it
//! shadows them and would otherwise keep a stale translation), FLUSH_TLB
//! drops every stale one. The Host never writes our tables.
//!
//! The layout copies the Host's: [0, pfn_limit << 12) identity-mapped, user,
//! writable, with 2 MiB pages and 4 KiB pages for a last partial 2 MiB. PML4
//! slot 511 is the Host's own (it must be exactly lguest_data.host_pml4e) and
//! slots 256-510 stay empty: the upper half is the Host's. On top of that we
//! keep one alias window at ALIAS_BASE, mapped with 4 KiB pages, where the
//! tests (and bad=host-write) map whatever page they like.

use lguest_abi::pte::{ACCESSED, DIRTY, HUGE, PRESENT, USER, WRITABLE};
use lguest_abi::{hcall as nr, HOST_PML4_SLOT, PAGE_SHIFT, PAGE_SIZE};

use lguest_guest::cell::GuestCell;
use lguest_guest::hcall::hcall;
use lguest_guest::lguest_data;

/// The alias window: 512 pages from here, in PML4 slot 128 (lower half).
pub const ALIAS_BASE: u64 = 0x4000_0000_0000;
pub const ALIAS_PAGES: usize = 512;

/// Flags of a table pointing at another table. The CPU would set Accessed
/// itself; we preset it so nobody has to write it later.
pub const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER | ACCESSED;
/// Flags of a page: Dirty preset as well.
pub const PAGE_FLAGS: u64 = PRESENT | WRITABLE | USER | ACCESSED | DIRTY;

const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;
/// How much of the identity map our static tables can hold: one page
/// directory per GiB of [0, pfn_limit << 12). The Launcher gives at most
/// 64 GiB of RAM; the rest is room for device pages. (They are .bss: they
/// cost nothing in the image.)
const MAX_IDENT_GIB: usize = 72;

/// One page-table page.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
pub struct Table([u64; 512]);

const EMPTY: Table = Table([0; 512]);

struct Tables {
    pml4: Table,
    ident_pdpt: Table,
    ident_pd: [Table; MAX_IDENT_GIB],
    /// 4 KiB pages for the last 2 MiB, if pfn_limit cuts it.
    tail_pt: Table,
    alias_pdpt: Table,
    alias_pd: Table,
    alias_pt: Table,
}

/// The tables live in .bss, zeroed by the Launcher; in our memory, so the
/// Host's identity map (and ours) covers them, virtual == physical.
static TABLES: GuestCell<Tables> = GuestCell::new(Tables {
    pml4: EMPTY,
    ident_pdpt: EMPTY,
    ident_pd: [EMPTY; MAX_IDENT_GIB],
    tail_pt: EMPTY,
    alias_pdpt: EMPTY,
    alias_pd: EMPTY,
    alias_pt: EMPTY,
});

/// Whether our PML4 is the one loaded, so changes must be told to the Host.
static LIVE: GuestCell<bool> = GuestCell::new(false);

fn tables() -> *mut Tables {
    TABLES.as_ptr()
}

/// Store one entry. Once the tables are live the Host's shadow and the CPU
/// read them behind the compiler's back, so every store is volatile.
///
/// # Safety
///
/// `table` must point into TABLES and `index` be below 512; if the tables
/// are live, the caller must keep what Rust uses mapped.
unsafe fn set_entry(table: *mut Table, index: usize, value: u64) {
    // SAFETY: the caller's promise; volatile because of the Host.
    unsafe { (&raw mut (*table).0[index]).write_volatile(value) }
}

fn phys(table: *mut Table) -> u64 {
    table as u64
}

/// The physical address of our PML4, for NEW_PGTABLE and friends.
pub fn pml4() -> u64 {
    // SAFETY: only the address of the field is taken.
    phys(unsafe { &raw mut (*tables()).pml4 })
}

/// Fill our tables with the identity map and slot 511, and an empty alias
/// window that the PML4 doesn't point to yet (`hook_alias` does that).
/// Fails if pfn_limit is more than our static tables can map.
///
/// If our tables are already live (the test ran before), this writes the
/// same identity entries over themselves and unhooks the alias window; the
/// caller reloads them with `load`.
pub fn build() -> Result<(), &'static str> {
    let limit = lguest_data::pfn_limit() << PAGE_SHIFT;
    if limit == 0 || limit > MAX_IDENT_GIB as u64 * GIB {
        return Err("pfn_limit is beyond what the Guest's static page tables can map");
    }
    let t = tables();
    // SAFETY: every pointer is into TABLES and every index below 512. When
    // the tables are live, the identity entries get their own values again
    // and only the alias window changes, which nothing but tests uses.
    unsafe {
        let pml4 = &raw mut (*t).pml4;
        let pdpt = &raw mut (*t).ident_pdpt;
        let tail = &raw mut (*t).tail_pt;
        // Each entry is written once, with its final value: were the tables
        // live, clearing slot 0 even for a moment would unmap our code.
        for slot in 0..512 {
            let entry = match slot {
                0 => phys(pdpt) | TABLE_FLAGS,
                HOST_PML4_SLOT => lguest_data::host_pml4e(),
                _ => 0,
            };
            set_entry(pml4, slot, entry);
        }

        // Whole 2 MiB pages up to the last full one, then 4 KiB pages.
        let mut addr = 0;
        while addr < limit {
            let gib = (addr / GIB) as usize;
            let pd = &raw mut (*t).ident_pd[gib];
            if addr % GIB == 0 {
                set_entry(pdpt, gib, phys(pd) | TABLE_FLAGS);
            }
            let pd_index = (addr % GIB / TWO_MIB) as usize;
            if limit - addr >= TWO_MIB {
                set_entry(pd, pd_index, addr | PAGE_FLAGS | HUGE);
            } else {
                for pt_index in 0..512 {
                    let page = addr + pt_index as u64 * PAGE_SIZE;
                    let entry = if page < limit { page | PAGE_FLAGS } else { 0 };
                    set_entry(tail, pt_index, entry);
                }
                set_entry(pd, pd_index, phys(tail) | TABLE_FLAGS);
            }
            addr += TWO_MIB;
        }

        // The alias window: one PDPT, PD and PT, all pages unmapped.
        let alias_pdpt = &raw mut (*t).alias_pdpt;
        let alias_pd = &raw mut (*t).alias_pd;
        let alias_pt = &raw mut (*t).alias_pt;
        for i in 0..512 {
            set_entry(alias_pdpt, i, 0);
            set_entry(alias_pd, i, 0);
            set_entry(alias_pt, i, 0);
        }
        set_entry(
            alias_pdpt,
            pdpt_index(ALIAS_BASE),
            phys(alias_pd) | TABLE_FLAGS,
        );
        set_entry(alias_pd, pd_index(ALIAS_BASE), phys(alias_pt) | TABLE_FLAGS);
    }
    Ok(())
}

const fn pml4_index(vaddr: u64) -> usize {
    (vaddr >> 39 & 511) as usize
}

const fn pdpt_index(vaddr: u64) -> usize {
    (vaddr >> 30 & 511) as usize
}

const fn pd_index(vaddr: u64) -> usize {
    (vaddr >> 21 & 511) as usize
}

// The window must fit in one page table, in the lower half.
const _: () = assert!(ALIAS_BASE.is_multiple_of(TWO_MIB) && pml4_index(ALIAS_BASE) < 256);

/// Load our PML4: NEW_PGTABLE.
///
/// # Safety
///
/// `build` must have succeeded, and whatever else is in the tables must not
/// unmap anything Rust uses (the identity map covers all our memory, as the
/// Host's did).
pub unsafe fn load() {
    // SAFETY: the caller's promise.
    unsafe { hcall(nr::NEW_PGTABLE, pml4(), 0, 0, 0) };
    LIVE.write(true);
}

/// Set PML4 slot `slot` directly (bad=pgd511 breaks slot 511 with this).
///
/// # Safety
///
/// As for `load`, if the tables are live.
pub unsafe fn set_pml4_slot(slot: usize, value: u64) {
    assert!(slot < 512);
    // SAFETY: in TABLES, index checked.
    unsafe { set_entry(&raw mut (*tables()).pml4, slot, value) };
    if LIVE.read() && slot < 256 {
        // SAFETY: we just changed this top-level entry; the caller vouches
        // for its value.
        unsafe { hcall(nr::SET_PGD, pml4(), slot as u64, 0, 0) };
    }
}

/// What PML4 slot `slot` of our tables holds.
pub fn pml4_slot(slot: usize) -> u64 {
    assert!(slot < 512);
    // SAFETY: in TABLES, index checked; volatile because of the Host.
    unsafe { (&raw const (*tables()).pml4.0[slot]).read_volatile() }
}

/// Point the PML4 at the alias window's tables (telling the Host with
/// SET_PGD if we are live).
pub fn hook_alias() {
    let t = tables();
    // SAFETY: the alias window maps only what tests put in it; nothing else
    // lives at those addresses.
    unsafe {
        let entry = phys(&raw mut (*t).alias_pdpt) | TABLE_FLAGS;
        set_pml4_slot(pml4_index(ALIAS_BASE), entry);
    }
}

/// Map alias page `index` (at `alias_addr(index)`) with the raw PTE `pte`
/// (0 unmaps), telling the Host with SET_PTE if we are live; with
/// `flush` = false the Host isn't told (the caller flushes some other way).
///
/// # Safety
///
/// Whatever the PTE maps becomes reachable through the alias: the caller
/// must not create a Rust reference through it that aliases something else.
pub unsafe fn set_alias_pte(index: usize, pte: u64, flush: bool) {
    assert!(index < ALIAS_PAGES);
    // SAFETY: in TABLES, index checked.
    unsafe { set_entry(&raw mut (*tables()).alias_pt, index, pte) };
    if flush && LIVE.read() {
        // SAFETY: the entry only affects the alias window.
        unsafe { hcall(nr::SET_PTE, pml4(), alias_addr(index), pte, 0) };
    }
}

/// The virtual address of alias page `index`.
pub const fn alias_addr(index: usize) -> u64 {
    ALIAS_BASE + index as u64 * PAGE_SIZE
}
