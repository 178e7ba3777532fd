//! The Host-owned pages above `pfn_limit`: what lguest's Switcher page was.
//!
//! The Guest kernel runs in ring 3, so the CPU still needs a ring-0 world to
//! take its traps in: an IDT, a GDT, a TSS (whose I/O bitmap lets every port
//! through, so `out` reaches us), a page of tiny ring-0 stubs, and a stack for
//! them. All of it is mapped supervisor-only through PML4 slot 511, which every
//! Guest page table must carry, and none of it is in the Guest's RAM. The
//! initial page tables live here too (read-only: the Host never writes the
//! Guest's page tables, and a Guest can't write these).
//!
//! A trap from ring 3 lands in stub V, which pushes an error code (if the CPU
//! didn't) and V, and does `out` to [`TRAP_PORT`]. That exit is the Host's
//! view of every trap: it reads the frame off the stub stack, decides, edits
//! the frame, and lets the stub `iretq` to wherever the frame now says.

use crate::memory::{GuestMemory, Layout};
use lguest_abi::{pte, GDT_ENTRIES, GUEST_CS, HOST_CS, LGUEST_TRAP_ENTRY, PAGE_SIZE};

/// Where slot 511 maps the Host pages: Host page i is at HOST_VA + i * 4096.
pub const HOST_VA: u64 = 0xFFFF_FF80_0000_0000;
/// The port the ring-0 stubs write to. Only exits whose RIP is in the stub
/// page count as traps; a Guest `out` to this port is an ordinary ignored one.
pub const TRAP_PORT: u16 = 0x1E;

/// Page indices (from the first Host page) of everything with a fixed place.
pub const IDT_PAGE: u64 = 0;
pub const GDT_PAGE: u64 = 1;
pub const TSS_PAGE: u64 = 2;
/// 104-byte TSS, 8192-byte I/O bitmap, and the 0xFF byte that ends it.
pub const TSS_SIZE: u64 = 104 + 8192 + 1;
pub const TSS_PAGES: u64 = TSS_SIZE.div_ceil(PAGE_SIZE);
pub const STUB_PAGE: u64 = TSS_PAGE + TSS_PAGES;
/// A PML4 holding only slot 511: loading it and then the Guest's CR3 is our
/// TLB flush (a plain reload of the same CR3 flushes nothing on some KVMs).
pub const FLUSH_PML4_PAGE: u64 = STUB_PAGE + 1;
const HOST_PDPT_PAGE: u64 = FLUSH_PML4_PAGE + 1;
const HOST_PD_PAGE: u64 = HOST_PDPT_PAGE + 1;
const HOST_PT_PAGE: u64 = HOST_PD_PAGE + 1;
pub const INIT_PML4_PAGE: u64 = HOST_PT_PAGE + 1;
const INIT_PDPT_PAGE: u64 = INIT_PML4_PAGE + 1;
const FIRST_PD_PAGE: u64 = INIT_PDPT_PAGE + 1;
/// Pages of ring-0 stack (writable).
pub const STACK_PAGES: u64 = 2;

/// Stub layout inside the stub page.
pub const STUB_SIZE: u64 = 16;
/// The stubs cover the 32 exception vectors; higher vectors have no gate, so
/// a Guest's `int n` raises #GP (or #UD, on KVMs that report it that way).
pub const STUB_VECTORS: u64 = 32;
const COMMON_OFFSET: u64 = 0x200;
/// Where `syscall` lands (MSR_LSTAR): a supervisor page, so a ring-3
/// `syscall` that jumps here faults at once and the Host turns it into #UD.
pub const SYSCALL_OFFSET: u64 = 0x400;

/// Bytes of the ring-0 frame the stubs leave: vector, error code, RIP, CS,
/// RFLAGS, RSP, SS.
pub const STUB_FRAME_WORDS: usize = 7;

const ACCESSED_DIRTY: u64 = pte::ACCESSED | pte::DIRTY;
const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// How many read-only Host pages a Guest with `pfn_limit` needs.
pub fn ro_pages_for(pfn_limit: u64) -> u64 {
    let limit = pfn_limit * PAGE_SIZE;
    let pds = limit.div_ceil(ONE_GIB);
    let tail_pt = u64::from(!limit.is_multiple_of(TWO_MIB));
    FIRST_PD_PAGE + pds + tail_pt
}

