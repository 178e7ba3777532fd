//! `test=NAME[,NAME...]` or `test=all`: the self-tests.
//!
//! Each test checks one promise of the ABI from the Guest's side (the device
//! tests, in tests/devices.rs, one virtio device each), prints
//! `lguest-guest: test NAME ... ok` when it holds, and the run ends with
//! `lguest-guest: all N tests passed` and a power off. The first failure
//! prints `lguest-guest: FAIL NAME: detail` and crashes (ABI section 10), so
//! the Host's exit status tells the story too.
//!
//! The tests are grouped by the part of the ABI they check: hypercalls.rs,
//! time.rs, interrupts.rs, pagetable.rs and cpu.rs; the device tests are in
//! devices.rs and blk.rs, and under the 2007 model (device model 1) in
//! dma.rs. Where a test needs an instruction at a known
//! address (a hypercall site, a faulting load), it is written in assembly in
//! its file, with labels the Rust code finds through `extern` statics.

use lguest_abi::{DEVICE_MODEL_DMA, GUEST_CS, GUEST_DS, LGUEST_IRQS, RED_ZONE, SHUTDOWN_POWEROFF};
use lguest_abi::{LGUEST_DEVICE_S_DRIVER_OK, VIRTIO_STATUS_DRIVER_OK};
use lguest_guest::cell::GuestCell;
use lguest_guest::console::Msg;
use lguest_guest::virtio::Devices;
use lguest_guest::{boot, dma, hcall, lguest_data, println};

use crate::traps::TrapRecord;

/// A failed check. What went wrong is in FAILURE, to keep results small.
pub struct Failed;
pub type TestResult = Result<(), Failed>;
type Test = fn() -> TestResult;

/// The detail of the last failure, for the FAIL line.
pub static FAILURE: GuestCell<Msg<200>> = GuestCell::new(Msg::new());

/// Fail the current test with a formatted detail.
macro_rules! fail {
    ($($arg:tt)*) => {{
        $crate::tests::FAILURE.write(lguest_guest::console::Msg::from_fmt(format_args!($($arg)*)));
        return Err($crate::tests::Failed);
    }};
}

/// Fail the current test unless `cond` holds.
macro_rules! check {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            fail!($($arg)*);
        }
    };
}

mod blk;
mod cpu;
mod devices;
mod dma_devices;
mod hypercalls;
mod interrupts;
mod pagetable;
mod time;

/// The tests, in the order `all` runs them. Later ones may rely on earlier
/// ones' leftovers only where noted (pgtable leaves our own page tables in
/// use, on purpose).
const TESTS: [(&str, Test); 12] = [
    ("hypercall", hypercalls::test_hypercall),
    ("async", hypercalls::test_async),
    ("timer", time::test_timer),
    ("mask", interrupts::test_mask),
    ("ud", interrupts::test_ud),
    ("pf", interrupts::test_pf),
    ("de", interrupts::test_de),
    ("pgtable", pagetable::test_pgtable),
    ("wallclock", time::test_wallclock),
    ("stack", interrupts::test_stack),
    ("gdt", cpu::test_gdt),
    ("ts", cpu::test_ts),
];

