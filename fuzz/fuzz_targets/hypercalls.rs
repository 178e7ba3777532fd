//! The hypercalls and the async ring (ABI section 4), as a Guest makes them:
//! a sequence of synchronous calls with any numbers and arguments, over a
//! Guest memory whose lguest_data (async ring included) the input fills.
//! No KVM: the Host's effects on the vCPU go to a `RecordingMachine`.
//!
//! What must hold, whatever the calls: every refusal (Sudden Death) has a
//! reason, and after one the Guest makes no more calls; the Host's pages
//! change only where a hypercall may change them (the Guest's GDT entries
//! 10-31, entries 0-255 of the shadow roots); a shadow root's slot 511 is
//! always the Host's and its upper half empty; CR3 is only ever the initial
//! tables or a shadow root; and Guest memory changes only in lguest_data.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use lguest::host_pages::{self, GDT_PAGE};
use lguest::hypercalls::{Answer, Lguest, RecordingMachine};
use lguest::memory::{GuestMemory, SHADOW_ROOTS};
use lguest_abi::{hcall, lguest_data_off as ld, GDT_FIRST_GUEST_ENTRY, HCALL_RING_SIZE, PAGE_SIZE};
use lguest_fuzz::{assert_changes_within, assert_reason, guest_bytes, reused_memory};
use libfuzzer_sys::fuzz_target;

const RAM_PAGES: u64 = 16;
/// Where the Guest keeps lguest_data (it must lie in RAM).
const DATA: u64 = 0x4000;
const DATA_SIZE: u64 = core::mem::size_of::<lguest_abi::LguestData>() as u64;

#[derive(Arbitrary, Debug)]
struct Call {
    /// Mostly real hypercall numbers, sometimes anything.
    nr: u8,
    raw_nr: Option<u64>,
    args: [u64; 4],
    /// Arguments near interesting addresses instead of at random.
    near: [Option<(u8, i8)>; 4],
    /// Slots of the async ring to queue first: (slot, status, call).
    queued: Vec<(u8, u8, u8, [u64; 4])>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The Guest's memory, before anything (RAM only).
    ram: Vec<(u16, u64)>,
    init_first: bool,
    calls: Vec<Call>,
}

