//! The shardserve inference engine and rank process.
//!
//! One folder per concern: `weights/` reads model files and hands out a rank's
//! slice of each tensor, `model/` is the Llama-family transformer built from
//! parallel-ready layers, `comm/` the collectives between ranks, `kv/` the
//! paged key/value cache and its block manager, `lora/` reads LoRA adapters
//! and cuts them like their base, `scheduler/` continuous batching,
//! `sampling/` picks tokens, `tokenizer/` turns text into ids
//! and back, `engine/` runs requests on a compute thread, and `server/` serves
//! the engine over gRPC. CPU products on quantised weights live in the
//! `shardserve-kernels` crate.

pub mod comm;
pub mod device;
pub mod engine;
pub mod kv;
pub mod lora;
pub mod model;
pub mod progress;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;
pub mod weights;
