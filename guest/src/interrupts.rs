//! Interrupts and traps.
//!
//! The Host, not the CPU, delivers to us: it pushes a frame exactly like the
//! CPU would (SS, RSP, RFLAGS, CS, RIP and for some vectors an error code)
//! and jumps to the offset in the gate we loaded for the vector with
//! LOAD_IDT_ENTRY. The IF bit of the pushed RFLAGS is our virtual interrupt
//! flag (irq_enabled) at that moment, and an interrupt gate turns
//! irq_enabled off, just as the CPU clears IF.
//!
//! Every vector gets a small stub that makes the frame look the same (a dummy
//! error code where the CPU pushes none, then the vector number), saves the
//! general registers and calls `dispatch` with a pointer to the lot. The way
//! out is the delicate part, see `lguest_noirq_start` below.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

use lguest_abi::{
    hcall as nr, FIRST_EXTERNAL_VECTOR, GATE_INTERRUPT, GATE_TRAP, GUEST_CS, IGNORED_VECTORS,
    LGUEST_IRQS,
};

use crate::cell::GuestCell;
use crate::hcall;
use crate::lguest_data;
use crate::time;

/// The vectors we have stubs for: the 32 CPU traps and the 32 IRQs.
pub const VECTORS: usize = 64;

/// What the stubs leave on the stack for `dispatch`, lowest address first:
/// the registers they pushed, then the vector and error code, then the frame
/// the Host built.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    /// RAX, RBX, RCX, RDX, RSI, RDI, RBP and R8 to R15, in that order.
    pub regs: [u64; 15],
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors that have none.
    pub error: u64,
    /// The interrupted context: change `rip` to resume somewhere else.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/*G:240 The stubs. `.irp` stamps one out per vector. For the vectors where the CPU
 * pushes an error code (8, 10-14, 17, 21) the Host pushes one too; for the
 * rest we push a 0 so that every frame has the same shape. A table of their
 * addresses follows, for the IDT.
 *
 * The common path saves every general register (we interrupted arbitrary
 * code, which expects them all back), passes the frame to `dispatch`, and
 * restores them. `dispatch` follows the C calling convention, which wants a
 * 16-byte aligned stack at the call; the Host aligned its frame, so we would
 * be aligned anyway, but we make sure rather than count.
 *
 * Then the way out. `iretq` pops RIP, CS, RFLAGS, RSP and SS, but from ring 3
 * it cannot change the real interrupt flag, and the real one isn't ours
 * anyway: we must copy the frame's IF bit back into irq_enabled ourselves.
 * Once irq_enabled is on, the Host may interrupt us again, and if it did so
 * before the iretq it would push a new frame on top of this one and we could
 * recurse without bound. So the store and the iretq sit between
 * lguest_noirq_start and lguest_noirq_end, whose addresses we gave the Host
 * in lguest_data: it never delivers while RIP is in there. This is lguest's
 * lguest_iret, moved to 64 bits.
 */
global_asm!(
    r#"
    .section .text.lguest_entry, "ax"

    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
    .balign 16
lguest_vector_\vec:
    .if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21)
    .else
    push 0
    .endif
    push \vec
    jmp lguest_trap_common
    .endr

    .balign 16
lguest_trap_common:
    .irp reg, r15,r14,r13,r12,r11,r10,r9,r8,rbp,rdi,rsi,rdx,rcx,rbx,rax
    push \reg
    .endr
    mov rdi, rsp
    mov rbx, rsp
    and rsp, -16
    call {dispatch}
    mov rsp, rbx
    .irp reg, rax,rbx,rcx,rdx,rsi,rdi,rbp,r8,r9,r10,r11,r12,r13,r14,r15
    pop \reg
    .endr
    add rsp, 16
    push rax
    mov rax, [rsp + 24]
    and eax, 0x200
    .global lguest_noirq_start
lguest_noirq_start:
    mov dword ptr [rip + {lguest_data}], eax
    pop rax
    iretq
    .global lguest_noirq_end
lguest_noirq_end:

    .section .rodata.lguest_vector_table, "a"
    .balign 8
    .global lguest_vector_table
lguest_vector_table:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
    .quad lguest_vector_\vec
    .endr
"#,
    dispatch = sym dispatch,
    lguest_data = sym lguest_data::LGUEST_DATA,
);

