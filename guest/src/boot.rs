//! What the Launcher tells us at boot: boot_params (Linux's "zero page", at
//! physical 0) and the kernel command line it points to.
//!
//! We only read these, and nothing writes them after the Launcher, so plain
//! shared views of them are sound for the whole life of the Guest.

use lguest_abi::{boot_params as bp, CMDLINE_MAX};

/// Read a little-endian value at `offset` in boot_params.
fn boot_param<T: Copy>(offset: usize) -> T {
    let p = core::ptr::with_exposed_provenance::<T>(lguest_abi::BOOT_PARAMS_ADDR as usize + offset);
    // SAFETY: boot_params is the first page of RAM, identity-mapped; the
    // offsets are the ABI's, inside that page. Some fields aren't naturally
    // aligned (the e820 table), hence read_unaligned.
    unsafe { p.read_unaligned() }
}

/// RAM size: the end of the highest usable e820 entry (the Launcher gives
/// one, {0, mem, RAM}). The device page sits right after it.
pub fn mem() -> u64 {
    let entries = boot_param::<u8>(bp::E820_ENTRIES) as usize;
    (0..entries)
        .map(|i| bp::E820_TABLE + i * bp::E820_ENTRY_SIZE)
        .filter(|&entry| boot_param::<u32>(entry + 16) == bp::E820_RAM)
        .map(|entry| boot_param::<u64>(entry) + boot_param::<u64>(entry + 8))
        .max()
        .unwrap_or(0)
}

/// Which device model sits at `mem` (boot_params' hardware_subarch_data):
/// 2 is the virtio descriptor page we drive.
pub fn device_model() -> u64 {
    boot_param::<u64>(bp::HARDWARE_SUBARCH_DATA)
}

/// Where the Launcher put the initrd, (start, size), or None: it sits at
/// the top of RAM, so whoever hands out RAM must stop below it.
pub fn ramdisk() -> Option<(u64, u64)> {
    let image = boot_param::<u32>(bp::RAMDISK_IMAGE) as u64;
    let size = boot_param::<u32>(bp::RAMDISK_SIZE) as u64;
    (size != 0).then_some((image, size))
}

/// The command line, up to its NUL (at most 4095 bytes).
pub fn cmdline() -> &'static str {
    let addr = boot_param::<u32>(bp::CMD_LINE_PTR) as usize;
    if addr == 0 {
        return "";
    }
    let base = core::ptr::with_exposed_provenance::<u8>(addr);
    // SAFETY: the Launcher put the command line at cmd_line_ptr (0x1000), in
    // RAM, at most CMDLINE_MAX bytes plus its NUL, and nothing changes it.
    let bytes = unsafe { core::slice::from_raw_parts(base, CMDLINE_MAX) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(CMDLINE_MAX);
    match core::str::from_utf8(&bytes[..len]) {
        Ok(s) => s,
        // Keep what makes sense rather than nothing.
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// The value of the word `NAME=VALUE` on the command line, for `name`. A
/// later word wins over an earlier one; words nobody asks for are someone
/// else's (Linux would have them) and are ignored.
pub fn option(name: &str) -> Option<&'static str> {
    cmdline()
        .split_ascii_whitespace()
        .rev()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}
