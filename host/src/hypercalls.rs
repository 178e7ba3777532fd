//! Hypercalls (ABI section 4): what the Guest asks of the Host.
//!
//! A grossly invalid request is never answered with an error: it ends the
//! Guest (Sudden Death), with a reason that says what was wrong. Every
//! physical address a Guest hands us goes through [`GuestMemory::check`].

use crate::interrupts::decode_gate;
use crate::memory::GuestMemory;
use crate::vcpu::{kill, Guest, Stop};
use lguest_abi::{hcall, lguest_data_off as ld, *};

type HResult = Result<u64, Stop>;

/// Ends the Guest if `[addr, addr + len)` is not the Guest's.
fn check(mem: &GuestMemory, call: &str, addr: u64, len: u64) -> Result<(), Stop> {
    mem.check(addr, len)
        .map_err(|e| kill(format!("{call}: {e}")))
}

fn name(nr: u64) -> String {
    hcall::name(nr).map_or_else(|| format!("hypercall {nr}"), str::to_string)
}

/// What a Guest GDT entry becomes: present descriptors get DPL 3 (the Guest
/// runs in ring 3) and Accessed (the CPU can't set it in our read-only GDT);
/// a present system descriptor (a TSS, a gate) is refused.
fn guest_descriptor(desc: u64) -> Result<u64, ()> {
    const PRESENT: u64 = 1 << 47;
    const S: u64 = 1 << 44;
    const DPL3: u64 = 3 << 45;
    const ACCESSED: u64 = 1 << 40;
    match (desc & PRESENT != 0, desc & S != 0) {
        (false, _) => Ok(desc),
        (true, false) => Err(()),
        (true, true) => Ok(desc | DPL3 | ACCESSED),
    }
}

impl Guest {
    /// A synchronous hypercall: drain the async ring, then do it.
    pub(crate) fn hypercall(&mut self, [nr, a1, a2, a3, a4]: [u64; 5]) -> HResult {
        if self.lguest_data.is_none() {
            if nr != hcall::LGUEST_INIT {
                return Err(kill(format!("{} before LGUEST_INIT", name(nr))));
            }
            return self.lguest_init(a1);
        }
        self.drain_async()?;
        self.do_hypercall(nr, a1, a2, a3, a4)
    }

    /// Section 4.1: run the queued calls from our cursor, in order, up to the
    /// first free slot.
    fn drain_async(&mut self) -> Result<(), Stop> {
        let data = self.lguest_data.expect("after LGUEST_INIT");
        for _ in 0..HCALL_RING_SIZE {
            let slot = self.async_cursor;
            let status_addr = data + (ld::HCALL_STATUS + slot) as u64;
            let mut status = [0u8];
            self.mem
                .read(status_addr, &mut status)
                .expect("lguest_data is in RAM");
            match status[0] {
                HCALL_STATUS_FREE => return Ok(()),
                HCALL_STATUS_QUEUED => {}
                other => {
                    return Err(kill(format!(
                        "bad async hypercall status {other:#x} in slot {slot}"
                    )))
                }
            }
            let call = data + (ld::HCALLS + slot * core::mem::size_of::<HcallArgs>()) as u64;
            let w = |i: u64| {
                self.mem
                    .read_u64(call + i * 8)
                    .expect("lguest_data is in RAM")
            };
            let (nr, a1, a2, a3, a4) = (w(0), w(1), w(2), w(3), w(4));
            if matches!(nr, hcall::LGUEST_INIT | hcall::HALT | hcall::SHUTDOWN) {
                return Err(kill(format!("cannot queue {} in the async ring", name(nr))));
            }
            // Queued calls behave as if made directly; results are discarded.
            self.do_hypercall(nr, a1, a2, a3, a4)?;
            self.mem
                .write(status_addr, &[HCALL_STATUS_FREE])
                .expect("lguest_data is in RAM");
            self.async_cursor = (slot + 1) % HCALL_RING_SIZE;
        }
        Ok(())
    }

