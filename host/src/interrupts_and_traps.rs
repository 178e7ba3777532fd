//! Interrupts and traps (ABI section 6), as lguest's interrupts_and_traps.c:
//! the gates the Guest loaded, which IRQ goes next, and the frames the Host
//! builds on the Guest's stack.
//!
//! The Guest runs in ring 3 and its IDT is the Host's, so the CPU never
//! delivers anything to it. Instead the Host decides, between exits, and
//! builds the frame the CPU would have pushed (lguest's
//! set_guest_interrupt): the vCPU loop ([`crate::vcpu`]) only says where the
//! interrupted context is and applies the new one.

use crate::memory::GuestMemory;
use crate::pagewalk::{translate, Access};
use lguest_abi::{
    vector_has_error_code, ENTRY_RFLAGS, FIRST_EXTERNAL_VECTOR, GUEST_CS, GUEST_DS,
    IGNORED_VECTORS, LGUEST_IRQS, STACK_MAX_PAGES, X86_EFLAGS_IF,
};

/// Sudden Death reasons of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrapError {
    #[error("LOAD_IDT_ENTRY: bad IDT vector {0}")]
    Vector(u64),
    #[error("LOAD_IDT_ENTRY: bad IDT gate type {type_} for vector {vector}")]
    GateType { type_: u8, vector: u64 },
    #[error(
        "LOAD_IDT_ENTRY: bad IDT gate offset {offset:#x} for vector {vector}: not a lower-half address"
    )]
    GateOffset { offset: u64, vector: u64 },
    #[error("SET_STACK: bad selector {0:#x}")]
    StackSelector(u64),
    #[error("SET_STACK: bad page count {0}")]
    StackPages(u64),
    #[error("Guest stack overflow (RSP {0:#x})")]
    StackOverflow(u64),
    #[error("cannot deliver vector {vector}: bad stack {sp:#x}")]
    BadStack { vector: u8, sp: u64 },
    #[error("unhandled trap {vector} at {rip:#x} (error {error:#x}, cr2 {cr2:#x}){hint}")]
    Unhandled {
        vector: u8,
        rip: u64,
        error: u64,
        cr2: u64,
        /// What the Guest most likely got wrong, when we can tell.
        hint: &'static str,
    },
}

/// The interrupted ring-3 context: all a frame needs, and all delivery
/// changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
}

/// One vector to deliver: through which gate, with which error code.
#[derive(Clone, Copy, Debug)]
pub struct Delivery {
    pub vector: u8,
    pub gate: Gate,
    pub error: Option<u64>,
}

/// The Guest's side of the IDT and its interrupt stack.
#[derive(Debug)]
pub struct Traps {
    idt: [Option<Gate>; 256],
    /// SET_STACK: (top, pages).
    stack: Option<(u64, u64)>,
}

impl Default for Traps {
    fn default() -> Self {
        Traps {
            idt: [None; 256],
            stack: None,
        }
    }
}

impl Traps {
    /// LOAD_IDT_ENTRY.
    pub fn load_idt_entry(&mut self, vector: u64, low: u64, high: u64) -> Result<(), TrapError> {
        if vector > 255 {
            return Err(TrapError::Vector(vector));
        }
        if !IGNORED_VECTORS.contains(&vector) {
            self.idt[vector as usize] = decode_gate(vector, low, high)?;
        }
        Ok(())
    }

    /// SET_STACK.
    pub fn set_stack(&mut self, selector: u64, top: u64, pages: u64) -> Result<(), TrapError> {
        if selector != GUEST_DS as u64 {
            return Err(TrapError::StackSelector(selector));
        }
        if pages > STACK_MAX_PAGES {
            return Err(TrapError::StackPages(pages));
        }
        self.stack = (pages != 0).then_some((top, pages));
        Ok(())
    }

    /// The IRQs whose vector has a present gate, as a mask.
    pub fn irq_gates(&self) -> u32 {
        (0..LGUEST_IRQS)
            .filter(|irq| self.idt[(FIRST_EXTERNAL_VECTOR as u32 + irq) as usize].is_some())
            .fold(0, |mask, irq| mask | 1 << irq)
    }

