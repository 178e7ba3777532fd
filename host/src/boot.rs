//! Boot (ABI section 3): the kernel ELF, the zero page, the command line and
//! the initrd.
//!
//! The kernel is checked in full before anything runs ([`Kernel::parse`]), so a
//! bad file is a one-line set-up error, never a Guest that dies strangely.

use crate::memory::GuestMemory;
use lguest_abi::{boot_params as bp, CMDLINE_ADDR, CMDLINE_MAX, KERNEL_MIN_ADDR, PAGE_SIZE};
use std::borrow::Cow;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootError {
    #[error("{0}: not an ELF file")]
    NotElf(String),
    #[error("{0}: not a 64-bit little-endian ELF")]
    Not64(String),
    #[error("{0}: ELF for another machine (e_machine {1}), not x86-64")]
    WrongMachine(String, u16),
    #[error("{0}: not an executable ELF (e_type {1}; lguest needs ET_EXEC)")]
    NotExec(String, u16),
    #[error("{0}: malformed ELF: {1}")]
    Malformed(String, &'static str),
    #[error("{0}: has no loadable segments")]
    NoSegments(String),
    #[error(
        "{name}: segment at {addr:#x}-{end:#x} does not fit in guest memory [{min:#x}, {max:#x})"
    )]
    DoesNotFit {
        name: String,
        addr: u64,
        end: u64,
        min: u64,
        max: u64,
    },
    #[error("initrd {name} ({size} bytes) does not fit in {mem} bytes of guest memory")]
    InitrdTooBig { name: String, size: u64, mem: u64 },
    #[error("kernel command line is {0} bytes; at most {CMDLINE_MAX} fit")]
    CmdlineTooLong(usize),
}

/// One PT_LOAD: where it goes and which bytes of the file fill it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    paddr: u64,
    offset: usize,
    filesz: usize,
    memsz: u64,
}

/// A validated kernel image.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub name: String,
    /// The file's bytes: read from disk, or the bundled Guest in our own
    /// read-only data (borrowed, not copied).
    image: Cow<'static, [u8]>,
    segments: Vec<Segment>,
    pub entry: u64,
}

const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl Kernel {
    /// Checks that `image` is an ELF64 ET_EXEC x86-64 file with sane PT_LOADs.
    pub fn parse(name: &str, image: impl Into<Cow<'static, [u8]>>) -> Result<Kernel, BootError> {
        let image = image.into();
        let n = || name.to_string();
        if image.len() < 16 || &image[0..4] != b"\x7fELF" {
            return Err(BootError::NotElf(n()));
        }
        if image[4] != 2 || image[5] != 1 || image.len() < 64 {
            return Err(BootError::Not64(n()));
        }
        let machine = u16_at(&image, 18);
        if machine != EM_X86_64 {
            return Err(BootError::WrongMachine(n(), machine));
        }
        let etype = u16_at(&image, 16);
        if etype != ET_EXEC {
            return Err(BootError::NotExec(n(), etype));
        }
        let entry = u64_at(&image, 24);
        let phoff = u64_at(&image, 32);
        let phentsize = u16_at(&image, 54) as u64;
        let phnum = u16_at(&image, 56) as u64;
        if phentsize < 56 {
            return Err(BootError::Malformed(
                n(),
                "program header entries too small",
            ));
        }
        let table_end = phentsize
            .checked_mul(phnum)
            .and_then(|s| s.checked_add(phoff));
        if table_end.is_none_or(|end| end > image.len() as u64) {
            return Err(BootError::Malformed(
                n(),
                "program headers past end of file",
            ));
        }
        let mut segments = Vec::new();
        for i in 0..phnum {
            let ph = (phoff + i * phentsize) as usize;
            if u32_at(&image, ph) != PT_LOAD {
                continue;
            }
            let offset = u64_at(&image, ph + 8);
            let paddr = u64_at(&image, ph + 24);
            let filesz = u64_at(&image, ph + 32);
            let memsz = u64_at(&image, ph + 40);
            if filesz > memsz {
                return Err(BootError::Malformed(
                    n(),
                    "segment file size exceeds memory size",
                ));
            }
            if offset
                .checked_add(filesz)
                .is_none_or(|end| end > image.len() as u64)
            {
                return Err(BootError::Malformed(n(), "segment data past end of file"));
            }
            if paddr.checked_add(memsz).is_none() {
                return Err(BootError::Malformed(n(), "segment address overflows"));
            }
            if memsz == 0 {
                continue;
            }
            segments.push(Segment {
                paddr,
                offset: offset as usize,
                filesz: filesz as usize,
                memsz,
            });
        }
        if segments.is_empty() {
            return Err(BootError::NoSegments(n()));
        }
        Ok(Kernel {
            name: n(),
            image,
            segments,
            entry,
        })
    }

    /// Checks every segment lies in `[0x2000, limit)`.
    pub fn check_fits(&self, limit: u64) -> Result<(), BootError> {
        for s in &self.segments {
            let end = s.paddr + s.memsz;
            if s.paddr < KERNEL_MIN_ADDR || end > limit {
                return Err(BootError::DoesNotFit {
                    name: self.name.clone(),
                    addr: s.paddr,
                    end,
                    min: KERNEL_MIN_ADDR,
                    max: limit,
                });
            }
        }
        Ok(())
    }

    /// Copies the segments into memory. Bytes past p_filesz must be zero:
    /// they are, because every boot gets freshly mapped (zero) memory, and
    /// not writing them spares touching pages the Guest may never use.
    fn load(&self, mem: &GuestMemory) {
        for s in &self.segments {
            let data = &self.image[s.offset..s.offset + s.filesz];
            mem.write(s.paddr, data).expect("checked by check_fits");
        }
    }
}

