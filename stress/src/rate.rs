//! Sizes, rates, durations and the token bucket: they live in the test kit beside the
//! stand-in upstreams that pace themselves with them.

pub use sluice_testkit::pace::TokenBucket;
pub use sluice_testkit::units::*;
