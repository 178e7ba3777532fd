//! A home for the Guest's mutable statics.
//!
//! The Guest has one vCPU and no threads. The only thing that can run "at the
//! same time" as ordinary code is an interrupt or trap handler that the Host
//! delivers between two instructions of it. So a static needs no lock, only
//! the discipline that each access is a single volatile load or store (which
//! a handler can't tear), or happens with virtual interrupts off and outside
//! any trap handler.

use core::cell::UnsafeCell;

/// A static the Guest changes, read and written by value.
#[repr(transparent)]
pub struct GuestCell<T>(UnsafeCell<T>);

// SAFETY: there is a single vCPU (see the module comment); `read` and `write`
// are single volatile accesses, and anything more goes through `as_ptr`,
// whose users must justify it.
unsafe impl<T> Sync for GuestCell<T> {}

impl<T> GuestCell<T> {
    pub const fn new(value: T) -> Self {
        GuestCell(UnsafeCell::new(value))
    }

    /// The address of the value, for assembly, the Host, or careful code.
    pub const fn as_ptr(&self) -> *mut T {
        self.0.get()
    }
}

impl<T: Copy> GuestCell<T> {
    pub fn read(&self) -> T {
        // SAFETY: the pointer is valid and aligned (it is our own static), and
        // nobody holds a reference into it across this load (only `as_ptr`
        // users could make one, and they don't keep it).
        unsafe { self.0.get().read_volatile() }
    }

    pub fn write(&self, value: T) {
        // SAFETY: as for `read`.
        unsafe { self.0.get().write_volatile(value) }
    }
}
