//! The vCPU's side of gdb ([`crate::gdb`]): traps become stops, stops are
//! served wherever the Guest's context lies (in the vCPU's registers, or in
//! the stub frame after a trap), and nothing of it shows to the Guest.
//!
//! Three hooks in the vCPU loop:
//! - [`Guest::debug_trap`], first thing in `handle_trap`: our `int3` (RIP is
//!   rewound onto it) and our single step's #DB are the debugger's and are
//!   never reflected; any trap ends a step, and the TF we set is taken out of
//!   the frame before the Host builds one for the Guest from it;
//! - [`Guest::debug_before_look`], in `prepare_entry` before interrupts are
//!   delivered: stop here if a trap, a finished step or gdb's Ctrl-C says
//!   so, and hold interrupts back while a step is under way;
//! - [`Guest::debug_before_entry`], last thing before KVM_RUN: set TF for a
//!   step, now that no frame will be built from the flags.
//!
//! How a step ends depends on the instruction. A hypercall is stepped
//! without TF and ends at its exit (with TF the Guest would run one more
//! instruction on PVM, which finishes an `out` before it exits and loses the
//! #DB). Anything else gets TF and ends at its #DB, at another trap (the
//! instruction faulted: the step ends at the Guest's handler), or at an I/O
//! exit that left RIP past the instruction (an `out` on PVM again).

use super::{Death, Guest, Where};
use crate::gdb::{self, Debugger, Regs, Resume, Served, Step, StopReason, Tf};
use crate::pagewalk::{translate, Access};
use gdbstub::common::Signal;
use gdbstub_arch::x86::reg::{X86SegmentRegs, X86_64CoreRegs};
use kvm_ioctls::SyncReg;
use lguest_abi::{INT_1F_BYTES, OUT_1F_BYTES, VEC_BP, VEC_DB};

/// The debugger ends the Guest (gdb's `kill`, or a KVM call it needed
/// failed).
fn kill(reason: impl Into<String>) -> Death {
    Death::Kvm(reason.into())
}

/// RFLAGS.TF: a #DB after every instruction.
const TF: u64 = 1 << 8;

impl Guest {
    /// Hands a gdb session to this boot of the Guest.
    pub fn attach_gdb(&mut self, mut debugger: Box<Debugger>) {
        // Before the first KVM_RUN, kvm_run's copy of the registers is
        // empty; the loop reads that copy, and gdb must get the Guest at its
        // first instruction. (Nothing is marked dirty: KVM keeps its own.)
        if let (Ok(regs), Ok(sregs)) = (self.cpu.vm.vcpu.get_regs(), self.cpu.vm.vcpu.get_sregs()) {
            let synced = self.cpu.vm.vcpu.sync_regs_mut();
            (synced.regs, synced.sregs) = (regs, sregs);
        }
        let cr3 = self.cpu.vm.vcpu.get_sregs().map_or(self.cpu.cr3, |s| s.cr3);
        debugger.attach(self.mem.clone(), cr3, self.cpu.irqs.clone());
        self.gdb = Some(debugger);
    }

    /// Takes the session back (None if gdb has gone).
    pub fn take_gdb(&mut self) -> Option<Box<Debugger>> {
        self.gdb.take()
    }

    /// A trap while gdb is attached, before anything else looks at it: true
    /// if it was the debugger's own.
    pub(super) fn debug_trap(&mut self, vector: u8, iret: u64) -> bool {
        let Some(step) = self.gdb.as_ref().map(|d| d.step) else {
            return false;
        };
        if matches!(step, Some(Step { tf: Tf::Ours, .. })) {
            let rflags = self.cpu.frame_word(&self.mem, iret, 2);
            self.cpu.set_frame_word(&self.mem, iret, 2, rflags & !TF);
        }
        let rip = self.cpu.frame_word(&self.mem, iret, 0);
        let cr3 = self.cpu.synced().sregs.cr3;
        let site = rip.wrapping_sub(1);
        let dbg = self.gdb.as_mut().expect("attached");
        if vector == VEC_BP && dbg.view().is_breakpoint(cr3, site) {
            dbg.pending = Some(StopReason::SwBreak(()));
            // #BP leaves RIP after the int3: gdb wants it on the breakpoint.
            self.cpu.set_frame_word(&self.mem, iret, 0, site);
            return true;
        }
        if step.is_some() {
            dbg.pending = Some(StopReason::DoneStep);
            return vector == VEC_DB;
        }
        false
    }

