//! The pure checks a Guest reaches through its hypercalls and traps: IDT
//! gate decoding (LOAD_IDT_ENTRY), the stack rule for interrupt frames (ABI
//! section 6), page-table walks over tables the input builds, and the bounds
//! of every Guest-physical access (GuestMemory).
//!
//! Each is held to what the ABI says, worked out here independently of the
//! Host's code: a decoded gate is the one the bits describe, a frame never
//! lands in the interrupted red zone, a walk's result is always Guest memory
//! (never a Host page, never at or past pfn_limit), and an access is allowed
//! exactly when it lies in Guest memory, changes nothing when refused, and
//! never reaches the Host pages.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use lguest::host_pages;
use lguest::interrupts_and_traps::{decode_gate, frame_base, Gate};
use lguest::memory::{GuestMemory, SHADOW_ROOTS};
use lguest::pagewalk::{translate, Access};
use lguest_abi::{pte, GATE_INTERRUPT, GATE_TRAP, PAGE_SIZE, RED_ZONE, RESERVE_MEM};
use lguest_fuzz::{assert_reason, guest_bytes, memory, HostPages};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

/// Guest memory for the walks: 16 pages of RAM, a device page and a hole
/// page, then the Host's pages with the initial page tables in them.
const RAM_PAGES: u64 = 16;

struct Walks {
    mem: GuestMemory,
    init_pml4: u64,
    host: HostPages,
}

static WALKS: LazyLock<Walks> = LazyLock::new(|| {
    let pfn_limit = RAM_PAGES + 2;
    let mem = memory(
        RAM_PAGES,
        2,
        1,
        host_pages::ro_pages_for(pfn_limit),
        host_pages::STACK_PAGES,
    );
    let tables = host_pages::build(&mem);
    let host = HostPages::snapshot(&mem);
    Walks {
        mem,
        init_pml4: tables.init_pml4,
        host,
    }
});

