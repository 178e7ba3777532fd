//! virtio-drivers' `Hal`: how its drivers get DMA memory and device
//! addresses on our machine.
//!
//! virtio-drivers wants two kinds of memory. Its queues (descriptor table,
//! available and used rings) are DMA memory it asks the `Hal` for, whole
//! zeroed pages; and it boxes a few things of its own (indirect descriptor
//! lists, the console's receive buffer) through the global allocator. Both
//! come from the heap (lguest_guest::heap).
//!
//! The Host's page tables map physical memory at the same virtual address,
//! so a buffer's address is what the device sees: sharing a buffer with a
//! device is just naming its address, and nothing is ever copied.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::{self, NonNull};

use lguest_guest::boot;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The end of RAM: every buffer we share with a device must lie below it.
fn check_in_ram(addr: u64, len: usize) {
    let end = addr.checked_add(len as u64);
    assert!(
        end.is_some_and(|end| end <= boot::mem()),
        "a buffer for the device at {addr:#x} ({len} bytes) is not in RAM"
    );
}

/// virtio-drivers' view of our machine: identity-mapped RAM.
pub struct LguestHal;

// SAFETY: dma_alloc returns zeroed, page-aligned memory from the heap that
// nothing else uses until dma_dealloc gives it back; physical == virtual for
// all of RAM and the MMIO windows (the Host's identity map), so the address
// the device is told is the one the driver uses.
unsafe impl Hal for LguestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Ok(layout) = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE) else {
            return (0, NonNull::dangling());
        };
        if layout.size() == 0 {
            return (0, NonNull::dangling());
        }
        // SAFETY: the layout's size is not zero.
        let block = unsafe { alloc_zeroed(layout) };
        match NonNull::new(block) {
            Some(block) => (block.as_ptr() as PhysAddr, block),
            // virtio-drivers takes physical address 0 as "no memory".
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE)
            .expect("dma_alloc accepted this size");
        // SAFETY: the caller gives back what dma_alloc gave, with its size.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(ptr::with_exposed_provenance_mut(paddr as usize))
            .expect("an MMIO region at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let addr = buffer.as_ptr().cast::<u8>() as PhysAddr;
        check_in_ram(addr, buffer.len());
        addr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // The device wrote straight into the buffer: nothing to copy back.
    }
}
