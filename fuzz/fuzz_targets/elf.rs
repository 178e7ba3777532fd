//! The kernel loader (host/src/boot.rs): arbitrary bytes as the kernel, an
//! initrd of some length and a command line, loaded into a small Guest
//! memory the way the Launcher loads them.
//!
//! Checked against ABI section 3, with the program headers read here
//! independently: a kernel that loads has every PT_LOAD inside
//! [0x2000, initrd) and its bytes where its headers say; the zero page says
//! where the initrd and the command line are; nothing else in RAM changes;
//! a refused kernel changes nothing at all; the Host pages never change; and
//! every refusal is a message.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use lguest::boot::{BootImage, Initrd, Kernel};
use lguest::memory::GuestMemory;
use lguest_abi::{boot_params as bp, CMDLINE_ADDR, CMDLINE_MAX, KERNEL_MIN_ADDR, PAGE_SIZE};
use lguest_fuzz::{assert_reason, guest_bytes, memory, HostPages};
use libfuzzer_sys::fuzz_target;
use std::sync::{LazyLock, Mutex};

/// 64 KiB of RAM, one device page, then the Host's pages.
const RAM_PAGES: u64 = 16;
/// What RAM holds before a load, so that writes of zeros show too.
const FILL: u8 = 0xEE;

static MEM: LazyLock<(Mutex<GuestMemory>, HostPages)> = LazyLock::new(|| {
    let mem = memory(RAM_PAGES, 1, 0, 2, 1);
    let host = HostPages::snapshot(&mem);
    (Mutex::new(mem), host)
});

#[derive(Arbitrary, Debug)]
struct Input {
    /// The initrd's length, if there is one.
    initrd: Option<u16>,
    cmdline_len: u16,
    device_model: u64,
    // The kernel file is the rest of the input, byte for byte.
}

