//! Where a Guest kernel starts.
//!
//! The Launcher enters at the ELF entry point with RSI pointing at
//! boot_params (which is at 0, so RSI is 0), interrupts virtually on but no
//! IDT to take them, and no stack at all: RSP is 0. Rust needs a stack, so
//! `_start` points RSP at the top of a 64 KiB stack in .bss (16-byte aligned,
//! so the call leaves `kmain` with the alignment the C convention promises)
//! and calls `kmain`, which never returns. Both bundled kernels start this
//! way: `lguest_guest::entry!(kmain);`.

/// The boot stack's size.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

/// The boot stack.
#[repr(C, align(16))]
pub struct BootStack(pub [u8; BOOT_STACK_SIZE]);

/// Defines `_start`, which sets up the boot stack and calls `$kmain`
/// (an `extern "C" fn() -> !`).
#[macro_export]
macro_rules! entry {
    ($kmain:path) => {
        static BOOT_STACK: $crate::cell::GuestCell<$crate::entry::BootStack> =
            $crate::cell::GuestCell::new($crate::entry::BootStack(
                [0; $crate::entry::BOOT_STACK_SIZE],
            ));

        core::arch::global_asm!(
            r#"
    .section .text._start, "ax"
    .global _start
_start:
    lea rsp, [rip + {stack} + {stack_size}]
    xor ebp, ebp
    call {kmain}
    ud2
"#,
            stack = sym BOOT_STACK,
            stack_size = const $crate::entry::BOOT_STACK_SIZE,
            kmain = sym $kmain,
        );
    };
}

/// The allocator of a kernel with no heap: it has nothing to give. Neither
/// the reference Guest nor its tests allocate, but Rust wants an allocator
/// in every binary once any crate in it links `alloc`, and the ABI crate's
/// `zerocopy` does here (the drivers Guest's virtio-drivers turns on its
/// `alloc` feature, and features are shared within a workspace).
pub struct NoHeap;

// SAFETY: returning null is how an allocator says it failed; there is no
// memory of ours to free.
unsafe impl core::alloc::GlobalAlloc for NoHeap {
    unsafe fn alloc(&self, _layout: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}
