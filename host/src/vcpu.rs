//! The vCPU loop: run the Guest, take its exits, and dispatch them, as
//! lguest's run_guest did.
//!
//! Three kinds of exit matter:
//! - `out %al,$0x1f` from ring 3: a hypercall ([`crate::hypercalls`]);
//! - `out` to [`TRAP_PORT`] from the ring-0 stub page: the Guest trapped, and
//!   the frame the CPU pushed is on the stub stack. `int $0x1f` arrives here
//!   too (as vector 0x1F, or as #UD at the `cd 1f` bytes on KVMs that report
//!   it so); anything else is reflected to the Guest's own gate
//!   ([`crate::interrupts_and_traps`]);
//! - a kick (EINTR): an IRQ was raised by another thread ([`crate::kick`]).
//!
//! Before every entry the Host looks for an interrupt to deliver
//! ([`Guest::prepare_entry`]).

use crate::bus::Bus;
use crate::host_pages::{self, HostTables, HOST_VA, STUB_FRAME_WORDS, TRAP_PORT};
use crate::hypercalls::{Answer, HcallError, Lguest, Machine, Shutdown};
use crate::interrupts_and_traps::{choose, Context, Delivery, Gate, Look, TrapError};
use crate::kick::Irqs;
use crate::memory::GuestMemory;
use crate::page_tables::Switch;
use crate::pagewalk::{translate, Access};
use crate::timer::{ClockEvent, ReLook};
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

/// Sudden Death, as the vCPU thread decides it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
/*H:600 Sudden Death: whatever the Guest did wrong ends here, as one
 * reason, and the Guest never runs again (ABI section 4). */