fn anchor(mem: &GuestMemory, which: u8) -> u64 {
    let l = &mem.layout;
    match which % 6 {
        0 => 0,
        1 => DATA,
        2 => l.mem,
        3 => l.guest_limit(),
        4 => l.host_base(),
        _ => l.shadow_root(0),
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(bytes)) else {
        return;
    };
    let pfn_limit = RAM_PAGES + 1;
    // One mapping for every run (RAM comes back cleared); the Host pages
    // and the shadow roots are laid anew, so each run starts the same.
    let mem = reused_memory(
        RAM_PAGES,
        1,
        0,
        host_pages::ro_pages_for(pfn_limit),
        host_pages::STACK_PAGES,
    );
    let tables = host_pages::build(&mem);
    let zero_page = [0u8; PAGE_SIZE as usize];
    for root in 0..SHADOW_ROOTS {
        mem.write_host(shadow_page(&mem, root), 0, &zero_page);
    }
    for (at, v) in input.ram.iter().take(64) {
        let at = (*at as u64 * 8) % (RAM_PAGES * PAGE_SIZE - 8);
        let _ = mem.write_u64(at, *v);
    }
    // A Guest sets every ring slot free before LGUEST_INIT.
    for slot in 0..HCALL_RING_SIZE {
        let _ = mem.write(DATA + (ld::HCALL_STATUS + slot) as u64, &[0xFF]);
    }
    let mut lg = Lguest::new(&mem, &tables);
    let mut m = RecordingMachine::default();
    let host_before = host_snapshot(&mem);
    let ram_before = guest_bytes(&mem);
    let mut first = input.init_first;
    for call in input.calls.iter().take(16) {
        for (slot, status, nr, args) in call.queued.iter().take(8) {
            let slot = *slot as usize % HCALL_RING_SIZE;
            let at = DATA + (ld::HCALLS + slot * 40) as u64;
            let _ = mem.write_u64(at, *nr as u64 % 24);
            for (i, a) in args.iter().enumerate() {
                let _ = mem.write_u64(at + 8 + i as u64 * 8, *a);
            }
            let status = if *status < 200 { 0 } else { *status };
            let _ = mem.write(DATA + (ld::HCALL_STATUS + slot) as u64, &[status]);
        }
        let nr = match (first, call.raw_nr) {
            (true, _) => hcall::LGUEST_INIT,
            (false, Some(raw)) => raw,
            (false, None) => call.nr as u64 % 22,
        };
        let mut args = call.args;
        for (a, near) in args.iter_mut().zip(call.near) {
            if let Some((which, off)) = near {
                *a = anchor(&mem, which).wrapping_add((off as i64 * 8) as u64);
            }
        }
        if first {
            args[0] = DATA;
            first = false;
        }
        let result = lg.hypercall(&mem, &mut m, [nr, args[0], args[1], args[2], args[3]]);
        if let Some(cr3) = m.cr3 {
            let roots: Vec<u64> = (0..SHADOW_ROOTS)
                .map(|i| mem.layout.shadow_root(i))
                .collect();
            assert!(
                cr3 == tables.init_pml4 || roots.contains(&cr3),
                "CR3 {cr3:#x} is neither the initial tables nor a shadow root"
            );
        }
        match result {
            Ok(Answer::Rax(_)) => {}
            // A Guest that asked to stop, or was stopped, makes no more calls.
            Ok(Answer::Shutdown(_)) => break,
            Err(e) => {
                assert_reason(&e.to_string(), "a hypercall");
                break;
            }
        }
    }
    // Guest memory changed only in lguest_data (the Host's fields, the
    // ring, which the Guest writes too); the Host's pages only where a
    // hypercall may write them.
    // (The Guest may have registered lguest_data anywhere in RAM; the
    // target queues its calls at DATA.)
    let mut allowed = vec![(DATA, DATA + DATA_SIZE)];
    allowed.extend(lg.data.map(|d| (d.addr(), d.addr() + DATA_SIZE)));
    assert_changes_within(&ram_before, &guest_bytes(&mem), &allowed, "the hypercalls");
    check_host_pages(&mem, &host_before, tables.host_pml4e);
});

/// The Host's pages, less the two a hypercall may write: the GDT page
/// (entries 10-31) and the shadow roots (entries 0-255).
fn host_snapshot(mem: &GuestMemory) -> Vec<u8> {
    let mut bytes = vec![0u8; (mem.layout.host_pages() * PAGE_SIZE) as usize];
    for (page, chunk) in bytes.chunks_mut(PAGE_SIZE as usize).enumerate() {
        mem.read_host(page as u64, 0, chunk);
    }
    let gdt = (GDT_PAGE * PAGE_SIZE) as usize;
    bytes[gdt + GDT_FIRST_GUEST_ENTRY * 8..gdt + 32 * 8].fill(0);
    bytes
}

fn check_host_pages(mem: &GuestMemory, before: &[u8], host_pml4e: u64) {
    let now = host_snapshot(mem);
    // One memcmp in the common case (a byte loop would be instrumented
    // byte by byte, and cost more than the code under test).
    if before != now.as_slice() {
        let at = before
            .iter()
            .zip(&now)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "a hypercall wrote Host page {} at offset {:#x}",
            at as u64 / PAGE_SIZE,
            at as u64 % PAGE_SIZE
        );
    }
    let mut want = [0u8; 2048];
    want[2040..].copy_from_slice(&host_pml4e.to_le_bytes());
    let mut upper = [0u8; 2048];
    for root in 0..SHADOW_ROOTS {
        mem.read_host(shadow_page(mem, root), 2048, &mut upper);
        assert!(
            upper == want,
            "shadow root {root}'s upper half is not the Host's: {upper:x?}"
        );
    }
}

/// Shadow root `root` as a Host page index (they follow the stub stack).
fn shadow_page(mem: &GuestMemory, root: usize) -> u64 {
    (mem.layout.shadow_root(root) - mem.layout.host_base()) / PAGE_SIZE
}
