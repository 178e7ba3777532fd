//! `lguest --bench`: measures against a floor taken in the same run.
//!
//! Absolute times mean little across machines (and on a software KVM, less
//! still), so every line is a ratio: the measure and its floor are each run
//! `RUNS` times, interleaved, and the medians compared (ABI section 10).
//!
//! - P1: a hypercall round trip, against a bare `out` exit. The bundled Guest
//!   times N iterations with rdtsc (`bench=out|hcall|ud`) and reports cycles.
//!   `hcall` is the rewritten site (`out %al,$0x1f`), `ud` restores the
//!   `int $0x1f` bytes before every call, so each one takes the trap path.
//! - P2: launch-to-exit of the bundled Guest, against a Guest that powers off
//!   as soon as it has said LGUEST_INIT (create, run, tear down).

use crate::boot::tiny_elf;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const RUNS: usize = 5;
const ITERS: u64 = 5000;

/// The floor Guest for P2, at 0x200000: fill the async ring's status bytes
/// (lguest_data at 0x201000) with 0xFF, LGUEST_INIT, then SHUTDOWN power-off
/// with the reason string at 0x200100. Both calls are `out %al,$0x1f`.
const FLOOR_CODE: [u8; 45] = [
    0xbf, 0x24, 0x10, 0x20, 0x00, // mov $0x201024, %edi
    0xb0, 0xff, // mov $0xff, %al
    0xb9, 0x40, 0x00, 0x00, 0x00, // mov $64, %ecx
    0xf3, 0xaa, // rep stosb
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov $LGUEST_INIT, %eax
    0xba, 0x00, 0x10, 0x20, 0x00, // mov $0x201000, %edx
    0xe6, 0x1f, // out %al, $0x1f
    0xb8, 0x02, 0x00, 0x00, 0x00, // mov $SHUTDOWN, %eax
    0xba, 0x00, 0x01, 0x20, 0x00, // mov $0x200100, %edx
    0xbb, 0x01, 0x00, 0x00, 0x00, // mov $1, %ebx
    0xe6, 0x1f, // out %al, $0x1f
    0x0f, 0x0b, // ud2
];

fn floor_guest() -> Vec<u8> {
    let mut code = FLOOR_CODE.to_vec();
    code.resize(0x100, 0x90);
    code.extend_from_slice(b"floor\0");
    tiny_elf(0x20_0000, &code, 0x2000)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Bench {
    exe: PathBuf,
    kvm: PathBuf,
}

impl Bench {
    fn lguest(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args)
            .env("LGUEST_KVM_DEVICE", &self.kvm)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .stdout(Stdio::piped());
        c
    }

    /// Runs the bundled Guest's `bench=NAME` and returns microseconds per
    /// iteration, from its own rdtsc count.
    fn guest_loop(&self, name: &str) -> Result<f64, String> {
        let append = format!("bench={name} iters={ITERS}");
        let out = self
            .lguest(&["--append", &append])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("lguest-bench: "))
            .ok_or_else(|| {
                format!(
                    "bench={name}: no result ({})",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })?;
        let field = |key: &str| -> Result<f64, String> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("bench={name}: no {key} in '{line}'"))
        };
        let (iters, cycles, khz) = (field("iters=")?, field("cycles=")?, field("tsc_khz=")?);
        if khz == 0.0 {
            return Err("the TSC is not invariant here; cycles cannot be turned into time".into());
        }
        Ok(cycles / khz * 1000.0 / iters)
    }

    /// Wall-clock milliseconds from spawn to exit, checking it powered off.
    fn launch(&self, args: &[&str]) -> Result<f64, String> {
        let start = Instant::now();
        let out = self
            .lguest(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            return Err(format!(
                "lguest {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(ms)
    }
}

/// One output line (ABI section 10).
fn report(name: &str, unit: &str, values: Vec<f64>, floors: Vec<f64>) {
    let (v, f) = (median(values), median(floors));
    println!(
        "{name} value={v:.3} unit={unit} floor={f:.3} ratio={:.3} runs={RUNS}",
        v / f
    );
}

pub fn run(kvm: &Path) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let bench = Bench {
        exe,
        kvm: kvm.to_path_buf(),
    };
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm)
        .map_err(|e| format!("cannot open {}: {e}", kvm.display()))?;

    let (mut out, mut hcall, mut ud) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        out.push(bench.guest_loop("out")?);
        hcall.push(bench.guest_loop("hcall")?);
        ud.push(bench.guest_loop("ud")?);
    }
    report("P1-hcall-out", "us", hcall, out.clone());
    report("P1-hcall-ud", "us", ud, out);

    let floor_path =
        std::env::temp_dir().join(format!("lguest-bench-floor-{}", std::process::id()));
    std::fs::write(&floor_path, floor_guest())
        .map_err(|e| format!("cannot write {}: {e}", floor_path.display()))?;
    let floor_arg = floor_path.display().to_string();
    let (mut boot, mut floor) = (vec![], vec![]);
    let result = (|| {
        for _ in 0..RUNS {
            boot.push(bench.launch(&[])?);
            floor.push(bench.launch(&["64", &floor_arg])?);
        }
        Ok::<(), String>(())
    })();
    let _ = std::fs::remove_file(&floor_path);
    result?;
    report("P2-launch", "ms", boot, floor);
    Ok(())
}