/// Host virtual address of Host page `page`.
pub fn host_va(page: u64) -> u64 {
    HOST_VA + page * PAGE_SIZE
}

/// The values the vCPU's system registers need to use these pages.
#[derive(Clone, Copy, Debug)]
pub struct HostTables {
    pub idt_base: u64,
    pub gdt_base: u64,
    pub tss_base: u64,
    /// Guest-physical address of the initial PML4.
    pub init_pml4: u64,
    /// Guest-physical address of the flush PML4.
    pub flush_pml4: u64,
    /// The PML4 entry every Guest PML4 carries in slot 511.
    pub host_pml4e: u64,
    /// MSR_LSTAR.
    pub syscall_target: u64,
    /// First and last+1 virtual address of the stub page.
    pub stub_start: u64,
    pub stub_end: u64,
}

/// Fills the Host pages of `mem` and returns where things are.
/*L:130 What was lguest's Switcher page: the IDT, GDT and TSS the CPU needs
 * to take a trap from ring 3, the stubs that turn every trap into an exit,
 * and the initial page tables, all read-only to the Guest. */
pub fn build(mem: &GuestMemory) -> HostTables {
    let layout = mem.layout;
    let phys = |page: u64| layout.host_base() + page * PAGE_SIZE;

    write_idt(mem);
    write_gdt(mem);
    write_tss(mem, &layout);
    write_stubs(mem);

    // Slot 511: PDPT -> PD -> one PT mapping every Host page, supervisor only.
    let table = PAGE_SIZE / 8;
    let host_pages = layout.host_pages();
    assert!(host_pages <= table, "Host pages fit one page table");
    for page in 0..host_pages {
        let mut entry = phys(page) | pte::PRESENT | pte::WRITABLE | ACCESSED_DIRTY;
        if page != STUB_PAGE {
            entry |= pte::NX;
        }
        mem.write_host_u64(HOST_PT_PAGE, page * 8, entry);
    }
    let non_leaf = pte::PRESENT | pte::WRITABLE | pte::ACCESSED;
    mem.write_host_u64(HOST_PD_PAGE, 0, phys(HOST_PT_PAGE) | non_leaf);
    mem.write_host_u64(HOST_PDPT_PAGE, 0, phys(HOST_PD_PAGE) | non_leaf);
    let host_pml4e = phys(HOST_PDPT_PAGE) | non_leaf;
    mem.write_host_u64(FLUSH_PML4_PAGE, 511 * 8, host_pml4e);

    // The initial tables: [0, pfn_limit << 12) identity-mapped for the user,
    // 2 MiB pages where they fit, 4 KiB pages for a partial last 2 MiB.
    let user = non_leaf | pte::USER;
    mem.write_host_u64(INIT_PML4_PAGE, 0, phys(INIT_PDPT_PAGE) | user);
    mem.write_host_u64(INIT_PML4_PAGE, 511 * 8, host_pml4e);
    let limit = layout.guest_limit();
    let pds = limit.div_ceil(ONE_GIB);
    let tail_pt_page = FIRST_PD_PAGE + pds;
    for gib in 0..pds {
        mem.write_host_u64(INIT_PDPT_PAGE, gib * 8, phys(FIRST_PD_PAGE + gib) | user);
    }
    let mut addr = 0;
    while addr < limit {
        let (pd, slot) = (addr / ONE_GIB, (addr % ONE_GIB) / TWO_MIB);
        if addr + TWO_MIB <= limit {
            let leaf = addr | user | pte::DIRTY | pte::HUGE;
            mem.write_host_u64(FIRST_PD_PAGE + pd, slot * 8, leaf);
        } else {
            mem.write_host_u64(FIRST_PD_PAGE + pd, slot * 8, phys(tail_pt_page) | user);
            for (i, page) in (addr..limit).step_by(PAGE_SIZE as usize).enumerate() {
                mem.write_host_u64(tail_pt_page, i as u64 * 8, page | user | pte::DIRTY);
            }
        }
        addr += TWO_MIB;
    }

    HostTables {
        idt_base: host_va(IDT_PAGE),
        gdt_base: host_va(GDT_PAGE),
        tss_base: host_va(TSS_PAGE),
        init_pml4: phys(INIT_PML4_PAGE),
        flush_pml4: phys(FLUSH_PML4_PAGE),
        host_pml4e,
        syscall_target: host_va(STUB_PAGE) + SYSCALL_OFFSET,
        stub_start: host_va(STUB_PAGE),
        stub_end: host_va(STUB_PAGE) + PAGE_SIZE,
    }
}