    /// Before interrupts are looked at: stop for gdb if it is time. Returns
    /// where interrupts may be delivered: nowhere while a step is under way
    /// (a step doesn't wander into an interrupt handler), unless the Guest
    /// is halted (then only an interrupt can end the step).
    pub(super) fn debug_before_look(&mut self, at: Option<Where>) -> Result<Option<Where>, Death> {
        let Some(dbg) = self.gdb.as_mut() else {
            return Ok(at);
        };
        if dbg.input_ready() {
            dbg.take_input();
        }
        // In a ring-0 stub, there is no Guest context to stop at yet.
        let Some(w) = at else {
            return Ok(self.irqs_allowed(at));
        };
        let rip = self.cpu.context(&self.mem, w).rip;
        let io = self.cpu.io_pending;
        let dbg = self.gdb.as_mut().expect("attached");
        let reason = if dbg.gone() {
            None
        } else if let Some(reason) = dbg.pending.take() {
            Some(reason)
        } else if dbg.interrupted() {
            Some(StopReason::Signal(Signal::SIGINT))
        } else if dbg.is_idle() {
            // Just attached: gdb has the Guest before its first instruction.
            None
        } else if let Some(step) = dbg.step {
            // Whatever exit we are looking at came before the step began.
            if !step.entered {
                return Ok(self.irqs_allowed(at));
            }
            let hypercall_done = step.hypercall && (io || rip != step.from);
            let out_done = step.tf == Tf::Ours && io && w == Where::Registers && rip != step.from;
            // Only a hypercall halts: one made some other way (`out` from
            // DX) is done too, before an interrupt is built on our TF.
            let halt_done = step.tf == Tf::Ours && self.cpu.halted;
            if !hypercall_done && !out_done && !halt_done {
                return Ok(self.irqs_allowed(at));
            }
            Some(StopReason::DoneStep)
        } else {
            return Ok(at);
        };
        self.debug_stop(w, reason)?;
        Ok(self.irqs_allowed(at))
    }

    fn irqs_allowed(&self, at: Option<Where>) -> Option<Where> {
        let stepping = self.gdb.as_ref().is_some_and(|d| d.step.is_some());
        if stepping && !self.cpu.halted {
            None
        } else {
            at
        }
    }

    /// Just before the Guest runs: a step from a halt ends here, on the
    /// interrupt handler that woke the Guest; any other step gets its TF.
    pub(super) fn debug_before_entry(&mut self) -> Result<(), Death> {
        loop {
            let Some(step) = self.gdb.as_ref().and_then(|d| d.step) else {
                return Ok(());
            };
            let in_ring3 = self.cpu.synced().sregs.cs.selector & 3 == 3;
            let w = match self.cpu.trap_frame {
                Some(frame) => Where::StubFrame(frame),
                None if in_ring3 => Where::Registers,
                None => return Ok(()),
            };
            if step.from_halt {
                self.debug_stop(w, Some(StopReason::DoneStep))?;
                continue;
            }
            if step.entered {
                return Ok(());
            }
            let tf = if step.hypercall {
                Tf::NotSet
            } else {
                let mut ctx = self.cpu.context(&self.mem, w);
                if ctx.rflags & TF == 0 {
                    ctx.rflags |= TF;
                    self.cpu.set_context(&self.mem, w, ctx);
                    Tf::Ours
                } else {
                    Tf::Guests
                }
            };
            if let Some(step) = self.gdb.as_mut().and_then(|d| d.step.as_mut()) {
                (step.entered, step.tf) = (true, tf);
            }
            return Ok(());
        }
    }

