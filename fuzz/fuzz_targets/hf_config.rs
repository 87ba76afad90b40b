//! A Hugging Face `config.json` read into the model's hyper-parameters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardserve_worker::model::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let _ = ModelConfig::from_hf_config_bytes(data);
});
