//! The heap: the global allocator, over Guest RAM above the image.
//!
//! Only the drivers Guest has one (the reference Guest never allocates): it
//! calls `init` and gives the heap to virtio-drivers, for its boxes and its
//! DMA memory, and to its own buffers. The heap is Guest RAM from 4 MiB (or the end of the image, if
//! that is higher) up to `mem`, or up to the initrd if the Launcher loaded
//! one at the top of RAM. With the Host's identity map, a block's address is
//! also its physical address.
//!
//! It hands out power-of-two blocks, each aligned to its own size, and
//! keeps one free list per size: what the drivers free (an indirect list
//! per request) comes straight back for the next request of the same shape,
//! and the big buffers the tests allocate once are never split. Simple, and
//! it never fragments in the ways these tests use it.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr;

use lguest_guest::cell::GuestCell;
use lguest_guest::{boot, lguest_data};

const PAGE_SIZE: usize = lguest_abi::PAGE_SIZE as usize;

/// Where the heap starts at the lowest, when there is RAM enough (8 MiB):
/// 4 MiB, well above the image. A smaller Guest starts it at the image's
/// end.
const HEAP_FLOOR: u64 = 4 << 20;
const FLOOR_FROM_MEM: u64 = 8 << 20;

/// Blocks are 2^MIN_SHIFT bytes and more: room for the free list's link.
const MIN_SHIFT: u32 = 4;
/// One free list per power of two a 64-bit address can hold.
const CLASSES: usize = 64;

struct Heap {
    /// Where the heap starts, the next never-used byte, and the end.
    start: u64,
    next: u64,
    end: u64,
    /// Free lists: the first free block of each size (0 = none); each free
    /// block holds the address of the next.
    free: [u64; CLASSES],
}

static HEAP: GuestCell<Heap> = GuestCell::new(Heap {
    start: 0,
    next: 0,
    end: 0,
    free: [0; CLASSES],
});

extern "C" {
    /// The end of our image (.bss included), from linker.ld.
    static __image_end: u8;
}

/// The heap's range, (start, end), once `init` has run.
pub fn range() -> (u64, u64) {
    let flags = lguest_data::irq_save();
    // SAFETY: interrupts are off and no handler touches the heap.
    let (start, end) = unsafe { ((*HEAP.as_ptr()).start, (*HEAP.as_ptr()).end) };
    lguest_data::irq_restore(flags);
    (start, end)
}

/// Give the heap the RAM above our image: [max(4 MiB, image end), mem),
/// stopping below an initrd.
pub fn init() {
    let mem = boot::mem();
    let image_end = &raw const __image_end as u64;
    let floor = if mem >= FLOOR_FROM_MEM { HEAP_FLOOR } else { 0 };
    let start = image_end.max(floor).next_multiple_of(PAGE_SIZE as u64);
    let mut end = mem & !(PAGE_SIZE as u64 - 1);
    if let Some((initrd, _)) = boot::ramdisk() {
        end = end.min(initrd & !(PAGE_SIZE as u64 - 1));
    }
    let flags = lguest_data::irq_save();
    // SAFETY: interrupts are off, no handler touches the heap, and nothing
    // has been allocated yet.
    let heap = unsafe { &mut *HEAP.as_ptr() };
    heap.start = start;
    heap.next = start;
    heap.end = end.max(start);
    lguest_data::irq_restore(flags);
}

/// The size class of a request: the power of two its block will be.
fn class(layout: Layout) -> u32 {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    size.next_power_of_two().trailing_zeros()
}

impl Heap {
    fn alloc(&mut self, shift: u32) -> *mut u8 {
        let size = 1u64 << shift;
        let head = self.free[shift as usize];
        if head != 0 {
            // SAFETY: a free block holds the address of the next one in its
            // first word (put there by dealloc), and we own it.
            self.free[shift as usize] =
                unsafe { ptr::with_exposed_provenance::<u64>(head as usize).read() };
            return ptr::with_exposed_provenance_mut(head as usize);
        }
        let start = self.next.next_multiple_of(size);
        match start.checked_add(size) {
            Some(end) if end <= self.end => {
                self.next = end;
                ptr::with_exposed_provenance_mut(start as usize)
            }
            _ => ptr::null_mut(),
        }
    }

    fn dealloc(&mut self, block: *mut u8, shift: u32) {
        // SAFETY: the block is ours again (the caller freed it), at least
        // 16 bytes and aligned to its size: room for the link.
        unsafe { block.cast::<u64>().write(self.free[shift as usize]) };
        self.free[shift as usize] = block as u64;
    }
}

/// The global allocator: the heap, with virtual interrupts off around each
/// call (no interrupt handler allocates, but the heap's lists must never be
/// seen half-changed all the same).
pub struct Allocator;

#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

// SAFETY: blocks are distinct (the bump pointer only rises and a freed block
// sits on one list until it is handed out again), each at least as large and
// as aligned as its layout asks (its size is a power of two >= both, and it
// is aligned to its size); null is returned when the heap is used up.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let flags = lguest_data::irq_save();
        // SAFETY: interrupts are off and no handler touches the heap, so this
        // is the only reference to it.
        let block = unsafe { (*HEAP.as_ptr()).alloc(class(layout)) };
        lguest_data::irq_restore(flags);
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let flags = lguest_data::irq_save();
        // SAFETY: as in alloc; the caller gives back a block alloc gave with
        // the same layout, so the same class.
        unsafe { (*HEAP.as_ptr()).dealloc(block, class(layout)) };
        lguest_data::irq_restore(flags);
    }
}
