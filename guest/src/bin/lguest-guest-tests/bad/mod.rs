//! `bad=CASE`: break the ABI on purpose.
//!
//! The Host answers a grossly invalid request not with an error but with
//! Sudden Death: it stops the Guest for good. Each case here does one such
//! thing; if we are still running afterwards, the Host failed, and we say so
//! and crash, so the failure can't be mistaken for a kill.

use core::arch::asm;

use lguest_abi::{hcall as nr, FIRST_EXTERNAL_VECTOR, GATE_INTERRUPT, PAGE_SHIFT};

use lguest_guest::hcall::{self, hcall};
use lguest_guest::{interrupts, lguest_data, println};

use crate::{pagetable, traps};

mod dma;
mod virtio;

/// The Host is still letting us run: report it.
fn still_alive(case: &str) -> ! {
    lguest_guest::fail(
        case_label(case).as_str(),
        format_args!("Host did not kill the Guest"),
    );
}

/// "bad=CASE", for the failure line.
fn case_label(case: &str) -> lguest_guest::console::Msg<64> {
    lguest_guest::console::Msg::from_fmt(format_args!("bad={case}"))
}

/// A hypercall the Host must answer by ending the Guest.
fn deadly(nr: u64, arg1: u64, arg2: u64, arg3: u64) {
    // Every call made through here is one the Host must refuse; should it
    // wrongly go ahead, none touches memory Rust uses (the addresses are the
    // Host's, the GDT entry, IDT gate and stack unused), and we crash after.
    // SAFETY: as just said, the Rust world is left intact either way.
    unsafe { hcall(nr, arg1, arg2, arg3, 0) };
}

/// bad=before-init: a hypercall before LGUEST_INIT. It can't print first:
/// printing is a hypercall too. It is this NOTIFY that must end us.
pub fn before_init() -> ! {
    hcall::notify_str(c"lguest-guest: bad=before-init: this NOTIFY comes before LGUEST_INIT\n");
    // Still here: register properly so we can report it.
    lguest_data::init();
    still_alive("before-init");
}

/// Every other case, after LGUEST_INIT (and after the IDT, but for `trap`).
pub fn run(case: &str) -> ! {
    println!("lguest-guest: bad={case}: breaking the ABI, the Host must end the Guest");
    // The first address the Guest may not touch.
    let limit = lguest_data::pfn_limit() << PAGE_SHIFT;
    // A gate that would be fine but for what each case changes.
    let timer_vector = FIRST_EXTERNAL_VECTOR as u64;
    let stub = interrupts::stub(timer_vector as usize);

    match case {
        "hypercall" => deadly(99, 0, 0, 0),
        "init-twice" => deadly(nr::LGUEST_INIT, lguest_data::ptr() as u64, 0, 0),
        "address" => deadly(nr::LOAD_GDT, limit, 12, 0),
        "notify" => deadly(nr::NOTIFY, limit, 0, 0),
        "idt-type" => {
            // Type 5 is a task gate: long mode has none.
            let (low, high) = interrupts::gate(stub, 5);
            deadly(nr::LOAD_IDT_ENTRY, timer_vector, low, high);
        }
        "idt-vector" => {
            let (low, high) = interrupts::gate(stub, GATE_INTERRUPT);
            deadly(nr::LOAD_IDT_ENTRY, 300, low, high);
        }
        "queued-halt" => {
            // async_hcall won't queue a HALT; queue() takes anything.
            let flags = lguest_data::irq_save();
            // SAFETY: the Host must end us when it meets this HALT; were it
            // to sleep instead, nothing of ours would change. Interrupts
            // are off while we queue.
            let queued = unsafe { hcall::queue(nr::HALT, 0, 0, 0, 0) };
            lguest_data::irq_restore(flags);
            if !queued {
                lguest_guest::fail("bad=queued-halt", format_args!("the async ring is full"));
            }
            hcall::flush_async();
        }
        "trap" => {
            // SAFETY: ud2 only traps; with no IDT entry the Host must end us.
            unsafe { asm!("ud2", options(nomem, nostack)) };
        }
        "host-write" => host_write(limit),
        "pgd511" => {
            if let Err(why) = pagetable::build() {
                lguest_guest::fail("bad=pgd511", format_args!("{why}"));
            }
            // SAFETY: the Host must refuse this PML4; the rest of it is the
            // identity map we run on anyway.
            unsafe {
                pagetable::set_pml4_slot(lguest_abi::HOST_PML4_SLOT, 0);
                pagetable::load();
            }
        }
        "pml4-511" => pml4_511(),
        "pml4-upper" => pml4_upper(),
        "hcall-outs" => hcall_outs(),
        // 0x10 is the Host's ring-0 data selector.
        "stack" => deadly(
            nr::SET_STACK,
            lguest_abi::HOST_DS as u64,
            traps::alt_stack_top(),
            traps::ALT_STACK_PAGES,
        ),
        // A present 64-bit TSS descriptor (type 9): a system descriptor.
        "gdt" => deadly(nr::LOAD_GDT_ENTRY, 10, 0x0000_8900_0000_0067, 0),
        // Broken use of a virtio-mmio window (boot with --transport=mmio).
        "mmio-width" | "mmio-early-ready" | "mmio-queue-addr" => mmio(case, limit),
        // Broken rings, on the console's transmit queue.
        case if virtio::is_virtio_case(case) => virtio::run(case, case_label(case).as_str()),
        // Broken DMA (boot with --transport=dma).
        case if dma::is_dma_case(case) => dma::run(case, case_label(case).as_str()),
        _ => lguest_guest::fail(case_label(case).as_str(), format_args!("unknown bad case")),
    }
    still_alive(case);
}

