//! The hypercall itself (ABI section 4): its calling convention, the
//! rewrite of `int $0x1f` into `out`, the Host's half of lguest_data, and
//! the async ring (section 4.1).

use core::arch::{asm, global_asm};
use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::pte::PRESENT;
use lguest_abi::{
    hcall as nr, HCALL_RING_SIZE, HCALL_STATUS_FREE, INT_1F_BYTES, OUT_1F_BYTES, PAGE_SHIFT,
    RESERVE_MEM,
};
use lguest_guest::cell::GuestCell;
use lguest_guest::{hcall, lguest_data};

use super::TestResult;
use crate::extras;

/*
 * lguest_probe_hcall(out: *mut [u64; 16]): a SEND_INTERRUPTS with RBX,
 * RCX, RDX, RSI, RDI, RBP and R8-R15 holding patterns and RFLAGS holding
 * CF|PF|AF|ZF|SF|OF. Afterwards it stores RAX, those registers and RFLAGS
 * to out[0..16] (in TrapFrame's order, RFLAGS last), so Rust can check the
 * Host changed nothing but RAX. The `out` pointer waits on the stack
 * meanwhile, and is swapped with RDI's pattern at the end. Its `int $0x1f`
 * is at lguest_probe_hcall_site.
 */
const PROBE_FLAGS: u64 = 0x8D5; // OF | SF | ZF | AF | PF | CF

/// The pattern lguest_probe_hcall puts in out[i] (0 is RAX: no pattern).
const fn pattern(i: u64) -> u64 {
    0x0101_0101_0101_0101 * (i + 0x10)
}

global_asm!(
    r#"
    .section .text.lguest_tests, "ax"

    .global lguest_probe_hcall
lguest_probe_hcall:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rbx, {p1}
    mov rcx, {p2}
    mov rdx, {p3}
    mov rsi, {p4}
    mov rdi, {p5}
    mov rbp, {p6}
    mov r8, {p7}
    mov r9, {p8}
    mov r10, {p9}
    mov r11, {p10}
    mov r12, {p11}
    mov r13, {p12}
    mov r14, {p13}
    mov r15, {p14}
    push {flags}
    popfq
    mov eax, {send_interrupts}
    .global lguest_probe_hcall_site
lguest_probe_hcall_site:
    int 0x1f
    pushfq
    xchg rdi, [rsp + 8]
    mov [rdi + 0], rax
    mov [rdi + 8], rbx
    mov [rdi + 16], rcx
    mov [rdi + 24], rdx
    mov [rdi + 32], rsi
    mov [rdi + 48], rbp
    mov [rdi + 56], r8
    mov [rdi + 64], r9
    mov [rdi + 72], r10
    mov [rdi + 80], r11
    mov [rdi + 88], r12
    mov [rdi + 96], r13
    mov [rdi + 104], r14
    mov [rdi + 112], r15
    pop rax
    mov [rdi + 120], rax
    pop rax
    mov [rdi + 40], rax
    push 0x202
    popfq
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
"#,
    p1 = const pattern(1),
    p2 = const pattern(2),
    p3 = const pattern(3),
    p4 = const pattern(4),
    p5 = const pattern(5),
    p6 = const pattern(6),
    p7 = const pattern(7),
    p8 = const pattern(8),
    p9 = const pattern(9),
    p10 = const pattern(10),
    p11 = const pattern(11),
    p12 = const pattern(12),
    p13 = const pattern(13),
    p14 = const pattern(14),
    flags = const PROBE_FLAGS | 0x202,
    send_interrupts = const nr::SEND_INTERRUPTS,
);

extern "C" {
    fn lguest_probe_hcall(out: *mut [u64; 16]);
    static lguest_probe_hcall_site: [u8; 2];
}

/*
 * hypercall: the calling convention itself.
 */
pub fn test_hypercall() -> TestResult {
    // LGUEST_INIT filled in the Host's half of lguest_data.
    let mem = crate::boot::mem();
    let limit = lguest_data::pfn_limit() << PAGE_SHIFT;
    check!(
        lguest_data::reserve_mem() == RESERVE_MEM,
        "lguest_data.reserve_mem is {:#x}",
        lguest_data::reserve_mem()
    );
    check!(
        mem != 0 && limit > mem,
        "pfn_limit << 12 is {limit:#x}, RAM ends at {mem:#x}"
    );
    check!(
        lguest_data::pgdir() >= limit,
        "lguest_data.pgdir {:#x} is not a Host-owned page (from {limit:#x})",
        lguest_data::pgdir()
    );
    check!(
        lguest_data::host_pml4e() & PRESENT != 0,
        "lguest_data.host_pml4e {:#x} is not present",
        lguest_data::host_pml4e()
    );

    let now = extras::get_wallclock();
    check!(now > 1_600_000_000, "GET_WALLCLOCK returned {now}");
    let r = hcall::send_interrupts();
    check!(r == 0, "SEND_INTERRUPTS returned {r}");
    let r = hcall::flush_async();
    check!(r == 0, "FLUSH_ASYNC returned {r}");

    // One site, called twice: first as `int $0x1f`, after which the Host
    // rewrites it to `out %al, $0x1f`, which the second call uses. Put the
    // `int` back first, in case an earlier run of this test was rewritten.
    let site = (&raw const lguest_probe_hcall_site).cast_mut();
    // SAFETY: our code is mapped writable; nothing runs the site now.
    unsafe { site.write_volatile(INT_1F_BYTES) };
    compiler_fence(Ordering::SeqCst);
    for round in 1..=2 {
        // SAFETY: two bytes of our own code, mapped and readable.
        let before = unsafe { site.read_volatile() };
        let mut out = [0u64; 16];
        // SAFETY: SEND_INTERRUPTS is harmless; `out` is 16 words.
        unsafe { lguest_probe_hcall(&mut out) };
        check!(
            out[0] == 0,
            "call {round}: SEND_INTERRUPTS returned {:#x}",
            out[0]
        );
        for (i, &value) in out.iter().enumerate().take(15).skip(1) {
            check!(
                value == pattern(i as u64),
                "call {round} (site bytes {:02x} {:02x}) changed register #{i}: {value:#x}",
                before[0],
                before[1]
            );
        }
        check!(
            out[15] & PROBE_FLAGS == PROBE_FLAGS,
            "call {round} (site bytes {:02x} {:02x}) changed RFLAGS: {:#x}",
            before[0],
            before[1],
            out[15]
        );
        if round == 1 {
            // SAFETY: as above.
            let after = unsafe { site.read_volatile() };
            check!(
                after == OUT_1F_BYTES,
                "the hypercall site at {:#x} holds {:02x} {:02x} after its first use, expected e6 1f",
                site as u64,
                after[0],
                after[1]
            );
        }
    }
    Ok(())
}

