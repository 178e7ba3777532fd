//! The lguest/x86-64 ABI, version 1: every number and layout that the
//! Launcher (Host) and a Guest kernel share.
//!
//! One definition, used by both sides: the Host's `lguest` binary and the
//! reference Guest both depend on this crate, and the tests at the bottom pin
//! every offset and size to the tables of `ABI.md`. The section numbers in the
//! comments are that page's.
#![no_std]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The ABI version this crate describes.
pub const ABI_VERSION: u32 = 1;

/*
 * Section 1: the machine a Guest gets.
 */

/// Guest kernel code selector: GDT entry 6, RPL 3.
pub const GUEST_CS: u16 = 0x33;
/// Guest data/stack selector: GDT entry 5, RPL 3.
pub const GUEST_DS: u16 = 0x2B;
/// Host ring-0 code selector (GDT entry 1).
pub const HOST_CS: u16 = 0x08;
/// Host ring-0 data selector (GDT entry 2).
pub const HOST_DS: u16 = 0x10;
/// The TSS selector (GDT entries 7-8).
pub const HOST_TSS: u16 = 0x38;
/// GDT entries 0-9 belong to the Host; the Guest owns 10..GDT_ENTRIES.
pub const GDT_FIRST_GUEST_ENTRY: usize = 10;
/// Size of the GDT, in 8-byte entries.
pub const GDT_ENTRIES: usize = 32;
/// RFLAGS at entry (IF set, bit 1 always set).
pub const ENTRY_RFLAGS: u64 = 0x202;
/// The interrupt flag, as in RFLAGS; also the "on" value of `irq_enabled`.
pub const X86_EFLAGS_IF: u32 = 0x200;

/// The trap number of `int $0x1f`, and the hypercall I/O port.
pub const LGUEST_TRAP_ENTRY: u8 = 0x1F;
/// The port a one-byte `out` hypercall writes to.
pub const HCALL_PORT: u16 = 0x1F;
/// `int $0x1f`, as bytes.
pub const INT_1F_BYTES: [u8; 2] = [0xCD, 0x1F];
/// `out %al, $0x1f`, as bytes: what the Host may rewrite `int $0x1f` into.
pub const OUT_1F_BYTES: [u8; 2] = [0xE6, 0x1F];

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_PG: u64 = 1 << 31;
/// CR0 while a Guest runs (TS may be toggled by the TS hypercall).
pub const GUEST_CR0: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4 while a Guest runs: no PGE, so the G bit means nothing.
pub const GUEST_CR4: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
pub const GUEST_EFER: u64 = EFER_LME | EFER_LMA | EFER_NXE;
/// XCR0: x87 and SSE state only.
pub const GUEST_XCR0: u64 = 0b11;

/*
 * Section 2: physical memory.
 */

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;
/// The Linux "zero page" (boot_params).
pub const BOOT_PARAMS_ADDR: u64 = 0x0000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x1000;
/// Longest command line, not counting the NUL.
pub const CMDLINE_MAX: usize = 4095;
/// The lowest address a kernel PT_LOAD may use.
pub const KERNEL_MIN_ADDR: u64 = 0x2000;
/// The upper half of the virtual address space is the Host's (`reserve_mem`).
pub const RESERVE_MEM: u64 = 1 << 47;
/// PML4 slot that holds the Host's supervisor-only mapping of its own pages.
pub const HOST_PML4_SLOT: usize = 511;
/// PML4 slots 256..=510 must be empty in every Guest PML4.
pub const FIRST_UPPER_PML4_SLOT: usize = 256;

/// Page-table entry bits the ABI speaks of.
pub mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    /// In a PD or PDPT entry: this is a large page.
    pub const HUGE: u64 = 1 << 7;
    pub const NX: u64 = 1 << 63;
    /// The physical address bits of an entry.
    pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
}

/*
 * Section 3: boot.
 */

