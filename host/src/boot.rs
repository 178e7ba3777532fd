//! Boot (ABI section 3): the kernel ELF, the zero page, the command line and
//! the initrd.
//!
//! The kernel is checked in full before anything runs ([`Kernel::from_file`]),
//! so a bad file is a one-line set-up error, never a Guest that dies
//! strangely. Only the headers are read then: the bytes a boot needs are read
//! with `pread` straight into the Guest's memory at each boot, so a kernel or
//! initrd is never held whole in ours, and a huge file costs only what loads.

use crate::memory::GuestMemory;
use lguest_abi::{boot_params as bp, CMDLINE_ADDR, CMDLINE_MAX, KERNEL_MIN_ADDR, PAGE_SIZE};
use std::borrow::Cow;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// What lguest boots, for the messages about what it won't.
const WANTED: &str = "lguest needs an ELF64 ET_EXEC x86-64 kernel written for the lguest ABI, \
                      loaded and entered below the top of RAM (ABI section 3)";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootError {
    #[error("{0}: not an ELF file; {WANTED}")]
    NotElf(String),
    #[error("{0} looks like a Linux bzImage (a compressed x86 boot image); {WANTED}")]
    BzImage(String),
    #[error("{name} looks like a Linux vmlinux (entry {entry:#x} is in the upper half); {WANTED}")]
    UpperHalf { name: String, entry: u64 },
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
    #[error("{name}: entry point {entry:#x} is not in any loadable segment")]
    EntryOutside { name: String, entry: u64 },
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
    #[error("initrd {name} ({size} bytes) does not fit in the Guest's {mem} bytes of RAM")]
    InitrdTooBig { name: String, size: u64, mem: u64 },
    #[error(
        "initrd {name} ({size} bytes, at {start:#x} at the top of RAM) overlaps the kernel's \
         segment at {addr:#x}-{end:#x}; give the Guest more memory"
    )]
    InitrdOverlaps {
        name: String,
        size: u64,
        start: u64,
        addr: u64,
        end: u64,
    },
    #[error(
        "initrd {name} would end at {end:#x}, above the 4 GiB that boot_params' 32-bit \
         ramdisk fields can name; give the Guest at most 4096 MiB with --initrd"
    )]
    InitrdAbove4G { name: String, end: u64 },
    #[error("kernel command line is {0} bytes; at most {CMDLINE_MAX} fit")]
    CmdlineTooLong(usize),
    #[error("cannot read {name}: {err}")]
    Read { name: String, err: String },
}

/// Where a kernel's or an initrd's bytes come from.
#[derive(Debug)]
pub enum Source {
    /// In memory: a bundled Guest (borrowed from our own read-only data), or
    /// bytes built by a test or the benchmarks.
    Bytes(Cow<'static, [u8]>),
    /// An open regular file, read at each boot.
    File(File),
}

impl Source {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Source::Bytes(bytes) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let part = start
                    .checked_add(buf.len())
                    .and_then(|end| bytes.get(start..end))
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?;
                buf.copy_from_slice(part);
                Ok(())
            }
            Source::File(file) => file.read_exact_at(buf, offset),
        }
    }

    /// Copies `len` bytes from `offset` into Guest memory at `addr`, a range
    /// the caller checked. A file's bytes go straight in with pread, without
    /// a buffer of ours.
    fn load(&self, mem: &GuestMemory, offset: u64, len: u64, addr: u64) -> std::io::Result<()> {
        let file = match self {
            Source::Bytes(bytes) => {
                let part = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(len).ok())
                    .and_then(|(o, l)| bytes.get(o..o.checked_add(l)?))
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?;
                return mem.write(addr, part).map_err(std::io::Error::other);
            }
            Source::File(file) => file,
        };
        let ptr = mem.host_address(addr, len).map_err(std::io::Error::other)?;
        let mut done = 0u64;
        while done < len {
            let count = (len - done).min(1 << 30) as usize;
            let at = offset
                .checked_add(done)
                .and_then(|a| libc::off_t::try_from(a).ok())
                .ok_or(std::io::ErrorKind::InvalidInput)?;
            // No vCPU runs yet and no Rust reference to this memory exists.
            let fd = file.as_raw_fd();
            // SAFETY: host_address checked [ptr, ptr + len) is mapped Guest
            // memory; pread writes at most `count` bytes at `ptr + done`, inside it.
            let n = unsafe { libc::pread(fd, ptr.add(done as usize).cast(), count, at) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                // The file shrank since we checked it.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file is shorter than when it was checked",
                ));
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// One PT_LOAD: where it goes and which bytes of the file fill it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    paddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
}

