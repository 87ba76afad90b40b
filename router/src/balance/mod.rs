//! Balancing decisions as pure functions: least outstanding requests with
//! prefix affinity, and the bounded map that remembers which backend served
//! a prompt prefix last. The pool (`crate::pool`) owns the counts and calls
//! these under its lock.

mod affinity;

pub(crate) use affinity::{PrefixLru, prefix_key};

/// What the balancer knows of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub outstanding: usize,
    pub healthy: bool,
}

/// The balancer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Send it to the backend at this index.
    Backend(usize),
    /// Every healthy backend's queue is full.
    Overloaded,
    /// No backend is healthy.
    NoHealthy,
}

/// How much busier than the least-loaded backend the affinity backend may be
/// and still be chosen: its KV cache already holds the prefix, which is worth
/// a short wait, but not a long one.
pub(crate) fn affinity_slack(least: usize) -> usize {
    2 + least / 2
}

/// Picks a backend: healthy, below `max_queue`, the one that last served the
/// prompt's prefix (`preferred`) unless it exceeds the least-loaded one by
/// more than [`affinity_slack`], else the least loaded. Ties go to the first
/// index at or after `rotate` so that idle backends share the load.
pub(crate) fn choose(
    candidates: &[Candidate],
    preferred: Option<usize>,
    rotate: usize,
    max_queue: usize,
) -> Choice {
    let n = candidates.len();
    if !candidates.iter().any(|c| c.healthy) {
        return Choice::NoHealthy;
    }
    let open = |c: &Candidate| c.healthy && c.outstanding < max_queue;
    let least = (0..n)
        .map(|k| (rotate + k) % n)
        .filter(|&i| open(&candidates[i]))
        .min_by_key(|&i| candidates[i].outstanding);
    let Some(least) = least else {
        return Choice::Overloaded;
    };
    if let Some(p) = preferred.filter(|&p| p < n && open(&candidates[p])) {
        let floor = candidates[least].outstanding;
        if candidates[p].outstanding <= floor + affinity_slack(floor) {
            return Choice::Backend(p);
        }
    }
    Choice::Backend(least)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(outstanding: usize) -> Candidate {
        Candidate {
            outstanding,
            healthy: true,
        }
    }

    fn down(outstanding: usize) -> Candidate {
        Candidate {
            outstanding,
            healthy: false,
        }
    }

    #[test]
    fn least_outstanding_wins() {
        assert_eq!(
            choose(&[up(3), up(1), up(2)], None, 0, 10),
            Choice::Backend(1)
        );
    }

    #[test]
    fn ties_rotate_over_idle_backends() {
        let c = [up(0), up(0), up(0)];
        let picks: Vec<_> = (0..3).map(|r| choose(&c, None, r, 10)).collect();
        assert_eq!(
            picks,
            [Choice::Backend(0), Choice::Backend(1), Choice::Backend(2)]
        );
    }

    #[test]
    fn affinity_is_kept_while_slightly_busier() {
        // least = 2, slack = 3: up to 5 outstanding keeps the affinity.
        assert_eq!(choose(&[up(2), up(5)], Some(1), 0, 10), Choice::Backend(1));
    }

    #[test]
    fn affinity_is_overridden_when_much_busier() {
        assert_eq!(choose(&[up(2), up(6)], Some(1), 0, 10), Choice::Backend(0));
        assert_eq!(choose(&[up(0), up(3)], Some(1), 0, 10), Choice::Backend(0));
    }

    #[test]
    fn ejected_backends_are_skipped() {
        assert_eq!(choose(&[down(0), up(4)], None, 0, 10), Choice::Backend(1));
        assert_eq!(
            choose(&[down(0), up(4)], Some(0), 0, 10),
            Choice::Backend(1)
        );
        assert_eq!(choose(&[down(0), down(0)], None, 0, 10), Choice::NoHealthy);
        assert_eq!(choose(&[], None, 0, 10), Choice::NoHealthy);
    }

    #[test]
    fn full_queues_mean_overloaded() {
        assert_eq!(choose(&[up(1), up(1)], None, 0, 1), Choice::Overloaded);
        assert_eq!(choose(&[up(1), up(0)], Some(0), 0, 1), Choice::Backend(1));
        // An ejected backend's free queue does not count.
        assert_eq!(choose(&[up(2), down(0)], None, 0, 2), Choice::Overloaded);
    }

    #[test]
    fn slack_grows_with_load() {
        assert_eq!(affinity_slack(0), 2);
        assert_eq!(affinity_slack(10), 7);
    }
}