/// Offsets into boot_params (the "zero page") that the Launcher fills.
pub mod boot_params {
    pub const E820_ENTRIES: usize = 0x1E8;
    pub const BOOT_FLAG: usize = 0x1FE;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21C;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const HARDWARE_SUBARCH: usize = 0x23C;
    pub const HARDWARE_SUBARCH_DATA: usize = 0x240;
    pub const E820_TABLE: usize = 0x2D0;

    pub const BOOT_FLAG_VALUE: u16 = 0xAA55;
    /// "HdrS", little-endian.
    pub const HEADER_MAGIC: u32 = 0x5372_6448;
    pub const VERSION_VALUE: u16 = 0x020F;
    pub const TYPE_OF_LOADER_VALUE: u8 = 0xFF;
    /// hardware_subarch value that means "lguest".
    pub const SUBARCH_LGUEST: u32 = 1;
    /// An e820 entry is {u64 addr, u64 size, u32 type}, packed: 20 bytes.
    pub const E820_ENTRY_SIZE: usize = 20;
    pub const E820_RAM: u32 = 1;
}

/// hardware_subarch_data: which device model sits at `mem`.
pub const DEVICE_MODEL_DMA: u64 = 1;
pub const DEVICE_MODEL_VIRTIO: u64 = 2;

/*
 * Section 4: hypercalls.
 */

pub mod hcall {
    pub const FLUSH_ASYNC: u64 = 0;
    pub const LGUEST_INIT: u64 = 1;
    pub const SHUTDOWN: u64 = 2;
    pub const LOAD_GDT: u64 = 3;
    pub const NEW_PGTABLE: u64 = 4;
    pub const FLUSH_TLB: u64 = 5;
    pub const LOAD_IDT_ENTRY: u64 = 6;
    pub const SET_STACK: u64 = 7;
    pub const TS: u64 = 8;
    pub const SET_CLOCKEVENT: u64 = 9;
    pub const HALT: u64 = 10;
    pub const GET_WALLCLOCK: u64 = 11;
    pub const BIND_DMA: u64 = 12;
    pub const SEND_DMA: u64 = 13;
    pub const SET_PTE: u64 = 14;
    pub const SET_PGD: u64 = 15;
    pub const LOAD_TLS: u64 = 16;
    pub const NOTIFY: u64 = 17;
    pub const LOAD_GDT_ENTRY: u64 = 18;
    pub const SEND_INTERRUPTS: u64 = 19;

    /// The name of a hypercall, for messages.
    pub fn name(nr: u64) -> Option<&'static str> {
        Some(match nr {
            FLUSH_ASYNC => "FLUSH_ASYNC",
            LGUEST_INIT => "LGUEST_INIT",
            SHUTDOWN => "SHUTDOWN",
            LOAD_GDT => "LOAD_GDT",
            NEW_PGTABLE => "NEW_PGTABLE",
            FLUSH_TLB => "FLUSH_TLB",
            LOAD_IDT_ENTRY => "LOAD_IDT_ENTRY",
            SET_STACK => "SET_STACK",
            TS => "TS",
            SET_CLOCKEVENT => "SET_CLOCKEVENT",
            HALT => "HALT",
            GET_WALLCLOCK => "GET_WALLCLOCK",
            BIND_DMA => "BIND_DMA",
            SEND_DMA => "SEND_DMA",
            SET_PTE => "SET_PTE",
            SET_PGD => "SET_PGD",
            LOAD_TLS => "LOAD_TLS",
            NOTIFY => "NOTIFY",
            LOAD_GDT_ENTRY => "LOAD_GDT_ENTRY",
            SEND_INTERRUPTS => "SEND_INTERRUPTS",
            _ => return None,
        })
    }
}

/// SHUTDOWN's second argument.
pub const SHUTDOWN_POWEROFF: u64 = 1;
pub const SHUTDOWN_RESTART: u64 = 2;
pub const SHUTDOWN_CRASH: u64 = 3;
/// How much of a SHUTDOWN reason the Host reads.
pub const SHUTDOWN_REASON_MAX: usize = 127;

