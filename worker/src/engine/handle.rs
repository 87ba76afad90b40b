//! The engine on its own thread, driven from async code through channels.
//!
//! The thread takes new requests between steps, so they join the running
//! batch as soon as there is room, and drops the requests whose callers went
//! away. Events go out on unbounded channels: one slow reader never holds up
//! the batch, and a request's events are bounded by its token budget.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;

use super::stats::StatsCell;
use super::{
    AdapterInfo, Engine, EngineError, EngineEvent, EngineStats, GenerationRequest, ModelInfo,
};
use crate::scheduler::SeqId;
use crate::tokenizer::Tokenizer;

enum Job {
    Generate {
        request: GenerationRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    },
    /// Load or unload a LoRA adapter, between steps.
    Adapter {
        change: AdapterChange,
        reply: tokio::sync::oneshot::Sender<Result<Option<AdapterInfo>, EngineError>>,
    },
}

/// A change to the adapters an engine serves.
#[derive(Clone, Debug)]
pub enum AdapterChange {
    /// Serve `name` from `path`, fetched from `source` (listed as given).
    Load {
        name: String,
        source: String,
        path: PathBuf,
    },
    Unload {
        name: String,
    },
}

/// Turns an adapter source that is not a local path (`hf://`, `pip://`) into
/// one, fetching it first; the error says why it could not. It may block for a
/// download, so it runs off the engine thread and off the async workers.
pub type AdapterFetch = Arc<dyn Fn(&str) -> Result<PathBuf, String> + Send + Sync>;

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: std_mpsc::Sender<Job>,
    info: Arc<ModelInfo>,
    tokenizer: Arc<Tokenizer>,
    /// Requests submitted and not yet taken by the engine thread.
    submitted: Arc<AtomicUsize>,
    stats: Arc<StatsCell>,
    stopped: tokio::sync::watch::Receiver<bool>,
    adapters: Arc<std::sync::RwLock<Vec<AdapterInfo>>>,
    fetch_adapter: Option<AdapterFetch>,
}

/// A snapshot of [`EngineHandle::load`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineLoad {
    /// Requests submitted that are not in the running batch yet.
    pub queued: usize,
    /// Sequences the engine is generating now.
    pub running: usize,
}

/// How often an idle leader tells its followers it is alive (well inside
/// their collective timeout).
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

impl EngineHandle {
    /// Moves `engine` onto a new thread that runs submitted requests,
    /// batched.
    pub fn spawn(engine: Engine) -> std::io::Result<Self> {
        let info = Arc::new(engine.info().clone());
        let tokenizer = engine.tokenizer().clone();
        let stats = engine.stats_cell();
        let adapters = engine.adapter_list.clone();
        engine.publish_adapters();
        let (jobs, rx) = std_mpsc::channel::<Job>();
        let submitted = Arc::new(AtomicUsize::new(0));
        let engine_submitted = submitted.clone();
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                run(engine, rx, &engine_submitted);
                let _ = stopped_tx.send(true);
            })?;
        Ok(Self {
            jobs,
            info,
            tokenizer,
            submitted,
            stats,
            stopped,
            adapters,
            fetch_adapter: None,
        })
    }

    /// This handle, able to load adapters from sources `fetch` understands.
    pub fn with_adapter_fetch(mut self, fetch: AdapterFetch) -> Self {
        self.fetch_adapter = Some(fetch);
        self
    }

    /// The local path of adapter `source`: a path (or `file://`) as it is, another
    /// source fetched (on a blocking thread) when this worker can fetch.
    pub async fn adapter_path(&self, source: &str) -> Result<PathBuf, EngineError> {
        let local = source.strip_prefix("file://").unwrap_or(source);
        if !local.contains("://") {
            return Ok(PathBuf::from(local));
        }
        let Some(fetch) = self.fetch_adapter.clone() else {
            return Err(EngineError::InvalidRequest(format!(
                "this worker cannot fetch adapter source {source}: give a path on its file system"
            )));
        };
        let owned = source.to_string();
        tokio::task::spawn_blocking(move || fetch(&owned))
            .await
            .map_err(|e| EngineError::InvalidRequest(format!("fetching {source}: {e}")))?
            .map_err(|e| EngineError::InvalidRequest(format!("adapter source {source}: {e}")))
    }

    /// The LoRA adapters served now.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.adapters.read().map(|a| a.clone()).unwrap_or_default()
    }

    /// Loads or unloads an adapter on the engine thread (between steps, on
    /// every rank of the group); a load answers with the adapter as listed.
    pub async fn change_adapter(
        &self,
        change: AdapterChange,
    ) -> Result<Option<AdapterInfo>, EngineError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Adapter { change, reply })
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Resolves when the engine thread has ended (its group broke, or every
    /// handle is gone): the process can no longer serve.
    pub async fn stopped(&self) {
        let mut rx = self.stopped.clone();
        let _ = rx.wait_for(|&stopped| stopped).await;
    }

    /// Requests waiting and sequences running, now.
    pub fn load(&self) -> EngineLoad {
        let stats = self.stats.snapshot();
        EngineLoad {
            queued: self.submitted.load(Ordering::Relaxed) + stats.waiting as usize,
            running: stats.running as usize,
        }
    }

    /// The scheduler's and the cache's counters, now.
    pub fn stats(&self) -> EngineStats {
        self.stats.snapshot()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping
    /// the receiver cancels the request and frees its memory.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<EngineEvent>, EngineError> {
        let (events, rx) = mpsc::unbounded_channel();
        self.submitted.fetch_add(1, Ordering::Relaxed);
        self.jobs
            .send(Job::Generate { request, events })
            .map_err(|_| {
                self.submitted.fetch_sub(1, Ordering::Relaxed);
                EngineError::Stopped
            })?;
        Ok(rx)
    }
}