    /// A trap (vector 0-31) the Guest's code raised: its gate, or Sudden
    /// Death when the Guest has none.
    pub fn trap_gate(&self, vector: u8, rip: u64, error: u64, cr2: u64) -> Result<Gate, TrapError> {
        self.idt[vector as usize].ok_or(TrapError::Unhandled {
            vector,
            rip,
            error,
            cr2,
            hint: "",
        })
    }

    /// The gate of IRQ `irq`, which [`choose`] only picks with one.
    pub fn irq_gate(&self, irq: u32) -> Gate {
        self.idt[FIRST_EXTERNAL_VECTOR as usize + irq as usize].expect("candidates have gates")
    }

    /*H:430 lguest's set_guest_interrupt: push the frame the CPU would have
     * pushed, on the Guest's stack (through its own page tables, at `cr3`),
     * and return the context that enters the handler. The frame's IF is the
     * virtual one, irq_enabled. */
    pub fn deliver(
        &self,
        mem: &GuestMemory,
        cr3: u64,
        ctx: Context,
        Delivery {
            vector,
            gate,
            error,
        }: Delivery,
        irq_enabled: u32,
    ) -> Result<Context, TrapError> {
        let base = frame_base(ctx.rsp, self.stack).ok_or(TrapError::StackOverflow(ctx.rsp))?;
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
        let error = error.filter(|_| vector_has_error_code(vector));
        let words = &frame[..5 + usize::from(error.is_some())];
        let mut sp = base;
        let ram = mem.layout.mem;
        for &w in words {
            sp = sp.wrapping_sub(8);
            // Frames go in RAM only: not device pages, not the mmio hole.
            let pa = translate(mem, cr3, sp, Access::Write)
                .filter(|pa| pa.checked_add(8).is_some_and(|end| end <= ram))
                .ok_or(TrapError::BadStack { vector, sp })?;
            mem.write_u64(pa, w).expect("checked");
        }
        Ok(Context {
            rip: gate.offset,
            rsp: sp,
            rflags: ENTRY_RFLAGS,
        })
    }
}

/// What the Host knows when it looks for an IRQ to deliver.
#[derive(Clone, Copy, Debug)]
pub struct Look {
    /// Pending, unblocked IRQs with a gate.
    pub candidates: u32,
    /// The interrupted context may take a frame now: ring 3, not in the
    /// noirq window.
    pub context_ok: bool,
    /// irq_enabled has IF set.
    pub enabled: bool,
    pub halted: bool,
}

/// ABI section 6's choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The IRQ to deliver now, if any (the lowest candidate).
    pub deliver: Option<u32>,
    /// Candidates left undelivered: irq_pending says so.
    pub left: u32,
    /// Look again within 1 ms: something waits for a reason other than
    /// irq_enabled being off (which the Guest ends with SEND_INTERRUPTS).
    pub look_again: bool,
}

/// Decides what to deliver (a halted Guest wakes for any candidate).
/*H:420 Which IRQ goes next: the lowest candidate, if the Guest can take
 * it now. Otherwise irq_pending tells the Guest, and the 1 ms re-look makes
 * sure a window that closes without an exit doesn't strand it. */
pub fn choose(look: Look) -> Choice {
    let c = look.candidates;
    if c == 0 {
        return Choice {
            deliver: None,
            left: 0,
            look_again: false,
        };
    }
    if look.context_ok && (look.halted || look.enabled) {
        let irq = c.trailing_zeros();
        let left = c & !(1 << irq);
        Choice {
            deliver: Some(irq),
            left,
            look_again: left != 0,
        }
    } else {
        Choice {
            deliver: None,
            left: c,
            look_again: !look.context_ok,
        }
    }
}

/// A gate the Guest loaded with LOAD_IDT_ENTRY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate {
    pub offset: u64,
    /// Interrupt gates clear irq_enabled on delivery; trap gates don't.
    pub interrupt: bool,
}

