//! The console of the 2007 model, as hvc_lguest.c drove it: output is
//! SEND_DMA to key 0, the bytes as they are, written out before the call
//! returns; input arrives in a buffer we bind at key 0.
//!
//! One input buffer, not several: the Host fills the first free one, so
//! with two we could not tell which was filled first. Input that doesn't
//! fit waits in the Launcher until we have read ours and set its used_len
//! back to 0. End of input never reaches us: the Launcher powers us off.

use core::sync::atomic::{compiler_fence, Ordering};

use lguest_abi::{LguestDma, LGUEST_CONSOLE_DMA_KEY, LGUEST_MAX_DMA_SECTIONS, PAGE_SIZE};

use super::{bind, irq, Dma};
use crate::cell::GuestCell;
use crate::console::Error;
use crate::shell::{Input, Terminal};
use crate::time::Deadline;

const IN_SIZE: usize = 1024;

/// The input buffer and its lguest_dma, on one page so neither crosses one.
#[repr(C, align(4096))]
struct InPage {
    dma: LguestDma,
    data: [u8; IN_SIZE],
}

static INPUT: GuestCell<InPage> = GuestCell::new(InPage {
    dma: Dma::EMPTY.0,
    data: [0; IN_SIZE],
});

fn input_dma() -> *mut LguestDma {
    // SAFETY: a field of our own static; no reference is made.
    unsafe { &raw mut (*INPUT.as_ptr()).dma }
}

pub struct Console {
    /// How much of the input buffer we have read.
    read: usize,
}

impl Console {
    pub fn probe(at: usize) -> Result<Console, Error> {
        // SAFETY: a field of our own static.
        let data = unsafe { &raw mut (*INPUT.as_ptr()).data } as u64;
        // SAFETY: not bound yet, so the Host doesn't write it.
        unsafe { input_dma().write_volatile(Dma::over(data, IN_SIZE)?.0) };
        // SAFETY: INPUT is reached only through raw pointers from now on.
        unsafe { bind(LGUEST_CONSOLE_DMA_KEY, input_dma(), 1, irq(at))? };
        Ok(Console { read: 0 })
    }

    /// Bytes the Host has put in the input buffer (0: it's free).
    fn used(&self) -> usize {
        // SAFETY: the bound lguest_dma, read as a whole word.
        let used = unsafe { (&raw const (*input_dma()).used_len).read_volatile() };
        (used as usize).min(IN_SIZE)
    }
}

/// SEND_DMA to key 0: the bytes the Launcher took, all of them unless its
/// stdout failed.
pub fn send(bytes: &[u8]) -> usize {
    // A slice this long spans at most 16 pages: one lguest_dma.
    let chunk = PAGE_SIZE as usize * (LGUEST_MAX_DMA_SECTIONS - 1);
    let send = |part: &[u8]| Dma::over(part.as_ptr() as u64, part.len()).map(|mut d| d.send(0));
    bytes
        .chunks(chunk)
        .map(|part| send(part).unwrap_or(0) as usize)
        .sum()
}

impl Terminal for Console {
    fn poll(&mut self, out: &mut [u8]) -> Input {
        let used = self.used();
        if self.read >= used {
            return Input::Nothing;
        }
        let take = (used - self.read).min(out.len());
        // SAFETY: a field of our own static.
        let data = unsafe { &raw const (*INPUT.as_ptr()).data }.cast::<u8>();
        for (i, byte) in out[..take].iter_mut().enumerate() {
            // SAFETY: inside the buffer, which the Host filled and won't
            // touch again until we free it.
            *byte = unsafe { data.add(self.read + i).read_volatile() };
        }
        self.read += take;
        if self.read == used {
            // All read: free it for the Host, after the last byte.
            compiler_fence(Ordering::SeqCst);
            self.read = 0;
            // SAFETY: as in `used`.
            unsafe { (&raw mut (*input_dma()).used_len).write_volatile(0) };
        }
        Input::Bytes(take)
    }

    /// Nothing to ask for: the Host raises our IRQ whenever it fills the
    /// buffer.
    fn arm_rx(&mut self) -> bool {
        self.used() != 0
    }

    fn send(&mut self, bytes: &[u8]) {
        send(bytes);
    }

    /// Output is written before SEND_DMA returns: nothing to wait for.
    fn drain(&mut self, _deadline: Option<&Deadline>) -> bool {
        true
    }
}
