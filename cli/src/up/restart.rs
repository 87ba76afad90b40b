//! When a crashed worker group starts again, and when `up` gives up on it: the
//! kubelet's rule, shortened for one machine. Restarts wait 1 s, doubling to 30 s,
//! back to 1 s once the group has served for 10 minutes; a group that needs a
//! sixth restart within 2 minutes of five others crash-loops, and `up` stops.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Restarts within [`CRASH_LOOP_WINDOW`] that make a crash loop.
pub const CRASH_LOOP_RESTARTS: usize = 5;
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(120);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Serving this long forgets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// What to do about a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCrash {
    /// Start the group again after this long.
    Restart { after: Duration, restart: usize },
    /// Give up: it crash-loops.
    CrashLoop,
}

/// One group's restarts.
#[derive(Debug, Default)]
pub struct Restarts {
    recent: VecDeque<Instant>,
    next_backoff: Option<Duration>,
    total: usize,
}

impl Restarts {
    /// The group crashed at `now`.
    pub fn crashed(&mut self, now: Instant) -> AfterCrash {
        while let Some(&first) = self.recent.front() {
            if now.duration_since(first) > CRASH_LOOP_WINDOW {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= CRASH_LOOP_RESTARTS {
            return AfterCrash::CrashLoop;
        }
        self.recent.push_back(now);
        self.total += 1;
        let after = self.next_backoff.unwrap_or(BACKOFF_FIRST);
        self.next_backoff = Some((after * 2).min(BACKOFF_MAX));
        AfterCrash::Restart {
            after,
            restart: self.total,
        }
    }

    /// The group has served since `since`; long enough, and the backoff starts over.
    pub fn serving(&mut self, since: Instant, now: Instant) {
        if now.duration_since(since) >= BACKOFF_RESET {
            self.next_backoff = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn restarts_back_off_doubling_and_five_in_two_minutes_is_a_crash_loop() {
        let t0 = Instant::now();
        let mut r = Restarts::default();
        let mut at = t0;
        let mut waits = Vec::new();
        for _ in 0..5 {
            match r.crashed(at) {
                AfterCrash::Restart { after, .. } => {
                    waits.push(after.as_secs());
                    at += after + secs(2); // its wait, then 2 s of loading
                }
                AfterCrash::CrashLoop => panic!("too early"),
            }
        }
        assert_eq!(waits, [1, 2, 4, 8, 16]);
        assert_eq!(r.crashed(at), AfterCrash::CrashLoop);
    }

    #[test]
    fn crashes_spread_out_are_no_loop_and_serving_long_resets_the_backoff() {
        let t0 = Instant::now();
        let mut r = Restarts::default();
        for i in 0..8 {
            let at = t0 + secs(60 * i);
            assert!(
                matches!(r.crashed(at), AfterCrash::Restart { .. }),
                "crash {i}"
            );
        }
        assert!(matches!(
            r.crashed(t0 + secs(480)),
            AfterCrash::Restart { after, restart: 9 } if after == BACKOFF_MAX
        ));
        r.serving(t0 + secs(500), t0 + secs(500 + 600));
        assert!(matches!(
            r.crashed(t0 + secs(1200)),
            AfterCrash::Restart { after, .. } if after == BACKOFF_FIRST
        ));
    }
}