/// Async ring size, and the two values of a status byte (section 4.1).
pub const HCALL_RING_SIZE: usize = 64;
pub const HCALL_STATUS_FREE: u8 = 0xFF;
pub const HCALL_STATUS_QUEUED: u8 = 0;

/// SET_STACK limits.
pub const STACK_MAX_PAGES: u64 = 16;
/// SET_CLOCKEVENT: deltas below this fire at once.
pub const CLOCK_MIN_DELTA_NS: u64 = 100;

/// IDT gate types a Guest may load.
pub const GATE_INTERRUPT: u8 = 0xE;
pub const GATE_TRAP: u8 = 0xF;
/// Vectors LOAD_IDT_ENTRY silently ignores: NMI, #DF, #MC and the hypercall trap.
pub const IGNORED_VECTORS: [u64; 4] = [2, 8, 18, LGUEST_TRAP_ENTRY as u64];

/*
 * Section 5: struct lguest_data.
 */

/// One slot of the async hypercall ring.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct HcallArgs {
    pub nr: u64,
    pub arg1: u64,
    pub arg2: u64,
    pub arg3: u64,
    pub arg4: u64,
}

/// The page the Guest and Host share, registered with LGUEST_INIT.
/// G = written by the Guest, H = by the Host.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct LguestData {
    /// G, H: 0x200 = virtual interrupts on.
    pub irq_enabled: u32,
    /// G: bit n set = IRQ n masked.
    pub blocked_interrupts: u32,
    /// H: faulting address of the last #PF delivered.
    pub cr2: u64,
    /// H: wall clock, written at INIT and at every delivery.
    pub time_sec: u64,
    pub time_nsec: u64,
    /// H: 0x200 while a deliverable IRQ waits.
    pub irq_pending: u32,
    /// G, H: async ring status, 0xFF free, 0 queued.
    pub hcall_status: [u8; HCALL_RING_SIZE],
    pub _pad0: [u8; 4],
    /// G: async ring.
    pub hcalls: [HcallArgs; HCALL_RING_SIZE],
    /// H: 1 << 47.
    pub reserve_mem: u64,
    /// H: phys addr of the initial PML4.
    pub pgdir: u64,
    /// H: TSC frequency in kHz, or 0.
    pub tsc_khz: u32,
    /// H: this Guest's number.
    pub guestid: u16,
    pub _pad1: [u8; 2],
    /// G: no interrupt is delivered while RIP is in [noirq_start, noirq_end).
    pub noirq_start: u64,
    pub noirq_end: u64,
    /// H: first page frame the Guest may not touch.
    pub pfn_limit: u64,
    /// H: the PML4 entry every Guest PML4 carries in slot 511.
    pub host_pml4e: u64,
}

/// Byte offsets of the lguest_data fields, for code that reads guest memory
/// field by field (the Host re-reads Guest fields each time it uses them).
pub mod lguest_data_off {
    use super::LguestData;
    use core::mem::offset_of;
    pub const IRQ_ENABLED: usize = offset_of!(LguestData, irq_enabled);
    pub const BLOCKED_INTERRUPTS: usize = offset_of!(LguestData, blocked_interrupts);
    pub const CR2: usize = offset_of!(LguestData, cr2);
    pub const TIME_SEC: usize = offset_of!(LguestData, time_sec);
    pub const TIME_NSEC: usize = offset_of!(LguestData, time_nsec);
    pub const IRQ_PENDING: usize = offset_of!(LguestData, irq_pending);
    pub const HCALL_STATUS: usize = offset_of!(LguestData, hcall_status);
    pub const HCALLS: usize = offset_of!(LguestData, hcalls);
    pub const RESERVE_MEM: usize = offset_of!(LguestData, reserve_mem);
    pub const PGDIR: usize = offset_of!(LguestData, pgdir);
    pub const TSC_KHZ: usize = offset_of!(LguestData, tsc_khz);
    pub const GUESTID: usize = offset_of!(LguestData, guestid);
    pub const NOIRQ_START: usize = offset_of!(LguestData, noirq_start);
    pub const NOIRQ_END: usize = offset_of!(LguestData, noirq_end);
    pub const PFN_LIMIT: usize = offset_of!(LguestData, pfn_limit);
    pub const HOST_PML4E: usize = offset_of!(LguestData, host_pml4e);
}