    /// The Guest stops at `w`: tell gdb why (`None`: it already knows) and
    /// serve it until it lets the Guest go on.
    fn debug_stop(&mut self, w: Where, reason: Option<StopReason>) -> Result<(), Death> {
        // TF goes before the I/O is completed: a KVM that finishes an `out`
        // at the next KVM_RUN (VT-x) would raise its #DB then.
        self.end_step(w);
        if w == Where::Registers {
            self.cpu.complete_io()?;
        }
        let cr3 = self
            .cpu
            .vm
            .vcpu
            .get_sregs()
            .map_err(|e| kill(format!("KVM get sregs failed: {e}")))?
            .cr3;
        let regs = self.debug_regs(w)?;
        let mut dbg = self.gdb.take().expect("attached");
        if let Some(reason) = reason {
            dbg.report(reason);
        }
        let served = if dbg.gone() {
            Served::Detach
        } else {
            dbg.serve(cr3, regs.clone())
        };
        if let Some(new) = dbg.written() {
            self.set_debug_regs(w, &regs, &new)?;
        }
        match served {
            Served::Resume(how) => {
                if how == Resume::Step {
                    dbg.step = Some(self.begin_step(w, &dbg));
                }
                if dbg.interrupted() {
                    // A Ctrl-C came with the resume: stop again at once.
                    self.cpu.irqs.kick();
                }
                self.gdb = Some(dbg);
                Ok(())
            }
            Served::Detach => {
                dbg.remove_breakpoints();
                tracing::debug!("gdb detached");
                Ok(())
            }
            Served::Kill => {
                dbg.remove_breakpoints();
                Err(kill("killed by gdb"))
            }
            Served::UserStop => Err(Death::User),
        }
    }

    fn begin_step(&mut self, w: Where, dbg: &Debugger) -> Step {
        let from = self.cpu.context(&self.mem, w).rip;
        let mut code = [0u8; 2];
        let n = dbg.view().read_virtual(from, &mut code);
        let hypercall = n == 2 && (code == INT_1F_BYTES || code == OUT_1F_BYTES);
        // pushf, perhaps with an operand-size or REX prefix.
        let pushf = match code {
            [0x9C, _] => Some(1),
            [0x40..=0x4F | 0x66, 0x9C] if n == 2 => Some(2),
            _ => None,
        };
        Step {
            from,
            hypercall,
            from_halt: self.cpu.halted,
            pushf,
            tf: Tf::NotSet,
            entered: false,
        }
    }

    /// A step is over: our TF comes out of the Guest's flags, and out of
    /// the flags a stepped `pushf` put on its stack.
    fn end_step(&mut self, w: Where) {
        let Some(step) = self.gdb.as_mut().and_then(|d| d.step.take()) else {
            return;
        };
        if step.tf != Tf::Ours {
            return;
        }
        let mut ctx = self.cpu.context(&self.mem, w);
        ctx.rflags &= !TF;
        self.cpu.set_context(&self.mem, w, ctx);
        if step.pushf.is_some_and(|len| ctx.rip == step.from + len) {
            // TF is bit 0 of the pushed word's second byte.
            let cr3 = self.cpu.synced().sregs.cr3;
            if let Some(pa) = translate(&self.mem, cr3, ctx.rsp + 1, Access::Write) {
                let mut byte = [0u8];
                if self.mem.read(pa, &mut byte).is_ok() {
                    let _ = self.mem.write(pa, &[byte[0] & !1]);
                }
            }
        }
    }

