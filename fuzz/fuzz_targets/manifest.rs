//! A `ModelDeployment` manifest (YAML, one or more documents) parsed and validated
//! as `shardserve up` reads it, then checked and planned as the operator does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardserve_operator::controller::check::check;
use shardserve_operator::parse_manifests;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(deployments) = parse_manifests(text) else {
        return;
    };
    for md in &deployments {
        let _ = check(md);
    }
});
