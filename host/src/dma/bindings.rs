//! BIND_DMA's bookkeeping and every rule that moving bytes must keep.
//!
//! A binding is just `(key, array, count, irq)`: the Host keeps nothing of
//! the Guest's buffers themselves. Each time bytes go into a bound buffer,
//! the array is read again from Guest memory and its sections checked again,
//! because the Guest may have rewritten them since BIND_DMA (a 2007 Guest
//! did so for every receive buffer it refilled).

use super::{Call, DeviceTable, DmaError, GuestRam, Misplaced};
use lguest_abi::{
    dma_off, LguestDma, BIND_DMA_COUNT_SHIFT, BIND_DMA_IRQ_MASK, LGUEST_IRQS, LGUEST_MAX_DMA,
    LGUEST_MAX_DMA_SECTIONS, PAGE_SIZE,
};
use zerocopy::FromBytes;

/// Bytes of one `struct lguest_dma`.
pub const DMA_SIZE: u64 = core::mem::size_of::<LguestDma>() as u64;

/// One live BIND_DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    pub key: u64,
    /// Guest-physical address of the first lguest_dma of the array.
    pub array: u64,
    pub count: u32,
    pub irq: u32,
}

/// Where bytes went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The bytes taken (the buffer's used_len now).
    pub bytes: u32,
    /// The binding's IRQ: the caller raises it.
    pub irq: u32,
    /// The lguest_dma that took them.
    pub dma: u64,
}

/// The first free buffer at a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeBuffer {
    pub dma: u64,
    /// The sum of its section lengths.
    pub capacity: u32,
    pub irq: u32,
}

/// Whether `[addr, addr + len)` lies in RAM without crossing a page.
pub fn placement(mem: &dyn GuestRam, addr: u64, len: u64) -> Result<(), Misplaced> {
    match addr.checked_add(len) {
        Some(end) if end <= mem.ram_size() => {
            if len > 0 && addr / PAGE_SIZE != (end - 1) / PAGE_SIZE {
                Err(Misplaced::CrossesPage)
            } else {
                Ok(())
            }
        }
        _ if addr >= mem.host_base() => Err(Misplaced::InHostPage),
        _ => Err(Misplaced::OutsideRam),
    }
}

/// Reads the lguest_dma at `addr`, after checking it lies in RAM within one
/// page.
pub fn read_dma(mem: &dyn GuestRam, call: Call, addr: u64) -> Result<LguestDma, DmaError> {
    placement(mem, addr, DMA_SIZE).map_err(|place| DmaError::BadDma { call, addr, place })?;
    let mut bytes = [0u8; DMA_SIZE as usize];
    mem.read(addr, &mut bytes)
        .expect("placement checked it lies in RAM");
    Ok(LguestDma::read_from_bytes(&bytes).expect("exactly one lguest_dma"))
}

/// The sections of `dma` up to the first length 0.
pub fn sections(dma: &LguestDma) -> impl Iterator<Item = (usize, u64, u16)> + '_ {
    (0..LGUEST_MAX_DMA_SECTIONS)
        .map(|i| (i, dma.addr[i], dma.len[i]))
        .take_while(|&(_, _, len)| len != 0)
}

/// Checks that every section of `dma` (which lies at `at`) is in RAM and
/// within one page.
pub fn check_sections(
    mem: &dyn GuestRam,
    call: Call,
    at: u64,
    dma: &LguestDma,
) -> Result<(), DmaError> {
    for (index, addr, len) in sections(dma) {
        placement(mem, addr, len as u64).map_err(|place| DmaError::BadSection {
            call,
            dma: at,
            index,
            addr,
            len,
            place,
        })?;
    }
    Ok(())
}

/// The total length of `dma`'s sections.
pub fn capacity(dma: &LguestDma) -> u32 {
    sections(dma).map(|(_, _, len)| len as u32).sum()
}

/// Copies the bytes of a checked `dma` into `out` (cleared first).
pub fn gather(mem: &dyn GuestRam, dma: &LguestDma, out: &mut Vec<u8>) {
    out.clear();
    for (_, addr, len) in sections(dma) {
        let at = out.len();
        out.resize(at + len as usize, 0);
        mem.read(addr, &mut out[at..])
            .expect("sections were checked to lie in RAM");
    }
}

/// Copies as much of `data` as fits into the sections of a checked `dma`;
/// returns the bytes copied.
fn scatter(mem: &dyn GuestRam, dma: &LguestDma, data: &[u8]) -> u32 {
    let mut done = 0usize;
    for (_, addr, len) in sections(dma) {
        if done == data.len() {
            break;
        }
        let n = (len as usize).min(data.len() - done);
        mem.write(addr, &data[done..done + n])
            .expect("sections were checked to lie in RAM");
        done += n;
    }
    done as u32
}