pub enum Death {
    #[error(transparent)]
    Hypercall(#[from] HcallError),
    #[error(transparent)]
    Trap(#[from] TrapError),
    #[error("bad access to the hypercall port{0}")]
    HcallPort(&'static str),
    #[error("write to Host page {0:#x}")]
    HostPageWrite(u64),
    #[error("{what} unbacked physical address {addr:#x}")]
    Unbacked { what: &'static str, addr: u64 },
    #[error("double fault at {0:#x}")]
    DoubleFault(u64),
    #[error("Host stub stack corrupt ({0:#x})")]
    StubStack(u64),
    #[error("Host fault: vector {vector} in ring 0 at {rip:#x} (error {error:#x}, cr2 {cr2:#x})")]
    HostFault {
        vector: u64,
        rip: u64,
        error: u64,
        cr2: u64,
    },
    #[error("triple fault")]
    TripleFault,
    #[error("hlt reached the Host")]
    Hlt,
    #[error("ended by the user (three Ctrl-C)")]
    User,
    /// KVM failed us, or let something unexpected through.
    #[error("{0}")]
    Kvm(String),
    /// A device thread or a transport ended the Guest.
    #[error("{0}")]
    Device(String),
}

impl From<Shutdown> for Stop {
    fn from(s: Shutdown) -> Stop {
        match s {
            Shutdown::PowerOff(r) => Stop::PowerOff(r),
            Shutdown::Restart(r) => Stop::Restart(r),
            Shutdown::Crash(r) => Stop::Crash(r),
        }
    }
}

/// What one exit's handling leads to.
type Flow = Result<Option<Shutdown>, Death>;

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
fn bad_mmio(layout: &crate::memory::Layout, addr: u64, what: &'static str) -> Death {
    if (layout.host_base()..layout.host_rw_base()).contains(&addr) {
        Death::HostPageWrite(addr)
    } else {
        Death::Unbacked { what, addr }
    }
}

/// The machine under the Guest: KVM's vCPU, the devices and the timers.
/// It is what hypercalls reach through [`Machine`].
pub struct Cpu {
    // Drop order matters: the device and timer threads stop first, then the
    // VM goes (and only then, in [`Guest`], its memory).
    /// The 2007 device model's devices, for a Guest booted with them (the
    /// bus is then empty).
    pub(crate) dma: Option<crate::dma::launch::Hub>,
    pub(crate) bus: Bus,
    clock: ClockEvent,
    relook: ReLook,
    pub(crate) vm: Vm,
    pub tables: HostTables,
    pub(crate) irqs: Arc<Irqs>,
    /// The top-level page the CPU walks (CR3): the initial tables or one
    /// of the shadow roots.
    pub(crate) cr3: u64,
    halted: bool,
    /// The last exit was port I/O that KVM has not completed yet: on VT-x RIP
    /// still points at the instruction, so we must not move it until then.
    io_pending: bool,
    /// Set while handling a trap exit: where the stub's iret frame is.
    trap_frame: Option<u64>,
    layout: crate::memory::Layout,
}

/// One running Guest: lguest's `struct lguest`, in three parts.
pub struct Guest {
    pub cpu: Cpu,
    pub lguest: Lguest,
    pub mem: GuestMemory,
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
        crate::kick::set_kick_target(vm.vcpu.get_kvm_run());
        let lguest = Lguest::new(&mem, &tables);
        Ok(Guest {
            cpu: Cpu {
                dma: None,
                bus,
                relook: clock.relook(),
                clock,
                vm,
                tables,
                irqs,
                cr3: tables.init_pml4,
                halted: false,
                io_pending: false,
                trap_frame: None,
                layout: mem.layout,
            },
            lguest,
            mem,
            gdb: None,
        })
    }

    /*H:300 Runs the Guest until it stops: look for an interrupt to
     * deliver, enter it, handle the exit; again. */
    pub fn run(&mut self) -> Stop {
        let stop = loop {
            match self.prepare_entry().and_then(|()| self.run_once()) {
                Ok(None) => {}
                Ok(Some(shutdown)) => break Stop::from(shutdown),
                Err(death) => break Stop::Killed(death.to_string()),
            }
        };
        tracing::debug!(?stop, "guest stopped");
        stop
    }

    /// One KVM_RUN and the handling of its exit.
    /*H:310 One KVM_RUN, and what its exit meant: lguest's run_guest_once
     * and the switch after it. The world switch itself is KVM's. */
    fn run_once(&mut self) -> Flow {
        let cpu = &mut self.cpu;
        // KVM_RUN completes the previous exit's I/O before it enters.
        cpu.io_pending = false;
        let (port, value) = match cpu.vm.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                cpu.io_pending = true;
                if port == HCALL_PORT && data.len() != 1 {
                    return Err(Death::HcallPort(""));
                }
                (port, data.first().copied())
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                cpu.io_pending = true;
                if port == HCALL_PORT {
                    return Err(Death::HcallPort(""));
                }
                data.fill(0xFF);
                return Ok(None);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                cpu.io_pending = true;
                return match cpu.bus.mmio_write(addr, data) {
                    Some(result) => result
                        .map(|()| None)
                        .map_err(|e| Death::Device(e.to_string())),
                    None => Err(bad_mmio(&self.mem.layout, addr, "write to")),
                };
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                cpu.io_pending = true;
                return match cpu.bus.mmio_read(addr, data) {
                    Some(result) => result
                        .map(|()| None)
                        .map_err(|e| Death::Device(e.to_string())),
                    None => Err(bad_mmio(&self.mem.layout, addr, "read from")),
                };
            }
            Ok(VcpuExit::Shutdown) => return Err(Death::TripleFault),
            Ok(VcpuExit::Hlt) => return Err(Death::Hlt),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return Err(Death::Kvm(format!(
                    "KVM could not enter the Guest (reason {reason:#x})"
                )))
            }
            Ok(VcpuExit::InternalError) => return Err(Death::Kvm("KVM internal error".into())),
            Ok(other) => return Err(Death::Kvm(format!("unexpected KVM exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: prepare_entry will look at what was raised.
                return Ok(None);
            }
            Err(e) => return Err(Death::Kvm(format!("KVM_RUN failed: {e}"))),
        };
        let r = &cpu.synced().regs;
        let (rip, rsp, args) = (r.rip, r.rsp, [r.rax, r.rdx, r.rbx, r.rcx, r.rsi]);
        let in_stub = (cpu.tables.stub_start..cpu.tables.stub_end).contains(&rip);
        if port == TRAP_PORT && in_stub {
            return self.handle_trap(rsp);
        }
        if port == HCALL_PORT && value.is_some() {
            if !self.plain_out_to_hcall_port()? {
                return Err(Death::HcallPort(": string I/O (outs), not `out`"));
            }
            return self.hypercall(args);
        }
        // Any other `out` is ignored, as lguest did.
        Ok(None)
    }

    /// Runs a hypercall and puts its answer in RAX.
    fn hypercall(&mut self, args: [u64; 5]) -> Flow {
        match self.lguest.hypercall(&self.mem, &mut self.cpu, args)? {
            Answer::Rax(value) => {
                self.cpu.set_rax(value);
                Ok(None)
            }
            Answer::Shutdown(s) => Ok(Some(s)),
        }
    }

    /*H:360 Whether the exit on port 0x1F came from a plain `out` (`e6 1f` or
     * `ee`): only that is a hypercall (ABI section 4); `outs` there ends the
     * Guest. KVMs differ on where RIP is at an I/O exit: past a plain `out`
     * on some, on it on others, and on a string instruction on all (see
     * docs/machine-notes.md). So we look both ways; in the one case both
     * readings fit (`out` then `outs` right after it, or an `outs` after
     * bytes that look like an `out`), completing the I/O tells: only `outs`
     * moves RSI. */
    fn plain_out_to_hcall_port(&mut self) -> Result<bool, Death> {
        const BEFORE: u64 = 2;
        let rip = self.cpu.synced().regs.rip;
        let mut bytes = [None::<u8>; 17];
        let start = rip.wrapping_sub(BEFORE);
        let fast = (start & (PAGE_SIZE - 1)) + bytes.len() as u64 <= PAGE_SIZE;
        match translate(&self.mem, self.cpu.cr3, start, Access::Read).filter(|_| fast) {
            Some(pa) => {
                let mut raw = [0u8; 17];
                if self.mem.read(pa, &mut raw).is_ok() {
                    bytes = raw.map(Some);
                }
            }
            None => {
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = self.code_byte(start.wrapping_add(i as u64));
                }
            }
        }
        let at = &bytes[BEFORE as usize..];
        let is_prefix = |b: u8| {
            matches!(
                b,
                0xF0 | 0xF2 | 0xF3 | 0x2E | 0x36 | 0x3E | 0x26 | 0x64 | 0x65 | 0x67
            ) || (0x40..=0x4F).contains(&b)
        };
        let (op, imm) = match at.iter().position(|b| !b.is_some_and(is_prefix)) {
            Some(i) => (at[i], at.get(i + 1).copied().flatten()),
            None => (None, None),
        };
        let string_at = matches!(op, Some(0x6E | 0x6F));
        let plain_at = op == Some(0xEE) || (op == Some(0xE6) && imm == Some(0x1F));
        let plain_past = bytes[1] == Some(0xEE) || bytes[..2] == [Some(0xE6), Some(0x1F)];
        Ok(match (string_at, plain_at || plain_past) {
            (false, plain) => plain,
            (true, false) => false,
            (true, true) => {
                let rsi = self.cpu.synced().regs.rsi;
                self.cpu.complete_io()?;
                self.cpu.synced().regs.rsi == rsi
            }
        })
    }

    /*
     * Traps.
     */

    /*H:370 The Guest trapped into stub `vector`: decide what it meant. */
    fn handle_trap(&mut self, frame: u64) -> Flow {
        let cpu = &mut self.cpu;
        if !cpu.frame_ok(frame) {
            return Err(Death::StubStack(frame));
        }
        let vector = cpu.frame_word(&self.mem, frame, 0);
        let error = cpu.frame_word(&self.mem, frame, 1);
        let iret = frame + 16;
        let rip = cpu.frame_word(&self.mem, iret, 0);
        let cs = cpu.frame_word(&self.mem, iret, 1);
        let cr2 = cpu.synced().sregs.cr2;
        if cs & 3 != 3 {
            return Err(Death::HostFault {
                vector,
                rip,
                error,
                cr2,
            });
        }
        cpu.trap_frame = Some(iret);
        let vector = vector as u8;
        if self.gdb.is_some() && self.debug_trap(vector, iret) {
            return Ok(None);
        }

        // `int $0x1f`: through its gate, RIP is past it; as #UD, RIP is on it.
        let hcall_site = match vector {
            LGUEST_TRAP_ENTRY => Some(rip.wrapping_sub(2)),
            VEC_UD if self.code_bytes(rip) == Some(INT_1F_BYTES) => Some(rip),
            _ => None,
        };
        tracing::trace!(vector, error, rip = format_args!("{rip:#x}"), "trap");
        if let Some(site) = hcall_site {
            let r = &self.cpu.synced().regs;
            let args = [r.rax, r.rdx, r.rbx, r.rcx, r.rsi];
            self.cpu.set_frame_word(&self.mem, iret, 0, site + 2);
            let flow = self.hypercall(args)?;
            self.rewrite_hcall_site(site);
            return Ok(flow);
        }

        if vector == VEC_PF && rip == self.cpu.tables.syscall_target {
            // A `syscall` this KVM let through to LSTAR: it is #UD at the
            // instruction (RCX holds the address after it).
            let after = self.cpu.synced().regs.rcx;
            self.cpu
                .set_frame_word(&self.mem, iret, 0, after.wrapping_sub(2));
            return self.reflect_trap(VEC_UD, 0, 0).map(|()| None);
        }
        if vector == VEC_DF {
            return Err(Death::DoubleFault(rip));
        }
        self.reflect_trap(vector, error, cr2).map(|()| None)
    }

    /// Sends a trap to the Guest's own gate for it, or ends the Guest.
    fn reflect_trap(&mut self, vector: u8, error: u64, cr2: u64) -> Result<(), Death> {
        let frame = self.cpu.trap_frame.expect("in a trap");
        let rip = self.cpu.frame_word(&self.mem, frame, 0);
        let rsp = self.cpu.frame_word(&self.mem, frame, 3);
        let gate = match self.lguest.traps.trap_gate(vector, rip, error, cr2) {
            Ok(gate) => gate,
            // A trap nobody handles, with what most likely went wrong.
            Err(TrapError::Unhandled { .. }) if self.lguest.data.is_none() || rsp == 0 => {
                let hint = if self.lguest.data.is_none() {
                    "; it came before LGUEST_INIT: is this a kernel written for lguest? \
                     (its first hypercall must be LGUEST_INIT, ABI section 3)"
                } else {
                    "; RSP is 0: the Guest starts with no stack and must set up its own \
                     (ABI section 3)"
                };
                return Err(Death::Trap(TrapError::Unhandled {
                    vector,
                    rip,
                    error,
                    cr2,
                    hint,
                }));
            }
            Err(e) => return Err(e.into()),
        };
        if vector == VEC_PF {
            self.data().write_u64(&self.mem, ld::CR2, cr2);
        }
        let error = vector_has_error_code(vector).then_some(error);
        self.deliver(Where::StubFrame(frame), vector, gate, error)
    }

    /// The two bytes at Guest virtual `rip`, if readable by ring 3.
    fn code_bytes(&self, rip: u64) -> Option<[u8; 2]> {
        Some([self.code_byte(rip)?, self.code_byte(rip.wrapping_add(1))?])
    }

    /// The byte at Guest virtual `va`, if readable by ring 3.
    fn code_byte(&self, va: u64) -> Option<u8> {
        let pa = translate(&self.mem, self.cpu.cr3, va, Access::Read)?;
        let mut one = [0u8];
        self.mem.read(pa, &mut one).ok()?;
        Some(one[0])
    }

    /*H:380 After its first use, `int $0x1f` becomes `out %al,$0x1f`, which
     * exits straight to us instead of through a trap and a ring-0 stub. */
    fn rewrite_hcall_site(&mut self, site: u64) {
        if self.code_bytes(site) != Some(INT_1F_BYTES) {
            return;
        }
        for (i, byte) in OUT_1F_BYTES.iter().enumerate() {
            if let Some(pa) = translate(&self.mem, self.cpu.cr3, site + i as u64, Access::Read) {
                let _ = self.mem.write(pa, &[*byte]);
            }
        }
    }

    /*
     * Interrupts.
     */

    fn data(&self) -> crate::lguest_data::LguestData {
        self.lguest.data.expect("after LGUEST_INIT")
    }

    /*H:400 Before entering the Guest: deliver what can be delivered, sleep
     * while halted with nothing to deliver. */
    fn prepare_entry(&mut self) -> Result<(), Death> {
        loop {
            if crate::kick::user_stopped() {
                return Err(Death::User);
            }
            if let Some(reason) = self.cpu.irqs.death() {
                return Err(Death::Device(reason));
            }
            if self.cpu.halted {
                // Drain the wake-up counter before looking, so a raise after
                // the look below still wakes the sleep.
                let _ = self.cpu.irqs.wake.read();
            }
            let in_ring3 = self.cpu.synced().sregs.cs.selector & 3 == 3;
            let at = match self.cpu.trap_frame {
                Some(frame) => Some(Where::StubFrame(frame)),
                None if in_ring3 => Some(Where::Registers),
                // Kicked while a stub runs in ring 0: look again shortly.
                None => None,
            };
            let at = self.debug_before_look(at)?;
            let kicks = self.cpu.irqs.kicks();
            self.look(at)?;
            // Kicks so far are answered by this look; clear the flag they
            // set, then check none came since (one that does re-sets it).
            self.cpu.vm.vcpu.set_kvm_immediate_exit(0);
            if self.cpu.irqs.kicks() != kicks {
                // Kicked while we looked (and perhaps while completing an
                // I/O exit, which clears immediate_exit): look again.
                continue;
            }
            if !self.cpu.halted {
                break;
            }
            // Finish the HALT's own exit now, while we would only sleep, so
            // the wake-up doesn't pay for it.
            if at == Some(Where::Registers) {
                self.cpu.complete_io()?;
            }
            self.cpu.sleep()?;
        }
        self.debug_before_entry()?;
        self.cpu.trap_frame = None;
        Ok(())
    }

    /*H:410 ABI section 6: find the lowest deliverable IRQ and deliver it. */
    fn look(&mut self, at: Option<Where>) -> Result<(), Death> {
        let Some(data) = self.lguest.data else {
            return Ok(());
        };
        let mem = &self.mem;
        let blocked = data.read_u32(mem, ld::BLOCKED_INTERRUPTS);
        let candidates = self.cpu.irqs.pending() & !blocked & self.lguest.traps.irq_gates();
        let mut look = Look {
            candidates,
            context_ok: false,
            enabled: data.read_u32(mem, ld::IRQ_ENABLED) & X86_EFLAGS_IF != 0,
            halted: self.cpu.halted,
        };
        if candidates != 0 {
            if at == Some(Where::Registers) {
                // On VT-x RIP still points at an unfinished `out`: finish it
                // before judging the noirq window by RIP.
                self.cpu.complete_io()?;
            }
            if let Some(w) = at {
                let rip = self.cpu.context(&self.mem, w).rip;
                let start = data.read_u64(&self.mem, ld::NOIRQ_START);
                let end = data.read_u64(&self.mem, ld::NOIRQ_END);
                look.context_ok = !(start <= rip && rip < end);
            }
        }
        let choice = choose(look);
        if let (Some(irq), Some(w)) = (choice.deliver, at) {
            if self.cpu.halted {
                data.write_u32(&self.mem, ld::IRQ_ENABLED, X86_EFLAGS_IF);
                self.cpu.halted = false;
            }
            self.cpu.irqs.clear(irq);
            tracing::trace!(irq, "delivering IRQ");
            let gate = self.lguest.traps.irq_gate(irq);
            self.deliver(w, FIRST_EXTERNAL_VECTOR + irq as u8, gate, None)?;
        }
        let pending = if choice.left != 0 { X86_EFLAGS_IF } else { 0 };
        data.write_u32(&self.mem, ld::IRQ_PENDING, pending);
        if choice.look_again {
            self.cpu.relook.soon();
        }
        Ok(())
    }

    /// Builds the interrupt frame where the context is and points the Guest
    /// at the gate.
    fn deliver(
        &mut self,
        at: Where,
        vector: u8,
        gate: Gate,
        error: Option<u64>,
    ) -> Result<(), Death> {
        if at == Where::Registers {
            self.cpu.complete_io()?;
        }
        let data = self.data();
        let ctx = self.cpu.context(&self.mem, at);
        let irq_enabled = data.read_u32(&self.mem, ld::IRQ_ENABLED);
        let what = Delivery {
            vector,
            gate,
            error,
        };
        let handler = self
            .lguest
            .traps
            .deliver(&self.mem, self.cpu.cr3, ctx, what, irq_enabled)?;
        self.cpu.set_context(&self.mem, at, handler);
        if gate.interrupt {
            data.write_u32(&self.mem, ld::IRQ_ENABLED, 0);
        }
        data.write_time(&self.mem);
        Ok(())
    }
}

impl Cpu {
    /// The registers KVM synced into kvm_run at the last exit, read in place
    /// (kvm-ioctls' `sync_regs()` would copy the whole block each time).
    fn synced(&mut self) -> &kvm_bindings::kvm_sync_regs {
        self.vm.vcpu.sync_regs_mut()
    }