/// One 16-byte x86-64 gate descriptor.
pub fn gate(offset: u64, selector: u16, type_: u8, dpl: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(offset as u16).to_le_bytes());
    g[2..4].copy_from_slice(&selector.to_le_bytes());
    g[5] = 0x80 | (dpl << 5) | type_;
    g[6..8].copy_from_slice(&((offset >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
    g
}

fn write_idt(mem: &GuestMemory) {
    for v in 0..STUB_VECTORS {
        // #BP, #OF and the hypercall trap may be raised by ring 3 directly.
        let dpl = if matches!(v, 3 | 4) || v == u64::from(LGUEST_TRAP_ENTRY) {
            3
        } else {
            0
        };
        let stub = host_va(STUB_PAGE) + v * STUB_SIZE;
        mem.write_host(IDT_PAGE, v * 16, &gate(stub, HOST_CS, 0xE, dpl));
    }
}

/// The Host's GDT entries 0-9 (ABI section 1); the TSS descriptor is written
/// by [`write_tss`].
pub fn host_gdt_entry(index: usize) -> u64 {
    match index {
        1 => 0x00AF_9B00_0000_FFFF, // ring-0 code, long mode, accessed
        2 => 0x00CF_9300_0000_FFFF, // ring-0 data, accessed
        5 => 0x00CF_F300_0000_FFFF, // Guest data: DPL 3, accessed
        6 => 0x00AF_FB00_0000_FFFF, // Guest code: DPL 3, long mode, accessed
        _ => 0,
    }
}

fn write_gdt(mem: &GuestMemory) {
    for i in 0..GDT_ENTRIES {
        mem.write_host_u64(GDT_PAGE, i as u64 * 8, host_gdt_entry(i));
    }
    debug_assert_eq!(GUEST_CS >> 3, 6);
}

fn write_tss(mem: &GuestMemory, layout: &Layout) {
    let base = host_va(TSS_PAGE);
    let limit = TSS_SIZE - 1;
    // 64-bit busy TSS descriptor (type 0xB), spanning entries 7 and 8.
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x8B << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    mem.write_host_u64(GDT_PAGE, 7 * 8, low);
    mem.write_host_u64(GDT_PAGE, 8 * 8, base >> 32);

    let stack_top = host_va(layout.host_ro_pages + STACK_PAGES);
    mem.write_host_u64(TSS_PAGE, 4, stack_top); // rsp0
                                                // I/O map base at 104: the bitmap follows, all zero (every port allowed),
                                                // and one 0xFF byte ends it.
    mem.write_host(TSS_PAGE, 102, &104u16.to_le_bytes());
    mem.write_host(TSS_PAGE, TSS_SIZE - 1, &[0xFF]);
}

/*S:135 The stubs: push an error code if the CPU didn't, push the vector,
 * `out` to port 0x1E (an exit: the Host reads the frame), then `iretq` to
 * wherever the Host left the frame pointing. A few instructions, since
 * ring 0 is emulated on some KVMs. */
fn write_stubs(mem: &GuestMemory) {
    for v in 0..STUB_VECTORS {
        let mut s = [0x90u8; STUB_SIZE as usize];
        if lguest_abi::vector_has_error_code(v as u8) {
            s[0..2].copy_from_slice(&[0x66, 0x90]); // 2-byte nop: CPU pushed one
        } else {
            s[0..2].copy_from_slice(&[0x6A, 0x00]); // push $0
        }
        s[2] = 0x68; // push $v
        s[3..7].copy_from_slice(&(v as u32).to_le_bytes());
        s[7] = 0xE9; // jmp common
        let next = v * STUB_SIZE + 12;
        let rel = COMMON_OFFSET as i64 - next as i64;
        s[8..12].copy_from_slice(&(rel as i32).to_le_bytes());
        mem.write_host(STUB_PAGE, v * STUB_SIZE, &s);
    }
    // common: out %al, $TRAP_PORT; add $16, %rsp; iretq
    let common = [0xE6, TRAP_PORT as u8, 0x48, 0x83, 0xC4, 0x10, 0x48, 0xCF];
    mem.write_host(STUB_PAGE, COMMON_OFFSET, &common);
    // Never executed (ring 3 can't fetch here); ud2 in case ring 0 ever does.
    mem.write_host(STUB_PAGE, SYSCALL_OFFSET, &[0x0F, 0x0B]);
}

/// For unit tests: a Guest memory of `mem_bytes` of RAM and one device
/// page, with the Host's pages built as the Launcher builds them.
#[cfg(test)]
pub(crate) fn test_guest(mem_bytes: u64) -> (GuestMemory, HostTables) {
    let pfn_limit = mem_bytes / PAGE_SIZE + 1;
    let mem = GuestMemory::new(Layout {
        mem: mem_bytes,
        pfn_limit,
        mmio_hole_pages: 0,
        host_ro_pages: ro_pages_for(pfn_limit),
        host_rw_pages: STACK_PAGES,
    })
    .expect("map a small Guest memory");
    let tables = build(&mem);
    (mem, tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(mem_mb: u64) -> Layout {
        let mem = mem_mb << 20;
        let pfn_limit = mem / PAGE_SIZE + 1;
        Layout {
            mem,
            pfn_limit,
            mmio_hole_pages: 0,
            host_ro_pages: ro_pages_for(pfn_limit),
            host_rw_pages: STACK_PAGES,
        }
    }

    /// Walks the initial tables the way the CPU would.
    fn translate(mem: &GuestMemory, t: &HostTables, va: u64) -> Option<(u64, u64)> {
        let base = mem.layout.host_base();
        let read = |phys: u64| {
            let off = phys - base;
            mem.read_host_u64(off / PAGE_SIZE, off % PAGE_SIZE)
        };
        let mut table = t.init_pml4;
        let mut flags = !0u64;
        for (level, shift) in [39u64, 30, 21, 12].iter().enumerate() {
            let e = read(table + ((va >> shift) & 511) * 8);
            if e & pte::PRESENT == 0 {
                return None;
            }
            flags &= e;
            if level == 2 && e & pte::HUGE != 0 {
                return Some(((e & pte::ADDR_MASK) + (va & (TWO_MIB - 1)), flags));
            }
            table = e & pte::ADDR_MASK;
        }
        Some((table + (va & 0xFFF), flags))
    }

    #[test]
    fn identity_map_covers_exactly_pfn_limit() {
        for mb in [2, 3, 64, 1025] {
            let l = layout(mb);
            let mem = GuestMemory::new(l).unwrap();
            let t = build(&mem);
            let limit = l.guest_limit();
            for va in [0, 0x1234, limit - 1, limit - PAGE_SIZE, l.mem] {
                let (pa, flags) = translate(&mem, &t, va).expect("mapped");
                assert_eq!(pa, va);
                assert_ne!(flags & pte::USER, 0);
                assert_ne!(flags & pte::ACCESSED, 0);
            }
            assert!(translate(&mem, &t, limit).is_none(), "{mb} MiB");
        }
    }

    #[test]
    fn host_pages_are_supervisor_only_in_slot_511() {
        let l = layout(64);
        let mem = GuestMemory::new(l).unwrap();
        let t = build(&mem);
        let (pa, flags) = translate(&mem, &t, t.idt_base).unwrap();
        assert_eq!(pa, l.host_base());
        assert_eq!(flags & pte::USER, 0);
        let stack = host_va(l.host_ro_pages);
        assert_eq!(translate(&mem, &t, stack).unwrap().0, l.host_rw_base());
        assert_eq!(t.host_pml4e & pte::USER, 0);
    }

    #[test]
    fn stubs_jump_to_the_common_path() {
        let l = layout(16);
        let mem = GuestMemory::new(l).unwrap();
        build(&mem);
        for v in [0u64, 13, 31] {
            let mut s = [0u8; 16];
            mem.read_host(STUB_PAGE, v * STUB_SIZE, &mut s);
            let rel = i32::from_le_bytes(s[8..12].try_into().unwrap()) as i64;
            assert_eq!(v as i64 * 16 + 12 + rel, COMMON_OFFSET as i64);
            assert_eq!(u32::from_le_bytes(s[3..7].try_into().unwrap()), v as u32);
        }
    }
}