/// The Guest's live bindings, in the order they were made.
#[derive(Debug, Default)]
pub struct Bindings {
    list: Vec<Binding>,
}

impl Bindings {
    pub fn new() -> Bindings {
        Bindings::default()
    }

    pub fn list(&self) -> &[Binding] {
        &self.list
    }

    /// BIND_DMA(key, array, (count << 8) | irq): binds, or with irq 0
    /// unbinds the array bound at that key and address. Returns RAX: 1 done,
    /// 0 nothing to unbind.
    pub fn bind(
        &mut self,
        mem: &dyn GuestRam,
        table: &DeviceTable,
        key: u64,
        array: u64,
        count_irq: u64,
    ) -> Result<u64, DmaError> {
        let call = Call::Bind;
        table.key_owner(call, key)?;
        let irq = count_irq & BIND_DMA_IRQ_MASK;
        let count = count_irq >> BIND_DMA_COUNT_SHIFT;
        if irq == 0 {
            // An unbind names the array; its count is not looked at (a 2007
            // Guest passes 0).
            let found = self
                .list
                .iter()
                .position(|b| b.key == key && b.array == array);
            return Ok(match found {
                Some(i) => {
                    self.list.remove(i);
                    1
                }
                None => 0,
            });
        }
        if irq >= LGUEST_IRQS as u64 {
            return Err(DmaError::BadIrq { irq });
        }
        if count == 0 || count > LGUEST_MAX_DMA_SECTIONS as u64 {
            return Err(DmaError::BadCount { count });
        }
        if self.list.len() >= LGUEST_MAX_DMA {
            return Err(DmaError::TooManyBindings);
        }
        for i in 0..count {
            let at = array.wrapping_add(i * DMA_SIZE);
            let dma = read_dma(mem, call, at)?;
            check_sections(mem, call, at, &dma)?;
        }
        self.list.push(Binding {
            key,
            array,
            count: count as u32,
            irq: irq as u32,
        });
        Ok(1)
    }

    /// The first buffer bound at `key` whose used_len is 0 (bindings in the
    /// order made, entries in array order), re-read and re-checked.
    pub fn first_free(
        &self,
        mem: &dyn GuestRam,
        key: u64,
    ) -> Result<Option<(FreeBuffer, LguestDma)>, DmaError> {
        let call = Call::Deliver { key };
        for b in self.list.iter().filter(|b| b.key == key) {
            // The used_len of a full buffer is all we need to pass it by:
            // one read of the whole array rather than one per lguest_dma (a
            // Guest that frees its buffers in batches leaves many full).
            let mut array = [0u8; (DMA_SIZE as usize) * LGUEST_MAX_DMA_SECTIONS];
            let bytes = &mut array[..(b.count as u64 * DMA_SIZE) as usize];
            let whole = mem.read(b.array, bytes).is_ok();
            for i in 0..b.count as u64 {
                let at = b.array.wrapping_add(i * DMA_SIZE);
                let used = (i * DMA_SIZE) as usize + dma_off::DMA_USED_LEN;
                if whole && bytes[used..used + 4] != [0; 4] {
                    continue;
                }
                // Free, or an array we could not read whole: the lguest_dma
                // itself is read and checked, as at every delivery.
                let dma = read_dma(mem, call, at)?;
                if dma.used_len != 0 {
                    continue;
                }
                check_sections(mem, call, at, &dma)?;
                let free = FreeBuffer {
                    dma: at,
                    capacity: capacity(&dma),
                    irq: b.irq,
                };
                return Ok(Some((free, dma)));
            }
        }
        Ok(None)
    }

    /// Moves as much of `data` as fits into the first free buffer bound at
    /// `key`, sets its used_len and says which IRQ to raise. `None`: no free
    /// buffer, and the bytes are dropped.
    pub fn deliver(
        &self,
        mem: &dyn GuestRam,
        key: u64,
        data: &[u8],
    ) -> Result<Option<Delivered>, DmaError> {
        let Some((free, dma)) = self.first_free(mem, key)? else {
            return Ok(None);
        };
        let bytes = scatter(mem, &dma, data);
        mem.write_u32(free.dma + dma_off::DMA_USED_LEN as u64, bytes)
            .expect("read_dma checked it lies in RAM");
        Ok(Some(Delivered {
            bytes,
            irq: free.irq,
            dma: free.dma,
        }))
    }

    /// The IRQ of the first binding at `key`, if any.
    pub fn irq_at(&self, key: u64) -> Option<u32> {
        self.list.iter().find(|b| b.key == key).map(|b| b.irq)
    }

    /// The distinct keys bound inside any of `pages`, sorted.
    pub fn keys_in(&self, pages: Vec<u64>) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .list
            .iter()
            .map(|b| b.key)
            .filter(|k| pages.iter().any(|p| (*p..*p + PAGE_SIZE).contains(k)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}
