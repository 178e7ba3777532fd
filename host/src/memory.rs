//! Guest physical memory: the layout of ABI section 2 and checked access.
//!
//! ```text
//! 0 ............ mem                      Guest RAM (boot_params, command line, kernel, initrd)
//! mem .......... pfn_limit << 12          device pages (the descriptor page first)
//! pfn_limit << 12 ...                     Host-owned pages: read-only to the Guest...
//! ... host_rw_base ...                    ...then the ring-0 stack the stubs use (writable)
//! ... shadow_base ...                     ...then the top-level page-table pages (read-only)
//! ```
//!
//! Everything the Guest names by physical address goes through [`GuestMemory`],
//! which refuses anything outside `[0, pfn_limit << 12)`: the Host pages are
//! reached only through [`GuestMemory::host_page`], never by a Guest address.

use lguest_abi::PAGE_SIZE;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// Where everything lies for one boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/*L:120 The Guest's physical memory, as ABI section 2 draws it: RAM, the
 * device pages just above it, then pages of the Host's that the Guest can't
 * write. */
pub struct Layout {
    /// Bytes of RAM (`mem`): the first device page is here.
    pub mem: u64,
    /// First page frame the Guest may not touch.
    pub pfn_limit: u64,
    /// Pages just below pfn_limit that are no memory at all: the virtio-mmio
    /// windows, where every access exits to the Host.
    pub mmio_hole_pages: u64,
    /// Host-owned pages that are read-only to the Guest (IDT ... page tables).
    pub host_ro_pages: u64,
    /// Host-owned pages the CPU writes in ring 0 (the stub stack).
    pub host_rw_pages: u64,
}

impl Layout {
    /// Guest-physical address of the first Host-owned page.
    pub fn host_base(&self) -> u64 {
        self.pfn_limit * PAGE_SIZE
    }
    /// Guest-physical address of the first writable Host page.
    pub fn host_rw_base(&self) -> u64 {
        self.host_base() + self.host_ro_pages * PAGE_SIZE
    }
    /// End of everything the Guest may touch.
    pub fn guest_limit(&self) -> u64 {
        self.pfn_limit * PAGE_SIZE
    }
    /// End of the Guest's memory proper: RAM and device pages, before the
    /// mmio windows' hole (which is below pfn_limit but no memory at all).
    pub fn memory_end(&self) -> u64 {
        self.guest_limit() - self.mmio_hole_pages * PAGE_SIZE
    }
    /// Host-owned pages mapped through slot 511 (the shadow roots are not:
    /// the CPU finds them by physical address, through CR3).
    pub fn host_pages(&self) -> u64 {
        self.host_ro_pages + self.host_rw_pages
    }
    /// Guest-physical address of shadow root `i` (see [`crate::page_tables`]).
    pub fn shadow_root(&self, i: usize) -> u64 {
        self.host_rw_base() + (self.host_rw_pages + i as u64) * PAGE_SIZE
    }
}

/// How many top-level pages the Host keeps for the Guest's page tables
/// (lguest kept four shadow page directories too).
pub const SHADOW_ROOTS: usize = 4;

/// A Guest physical address range the Guest may not use.
#[derive(Debug, thiserror::Error)]
#[error("address {addr:#x} (+{len}) outside guest memory")]
pub struct OutOfBounds {
    pub addr: u64,
    pub len: u64,
}

/// The Guest's memory: RAM plus device pages (one region) and the Host pages
/// (two regions, so they can be given to KVM as separate memslots). Clones
/// share the same mappings (device threads hold one).
#[derive(Clone)]
pub struct GuestMemory {
    pub layout: Layout,
    mmap: GuestMemoryMmap,
}

impl GuestMemory {
    /// Map fresh, zeroed anonymous memory for every region of `layout`.
    pub fn new(layout: Layout) -> std::io::Result<Self> {
        let hole = layout.mmio_hole_pages * PAGE_SIZE;
        let ranges = [
            (GuestAddress(0), (layout.guest_limit() - hole) as usize),
            (
                GuestAddress(layout.host_base()),
                (layout.host_ro_pages * PAGE_SIZE) as usize,
            ),
            (
                GuestAddress(layout.host_rw_base()),
                (layout.host_rw_pages * PAGE_SIZE) as usize,
            ),
        ];
        // Each shadow root is a memslot of its own, so that one can be
        // dropped and given back to KVM without touching the others.
        let shadows =
            (0..SHADOW_ROOTS).map(|i| (GuestAddress(layout.shadow_root(i)), PAGE_SIZE as usize));
        let ranges: Vec<_> = ranges.into_iter().chain(shadows).collect();
        let mmap = GuestMemoryMmap::from_ranges(&ranges).map_err(std::io::Error::other)?;
        Ok(GuestMemory { layout, mmap })
    }