extern "C" {
    static lguest_noirq_start: u8;
    static lguest_noirq_end: u8;
    static lguest_vector_table: [u64; VECTORS];
}

/// The window the Host must not deliver in, for lguest_data.
pub fn noirq_window() -> (u64, u64) {
    (
        &raw const lguest_noirq_start as u64,
        &raw const lguest_noirq_end as u64,
    )
}

/// The address of the stub for `vector`.
pub fn stub(vector: usize) -> u64 {
    assert!(vector < VECTORS);
    // SAFETY: the table is VECTORS addresses in .rodata, written by the
    // assembler and never changed.
    unsafe { (&raw const lguest_vector_table[vector]).read() }
}

/// An x86-64 gate descriptor, as two 64-bit halves: the handler's offset
/// split over both, present, DPL 3 and our code selector (the Host ignores
/// those two), and the gate type.
pub fn gate(offset: u64, gate_type: u8) -> (u64, u64) {
    let low = (offset & 0xFFFF)
        | (GUEST_CS as u64) << 16
        | (gate_type as u64 & 0xF) << 40
        | 3 << 45
        | 1 << 47
        | (offset >> 16 & 0xFFFF) << 48;
    (low, offset >> 32)
}

/// Load the IDT: trap gates for the CPU's vectors (a fault doesn't change
/// whether interrupts are on, just as Linux does it) and interrupt gates for
/// the IRQs (their handlers run with interrupts off). Then take the timer
/// and turn interrupts on.
pub fn init() {
    for vector in 0..VECTORS {
        // The Host ignores NMI, #DF, #MC and the hypercall vector: it
        // handles those itself.
        if IGNORED_VECTORS.contains(&(vector as u64)) {
            continue;
        }
        let gate_type = if vector < FIRST_EXTERNAL_VECTOR as usize {
            GATE_TRAP
        } else {
            GATE_INTERRUPT
        };
        let (low, high) = gate(stub(vector), gate_type);
        // Batched through the async ring: one exit for the whole table
        // instead of one per gate.
        // SAFETY: the gate points at our own stub, which handles any vector.
        unsafe { hcall::async_hcall(nr::LOAD_IDT_ENTRY, vector as u64, low, high, 0) };
    }
    hcall::flush_async();
    set_handler(
        FIRST_EXTERNAL_VECTOR + lguest_abi::TIMER_IRQ as u8,
        Some(time::timer_irq),
    );
    lguest_data::irq_enable();
}

/*
 * Handlers. Each vector has at most one, a plain function that gets the
 * frame and may change it. The self-tests install and remove their own.
 *
 * Every IRQ is counted, handler or not, and that is all a device's IRQ
 * needs: its driver looks at its buffers when it wakes from HALT, and any
 * IRQ wakes it. So no handler touches driver state, and the drivers need
 * no locks.
 */

pub type Handler = fn(&mut TrapFrame);

static HANDLERS: [GuestCell<Option<Handler>>; VECTORS] = [const { GuestCell::new(None) }; VECTORS];

static IRQ_COUNTS: [AtomicU32; LGUEST_IRQS as usize] =
    [const { AtomicU32::new(0) }; LGUEST_IRQS as usize];

/// Install `handler` for `vector`; returns the one it replaces.
pub fn set_handler(vector: u8, handler: Option<Handler>) -> Option<Handler> {
    let slot = &HANDLERS[vector as usize];
    let old = slot.read();
    slot.write(handler);
    old
}

/// Interrupts IRQ `irq` has had.
pub fn irq_count(irq: u16) -> u32 {
    IRQ_COUNTS
        .get(irq as usize)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

/// Called by the stubs (and only by them), so `vector` is below VECTORS.
extern "C" fn dispatch(frame: &mut TrapFrame) {
    let vector = frame.vector as usize;
    let irq = vector.checked_sub(FIRST_EXTERNAL_VECTOR as usize);
    if let Some(irq) = irq {
        IRQ_COUNTS[irq].fetch_add(1, Ordering::Relaxed);
    }
    match HANDLERS[vector].read() {
        Some(handler) => handler(frame),
        None if irq.is_some() => {}
        None => panic!(
            "unexpected trap {} at {:#x} (error {:#x}, cr2 {:#x})",
            vector,
            frame.rip,
            frame.error,
            lguest_data::cr2()
        ),
    }
}
