//! virtio-drivers tells what it does (and what it dislikes) through the `log`
//! crate: we print it on the early console. Warnings and errors by default;
//! `drivers-log=info`, `debug` or `trace` on the command line shows more,
//! `drivers-log=off` nothing.

use lguest_guest::println;
use log::{Level, LevelFilter, Log, Metadata, Record};

struct EarlyConsoleLogger;

impl Log for EarlyConsoleLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let level = match record.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            println!(
                "lguest-guest-drivers: {}: {level}: {}",
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: EarlyConsoleLogger = EarlyConsoleLogger;

/// Install the logger, at the level the command line asks for.
pub fn init(cmdline: &str) {
    let mut level = LevelFilter::Warn;
    for word in cmdline.split_ascii_whitespace() {
        if let Some(value) = word.strip_prefix("drivers-log=") {
            level = match value {
                "off" => LevelFilter::Off,
                "error" => LevelFilter::Error,
                "warn" => LevelFilter::Warn,
                "info" => LevelFilter::Info,
                "debug" => LevelFilter::Debug,
                "trace" => LevelFilter::Trace,
                _ => level,
            };
        }
    }
    // Only fails if a logger is already set: then that one stays.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
