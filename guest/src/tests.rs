//! `test=NAME[,NAME...]` or `test=all`: the self-tests.
//!
//! Each test checks one promise of the ABI from the Guest's side (the device
//! tests, in tests/devices.rs, one virtio device each), prints
//! `lguest-guest: test NAME ... ok` when it holds, and the run ends with
//! `lguest-guest: all N tests passed` and a power off. The first failure
//! prints `lguest-guest: FAIL NAME: detail` and crashes (ABI section 10), so
//! the Host's exit status tells the story too.
//!
//! Where a test needs an instruction at a known address (a hypercall site, a
//! faulting load), it is written in assembly below, with labels the Rust code
//! finds through `extern` statics.

use core::arch::{asm, global_asm};
use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::pte::PRESENT;
use lguest_abi::{
    hcall as nr, HCALL_RING_SIZE, HCALL_STATUS_FREE, INT_1F_BYTES, OUT_1F_BYTES, SHUTDOWN_POWEROFF,
    VEC_DE, VEC_GP, VEC_NM, VEC_PF, VEC_UD,
};
use lguest_abi::{GUEST_CS, GUEST_DS, PAGE_SHIFT, RED_ZONE, RESERVE_MEM};

use crate::boot::Options;
use crate::cell::GuestCell;
use crate::console::Msg;
use crate::hcall::{self, hcall};
use crate::interrupts::{self, expect_trap, TrapFrame, TrapRecord, SS_SLOT};
use crate::lguest_data::{self, IRQ_ON};
use crate::pagetable;
use crate::println;
use crate::time;
use crate::virtio::Devices;

/// A failed check. What went wrong is in FAILURE, to keep results small.
struct Failed;
type TestResult = Result<(), Failed>;
type Test = fn() -> TestResult;

/// The detail of the last failure, for the FAIL line.
static FAILURE: GuestCell<Msg<200>> = GuestCell::new(Msg::new());

/// Fail the current test with a formatted detail.
macro_rules! fail {
    ($($arg:tt)*) => {{
        FAILURE.write(Msg::from_fmt(format_args!($($arg)*)));
        return Err(Failed);
    }};
}

/// Fail the current test unless `cond` holds.
macro_rules! check {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            fail!($($arg)*);
        }
    };
}

mod devices;

/// The tests, in the order `all` runs them. Later ones may rely on earlier
/// ones' leftovers only where noted (pgtable leaves our own page tables in
/// use, on purpose).
const TESTS: [(&str, Test); 12] = [
    ("hypercall", test_hypercall),
    ("async", test_async),
    ("timer", test_timer),
    ("mask", test_mask),
    ("ud", test_ud),
    ("pf", test_pf),
    ("de", test_de),
    ("pgtable", test_pgtable),
    ("wallclock", test_wallclock),
    ("stack", test_stack),
    ("gdt", test_gdt),
    ("ts", test_ts),
];

/// Run the comma-separated tests in `names` (`all` is every test, and the
/// device tests for the devices there are) and power off, or crash at the
/// first failure.
pub fn run(names: &str, options: &Options) -> ! {
    // If the Host gave no TSC frequency, measure ours now, before any test
    // counts timer interrupts.
    time::tsc_khz();
    // Only read the descriptor page: a device is brought up by its test.
    let mut devs = Devices::scan();
    let mut passed = 0;
    for name in names.split(',').filter(|name| !name.is_empty()) {
        if name == "all" {
            for (name, test) in TESTS {
                run_one(name, test, &devs);
                passed += 1;
            }
            for (name, test, id) in devices::DEVICE_TESTS {
                if devs.has(id) {
                    run_device_test(name, test, &mut devs, options);
                    passed += 1;
                }
            }
            continue;
        }
        if let Some(&(name, test)) = TESTS.iter().find(|(known, _)| *known == name) {
            run_one(name, test, &devs);
        } else if let Some(&(name, test, _)) = devices::DEVICE_TESTS
            .iter()
            .find(|(known, _, _)| *known == name)
        {
            run_device_test(name, test, &mut devs, options);
        } else {
            crate::fail(name, format_args!("unknown test"));
        }
        passed += 1;
    }
    if passed == 0 {
        crate::fail("test", format_args!("no test named in test={names}"));
    }
    println!("lguest-guest: all {passed} tests passed");
    hcall::shutdown(c"self-tests passed", SHUTDOWN_POWEROFF);
}

