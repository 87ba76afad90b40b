//! A safetensors file (header and tensor table, then data) opened as a shard of a
//! Hugging Face checkpoint, then every tensor read whole and as the halves two
//! tensor-parallel ranks read.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use shardserve_worker::weights::{Safetensors, Split};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = Safetensors::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    for name in file.tensor_names() {
        let Ok((_, dims)) = file.tensor_info(name) else {
            continue;
        };
        let rows = dims.first().copied().unwrap_or(0);
        let cols = dims.last().copied().unwrap_or(0);
        for split in [
            Split::Full,
            Split::Rows(0..rows / 2),
            Split::Cols(cols / 2..cols),
        ] {
            let _ = file.load(name, &split, &Device::Cpu);
        }
    }
});