/*
 * Section 6: interrupts and traps.
 */

/// How many IRQs a Guest has.
pub const LGUEST_IRQS: u32 = 32;
/// IRQ n arrives on vector FIRST_EXTERNAL_VECTOR + n.
pub const FIRST_EXTERNAL_VECTOR: u8 = 32;
/// IRQ 0 is the clock.
pub const TIMER_IRQ: u32 = 0;
/// The red zone skipped below an interrupted stack.
pub const RED_ZONE: u64 = 128;

/// Vectors for which the CPU pushes an error code (and so the Host does too).
pub fn vector_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21)
}

pub const VEC_DE: u8 = 0;
pub const VEC_DB: u8 = 1;
pub const VEC_BP: u8 = 3;
pub const VEC_UD: u8 = 6;
pub const VEC_NM: u8 = 7;
pub const VEC_DF: u8 = 8;
pub const VEC_GP: u8 = 13;
pub const VEC_PF: u8 = 14;

/*
 * Section 8: virtio on the lguest bus.
 */

/// `struct lguest_device_desc`, followed by its vqconfigs, features and config.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DeviceDesc {
    pub type_: u8,
    pub num_vq: u8,
    pub feature_len: u8,
    pub config_len: u8,
    pub status: u8,
}

impl DeviceDesc {
    /// Bytes this entry occupies on the descriptor page (seed 002's desc_size).
    pub fn total_size(&self) -> usize {
        core::mem::size_of::<DeviceDesc>()
            + self.num_vq as usize * core::mem::size_of::<VqConfig>()
            + self.feature_len as usize * 2
            + self.config_len as usize
    }
}

/// `struct lguest_vqconfig`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct VqConfig {
    pub num: u16,
    pub irq: u16,
    pub pfn: u32,
}

/// Virtio device IDs used as descriptor types.
pub const VIRTIO_ID_NET: u8 = 1;
pub const VIRTIO_ID_BLOCK: u8 = 2;
pub const VIRTIO_ID_CONSOLE: u8 = 3;
pub const VIRTIO_ID_RNG: u8 = 4;
/// Bytes of Host (and of Guest) feature bits per device.
pub const FEATURE_LEN: u8 = 4;
/// Default ring size.
pub const VRING_DEFAULT_NUM: u16 = 256;

/// The legacy split virtqueue ("vring") both sides walk (ABI section 8):
///
/// ```text
/// base:                descriptors {u64 addr, u32 len, u16 flags, u16 next} x num
/// base + 16 num:       avail ring  {u16 flags, u16 idx, u16 ring[num], u16 used_event}
/// next 4096 boundary:  used ring   {u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event}
/// ```
pub mod vring {
    /// Descriptor flags: the chain goes on at `next`; the device writes this
    /// buffer (rather than reads it); the buffer is a table of descriptors.
    pub const DESC_F_NEXT: u16 = 1;
    pub const DESC_F_WRITE: u16 = 2;
    pub const DESC_F_INDIRECT: u16 = 4;
    /// Used ring flag: the device doesn't need kicks just now.
    pub const USED_F_NO_NOTIFY: u16 = 1;
    /// Avail ring flag: the driver doesn't need interrupts just now.
    pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
    /// Bytes of one descriptor.
    pub const DESC_SIZE: u64 = 16;
    /// The used ring's alignment.
    pub const ALIGN: u64 = 4096;

