//! A `shardserve.v1.GenerateRequest` as the worker receives it (protobuf bytes:
//! text, chat or token-id prompt, sampling, stopping), decoded and checked up to
//! the request handed to the engine.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use shardserve_proto::v1::GenerateRequest;
use shardserve_worker::server::generation_request;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = GenerateRequest::decode(data) {
        let _ = generation_request(&request);
    }
});
