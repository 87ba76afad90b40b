//! The shardserve router: OpenAI-compatible HTTP and gRPC front, discovery,
//! balancing and backpressure. Empty until the router issue fills it.