/// The first virtio-mmio window our command line announces, in Linux's
/// form `virtio_mmio.device=SIZE@BASE:IRQ`.
fn first_mmio_window() -> Option<u64> {
    lguest_guest::boot::cmdline()
        .split_whitespace()
        .find_map(|word| {
            let (_, at) = word.strip_prefix("virtio_mmio.device=")?.split_once('@')?;
            let base = at.split(':').next()?.strip_prefix("0x")?;
            u64::from_str_radix(base, 16).ok()
        })
}

/// bad=mmio-*: break the virtio-mmio register rules on the first window:
/// a 2-byte register read, a queue enabled before FEATURES_OK, or a queue
/// whose descriptor area is past the end of our memory.
fn mmio(case: &str, limit: u64) {
    let Some(base) = first_mmio_window() else {
        lguest_guest::fail(
            case_label(case).as_str(),
            format_args!("no virtio_mmio.device= on the command line (boot with --transport=mmio)"),
        );
    };
    let write = |offset: u64, value: u32| {
        // SAFETY: the window lies below pfn_limit, identity-mapped; a
        // register write is a 32-bit store, which exits to the Host.
        unsafe { core::ptr::write_volatile((base + offset) as *mut u32, value) }
    };
    const ACK_DRIVER: u32 = 1 | 2;
    const FEATURES_OK: u32 = 8;
    match case {
        "mmio-width" => {
            // SAFETY: as above, but 16 bits wide: the Host must refuse it.
            let version = unsafe { core::ptr::read_volatile((base + 0x004) as *const u16) };
            println!("lguest-guest: read version {version} with a 2-byte access");
        }
        "mmio-early-ready" => {
            write(0x070, ACK_DRIVER);
            write(0x030, 0); // QueueSel
            write(0x044, 1); // QueueReady, with no FEATURES_OK yet
        }
        _ => {
            write(0x070, ACK_DRIVER);
            write(0x024, 1); // DriverFeaturesSel: the high word
            write(0x020, 1); // VIRTIO_F_VERSION_1
            write(0x070, ACK_DRIVER | FEATURES_OK);
            write(0x030, 0);
            write(0x038, 256);
            write(0x080, limit as u32); // QueueDescLow/High: past our memory
            write(0x084, (limit >> 32) as u32);
            write(0x044, 1);
        }
    }
}

/// bad=host-write: map the first Host-owned page (at pfn_limit << 12: the
/// Host's IDT, read-only to us) through our alias window, and write to it.
fn host_write(limit: u64) {
    if let Err(why) = pagetable::build() {
        lguest_guest::fail("bad=host-write", format_args!("{why}"));
    }
    // SAFETY: the alias page maps Host memory that no Rust reference points
    // to; the tables are otherwise the identity map we run on.
    unsafe {
        pagetable::set_alias_pte(0, limit | pagetable::PAGE_FLAGS, false);
        pagetable::hook_alias();
        pagetable::load();
    }
    let target = pagetable::alias_addr(0) as *mut u64;
    // SAFETY: the page is mapped (just above); the write is the point.
    unsafe { target.write_volatile(0) };
}

/// Take away our own gate for `vector`, so a trap there is the Host's to
/// judge: Sudden Death, "unhandled trap".
fn drop_gate(vector: u64) {
    // SAFETY: a not-present gate; we only trap there on purpose.
    unsafe { hcall(nr::LOAD_IDT_ENTRY, vector, 0, 0, 0) };
}

#[repr(C, align(4096))]
struct Page([u64; 512]);

static FORGED: lguest_guest::cell::GuestCell<[Page; 4]> = lguest_guest::cell::GuestCell::new([
    Page([0; 512]),
    Page([0; 512]),
    Page([0; 512]),
    Page([0; 512]),
]);

// The "handler" a forged IDT would run at CPL 0: it says so and crashes.
core::arch::global_asm!(
    ".global bad_cpl0_handler",
    "bad_cpl0_handler:",
    "lea {msg}(%rip), %rdx",
    "mov $2, %eax", // SHUTDOWN
    "mov $3, %ebx", // crash
    "out %al, $0x1f",
    "2: jmp 2b",
    msg = sym BAD_CPL0_MSG,
    options(att_syntax)
);
static BAD_CPL0_MSG: [u8; 40] = *b"bad=pml4-511: Guest code ran at CPL 0!\n\0";
extern "C" {
    fn bad_cpl0_handler();
}