/// A validated kernel image.
#[derive(Debug)]
pub struct Kernel {
    pub name: String,
    source: Source,
    segments: Vec<Segment>,
    pub entry: u64,
}

const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
/// The most program-header bytes we read: Linux's own loader limit, and far
/// more than any kernel has.
const PHDRS_MAX: u64 = 64 << 10;
/// Bytes read to recognise a file: the ELF header, or a bzImage's "HdrS" at
/// 0x202.
const HEAD: usize = 0x210;
/// The first address of the upper half, where Linux links its vmlinux.
const UPPER_HALF: u64 = 0xffff_8000_0000_0000;

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
    /// A kernel held in memory (a bundled Guest, or a test's).
    pub fn from_bytes(
        name: &str,
        image: impl Into<Cow<'static, [u8]>>,
    ) -> Result<Kernel, BootError> {
        let image = image.into();
        let len = image.len() as u64;
        Kernel::parse(name, Source::Bytes(image), len)
    }

    /// A kernel in an open regular file of `len` bytes: only its headers are
    /// read now.
    pub fn from_file(name: &str, file: File, len: u64) -> Result<Kernel, BootError> {
        Kernel::parse(name, Source::File(file), len)
    }

    /// Checks that `source` (`len` bytes) is an ELF64 ET_EXEC x86-64 file
    /// with sane PT_LOADs and an entry point inside one of them.
    /*L:140 The kernel is an ELF64 executable for x86-64; we read its
     * headers only, and say what a file looks like when it is something
     * else (a vmlinux, a bzImage). Its segments are read straight into Guest
     * memory at each boot. */
    fn parse(name: &str, source: Source, len: u64) -> Result<Kernel, BootError> {
        let n = || name.to_string();
        let read_err = |err: std::io::Error| BootError::Read {
            name: n(),
            err: err.to_string(),
        };
        let mut head = vec![0u8; HEAD.min(len as usize)];
        source.read_at(0, &mut head).map_err(read_err)?;
        if head.len() < 16 || &head[0..4] != b"\x7fELF" {
            if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
                return Err(BootError::BzImage(n()));
            }
            return Err(BootError::NotElf(n()));
        }
        if head[4] != 2 || head[5] != 1 || head.len() < 64 {
            return Err(BootError::Not64(n()));
        }
        let machine = u16_at(&head, 18);
        if machine != EM_X86_64 {
            return Err(BootError::WrongMachine(n(), machine));
        }
        let etype = u16_at(&head, 16);
        if etype != ET_EXEC {
            return Err(BootError::NotExec(n(), etype));
        }
        let entry = u64_at(&head, 24);
        if entry >= UPPER_HALF {
            return Err(BootError::UpperHalf { name: n(), entry });
        }
        let phoff = u64_at(&head, 32);
        let phentsize = u16_at(&head, 54) as u64;
        let phnum = u16_at(&head, 56) as u64;
        if phentsize < 56 {
            return Err(BootError::Malformed(
                n(),
                "program header entries too small",
            ));
        }
        let table_len = phentsize * phnum;
        if table_len > PHDRS_MAX {
            return Err(BootError::Malformed(n(), "program header table too large"));
        }
        if phoff.checked_add(table_len).is_none_or(|end| end > len) {
            return Err(BootError::Malformed(
                n(),
                "program headers past end of file",
            ));
        }
        let mut table = vec![0u8; table_len as usize];
        source.read_at(phoff, &mut table).map_err(read_err)?;
        let mut segments = Vec::new();
        for ph in table.chunks_exact(phentsize as usize) {
            if u32_at(ph, 0) != PT_LOAD {
                continue;
            }
            let offset = u64_at(ph, 8);
            let paddr = u64_at(ph, 24);
            let filesz = u64_at(ph, 32);
            let memsz = u64_at(ph, 40);
            if filesz > memsz {
                return Err(BootError::Malformed(
                    n(),
                    "segment file size exceeds memory size",
                ));
            }
            if offset.checked_add(filesz).is_none_or(|end| end > len) {
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
                offset,
                filesz,
                memsz,
            });
        }
        if segments.is_empty() {
            return Err(BootError::NoSegments(n()));
        }
        // RIP starts at e_entry with only RAM identity-mapped: an entry
        // outside what we load would fault on the first instruction.
        if !segments
            .iter()
            .any(|s| (s.paddr..s.paddr + s.memsz).contains(&entry))
        {
            return Err(BootError::EntryOutside { name: n(), entry });
        }
        Ok(Kernel {
            name: n(),
            source,
            segments,
            entry,
        })
    }

    /// Checks every segment lies in `[0x2000, limit)`.
    pub fn check_fits(&self, limit: u64) -> Result<(), BootError> {
        match self.first_outside(limit) {
            Some(s) => Err(BootError::DoesNotFit {
                name: self.name.clone(),
                addr: s.paddr,
                end: s.paddr + s.memsz,
                min: KERNEL_MIN_ADDR,
                max: limit,
            }),
            None => Ok(()),
        }
    }

    fn first_outside(&self, limit: u64) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| s.paddr < KERNEL_MIN_ADDR || s.paddr + s.memsz > limit)
    }

    /// Copies the segments into memory. Bytes past p_filesz must be zero:
    /// they are, because every boot gets freshly mapped (zero) memory, and
    /// not writing them spares touching pages the Guest may never use.
    fn load(&self, mem: &GuestMemory) -> Result<(), BootError> {
        for s in &self.segments {
            self.source
                .load(mem, s.offset, s.filesz, s.paddr)
                .map_err(|err| BootError::Read {
                    name: self.name.clone(),
                    err: err.to_string(),
                })?;
        }
        Ok(())
    }
}