    fn lguest_init(&mut self, addr: u64) -> HResult {
        let size = core::mem::size_of::<LguestData>() as u64;
        if addr
            .checked_add(size)
            .is_none_or(|end| end > self.mem.layout.mem)
        {
            return Err(kill(format!(
                "LGUEST_INIT: lguest_data at {addr:#x} is outside guest memory (RAM)"
            )));
        }
        self.lguest_data = Some(addr);
        let l = self.mem.layout;
        self.write_data_u64(ld::RESERVE_MEM, RESERVE_MEM);
        self.write_data_u64(ld::PGDIR, self.tables.init_pml4);
        self.write_data_u32(ld::TSC_KHZ, self.vm.tsc_khz);
        self.mem
            .write(addr + ld::GUESTID as u64, &0u16.to_le_bytes())
            .expect("checked");
        self.write_data_u64(ld::PFN_LIMIT, l.pfn_limit);
        self.write_data_u64(ld::HOST_PML4E, self.tables.host_pml4e);
        self.write_time();
        tracing::debug!(
            lguest_data = format_args!("{addr:#x}"),
            tsc_khz = self.vm.tsc_khz,
            "LGUEST_INIT"
        );
        Ok(0)
    }

    /// One hypercall, direct or queued.
    fn do_hypercall(&mut self, nr: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> HResult {
        tracing::trace!(a1, a2, a3, a4, "hypercall {}", name(nr));
        match nr {
            hcall::FLUSH_ASYNC | hcall::SEND_INTERRUPTS => Ok(0),
            hcall::LGUEST_INIT => Err(kill("LGUEST_INIT twice")),
            hcall::SHUTDOWN => self.shutdown(a1, a2),
            hcall::LOAD_GDT => self.load_gdt(a1, a2),
            hcall::NEW_PGTABLE => self.new_pgtable(a1),
            hcall::FLUSH_TLB => self.flush_tlb().map(|()| 0),
            hcall::LOAD_IDT_ENTRY => self.load_idt_entry(a1, a2, a3),
            hcall::SET_STACK => self.set_stack(a1, a2, a3),
            hcall::TS => {
                let ts = a1 != 0;
                self.update_sregs(|s| s.cr0 = if ts { s.cr0 | CR0_TS } else { s.cr0 & !CR0_TS })?;
                Ok(0)
            }
            hcall::SET_CLOCKEVENT => {
                self.clock.set(a1, &self.irqs);
                Ok(0)
            }
            hcall::HALT => {
                self.halted = true;
                Ok(0)
            }
            hcall::GET_WALLCLOCK => Ok(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())),
            hcall::BIND_DMA | hcall::SEND_DMA => Err(kill(format!(
                "{}: the 2007 DMA device model is not implemented yet",
                name(nr)
            ))),
            hcall::SET_PTE => {
                check(&self.mem, "SET_PTE", a1, PAGE_SIZE)?;
                self.flush_tlb().map(|()| 0)
            }
            hcall::SET_PGD => {
                check(&self.mem, "SET_PGD", a1, PAGE_SIZE)?;
                if a2 >= FIRST_UPPER_PML4_SLOT as u64 {
                    return Err(kill(format!("SET_PGD: index {a2} is the Host's half")));
                }
                self.flush_tlb().map(|()| 0)
            }
            hcall::LOAD_TLS => {
                if a1 >= RESERVE_MEM || a2 >= RESERVE_MEM {
                    return Err(kill(format!(
                        "LOAD_TLS: bases {a1:#x}, {a2:#x} must be lower-half addresses"
                    )));
                }
                self.update_sregs(|s| {
                    s.fs.base = a1;
                    s.gs.base = a2;
                })?;
                Ok(0)
            }
            hcall::NOTIFY => self.notify(a1),
            hcall::LOAD_GDT_ENTRY => {
                if !(GDT_FIRST_GUEST_ENTRY as u64..GDT_ENTRIES as u64).contains(&a1) {
                    return Err(kill(format!("LOAD_GDT_ENTRY: bad index {a1}")));
                }
                self.set_gdt_entry(a1 as usize, a2, "LOAD_GDT_ENTRY")?;
                Ok(0)
            }
            _ => Err(kill(format!("Bad hypercall {nr}"))),
        }
    }

    fn shutdown(&mut self, reason_addr: u64, code: u64) -> HResult {
        check(&self.mem, "SHUTDOWN", reason_addr, 1)?;
        let reason = self
            .mem
            .read_cstr(reason_addr, SHUTDOWN_REASON_MAX)
            .expect("checked");
        let reason = String::from_utf8_lossy(&reason).into_owned();
        Err(match code {
            SHUTDOWN_POWEROFF => Stop::PowerOff(reason),
            SHUTDOWN_RESTART => Stop::Restart(reason),
            SHUTDOWN_CRASH => Stop::Crash(reason),
            _ => kill(format!("SHUTDOWN: bad code {code}")),
        })
    }