/// Reads entry `index` of the page at physical `page` through alias slot
/// `alias` (Host pages are readable to whoever maps them).
fn peek(alias: usize, page: u64, index: usize) -> u64 {
    // SAFETY: the alias maps a read-only view of `page`; nothing of Rust's
    // lives in the alias window.
    unsafe {
        pagetable::set_alias_pte(alias, page | pagetable::PAGE_FLAGS, true);
        ((pagetable::alias_addr(alias) as *const u64).add(index)).read_volatile()
    }
}

/// bad=pml4-511: build our own copy of the Host's slot 511, whose IDT sends
/// #UD to our code at CPL 0, store it into our *live* PML4 with no
/// hypercall, flush, and trap. Under ABI 1.1 the store changes nothing (the
/// CPU walks the Host's top-level page): the #UD finds no gate and the Host
/// ends us. Had the CPU walked our PML4, our handler would run at CPL 0.
fn pml4_511() {
    if let Err(why) = pagetable::build() {
        lguest_guest::fail("bad=pml4-511", format_args!("{why}"));
    }
    // SAFETY: our tables map all our memory, as the Host's did.
    unsafe {
        pagetable::hook_alias();
        pagetable::load();
    }
    const ADDR: u64 = lguest_abi::pte::ADDR_MASK;
    let flags = lguest_abi::pte::PRESENT | lguest_abi::pte::WRITABLE | lguest_abi::pte::ACCESSED;
    let host_pdpt = lguest_data::host_pml4e() & ADDR;
    let host_pd = peek(0, host_pdpt, 0) & ADDR;
    let host_pt = peek(1, host_pd, 0) & ADDR;
    let host_idt = peek(2, host_pt, 0) & ADDR;
    let forged = FORGED.as_ptr() as *mut Page;
    // SAFETY: FORGED is ours and nothing else refers to it; the indices
    // are below 4 and 512.
    unsafe {
        let (pdpt, pd, pt, idt) = (forged, forged.add(1), forged.add(2), forged.add(3));
        for i in 0..512 {
            (*pt).0[i] = peek(2, host_pt, i);
            (*idt).0[i] = peek(3, host_idt, i);
        }
        (*pt).0[0] = idt as u64 | flags | lguest_abi::pte::DIRTY;
        (*pd).0[0] = pt as u64 | flags;
        (*pdpt).0[0] = pd as u64 | flags;
        // Vector 6 (#UD): an interrupt gate to our code, ring-0 selector.
        let handler = bad_cpl0_handler as *const () as u64;
        (*idt).0[12] = (handler & 0xFFFF)
            | (lguest_abi::HOST_CS as u64) << 16
            | 0xE << 40
            | 1 << 47
            | (handler >> 16 & 0xFFFF) << 48;
        (*idt).0[13] = handler >> 32;
        drop_gate(6);
        pagetable::set_pml4_slot(lguest_abi::HOST_PML4_SLOT, pdpt as u64 | flags);
        hcall(nr::FLUSH_TLB, 0, 0, 0, 0);
        asm!("ud2", options(nomem, nostack));
    }
}

/// bad=pml4-upper: fill upper-half slot 300 of our live PML4 with no
/// hypercall (our identity PDPT), flush, and read through it. The store
/// changes nothing: the read faults, finds no #PF gate, and the Host ends
/// us naming the address.
fn pml4_upper() {
    if let Err(why) = pagetable::build() {
        lguest_guest::fail("bad=pml4-upper", format_args!("{why}"));
    }
    // SAFETY: our tables map all our memory, as the Host's did.
    unsafe { pagetable::load() };
    let ident = pagetable::pml4_slot(0);
    let va = 0xFFFF_0000_0000_0000u64 | 300 << 39 | 0x1000;
    drop_gate(14);
    // SAFETY: slot 300 is upper half: whatever happens, nothing of ours
    // moves; the read is the point.
    unsafe {
        pagetable::set_pml4_slot(300, ident);
        hcall(nr::FLUSH_TLB, 0, 0, 0, 0);
        let v = (va as *const u64).read_volatile();
        println!("lguest-guest: bad=pml4-upper: read {v:#x} at {va:#x}");
    }
}

/// bad=hcall-outs: `rep outsb` to the hypercall port, asking for a power
/// off. Only `out` is a hypercall; string I/O there ends the Guest.
fn hcall_outs() {
    let byte = [nr::SHUTDOWN as u8];
    // SAFETY: one byte from our own array goes to port 0x1F; should the Host
    // take it as SHUTDOWN it powers us off, which the test sees.
    unsafe {
        // RBX (the second argument) is LLVM's: swap our value in and out.
        asm!(
            "xchg {arg2}, rbx",
            "rep outsb",
            "xchg {arg2}, rbx",
            arg2 = inout(reg) lguest_abi::SHUTDOWN_POWEROFF => _,
            in("dx") lguest_abi::HCALL_PORT,
            inout("rsi") byte.as_ptr() => _,
            inout("rcx") 1u64 => _,
            in("rax") nr::SHUTDOWN,
            options(nostack, readonly)
        );
    }
}
