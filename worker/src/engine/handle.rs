//! The engine on its own thread, driven from async code through channels.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;

use super::{Engine, EngineError, Finished, Flow, GenerationRequest, ModelInfo, TokenEvent};
use crate::tokenizer::Tokenizer;

/// What a submitted request produces, in order: tokens, then one `Finished`
/// or one `Error`.
#[derive(Debug)]
pub enum EngineEvent {
    Token(TokenEvent),
    Finished(Finished),
    Error(EngineError),
}

struct Job {
    request: GenerationRequest,
    events: mpsc::Sender<EngineEvent>,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: std_mpsc::Sender<Job>,
    info: Arc<ModelInfo>,
    tokenizer: Arc<Tokenizer>,
    load: Arc<Load>,
    stopped: tokio::sync::watch::Receiver<bool>,
}

/// How busy the engine is: requests waiting for it and sequences it is
/// generating. Written by the engine thread and `submit`, read by metrics.
#[derive(Default)]
struct Load {
    queued: AtomicUsize,
    running: AtomicUsize,
}

/// A snapshot of [`EngineHandle::load`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineLoad {
    /// Requests submitted that the engine has not started.
    pub queued: usize,
    /// Sequences the engine is generating now.
    pub running: usize,
}

/// How often an idle leader tells its followers it is alive (well inside
/// their collective timeout).
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// Tokens buffered per request before the engine waits for a slow reader.
const EVENT_BUFFER: usize = 64;

impl EngineHandle {
    /// Moves `engine` onto a new thread that runs submitted requests in order.
    pub fn spawn(engine: Engine) -> std::io::Result<Self> {
        let info = Arc::new(engine.info().clone());
        let tokenizer = engine.tokenizer().clone();
        let (jobs, rx) = std_mpsc::channel::<Job>();
        let load = Arc::new(Load::default());
        let engine_load = load.clone();
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                run(engine, rx, &engine_load);
                let _ = stopped_tx.send(true);
            })?;
        Ok(Self {
            jobs,
            info,
            tokenizer,
            load,
            stopped,
        })
    }

    /// Resolves when the engine thread has ended (its group broke, or every
    /// handle is gone): the process can no longer serve.
    pub async fn stopped(&self) {
        let mut rx = self.stopped.clone();
        let _ = rx.wait_for(|&stopped| stopped).await;
    }

    /// Requests waiting and sequences running, now.
    pub fn load(&self) -> EngineLoad {
        EngineLoad {
            queued: self.load.queued.load(Ordering::Relaxed),
            running: self.load.running.load(Ordering::Relaxed),
        }
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
    ) -> Result<mpsc::Receiver<EngineEvent>, EngineError> {
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        self.load.queued.fetch_add(1, Ordering::Relaxed);
        self.jobs.send(Job { request, events }).map_err(|_| {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            EngineError::Stopped
        })?;
        Ok(rx)
    }
}

fn run(mut engine: Engine, jobs: std_mpsc::Receiver<Job>, load: &Load) {
    loop {
        let Job { request, events } = match jobs.recv_timeout(HEARTBEAT) {
            Ok(job) => job,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = engine.heartbeat() {
                    tracing::error!(error = %e, "tensor-parallel group failed while idle; the engine stops");
                    return;
                }
                continue;
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        load.queued.fetch_sub(1, Ordering::Relaxed);
        if events.is_closed() {
            continue;
        }
        let mut sink = |token: TokenEvent| match events.blocking_send(EngineEvent::Token(token)) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Cancel,
        };
        load.running.fetch_add(1, Ordering::Relaxed);
        let result = {
            // Counts the sequence down however generation ends (even a panic).
            let _running = Running(&load.running);
            engine.generate(&request, &mut sink)
        };
        let last = match result {
            Ok(Some(finished)) => EngineEvent::Finished(finished),
            Ok(None) => {
                tracing::debug!("request cancelled by its caller");
                continue;
            }
            Err(e) if e.is_group_failure() => {
                // A rank died or stalled: this group cannot compute any more.
                tracing::error!(error = %e, "tensor-parallel group failed; the engine stops");
                let _ = events.blocking_send(EngineEvent::Error(e));
                return;
            }
            Err(e) => EngineEvent::Error(e),
        };
        // The caller may be gone already; nothing is left to free.
        let _ = events.blocking_send(last);
    }
    engine.stop_group();
    tracing::info!("engine thread stopped: no more handles");
}

/// Counts one running sequence down when dropped.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