    /// Bytes of the three areas of a ring of `num` entries: descriptors,
    /// avail ring (with used_event), used ring (with avail_event).
    pub const fn area_sizes(num: u16) -> [u64; 3] {
        let n = num as u64;
        [DESC_SIZE * n, 4 + 2 * n + 2, 4 + 8 * n + 2]
    }

    /// Where the avail ring starts, from the ring's base.
    pub const fn avail_offset(num: u16) -> u64 {
        DESC_SIZE * num as u64
    }

    /// Where the used ring starts, from the ring's base.
    pub const fn used_offset(num: u16) -> u64 {
        let [desc, avail, _] = area_sizes(num);
        (desc + avail).next_multiple_of(ALIGN)
    }

    /// Bytes from the ring's base to the end of the used ring.
    pub const fn ring_end(num: u16) -> u64 {
        used_offset(num) + area_sizes(num)[2]
    }

    /// Bytes a ring of `num` entries takes, both parts, page-aligned.
    pub const fn ring_bytes(num: u16) -> u64 {
        used_offset(num) + area_sizes(num)[2].next_multiple_of(ALIGN)
    }

    /// One descriptor, as it sits in the table (and in an indirect table).
    #[repr(C)]
    #[derive(
        Clone,
        Copy,
        Debug,
        Default,
        PartialEq,
        Eq,
        zerocopy::FromBytes,
        zerocopy::IntoBytes,
        zerocopy::Immutable,
        zerocopy::KnownLayout,
    )]
    pub struct Desc {
        pub addr: u64,
        pub len: u32,
        pub flags: u16,
        pub next: u16,
    }
    const _: () = assert!(core::mem::size_of::<Desc>() == DESC_SIZE as usize);

    /// Feature bits every lguest device offers (ABI section 8).
    pub const F_NOTIFY_ON_EMPTY: u32 = 24;
    pub const F_ANY_LAYOUT: u32 = 27;
    pub const RING_F_INDIRECT_DESC: u32 = 28;
    pub const RING_F_EVENT_IDX: u32 = 29;
    pub const COMMON_FEATURES: u32 = 1 << F_NOTIFY_ON_EMPTY
        | 1 << F_ANY_LAYOUT
        | 1 << RING_F_INDIRECT_DESC
        | 1 << RING_F_EVENT_IDX;

    /// vring_need_event: has the index gone from `old` to `new` past
    /// `event`? The device uses it to decide on interrupts, the driver on
    /// kicks (VIRTIO_RING_F_EVENT_IDX).
    pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }
}

/// Virtio 0.9.5 status bits.
pub const VIRTIO_STATUS_ACKNOWLEDGE: u8 = 1;
pub const VIRTIO_STATUS_DRIVER: u8 = 2;
pub const VIRTIO_STATUS_DRIVER_OK: u8 = 4;
pub const VIRTIO_STATUS_FAILED: u8 = 0x80;

/// Longest early-console string a NOTIFY may carry.
pub const EARLY_CONSOLE_MAX: usize = 4096;

/*
 * Section 9: the 2007 DMA model.
 */

pub const DMA_MAX_DEVICES: usize = 16;
pub const LGUEST_MAX_DMA: usize = 32;
pub const LGUEST_MAX_DMA_SECTIONS: usize = 16;
pub const LGUEST_CONSOLE_DMA_KEY: u64 = 0;

/// One entry of the 2007 device table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DmaDeviceDesc {
    pub type_: u16,
    pub features: u16,
    pub status: u16,
    pub num_pages: u16,
    pub pfn: u32,
}

/// `struct lguest_dma`: up to 16 sections, a length of 0 ends the list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct LguestDma {
    pub used_len: u32,
    pub pad: u32,
    pub addr: [u64; LGUEST_MAX_DMA_SECTIONS],
    pub len: [u16; LGUEST_MAX_DMA_SECTIONS],
}

/// The block device page of the 2007 model.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct BlockPage {
    pub type_: u32,
    pub sector: u32,
    pub bytes: u32,
    pub result: u32,
    pub num_sectors: u32,
}

