//! How far a process is in fetching and loading its model, in bytes, so that the
//! operator can show a group's progress (`status.groups[].bytesDone`).
//!
//! A [`Tally`] counts one process's bytes. The ranks of one pod are several
//! processes under `--local-ranks` (one per GPU), and the pod answers the operator
//! from its first rank only, so the other ranks each keep a small JSON file in a
//! folder the first rank made for them ([`PEERS_ENV`]); [`PodProgress`] adds them up.
//! Files and not a socket: nothing to serve or connect, and a rank that died leaves
//! its last count, which is what the operator should see until the group restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The environment variable naming the folder where a pod's other ranks keep their
/// counts (set by the first rank for the ranks it starts).
pub const PEERS_ENV: &str = "SHARDSERVE_PROGRESS_DIR";

/// How often a rank rewrites its file while it loads.
const WRITE_EVERY: Duration = Duration::from_millis(500);

/// Bytes done of bytes to do, counted from any thread.
#[derive(Debug, Default)]
pub struct Tally {
    done: AtomicU64,
    total: AtomicU64,
}

impl Tally {
    pub fn add_total(&self, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Everything counted is done (a model's tensors the architecture does not use
    /// are never loaded, yet the load is complete).
    pub fn finish(&self) {
        self.done
            .store(self.total.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// `(done, total)`; done never shows above total.
    pub fn bytes(&self) -> (u64, u64) {
        let total = self.total.load(Ordering::Relaxed);
        (self.done.load(Ordering::Relaxed).min(total), total)
    }
}

/// Where a process is, from least to most advanced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The model files are being fetched.
    Downloading,
    /// The rank reads its shard (and then waits for its group to meet).
    Loading,
    /// The shard is loaded and the group has met.
    Loaded,
}

impl Stage {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Downloading,
            1 => Self::Loading,
            _ => Self::Loaded,
        }
    }
}

/// One process's (or a whole pod's) progress at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub stage: Stage,
    pub done: u64,
    pub total: u64,
    /// Processes counted (the pod's ranks, or its one fetch).
    pub processes: u32,
}

impl Report {
    /// Two parts of one pod: the least advanced stage, the bytes added up.
    fn and(self, other: Report) -> Report {
        Report {
            stage: self.stage.min(other.stage),
            done: self.done + other.done,
            total: self.total + other.total,
            processes: self.processes + other.processes,
        }
    }
}

/// This process's stage and bytes.
#[derive(Debug)]
pub struct Progress {
    stage: AtomicU8,
    tally: Arc<Tally>,
}

impl Progress {
    pub fn new(stage: Stage, tally: Arc<Tally>) -> Arc<Self> {
        Arc::new(Self {
            stage: AtomicU8::new(stage as u8),
            tally,
        })
    }

    pub fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Relaxed);
    }

    pub fn report(&self) -> Report {
        let (done, total) = self.tally.bytes();
        Report {
            stage: Stage::from_u8(self.stage.load(Ordering::Relaxed)),
            done,
            total,
            processes: 1,
        }
    }
}

/// A pod's progress: this process's and, when it started the pod's other ranks,
/// theirs from their files.
#[derive(Clone, Debug)]
pub struct PodProgress {
    own: Arc<Progress>,
    peers: Option<PathBuf>,
}

impl PodProgress {
    pub fn new(own: Arc<Progress>, peers: Option<PathBuf>) -> Self {
        Self { own, peers }
    }

    /// The pod's report. A peer whose file is missing or unreadable yet (it has not
    /// written one) counts as a rank still loading, with nothing known of its bytes.
    pub fn report(&self, expected_peers: usize) -> Report {
        let own = self.own.report();
        let Some(dir) = &self.peers else {
            return own;
        };
        let mut found: Vec<Report> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "json"))
            .filter_map(|entry| std::fs::read(entry.path()).ok())
            .filter_map(|bytes| serde_json::from_slice::<Report>(&bytes).ok())
            .collect();
        while found.len() < expected_peers {
            found.push(Report {
                stage: Stage::Loading,
                done: 0,
                total: 0,
                processes: 1,
            });
        }
        found.into_iter().fold(own, Report::and)
    }
}

/// Keeps `progress` in `dir/<name>.json` every half second until its stage is
/// [`Stage::Loaded`], on a thread of its own; the last write is the final count.
/// Each write replaces the file whole (write, then rename), so a reader never sees
/// half of one.
pub fn keep_in_file(dir: &Path, name: &str, progress: Arc<Progress>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.json"));
    let partial = dir.join(format!(".{name}.json.partial"));
    std::thread::Builder::new()
        .name("progress-file".into())
        .spawn(move || {
            loop {
                let report = progress.report();
                let written = serde_json::to_vec(&report)
                    .map_err(std::io::Error::other)
                    .and_then(|bytes| std::fs::write(&partial, bytes))
                    .and_then(|()| std::fs::rename(&partial, &path));
                if let Err(e) = written {
                    tracing::debug!(error = %e, path = %path.display(), "progress file not written");
                }
                if report.stage == Stage::Loaded {
                    return;
                }
                std::thread::sleep(WRITE_EVERY);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_finishes_at_its_total_and_never_shows_more() {
        let tally = Tally::default();
        tally.add_total(100);
        tally.add_done(40);
        assert_eq!(tally.bytes(), (40, 100));
        tally.add_done(90);
        assert_eq!(tally.bytes(), (100, 100));
        let tally = Tally::default();
        tally.add_total(100);
        tally.add_done(10);
        tally.finish();
        assert_eq!(tally.bytes(), (100, 100));
    }

    #[test]
    fn a_pod_adds_up_its_ranks_files_and_waits_for_the_least_advanced() {
        let dir = tempfile::tempdir().unwrap();
        let own_tally = Arc::new(Tally::default());
        own_tally.add_total(1000);
        own_tally.add_done(1000);
        let own = Progress::new(Stage::Loaded, own_tally);

        let peer_tally = Arc::new(Tally::default());
        peer_tally.add_total(1000);
        peer_tally.add_done(250);
        let peer = Progress::new(Stage::Loading, peer_tally.clone());
        keep_in_file(dir.path(), "rank-1", peer.clone()).unwrap();

        let pod = PodProgress::new(own, Some(dir.path().to_path_buf()));
        // Rank 2 has written nothing yet: still loading, bytes unknown.
        let report = wait_for(|| pod.report(2), |r| r.done == 1250);
        assert_eq!(
            report,
            Report {
                stage: Stage::Loading,
                done: 1250,
                total: 2000,
                processes: 3,
            }
        );

        peer_tally.finish();
        peer.set_stage(Stage::Loaded);
        let report = wait_for(|| pod.report(1), |r| r.stage == Stage::Loaded);
        assert_eq!(
            (report.done, report.total, report.processes),
            (2000, 2000, 2)
        );
    }

    fn wait_for(mut read: impl FnMut() -> Report, until: impl Fn(&Report) -> bool) -> Report {
        for _ in 0..100 {
            let report = read();
            if until(&report) {
                return report;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        read()
    }
}