    /// The Guest's registers as gdb sees them.
    fn debug_regs(&mut self, w: Where) -> Result<Regs, Death> {
        let sregs = self
            .cpu
            .vm
            .vcpu
            .get_sregs()
            .map_err(|e| kill(format!("KVM get sregs failed: {e}")))?;
        let fpu = self
            .cpu
            .vm
            .vcpu
            .get_fpu()
            .map_err(|e| kill(format!("KVM get FPU failed: {e}")))?;
        let ctx = self.cpu.context(&self.mem, w);
        let (cs, ss) = match w {
            Where::Registers => (sregs.cs.selector.into(), sregs.ss.selector.into()),
            Where::StubFrame(f) => (
                self.cpu.frame_word(&self.mem, f, 1) as u32,
                self.cpu.frame_word(&self.mem, f, 4) as u32,
            ),
        };
        let r = self.cpu.synced().regs;
        let mut core = X86_64CoreRegs {
            regs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, ctx.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            eflags: ctx.rflags as u32,
            rip: ctx.rip,
            segments: X86SegmentRegs {
                cs,
                ss,
                ds: sregs.ds.selector.into(),
                es: sregs.es.selector.into(),
                fs: sregs.fs.selector.into(),
                gs: sregs.gs.selector.into(),
            },
            ..Default::default()
        };
        gdb::fpu_to_gdb(&fpu, &mut core);
        Ok(Regs {
            core,
            fs_base: sregs.fs.base,
            gs_base: sregs.gs.base,
        })
    }

    /// Puts back registers gdb changed (already checked by the stub).
    fn set_debug_regs(&mut self, w: Where, old: &Regs, new: &Regs) -> Result<(), Death> {
        let g = new.core.regs;
        {
            let r = &mut self.cpu.vm.vcpu.sync_regs_mut().regs;
            (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp) =
                (g[0], g[1], g[2], g[3], g[4], g[5], g[6]);
            (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
                (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        }
        self.cpu.vm.vcpu.set_sync_dirty_reg(SyncReg::Register);
        let mut ctx = self.cpu.context(&self.mem, w);
        (ctx.rip, ctx.rsp) = (new.core.rip, g[7]);
        ctx.rflags = (ctx.rflags & !0xFFFF_FFFF) | u64::from(new.core.eflags);
        self.cpu.set_context(&self.mem, w, ctx);

        let (s, o) = (new.core.segments.clone(), old.core.segments.clone());
        let bases = (new.fs_base, new.gs_base);
        if (s.ds, s.es, s.fs, s.gs) != (o.ds, o.es, o.fs, o.gs)
            || bases != (old.fs_base, old.gs_base)
        {
            self.cpu.update_sregs(|sregs| {
                // A selector gdb sets is null or the Guest's flat data segment.
                let data = sregs.ss;
                for (seg, new, old) in [
                    (&mut sregs.ds, s.ds, o.ds),
                    (&mut sregs.es, s.es, o.es),
                    (&mut sregs.fs, s.fs, o.fs),
                    (&mut sregs.gs, s.gs, o.gs),
                ] {
                    if new != old {
                        *seg = if new == 0 {
                            kvm_bindings::kvm_segment {
                                unusable: 1,
                                ..Default::default()
                            }
                        } else {
                            kvm_bindings::kvm_segment {
                                selector: new as u16,
                                ..data
                            }
                        };
                    }
                }
                (sregs.fs.base, sregs.gs.base) = bases;
            })?;
        }
        let fpu_of = |c: &X86_64CoreRegs| (c.st, c.fpu.clone(), c.xmm, c.mxcsr);
        if fpu_of(&new.core) != fpu_of(&old.core) {
            let mut fpu = self
                .cpu
                .vm
                .vcpu
                .get_fpu()
                .map_err(|e| kill(format!("KVM get FPU failed: {e}")))?;
            gdb::gdb_to_fpu(&new.core, &mut fpu);
            self.cpu
                .vm
                .vcpu
                .set_fpu(&fpu)
                .map_err(|e| kill(format!("KVM set FPU failed: {e}")))?;
        }
        Ok(())
    }
}
