//! Sizes ("64KiB"), rates ("64KiB/s") and durations ("30s"): they live in the test kit
//! beside the stand-in upstreams that are configured with them.

pub use sluice_testkit::units::*;