#[derive(Arbitrary, Debug)]
enum Cr3 {
    /// The initial tables the Host built.
    Initial,
    /// A page of Guest RAM.
    Page(u8),
    /// Anything at all.
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Va {
    /// Low addresses, where the tables in RAM are likely to map something.
    Low(u32),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum MemOp {
    Check { addr: u64, len: u64 },
    Read { addr: u64, len: u16 },
    Write { addr: u64, len: u16 },
    Cstr { addr: u64, max: u16 },
    HostAddress { addr: u64, len: u64 },
    TableEntry { addr: u64 },
}

#[derive(Arbitrary, Debug)]
enum Input {
    Gate {
        vector: u8,
        low: u64,
        high: u64,
    },
    Frame {
        rsp: u64,
        stack: Option<(u64, u8)>,
    },
    Walk {
        cr3: Cr3,
        va: Va,
        /// Guest RAM from address 0, the tables, is the rest of the input.
        write: bool,
    },
    Memory {
        ram_pages: u8,
        device_pages: u8,
        hole_pages: u8,
        ops: Vec<MemOp>,
    },
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(input) = Input::arbitrary(&mut u) {
        let rest = u.take_rest();
        run(input, rest);
    }
});

fn run(input: Input, rest: &[u8]) {
    match input {
        Input::Gate { vector, low, high } => gate(vector as u64, low, high),
        Input::Frame { rsp, stack } => frame(rsp, stack.map(|(t, p)| (t, p as u64))),
        Input::Walk { cr3, va, write } => walk(cr3, va, write, rest),
        Input::Memory {
            ram_pages,
            device_pages,
            hole_pages,
            ops,
        } => {
            let device_pages = device_pages as u64 % 4;
            let hole_pages = hole_pages as u64 % (device_pages + 1);
            let mem = memory(1 + ram_pages as u64 % 8, device_pages, hole_pages, 2, 1);
            accesses(&mem, &ops);
        }
    }
}

/// An x86-64 gate: offset 15:0 in bits 15:0, type in 43:40, present in 47,
/// offset 31:16 in 63:48 of the low word, offset 63:32 in the high word.
fn gate(vector: u64, low: u64, high: u64) {
    let present = low >> 47 & 1 != 0;
    let type_ = (low >> 40 & 0xF) as u8;
    let offset = (low & 0xFFFF) | (low >> 48 & 0xFFFF) << 16 | (high & 0xFFFF_FFFF) << 32;
    match decode_gate(vector, low, high) {
        Ok(None) => assert!(!present, "a present gate decoded as absent"),
        Ok(Some(Gate {
            offset: got,
            interrupt,
        })) => {
            assert!(present, "an absent gate decoded as present");
            assert!(
                type_ == GATE_INTERRUPT || type_ == GATE_TRAP,
                "type {type_}"
            );
            assert_eq!(interrupt, type_ == GATE_INTERRUPT);
            assert_eq!(got, offset);
            assert!(got < RESERVE_MEM, "a handler in the Host's half: {got:#x}");
        }
        Err(e) => {
            let e = e.to_string();
            assert_reason(&e, "LOAD_IDT_ENTRY");
            assert!(
                e.contains(&vector.to_string()),
                "{e:?} does not name the vector"
            );
            assert!(present);
            assert!(
                (type_ != GATE_INTERRUPT && type_ != GATE_TRAP) || offset >= RESERVE_MEM,
                "a good gate refused: {e}"
            );
        }
    }
}

/// ABI section 6: with R the interrupted RSP and, under SET_STACK, B the
/// bottom of the stack, RSP = R - 128 when SET_STACK is off or B < R <= top;
/// the Guest ends when B - 4096 < R <= B; otherwise RSP = top. Then RSP is
/// aligned down to 16.
fn frame(rsp: u64, stack: Option<(u64, u64)>) {
    let got = frame_base(rsp, stack);
    if let Some(base) = got {
        assert_eq!(base % 16, 0, "frame base {base:#x} not aligned");
    }
    let Some((top, pages)) = stack else {
        if rsp >= RED_ZONE {
            let base = got.expect("no stack overflow without SET_STACK");
            assert!(base + RED_ZONE <= rsp, "frame in the red zone");
            assert!(rsp - base < RED_ZONE + 16);
        }
        return;
    };
    // Work in i128 so that a stack near 0 or the top of the address space
    // follows the rule and not the arithmetic.
    let (r, t, page) = (rsp as i128, top as i128, PAGE_SIZE as i128);
    let b = t - pages as i128 * page;
    let on_stack = b < r && r <= t;
    let guard = b - page < r && r <= b;
    if b - page < 0 || top < RED_ZONE || rsp < RED_ZONE {
        // A stack that wraps around address 0 is the Guest's own nonsense;
        // the rule only has to give some aligned answer.
        return;
    }
    match got {
        None => assert!(guard && !on_stack, "overflow reported off the guard page"),
        Some(base) if on_stack => {
            assert!(base + RED_ZONE <= rsp, "frame in the red zone");
            assert!(rsp - base < RED_ZONE + 16);
        }
        Some(base) => {
            assert!(!guard, "an overflow not reported (R {rsp:#x})");
            assert_eq!(base, top & !15, "frame not at the stack's top");
        }
    }
}

/// A walk of the input's tables: the result, if any, lies in Guest memory
/// and is the one an independent walk of the same tables gives.
fn walk(cr3: Cr3, va: Va, write: bool, ram: &[u8]) {
    let w = &*WALKS;
    let end = w.mem.layout.memory_end();
    w.mem.write(0, &vec![0; end as usize]).unwrap();
    w.mem.write(0, &ram[..ram.len().min(end as usize)]).unwrap();
    let cr3 = match cr3 {
        Cr3::Initial => w.init_pml4,
        Cr3::Page(p) => (p as u64 % RAM_PAGES) * PAGE_SIZE,
        Cr3::Raw(v) => v,
    };
    let va = match va {
        Va::Low(v) => v as u64,
        Va::Raw(v) => v,
    };
    let access = if write { Access::Write } else { Access::Read };
    let before = guest_bytes(&w.mem);
    let got = translate(&w.mem, cr3, va, access);
    if let Some(pa) = got {
        assert!(
            pa < end,
            "va {va:#x} translated to {pa:#x}, outside Guest memory (end {end:#x}, pfn_limit {:#x}, Host pages from {:#x})",
            w.mem.layout.guest_limit(),
            w.mem.layout.host_base()
        );
        assert_eq!(pa & 0xFFF, va & 0xFFF, "the page offset is kept");
    }
    assert_eq!(got, reference_walk(&w.mem, cr3, va, write), "va {va:#x}");
    assert!(guest_bytes(&w.mem) == before, "a walk wrote Guest memory");
    w.host.assert_unchanged(&w.mem, "a walk");
}

/// A four-level walk as the CPU does it for ring 3, from the ABI's rules:
/// tables in Guest memory, the Host's read-only pages or the shadow roots
/// (ABI 1.1), every level present and user (and writable for a write), 1 GiB
/// or 2 MiB pages ending it early, and the page reached must be Guest memory.
fn reference_walk(mem: &GuestMemory, cr3: u64, va: u64, write: bool) -> Option<u64> {
    if va >= RESERVE_MEM {
        return None;
    }
    let l = mem.layout;
    let shadows = l.shadow_root(0)..l.shadow_root(SHADOW_ROOTS);
    let readable = |a: u64| {
        a.is_multiple_of(8)
            && (a + 8 <= l.memory_end()
                || (l.host_base() <= a && a + 8 <= l.host_rw_base())
                || shadows.contains(&a))
    };
    let mut need = pte::PRESENT | pte::USER;
    if write {
        need |= pte::WRITABLE;
    }
    let mut table = cr3 & pte::ADDR_MASK;
    let mut pa = None;
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let at = table + (va >> shift & 511) * 8;
        if !readable(at) {
            return None;
        }
        let entry = if at < l.memory_end() {
            mem.read_u64(at).unwrap()
        } else if shadows.contains(&at) {
            let root = (at - shadows.start) / PAGE_SIZE;
            mem.read_shadow(root as usize, (at % PAGE_SIZE / 8) as usize)
        } else {
            mem.read_host_u64((at - l.host_base()) / PAGE_SIZE, at % PAGE_SIZE)
        };
        if entry & need != need {
            return None;
        }
        let size = 1u64 << shift;
        if level == 3 || ((level == 1 || level == 2) && entry & pte::HUGE != 0) {
            pa = Some((entry & pte::ADDR_MASK & !(size - 1)) | (va & (size - 1)));
            break;
        }
        table = entry & pte::ADDR_MASK;
    }
    pa.filter(|&pa| pa < l.memory_end())
}