/// Device types of the 2007 device table.
pub const LGUEST_DEVICE_T_CONSOLE: u16 = 1;
pub const LGUEST_DEVICE_T_NET: u16 = 2;
pub const LGUEST_DEVICE_T_BLOCK: u16 = 3;

/// Status bits of a 2007 device-table entry: all 0 at boot, set only by the
/// Guest (the Host may set REMOVED).
pub const LGUEST_DEVICE_S_ACKNOWLEDGE: u16 = 1;
pub const LGUEST_DEVICE_S_DRIVER: u16 = 2;
pub const LGUEST_DEVICE_S_DRIVER_OK: u16 = 4;
pub const LGUEST_DEVICE_S_REMOVED: u16 = 8;
pub const LGUEST_DEVICE_S_REMOVED_ACK: u16 = 16;
pub const LGUEST_DEVICE_S_FAILED: u16 = 128;

/// Feature bits of a 2007 device-table entry.
pub const LGUEST_NET_F_NOCSUM: u16 = 0x4000;
pub const LGUEST_DEVICE_F_RANDOMNESS: u16 = 0x8000;
/// A net entry's features carry its slot number in these bits.
pub const LGUEST_NET_SLOT_MASK: u16 = 0x0FFF;

/// The net page: 6-byte MAC slots at `page + 6 * slot`...
pub const LGUEST_NET_MAC_LEN: usize = 6;
/// ...and slot n's key at `page + 4 * n`.
pub const LGUEST_NET_KEY_STRIDE: u64 = 4;
/// Bit 0 of a MAC slot's byte 0: the slot's Guest is promiscuous.
pub const LGUEST_NET_PROMISC: u8 = 1;

/// BIND_DMA's third argument is `(count << 8) | irq`.
pub const BIND_DMA_COUNT_SHIFT: u32 = 8;
pub const BIND_DMA_IRQ_MASK: u64 = 0xFF;

/// The block page's `type` and `result` values.
pub const LGUEST_BLOCK_READ: u32 = 0;
pub const LGUEST_BLOCK_WRITE: u32 = 1;
pub const LGUEST_BLOCK_PENDING: u32 = 0;
pub const LGUEST_BLOCK_DONE: u32 = 1;
pub const LGUEST_BLOCK_ERROR: u32 = 2;
/// Block requests move whole 512-byte sectors.
pub const LGUEST_BLOCK_SECTOR: u64 = 512;

/// Byte offsets of the 2007 layouts, for code that reads Guest memory field
/// by field.
pub mod dma_off {
    use super::{BlockPage, DmaDeviceDesc, LguestDma};
    use core::mem::offset_of;
    pub const DESC_TYPE: usize = offset_of!(DmaDeviceDesc, type_);
    pub const DESC_FEATURES: usize = offset_of!(DmaDeviceDesc, features);
    pub const DESC_STATUS: usize = offset_of!(DmaDeviceDesc, status);
    pub const DESC_NUM_PAGES: usize = offset_of!(DmaDeviceDesc, num_pages);
    pub const DESC_PFN: usize = offset_of!(DmaDeviceDesc, pfn);
    pub const DMA_USED_LEN: usize = offset_of!(LguestDma, used_len);
    pub const DMA_ADDR: usize = offset_of!(LguestDma, addr);
    pub const DMA_LEN: usize = offset_of!(LguestDma, len);
    pub const BLOCK_TYPE: usize = offset_of!(BlockPage, type_);
    pub const BLOCK_SECTOR: usize = offset_of!(BlockPage, sector);
    pub const BLOCK_BYTES: usize = offset_of!(BlockPage, bytes);
    pub const BLOCK_RESULT: usize = offset_of!(BlockPage, result);
    pub const BLOCK_NUM_SECTORS: usize = offset_of!(BlockPage, num_sectors);
}