    fn load_gdt(&mut self, addr: u64, count: u64) -> HResult {
        if count > GDT_ENTRIES as u64 {
            return Err(kill(format!(
                "LOAD_GDT: {count} entries, at most {GDT_ENTRIES}"
            )));
        }
        check(&self.mem, "LOAD_GDT", addr, count * 8)?;
        for i in GDT_FIRST_GUEST_ENTRY..GDT_ENTRIES {
            let desc = if (i as u64) < count {
                self.mem.read_u64(addr + i as u64 * 8).expect("checked")
            } else {
                0
            };
            self.set_gdt_entry(i, desc, "LOAD_GDT")?;
        }
        Ok(0)
    }

    fn set_gdt_entry(&mut self, index: usize, desc: u64, call: &str) -> Result<(), Stop> {
        let desc = guest_descriptor(desc).map_err(|()| {
            kill(format!(
                "{call}: system descriptor {desc:#x} in GDT entry {index}"
            ))
        })?;
        self.mem
            .write_host_u64(crate::host_pages::GDT_PAGE, index as u64 * 8, desc);
        Ok(())
    }

    fn new_pgtable(&mut self, pml4: u64) -> HResult {
        check(&self.mem, "NEW_PGTABLE", pml4, PAGE_SIZE)?;
        if !pml4.is_multiple_of(PAGE_SIZE) {
            return Err(kill(format!(
                "NEW_PGTABLE: PML4 {pml4:#x} is not page-aligned"
            )));
        }
        let slot511 = self.mem.read_u64(pml4 + 511 * 8).expect("checked");
        if slot511 != self.tables.host_pml4e {
            return Err(kill(format!(
                "NEW_PGTABLE: slot 511 of PML4 {pml4:#x} is {slot511:#x}, not the Host's {:#x}",
                self.tables.host_pml4e
            )));
        }
        for slot in FIRST_UPPER_PML4_SLOT..HOST_PML4_SLOT {
            if self.mem.read_u64(pml4 + slot as u64 * 8).expect("checked") != 0 {
                return Err(kill(format!(
                    "NEW_PGTABLE: upper-half slot {slot} of PML4 {pml4:#x} is not empty"
                )));
            }
        }
        self.cr3 = pml4;
        self.update_sregs(|s| s.cr3 = pml4)?;
        Ok(0)
    }

    fn load_idt_entry(&mut self, vector: u64, low: u64, high: u64) -> HResult {
        if vector > 255 {
            return Err(kill(format!("LOAD_IDT_ENTRY: bad IDT vector {vector}")));
        }
        if IGNORED_VECTORS.contains(&vector) {
            return Ok(0);
        }
        self.idt[vector as usize] =
            decode_gate(vector, low, high).map_err(|e| kill(format!("LOAD_IDT_ENTRY: {e}")))?;
        Ok(0)
    }

    fn set_stack(&mut self, selector: u64, top: u64, pages: u64) -> HResult {
        if selector != GUEST_DS as u64 {
            return Err(kill(format!("SET_STACK: bad selector {selector:#x}")));
        }
        if pages > STACK_MAX_PAGES {
            return Err(kill(format!("SET_STACK: bad page count {pages}")));
        }
        self.stack = (pages != 0).then_some((top, pages));
        Ok(0)
    }

    /// NOTIFY: a device's descriptor or ring (the bus), or below `mem`, a
    /// string for the early console.
    fn notify(&mut self, addr: u64) -> HResult {
        if self.bus.notify(addr).map_err(kill)? {
            return Ok(0);
        }
        if addr < self.mem.layout.mem {
            let text = self
                .mem
                .read_cstr(addr, EARLY_CONSOLE_MAX)
                .expect("below mem");
            crate::devices::console::write_early(&text, &self.irqs);
            return Ok(0);
        }
        Err(kill(format!("Bad NOTIFY {addr:#x}")))
    }
}

#[cfg(test)]
mod tests {
    use super::guest_descriptor;

    #[test]
    fn gdt_entries_become_ring_3_and_accessed() {
        // A ring-0 flat data descriptor comes out DPL 3, Accessed.
        assert_eq!(
            guest_descriptor(0x00CF_9200_0000_FFFF),
            Ok(0x00CF_F300_0000_FFFF)
        );
        // Not present: stored as it is.
        assert_eq!(
            guest_descriptor(0x0000_1200_0000_FFFF),
            Ok(0x0000_1200_0000_FFFF)
        );
        // A present 64-bit TSS (type 9, S clear) is refused.
        assert_eq!(guest_descriptor(0x0000_8900_0000_0067), Err(()));
    }
}
