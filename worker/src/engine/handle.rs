//! The engine on its own thread, driven from async code through channels.

use std::sync::Arc;
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
}

/// Tokens buffered per request before the engine waits for a slow reader.
const EVENT_BUFFER: usize = 64;

impl EngineHandle {
    /// Moves `engine` onto a new thread that runs submitted requests in order.
    pub fn spawn(engine: Engine) -> std::io::Result<Self> {
        let info = Arc::new(engine.info().clone());
        let tokenizer = engine.tokenizer().clone();
        let (jobs, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(engine, rx))?;
        Ok(Self {
            jobs,
            info,
            tokenizer,
        })
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
        self.jobs
            .send(Job { request, events })
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }
}

fn run(mut engine: Engine, jobs: std_mpsc::Receiver<Job>) {
    while let Ok(Job { request, events }) = jobs.recv() {
        if events.is_closed() {
            continue;
        }
        let mut sink = |token: TokenEvent| match events.blocking_send(EngineEvent::Token(token)) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Cancel,
        };
        let last = match engine.generate(&request, &mut sink) {
            Ok(Some(finished)) => EngineEvent::Finished(finished),
            Ok(None) => {
                tracing::debug!("request cancelled by its caller");
                continue;
            }
            Err(e) => EngineEvent::Error(e),
        };
        // The caller may be gone already; nothing is left to free.
        let _ = events.blocking_send(last);
    }
    tracing::info!("engine thread stopped: no more handles");
}