#[cfg(test)]
mod tests {
    #[test]
    fn vring_layout_and_need_event() {
        use super::vring::*;
        // 256 entries: 4096 of descriptors, 518 of avail ring, so the used
        // ring starts two pages in.
        assert_eq!(used_offset(256), 8192);
        assert_eq!(ring_end(256), 8192 + 4 + 8 * 256 + 2);
        assert_eq!(ring_bytes(256), 8192 + 4096);
        assert_eq!(used_offset(8), 4096);
        // Passed the event: from 4 to 6 crosses 4 and 5.
        assert!(need_event(5, 6, 4));
        assert!(!need_event(6, 6, 4));
        assert!(need_event(0xFFFF, 1, 0xFFFE), "wraps");
    }

    use super::*;
    use core::mem::{offset_of, size_of};

    /// Every row of the lguest_data table in ABI.md section 5.
    #[test]
    fn lguest_data_layout_matches_the_abi() {
        assert_eq!(offset_of!(LguestData, irq_enabled), 0);
        assert_eq!(offset_of!(LguestData, blocked_interrupts), 4);
        assert_eq!(offset_of!(LguestData, cr2), 8);
        assert_eq!(offset_of!(LguestData, time_sec), 16);
        assert_eq!(offset_of!(LguestData, time_nsec), 24);
        assert_eq!(offset_of!(LguestData, irq_pending), 32);
        assert_eq!(offset_of!(LguestData, hcall_status), 36);
        assert_eq!(offset_of!(LguestData, hcalls), 104);
        assert_eq!(size_of::<HcallArgs>(), 40);
        assert_eq!(offset_of!(LguestData, reserve_mem), 2664);
        assert_eq!(offset_of!(LguestData, pgdir), 2672);
        assert_eq!(offset_of!(LguestData, tsc_khz), 2680);
        assert_eq!(offset_of!(LguestData, guestid), 2684);
        assert_eq!(offset_of!(LguestData, noirq_start), 2688);
        assert_eq!(offset_of!(LguestData, noirq_end), 2696);
        assert_eq!(offset_of!(LguestData, pfn_limit), 2704);
        assert_eq!(offset_of!(LguestData, host_pml4e), 2712);
        assert_eq!(size_of::<LguestData>(), 2720);
    }

    #[test]
    fn hypercall_numbers_match_the_abi() {
        let table = [
            (0, "FLUSH_ASYNC"),
            (1, "LGUEST_INIT"),
            (2, "SHUTDOWN"),
            (3, "LOAD_GDT"),
            (4, "NEW_PGTABLE"),
            (5, "FLUSH_TLB"),
            (6, "LOAD_IDT_ENTRY"),
            (7, "SET_STACK"),
            (8, "TS"),
            (9, "SET_CLOCKEVENT"),
            (10, "HALT"),
            (11, "GET_WALLCLOCK"),
            (12, "BIND_DMA"),
            (13, "SEND_DMA"),
            (14, "SET_PTE"),
            (15, "SET_PGD"),
            (16, "LOAD_TLS"),
            (17, "NOTIFY"),
            (18, "LOAD_GDT_ENTRY"),
            (19, "SEND_INTERRUPTS"),
        ];
        for (nr, name) in table {
            assert_eq!(hcall::name(nr), Some(name));
        }
        assert_eq!(hcall::name(20), None);
    }

    #[test]
    fn boot_params_offsets_match_the_abi() {
        use boot_params::*;
        assert_eq!(BOOT_FLAG, 0x1FE);
        assert_eq!(HEADER, 0x202);
        assert_eq!(&HEADER_MAGIC.to_le_bytes(), b"HdrS");
        assert_eq!(VERSION, 0x206);
        assert_eq!(TYPE_OF_LOADER, 0x210);
        assert_eq!(RAMDISK_IMAGE, 0x218);
        assert_eq!(RAMDISK_SIZE, 0x21C);
        assert_eq!(CMD_LINE_PTR, 0x228);
        assert_eq!(CMDLINE_SIZE, 0x238);
        assert_eq!(HARDWARE_SUBARCH, 0x23C);
        assert_eq!(HARDWARE_SUBARCH_DATA, 0x240);
        assert_eq!(E820_ENTRIES, 0x1E8);
        assert_eq!(E820_TABLE, 0x2D0);
    }

