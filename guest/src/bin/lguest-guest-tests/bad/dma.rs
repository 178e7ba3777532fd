//! `bad=dma-*`: break the rules of the 2007 model (ABI section 9), which the
//! Host must answer with Sudden Death. Boot with the model
//! (`--transport=dma`), and for `dma-align` a disk or network, whose page
//! holds the key.
//!
//! Each case makes one BIND_DMA or SEND_DMA that would be fine but for
//! the one thing it breaks; the bytes involved are ours and harmless.

use lguest_abi::{hcall as nr, LguestDma, DEVICE_MODEL_DMA, LGUEST_CONSOLE_DMA_KEY, PAGE_SIZE};

use lguest_guest::cell::GuestCell;
use lguest_guest::dma::{self, Dma};
use lguest_guest::{boot, lguest_data};

use super::deadly;

/// Live bindings the Host allows; one more must end us.
const MAX_BINDINGS: usize = 32;

/// Two pages of harmless bytes for sections to point at.
#[repr(C, align(4096))]
struct Pages([u8; 2 * PAGE_SIZE as usize]);

static DATA: GuestCell<Pages> = GuestCell::new(Pages([b'.'; 2 * PAGE_SIZE as usize]));
/// lguest_dma to bind, each on its own: none crosses a page.
static ARRAYS: GuestCell<[Dma; MAX_BINDINGS + 1]> = GuestCell::new([Dma::EMPTY; MAX_BINDINGS + 1]);

/// Whether `case` is one of ours.
pub fn is_dma_case(case: &str) -> bool {
    matches!(
        case,
        "dma-key" | "dma-align" | "dma-bindings" | "dma-cross" | "dma-ram" | "dma-hostpage"
    )
}

/// SEND_DMA of `dma` to `key`, which must end us.
fn send(key: u64, dma: &Dma) {
    deadly(nr::SEND_DMA, key, &raw const dma.0 as u64, 0);
}

/// BIND_DMA of ARRAYS[i] at `key` for IRQ 1: whether the Host bound it.
fn bind(key: u64, i: usize) -> bool {
    // SAFETY: in bounds of our own static; no reference is made.
    let array = unsafe { ARRAYS.as_ptr().cast::<Dma>().add(i) }.cast::<LguestDma>();
    // SAFETY: the array and its sections (DATA) are ours and only ever
    // reached through raw pointers; whatever the Host puts there harms
    // nothing.
    unsafe { dma::bind(key, array, 1, 1) }.is_ok()
}

/// Break the rule `case` names. Returns only if the Host let us live.
pub fn run(case: &str, label: &str) {
    if boot::device_model() != DEVICE_MODEL_DMA {
        lguest_guest::fail(
            label,
            format_args!("needs the 2007 device model (boot with --transport=dma)"),
        );
    }
    let data = DATA.as_ptr() as u64;
    let section = |addr: u64, len: u16| {
        let mut dma = Dma::EMPTY;
        (dma.0.addr[0], dma.0.len[0]) = (addr, len);
        dma
    };
    let good = section(data, 64);
    for i in 0..=MAX_BINDINGS {
        // SAFETY: not bound yet; in bounds of our own static.
        unsafe { ARRAYS.as_ptr().cast::<Dma>().add(i).write_volatile(good) };
    }
    match case {
        // Our own RAM is no device's page.
        "dma-key" => send(data, &good),
        "dma-align" => {
            let table = dma::table();
            let Some(e) = table.iter().find(|e| e.pfn != 0) else {
                lguest_guest::fail(
                    label,
                    format_args!("needs a disk or network (--block=FILE) for its page"),
                );
            };
            bind(((e.pfn as u64) << 12) + 2, 0);
        }
        "dma-bindings" => {
            for i in 0..MAX_BINDINGS {
                if !bind(LGUEST_CONSOLE_DMA_KEY, i) {
                    lguest_guest::fail(
                        label,
                        format_args!("BIND_DMA number {} was refused", i + 1),
                    );
                }
            }
            bind(LGUEST_CONSOLE_DMA_KEY, MAX_BINDINGS);
        }
        "dma-cross" => send(
            LGUEST_CONSOLE_DMA_KEY,
            &section(data + PAGE_SIZE - 100, 200),
        ),
        // The device table page: ours to read, but not RAM.
        "dma-ram" => send(LGUEST_CONSOLE_DMA_KEY, &section(boot::mem(), 12)),
        // The lguest_dma itself in the Host's first page.
        "dma-hostpage" => deadly(
            nr::SEND_DMA,
            LGUEST_CONSOLE_DMA_KEY,
            lguest_data::pfn_limit() << 12,
            0,
        ),
        _ => unreachable!("not a dma case: {case}"),
    }
}
