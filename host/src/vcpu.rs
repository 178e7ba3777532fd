//! The vCPU loop: run the Guest, take its exits, deliver its interrupts.
//!
//! Three kinds of exit matter:
//! - `out %al,$0x1f` from ring 3: a hypercall ([`crate::hypercalls`]);
//! - `out` to [`TRAP_PORT`] from the ring-0 stub page: the Guest trapped, and
//!   the frame the CPU pushed is on the stub stack. `int $0x1f` arrives here
//!   too (as vector 0x1F, or as #UD at the `cd 1f` bytes on KVMs that report
//!   it so); anything else is reflected to the Guest's own gate;
//! - a kick (EINTR): an IRQ was raised by another thread.
//!
//! Before every entry the Host looks for an interrupt to deliver
//! ([`Guest::prepare_entry`]), and builds the frame itself, on the Guest's
//! stack, as lguest's `set_guest_interrupt` did.

use crate::bus::Bus;
use crate::host_pages::{self, HostTables, HOST_VA, STUB_FRAME_WORDS, TRAP_PORT};
use crate::interrupts::{frame_base, Gate, Irqs};
use crate::memory::GuestMemory;
use crate::pagewalk::{translate, Access};
use crate::timer::ClockEvent;
use crate::vm::Vm;
use kvm_ioctls::{SyncReg, VcpuExit};
use lguest_abi::{lguest_data_off as ld, *};
use std::os::fd::AsRawFd;
use std::sync::Arc;

// gdb's hooks into the loop below (`lguest --gdb`, see crate::gdb).
mod debug;

/// How a Guest's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    PowerOff(String),
    Restart(String),
    Crash(String),
    /// Sudden Death: the Guest broke the ABI (or triple-faulted).
    Killed(String),
}

pub fn kill(reason: impl Into<String>) -> Stop {
    Stop::Killed(reason.into())
}

/// The Guest's ring-3 context, wherever it currently lives.
#[derive(Clone, Copy, Debug)]
struct Context {
    rip: u64,
    rsp: u64,
    rflags: u64,
}

/// Where the interrupted ring-3 context is: in the vCPU registers, or in the
/// iret frame on the stub stack (after a trap exit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    Registers,
    /// Host virtual address of the iret frame (RIP, CS, RFLAGS, RSP, SS).
    StubFrame(u64),
}

/// An MMIO access that hit no device: a write to the Host's read-only pages,
/// or memory that isn't there.
fn bad_mmio(layout: &crate::memory::Layout, addr: u64, what: &str) -> Stop {
    if (layout.host_base()..layout.host_rw_base()).contains(&addr) {
        kill(format!("write to Host page {addr:#x}"))
    } else {
        kill(format!("{what} unbacked physical address {addr:#x}"))
    }
}

/// One running Guest: lguest's `struct lguest`.
pub struct Guest {
    // Drop order matters: the device and timer threads stop first, then the
    // VM goes, and only then its memory.
    pub(crate) bus: Bus,
    pub(crate) clock: ClockEvent,
    pub(crate) vm: Vm,
    pub mem: GuestMemory,
    pub tables: HostTables,
    pub(crate) irqs: Arc<Irqs>,
    /// Physical address of lguest_data, once LGUEST_INIT has run.
    pub(crate) lguest_data: Option<u64>,
    pub(crate) idt: [Option<Gate>; 256],
    /// SET_STACK: (top, pages).
    pub(crate) stack: Option<(u64, u64)>,
    /// The Guest's current page table (CR3).
    pub(crate) cr3: u64,
    pub(crate) halted: bool,
    pub(crate) async_cursor: usize,
    /// The last exit was port I/O that KVM has not completed yet: on VT-x RIP
    /// still points at the instruction, so we must not move it until then.
    io_pending: bool,
    /// Set while handling a trap exit: where the stub's iret frame is.
    trap_frame: Option<u64>,
    /// The gdb session, while one is attached.
    pub(crate) gdb: Option<Box<crate::gdb::Debugger>>,
}