/// Where the initrd goes in `mem` bytes of RAM: page-aligned, at the top.
pub fn initrd_start(mem: u64, size: u64, name: &str) -> Result<u64, BootError> {
    let too_big = || BootError::InitrdTooBig {
        name: name.to_string(),
        size,
        mem,
    };
    let start = mem.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if start < KERNEL_MIN_ADDR {
        return Err(too_big());
    }
    Ok(start)
}

/// Everything boot needs, checked.
pub struct BootImage<'a> {
    pub kernel: &'a Kernel,
    pub initrd: Option<(&'a str, &'a [u8])>,
    pub cmdline: &'a str,
    pub device_model: u64,
}

impl BootImage<'_> {
    /// Checks that everything fits in `mem` bytes of RAM.
    pub fn check(&self, mem: u64) -> Result<(), BootError> {
        if self.cmdline.len() > CMDLINE_MAX {
            return Err(BootError::CmdlineTooLong(self.cmdline.len()));
        }
        let limit = match self.initrd {
            Some((name, data)) => initrd_start(mem, data.len() as u64, name)?,
            None => mem,
        };
        self.kernel.check_fits(limit)
    }

    /// Writes kernel, initrd, command line and zero page into fresh memory.
    /// Returns the entry point.
    pub fn load(&self, mem: &GuestMemory) -> Result<u64, BootError> {
        let ram = mem.layout.mem;
        self.check(ram)?;
        self.kernel.load(mem);
        let mut zero_page = [0u8; PAGE_SIZE as usize];
        let mut put =
            |off: usize, bytes: &[u8]| zero_page[off..off + bytes.len()].copy_from_slice(bytes);
        if let Some((name, data)) = self.initrd {
            let start = initrd_start(ram, data.len() as u64, name)?;
            mem.write(start, data).expect("initrd checked to fit");
            put(bp::RAMDISK_IMAGE, &(start as u32).to_le_bytes());
            put(bp::RAMDISK_SIZE, &(data.len() as u32).to_le_bytes());
        }
        let mut cmdline = self.cmdline.as_bytes().to_vec();
        cmdline.push(0);
        mem.write(CMDLINE_ADDR, &cmdline)
            .expect("command line page is RAM");

        put(bp::BOOT_FLAG, &bp::BOOT_FLAG_VALUE.to_le_bytes());
        put(bp::HEADER, &bp::HEADER_MAGIC.to_le_bytes());
        put(bp::VERSION, &bp::VERSION_VALUE.to_le_bytes());
        put(bp::TYPE_OF_LOADER, &[bp::TYPE_OF_LOADER_VALUE]);
        put(bp::CMD_LINE_PTR, &(CMDLINE_ADDR as u32).to_le_bytes());
        put(bp::CMDLINE_SIZE, &(CMDLINE_MAX as u32).to_le_bytes());
        put(bp::HARDWARE_SUBARCH, &bp::SUBARCH_LGUEST.to_le_bytes());
        put(bp::HARDWARE_SUBARCH_DATA, &self.device_model.to_le_bytes());
        put(bp::E820_ENTRIES, &[1]);
        put(bp::E820_TABLE, &0u64.to_le_bytes());
        put(bp::E820_TABLE + 8, &ram.to_le_bytes());
        put(bp::E820_TABLE + 16, &bp::E820_RAM.to_le_bytes());
        mem.write(0, &zero_page).expect("zero page is RAM");
        Ok(self.kernel.entry)
    }
}

/// A minimal ELF64 x86-64 ET_EXEC with one PT_LOAD of `code` at `paddr`
/// (`memsz` bytes in memory), entry at `paddr`: for the benchmark floor and tests.
pub fn tiny_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
    f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    f[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_good_kernel_and_refuses_bad_ones() {
        let good = tiny_elf(0x10_0000, &[0x90; 16], 0x2000);
        let k = Kernel::parse("k", good.clone()).unwrap();
        assert_eq!(k.entry, 0x10_0000);
        assert!(k.check_fits(4 << 20).is_ok());
        assert!(matches!(
            k.check_fits(0x10_1000),
            Err(BootError::DoesNotFit { .. })
        ));

        assert_eq!(
            Kernel::parse("k", b"root:x:0:0".to_vec()).unwrap_err(),
            BootError::NotElf("k".into())
        );
        let mut arm = good.clone();
        arm[18] = 183;
        assert_eq!(
            Kernel::parse("k", arm).unwrap_err(),
            BootError::WrongMachine("k".into(), 183)
        );
        let mut dyn_ = good.clone();
        dyn_[16] = 3;
        assert_eq!(
            Kernel::parse("k", dyn_).unwrap_err(),
            BootError::NotExec("k".into(), 3)
        );
        let mut elf32 = good.clone();
        elf32[4] = 1;
        assert_eq!(
            Kernel::parse("k", elf32).unwrap_err(),
            BootError::Not64("k".into())
        );
        let truncated = good[..good.len() - 8].to_vec();
        assert!(matches!(
            Kernel::parse("k", truncated),
            Err(BootError::Malformed(..))
        ));
        let low = tiny_elf(0x1000, &[0x90], 1);
        assert!(Kernel::parse("k", low)
            .unwrap()
            .check_fits(1 << 20)
            .is_err());
    }

    #[test]
    fn initrd_goes_at_the_top_page_aligned() {
        assert_eq!(
            initrd_start(0x100_0000, 0x1800, "i").unwrap(),
            0x100_0000 - 0x2000
        );
        assert!(initrd_start(0x10000, 0x20000, "i").is_err());
    }
}
