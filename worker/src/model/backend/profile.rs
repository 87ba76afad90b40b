//! Where a device step's time goes, op by op, with `SHARDSERVE_PROFILE=1` (read by
//! `shardserve bench`): each operation of the device backend is timed from its call to
//! its return (the host's share: candle's bookkeeping and the kernel launches) and to
//! the end of its work on the device (a synchronisation after each op). Profiled steps
//! are slower than real ones, since the host no longer runs ahead of the device; what
//! they tell is how the time divides, and whether the host's share or the device's sets
//! the pace. Off (the default), an op pays one flag test.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use serde::Serialize;

/// One op's totals over the profiled steps.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpTime {
    pub op: &'static str,
    pub calls: u64,
    /// From the call to its return, microseconds in all.
    pub host_us: f64,
    /// From the call to the end of its work on the device, microseconds in all.
    pub total_us: f64,
}

#[derive(Default)]
struct Totals {
    calls: u64,
    host: Duration,
    total: Duration,
}

static TIMES: Mutex<BTreeMap<&'static str, Totals>> = Mutex::new(BTreeMap::new());

/// Whether `SHARDSERVE_PROFILE` is set (to anything but `0`), read once.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("SHARDSERVE_PROFILE").is_some_and(|v| v != "0"))
}

/// An op being timed; recorded when dropped.
pub struct Span<'a> {
    op: &'static str,
    device: &'a Device,
    start: Instant,
}

/// Starts timing `op` on `device`, when profiling is on.
pub fn span<'a>(op: &'static str, device: &'a Device) -> Option<Span<'a>> {
    enabled().then(|| Span {
        op,
        device,
        start: Instant::now(),
    })
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let host = self.start.elapsed();
        // A failed synchronisation fails the step's next op too; profiling only times.
        let _ = self.device.synchronize();
        let total = self.start.elapsed();
        if let Ok(mut times) = TIMES.lock() {
            let t = times.entry(self.op).or_default();
            t.calls += 1;
            t.host += host;
            t.total += total;
        }
    }
}

/// The totals so far, by op, and a fresh start.
pub fn take() -> Vec<OpTime> {
    let Ok(mut times) = TIMES.lock() else {
        return Vec::new();
    };
    std::mem::take(&mut *times)
        .into_iter()
        .map(|(op, t)| OpTime {
            op,
            calls: t.calls,
            host_us: t.host.as_secs_f64() * 1e6,
            total_us: t.total.as_secs_f64() * 1e6,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_by_op() {
        // Recorded directly: the flag is the process's, read once.
        let dev = Device::Cpu;
        for _ in 0..3 {
            drop(Span {
                op: "test-op",
                device: &dev,
                start: Instant::now(),
            });
        }
        let times = take();
        let t = times.iter().find(|t| t.op == "test-op").unwrap();
        assert_eq!(t.calls, 3);
        assert!(t.total_us >= t.host_us);
        assert!(
            take().iter().all(|t| t.op != "test-op"),
            "take starts afresh"
        );
    }
}