/// Run one of the ABI tests. They count interrupts and check irq_pending,
/// so devices an earlier test brought up must keep their IRQs to themselves
/// meanwhile: a blocked IRQ is neither delivered nor pending.
fn run_one(name: &str, test: Test, devs: &Devices) {
    let mask = devs.irq_mask();
    let blocked = lguest_data::blocked_interrupts();
    lguest_data::set_blocked_interrupts(blocked | mask);
    let result = test();
    for irq in 0..32 {
        if mask & !blocked & 1 << irq != 0 {
            lguest_data::block_irq(irq, false);
        }
    }
    report(name, result);
}

fn run_device_test(name: &str, test: devices::DeviceTest, devs: &mut Devices, options: &Options) {
    report(name, test(devs, options));
}

fn report(name: &str, result: TestResult) {
    match result {
        Ok(()) => println!("lguest-guest: test {name} ... ok"),
        Err(Failed) => crate::fail(name, format_args!("{}", FAILURE.read().as_str())),
    }
}

/*
 * The assembly the tests need.
 *
 * lguest_probe_hcall(out: *mut [u64; 16]): a SEND_INTERRUPTS with RBX,
 *   RCX, RDX, RSI, RDI, RBP and R8-R15 holding patterns and RFLAGS holding
 *   CF|PF|AF|ZF|SF|OF. Afterwards it stores RAX, those registers and RFLAGS
 *   to out[0..16] (in TrapFrame's order, RFLAGS last), so Rust can check the
 *   Host changed nothing but RAX. The `out` pointer waits on the stack
 *   meanwhile, and is swapped with RDI's pattern at the end. Its `int $0x1f`
 *   is at lguest_probe_hcall_site.
 * lguest_test_ud: a ud2 at lguest_test_ud_site (2 bytes).
 * lguest_probe_read(addr) -> u64: a load at lguest_probe_read_site that may
 *   fault; a #PF handler resumes at lguest_probe_read_resume, with RAX 0.
 * lguest_test_de: a 64-bit division by zero at lguest_test_de_site,
 *   resuming at lguest_test_de_resume.
 * lguest_load_es/fs(selector) -> selector read back, after a `mov` to the
 *   segment register at lguest_load_es/fs_site; if that faults (#GP), the
 *   handler resumes at lguest_load_es/fs_fault, which returns 0xFFFF_FFFF.
 * lguest_test_fnop: an x87 fnop at lguest_test_fnop_site.
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

    .global lguest_test_ud
lguest_test_ud:
    .global lguest_test_ud_site
lguest_test_ud_site:
    ud2
    ret

    .global lguest_probe_read
lguest_probe_read:
    xor eax, eax
    .global lguest_probe_read_site
lguest_probe_read_site:
    mov rax, [rdi]
    .global lguest_probe_read_resume
lguest_probe_read_resume:
    ret

    .global lguest_test_de
lguest_test_de:
    xor ecx, ecx
    mov eax, 1
    xor edx, edx
    .global lguest_test_de_site
lguest_test_de_site:
    div rcx
    .global lguest_test_de_resume
lguest_test_de_resume:
    ret

    .global lguest_load_es
lguest_load_es:
    .global lguest_load_es_site
lguest_load_es_site:
    mov es, di
    mov eax, es
    movzx eax, ax
    ret
    .global lguest_load_es_fault
lguest_load_es_fault:
    mov eax, 0xFFFFFFFF
    ret

    .global lguest_load_fs
lguest_load_fs:
    .global lguest_load_fs_site
lguest_load_fs_site:
    mov fs, di
    mov eax, fs
    movzx eax, ax
    ret
    .global lguest_load_fs_fault
lguest_load_fs_fault:
    mov eax, 0xFFFFFFFF
    ret

    .global lguest_test_fnop
lguest_test_fnop:
    .global lguest_test_fnop_site
lguest_test_fnop_site:
    fnop
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
    fn lguest_test_ud();
    static lguest_test_ud_site: u8;
    fn lguest_probe_read(addr: u64) -> u64;
    static lguest_probe_read_site: u8;
    static lguest_probe_read_resume: u8;
    fn lguest_test_de();
    static lguest_test_de_site: u8;
    static lguest_test_de_resume: u8;
    fn lguest_load_es(selector: u64) -> u64;
    static lguest_load_es_site: u8;
    static lguest_load_es_fault: u8;
    fn lguest_load_fs(selector: u64) -> u64;
    static lguest_load_fs_site: u8;
    static lguest_load_fs_fault: u8;
    fn lguest_test_fnop();
    static lguest_test_fnop_site: u8;
}

/// An assembly label's address.
fn addr<T>(label: *const T) -> u64 {
    label as u64
}

/// Where the Host must put SS for a trap that interrupted RSP `rsp` on the
/// same stack: below the red zone, 16-byte aligned, then one word down.
fn ss_slot_below(rsp: u64) -> u64 {
    ((rsp - RED_ZONE) & !15) - 8
}

/// Check the parts of a trap frame every delivery shares.
fn check_frame(what: &str, rec: &TrapRecord) -> TestResult {
    check!(
        rec.cs == GUEST_CS as u64 && rec.ss == GUEST_DS as u64,
        "{what}: frame has CS {:#x} SS {:#x}, expected {:#x} {:#x}",
        rec.cs,
        rec.ss,
        GUEST_CS,
        GUEST_DS
    );
    Ok(())
}

/*
 * hypercall: the calling convention itself.
 */