/// Decodes a 16-byte gate; `Ok(None)` when it is not present.
pub fn decode_gate(vector: u64, low: u64, high: u64) -> Result<Option<Gate>, TrapError> {
    if low & (1 << 47) == 0 {
        return Ok(None);
    }
    let type_ = ((low >> 40) & 0xF) as u8;
    if type_ != lguest_abi::GATE_INTERRUPT && type_ != lguest_abi::GATE_TRAP {
        return Err(TrapError::GateType { type_, vector });
    }
    let offset = (low & 0xFFFF) | ((low >> 48) << 16) | ((high & 0xFFFF_FFFF) << 32);
    if offset >= lguest_abi::RESERVE_MEM {
        return Err(TrapError::GateOffset { offset, vector });
    }
    Ok(Some(Gate {
        offset,
        interrupt: type_ == lguest_abi::GATE_INTERRUPT,
    }))
}

/// Where the Host puts a frame: ABI section 6's stack rule. `stack` is the
/// SET_STACK (top, pages), if on. Returns the new RSP before pushes, or
/// `None` when RSP is in the guard page below the stack (an overflow).
pub fn frame_base(rsp: u64, stack: Option<(u64, u64)>) -> Option<u64> {
    let base = match stack {
        None => rsp.wrapping_sub(lguest_abi::RED_ZONE),
        Some((top, pages)) => {
            let bottom = top.wrapping_sub(pages * lguest_abi::PAGE_SIZE);
            if bottom < rsp && rsp <= top {
                rsp.wrapping_sub(lguest_abi::RED_ZONE)
            } else if bottom.wrapping_sub(lguest_abi::PAGE_SIZE) < rsp && rsp <= bottom {
                return None;
            } else {
                top
            }
        }
    };
    Some(base & !15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_decode_and_bad_types_are_refused() {
        let g = crate::host_pages::gate(0x20_1234, 0x10, 0xE, 0);
        let low = u64::from_le_bytes(g[0..8].try_into().unwrap());
        let high = u64::from_le_bytes(g[8..16].try_into().unwrap());
        assert_eq!(
            decode_gate(32, low, high),
            Ok(Some(Gate {
                offset: 0x20_1234,
                interrupt: true
            }))
        );
        assert_eq!(decode_gate(32, low & !(1 << 47), high), Ok(None));
        let type5 = (low & !(0xF << 40)) | (5 << 40);
        assert!(decode_gate(32, type5, high)
            .unwrap_err()
            .to_string()
            .contains("bad IDT gate type 5"));
        assert!(decode_gate(32, low, 0xFFFF_8000).is_err());
    }

    #[test]
    fn frame_base_follows_the_stack_rule() {
        // No SET_STACK: skip the red zone, align down.
        assert_eq!(frame_base(0x10_0008, None), Some((0x10_0008 - 128) & !15));
        let stack = Some((0x20_0000, 2));
        // Inside the stack: nest below the red zone.
        assert_eq!(frame_base(0x1F_F000, stack), Some(0x1F_F000 - 128));
        // Exactly at the top counts as inside.
        assert_eq!(frame_base(0x20_0000, stack), Some(0x20_0000 - 128));
        // In the page below the stack: overflow.
        assert_eq!(frame_base(0x1F_E000 - 8, stack), None);
        // Elsewhere: switch to the top.
        assert_eq!(frame_base(0x50_0000, stack), Some(0x20_0000));
    }

    #[test]
    fn choose_follows_section_6() {
        let look = |candidates, context_ok, enabled, halted| {
            choose(Look {
                candidates,
                context_ok,
                enabled,
                halted,
            })
        };
        // The lowest candidate; another left means look again.
        assert_eq!(look(0b110, true, true, false).deliver, Some(1));
        assert!(look(0b110, true, true, false).look_again);
        // irq_enabled off: nothing, and no re-look (SEND_INTERRUPTS).
        let off = look(0b1, true, false, false);
        assert_eq!((off.deliver, off.left, off.look_again), (None, 1, false));
        // Halted: delivered even with irq_enabled off.
        assert_eq!(look(0b1, true, false, true).deliver, Some(0));
        // In the noirq window: wait, and look again soon.
        let noirq = look(0b1, false, true, false);
        assert_eq!((noirq.deliver, noirq.look_again), (None, true));
    }
}
