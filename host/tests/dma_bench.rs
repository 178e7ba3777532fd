//! P7's stand-in and its floor (`lguest::dma::bench`): frames between two
//! processes over a socketpair and over `--sharenet`, each process a hub
//! without KVM. The peer process is this test binary again. A short run by default; for real figures:
//!
//! ```text
//! LGUEST_P7_RUNS=5 LGUEST_P7_FRAMES=200000 cargo test --release --test dma_bench -- --nocapture
//! ```

use lguest::dma::bench::{p7, peer_from_env, FRAME};
use std::process::Command;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn p7_moves_full_size_frames_both_ways_and_reports_a_ratio() {
    if let Some(result) = peer_from_env() {
        // We are the peer process: do its half, and say how it went.
        result.unwrap();
        return;
    }
    let peer = || {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args([
            "--exact",
            "p7_moves_full_size_frames_both_ways_and_reports_a_ratio",
            "--test-threads=1",
        ]);
        c
    };
    let runs = env_or("LGUEST_P7_RUNS", 1) as usize;
    let frames = env_or("LGUEST_P7_FRAMES", 3000);
    let figures = p7(&peer, runs, frames).unwrap();
    assert_eq!(figures.sharenet.len(), runs);
    assert_eq!(figures.socketpair.len(), runs);
    assert!(figures.sharenet.iter().all(|&v| v > 0.0 && v.is_finite()));
    assert!(figures.socketpair.iter().all(|&v| v > 0.0 && v.is_finite()));
    let line = figures.line();
    println!("{line}");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line}"))
            .to_string()
    };
    assert!(line.starts_with("P7-sharenet-standin "));
    assert_eq!(field("unit="), "MiB/s");
    assert_eq!(field("runs="), runs.to_string());
    let (v, f, r): (f64, f64, f64) = (
        field("value=").parse().unwrap(),
        field("floor=").parse().unwrap(),
        field("ratio=").parse().unwrap(),
    );
    assert!((r - v / f).abs() < 0.01 + r * 0.001, "{line}");
    assert!(line.contains(" higher=better"));
    assert_eq!(FRAME, 1514);
}
