//! The `shardserve.v1` API: generated prost messages and tonic client/server.
//! Workers serve it; the router serves and calls it.

/// Version 1 of the API; fields are added, never renumbered.
pub mod v1 {
    tonic::include_proto!("shardserve.v1");
}
