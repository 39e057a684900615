//! The token bucket that paces one direction of a connection: it lives in the test kit
//! beside the stand-in upstreams that pace themselves with it.

pub use sluice_testkit::pacing::TokenBucket;
