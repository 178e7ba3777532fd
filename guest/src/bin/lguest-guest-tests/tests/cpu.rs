//! What the Host keeps of the CPU for us: our GDT entries (LOAD_GDT,
//! LOAD_GDT_ENTRY) and CR0.TS (the TS hypercall).

use core::arch::{asm, global_asm};

use lguest_abi::{hcall as nr, GUEST_DS, VEC_GP, VEC_NM};
use lguest_guest::hcall::hcall;
use lguest_guest::interrupts::TrapFrame;
use lguest_guest::println;

use super::{addr, check_frame, TestResult};
use crate::extras;
use crate::traps::expect_trap;

/*
 * lguest_load_es/fs(selector) -> selector read back, after a `mov` to the
 *   segment register at lguest_load_es/fs_site; if that faults (#GP), the
 *   handler resumes at lguest_load_es/fs_fault, which returns 0xFFFF_FFFF.
 * lguest_test_fnop: an x87 fnop at lguest_test_fnop_site.
 */
global_asm!(
    r#"
    .section .text.lguest_tests, "ax"

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
);

extern "C" {
    fn lguest_load_es(selector: u64) -> u64;
    static lguest_load_es_site: u8;
    static lguest_load_es_fault: u8;
    fn lguest_load_fs(selector: u64) -> u64;
    static lguest_load_fs_site: u8;
    static lguest_load_fs_fault: u8;
    fn lguest_test_fnop();
    static lguest_test_fnop_site: u8;
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

pub fn test_gdt() -> TestResult {
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
    extras::set_ts(false);
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

pub fn test_ts() -> TestResult {
    const TS: u64 = lguest_abi::CR0_TS;
    let site = addr(&raw const lguest_test_fnop_site);
    extras::set_ts(true);
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
        extras::set_ts(false);
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

    extras::set_ts(false);
    let rec = expect_trap(VEC_NM, site, site + 2, None, fnop);
    check!(rec.hits == 0, "fnop raised #NM with TS clear");
    Ok(())
}
