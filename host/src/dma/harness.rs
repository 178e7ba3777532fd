//! Stand-ins for a Guest, for tests and the benchmark: a memory of plain
//! bytes that remembers every write the Host makes into it (to show where
//! the DMA model writes, and nowhere else), and [`Signals`] that are only
//! recorded.

use super::{GuestRam, Signals};
use crate::memory::OutOfBounds;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// `[0, limit)` of zeroed bytes: RAM is `[0, mem)`, device pages follow up
/// to `limit`, and the Host's pages start at `limit`.
pub struct RecordingRam {
    mem: u64,
    limit: u64,
    bytes: Mutex<Vec<u8>>,
    writes: Mutex<Vec<(u64, u64)>>,
}

impl RecordingRam {
    pub fn new(mem: u64, limit: u64) -> RecordingRam {
        assert!(mem <= limit, "RAM ends before the device pages do");
        RecordingRam {
            mem,
            limit,
            bytes: Mutex::new(vec![0; limit as usize]),
            writes: Mutex::new(Vec::new()),
        }
    }

    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, OutOfBounds> {
        let len = len as u64;
        match addr.checked_add(len) {
            Some(end) if end <= self.limit => Ok(addr as usize..end as usize),
            _ => Err(OutOfBounds { addr, len }),
        }
    }

    /// Writes as the Guest would: not recorded.
    pub fn guest_write(&self, addr: u64, data: &[u8]) {
        let r = self.range(addr, data.len()).expect("inside the Guest");
        self.bytes()[r].copy_from_slice(data);
    }

    /// Reads as the Guest would.
    pub fn guest_read(&self, addr: u64, len: usize) -> Vec<u8> {
        let r = self.range(addr, len).expect("inside the Guest");
        self.bytes()[r].to_vec()
    }

    pub fn guest_write_u32(&self, addr: u64, v: u32) {
        self.guest_write(addr, &v.to_le_bytes());
    }

    pub fn guest_read_u32(&self, addr: u64) -> u32 {
        u32::from_le_bytes(self.guest_read(addr, 4).try_into().expect("4 bytes"))
    }

    /// Every `(addr, len)` the Host wrote, in order, and forgets them.
    pub fn take_writes(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.writes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl GuestRam for RecordingRam {
    fn ram_size(&self) -> u64 {
        self.mem
    }
    fn host_base(&self) -> u64 {
        self.limit
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes()[r]);
        Ok(())
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), OutOfBounds> {
        let r = self.range(addr, buf.len())?;
        self.bytes()[r].copy_from_slice(buf);
        self.writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((addr, buf.len() as u64));
        Ok(())
    }
}

/// Signals, recorded: IRQs raised, kill reasons, end of input.
#[derive(Default)]
pub struct SignalLog {
    state: Mutex<Logged>,
    changed: Condvar,
}

/// What a [`SignalLog`] has seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Logged {
    pub irqs: Vec<u32>,
    pub kills: Vec<String>,
    pub end_of_input: u32,
}

impl SignalLog {
    pub fn new() -> std::sync::Arc<SignalLog> {
        std::sync::Arc::new(SignalLog::default())
    }

    fn state(&self) -> MutexGuard<'_, Logged> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What happened so far.
    pub fn seen(&self) -> Logged {
        self.state().clone()
    }

    /// Waits (up to `limit`) until `until` holds of what was seen, and
    /// returns it either way.
    pub fn wait(&self, limit: Duration, until: impl Fn(&Logged) -> bool) -> Logged {
        let deadline = Instant::now() + limit;
        let mut state = self.state();
        while !until(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.clone()
    }
}

impl Signals for SignalLog {
    fn raise(&self, irq: u32) {
        self.state().irqs.push(irq);
        self.changed.notify_all();
    }
    fn kill(&self, reason: String) {
        self.state().kills.push(reason);
        self.changed.notify_all();
    }
    fn end_of_input(&self) {
        self.state().end_of_input += 1;
        self.changed.notify_all();
    }
}
