//! A request body of TGI `/generate` (and `/generate_stream`, `/`), mapped as the
//! router's handlers map it, against a model whose context is not known yet and one
//! with a small context and a `--max-tokens` cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardserve_router::{ApiEndpoint, Limits, map_body};

const LIMITS: [Limits; 2] = [
    Limits {
        context: None,
        max_tokens: None,
    },
    Limits {
        context: Some(64),
        max_tokens: Some(32),
    },
];

fuzz_target!(|data: &[u8]| {
    for endpoint in [ApiEndpoint::TgiGenerate] {
        for limits in LIMITS {
            let _ = map_body(endpoint, data, limits);
        }
    }
});
