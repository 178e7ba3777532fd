//! `bench=NAME [iters=N]`: time the Host's exits, for `lguest --bench`.
//!
//! Each benchmark runs N times in a loop timed with the TSC, prints one line,
//! `lguest-bench: NAME iters=N cycles=C tsc_khz=K`, and powers off. The Host
//! turns cycles into time (K may be 0 if it has no stable TSC figure). The
//! device benchmarks (`blk`, `net`, `echo`) are in devices.rs, the shared
//! network's (`sharenet`, `sharenet-rx`) in sharenet.rs.

use core::arch::{asm, global_asm};

use lguest_abi::{hcall as nr, INT_1F_BYTES, SHUTDOWN_POWEROFF};

use lguest_guest::{hcall, lguest_data, println, time};

mod devices;
mod sharenet;

const DEFAULT_ITERS: u64 = 10_000;

/*
 * One hypercall site for the hcall and ud benchmarks: the number comes in RDI
 * (the C convention's first argument), goes to RAX, and the `int $0x1f` is at
 * a label so we can find its bytes. The arguments are whatever happens to be
 * in the registers: SEND_INTERRUPTS takes none.
 */
global_asm!(
    r#"
    .section .text.lguest_bench, "ax"
    .global lguest_bench_hcall
lguest_bench_hcall:
    mov rax, rdi
    .global lguest_bench_hcall_site
lguest_bench_hcall_site:
    int 0x1f
    ret
"#
);

extern "C" {
    /// Hypercall `nr` through the single bench site; returns RAX.
    fn lguest_bench_hcall(nr: u64) -> u64;
    static lguest_bench_hcall_site: [u8; 2];
}

/// Put `int $0x1f` back at the bench site, undoing the Host's rewrite.
fn reset_site() {
    let site = (&raw const lguest_bench_hcall_site).cast_mut();
    // SAFETY: our code pages are mapped writable (the identity map is), the
    // site is two bytes of an instruction nothing is executing right now,
    // and x86 notices stores to code it is about to run.
    unsafe { site.write_volatile(INT_1F_BYTES) };
}

fn hcall_at_site(nr: u64) {
    // SAFETY: SEND_INTERRUPTS, the only call made here, is harmless; the
    // stub preserves everything the C convention asks for (the Host keeps
    // every register but RAX).
    unsafe { lguest_bench_hcall(nr) };
}

pub fn run(name: &str, iters: Option<&str>) -> ! {
    // The devices' benchmarks count bytes, not exits.
    if matches!(name, "blk" | "net" | "echo") {
        devices::run(name, iters);
    }
    if matches!(name, "sharenet" | "sharenet-rx") {
        sharenet::run(name, iters);
    }
    let iters = match iters {
        None => DEFAULT_ITERS,
        Some(text) => match text.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => lguest_guest::fail("bench", format_args!("bad iters={text}")),
        },
    };
    let start = time::rdtsc();
    match name {
        // A bare I/O exit: port 0x80 means nothing to the Host.
        "out" => {
            for _ in 0..iters {
                // SAFETY: an `out` to an unused port; the Host ignores it.
                unsafe {
                    asm!("out 0x80, al", in("al") 0u8, options(nomem, nostack, preserves_flags))
                };
            }
        }
        // One site: only the first call is an `int`, the Host rewrites it
        // and the rest are `out`s.
        "hcall" => {
            reset_site();
            for _ in 0..iters {
                hcall_at_site(nr::SEND_INTERRUPTS);
            }
        }
        // The same, but every call is an `int`: we undo the rewrite first.
        "ud" => {
            for _ in 0..iters {
                reset_site();
                hcall_at_site(nr::SEND_INTERRUPTS);
            }
        }
        // NEW_PGTABLE back and forth between our tables and the initial
        // ones: the Host has a root ready for each, so no copy is needed.
        "pgtable" => {
            let (ours, initial) = pgtable_setup();
            for i in 0..iters {
                let pml4 = if i % 2 == 0 { initial } else { ours };
                // SAFETY: both tables map all our memory.
                unsafe { hcall::hcall(nr::NEW_PGTABLE, pml4, 0, 0, 0) };
            }
        }
        // SET_PGD of an entry that changes every time: the Host rewrites
        // its root and makes the KVM see it.
        "pgd" => {
            pgtable_setup();
            let alias = crate::pagetable::pml4_slot(0);
            for i in 0..iters {
                // SAFETY: slot 200 maps nothing we use; it alternates
                // between empty and an alias of our identity map.
                unsafe { crate::pagetable::set_pml4_slot(200, if i % 2 == 0 { alias } else { 0 }) };
            }
        }
        _ => lguest_guest::fail("bench", format_args!("unknown benchmark {name}")),
    }
    let cycles = time::rdtsc() - start;
    println!(
        "lguest-bench: {name} iters={iters} cycles={cycles} tsc_khz={}",
        lguest_data::tsc_khz()
    );
    hcall::shutdown(c"benchmark finished", SHUTDOWN_POWEROFF);
}

/// Our own page tables, loaded: (their PML4, the initial one).
fn pgtable_setup() -> (u64, u64) {
    if let Err(why) = crate::pagetable::build() {
        lguest_guest::fail("bench", format_args!("{why}"));
    }
    // SAFETY: our tables map all our memory, as the Host's did.
    unsafe { crate::pagetable::load() };
    (crate::pagetable::pml4(), lguest_data::pgdir())
}