/// A device model's tests: name, test, and the type of device it needs.
pub type DeviceTests<D, const N: usize> = [(&'static str, fn(&mut D) -> TestResult, u16); N];

/// What the runner needs of a device model's devices.
pub trait Machine {
    /// Whether a device of type `kind` is there.
    fn has(&self, kind: u16) -> bool;
    /// The IRQs of every device a test has brought up (its status says
    /// DRIVER_OK), as a blocked_interrupts mask.
    fn irq_mask(&self) -> u32;
}

impl Machine for Devices {
    fn has(&self, kind: u16) -> bool {
        self.bus.find(kind as u8).is_some()
    }

    fn irq_mask(&self) -> u32 {
        let driven = self.bus.devices();
        let driven = driven.filter(|dev| dev.status() & VIRTIO_STATUS_DRIVER_OK != 0);
        let irqs = driven.flat_map(|dev| (0..dev.num_vq()).map(move |i| dev.vq(i).irq as u32));
        irqs.filter(|&irq| irq < LGUEST_IRQS)
            .fold(0, |mask, irq| mask | 1 << irq)
    }
}

impl Machine for dma::Devices {
    fn has(&self, kind: u16) -> bool {
        self.table.iter().any(|e| e.type_ == kind)
    }

    fn irq_mask(&self) -> u32 {
        let driven =
            (0..self.table.len()).filter(|&i| dma::status(i) & LGUEST_DEVICE_S_DRIVER_OK != 0);
        driven.fold(0, |mask, i| mask | 1 << dma::irq(i))
    }
}

/// Run the comma-separated tests in `names` (`all` is every test, and the
/// device tests for the devices there are) and power off, or crash at the
/// first failure.
pub fn run(names: &str) -> ! {
    // If the Host gave no TSC frequency, measure ours now, before any test
    // counts timer interrupts.
    lguest_guest::time::tsc_khz();
    // Only read the device page: a device is brought up by its test.
    if boot::device_model() == DEVICE_MODEL_DMA {
        run_on(names, &mut dma::Devices::scan(), &dma_devices::DMA_TESTS)
    } else {
        run_on(names, &mut Devices::scan(), &devices::DEVICE_TESTS)
    }
}

fn run_on<D: Machine, const N: usize>(
    names: &str,
    devs: &mut D,
    device_tests: &DeviceTests<D, N>,
) -> ! {
    let mut passed = 0;
    for name in names.split(',').filter(|name| !name.is_empty()) {
        if name == "all" {
            for (name, test) in TESTS {
                run_one(name, test, devs);
                passed += 1;
            }
            // ping needs someone to ping.
            let peer = boot::option("peer").is_some();
            for (name, test, kind) in device_tests {
                if devs.has(*kind) && (*name != "ping" || peer) {
                    report(name, test(devs));
                    passed += 1;
                }
            }
            continue;
        }
        if let Some(&(name, test)) = TESTS.iter().find(|(known, _)| *known == name) {
            run_one(name, test, devs);
        } else if let Some(&(name, test, _)) =
            device_tests.iter().find(|(known, _, _)| *known == name)
        {
            report(name, test(devs));
        } else {
            lguest_guest::fail(name, format_args!("unknown test"));
        }
        passed += 1;
    }
    if passed == 0 {
        lguest_guest::fail("test", format_args!("no test named in test={names}"));
    }
    println!("lguest-guest: all {passed} tests passed");
    hcall::shutdown(c"self-tests passed", SHUTDOWN_POWEROFF);
}

/// Run one of the ABI tests. They count interrupts and check irq_pending,
/// so devices an earlier test brought up must keep their IRQs to themselves
/// meanwhile: a blocked IRQ is neither delivered nor pending.
fn run_one(name: &str, test: Test, devs: &impl Machine) {
    let mask = devs.irq_mask();
    let blocked = lguest_data::blocked_interrupts();
    lguest_data::set_blocked_interrupts(blocked | mask);
    let result = test();
    for irq in 0..32 {
        if mask & !blocked & 1 << irq != 0 {
            crate::extras::block_irq(irq, false);
        }
    }
    report(name, result);
}

fn report(name: &str, result: TestResult) {
    match result {
        Ok(()) => println!("lguest-guest: test {name} ... ok"),
        Err(Failed) => lguest_guest::fail(name, format_args!("{}", FAILURE.read().as_str())),
    }
}

/// An assembly label's address.
pub fn addr<T>(label: *const T) -> u64 {
    label as u64
}

/// Where the Host must put SS for a trap that interrupted RSP `rsp` on the
/// same stack: below the red zone, 16-byte aligned, then one word down.
pub fn ss_slot_below(rsp: u64) -> u64 {
    ((rsp - RED_ZONE) & !15) - 8
}

/// Check the parts of a trap frame every delivery shares.
pub fn check_frame(what: &str, rec: &TrapRecord) -> TestResult {
    check!(
        rec.cs == GUEST_CS as u64 && rec.ss == GUEST_DS as u64,
        "{what}: frame has CS {:#x} SS {:#x}, expected {:#x} {:#x}",
        rec.cs,
        rec.ss,
        GUEST_CS,
        GUEST_DS
    );
    Ok(())
}
