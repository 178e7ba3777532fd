//! The 2007 device table (ABI section 9): 16 entries of
//! `{u16 type, u16 features, u16 status, u16 num_pages, u32 pfn}` on the page
//! at `mem`, and one device page per block or net device after it.
//!
//! ```text
//! mem              device table: [0] console (0 pages, pfn 0), then one
//!                  entry per disk, then one per network, the rest zero
//! mem + 0x1000     the first disk's block page {type, sector, bytes,
//!                  result, num_sectors}
//! ...              one page per disk, then one page per network (MAC slots)
//! ```
//!
//! The table also decides who owns a key: 0 is the console's, a 4-byte
//! aligned address inside a device page belongs to that device, and any
//! other key ends the Guest.

use super::{Call, DmaError, GuestRam};
use crate::memory::OutOfBounds;
use lguest_abi::{
    dma_off, DmaDeviceDesc, DMA_MAX_DEVICES, LGUEST_DEVICE_T_BLOCK, LGUEST_DEVICE_T_CONSOLE,
    LGUEST_DEVICE_T_NET, PAGE_SIZE,
};
use zerocopy::IntoBytes;

/// Why a table cannot be built (set-up errors, before the Guest runs).
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the 2007 device model has room for {max} devices, the console included; {asked} were asked for")]
    TooManyDevices { asked: usize, max: usize },
    #[error(
        "disk {index} has {sectors} sectors; the 2007 block page counts at most {max} (2 TiB)"
    )]
    DiskTooLarge {
        index: usize,
        sectors: u64,
        max: u64,
    },
    #[error("RAM size {mem:#x} is not a whole number of pages below 16 TiB")]
    BadRamSize { mem: u64 },
    #[error("cannot write the device table: {0}")]
    Memory(OutOfBounds),
}

/// Who owns a key the Guest named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOwner {
    /// Key 0.
    Console,
    /// Inside the page of disk `index` (in table order among disks).
    Block { index: usize, offset: u64 },
    /// Inside the page of network `index` (in table order among networks).
    Net { index: usize, offset: u64 },
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Block { sectors: u32 },
    Net { features: u16 },
}

/// The table for one boot, and where its device pages are.
#[derive(Clone, Debug)]
pub struct DeviceTable {
    mem: u64,
    /// Entries after the console, in table order (disks, then networks).
    devices: Vec<Kind>,
}

impl DeviceTable {
    /// Lays out the console, then `disk_sectors.len()` disks, then one
    /// network per `net_features` entry, for RAM of `mem` bytes.
    pub fn new(mem: u64, disk_sectors: &[u64], net_features: &[u16]) -> Result<Self, TableError> {
        // pfn is a u32: the last device page must still be numbered.
        if mem == 0 || !mem.is_multiple_of(PAGE_SIZE) || mem >= (u32::MAX as u64 - 32) * PAGE_SIZE {
            return Err(TableError::BadRamSize { mem });
        }
        let asked = 1 + disk_sectors.len() + net_features.len();
        if asked > DMA_MAX_DEVICES {
            return Err(TableError::TooManyDevices {
                asked,
                max: DMA_MAX_DEVICES,
            });
        }
        let mut devices = Vec::new();
        for (index, &sectors) in disk_sectors.iter().enumerate() {
            let sectors = u32::try_from(sectors).map_err(|_| TableError::DiskTooLarge {
                index,
                sectors,
                max: u32::MAX as u64,
            })?;
            devices.push(Kind::Block { sectors });
        }
        devices.extend(net_features.iter().map(|&features| Kind::Net { features }));
        Ok(DeviceTable { mem, devices })
    }

    /// Pages the model needs at `mem`: the table and one per device.
    pub fn pages(&self) -> u64 {
        1 + self.devices.len() as u64
    }

    /// Guest-physical address of the table page.
    pub fn table_addr(&self) -> u64 {
        self.mem
    }

