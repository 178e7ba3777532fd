//! Sudden Death: a Guest that breaks the ABI is stopped for good, never
//! answered with an error (ABI section 4).
//!
//! The reference Guest breaks it on purpose when its command line says
//! `bad=CASE`. For each case the Launcher must exit 1 and print exactly one
//! line, `lguest: guest killed: <reason>`, whose reason names what the Guest
//! did wrong.

#[macro_use]
mod common;

use common::*;

/// Boots the bundled Guest with `bad=CASE` and checks that the Host killed it
/// with a reason containing `why`.
fn killed(case: &str, why: &str) {
    let out = run(lguest().args(["--append", &format!("bad={case}")]));
    out.assert_no_panic().assert_code(1);
    let line = out.single_stderr_line("lguest: guest killed: ");
    let reason = &line["lguest: guest killed: ".len()..];
    assert!(
        reason.contains(why),
        "bad={case}: expected the reason to contain {why:?}, got {reason:?}\n{}",
        out.describe()
    );
    // The Guest must not get past the point where it broke the rules.
    assert!(
        !out.stdout.contains("tests passed"),
        "bad={case}: the Guest went on after Sudden Death\n{}",
        out.describe()
    );
}

macro_rules! sudden_death {
    ($($test:ident: $case:literal => $why:literal,)*) => {
        $(
            #[test]
            fn $test() {
                require_kvm!();
                killed($case, $why);
            }
        )*
    };
}

sudden_death! {
    // A hypercall number the ABI does not have.
    bad_hypercall_number: "hypercall" => "Bad hypercall 99",
    // Any hypercall before LGUEST_INIT.
    hypercall_before_init: "before-init" => "before LGUEST_INIT",
    init_twice: "init-twice" => "LGUEST_INIT twice",
    // A physical address argument past pfn_limit.
    address_outside_guest_memory: "address" => "outside guest memory",
    // NOTIFY of an address that is neither a ring, a descriptor nor text.
    bad_notify: "notify" => "Bad NOTIFY",
    // Only interrupt (0xE) and trap (0xF) gates may be loaded.
    idt_gate_type: "idt-type" => "bad IDT gate type 5",
    idt_vector_out_of_range: "idt-vector" => "bad IDT vector 300",
    // HALT may not go through the async ring.
    queued_halt: "queued-halt" => "cannot queue HALT",
    // #UD with no gate loaded for it.
    unhandled_trap: "trap" => "unhandled trap 6 at",
    // The Host's pages (IDT, GDT, TSS, page tables) are read-only.
    write_to_host_page: "host-write" => "write to Host page",
    // NEW_PGTABLE with a PML4 whose slot 511 is not the Host's entry.
    pml4_slot_511: "pgd511" => "slot 511",
    // ABI 1.1: a store into the live PML4 changes nothing until SET_PGD.
    // A forged slot 511 (its own IDT sending #UD to Guest code at CPL 0)
    // is never walked: the #UD finds no gate, and no Guest code ran in
    // ring 0 (it would have said "ran at CPL 0" and crashed instead).
    pml4_live_slot_511: "pml4-511" => "unhandled trap 6 at",
    // Nor is an upper-half slot filled after NEW_PGTABLE.
    pml4_live_upper_slot: "pml4-upper" => "cr2 0xffff960000001000",
    // Only `out` is a hypercall: `rep outsb` to port 0x1F ends the Guest.
    hcall_string_io: "hcall-outs" => "string I/O",
    stack_selector: "stack" => "SET_STACK: bad selector",
    // LOAD_GDT with a present system (TSS/LDT/gate) descriptor.
    gdt_system_descriptor: "gdt" => "system descriptor",
}