/// An initial RAM disk: loaded whole, at the top of RAM.
#[derive(Debug)]
pub struct Initrd {
    pub name: String,
    source: Source,
    pub size: u64,
}

impl Initrd {
    /// An initrd in an open regular file of `size` bytes, for a Guest with
    /// `mem` bytes of RAM: refused at once if it cannot fit, before a byte
    /// of it is read.
    pub fn from_file(name: &str, file: File, size: u64, mem: u64) -> Result<Initrd, BootError> {
        let initrd = Initrd {
            name: name.to_string(),
            source: Source::File(file),
            size,
        };
        initrd.start(mem)?;
        Ok(initrd)
    }

    /// An initrd held in memory.
    pub fn from_bytes(name: &str, bytes: impl Into<Cow<'static, [u8]>>) -> Initrd {
        let bytes = bytes.into();
        Initrd {
            name: name.to_string(),
            size: bytes.len() as u64,
            source: Source::Bytes(bytes),
        }
    }

    /// Where it goes in `mem` bytes of RAM (see [`initrd_start`]); the
    /// boot_params fields that say where are 32-bit, so it must end below
    /// 4 GiB.
    fn start(&self, mem: u64) -> Result<u64, BootError> {
        let start = initrd_start(mem, self.size, &self.name)?;
        let end = start + self.size;
        if end > 1 << 32 {
            return Err(BootError::InitrdAbove4G {
                name: self.name.clone(),
                end,
            });
        }
        Ok(start)
    }
}

/// Where an initrd of `size` bytes goes in `mem` bytes of RAM: page-aligned,
/// at the top.
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
    pub initrd: Option<&'a Initrd>,
    pub cmdline: &'a str,
    pub device_model: u64,
}