    /// The page of the device at table entry `entry` (1 and up).
    fn page_of_entry(&self, entry: usize) -> u64 {
        self.mem + entry as u64 * PAGE_SIZE
    }

    /// The 16 entries, as the Guest finds them at boot.
    pub fn entries(&self) -> [DmaDeviceDesc; DMA_MAX_DEVICES] {
        let mut out = [DmaDeviceDesc::default(); DMA_MAX_DEVICES];
        out[0] = DmaDeviceDesc {
            type_: LGUEST_DEVICE_T_CONSOLE,
            ..Default::default()
        };
        for (i, kind) in self.devices.iter().enumerate() {
            let (type_, features) = match *kind {
                Kind::Block { .. } => (LGUEST_DEVICE_T_BLOCK, 0),
                Kind::Net { features } => (LGUEST_DEVICE_T_NET, features),
            };
            out[i + 1] = DmaDeviceDesc {
                type_,
                features,
                status: 0,
                num_pages: 1,
                pfn: (self.page_of_entry(i + 1) / PAGE_SIZE) as u32,
            };
        }
        out
    }

    /// Writes the table page and the block pages (zeroed, num_sectors set).
    /// Network pages are left alone: a shared one is mapped over its place
    /// and holds the other Guests' MACs, a private one is the net device's
    /// to clear.
    pub fn write(&self, mem: &dyn GuestRam) -> Result<(), OutOfBounds> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let entries = self.entries();
        let bytes = entries.as_bytes();
        page[..bytes.len()].copy_from_slice(bytes);
        mem.write(self.mem, &page)?;
        for (i, kind) in self.devices.iter().enumerate() {
            if let Kind::Block { sectors } = *kind {
                let mut block = vec![0u8; PAGE_SIZE as usize];
                let at = dma_off::BLOCK_NUM_SECTORS;
                block[at..at + 4].copy_from_slice(&sectors.to_le_bytes());
                mem.write(self.page_of_entry(i + 1), &block)?;
            }
        }
        Ok(())
    }

    /// The page of disk `index`.
    pub fn block_page(&self, index: usize) -> Option<u64> {
        self.nth_page(index, |k| matches!(k, Kind::Block { .. }))
    }

    /// The page of network `index`.
    pub fn net_page(&self, index: usize) -> Option<u64> {
        self.nth_page(index, |k| matches!(k, Kind::Net { .. }))
    }

    /// Every network page, in order.
    pub fn net_pages(&self) -> Vec<u64> {
        (0..).map_while(|i| self.net_page(i)).collect()
    }

    fn nth_page(&self, index: usize, want: impl Fn(&Kind) -> bool) -> Option<u64> {
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, k)| want(k))
            .nth(index)
            .map(|(i, _)| self.page_of_entry(i + 1))
    }

    /// Who owns `key`, or the rule it breaks.
    pub fn key_owner(&self, call: Call, key: u64) -> Result<KeyOwner, DmaError> {
        if key == lguest_abi::LGUEST_CONSOLE_DMA_KEY {
            return Ok(KeyOwner::Console);
        }
        let first = self.page_of_entry(1);
        let end = self.page_of_entry(1 + self.devices.len());
        if key < first || key >= end {
            return Err(DmaError::KeyOutsideDevicePages { call, key });
        }
        if !key.is_multiple_of(4) {
            return Err(DmaError::KeyUnaligned { call, key });
        }
        let entry = ((key - first) / PAGE_SIZE) as usize;
        let offset = key % PAGE_SIZE;
        let index = self.devices[..entry]
            .iter()
            .filter(|k| std::mem::discriminant(*k) == std::mem::discriminant(&self.devices[entry]))
            .count();
        Ok(match self.devices[entry] {
            Kind::Block { .. } => KeyOwner::Block { index, offset },
            Kind::Net { .. } => KeyOwner::Net { index, offset },
        })
    }
}