/*
 * async: the hypercall ring of lguest_data (ABI 4.1). LOAD_TLS makes a good
 * witness: after it, fs:[0] reads whatever its FS base points at.
 */

/// Values for the witnesses to point at.
static TLS_WORDS: GuestCell<[u64; 256]> = GuestCell::new([0; 256]);

fn tls_word(i: usize) -> u64 {
    TLS_WORDS.as_ptr() as u64 + (i % 256) as u64 * 8
}

fn tls_value(i: usize) -> u64 {
    0x7E57_0000_0000_0000 | i as u64
}

fn read_fs0() -> u64 {
    let value: u64;
    // SAFETY: reads the word at the FS base, which the test pointed at one
    // of TLS_WORDS.
    unsafe {
        asm!("mov {}, qword ptr fs:[0]", out(reg) value, options(nostack, readonly, preserves_flags))
    };
    value
}

fn read_gs0() -> u64 {
    let value: u64;
    // SAFETY: as read_fs0, for GS.
    unsafe {
        asm!("mov {}, qword ptr gs:[0]", out(reg) value, options(nostack, readonly, preserves_flags))
    };
    value
}

/// Queue LOAD_TLS(fs = &word i, gs = &word j); true if it was queued.
fn queue_tls(i: usize, j: usize) -> bool {
    // SAFETY: LOAD_TLS only moves the FS/GS bases, which nothing but these
    // tests uses.
    unsafe { hcall::async_hcall(nr::LOAD_TLS, tls_word(i), tls_word(j), 0, 0) }
}

fn check_ring_free(when: &str) -> TestResult {
    for slot in 0..HCALL_RING_SIZE {
        let status = lguest_data::hcall_status(slot);
        check!(
            status == HCALL_STATUS_FREE,
            "{when}: ring slot {slot} has status {status:#x}, expected 0xff"
        );
    }
    Ok(())
}

pub fn test_async() -> TestResult {
    let words = TLS_WORDS.as_ptr();
    for i in 0..256 {
        // SAFETY: in bounds; nothing else uses TLS_WORDS now.
        unsafe { (&raw mut (*words)[i]).write_volatile(tls_value(i)) };
    }

    // One call, then FLUSH_ASYNC runs it.
    check!(queue_tls(1, 2), "the first queued call found the ring full");
    let r = hcall::flush_async();
    check!(r == 0, "FLUSH_ASYNC returned {r}");
    check_ring_free("after one call and FLUSH_ASYNC")?;
    check!(
        read_fs0() == tls_value(1) && read_gs0() == tls_value(2),
        "queued LOAD_TLS had no effect: fs:[0] {:#x} gs:[0] {:#x}",
        read_fs0(),
        read_gs0()
    );

    // Three batches of 50: the ring wraps, and the last call of each batch
    // must win (the Host runs them in order).
    let mut n = 10;
    for batch in 0..3 {
        for _ in 0..50 {
            check!(
                queue_tls(n, n + 1),
                "batch {batch}: the ring was full at call {n}"
            );
            n += 1;
        }
        hcall::flush_async();
        check_ring_free("after a batch and FLUSH_ASYNC")?;
        check!(
            read_fs0() == tls_value(n - 1) && read_gs0() == tls_value(n),
            "batch {batch}: fs:[0] {:#x} gs:[0] {:#x}, expected the last call's {:#x} {:#x}",
            read_fs0(),
            read_gs0(),
            tls_value(n - 1),
            tls_value(n)
        );
    }

    // Fill the ring: 64 calls queue, the 65th finds it full and is made
    // directly, which drains the 64 first and then runs last.
    for i in 0..HCALL_RING_SIZE {
        check!(
            queue_tls(200, 200 + i),
            "call {i} of 64 found the ring full"
        );
    }
    check!(
        !queue_tls(199, 198),
        "the 65th call was queued into a full ring"
    );
    check_ring_free("after the 65th, direct, call")?;
    check!(
        read_fs0() == tls_value(199) && read_gs0() == tls_value(198),
        "after a full ring: fs:[0] {:#x} gs:[0] {:#x}, expected the direct call's {:#x} {:#x}",
        read_fs0(),
        read_gs0(),
        tls_value(199),
        tls_value(198)
    );

    extras::load_tls(0, 0);
    Ok(())
}