    fn set_rax(&mut self, value: u64) {
        self.vm.vcpu.sync_regs_mut().regs.rax = value;
        self.vm.vcpu.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Lets KVM finish the last port I/O (KVM_RUN with immediate_exit), so
    /// the registers can be changed safely.
    fn complete_io(&mut self) -> Result<(), Death> {
        if !self.io_pending {
            return Ok(());
        }
        self.vm.vcpu.set_kvm_immediate_exit(1);
        let r = self.vm.vcpu.run().map(|_| ());
        self.vm.vcpu.set_kvm_immediate_exit(0);
        self.io_pending = false;
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(Death::Kvm(format!("KVM_RUN failed: {e}"))),
            Ok(()) => Err(Death::Kvm("KVM ran the Guest while completing I/O".into())),
        }
    }

    /// Sleeps until an IRQ is raised, or until input a device lets us serve
    /// ourselves arrives (a key for the console: no thread hand-off between
    /// it and the Guest).
    fn sleep(&mut self) -> Result<(), Death> {
        let backends = self.bus.inline_backends();
        let mut fds: Vec<libc::pollfd> = std::iter::once(self.irqs.wake.as_raw_fd())
            .chain(backends.iter().map(|b| b.0))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a live array of valid pollfds, and its length is
        // the count we pass; poll writes only their revents.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        for (fd, (_, device)) in fds[1..].iter().zip(&backends) {
            if fd.revents != 0 {
                self.bus
                    .backend_ready(*device)
                    .map_err(|e| Death::Device(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Reads word `i` of the stub frame at host virtual address `frame`.
    fn frame_word(&self, mem: &GuestMemory, frame: u64, i: u64) -> u64 {
        let off = frame - HOST_VA + i * 8;
        mem.read_host_u64(off / PAGE_SIZE, off % PAGE_SIZE)
    }

    fn set_frame_word(&self, mem: &GuestMemory, frame: u64, i: u64, v: u64) {
        let off = frame - HOST_VA + i * 8;
        mem.write_host_u64(off / PAGE_SIZE, off % PAGE_SIZE, v);
    }

    fn frame_ok(&self, frame: u64) -> bool {
        let stack = host_pages::host_va(self.layout.host_ro_pages);
        let top = host_pages::host_va(self.layout.host_pages());
        frame >= stack && frame + STUB_FRAME_WORDS as u64 * 8 <= top
    }

    fn context(&mut self, mem: &GuestMemory, at: Where) -> Context {
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
                rip: self.frame_word(mem, f, 0),
                rflags: self.frame_word(mem, f, 2),
                rsp: self.frame_word(mem, f, 3),
            },
        }
    }

    fn set_context(&mut self, mem: &GuestMemory, at: Where, ctx: Context) {
        match at {
            Where::Registers => {
                let r = &mut self.vm.vcpu.sync_regs_mut().regs;
                (r.rip, r.rsp, r.rflags) = (ctx.rip, ctx.rsp, ctx.rflags);
                self.vm.vcpu.set_sync_dirty_reg(SyncReg::Register);
            }
            Where::StubFrame(f) => {
                self.set_frame_word(mem, f, 0, ctx.rip);
                self.set_frame_word(mem, f, 1, GUEST_CS as u64);
                self.set_frame_word(mem, f, 2, ctx.rflags);
                self.set_frame_word(mem, f, 3, ctx.rsp);
                self.set_frame_word(mem, f, 4, GUEST_DS as u64);
            }
        }
    }

    /*
     * System registers, changed by hypercalls. These use the ioctls, not the
     * shared kvm_run copy, which is only read right after an exit.
     */

    fn update_sregs(
        &mut self,
        f: impl FnOnce(&mut kvm_bindings::kvm_sregs),
    ) -> Result<(), HcallError> {
        let kvm = |what: &str, e: kvm_ioctls::Error| {
            HcallError::Machine(format!("KVM {what} failed: {e}"))
        };
        let mut s = self.vm.vcpu.get_sregs().map_err(|e| kvm("get sregs", e))?;
        f(&mut s);
        self.vm.vcpu.set_sregs(&s).map_err(|e| kvm("set sregs", e))
    }
}

impl Machine for Cpu {
    fn set_ts(&mut self, on: bool) -> Result<(), HcallError> {
        self.update_sregs(|s| s.cr0 = if on { s.cr0 | CR0_TS } else { s.cr0 & !CR0_TS })
    }

    fn load_tls(&mut self, fs: u64, gs: u64) -> Result<(), HcallError> {
        self.update_sregs(|s| {
            s.fs.base = fs;
            s.gs.base = gs;
        })
    }

    /// Loads the top level NEW_PGTABLE or SET_PGD chose, after making the
    /// KVM forget a root it had used before we rewrote it; then flushes.
    fn switch_root(&mut self, switch: Switch) -> Result<(), HcallError> {
        if let Some(i) = switch.recycle {
            let phys = self.layout.shadow_root(i);
            self.vm
                .recycle_slot(phys)
                .map_err(|e| HcallError::Machine(e.to_string()))?;
        }
        self.cr3 = switch.cr3;
        self.flush_tlb()
    }

    /// No stale translation survives: load another CR3, then the Guest's.
    fn flush_tlb(&mut self) -> Result<(), HcallError> {
        let (flush, cr3) = (self.tables.flush_pml4, self.cr3);
        self.update_sregs(|s| s.cr3 = flush)?;
        self.update_sregs(|s| s.cr3 = cr3)
    }

    fn set_clockevent(&mut self, delta_ns: u64) {
        self.clock.set(delta_ns, &self.irqs);
    }

    fn halt(&mut self) -> Option<Shutdown> {
        if let Some(dma) = &self.dma {
            let (clock, irqs) = (&self.clock, &self.irqs);
            if dma.halt(|| clock.armed() || irqs.pending() & 1 << TIMER_IRQ != 0) {
                return Some(Shutdown::PowerOff("end of input".into()));
            }
        }
        self.halted = true;
        None
    }

    fn bind_dma(&mut self, key: u64, array: u64, count_irq: u64) -> Result<u64, HcallError> {
        match &self.dma {
            Some(dma) => Ok(dma.bind_dma(key, array, count_irq)?),
            None => Err(HcallError::NoDma(crate::hypercalls::Name(hcall::BIND_DMA))),
        }
    }

    fn send_dma(&mut self, key: u64, addr: u64) -> Result<(), HcallError> {
        match &self.dma {
            Some(dma) => Ok(dma.send_dma(key, addr)?),
            None => Err(HcallError::NoDma(crate::hypercalls::Name(hcall::SEND_DMA))),
        }
    }

    fn notify_device(&mut self, addr: u64) -> Result<bool, HcallError> {
        self.bus
            .notify(addr)
            .map_err(|e| HcallError::Machine(e.to_string()))
    }

    fn early_console(&mut self, text: &[u8]) {
        crate::devices::console::write_early(text, &self.irqs);
    }

    fn tsc_khz(&self) -> u32 {
        self.vm.tsc_khz
    }
}

impl Drop for Cpu {
    fn drop(&mut self) {
        crate::kick::set_kick_target(std::ptr::null_mut());
    }
}
