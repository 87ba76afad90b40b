//! A GGUF file (header, metadata, tensor table, data) loaded as the worker loads
//! one: checked, its tokenizer and model built on the CPU, then every tensor read
//! whole and as the halves two tensor-parallel ranks read.
#![no_main]

use std::sync::Arc;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use shardserve_worker::comm::SingleRank;
use shardserve_worker::model::{Host, Transformer};
use shardserve_worker::tokenizer::Tokenizer;
use shardserve_worker::weights::{GgufFile, Split};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let _ = Tokenizer::from_gguf(file.metadata());
    let _ = Transformer::from_gguf(&file, Arc::new(SingleRank), Host);
    for name in file.tensor_names() {
        let Ok(meta) = file.tensor_meta(name) else {
            continue;
        };
        let rows = meta.dims.first().copied().unwrap_or(0);
        let cols = meta.dims.last().copied().unwrap_or(0);
        for split in [
            Split::Full,
            Split::Rows(0..rows / 2),
            Split::Cols(cols / 2..cols),
        ] {
            let _ = file.load(name, &split, &Device::Cpu);
        }
    }
});