/// One PT_LOAD as its program header says, read with no checks beyond
/// staying inside the file.
struct Load {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn u16_at(b: &[u8], at: u64) -> Option<u16> {
    let at = usize::try_from(at).ok()?;
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], at: u64) -> Option<u32> {
    let at = usize::try_from(at).ok()?;
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The PT_LOADs of an ELF64 file, from e_phoff, e_phentsize and e_phnum.
fn loads(image: &[u8]) -> Option<Vec<Load>> {
    let phoff = u64_at(image, 32)?;
    let phentsize = u16_at(image, 54)? as u64;
    let phnum = u16_at(image, 56)? as u64;
    let mut out = Vec::new();
    for i in 0..phnum {
        let ph = phoff.checked_add(i * phentsize)?;
        if u32_at(image, ph)? == 1 {
            out.push(Load {
                offset: u64_at(image, ph.checked_add(8)?)?,
                paddr: u64_at(image, ph.checked_add(24)?)?,
                filesz: u64_at(image, ph.checked_add(32)?)?,
                memsz: u64_at(image, ph.checked_add(40)?)?,
            });
        }
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(input) = Input::arbitrary(&mut u) else {
        return;
    };
    let image = u.take_rest();
    let (mem, host) = &*MEM;
    let mem = mem.lock().unwrap();
    let ram = mem.layout.mem;
    mem.write(0, &vec![FILL; mem.layout.memory_end() as usize])
        .unwrap();
    let before = guest_bytes(&mem);

    let kernel = match Kernel::from_bytes("fuzz.elf", image.to_vec()) {
        Ok(k) => k,
        Err(e) => {
            assert_reason(&e.to_string(), "Kernel::from_bytes");
            return;
        }
    };
    // What parse accepted is an x86-64 ELF64 executable.
    assert!(image.len() >= 64 && image[..4] == *b"\x7fELF" && image[4] == 2 && image[5] == 1);
    assert_eq!(u16_at(image, 16), Some(2), "ET_EXEC");
    assert_eq!(u16_at(image, 18), Some(62), "EM_X86_64");
    let loads = loads(image).expect("parse accepted program headers past the end of the file");
    assert!(
        loads.iter().any(|l| l.memsz > 0),
        "parse accepted no segments"
    );

    // The entry point is inside a segment (RIP's first fetch), and in the
    // lower half where RAM is identity-mapped.
    let e_entry = u64_at(image, 24).unwrap();
    assert!(
        e_entry < 0xffff_8000_0000_0000,
        "an upper-half entry parsed"
    );
    assert!(
        loads
            .iter()
            .any(|l| l.memsz > 0 && (l.paddr..l.paddr.saturating_add(l.memsz)).contains(&e_entry)),
        "parse accepted an entry {e_entry:#x} outside every segment"
    );

    let initrd = input
        .initrd
        .map(|len| Initrd::from_bytes("fuzz.initrd", vec![0x17u8; len as usize]));
    let cmdline = "c".repeat(input.cmdline_len as usize);
    let boot = BootImage {
        kernel: &kernel,
        initrd: initrd.as_ref(),
        cmdline: &cmdline,
        device_model: input.device_model,
    };
    let result = boot.load(&mem);
    host.assert_unchanged(&mem, "loading a kernel");
    let after = guest_bytes(&mem);
    let entry = match result {
        Ok(entry) => entry,
        Err(e) => {
            assert_reason(&e.to_string(), "BootImage::load");
            assert!(after == before, "a refused kernel changed Guest memory");
            return;
        }
    };
    assert_eq!(entry, e_entry, "entry is e_entry");
    assert!(
        cmdline.len() <= CMDLINE_MAX,
        "an overlong command line loaded"
    );

    // The initrd, page-aligned at the top of RAM.
    let limit = match &initrd {
        Some(d) => {
            let start = (ram - d.size) & !(PAGE_SIZE - 1);
            assert!(start >= KERNEL_MIN_ADDR);
            start
        }
        None => ram,
    };

    // Replay the load from the headers alone, then RAM must match it byte
    // for byte (later segments over earlier ones, as the loader goes).
    let mut want = before.clone();
    for l in loads.iter().filter(|l| l.memsz > 0) {
        let end = l
            .paddr
            .checked_add(l.memsz)
            .expect("a segment that wraps loaded");
        assert!(
            l.paddr >= KERNEL_MIN_ADDR && end <= limit,
            "segment {:#x}-{end:#x} loaded outside [{KERNEL_MIN_ADDR:#x}, {limit:#x})",
            l.paddr
        );
        assert!(l.filesz <= l.memsz);
        let data = &image[l.offset as usize..(l.offset + l.filesz) as usize];
        want[l.paddr as usize..][..data.len()].copy_from_slice(data);
    }
    if let Some(d) = &initrd {
        want[limit as usize..][..d.size as usize].fill(0x17);
    }
    let c = CMDLINE_ADDR as usize;
    want[c..][..cmdline.len()].copy_from_slice(cmdline.as_bytes());
    want[c + cmdline.len()] = 0;
    // The zero page is the Launcher's to fill; check the fields the Guest
    // reads, and that it is all that differs below 0x1000.
    let zp = &after[..PAGE_SIZE as usize];
    let field = |at: usize, n: usize| {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&zp[at..at + n]);
        u64::from_le_bytes(v)
    };
    assert_eq!(field(bp::BOOT_FLAG, 2), 0xAA55);
    assert_eq!(field(bp::CMD_LINE_PTR, 4), CMDLINE_ADDR);
    assert_eq!(field(bp::HARDWARE_SUBARCH, 4), 1);
    assert_eq!(field(bp::HARDWARE_SUBARCH_DATA, 8), input.device_model);
    assert_eq!(
        field(bp::E820_TABLE + 8, 8),
        ram,
        "e820 says RAM is {ram:#x}"
    );
    let (rd_image, rd_size) = (field(bp::RAMDISK_IMAGE, 4), field(bp::RAMDISK_SIZE, 4));
    match &initrd {
        Some(d) => assert_eq!((rd_image, rd_size), (limit, d.size)),
        None => assert_eq!((rd_image, rd_size), (0, 0)),
    }
    want[..PAGE_SIZE as usize].copy_from_slice(zp);
    if want == after {
        return;
    }
    if let Some(at) = want.iter().zip(&after).position(|(a, b)| a != b) {
        panic!(
            "Guest byte {at:#x} is {:#x} after the load, not {:#x}",
            after[at], want[at]
        );
    }
});