impl Guest {
    pub fn new(
        mem: GuestMemory,
        tables: HostTables,
        mut vm: Vm,
        irqs: Arc<Irqs>,
        bus: Bus,
    ) -> std::io::Result<Guest> {
        let clock = ClockEvent::start(irqs.clone())?;
        crate::interrupts::set_kick_target(vm.vcpu.get_kvm_run());
        let cr3 = tables.init_pml4;
        Ok(Guest {
            bus,
            clock,
            vm,
            mem,
            tables,
            irqs,
            lguest_data: None,
            idt: [None; 256],
            stack: None,
            cr3,
            halted: false,
            async_cursor: 0,
            io_pending: false,
            trap_frame: None,
            gdb: None,
        })
    }

    /// Runs the Guest until it stops.
    pub fn run(&mut self) -> Stop {
        let stop = loop {
            if let Err(stop) = self.prepare_entry() {
                break stop;
            }
            if let Err(stop) = self.run_once() {
                break stop;
            }
        };
        tracing::debug!(?stop, "guest stopped");
        stop
    }

    /// One KVM_RUN and the handling of its exit.
    fn run_once(&mut self) -> Result<(), Stop> {
        // KVM_RUN completes the previous exit's I/O before it enters.
        self.io_pending = false;
        let (port, value) = match self.vm.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.io_pending = true;
                if port == HCALL_PORT && data.len() != 1 {
                    return Err(kill("bad access to the hypercall port"));
                }
                (port, data.first().copied())
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.io_pending = true;
                if port == HCALL_PORT {
                    return Err(kill("bad access to the hypercall port"));
                }
                data.fill(0xFF);
                return Ok(());
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.io_pending = true;
                return match self.bus.mmio_write(addr, data) {
                    Some(result) => result.map_err(kill),
                    None => Err(bad_mmio(&self.mem.layout, addr, "write to")),
                };
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.io_pending = true;
                return match self.bus.mmio_read(addr, data) {
                    Some(result) => result.map_err(kill),
                    None => Err(bad_mmio(&self.mem.layout, addr, "read from")),
                };
            }
            Ok(VcpuExit::Shutdown) => return Err(kill("triple fault")),
            Ok(VcpuExit::Hlt) => return Err(kill("hlt reached the Host")),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return Err(kill(format!(
                    "KVM could not enter the Guest (reason {reason:#x})"
                )))
            }
            Ok(VcpuExit::InternalError) => return Err(kill("KVM internal error")),
            Ok(other) => return Err(kill(format!("unexpected KVM exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: prepare_entry will look at what was raised.
                return Ok(());
            }
            Err(e) => return Err(kill(format!("KVM_RUN failed: {e}"))),
        };
        let r = &self.synced().regs;
        let (rip, rsp, args) = (r.rip, r.rsp, [r.rax, r.rdx, r.rbx, r.rcx, r.rsi]);
        let in_stub = (self.tables.stub_start..self.tables.stub_end).contains(&rip);
        if port == TRAP_PORT && in_stub {
            return self.handle_trap(rsp);
        }
        if port == HCALL_PORT && value.is_some() {
            let ret = self.hypercall(args)?;
            self.set_rax(ret);
        }
        // Any other `out` is ignored, as lguest did.
        Ok(())
    }

    /// The registers KVM synced into kvm_run at the last exit, read in place
    /// (kvm-ioctls' `sync_regs()` would copy the whole block each time).
    fn synced(&mut self) -> &kvm_bindings::kvm_sync_regs {
        self.vm.vcpu.sync_regs_mut()
    }

    pub(crate) fn set_rax(&mut self, value: u64) {
        self.vm.vcpu.sync_regs_mut().regs.rax = value;
        self.vm.vcpu.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Lets KVM finish the last port I/O (KVM_RUN with immediate_exit), so
    /// the registers can be changed safely.
    fn complete_io(&mut self) -> Result<(), Stop> {
        if !self.io_pending {
            return Ok(());
        }
        self.vm.vcpu.set_kvm_immediate_exit(1);
        let r = self.vm.vcpu.run().map(|_| ());
        self.vm.vcpu.set_kvm_immediate_exit(0);
        self.io_pending = false;
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(kill(format!("KVM_RUN failed: {e}"))),
            Ok(()) => Err(kill("KVM ran the Guest while completing I/O")),
        }
    }

    /*
     * Traps.
     */

    /// Reads word `i` of the stub frame at host virtual address `frame`.
    fn frame_word(&self, frame: u64, i: u64) -> u64 {
        let off = frame - HOST_VA + i * 8;
        self.mem.read_host_u64(off / PAGE_SIZE, off % PAGE_SIZE)
    }

    fn set_frame_word(&self, frame: u64, i: u64, v: u64) {
        let off = frame - HOST_VA + i * 8;
        self.mem.write_host_u64(off / PAGE_SIZE, off % PAGE_SIZE, v);
    }

    fn frame_ok(&self, frame: u64) -> bool {
        let stack = host_pages::host_va(self.mem.layout.host_ro_pages);
        let top = host_pages::host_va(self.mem.layout.host_pages());
        frame >= stack && frame + STUB_FRAME_WORDS as u64 * 8 <= top
    }

    /// The Guest trapped into stub `vector`: decide what it meant.
    fn handle_trap(&mut self, frame: u64) -> Result<(), Stop> {
        if !self.frame_ok(frame) {
            return Err(kill(format!("Host stub stack corrupt ({frame:#x})")));
        }
        let vector = self.frame_word(frame, 0);
        let error = self.frame_word(frame, 1);
        let iret = frame + 16;
        let rip = self.frame_word(iret, 0);
        let cs = self.frame_word(iret, 1);
        let cr2 = self.synced().sregs.cr2;
        if cs & 3 != 3 {
            return Err(kill(format!(
                "Host fault: vector {vector} in ring 0 at {rip:#x} (error {error:#x}, cr2 {cr2:#x})"
            )));
        }
        self.trap_frame = Some(iret);
        let vector = vector as u8;
        if self.gdb.is_some() && self.debug_trap(vector, iret) {
            return Ok(());
        }

        // `int $0x1f`: through its gate, RIP is past it; as #UD, RIP is on it.
        let hcall_site = match vector {
            LGUEST_TRAP_ENTRY => Some(rip.wrapping_sub(2)),
            VEC_UD if self.code_bytes(rip) == Some(INT_1F_BYTES) => Some(rip),
            _ => None,
        };
        tracing::trace!(vector, error, rip = format_args!("{rip:#x}"), "trap");
        if let Some(site) = hcall_site {
            let r = &self.synced().regs;
            let args = [r.rax, r.rdx, r.rbx, r.rcx, r.rsi];
            self.set_frame_word(iret, 0, site + 2);
            let ret = self.hypercall(args)?;
            self.set_rax(ret);
            self.rewrite_hcall_site(site);
            return Ok(());
        }

        if vector == VEC_PF && rip == self.tables.syscall_target {
            // A `syscall` this KVM let through to LSTAR: it is #UD at the
            // instruction (RCX holds the address after it).
            let after = self.synced().regs.rcx;
            self.set_frame_word(iret, 0, after.wrapping_sub(2));
            return self.reflect_trap(VEC_UD, 0, 0);
        }
        if vector == VEC_DF {
            return Err(kill(format!("double fault at {rip:#x}")));
        }
        self.reflect_trap(vector, error, cr2)
    }

    /// Sends a trap to the Guest's own gate for it, or ends the Guest.
    fn reflect_trap(&mut self, vector: u8, error: u64, cr2: u64) -> Result<(), Stop> {
        let Some(gate) = self.idt[vector as usize] else {
            let rip = self.frame_word(self.trap_frame.expect("in a trap"), 0);
            return Err(kill(format!(
                "unhandled trap {vector} at {rip:#x} (error {error:#x}, cr2 {cr2:#x})"
            )));
        };
        if vector == VEC_PF {
            self.write_data_u64(ld::CR2, cr2);
        }
        let error = vector_has_error_code(vector).then_some(error);
        let at = Where::StubFrame(self.trap_frame.expect("in a trap"));
        self.deliver(at, vector, gate, error)
    }

    /// The two bytes at Guest virtual `rip`, if readable by ring 3.
    fn code_bytes(&self, rip: u64) -> Option<[u8; 2]> {
        let mut b = [0u8; 2];
        for (i, byte) in b.iter_mut().enumerate() {
            let pa = translate(&self.mem, self.cr3, rip + i as u64, Access::Read)?;
            let mut one = [0u8];
            self.mem.read(pa, &mut one).ok()?;
            *byte = one[0];
        }
        Some(b)
    }

    /// After its first use, `int $0x1f` becomes `out %al,$0x1f`, which exits
    /// straight to us instead of through a trap and a ring-0 stub.
    fn rewrite_hcall_site(&mut self, site: u64) {
        if self.code_bytes(site) != Some(INT_1F_BYTES) {
            return;
        }
        for (i, byte) in OUT_1F_BYTES.iter().enumerate() {
            if let Some(pa) = translate(&self.mem, self.cr3, site + i as u64, Access::Read) {
                let _ = self.mem.write(pa, &[*byte]);
            }
        }
    }

    /*
     * Interrupts.
     */

    /// Before entering the Guest: deliver what can be delivered, sleep while
    /// halted with nothing to deliver.
    fn prepare_entry(&mut self) -> Result<(), Stop> {
        loop {
            if crate::interrupts::user_stopped() {
                return Err(kill("ended by the user (three Ctrl-C)"));
            }
            if let Some(reason) = self.irqs.death() {
                return Err(kill(reason));
            }
            if self.halted {
                // Drain the wake-up counter before looking, so a raise after
                // the look below still wakes the sleep.
                let _ = self.irqs.wake.read();
            }
            let in_ring3 = self.synced().sregs.cs.selector & 3 == 3;
            let at = match self.trap_frame {
                Some(frame) => Some(Where::StubFrame(frame)),
                None if in_ring3 => Some(Where::Registers),
                // Kicked while a stub runs in ring 0: look again shortly.
                None => None,
            };
            let at = self.debug_before_look(at)?;
            let kicks = self.irqs.kicks();
            self.look(at)?;
            // Kicks so far are answered by this look; clear the flag they
            // set, then check none came since (one that does re-sets it).
            self.vm.vcpu.set_kvm_immediate_exit(0);
            if self.irqs.kicks() != kicks {
                // Kicked while we looked (and perhaps while completing an
                // I/O exit, which clears immediate_exit): look again.
                continue;
            }
            if !self.halted {
                break;
            }
            // Finish the HALT's own exit now, while we would only sleep, so
            // the wake-up doesn't pay for it.
            if at == Some(Where::Registers) {
                self.complete_io()?;
            }
            // Sleep until an IRQ is raised, or until input a device lets us
            // serve ourselves arrives (a key for the console: no thread
            // hand-off between it and the Guest).
            let backends = self.bus.inline_backends();
            let mut fds: Vec<libc::pollfd> = std::iter::once(self.irqs.wake.as_raw_fd())
                .chain(backends.iter().map(|b| b.0))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a live array of valid pollfds for the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            for (fd, (_, device)) in fds[1..].iter().zip(&backends) {
                if fd.revents != 0 {
                    self.bus.backend_ready(*device).map_err(kill)?;
                }
            }
        }
        self.debug_before_entry()?;
        self.trap_frame = None;
        Ok(())
    }

    /// ABI section 6: find the lowest deliverable IRQ and deliver it.
    fn look(&mut self, at: Option<Where>) -> Result<(), Stop> {
        let Some(data) = self.lguest_data else {
            return Ok(());
        };
        let blocked = self
            .mem
            .read_u32(data + ld::BLOCKED_INTERRUPTS as u64)
            .unwrap_or(!0);
        let mut gates = 0u32;
        for irq in 0..LGUEST_IRQS {
            if self.idt[(FIRST_EXTERNAL_VECTOR as u32 + irq) as usize].is_some() {
                gates |= 1 << irq;
            }
        }
        let mut candidates = self.irqs.pending() & !blocked & gates;
        // Why a candidate stays undelivered decides whether we look again
        // soon: not for irq_enabled off (the Guest calls SEND_INTERRUPTS when
        // it turns them on), but for the noirq window, a stub in flight, or
        // more than one candidate at once (ABI section 6).
        let mut look_again = false;
        if candidates != 0 {
            if at == Some(Where::Registers) {
                // On VT-x RIP still points at an unfinished `out`: finish it
                // before judging the noirq window by RIP.
                self.complete_io()?;
            }
            let ctx_ok = match at {
                Some(w) => {
                    let rip = self.context(w).rip;
                    let start = self.read_data_u64(ld::NOIRQ_START);
                    let end = self.read_data_u64(ld::NOIRQ_END);
                    !(start <= rip && rip < end)
                }
                None => false,
            };
            let enabled = self.read_data_u32(ld::IRQ_ENABLED) & X86_EFLAGS_IF != 0;
            look_again = !ctx_ok;
            if let (true, Some(w)) = (ctx_ok && (self.halted || enabled), at) {
                if self.halted {
                    self.write_data_u32(ld::IRQ_ENABLED, X86_EFLAGS_IF);
                    self.halted = false;
                }
                let irq = candidates.trailing_zeros();
                self.irqs.clear(irq);
                candidates &= !(1 << irq);
                let vector = FIRST_EXTERNAL_VECTOR + irq as u8;
                tracing::trace!(irq, "delivering IRQ");
                let gate = self.idt[vector as usize].expect("candidates have gates");
                self.deliver(w, vector, gate, None)?;
                look_again = candidates != 0;
            }
        }
        let pending = if candidates != 0 { X86_EFLAGS_IF } else { 0 };
        self.write_data_u32(ld::IRQ_PENDING, pending);
        if look_again {
            self.irqs.recheck_soon();
        }
        Ok(())
    }

    fn context(&mut self, at: Where) -> Context {
        match at {
            Where::Registers => {
                let r = &self.synced().regs;
                Context {
                    rip: r.rip,
                    rsp: r.rsp,
                    rflags: r.rflags,
                }
            }
            Where::StubFrame(f) => Context {
                rip: self.frame_word(f, 0),
                rflags: self.frame_word(f, 2),
                rsp: self.frame_word(f, 3),
            },
        }
    }

    fn set_context(&mut self, at: Where, ctx: Context) {
        match at {
            Where::Registers => {
                let r = &mut self.vm.vcpu.sync_regs_mut().regs;
                (r.rip, r.rsp, r.rflags) = (ctx.rip, ctx.rsp, ctx.rflags);
                self.vm.vcpu.set_sync_dirty_reg(SyncReg::Register);
            }
            Where::StubFrame(f) => {
                self.set_frame_word(f, 0, ctx.rip);
                self.set_frame_word(f, 1, GUEST_CS as u64);
                self.set_frame_word(f, 2, ctx.rflags);
                self.set_frame_word(f, 3, ctx.rsp);
                self.set_frame_word(f, 4, GUEST_DS as u64);
            }
        }
    }

    /// Builds the interrupt frame on the Guest's stack and points the Guest
    /// at the gate (lguest's set_guest_interrupt).
    fn deliver(
        &mut self,
        at: Where,
        vector: u8,
        gate: Gate,
        error: Option<u64>,
    ) -> Result<(), Stop> {
        if at == Where::Registers {
            self.complete_io()?;
        }
        let ctx = self.context(at);
        let irq_enabled = self.read_data_u32(ld::IRQ_ENABLED);
        let base = frame_base(ctx.rsp, self.stack)
            .ok_or_else(|| kill(format!("Guest stack overflow (RSP {:#x})", ctx.rsp)))?;
        let rflags = (ctx.rflags & !(X86_EFLAGS_IF as u64)) | (irq_enabled & X86_EFLAGS_IF) as u64;
        // SS, RSP, RFLAGS, CS, RIP and, for some vectors, the error code.
        let frame = [
            GUEST_DS as u64,
            ctx.rsp,
            rflags,
            GUEST_CS as u64,
            ctx.rip,
            error.unwrap_or(0),
        ];
        let words = &frame[..5 + usize::from(error.is_some())];
        let mut sp = base;
        let ram = self.mem.layout.mem;
        for &w in words {
            sp = sp.wrapping_sub(8);
            // Frames go in RAM only: not device pages, not the mmio hole.
            let pa = translate(&self.mem, self.cr3, sp, Access::Write)
                .filter(|pa| pa.checked_add(8).is_some_and(|end| end <= ram))
                .ok_or_else(|| {
                    kill(format!("cannot deliver vector {vector}: bad stack {sp:#x}"))
                })?;
            self.mem.write_u64(pa, w).expect("checked");
        }
        self.set_context(
            at,
            Context {
                rip: gate.offset,
                rsp: sp,
                rflags: ENTRY_RFLAGS,
            },
        );
        if gate.interrupt {
            self.write_data_u32(ld::IRQ_ENABLED, 0);
        }
        self.write_time();
        Ok(())
    }

    /*
     * lguest_data access. LGUEST_INIT checked the whole structure lies in
     * RAM, so these cannot fail once it is set.
     */

    pub(crate) fn read_data_u32(&self, off: usize) -> u32 {
        let base = self.lguest_data.expect("after LGUEST_INIT");
        self.mem.read_u32(base + off as u64).unwrap_or(0)
    }
    pub(crate) fn read_data_u64(&self, off: usize) -> u64 {
        let base = self.lguest_data.expect("after LGUEST_INIT");
        self.mem.read_u64(base + off as u64).unwrap_or(0)
    }
    pub(crate) fn write_data_u32(&self, off: usize, v: u32) {
        if let Some(base) = self.lguest_data {
            let _ = self.mem.write_u32(base + off as u64, v);
        }
    }
    pub(crate) fn write_data_u64(&self, off: usize, v: u64) {
        if let Some(base) = self.lguest_data {
            let _ = self.mem.write_u64(base + off as u64, v);
        }
    }

    pub(crate) fn write_time(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.write_data_u64(ld::TIME_SEC, now.as_secs());
        self.write_data_u64(ld::TIME_NSEC, now.subsec_nanos() as u64);
    }

    /*
     * System registers, changed by hypercalls. These use the ioctls, not the
     * shared kvm_run copy, which is only read right after an exit.
     */

    pub(crate) fn update_sregs(
        &mut self,
        f: impl FnOnce(&mut kvm_bindings::kvm_sregs),
    ) -> Result<(), Stop> {
        let mut s = self
            .vm
            .vcpu
            .get_sregs()
            .map_err(|e| kill(format!("KVM get sregs failed: {e}")))?;
        f(&mut s);
        self.vm
            .vcpu
            .set_sregs(&s)
            .map_err(|e| kill(format!("KVM set sregs failed: {e}")))
    }

    /// No stale translation survives: load another CR3, then the Guest's.
    pub(crate) fn flush_tlb(&mut self) -> Result<(), Stop> {
        let (flush, cr3) = (self.tables.flush_pml4, self.cr3);
        self.update_sregs(|s| s.cr3 = flush)?;
        self.update_sregs(|s| s.cr3 = cr3)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        crate::interrupts::set_kick_target(std::ptr::null_mut());
    }
}