    /// The regions, in order: (guest-physical base, host pointer, size, read_only).
    pub fn regions(&self) -> impl Iterator<Item = (u64, *mut u8, u64, bool)> + '_ {
        let host_base = self.layout.host_base();
        let rw_base = self.layout.host_rw_base();
        self.mmap.iter().map(move |r| {
            let base = r.start_addr().0;
            let ptr = r
                .get_host_address(MemoryRegionAddress(0))
                .expect("region start is inside the region");
            let rw_stack = base == rw_base;
            (base, ptr, r.len(), base >= host_base && !rw_stack)
        })
    }

    /// Checks that `[addr, addr + len)` lies inside what the Guest may touch.
    /// Checks that `[addr, addr + len)` is Guest memory: below pfn_limit and
    /// not in the mmio windows' hole. Every Guest-supplied range passes here
    /// before anything reads or writes it.
    pub fn check(&self, addr: u64, len: u64) -> Result<(), OutOfBounds> {
        match addr.checked_add(len) {
            Some(end) if end <= self.layout.memory_end() => Ok(()),
            _ => Err(OutOfBounds { addr, len }),
        }
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(addr, buf.len() as u64)?;
        self.mmap
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| OutOfBounds {
                addr,
                len: buf.len() as u64,
            })
    }

    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), OutOfBounds> {
        self.check(addr, buf.len() as u64)?;
        self.mmap
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| OutOfBounds {
                addr,
                len: buf.len() as u64,
            })
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64, OutOfBounds> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn read_u32(&self, addr: u64) -> Result<u32, OutOfBounds> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn write_u64(&self, addr: u64, v: u64) -> Result<(), OutOfBounds> {
        self.write(addr, &v.to_le_bytes())
    }

    pub fn write_u32(&self, addr: u64, v: u32) -> Result<(), OutOfBounds> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Reads a NUL-terminated string of at most `max` bytes starting at
    /// `addr`, stopping early at the end of Guest memory. Returns the bytes
    /// without the NUL (a string with no NUL within `max` is cut there).
    pub fn read_cstr(&self, addr: u64, max: usize) -> Result<Vec<u8>, OutOfBounds> {
        self.check(addr, 1)?;
        let avail = (self.layout.memory_end() - addr).min(max as u64) as usize;
        let mut buf = vec![0u8; avail];
        self.read(addr, &mut buf)?;
        if let Some(nul) = buf.iter().position(|&b| b == 0) {
            buf.truncate(nul);
        }
        Ok(buf)
    }

    /// The Host address of `[addr, addr + len)` of Guest memory, for I/O that
    /// goes straight to or from it (a disk read lands in the Guest's buffer
    /// without a copy of ours). The whole range is checked to be the Guest's.
    /// Guest memory is one mapping from address 0, so the range is at its
    /// base plus `addr`; that holds for an empty range at the very end too,
    /// which [`Self::check`] allows and which no region contains.
    pub fn host_address(&self, addr: u64, len: u64) -> Result<*mut u8, OutOfBounds> {
        self.check(addr, len)?;
        let base = self
            .mmap
            .get_host_address(GuestAddress(0))
            .map_err(|_| OutOfBounds { addr, len })?;
        Ok(base.wrapping_add(addr as usize))
    }

    /// Reads a page-table entry, which may sit in Guest memory or (the
    /// initial tables, the shadow roots) in the Host's read-only pages.
    /// `None` if neither.
    pub fn read_table_u64(&self, addr: u64) -> Option<u64> {
        let l = &self.layout;
        let host_ro = l.host_base()..l.host_rw_base();
        let shadows = l.shadow_root(0)..l.shadow_root(SHADOW_ROOTS);
        let ok = addr < l.memory_end() || host_ro.contains(&addr) || shadows.contains(&addr);
        if !addr.is_multiple_of(8) || !ok {
            return None;
        }
        self.mmap.read_obj::<u64>(GuestAddress(addr)).ok()
    }

    /// Entry `index` of shadow root `root`.
    pub fn read_shadow(&self, root: usize, index: usize) -> u64 {
        let addr = self.layout.shadow_root(root) + index as u64 * 8;
        self.mmap
            .read_obj::<u64>(GuestAddress(addr))
            .expect("shadow roots are mapped")
    }

    pub fn write_shadow(&self, root: usize, index: usize, value: u64) {
        let addr = self.layout.shadow_root(root) + index as u64 * 8;
        self.mmap
            .write_obj(value, GuestAddress(addr))
            .expect("shadow roots are mapped")
    }

    /// Writes into a Host-owned page (Guest addresses can't reach these).
    pub fn write_host(&self, host_page: u64, offset: u64, buf: &[u8]) {
        let addr = self.layout.host_base() + host_page * PAGE_SIZE + offset;
        self.mmap
            .write_slice(buf, GuestAddress(addr))
            .expect("Host page write inside the Host region");
    }

    /// Reads from a Host-owned page.
    pub fn read_host(&self, host_page: u64, offset: u64, buf: &mut [u8]) {
        let addr = self.layout.host_base() + host_page * PAGE_SIZE + offset;
        self.mmap
            .read_slice(buf, GuestAddress(addr))
            .expect("Host page read inside the Host region");
    }

    pub fn read_host_u64(&self, host_page: u64, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read_host(host_page, offset, &mut b);
        u64::from_le_bytes(b)
    }

    pub fn write_host_u64(&self, host_page: u64, offset: u64, v: u64) {
        self.write_host(host_page, offset, &v.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> GuestMemory {
        GuestMemory::new(Layout {
            mem: 2 << 20,
            pfn_limit: (2 << 20) / PAGE_SIZE + 1,
            mmio_hole_pages: 0,
            host_ro_pages: 4,
            host_rw_pages: 1,
        })
        .unwrap()
    }

    #[test]
    fn guest_access_stops_at_pfn_limit() {
        let m = small();
        let limit = m.layout.guest_limit();
        assert!(m.write_u64(limit - 8, 7).is_ok());
        assert_eq!(m.read_u64(limit - 8).unwrap(), 7);
        assert!(m.write_u64(limit - 4, 7).is_err());
        assert!(m.read_u64(limit).is_err());
        assert!(m.read_u64(u64::MAX - 3).is_err());
    }

    #[test]
    fn the_mmio_hole_is_not_guest_memory() {
        let m = GuestMemory::new(Layout {
            mem: 2 << 20,
            pfn_limit: (2 << 20) / PAGE_SIZE + 2,
            mmio_hole_pages: 1,
            host_ro_pages: 4,
            host_rw_pages: 1,
        })
        .unwrap();
        let hole = m.layout.memory_end();
        assert_eq!(hole, (2 << 20) + PAGE_SIZE);
        assert!(m.check(hole - 8, 8).is_ok());
        assert!(
            m.check(hole - 8, 16).is_err(),
            "a range running into the hole"
        );
        assert!(m.host_address(hole - 0x200, 0x1000).is_err());
        assert!(
            m.read_cstr(hole - 2, 100).is_ok(),
            "a string stops at the hole"
        );
        assert!(m.read_table_u64(hole).is_none());
    }

    /// Found by the `checks` fuzz target: check() allowed an empty range at
    /// the end of memory and host_address() refused it.
    #[test]
    fn host_address_agrees_with_check() {
        let mut hole = small().layout;
        hole.pfn_limit += 1;
        hole.mmio_hole_pages = 1;
        for m in [small(), GuestMemory::new(hole).unwrap()] {
            let end = m.layout.memory_end();
            let base = m.host_address(0, 0).unwrap();
            assert!(m.check(end, 0).is_ok());
            let at_end = m.host_address(end, 0).unwrap();
            assert_eq!(at_end, base.wrapping_add(end as usize));
            let last = m.host_address(end - 1, 1).unwrap();
            assert_eq!(last, base.wrapping_add(end as usize - 1));
            assert!(m.host_address(end, 1).is_err());
        }
    }

    #[test]
    fn host_pages_are_not_guest_addressable() {
        let m = small();
        m.write_host_u64(0, 0, 0xdead);
        assert_eq!(m.read_host_u64(0, 0), 0xdead);
        assert!(m.read_u64(m.layout.host_base()).is_err());
        let ro: Vec<_> = m.regions().map(|r| r.3).collect();
        assert_eq!(ro, vec![false, true, false, true, true, true, true]);
        assert!(m.read_u64(m.layout.shadow_root(0)).is_err());
    }

    #[test]
    fn cstr_stops_at_nul_limit_and_memory_end() {
        let m = small();
        m.write(0x1000, b"hello\0world").unwrap();
        assert_eq!(m.read_cstr(0x1000, 100).unwrap(), b"hello");
        assert_eq!(m.read_cstr(0x1000, 3).unwrap(), b"hel");
        let limit = m.layout.guest_limit();
        m.write(limit - 2, b"ab").unwrap();
        assert_eq!(m.read_cstr(limit - 2, 100).unwrap(), b"ab");
    }
}