impl BootImage<'_> {
    /// Checks that everything fits in `mem` bytes of RAM; when something
    /// does not, the error names the part to blame: the kernel when it does
    /// not fit on its own, else the initrd.
    pub fn check(&self, mem: u64) -> Result<(), BootError> {
        if self.cmdline.len() > CMDLINE_MAX {
            return Err(BootError::CmdlineTooLong(self.cmdline.len()));
        }
        self.kernel.check_fits(mem)?;
        if let Some(initrd) = self.initrd {
            let start = initrd.start(mem)?;
            if let Some(s) = self.kernel.first_outside(start) {
                return Err(BootError::InitrdOverlaps {
                    name: initrd.name.clone(),
                    size: initrd.size,
                    start,
                    addr: s.paddr,
                    end: s.paddr + s.memsz,
                });
            }
        }
        Ok(())
    }

    /// Writes kernel, initrd, command line and zero page into fresh memory.
    /// Returns the entry point.
    /*L:150 Into fresh memory: the kernel's segments, the initrd at the top
     * of RAM, the command line, and boot_params, the Linux "zero page",
     * which tells the Guest it is lguest's and which device model it has. */
    pub fn load(&self, mem: &GuestMemory) -> Result<u64, BootError> {
        let ram = mem.layout.mem;
        self.check(ram)?;
        self.kernel.load(mem)?;
        let mut zero_page = [0u8; PAGE_SIZE as usize];
        let mut put =
            |off: usize, bytes: &[u8]| zero_page[off..off + bytes.len()].copy_from_slice(bytes);
        if let Some(initrd) = self.initrd {
            let start = initrd.start(ram)?;
            initrd
                .source
                .load(mem, 0, initrd.size, start)
                .map_err(|err| BootError::Read {
                    name: initrd.name.clone(),
                    err: err.to_string(),
                })?;
            // Both below 4 GiB: start() checked.
            put(bp::RAMDISK_IMAGE, &(start as u32).to_le_bytes());
            put(bp::RAMDISK_SIZE, &(initrd.size as u32).to_le_bytes());
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
        let k = Kernel::from_bytes("k", good.clone()).unwrap();
        assert_eq!(k.entry, 0x10_0000);
        assert!(k.check_fits(4 << 20).is_ok());
        assert!(matches!(
            k.check_fits(0x10_1000),
            Err(BootError::DoesNotFit { .. })
        ));

        assert_eq!(
            Kernel::from_bytes("k", b"root:x:0:0".to_vec()).unwrap_err(),
            BootError::NotElf("k".into())
        );
        let mut arm = good.clone();
        arm[18] = 183;
        assert_eq!(
            Kernel::from_bytes("k", arm).unwrap_err(),
            BootError::WrongMachine("k".into(), 183)
        );
        let mut dyn_ = good.clone();
        dyn_[16] = 3;
        assert_eq!(
            Kernel::from_bytes("k", dyn_).unwrap_err(),
            BootError::NotExec("k".into(), 3)
        );
        let mut elf32 = good.clone();
        elf32[4] = 1;
        assert_eq!(
            Kernel::from_bytes("k", elf32).unwrap_err(),
            BootError::Not64("k".into())
        );
        let truncated = good[..good.len() - 8].to_vec();
        assert!(matches!(
            Kernel::from_bytes("k", truncated),
            Err(BootError::Malformed(..))
        ));
        let low = tiny_elf(0x1000, &[0x90], 1);
        assert!(Kernel::from_bytes("k", low)
            .unwrap()
            .check_fits(1 << 20)
            .is_err());
    }

    #[test]
    fn linux_images_are_named_for_what_they_are() {
        // A vmlinux: ET_EXEC x86-64, linked and entered in the upper half.
        let mut vmlinux = tiny_elf(0x100_0000, &[0x90; 16], 0x2000);
        vmlinux[24..32].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        let e = Kernel::from_bytes("vmlinux", vmlinux).unwrap_err();
        assert!(matches!(e, BootError::UpperHalf { .. }), "{e}");
        assert!(e.to_string().contains("vmlinux") && e.to_string().contains("ET_EXEC"));
        // A bzImage: the PE stub's "MZ", and the setup header's "HdrS".
        let mut bz = vec![0u8; 0x400];
        bz[0..2].copy_from_slice(b"MZ");
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let e = Kernel::from_bytes("bzImage", bz).unwrap_err();
        assert_eq!(e, BootError::BzImage("bzImage".into()));
        assert!(e.to_string().contains("bzImage") && e.to_string().contains("lguest ABI"));
    }

    #[test]
    fn the_entry_must_be_in_a_segment() {
        let mut elf = tiny_elf(0x10_0000, &[0x90; 16], 0x1000);
        elf[24..32].copy_from_slice(&0x10_1000u64.to_le_bytes());
        assert!(matches!(
            Kernel::from_bytes("k", elf),
            Err(BootError::EntryOutside {
                entry: 0x10_1000,
                ..
            })
        ));
    }

    #[test]
    fn an_initrd_that_overlaps_the_kernel_is_blamed() {
        // The kernel fits 2 MiB on its own; the initrd (1 MiB, at the top)
        // would cover its segment.
        let k = Kernel::from_bytes("k", tiny_elf(0x10_0000, &[0x90], 0x8_0000)).unwrap();
        let initrd = Initrd::from_bytes("i", vec![0u8; 1 << 20]);
        let image = BootImage {
            kernel: &k,
            initrd: Some(&initrd),
            cmdline: "",
            device_model: 2,
        };
        let e = image.check(2 << 20).unwrap_err();
        assert!(matches!(e, BootError::InitrdOverlaps { .. }), "{e}");
        assert!(e.to_string().starts_with("initrd i "), "{e}");
        assert!(image.check(4 << 20).is_ok());
        // Above 4 GiB the 32-bit ramdisk fields cannot say where it is.
        assert!(matches!(
            image.check(8 << 30),
            Err(BootError::InitrdAbove4G { .. })
        ));
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