    #[test]
    fn machine_state_matches_the_abi() {
        assert_eq!(GUEST_CS >> 3, 6);
        assert_eq!(GUEST_DS >> 3, 5);
        assert_eq!(GUEST_CS & 3, 3);
        assert_eq!(GUEST_DS & 3, 3);
        assert_eq!(HOST_TSS >> 3, 7);
        assert_eq!(GUEST_CR0, 0x8005_0033);
        assert_eq!(GUEST_CR4, 0x620);
        assert_eq!(GUEST_EFER, 0xD00);
        assert_eq!(RESERVE_MEM, 0x8000_0000_0000);
    }

    #[test]
    fn device_layouts_match_the_abi() {
        assert_eq!(size_of::<DeviceDesc>(), 5);
        assert_eq!(size_of::<VqConfig>(), 8);
        assert_eq!(size_of::<DmaDeviceDesc>(), 12);
        assert_eq!(size_of::<LguestDma>(), 168);
        assert_eq!(offset_of!(LguestDma, addr), 8);
        assert_eq!(offset_of!(LguestDma, len), 136);
        assert_eq!(size_of::<BlockPage>(), 20);
        let d = DeviceDesc {
            type_: VIRTIO_ID_NET,
            num_vq: 2,
            feature_len: 4,
            config_len: 8,
            status: 0,
        };
        assert_eq!(d.total_size(), 5 + 16 + 8 + 8);
    }

    #[test]
    fn dma_model_numbers_match_the_abi() {
        assert_eq!(
            (
                LGUEST_DEVICE_T_CONSOLE,
                LGUEST_DEVICE_T_NET,
                LGUEST_DEVICE_T_BLOCK
            ),
            (1, 2, 3)
        );
        assert_eq!(
            [
                LGUEST_DEVICE_S_ACKNOWLEDGE,
                LGUEST_DEVICE_S_DRIVER,
                LGUEST_DEVICE_S_DRIVER_OK,
                LGUEST_DEVICE_S_REMOVED,
                LGUEST_DEVICE_S_REMOVED_ACK,
                LGUEST_DEVICE_S_FAILED
            ],
            [1, 2, 4, 8, 16, 128]
        );
        assert_eq!(LGUEST_NET_F_NOCSUM, 0x4000);
        assert_eq!(LGUEST_DEVICE_F_RANDOMNESS, 0x8000);
        assert_eq!(LGUEST_NET_SLOT_MASK, (1 << 12) - 1);
        assert_eq!(DMA_MAX_DEVICES * size_of::<DmaDeviceDesc>(), 192);
        assert_eq!((dma_off::DESC_FEATURES, dma_off::DESC_STATUS), (2, 4));
        assert_eq!((dma_off::DESC_NUM_PAGES, dma_off::DESC_PFN), (6, 8));
        assert_eq!(dma_off::DMA_USED_LEN, 0);
        assert_eq!(
            [
                dma_off::BLOCK_TYPE,
                dma_off::BLOCK_SECTOR,
                dma_off::BLOCK_BYTES,
                dma_off::BLOCK_RESULT,
                dma_off::BLOCK_NUM_SECTORS
            ],
            [0, 4, 8, 12, 16]
        );
        assert_eq!(
            (LGUEST_BLOCK_DONE, LGUEST_BLOCK_ERROR, LGUEST_BLOCK_WRITE),
            (1, 2, 1)
        );
    }

    #[test]
    fn error_code_vectors() {
        for v in 0..32u8 {
            let expect = matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21);
            assert_eq!(vector_has_error_code(v), expect, "vector {v}");
        }
    }
}
