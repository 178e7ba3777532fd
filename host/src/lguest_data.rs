//! struct lguest_data (ABI section 5): the page the Guest shares with us.
//!
//! LGUEST_INIT checked that the whole structure lies in RAM, so reads and
//! writes of its fields cannot fail; the Guest's fields are read afresh
//! every time, since it may change them whenever it runs.

use crate::memory::GuestMemory;
use lguest_abi::lguest_data_off as ld;

/// Where the Guest's lguest_data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LguestData {
    addr: u64,
}

impl LguestData {
    /// The structure at `addr`, if all of it lies in RAM.
    pub fn at(mem: &GuestMemory, addr: u64) -> Option<LguestData> {
        let size = core::mem::size_of::<lguest_abi::LguestData>() as u64;
        addr.checked_add(size)
            .is_some_and(|end| end <= mem.layout.mem)
            .then_some(LguestData { addr })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn read_u8(&self, mem: &GuestMemory, off: usize) -> u8 {
        let mut b = [0u8];
        mem.read(self.addr + off as u64, &mut b)
            .expect("lguest_data is in RAM");
        b[0]
    }
    pub fn write_u8(&self, mem: &GuestMemory, off: usize, v: u8) {
        mem.write(self.addr + off as u64, &[v])
            .expect("lguest_data is in RAM");
    }
    pub fn read_u32(&self, mem: &GuestMemory, off: usize) -> u32 {
        mem.read_u32(self.addr + off as u64)
            .expect("lguest_data is in RAM")
    }
    pub fn read_u64(&self, mem: &GuestMemory, off: usize) -> u64 {
        mem.read_u64(self.addr + off as u64)
            .expect("lguest_data is in RAM")
    }
    pub fn write_u16(&self, mem: &GuestMemory, off: usize, v: u16) {
        mem.write(self.addr + off as u64, &v.to_le_bytes())
            .expect("lguest_data is in RAM");
    }
    pub fn write_u32(&self, mem: &GuestMemory, off: usize, v: u32) {
        mem.write_u32(self.addr + off as u64, v)
            .expect("lguest_data is in RAM");
    }
    pub fn write_u64(&self, mem: &GuestMemory, off: usize, v: u64) {
        mem.write_u64(self.addr + off as u64, v)
            .expect("lguest_data is in RAM");
    }

    /// time_sec and time_nsec: written at INIT and at every delivery.
    pub fn write_time(&self, mem: &GuestMemory) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.write_u64(mem, ld::TIME_SEC, now.as_secs());
        self.write_u64(mem, ld::TIME_NSEC, now.subsec_nanos() as u64);
    }
}