fn test_hypercall() -> TestResult {
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

    let now = hcall::get_wallclock();
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

fn test_async() -> TestResult {
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

    hcall::load_tls(0, 0);
    Ok(())
}

/*
 * timer: SET_CLOCKEVENT and HALT.
 */

/// Microseconds in `cycles`, or None when the Host gave no TSC frequency
/// (then our own figure is only an upper bound and can't judge earliness).
fn host_us(cycles: u64) -> Option<u64> {
    match lguest_data::tsc_khz() as u64 {
        0 => None,
        khz => Some((cycles as u128 * 1000 / khz as u128) as u64),
    }
}

/// Our TSC and the Host's clock may disagree by a hair: allow 1%.
fn early(us: u64, deadline_us: u64) -> bool {
    us * 100 < deadline_us * 99
}

fn test_timer() -> TestResult {
    // It fires, through an interrupt gate, and not early.
    let before = time::ticks();
    let start = time::rdtsc();
    hcall::set_clockevent(2_000_000);
    time::wait_for_ticks(before + 1);
    let tick = time::last_tick();
    check!(
        time::ticks() == before + 1,
        "{} timer interrupts for one event",
        time::ticks() - before
    );
    if let Some(us) = host_us(tick.tsc - start) {
        check!(!early(us, 2000), "a 2 ms timer fired after {us} us");
    }
    check!(
        tick.irq_enabled == 0,
        "irq_enabled was {:#x} in the timer handler (an interrupt gate must clear it)",
        tick.irq_enabled
    );
    check!(
        tick.rflags & IRQ_ON as u64 != 0,
        "the timer frame's RFLAGS {:#x} lacks IF, but HALT wakes with interrupts on",
        tick.rflags
    );
    check!(
        lguest_data::irq_enabled() == IRQ_ON,
        "irq_enabled is {:#x} after the handler returned",
        lguest_data::irq_enabled()
    );

    // Re-arming replaces: a 2 ms event re-armed to 20 ms fires once, late.
    let before = time::ticks();
    let start = time::rdtsc();
    hcall::set_clockevent(2_000_000);
    hcall::set_clockevent(20_000_000);
    time::wait_for_ticks(before + 1);
    if let Some(us) = host_us(time::last_tick().tsc - start) {
        check!(
            !early(us, 20_000),
            "a timer re-armed to 20 ms fired after {us} us"
        );
    }

    // Zero cancels.
    let before = time::ticks();
    hcall::set_clockevent(5_000_000);
    hcall::set_clockevent(0);
    time::busy_wait_us(20_000);
    hcall::send_interrupts();
    check!(time::ticks() == before, "a cancelled timer fired");
    Ok(())
}

/*
 * mask: blocked_interrupts and irq_enabled, and irq_pending telling us what
 * they held back.
 */

/// Wait up to a second for the tick count to pass `before`, poking the Host
/// with SEND_INTERRUPTS; true if it did.
fn tick_arrives(before: u64) -> bool {
    for _ in 0..1000 {
        if time::ticks() > before {
            return true;
        }
        hcall::send_interrupts();
        time::busy_wait_us(1000);
    }
    time::ticks() > before
}

fn test_mask() -> TestResult {
    let timer = lguest_abi::TIMER_IRQ;

    // (a) A blocked IRQ isn't delivered, nor even pending.
    let before = time::ticks();
    lguest_data::block_irq(timer, true);
    hcall::set_clockevent(1_000_000);
    time::busy_wait_us(10_000);
    hcall::send_interrupts();
    let ticks = time::ticks();
    let pending = lguest_data::irq_pending();
    lguest_data::block_irq(timer, false);
    check!(ticks == before, "the timer was delivered while blocked");
    check!(
        pending == 0,
        "irq_pending is {pending:#x} for a blocked IRQ"
    );
    hcall::send_interrupts();
    check!(
        tick_arrives(before),
        "the timer never came after it was unblocked"
    );

    // (b) With interrupts off it waits, and irq_pending says so.
    let before = time::ticks();
    lguest_data::irq_disable();
    hcall::set_clockevent(1_000_000);
    for _ in 0..10 {
        time::busy_wait_us(1000);
        hcall::get_wallclock();
    }
    // A slow Host may take longer to see it: keep asking, for up to 1 s.
    let mut polls = 0;
    while lguest_data::irq_pending() != IRQ_ON && polls < 1000 {
        time::busy_wait_us(1000);
        hcall::get_wallclock();
        polls += 1;
    }
    let ticks = time::ticks();
    let pending = lguest_data::irq_pending();
    lguest_data::set_irq_enabled(IRQ_ON);
    compiler_fence(Ordering::SeqCst);
    hcall::send_interrupts();
    let delivered = time::ticks() > before;
    let pending_after = lguest_data::irq_pending();
    check!(
        ticks == before,
        "the timer was delivered with interrupts off"
    );
    check!(
        pending == IRQ_ON,
        "irq_pending is {pending:#x} with the timer held back by irq_enabled = 0"
    );
    check!(
        delivered,
        "SEND_INTERRUPTS did not deliver the pending timer"
    );
    check!(
        pending_after == 0,
        "irq_pending is still {pending_after:#x} after the delivery"
    );
    Ok(())
}

/*
 * ud, pf, de: traps reach our handlers, with the frame ABI section 6 says.
 */

/// Run the ud2 at lguest_test_ud_site. Only call it with a #UD handler that
/// moves RIP past it (expect_trap does).
fn ud2() {
    // SAFETY: the ud2 traps to the handler, which resumes past it; the
    // function is otherwise a bare `ret`.
    unsafe { lguest_test_ud() }
}

fn test_ud() -> TestResult {
    let site = addr(&raw const lguest_test_ud_site);
    let rec = expect_trap(VEC_UD, site, site + 2, None, ud2);
    check!(rec.hits == 1, "the #UD handler ran {} times", rec.hits);
    check!(
        rec.rip == site,
        "#UD at {:#x}, expected {:#x}",
        rec.rip,
        site
    );
    check_frame("#UD", &rec)?;
    check!(
        rec.rflags & IRQ_ON as u64 != 0,
        "#UD frame's RFLAGS {:#x} lacks IF, but interrupts were on",
        rec.rflags
    );
    check!(
        rec.irq_enabled == IRQ_ON,
        "irq_enabled was {:#x} in a trap gate's handler, expected it left on",
        rec.irq_enabled
    );
    check!(
        rec.frame + SS_SLOT == ss_slot_below(rec.rsp),
        "#UD frame at {:#x} for RSP {:#x}: SS should be at {:#x}, not {:#x}",
        rec.frame,
        rec.rsp,
        ss_slot_below(rec.rsp),
        rec.frame + SS_SLOT
    );

    // With interrupts off: the frame's IF is clear, and the return path puts
    // irq_enabled back to off.
    lguest_data::irq_disable();
    let rec = expect_trap(VEC_UD, site, site + 2, None, ud2);
    let after = lguest_data::irq_enabled();
    lguest_data::irq_enable();
    check!(
        rec.hits == 1,
        "the #UD handler ran {} times with interrupts off",
        rec.hits
    );
    check!(
        rec.rflags & IRQ_ON as u64 == 0,
        "#UD frame's RFLAGS {:#x} has IF, but interrupts were off",
        rec.rflags
    );
    check!(
        after == 0,
        "irq_enabled is {after:#x} after returning to code that had it off"
    );
    Ok(())
}

/// Read `addr`, catching a #PF: the value, and the record (hits 0 if no
/// fault).
fn probe_read(addr_to_read: u64) -> (u64, TrapRecord) {
    let site = addr(&raw const lguest_probe_read_site);
    let resume = addr(&raw const lguest_probe_read_resume);
    let mut value = 0;
    let rec = expect_trap(VEC_PF, site, resume, None, || {
        // SAFETY: the load either works or faults into the handler, which
        // resumes after it; it reads nothing Rust owns mutably.
        value = unsafe { lguest_probe_read(addr_to_read) }
    });
    (value, rec)
}

/// Check `rec` is a not-present user read fault at `at`.
fn check_not_present(what: &str, rec: &TrapRecord, at: u64) -> TestResult {
    check!(
        rec.hits == 1,
        "{what}: the #PF handler ran {} times",
        rec.hits
    );
    check!(
        rec.cr2 == at,
        "{what}: lguest_data.cr2 is {:#x}, expected {at:#x}",
        rec.cr2
    );
    check!(
        rec.error & 4 != 0 && rec.error & 3 == 0,
        "{what}: #PF error code {:#x}, expected user (4) read (not 2) of a not-present page (not 1)",
        rec.error
    );
    Ok(())
}

fn test_pf() -> TestResult {
    const UNMAPPED: u64 = 0x0000_7000_0000_0000;
    let (_, rec) = probe_read(UNMAPPED);
    check_not_present("read of an unmapped address", &rec, UNMAPPED)?;
    check!(
        rec.rip == addr(&raw const lguest_probe_read_site),
        "#PF at {:#x}, expected the load at {:#x}",
        rec.rip,
        addr(&raw const lguest_probe_read_site)
    );
    check_frame("#PF", &rec)?;
    // The error code is the word below RIP: a missing one shifts the frame.
    check!(
        rec.frame + SS_SLOT == ss_slot_below(rec.rsp),
        "#PF frame at {:#x} for RSP {:#x}: SS should be at {:#x}",
        rec.frame,
        rec.rsp,
        ss_slot_below(rec.rsp)
    );
    Ok(())
}

/// Run the division by zero at lguest_test_de_site. Only call it with a #DE
/// handler that resumes at lguest_test_de_resume (expect_trap does).
fn divide_by_zero() {
    // SAFETY: the division traps to the handler, which resumes after it; the
    // function only uses scratch registers.
    unsafe { lguest_test_de() }
}

fn test_de() -> TestResult {
    let site = addr(&raw const lguest_test_de_site);
    let resume = addr(&raw const lguest_test_de_resume);
    let rec = expect_trap(VEC_DE, site, resume, None, divide_by_zero);
    check!(rec.hits == 1, "the #DE handler ran {} times", rec.hits);
    check!(
        rec.rip == site,
        "#DE at {:#x}, expected {:#x}",
        rec.rip,
        site
    );
    check_frame("#DE", &rec)?;
    Ok(())
}

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

fn test_pgtable() -> TestResult {
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

/*
 * wallclock: GET_WALLCLOCK, lguest_data's time, tsc_khz.
 */
fn test_wallclock() -> TestResult {
    // time_sec is written at every delivery: take one, so it is fresh.
    let before = time::ticks();
    hcall::set_clockevent(100_000);
    time::wait_for_ticks(before + 1);
    let sec = lguest_data::time_sec();
    let nsec = lguest_data::time_nsec();
    let wall = hcall::get_wallclock();
    check!(sec > 1_600_000_000, "lguest_data.time_sec is {sec}");
    check!(nsec < 1_000_000_000, "lguest_data.time_nsec is {nsec}");
    check!(
        wall.abs_diff(sec) <= 2,
        "GET_WALLCLOCK says {wall}, lguest_data.time_sec {sec}"
    );
    let khz = lguest_data::tsc_khz();
    check!(
        khz == 0 || (100_000..=20_000_000).contains(&khz),
        "tsc_khz is {khz}, not a plausible TSC frequency"
    );
    Ok(())
}

/*
 * stack: SET_STACK moves where the Host delivers.
 */

/// The #DE frame nested inside the stack test's #UD handler.
static NESTED: GuestCell<TrapRecord> = GuestCell::new(TrapRecord::NONE);

/// Run inside the #UD handler, on the alternate stack: take a #DE there.
fn nested_de(_frame: &mut TrapFrame) {
    let site = addr(&raw const lguest_test_de_site);
    let resume = addr(&raw const lguest_test_de_resume);
    NESTED.write(expect_trap(VEC_DE, site, resume, None, divide_by_zero));
}

fn test_stack() -> TestResult {
    let top = interrupts::alt_stack_top();
    let pages = interrupts::ALT_STACK_PAGES;
    let bottom = top - pages * 4096;
    // SAFETY: the stack is ours and unused; the Host only pushes frames on it.
    unsafe { hcall(nr::SET_STACK, GUEST_DS as u64, top, pages, 0) };

    let site = addr(&raw const lguest_test_ud_site);
    NESTED.write(TrapRecord::NONE);
    let rec = expect_trap(VEC_UD, site, site + 2, Some(nested_de), ud2);
    let nested = NESTED.read();

    // SAFETY: turning SET_STACK off is always fine.
    unsafe { hcall(nr::SET_STACK, GUEST_DS as u64, 0, 0, 0) };
    let rec_off = expect_trap(VEC_UD, site, site + 2, None, ud2);

    check!(rec.hits == 1, "the #UD handler ran {} times", rec.hits);
    check_frame("#UD on the SET_STACK stack", &rec)?;
    check!(
        rec.frame + SS_SLOT == top - 8,
        "#UD frame at {:#x}: with SET_STACK({top:#x}) SS should be at {:#x}",
        rec.frame,
        top - 8
    );
    check!(
        !(bottom..=top).contains(&rec.rsp),
        "the interrupted RSP {:#x} was already on the SET_STACK stack",
        rec.rsp
    );
    check!(
        nested.hits == 1,
        "the nested #DE handler ran {} times",
        nested.hits
    );
    check!(
        nested.rsp > bottom && nested.rsp <= top,
        "the nested #DE interrupted RSP {:#x}, not on the SET_STACK stack",
        nested.rsp
    );
    check!(
        nested.frame + SS_SLOT == ss_slot_below(nested.rsp),
        "nested #DE frame at {:#x} for RSP {:#x}: SS should be at {:#x}",
        nested.frame,
        nested.rsp,
        ss_slot_below(nested.rsp)
    );
    check!(
        rec_off.hits == 1,
        "the #UD handler ran {} times after SET_STACK off",
        rec_off.hits
    );
    check!(
        rec_off.frame + SS_SLOT == ss_slot_below(rec_off.rsp),
        "#UD frame at {:#x} after SET_STACK off, for RSP {:#x}: SS should be at {:#x}",
        rec_off.frame,
        rec_off.rsp,
        ss_slot_below(rec_off.rsp)
    );
    Ok(())
}

/*
 * gdt: our GDT entries 10-31.
 *
 * A selector whose descriptor is missing or unusable raises #GP when loaded,
 * so whether a load faults tells us what the Host put in the GDT. After a
 * load that didn't fault the register should read back the selector. On PVM
 * (the KVM of MACHINE-FACTS.md) it doesn't: ring-3 code runs on PVM's own
 * GDT, so PVM emulates the load, faulting or not as our descriptor says, but
 * leaves the register as it was. We accept that, and only that, instead.
 */

/// A flat ring-3 data segment: present, DPL 3, writable, 4 GiB.
const DATA_DPL3: u64 = 0x00CF_F200_0000_FFFF;
/// The same at DPL 0: the Host must make it DPL 3.
const DATA_DPL0: u64 = 0x00CF_9200_0000_FFFF;

/// A table for LOAD_GDT: 0-9 are the Host's (it skips them), 10 and 11 ours.
static GDT_TABLE: [u64; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, DATA_DPL3, DATA_DPL0];

#[derive(Clone, Copy)]
enum Seg {
    Es,
    Fs,
}

impl Seg {
    fn name(self) -> &'static str {
        match self {
            Seg::Es => "ES",
            Seg::Fs => "FS",
        }
    }

    /// The selector in the register now.
    fn read(self) -> u64 {
        let value: u64;
        // SAFETY: reading a segment register has no effect.
        unsafe {
            match self {
                Seg::Es => {
                    asm!("mov {0:e}, es", out(reg) value, options(nomem, nostack, preserves_flags))
                }
                Seg::Fs => {
                    asm!("mov {0:e}, fs", out(reg) value, options(nomem, nostack, preserves_flags))
                }
            }
        }
        value & 0xFFFF
    }

    /// Load `selector`: Ok(what the register then reads) or Err(the #GP's
    /// error code).
    fn load(self, selector: u16) -> Result<u64, u64> {
        let (site, resume) = match self {
            Seg::Es => (
                addr(&raw const lguest_load_es_site),
                addr(&raw const lguest_load_es_fault),
            ),
            Seg::Fs => (
                addr(&raw const lguest_load_fs_site),
                addr(&raw const lguest_load_fs_fault),
            ),
        };
        let mut value = 0;
        let rec = expect_trap(VEC_GP, site, resume, None, || {
            // SAFETY: the load works or raises #GP, which the handler
            // catches. Nothing in Rust uses ES; FS only the async test,
            // through LOAD_TLS (a load resets FS's base to the descriptor's).
            value = unsafe {
                match self {
                    Seg::Es => lguest_load_es(selector as u64),
                    Seg::Fs => lguest_load_fs(selector as u64),
                }
            }
        });
        if rec.hits == 0 {
            Ok(value)
        } else {
            Err(rec.error)
        }
    }
}

/// Check `selector` loads into `seg` (`what` says why it should).
fn check_loads(seg: Seg, selector: u16, what: &str) -> TestResult {
    let before = seg.read();
    match seg.load(selector) {
        Err(error) => fail!(
            "loading {selector:#x} ({what}) into {} raised #GP({error:#x})",
            seg.name()
        ),
        // The second case is PVM's, see above.
        Ok(now) if now == selector as u64 || now == before => Ok(()),
        Ok(now) => fail!(
            "{} reads {now:#x} after loading {selector:#x} ({what})",
            seg.name()
        ),
    }
}

/// Check loading `selector` into ES raises #GP with the selector as error.
fn check_faults(selector: u16, what: &str) -> TestResult {
    match Seg::Es.load(selector) {
        Ok(now) => fail!("loading {selector:#x} ({what}) worked: ES reads {now:#x}"),
        Err(error) => check!(
            error & 0xFFF8 == selector as u64 & 0xFFF8,
            "loading {selector:#x} ({what}): #GP error code {error:#x}, expected the selector"
        ),
    }
    Ok(())
}

/// LOAD_GDT with the first `count` entries of GDT_TABLE.
fn load_gdt(count: usize) {
    assert!(count <= GDT_TABLE.len());
    // SAFETY: ES and FS hold 0x2B, a Host entry, whenever we change ours;
    // nothing else uses our entries.
    unsafe { hcall(nr::LOAD_GDT, GDT_TABLE.as_ptr() as u64, count as u64, 0, 0) };
}

/// LOAD_GDT_ENTRY.
fn load_gdt_entry(index: u64, descriptor: u64) {
    // SAFETY: as for load_gdt.
    unsafe { hcall(nr::LOAD_GDT_ENTRY, index, descriptor, 0, 0) };
}

fn test_gdt() -> TestResult {
    // LOAD_GDT with 10 entries: none of ours, so 10-31 are all cleared.
    load_gdt(10);
    check_faults(0x53, "GDT entry 10, cleared by LOAD_GDT of 10 entries")?;

    // One entry.
    load_gdt_entry(10, DATA_DPL3);
    check_loads(Seg::Es, 0x53, "GDT entry 10 from LOAD_GDT_ENTRY")?;
    check_loads(Seg::Fs, 0x53, "GDT entry 10 from LOAD_GDT_ENTRY")?;
    check_loads(Seg::Es, GUEST_DS, "the Guest data selector")?;
    check_loads(Seg::Fs, GUEST_DS, "the Guest data selector")?;

    // A whole table of 12: entries 10 and 11 come from it (11 at DPL 0,
    // which the Host must raise to 3), and 12, loaded now, must be cleared.
    load_gdt_entry(12, DATA_DPL3);
    load_gdt(GDT_TABLE.len());
    check_loads(Seg::Es, 0x5B, "GDT entry 11, DPL 0 in the LOAD_GDT table")?;
    check_loads(Seg::Es, 0x53, "GDT entry 10 from LOAD_GDT")?;
    check_faults(0x63, "GDT entry 12, past LOAD_GDT's 12 entries")?;

    check_loads(Seg::Es, GUEST_DS, "the Guest data selector")?;
    check_loads(Seg::Fs, GUEST_DS, "the Guest data selector")?;
    Ok(())
}

/*
 * ts: CR0.TS and #NM.
 */

/// The #NM handler's fix: clear TS so the fnop can run when retried.
fn clear_ts(_frame: &mut TrapFrame) {
    hcall::set_ts(false);
}

/// Run the fnop at lguest_test_fnop_site. With CR0.TS set, only call it with
/// a #NM handler (expect_trap's) that clears TS and retries, or skips it.
fn fnop() {
    // SAFETY: an x87 no-op, or a #NM its handler deals with. The Rust code
    // is soft-float, so there is no x87 state of ours to disturb.
    unsafe { lguest_test_fnop() }
}

/// CR0's low 16 bits: `smsw` is one of the few ways ring 3 may look at CR0.
fn smsw() -> u64 {
    let msw: u64;
    // SAFETY: smsw only reads the machine status word into a register.
    unsafe { core::arch::asm!("smsw {}", out(reg) msw, options(nomem, nostack)) };
    msw & 0xFFFF
}

fn test_ts() -> TestResult {
    const TS: u64 = lguest_abi::CR0_TS;
    let site = addr(&raw const lguest_test_fnop_site);
    hcall::set_ts(true);
    check!(
        smsw() & TS != 0,
        "CR0.TS clear after TS(1): MSW {:#x}",
        smsw()
    );
    let rec = expect_trap(VEC_NM, site, site, Some(clear_ts), fnop);
    if rec.hits == 0 {
        // The Host did set CR0.TS (smsw shows it), but this KVM runs ring-3
        // x87 code without honouring it (a software KVM using the host's
        // eager FPU does). Nothing a Guest or Host can change: say so.
        println!("lguest-guest: note: this KVM does not raise #NM for CR0.TS in ring 3");
        hcall::set_ts(false);
    } else {
        check!(
            rec.hits == 1,
            "the #NM handler ran {} times with TS set",
            rec.hits
        );
        check!(
            rec.rip == site,
            "#NM at {:#x}, expected {:#x}",
            rec.rip,
            site
        );
        check_frame("#NM", &rec)?;
    }
    check!(
        smsw() & TS == 0,
        "CR0.TS still set after TS(0): MSW {:#x}",
        smsw()
    );

    hcall::set_ts(false);
    let rec = expect_trap(VEC_NM, site, site + 2, None, fnop);
    check!(rec.hits == 0, "fnop raised #NM with TS clear");
    Ok(())
}