/// Every access is allowed exactly when `[addr, addr + len)` lies in Guest
/// memory (below the mmio hole); a refused one changes nothing.
fn accesses(mem: &GuestMemory, ops: &[MemOp]) {
    let end = mem.layout.memory_end();
    let inside = |addr: u64, len: u64| addr.checked_add(len).is_some_and(|e| e <= end);
    let host = HostPages::snapshot(mem);
    let base = mem.host_address(0, 0).expect("address 0 is RAM");
    for (i, op) in ops.iter().take(64).enumerate() {
        let before = guest_bytes(mem);
        match *op {
            MemOp::Check { addr, len } => {
                let r = mem.check(addr, len);
                assert_eq!(r.is_ok(), inside(addr, len), "check({addr:#x}, {len})");
                if let Err(e) = r {
                    assert_reason(&e.to_string(), "check");
                }
            }
            MemOp::Read { addr, len } => {
                let mut buf = vec![0u8; len as usize];
                match mem.read(addr, &mut buf) {
                    Ok(()) => {
                        assert!(inside(addr, len as u64), "read({addr:#x}, {len}) allowed");
                        assert!(buf[..] == before[addr as usize..][..len as usize]);
                    }
                    Err(e) => {
                        assert!(!inside(addr, len as u64), "read({addr:#x}, {len}) refused");
                        assert_reason(&e.to_string(), "read");
                    }
                }
            }
            MemOp::Write { addr, len } => {
                let data = vec![i as u8 ^ 0x3C; len as usize];
                match mem.write(addr, &data) {
                    Ok(()) => {
                        assert!(inside(addr, len as u64), "write({addr:#x}, {len}) allowed");
                        let mut back = vec![0u8; len as usize];
                        mem.read(addr, &mut back).unwrap();
                        assert!(back == data);
                    }
                    Err(e) => {
                        assert!(!inside(addr, len as u64), "write({addr:#x}, {len}) refused");
                        assert_reason(&e.to_string(), "write");
                        assert!(guest_bytes(mem) == before, "a refused write changed memory");
                    }
                }
            }
            MemOp::Cstr { addr, max } => match mem.read_cstr(addr, max as usize) {
                Ok(s) => {
                    assert!(addr < end, "read_cstr at {addr:#x} allowed");
                    assert!(s.len() <= max as usize && !s.contains(&0));
                    assert!(s[..] == before[addr as usize..][..s.len()]);
                    let stop = addr + s.len() as u64;
                    assert!(
                        s.len() == max as usize || stop == end || before[stop as usize] == 0,
                        "the string stopped early"
                    );
                }
                Err(e) => {
                    assert!(addr >= end, "read_cstr at {addr:#x} refused");
                    assert_reason(&e.to_string(), "read_cstr");
                }
            },
            MemOp::HostAddress { addr, len } => match mem.host_address(addr, len) {
                // RAM is one mapping from address 0: the pointer is its
                // base plus the address.
                Ok(p) => {
                    assert!(inside(addr, len), "host_address({addr:#x}, {len}) allowed");
                    assert_eq!(p as usize, base as usize + addr as usize);
                }
                Err(e) => {
                    assert!(!inside(addr, len), "host_address({addr:#x}, {len}) refused");
                    assert_reason(&e.to_string(), "host_address");
                }
            },
            MemOp::TableEntry { addr } => {
                let l = mem.layout;
                let host_ro = l.host_base() <= addr && addr < l.host_rw_base();
                // The CPU's top level is a shadow root (ABI 1.1): a walk
                // reads those too.
                let shadow = (l.shadow_root(0)..l.shadow_root(SHADOW_ROOTS)).contains(&addr);
                let ok = addr % 8 == 0 && (inside(addr, 8) || host_ro || shadow);
                let got = mem.read_table_u64(addr);
                assert_eq!(got.is_some(), ok, "read_table_u64({addr:#x})");
                if let (Some(v), true) = (got, addr < end) {
                    assert_eq!(
                        v,
                        u64::from_le_bytes(before[addr as usize..][..8].try_into().unwrap())
                    );
                }
            }
        }
        host.assert_unchanged(mem, "a Guest memory access");
    }
}