/// The engine thread's loop: take new requests, drop cancelled ones, step.
fn run(mut engine: Engine, jobs: std_mpsc::Receiver<Job>, submitted: &AtomicUsize) {
    let mut callers: HashMap<SeqId, mpsc::UnboundedSender<EngineEvent>> = HashMap::new();
    'serve: loop {
        // Idle: wait for work, heartbeating the group meanwhile. Busy: take
        // whatever arrived since the last step without waiting.
        let first = if engine.has_work() {
            jobs.try_recv().ok()
        } else {
            match jobs.recv_timeout(HEARTBEAT) {
                Ok(job) => Some(job),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = engine.heartbeat() {
                        tracing::error!(error = %e, "tensor-parallel group failed while idle; the engine stops");
                        return;
                    }
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break 'serve,
            }
        };
        for job in first.into_iter().chain(jobs.try_iter()) {
            let (request, events) = match job {
                Job::Generate { request, events } => (request, events),
                Job::Adapter { change, reply } => {
                    let result = match change {
                        AdapterChange::Load { name, source, path } => {
                            engine.load_adapter_from(&name, &source, &path).map(Some)
                        }
                        AdapterChange::Unload { name } => {
                            engine.unload_adapter(&name).map(|()| None)
                        }
                    };
                    let group_broke = matches!(&result, Err(e) if e.is_group_failure());
                    let _ = reply.send(result);
                    if group_broke {
                        tracing::error!(
                            "tensor-parallel group failed while changing adapters; the engine stops"
                        );
                        return;
                    }
                    continue;
                }
            };
            submitted.fetch_sub(1, Ordering::Relaxed);
            if events.is_closed() {
                continue;
            }
            match engine.add(request) {
                Ok(seq) => {
                    callers.insert(seq, events);
                }
                Err(e) => {
                    let _ = events.send(EngineEvent::Error(e));
                }
            }
        }
        callers.retain(|&seq, events| {
            let gone = events.is_closed();
            if gone {
                tracing::debug!(seq, "request cancelled by its caller");
                engine.cancel(seq);
            }
            !gone
        });
        if !engine.has_work() {
            continue;
        }
        let events = match engine.step() {
            Ok(events) => events,
            Err(e) => {
                // A rank died or stalled: this group cannot compute any more.
                tracing::error!(error = %e, "tensor-parallel group failed; the engine stops");
                let message = e.to_string();
                for (_, events) in callers.drain() {
                    let _ = events.send(EngineEvent::Error(EngineError::GroupFailed(
                        message.clone(),
                    )));
                }
                return;
            }
        };
        for step in events {
            let done = !matches!(step.event, EngineEvent::Token(_));
            let Some(caller) = callers.get(&step.seq) else {
                continue;
            };
            if caller.send(step.event).is_err() && !done {
                // The caller went away mid-stream: stop computing for it.
                engine.cancel(step.seq);
                callers.remove(&step.seq);
            } else if done {
                callers.remove(&step.seq);
            }
        }
    }
    engine.stop_group();
    tracing::info!("engine thread stopped: no more handles");
}
